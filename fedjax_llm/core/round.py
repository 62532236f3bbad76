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
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

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


def build_round(algorithm: FederatedAlgorithm, *, chunk_size: int, donate: bool = True) -> Callable:
  """Return the jitted ``round_step`` (see module docstring).

  Args:
    chunk_size: clients processed together (vmapped) at a time; the cohort size
      must be a multiple of it (pad the cohort with -1 slots, see sampling).
    donate: donate the server state and client store buffers (updated in place).
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

  def round_step(base, server_state, client_store, cohort_ids, data: CohortData, rng):
    client_states = store_lib.gather(client_store, cohort_ids)
    outputs, new_states, client_metrics = run_clients(
        algorithm, base, client_view(algorithm, base, server_state), client_states, cohort_ids, data, rng,
        chunk_size)
    return finish_round(algorithm, server_state, client_store, cohort_ids, data.num_tokens, data.weights,
                        outputs, new_states, client_metrics)

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
