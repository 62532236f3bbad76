"""``build_round``: one federated round as one compiled function.

    round_step(base, server_state, client_store, cohort_ids, cohort_data, rng)
        -> (server_state, client_store, metrics)

* ``base`` (the frozen model) is passed once and is never mapped over clients
  (``in_axes=None``), so memory holds one copy of it.
* The cohort (``C`` clients, a multiple of ``chunk_size``) runs ``client_update``
  vmapped over a chunk of clients; chunks run one after another under
  ``lax.scan``, so activation memory is bounded by one chunk while only the
  trainable outputs (C x trainable) are kept.
* Per-client PRNG keys are folded from (round key, client id), so results do not
  depend on the cohort order, the chunk size or the number of devices.
* Aggregation (``algorithm.aggregate``) is a reduction over the client axis inside
  the same jit; the per-client store is gathered and scattered by cohort id.
* With a ``mesh`` (``client_mesh``), the cohort axis is split over the mesh's
  ``clients`` axis with ``jax.shard_map``: each device runs its C / D clients
  (vmapped and chunked as above) against its own replica of the base, and the
  aggregation runs on the sharded outputs, where XLA's SPMD partitioner turns the
  reductions over clients into collectives. The cohort size must be a multiple of
  D x chunk_size; pad it with empty slots (id -1, weight 0: ``sampling``), which
  change nothing. A mesh may also have a ``model`` axis: the base's parameters can
  then be sharded over it (``shard_base``) and the partitioner handles them inside
  each client-shard (shard_map is manual over ``clients`` only).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_llm.core import client_store as store_lib
from fedjax_llm.tree import tree_stack
from fedjax_llm.core.algorithm import FederatedAlgorithm
from fedjax_llm.types import Array, ClientBatches, ClientInfo


class CohortData(NamedTuple):
  """A cohort's local data (leading axis C), as built by the data layer."""

  tokens: Array  # int32 [C, S, B, T]
  mask: Array  # float32 [C, S, B, T]
  num_steps: Array  # int32 [C]: local steps per client (0 for empty slots)
  num_tokens: Array  # float32 [C]: target tokens per client this round (0 for empty slots)
  weights: Array  # float32 [C]: aggregation weights p_k before normalization (0 for empty slots)


def reduce_client_metrics(metrics: dict, weights: Array) -> dict:
  """``sum_*`` keys are summed over clients; the rest are weight-averaged."""
  w = weights.astype(jnp.float32)
  wsum = jnp.maximum(jnp.sum(w), 1e-12)
  out = {}
  for k, v in metrics.items():
    out[k] = jnp.sum(v) if k.startswith("sum_") else jnp.sum(v * w) / wsum
  return out


def finish_round(algorithm: FederatedAlgorithm, server_state, client_store, cohort_ids, num_tokens, weights,
                 outputs, new_states, client_metrics):
  """Aggregate the cohort's outputs (axis C), scatter client states back, reduce metrics."""
  present = (cohort_ids >= 0).astype(jnp.float32)
  w = weights.astype(jnp.float32) * present
  new_state, server_metrics = algorithm.aggregate(server_state, outputs, w)
  # A round in which no client carries weight (all slots empty, every client dropped) changes no server
  # parameter: a weighted mean over nobody is undefined, not zero. Only the round counter advances.
  anyone = jnp.sum(w) > 0
  server_state = jax.tree.map(lambda n, o: jnp.where(anyone, n, o), new_state, server_state)
  server_state = server_state._replace(round=new_state.round)
  client_store = store_lib.scatter(client_store, cohort_ids, new_states)
  metrics = reduce_client_metrics(client_metrics, num_tokens.astype(jnp.float32) * present)
  metrics.update(server_metrics)
  metrics["clients"] = jnp.sum(present)
  return server_state, client_store, metrics


def client_view(algorithm: FederatedAlgorithm, base, server_state):
  """What every client of the round receives: ``algorithm.broadcast(base, server_state)`` or the state itself."""
  return server_state if algorithm.broadcast is None else algorithm.broadcast(base, server_state)


def _client_fn(algorithm: FederatedAlgorithm):
  def run_one(base, server_state, client_state, tokens, mask, info, key):
    return algorithm.client_update(base, server_state, client_state, ClientBatches(tokens, mask), info, key)
  return run_one


def run_clients(algorithm: FederatedAlgorithm, base, server_state, client_states, cohort_ids: Array,
                data: CohortData, rng: Array, chunk_size: int):
  """All cohort clients, vmapped within a chunk and scanned over chunks; outputs have axis C."""
  c = cohort_ids.shape[0]
  if c % chunk_size:
    raise ValueError(f"cohort size {c} is not a multiple of chunk_size {chunk_size}")
  info = ClientInfo(client_id=cohort_ids, num_steps=data.num_steps, num_tokens=data.num_tokens)
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(cohort_ids)
  per_client = (client_states, data.tokens, data.mask, info, keys)
  vmapped = jax.vmap(_client_fn(algorithm), in_axes=(None, None, 0, 0, 0, 0, 0))
  n_chunks = c // chunk_size
  if n_chunks == 1:
    return vmapped(base, server_state, *per_client)
  chunked = jax.tree.map(lambda x: x.reshape((n_chunks, chunk_size) + x.shape[1:]), per_client)

  def body(_, xs):
    return None, vmapped(base, server_state, *xs)

  _, out = jax.lax.scan(body, None, chunked)
  return jax.tree.map(lambda x: x.reshape((c,) + x.shape[2:]), out)


CLIENT_AXIS = "clients"
MODEL_AXIS = "model"


def client_mesh(num_devices: int | None = None, *, model: int = 1, devices=None) -> Mesh:
  """A ``(clients, model)`` device mesh over the first ``num_devices`` devices (all by default).

  ``model`` > 1 reserves that many devices per client shard for a model-sharded base (``shard_base``).
  On several hosts call ``jax.distributed.initialize()`` first: ``jax.devices()`` then lists every host's devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices) if num_devices is None or num_devices == 0 else int(num_devices)
  if n < 1 or n > len(devices):
    raise ValueError(f"mesh: num_devices={num_devices} but {len(devices)} devices are visible "
                     f"({devices[0].platform}); allowed: 1..{len(devices)} (0 or None: all)")
  if model < 1 or n % model:
    raise ValueError(f"mesh: model axis size {model} must divide the {n} devices")
  kw = {}
  if hasattr(jax.sharding, "AxisType"):  # jax >= 0.7: vmap + NamedSharding need Auto axes
    kw["axis_types"] = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((n // model, model), (CLIENT_AXIS, MODEL_AXIS), devices=devices[:n], **kw)


def client_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (client) axis split over the mesh's ``clients`` axis, the other axes replicated."""
  return NamedSharding(mesh, P(CLIENT_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def place(tree, sharding_fn):
  """Put every leaf of ``tree`` on the mesh with ``sharding_fn(leaf) -> Sharding``; works on one host or many.

  On several hosts every process must hold the same global values (the cohort, the data and the initial state are
  pure functions of the config and the seed here): each process then builds only its addressable shards.
  """
  def put(x):
    sh = sharding_fn(x)
    if jax.process_count() == 1:
      return jax.device_put(x, sh)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys: place their raw words
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])
  return jax.tree.map(put, tree)


def client_axis_sharding(mesh: Mesh, x) -> NamedSharding:
  """The leading axis split over ``clients`` when the client-shard count divides it, else replicated."""
  d = mesh.shape[CLIENT_AXIS]
  return client_sharding(mesh) if x.ndim and x.shape[0] % d == 0 else replicated(mesh)


def shard_clients(mesh: Mesh, tree):
  """Place a tree whose leaves have a leading client axis (cohort data, the client store): see client_axis_sharding."""
  return place(tree, lambda x: client_axis_sharding(mesh, x))


def shard_base(mesh: Mesh, base, *, min_size: int = 2 ** 16):
  """Replicate the frozen base on every client shard; with a ``model`` axis > 1, split each large matrix over it.

  A leaf of at least ``min_size`` elements is split along its last axis divisible by the model-axis size (the
  output features of a ``[d_in, d_out]`` kernel, the hidden axis of an embedding); the rest is replicated.
  """
  m = mesh.shape[MODEL_AXIS]

  def sharding(x):
    if m > 1 and x.ndim >= 2 and x.size >= min_size:
      for ax in range(x.ndim - 1, -1, -1):
        if x.shape[ax] % m == 0:
          spec = [None] * x.ndim
          spec[ax] = MODEL_AXIS
          return NamedSharding(mesh, P(*spec))
    return replicated(mesh)
  return place(base, sharding)


def build_round(algorithm: FederatedAlgorithm, *, chunk_size: int, donate: bool = True,
                mesh: Mesh | None = None) -> Callable:
  """Return the jitted ``round_step`` (see module docstring).

  Args:
    chunk_size: clients processed together (vmapped) at a time, per device; the cohort size
      must be a multiple of it (times the number of client shards with a mesh; pad the cohort with -1 slots,
      see sampling).
    donate: donate the server state and client store buffers (updated in place).
    mesh: a ``client_mesh``: shard the cohort over its ``clients`` axis (None: one device).
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  if mesh is not None and CLIENT_AXIS not in mesh.shape:
    raise ValueError(f"mesh axes {tuple(mesh.shape)} lack the client axis {CLIENT_AXIS!r}; build it with client_mesh()")
  shards = 1 if mesh is None else mesh.shape[CLIENT_AXIS]

  def clients(base, view, client_states, cohort_ids, data, rng):
    return run_clients(algorithm, base, view, client_states, cohort_ids, data, rng, chunk_size)

  if mesh is not None:
    split = P(CLIENT_AXIS)
    other = frozenset(mesh.axis_names) - {CLIENT_AXIS}
    kw = {"axis_names": frozenset({CLIENT_AXIS})} if any(mesh.shape[a] > 1 for a in other) else {}
    clients = jax.shard_map(clients, mesh=mesh, in_specs=(P(), P(), split, split, split, P()), out_specs=split,
                            check_vma=False, **kw)

  def round_step(base, server_state, client_store, cohort_ids, data: CohortData, rng):
    c = cohort_ids.shape[0]
    if c % (shards * chunk_size):
      raise ValueError(f"cohort size {c} is not a multiple of {shards} client shard(s) x chunk_size {chunk_size}; "
                       f"pad it with empty slots (sampling.padded_cohort_size(cohort, {shards * chunk_size}))")
    client_states = store_lib.gather(client_store, cohort_ids)
    outputs, new_states, client_metrics = clients(
        base, client_view(algorithm, base, server_state), client_states, cohort_ids, data, rng)
    server_state, client_store, metrics = finish_round(algorithm, server_state, client_store, cohort_ids,
                                                       data.num_tokens, data.weights, outputs, new_states,
                                                       client_metrics)
    if mesh is not None:  # hand the state back placed as it came (replicated server, split store): no recompiles
      constrain = lambda t, f: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, f(x)), t)
      server_state = constrain(server_state, lambda x: replicated(mesh))
      client_store = constrain(client_store, lambda x: client_axis_sharding(mesh, x))
    return server_state, client_store, metrics

  return jax.jit(round_step, donate_argnums=(1, 2) if donate else ())


def build_sequential_round(algorithm: FederatedAlgorithm) -> Callable:
  """The baseline the field uses today: a Python loop over clients, one jitted client step each.

  Same signature and same numbers as ``build_round``; used by tests (vmapped ==
  sequential) and by the benchmarks (speed-up of the compiled round).
  """
  client_step = jax.jit(_client_fn(algorithm))

  finish = jax.jit(functools.partial(finish_round, algorithm))
  view_fn = jax.jit(functools.partial(client_view, algorithm))

  def round_step(base, server_state, client_store, cohort_ids, data: CohortData, rng):
    client_states = store_lib.gather(client_store, cohort_ids)
    view = view_fn(base, server_state)
    results = []
    for c in range(cohort_ids.shape[0]):
      cid = cohort_ids[c]
      info = ClientInfo(client_id=cid, num_steps=data.num_steps[c], num_tokens=data.num_tokens[c])
      state_c = jax.tree.map(lambda x: x[c], client_states)
      results.append(client_step(base, view, state_c, data.tokens[c], data.mask[c], info,
                                 jax.random.fold_in(rng, cid)))
    outputs, new_states, client_metrics = tree_stack(results)
    return finish(server_state, client_store, cohort_ids, data.num_tokens, data.weights, outputs, new_states,
                  client_metrics)

  return round_step
