"""Small pytree math used everywhere (the one home of ``tree_*`` helpers)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.types import PyTree


def tree_add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, a, b)


def tree_scale(a: PyTree, s) -> PyTree:
  return jax.tree.map(lambda x: x * s, a)


def tree_zeros_like(a: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, a)


def tree_where(pred, a: PyTree, b: PyTree) -> PyTree:
  """Select ``a`` where the scalar ``pred`` holds, else ``b`` (leafwise)."""
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
  return sum(leaves, jnp.zeros((), jnp.float32))


def tree_sq_norm(a: PyTree) -> jax.Array:
  return tree_vdot(a, a)


def tree_norm(a: PyTree) -> jax.Array:
  return jnp.sqrt(tree_sq_norm(a))


def tree_size(a: PyTree) -> int:
  """Number of elements (static)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(a)))


def tree_bytes(a: PyTree) -> int:
  """Bytes of all leaves (static)."""
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(a)))


def tree_weighted_sum(stacked: PyTree, weights: jax.Array) -> PyTree:
  """sum_c weights[c] * stacked[c] over the leading axis, accumulated in float32."""
  def f(x):
    w = weights.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sum(w * x.astype(jnp.float32), axis=0).astype(x.dtype)
  return jax.tree.map(f, stacked)


def normalize_weights(weights: jax.Array) -> jax.Array:
  """Weights / sum(weights); all-zero weights give all zeros (never NaN)."""
  weights = weights.astype(jnp.float32)
  total = jnp.sum(weights)
  return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


def tree_weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
  """Weighted mean over the leading (client) axis; weights need not sum to one."""
  return tree_weighted_sum(stacked, normalize_weights(weights))


def tree_index(stacked: PyTree, i) -> PyTree:
  return jax.tree.map(lambda x: x[i], stacked)


def tree_stack(trees: list[PyTree]) -> PyTree:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def tree_all_finite(a: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(a)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
