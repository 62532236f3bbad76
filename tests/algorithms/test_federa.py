"""FeDeRA: SVD initialization (best rank-r approximation, residual kernel), then FedIT."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import federa as federa_config
from fedjax_llm import train
from fedjax_llm.algorithms import common, fedit
from fedjax_llm.algorithms.federa import federa, svd_factors, svd_init
from fedjax_llm.core.algorithm import init_server_state
from fedjax_llm.core.round import build_round
from fedjax_llm.peft import lora as lora_lib
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import assert_trees_close, random_cohort, tiny_lora_model


def _layers(kernels, lora):
  """[(W, lora module)] of every targeted layer, in a fixed order."""
  out = []

  def go(k, l):
    if "kernel" in k:
      out.append((k["kernel"], l["lora"]))
      return
    for key in sorted(k):
      go(k[key], l[key])
  go(kernels, lora)
  return out


def test_svd_init_by_hand_on_a_diagonal_matrix():
  """W0 = diag(3, 2, 1) (4 x 3), r = 2, s = 2: a = b^T = diag(sqrt(1.5), 1), residual diag(0, 0, 1)."""
  w = jnp.zeros((4, 3)).at[0, 0].set(3.0).at[1, 1].set(2.0).at[2, 2].set(1.0)
  kernels = {"l": {"kernel": w}}
  lora = {"l": {"lora": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}}
  new_k, new_l = svd_init(kernels, lora, 2.0, "residual")
  a, b = new_l["l"]["lora"]["lora_a"], new_l["l"]["lora"]["lora_b"]
  np.testing.assert_allclose(a, [[math.sqrt(1.5), 0], [0, 1], [0, 0], [0, 0]], atol=1e-6)
  np.testing.assert_allclose(b, [[math.sqrt(1.5), 0, 0], [0, 1, 0]], atol=1e-6)
  np.testing.assert_allclose(new_k["l"]["kernel"], np.diag([0.0, 0.0, 1.0, 0.0])[:, :3], atol=1e-6)
  kept, _ = svd_init(kernels, lora, 2.0, "pretrained")
  np.testing.assert_array_equal(kept["l"]["kernel"], w)


def test_svd_factors_are_the_best_rank_r_approximation_split_evenly():
  m = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
  a, b, _ = svd_factors(jnp.asarray(m), 2, 0.5)
  sigma = np.linalg.svd(m.astype(np.float64), compute_uv=False)
  approx = 0.5 * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  np.testing.assert_allclose(np.sum((m - approx) ** 2), np.sum(sigma[2:] ** 2), rtol=1e-5)  # Eckart-Young
  # sqrt(sigma / s) in each factor: a^T a = b b^T = diag(sigma_r / s)
  np.testing.assert_allclose(a.T @ a, np.diag(sigma[:2] / 0.5), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(b @ b.T, np.diag(sigma[:2] / 0.5), rtol=1e-5, atol=1e-5)
  # signs are normalized: the largest-|.| entry of every column of a is positive
  assert np.all(np.take_along_axis(np.asarray(a), np.argmax(np.abs(a), axis=0)[None], 0) > 0)


def test_init_on_tiny_model_is_rank_r_svd_with_residual_kernels():
  _, _, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0, mutable_base=True)  # s = 2
  algorithm = federa(loss_fn, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), lora_scale=2.0)
  state = algorithm.init(trainable, jax.random.key(0))
  lora0, kernels0 = lora_lib.split_kernels(trainable)
  before, after = _layers(kernels0, lora0), _layers(state.extra, state.params)
  assert len(after) == 4
  for (w0, _), (w_res, m) in zip(before, after):
    w0 = np.asarray(w0, np.float64)
    prod = 2.0 * np.asarray(m["lora_a"], np.float64) @ np.asarray(m["lora_b"], np.float64)
    sigma = np.linalg.svd(w0, compute_uv=False)
    np.testing.assert_allclose(np.sum((w0 - prod) ** 2), np.sum(sigma[4:] ** 2), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(prod), np.sqrt(np.sum(sigma[:4] ** 2)), rtol=1e-5)
    np.testing.assert_allclose(w_res, w0 - prod, atol=1e-6)  # W_res = W0 - s a b
  # eval_params has exactly the structure of the trainable tree (LoRA next to each kernel)
  assert jax.tree.structure(algorithm.eval_params(state)) == jax.tree.structure(trainable)


def test_initial_model_equals_the_pretrained_model():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0, mutable_base=True)  # b = 0: pretrained
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (3, 16)), jnp.int32)
  pretrained = peft.apply(base, trainable, tokens)
  algorithm = federa(loss_fn, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), lora_scale=2.0)
  logits = peft.apply(base, algorithm.eval_params(algorithm.init(trainable, None)), tokens)
  np.testing.assert_allclose(logits, pretrained, rtol=1e-5, atol=1e-5)
  # the ablation that keeps W0 counts the principal part twice: a different model
  kept = federa(loss_fn, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), lora_scale=2.0,
                frozen_weight="pretrained")
  other = peft.apply(base, kept.eval_params(kept.init(trainable, None)), tokens)
  assert float(jnp.max(jnp.abs(other - pretrained))) > 1e-2


def test_rounds_after_init_are_fedit_on_the_residual_model():
  """Same cohort and key: federa's round == FedIT's round on the LoRA factors with W_res frozen."""
  _, base, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0, mutable_base=True)
  server_opt = optax.sgd(1.0, momentum=0.5)
  algorithm = federa(loss_fn, client_optimizer=optax.adam(0.01), server_optimizer=server_opt, lora_scale=2.0)
  state = algorithm.init(trainable, None)
  ref_alg = fedit(common.frozen_loss(loss_fn, state.extra), client_optimizer=optax.adam(0.01),
                  server_optimizer=server_opt)
  ref = init_server_state(state.params, server_opt)
  ids = jnp.array([0, 3, 5, 6], jnp.int32)
  step, ref_step = build_round(algorithm, chunk_size=2, donate=False), build_round(ref_alg, chunk_size=2, donate=False)
  for r in range(2):
    data, key = random_cohort(np.asarray(ids), seed=r), jax.random.key(r)
    new, _, m = step(base, state, {}, ids, data, key)
    ref, _, ref_m = ref_step(base, ref, {}, ids, data, key)
    assert_trees_close(new.params, ref.params, rtol=1e-5, atol=1e-6)
    assert_trees_close(new.extra, state.extra, rtol=0, atol=0)  # the residual kernels never change
    for k in ("train_loss", "sum_bytes_up", "sum_bytes_down", "update_norm"):
      np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5)
    state = new
  assert float(m["sum_bytes_up"]) == 4 * 4.0 * sum(m_["lora_a"].size + m_["lora_b"].size
                                                   for _, m_ in lora_lib.lora_modules(state.params))


def test_federa_round_conformance():
  _, base, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0, mutable_base=True)
  algorithm = federa(loss_fn, client_optimizer=optax.sgd(0.1), server_optimizer=optax.adam(1e-2), lora_scale=2.0)
  check_round_conformance(algorithm, base, trainable)


def test_bad_hyper_parameters_are_clear_errors():
  kw = dict(client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0))
  with pytest.raises(ValueError, match=r"frozen_weight must be one of residual, pretrained; got 'w0'"):
    federa(None, frozen_weight="w0", **kw)
  with pytest.raises(ValueError, match=r"lora_scale must be > 0, got 0"):
    federa(None, lora_scale=0, **kw)
  _, _, trainable, loss_fn = tiny_lora_model(rank=20, mutable_base=True)  # v_proj is 32 x 16
  with pytest.raises(ValueError, match=r"LoRA rank 20 exceeds min\(d_in, d_out\)=16 .*lower lora.rank"):
    federa(loss_fn, **kw).init(trainable, None)
  _, _, plain, loss_fn = tiny_lora_model(rank=4)  # no kernels in the trainable tree
  with pytest.raises(ValueError, match=r"federa changes the frozen kernels"):
    federa(loss_fn, **kw).init(plain, None)


def test_smoke_run_end_to_end(tmp_path):
  c = federa_config.get_config("smoke")
  s = train.run(c, str(tmp_path), progress=False)
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "total_bytes_up", "total_bytes_down",
            "final_params_checksum"):
    assert math.isfinite(s[k]), k
  assert s["algorithm"] == "federa" and s["rounds"] == c.fl.num_rounds
  assert s["final_eval_loss"] < s["initial_eval_loss"]
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_rows = [r for r in rows if "train/loss" in r]
  assert len(train_rows) == c.fl.num_rounds
  # every client receives and sends the LoRA factors: the same bytes both ways, every round
  per_client = {r["comm/bytes_up_per_client"] for r in train_rows}
  assert len(per_client) == 1 and per_client.pop() > 0
  assert all(r["comm/bytes_up"] == r["comm/bytes_down"] for r in train_rows)
