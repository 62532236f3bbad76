"""The ``impl`` switch every kernel's api.py shares: "auto" (None), "xla", "pallas" or "interpret"."""
from __future__ import annotations

import jax

IMPLS = ("auto", "xla", "pallas", "interpret")


def resolve_impl(impl: str | None, op: str, *, pallas_on_accelerators: bool) -> str:
  """The concrete impl ("xla", "pallas" or "interpret") of kernel ``op``; a ValueError names unknown ones.

  "auto" picks the Pallas kernel on GPU/TPU backends when ``pallas_on_accelerators`` (the op's kernel has earned
  it), else the XLA reference.
  """
  if impl is None:
    impl = "auto"
  if impl not in IMPLS:
    raise ValueError(f"unknown {op} impl {impl!r}; expected None or one of {IMPLS}")
  if impl == "auto":
    return "pallas" if pallas_on_accelerators and jax.default_backend() in ("gpu", "tpu") else "xla"
  return impl
