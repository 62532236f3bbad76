"""Basic Flax NNX layers for the LLM models: Linear (with a LoRA hook), RMSNorm, Embed.

Conventions
-----------
* Parameters are stored in ``param_dtype`` (float32 by default) and cast to the
  compute ``dtype`` inside ``__call__`` (mixed precision: params f32, matmuls bf16).
* ``Linear.kernel`` has shape ``[in_features, out_features]`` (``y = x @ kernel``),
  i.e. the transpose of a torch / Hugging Face ``weight``.
* float32 matmuls use JAX's default precision (exact on CPU; TF32 may be used on
  GPUs unless ``jax_default_matmul_precision`` is set to ``"highest"``).
* ``Linear.lora`` starts as ``None`` and may later be replaced by any module with a
  ``__call__(x, *, dropout_key=None)`` returning ``[..., out_features]``; its output
  is added to the base projection. The attribute is declared with ``nnx.data`` so
  that flax>=0.12 allows assigning a Module to it after construction. A LoRA branch whose
  ``fused_impl`` is set ("pallas" / "interpret") computes ``x W + s (x a) b`` as one op instead
  (``kernels/lora_matmul``) whenever the output dtype is the compute dtype (else the two-term path
  below runs); the bias is added after it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any

DEFAULT_INIT_STD = 0.02


def canonical_dtype(dtype: Any) -> jnp.dtype:
    """``"bfloat16"`` / ``jnp.bfloat16`` / ``np.dtype`` -> ``jnp.dtype``."""
    if isinstance(dtype, str):
        aliases = {"bf16": "bfloat16", "f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16"}
        dtype = aliases.get(dtype, dtype)
    return jnp.dtype(dtype)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias) (+ lora(x))``.

    Args:
      in_features, out_features: sizes.
      use_bias: add a bias ``[out_features]`` (zeros at init).
      dtype: compute dtype (inputs and kernel are cast to it; output is in it).
      param_dtype: storage dtype of kernel / bias.
      init_std: std of the normal kernel initializer.
      rngs: ``nnx.Rngs`` (uses the ``params`` stream).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        init_std: float = DEFAULT_INIT_STD,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = canonical_dtype(dtype)
        self.param_dtype = canonical_dtype(param_dtype)
        self.kernel = nnx.Param(
            init_std * jax.random.normal(rngs.params(), (in_features, out_features), self.param_dtype)
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), self.param_dtype)) if use_bias else None
        # nnx.data: the attribute is a pytree-data slot, so a LoRA Module can be assigned later.
        self.lora = nnx.data(None)

    def __call__(
        self, x: jax.Array, *, dropout_key: jax.Array | None = None, out_dtype: Dtype | None = None
    ) -> jax.Array:
        """``x [..., in] -> [..., out]`` in ``out_dtype`` (default: the compute dtype).

        ``dropout_key`` is only forwarded to ``self.lora`` (the base projection is deterministic).
        """
        dt = self.dtype
        od = dt if out_dtype is None else canonical_dtype(out_dtype)
        fused = getattr(self.lora, "fused_impl", None)
        if fused is not None and od == dt:
            # x W + s (x a) b in one op (kernels/lora_matmul: Pallas kernel + custom_vjp); same numerics as below.
            from kernels.lora_matmul import api as lora_matmul

            y = lora_matmul.lora_matmul(x.astype(dt), self.kernel[...], self.lora.lora_a[...],
                                        self.lora.lora_b[...], self.lora.scale, impl=fused)
            return y if self.bias is None else y + self.bias[...].astype(od)
        kernel = self.kernel[...].astype(dt)
        if dt == jnp.float32:
            y = jnp.matmul(x.astype(dt), kernel)
        else:
            # low-precision inputs, float32 accumulation
            y = jnp.einsum("...i,io->...o", x.astype(dt), kernel, preferred_element_type=jnp.float32)
        y = y.astype(od)
        if self.bias is not None:
            y = y + self.bias[...].astype(od)
        if self.lora is not None:
            y = y + self.lora(x, dropout_key=dropout_key).astype(od)
        return y


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in float32; returns ``x.dtype``."""

    def __init__(self, features: int, *, eps: float = 1e-6, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init (ones); accepted for a uniform constructor signature
        self.features = features
        self.eps = float(eps)
        self.weight = nnx.Param(jnp.ones((features,), canonical_dtype(param_dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(var + self.eps) * self.weight[...].astype(jnp.float32)
        return y.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table ``[vocab, d]``; ``attend`` gives tied-head logits ``x @ E^T``."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        init_std: float = DEFAULT_INIT_STD,
        rngs: nnx.Rngs,
    ):
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = canonical_dtype(dtype)
        self.param_dtype = canonical_dtype(param_dtype)
        self.embedding = nnx.Param(
            init_std * jax.random.normal(rngs.params(), (num_embeddings, features), self.param_dtype)
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Gather rows; result in ``param_dtype`` (the caller decides the residual dtype)."""
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attend(self, x: jax.Array, *, out_dtype: Dtype = jnp.float32) -> jax.Array:
        """``x @ embedding.T`` in the compute dtype with float32 accumulation -> ``out_dtype``."""
        dt = self.dtype
        emb = self.embedding[...].astype(dt)
        if dt == jnp.float32:
            y = jnp.einsum("...d,vd->...v", x.astype(dt), emb)
        else:
            y = jnp.einsum("...d,vd->...v", x.astype(dt), emb, preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
