"""FedDPA: the instance weight by hand, pooling, a stored training instance gets the maximal weight, the training
schedules (T / F), the local adapter stays on the client, the global one is FedAvg + the server step,
train.py's personalized evaluation == a direct row-by-row loop, conformance, errors, smoke."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm.algorithms import get_algorithm
from fedjax_llm.algorithms.fdlora import split_dual
from fedjax_llm.algorithms.feddpa import (feddpa, find_peft, instance_weight, model_hidden_size, pool_hidden,
                                          reference_summary)
from fedjax_llm.core import client_store as store_lib
from fedjax_llm.core.algorithm import server_step
from fedjax_llm.core.round import build_round
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import assert_trees_close, random_cohort, tiny_lora_model

R_MAX, R = 4, 2


def _modules(tree):
  return dict(lora_lib.lora_modules(tree))


def _algorithm(loss_fn, **kw):
  kw.setdefault("client_optimizer", optax.sgd(0.5))
  kw.setdefault("server_optimizer", optax.sgd(1.0))
  kw.setdefault("r_max", R_MAX)
  return feddpa(loss_fn, **kw)


def _batches(data, c):
  return ClientBatches(data.tokens[c], data.mask[c])


def _info(data, c, cid):
  return ClientInfo(jnp.int32(cid), data.num_steps[c], data.num_tokens[c])


def test_registry_and_model_lookup():
  assert get_algorithm("feddpa") is feddpa
  peft, _, _, loss_fn = tiny_lora_model(rank=R_MAX)
  assert find_peft(loss_fn) is peft
  assert model_hidden_size(peft) == 32  # tiny_llama_config's hidden size
  assert find_peft(lambda *a: None) is None


def test_instance_weight_by_hand():
  # references: e1 = (3, 4, 0) -> unit (0.6, 0.8, 0); e2 = (0, 0, 2) -> (0, 0, 1); a third, masked out
  reps = jnp.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [100.0, -7.0, 1.0]])
  ref, count = reference_summary(reps, jnp.array([True, True, False]))
  np.testing.assert_allclose(ref, [0.3, 0.4, 0.5], rtol=1e-6)
  assert float(count) == 2.0
  # x = (2, 0, 0): cos = 0.6 and 0 -> mean 0.3 -> w_l = 0.5 * 0.3
  np.testing.assert_allclose(instance_weight(jnp.array([2.0, 0.0, 0.0]), ref, count, 0.5), 0.15, rtol=1e-6)
  # x = (0, 3, 4): cos = 0.48 and 0.8 -> mean 0.64
  np.testing.assert_allclose(instance_weight(jnp.array([0.0, 3.0, 4.0]), ref, count, 0.5), 0.32, rtol=1e-6)
  np.testing.assert_allclose(instance_weight(jnp.array([0.0, 3.0, 4.0]), ref, count, 1.0), 0.64, rtol=1e-6)
  # not clipped (as in the public code): an opposite instance gets a negative local weight
  np.testing.assert_allclose(instance_weight(jnp.array([-1.0, 0.0, 0.0]), ref, count, 0.5), -0.15, rtol=1e-6)
  # the mean-vector form equals the mean of the cosines, for any instance
  x = jnp.array([0.3, -1.2, 2.0])
  cos = [float(jnp.dot(x, e) / (jnp.linalg.norm(x) * jnp.linalg.norm(e))) for e in reps[:2]]
  np.testing.assert_allclose(instance_weight(x, ref, count, 0.5), 0.5 * np.mean(cos), rtol=1e-6)
  # no references (a client never sampled), or a zero representation: weight 0, never NaN
  assert float(instance_weight(x, ref, 0.0, 0.5)) == 0.0
  assert float(instance_weight(jnp.zeros(3), ref, count, 0.5)) == 0.0
  ref0, c0 = reference_summary(reps, jnp.zeros(3, bool))
  assert float(c0) == 0.0 and not np.any(np.isnan(ref0))


def test_pool_hidden_by_hand():
  h = jnp.arange(12.0).reshape(2, 3, 2)
  mask = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(pool_hidden(h, mask, "last"), [[2.0, 3.0], [6.0, 7.0]])  # row 2: empty -> token 0
  np.testing.assert_array_equal(pool_hidden(h, mask, "mean"), [[1.0, 2.0], [0.0, 0.0]])


def _weights_of(params, server_params, local):
  """(w_g, w_l) read back from personal_params' b rows: [w_g b_g; w_l b_l]."""
  wg, wl = [], []
  for path, m in _modules(params).items():
    b_g, b_l = _modules(server_params)[path]["lora_b"], _modules(local)[path]["lora_b"]
    i = jnp.argmax(jnp.abs(b_l))
    wl.append(float(m["lora_b"][R:].ravel()[i] / b_l.ravel()[i]))
    j = jnp.argmax(jnp.abs(b_g))
    if float(jnp.abs(b_g).max()) > 0:
      wg.append(float(m["lora_b"][:R].ravel()[j] / b_g.ravel()[j]))
  return wg, wl


@pytest.mark.parametrize("representation, pooling", [("frozen", "last"), ("local", "mean")])
def test_stored_training_instance_gets_the_maximal_weight(representation, pooling):
  peft, base, trainable, loss_fn = tiny_lora_model(rank=R_MAX, nonzero_b=True)
  alg = _algorithm(loss_fn, num_reference=1, local_start_round=0, max_local_weight=0.8,
                   representation=representation, pooling=pooling)
  server = alg.init(trainable, None)
  data = random_cohort(np.array([3], np.int32), steps=2, batch=2, seq=16)
  state = alg.init_client(trainable, _info(data, 0, 3))
  _, new, _ = jax.jit(alg.client_update)(base, server, state, _batches(data, 0), _info(data, 0, 3), jax.random.key(0))
  assert float(new["ref_count"]) == 1.0  # the first training sequence of the round
  personal = jax.jit(alg.personal_params)
  params = personal(base, server, new, data.tokens[0, 0, 0], data.mask[0, 0, 0])
  wg, wl = _weights_of(params, server.params, new["local"])
  np.testing.assert_allclose(wl, 0.8, rtol=1e-4)  # cosine 1: w_l = w_max
  np.testing.assert_allclose(wg, 0.2, rtol=1e-4)  # and the global adapter gets 1 - w_l
  for s, b in ((0, 1), (1, 0), (1, 1)):  # every other training sequence gets less
    _, wl_other = _weights_of(personal(base, server, new, data.tokens[0, s, b], data.mask[0, s, b]), server.params,
                              new["local"])
    assert max(wl_other) < 0.8 - 1e-3
  # a client without references gets the global adapter only
  params = personal(base, server, state, data.tokens[0, 0, 0], data.mask[0, 0, 0])
  for path, m in _modules(params).items():
    np.testing.assert_array_equal(m["lora_b"][R:], 0.0)
    np.testing.assert_allclose(m["lora_b"][:R], _modules(server.params)[path]["lora_b"], rtol=1e-6)


def test_training_schedules():
  """T: the local adapter trains next to the frozen global one with weights (alpha, 1 - alpha), from
  local_start_round on; F: the local adapter restarts from the received global adapter and is fine-tuned."""
  peft, base, trainable, loss_fn = tiny_lora_model(rank=R_MAX, nonzero_b=True)
  data = random_cohort(np.array([2], np.int32), steps=2)
  info, batches, key = _info(data, 0, 2), _batches(data, 0), jax.random.key(1)

  compiled = {}

  def run(round_idx, **kw):
    name = repr(sorted(kw.items()))
    if name not in compiled:  # one compilation per setting; the round is a traced argument
      alg = _algorithm(loss_fn, **kw)
      compiled[name] = (alg, jax.jit(alg.client_update))
    alg, update = compiled[name]
    server = alg.init(trainable, None)._replace(round=jnp.int32(round_idx))
    state = alg.init_client(trainable, info)
    out, new, m = update(base, server, state, batches, info, key)
    return server, state, out, new, m

  server, state, out, new, _ = run(0)  # round 0 < local_start_round = 1: only the global adapter trains
  assert_trees_close(new["local"], state["local"], 0, 0)
  assert float(jnp.abs(out["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora"]["lora_b"]
                       - server.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora"]["lora_b"]).max()) > 0
  _, state, out1, new, m = run(1)
  assert float(m["local_loss"]) > 0
  assert not np.allclose(new["local"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora"]["lora_b"],
                         state["local"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora"]["lora_b"])
  assert_trees_close(out1, out, 0, 0)  # the global adapter's training ignores the local one
  _, state, _, new, _ = run(1, update_weight=1.0)  # local weight 1 - alpha = 0: no gradient reaches it
  assert_trees_close(new["local"], state["local"], 0, 0)
  lr0 = optax.sgd(0.0)
  server, state, _, new, _ = run(1, variant="F", client_optimizer=lr0)  # F with lr 0: a copy of the global
  assert_trees_close(new["local"], server.params, 0, 0)
  _, state, _, new, _ = run(0, variant="F", client_optimizer=lr0)  # ... from local_start_round on
  assert_trees_close(new["local"], state["local"], 0, 0)
  server, _, _, new, _ = run(1, variant="F")
  assert not np.allclose(jax.tree.leaves(new["local"])[1], jax.tree.leaves(server.params)[1])


def test_global_adapter_is_weighted_mean_plus_server_step_and_local_stays_home():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=R_MAX)
  server_opt = optax.sgd(0.7)
  alg = _algorithm(loss_fn, server_optimizer=server_opt, local_start_round=0)
  server = alg.init(trainable, None)
  store = store_lib.init_store(alg.init_client, trainable, 6)
  ids = np.array([4, 1, 2], np.int32)
  data = random_cohort(ids, steps=2)._replace(weights=jnp.array([1.0, 3.0, 6.0]))
  key = jax.random.key(7)
  update = jax.jit(alg.client_update)
  outs, states = [], []
  for c, cid in enumerate(ids):
    out, st, _ = update(base, server, jax.tree.map(lambda x: x[cid], store), _batches(data, c), _info(data, c, cid),
                        jax.random.fold_in(key, cid))
    assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, split_dual(trainable, R)[0])  # global only
    outs.append(out)
    states.append(st)
  new, new_store, m = build_round(alg, chunk_size=3, donate=False)(base, server, store, jnp.asarray(ids), data, key)
  mean = jax.tree.map(lambda *xs: 0.1 * xs[0] + 0.3 * xs[1] + 0.6 * xs[2], *outs)
  assert_trees_close(new.params, server_step(server, mean, server_opt).params, rtol=1e-5, atol=1e-7)
  for c, cid in enumerate(ids):  # the server never touches a local adapter or the references
    assert_trees_close(jax.tree.map(lambda x: x[cid], new_store), states[c], rtol=1e-5, atol=1e-6)
  for cid in (0, 3, 5):
    assert_trees_close(jax.tree.map(lambda x: x[cid], new_store), jax.tree.map(lambda x: x[cid], store), 0, 0)
  # the server state does not depend on the clients' local adapters
  other = jax.tree.map(lambda x: x + 0.5, store)
  new2, _, _ = build_round(alg, chunk_size=3, donate=False)(base, server, other, jnp.asarray(ids), data, key)
  assert_trees_close(new2.params, new.params, rtol=1e-6, atol=1e-7)
  per_client = 4 * R * sum(mm["lora_a"].shape[0] + mm["lora_b"].shape[1] for mm in _modules(trainable).values())
  assert float(m["sum_bytes_up"]) == float(m["sum_bytes_down"]) == 3 * per_client


def test_train_personal_eval_equals_direct_row_loop():
  """train.py's personalized evaluation (per_client_rows + build_personal_eval) == scoring each held-out row
  with personal_params by hand; rows are instance-weighted, clients padded to the same number of rows."""
  from fedjax_llm import train
  from fedjax_llm.peft.base import token_nll
  peft, base, trainable, loss_fn = tiny_lora_model(rank=R_MAX)
  alg = _algorithm(loss_fn, local_start_round=0)
  server = alg.init(trainable, None)
  store = store_lib.init_store(alg.init_client, trainable, 4)
  ids = np.array([0, 2], np.int32)
  server, store, _ = build_round(alg, chunk_size=2, donate=False)(base, server, store, jnp.asarray(ids),
                                                                  random_cohort(ids), jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 97, (5, 12)).astype(np.int32)
  mask = (np.arange(12)[None, :] < np.array([[12], [7], [12], [3], [9]])).astype(np.float32)
  client_index = np.array([0, 0, 2, 3, 0], np.int32)  # client 3 never trained: no references, global only
  eval_ids = np.array([0, 2, 3], np.int32)
  pt, pm = train.per_client_rows(tokens, mask, client_index, eval_ids)
  assert pt.shape == (3, 3, 12)  # 3 clients, padded to client 0's 3 rows
  s, c = train.build_personal_eval(peft, alg)(base, server, store_lib.gather(store, jnp.asarray(eval_ids)),
                                               jnp.asarray(pt), jnp.asarray(pm))
  personal = jax.jit(alg.personal_params)
  apply = jax.jit(lambda params, t: peft.apply(base, params, t))
  for j, cid in enumerate(eval_ids):
    cs = jax.tree.map(lambda x: x[cid], store)
    s_ref = c_ref = 0.0
    for i in np.nonzero(client_index == cid)[0]:
      params = personal(base, server, cs, jnp.asarray(tokens[i]), jnp.asarray(mask[i]))
      si, ci = token_nll(apply(params, jnp.asarray(tokens[i:i + 1])), tokens[i:i + 1], mask[i:i + 1])
      s_ref, c_ref = s_ref + float(si), c_ref + float(ci)
    np.testing.assert_allclose(s[j], s_ref, rtol=1e-5)
    assert float(c[j]) == c_ref
  assert np.all(np.isfinite(np.asarray(s)))  # padded rows (all-zero mask) contribute nothing, never NaN
  stats = train.client_loss_stats("eval/personal_", np.asarray(s), np.asarray(c))
  np.testing.assert_allclose(stats["eval/personal_loss"], float(np.sum(s) / np.sum(c)), rtol=1e-6)


def test_round_conformance():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=R_MAX)
  check_round_conformance(_algorithm(loss_fn, local_start_round=0), base, trainable, num_clients=8)


@pytest.mark.parametrize("kwargs, message", [
    ({"r_max": 3}, r"r_max \(lora.rank\) must be an even integer >= 2, got 3"),
    ({"variant": "X"}, r"variant must be one of T, F \(FedDPA-T / FedDPA-F\), got 'X'"),
    ({"pooling": "max"}, r"pooling must be one of last, mean, got 'max'"),
    ({"representation": "global"}, r"representation must be one of frozen, local, got 'global'"),
    ({"update_weight": 1.5}, r"update_weight must be in \[0, 1\], got 1.5"),
    ({"max_local_weight": -0.1}, r"max_local_weight must be in \[0, 1\], got -0.1"),
    ({"num_reference": 0}, r"num_reference must be an integer >= 1, got 0"),
    ({"local_start_round": -1}, r"local_start_round must be an integer >= 0, got -1"),
    ({"hidden_size": 0}, r"hidden_size must be a positive integer, got 0"),
])
def test_bad_hyper_parameters_are_clear_errors(kwargs, message):
  _, _, _, loss_fn = tiny_lora_model(rank=R_MAX)
  with pytest.raises(ValueError, match=message):
    _algorithm(loss_fn, **kwargs)


def test_missing_model_is_a_clear_error():
  with pytest.raises(ValueError, match=r"feddpa computes instance representations with the model: pass peft="):
    _algorithm(lambda *a: None)


def test_smoke_run_logs_personalized_eval(tmp_path):
  from configs import feddpa as feddpa_config
  from fedjax_llm import train
  c = feddpa_config.get_config("smoke")
  c.fl.num_rounds = 2
  s = train.run(c, str(tmp_path), progress=False)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  evals = [r for r in rows if "eval/loss" in r]
  assert [r["round"] for r in evals] == [0, 2]
  for r in evals:
    for k in ("eval/personal_loss", "eval/personal_client_loss_mean", "eval/personal_client_loss_p10"):
      assert np.isfinite(r[k]), k
  # before any round no client has references: every instance uses the global adapter alone
  assert abs(evals[0]["eval/personal_loss"] - evals[0]["eval/loss"]) < 1e-6
  assert evals[1]["eval/personal_loss"] != evals[1]["eval/loss"]
  trains = [r for r in rows if "train/loss" in r]
  assert trains[0]["clients/local_loss"] == 0.0 and trains[1]["clients/local_loss"] > 0  # local from round 2
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["final_eval"]["eval/personal_loss"] == evals[-1]["eval/personal_loss"]
  assert np.isfinite(s["final_eval_loss"]) and s["algorithm"] == "feddpa"
  assert s["mean_bytes_up_per_client_round"] == pytest.approx(s["trainable_bytes"] / 2)
