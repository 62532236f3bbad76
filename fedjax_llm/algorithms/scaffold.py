"""SCAFFOLD on the LoRA factors (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", arXiv:1910.06378).

Notation: x is the global trainable tree (every LoRA factor a [d_in, r], b [r, d_out]),
c the server control variate, c_i client i's control variate (both trees shaped like x,
zeros at init), eta_l the client learning rate, K_i the client's local steps this round
(``info.num_steps``: masked steps excluded), N the number of clients, S the present cohort.

  download:  x, c                                                    (2 x LoRA bytes)
  local:     y_i <- x;  K_i times  y_i <- y_i - eta_l (g_i(y_i) - c_i + c)
  control (option II of the paper, eq. 4):
             c_i+ = c_i - c + (x - y_i) / (K_i eta_l)
  upload:    dy_i = y_i - x,  dc_i = c_i+ - c_i                      (2 x LoRA bytes)
  server:    x <- x + eta_g sum_i p_i dy_i        (as the FedOpt step ``server_step`` on the
                                                   pseudo-gradient x - sum_i p_i y_i, so any
                                                   server optimizer composes; fedavg lr = eta_g)
             c <- c + control_lr (|S| / N) (1/|S|) sum_{i in S} dc_i = c + control_lr / N sum_{i in S} dc_i

With ``control_lr = 1`` (the paper) and c, c_i starting at zero, c stays the mean of all N
c_i after every round (clients outside S keep their c_i).

Choices and deviations (stated so they can be ablated):
  * The correction ``c - c_i`` is added to the loss gradient by an optax transform chained
    *before* the client optimizer (``control_correction``), so the optimizer sees
    g - c_i + c. For plain SGD (momentum 0, no clipping) this is exactly the paper's local
    step, and (x - y_i) / (K_i eta_l) is the mean corrected gradient over the K_i steps, so
    option II gives c_i+ = mean of g_i along the local path. Under Adam(W), momentum or
    gradient clipping the corrected gradient is what enters the moments / the clip, and
    (x - y_i) / (K_i eta_l) is the mean *optimizer step* divided by eta_l, not a gradient
    mean: a heuristic, not the paper's method. Use SGD (configs/scaffold.py does).
  * A FedProx term (client_optimizer.prox_mu) composes: it is part of the client optimizer.
  * The model average uses the round's aggregation weights p_i (FedAvg n_k by default; the
    paper's uniform 1/|S| is ``fl.client_weighting = "uniform"``); the control average is
    unweighted, as in the paper, because only that keeps c = mean_i c_i. |S| counts the slots
    with weight > 0 (a real client given weight 0 would update its c_i without c seeing it).
  * A client with K_i = 0 (nothing to train on this round, or an empty slot) keeps its c_i
    (dc_i = 0); the paper's formula is 0/0 there.
  * ``control_lr`` (default 1, the paper) scales the server's control step; values != 1 break
    c = mean_i c_i and are an extension. ``use_control=False`` removes the control variates
    entirely (no correction, no state, one LoRA copy each way): exactly FedIT.
  * The control variates live only on the trainable LoRA factors (the frozen base has none);
    mutable-base methods are not supported.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_llm import tree as T
from fedjax_llm.algorithms import common
from fedjax_llm.core.algorithm import (FederatedAlgorithm, LossFn, init_server_state, local_training,
                                       server_step)


class ControlCorrectionState(NamedTuple):
  correction: Any  # c - c_i, a tree like the params


def control_correction(correction) -> optax.GradientTransformation:
  """Adds the fixed tree ``correction`` (SCAFFOLD's c - c_i) to every gradient; held in the state."""

  def init(params):
    del params
    return ControlCorrectionState(correction=correction)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda g, d: g + d.astype(g.dtype), updates, state.correction), state

  return optax.GradientTransformation(init, update)


def scaffold(loss_fn: LossFn, *, client_optimizer: optax.GradientTransformation,
             server_optimizer: optax.GradientTransformation, client_learning_rate: float, num_clients: int,
             control_lr: float = 1.0, use_control: bool = True) -> FederatedAlgorithm:
  """Build SCAFFOLD (option II) on the LoRA factors.

  Args:
    client_learning_rate: eta_l in c_i+ = c_i - c + (x - y_i) / (K_i eta_l) (train.py passes
      client_optimizer.learning_rate).
    num_clients: N, the total number of clients (for c += |S|/N mean dc).
    control_lr: scale of the server's control-variate step (1 = the paper).
    use_control: False disables the control variates (then the method is FedIT).
  """
  if not client_learning_rate > 0:
    raise ValueError(f"scaffold client_learning_rate must be > 0 (eta_l divides the control update), "
                     f"got {client_learning_rate}")
  if int(num_clients) != num_clients or num_clients < 1:
    raise ValueError(f"scaffold num_clients must be a positive int, got {num_clients!r}")
  if not control_lr >= 0:
    raise ValueError(f"scaffold control_lr must be >= 0 (1 = the paper's c += |S|/N mean dc), got {control_lr}")
  if not isinstance(use_control, bool):
    raise ValueError(f"scaffold use_control must be True or False, got {use_control!r}")
  eta_l = float(client_learning_rate)
  n_total = float(num_clients)

  def init(trainable, key):
    del key
    extra = {"c": T.tree_zeros_like(trainable)} if use_control else None
    return init_server_state(trainable, server_optimizer, extra)

  def init_client(trainable, info):
    del info
    return {"c_i": T.tree_zeros_like(trainable)} if use_control else {}

  def client_update(base, server_state, client_state, batches, info, key):
    x = server_state.params
    lora_bytes = common.nbytes(x)
    if not use_control:
      y, m = local_training(loss_fn, base, x, client_optimizer, batches, info.num_steps, key)
      metrics = {"train_loss": m["loss"], "sum_tokens": m["tokens"],
                 **common.comm_metrics(info, up=lora_bytes, down=lora_bytes)}
      return {"y": y}, client_state, metrics

    c, c_i = server_state.extra["c"], client_state["c_i"]
    optimizer = optax.chain(control_correction(T.tree_sub(c, c_i)), client_optimizer)
    y, m = local_training(loss_fn, base, x, optimizer, batches, info.num_steps, key)
    k = info.num_steps
    trained = (k > 0) & (info.client_id >= 0)
    inv = 1.0 / (jnp.maximum(k, 1).astype(jnp.float32) * eta_l)
    c_i_new = jax.tree.map(lambda ci, cc, xx, yy: jnp.where(trained, ci - cc + (xx - yy) * inv, ci),
                           c_i, c, x, y)
    dc = T.tree_sub(c_i_new, c_i)
    metrics = {"train_loss": m["loss"], "sum_tokens": m["tokens"],
               "control_norm": T.tree_norm(c_i_new),
               **common.comm_metrics(info, up=2 * lora_bytes, down=2 * lora_bytes)}
    return {"y": y, "dc": dc}, {"c_i": c_i_new}, metrics

  def aggregate(server_state, outputs, weights):
    aggregated = T.tree_weighted_mean(outputs["y"], weights)
    new_state = server_step(server_state, aggregated, server_optimizer)
    metrics = {"update_norm": T.tree_norm(T.tree_sub(new_state.params, server_state.params))}
    if use_control:
      present = (weights > 0).astype(jnp.float32)
      dc_sum = T.tree_weighted_sum(outputs["dc"], present)  # = |S| * mean_{i in S} dc_i
      c = T.tree_add(server_state.extra["c"], T.tree_scale(dc_sum, control_lr / n_total))
      new_state = new_state._replace(extra={"c": c})
      metrics["server_control_norm"] = T.tree_norm(c)
    return new_state, metrics

  def eval_params(server_state):
    return server_state.params

  return FederatedAlgorithm("scaffold", init, init_client, client_update, aggregate, eval_params)
