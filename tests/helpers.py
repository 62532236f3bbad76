"""Shared test fixtures: a tiny random Llama with LoRA and random federated batches."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedjax_llm.core.round import CohortData
from fedjax_llm.models import random_llama, tiny_llama_config
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.peft.base import make_lm_loss, split_model


def tiny_lora_model(rank=4, alpha=8.0, seed=0, target=r"(q_proj|v_proj)$", nonzero_b=False, mutable_base=False):
  """(peft, base, trainable, loss_fn) of a tiny random Llama with LoRA.

  ``mutable_base=True`` splits like train.py does for methods that change the frozen
  weights: the kernels of the LoRA-targeted layers join the trainable tree.
  """
  model = random_llama(tiny_llama_config(), seed=seed)
  paths = set(lora_lib.apply_lora(model, target=target, rank=rank, alpha=alpha, seed=seed))
  if mutable_base:
    kernel_filter = lambda path, _: path[-1] == "kernel" and "/".join(str(p) for p in path[:-1]) in paths
    peft, base, trainable = split_model(model, nnx.Any(nnx.LoRAParam, kernel_filter))
  else:
    peft, base, trainable = split_model(model, nnx.LoRAParam)
  if nonzero_b:  # start away from B = 0 so FedIT's aggregation noise is visible
    key = jax.random.key(seed + 7)
    trainable = lora_lib.map_lora(
        lambda m: {**m, "lora_b": 0.05 * jax.random.normal(jax.random.fold_in(key, m["lora_b"].size),
                                                            m["lora_b"].shape)}, trainable)
  return peft, base, trainable, make_lm_loss(peft)


def random_cohort(ids, *, steps=2, batch=2, seq=16, vocab=97, seed=0, num_steps=None):
  ids = np.asarray(ids, np.int32)
  rng = np.random.default_rng(seed)
  c = len(ids)
  tokens = rng.integers(0, vocab, size=(c, steps, batch, seq)).astype(np.int32)
  mask = np.ones((c, steps, batch, seq), np.float32)
  # ragged: client 1 has a shorter last sequence
  if c > 1:
    mask[1, :, -1, seq // 2:] = 0
  mask[ids < 0] = 0
  tokens[ids < 0] = 0
  ns = np.full((c,), steps, np.int32) if num_steps is None else np.asarray(num_steps, np.int32)
  ns = np.where(ids < 0, 0, ns)
  ntok = (mask[..., 1:] * (np.arange(steps)[None, :, None, None] < ns[:, None, None, None])).sum(axis=(1, 2, 3))
  ntok = jnp.asarray(ntok.astype(np.float32))
  return CohortData(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(ns), ntok, ntok)


def sgd(lr=0.1):
  return optax.sgd(lr)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  ja, jb = jax.tree.structure(a), jax.tree.structure(b)
  assert ja == jb, (ja, jb)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def tiny_full_model(seed=0, **config_overrides):
  """(model graphdef, base, trainable, loss_fn) of a tiny random Llama with EVERY parameter trainable
  (full-parameter zeroth-order methods); ``config_overrides`` change the tiny config (e.g. hidden_size)."""
  model = random_llama(tiny_llama_config(**config_overrides), seed=seed)
  peft, base, trainable = split_model(model, nnx.Param)
  return peft, base, trainable, make_lm_loss(peft)
