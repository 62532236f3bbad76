"""LoRA-FAIR: the server correction dB of b_bar (cosine and closed-form least squares), a untouched."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import lora_fair as fair_config
from fedjax_llm import train
from fedjax_llm.algorithms import fedit
from fedjax_llm.algorithms.lora_fair import cosine_gap, factor_stats, lora_fair, refine_module
from fedjax_llm.core.round import build_round
from fedjax_llm.peft import lora as lora_lib
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import random_cohort, tiny_lora_model

S = 2.0  # LoRA scale used on the random matrices


def _random_clients(seed=0, c=4, d_in=12, r=3, d_out=9):
  """Client factors near a common point (as after local training), with clearly non-zero aggregation noise."""
  k = jax.random.split(jax.random.key(seed), 4)
  a0 = jax.random.normal(k[0], (d_in, r)) / np.sqrt(d_in)
  b0 = 0.3 * jax.random.normal(k[1], (r, d_out))
  a = a0 + 0.4 * jax.random.normal(k[2], (c, d_in, r)) / np.sqrt(d_in)
  b = b0 + 0.3 * jax.random.normal(k[3], (c, r, d_out))
  p = jnp.asarray(np.arange(1.0, c + 1) / np.sum(np.arange(1.0, c + 1)), jnp.float32)
  return a, b, p


def _dense(a, b, p):
  a, b, p = (np.asarray(x, np.float64) for x in (a, b, p))
  mean = np.einsum("c,cir,cro->io", p, a, b)
  return np.einsum("c,cir->ir", p, a), np.einsum("c,cro->ro", p, b), mean


def _cos(x, y):
  return float(np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def _refine(a, b, p, objective, lam, steps=50, step_size=0.5):
  return refine_module(a, b, p, objective=objective, lam=lam, scale=S, steps=steps, step_size=step_size)


def test_gram_quantities_match_the_dense_mean_product():
  a, b, p = _random_clients()
  a_bar, b_bar, g, q, e_sq = factor_stats(a, b, p)
  a_bar_d, b_bar_d, mean = _dense(a, b, p)
  err = mean - a_bar_d @ b_bar_d  # FedIT's aggregation error E
  np.testing.assert_allclose(a_bar, a_bar_d, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(b_bar, b_bar_d, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g, a_bar_d.T @ a_bar_d, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(q, a_bar_d.T @ err, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(e_sq, np.sum(err ** 2), rtol=1e-5)
  # the cancellation-free cosine gap equals the dense 1 - cos, before and after a correction
  d = 0.1 * jax.random.normal(jax.random.key(9), b_bar.shape)
  for dd in (jnp.zeros_like(d), d):
    np.testing.assert_allclose(cosine_gap(dd, b_bar, g, q, e_sq),
                               1.0 - _cos(mean, a_bar_d @ (b_bar_d + np.asarray(dd, np.float64))), rtol=1e-4)


@pytest.mark.parametrize("lam", [0.0, 0.05, 3.0])
def test_lstsq_correction_solves_the_normal_equations(lam):
  a, b, p = _random_clients(seed=1)
  a_ref, c, _ = _refine(a, b, p, "lstsq", lam)
  a_bar, b_bar, mean = _dense(a, b, p)
  d = np.asarray(c, np.float64) - b_bar
  # (s^2 a_bar^T a_bar + lam I) d = s a_bar^T (s M - s a_bar b_bar)
  lhs = (S ** 2 * a_bar.T @ a_bar + lam * np.eye(a_bar.shape[1])) @ d
  rhs = S * a_bar.T @ (S * mean - S * a_bar @ b_bar)
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-5)
  assert np.abs(d).max() > 1e-3  # a real correction
  np.testing.assert_allclose(a_ref, a_bar, rtol=1e-5, atol=1e-6)  # a is the plain mean


def test_square_invertible_a_bar_by_hand():
  # d_in = r = 2, a_1 = I, a_2 = 2 I, p = (1/2, 1/2): a_bar = 1.5 I, M = (b_1 + 2 b_2) / 2 is representable:
  # lam = 0 gives c = a_bar^{-1} M, i.e. with b_1 = (3, 0)^T, b_2 = (0, 3)^T: c = (1, 2)^T, b_bar = (1.5, 1.5)^T.
  a = jnp.stack([jnp.eye(2), 2.0 * jnp.eye(2)])
  b = jnp.array([[[3.0], [0.0]], [[0.0], [3.0]]])
  p = jnp.array([0.5, 0.5])
  _, c, stats = _refine(a, b, p, "lstsq", 0.0)
  np.testing.assert_allclose(c, [[1.0], [2.0]], rtol=1e-5)
  np.testing.assert_allclose(stats["dist_refined"], 0.0, atol=1e-10)
  np.testing.assert_allclose(stats["dist_fedit"], 0.75 ** 2 * 2, rtol=1e-6)  # M - a_bar b_bar = (-.75, .75)^T
  np.testing.assert_allclose(stats["gap_refined"], 0.0, atol=1e-7)
  np.testing.assert_allclose(stats["gap_fedit"], 1 - (1.5 * 1.5 + 3.0 * 1.5) / (np.hypot(1.5, 3) * np.hypot(1.5, 1.5)),
                             rtol=1e-5)
  # cosine (scale-invariant): reaches the direction (1, 2) of the exact solution
  _, c_cos, stats = _refine(a, b, p, "cosine", 0.0, steps=200)
  assert float(stats["gap_refined"]) < 1e-6
  np.testing.assert_allclose(c_cos[1, 0] / c_cos[0, 0], 2.0, rtol=1e-3)
  # identical a_k: FedIT is already exact and nothing is corrected
  _, c_same, _ = _refine(jnp.stack([jnp.eye(2)] * 2), b, p, "lstsq", 0.0)
  np.testing.assert_allclose(c_same, [[1.5], [1.5]], rtol=1e-6)


@pytest.mark.parametrize("objective", ["cosine", "lstsq"])
def test_refined_product_is_strictly_closer_than_fedit(objective):
  a, b, p = _random_clients(seed=2)
  a_ref, c, _ = _refine(a, b, p, objective, 0.01)
  a_bar, b_bar, mean = _dense(a, b, p)
  c = np.asarray(c, np.float64)
  np.testing.assert_allclose(a_ref, a_bar, rtol=1e-5, atol=1e-6)  # a unchanged by the correction
  if objective == "cosine":
    before, after = _cos(mean, a_bar @ b_bar), _cos(mean, a_bar @ c)
    assert after > before + 1e-4, (before, after)
  else:
    before = np.sum((S * mean - S * a_bar @ b_bar) ** 2)
    after = np.sum((S * mean - S * a_bar @ c) ** 2)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("objective", ["cosine", "lstsq"])
def test_huge_lambda_gives_no_correction(objective):
  a, b, p = _random_clients(seed=3)
  _, c, stats = _refine(a, b, p, objective, 1e12)
  b_bar = factor_stats(a, b, p)[1]
  if objective == "cosine":  # the prox of lam ||.|| returns exactly 0
    np.testing.assert_array_equal(c, b_bar)
    assert float(stats["d_sq"]) == 0.0
  else:
    np.testing.assert_allclose(c, b_bar, rtol=0, atol=1e-10)


def _round(algorithm, base, trainable, ids, data, key):
  server = algorithm.init(trainable, None)
  return build_round(algorithm, chunk_size=len(ids), donate=False)(base, server, {}, jnp.asarray(ids), data, key)


@pytest.mark.parametrize("objective", [pytest.param("cosine", marks=pytest.mark.extended), "lstsq"])
def test_round_keeps_fedit_a_corrects_b_and_reduces_to_fedit_for_huge_lambda(objective):
  peft, base, trainable, loss_fn = tiny_lora_model(rank=2, nonzero_b=True)
  ids = np.array([0, 1, 2], np.int32)
  data = random_cohort(ids, steps=3, seed=4)._replace(weights=jnp.array([1.0, 3.0, 6.0]))
  key = jax.random.key(2)
  opts = dict(client_optimizer=optax.sgd(0.3), server_optimizer=optax.sgd(1.0))
  ref, _, _ = _round(fedit(loss_fn, **opts), base, trainable, ids, data, key)
  # lam = 1e-4: at this model's scale (1 - cos ~ 1e-5, ||dB|| ~ 1e-3) the paper's 0.01 leaves the cosine fit at 0
  fair, _, m = _round(lora_fair(loss_fn, lora_scale=4.0, objective=objective, lam=1e-4, **opts), base, trainable,
                      ids, data, key)
  same, _, m_same = _round(lora_fair(loss_fn, lora_scale=4.0, objective=objective, lam=1e12, **opts), base,
                           trainable, ids, data, key)
  for path, mod in lora_lib.lora_modules(fair.params):
    fedit_mod = dict(lora_lib.lora_modules(ref.params))[path]
    np.testing.assert_allclose(mod["lora_a"], fedit_mod["lora_a"], rtol=1e-6, atol=1e-8)  # A_bar kept
  assert float(m["correction_norm"]) > 1e-5
  crit = "gap" if objective == "cosine" else "dist"
  assert float(m[f"{crit}_refined"]) < float(m[f"{crit}_fedit"])
  b_diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(lora_lib.select_factors(fair.params, "lora_b")),
                                                             jax.tree.leaves(lora_lib.select_factors(ref.params, "lora_b"))))
  assert b_diff > 1e-6
  # lam -> infinity: FedIT (exactly for the prox-gradient, to float32 rounding for the ridge solve)
  if objective == "cosine":
    jax.tree.map(np.testing.assert_array_equal, same.params, ref.params)
  else:
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), same.params, ref.params)
  assert float(m_same["correction_norm"]) < 1e-9


def test_bad_hyper_parameters_are_clear_errors():
  opts = dict(client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), lora_scale=2.0)
  with pytest.raises(ValueError, match=r"objective='l2'; allowed: cosine, lstsq"):
    lora_fair(None, objective="l2", **opts)
  with pytest.raises(ValueError, match=r"lam must be a finite number >= 0, got -1"):
    lora_fair(None, lam=-1, **opts)
  with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got 0"):
    lora_fair(None, steps=0, **opts)
  with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got 2.5"):
    lora_fair(None, steps=2.5, **opts)
  with pytest.raises(ValueError, match=r"step_size must be a finite number > 0, got 0"):
    lora_fair(None, step_size=0, **opts)
  with pytest.raises(ValueError, match=r"lora_scale must be a positive number \(alpha / rank\), got -1"):
    lora_fair(None, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), lora_scale=-1)
  peft, base, trainable, loss_fn = tiny_lora_model(rank=2, mutable_base=True)  # kernels in the tree
  with pytest.raises(ValueError, match=r"expects a trainable tree of LoRA factors only"):
    lora_fair(loss_fn, **opts).init(trainable, None)


def test_round_conformance():
  # the default (cosine) objective; "lstsq" differs only inside aggregate (covered by the compiled round above)
  peft, base, trainable, loss_fn = tiny_lora_model(rank=2, nonzero_b=True)
  algorithm = lora_fair(loss_fn, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), lora_scale=4.0)
  check_round_conformance(algorithm, base, trainable)


def test_smoke_run(tmp_path):
  c = fair_config.get_config("smoke")
  c.fl.num_rounds = 2
  s = train.run(c, str(tmp_path), progress=False)
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "total_bytes_up", "total_bytes_down",
            "final_params_checksum"):
    assert np.isfinite(s[k]), k
  assert s["algorithm"] == "lora_fair" and s["rounds"] == 2
  assert s["total_bytes_up"] == s["total_bytes_down"] > 0  # FedIT's traffic: the factors both ways
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if "train/loss" in l]
  assert [r["round"] for r in rows] == [1, 2]
  assert all(r["clients/gap_refined"] <= r["clients/gap_fedit"] for r in rows)
