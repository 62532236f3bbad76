"""RBLA: per-rank-index averaging over the clients that have the index; replication padding."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import rbla as rbla_config
from fedjax_llm import tree as T
from fedjax_llm import train
from fedjax_llm.algorithms.hetlora import norm_weighted_aggregate
from fedjax_llm.algorithms.rbla import rank_based_aggregate, rbla
from fedjax_llm.core import client_store as store_lib
from fedjax_llm.core.round import build_round
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import random_cohort, tiny_lora_model


def _two_clients():
  """Client 1 rank 2, client 2 rank 4 (r_max 4), data weights 1 : 3."""
  a1 = jnp.zeros((3, 4)).at[:, :2].set(jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
  b1 = jnp.zeros((4, 2)).at[:2].set(jnp.array([[1.0, -1.0], [2.0, -2.0]]))
  a2 = jnp.arange(12.0).reshape(3, 4) + 10.0
  b2 = jnp.arange(8.0).reshape(4, 2) - 3.0
  outputs = {"m": {"lora_a": jnp.stack([a1, a2]), "lora_b": jnp.stack([b1, b2])}}
  prev = {"m": {"lora_a": jnp.full((3, 4), 7.0), "lora_b": jnp.full((4, 2), 7.0)}}
  return outputs, prev, jnp.array([2, 4]), jnp.array([1.0, 3.0]), (a1, b1, a2, b2)


@pytest.mark.parametrize("mode", ["rbla", "replication"])
def test_ranks_2_and_4_by_hand(mode):
  outputs, prev, ranks, weights, (a1, b1, a2, b2) = _two_clients()
  got = rank_based_aggregate(outputs, prev, ranks, weights, mode)["m"]
  # columns 0-1 of a (rows 0-1 of b): the weighted mean of both clients
  np.testing.assert_allclose(got["lora_a"][:, :2], 0.25 * a1[:, :2] + 0.75 * a2[:, :2], rtol=1e-6)
  np.testing.assert_allclose(got["lora_b"][:2], 0.25 * b1[:2] + 0.75 * b2[:2], rtol=1e-6)
  # columns 2-3 (rows 2-3): only the rank-4 client has them: exactly its values (two rank levels: the
  # replication padding copies them into client 1's slots, so both modes agree)
  np.testing.assert_array_equal(got["lora_a"][:, 2:], a2[:, 2:])
  np.testing.assert_array_equal(got["lora_b"][2:], b2[2:])


def test_zero_padding_dilutes_what_rbla_keeps():
  outputs, prev, ranks, weights, (a1, b1, a2, b2) = _two_clients()
  zero_pad = T.tree_weighted_mean(outputs, weights)["m"]  # FedAvg of zero-padded factors
  np.testing.assert_allclose(zero_pad["lora_a"][:, 2:], 0.75 * a2[:, 2:], rtol=1e-6)  # diluted by p_2 = 3/4
  het = norm_weighted_aggregate(outputs, weights)["m"]  # HetLoRA: norm weights, still zero padding
  p2 = float(jnp.linalg.norm(a2 @ b2) / (jnp.linalg.norm(a1 @ b1) + jnp.linalg.norm(a2 @ b2)))
  np.testing.assert_allclose(het["lora_b"][2:], p2 * b2[2:], rtol=1e-5)
  assert p2 < 1
  got = rank_based_aggregate(outputs, prev, ranks, weights)["m"]
  np.testing.assert_array_equal(got["lora_b"][2:], b2[2:])  # not diluted


@pytest.mark.parametrize("mode", ["rbla", "replication"])
def test_uncovered_indices_keep_the_previous_global_value_and_empty_slots_are_ignored(mode):
  outputs, prev, _, _, (a1, b1, a2, b2) = _two_clients()
  # client 2 is now an empty slot (weight 0) despite its rank 4: only client 1 (rank 2) counts
  got = rank_based_aggregate(outputs, prev, jnp.array([2, 4]), jnp.array([1.0, 0.0]), mode)["m"]
  np.testing.assert_allclose(got["lora_a"][:, :2], a1[:, :2], rtol=1e-6)
  np.testing.assert_array_equal(got["lora_a"][:, 2:], 7.0)
  np.testing.assert_array_equal(got["lora_b"][2:], 7.0)


def test_replication_with_three_rank_levels_pads_from_the_top_rank_clients():
  """Ranks 1, 2, 4 (weights 1, 2, 1): index 1 is covered by the rank-2 and rank-4 clients. RBLA averages those
  two; replication pads the rank-1 client's index 1 with the top (rank-4) client's value."""
  x = jnp.array([[10.0, 0.0, 0.0, 0.0], [20.0, 21.0, 0.0, 0.0], [40.0, 41.0, 42.0, 43.0]])  # [C, r]
  outputs = {"m": {"lora_a": x[:, None, :], "lora_b": x[:, :, None]}}  # a [C, 1, 4], b [C, 4, 1]
  prev = {"m": {"lora_a": jnp.zeros((1, 4)), "lora_b": jnp.zeros((4, 1))}}
  ranks, w = jnp.array([1, 2, 4]), jnp.array([1.0, 2.0, 1.0])
  rb = rank_based_aggregate(outputs, prev, ranks, w, "rbla")["m"]["lora_a"][0]
  rep = rank_based_aggregate(outputs, prev, ranks, w, "replication")["m"]["lora_a"][0]
  np.testing.assert_allclose(rb, [(10 + 40 + 40) / 4, (2 * 21 + 41) / 3, 42, 43], rtol=1e-6)
  np.testing.assert_allclose(rep, [(10 + 40 + 40) / 4, (41 + 2 * 21 + 41) / 4, 42, 43], rtol=1e-6)
  np.testing.assert_allclose(rank_based_aggregate(outputs, prev, ranks, w, "replication")["m"]["lora_b"][:, 0],
                             rep, rtol=1e-6)


@pytest.mark.parametrize("mode", ["rbla", "replication"])
def test_tiny_model_round_aggregates_rank_by_rank(mode):
  peft, base, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0, nonzero_b=True)
  ranks = [1, 2, 2, 4]
  alg = rbla(loss_fn, client_optimizer=optax.sgd(0.3), server_optimizer=optax.sgd(1.0),
             client_ranks=np.asarray(ranks), r_max=4, mode=mode)
  ids = np.array([0, 1, 2, 3], np.int32)
  data = random_cohort(ids, steps=2)._replace(weights=jnp.array([1.0, 2.0, 3.0, 4.0]))
  server = alg.init(trainable, None)
  store = store_lib.init_store(alg.init_client, trainable, 4)
  key = jax.random.key(2)
  client_update = jax.jit(alg.client_update)
  outs = []
  for c, cid in enumerate(ids):
    info = ClientInfo(jnp.int32(cid), data.num_steps[c], data.num_tokens[c])
    out, _, m = client_update(base, server, jax.tree.map(lambda x: x[c], store),
                              ClientBatches(data.tokens[c], data.mask[c]), info, jax.random.fold_in(key, cid))
    outs.append(dict(lora_lib.lora_modules(out["lora"])))
    # 2 layers, q_proj 32x32 and v_proj 32x16: r_k (d_in + d_out) float32 numbers each
    np.testing.assert_allclose(m["sum_bytes_up"], 4.0 * ranks[c] * 2 * ((32 + 32) + (32 + 16)))
  new, _, _ = build_round(alg, chunk_size=2, donate=False)(base, server, store, jnp.asarray(ids), data, key)
  w = np.array([1.0, 2.0, 3.0, 4.0])
  for path, m in lora_lib.lora_modules(new.params):
    a = np.stack([np.asarray(o[path]["lora_a"]) for o in outs])
    for i in range(4):
      cov = np.array([r > i for r in ranks])
      if mode == "rbla" or i == 0:
        expected = (w[cov, None] * a[cov, :, i]).sum(0) / w[cov].sum()
      else:  # pad the non-covering clients with the rank-4 client's column
        expected = ((w[cov, None] * a[cov, :, i]).sum(0) + w[~cov].sum() * a[3, :, i]) / w.sum()
      np.testing.assert_allclose(m["lora_a"][:, i], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["lora_b"][3], outs[3][path]["lora_b"][3], rtol=1e-6)  # the top client's row


def test_round_conformance():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0)
  alg = rbla(loss_fn, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
             client_ranks=np.array([1, 2, 4, 3, 2, 4, 1, 4]), r_max=4)
  check_round_conformance(alg, base, trainable, num_clients=8)


def test_bad_hyper_parameters_are_clear_errors():
  kw = dict(client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), r_max=4)
  with pytest.raises(ValueError, match=r"rbla mode='zero'; allowed: rbla, replication"):
    rbla(None, client_ranks=np.array([2]), mode="zero", **kw)
  with pytest.raises(ValueError, match=r"rbla: client rank 5 is outside \[1, r_max=4\]"):
    rbla(None, client_ranks=np.array([5]), **kw)
  _, _, trainable, loss_fn = tiny_lora_model(rank=2, alpha=8.0)
  with pytest.raises(ValueError, match=r"rbla: the LoRA modules have rank 2 but r_max=4"):
    rbla(loss_fn, client_ranks=np.array([2]), **kw).init(trainable, None)


def test_smoke_run_end_to_end(tmp_path):
  c = rbla_config.get_config("smoke")
  c.fl.num_rounds = 2
  c.eval.every = 1
  c.rbla.mode = "replication"
  s = train.run(c, str(tmp_path), progress=False)
  assert s["algorithm"] == "rbla" and s["rounds"] == 2
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "total_bytes_up", "total_bytes_down",
            "final_params_checksum"):
    assert math.isfinite(s[k]), k
  assert s["total_bytes_up"] > 0 and s["total_bytes_up"] == s["total_bytes_down"]
  assert s["final_eval_loss"] != s["initial_eval_loss"]
