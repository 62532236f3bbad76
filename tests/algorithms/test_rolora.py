"""RoLoRA: even rounds train/average only B, odd rounds only A; the frozen factor is bit-identical."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import rolora as rolora_config
from fedjax_llm import train
from fedjax_llm.algorithms.rolora import freeze_factor, rolora, trains_b
from fedjax_llm.core.round import build_round
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import assert_trees_close, random_cohort, tiny_lora_model


def _toy_tree(a, b):
  return {"m": {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}}


def _bilinear_loss(target):
  def loss_fn(base, params, tokens, mask, key):
    del base, key
    m = params["m"]
    loss = 0.5 * jnp.sum(jnp.square(m["lora_a"] @ m["lora_b"] - target))
    return loss, {"nll_sum": loss, "tokens": jnp.sum(mask)}
  return loss_fn


def _same(x, y) -> bool:
  return all(bool(jnp.array_equal(u, v)) for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def test_parity_and_freeze_factor_by_hand():
  assert [bool(trains_b(t)) for t in range(4)] == [True, False, True, False]
  p, s = _toy_tree([[1.0]], [[2.0]]), _toy_tree([[3.0]], [[4.0]])
  assert _same(freeze_factor(p, s, True), _toy_tree([[3.0]], [[2.0]]))  # train b: a from the start
  assert _same(freeze_factor(p, s, jnp.bool_(False)), _toy_tree([[1.0]], [[4.0]]))


@pytest.mark.parametrize("round_idx", [0, 1, 2, 3])
def test_one_local_step_trains_only_the_rounds_factor_by_hand(round_idx):
  # a = [1, 2, 0]^T, b = [1, 0], target T = [[1, 0], [0, 1], [0, 0]]: R = a b - T = [[0, 0], [2, -1], [0, 0]],
  # dL/db = a^T R = [4, -2], dL/da = R b^T = [0, 2, 0]^T. SGD lr 0.1.
  target = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
  alg = rolora(_bilinear_loss(target), client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0))
  tree = _toy_tree([[1.0], [2.0], [0.0]], [[1.0, 0.0]])
  server = alg.init(tree, None)._replace(round=jnp.int32(round_idx))
  batches = ClientBatches(jnp.zeros((1, 1, 2), jnp.int32), jnp.ones((1, 1, 2)))
  out, _, m = alg.client_update(None, server, {}, batches, ClientInfo(jnp.int32(0), jnp.int32(1), jnp.float32(1)),
                                jax.random.key(0))
  if round_idx % 2 == 0:
    np.testing.assert_allclose(out["m"]["lora_b"], [[0.6, 0.2]], rtol=1e-6)
    np.testing.assert_array_equal(out["m"]["lora_a"], tree["m"]["lora_a"])
    assert float(m["sum_bytes_up"]) == 2 * 4 and float(m["trained_b"]) == 1.0  # b: 2 floats
  else:
    np.testing.assert_allclose(out["m"]["lora_a"], [[1.0], [1.8], [0.0]], rtol=1e-6)
    np.testing.assert_array_equal(out["m"]["lora_b"], tree["m"]["lora_b"])
    assert float(m["sum_bytes_up"]) == 3 * 4 and float(m["trained_b"]) == 0.0  # a: 3 floats
  assert float(m["sum_bytes_down"]) == 5 * 4  # a stateless client needs both factors


def test_frozen_factor_is_bit_identical_under_adamw_weight_decay():
  """Weight decay moves every parameter it sees; the projected (frozen) factor still comes back unchanged."""
  alg = rolora(_bilinear_loss(jnp.ones((2, 2))), client_optimizer=optax.adamw(0.1, weight_decay=0.5),
               server_optimizer=optax.sgd(1.0))
  tree = _toy_tree([[0.3], [-0.7]], [[0.5, 0.25]])
  batches = ClientBatches(jnp.zeros((4, 1, 2), jnp.int32), jnp.ones((4, 1, 2)))
  info = ClientInfo(jnp.int32(0), jnp.int32(4), jnp.float32(4))
  for r, frozen, trained in ((0, "lora_a", "lora_b"), (1, "lora_b", "lora_a")):
    server = alg.init(tree, None)._replace(round=jnp.int32(r))
    out, _, _ = alg.client_update(None, server, {}, batches, info, jax.random.key(0))
    np.testing.assert_array_equal(out["m"][frozen], tree["m"][frozen])
    assert not np.allclose(out["m"][trained], tree["m"][trained])


def test_aggregate_by_hand_alternates_and_is_exact_in_the_product():
  alg = rolora(None, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0))
  a = jnp.array([[1.0, 2.0], [0.0, -1.0]])
  b = jnp.array([[1.0, 1.0], [2.0, 0.0]])
  server = alg.init(_toy_tree(a, b), None)
  w = jnp.array([1.0, 3.0, 0.0])  # third slot empty
  # round 0: clients return the frozen a unchanged and their own b_k
  b1, b2 = jnp.array([[0.0, 4.0], [4.0, 0.0]]), jnp.array([[4.0, 0.0], [0.0, 8.0]])
  outs = {"m": {"lora_a": jnp.stack([a, a, a]), "lora_b": jnp.stack([b1, b2, 99 * jnp.ones((2, 2))])}}
  s1, m1 = alg.aggregate(server, outs, w)
  np.testing.assert_array_equal(s1.params["m"]["lora_a"], a)
  np.testing.assert_allclose(s1.params["m"]["lora_b"], [[3.0, 1.0], [1.0, 6.0]], rtol=1e-6)
  np.testing.assert_allclose(s1.params["m"]["lora_a"] @ s1.params["m"]["lora_b"],
                             0.25 * a @ b1 + 0.75 * a @ b2, rtol=1e-6)
  assert int(s1.round) == 1
  # round 1: clients return the frozen b' unchanged and their own a_k
  bb = s1.params["m"]["lora_b"]
  a1, a2 = jnp.array([[4.0, 0.0], [0.0, 0.0]]), jnp.array([[0.0, 4.0], [8.0, 4.0]])
  outs = {"m": {"lora_a": jnp.stack([a1, a2, 99 * jnp.ones((2, 2))]), "lora_b": jnp.stack([bb, bb, bb])}}
  s2, m2 = alg.aggregate(s1, outs, w)
  np.testing.assert_array_equal(s2.params["m"]["lora_b"], bb)
  np.testing.assert_allclose(s2.params["m"]["lora_a"], [[1.0, 3.0], [6.0, 3.0]], rtol=1e-6)
  np.testing.assert_allclose(s2.params["m"]["lora_a"] @ bb, 0.25 * a1 @ bb + 0.75 * a2 @ bb, rtol=1e-6)
  np.testing.assert_allclose(m2["update_norm"], np.linalg.norm(np.array([[1.0, 3.0], [6.0, 3.0]]) - a), rtol=1e-6)


def test_tiny_model_rounds_alternate_with_bit_identical_frozen_factor():
  _, base, trainable, loss_fn = tiny_lora_model(rank=3, nonzero_b=True)
  alg = rolora(loss_fn, client_optimizer=optax.adamw(0.02, weight_decay=0.1), server_optimizer=optax.adam(0.05))
  step = build_round(alg, chunk_size=2, donate=False)
  client = jax.jit(alg.client_update)
  ids = np.array([0, 3], np.int32)
  server = alg.init(trainable, None)
  seen = []
  for r in range(3):
    data = random_cohort(ids, seed=r)
    key = jax.random.key(r)
    outs = [client(base, server, {}, ClientBatches(data.tokens[c], data.mask[c]),
                   ClientInfo(jnp.int32(cid), data.num_steps[c], data.num_tokens[c]), jax.random.fold_in(key, cid))[0]
            for c, cid in enumerate(ids)]
    new, _, m = step(base, server, {}, jnp.asarray(ids), data, key)
    frozen, trained = ("lora_a", "lora_b") if r % 2 == 0 else ("lora_b", "lora_a")
    seen.append(float(m["trained_b"]))
    # the frozen factor: bit-identical in every client output and in the new server state
    for o in outs:
      assert _same(lora_lib.select_factors(o, frozen), lora_lib.select_factors(server.params, frozen))
    assert _same(lora_lib.select_factors(new.params, frozen), lora_lib.select_factors(server.params, frozen))
    assert not np.allclose(jax.tree.leaves(lora_lib.select_factors(new.params, trained))[0],
                           jax.tree.leaves(lora_lib.select_factors(server.params, trained))[0])
    # uploads: only the trained factor (rank 3: a 2 x (32 + 32) x 3 floats, b 2 x 3 x (32 + 16))
    up = 4 * (2 * 3 * (32 + 16) if trained == "lora_b" else 2 * 2 * 32 * 3)
    assert float(m["sum_bytes_up"]) == 2 * up and float(m["sum_bytes_down"]) == 2 * 4 * 2 * 3 * (64 + 48)
    server = new
  assert seen == [1.0, 0.0, 1.0]
  # one server optimizer state per factor, stepped only on its own rounds (b: rounds 0 and 2, a: round 1)
  assert int(server.opt_state["lora_b"][0].count) == 2 and int(server.opt_state["lora_a"][0].count) == 1


def test_tiny_model_aggregated_product_is_exact_with_fedavg():
  _, base, trainable, loss_fn = tiny_lora_model(rank=3, nonzero_b=True)
  alg = rolora(loss_fn, client_optimizer=optax.adam(0.05), server_optimizer=optax.sgd(1.0))
  client = jax.jit(alg.client_update)
  ids = np.array([0, 1, 2], np.int32)
  data = random_cohort(ids, steps=3)._replace(weights=jnp.array([1.0, 3.0, 6.0]))
  p = [0.1, 0.3, 0.6]
  server = alg.init(trainable, None)
  step = build_round(alg, chunk_size=3, donate=False)
  for r in range(2):  # a B round, then an A round
    key = jax.random.key(r)
    outs = [client(base, server, {}, ClientBatches(data.tokens[c], data.mask[c]),
                   ClientInfo(jnp.int32(cid), data.num_steps[c], data.num_tokens[c]), jax.random.fold_in(key, cid))[0]
            for c, cid in enumerate(ids)]
    server, _, _ = step(base, server, {}, jnp.asarray(ids), data, key)
    for path, m in lora_lib.lora_modules(server.params):
      mods = [dict(lora_lib.lora_modules(o))[path] for o in outs]
      mean_prod = sum(pk * (cm["lora_a"] @ cm["lora_b"]) for pk, cm in zip(p, mods))
      np.testing.assert_allclose(m["lora_a"] @ m["lora_b"], mean_prod, rtol=1e-4, atol=1e-6)


def test_round_conformance():
  _, base, trainable, loss_fn = tiny_lora_model(rank=2)
  alg = rolora(loss_fn, client_optimizer=optax.adamw(1e-2, weight_decay=0.1), server_optimizer=optax.adam(1e-2))
  check_round_conformance(alg, base, trainable, num_clients=8)


def test_tree_without_lora_modules_is_a_clear_error():
  alg = rolora(None, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0))
  with pytest.raises(ValueError, match=r"rolora needs LoRA modules .* top-level keys \['w'\]"):
    alg.init({"w": jnp.ones((2, 2))}, None)


def test_smoke_run_end_to_end(tmp_path):
  c = rolora_config.get_config("smoke")
  with c.unlocked():
    c.fl.num_rounds = 2
  s = train.run(c, str(tmp_path), progress=False)
  assert s["algorithm"] == "rolora" and s["rounds"] == 2
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "final_params_checksum"):
    assert np.isfinite(s[k]), k
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if "train/loss" in l]
  # smoke model (2 layers, rank 8, q 32 -> 32, v 32 -> 16): round 1 sends b, round 2 sends a
  assert [r["comm/bytes_up_per_client"] for r in rows] == [4 * 2 * 8 * (32 + 16), 4 * 2 * 2 * 32 * 8]
  assert [r["clients/trained_b"] for r in rows] == [1.0, 0.0]
