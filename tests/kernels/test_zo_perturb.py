"""kernels/zo_perturb: the counter-based Threefry stream equals jax.random's (bits bitwise, normals to the ulp),
tiles are independent (offsets), the noise has the right moments and is uncorrelated across keys / leaves /
clients, and the Pallas kernel (interpret mode) equals the jnp reference bitwise, also under jax.vmap."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry2x32_p

from kernels import zo_perturb
from kernels.zo_perturb import api, pallas_perturb, reference

SHAPES = [(1,), (7,), (3, 37), (1000,), (2, 5, 129), (4, 1, 3), ()]
KERNEL_SHAPES = [(3, 37), (1000,), (2, 5, 129)]
N_STATS = 2 ** 20


def _ulp(a: jax.Array, b: jax.Array) -> int:
  """Largest distance in float32 ulps between two arrays (compared as float32)."""
  a = np.asarray(jnp.asarray(a, jnp.float32)).view(np.int32).astype(np.int64)
  b = np.asarray(jnp.asarray(b, jnp.float32)).view(np.int32).astype(np.int64)
  a = np.where(a < 0, np.int64(-2 ** 31) - a, a)  # monotone integer order across the sign
  b = np.where(b < 0, np.int64(-2 ** 31) - b, b)
  return int(np.abs(a - b).max(initial=0))


def _keys():
  return [jax.random.key(3), jax.random.PRNGKey(7)]


# ----------------------------------------------------------------------------------------------------- the stream


def test_threefry_known_answers_and_jax_primitive():
  # Random123 known-answer vectors for Threefry-2x32, 20 rounds.
  kat = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
         ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
         ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
  for (k0, k1), (x0, x1), expected in kat:
    got = reference.threefry2x32(np.uint32(k0), np.uint32(k1), np.uint32(x0), np.uint32(x1))
    assert tuple(int(v) for v in got) == expected
  rng = np.random.default_rng(0)
  words = [jnp.asarray(rng.integers(0, 2 ** 32, size=(257,), dtype=np.uint32)) for _ in range(4)]
  for ours, theirs in zip(reference.threefry2x32(*words), threefry2x32_p.bind(*words)):
    np.testing.assert_array_equal(ours, theirs)
  # broadcasting: scalar key words, array counters (what bits() does)
  k0, k1 = np.uint32(123), np.uint32(456)
  full = threefry2x32_p.bind(jnp.full((257,), k0), jnp.full((257,), k1), words[2], words[3])
  for ours, theirs in zip(reference.threefry2x32(k0, k1, words[2], words[3]), full):
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
def test_bits_equal_jax_random_bits(shape):
  assert jax.config.jax_threefry_partitionable
  for key in _keys():
    ours, theirs = reference.bits(key, shape), jax.random.bits(key, shape)
    assert ours.shape == theirs.shape and ours.dtype == jnp.uint32
    np.testing.assert_array_equal(ours, theirs)


def test_key_words_typed_raw_and_batched():
  typed = jax.random.key(11)
  k0, k1 = reference.key_words(typed)
  np.testing.assert_array_equal(jnp.stack([k0, k1]), jax.random.key_data(typed))
  raw = jax.random.PRNGKey(11)
  np.testing.assert_array_equal(jnp.stack(reference.key_words(raw)), raw)
  keys = jax.random.split(typed, 4)
  b0, b1 = jax.vmap(reference.key_words)(keys)
  np.testing.assert_array_equal(jnp.stack([b0, b1], -1), jax.random.key_data(keys))
  with pytest.raises(ValueError, match="single key"):
    reference.bits(keys, (3,))
  with pytest.raises(ValueError, match="raw uint32"):
    reference.key_words(jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_uniform_from_bits_equals_jax_uniform(dtype):
  for key in _keys():
    ours = reference.uniform_from_bits(reference.bits(key, (3, 333)), dtype)
    theirs = jax.random.uniform(key, (3, 333), dtype)
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))


def test_normal_equals_jax_random_normal_to_the_ulp():
  worst = 0
  for key in _keys():
    for shape in [(7,), (2, 5, 129), (N_STATS,)]:
      worst = max(worst, _ulp(reference.normal(key, shape), jax.random.normal(key, shape)))
  print(f"max ulp |reference.normal - jax.random.normal| = {worst}")  # 0 on XLA:CPU (jax 0.10.2)
  assert worst <= 2
  # 16-bit dtypes are the float32 normals rounded (not jax's own 16-bit stream)
  key = jax.random.key(5)
  np.testing.assert_array_equal(reference.normal(key, (99,), jnp.bfloat16),
                                jax.random.normal(key, (99,)).astype(jnp.bfloat16))


def test_erfinv_polynomial_matches_lax_erf_inv():
  rng = np.random.default_rng(1)
  u = rng.uniform(-1, 1, size=2 ** 18).astype(np.float32)
  edges = np.array([0.0, -0.0, 1e-30, -1e-7, 0.5, 0.99999994, -0.99999994, 0.9999, 1.0, -1.0], np.float32)
  x = jnp.asarray(np.concatenate([u, edges]))
  ours, theirs = jax.jit(reference.erfinv_f32)(x), jax.jit(jax.lax.erf_inv)(x)
  worst = _ulp(ours, theirs)
  print(f"max ulp |erfinv_f32 - lax.erf_inv| = {worst}")  # 0 on XLA:CPU
  assert worst <= 2
  assert np.isposinf(ours[-2]) and np.isneginf(ours[-1])


# ------------------------------------------------------------------------------------------- offsets (tile independence)


@pytest.mark.parametrize("k", [5, 37])  # within the first 32-bit word / across a word boundary (rademacher)
def test_offset_is_a_shift_of_the_stream(k):
  key, n = jax.random.key(2), 200
  np.testing.assert_array_equal(reference.bits(key, (n,), offset=k), reference.bits(key, (n + k,))[k:])
  traced = jax.jit(lambda o: reference.bits(key, (n,), offset=o))(k)
  np.testing.assert_array_equal(traced, reference.bits(key, (n + k,))[k:])
  for kind in reference.KINDS:
    whole = reference.noise(key, (n + k,), kind=kind)[k:]
    np.testing.assert_array_equal(reference.noise(key, (n,), kind=kind, offset=k), whole)
    traced = jax.jit(lambda o, kind=kind: reference.noise(key, (n,), kind=kind, offset=o))(k)
    np.testing.assert_array_equal(traced, whole)
  # a 2-D tile with an offset is the same slice of the flat stream
  np.testing.assert_array_equal(reference.bits(key, (4, 50), offset=k), reference.bits(key, (n + k,))[k:].reshape(4, 50))


def test_offset_carries_into_the_high_counter_word():
  key = jax.random.key(9)
  offset = 2 ** 32 - 5
  k0, k1 = reference.key_words(key)
  c = np.arange(10, dtype=np.uint64) + offset
  expected = reference.bits_from_counters(k0, k1, jnp.asarray((c >> 32).astype(np.uint32)),
                                          jnp.asarray((c & 0xFFFFFFFF).astype(np.uint32)))
  np.testing.assert_array_equal(reference.bits(key, (10,), offset=offset), expected)
  with pytest.raises(ValueError, match="offset"):
    reference.bits(key, (10,), offset=-1)


def test_rademacher_takes_bit_i_mod_32_of_word_i_div_32():
  key = jax.random.key(4)
  words = np.asarray(reference.bits(key, (3,)))
  expected = np.array([1.0 - 2.0 * ((int(words[i // 32]) >> (i % 32)) & 1) for i in range(96)], np.float32)
  np.testing.assert_array_equal(reference.rademacher(key, (96,)), expected)
  np.testing.assert_array_equal(reference.rademacher(key, (2, 3, 16), jnp.bfloat16),
                                expected.reshape(2, 3, 16).astype(jnp.bfloat16))


# ------------------------------------------------------------------------------------------------------ statistics


def test_gaussian_moments():
  # |mean| < 5 sd(mean) = 5/sqrt(n); |var - 1| < 5 sd(var) = 5 sqrt(2/n) for n = 2**20 normals.
  z = np.asarray(reference.normal(jax.random.key(0), (N_STATS,)), np.float64)
  assert abs(z.mean()) < 5 / np.sqrt(N_STATS)
  assert abs(z.var() - 1) < 5 * np.sqrt(2 / N_STATS)
  assert np.isfinite(z).all()


def test_rademacher_values_and_mean():
  z = np.asarray(reference.rademacher(jax.random.key(0), (N_STATS,)))
  assert set(np.unique(z).tolist()) == {-1.0, 1.0}
  assert abs(z.mean()) < 5 / np.sqrt(N_STATS)


@pytest.mark.parametrize("kind", reference.KINDS)
def test_independence_across_keys_leaves_and_clients(kind):
  # |corr| < 5/sqrt(n) for streams of different keys, of fold_in(key, leaf) and of fold_in(key, client)
  n, key = 2 ** 18, jax.random.key(0)
  other, = jax.random.split(jax.random.key(1), 1)
  pairs = [(key, other), (jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)),
           (jax.random.fold_in(jax.random.fold_in(key, 0), 3), jax.random.fold_in(jax.random.fold_in(key, 1), 3))]
  for a, b in pairs:
    za = np.asarray(reference.noise(a, (n,), kind=kind), np.float64)
    zb = np.asarray(reference.noise(b, (n,), kind=kind), np.float64)
    assert abs(np.corrcoef(za, zb)[0, 1]) < 5 / np.sqrt(n)
  # and two halves of one stream (neighbouring counters) are uncorrelated too
  z = np.asarray(reference.noise(key, (2 * n,), kind=kind), np.float64)
  assert abs(np.corrcoef(z[:n], z[n:])[0, 1]) < 5 / np.sqrt(n)


# ---------------------------------------------------------------------------------------------------------- perturb


def test_reference_perturb_is_x_plus_scale_noise():
  key, x = jax.random.key(8), jnp.linspace(-1, 1, 111, dtype=jnp.float32).reshape(3, 37)
  for kind in reference.KINDS:
    z = reference.noise(key, x.shape, kind=kind)
    np.testing.assert_array_equal(reference.perturb(jnp.zeros_like(x), key, 1.0, kind), z)
    np.testing.assert_array_equal(reference.perturb(x, key, 0.0, kind), x)
    np.testing.assert_allclose(reference.perturb(x, key, 1e-3, kind), x + 1e-3 * z, rtol=1e-6, atol=1e-7)
  xb = x.astype(jnp.bfloat16)
  out = reference.perturb(xb, key, 0.5)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, (xb.astype(jnp.float32) + 0.5 * reference.normal(key, x.shape)).astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="floating-point"):
    reference.perturb(jnp.zeros((3,), jnp.int32), key, 1.0)


@pytest.mark.parametrize("kind", reference.KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_pallas_interpret_equals_reference_bitwise(shape, dtype, kind):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)
  key = jax.random.key(1)
  expected = reference.perturb(x, key, 0.3, kind)
  for block in (256, pallas_perturb.DEFAULT_BLOCK):  # several programs / one program
    got = pallas_perturb.perturb(x, key, 0.3, kind, block=block, interpret=True)
    assert got.shape == x.shape and got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


@pytest.mark.parametrize("kind", reference.KINDS)
def test_pallas_interpret_under_vmap(kind):
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 129)), jnp.float32)
  keys = jax.random.split(jax.random.key(6), 3)
  run = lambda xx, k, s: pallas_perturb.perturb(xx, k, s, kind, block=256, interpret=True)
  got = jax.vmap(run, in_axes=(None, 0, None))(x, keys, 0.1)  # batched keys
  for i in range(3):
    np.testing.assert_array_equal(got[i], reference.perturb(x, keys[i], 0.1, kind))
  xs, scales = jnp.stack([x, 2 * x, -x]), jnp.array([0.1, -0.2, 0.3], jnp.float32)
  got = jax.vmap(run)(xs, keys, scales)  # batched x, keys and scales
  for i in range(3):
    np.testing.assert_array_equal(got[i], reference.perturb(xs[i], keys[i], scales[i], kind))
  raw = jax.random.split(jax.random.PRNGKey(6), 2)  # raw keys
  got = jax.vmap(run, in_axes=(None, 0, None))(x, raw, 0.1)
  for i in range(2):
    np.testing.assert_array_equal(got[i], reference.perturb(x, raw[i], 0.1, kind))


def test_pallas_kernel_lowers_for_triton_and_mosaic_tpu(monkeypatch):
  key, x = jax.random.key(0), jax.ShapeDtypeStruct((3, 1000), jnp.bfloat16)
  for kind in reference.KINDS:
    fn = jax.jit(lambda xx, k, kind=kind: pallas_perturb.perturb(xx, k, 0.1, kind))
    assert "xla.gpu.triton" in fn.trace(x, key).lower(lowering_platforms=("cuda",)).as_text()
  monkeypatch.setattr(pallas_perturb, "_backend", lambda: "tpu")
  fn = jax.jit(lambda xx, k: pallas_perturb.perturb(xx, k, 0.1))
  assert "tpu_custom_call" in fn.trace(x, key).lower(lowering_platforms=("tpu",)).as_text()


# --------------------------------------------------------------------------------------------------------- dispatch


def test_api_impls_agree_and_validate():
  assert api.IMPLS == ("auto", "xla", "pallas", "interpret") and zo_perturb.IMPLS == api.IMPLS
  assert api.resolve_impl(None) == api.resolve_impl("auto") == "xla"  # CPU
  key, x = jax.random.key(12), jnp.asarray(np.random.default_rng(3).normal(size=(5, 77)), jnp.float32)
  for kind in api.KINDS:
    xla = zo_perturb.perturb(x, key, -0.25, kind, impl="xla")
    np.testing.assert_array_equal(zo_perturb.perturb(x, key, -0.25, kind, impl="interpret"), xla)
    np.testing.assert_array_equal(zo_perturb.perturb(x, key, -0.25, kind), xla)
    traced = jax.jit(lambda s, kind=kind: zo_perturb.perturb(x, key, s, kind, impl="interpret"))(-0.25)
    np.testing.assert_array_equal(traced, xla)
    np.testing.assert_array_equal(zo_perturb.noise(key, (5, 77), jnp.float32, kind),
                                  zo_perturb.perturb(jnp.zeros_like(x), key, 1.0, kind, impl="interpret"))
  with pytest.raises(ValueError, match=r"unknown noise kind 'uniform'.*'gaussian', 'rademacher'"):
    zo_perturb.perturb(x, key, 1.0, kind="uniform")
  with pytest.raises(ValueError, match=r"unknown noise kind 'bernoulli'"):
    zo_perturb.noise(key, (3,), jnp.float32, kind="bernoulli")
  with pytest.raises(ValueError, match=r"unknown zo_perturb impl 'cuda'.*'auto', 'xla', 'pallas', 'interpret'"):
    zo_perturb.perturb(x, key, 1.0, impl="cuda")
  with pytest.raises(ValueError, match="power of two"):
    pallas_perturb.perturb(x, key, 1.0, block=100, interpret=True)
  with pytest.raises(ValueError, match="single key"):
    pallas_perturb.perturb(x, jax.random.split(key, 2), 1.0, interpret=True)
  empty = jnp.zeros((0, 4), jnp.float32)
  assert zo_perturb.perturb(empty, key, 1.0, impl="interpret").shape == (0, 4)
