"""Dispatch for the LoRA matmul y = x W + s ((x a) * mask(rank)) b: XLA reference or Pallas kernel + custom_vjp.

``impl``: "xla" runs reference.py (plain jnp, plain autodiff); "pallas" the compiled kernel (pallas_lora.py) with
the hand-written backward (vjp.py); "interpret" the same kernel under the Pallas interpreter (any backend, what the
CPU tests use). "auto" (or None) is "xla" on every backend for now: the kernel has not been benchmarked on a GPU
or TPU yet, and a kernel earns "auto" only with a measured win over XLA (benchmarks/lora_matmul.py,
docs/benchmarks.md).

``lora_matmul_cohort`` is the multi-client form: jax.vmap of the single-client op over clients with W unmapped,
so the Pallas grid gets a client axis and every client reads the one shared W (tests check in the jaxpr that the
pallas_call's W operand keeps its [K, N] shape).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kernels import dispatch
from kernels.lora_matmul import reference, vjp

IMPLS = dispatch.IMPLS


def resolve_impl(impl: str | None) -> str:
  """The concrete impl ("xla", "pallas" or "interpret") for `impl`; a ValueError names unknown ones.

  "auto" is "xla" on every backend: no measured win for the kernel yet (see the module docstring)."""
  return dispatch.resolve_impl(impl, "lora_matmul", pallas_on_accelerators=False)


def lora_matmul(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: Any, rank: Any = None,
                impl: str | None = "auto", *, blocks: tuple[int, int, int] | None = None) -> jax.Array:
  """x @ w + scale * ((x @ a) * mask(rank)) @ b, shape [..., N], in x.dtype (numerics: reference.py).

  Args:
    x: [..., K] activations (any leading dims); its dtype is the compute dtype.
    w: [K, N] shared base weight (frozen or not: its gradient is exact, and removed by XLA when unused).
    a: [K, R] and b: [R, N]: one client's LoRA factors, R = r_max.
    scale: Python float or traced float32 scalar (alpha / r).
    rank: None (all R components) or an integer scalar in [0, R] (traced is fine; a concrete one is checked).
    impl: None/"auto", "xla", "pallas" or "interpret" (module docstring).
    blocks: (bm, bn, bk) caps for the kernel on GPU / interpret (powers of two); None for the defaults.
  """
  impl = resolve_impl(impl)
  x, w, a, b = (jnp.asarray(t) for t in (x, w, a, b))
  reference.check_args(x, w, a, b, rank)
  if impl == "xla":
    return reference.lora_matmul(x, w, a, b, scale, rank)
  mask = reference.rank_mask(a.shape[1], rank, x.dtype)
  return vjp.lora_matmul(x, w, a, b, scale, mask, interpret=impl == "interpret", blocks=blocks)


def lora_matmul_cohort(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: Any, rank: Any = None,
                       impl: str | None = "auto", *, blocks: tuple[int, int, int] | None = None) -> jax.Array:
  """A cohort of C clients sharing w: jax.vmap of ``lora_matmul`` with w unmapped.

  Args:
    x: [C, ..., K]; a: [C, K, R]; b: [C, R, N]; w: [K, N] (shared).
    scale: [C] (or a scalar, shared); rank: [C] integers, a scalar (shared), or None.
    impl, blocks: as ``lora_matmul``.

  Returns:
    [C, ..., N].
  """
  x, w, a, b = (jnp.asarray(t) for t in (x, w, a, b))
  if x.ndim < 2 or a.ndim != 3 or b.ndim != 3 or not x.shape[0] == a.shape[0] == b.shape[0]:
    raise ValueError(f"lora_matmul_cohort expects x [C, ..., K], a [C, K, R], b [C, R, N], w [K, N] with one C; "
                     f"got x {tuple(x.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}, w {tuple(w.shape)}")
  c = x.shape[0]
  reference.check_args(x[0], w, a[0], b[0])
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (c,))
  if rank is not None:
    rank = jnp.asarray(rank)
    if rank.ndim > 1 or not jnp.issubdtype(rank.dtype, jnp.integer):
      raise ValueError(f"lora_matmul_cohort: rank must be None or integers of shape [C] or []; "
                       f"got {rank.dtype}{list(rank.shape)}")
    rank = jnp.broadcast_to(rank, (c,))
    r = reference.concrete(rank)
    if r is not None and r.size and not (0 <= int(r.min()) and int(r.max()) <= a.shape[2]):
      raise ValueError(f"lora_matmul_cohort: ranks {r.tolist()} must lie in [0, R={a.shape[2]}] "
                       f"for a {tuple(a.shape)}")
  fn = lambda xc, ac, bc, sc, rc: lora_matmul(xc, w, ac, bc, sc, rc, impl, blocks=blocks)  # noqa: E731
  return jax.vmap(fn, in_axes=(0, 0, 0, 0, None if rank is None else 0))(x, a, b, scale, rank)
