"""FLoRA: stacking-based aggregation of heterogeneous-rank LoRA.

Ziyao Wang, Zheyu Shen, Yexiao He, Guoheng Sun, Hongyi Wang, Lingjuan Lyu, Ang Li,
"FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
NeurIPS 2024, arXiv:2409.05976 (public code: ATP-1010/FederatedLLM).

Client k has rank r_k <= r_max (a rank mask on the r_max-wide factors, as in HetLoRA)
and LoRA scale s_k. In our notation (a = A^T [d_in, r], b = B^T [r, d_out], the module's
own scale s = alpha / r_max, p_k the normalized aggregation weights):

  local:     every round each client restarts LoRA: a_k ~ uniform(+-1/sqrt(d_in)) (the LoRA
             init, masked to rank r_k), b_k = 0, and trains (a_k, b_k) on the current merged
             kernels W; the loss uses b_k * s_k / s so the layer computes W + s_k a_k b_k
             (the client's own LoRA scale without changing any shape)
  upload:    a_k[:, :r_k], b_k[:r_k, :]
  stack:     a_stack = [p_1 s_1 a_1, ..., p_K s_K a_K]   [d_in, sum_k r_k]   (the paper's A = [p_k A_k])
             b_stack = [b_1; ...; b_K]                     [sum_k r_k, d_out]  (the paper's B = [B_k])
             a_stack b_stack = sum_k p_k s_k a_k b_k  exactly, for any ranks and scales
  merge:     W' = W + a_stack b_stack           (kernels in ``ServerState.extra``; the merged update
             is one einsum over (client, rank) of the rank-masked factors, ``merged_update``:
             the stack is never built client by client)

so the new global model is W + sum_k p_k s_k B_k A_k with no aggregation noise.

Choices (stated so they can be ablated):
* LoRA restart: each client draws its own fresh ``a`` every round (from its per-round key),
  ``b = 0``. The paper re-initializes local LoRA modules after merging; its public code builds
  each client's adapter with ``get_peft_model`` on a copy of the merged model, i.e. a fresh
  PEFT init per client, so ``a`` differs across clients. A shared ``a`` would add nothing
  here (the stacking is exact either way). Drawn from a seed, the restart costs no download.
* Scales: ``scale="uniform"`` (default): s_k = alpha / r_max = s for every client; this matches
  the public code, whose heterogeneous clients use lora_alpha = 2 r_k (a constant scale).
  ``scale="rank"``: s_k = alpha / r_k, the standard LoRA scale at the client's own rank.
* The initial LoRA product (zero for the standard init) is folded into W at ``init`` so that
  the stored LoRA always has b = 0 and ``eval_params`` = merged kernels with the original tree
  structure.
* Server optimizer: the merge is a FedOpt step on the kernels with pseudo-gradient
  -a_stack b_stack (optimizer state over the targeted kernels in ``ServerState.opt_state``);
  with FedAvg (``sgd(1.0)``) W' = W + a_stack b_stack exactly (the paper). ``params`` keeps
  the LoRA template (b = 0) that clients restart from.
* Download: a client needs every stack merged since it last synchronized its copy of W
  (the paper sends the stacked modules of the round to the clients, which merge them). The
  server keeps the cumulative stacked rank (``extra["stack_rank"]``), each client the value
  at its last download (client store ``synced``); a client behind by R stacked ranks
  downloads per targeted layer min(d_in d_out, R (d_in + d_out)) float32 numbers (the stacks,
  or the dense difference of W when smaller). A client that took part in the previous round
  downloads exactly the previous round's stack (sum of that cohort's ranks). The initial
  model download is not counted. Upload: r_k (d_in + d_out) float32 numbers per layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_llm import tree as T
from fedjax_llm.algorithms import common
from fedjax_llm.core.algorithm import FederatedAlgorithm, LossFn, ServerState, local_training
from fedjax_llm.peft import lora as lora_lib

SCALES = ("uniform", "rank")


# ----------------------------------------------------------------------------- helpers shared by the
# heterogeneous-rank methods (flexlora and rbla import these)


def check_client_ranks(name: str, client_ranks, r_max: int) -> np.ndarray:
  """``client_ranks`` as int32, or a ValueError naming the bad rank and the allowed range."""
  ranks = np.asarray(client_ranks, np.int32).reshape(-1)
  if ranks.size == 0:
    raise ValueError(f"{name} needs client_ranks (one rank per client), got an empty list")
  if int(r_max) != r_max or r_max < 1:
    raise ValueError(f"{name} r_max must be a positive integer, got {r_max!r}")
  if np.any(ranks > r_max) or np.any(ranks < 1):
    bad = int(ranks.max() if np.any(ranks > r_max) else ranks.min())
    raise ValueError(f"{name}: client rank {bad} is outside [1, r_max={r_max}]; "
                     f"lower the rank choices or raise the LoRA rank (r_max)")
  return ranks


def client_scales(name: str, client_ranks: np.ndarray, r_max: int, lora_alpha: float, scale: str) -> np.ndarray:
  """Each client's LoRA scale s_k (float32 [num_clients]): alpha / r_max ("uniform") or alpha / r_k ("rank")."""
  if scale not in SCALES:
    raise ValueError(f"{name} scale={scale!r}; allowed: {', '.join(SCALES)}")
  alpha = float(lora_alpha)
  if not (np.isfinite(alpha) and alpha > 0):
    raise ValueError(f"{name} lora_alpha must be a positive number, got {lora_alpha!r}")
  if scale == "uniform":
    return np.full(client_ranks.shape, alpha / r_max, np.float32)
  return (alpha / client_ranks.astype(np.float64)).astype(np.float32)


def scale_b(tree: dict, ratio) -> dict:
  """Every LoRA module with ``lora_b`` multiplied by ``ratio`` (s_k / s: the client's scale in a layer of scale s)."""
  return lora_lib.map_lora(lambda m: {**m, "lora_b": m["lora_b"] * jnp.asarray(ratio, m["lora_b"].dtype)}, tree)


def check_r_max(name: str, trainable: dict, r_max: int) -> None:
  got = lora_lib.max_rank(trainable)
  if got != r_max:
    raise ValueError(f"{name}: the LoRA modules have rank {got} but r_max={r_max}; set lora.rank = r_max")


# ----------------------------------------------------------------------------- stacking


def stack_modules(a_list, b_list, p, scales):
  """The paper's stack of client modules truncated to their ranks (a reference, host or traced).

  Args:
    a_list: per client ``a_k`` [d_in, r_k]; b_list: per client ``b_k`` [r_k, d_out].
    p: [K] normalized weights; scales: [K] the clients' LoRA scales s_k.
  Returns:
    (a_stack [d_in, sum r_k] = [p_1 s_1 a_1, ..., p_K s_K a_K], b_stack [sum r_k, d_out] = [b_1; ...; b_K]),
    so ``a_stack @ b_stack = sum_k p_k s_k a_k b_k``.
  """
  a_stack = jnp.concatenate([jnp.asarray(a) * (p_k * s_k) for a, p_k, s_k in zip(a_list, p, scales)], axis=1)
  b_stack = jnp.concatenate([jnp.asarray(b) for b in b_list], axis=0)
  return a_stack, b_stack


def merged_update(a: jax.Array, b: jax.Array, coef: jax.Array) -> jax.Array:
  """``sum_k coef_k a_k b_k`` [d_in, d_out] of rank-masked client factors a [C, d_in, r], b [C, r, d_out].

  The same number as ``a_stack @ b_stack`` of ``stack_modules`` (coef_k = p_k s_k): the stack with
  each client's block zero-padded to r_max, contracted over (client, rank) in one einsum.
  """
  return jnp.einsum("cir,cro->io", a.astype(jnp.float32) * coef.astype(jnp.float32)[:, None, None],
                    b.astype(jnp.float32))


def stacked_download_bytes(lora_params: dict, ranks_behind) -> jax.Array:
  """Bytes to catch up on ``ranks_behind`` stacked ranks: per layer 4 min(d_in d_out, R (d_in + d_out))."""
  r = jnp.asarray(ranks_behind, jnp.float32)
  total = jnp.zeros((), jnp.float32)
  for _, m in lora_lib.lora_modules(lora_params):
    d_in, d_out = m["lora_a"].shape[-2], m["lora_b"].shape[-1]
    total = total + jnp.minimum(float(d_in * d_out), r * float(d_in + d_out))
  return 4.0 * total


# ----------------------------------------------------------------------------- the method


def flora(loss_fn: LossFn, *, client_optimizer: optax.GradientTransformation,
          server_optimizer: optax.GradientTransformation, client_ranks, r_max: int, lora_alpha: float,
          scale: str = "uniform") -> FederatedAlgorithm:
  """Build FLoRA (a mutable-base method: ``init`` needs the targeted kernels in the trainable tree).

  Args:
    client_ranks: int [num_clients], each client's rank r_k in [1, r_max].
    r_max: the LoRA modules' rank (the widest client).
    lora_alpha: LoRA alpha; the modules' scale is s = alpha / r_max.
    scale: "uniform" (s_k = alpha / r_max) or "rank" (s_k = alpha / r_k).
  """
  ranks = check_client_ranks("flora", client_ranks, r_max)
  scales = client_scales("flora", ranks, r_max, lora_alpha, scale)
  s = float(lora_alpha) / float(r_max)
  ranks_arr, scales_arr = jnp.asarray(ranks), jnp.asarray(scales)

  def init(trainable, key):
    del key
    lora, kernels = common.split_mutable_base(trainable, "flora")
    check_r_max("flora", lora, r_max)
    # Fold any initial LoRA product into W, so the stored LoRA is a restart (b = 0).
    kernels = lora_lib.map_kernels(lambda w, m: (w.astype(jnp.float32) + lora_lib.delta(m, s)).astype(w.dtype),
                                   kernels, lora)
    lora = lora_lib.map_lora(lambda m: {**m, "lora_b": jnp.zeros_like(m["lora_b"])}, lora)
    return ServerState(params=lora, opt_state=server_optimizer.init(kernels), round=jnp.zeros((), jnp.int32),
                       extra={"kernels": kernels, "stack_rank": jnp.zeros((), jnp.int32)})

  def init_client(trainable, info):
    del trainable
    cid = jnp.clip(info.client_id, 0, len(ranks) - 1)
    return {"rank": ranks_arr[cid], "synced": jnp.zeros((), jnp.int32)}

  def client_update(base, server_state, client_state, batches, info, key):
    rank = client_state["rank"]
    s_k = scales_arr[jnp.clip(info.client_id, 0, len(ranks) - 1)]
    kernels = server_state.extra["kernels"]
    k_init, k_train = jax.random.split(key)
    start = lora_lib.rank_mask(lora_lib.reinit_lora(server_state.params, k_init), rank)
    ratio = s_k / s

    def loss(base_, lora, tokens, mask, k):
      return loss_fn(base_, lora_lib.merge_trees(scale_b(lora, ratio), kernels), tokens, mask, k)

    project = lambda p: lora_lib.rank_mask(p, rank)
    params, m = local_training(loss, base, start, client_optimizer, batches, info.num_steps, k_train, project)
    behind = server_state.extra["stack_rank"] - client_state["synced"]
    metrics = {"train_loss": m["loss"], "sum_tokens": m["tokens"], "rank": rank.astype(jnp.float32),
               **common.comm_metrics(info, up=common.rank_bytes(start, rank),
                                     down=stacked_download_bytes(start, behind))}
    output = {"lora": params, "scale": s_k, "rank": rank}
    return output, {"rank": rank, "synced": server_state.extra["stack_rank"]}, metrics

  def aggregate(server_state, outputs, weights):
    p = T.normalize_weights(weights)
    coef = p * outputs["scale"]
    kernels = server_state.extra["kernels"]
    # pseudo-gradient of the kernels: minus the stacked product sum_k p_k s_k a_k b_k
    neg_delta = lora_lib.map_kernels(lambda w, m: -merged_update(m["lora_a"], m["lora_b"], coef).astype(w.dtype),
                                     kernels, outputs["lora"])
    updates, opt_state = server_optimizer.update(neg_delta, server_state.opt_state, kernels)
    new_kernels = optax.apply_updates(kernels, updates)
    present = (weights > 0).astype(jnp.int32)
    round_rank = jnp.sum(present * outputs["rank"].astype(jnp.int32))
    extra = {"kernels": new_kernels, "stack_rank": server_state.extra["stack_rank"] + round_rank}
    new_state = ServerState(params=server_state.params, opt_state=opt_state, round=server_state.round + 1,
                            extra=extra)
    return new_state, {"update_norm": T.tree_norm(T.tree_sub(new_kernels, kernels)),
                       "stacked_rank": round_rank.astype(jnp.float32)}

  def eval_params(server_state):
    return lora_lib.merge_trees(server_state.params, server_state.extra["kernels"])

  return FederatedAlgorithm("flora", init, init_client, client_update, aggregate, eval_params)


flora.mutable_base = True
