"""HetLoRA: heterogeneous-rank LoRA (Cho et al., 2024, arXiv:2401.06432).

Client k has a rank r_k <= r_max drawn from its capability. With the global
factors (A, B) at r_max (here ``a = A^T`` [d_in, r_max], ``b = B^T`` [r_max, d_out]):

  download  (truncation):  A_k = A[:r_k, :], B_k = B[:, :r_k]          (a rank mask)
  local     (self-pruning): loss + lambda * sum_modules ||B[:, g:r_k]||_F ||A[g:r_k, :]||_F,
            g = floor(gamma r_k); if the tail term is smaller after local training
            than at its start, the client's rank becomes max(g, min_rank) (kept in
            the client store) and the pruned tail is zeroed before upload
  upload:   zero-pad A_k, B_k to r_max
  aggregate (sparsity-weighted): per LoRA module, p_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F,
            A = sum_k p_k pad(A_k), B = sum_k p_k pad(B_k)   (then a FedOpt server step)

Choices where the paper leaves room (stated so they can be ablated): the norm weights are
computed per LoRA module; the LoRA scale s = alpha / r_max is the same for every client;
a module whose client products are all zero falls back to token weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_llm import tree as T
from fedjax_llm.core.algorithm import (FederatedAlgorithm, LossFn, init_server_state, local_training,
                                       server_step)
from fedjax_llm.peft import lora as lora_lib


def sample_client_ranks(num_clients: int, *, rank_choices, rank_probs=None, seed: int = 0) -> np.ndarray:
  """Draw each client's rank from a capability distribution (seeded), int32 [num_clients]."""
  choices = np.asarray(rank_choices, np.int32)
  if choices.ndim != 1 or len(choices) == 0 or np.any(choices < 1):
    raise ValueError(f"rank_choices must be a non-empty list of positive ints, got {rank_choices!r}")
  probs = None
  if rank_probs is not None:
    probs = np.asarray(rank_probs, np.float64)
    if probs.shape != choices.shape or np.any(probs < 0) or probs.sum() <= 0:
      raise ValueError(f"rank_probs {rank_probs!r} must be non-negative, one per rank in {rank_choices!r}")
    probs = probs / probs.sum()
  rng = np.random.default_rng([int(seed), 0x4E7])
  return rng.choice(choices, size=num_clients, p=probs).astype(np.int32)


def _safe_norm(x: jax.Array) -> jax.Array:
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)))
  return jnp.sqrt(jnp.maximum(sq, 1e-24))  # finite gradient at 0


def tail_norm_product(tree: dict, rank, g) -> jax.Array:
  """sum over LoRA modules of ||B[:, g:rank]||_F * ||A[g:rank, :]||_F."""
  total = jnp.zeros((), jnp.float32)
  for _, m in lora_lib.lora_modules(tree):
    r_max = m["lora_a"].shape[-1]
    idx = jnp.arange(r_max)
    tail = ((idx >= g) & (idx < rank)).astype(jnp.float32)
    total = total + _safe_norm(m["lora_a"] * tail[None, :]) * _safe_norm(m["lora_b"] * tail[:, None])
  return total


def norm_weighted_aggregate(outputs: dict, weights: jax.Array, scale: float = 1.0) -> dict:
  """Per LoRA module: p_k proportional to ||B_k A_k||_F (clients with weight 0 excluded)."""
  present = (weights > 0).astype(jnp.float32)

  def agg(m):
    norms = jnp.sqrt(jnp.maximum(jax.vmap(lambda a, b: lora_lib.delta_sq_norm({"lora_a": a, "lora_b": b}, scale))(
        m["lora_a"], m["lora_b"]), 0.0)) * present
    p = jnp.where(jnp.sum(norms) > 0, T.normalize_weights(norms), T.normalize_weights(weights))
    return T.tree_weighted_sum(m, p)

  return lora_lib.map_lora(agg, outputs)


def hetlora(loss_fn: LossFn, *, client_optimizer: optax.GradientTransformation,
            server_optimizer: optax.GradientTransformation, client_ranks, r_max: int,
            prune_gamma: float = 0.9, prune_lambda: float = 0.0, min_rank: int = 1,
            lora_scale: float = 1.0) -> FederatedAlgorithm:
  """Build HetLoRA.

  Args:
    client_ranks: int [num_clients], each client's initial rank (<= r_max).
    r_max: the padded rank (the LoRA modules' rank).
    prune_gamma, prune_lambda: self-pruning ratio and regularization strength
      (``prune_lambda=0`` disables self-pruning).
    lora_scale: s = alpha / r_max, used for the norm weights ||s B_k A_k||.
  """
  client_ranks = np.asarray(client_ranks, np.int32)
  if np.any(client_ranks > r_max) or np.any(client_ranks < 1):
    bad = int(client_ranks.max() if np.any(client_ranks > r_max) else client_ranks.min())
    raise ValueError(f"client rank {bad} is outside [1, r_max={r_max}]; "
                     f"lower the rank choices or raise the LoRA rank (r_max)")
  if not 0.0 < prune_gamma <= 1.0:
    raise ValueError(f"prune_gamma must be in (0, 1], got {prune_gamma}")
  ranks_arr = jnp.asarray(client_ranks)

  def init(trainable, key):
    del key
    if lora_lib.max_rank(trainable) != r_max:
      raise ValueError(f"LoRA modules have rank {lora_lib.max_rank(trainable)} but r_max={r_max}")
    return init_server_state(trainable, server_optimizer)

  def init_client(trainable, info):
    del trainable
    return {"rank": ranks_arr[jnp.clip(info.client_id, 0, len(client_ranks) - 1)]}

  def client_update(base, server_state, client_state, batches, info, key):
    rank = client_state["rank"]
    g = jnp.floor(prune_gamma * rank).astype(jnp.int32)
    start = lora_lib.rank_mask(server_state.params, rank)

    def reg_loss(base_, params, tokens, mask, k):
      loss, aux = loss_fn(base_, params, tokens, mask, k)
      if prune_lambda > 0:
        loss = loss + prune_lambda * tail_norm_product(params, rank, g)
      return loss, aux

    project = lambda p: lora_lib.rank_mask(p, rank)
    params, m = local_training(reg_loss, base, start, client_optimizer, batches, info.num_steps, key, project)
    if prune_lambda > 0:
      shrank = tail_norm_product(params, rank, g) < tail_norm_product(start, rank, g)
      new_rank = jnp.where(shrank & (info.num_steps > 0), jnp.maximum(g, min_rank), rank)
    else:
      new_rank = rank
    params = lora_lib.rank_mask(params, new_rank)
    present = (info.client_id >= 0).astype(jnp.float32)
    metrics = {"train_loss": m["loss"], "sum_tokens": m["tokens"], "rank": new_rank.astype(jnp.float32),
               "sum_pruned": (new_rank < rank).astype(jnp.float32) * present,
               "sum_bytes_down": 4.0 * lora_lib.lora_num_params(start, rank) * present,
               "sum_bytes_up": 4.0 * lora_lib.lora_num_params(start, new_rank) * present}
    return params, {"rank": new_rank}, metrics

  def aggregate(server_state, outputs, weights):
    aggregated = norm_weighted_aggregate(outputs, weights, lora_scale)
    new_state = server_step(server_state, aggregated, server_optimizer)
    return new_state, {"update_norm": T.tree_norm(T.tree_sub(new_state.params, server_state.params))}

  def eval_params(server_state):
    return server_state.params

  return FederatedAlgorithm("hetlora", init, init_client, client_update, aggregate, eval_params)
