"""Pallas kernel for x + scale * z(key): the noise is generated per tile from counters, never stored in HBM.

x (any shape) is flattened row-major and laid out as [rows, 128]; the grid walks blocks of `block // 128` rows.
Each program computes the global flat index of its elements (program_id * block + row * 128 + col), hashes it with
Threefry-2x32 into a word, turns the word into a gaussian or Rademacher value with ``reference``'s own functions
(``noise_from_counters``: shared code, no copy), and writes x + scale * z in float32, cast to x.dtype. The key words
and the scale come in as tiny uint32[2] / float32[1] inputs, so one compiled kernel serves every key and scale, and
``jax.vmap`` over keys, scales or x batches the grid.

The tail is handled by padding x to whole blocks (the padded elements are computed and dropped); a leaf whose
size is a multiple of the block is not copied.

Validated in interpret mode only (``interpret=True`` on CPU): there it equals ``reference.perturb`` bitwise, for
both kinds and for float32/bfloat16 x (tests/kernels/test_zo_perturb.py). On GPU it is written for the Triton
backend (explicit ``CompilerParams``; jax 0.10 would otherwise pick Mosaic GPU); on TPU it goes through Mosaic with
the scalars in SMEM. The tests check that it lowers for both platforms (``lower(lowering_platforms=...)`` on CPU),
but it has never been compiled or run on a GPU or TPU. There, libdevice's log1p may differ from XLA's by an ulp,
so gaussian results may differ from the reference by a few ulp; Rademacher results are exact integer logic.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from kernels.zo_perturb import reference

LANES = 128
DEFAULT_BLOCK = 4096
_MIN_ROWS = 16  # smallest tile the kernel shrinks to for small x: (16, 128) suits TPU tiling of 16-bit dtypes too


def _check_block(block: int) -> int:
  """`block` (elements per program) must be a power of two and a multiple of 128 (Triton needs power-of-2 tiles)."""
  if not isinstance(block, (int, np.integer)) or block < LANES or block & (block - 1):
    raise ValueError(f"block must be a power of two >= {LANES} (elements per program); got {block!r}")
  return int(block)


def _tile_rows(n: int, block: int) -> int:
  """Rows per program: block // 128, shrunk (not below 16 rows) when x is smaller than one block."""
  rows = pl.cdiv(n, LANES)
  return min(block // LANES, max(_MIN_ROWS, pl.next_power_of_2(rows)))


def _backend() -> str:
  """The default backend ("cpu", "gpu" or "tpu"): it picks the compiler params and where the scalars live."""
  return jax.default_backend()


def _compiler_params(backend: str) -> Any:
  """Triton params on GPU (jax 0.10 defaults pallas_call to Mosaic GPU otherwise), Mosaic params on TPU."""
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel",))
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=4, num_stages=1)


def _scalar_spec(size: int, backend: str) -> pl.BlockSpec:
  """A whole tiny input, the same for every program (SMEM on TPU)."""
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pl.BlockSpec(memory_space=pltpu.SMEM)
  return pl.BlockSpec((size,), lambda i: (0,))


def _kernel(words_ref: Any, scale_ref: Any, x_ref: Any, o_ref: Any, *, kind: str, rows: int) -> None:
  """One tile: z from the counters of its elements, o = x + scale * z (float32 math)."""
  k0 = words_ref[0]
  k1 = words_ref[1]
  scale = scale_ref[0]
  base = pl.program_id(0).astype(jnp.uint32) * np.uint32(rows * LANES)
  row = lax.broadcasted_iota(jnp.uint32, (rows, LANES), 0)
  col = lax.broadcasted_iota(jnp.uint32, (rows, LANES), 1)
  lo = base + row * np.uint32(LANES) + col
  hi = jnp.zeros_like(lo)  # leaves hold < 2**32 elements
  z = reference.noise_from_counters(k0, k1, hi, lo, kind)
  o_ref[...] = (x_ref[...].astype(jnp.float32) + scale * z).astype(o_ref.dtype)


def perturb(x: jax.Array, key: jax.Array, scale: Any, kind: str = "gaussian", *, block: int = DEFAULT_BLOCK,
            interpret: bool = False) -> jax.Array:
  """x + scale * noise(key, x.shape, float32, kind), cast to x.dtype, as one pallas_call.

  Args:
    x: floating array of any shape (at most 2**32 elements).
    key: one threefry key, typed or raw (vmap for several).
    scale: Python float or traced float32 scalar.
    kind: "gaussian" or "rademacher" (same streams as ``reference.noise``).
    block: elements per program, a power of two >= 128 (tiles are [block // 128, 128]).
    interpret: run the kernel with the Pallas interpreter (any backend, CPU included).

  Returns:
    An array like x, equal to ``reference.perturb(x, key, scale, kind)`` (bitwise in interpret mode on CPU).
  """
  x = jnp.asarray(x)
  reference.check_float(x)
  reference.check_kind(kind)
  block = _check_block(block)
  if x.size > 2 ** 32:
    raise ValueError(f"a leaf may hold at most 2**32 elements; got shape {x.shape} ({x.size} elements)")
  if x.size == 0:
    return x
  k0, k1 = reference.key_words(key)
  if k0.ndim:
    raise ValueError(f"expected a single key; got a batch of keys of shape {k0.shape} (use jax.vmap)")
  words = jnp.stack([k0, k1])
  scale = jnp.reshape(jnp.asarray(scale, jnp.float32), (1,))
  return _perturb(x, words, scale, kind=kind, block=block, interpret=bool(interpret), backend=_backend())


@functools.partial(jax.jit, static_argnames=("kind", "block", "interpret", "backend"))
def _perturb(x: jax.Array, words: jax.Array, scale: jax.Array, *, kind: str, block: int, interpret: bool,
             backend: str) -> jax.Array:
  n = x.size
  rows = _tile_rows(n, block)
  grid = pl.cdiv(pl.cdiv(n, LANES), rows)
  padded = grid * rows * LANES
  flat = x.reshape(-1)
  if padded != n:
    flat = jnp.pad(flat, (0, padded - n))
  tile = pl.BlockSpec((rows, LANES), lambda i: (i, 0))
  out = pl.pallas_call(
      functools.partial(_kernel, kind=kind, rows=rows),
      out_shape=jax.ShapeDtypeStruct((grid * rows, LANES), x.dtype),
      grid=(grid,),
      in_specs=[_scalar_spec(2, backend), _scalar_spec(1, backend), tile],
      out_specs=tile,
      interpret=interpret,
      compiler_params=_compiler_params(backend),
      name=f"zo_perturb_{kind}",
  )(words, scale, flat.reshape(grid * rows, LANES))
  out = out.reshape(-1)
  if padded != n:
    out = out[:n]
  return out.reshape(x.shape)
