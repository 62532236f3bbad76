"""FedMeZO: FedAvg with MeZO local training (Ling, Chen, Wang, Hu & Yang, 2024, "On the Convergence of
Zeroth-Order Federated Tuning for Large Language Models", arXiv:2402.05926, KDD 2024), local steps from MeZO
(Malladi, Gao, Nichani, Damian, Lee, Chen & Arora, 2023, "Fine-Tuning Language Models with Just Forward
Passes", arXiv:2305.17333).

Over any trainable pytree (full parameters, or a PEFT tree), forward passes only:

    client k, step t < I_k:  z_ti = z(key_k, t, i), i < n (counter-based noise, regenerated, never stored)
                             g_ti = (L(theta + eps z_ti) - L(theta - eps z_ti)) / (2 eps)
                             theta <- theta - (eta / n) sum_i g_ti z_ti
    server (FedAvg):         theta <- sum_k p_k theta_k                       (then the FedOpt server step)

``upload="weights"`` (the paper): a client uploads theta_k. ``upload="seeds"``: it uploads its key and the
scalars g_ti only, and the server replays theta + sum_k p_k sum_t,i (-eta / n) g_kti z_kti, which is the same
model (the update is linear in z; no weight decay) for S n scalars instead of the whole tree.
MeZO's weight decay and learning-rate schedules are not offered (a constant eta keeps the replay exact).

Communication per client per round: down = the trainable tree; up = the tree ("weights") or
8 (the key) + 4 x (active steps) x n bytes ("seeds"). ``sum_forward_passes`` = 2 n per active step.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import optax

from fedjax_llm import tree as T
from fedjax_llm import zo
from fedjax_llm.algorithms import common
from fedjax_llm.core.algorithm import FederatedAlgorithm, LossFn, init_server_state, server_step

UPLOADS = ("weights", "seeds")


def step_directions(n: int):
  """MeZO's directions of step i: n keys folded from the step key (named 0..n-1)."""
  def directions(i, k):
    del i
    return jax.vmap(lambda m: zo.direction_key(k, 0x2E20, m))(jnp.arange(n)), jnp.arange(n, dtype=jnp.int32)
  return directions


def fedmezo(loss_fn: LossFn, *, server_optimizer: optax.GradientTransformation, client_learning_rate: float,
            eps: float = 1e-3, num_perturbations: int = 1, kind: str = "gaussian", upload: str = "weights",
            impl: str | None = None) -> FederatedAlgorithm:
  """Build FedMeZO.

  Args:
    client_learning_rate: eta of the local ZO-SGD steps (constant).
    eps: the SPSA scale (MeZO: 1e-3).
    num_perturbations: n directions per step, their estimates averaged (MeZO: 1).
    kind: "gaussian" (MeZO) or "rademacher".
    upload: "weights" (the client's trained tree, FedAvg) or "seeds" (key + scalars; the server replays).
  """
  if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0):
    raise ValueError(f"fedmezo eps must be a finite number > 0, got {eps!r}")
  if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, numbers.Integral) \
      or num_perturbations < 1:
    raise ValueError(f"fedmezo num_perturbations must be an integer >= 1, got {num_perturbations!r}")
  if not (isinstance(client_learning_rate, numbers.Real) and math.isfinite(client_learning_rate)
          and client_learning_rate > 0):
    raise ValueError(f"fedmezo needs a constant client learning rate > 0, got {client_learning_rate!r}")
  if upload not in UPLOADS:
    raise ValueError(f"fedmezo upload must be one of {UPLOADS}, got {upload!r}")
  zo.check_kind(kind)
  n = int(num_perturbations)
  lr = float(client_learning_rate)
  directions = step_directions(n)

  def init(trainable, key):
    del key
    return init_server_state(trainable, server_optimizer)

  def init_client(trainable, info):
    del trainable, info
    return {}

  def client_update(base, server_state, client_state, batches, info, key):
    theta, _, scalars, m = zo.zo_local_training(loss_fn, base, server_state.params, batches, info.num_steps, key,
                                                directions, lr, eps, kind, impl)
    steps = jnp.minimum(info.num_steps, batches.tokens.shape[0]).astype(jnp.float32)
    tree_bytes = common.nbytes(server_state.params)
    up = tree_bytes if upload == "weights" else 8.0 + 4.0 * n * steps
    metrics = {"train_loss": m["loss"], "sum_tokens": m["tokens"],
               **common.comm_metrics(info, up=up, down=tree_bytes),
               "sum_forward_passes": 2.0 * n * steps * common.present(info)}
    if upload == "weights":
      return theta, client_state, metrics
    return {"key": jax.random.key_data(key), "scalars": scalars}, client_state, metrics

  def aggregate(server_state, outputs, weights):
    if upload == "weights":
      return common.fedavg_step(server_state, outputs, weights, server_optimizer)
    w = weights.astype(jnp.float32)
    pbar = w / jnp.maximum(jnp.sum(w), 1e-12)
    c, s, _ = outputs["scalars"].shape

    def client_keys(kd):
      key = jax.random.wrap_key_data(kd)
      return jax.vmap(lambda i: directions(i, jax.random.fold_in(key, i))[0])(jnp.arange(s))  # [S, n]

    keys = jax.vmap(client_keys)(outputs["key"]).reshape(c * s * n)
    scales = (-lr / n) * (pbar[:, None, None] * outputs["scalars"]).reshape(c * s * n)
    aggregated = zo.tree_replay(server_state.params, keys, scales, kind, impl)
    new_state = server_step(server_state, aggregated, server_optimizer)
    return new_state, {"update_norm": T.tree_norm(T.tree_sub(new_state.params, server_state.params))}

  def eval_params(server_state):
    return server_state.params

  return FederatedAlgorithm("fedmezo", init, init_client, client_update, aggregate, eval_params)
