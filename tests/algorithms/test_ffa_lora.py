"""FFA-LoRA: only B trains and travels, A stays at the shared init, aggregation of the product is exact."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import ffa_lora as ffa_config
from fedjax_llm import train
from fedjax_llm.algorithms import fedit
from fedjax_llm.algorithms.ffa_lora import ffa_lora
from fedjax_llm.core.round import CohortData, build_round
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import random_cohort, tiny_lora_model


def _toy_tree(a, b):
  return {"m": {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}}


def _bilinear_loss(target):
  """0.5 ||a b - target||^2 of the single module 'm' (a toy 'model' of the LoRA tree only)."""
  def loss_fn(base, params, tokens, mask, key):
    del base, key
    m = params["m"]
    loss = 0.5 * jnp.sum(jnp.square(m["lora_a"] @ m["lora_b"] - target))
    return loss, {"nll_sum": loss, "tokens": jnp.sum(mask)}
  return loss_fn


def _toy_data(c, steps=1):
  tok = jnp.zeros((c, steps, 1, 2), jnp.int32)
  ones = jnp.ones((c,), jnp.float32)
  return tok, jnp.ones(tok.shape, jnp.float32), jnp.full((c,), steps, jnp.int32), ones


def test_one_sgd_step_trains_b_only_by_hand():
  # a = [1, 2]^T (d_in 2, r 1), b = 0, target I: dL/db = a^T (a b - I) = -[1, 2]; lr 0.1 -> b = [0.1, 0.2].
  alg = ffa_lora(_bilinear_loss(jnp.eye(2)), client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0))
  server = alg.init(_toy_tree([[1.0], [2.0]], [[0.0, 0.0]]), None)
  tok, mask, ns, nt = _toy_data(1)
  out, _, m = alg.client_update(None, server, {}, ClientBatches(tok[0], mask[0]),
                                ClientInfo(jnp.int32(3), ns[0], nt[0]), jax.random.key(0))
  assert set(out["m"]) == {"lora_b"}  # only b is uploaded
  np.testing.assert_allclose(out["m"]["lora_b"], [[0.1, 0.2]], rtol=1e-6)
  assert float(m["sum_bytes_up"]) == float(m["sum_bytes_down"]) == 2 * 4  # the two b entries


def test_aggregate_by_hand_is_exact_in_the_product():
  a = jnp.array([[1.0, 0.0], [2.0, -1.0], [0.5, 3.0]])  # [d_in 3, r 2]
  alg = ffa_lora(None, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0))
  server = alg.init(_toy_tree(a, jnp.zeros((2, 2))), None)
  b1 = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  b2 = jnp.array([[-1.0, 0.0], [0.0, 5.0]])
  b3 = 100.0 * jnp.ones((2, 2))  # an empty slot (weight 0): ignored
  outputs = {"m": {"lora_b": jnp.stack([b1, b2, b3])}}
  new, metrics = alg.aggregate(server, outputs, jnp.array([1.0, 3.0, 0.0]))
  expected_b = 0.25 * b1 + 0.75 * b2  # [[-0.5, 0.5], [0.75, 4.75]]
  np.testing.assert_allclose(new.params["m"]["lora_b"], [[-0.5, 0.5], [0.75, 4.75]], rtol=1e-6)
  full = alg.eval_params(new)["m"]
  np.testing.assert_array_equal(full["lora_a"], a)  # A untouched, bit for bit
  np.testing.assert_allclose(full["lora_a"] @ full["lora_b"], 0.25 * a @ b1 + 0.75 * a @ b2, rtol=1e-6)
  np.testing.assert_allclose(metrics["update_norm"], np.linalg.norm(expected_b), rtol=1e-6)
  assert int(new.round) == 1


def _client_outputs(algorithm, base, server, ids, data, key):
  """Each client's upload, one by one (one jitted client step)."""
  client = jax.jit(algorithm.client_update)
  outs = []
  for c, cid in enumerate(ids):
    info = ClientInfo(jnp.int32(cid), data.num_steps[c], data.num_tokens[c])
    out, _, _ = client(base, server, {}, ClientBatches(data.tokens[c], data.mask[c]), info,
                       jax.random.fold_in(key, cid))
    outs.append(out)
  return outs


def _product_error(global_tree, client_trees, p):
  """max over modules of |a' b' - sum_k p_k a_k b_k|."""
  err = 0.0
  for path, m in lora_lib.lora_modules(global_tree):
    mods = [dict(lora_lib.lora_modules(t))[path] for t in client_trees]
    mean_prod = sum(pk * (cm["lora_a"] @ cm["lora_b"]) for pk, cm in zip(p, mods))
    err = max(err, float(jnp.max(jnp.abs(m["lora_a"] @ m["lora_b"] - mean_prod))))
  return err


def test_tiny_model_a_never_changes_and_the_product_is_exact_unlike_fedit():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=3, nonzero_b=True)
  a0 = lora_lib.select_factors(trainable, "lora_a")
  opt = optax.adam(0.05)
  ffa = ffa_lora(loss_fn, client_optimizer=opt, server_optimizer=optax.sgd(1.0))
  fed = fedit(loss_fn, client_optimizer=opt, server_optimizer=optax.sgd(1.0))
  ids = np.array([0, 1, 2], np.int32)
  data = random_cohort(ids, steps=3)._replace(weights=jnp.array([1.0, 3.0, 6.0]))
  p = [0.1, 0.3, 0.6]
  key = jax.random.key(2)

  server = ffa.init(trainable, None)
  step = build_round(ffa, chunk_size=3, donate=False)
  # exact product: the clients' full trees are (a, b_k)
  outs = [lora_lib.merge_trees(a0, o) for o in _client_outputs(ffa, base, server, ids, data, key)]
  new, _, metrics = step(base, server, {}, jnp.asarray(ids), data, key)
  err_ffa = _product_error(ffa.eval_params(new), outs, p)
  scale = max(float(jnp.max(jnp.abs(lora_lib.delta(m)))) for _, m in lora_lib.lora_modules(ffa.eval_params(new)))
  assert err_ffa < 1e-6 * max(scale, 1.0)
  # FedIT on the same start and data: the product of the means is not the mean of the products
  fserver = fed.init(trainable, None)
  fouts = _client_outputs(fed, base, fserver, ids, data, key)
  fnew, _, _ = build_round(fed, chunk_size=3, donate=False)(base, fserver, {}, jnp.asarray(ids), data, key)
  err_fedit = _product_error(fnew.params, fouts, p)
  assert err_fedit > 100 * err_ffa and err_fedit > 1e-5, (err_fedit, err_ffa)

  # A stays bit-identical to the initial trainable's A over rounds; only b is uploaded (rank 3: q 3x32, v 3x16)
  for r in range(2):
    new, _, metrics = step(base, new, {}, jnp.asarray(ids), random_cohort(ids, steps=3, seed=r + 1),
                        jax.random.key(r))
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), new.extra["a"], a0))
  np.testing.assert_array_equal(
      jax.tree.leaves(lora_lib.select_factors(ffa.eval_params(new), "lora_a")), jax.tree.leaves(a0))
  b_bytes = 4 * 2 * (3 * 32 + 3 * 16)
  assert float(metrics["sum_bytes_up"]) == float(metrics["sum_bytes_down"]) == 3 * b_bytes
  assert b_bytes * 2 < 4 * lora_lib.lora_num_params(trainable, 3)  # less than half of FedIT's upload


def test_round_conformance():
  _, base, trainable, loss_fn = tiny_lora_model(rank=2)
  alg = ffa_lora(loss_fn, client_optimizer=optax.adamw(1e-2, weight_decay=0.1), server_optimizer=optax.adam(1e-2))
  check_round_conformance(alg, base, trainable, num_clients=8)


def test_tree_without_lora_modules_is_a_clear_error():
  alg = ffa_lora(None, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0))
  with pytest.raises(ValueError, match=r"ffa_lora needs LoRA modules .* top-level keys \['w'\]"):
    alg.init({"w": jnp.ones((2, 2))}, None)


def test_smoke_run_end_to_end(tmp_path):
  c = ffa_config.get_config("smoke")
  with c.unlocked():
    c.fl.num_rounds = 2
  s = train.run(c, str(tmp_path), progress=False)
  assert s["algorithm"] == "ffa_lora" and s["rounds"] == 2
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "final_params_checksum"):
    assert np.isfinite(s[k]), k
  # the smoke model: 2 layers, rank 8, q (32 -> 32) and v (32 -> 16): b holds 2 * 8 * (32 + 16) floats
  assert s["mean_bytes_up_per_client_round"] == 4 * 2 * 8 * (32 + 16)
  assert s["total_bytes_up"] == s["total_bytes_down"]
  assert s["final_eval_loss"] < s["initial_eval_loss"]
