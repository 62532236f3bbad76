"""FedKSeed and FedKSeed-Pro: federated full-parameter zeroth-order tuning with K shared seeds (Qin, Chen,
Qian, Ding, Li & Deng, 2024, "Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes", arXiv:2312.06353, ICML 2024).

K candidate directions z_1..z_K (``zo.direction_key(root, j)``, shared by everyone) span every model the
federation can reach: the global model is always theta = W0 + sum_j a_j z_j, a in R^K.

    broadcast (every client's rebuild): theta = W0 + sum_j a_j z_j               (replay from W0, once per round)
    client k, step t < I_k:  j_t ~ p (uniform; Pro: by importance),
                             g_t = (L(theta + eps z_j) - L(theta - eps z_j)) / (2 eps),   theta -= eta g_t z_j
                             upload (j_t, g_t)                          (index + float32 scalar per step)
    server:  a_j <- a_j - eta sum_k p_k sum_t g_kt [j_kt = j]          (p_k normalized aggregation weights)

With no weight decay the update is linear in z, so the replayed model equals sum_k p_k theta_k, the FedAvg of
the clients' final full weights, whatever the order of replay (tests/algorithms/test_fedkseed.py).
FedKSeed-Pro (``importance=True``): the server keeps every uploaded |g| per seed; the importance
psi_j = mean(|clip(g, -c, c)|) over seed j's history (which starts with one 0), min-max normalized,
gives p = softmax(psi') (so the most important seed is at most e times as likely as the least).

State: ``ServerState.params = {"scalars": a}`` (float32 [K]); the server optimizer (FedOpt) acts on a, on the
pseudo-gradient -Delta a (``optax.sgd(1.0)``: exactly the rule above). ``ServerState.extra`` holds W0 (the
initial trainable tree, one copy) and, for Pro, the per-seed sums of |g| and counts.

Communication per client per round: up = (active steps) x (index bytes + 4), the index in the fewest whole
bytes that hold K-1 (``zo.index_bytes``); down = the K accumulated scalars (4K bytes; Pro: + 4K for the
probabilities). The authors' code (the official FederatedScope FedKSeed branch) is followed for: a fresh
uniform seed per step; two-sided SPSA; skip a step whose loss is NaN; p_k = data size; a constant
learning rate (replay needs it); the importance formula. Deviations: the candidate seeds are the integers
0..K-1 folded into ``seed`` (the code draws K random integers); noise is our counter-based Threefry
(Gaussian as in the paper, or Rademacher); weight decay is not offered (it breaks replay).
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import optax

from fedjax_llm import tree as T
from fedjax_llm import zo
from fedjax_llm.algorithms import common
from fedjax_llm.core.algorithm import FederatedAlgorithm, LossFn, init_server_state, server_step

_SEED_SALT = 0x6B5EED  # folded into the seed so the K directions are independent of other seed-derived draws


def seed_keys(seed: int, num_seeds: int) -> jax.Array:
  """The K shared direction keys ([K] typed keys): fold_in(fold_in(key(seed), salt), j)."""
  root = jax.random.fold_in(jax.random.key(seed), _SEED_SALT)
  return jax.vmap(lambda j: zo.direction_key(root, j))(jnp.arange(num_seeds))


def importance_probabilities(abs_sum: jax.Array, count: jax.Array) -> jax.Array:
  """FedKSeed-Pro: psi = abs_sum / (count + 1) (history starts with a 0), min-max normalized, softmax."""
  psi = abs_sum / (count + 1.0)
  psi = (psi - jnp.min(psi)) / (jnp.max(psi) - jnp.min(psi) + 1e-10)
  return jax.nn.softmax(psi)


def local_steps(loss_fn, base, theta, probs, batches, num_steps, key, *, all_keys, lr, eps, kind, impl=None):
  """One client's local steps from ``theta`` (direct application, theta -= eta g z_j at every step).

  Returns (theta_k, seed indices int32 [S], scalars float32 [S] (0 for inactive steps), metrics).
  """
  logp = jnp.log(probs)

  def directions(i, k):
    j = jax.random.categorical(jax.random.fold_in(k, 1), logp)
    return all_keys[j][None], j[None]

  theta, ids, scalars, m = zo.zo_local_training(loss_fn, base, theta, batches, num_steps, key, directions, lr, eps,
                                                kind, impl)
  return theta, ids[:, 0], scalars[:, 0], m


def fedkseed(loss_fn: LossFn, *, server_optimizer: optax.GradientTransformation, client_learning_rate: float,
             seed: int = 0, num_seeds: int = 1024, eps: float = 5e-4, kind: str = "gaussian",
             importance: bool = False, clip: float = 1000.0, impl: str | None = None) -> FederatedAlgorithm:
  """Build FedKSeed (``importance=True``: FedKSeed-Pro).

  Args:
    client_learning_rate: eta of the local ZO-SGD steps and of the server's scalar accumulation (constant).
    seed: the shared seed of the K candidate directions.
    num_seeds: K (the paper: 4096; its README runs 1024).
    eps: the SPSA perturbation scale (the paper's code: 5e-4).
    kind: "gaussian" (the paper) or "rademacher" (+-1, 32x cheaper to generate; classic SPSA).
    importance: FedKSeed-Pro's probability-differentiated seed sampling.
    clip: |g| is clipped to this before entering the importance history (the code's bias_loss_clip).
    impl: the perturbation kernel (None: Pallas on GPU/TPU, XLA on CPU; see kernels/zo_perturb/api.py).
  """
  if isinstance(num_seeds, bool) or not isinstance(num_seeds, numbers.Integral) or num_seeds < 1:
    raise ValueError(f"fedkseed num_seeds must be an integer >= 1, got {num_seeds!r}")
  if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0):
    raise ValueError(f"fedkseed eps must be a finite number > 0, got {eps!r}")
  if not (isinstance(client_learning_rate, numbers.Real) and math.isfinite(client_learning_rate)
          and client_learning_rate > 0):
    raise ValueError(f"fedkseed needs a constant client learning rate > 0, got {client_learning_rate!r}")
  if not (isinstance(clip, numbers.Real) and clip > 0):
    raise ValueError(f"fedkseed clip must be > 0, got {clip!r}")
  zo.check_kind(kind)
  k_seeds = int(num_seeds)
  lr = float(client_learning_rate)
  up_per_step = zo.index_bytes(k_seeds) + 4
  down = 4.0 * k_seeds * (2 if importance else 1)

  def keys():
    return seed_keys(seed, k_seeds)

  def global_model(extra, scalars):
    return zo.tree_replay(extra["w0"], keys(), scalars, kind, impl)

  def probabilities(extra):
    if not importance:
      return jnp.full((k_seeds,), 1.0 / k_seeds, jnp.float32)
    return importance_probabilities(extra["abs_sum"], extra["count"])

  def init(trainable, key):
    del key
    extra = {"w0": trainable}
    if importance:
      extra.update(abs_sum=jnp.zeros((k_seeds,), jnp.float32), count=jnp.zeros((k_seeds,), jnp.float32))
    return init_server_state({"scalars": jnp.zeros((k_seeds,), jnp.float32)}, server_optimizer, extra=extra)

  def broadcast(base, server_state):
    del base
    extra = server_state.extra
    view = {"global": global_model(extra, server_state.params["scalars"]), "probs": probabilities(extra)}
    return server_state._replace(extra=view)

  def init_client(trainable, info):
    del trainable, info
    return {}

  def client_update(base, view, client_state, batches, info, key):
    _, ids, scalars, m = local_steps(loss_fn, base, view.extra["global"], view.extra["probs"], batches,
                                     info.num_steps, key, all_keys=keys(), lr=lr, eps=eps, kind=kind, impl=impl)
    s = batches.tokens.shape[0]
    steps = jnp.minimum(info.num_steps, s).astype(jnp.int32)
    metrics = {"train_loss": m["loss"], "sum_tokens": m["tokens"],
               **common.comm_metrics(info, up=up_per_step * steps.astype(jnp.float32), down=down),
               "sum_forward_passes": 2.0 * steps.astype(jnp.float32) * common.present(info),
               "abs_scalar": jnp.sum(jnp.abs(scalars)) / jnp.maximum(steps, 1)}
    return {"indices": ids, "scalars": scalars, "steps": steps}, client_state, metrics

  def aggregate(server_state, outputs, weights):
    w = weights.astype(jnp.float32)
    pbar = w / jnp.maximum(jnp.sum(w), 1e-12)
    s = outputs["scalars"].shape[1]
    active = (jnp.arange(s)[None, :] < outputs["steps"][:, None]) & (w[:, None] > 0)
    idx = outputs["indices"].reshape(-1)
    contrib = (pbar[:, None] * jnp.where(active, outputs["scalars"], 0.0)).reshape(-1)
    per_seed = jax.ops.segment_sum(contrib, idx, num_segments=k_seeds)
    aggregated = {"scalars": server_state.params["scalars"] - lr * per_seed}
    new_state = server_step(server_state, aggregated, server_optimizer)
    extra = server_state.extra
    if importance:
      af = active.astype(jnp.float32).reshape(-1)
      g = jnp.abs(jnp.clip(outputs["scalars"], -clip, clip)).reshape(-1) * af
      extra = {**extra, "abs_sum": extra["abs_sum"] + jax.ops.segment_sum(g, idx, num_segments=k_seeds),
               "count": extra["count"] + jax.ops.segment_sum(af, idx, num_segments=k_seeds)}
    new_state = new_state._replace(extra=extra)
    return new_state, {"update_norm": T.tree_norm(T.tree_sub(new_state.params, server_state.params)),
                       "seeds_used": jnp.sum((jnp.abs(new_state.params["scalars"]) > 0).astype(jnp.float32))}

  def eval_params(server_state):
    return global_model(server_state.extra, server_state.params["scalars"])

  alg = FederatedAlgorithm("fedkseed_pro" if importance else "fedkseed", init, init_client, client_update,
                           aggregate, eval_params, None, broadcast)
  return alg


fedkseed_pro = functools.partial(fedkseed, importance=True)  # FedKSeed-Pro: seeds sampled by importance
