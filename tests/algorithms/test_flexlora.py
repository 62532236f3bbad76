"""FlexLoRA: each client starts from the best rank-r_k approximation of the aggregated product."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import flexlora as flexlora_config
from fedjax_llm import train
from fedjax_llm.algorithms.fedit import fedit
from fedjax_llm.algorithms.flexlora import client_start, flexlora, svd_factors
from fedjax_llm.algorithms.flora import merged_update
from fedjax_llm.core import client_store as store_lib
from fedjax_llm.core.round import build_round
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import random_cohort, tiny_lora_model

ALPHA, R_MAX = 8.0, 4
S = ALPHA / R_MAX


def _tail(sigma, r):
  return float(np.sum(np.asarray(sigma, np.float64)[r:] ** 2))


def test_client_start_is_the_best_rank_rk_approximation():
  rng = np.random.default_rng(0)
  dw = jnp.asarray(rng.normal(size=(7, 6)), jnp.float32)  # full rank 6 > r_max
  a, b, sigma = svd_factors(dw, R_MAX, S)
  np.testing.assert_allclose(np.linalg.svd(np.asarray(dw), compute_uv=False), sigma, rtol=1e-5)
  u, _, vt = np.linalg.svd(np.asarray(dw, np.float64))
  for r_k in (1, 2, 3, 4):
    for s_k in (S, ALPHA / r_k):  # scale="uniform" and scale="rank"
      start = client_start({"m": {"lora_a": a, "lora_b": b}}, r_k, s_k / S, False)["m"]
      np.testing.assert_array_equal(start["lora_a"][:, r_k:], 0.0)
      np.testing.assert_array_equal(start["lora_b"][r_k:], 0.0)
      prod = s_k * np.asarray(start["lora_a"], np.float64) @ np.asarray(start["lora_b"], np.float64)
      np.testing.assert_allclose(np.sum((np.asarray(dw) - prod) ** 2), _tail(sigma, r_k), rtol=1e-4)
      best = u[:, :r_k] @ np.diag(np.asarray(sigma[:r_k], np.float64)) @ vt[:r_k]
      np.testing.assert_allclose(prod, best, atol=1e-5)
      # balanced split at the client's scale: ||a[:, i]|| = ||b[i, :]|| = sqrt(sigma_i / s_k)
      np.testing.assert_allclose(np.linalg.norm(start["lora_a"][:, :r_k], axis=0),
                                 np.sqrt(np.asarray(sigma[:r_k]) / s_k), rtol=1e-4)
      np.testing.assert_allclose(np.linalg.norm(start["lora_b"][:r_k], axis=1),
                                 np.sqrt(np.asarray(sigma[:r_k]) / s_k), rtol=1e-4)


def test_first_round_hands_over_the_lora_init_unscaled():
  a = jnp.arange(12.0).reshape(3, 4)
  b = jnp.arange(8.0).reshape(4, 2)
  start = client_start({"m": {"lora_a": a, "lora_b": b}}, 2, 4.0, True)["m"]  # s_k / s = 4
  np.testing.assert_array_equal(start["lora_a"], a * (jnp.arange(4) < 2))
  np.testing.assert_allclose(start["lora_b"], b * (jnp.arange(4) < 2)[:, None] / 4.0)  # s_k a_k b_k = s a b


def _random_clients(rng, ranks, d_in=6, d_out=5):
  a = np.zeros((len(ranks), d_in, R_MAX), np.float32)
  b = np.zeros((len(ranks), R_MAX, d_out), np.float32)
  for k, r in enumerate(ranks):
    a[k, :, :r] = rng.normal(size=(d_in, r))
    b[k, :r] = rng.normal(size=(r, d_out))
  return jnp.asarray(a), jnp.asarray(b)


def test_ranks_summing_to_at_most_r_max_give_the_exact_weighted_mean_of_products():
  a, b = _random_clients(np.random.default_rng(1), [1, 2, 1])  # sum of ranks 4 = r_max
  p = jnp.array([0.5, 0.3, 0.2])
  s_k = jnp.array([ALPHA / 1, ALPHA / 2, ALPHA / 1])  # scale="rank"
  dw = merged_update(a, b, p * s_k)
  expected = sum(float(p[k] * s_k[k]) * np.asarray(a[k]) @ np.asarray(b[k]) for k in range(3))
  np.testing.assert_allclose(dw, expected, rtol=1e-5, atol=1e-6)
  ga, gb, sigma = svd_factors(dw, R_MAX, S)
  np.testing.assert_allclose(S * ga @ gb, expected, rtol=1e-4, atol=1e-5)  # rank(dW) <= 4: no truncation error
  assert _tail(sigma, R_MAX) < 1e-8


def test_all_ranks_r_max_is_at_least_as_close_to_the_mean_product_as_fedit():
  """Not equal to FedIT in general: Eckart-Young makes FlexLoRA's rank-r_max product the closest."""
  a, b = _random_clients(np.random.default_rng(2), [4, 4, 4])
  p = jnp.array([0.2, 0.3, 0.5])
  dw = merged_update(a, b, p * S)
  ga, gb, sigma = svd_factors(dw, R_MAX, S)
  flex_err = float(jnp.sum((dw - S * ga @ gb) ** 2))
  fedit_prod = S * jnp.einsum("c,cir->ir", p, a) @ jnp.einsum("c,cro->ro", p, b)
  fedit_err = float(jnp.sum((dw - fedit_prod) ** 2))
  np.testing.assert_allclose(flex_err, _tail(sigma, R_MAX), rtol=1e-3)
  assert flex_err < fedit_err


def _algorithm(loss_fn, ranks, scale="rank", lr=0.3, server=None):
  return flexlora(loss_fn, client_optimizer=optax.sgd(lr), server_optimizer=server or optax.sgd(1.0),
                  client_ranks=np.asarray(ranks), r_max=R_MAX, lora_alpha=ALPHA, scale=scale)


def test_tiny_model_round_then_every_client_starts_at_its_best_approximation():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=R_MAX, alpha=ALPHA)
  ranks = [1, 2, 4, 3]
  scales = [ALPHA / r for r in ranks]
  alg = _algorithm(loss_fn, ranks)
  ids = np.array([0, 1, 2, 3], np.int32)
  data = random_cohort(ids, steps=2)._replace(weights=jnp.array([1.0, 2.0, 3.0, 4.0]))
  p = [0.1, 0.2, 0.3, 0.4]
  server = alg.init(trainable, None)
  store = store_lib.init_store(alg.init_client, trainable, 4)
  key = jax.random.key(3)
  client_update = jax.jit(alg.client_update)
  outs = []
  for c, cid in enumerate(ids):
    info = ClientInfo(jnp.int32(cid), data.num_steps[c], data.num_tokens[c])
    out, _, _ = client_update(base, server, jax.tree.map(lambda x: x[c], store),
                              ClientBatches(data.tokens[c], data.mask[c]), info, jax.random.fold_in(key, cid))
    outs.append(dict(lora_lib.lora_modules(out["lora"])))
  new, new_store, _ = build_round(alg, chunk_size=2, donate=False)(base, server, store, jnp.asarray(ids), data, key)
  dws = {path: sum(p[k] * scales[k] * np.asarray(outs[k][path]["lora_a"], np.float64)
                   @ np.asarray(outs[k][path]["lora_b"], np.float64) for k in range(4))
         for path in outs[0]}
  for path, m in lora_lib.lora_modules(new.params):  # global: the rank-r_max truncation of dW
    sigma = np.linalg.svd(dws[path], compute_uv=False)
    err = np.sum((dws[path] - S * np.asarray(m["lora_a"], np.float64) @ np.asarray(m["lora_b"], np.float64)) ** 2)
    np.testing.assert_allclose(err, _tail(sigma, R_MAX), rtol=2e-3, atol=1e-12)
    assert _tail(sigma, R_MAX) > 0  # the clients' ranks sum to 10 > 4: truncation is real
  for cid in range(4):  # next round's starting points (0 local steps: the output is the start)
    info = ClientInfo(jnp.int32(cid), jnp.int32(0), jnp.float32(0))
    out, _, _ = client_update(base, new, jax.tree.map(lambda x: x[cid], new_store),
                              ClientBatches(data.tokens[0], data.mask[0]), info, key)
    for path, m in lora_lib.lora_modules(out["lora"]):
      prod = scales[cid] * np.asarray(m["lora_a"], np.float64) @ np.asarray(m["lora_b"], np.float64)
      sigma = np.linalg.svd(dws[path], compute_uv=False)
      np.testing.assert_allclose(np.sum((dws[path] - prod) ** 2), _tail(sigma, ranks[cid]), rtol=2e-3, atol=1e-12)


def test_equal_a_full_rank_clients_match_fedit_exactly():
  """One SGD step from b = 0 leaves every a_k = a, so dW = s a sum_k p_k b_k has rank <= r_max: FlexLoRA's
  global product is exactly dW, which is also FedIT's product s a_bar b_bar."""
  peft, base, trainable, loss_fn = tiny_lora_model(rank=R_MAX, alpha=ALPHA)
  ids = np.array([0, 1, 2], np.int32)
  data = random_cohort(ids, steps=1, seed=4)
  key = jax.random.key(0)
  flex = _algorithm(loss_fn, [R_MAX] * 3, scale="uniform", lr=0.5)
  fed = fedit(loss_fn, client_optimizer=optax.sgd(0.5), server_optimizer=optax.sgd(1.0))
  s_flex = flex.init(trainable, None)
  st = store_lib.init_store(flex.init_client, trainable, 3)
  new_flex, _, _ = build_round(flex, chunk_size=3, donate=False)(base, s_flex, st, jnp.asarray(ids), data, key)
  new_fed, _, _ = build_round(fed, chunk_size=3, donate=False)(base, fed.init(trainable, None), {},
                                                               jnp.asarray(ids), data, key)
  fed_mods = dict(lora_lib.lora_modules(new_fed.params))
  for path, m in lora_lib.lora_modules(new_flex.params):
    mine = S * m["lora_a"] @ m["lora_b"]
    theirs = S * fed_mods[path]["lora_a"] @ fed_mods[path]["lora_b"]
    assert float(jnp.abs(theirs).max()) > 0
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-7)


def test_round_conformance():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=R_MAX, alpha=ALPHA)
  alg = _algorithm(loss_fn, [1, 2, 4, 3, 2, 4, 1, 4], scale="rank", lr=0.1)
  check_round_conformance(alg, base, trainable, num_clients=8)


def test_bad_hyper_parameters_are_clear_errors():
  kw = dict(client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), r_max=R_MAX, lora_alpha=ALPHA)
  with pytest.raises(ValueError, match=r"flexlora scale='sqrt'; allowed: uniform, rank"):
    flexlora(None, client_ranks=np.array([2]), scale="sqrt", **kw)
  with pytest.raises(ValueError, match=r"flexlora: client rank 0 is outside \[1, r_max=4\]"):
    flexlora(None, client_ranks=np.array([0, 2]), **kw)
  _, _, trainable, loss_fn = tiny_lora_model(rank=2, alpha=ALPHA)
  with pytest.raises(ValueError, match=r"flexlora: the LoRA modules have rank 2 but r_max=4"):
    flexlora(loss_fn, client_ranks=np.array([2]), **kw).init(trainable, None)
  tree = {"m": {"lora_a": jnp.zeros((3, 4)), "lora_b": jnp.zeros((4, 2))}}
  with pytest.raises(ValueError, match=r"flexlora: r_max=4 exceeds min\(d_in, d_out\)=2 of LoRA module m"):
    flexlora(loss_fn, client_ranks=np.array([2]), **kw).init(tree, None)


def test_smoke_run_end_to_end(tmp_path):
  c = flexlora_config.get_config("smoke")
  c.fl.num_rounds = 2
  c.eval.every = 1
  s = train.run(c, str(tmp_path), progress=False)
  assert s["algorithm"] == "flexlora" and s["rounds"] == 2
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "total_bytes_up", "total_bytes_down",
            "final_params_checksum"):
    assert math.isfinite(s[k]), k
  assert s["total_bytes_up"] > 0 and s["total_bytes_up"] == s["total_bytes_down"]
  assert s["final_eval_loss"] != s["initial_eval_loss"]
