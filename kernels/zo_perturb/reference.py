"""Counter-based noise for zeroth-order perturbations, in plain jnp (the XLA implementation and the kernel's oracle).

Zeroth-order methods (MeZO, Malladi et al. 2023; FedKSeed, Qin et al. 2024) evaluate the loss at theta + c * z(key)
and theta - c * z(key), where z is regenerated from a key and never stored. Element i of a leaf gets its noise from
Threefry-2x32 (Salmon et al. 2011, 20 rounds) of the key's two words and the 64-bit counter offset + i, so any tile
of any leaf can be generated on its own: in a Pallas kernel, under sharding, in any order.

With ``jax_threefry_partitionable=True`` (the default since jax 0.5, and set by the tests and ``train.py``) the
stream is jax's own: ``bits(key, shape) == jax.random.bits(key, shape)`` bitwise, and ``normal(key, shape)`` equals
``jax.random.normal(key, shape)`` for float32 (same uniform transform, same Giles erfinv polynomial as XLA's).

Every function below is written with elementwise uint32/float32 jnp ops only (add, xor, shifts, compares, where,
bitcast, log1p, sqrt, mul) so the same code runs inside a Pallas kernel body (``pallas_perturb.py``). The
array-level functions (bits, noise, normal, rademacher, perturb) are compiled with jax.jit even when called eagerly:
op by op, XLA would not fuse (nor FMA-contract) the uniform/erfinv arithmetic and normals would differ from
jax.random.normal by up to ~3 ulp; compiled they are equal bitwise on XLA:CPU.

Counters: a counter is 64 bits, carried as two uint32 words (hi, lo) exactly like ``iota_2x32_shape``. A leaf may
hold at most 2**32 elements; a static (Python int) offset may be any value in [0, 2**64 - 2**32]; a traced offset
is an integer scalar in [0, 2**32) (its hi word is 0, a carry into hi is still propagated).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KINDS = ("gaussian", "rademacher")

_U32 = np.uint32
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KS_PARITY = _U32(0x1BD11BDA)
_MAX_ELEMENTS = 2 ** 32

# Giles (2010), "Approximating the erfinv function", single precision; the coefficients XLA uses for f32 ErfInv
# (chlo legalization, `materializeErfInvF32`).
_ERFINV_W_LT_5 = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087, -0.00125372503,
                  -0.00417768164, 0.246640727, 1.50140941)
_ERFINV_W_GE_5 = (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773, -0.0076224613,
                  0.00943887047, 1.00167406, 2.83297682)


def check_kind(kind: str) -> str:
  """Return `kind` if it is a known noise kind, else raise a ValueError naming it and the allowed ones."""
  if kind not in KINDS:
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {KINDS}")
  return kind


# --------------------------------------------------------------------------------------------------- Threefry-2x32


def _rotl(x: jax.Array, d: int) -> jax.Array:
  """Rotate the uint32 array `x` left by the static amount `d` (0 < d < 32)."""
  return (x << _U32(d)) | (x >> _U32(32 - d))


def threefry2x32(k0: Any, k1: Any, x0: Any, x1: Any) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32, 20 rounds, exactly as jax's ``threefry2x32_p``.

  Args:
    k0, k1: the key words, uint32 (scalars or arrays; all four arguments broadcast).
    x0, x1: the counter words, uint32 (for jax's bit stream x0 = counter >> 32, x1 = counter & 0xffffffff).

  Returns:
    (y0, y1), uint32 arrays of the broadcast shape.
  """
  k0, k1, x0, x1 = (jnp.asarray(a, jnp.uint32) for a in (k0, k1, x0, x1))
  ks = (k0, k1, k0 ^ k1 ^ _KS_PARITY)
  x0 = x0 + ks[0]
  x1 = x1 + ks[1]
  for i in range(5):  # 5 x 4 rounds, key injection after each group of 4
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r)
      x1 = x0 ^ x1
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + _U32(i + 1)
  return x0, x1


def key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The two uint32 words of a threefry key.

  Accepts a typed key (``jax.random.key``) or a raw uint32[..., 2] key (``jax.random.PRNGKey``). Batched keys
  (leading axes, or under jax.vmap) give batched words of the batch shape.
  """
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    impl = str(jax.random.key_impl(key))
    if "threefry" not in impl:
      raise ValueError(f"zo_perturb needs a threefry2x32 key; got a key of impl {impl!r}")
    data = jax.random.key_data(key)
  else:
    data = jnp.asarray(key)
    if data.dtype != jnp.uint32 or data.ndim < 1 or data.shape[-1] != 2:
      raise ValueError(
          f"expected a typed threefry key or a raw uint32[..., 2] key; got {data.dtype}{list(data.shape)}")
  if data.shape[-1] != 2:
    raise ValueError(f"expected threefry key data of trailing size 2; got shape {data.shape}")
  return data[..., 0], data[..., 1]


def _single_key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """key_words for exactly one key (vmap over keys instead of passing a batch)."""
  k0, k1 = key_words(key)
  if k0.ndim:
    raise ValueError(f"expected a single key; got a batch of keys of shape {k0.shape} (use jax.vmap)")
  return k0, k1


# -------------------------------------------------------------------------------------------------------- counters


def add_offset(hi: jax.Array, lo: jax.Array, offset: Any) -> tuple[jax.Array, jax.Array]:
  """(hi, lo) + offset as 64-bit counters in two uint32 words, with the carry from lo into hi.

  `offset` is a non-negative Python int below 2**64, or a traced integer scalar in [0, 2**32).
  """
  if isinstance(offset, (int, np.integer)):
    offset = int(offset)
    if not 0 <= offset < 2 ** 64:
      raise ValueError(f"counter offset must be in [0, 2**64); got {offset}")
    if offset == 0:
      return hi, lo
    off_hi, off_lo = _U32(offset >> 32), _U32(offset & 0xFFFFFFFF)
  else:
    off_hi, off_lo = _U32(0), jnp.asarray(offset).astype(jnp.uint32)
  new_lo = lo + off_lo
  carry = (new_lo < off_lo).astype(jnp.uint32)
  return hi + off_hi + carry, new_lo


def counters(shape: Sequence[int], offset: Any = 0) -> tuple[jax.Array, jax.Array]:
  """(hi, lo) uint32 words of the counters offset + flat_row_major_index over `shape`.

  Built from per-dimension iotas (like ``iota_2x32_shape``) so XLA's SPMD partitioner can shard it.
  """
  shape = _check_shape(shape)
  if not shape:
    lo = jnp.zeros((), jnp.uint32)
  else:
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    lo = sum(lax.broadcasted_iota(jnp.uint32, shape, d) * _U32(s) for d, s in enumerate(strides) if shape[d] > 1)
    if isinstance(lo, int):  # every dimension is 1
      lo = jnp.zeros(shape, jnp.uint32)
  return add_offset(jnp.zeros(shape, jnp.uint32), lo, offset)


# ------------------------------------------------------------------------------------------------------- bit stream


def bits_from_counters(k0: Any, k1: Any, hi: jax.Array, lo: jax.Array) -> jax.Array:
  """The 32-bit word of the stream at counter (hi, lo): y0 ^ y1 of Threefry-2x32 (jax's partitionable scheme)."""
  y0, y1 = threefry2x32(k0, k1, hi, lo)
  return y0 ^ y1


def bits(key: jax.Array, shape: Sequence[int], offset: Any = 0) -> jax.Array:
  """uint32[shape] where the element at flat row-major index i is the stream word at counter offset + i.

  With offset 0 this is bitwise ``jax.random.bits(key, shape)`` (``jax_threefry_partitionable=True``), and
  ``bits(key, (n,), offset=k) == bits(key, (n + k,))[k:]``.
  """
  shape = _check_shape(shape)
  static, dynamic = _split_offset(offset)
  return _bits_jit(key, dynamic, shape=shape, static_offset=static)


@functools.partial(jax.jit, static_argnames=("shape", "static_offset"))
def _bits_jit(key: jax.Array, dynamic_offset: Any, *, shape: tuple[int, ...], static_offset: int) -> jax.Array:
  k0, k1 = _single_key_words(key)
  hi, lo = counters(shape, static_offset if dynamic_offset is None else dynamic_offset)
  return bits_from_counters(k0, k1, hi, lo)


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """`shape` as a tuple of ints, at most 2**32 elements (one 32-bit counter word per element)."""
  shape = tuple(int(d) for d in shape)
  if math.prod(shape) > _MAX_ELEMENTS:
    raise ValueError(f"a leaf may hold at most 2**32 elements; got shape {shape} ({math.prod(shape)} elements)")
  return shape


def _split_offset(offset: Any) -> tuple[int, Any]:
  """(static, dynamic) parts of a counter offset: a Python int is static (dynamic None), anything else dynamic."""
  if isinstance(offset, (int, np.integer)):
    offset = int(offset)
    if not 0 <= offset < 2 ** 64:
      raise ValueError(f"counter offset must be in [0, 2**64); got {offset}")
    return offset, None
  offset = jnp.asarray(offset)
  if not jnp.issubdtype(offset.dtype, jnp.integer) or offset.ndim:
    raise ValueError(f"a traced counter offset must be an integer scalar; got {offset.dtype}{list(offset.shape)}")
  return 0, offset


# ------------------------------------------------------------------------------------------------------ transforms


def uniform_from_bits(bits: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """Uniform [0, 1) floats from uint32 words, exactly as jax.random.uniform does it.

  Mantissa trick: the top `nmant` bits of the word become the mantissa of a float in [1, 2), minus 1. For a 16-bit
  dtype the word is first truncated to its low 16 bits (8 for bfloat16, whose 7-bit mantissa makes jax draw 8-bit
  words), as jax's partitionable stream does, so
  ``uniform_from_bits(bits(key, s), d) == jax.random.uniform(key, s, d)`` for float32, bfloat16 and float16.
  """
  dtype = jnp.dtype(dtype)
  finfo = jnp.finfo(dtype)
  if finfo.bits not in (16, 32):
    raise ValueError(f"uniform_from_bits supports 16- and 32-bit floats; got {dtype}")
  uint = jnp.uint32 if finfo.bits == 32 else jnp.uint16
  rng_bits = finfo.bits if finfo.nmant >= 8 else 8  # jax draws 8-bit words for bfloat16
  word = bits.astype(jnp.uint32)
  if rng_bits < 32:
    word = word.astype({16: jnp.uint16, 8: jnp.uint8}[rng_bits])
  word = word.astype(uint)
  one = np.array(1.0, dtype).view(np.dtype(uint))
  float_bits = (word >> uint(rng_bits - finfo.nmant)) | uint(one)
  return lax.bitcast_convert_type(float_bits, dtype) - jnp.asarray(1.0, dtype)


def erfinv_f32(x: jax.Array) -> jax.Array:
  """erf^-1 for float32 in elementwise jnp ops: Giles' single-precision polynomial, as XLA lowers f32 ErfInv.

  Portable (log1p, sqrt, where, mul, add) so it lowers inside Pallas kernels; erfinv(+-1) = +-inf.
  """
  x = jnp.asarray(x, jnp.float32)
  w = -jnp.log1p(x * -x)
  small = w < np.float32(5.0)
  w = jnp.where(small, w - np.float32(2.5), jnp.sqrt(w) - np.float32(3.0))
  p = jnp.where(small, np.float32(_ERFINV_W_LT_5[0]), np.float32(_ERFINV_W_GE_5[0]))
  for a, b in zip(_ERFINV_W_LT_5[1:], _ERFINV_W_GE_5[1:]):
    p = jnp.where(small, np.float32(a), np.float32(b)) + p * w
  return jnp.where(jnp.abs(x) == np.float32(1.0), np.float32(np.inf) * x, p * x)


def normal_from_bits(bits: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """Standard normals from uint32 words, as jax.random.normal for float32, then cast to `dtype`.

  u = uniform in [0, 1) scaled into (nextafter(-1, 0), 1) (float32 ops, as ``_normal_real``), z = sqrt(2) erfinv(u).
  Always computed in float32 (so bfloat16/float16 results are the rounded float32 normals, not jax's 16-bit ones).
  """
  lo = np.nextafter(np.float32(-1.0), np.float32(0.0), dtype=np.float32)
  hi = np.float32(1.0)
  floats = uniform_from_bits(bits, jnp.float32)
  u = jnp.maximum(lo, floats * (hi - lo) + lo)
  return (np.float32(np.sqrt(2)) * erfinv_f32(u)).astype(dtype)


def rademacher_from_counters(k0: Any, k1: Any, hi: jax.Array, lo: jax.Array) -> jax.Array:
  """float32 +-1 for element counters (hi, lo): bit (c % 32) of the stream word at counter c // 32, z = 1 - 2 bit.

  Elementwise (one Threefry per element), for kernels and traced offsets; ``rademacher`` with a static offset
  computes the same values with one Threefry per 32 elements.
  """
  word_lo = (lo >> _U32(5)) | (hi << _U32(27))
  word_hi = hi >> _U32(5)
  word = bits_from_counters(k0, k1, word_hi, word_lo)
  bit = (word >> (lo & _U32(31))) & _U32(1)
  return np.float32(1.0) - np.float32(2.0) * bit.astype(jnp.float32)


def gaussian_from_counters(k0: Any, k1: Any, hi: jax.Array, lo: jax.Array) -> jax.Array:
  """float32 standard normals for element counters (hi, lo) (element-wise, one Threefry per element)."""
  return normal_from_bits(bits_from_counters(k0, k1, hi, lo), jnp.float32)


def noise_from_counters(k0: Any, k1: Any, hi: jax.Array, lo: jax.Array, kind: str = "gaussian") -> jax.Array:
  """float32 noise of `kind` for element counters (hi, lo); what the Pallas kernel evaluates per tile."""
  if check_kind(kind) == "gaussian":
    return gaussian_from_counters(k0, k1, hi, lo)
  return rademacher_from_counters(k0, k1, hi, lo)


# ----------------------------------------------------------------------------------------------------- public API


def normal(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32, offset: Any = 0) -> jax.Array:
  """Standard normals; element i from counter offset + i. Equals jax.random.normal(key, shape) for float32."""
  return noise(key, shape, dtype, "gaussian", offset)


def rademacher(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32, offset: Any = 0) -> jax.Array:
  """+-1 noise: element i takes bit (c % 32) of the stream word at counter c // 32, c = offset + i; z = 1 - 2 bit.

  One Threefry call serves 32 consecutive elements. (Not jax.random.rademacher's stream, which spends one word per
  element.) A static offset takes the vectorized path; a traced one the element-wise path; both give equal values.
  """
  return noise(key, shape, dtype, "rademacher", offset)


def noise(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32, kind: str = "gaussian",
          offset: Any = 0) -> jax.Array:
  """Noise of `kind` ("gaussian" or "rademacher") over `shape`, element i from counter offset + i.

  Compiled (jax.jit) even when called eagerly: op-by-op execution would skip XLA's fusion (and its FMA contraction)
  and differ from jax.random.normal by up to ~3 ulp; compiled, float32 gaussians equal it bitwise.
  """
  check_kind(kind)
  shape = _check_shape(shape)
  static, dynamic = _split_offset(offset)
  return _noise_jit(key, dynamic, shape=shape, dtype=jnp.dtype(dtype), kind=kind, static_offset=static)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "kind", "static_offset"))
def _noise_jit(key: jax.Array, dynamic_offset: Any, *, shape: tuple[int, ...], dtype: Any, kind: str,
               static_offset: int) -> jax.Array:
  k0, k1 = _single_key_words(key)
  if kind == "rademacher" and dynamic_offset is None:
    return _rademacher_static(k0, k1, shape, static_offset).astype(dtype)
  hi, lo = counters(shape, static_offset if dynamic_offset is None else dynamic_offset)
  return noise_from_counters(k0, k1, hi, lo, kind).astype(dtype)


def _rademacher_static(k0: jax.Array, k1: jax.Array, shape: tuple[int, ...], offset: int) -> jax.Array:
  """float32 Rademacher noise for a static offset with one Threefry word per 32 elements."""
  n = math.prod(shape)
  if n == 0:
    return jnp.zeros(shape, jnp.float32)
  first_word, skip = divmod(offset, 32)
  n_words = (skip + n + 31) // 32
  hi, lo = counters((n_words,), first_word)
  words = bits_from_counters(k0, k1, hi, lo)
  bit = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & _U32(1)
  z = np.float32(1.0) - np.float32(2.0) * bit.astype(jnp.float32).reshape(-1)[skip:skip + n]
  return z.reshape(shape)


def check_float(x: jax.Array) -> None:
  """Raise a ValueError unless `x` has a floating dtype (the only thing a perturbation makes sense on)."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"perturb needs a floating-point array; got dtype {x.dtype}")


def perturb(x: jax.Array, key: jax.Array, scale: Any, kind: str = "gaussian") -> jax.Array:
  """x + scale * z(key), z = noise(key, x.shape, float32, kind); computed in float32, cast back to x.dtype.

  `scale` is a Python float or a traced float32 scalar (e.g. +eps, -2 eps, +eps for MeZO's three calls).
  """
  x = jnp.asarray(x)
  check_float(x)
  check_kind(kind)
  return _perturb_jit(x, key, jnp.asarray(scale, jnp.float32), kind=kind)


@functools.partial(jax.jit, static_argnames=("kind",))
def _perturb_jit(x: jax.Array, key: jax.Array, scale: jax.Array, *, kind: str) -> jax.Array:
  z = _noise_jit(key, None, shape=x.shape, dtype=jnp.dtype(jnp.float32), kind=kind, static_offset=0)
  return (x.astype(jnp.float32) + scale * z).astype(x.dtype)
