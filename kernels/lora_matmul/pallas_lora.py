"""Pallas kernel for the fused product  o = p @ q + s * u @ v  (f32 accumulation), the core of the LoRA matmul.

One kernel serves the forward and the input-gradient of ``y = x W + s ((x a) * mask) b``:

* forward:  p = x [M, K],  q = W [K, N],            u = (x a) * mask [M, R],  v = b [R, N];
* backward: p = dy [M, N], q = W^T (``q_t=True``),  u = g = (dy b^T) * mask,  v = a^T (``v_t=True``).

The transposes are never materialized: with ``q_t`` / ``v_t`` the block specs walk W / a by rows and the in-kernel
dot contracts the second axis of both operands (Triton's ``trans``; Mosaic's native NT matmul). The grid is
(M / bm, N / bn); each program keeps its [bm, K] row panel of p and its [K, bn] column panel of q in its block and
loops over K in chunks of bk (``lax.fori_loop``; Triton pipelines the loads with ``num_stages``), accumulating
p @ q in float32, then adds s * (u_tile @ v_tile) (a [bm, R] x [R, bn] product, R = r_max is small) and rounds once
to the output dtype. q and v are cast tile by tile to p's dtype inside the kernel, so a float32 W is never copied
to bfloat16 in HBM. s is a float32 [1, 1] input: one compiled kernel serves every scale, and under
``jax.vmap`` (a cohort of clients) the pallas batching rule adds a grid axis, with unbatched operands (W) read from
the single shared copy.

Shapes that are not whole blocks are zero-padded in the wrapper (exact: padded rows / columns / K terms contribute
zeros) and the result is sliced; at the SmolLM2 shapes (K = 576, N in {576, 192}, M = 1024) nothing is padded
but R (padded to 16 for Triton's minimum dot size when r_max < 16).

Why u = (x a) * mask is computed outside (by XLA): it is a thin [M, K] x [K, R] product that the backward needs
anyway (db = s u^T dy, ds = sum(u * g)); computing it inside would redo it once per N block (an extra R / bn of the
main work) and still need a second output. The weight gradients (da, db, dW) are M-reductions left to XLA's dots.

Blocks: on GPU, powers of two (Triton), default caps (64, 64, 64); the [bm, K] / [K, bn] panels are only
addressed, and bk-wide chunks loaded, per step. On TPU the whole panels sit in VMEM (fine for K up to a few
thousand), bn is 128 or the whole N, and K runs in one step unless it is a multiple of 128 (``choose_blocks``).

Validated in interpret mode only (``interpret=True`` on CPU) against the jnp reference: values and VJPs, odd
shapes, rank masks, vmap (tests/kernels/test_lora_matmul.py). The tests also check that the forward and the dx
kernel lower (``lower(lowering_platforms=...)``) for Triton and for Mosaic TPU, for one client and for a vmapped
cohort, but the kernel has never been compiled to PTX / TPU code nor run on a device: its speed is whatever
benchmarks/lora_matmul.py measures there. Precision: on GPU the in-kernel float32 dot uses Triton's default
(TF32), like XLA's default float32 matmul on GPU.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

DEFAULT_BLOCKS = (64, 64, 64)  # (bm, bn, bk) on GPU / in interpret mode: powers of two (Triton)
_MIN_DOT = 16  # Triton's smallest dot operand dimension


def _backend() -> str:
  """The default backend ("cpu", "gpu" or "tpu"): it picks the compiler params, blocks and where s lives."""
  return jax.default_backend()


def _compiler_params(backend: str, num_warps: int = 4, num_stages: int = 3) -> Any:
  """Triton params on GPU (jax 0.10 defaults pallas_call to Mosaic GPU otherwise), Mosaic params on TPU."""
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _scalar_spec() -> pl.BlockSpec:
  """The float32 [1, 1] scale, the same for every program.

  A [1, 1] VMEM block rather than an SMEM scalar on TPU: under jax.vmap (a cohort with one scale per client) the
  batching rule turns it into a [C, 1, 1] array with a squeezed leading block dim, which Mosaic accepts (the last
  two block dims equal the array's), whereas a batched SMEM scalar is rejected.
  """
  return pl.BlockSpec((1, 1), lambda i, j: (0, 0))


def _pow2_block(n: int, cap: int) -> int:
  """A power-of-two block for a dimension of size n: n rounded up to a power of two, clamped to [16, cap]."""
  return max(_MIN_DOT, min(cap, pl.next_power_of_2(max(n, 1))))


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def choose_blocks(m: int, kr: int, n: int, backend: str, blocks: tuple[int, int, int] | None = None
                  ) -> tuple[int, int, int]:
  """(bm, bn, bk) for an [m, kr] x [kr, n] product.

  GPU / interpret: powers of two (Triton), at most `blocks` (default DEFAULT_BLOCKS), shrunk for small dims.
  TPU: bm a multiple of 8 (<= 256); bn 128 when n is a multiple of 128, else the whole n (a block may equal the
  array dim); bk 128 when kr is a multiple of 128, else the whole kr (one step).
  """
  if backend == "tpu":
    bm = min(256, _round_up(m, 8))
    bn = 128 if n % 128 == 0 else n
    bk = 128 if kr % 128 == 0 else kr
    return bm, bn, bk
  cm, cn, ck = blocks or DEFAULT_BLOCKS
  for c in (cm, cn, ck):
    if c < _MIN_DOT or c & (c - 1):
      raise ValueError(f"blocks must be powers of two >= {_MIN_DOT}; got {blocks!r}")
  return _pow2_block(m, cm), _pow2_block(n, cn), _pow2_block(kr, ck)


def _kernel(s_ref: Any, p_ref: Any, q_ref: Any, u_ref: Any, v_ref: Any, o_ref: Any, *, bk: int, q_t: bool,
            v_t: bool) -> None:
  """One [bm, bn] output tile: sum over K chunks of p @ q (float32), plus s * u @ v, rounded once."""
  bm, bn = o_ref.shape
  kr = p_ref.shape[1]
  dt = p_ref.dtype
  q_dims = (((1,), (1,)), ((), ())) if q_t else (((1,), (0,)), ((), ()))
  v_dims = (((1,), (1,)), ((), ())) if v_t else (((1,), (0,)), ((), ()))

  def chunk(i: Any, acc: jax.Array) -> jax.Array:
    k = pl.ds(pl.multiple_of(i * bk, bk), bk)
    p = p_ref[:, k]
    q = (q_ref[:, k] if q_t else q_ref[k, :]).astype(dt)
    return acc + lax.dot_general(p, q, q_dims, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, kr // bk, chunk, jnp.zeros((bm, bn), jnp.float32))
  u = u_ref[...]
  low = lax.dot_general(u, v_ref[...].astype(u.dtype), v_dims, preferred_element_type=jnp.float32)
  o_ref[...] = (acc + s_ref[...] * low).astype(o_ref.dtype)


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Zero-pad x at the end of each axis to `shape` (no copy when it already has it)."""
  if tuple(x.shape) == tuple(shape):
    return x
  return jnp.pad(x, [(0, t - d) for d, t in zip(x.shape, shape)])


def fused(p: jax.Array, q: jax.Array, u: jax.Array, v: jax.Array, s: Any, *, q_t: bool = False, v_t: bool = False,
          out_dtype: Any = None, interpret: bool = False, blocks: tuple[int, int, int] | None = None,
          num_warps: int = 4, num_stages: int = 3, backend: str | None = None) -> jax.Array:
  """p @ q' + s * u @ v' as one pallas_call, q' = q.T if q_t else q, v' = v.T if v_t else v.

  Args:
    p: [M, Kr] (its dtype is the compute dtype); q: [Kr, N] or, with q_t, [N, Kr] (any float dtype, cast per tile).
    u: [M, R] (compute dtype); v: [R, N] or, with v_t, [N, R].
    s: Python float or float32 scalar (traced is fine).
    out_dtype: result dtype (default p.dtype).
    interpret: run under the Pallas interpreter (any backend; what the CPU tests use).
    blocks: (bm, bn, bk) caps on GPU / interpret (powers of two >= 16); ignored on TPU (see ``choose_blocks``).
    num_warps, num_stages: Triton launch parameters (GPU only).
    backend: "gpu", "tpu" or "cpu" (picks compiler params and blocks); default ``jax.default_backend()``.

  Returns:
    [M, N] in out_dtype, accumulated in float32 and rounded once.
  """
  m, kr = p.shape
  n = q.shape[0] if q_t else q.shape[1]
  r = u.shape[1]
  if (q.shape[1] if q_t else q.shape[0]) != kr or u.shape[0] != m or (v.shape[1] if v_t else v.shape[0]) != r or (
      v.shape[0] if v_t else v.shape[1]) != n:
    raise ValueError(f"fused: incompatible shapes p {p.shape}, q {q.shape} (q_t={q_t}), u {u.shape}, "
                     f"v {v.shape} (v_t={v_t})")
  out_dtype = jnp.dtype(p.dtype if out_dtype is None else out_dtype)
  if m == 0 or n == 0:
    return jnp.zeros((m, n), out_dtype)
  s = jnp.reshape(jnp.asarray(s, jnp.float32), (1, 1))
  return _fused(p, q, u, v, s, q_t=bool(q_t), v_t=bool(v_t), out_dtype=out_dtype, interpret=bool(interpret),
                blocks=None if blocks is None else tuple(int(b) for b in blocks), backend=backend or _backend(),
                num_warps=int(num_warps), num_stages=int(num_stages))


@functools.partial(jax.jit, static_argnames=("q_t", "v_t", "out_dtype", "interpret", "blocks", "backend",
                                             "num_warps", "num_stages"))
def _fused(p: jax.Array, q: jax.Array, u: jax.Array, v: jax.Array, s: jax.Array, *, q_t: bool, v_t: bool,
           out_dtype: Any, interpret: bool, blocks: tuple[int, int, int] | None, backend: str, num_warps: int,
           num_stages: int) -> jax.Array:
  m, kr = p.shape
  n = q.shape[0] if q_t else q.shape[1]
  r = u.shape[1]
  bm, bn, bk = choose_blocks(m, kr, n, backend, blocks)
  mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(kr, bk)
  rp = max(_MIN_DOT, pl.next_power_of_2(r))
  p = _pad_to(p, (mp, kp))
  q = _pad_to(q, (np_, kp) if q_t else (kp, np_))
  u = _pad_to(u, (mp, rp))
  v = _pad_to(v, (np_, rp) if v_t else (rp, np_))
  q_spec = pl.BlockSpec((bn, kp), lambda i, j: (j, 0)) if q_t else pl.BlockSpec((kp, bn), lambda i, j: (0, j))
  v_spec = pl.BlockSpec((bn, rp), lambda i, j: (j, 0)) if v_t else pl.BlockSpec((rp, bn), lambda i, j: (0, j))
  itemsize = jnp.dtype(p.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * mp * np_ * (kp + rp), transcendentals=0,
      bytes_accessed=(mp * kp + mp * rp) * itemsize * (np_ // bn) + (kp + rp) * np_ * q.dtype.itemsize * (mp // bm)
      + mp * np_ * jnp.dtype(out_dtype).itemsize)
  out = pl.pallas_call(
      functools.partial(_kernel, bk=bk, q_t=q_t, v_t=v_t),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid=(mp // bm, np_ // bn),
      in_specs=[_scalar_spec(), pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), q_spec,
                pl.BlockSpec((bm, rp), lambda i, j: (i, 0)), v_spec],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      interpret=interpret,
      compiler_params=_compiler_params(backend, num_warps, num_stages),
      cost_estimate=cost,
      name="lora_fused_matmul",
  )(s, p, q, u, v)
  if (mp, np_) != (m, n):
    out = out[:m, :n]
  return out
