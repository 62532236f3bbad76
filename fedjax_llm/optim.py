"""Optax transforms that make federated variants composable with any method.

``add_proximal(mu)`` is FedProx (Li et al., 2020, arXiv:1812.06127): each local step
minimizes ``f_k(w) + mu/2 ||w - w_t||^2`` where ``w_t`` is the model the client started
from. ``local_training`` calls ``optimizer.init(params)`` at the start of every client's
local training, so the transform's state captures ``w_t`` there and adds the proximal
gradient ``mu (w - w_t)`` to every step's gradient. ``mu = 0`` is exactly the wrapped
optimizer (FedAvg's local solver). Chain it first: ``optax.chain(add_proximal(mu), clip, adamw)``.

``fedopt_adaptive(kind, ...)`` is the server side: FedAdagrad / FedAdam / FedYogi exactly as in
Reddi et al. (2021, "Adaptive Federated Optimization", arXiv:2003.00295), Algorithm 2.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ProximalState(NamedTuple):
  anchor: Any  # the parameters local training started from (w_t)


def add_proximal(mu: float) -> optax.GradientTransformation:
  """FedProx's proximal gradient ``g + mu (w - w_t)``, ``w_t`` captured at ``init``."""
  if mu < 0:
    raise ValueError(f"FedProx mu must be >= 0, got {mu}")

  def init(params):
    return ProximalState(anchor=params)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("add_proximal needs the current params in update()")
    if mu == 0:
      return updates, state
    return jax.tree.map(lambda g, p, a: g + mu * (p - a), updates, params, state.anchor), state

  return optax.GradientTransformation(init, update)


class FedOptAdaptiveState(NamedTuple):
  m: Any  # first moment, a tree like params (m_{-1} = 0)
  v: Any  # second moment, a tree like params (v_{-1} = tau^2)


FEDOPT_ADAPTIVE_KINDS = ("adagrad", "adam", "yogi")


def fedopt_adaptive(kind: str, learning_rate: float, b1: float = 0.9, b2: float = 0.99,
                    tau: float = 1e-3) -> optax.GradientTransformation:
  """FedAdagrad / FedAdam / FedYogi of Reddi et al. 2021 (arXiv:2003.00295), Algorithm 2, exactly.

  The server calls ``update`` with the pseudo-gradient ``g = x_t - mean_k y_k`` (``server_step``),
  i.e. ``g = -Delta_t`` in the paper's notation. Per coordinate, with ``m_{-1} = 0`` and
  ``v_{-1} = tau^2``::

    m_t = b1 m_{t-1} + (1 - b1) g_t
    v_t = v_{t-1} + g_t^2                                          (kind="adagrad")
    v_t = b2 v_{t-1} + (1 - b2) g_t^2                              (kind="adam")
    v_t = v_{t-1} - (1 - b2) g_t^2 sign(v_{t-1} - g_t^2)           (kind="yogi")
    update_t = -learning_rate m_t / (sqrt(v_t) + tau)              (x_{t+1} = x_t + update_t)

  which is the paper's ``x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)`` with its
  ``m_t = b1 m_{t-1} + (1 - b1) Delta_t`` (m here is the paper's m negated; v is the same since it
  only sees squares). Unlike ``optax.adam`` / ``optax.yogi`` / ``optax.adagrad`` there is no bias
  correction, v starts at ``tau^2`` (not 0 or 1e-6), adagrad has the ``b1`` momentum too (b1 = 0
  gives plain adagrad), and ``tau`` is added outside the square root. ``b2`` is unused by adagrad.
  ``sign(0) = 0``: yogi leaves v unchanged where ``v_{t-1} = g_t^2``.

  The state is ``FedOptAdaptiveState(m, v)``, two trees shaped like the params (checkpointable).
  """
  if kind not in FEDOPT_ADAPTIVE_KINDS:
    raise ValueError(f"unknown FedOpt kind {kind!r}; allowed: {', '.join(FEDOPT_ADAPTIVE_KINDS)}")
  if tau <= 0:
    raise ValueError(f"FedOpt tau (server_optimizer.eps) must be > 0, got {tau}")
  if not 0 <= b1 < 1 or (kind != "adagrad" and not 0 <= b2 < 1):
    raise ValueError(f"FedOpt needs 0 <= b1 < 1 and 0 <= b2 < 1, got b1={b1}, b2={b2}")

  def init(params):
    return FedOptAdaptiveState(m=jax.tree.map(jnp.zeros_like, params),
                               v=jax.tree.map(lambda p: jnp.full_like(p, tau ** 2), params))

  def second_moment(v, g):
    g2 = g * g
    if kind == "adagrad":
      return v + g2
    if kind == "adam":
      return b2 * v + (1 - b2) * g2
    return v - (1 - b2) * g2 * jnp.sign(v - g2)

  def update(updates, state, params=None):
    del params
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, updates)
    v = jax.tree.map(second_moment, state.v, updates)
    out = jax.tree.map(lambda m, v: (-learning_rate * m / (jnp.sqrt(v) + tau)).astype(m.dtype), m, v)
    return out, FedOptAdaptiveState(m=m, v=v)

  return optax.GradientTransformation(init, update)
