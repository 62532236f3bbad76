"""FedSA-LoRA: A averaged, each client's B private in the client store, personal models (a', b_k)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import fedsa_lora as fedsa_config
from fedjax_llm import train
from fedjax_llm.algorithms.fedsa_lora import fedsa_lora
from fedjax_llm.core import client_store as store_lib
from fedjax_llm.core.round import build_round
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import assert_trees_close, random_cohort, tiny_lora_model


def _toy_tree(a, b):
  return {"m": {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}}


def _bilinear_loss(params_target):
  def loss_fn(base, params, tokens, mask, key):
    del base, key
    m = params["m"]
    loss = 0.5 * jnp.sum(jnp.square(m["lora_a"] @ m["lora_b"] - params_target))
    return loss, {"nll_sum": loss, "tokens": jnp.sum(mask)}
  return loss_fn


def test_client_trains_both_factors_from_its_own_b_by_hand():
  # a = [1, 2]^T, the client's stored b = [1, 0], target I: R = a b - I = [[0, 0], [2, -1]],
  # dL/da = R b^T = [0, 2]^T, dL/db = a^T R = [4, -2]; lr 0.1 -> a = [1, 1.8]^T, b = [0.6, 0.2].
  alg = fedsa_lora(_bilinear_loss(jnp.eye(2)), client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0))
  tree = _toy_tree([[1.0], [2.0]], [[0.0, 0.0]])
  server = alg.init(tree, None)
  state = {"b": {"m": {"lora_b": jnp.array([[1.0, 0.0]])}}}
  batches = ClientBatches(jnp.zeros((1, 1, 2), jnp.int32), jnp.ones((1, 1, 2)))
  out, new_state, m = alg.client_update(None, server, state, batches, ClientInfo(jnp.int32(0), jnp.int32(1),
                                                                                jnp.float32(1)), jax.random.key(0))
  np.testing.assert_allclose(out["m"]["lora_a"], [[1.0], [1.8]], rtol=1e-6)
  np.testing.assert_allclose(new_state["b"]["m"]["lora_b"], [[0.6, 0.2]], rtol=1e-6)
  assert float(m["sum_bytes_up"]) == float(m["sum_bytes_down"]) == 2 * 4  # a only
  np.testing.assert_array_equal(alg.init_client(tree, None)["b"]["m"]["lora_b"], [[0.0, 0.0]])  # initial b


def test_aggregate_by_hand_averages_a_and_keeps_the_b_mean_as_a_diagnostic():
  alg = fedsa_lora(None, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0))
  server = alg.init(_toy_tree(jnp.zeros((2, 1)), jnp.zeros((1, 2))), None)
  outputs = {"m": {"lora_a": jnp.array([[[1.0], [2.0]], [[5.0], [-2.0]], [[99.0], [99.0]]]),
                   "lora_b": jnp.array([[[4.0, 0.0]], [[0.0, 8.0]], [[99.0, 99.0]]])}}
  new, m = alg.aggregate(server, outputs, jnp.array([1.0, 3.0, 0.0]))  # slot 3 is empty
  np.testing.assert_allclose(new.params["m"]["lora_a"], [[4.0], [-1.0]], rtol=1e-6)  # 0.25 a1 + 0.75 a2
  assert set(new.params["m"]) == {"lora_a"}  # the server's trained state is A only
  np.testing.assert_allclose(new.extra["b_mean"]["m"]["lora_b"], [[1.0, 6.0]], rtol=1e-6)
  np.testing.assert_allclose(alg.eval_params(new)["m"]["lora_b"], [[1.0, 6.0]], rtol=1e-6)
  np.testing.assert_allclose(m["update_norm"], np.sqrt(17.0), rtol=1e-6)
  # a round with no client keeps the previous diagnostic b
  empty, _ = alg.aggregate(new, outputs, jnp.zeros(3))
  np.testing.assert_array_equal(empty.extra["b_mean"]["m"]["lora_b"], [[1.0, 6.0]])


def test_tiny_model_b_stays_private_and_persists_across_participations():
  _, base, trainable, loss_fn = tiny_lora_model(rank=2)
  alg = fedsa_lora(loss_fn, client_optimizer=optax.adam(0.05), server_optimizer=optax.sgd(1.0))
  n = 6
  server0 = alg.init(trainable, None)
  store = store_lib.init_store(alg.init_client, trainable, n)
  b0 = lora_lib.select_factors(trainable, "lora_b")
  step = build_round(alg, chunk_size=2, donate=False)
  client = jax.jit(alg.client_update)

  def cohort(ids, seed):
    return random_cohort(np.asarray(ids, np.int32), seed=seed)._replace(weights=jnp.array([1.0, 3.0]))

  def manual(server, state, ids, data, key, c):
    info = ClientInfo(jnp.int32(ids[c]), data.num_steps[c], data.num_tokens[c])
    return client(base, server, state, ClientBatches(data.tokens[c], data.mask[c]), info,
                  jax.random.fold_in(key, ids[c]))

  # Round 1: clients 0 and 1.
  ids1, d1, k1 = [0, 1], cohort([0, 1], 1), jax.random.key(1)
  outs = [manual(server0, {"b": b0}, ids1, d1, k1, c) for c in range(2)]
  server1, store1, m1 = step(base, server0, store, jnp.asarray(ids1), d1, k1)
  # a is the weighted mean of the uploaded a_k (FedAvg), the diagnostic b the weighted mean of the b_k
  expect_a = jax.tree.map(lambda x, y: 0.25 * x + 0.75 * y, *[lora_lib.select_factors(o[0], "lora_a") for o in outs])
  assert_trees_close(server1.params, expect_a, rtol=2e-4, atol=1e-5)
  expect_b = jax.tree.map(lambda x, y: 0.25 * x + 0.75 * y, *[o[1]["b"] for o in outs])
  assert_trees_close(server1.extra["b_mean"], expect_b, rtol=2e-4, atol=1e-5)
  # the store holds each participant's own trained b; everyone else still has the initial b (zeros)
  for c, cid in enumerate(ids1):
    assert_trees_close(jax.tree.map(lambda x: x[cid], store1["b"]), outs[c][1]["b"], rtol=2e-4, atol=1e-5)
    assert float(jnp.abs(jax.tree.leaves(outs[c][1]["b"])[0]).max()) > 0
  for cid in (2, 3, 4, 5):
    assert all(float(jnp.abs(x[cid]).max()) == 0.0 for x in jax.tree.leaves(store1["b"]))
  a_bytes = 4 * (2 * 2) * 32 * 2  # 2 layers x (q, v), each lora_a [32, rank 2]
  assert float(m1["sum_bytes_up"]) == float(m1["sum_bytes_down"]) == 2 * a_bytes  # b is never counted

  # Round 2: clients 2 and 3. Client 0's b is untouched, bit for bit.
  server2, store2, _ = step(base, server1, store1, jnp.array([2, 3]), cohort([2, 3], 2), jax.random.key(2))
  b_client0 = jax.tree.map(lambda x: x[0], store1["b"])
  for x, y in zip(jax.tree.leaves(store2["b"]), jax.tree.leaves(store1["b"])):
    np.testing.assert_array_equal(x[:2], y[:2])
  # personal_params: the global a with the client's OWN b
  personal = alg.personal_params(base, server2, jax.tree.map(lambda x: x[0], store2), None, None)
  assert_trees_close(personal, lora_lib.merge_trees(server2.params, b_client0), rtol=0, atol=0)
  other = alg.personal_params(base, server2, jax.tree.map(lambda x: x[1], store2), None, None)
  assert not np.allclose(jax.tree.leaves(lora_lib.select_factors(other, "lora_b"))[0],
                         jax.tree.leaves(lora_lib.select_factors(personal, "lora_b"))[0])

  # Round 3: client 0 again; it starts from (a after round 2, its b from the end of round 1).
  ids3, d3, k3 = [0, 4], cohort([0, 4], 3), jax.random.key(3)
  _, store3, _ = step(base, server2, store2, jnp.asarray(ids3), d3, k3)
  _, resumed, _ = manual(server2, {"b": b_client0}, ids3, d3, k3, 0)
  _, fresh, _ = manual(server2, {"b": b0}, ids3, d3, k3, 0)
  got = jax.tree.map(lambda x: x[0], store3["b"])
  assert_trees_close(got, resumed["b"], rtol=2e-4, atol=1e-5)
  assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(fresh["b"])[0], atol=1e-4)


def test_round_conformance():
  _, base, trainable, loss_fn = tiny_lora_model(rank=2)
  alg = fedsa_lora(loss_fn, client_optimizer=optax.adamw(1e-2, weight_decay=0.1), server_optimizer=optax.adam(1e-2))
  check_round_conformance(alg, base, trainable, num_clients=8)


def test_tree_without_lora_modules_is_a_clear_error():
  alg = fedsa_lora(None, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0))
  with pytest.raises(ValueError, match=r"fedsa_lora needs LoRA modules .* top-level keys \['w'\]"):
    alg.init({"w": jnp.ones((2, 2))}, None)


def test_smoke_run_end_to_end(tmp_path):
  c = fedsa_config.get_config("smoke")
  with c.unlocked():
    c.fl.num_rounds = 2
  s = train.run(c, str(tmp_path), progress=False)
  assert s["algorithm"] == "fedsa_lora" and s["rounds"] == 2
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "final_params_checksum"):
    assert np.isfinite(s[k]), k
  assert np.isfinite(s["final_eval"]["eval/personal_loss"])  # each eval client with its own b
  # the smoke model: 2 layers, rank 8, q and v with d_in 32: a holds 2 * 2 * 32 * 8 floats
  assert s["mean_bytes_up_per_client_round"] == 4 * 2 * 2 * 32 * 8
