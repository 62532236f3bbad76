"""Frozen base matmul plus a rank-masked LoRA branch, in plain jnp: the "xla" impl and the kernel's oracle.

  y = x @ w + scale * ((x @ a) * mask) @ b,      mask = [1] * rank + [0] * (R - rank)

with x [..., K], w [K, N] (shared, usually frozen), a [K, R], b [R, N] (per client), R = r_max, so clients of
one cohort with different LoRA ranks share one shape (HetLoRA-style truncation: a client of rank r uses the first
r components). Numerics follow the model's ``Linear`` + ``LoRA`` exactly (fedjax_llm/models/layers.py,
fedjax_llm/peft/lora.py):

* float32 x: everything in float32;
* bfloat16 / float16 x: the base product accumulates in float32 and is rounded to x.dtype; the low-rank branch
  runs in x.dtype (a, b and scale cast to it) and is added in x.dtype.

Gradients are jax's plain autodiff of these expressions. Validated against an independent float64 numpy
computation in tests/kernels/test_lora_matmul.py.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_args(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, rank: Any = None) -> None:
  """ValueError naming the shapes unless x [..., K], w [K, N], a [K, R], b [R, N] (and a static rank <= R)."""
  shapes = f"x {tuple(x.shape)}, w {tuple(w.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}"
  if x.ndim < 1 or w.ndim != 2 or a.ndim != 2 or b.ndim != 2:
    raise ValueError(f"lora_matmul expects x [..., K], w [K, N], a [K, R], b [R, N]; got {shapes}")
  k, n = w.shape
  if x.shape[-1] != k or a.shape[0] != k or b.shape != (a.shape[1], n):
    raise ValueError(f"lora_matmul shape mismatch: expected x [..., K], w [K, N], a [K, R], b [R, N]; got {shapes}")
  for name, arr in (("x", x), ("w", w), ("a", a), ("b", b)):
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      raise ValueError(f"lora_matmul: {name} must be floating; got {arr.dtype}")
  if rank is not None:
    r = concrete(rank)
    if r is None:  # traced: check what the abstract value says
      r_aval = jnp.asarray(rank)
      if r_aval.ndim != 0 or not jnp.issubdtype(r_aval.dtype, jnp.integer):
        raise ValueError(f"lora_matmul: rank must be None or an integer scalar; got {r_aval.dtype}{list(r_aval.shape)}")
      return
    if r.ndim != 0 or not np.issubdtype(r.dtype, np.integer):
      raise ValueError(f"lora_matmul: rank must be None or an integer scalar; got {r.dtype}{list(r.shape)}")
    if not 0 <= int(r) <= a.shape[1]:
      raise ValueError(f"lora_matmul: rank {int(r)} is outside [0, R={a.shape[1]}] for a {tuple(a.shape)}")


def concrete(v: Any) -> np.ndarray | None:
  """v as a numpy array, or None when it is traced (under jit / vmap / grad)."""
  try:
    return np.asarray(v)
  except TypeError:  # TracerArrayConversionError, ConcretizationTypeError
    return None


def rank_mask(r_max: int, rank: Any, dtype: Any) -> jax.Array:
  """[r_max] mask in `dtype`: 1 for the first `rank` components, 0 after (all ones for rank None)."""
  if rank is None:
    return jnp.ones((r_max,), dtype)
  return (jnp.arange(r_max) < jnp.asarray(rank)).astype(dtype)


def lora_matmul(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: Any, rank: Any = None) -> jax.Array:
  """x @ w + scale * ((x @ a) * mask(rank)) @ b with the model's numerics (module docstring); shape [..., N].

  Args:
    x: [..., K] activations (float32, bfloat16 or float16; the compute dtype).
    w: [K, N] base weight (any float dtype; cast to x.dtype for the product).
    a, b: [K, R] and [R, N] LoRA factors (cast to x.dtype).
    scale: Python float or traced float32 scalar (alpha / r).
    rank: None (all R components) or an integer scalar <= R (traced is fine).
  """
  x, w, a, b = (jnp.asarray(t) for t in (x, w, a, b))
  check_args(x, w, a, b, rank)
  dt = x.dtype
  mask = rank_mask(a.shape[1], rank, dt)
  if dt == jnp.float32:
    base = jnp.matmul(x, w.astype(dt))
    return base + ((x @ a.astype(dt)) * mask) @ b.astype(dt) * jnp.asarray(scale, dt)
  base = jnp.einsum("...i,io->...o", x, w.astype(dt), preferred_element_type=jnp.float32).astype(dt)
  branch = (((x @ a.astype(dt)) * mask) @ b.astype(dt)) * jnp.asarray(scale, dt)
  return base + branch
