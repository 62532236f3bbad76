"""FDLoRA: personalized federated learning of LLMs via dual LoRA tuning.

Qi, Luan, Huang, Fung, Yang, Qian, 2024, "FDLoRA: Personalized Federated Learning of Large Language
Model via Dual LoRA Tuning", arXiv:2406.07925.

Every client holds two LoRA modules per targeted layer: a global one (trained locally, uploaded,
aggregated by the server) and a personal one (trained locally, never uploaded); at inference the two
are fused with per-client weights found by a gradient-free search on a few local samples (AdaFusion).

Representation (one compiled round, static shapes). Both modules live in ONE LoRA module of rank
``r_max = 2 r`` in the model: columns ``[0:r]`` of ``a`` / rows ``[0:r]`` of ``b`` are the global
module (a_g, b_g), columns/rows ``[r:2r]`` the personal one (a_p, b_p). LoRA is additive, so the
layer with part weights (w_g, w_p) applied to the rows of ``b`` computes

    y = x W + s x [a_g a_p] [w_g b_g; w_p b_p] = x W + w_g s x a_g b_g + w_p s x a_p b_p,

s = alpha / r_max (each part has scale alpha / (2 r); set lora.alpha = 2 alpha' to match a standalone
rank-r LoRA with alpha'). The server keeps only the global half (rank-r factors); the client store
keeps the personal half and the two fusion weights.

One round for a sampled client k (global LoRA theta_g^t received from the server):

  global:   theta_g,k = LocalTrain(theta_g^t; model W + s a_g b_g)            (personal part off, w = (1, 0))
  personal: theta_p,k <- LocalTrain(theta_p,k; model W + s a_p b_p)            (global part off, w = (0, 1))
  AdaFusion: (w_g, w_p)_k = argmin over the grid G_g x G_p of
               NLL(W + w_g s a_g^t b_g^t + w_p s a_p,k b_p,k; first ``fusion_batches`` local batches)
               + fusion_l1 (|w_g| + |w_p|)
  upload theta_g,k; server: theta_g^{t+1} = ServerOpt(theta_g^t, sum_k p_k theta_g,k)   (FedAvg of the
             factors a_g, b_g, then the FedOpt step; FDLoRA's outer optimizer is a server optimizer here)

  personal_params (client k, any row): [a_g^T a_p,k]^T, [w_g,k b_g^T ; w_p,k b_p,k]  (the fused model)
  eval_params (global evaluation): the global part alone, w = (1, 0).

Bytes: only the global factors move, 4 r (d_in + d_out) per module in each direction.

Choices and deviations (stated so they can be ablated):
* Only the paper's abstract-level description could be checked here (dual LoRA, only the global module
  uploaded, adaptive fusion of the two on a few local samples, gradient-free). The paper's AdaFusion
  uses a gradient-free optimizer (LoraHub-style, with an L1 penalty on the weights); we replace it by an
  exhaustive search over a small grid (deterministic, jit/vmap friendly). ``fusion_l1`` is LoraHub's
  penalty; it defaults to 0 here (LoraHub: 0.05) because on a bounded grid it is not needed to keep the
  weights finite, and on small models 0.05 per unit weight outweighs the LoRA's gain and selects the
  base model. Ties go to the first grid point.
* Fusion acts on the modules' products (w_g Delta_g + w_p Delta_p). Fusing the factors elementwise
  (a = w_g a_g + w_p a_p, b = w_g b_g + w_p b_p, as LoraHub does for many LoRAs of the same rank) would add
  cross terms w_g w_p (a_g b_p + a_p b_g); the product form is the one the rank-2r module computes exactly.
* The paper runs AdaFusion once after federated training; here a client re-fits its weights every time it
  is sampled, on the global LoRA it just received and its freshly trained personal LoRA, and keeps them in
  the client store (the exact analogue of "download the final global LoRA, fuse"). A client never sampled
  keeps (w_g, w_p) = (1, 0): the global model.
* The few fusion samples are the client's first ``fusion_batches`` training batches of the round (the
  simulator gives clients no separate validation split), so the search favours the personal module
  slightly; widen the grid or raise ``fusion_l1`` to counter it.
* Both modules train on the same local batches for ``num_steps`` steps each, with the client optimizer;
  the personal module is never reset (all clients start from the same a_p of the LoRA init, b_p = 0).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_llm import tree as T
from fedjax_llm.algorithms import common
from fedjax_llm.core.algorithm import FederatedAlgorithm, LossFn, init_server_state, local_training
from fedjax_llm.peft import lora as lora_lib


# ----------------------------------------------------------------------------- dual-LoRA helpers (shared with FedDPA)


def check_dual_rank(name: str, r_max) -> int:
  """r = r_max / 2 (global and personal halves); a clear error for an odd or non-positive r_max."""
  if int(r_max) != r_max or r_max < 2 or int(r_max) % 2:
    raise ValueError(f"{name} keeps a global and a personal LoRA of rank r in one module of rank r_max = 2 r: "
                     f"r_max (lora.rank) must be an even integer >= 2, got {r_max!r}")
  return int(r_max) // 2


def split_dual(tree: dict, r: int) -> tuple[dict, dict]:
  """(global part, personal part) of a rank-2r LoRA tree: columns/rows [0:r] and [r:2r]."""
  g = lora_lib.map_lora(lambda m: {**m, "lora_a": m["lora_a"][:, :r], "lora_b": m["lora_b"][:r]}, tree)
  p = lora_lib.map_lora(lambda m: {**m, "lora_a": m["lora_a"][:, r:], "lora_b": m["lora_b"][r:]}, tree)
  return g, p


def _map2_lora(fn, t1, t2):
  if isinstance(t1, dict):
    if "lora_a" in t1 and "lora_b" in t1:
      return fn(t1, t2)
    return {k: _map2_lora(fn, v, t2[k]) for k, v in t1.items()}
  return t1


def join_dual(global_part: dict, personal_part: dict, w_g=1.0, w_p=1.0) -> dict:
  """The rank-2r LoRA tree [a_g a_p], [w_g b_g; w_p b_p]: its product is w_g a_g b_g + w_p a_p b_p."""
  def f(g, p):
    wg = jnp.asarray(w_g, g["lora_b"].dtype)
    wp = jnp.asarray(w_p, p["lora_b"].dtype)
    return {**g, "lora_a": jnp.concatenate([g["lora_a"], p["lora_a"]], axis=-1),
            "lora_b": jnp.concatenate([wg * g["lora_b"], wp * p["lora_b"]], axis=0)}
  return _map2_lora(f, global_part, personal_part)


def check_lora_rank(name: str, trainable: dict, r_max: int) -> None:
  got = lora_lib.max_rank(trainable)
  if got != r_max:
    raise ValueError(f"{name}: the model's LoRA modules have rank {got} but r_max={r_max}; "
                     f"build the model with lora.rank = r_max")


def _check_weights(name: str, values) -> tuple[float, ...]:
  vals = tuple(float(v) for v in np.ravel(np.asarray(values, np.float64)))
  if not vals or not all(np.isfinite(vals)):
    raise ValueError(f"{name} must be a non-empty list of finite floats, got {values!r}")
  return vals


# ----------------------------------------------------------------------------- AdaFusion


def fusion_grid(global_weights: Sequence[float], personal_weights: Sequence[float]) -> np.ndarray:
  """float32 [G, 2]: every (w_g, w_p) pair, w_g major (the search order; ties go to the first)."""
  return np.array([(g, p) for g in global_weights for p in personal_weights], np.float32)


def fusion_objective(nll_mean: jax.Array, grid: jax.Array, l1: float) -> jax.Array:
  """AdaFusion's objective per grid point: mean NLL + l1 * (|w_g| + |w_p|)."""
  return nll_mean + l1 * jnp.sum(jnp.abs(grid), axis=-1)


def fdlora(loss_fn: LossFn, *, client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation, r_max: int,
           fusion_global_weights: Sequence[float] = (0.0, 0.5, 1.0),
           fusion_personal_weights: Sequence[float] = (0.0, 0.5, 1.0),
           fusion_l1: float = 0.0, fusion_batches: int = 1) -> FederatedAlgorithm:
  """Build FDLoRA.

  Args:
    r_max: the model's LoRA rank, 2 r (global r + personal r).
    fusion_global_weights, fusion_personal_weights: the AdaFusion grid (its cartesian product).
    fusion_l1: L1 penalty on the fusion weights in the AdaFusion objective (>= 0).
    fusion_batches: how many of the round's local batches score the grid (>= 1; capped at S).
  """
  r = check_dual_rank("fdlora", r_max)
  gw = _check_weights("fusion_global_weights", fusion_global_weights)
  pw = _check_weights("fusion_personal_weights", fusion_personal_weights)
  if not (np.isfinite(fusion_l1) and fusion_l1 >= 0):
    raise ValueError(f"fusion_l1 must be a finite float >= 0, got {fusion_l1!r}")
  if int(fusion_batches) != fusion_batches or fusion_batches < 1:
    raise ValueError(f"fusion_batches must be an integer >= 1 (local batches that score the fusion grid), "
                     f"got {fusion_batches!r}")
  grid_np = fusion_grid(gw, pw)

  def init(trainable, key):
    del key
    check_lora_rank("fdlora", trainable, r_max)
    return init_server_state(split_dual(trainable, r)[0], server_optimizer)

  def init_client(trainable, info):
    del info
    return {"personal": split_dual(trainable, r)[1], "fusion": jnp.array([1.0, 0.0], jnp.float32)}

  def fused_nll(base, params, batches, num_steps):
    """Token-weighted NLL of ``params`` on the first fusion batches (active steps only), no dropout."""
    nll = jnp.zeros((), jnp.float32)
    tok = jnp.zeros((), jnp.float32)
    for i in range(min(int(fusion_batches), batches.tokens.shape[0])):
      _, aux = loss_fn(base, params, batches.tokens[i], batches.mask[i], None)
      active = (i < num_steps).astype(jnp.float32)
      nll = nll + aux["nll_sum"] * active
      tok = tok + aux["tokens"] * active
    return nll, tok

  def client_update(base, server_state, client_state, batches, info, key):
    g0 = server_state.params
    p0 = client_state["personal"]
    kg, kp = jax.random.split(key)

    def global_loss(base_, g, tokens, mask, k):
      return loss_fn(base_, join_dual(g, p0, 1.0, 0.0), tokens, mask, k)

    def personal_loss(base_, p, tokens, mask, k):
      return loss_fn(base_, join_dual(g0, p, 0.0, 1.0), tokens, mask, k)

    g, mg = local_training(global_loss, base, g0, client_optimizer, batches, info.num_steps, kg)
    p, mp = local_training(personal_loss, base, p0, client_optimizer, batches, info.num_steps, kp)

    grid = jnp.asarray(grid_np)
    nll, tok = jax.lax.map(lambda w: fused_nll(base, join_dual(g0, p, w[0], w[1]), batches, info.num_steps), grid)
    mean_nll = nll / jnp.maximum(tok, 1.0)
    best = jnp.argmin(fusion_objective(mean_nll, grid, fusion_l1))
    scored = tok[0] > 0
    fusion = jnp.where(scored, grid[best], client_state["fusion"])
    nbytes = common.nbytes(g0)
    metrics = {"train_loss": mg["loss"], "sum_tokens": mg["tokens"], "personal_loss": mp["loss"],
               "fused_loss": jnp.where(scored, mean_nll[best], 0.0),
               "fusion_w_global": fusion[0], "fusion_w_personal": fusion[1],
               **common.comm_metrics(info, up=nbytes, down=nbytes)}
    return g, {"personal": p, "fusion": fusion}, metrics

  def aggregate(server_state, outputs, weights):
    return common.fedavg_step(server_state, outputs, weights, server_optimizer)

  def eval_params(server_state):
    g = server_state.params
    return join_dual(g, T.tree_zeros_like(g), 1.0, 0.0)

  def personal_params(base, server_state, client_state, tokens, mask):
    del base, tokens, mask
    w = client_state["fusion"]
    return join_dual(server_state.params, client_state["personal"], w[0], w[1])

  return FederatedAlgorithm("fdlora", init, init_client, client_update, aggregate, eval_params, personal_params)
