"""FlexLoRA: full-size aggregation and SVD redistribution of heterogeneous-rank LoRA.

Jiamu Bai, Daoyuan Chen, Bingchen Qian, Liuyi Yao, Yaliang Li, "Federated Fine-tuning of
Large Language Models under Heterogeneous Tasks and Client Resources", NeurIPS 2024,
arXiv:2402.11505.

Client k has rank r_k <= r_max (a rank mask on r_max-wide factors) and LoRA scale s_k.
In our notation (a = A^T [d_in, r], b = B^T [r, d_out], the module's own scale
s = alpha / r_max, p_k the normalized aggregation weights), per LoRA module:

  aggregate:  dW = sum_k p_k s_k a_k b_k            [d_in, d_out]  (one einsum over (client, rank))
  SVD:        dW = U diag(sigma) V^T,  sigma_1 >= sigma_2 >= ...
  global:     a = U_{:, :r_max} diag(sqrt(sigma_{:r_max} / s)),  b = diag(sqrt(sigma_{:r_max} / s)) V^T_{:r_max, :}
              so s a b = the best rank-r_max approximation of dW (kept as the global factors)
  download:   client k gets the first r_k components, rescaled to its own scale:
              a_k = sqrt(s / s_k) a[:, :r_k],  b_k = sqrt(s / s_k) b[:r_k, :]
              so s_k a_k b_k = U_{:r_k} diag(sigma_{:r_k}) V^T_{:r_k}, the best rank-r_k approximation
              of dW (Eckart-Young): ||dW - s_k a_k b_k||_F^2 = sum_{i > r_k} sigma_i^2
  local:      the loss uses b_k * s_k / s, so the layer computes W + s_k a_k b_k (the client's own
              LoRA scale without changing shapes); the client trains (a_k, b_k) inside its rank mask

What holds exactly (tested): if rank(dW) <= r_max -- in particular when the clients' ranks sum
to at most r_max, or when all a_k are equal (e.g. one SGD step from b = 0) -- the global product
s a b equals dW, the noise-free weighted mean of the clients' products. With equal a_k and
uniform scales this is also FedIT's product (a_bar b_bar = a sum_k p_k b_k). In general, with
all ranks r_max, FlexLoRA's global product is at least as close to dW as FedIT's factor average
(both have rank <= r_max and the truncated SVD is the best such matrix); it is not equal to it.

Choices (stated so they can be ablated):
* Scales: ``scale="uniform"`` (default; s_k = alpha / r_max for all clients) or ``scale="rank"``
  (s_k = alpha / r_k, the standard LoRA scale at the client's rank). dW always sums the clients'
  effective products s_k a_k b_k, so the scale never biases the aggregate.
* Split of sigma: the truncated SVD fixes every product; how sigma is shared between the two
  factors only changes the local optimizer's starting point. We split sqrt(sigma) evenly
  (balanced factors). In round 0 the global factors are still the LoRA init (b = 0, not an
  SVD), and ``a`` is handed over unscaled (the standard init at every rank).
* Numerical rank: components with sigma_i <= sigma_1 max(d_in, d_out) eps_float32 are treated
  as zero. A zero component would give a zero column of a and zero row of b, which never
  train again (both gradients vanish); its a column is replaced by the column of the initial
  LoRA ``a`` (b's row stays 0, so no product changes) so that the component can train.
* Server optimizer: FedOpt on the dense global product: pseudo-gradient s a b - dW, the step
  gives the new dense product, which is then truncated by SVD. With FedAvg (``sgd(1.0)``) the
  new product is dW (the paper). Optimizer state is dense [d_in, d_out] per module (empty for
  plain FedAvg). ``update_norm`` is the norm of the change of the global dense products s a b.
* Bytes: up and down r_k (d_in + d_out) float32 numbers per module (the truncated factors).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_llm import tree as T
from fedjax_llm.algorithms import common
from fedjax_llm.algorithms.flora import check_client_ranks, check_r_max, client_scales, merged_update, scale_b
from fedjax_llm.core.algorithm import FederatedAlgorithm, LossFn, ServerState, local_training
from fedjax_llm.peft import lora as lora_lib


def svd_factors(dw: jax.Array, r_max: int, scale: float, a_fill: jax.Array | None = None):
  """Global factors of a dense update: (a [d_in, r_max], b [r_max, d_out], sigma [min(d_in, d_out)]).

  ``scale * a @ b`` is the best rank-``r_max`` approximation of ``dw``; sqrt(sigma) is split evenly.
  Components below the numerical rank get ``a_fill``'s column (zeros if None) and a zero row of b.
  """
  dw = dw.astype(jnp.float32)
  u, sigma, vt = jnp.linalg.svd(dw, full_matrices=False)
  tol = sigma[0] * max(dw.shape) * float(jnp.finfo(jnp.float32).eps)
  sig = sigma[:r_max]
  keep = sig > tol
  root = jnp.where(keep, jnp.sqrt(jnp.where(keep, sig, 0.0) / scale), 0.0)
  a = u[:, :r_max] * root[None, :]
  if a_fill is not None:
    a = jnp.where(keep[None, :], a, a_fill.astype(jnp.float32))
  b = root[:, None] * vt[:r_max, :]
  return a, b, sigma


def client_start(params: dict, rank, ratio, first_round) -> dict:
  """Client k's starting factors: the first ``rank`` components, rescaled so s_k a_k b_k = s a b (masked).

  ``ratio`` = s_k / s. Later rounds split the rescaling evenly (both factors times sqrt(1 / ratio));
  in the first round (global factors = LoRA init) ``a`` is unscaled and b takes 1 / ratio.
  """
  ratio = jnp.asarray(ratio, jnp.float32)
  c_a = jnp.where(first_round, 1.0, jax.lax.rsqrt(ratio))
  c_b = 1.0 / (ratio * c_a)
  masked = lora_lib.rank_mask(params, rank)
  return lora_lib.map_lora(lambda m: {**m, "lora_a": m["lora_a"] * c_a.astype(m["lora_a"].dtype),
                                      "lora_b": m["lora_b"] * c_b.astype(m["lora_b"].dtype)}, masked)


def flexlora(loss_fn: LossFn, *, client_optimizer: optax.GradientTransformation,
             server_optimizer: optax.GradientTransformation, client_ranks, r_max: int, lora_alpha: float,
             scale: str = "uniform") -> FederatedAlgorithm:
  """Build FlexLoRA.

  Args:
    client_ranks: int [num_clients], each client's rank r_k in [1, r_max].
    r_max: the LoRA modules' rank (the global factors' rank).
    lora_alpha: LoRA alpha; the modules' scale is s = alpha / r_max.
    scale: "uniform" (s_k = alpha / r_max) or "rank" (s_k = alpha / r_k).
  """
  ranks = check_client_ranks("flexlora", client_ranks, r_max)
  scales = client_scales("flexlora", ranks, r_max, lora_alpha, scale)
  s = float(lora_alpha) / float(r_max)
  ranks_arr, scales_arr = jnp.asarray(ranks), jnp.asarray(scales)

  def dense(m):  # the global product s a b of one module
    return lora_lib.delta(m, s)

  def init(trainable, key):
    del key
    check_r_max("flexlora", trainable, r_max)
    for path, m in lora_lib.lora_modules(trainable):
      d_in, d_out = m["lora_a"].shape[0], m["lora_b"].shape[1]
      if r_max > min(d_in, d_out):
        raise ValueError(f"flexlora: r_max={r_max} exceeds min(d_in, d_out)={min(d_in, d_out)} of LoRA module "
                         f"{path}; the SVD has no more components (lower lora.rank)")
    dense0 = lora_lib.map_lora(dense, trainable)
    a_init = lora_lib.map_lora(lambda m: jnp.copy(m["lora_a"]), trainable)  # own buffer (the round donates)
    return ServerState(params=trainable, opt_state=server_optimizer.init(dense0), round=jnp.zeros((), jnp.int32),
                       extra={"a_init": a_init})

  def init_client(trainable, info):
    del trainable
    return {"rank": ranks_arr[jnp.clip(info.client_id, 0, len(ranks) - 1)]}

  def client_update(base, server_state, client_state, batches, info, key):
    rank = client_state["rank"]
    s_k = scales_arr[jnp.clip(info.client_id, 0, len(ranks) - 1)]
    ratio = s_k / s
    start = client_start(server_state.params, rank, ratio, server_state.round == 0)

    def loss(base_, params, tokens, mask, k):
      return loss_fn(base_, scale_b(params, ratio), tokens, mask, k)

    project = lambda p: lora_lib.rank_mask(p, rank)
    params, m = local_training(loss, base, start, client_optimizer, batches, info.num_steps, key, project)
    nbytes = common.rank_bytes(start, rank)
    metrics = {"train_loss": m["loss"], "sum_tokens": m["tokens"], "rank": rank.astype(jnp.float32),
               **common.comm_metrics(info, up=nbytes, down=nbytes)}
    return {"lora": params, "scale": s_k}, client_state, metrics

  def aggregate(server_state, outputs, weights):
    coef = T.normalize_weights(weights) * outputs["scale"]
    dw = lora_lib.map_lora(lambda m: merged_update(m["lora_a"], m["lora_b"], coef), outputs["lora"])
    old = lora_lib.map_lora(dense, server_state.params)
    updates, opt_state = server_optimizer.update(T.tree_sub(old, dw), server_state.opt_state, old)
    target = optax.apply_updates(old, updates)  # = dW under FedAvg

    new_params = _refactor(server_state.params, target, server_state.extra["a_init"])
    new = lora_lib.map_lora(dense, new_params)
    state = ServerState(params=new_params, opt_state=opt_state, round=server_state.round + 1,
                        extra=server_state.extra)
    return state, {"update_norm": T.tree_norm(T.tree_sub(new, old))}

  def _refactor(params, target, a_init):
    """Replace every LoRA module of ``params`` by the SVD factors of its dense target."""
    def go(p, t, ai):
      if isinstance(p, dict) and "lora_a" in p and "lora_b" in p:
        a, b, _ = svd_factors(t, r_max, s, ai)
        return {**p, "lora_a": a.astype(p["lora_a"].dtype), "lora_b": b.astype(p["lora_b"].dtype)}
      if isinstance(p, dict):
        return {k: go(v, t[k], ai[k]) if k in t else v for k, v in p.items()}
      return p
    return go(params, target, a_init)

  def eval_params(server_state):
    return server_state.params

  return FederatedAlgorithm("flexlora", init, init_client, client_update, aggregate, eval_params)
