"""Zeroth-order building blocks: seed-defined perturbation directions over any pytree, and SPSA.

A direction is a key. Leaf ``i`` (in ``jax.tree.leaves`` order) of the direction ``key`` is the noise
``z_i = noise(fold_in(key, i), leaf.shape)`` of ``kernels/zo_perturb`` (counter-based Threefry-2x32: element
``e`` of the leaf depends only on (key, i, e)), Gaussian N(0, 1) or Rademacher +-1. A direction is never
stored: every use regenerates it, tile by tile in the Pallas kernel on GPU/TPU, fused by XLA on CPU.

  tree_perturb(theta, key, c)            theta + c z(key)
  tree_replay(theta, keys[M], c[M])      theta + sum_m c_m z(keys[m])      (one direction at a time)
  spsa(loss, theta, key, eps)            g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)
  zo_local_training(...)                 MeZO steps: theta - (lr / n) sum_i g_i z_i, g_i by SPSA at theta

For a quadratic L the central difference is exact, g = z . grad L, so E[g z] = E[z z^T] grad L = grad L for
both kinds (E z z^T = I): the estimate is unbiased (tests/test_zo.py checks it with a stated bound).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kernels.zo_perturb import api as zo_api

KINDS = zo_api.KINDS  # ("gaussian", "rademacher"), defined once by the kernel


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"unknown perturbation kind {kind!r}; allowed: {', '.join(KINDS)}")
  return kind


def direction_key(root: jax.Array, *ids) -> jax.Array:
  """The key of a direction named by integers (e.g. (seed index,) or (client, step, i)) under ``root``."""
  key = root
  for i in ids:
    key = jax.random.fold_in(key, i)
  return key


def tree_noise(tree, key: jax.Array, kind: str = "gaussian"):
  """The direction ``z(key)`` materialized with ``tree``'s structure, shapes and dtypes (tests, small trees)."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([zo_api.noise(jax.random.fold_in(key, i), x.shape, jnp.float32, kind=kind).astype(x.dtype)
                            for i, x in enumerate(leaves)])


def tree_perturb(tree, key: jax.Array, scale, kind: str = "gaussian", impl: str | None = None):
  """``tree + scale * z(key)`` leaf by leaf (computed in float32, cast back to each leaf's dtype)."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([zo_api.perturb(x, jax.random.fold_in(key, i), scale, kind=kind, impl=impl)
                            for i, x in enumerate(leaves)])


def tree_replay(tree, keys: jax.Array, scales: jax.Array, kind: str = "gaussian", impl: str | None = None,
                skip_zeros: bool = True):
  """``tree + sum_m scales[m] z(keys[m])``, adding one direction at a time (memory: one extra copy of the tree).

  Args:
    keys: [M] typed keys (or [M, 2] raw); scales: float32 [M]. Directions with a zero scale are skipped
      (``lax.cond``; when ``scales`` is batched under vmap both branches run, so the skip saves nothing there).
  """
  scales = jnp.asarray(scales, jnp.float32)
  m = scales.shape[0]

  def body(i, t):
    if not skip_zeros:
      return tree_perturb(t, keys[i], scales[i], kind, impl)
    return jax.lax.cond(scales[i] != 0, lambda u: tree_perturb(u, keys[i], scales[i], kind, impl), lambda u: u, t)

  return jax.lax.fori_loop(0, m, body, tree) if m else tree


LossAt = Callable  # loss_at(theta) -> (scalar loss, aux with "tokens")


def spsa(loss_at: LossAt, theta, key: jax.Array, eps: float, kind: str = "gaussian", impl: str | None = None):
  """Two-sided SPSA along ``z(key)``: returns (g, loss+, loss-, target tokens of the batch).

  The two sides run one after the other (``lax.map``: one perturbed copy alive, the forward traced once).
  """
  def side(sign):
    loss, aux = loss_at(tree_perturb(theta, key, sign * eps, kind, impl))
    return loss, aux["tokens"]

  losses, tokens = jax.lax.map(side, jnp.array([1.0, -1.0], jnp.float32))
  return (losses[0] - losses[1]) / (2.0 * eps), losses[0], losses[1], tokens[0]


def index_bytes(num_seeds: int) -> int:
  """Bytes of one seed index out of ``num_seeds`` (1 up to 256 seeds, 2 up to 65,536, else 4)."""
  return 1 if num_seeds <= 2 ** 8 else 2 if num_seeds <= 2 ** 16 else 4


def zo_local_training(loss_fn, base, theta, batches, num_steps, key: jax.Array, directions: Callable,
                      lr, eps: float, kind: str = "gaussian", impl: str | None = None):
  """Local zeroth-order SGD (MeZO / FedKSeed) over ``S`` batches; steps ``>= num_steps`` are no-ops.

  Args:
    loss_fn: ``loss(base, theta, tokens, mask, key) -> (scalar, aux)`` (forward passes only).
    directions: ``directions(i, step_key) -> (keys [n], ids int32 [n])``: the n directions of step i and the
      integers that name them (FedKSeed: the sampled seed index; MeZO: 0..n-1).
  Returns:
    (theta, ids int32 [S, n], scalars float32 [S, n] (0 for inactive steps), metrics) where metrics has
    ``loss`` (token-weighted mean of (L+ + L-)/2 over active steps) and ``tokens``. A step whose scalar is not
    finite (a NaN/inf loss) leaves theta unchanged and records 0 (FedKSeed's code skips such steps too).
  """
  s = batches.tokens.shape[0]

  def step(theta, xs):
    i, tokens, mask = xs
    k = jax.random.fold_in(key, i)
    keys, ids = directions(i, k)
    drop = jax.random.fold_in(k, 0x0D0D)  # the same dropout key on both sides (common random numbers)
    loss_at = lambda t: loss_fn(base, t, tokens, mask, drop)

    def one(_, dkey):
      g, lp, lm, tokens = spsa(loss_at, theta, dkey, eps, kind, impl)
      return None, (g, 0.5 * (lp + lm), tokens)

    _, (gs, losses, toks) = jax.lax.scan(one, None, keys)
    ok = jnp.all(jnp.isfinite(gs))
    active = (i < num_steps) & ok
    gs = jnp.where(active, gs, 0.0)
    n = gs.shape[0]
    # an inactive or skipped step adds 0 * z = 0 (z is always finite): theta is unchanged bit for bit,
    # without a select over the whole tree
    theta = tree_replay(theta, keys, -jnp.asarray(lr, jnp.float32) * gs / n, kind, impl, skip_zeros=False)
    af = (i < num_steps).astype(jnp.float32)
    loss = jnp.where(jnp.isfinite(jnp.mean(losses)), jnp.mean(losses), 0.0)
    return theta, (ids.astype(jnp.int32), gs, loss * toks[0] * af, toks[0] * af)

  theta, (ids, scalars, nll, toks) = jax.lax.scan(step, theta, (jnp.arange(s), batches.tokens, batches.mask))
  total = jnp.sum(toks)
  return theta, ids, scalars, {"loss": jnp.sum(nll) / jnp.maximum(total, 1.0), "tokens": total}
