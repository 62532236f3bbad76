"""FwdLLM: forward gradients by hand, the variance-controlled count, discriminative sampling, conformance."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm import tree as T
from fedjax_llm import zo
from fedjax_llm.algorithms.fwdllm import client_directions, fwdllm
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import assert_trees_close, random_cohort, tiny_lora_model

THETA = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([[0.1, 0.2]])}
TARGET = {"w": jnp.array([1.0, 1.0, 1.0]), "b": jnp.array([[0.0, -1.0]])}


def quad_loss(base, t, tokens, mask, key):
  """||theta - c||^2 scaled by the batch's first token, so batches differ."""
  return T.tree_sq_norm(T.tree_sub(t, TARGET)) * tokens[0, 0], {"nll_sum": jnp.zeros(()), "tokens": jnp.sum(mask)}


def _alg(loss_fn, **kw):
  args = dict(server_optimizer=optax.sgd(1.0), client_learning_rate=0.1, max_perturbations=6)
  return fwdllm(loss_fn, **{**args, **kw})


def _client(alg, server, cid, scale_per_batch=(1, 2), key=jax.random.key(5)):
  tokens = jnp.asarray(scale_per_batch, jnp.int32).reshape(-1, 1, 1)
  batches = ClientBatches(tokens, jnp.ones_like(tokens, jnp.float32))
  info = ClientInfo(client_id=jnp.asarray(cid), num_steps=jnp.asarray(len(scale_per_batch)),
                    num_tokens=jnp.asarray(2.0))
  return alg.client_update(None, server, {}, batches, info, key)


def test_forward_gradient_and_server_step_by_hand():
  """d_i = grad L_b . z_i (direction i on batch i mod I); G = sum_k p_k (1/n) sum_i d_i z_i; theta -= eta G."""
  alg = _alg(quad_loss)
  server = alg.init(THETA, jax.random.key(0))
  outs, wants = [], []
  for cid, key in ((0, jax.random.key(5)), (1, jax.random.key(6))):
    out, _, m = _client(alg, server, cid, key=key)
    keys = client_directions(key, 6)
    g = T.tree_zeros_like(THETA)
    for i in range(6):
      z = zo.tree_noise(THETA, keys[i])
      grad = T.tree_scale(T.tree_sub(THETA, TARGET), 2.0 * (1 + i % 2))
      d = float(T.tree_vdot(grad, z))
      np.testing.assert_allclose(float(out["scalars"][i]) * 6, d, rtol=1e-5, atol=1e-6)
      g = T.tree_add(g, T.tree_scale(z, d / 6))
    wants.append(g)
    outs.append(out)
    assert float(m["perturbations"]) == 6 and float(m["sum_forward_passes"]) == 6
    assert float(m["sum_bytes_up"]) == 8 + 4 * 6
  stacked = T.tree_stack(outs)
  new, _ = alg.aggregate(server, stacked, jnp.array([1.0, 3.0]))
  grad = T.tree_weighted_mean(T.tree_stack(wants), jnp.array([1.0, 3.0]))
  assert_trees_close(new.params, T.tree_sub(THETA, T.tree_scale(grad, 0.1)), rtol=1e-5, atol=1e-6)


def test_variance_controlled_number_of_perturbations():
  """n_k = the first n >= n_min with V_n = (sum ||d_i z_i||^2 - ||sum d_i z_i||^2 / n) / ((n-1) n N) <= tau."""
  key = jax.random.key(5)
  keys = client_directions(key, 6)
  ests = []
  for i in range(6):
    z = zo.tree_noise(THETA, keys[i])
    grad = T.tree_scale(T.tree_sub(THETA, TARGET), 2.0 * (1 + i % 2))
    ests.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(T.tree_scale(z, float(T.tree_vdot(grad, z))))]))
  ests = np.array(ests, np.float64)
  size = ests.shape[1]
  v = {n: (np.sum(ests[:n] ** 2) - np.sum(ests[:n].sum(0) ** 2) / n) / ((n - 1) * n * size) for n in range(2, 7)}
  assert v[2] > 0
  for tau, want in ((0.0, 6), (1e30, 2), (v[4] * 1.0001, min(n for n in range(2, 7) if v[n] <= v[4] * 1.0001))):
    alg = _alg(quad_loss, variance_threshold=tau)
    out, _, m = _client(alg, alg.init(THETA, jax.random.key(0)), 0, key=key)
    assert float(m["perturbations"]) == want, (tau, v)
    np.testing.assert_array_equal(np.asarray(out["scalars"][want:]), 0.0)
    if want < 6:
      np.testing.assert_allclose(float(m["variance"]), v[want], rtol=1e-3)


def test_discriminative_sampling_keeps_the_most_aligned_candidates():
  alg = _alg(quad_loss, candidates=4, max_perturbations=3)
  server = alg.init(THETA, jax.random.key(0))
  g_prev = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([[0.3, -0.1]])}
  server = server._replace(extra={"prev_grad": g_prev})
  key = jax.random.key(9)
  out, _, _ = _client(alg, server, 0, key=key)
  cands = client_directions(key, 12)
  cos = []
  for k in cands:
    z = zo.tree_noise(THETA, k)
    cos.append(float(T.tree_vdot(z, g_prev) / (T.tree_norm(z) * T.tree_norm(g_prev))))
  np.testing.assert_array_equal(np.asarray(out["which"]), np.argsort(cos)[::-1][:3])


def test_fd_estimator_agrees_with_jvp():
  _, base, trainable, loss_fn = tiny_lora_model(nonzero_b=True)
  data = random_cohort(np.array([3], np.int32), steps=2)
  info = ClientInfo(client_id=jnp.asarray(3), num_steps=jnp.asarray(2), num_tokens=jnp.asarray(2.0))
  got = {}
  for est in ("jvp", "fd"):
    alg = _alg(loss_fn, estimator=est, eps=1e-3)
    server = alg.init(trainable, jax.random.key(0))
    out, _, _ = alg.client_update(base, server, {}, ClientBatches(data.tokens[0], data.mask[0]), info,
                                  jax.random.key(2))
    got[est] = np.asarray(out["scalars"])
  np.testing.assert_allclose(got["fd"], got["jvp"], rtol=2e-2, atol=2e-3)
  assert np.all(np.abs(got["jvp"]) > 0)


def test_round_conformance():
  _, base, trainable, loss_fn = tiny_lora_model(nonzero_b=True)
  check_round_conformance(_alg(loss_fn, variance_threshold=1e-6, max_perturbations=4), base, trainable)


def test_bad_hyper_parameters():
  with pytest.raises(ValueError, match="max_perturbations must be an integer >= 1, got 0"):
    _alg(quad_loss, max_perturbations=0)
  with pytest.raises(ValueError, match="min_perturbations=7 > max_perturbations=6"):
    _alg(quad_loss, min_perturbations=7)
  with pytest.raises(ValueError, match=r"estimator must be one of \('jvp', 'fd'\), got 'spsa'"):
    _alg(quad_loss, estimator="spsa")
  with pytest.raises(ValueError, match="variance_threshold must be >= 0"):
    _alg(quad_loss, variance_threshold=-1.0)


def test_fwdllm_and_fedmezo_smoke_runs(tmp_path):
  from configs import fedmezo as fedmezo_config
  from configs import fwdllm as fwdllm_config
  from fedjax_llm import train
  for name, module in (("fwdllm", fwdllm_config), ("fedmezo", fedmezo_config)):
    s = train.run(module.get_config("smoke"), str(tmp_path / name), progress=False)
    assert s["algorithm"] == name and s["final_eval_loss"] < s["initial_eval_loss"] + 1e-3
