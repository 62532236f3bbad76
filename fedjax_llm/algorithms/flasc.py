"""FLASC: federated LoRA with sparse communication (Kuo, Raje, Rajesh & Smith, 2024, "Federated LoRA
with Sparse Communication", arXiv:2406.05233).

LoRA is trained densely on every client; only the messages are sparse (top-k by
magnitude), with separate densities for download (d_down) and upload (d_up). With P the
server's dense LoRA factors (all a and b of all modules) and TopK_d(x) the mask of the
ceil(d n) largest |x| entries:

    download:  P_down = P * TopK_{d_down}(P)                  (the sparsified global LoRA *weights*)
    client k:  P_k = LocalTrain(P_down)                       (dense: every a and b entry trains)
               upload  u_k = (P_k - P_down) * TopK_{d_up}(P_k - P_down)      (sparsified update)
    server:    P' = ServerOpt(P, pseudo-gradient -sum_k p_k u_k)   (FedAvg: P' = P + sum_k p_k u_k)

The server applies the sparse mean update to its *dense* P (entries pruned from the
download are not lost). This follows the authors' code (imkevinkuo/flasc,
``train_sparse_lora_dp.py``): the download mask is the top-k of |P| (the global
weights, not an update), recomputed every round; the client update is taken relative
to the sparse model it started from; the server optimizer steps on the averaged
negative sparse delta. Global evaluation (``eval_params``) uses P_down, the model the
clients receive, as the authors' default ``--eval-masked true`` does.

Choices and deviations (stated so they can be ablated):
  * Top-k scope (``configs/flasc.py`` uses "tensor": with "global" and B = 0 at init, A's entries set
    the cut-off and B is not downloaded for many rounds, so clients restart B from 0 every round):
    ``scope="global"`` (the builder's default, as the authors' code) ranks all LoRA entries
    of the model together (a and b of every module, one flat vector); ``scope="tensor"``
    keeps ceil(d n_t) entries of every factor tensor separately.
  * k = ceil(d n) (d n rounded to 6 decimals first, so 0.7 * 10 keeps 7), at least 1; the
    authors' code uses floor(d n), which sends nothing for tiny d n.
  * Weights p_k are the simulator's aggregation weights (the authors average uniformly).
  * Byte accounting: a sparse message costs value (the leaf's itemsize, 4 for float32) +
    int32 index (4) per kept entry; a sender uses the dense encoding (4 bytes per entry, no
    indices) when that is smaller, i.e. for d > 1/2, so d = 1 costs exactly FedIT's bytes.
    Both are static per message (fixed k), as in the paper's communication budgets.
  * With d_down = d_up = 1 the method is exactly FedIT (the sparsification is skipped).
  * Per-client output: the client's dense model with the non-uploaded entries reset to their
    start value, where(mask, P_k, P_down) = P_down + u_k; the server adds back P - P_down.
    Kept entries are the client's values bit-for-bit, and the update u_k = output - P_down
    is exactly zero outside the mask.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_llm import tree as T
from fedjax_llm.algorithms import common
from fedjax_llm.algorithms.ffa_lora import check_lora_tree
from fedjax_llm.core.algorithm import FederatedAlgorithm, LossFn, init_server_state, local_training, server_step

SCOPES = ("global", "tensor")
INDEX_BYTES = 4  # int32 index of a kept entry


def check_density(name: str, density) -> float:
  """A density must be a number in (0, 1]; returns it as a float."""
  try:
    d = float(density)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number in (0, 1], got {density!r}") from None
  if not (0.0 < d <= 1.0) or math.isnan(d):
    raise ValueError(f"{name} must be in (0, 1] (the fraction of entries sent), got {density!r}")
  return d


def num_kept(n: int, density: float) -> int:
  """k = ceil(density * n), at least 1 and at most n (static)."""
  return int(min(n, max(1, math.ceil(round(density * n, 6)))))


def topk_mask(x: jax.Array, k: int) -> jax.Array:
  """bool mask of ``x``'s shape, True at the ``k`` (static) largest-magnitude entries (top_k + scatter)."""
  flat = jnp.abs(x.reshape(-1))
  n = flat.shape[0]
  if k >= n:
    return jnp.ones(x.shape, bool)
  _, idx = jax.lax.top_k(flat, k)
  return jnp.zeros((n,), bool).at[idx].set(True).reshape(x.shape)


def sparsity_mask(tree, density: float, scope: str = "global"):
  """The top-k mask tree of ``tree`` (same structure, bool leaves) at ``density``, per ``scope``."""
  leaves, treedef = jax.tree.flatten(tree)
  if scope == "tensor":
    return jax.tree.unflatten(treedef, [topk_mask(x, num_kept(x.size, density)) for x in leaves])
  if scope != "global":
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
  flat = jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in leaves])
  mask = topk_mask(flat, num_kept(flat.shape[0], density))
  offsets = np.cumsum([0] + [x.size for x in leaves])
  return jax.tree.unflatten(treedef, [mask[offsets[i]:offsets[i + 1]].reshape(x.shape) for i, x in enumerate(leaves)])


def _message_bytes(n: int, k: int, itemsize: int) -> float:
  return float(min(k * (itemsize + INDEX_BYTES), n * itemsize))


def message_bytes(tree, density: float, scope: str = "global") -> float:
  """Bytes of one top-k message of ``tree`` (static): min(sparse: value + int32 index per kept entry, dense)."""
  leaves = jax.tree.leaves(tree)
  if scope == "tensor":
    return sum(_message_bytes(x.size, num_kept(x.size, density), jnp.dtype(x.dtype).itemsize) for x in leaves)
  n = sum(x.size for x in leaves)
  itemsize = max(jnp.dtype(x.dtype).itemsize for x in leaves)
  return _message_bytes(n, num_kept(n, density), itemsize)


def sparsify(tree, density: float, scope: str = "global"):
  """``tree`` with every entry outside its top-k mask set to 0 (identity at density 1)."""
  if density >= 1.0:
    return tree
  return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), tree, sparsity_mask(tree, density, scope))


def flasc(loss_fn: LossFn, *, client_optimizer: optax.GradientTransformation,
          server_optimizer: optax.GradientTransformation, density_down: float = 0.25, density_up: float = 0.25,
          scope: str = "global") -> FederatedAlgorithm:
  """Build FLASC.

  Args:
    density_down: fraction of the global LoRA entries the server sends (top-k of |P|), in (0, 1].
    density_up: fraction of the client update entries uploaded (top-k of |P_k - P_down|), in (0, 1].
    scope: "global" (one top-k over all LoRA entries, as the authors' code) or "tensor" (per factor).
  """
  d_down = check_density("density_down", density_down)
  d_up = check_density("density_up", density_up)
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")

  def download(params):
    return sparsify(params, d_down, scope)

  def init(trainable, key):
    del key
    check_lora_tree(trainable, "flasc")
    return init_server_state(trainable, server_optimizer)

  def init_client(trainable, info):
    del trainable, info
    return {}

  def client_update(base, server_state, client_state, batches, info, key):
    start = download(server_state.params)
    params, m = local_training(loss_fn, base, start, client_optimizer, batches, info.num_steps, key)
    if d_up < 1.0:
      mask = sparsity_mask(T.tree_sub(params, start), d_up, scope)
      params = jax.tree.map(jnp.where, mask, params, start)  # start + the uploaded sparse update
    metrics = {"train_loss": m["loss"], "sum_tokens": m["tokens"],
               **common.comm_metrics(info, up=message_bytes(start, d_up, scope),
                                     down=message_bytes(start, d_down, scope))}
    return params, client_state, metrics

  def aggregate(server_state, outputs, weights):
    aggregated = T.tree_weighted_mean(outputs, weights)  # = P_down + sum_k p_k u_k
    if d_down < 1.0:  # the server updates its dense P: P + sum_k p_k u_k
      aggregated = T.tree_add(aggregated, T.tree_sub(server_state.params, download(server_state.params)))
    new_state = server_step(server_state, aggregated, server_optimizer)
    return new_state, {"update_norm": T.tree_norm(T.tree_sub(new_state.params, server_state.params))}

  def eval_params(server_state):
    return download(server_state.params)

  return FederatedAlgorithm("flasc", init, init_client, client_update, aggregate, eval_params)
