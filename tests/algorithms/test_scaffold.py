"""SCAFFOLD (option II) on the LoRA factors: control-variate updates by hand, FedIT when disabled,
absent clients keep c_i, conformance, clear errors, smoke run."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm import tree as T
from fedjax_llm.algorithms import fedit
from fedjax_llm.algorithms.scaffold import scaffold
from fedjax_llm.core import client_store as store_lib
from fedjax_llm.core.round import CohortData, build_round
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import assert_trees_close, random_cohort, tiny_lora_model


# ----------------------------------------------------------------------------- toy quadratic, by hand


def _toy_loss(base, params, tokens, mask, key):
  """0.5 ||w - s||^2 over every leaf, s = mean(tokens) of the step: gradient w - s."""
  del base, key
  s = jnp.mean(tokens.astype(jnp.float32))
  loss = sum(0.5 * jnp.sum(jnp.square(x - s)) for x in jax.tree.leaves(params))
  return loss, {"nll_sum": loss, "tokens": jnp.sum(mask)}


def _toy_tree(v):
  return {"m": {"lora_a": jnp.asarray(v[0], jnp.float32), "lora_b": jnp.asarray(v[1], jnp.float32)}}


def _toy_cohort(targets, num_steps, weights):
  """targets[c][s]: the constant token of client c at step s (tokens [C, S, 1, 2])."""
  tok = jnp.asarray(np.array(targets, np.int32)[:, :, None, None] * np.ones((1, 1, 1, 2), np.int32))
  ns = jnp.asarray(num_steps, jnp.int32)
  return CohortData(tok, jnp.ones(tok.shape, jnp.float32), ns, ns.astype(jnp.float32),
                    jnp.asarray(weights, jnp.float32))


def test_option_two_control_is_the_mean_corrected_gradient():
  """From x = c = c_i = 0, lr 0.5, target 1 twice: y = 0.5, 0.75; gradients -1, -0.5; c_i+ = -0.75."""
  alg = scaffold(_toy_loss, client_optimizer=optax.sgd(0.5), server_optimizer=optax.sgd(1.0),
                 client_learning_rate=0.5, num_clients=4)
  tree = _toy_tree([np.zeros((1, 1)), np.zeros((1, 1))])
  server = alg.init(tree, None)
  store = store_lib.init_store(alg.init_client, tree, 4)
  new, store, m = build_round(alg, chunk_size=1, donate=False)(
      None, server, store, jnp.array([2]), _toy_cohort([[1, 1]], [2], [1.0]), jax.random.key(0))
  np.testing.assert_allclose(new.params["m"]["lora_a"], [[0.75]])  # x + dy (fedavg lr 1)
  np.testing.assert_allclose(store["c_i"]["m"]["lora_a"][:, 0, 0], [0, 0, -0.75, 0])
  np.testing.assert_allclose(new.extra["c"]["m"]["lora_b"], [[-0.75 / 4]])  # |S|/N mean dc = 1/4 (-0.75)
  assert float(m["sum_bytes_up"]) == float(m["sum_bytes_down"]) == 2 * 4 * 2  # (y, dc) and (x, c): 2 floats


@pytest.mark.parametrize("control_lr", [1.0, 0.5])
def test_control_updates_match_hand_computation_with_nonzero_controls(control_lr):
  """Two clients (K = 2 and K = 1 of S = 2 steps, the masked step excluded), nonzero c and c_i."""
  lr, n_clients = 0.3, 5
  alg = scaffold(_toy_loss, client_optimizer=optax.sgd(lr), server_optimizer=optax.sgd(1.0),
                 client_learning_rate=lr, num_clients=n_clients, control_lr=control_lr)
  rng = np.random.default_rng(0)
  x = [rng.normal(size=(2, 3)), rng.normal(size=(3, 2))]
  c = [rng.normal(size=(2, 3)), rng.normal(size=(3, 2))]
  c_store = [rng.normal(size=(n_clients, 2, 3)), rng.normal(size=(n_clients, 3, 2))]
  tree = _toy_tree(x)
  server = alg.init(tree, None)._replace(extra={"c": _toy_tree(c)})
  store = {"c_i": _toy_tree(c_store)}
  ids = [3, 1]
  targets, ksteps, weights = [[2, 5], [1, 7]], [2, 1], [1.0, 3.0]
  new, new_store, m = build_round(alg, chunk_size=2, donate=False)(
      None, server, store, jnp.array(ids), _toy_cohort(targets, ksteps, weights), jax.random.key(0))

  p = np.array(weights) / np.sum(weights)
  for leaf in range(2):
    ys, dcs = [], []
    for j, cid in enumerate(ids):
      y = x[leaf].copy()
      for s in range(ksteps[j]):  # y <- y - lr (g - c_i + c), g = y - target
        y = y - lr * ((y - targets[j][s]) - c_store[leaf][cid] + c[leaf])
      c_new = c_store[leaf][cid] - c[leaf] + (x[leaf] - y) / (ksteps[j] * lr)
      ys.append(y)
      dcs.append(c_new - c_store[leaf][cid])
      key = "lora_a" if leaf == 0 else "lora_b"
      np.testing.assert_allclose(new_store["c_i"]["m"][key][cid], c_new, rtol=1e-5, atol=1e-6)
    key = "lora_a" if leaf == 0 else "lora_b"
    np.testing.assert_allclose(new.params["m"][key], x[leaf] + sum(pj * (y - x[leaf]) for pj, y in zip(p, ys)),
                               rtol=1e-5, atol=1e-6)
    # c += control_lr |S|/N mean_S dc  (unweighted over the present clients)
    np.testing.assert_allclose(new.extra["c"]["m"][key], c[leaf] + control_lr * (len(ids) / n_clients) *
                               np.mean(dcs, axis=0), rtol=1e-5, atol=1e-6)
    for other in (0, 2, 4):  # not in the cohort: c_i untouched
      np.testing.assert_array_equal(new_store["c_i"]["m"][key][other], np.float32(c_store[leaf][other]))


# ----------------------------------------------------------------------------- tiny model


def _reference_round(loss_fn, base, x, c, c_i_all, ids, data, lr, weights, n_clients):
  """SCAFFOLD written out with jax.grad and plain SGD, one client after another."""
  grad = jax.jit(jax.grad(lambda p, b, t, m: loss_fn(b, p, t, m, None)[0]))
  ys, c_new_all, dcs = [], dict(c_i_all), []
  for j, cid in enumerate(ids):
    y, k = x, int(data.num_steps[j])
    c_i = c_i_all[cid]
    for s in range(k):
      g = grad(y, base, data.tokens[j, s], data.mask[j, s])
      y = jax.tree.map(lambda yy, gg, ci, cc: yy - lr * (gg - ci + cc), y, g, c_i, c)
    c_new = jax.tree.map(lambda ci, cc, xx, yy: ci - cc + (xx - yy) / (k * lr), c_i, c, x, y)
    ys.append(y)
    dcs.append(T.tree_sub(c_new, c_i))
    c_new_all[cid] = c_new
  p = np.asarray(weights) / np.sum(weights)
  x_new = jax.tree.map(lambda xx, *yy: xx + sum(pj * (yj - xx) for pj, yj in zip(p, yy)), x, *ys)
  c_next = jax.tree.map(lambda cc, *d: cc + sum(d) / n_clients, c, *dcs)
  return x_new, c_next, c_new_all


def test_tiny_model_two_rounds_match_reference_and_c_is_mean_of_c_i():
  """2 clients, K = 2 SGD steps, 2 rounds (round 2 runs with nonzero c, c_i); N = 4."""
  peft, base, trainable, loss_fn = tiny_lora_model(rank=2, nonzero_b=True)
  lr, n_clients = 0.2, 4
  alg = scaffold(loss_fn, client_optimizer=optax.sgd(lr), server_optimizer=optax.sgd(1.0),
                 client_learning_rate=lr, num_clients=n_clients)
  server = alg.init(trainable, None)
  store = store_lib.init_store(alg.init_client, trainable, n_clients)
  step = build_round(alg, chunk_size=2, donate=False)
  x, c = trainable, T.tree_zeros_like(trainable)
  c_i_all = {i: T.tree_zeros_like(trainable) for i in range(n_clients)}
  for r, ids in enumerate(([0, 1], [1, 3])):
    data = random_cohort(np.array(ids), steps=2, seed=r)
    server, store, m = step(base, server, store, jnp.asarray(ids), data, jax.random.key(r))
    x, c, c_i_all = _reference_round(loss_fn, base, x, c, c_i_all, ids, data, lr, data.weights, n_clients)
    assert_trees_close(server.params, x, rtol=2e-4, atol=1e-6)
    assert_trees_close(server.extra["c"], c, rtol=2e-4, atol=1e-6)
    for i in range(n_clients):
      assert_trees_close(T.tree_index(store["c_i"], i), c_i_all[i], rtol=2e-4, atol=1e-6)
    # invariant of the paper's update: c = (1/N) sum over ALL clients of c_i
    assert_trees_close(server.extra["c"], jax.tree.map(lambda s: jnp.mean(s, axis=0), store["c_i"]),
                       rtol=1e-4, atol=1e-7)
    assert float(T.tree_norm(server.extra["c"])) > 0
  # client 0 skipped round 2: its c_i is exactly what round 1 left; client 2 never came: still zero
  assert float(T.tree_norm(T.tree_index(store["c_i"], 2))) == 0.0
  assert float(T.tree_norm(T.tree_index(store["c_i"], 0))) > 0


def test_absent_client_keeps_c_i_exactly():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=2)
  alg = scaffold(loss_fn, client_optimizer=optax.sgd(0.2), server_optimizer=optax.sgd(1.0),
                 client_learning_rate=0.2, num_clients=4)
  server = alg.init(trainable, None)
  store = store_lib.init_store(alg.init_client, trainable, 4)
  step = build_round(alg, chunk_size=2, donate=False)
  server, store, _ = step(base, server, store, jnp.array([0, 1]), random_cohort(np.array([0, 1])),
                          jax.random.key(0))
  c0 = jax.device_get(T.tree_index(store["c_i"], 0))
  server, store, _ = step(base, server, store, jnp.array([2, 3]), random_cohort(np.array([2, 3]), seed=1),
                          jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, T.tree_index(store["c_i"], 0), c0)
  assert float(T.tree_norm(T.tree_index(store["c_i"], 2))) > 0


def test_without_control_variates_equals_fedit_exactly():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=2, nonzero_b=True)
  opt = optax.adam(1e-2)
  server_opt = optax.sgd(0.7, momentum=0.5)
  alg_s = scaffold(loss_fn, client_optimizer=opt, server_optimizer=server_opt, client_learning_rate=1e-2,
                   num_clients=8, use_control=False)
  alg_f = fedit(loss_fn, client_optimizer=opt, server_optimizer=server_opt)
  results = []
  for alg in (alg_s, alg_f):
    server = alg.init(trainable, None)
    store = store_lib.init_store(alg.init_client, trainable, 8)
    step = build_round(alg, chunk_size=2, donate=False)
    for r, ids in enumerate(([5, 1, 2, 7], [0, 1, 3, -1])):
      server, store, m = step(base, server, store, jnp.asarray(ids), random_cohort(np.array(ids), seed=r),
                              jax.random.key(r))
    results.append((server, store, m))
  (s_s, store_s, m_s), (s_f, _, m_f) = results
  jax.tree.map(np.testing.assert_array_equal, s_s.params, s_f.params)
  jax.tree.map(np.testing.assert_array_equal, s_s.opt_state, s_f.opt_state)
  assert s_s.extra is None and store_s == {}
  assert set(m_s) == set(m_f)
  for k in m_f:
    np.testing.assert_array_equal(m_s[k], m_f[k], err_msg=k)


def test_conformance():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=4)
  # A server optimizer other than FedAvg, to check it composes; eps = tau as in configs/base.py (with eps = 1e-8,
  # Adam turns float-summation-order noise in near-zero pseudo-gradient coordinates into ~1e-6 differences).
  alg = scaffold(loss_fn, client_optimizer=optax.sgd(0.1), server_optimizer=optax.adam(1e-2, eps=1e-3),
                 client_learning_rate=0.1, num_clients=8)
  ref = check_round_conformance(alg, base, trainable, num_clients=8)
  assert float(ref[2]["server_control_norm"]) > 0
  lora_bytes = T.tree_bytes(trainable)
  np.testing.assert_allclose(ref[2]["sum_bytes_up"], 4 * 2 * lora_bytes)  # 4 clients x (y, dc)
  np.testing.assert_allclose(ref[2]["sum_bytes_down"], 4 * 2 * lora_bytes)  # 4 clients x (x, c)


@pytest.mark.parametrize("kwargs,match", [
    ({"client_learning_rate": 0.0}, r"client_learning_rate must be > 0 .*got 0.0"),
    ({"num_clients": 0}, r"num_clients must be a positive int, got 0"),
    ({"control_lr": -1.0}, r"control_lr must be >= 0 .*got -1.0"),
    ({"use_control": "yes"}, r"use_control must be True or False, got 'yes'"),
])
def test_bad_hyper_parameters_are_clear_errors(kwargs, match):
  args = {"client_optimizer": optax.sgd(0.1), "server_optimizer": optax.sgd(1.0), "client_learning_rate": 0.1,
          "num_clients": 4, **kwargs}
  with pytest.raises(ValueError, match=match):
    scaffold(_toy_loss, **args)


def test_smoke_run_end_to_end(tmp_path):
  import math

  from configs import scaffold as scaffold_config
  from experiments import run as run_cli
  from fedjax_llm import train
  c = scaffold_config.get_config("smoke")
  run_cli.apply_override(c, "fl.num_rounds", "2")
  assert c.client_optimizer.name == "sgd" and c.client_optimizer.grad_clip == 0
  s = train.run(c, str(tmp_path), progress=False)
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "total_bytes_up", "final_params_checksum"):
    assert k in s and math.isfinite(s[k]), k
  assert s["algorithm"] == "scaffold" and s["rounds"] == 2
  # every client sends (y, dc) = twice the LoRA factors
  assert s["mean_bytes_up_per_client_round"] == 2 * s["trainable_bytes"]
  assert s["total_bytes_up"] == s["total_bytes_down"] == 2 * 2 * c.fl.cohort_size * s["trainable_bytes"]
