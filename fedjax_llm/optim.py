"""Client-side optax transforms that make federated variants composable with any method.

``add_proximal(mu)`` is FedProx (Li et al., 2020, arXiv:1812.06127): each local step
minimizes ``f_k(w) + mu/2 ||w - w_t||^2`` where ``w_t`` is the model the client started
from. ``local_training`` calls ``optimizer.init(params)`` at the start of every client's
local training, so the transform's state captures ``w_t`` there and adds the proximal
gradient ``mu (w - w_t)`` to every step's gradient. ``mu = 0`` is exactly the wrapped
optimizer (FedAvg's local solver). Chain it first: ``optax.chain(add_proximal(mu), clip, adamw)``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
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
