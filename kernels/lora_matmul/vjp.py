"""custom_vjp wiring of the LoRA matmul around the Pallas kernel ``pallas_lora.fused``.

For x [M, K] (leading dims flattened by the caller), w [K, N], a [K, R], b [R, N], s a float32 scalar and
mask [R] (in x.dtype), with dt = x.dtype:

  forward:  u = (x a) * mask                         [M, R]  XLA (thin), kept as a residual
            y = fused(x, W, u, b, s)                 [M, N]  Pallas: x W + s u b, float32 accumulation
  backward: g  = (dy b^T) * mask                     [M, R]  XLA (thin)
            dx = fused(dy, W^T, g, a^T, s)           [M, K]  Pallas (transposes by index map, not materialized)
            da = s x^T g,  db = s u^T dy             XLA, float32 accumulation, cast to a / b dtypes
            ds = sum(u * g)                          float32
            dW = x^T dy                              XLA; dead code (removed by XLA) when W gets no gradient

The mask comes from an integer rank, so its cotangent is returned as zeros (no gradient flows to ranks).
Columns of da and rows of db beyond a client's rank are exactly 0 (g and u are masked).
Validated (interpret mode) against autodiff of reference.py in tests/kernels/test_lora_matmul.py, which also
checks in the compiled HLO that dW disappears when only (x, a, b) are differentiated.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from kernels.lora_matmul import pallas_lora

_F32 = jnp.float32


def _mm_t(x: jax.Array, y: jax.Array) -> jax.Array:
  """x^T y (contracting the leading axis of both) with float32 accumulation and result."""
  return jnp.einsum("mi,mj->ij", x, y, preferred_element_type=_F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lora_matmul_2d(cfg: tuple, x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, s: jax.Array,
                   mask: jax.Array) -> jax.Array:
  """x @ w + s * ((x @ a) * mask) @ b for x [M, K]; cfg = (interpret, blocks, backend) is static."""
  return _fwd(cfg, x, w, a, b, s, mask)[0]


def _kernel_kwargs(cfg: tuple) -> dict:
  interpret, blocks, backend = cfg
  return {"interpret": interpret, "blocks": blocks, "backend": backend}


def _fwd(cfg: tuple, x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, s: jax.Array, mask: jax.Array
         ) -> tuple[jax.Array, tuple]:
  dt = x.dtype
  u = (x @ a.astype(dt)) * mask
  y = pallas_lora.fused(x, w, u, b, s, out_dtype=dt, **_kernel_kwargs(cfg))
  return y, (x, w, a, b, s, mask, u)


def _bwd(cfg: tuple, res: tuple, dy: jax.Array) -> tuple:
  x, w, a, b, s, mask, u = res
  dt = x.dtype
  dy = dy.astype(dt)
  g = (dy @ b.astype(dt).T) * mask
  dx = pallas_lora.fused(dy, w, g, a, s, q_t=True, v_t=True, out_dtype=dt, **_kernel_kwargs(cfg))
  s32 = s.astype(_F32)
  da = (s32 * _mm_t(x, g)).astype(a.dtype)
  db = (s32 * _mm_t(u, dy)).astype(b.dtype)
  ds = jnp.sum(u.astype(_F32) * g.astype(_F32)).astype(s.dtype)
  dw = _mm_t(x, dy).astype(w.dtype)
  return dx, dw, da, db, ds, jnp.zeros_like(mask)


lora_matmul_2d.defvjp(_fwd, _bwd)


def lora_matmul(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: Any, mask: jax.Array, *,
                interpret: bool = False, blocks: tuple[int, int, int] | None = None) -> jax.Array:
  """The kernel impl for x [..., K]: flattens the leading dims, calls the custom_vjp op, restores them.

  The backend (``pallas_lora._backend()``) is read here and passed down as a static argument, so traces cached by
  custom_vjp / jit are keyed on it.
  """
  lead = x.shape[:-1]
  s = jnp.asarray(scale, _F32)
  cfg = (bool(interpret), blocks, pallas_lora._backend())
  y = lora_matmul_2d(cfg, x.reshape(-1, x.shape[-1]), w, a, b, s, mask)
  return y.reshape(*lead, w.shape[1])
