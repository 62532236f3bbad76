"""Dispatch for the zeroth-order perturbation x + scale * z(key): XLA reference or Pallas kernel.

``impl``: "auto" (or None) runs the Pallas kernel on GPU/TPU backends and the jnp reference (XLA) on CPU; "xla"
the reference; "pallas" the compiled kernel; "interpret" the kernel under the Pallas interpreter (any backend, what
the CPU tests use). Every impl draws the same stream: Threefry-2x32 of (key, element counter), see reference.py.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from kernels import dispatch
from kernels.zo_perturb import pallas_perturb, reference

IMPLS = dispatch.IMPLS
KINDS = reference.KINDS


def resolve_impl(impl: str | None) -> str:
  """The concrete impl ("xla", "pallas" or "interpret") for `impl`; a ValueError names unknown ones."""
  return dispatch.resolve_impl(impl, "zo_perturb", pallas_on_accelerators=True)


def perturb(x: jax.Array, key: jax.Array, scale: Any, kind: str = "gaussian", impl: str | None = None) -> jax.Array:
  """x + scale * z, z = noise(key, x.shape, float32, kind), computed in float32 and cast back to x.dtype.

  Args:
    x: floating array (one leaf; fold the leaf index into the key for the next one).
    key: one threefry key, typed (jax.random.key) or raw (jax.random.PRNGKey); vmap for several.
    scale: Python float or traced float32 scalar.
    kind: "gaussian" or "rademacher".
    impl: None/"auto", "xla", "pallas" or "interpret" (see the module docstring).
  """
  reference.check_kind(kind)
  impl = resolve_impl(impl)
  if impl == "xla":
    return reference.perturb(x, key, scale, kind)
  return pallas_perturb.perturb(x, key, scale, kind, interpret=impl == "interpret")


def noise(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32, kind: str = "gaussian") -> jax.Array:
  """The noise itself, materialized (the jnp reference on every backend): what perturb adds, for scale 1."""
  return reference.noise(key, shape, dtype, kind)
