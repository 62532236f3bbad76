"""The Pallas kernels compiled for a real GPU/TPU against their XLA references (skipped on CPU, where CI runs).

On CPU the kernels are validated in interpret mode (test_lora_matmul.py, test_zo_perturb.py). This file is what
a machine with an accelerator runs (``scripts/gpu_check.sh``): the same comparisons with the compiled kernels.
Tolerances: float32 matmuls on a GPU run in TF32 by default, in XLA's dots and in Triton's alike (10-bit
mantissa), so float32 results are compared to float64 at 5e-3 of the output's scale; bfloat16 at 2^-6 as in the
interpret tests; Rademacher noise is exact integer logic (bitwise), Gaussian noise within a few ulp (libdevice's
log may differ from XLA's by an ulp), so x + 1e-3 z agrees to an ulp of the result.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.lora_matmul import api as lm
from kernels.zo_perturb import api as zo

pytestmark = pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"),
                                reason="needs a GPU/TPU: the compiled Pallas kernels (CPU runs them in interpret mode)")

TOL = {jnp.float32: 5e-3, jnp.bfloat16: 2.0 ** -6}


def _data(m, k, n, r, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.float32)
  a = jnp.asarray(rng.normal(size=(k, r)) / np.sqrt(k), jnp.float32)
  b = jnp.asarray(rng.normal(size=(r, n)), jnp.float32)
  return x, w, a, b


def _close(got, want, dtype, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.abs(got - want).max() <= TOL[dtype] * np.abs(want).max(), (what, np.abs(got - want).max(),
                                                                       np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n,r,rank", [(1024, 576, 576, 16, 8), (1024, 576, 192, 16, 16), (100, 37, 45, 5, 3)])
def test_lora_matmul_kernel_values_and_vjps_on_device(dtype, m, k, n, r, rank):
  x, w, a, b = _data(m, k, n, r, dtype)
  mask = (np.arange(r) < rank).astype(np.float64)
  want = (np.asarray(x, np.float64) @ np.asarray(w, np.float64)
          + 2.0 * ((np.asarray(x, np.float64) @ np.asarray(a, np.float64)) * mask) @ np.asarray(b, np.float64))
  outs = {}
  for impl in ("xla", "pallas"):
    fn = jax.jit(lambda x, w, a, b, s, impl=impl: lm.lora_matmul(x, w, a, b, s, rank, impl=impl))
    y, vjp = jax.vjp(fn, x, w, a, b, jnp.float32(2.0))
    dy = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), y.dtype)
    outs[impl] = (y, *vjp(dy))
  _close(outs["pallas"][0], want, dtype, "y vs float64")
  for i, name in enumerate(("y", "dx", "dw", "da", "db")):
    _close(outs["pallas"][i], outs["xla"][i], dtype, f"{name}: pallas vs xla")
  da = np.asarray(outs["pallas"][3], np.float32)
  assert not np.any(da[:, rank:]), "gradient outside the client's rank"


def test_lora_matmul_cohort_on_device():
  c, m, k, n, r = 8, 256, 576, 192, 16
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(c, m, k)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.float32)
  a = jnp.asarray(rng.normal(size=(c, k, r)) / np.sqrt(k), jnp.float32)
  b = jnp.asarray(rng.normal(size=(c, r, n)), jnp.float32)
  ranks = jnp.asarray([1, 16, 4, 8, 2, 16, 12, 3], jnp.int32)
  s = jnp.full((c,), 2.0, jnp.float32)
  got = jax.jit(lambda *t: lm.lora_matmul_cohort(*t, impl="pallas"))(x, w, a, b, s, ranks)
  want = jax.jit(lambda *t: lm.lora_matmul_cohort(*t, impl="xla"))(x, w, a, b, s, ranks)
  _close(got, want, jnp.bfloat16, "cohort")


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zo_perturb_kernel_on_device(kind, dtype):
  x = jnp.asarray(np.random.default_rng(3).normal(size=(576, 1536)), dtype)
  key = jax.random.key(5)
  got = jax.jit(lambda x: zo.perturb(x, key, 1e-3, kind, impl="pallas"))(x)
  want = jax.jit(lambda x: zo.perturb(x, key, 1e-3, kind, impl="xla"))(x)
  if kind == "rademacher":
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  else:  # z within a few ulp, then x + 1e-3 z rounded (maybe with an FMA on one side): an ulp of the result
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    ulp = float(jnp.finfo(dtype).eps) * np.maximum(np.abs(want), 1e-3)
    assert np.all(np.abs(got - want) <= 2 * ulp + 1e-3 * 8 * 2.0 ** -23 * 6), np.abs(got - want).max()


def test_round_numbers_with_the_compiled_kernel():
  """The wiring test of test_lora_matmul_wiring.py with the compiled kernel instead of the interpreter."""
  from tests.kernels.test_lora_matmul_wiring import _round
  ref_server, ref_metrics = _round("xla", "fedit")
  server, metrics = _round("pallas", "fedit")
  for x, y in zip(jax.tree.leaves(server.params), jax.tree.leaves(ref_server.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=5e-3, atol=5e-4)
  np.testing.assert_allclose(metrics["train_loss"], ref_metrics["train_loss"], rtol=1e-3)
