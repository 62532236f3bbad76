"""RBLA: rank-based LoRA aggregation, and replication padding.

Shuaijun Chen, Omid Tavallaie, Niousha Nazemi, Albert Y. Zomaya, "RBLA: Rank-Based-LoRA-
Aggregation for Fine-tuning Heterogeneous Models in FLaaS", 2024, arXiv:2408.08699.
Yuji Byun, Jaeho Lee, "Towards Federated Low-Rank Adaptation of Language Models with Rank
Heterogeneity" (first version: "... with Rank-Heterogeneous Communication"), 2024,
arXiv:2406.17477 (replication-based padding).

Client k has rank r_k <= r_max (a rank mask on the r_max-wide factors). In our notation
(a = A^T [d_in, r_max], b = B^T [r_max, d_out], one LoRA scale s = alpha / r_max for all
clients, p_k the aggregation weights):

  download (truncation, as HetLoRA):  a_k = a[:, :r_k], b_k = b[:r_k, :]
  upload:                             a_k[:, :r_k], b_k[:r_k, :] after local training
  aggregate, mode="rbla" (default): for every rank index i, over the clients covering it,
      S_i = {k : r_k > i},   P_i = sum_{k in S_i} p_k,
      a'[:, i] = sum_{k in S_i} p_k a_k[:, i] / P_i,   b'[i, :] = sum_{k in S_i} p_k b_k[i, :] / P_i
      an index no client of the cohort covers (P_i = 0) keeps its previous global value.
  aggregate, mode="replication" (Byun & Lee): each missing component of a lower-rank client is
      padded with the p-weighted aggregate of the cohort's highest-rank clients
      G = {k : r_k = r_top}, r_top = max_k r_k, m_i = sum_{k in G} p_k x_k[i] / sum_{k in G} p_k,
      and the padded factors are averaged with the weights p_k:
      x'[i] = (sum_{k in S_i} p_k x_k[i] + (P - P_i) m_i) / P   for i < r_top (P = sum_k p_k),
      indices i >= r_top keep their previous global value.
  then a FedOpt server step toward (a', b') (``server_step``; FedAvg sets them).

Zero-padded FedAvg (HetLoRA's padding with data weights) would give x'[i] = P_i / P times the
covering clients' mean: the high-rank components are diluted by the zeros of the low-rank
clients. Both modes avoid that.

Choices and how the two modes relate:
* RBLA's weighting follows the authors' group's public aggregator (usyd_learning
  ``FedAggregator_RBLA``): a NaN-masked average with data-volume weights, i.e. per entry the
  weighted mean over the clients that have it. Uncovered indices: that code truncates the
  global factors to the cohort's maximum rank (and zero-pads on download); we keep the previous
  global value instead (the brief's choice), so a later higher-rank client resumes from it.
* Replication padding is defined in the paper for two rank levels (rank 5 and a top-10%
  group at rank 20): a low-rank client's missing components are copied from the high-rank
  client (several high-rank clients: their aggregate). With two rank levels in a cohort the
  mode equals RBLA exactly (every index >= r_low is covered by the top group only). For more
  levels we read "copied from the high-rank aggregate" literally: the padding always comes
  from the top-rank group, not from every client covering the index (which would be RBLA);
  the two then differ on indices covered by intermediate ranks.
* One LoRA scale s = alpha / r_max for all clients: the factors are averaged index by index,
  so they must live at one scale (as in HetLoRA).
* With a stateful server optimizer an uncovered index gets a zero pseudo-gradient (momentum may
  still move it); with FedAvg it is exactly unchanged.
* Bytes: up and down r_k (d_in + d_out) float32 numbers per module.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_llm import tree as T
from fedjax_llm.algorithms import common
from fedjax_llm.algorithms.flora import check_client_ranks, check_r_max
from fedjax_llm.core.algorithm import FederatedAlgorithm, LossFn, init_server_state, local_training, server_step
from fedjax_llm.peft import lora as lora_lib

MODES = ("rbla", "replication")


def rank_based_mean(x: jax.Array, prev: jax.Array, ranks: jax.Array, weights: jax.Array, rank_axis: int,
                    mode: str = "rbla") -> jax.Array:
  """Aggregate one stacked factor x [C, ...] index by index along ``rank_axis`` (of the unstacked factor).

  Args:
    x: client factors, rank-masked (zeros beyond r_k); prev: the previous global factor (no C axis).
    ranks: int [C] client ranks; weights: [C] aggregation weights (0 = empty slot).
    rank_axis: 1 for ``lora_a`` [d_in, r], 0 for ``lora_b`` [r, d_out].
  """
  r_max = prev.shape[rank_axis]
  w = weights.astype(jnp.float32)
  present = w > 0
  cover = (jnp.arange(r_max)[None, :] < ranks[:, None]) & present[:, None]  # [C, r_max]
  wc = w[:, None] * cover  # [C, r_max]
  p_i = jnp.sum(wc, axis=0)  # [r_max]
  shape = [1, 1]
  shape[rank_axis] = r_max

  def per_index(v):  # [r_max] -> broadcastable over the unstacked factor
    return v.reshape(shape)

  xf = x.astype(jnp.float32)
  wc_b = wc.reshape((x.shape[0],) + tuple(shape))
  covered_sum = jnp.sum(wc_b * xf, axis=0)
  if mode == "rbla":
    covered = p_i > 0
    agg = covered_sum / per_index(jnp.where(covered, p_i, 1.0))
  else:
    top = jnp.max(jnp.where(present, ranks, 0))
    in_top = present & (ranks == top)
    wt = jnp.where(in_top, w, 0.0)
    top_mean = jnp.sum(wt.reshape((-1, 1, 1)) * xf, axis=0) / jnp.maximum(jnp.sum(wt), 1e-30)
    total = jnp.sum(jnp.where(present, w, 0.0))
    covered = (jnp.arange(r_max) < top) & (total > 0)
    agg = (covered_sum + per_index(total - p_i) * top_mean) / jnp.where(total > 0, total, 1.0)
  return jnp.where(per_index(covered), agg, prev.astype(jnp.float32)).astype(prev.dtype)


def rank_based_aggregate(outputs: dict, prev: dict, ranks: jax.Array, weights: jax.Array,
                         mode: str = "rbla") -> dict:
  """``rank_based_mean`` of every LoRA module's a (rank axis 1) and b (rank axis 0)."""
  def go(o, p):
    if isinstance(p, dict) and "lora_a" in p and "lora_b" in p:
      return {**p, "lora_a": rank_based_mean(o["lora_a"], p["lora_a"], ranks, weights, 1, mode),
              "lora_b": rank_based_mean(o["lora_b"], p["lora_b"], ranks, weights, 0, mode)}
    if isinstance(p, dict):
      return {k: go(o[k], v) for k, v in p.items()}
    return T.tree_weighted_mean(o, weights)  # a non-LoRA trainable leaf: plain FedAvg
  return go(outputs, prev)


def rbla(loss_fn: LossFn, *, client_optimizer: optax.GradientTransformation,
         server_optimizer: optax.GradientTransformation, client_ranks, r_max: int,
         mode: str = "rbla") -> FederatedAlgorithm:
  """Build RBLA.

  Args:
    client_ranks: int [num_clients], each client's rank r_k in [1, r_max].
    r_max: the LoRA modules' rank.
    mode: "rbla" (per-index mean over the covering clients) or "replication"
      (Byun & Lee: pad missing components with the top-rank clients' aggregate).
  """
  if mode not in MODES:
    raise ValueError(f"rbla mode={mode!r}; allowed: {', '.join(MODES)}")
  ranks = check_client_ranks("rbla", client_ranks, r_max)
  ranks_arr = jnp.asarray(ranks)

  def init(trainable, key):
    del key
    check_r_max("rbla", trainable, r_max)
    return init_server_state(trainable, server_optimizer)

  def init_client(trainable, info):
    del trainable
    return {"rank": ranks_arr[jnp.clip(info.client_id, 0, len(ranks) - 1)]}

  def client_update(base, server_state, client_state, batches, info, key):
    rank = client_state["rank"]
    start = lora_lib.rank_mask(server_state.params, rank)
    project = lambda p: lora_lib.rank_mask(p, rank)
    params, m = local_training(loss_fn, base, start, client_optimizer, batches, info.num_steps, key, project)
    nbytes = common.rank_bytes(start, rank)
    metrics = {"train_loss": m["loss"], "sum_tokens": m["tokens"], "rank": rank.astype(jnp.float32),
               **common.comm_metrics(info, up=nbytes, down=nbytes)}
    return {"lora": params, "rank": rank}, client_state, metrics

  def aggregate(server_state, outputs, weights):
    aggregated = rank_based_aggregate(outputs["lora"], server_state.params, outputs["rank"], weights, mode)
    new_state = server_step(server_state, aggregated, server_optimizer)
    covered = jnp.max(jnp.where(weights > 0, outputs["rank"], 0)).astype(jnp.float32)
    return new_state, {"update_norm": T.tree_norm(T.tree_sub(new_state.params, server_state.params)),
                       "covered_rank": covered}

  def eval_params(server_state):
    return server_state.params

  return FederatedAlgorithm("rbla", init, init_client, client_update, aggregate, eval_params)
