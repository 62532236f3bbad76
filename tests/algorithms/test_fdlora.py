"""FDLoRA: dual LoRA in one rank-2r module, the fusion identity, AdaFusion's grid choice by hand, the personal
module stays on the client, the global module is FedAvg + the server step, conformance, errors, smoke."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm import tree as T
from fedjax_llm.algorithms import get_algorithm
from fedjax_llm.algorithms.fdlora import fdlora, join_dual, split_dual
from fedjax_llm.core import client_store as store_lib
from fedjax_llm.core.algorithm import server_step
from fedjax_llm.core.round import build_round
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import assert_trees_close, random_cohort, tiny_lora_model


def _modules(tree):
  return dict(lora_lib.lora_modules(tree))


def test_registry_resolves_fdlora():
  assert get_algorithm("fdlora") is fdlora


def test_split_join_by_hand():
  a = jnp.arange(12.0).reshape(3, 4)  # [d_in=3, r_max=4]: columns 0-1 global, 2-3 personal
  b = jnp.arange(8.0).reshape(4, 2) + 1  # [r_max=4, d_out=2]
  g, p = split_dual({"m": {"lora_a": a, "lora_b": b}}, 2)
  np.testing.assert_array_equal(g["m"]["lora_a"], [[0, 1], [4, 5], [8, 9]])
  np.testing.assert_array_equal(p["m"]["lora_b"], [[5, 6], [7, 8]])
  back = join_dual(g, p)["m"]  # weights (1, 1): the original module
  np.testing.assert_array_equal(back["lora_a"], a)
  np.testing.assert_array_equal(back["lora_b"], b)
  fused = join_dual(g, p, 0.5, -2.0)["m"]
  np.testing.assert_array_equal(fused["lora_b"], [[0.5, 1.0], [1.5, 2.0], [-10, -12], [-14, -16]])
  # the product of the fused module is the weighted sum of the two modules' products
  expected = 0.5 * g["m"]["lora_a"] @ g["m"]["lora_b"] - 2.0 * p["m"]["lora_a"] @ p["m"]["lora_b"]
  np.testing.assert_allclose(fused["lora_a"] @ fused["lora_b"], expected, rtol=1e-6)


def _algorithm(loss_fn, **kw):
  kw.setdefault("client_optimizer", optax.sgd(0.5))
  kw.setdefault("server_optimizer", optax.sgd(1.0))
  kw.setdefault("r_max", 4)
  return fdlora(loss_fn, **kw)


def test_personal_params_fusion_identity_on_the_model():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0, nonzero_b=True)
  alg = _algorithm(loss_fn)
  server = alg.init(trainable, None)
  key = jax.random.key(3)
  personal = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(key, x.size), x.shape),
                          split_dual(trainable, 2)[1])
  state = {"personal": personal, "fusion": jnp.array([0.7, 1.3])}
  fused = alg.personal_params(base, server, state, jnp.zeros(8, jnp.int32), jnp.ones(8))
  assert jax.tree.structure(fused) == jax.tree.structure(trainable)
  s = 8.0 / 4  # alpha / r_max, the scale the model applies
  g_mods, p_mods = _modules(server.params), _modules(personal)
  for path, m in _modules(fused).items():
    expected = 0.7 * lora_lib.delta(g_mods[path], s) + 1.3 * lora_lib.delta(p_mods[path], s)
    np.testing.assert_allclose(lora_lib.delta(m, s), expected, rtol=1e-5, atol=1e-6)
  # global evaluation sees the global module alone, in the model's structure
  ev = alg.eval_params(server)
  assert jax.tree.structure(ev) == jax.tree.structure(trainable)
  for path, m in _modules(ev).items():
    np.testing.assert_allclose(lora_lib.delta(m, s), lora_lib.delta(g_mods[path], s), rtol=1e-5, atol=1e-7)


def _toy(target, **kw):
  """FDLoRA on a one-module 'model' whose loss is (a b - target)^2 (b scaled by the part weights)."""
  def loss_fn(base, params, tokens, mask, key):
    m = params["m"]
    loss = jnp.sum(jnp.square(m["lora_a"] @ m["lora_b"] - target))
    n = jnp.sum(mask)
    return loss, {"nll_sum": loss * n, "tokens": n}
  tree = {"m": {"lora_a": jnp.ones((1, 2)), "lora_b": jnp.array([[1.0], [2.0]])}}  # b_g = 1, b_p = 2
  alg = fdlora(loss_fn, client_optimizer=optax.sgd(0.0), server_optimizer=optax.sgd(1.0), r_max=2, **kw)
  return alg, tree


def test_adafusion_picks_the_grid_minimum_by_hand():
  # lr 0: both modules stay put, so the fused product is w_g * 1 + w_p * 2 and the grid can be scored by hand
  batches = ClientBatches(jnp.zeros((3, 1, 4), jnp.int32), jnp.ones((3, 1, 4)))
  info = ClientInfo(jnp.int32(0), jnp.int32(3), jnp.float32(9))
  alg, tree = _toy(2.5)
  server = alg.init(tree, None)
  state = alg.init_client(tree, info)
  np.testing.assert_array_equal(state["fusion"], [1.0, 0.0])  # never sampled: the global model
  _, new, m = alg.client_update(None, server, state, batches, info, jax.random.key(0))
  np.testing.assert_array_equal(new["fusion"], [0.5, 1.0])  # 0.5 + 2 * 1 = 2.5 exactly
  assert float(m["fused_loss"]) == 0.0
  # with the L1 penalty 1.0: (0, 1) -> 0.25 + 1 = 1.25 beats (0.5, 1) -> 0 + 1.5 and (1, 0.5) -> 0.25 + 1.5
  alg, tree = _toy(2.5, fusion_l1=1.0)
  _, new, m = alg.client_update(None, server, state, batches, info, jax.random.key(0))
  np.testing.assert_array_equal(new["fusion"], [0.0, 1.0])
  np.testing.assert_allclose(m["fused_loss"], 0.25)
  # a custom grid; the tie between (2, 0) and (0, 1) (both exact for target 2) goes to the first
  alg, tree = _toy(2.0, fusion_global_weights=(2.0, 0.0), fusion_personal_weights=(0.0, 1.0))
  _, new, _ = alg.client_update(None, server, state, batches, info, jax.random.key(0))
  np.testing.assert_array_equal(new["fusion"], [2.0, 0.0])
  # a client without data (empty slot) keeps its weights
  empty = ClientInfo(jnp.int32(-1), jnp.int32(0), jnp.float32(0))
  _, new, m = alg.client_update(None, server, {**state, "fusion": jnp.array([0.3, 0.4])}, batches, empty,
                                jax.random.key(0))
  np.testing.assert_array_equal(new["fusion"], np.float32([0.3, 0.4]))
  assert float(m["sum_bytes_up"]) == 0.0


def _client_outputs(alg, base, server, store, ids, data, key):
  outs, states = [], []
  update = jax.jit(alg.client_update)
  for c, cid in enumerate(ids):
    info = ClientInfo(jnp.int32(cid), data.num_steps[c], data.num_tokens[c])
    out, st, _ = update(base, server, jax.tree.map(lambda x: x[cid], store),
                                   ClientBatches(data.tokens[c], data.mask[c]), info, jax.random.fold_in(key, cid))
    outs.append(out)
    states.append(st)
  return outs, states


def test_global_module_is_weighted_mean_plus_server_step_and_personal_stays_home():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=4)
  server_opt = optax.sgd(0.7)  # a FedOpt server step (server learning rate 0.7) on top of the weighted mean
  alg = _algorithm(loss_fn, server_optimizer=server_opt)
  server = alg.init(trainable, None)
  store = store_lib.init_store(alg.init_client, trainable, 6)
  ids = np.array([4, 1, 2], np.int32)
  data = random_cohort(ids, steps=2)._replace(weights=jnp.array([1.0, 3.0, 6.0]))
  key = jax.random.key(7)
  outs, states = _client_outputs(alg, base, server, store, ids, data, key)
  # the upload is the global module only (rank r), and does not depend on the personal module
  for out in outs:
    assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, split_dual(trainable, 2)[0])
  other = jax.tree.map(lambda x: x + 1.0, store)
  outs2, _ = _client_outputs(alg, base, server, other, ids, data, key)
  assert_trees_close(outs2, outs, rtol=0, atol=0)

  new, new_store, m = build_round(alg, chunk_size=3, donate=False)(base, server, store, jnp.asarray(ids), data, key)
  mean = jax.tree.map(lambda *xs: 0.1 * xs[0] + 0.3 * xs[1] + 0.6 * xs[2], *outs)
  assert_trees_close(new.params, server_step(server, mean, server_opt).params, rtol=1e-5, atol=1e-7)
  # personal modules: participants hold exactly what they trained (the server never touched it),
  # everyone else is unchanged; and the server state does not depend on any personal module
  for c, cid in enumerate(ids):
    assert_trees_close(jax.tree.map(lambda x: x[cid], new_store), states[c], rtol=1e-5, atol=1e-7)
  for cid in (0, 3, 5):
    assert_trees_close(jax.tree.map(lambda x: x[cid], new_store), jax.tree.map(lambda x: x[cid], store), 0, 0)
  assert float(jnp.abs(new_store["personal"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora"]["lora_b"][4]
                       ).max()) > 0  # the personal module did train
  new2, _, _ = build_round(alg, chunk_size=3, donate=False)(base, server, other, jnp.asarray(ids), data, key)
  assert_trees_close(new2.params, new.params, rtol=0, atol=0)
  # bytes: the global factors, 4 bytes x r x (d_in + d_out) per module, both ways, per present client
  per_client = 4 * 2 * sum(mm["lora_a"].shape[0] + mm["lora_b"].shape[1] for mm in _modules(trainable).values())
  assert float(m["sum_bytes_up"]) == float(m["sum_bytes_down"]) == 3 * per_client


def test_round_conformance():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=4)
  check_round_conformance(_algorithm(loss_fn), base, trainable, num_clients=8)


@pytest.mark.parametrize("kwargs, message", [
    ({"r_max": 5}, r"r_max \(lora.rank\) must be an even integer >= 2, got 5"),
    ({"r_max": 0}, r"must be an even integer >= 2, got 0"),
    ({"fusion_global_weights": ()}, r"fusion_global_weights must be a non-empty list of finite floats, got \(\)"),
    ({"fusion_personal_weights": (0.0, float("nan"))}, r"fusion_personal_weights must be a non-empty list"),
    ({"fusion_l1": -0.1}, r"fusion_l1 must be a finite float >= 0, got -0.1"),
    ({"fusion_batches": 0}, r"fusion_batches must be an integer >= 1 .*, got 0"),
])
def test_bad_hyper_parameters_are_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _algorithm(lambda *a: None, **kwargs)


def test_model_rank_must_match_r_max():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=4)
  with pytest.raises(ValueError, match=r"LoRA modules have rank 4 but r_max=8"):
    _algorithm(loss_fn, r_max=8).init(trainable, None)


def test_smoke_run_logs_personalized_eval(tmp_path):
  from configs import fdlora as fdlora_config
  from fedjax_llm import train
  c = fdlora_config.get_config("smoke")
  c.fl.num_rounds = 2
  s = train.run(c, str(tmp_path), progress=False)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  evals = [r for r in rows if "eval/loss" in r]
  assert [r["round"] for r in evals] == [0, 2]
  for r in evals:
    for k in ("eval/personal_loss", "eval/personal_client_loss_mean", "eval/personal_client_loss_p90"):
      assert np.isfinite(r[k]), k
  # before any round every client's fusion weights are (1, 0): the personalized model is the global one
  assert abs(evals[0]["eval/personal_loss"] - evals[0]["eval/loss"]) < 1e-6
  assert evals[1]["eval/personal_loss"] != evals[1]["eval/loss"]
  trains = [r for r in rows if "train/loss" in r]
  assert all(0.0 <= r["clients/fusion_w_personal"] <= 1.0 for r in trains)
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["final_eval"]["eval/personal_loss"] == evals[-1]["eval/personal_loss"]
  assert np.isfinite(s["final_eval_loss"]) and s["algorithm"] == "fdlora"
  # only the global half (r = 4 of r_max = 8) travels: bytes per client per round
  per_client = s["mean_bytes_up_per_client_round"]
  assert per_client == pytest.approx(s["trainable_bytes"] / 2)
