"""FLoRA: the stacking identity, the merged kernel update of a round, the LoRA restart, bytes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import flora as flora_config
from fedjax_llm import train
from fedjax_llm.algorithms.flora import flora, merged_update, stack_modules, stacked_download_bytes
from fedjax_llm.core import client_store as store_lib
from fedjax_llm.core.round import build_round
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import random_cohort, tiny_lora_model


def test_stacking_identity_mixed_ranks_and_scales():
  rng = np.random.default_rng(0)
  d_in, d_out, alpha = 5, 3, 8.0
  ranks = [1, 3, 2]
  a_list = [rng.normal(size=(d_in, r)) for r in ranks]
  b_list = [rng.normal(size=(r, d_out)) for r in ranks]
  p = np.array([0.2, 0.5, 0.3])
  scales = [alpha / r for r in ranks]  # scale="rank": 8, 8/3, 4
  a_stack, b_stack = stack_modules(a_list, b_list, p, scales)
  assert a_stack.shape == (d_in, 6) and b_stack.shape == (6, d_out)  # sum of ranks = 6 components
  expected = sum(pk * sk * a @ b for pk, sk, a, b in zip(p, scales, a_list, b_list))
  np.testing.assert_allclose(np.asarray(a_stack @ b_stack), expected, rtol=1e-5, atol=1e-6)
  # the stack's blocks are the paper's A = [p_k s_k A_k], B = [B_k]
  np.testing.assert_allclose(np.asarray(a_stack[:, 1:4]), 0.5 * (8.0 / 3) * a_list[1], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(b_stack[4:6]), b_list[2], rtol=1e-6)
  # the jitted path: the zero-padded [C, d, r_max] factors contracted in one einsum give the same matrix
  r_max = 4
  a_pad = np.zeros((3, d_in, r_max))
  b_pad = np.zeros((3, r_max, d_out))
  for k, r in enumerate(ranks):
    a_pad[k, :, :r] = a_list[k]
    b_pad[k, :r] = b_list[k]
  got = merged_update(jnp.asarray(a_pad), jnp.asarray(b_pad), jnp.asarray(p * np.array(scales)))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def _algorithm(loss_fn, ranks, scale="rank", lr=0.3, server=None):
  return flora(loss_fn, client_optimizer=optax.sgd(lr), server_optimizer=server or optax.sgd(1.0),
               client_ranks=np.asarray(ranks), r_max=4, lora_alpha=8.0, scale=scale)


def _kernel_at(kernels, path):
  node = kernels
  for k in path.split("/")[:-1]:  # the module path ends in "lora"
    node = node[k]
  return node["kernel"]


def test_round_merges_the_weighted_sum_of_client_products_and_restarts_lora():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0, mutable_base=True)
  ranks = [1, 2, 4, 3]
  alg = _algorithm(loss_fn, ranks, scale="rank")
  ids = np.array([0, 1, 2, 3], np.int32)
  data = random_cohort(ids, steps=2)
  data = data._replace(weights=jnp.array([1.0, 2.0, 3.0, 4.0]))
  p = np.array([0.1, 0.2, 0.3, 0.4])
  scales = [8.0 / r for r in ranks]
  server = alg.init(trainable, jax.random.key(0))
  store = store_lib.init_store(alg.init_client, trainable, 4)
  key = jax.random.key(5)
  client_update = jax.jit(alg.client_update)
  outs = []
  for c, cid in enumerate(ids):
    info = ClientInfo(jnp.int32(cid), data.num_steps[c], data.num_tokens[c])
    out, _, _ = client_update(base, server, jax.tree.map(lambda x: x[c], store),
                                  ClientBatches(data.tokens[c], data.mask[c]), info, jax.random.fold_in(key, cid))
    outs.append(out)
  new, new_store, metrics = build_round(alg, chunk_size=2, donate=False)(base, server, store, jnp.asarray(ids),
                                                                          data, key)
  old_lora, old_k = lora_lib.split_kernels(alg.eval_params(server))
  new_lora, new_k = lora_lib.split_kernels(alg.eval_params(new))
  n = 0
  for path, _ in lora_lib.lora_modules(old_lora):
    cm = [dict(lora_lib.lora_modules(o["lora"]))[path] for o in outs]
    for k, m in enumerate(cm):  # every client trained inside its rank, and b moved
      np.testing.assert_array_equal(m["lora_a"][:, ranks[k]:], 0.0)
      np.testing.assert_array_equal(m["lora_b"][ranks[k]:], 0.0)
      assert float(jnp.abs(m["lora_b"]).max()) > 0
    expected = sum(p[k] * scales[k] * np.asarray(cm[k]["lora_a"]) @ np.asarray(cm[k]["lora_b"]) for k in range(4))
    change = np.asarray(_kernel_at(new_k, path)) - np.asarray(_kernel_at(old_k, path))
    np.testing.assert_allclose(change, expected, rtol=1e-4, atol=1e-7)
    n += 1
  assert n == 4
  # LoRA restarted: the stored LoRA has b == 0 (eval = merged kernels), structure as the original tree
  for _, m in lora_lib.lora_modules(new.params):
    np.testing.assert_array_equal(m["lora_b"], 0.0)
  assert jax.tree.structure(alg.eval_params(new)) == jax.tree.structure(trainable)
  assert int(new.extra["stack_rank"]) == sum(ranks) and float(metrics["stacked_rank"]) == sum(ranks)
  np.testing.assert_array_equal(new_store["synced"], 0)  # they synced before this round's merge
  # next round: each client restarts at b = 0 with its own random a (different clients, different a)
  starts = []
  for cid in (0, 2):
    info = ClientInfo(jnp.int32(cid), jnp.int32(0), jnp.float32(0))  # 0 steps: the output is the start
    out, state, m = client_update(base, new, jax.tree.map(lambda x: x[cid], new_store),
                                      ClientBatches(data.tokens[0], data.mask[0]), info, jax.random.key(cid))
    starts.append(dict(lora_lib.lora_modules(out["lora"])))
    # it downloads the previous round's stack: sum of ranks (d_in + d_out) floats per layer
    np.testing.assert_allclose(m["sum_bytes_down"], float(stacked_download_bytes(trainable, sum(ranks))))
    assert int(state["synced"]) == sum(ranks)
  for path in starts[0]:
    for st in starts:
      np.testing.assert_array_equal(st[path]["lora_b"], 0.0)
    assert float(jnp.abs(starts[0][path]["lora_a"][:, :1] - starts[1][path]["lora_a"][:, :1]).max()) > 1e-3


def test_uniform_scale_is_the_plain_stack_and_the_loss_sees_the_client_scale():
  """With scale="uniform" the merge is sum p_k s a_k b_k; with "rank" the client's forward uses s_k."""
  seen = []

  def loss_fn(base, params, tokens, mask, key):
    lora = dict(lora_lib.lora_modules(lora_lib.split_kernels(params)[0]))["m/lora"]
    seen.append(lora["lora_b"])
    return jnp.sum(lora["lora_b"]), {"nll_sum": jnp.zeros(()), "tokens": jnp.ones(())}

  tree = {"m": {"kernel": jnp.zeros((3, 2)), "lora": {"lora_a": jnp.ones((3, 4)), "lora_b": jnp.zeros((4, 2))}}}
  batches = ClientBatches(jnp.zeros((1, 1, 2), jnp.int32), jnp.ones((1, 1, 2)))
  info = ClientInfo(jnp.int32(0), jnp.int32(1), jnp.float32(1))
  for scale, ratio in (("uniform", 1.0), ("rank", 4.0)):  # r_k = 1: s_k / s = r_max / r_k = 4
    seen.clear()
    alg = flora(loss_fn, client_optimizer=optax.sgd(1.0), server_optimizer=optax.sgd(1.0),
                client_ranks=np.array([1]), r_max=4, lora_alpha=8.0, scale=scale)
    server = alg.init(tree, None)
    out, _, _ = alg.client_update(None, server, alg.init_client(tree, info), batches, info, jax.random.key(0))
    # d loss / d b = ratio on the client's rank-1 row, so one SGD step gives b[0] = -ratio
    np.testing.assert_allclose(out["lora"]["m"]["lora"]["lora_b"][0], [-ratio, -ratio])
    np.testing.assert_array_equal(out["lora"]["m"]["lora"]["lora_b"][1:], 0.0)
    assert float(out["scale"]) == 2.0 * ratio


def test_round_conformance():
  """Per-client rank scales and a stateful server optimizer (momentum over the kernels in opt_state)."""
  peft, base, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0, mutable_base=True)
  alg = _algorithm(loss_fn, [1, 2, 4, 3, 2, 4, 1, 4], scale="rank", lr=0.1, server=optax.sgd(0.5, momentum=0.9))
  check_round_conformance(alg, base, trainable, num_clients=8)


def test_bad_hyper_parameters_are_clear_errors():
  kw = dict(client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), r_max=4, lora_alpha=8.0)
  with pytest.raises(ValueError, match=r"flora scale='linear'; allowed: uniform, rank"):
    flora(None, client_ranks=np.array([2]), scale="linear", **kw)
  with pytest.raises(ValueError, match=r"flora: client rank 8 is outside \[1, r_max=4\]"):
    flora(None, client_ranks=np.array([2, 8]), **kw)
  with pytest.raises(ValueError, match=r"flora lora_alpha must be a positive number, got -1"):
    flora(None, client_ranks=np.array([2]), **{**kw, "lora_alpha": -1})
  _, _, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0)  # no kernels: not a mutable-base split
  with pytest.raises(ValueError, match=r"flora needs the kernel of every LoRA-targeted layer"):
    flora(loss_fn, client_ranks=np.array([2]), **kw).init(trainable, None)
  _, _, trainable, loss_fn = tiny_lora_model(rank=2, alpha=8.0, mutable_base=True)
  with pytest.raises(ValueError, match=r"flora: the LoRA modules have rank 2 but r_max=4"):
    flora(loss_fn, client_ranks=np.array([2]), **kw).init(trainable, None)
  assert flora.mutable_base is True


def test_smoke_run_end_to_end(tmp_path):
  c = flora_config.get_config("smoke")
  c.fl.num_rounds = 2
  c.eval.every = 1
  c.flora.scale = "rank"
  s = train.run(c, str(tmp_path), progress=False)
  assert s["algorithm"] == "flora" and s["rounds"] == 2
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "total_bytes_up", "total_bytes_down",
            "final_params_checksum"):
    assert math.isfinite(s[k]), k
  assert s["total_bytes_up"] > 0 and s["total_bytes_down"] > 0  # round 2 downloads round 1's stack
  assert s["final_eval_loss"] != s["initial_eval_loss"]  # the kernels moved
