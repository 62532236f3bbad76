"""HetLoRA on hand-computed toy matrices: truncation, zero-padding, norm weights, self-pruning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm.algorithms import hetlora
from fedjax_llm.algorithms.hetlora import norm_weighted_aggregate, sample_client_ranks, tail_norm_product
from fedjax_llm.core.algorithm import init_server_state
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.types import ClientBatches, ClientInfo


def test_truncation_masks_columns_of_a_and_rows_of_b():
  a = jnp.arange(12.0).reshape(3, 4)  # [d_in=3, r_max=4]
  b = jnp.arange(8.0).reshape(4, 2) + 1  # [r_max=4, d_out=2]
  out = lora_lib.rank_mask({"m": {"lora_a": a, "lora_b": b}}, 2)["m"]
  np.testing.assert_array_equal(out["lora_a"], [[0, 1, 0, 0], [4, 5, 0, 0], [8, 9, 0, 0]])
  np.testing.assert_array_equal(out["lora_b"], [[1, 2], [3, 4], [0, 0], [0, 0]])


def test_norm_weighted_aggregation_by_hand():
  # Client 1: rank 1, a = e1 column, b row 0 = (3, 4): ||a b||_F = 5.
  a1 = jnp.zeros((2, 2)).at[0, 0].set(1.0)
  b1 = jnp.zeros((2, 2)).at[0].set(jnp.array([3.0, 4.0]))
  # Client 2: rank 2, a = I, b = diag(0, 15): ||a b||_F = 15.
  a2 = jnp.eye(2)
  b2 = jnp.diag(jnp.array([0.0, 15.0]))
  # Client 3: empty slot (weight 0) with a huge product: must be ignored.
  a3, b3 = 100 * jnp.ones((2, 2)), 100 * jnp.ones((2, 2))
  outputs = {"m": {"lora_a": jnp.stack([a1, a2, a3]), "lora_b": jnp.stack([b1, b2, b3])}}
  got = norm_weighted_aggregate(outputs, jnp.array([10.0, 1.0, 0.0]))["m"]
  p1, p2 = 5 / 20, 15 / 20  # data weights (10 vs 1) are NOT used: sparsity weights only
  np.testing.assert_allclose(got["lora_a"], p1 * a1 + p2 * a2, rtol=1e-6)
  np.testing.assert_allclose(got["lora_b"], p1 * b1 + p2 * b2, rtol=1e-6)
  # zero padding dilutes: row 1 of B only comes from client 2, scaled by p2
  np.testing.assert_allclose(got["lora_b"][1], [0.0, p2 * 15.0], rtol=1e-6)
  # scale does not change normalized weights
  got_s = norm_weighted_aggregate(outputs, jnp.array([10.0, 1.0, 0.0]), scale=3.0)["m"]
  np.testing.assert_allclose(got_s["lora_a"], got["lora_a"], rtol=1e-6)


def test_all_zero_products_fall_back_to_data_weights():
  outputs = {"m": {"lora_a": jnp.stack([jnp.ones((2, 2)), 3 * jnp.ones((2, 2))]),
                   "lora_b": jnp.zeros((2, 2, 2))}}
  got = norm_weighted_aggregate(outputs, jnp.array([1.0, 3.0]))["m"]
  np.testing.assert_allclose(got["lora_a"], (0.25 * 1 + 0.75 * 3) * np.ones((2, 2)), rtol=1e-6)


def test_tail_norm_product_by_hand():
  a = jnp.zeros((2, 4)).at[:, 2].set(jnp.array([3.0, 4.0]))  # ||a[:, 2]|| = 5
  b = jnp.zeros((4, 3)).at[2].set(jnp.array([0.0, 0.0, 2.0])).at[3].set(jnp.array([1.0, 0.0, 0.0]))
  tree = {"m": {"lora_a": a, "lora_b": b}}
  np.testing.assert_allclose(tail_norm_product(tree, 4, 2), 5.0 * np.sqrt(5.0), rtol=1e-6)
  np.testing.assert_allclose(tail_norm_product(tree, 3, 2), 5.0 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(tail_norm_product(tree, 2, 2), 0.0, atol=1e-10)


def _toy_client(prune_lambda, data_loss):
  """HetLoRA on a toy 'model' whose loss is a function of the LoRA tree only."""
  def loss_fn(base, params, tokens, mask, key):
    return data_loss(params), {"nll_sum": jnp.zeros(()), "tokens": jnp.ones(())}
  alg = hetlora(loss_fn, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
                client_ranks=np.array([4]), r_max=4, prune_gamma=0.5, prune_lambda=prune_lambda)
  key = jax.random.key(0)
  tree = {"m": {"lora_a": jax.random.normal(key, (3, 4)), "lora_b": jax.random.normal(jax.random.key(1), (4, 2))}}
  server = init_server_state(tree, optax.sgd(1.0))
  batches = ClientBatches(jnp.zeros((5, 1, 2), jnp.int32), jnp.ones((5, 1, 2)))
  info = ClientInfo(jnp.int32(0), jnp.int32(5), jnp.float32(5))
  state = alg.init_client(tree, info)
  assert int(state["rank"]) == 4
  return alg.client_update(None, server, state, batches, info, key)


def test_self_pruning_shrinks_rank_when_tail_norm_falls():
  out, state, metrics = _toy_client(1.0, lambda p: jnp.zeros(()))  # only the regularizer: tail shrinks
  assert int(state["rank"]) == 2  # floor(0.5 * 4)
  np.testing.assert_array_equal(out["m"]["lora_a"][:, 2:], 0.0)  # pruned tail not uploaded
  np.testing.assert_array_equal(out["m"]["lora_b"][2:], 0.0)
  assert float(metrics["sum_pruned"]) == 1.0
  assert float(metrics["sum_bytes_up"]) == 4 * 2 * (3 + 2) and float(metrics["sum_bytes_down"]) == 4 * 4 * (3 + 2)


def test_no_pruning_when_tail_norm_grows():
  grow = lambda p: -10.0 * jnp.sum(p["m"]["lora_b"][2:] ** 2)  # the data loss pushes the tail up
  _, state, metrics = _toy_client(1e-3, grow)
  assert int(state["rank"]) == 4 and float(metrics["sum_pruned"]) == 0.0


def test_rank_above_r_max_is_a_clear_error():
  with pytest.raises(ValueError, match=r"client rank 16 is outside \[1, r_max=8\]"):
    hetlora(lambda *a: None, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
            client_ranks=np.array([2, 16]), r_max=8)


def test_sample_client_ranks_follows_distribution():
  ranks = sample_client_ranks(20000, rank_choices=(2, 4, 8), rank_probs=(0.5, 0.3, 0.2), seed=0)
  frac = [np.mean(ranks == r) for r in (2, 4, 8)]
  np.testing.assert_allclose(frac, [0.5, 0.3, 0.2], atol=0.015)  # ~4.6 sigma at n = 20000
  np.testing.assert_array_equal(ranks, sample_client_ranks(20000, rank_choices=(2, 4, 8),
                                                            rank_probs=(0.5, 0.3, 0.2), seed=0))


def test_pruned_ranks_persist_in_the_client_store_across_rounds():
  """Through the compiled round: a pruned client comes back next round at its pruned rank."""
  from fedjax_llm.core import client_store as store_lib
  from fedjax_llm.core.round import CohortData, build_round

  def loss_fn(base, params, tokens, mask, key):  # only the self-pruning regularizer acts
    return jnp.zeros(()), {"nll_sum": jnp.zeros(()), "tokens": jnp.sum(mask)}
  alg = hetlora(loss_fn, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
                client_ranks=np.array([4, 4, 2, 4]), r_max=4, prune_gamma=0.5, prune_lambda=1.0)
  tree = {"m": {"lora_a": jax.random.normal(jax.random.key(0), (3, 4)),
                "lora_b": jax.random.normal(jax.random.key(1), (4, 2))}}
  server = alg.init(tree, None)
  store = store_lib.init_store(alg.init_client, tree, 4)
  step = build_round(alg, chunk_size=2, donate=False)

  def cohort(ids):
    c = len(ids)
    ones = jnp.ones((c,), jnp.float32)
    return CohortData(jnp.zeros((c, 3, 1, 2), jnp.int32), jnp.ones((c, 3, 1, 2)), jnp.full((c,), 3, jnp.int32),
                      ones, ones)

  server, store, m = step(None, server, store, jnp.array([0, 2]), cohort([0, 2]), jax.random.key(0))
  np.testing.assert_array_equal(store["rank"], [2, 4, 1, 4])  # floor(0.5 * 4) = 2, floor(0.5 * 2) = 1
  assert float(m["sum_pruned"]) == 2.0
  server, store, m = step(None, server, store, jnp.array([0, 3]), cohort([0, 3]), jax.random.key(1))
  # Client 0 started this round at rank 2 (its tail, column 1, shrank again -> rank 1). Client 3 keeps rank 4:
  # round 1's cohort uploaded nothing above rank 2, so zero-padded aggregation left the global tail
  # (columns 2-3) exactly zero, and a zero tail cannot shrink.
  np.testing.assert_array_equal(store["rank"], [1, 4, 1, 4])
  np.testing.assert_array_equal(server.params["m"]["lora_b"][2:], 0.0)
  np.testing.assert_allclose(m["sum_bytes_down"], 4.0 * (2 + 4) * (3 + 2))
