"""LoRA: targeting, parameter counts, zero effect at init, rank masks, dropout, split/merge."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_llm.models import random_llama, tiny_llama_config
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.peft.base import make_lm_loss, split_model, token_nll


def _model():
  return random_llama(tiny_llama_config(), seed=0)  # d=32, 2 layers, 4 heads x 8, 2 kv heads x 8


def test_targets_and_trainable_count_by_hand():
  m = _model()
  paths = lora_lib.apply_lora(m, target=r"(q_proj|v_proj)$", rank=4, alpha=8.0)
  assert paths == [f"model/layers/{i}/self_attn/{p}" for i in range(2) for p in ("q_proj", "v_proj")]
  peft, base, trainable = split_model(m, nnx.LoRAParam)
  # q: a 32x4 + b 4x32 = 256; v: a 32x4 + b 4x16 = 192; two layers
  assert sum(x.size for x in jax.tree.leaves(trainable)) == 2 * (256 + 192)
  # the base has no LoRA leaf and all the model's kernels
  base_paths = ["/".join(str(k.key) for k in p if hasattr(k, "key")) for p, _ in jax.tree_util.tree_leaves_with_path(base)]
  assert not any("lora" in p for p in base_paths)
  assert sum("kernel" in p for p in base_paths) == 2 * 7
  mods = dict(lora_lib.lora_modules(trainable))
  assert set(mods) == {f"model/layers/{i}/self_attn/{p}/lora" for i in range(2) for p in ("q_proj", "v_proj")}
  assert lora_lib.max_rank(trainable) == 4


def test_zero_b_leaves_outputs_unchanged_and_merge_roundtrips():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 12)), jnp.int32)
  ref = _model()(tokens)
  m = _model()
  lora_lib.apply_lora(m, target=r"proj$", rank=3)  # every projection
  peft, base, trainable = split_model(m, nnx.LoRAParam)
  np.testing.assert_allclose(peft.apply(base, trainable, tokens), ref, rtol=1e-6, atol=1e-6)
  # a non-zero B changes the output exactly by s * x a b at that layer
  t2 = lora_lib.map_lora(lambda mod: {**mod, "lora_b": mod["lora_b"] + 0.1}, trainable)
  assert float(jnp.max(jnp.abs(peft.apply(base, t2, tokens) - ref))) > 1e-3


def test_lora_branch_formula_and_scale():
  layer = lora_lib.LoRA(5, 3, rank=2, alpha=6.0, rngs=nnx.Rngs(params=0))
  layer.lora_b[...] = jnp.arange(6.0).reshape(2, 3)
  x = jnp.ones((4, 5))
  expected = 3.0 * (x @ layer.lora_a[...]) @ layer.lora_b[...]  # s = alpha / r = 3
  np.testing.assert_allclose(layer(x), expected, rtol=1e-6)
  bound = 1 / np.sqrt(5)
  assert float(jnp.max(jnp.abs(layer.lora_a[...]))) <= bound


def test_dropout_only_with_a_key_and_rescales():
  layer = lora_lib.LoRA(64, 8, rank=4, alpha=4.0, dropout=0.5, rngs=nnx.Rngs(params=0))
  layer.lora_a[...] = jnp.ones((64, 4))
  layer.lora_b[...] = jnp.ones((4, 8))
  x = jnp.ones((1000, 64))  # no dropout: every output is 64 * 4 = 256
  no_key = layer(x)
  np.testing.assert_allclose(no_key, (x @ layer.lora_a[...]) @ layer.lora_b[...], rtol=1e-6)
  with_key = layer(x, dropout_key=jax.random.key(0))
  assert not np.allclose(with_key, no_key)
  np.testing.assert_allclose(no_key, 256.0)
  # inverted dropout keeps the mean: E[2 * Binomial(64, 1/2)] * 4 = 256 (std of the mean ~ 1 here)
  np.testing.assert_allclose(with_key.mean(), 256.0, rtol=0.02)


def test_rank_mask_blocks_gradients_outside_rank():
  m = _model()
  lora_lib.apply_lora(m, rank=4)
  peft, base, trainable = split_model(m, nnx.LoRAParam)
  trainable = lora_lib.map_lora(lambda mod: {**mod, "lora_b": mod["lora_b"] + 0.05}, trainable)
  loss = make_lm_loss(peft)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 10)), jnp.int32)
  g = jax.grad(lambda p: loss(base, lora_lib.rank_mask(p, 2), tokens, jnp.ones((2, 10)), None)[0])(trainable)
  for _, mod in lora_lib.lora_modules(g):
    assert float(jnp.abs(mod["lora_a"][:, 2:]).max()) == 0.0 and float(jnp.abs(mod["lora_b"][2:]).max()) == 0.0
    assert float(jnp.abs(mod["lora_a"][:, :2]).max()) > 0.0 and float(jnp.abs(mod["lora_b"][:2]).max()) > 0.0
  np.testing.assert_allclose(lora_lib.delta_sq_norm({"lora_a": jnp.eye(3)[:, :2], "lora_b": jnp.ones((2, 4))}, 2.0),
                             4.0 * 8.0, rtol=1e-6)


def test_no_matching_layer_and_bad_rank_are_clear_errors():
  with pytest.raises(ValueError, match=r"matched no linear layer; layers are: .*q_proj"):
    lora_lib.apply_lora(_model(), target="query$")
  with pytest.raises(ValueError, match="LoRA rank must be a positive integer, got 0"):
    lora_lib.apply_lora(_model(), rank=0)
  with pytest.raises(ValueError, match="selected no parameters"):
    split_model(_model(), nnx.LoRAParam)


def test_token_nll_by_hand():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
  tokens = jnp.array([[0, 1, 0]])
  s, c = token_nll(logits, tokens, jnp.array([[1.0, 1.0, 0.0]]))  # only target t=1 counts
  np.testing.assert_allclose(s, -np.log(0.5), rtol=1e-6)
  assert float(c) == 1.0
