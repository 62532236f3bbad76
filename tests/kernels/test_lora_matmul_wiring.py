"""The fused LoRA kernel wired into the model's LoRA layers (config ``lora.kernel``) leaves a round's numbers as they
are: the same tiny model, cohort and keys give the same server state and metrics with the XLA branch and with the
Pallas kernel (interpret mode on CPU), up to float32 rounding (the kernel sums x W and s (x a) b in one f32
accumulator instead of two)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_llm.algorithms import fedit, hetlora
from fedjax_llm.core import client_store as store_lib
from fedjax_llm.core.round import build_round
from fedjax_llm.models import random_llama, tiny_llama_config
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.peft.base import make_lm_loss, split_model
from tests.helpers import assert_trees_close, random_cohort


def _model(kernel):
  model = random_llama(tiny_llama_config(num_layers=1), seed=0)
  lora_lib.apply_lora(model, target=r"(q_proj|v_proj)$", rank=4, alpha=8.0, kernel=kernel, seed=0)
  # start away from b = 0 so the low-rank branch contributes to the forward pass from the first step
  peft, base, trainable = split_model(model, nnx.LoRAParam)
  trainable = lora_lib.map_lora(lambda m: {**m, "lora_b": 0.1 * jnp.ones_like(m["lora_b"])}, trainable)
  return peft, base, trainable


def _round(kernel, method):
  peft, base, trainable = _model(kernel)
  loss_fn = make_lm_loss(peft)
  opt = optax.sgd(0.5)
  if method == "fedit":
    alg = fedit(loss_fn, client_optimizer=opt, server_optimizer=optax.sgd(1.0))
  else:  # heterogeneous ranks: rank masks on the factors around the fused op
    alg = hetlora(loss_fn, client_optimizer=opt, server_optimizer=optax.sgd(1.0), client_ranks=np.array([1, 4, 2, 3]),
                  r_max=4, prune_gamma=0.5, prune_lambda=1e-2, lora_scale=2.0)
  ids = np.array([0, 3, 1, 2], np.int32)
  data = random_cohort(ids, steps=2, batch=1, seq=8)
  server = alg.init(trainable, jax.random.key(0))
  store = store_lib.init_store(alg.init_client, trainable, 4)
  server, _, metrics = build_round(alg, chunk_size=2, donate=False)(base, server, store, jnp.asarray(ids), data,
                                                                     jax.random.key(1))
  return server, jax.device_get(metrics)


@pytest.mark.parametrize("method", ["fedit", "hetlora"])
def test_round_numbers_do_not_change_with_the_fused_kernel(method):
  ref_server, ref_metrics = _round("xla", method)
  server, metrics = _round("interpret", method)
  assert_trees_close(server.params, ref_server.params, rtol=1e-5, atol=1e-6)
  for k in ("train_loss", "update_norm", "sum_tokens", "sum_bytes_up"):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5)
  assert float(metrics["update_norm"]) > 0


def test_layer_switch_and_errors():
  assert lora_lib.fused_impl("interpret") == "interpret"
  assert lora_lib.fused_impl("xla") is None and lora_lib.fused_impl("auto") is None  # auto: XLA until benchmarked
  with pytest.raises(ValueError, match="unknown lora_matmul impl 'cuda'"):
    lora_lib.fused_impl("cuda")
  with pytest.raises(ValueError, match="LoRA dropout=0.1 is only applied on the XLA path"):
    lora_lib.apply_lora(random_llama(tiny_llama_config(), seed=0), kernel="interpret", dropout=0.1)
