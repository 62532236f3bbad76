"""LoRA (Hu et al., 2021, arXiv:2106.09685) as NNX modules and pure pytree helpers.

A targeted linear layer computes ``y = x W + s (dropout(x) a) b`` with the frozen
``W`` [d_in, d_out], trainable ``a`` [d_in, r_max] (uniform(+-1/sqrt(d_in)) init)
and ``b`` [r_max, d_out] (zero init), ``s = alpha / r``. In the notation of
``methods.md`` (``W + s B A`` acting on column vectors) ``A = a^T`` and ``B = b^T``.

Heterogeneous ranks share one static shape: every client holds ``r_max`` columns
and a rank ``r_k <= r_max`` is a mask (``rank_mask``) that zeroes ``a[:, r_k:]``
and ``b[r_k:, :]``. Masking the factors *before* the forward pass also zeroes
their gradients, so a client never trains outside its rank.
"""
from __future__ import annotations

import re
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_llm.types import Array


class LoRA(nnx.Module):
  """The low-rank branch ``s * (dropout(x) @ lora_a) @ lora_b`` of one linear layer."""

  def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
               dropout: float = 0.0, kernel: str = "xla", rngs: nnx.Rngs):
    bound = 1.0 / float(in_features) ** 0.5  # HF PEFT's kaiming_uniform(a=sqrt(5)) bound
    self.lora_a = nnx.LoRAParam(
        jax.random.uniform(rngs.params(), (in_features, rank), jnp.float32, -bound, bound))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), jnp.float32))
    self.scale = float(alpha) / float(rank)
    self.dropout = float(dropout)
    # The host Linear computes x W + s (x a) b with kernels/lora_matmul when this is set (a static string).
    self.fused_impl = fused_impl(kernel, dropout)

  def __call__(self, x: Array, *, dropout_key: Array | None = None) -> Array:
    if self.dropout > 0.0 and dropout_key is not None:
      keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
    a = self.lora_a[...].astype(x.dtype)
    b = self.lora_b[...].astype(x.dtype)
    return ((x @ a) @ b) * jnp.asarray(self.scale, x.dtype)


def fused_impl(kernel: str, dropout: float = 0.0) -> str | None:
  """The lora_matmul impl the layer fuses with ("pallas" / "interpret"), or None for the plain XLA branch.

  ``kernel``: "xla" (the branch below, added to the base projection), "pallas", "interpret" (the Pallas kernel
  under the interpreter: tests) or "auto" (what kernels/lora_matmul/api.py picks for this backend).
  """
  from kernels.lora_matmul import api
  impl = api.resolve_impl(kernel)  # ValueError naming the allowed ones
  if impl == "xla":
    return None
  if dropout > 0.0:
    raise ValueError(f"LoRA dropout={dropout} is only applied on the XLA path; the fused kernel ({kernel!r}) has "
                     f"no dropout: use lora kernel 'xla' or dropout 0")
  return impl


def _linear_layers(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and hasattr(node, "kernel") and hasattr(node, "lora"):
      yield "/".join(str(p) for p in path), node


def apply_lora(model: nnx.Module, *, target: str = r"(q_proj|v_proj)$", rank: int = 8,
               alpha: float = 16.0, dropout: float = 0.0, kernel: str = "xla", seed: int = 0) -> list[str]:
  """Attach a LoRA branch to every linear layer whose path matches ``target``.

  ``kernel`` picks how the layer computes x W + s (x a) b: "xla" (plain jnp, the default), "pallas" /
  "interpret" (kernels/lora_matmul, one fused op with its own backward) or "auto" (the backend's choice).

  Returns the matched paths. Raises ``ValueError`` naming the available layers
  when nothing matches, and when ``rank`` is not a positive integer.
  """
  if int(rank) != rank or rank < 1:
    raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
  fused_impl(kernel, dropout)  # fail before touching the model
  pattern = re.compile(target)
  layers = list(_linear_layers(model))
  matched = [(p, m) for p, m in layers if pattern.search(p)]
  if not matched:
    names = sorted({re.sub(r"/\d+/", "/<i>/", p) for p, _ in layers})
    raise ValueError(f"LoRA target regex {target!r} matched no linear layer; layers are: {', '.join(names)}")
  rngs = nnx.Rngs(params=seed)
  for _, layer in matched:
    d_in, d_out = layer.kernel.shape
    layer.lora = nnx.data(LoRA(d_in, d_out, rank=rank, alpha=alpha, dropout=dropout, kernel=kernel, rngs=rngs))
  return [p for p, _ in matched]


def lora_modules(tree: dict, prefix: str = "") -> Iterator[tuple[str, dict]]:
  """Yield (path, {'lora_a', 'lora_b'}) for every LoRA module in a trainable tree."""
  if isinstance(tree, dict):
    if "lora_a" in tree and "lora_b" in tree:
      yield prefix, tree
      return
    for k in sorted(tree):
      yield from lora_modules(tree[k], f"{prefix}/{k}" if prefix else str(k))


def map_lora(fn, tree: dict) -> dict:
  """Rebuild ``tree`` with every LoRA module dict ``m`` replaced by ``fn(m)``; other leaves kept."""
  if isinstance(tree, dict):
    if "lora_a" in tree and "lora_b" in tree:
      return fn(tree)
    return {k: map_lora(fn, v) for k, v in tree.items()}
  return tree


def rank_vector(r_max: int, rank) -> Array:
  """float32 [r_max]: 1 for the first ``rank`` components, else 0 (rank may be traced)."""
  return (jnp.arange(r_max) < rank).astype(jnp.float32)


def rank_mask(tree: dict, rank) -> dict:
  """Zero every LoRA module outside rank ``rank``: a[:, rank:] = 0, b[rank:, :] = 0."""
  def f(m):
    v = rank_vector(m["lora_a"].shape[-1], rank)
    return {**m, "lora_a": m["lora_a"] * v[None, :].astype(m["lora_a"].dtype),
            "lora_b": m["lora_b"] * v[:, None].astype(m["lora_b"].dtype)}
  return map_lora(f, tree)


def max_rank(tree: dict) -> int:
  ranks = {m["lora_a"].shape[-1] for _, m in lora_modules(tree)}
  if len(ranks) != 1:
    raise ValueError(f"expected one r_max across LoRA modules, found {sorted(ranks)}")
  return ranks.pop()


def lora_num_params(tree: dict, rank) -> Array:
  """Number of LoRA parameters a client of rank ``rank`` holds (a[:, :r] and b[:r, :])."""
  total = jnp.zeros((), jnp.float32)
  for _, m in lora_modules(tree):
    d_in, d_out = m["lora_a"].shape[0], m["lora_b"].shape[1]
    total = total + jnp.asarray(rank, jnp.float32) * (d_in + d_out)
  return total


def delta_sq_norm(m: dict, scale: float = 1.0) -> Array:
  """||scale * a @ b||_F^2 of one module, via the r x r Gram matrices (never forms d_in x d_out)."""
  a, b = m["lora_a"].astype(jnp.float32), m["lora_b"].astype(jnp.float32)
  return (scale ** 2) * jnp.sum((a.T @ a) * (b @ b.T))


def delta(m: dict, scale: float = 1.0) -> Array:
  """The dense update ``scale * a @ b`` [d_in, d_out] of one LoRA module (= (s B A)^T)."""
  return scale * (m["lora_a"].astype(jnp.float32) @ m["lora_b"].astype(jnp.float32))


def select_factors(tree: dict, keys) -> dict:
  """Keep only the listed factors (e.g. ``("lora_b",)``) of every LoRA module; the rest of the tree as is."""
  keys = (keys,) if isinstance(keys, str) else tuple(keys)
  return map_lora(lambda m: {k: m[k] for k in keys}, tree)


def merge_trees(a: dict, b: dict) -> dict:
  """Deep union of two nested dicts with disjoint leaves (e.g. trained and frozen factors, LoRA and kernels)."""
  if not isinstance(a, dict) or not isinstance(b, dict):
    raise ValueError("merge_trees: both trees hold a leaf at the same path")
  out = dict(a)
  for k, v in b.items():
    out[k] = merge_trees(a[k], v) if k in a else v
  return out


def _is_kernel_module(tree) -> bool:
  return isinstance(tree, dict) and "kernel" in tree and "lora" in tree


def split_kernels(tree: dict) -> tuple[dict, dict]:
  """Split a mutable-base trainable tree into (LoRA factors, frozen kernels of the LoRA-targeted layers).

  In such a tree a targeted layer reads ``{"kernel": W [d_in, d_out], "lora": {"lora_a", "lora_b"}}``;
  ``merge_trees(lora, kernels)`` puts it back together.
  """
  if not isinstance(tree, dict):
    return tree, {}
  if _is_kernel_module(tree):
    rest = {k: v for k, v in tree.items() if k != "kernel"}
    return rest, {"kernel": tree["kernel"]}
  lora, kern = {}, {}
  for k, v in tree.items():
    l, w = split_kernels(v)
    if isinstance(v, dict):
      if l:
        lora[k] = l
      if w:
        kern[k] = w
    else:
      lora[k] = v
  return lora, kern


def map_kernels(fn, kernels: dict, lora_tree: dict) -> dict:
  """New kernels ``fn(W, lora_module)`` for every targeted layer (trees from ``split_kernels``)."""
  if isinstance(kernels, dict) and "kernel" in kernels:
    return {"kernel": fn(kernels["kernel"], lora_tree["lora"])}
  return {k: map_kernels(fn, v, lora_tree[k]) for k, v in kernels.items()}


def random_a(key: Array, m: dict) -> dict:
  """A fresh LoRA restart of one module: ``a`` ~ uniform(+-1/sqrt(d_in)) (as at init), ``b`` = 0."""
  d_in = m["lora_a"].shape[0]
  bound = 1.0 / float(d_in) ** 0.5
  a = jax.random.uniform(key, m["lora_a"].shape, jnp.float32, -bound, bound).astype(m["lora_a"].dtype)
  return {**m, "lora_a": a, "lora_b": jnp.zeros_like(m["lora_b"])}


def reinit_lora(tree: dict, key: Array) -> dict:
  """Restart every LoRA module (``random_a``), each module with its own key folded from ``key``."""
  mods = [p for p, _ in lora_modules(tree)]
  index = {p: i for i, p in enumerate(mods)}

  def go(t, prefix):
    if isinstance(t, dict):
      if "lora_a" in t and "lora_b" in t:
        return random_a(jax.random.fold_in(key, index[prefix]), t)
      return {k: go(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in t.items()}
    return t

  return go(tree, "")
