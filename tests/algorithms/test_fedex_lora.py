"""FedEx-LoRA: the residual fold makes W' + s a_bar b_bar the weighted mean of client effective weights."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import fedex_lora as fedex_config
from fedjax_llm import train
from fedjax_llm import tree as T
from fedjax_llm.algorithms.fedex_lora import exact_residual, fedex_lora, residual_download_bytes
from fedjax_llm.core import client_store as store_lib
from fedjax_llm.core.round import CohortData, build_round
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import random_cohort, tiny_lora_model


def _build(loss_fn, scale, server_optimizer=None, **kw):
  return fedex_lora(loss_fn, client_optimizer=optax.sgd(0.3), server_optimizer=server_optimizer or optax.sgd(1.0),
                    lora_scale=scale, **kw)


def test_residual_by_hand():
  # Two rank-1 clients, p = (1/4, 3/4), s = 2.
  a = jnp.array([[[1.0], [0.0]], [[0.0], [1.0]]])  # [C=2, d_in=2, r=1]
  b = jnp.array([[[1.0, 2.0]], [[3.0, 4.0]]])  # [C=2, r=1, d_out=2]
  p = jnp.array([0.25, 0.75])
  # sum p_k a_k b_k = [[.25, .5], [2.25, 3]];  a_bar b_bar = [.25, .75]^T [2.5, 3.5] = [[.625, .875], [1.875, 2.625]]
  np.testing.assert_allclose(exact_residual(a, b, p, 2.0), [[-0.75, -0.75], [0.75, 0.75]], rtol=1e-6)
  # one client (or identical clients): nothing to fold
  np.testing.assert_allclose(exact_residual(a, b, jnp.array([1.0, 0.0]), 2.0), np.zeros((2, 2)), atol=1e-7)


def test_exact_aggregation_identity_on_random_matrices():
  keys = jax.random.split(jax.random.key(0), 4)
  c, d_in, r, d_out, s = 3, 7, 3, 5, 1.7
  w = jax.random.normal(keys[0], (d_in, d_out))
  a = jax.random.normal(keys[1], (c, d_in, r))
  b = jax.random.normal(keys[2], (c, r, d_out))
  p = T.normalize_weights(jnp.array([1.0, 3.0, 6.0]))
  new_w = w + exact_residual(a, b, p, s)
  a_bar, b_bar = jnp.einsum("c,cir->ir", p, a), jnp.einsum("c,cro->ro", p, b)
  ideal = sum(p[k] * (w + s * a[k] @ b[k]) for k in range(c))
  np.testing.assert_allclose(new_w + s * a_bar @ b_bar, ideal, rtol=1e-5, atol=1e-5)
  # rank <= (K - 1) r: two clients fold a rank-r residual
  two = exact_residual(a[:2], b[:2], jnp.array([0.4, 0.6]), s)
  assert np.linalg.matrix_rank(np.asarray(two), tol=1e-4) == r


def _client_outputs(algorithm, base, server, ids, data, key):
  """Each client's trained factors, computed one by one (one compiled client step)."""
  client_step = jax.jit(algorithm.client_update)
  outs = []
  for c, cid in enumerate(ids):
    info = ClientInfo(jnp.int32(cid), data.num_steps[c], data.num_tokens[c])
    out, _, _ = client_step(base, server, algorithm.init_client(None, info),
                            ClientBatches(data.tokens[c], data.mask[c]), info, jax.random.fold_in(key, cid))
    outs.append(out)
  return outs


def test_round_is_exact_mean_of_effective_weights_on_tiny_model():
  alpha, rank = 8.0, 2
  s = alpha / rank
  peft, base, trainable, loss_fn = tiny_lora_model(rank=rank, alpha=alpha, nonzero_b=True, mutable_base=True)
  algorithm = _build(loss_fn, s)
  ids = np.array([0, 1, 2], np.int32)
  data = random_cohort(ids, steps=3, seed=5)._replace(weights=jnp.array([1.0, 3.0, 6.0]))
  server = algorithm.init(trainable, None)
  key = jax.random.key(3)
  outs = _client_outputs(algorithm, base, server, ids, data, key)
  store = store_lib.init_store(algorithm.init_client, trainable, 4)
  new, _, metrics = build_round(algorithm, chunk_size=3, donate=False)(base, server, store, jnp.asarray(ids), data,
                                                                      key)
  p = np.array([0.1, 0.3, 0.6])
  old_kernels = dict(_kernel_items(lora_lib.split_kernels(trainable)[1]))
  new_kernels = dict(_kernel_items(new.extra["kernels"]))
  eval_kernels = dict(_kernel_items(algorithm.eval_params(new)))
  n_layers, max_res = 0, 0.0
  for path, m in lora_lib.lora_modules(new.params):
    layer = path[: -len("/lora")]
    w_old, w_new = old_kernels[layer], new_kernels[layer]
    client = [dict(lora_lib.lora_modules(o))[path] for o in outs]
    ideal = sum(pk * (w_old + s * cm["lora_a"] @ cm["lora_b"]) for pk, cm in zip(p, client))
    np.testing.assert_allclose(w_new + s * m["lora_a"] @ m["lora_b"], ideal, rtol=1e-5, atol=2e-6)
    # the factors are FedIT's means
    np.testing.assert_allclose(m["lora_a"], sum(pk * cm["lora_a"] for pk, cm in zip(p, client)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["lora_b"], sum(pk * cm["lora_b"] for pk, cm in zip(p, client)), rtol=1e-5, atol=1e-7)
    max_res = max(max_res, float(jnp.max(jnp.abs(w_new - w_old))))
    # eval_params hands back the folded kernel where the original tree had it
    np.testing.assert_array_equal(eval_kernels[layer], w_new)
    n_layers += 1
  assert n_layers == 4 and max_res > 1e-6  # the fold did something (B != 0, several steps: A_k differ)
  assert float(metrics["residual_norm"]) > 0


def _kernel_items(tree, prefix=""):
  if isinstance(tree, dict):
    if "kernel" in tree and not isinstance(tree["kernel"], dict):
      yield prefix, tree["kernel"]
    for k, v in tree.items():
      if isinstance(v, dict):
        yield from _kernel_items(v, f"{prefix}/{k}" if prefix else str(k))


def test_state_holds_only_lora_and_targeted_kernels_and_eval_tree_has_original_structure():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=2, mutable_base=True)
  algorithm = _build(loss_fn, 4.0)
  server = algorithm.init(trainable, None)
  assert jax.tree.structure(algorithm.eval_params(server)) == jax.tree.structure(trainable)
  kernel_paths = sorted(p for p, _ in _kernel_items(server.extra["kernels"]))
  assert kernel_paths == sorted(f"model/layers/{i}/self_attn/{n}" for i in (0, 1) for n in ("q_proj", "v_proj"))
  # the LoRA factors + targeted kernels are the whole trainable tree; nothing of the base is copied in
  assert T.tree_size(server.params) + T.tree_size(server.extra["kernels"]) == T.tree_size(trainable)
  base_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(base)[0]]
  assert not [p for p in base_paths if "q_proj" in p or "v_proj" in p]  # the targeted kernels left the base
  assert any("k_proj']['kernel']" in p for p in base_paths)  # the others stay there, outside the state
  # a round leaves the base untouched (it is an input only) and keeps the eval structure
  before = jax.tree.map(np.asarray, base)
  ids = np.array([0, 1], np.int32)
  store = store_lib.init_store(algorithm.init_client, trainable, 2)
  new, _, _ = build_round(algorithm, chunk_size=2, donate=False)(base, server, store, jnp.asarray(ids),
                                                                 random_cohort(ids), jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, base))
  assert jax.tree.structure(algorithm.eval_params(new)) == jax.tree.structure(trainable)


def _toy_problem():
  """A LoRA+kernel tree whose loss pulls the factors apart per client (fast, no model)."""
  tree = {"m": {"kernel": jnp.zeros((4, 6)),
                "lora": {"lora_a": jax.random.normal(jax.random.key(0), (4, 1)),
                         "lora_b": 0.1 * jax.random.normal(jax.random.key(1), (1, 6))}}}

  def loss_fn(base, params, tokens, mask, key):
    m = params["m"]
    w = m["kernel"] + 2.0 * m["lora"]["lora_a"] @ m["lora"]["lora_b"]
    target = jnp.mean(tokens.astype(jnp.float32)) * jnp.ones((4, 6))
    return jnp.sum((w - target) ** 2), {"nll_sum": jnp.zeros(()), "tokens": jnp.sum(mask)}
  return tree, loss_fn


def _toy_cohort(ids):
  c = len(ids)
  ids = np.asarray(ids)
  toks = jnp.asarray(np.arange(c)[:, None, None, None] * np.ones((1, 3, 1, 2)), jnp.int32)
  present = jnp.asarray((ids >= 0).astype(np.float32))
  return CohortData(toks, jnp.ones((c, 3, 1, 2)) * present[:, None, None, None],
                    jnp.asarray(np.where(ids >= 0, 3, 0), jnp.int32), 6.0 * present, present)


def test_download_bytes_count_the_factored_catch_up_residual():
  tree, loss_fn = _toy_problem()
  lora = lora_lib.split_kernels(tree)[0]
  # by hand: d_in = 4, d_out = 6, r = 1 -> factors 4 * (4 + 6) = 40 bytes; one residual rank 40, dense 96
  np.testing.assert_allclose(residual_download_bytes(lora, 0), 0.0)
  np.testing.assert_allclose(residual_download_bytes(lora, 1), 40.0)
  np.testing.assert_allclose(residual_download_bytes(lora, 2), 80.0)
  np.testing.assert_allclose(residual_download_bytes(lora, 3), 96.0)  # dense (24 numbers) < 3 * 10
  np.testing.assert_allclose(residual_download_bytes(lora, 1, "dense"), 96.0)
  np.testing.assert_allclose(residual_download_bytes(lora, 0, "dense"), 0.0)

  alg = fedex_lora(loss_fn, client_optimizer=optax.sgd(0.05), server_optimizer=optax.sgd(1.0), lora_scale=2.0)
  server = alg.init(tree, None)
  store = store_lib.init_store(alg.init_client, tree, 5)
  step = build_round(alg, chunk_size=1, donate=False)
  # round 1: clients 0, 1 present (+ an empty slot); nobody is behind; K = 2 folds rank (2 - 1) * 1
  server, store, m = step(None, server, store, jnp.array([0, 1, -1]), _toy_cohort([0, 1, -1]), jax.random.key(0))
  assert float(m["sum_bytes_down"]) == 2 * 40.0 and float(m["sum_bytes_up"]) == 2 * 40.0
  assert int(server.extra["residual_rank"]) == 1
  np.testing.assert_array_equal(store["synced_rank"], [0, 0, 0, 0, 0])
  # round 2: clients 1 (synced at 0), 4 and 3 (new) are each behind by 1 rank; K = 3 folds 2 more
  server, store, m = step(None, server, store, jnp.array([1, 4, 3]), _toy_cohort([1, 4, 3]), jax.random.key(1))
  assert float(m["sum_bytes_down"]) == 3 * (40.0 + 40.0)
  assert int(server.extra["residual_rank"]) == 3
  np.testing.assert_array_equal(store["synced_rank"], [0, 1, 0, 1, 1])
  # round 3: client 4 is behind by 2 (80 bytes factored), client 0 by 3 (dense 96 is cheaper than 120)
  server, store, m = step(None, server, store, jnp.array([4, 0, -1]), _toy_cohort([4, 0, -1]), jax.random.key(2))
  assert float(m["sum_bytes_down"]) == (40.0 + 80.0) + (40.0 + 96.0)
  assert float(m["sum_bytes_up"]) == 2 * 40.0


def test_fedopt_steps_the_factors_but_folds_the_residual_of_the_means():
  tree, loss_fn = _toy_problem()
  ids = [0, 1, 2]
  results = {}
  for name, opt in (("fedavg", optax.sgd(1.0)), ("fedadam", optax.adam(0.01))):
    alg = fedex_lora(loss_fn, client_optimizer=optax.sgd(0.05), server_optimizer=opt, lora_scale=2.0)
    server = alg.init(tree, None)
    store = store_lib.init_store(alg.init_client, tree, 3)
    results[name] = build_round(alg, chunk_size=3, donate=False)(None, server, store, jnp.array(ids),
                                                                 _toy_cohort(ids), jax.random.key(0))[0]
  np.testing.assert_allclose(results["fedadam"].extra["kernels"]["m"]["kernel"],
                             results["fedavg"].extra["kernels"]["m"]["kernel"], rtol=1e-6)
  assert float(jnp.max(jnp.abs(results["fedavg"].extra["kernels"]["m"]["kernel"]))) > 0
  assert float(T.tree_norm(T.tree_sub(results["fedadam"].params, results["fedavg"].params))) > 1e-4


def test_bad_hyper_parameters_are_clear_errors():
  with pytest.raises(ValueError, match=r"residual_download='sparse'; allowed: factored, dense"):
    _build(None, 2.0, residual_download="sparse")
  with pytest.raises(ValueError, match=r"lora_scale must be a positive number \(alpha / rank\), got 0"):
    _build(None, 0)
  with pytest.raises(ValueError, match=r"lora_scale must be a positive number .*got 'x'"):
    _build(None, "x")
  peft, base, trainable, loss_fn = tiny_lora_model(rank=2)  # not a mutable-base split
  with pytest.raises(ValueError, match=r"needs the kernel of every LoRA-targeted layer .* 4 LoRA modules and 0 kernels"):
    _build(loss_fn, 4.0).init(trainable, None)


def test_round_conformance():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=2, nonzero_b=True, mutable_base=True)
  check_round_conformance(_build(loss_fn, 4.0), base, trainable)


def test_smoke_run(tmp_path):
  c = fedex_config.get_config("smoke")
  c.fl.num_rounds = 2
  s = train.run(c, str(tmp_path), progress=False)
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "total_bytes_up", "total_bytes_down",
            "final_params_checksum"):
    assert np.isfinite(s[k]), k
  assert s["algorithm"] == "fedex_lora" and s["rounds"] == 2
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if "train/loss" in l]
  assert [r["round"] for r in rows] == [1, 2]
  # round 1: nothing folded yet (down == up); round 2: the clients also download the folded residual
  assert rows[0]["comm/bytes_down"] == rows[0]["comm/bytes_up"]
  assert rows[1]["comm/bytes_down"] > rows[1]["comm/bytes_up"]
  assert rows[1]["clients/residual_norm"] > 0
