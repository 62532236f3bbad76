"""FedOpt server optimizers built by ``train.make_server_optimizer``, checked step by step by hand.

The server applies an optimizer to the pseudo-gradient g = x - mean_k y_k (``server_step``).
``fedadam`` / ``fedyogi`` / ``fedadagrad`` are Reddi et al. 2021 ("Adaptive Federated
Optimization", arXiv:2003.00295), Algorithm 2, exactly (``optim.fedopt_adaptive``), with D = -g:
  m_t = b1 m_{t-1} + (1 - b1) g,  m_{-1} = 0
  v_t = v_{t-1} + g^2 (adagrad) | b2 v_{t-1} + (1 - b2) g^2 (adam)
        | v_{t-1} - (1 - b2) g^2 sign(v_{t-1} - g^2) (yogi),  v_{-1} = tau^2
  x_{t+1} = x_t - lr m_t / (sqrt(v_t) + tau),  no bias correction.
The optax optimizers stay available as ``adam`` / ``yogi`` / ``adagrad`` and are pinned here too:
  * adam = optax.adam: bias-corrected (m / (1 - b1^t), v / (1 - b2^t)), v starts at 0;
  * yogi = optax.yogi: bias-corrected, and BOTH m and v start at 1e-6;
  * adagrad = optax.adagrad: no first-moment momentum and eps INSIDE the square root:
    step = g / sqrt(sum g^2 + eps); a coordinate whose accumulator is 0 does not move.
eps is the config's ``server_optimizer.eps`` (tau). FedAvgM with lr 1 is covered in
tests/algorithms/test_fedit.py (momentum math); here only its config wiring with lr != 1.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base as base_config
from configs import fedadam as fedadam_config
from fedjax_llm.core.algorithm import init_server_state, server_step
from fedjax_llm.optim import FedOptAdaptiveState, fedopt_adaptive
from fedjax_llm.train import make_server_optimizer

X0 = {"a": np.array([[0.5, -1.0], [2.0, 0.0]]), "b": np.array([1.0, -0.25, 3.0])}
AGG1 = {"a": np.array([[0.25, -1.5], [2.5, 0.0]]), "b": np.array([0.5, 0.0, 3.0])}  # g has a zero coordinate
AGG2_DELTA = {"a": np.array([[0.1, 0.2], [-0.3, 0.05]]), "b": np.array([-0.2, 0.1, 0.4])}  # y - x in round 2


def _cfg(name, **kw):
  c = base_config.get_config().server_optimizer
  c.name = name
  for k, v in kw.items():
    c[k] = v
  return c


def _f32(tree):
  return {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}


def _two_rounds(opt, delta2=None):
  """Round 1 aggregates to AGG1, round 2 to x1 + delta2; returns (s1, s2, g1, g2) (float64 g's)."""
  delta2 = AGG2_DELTA if delta2 is None else delta2
  s = init_server_state(_f32(X0), opt)
  s1 = server_step(s, _f32(AGG1), opt)
  x1 = {k: np.asarray(v, np.float64) for k, v in s1.params.items()}
  agg2 = {k: x1[k] + delta2[k] for k in X0}
  s2 = server_step(s1, _f32(agg2), opt)
  g1 = {k: X0[k] - AGG1[k] for k in X0}
  g2 = {k: x1[k] - np.float32(agg2[k]).astype(np.float64) for k in X0}
  return s1, s2, g1, g2


def _check_state(state, m, v, k):
  assert isinstance(state, FedOptAdaptiveState)
  np.testing.assert_allclose(state.m[k], m, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(state.v[k], v, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- Reddi et al. Algorithm 2


def test_fedadam_two_steps_by_hand():
  lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
  opt = make_server_optimizer(_cfg("fedadam", learning_rate=lr, b1=b1, b2=b2, eps=tau))
  s1, s2, g1, g2 = _two_rounds(opt)
  for k in X0:
    m1 = (1 - b1) * g1[k]  # m_{-1} = 0
    v1 = b2 * tau ** 2 + (1 - b2) * g1[k] ** 2  # v_{-1} = tau^2
    x1 = X0[k] - lr * m1 / (np.sqrt(v1) + tau)  # no bias correction
    np.testing.assert_allclose(s1.params[k], x1, rtol=1e-6, atol=1e-7)
    _check_state(s1.opt_state, m1, v1, k)
    m2 = b1 * m1 + (1 - b1) * g2[k]
    v2 = b2 * v1 + (1 - b2) * g2[k] ** 2
    x2 = x1 - lr * m2 / (np.sqrt(v2) + tau)
    np.testing.assert_allclose(s2.params[k], x2, rtol=1e-5, atol=1e-6)
    _check_state(s2.opt_state, m2, v2, k)
  # m_{-1} = 0: a zero pseudo-gradient coordinate does not move in round 1
  assert float(s1.params["a"][1, 1]) == 0.0 and float(s1.params["b"][2]) == 3.0
  assert int(s2.round) == 2


def test_fedadam_b1_zero_b2_zero_is_normalized_sgd():
  """b1 = b2 = 0: m = g, v = g^2, so every step is lr g / (|g| + tau) (a smoothed sign step)."""
  lr, tau = 0.05, 1e-3
  s1, s2, g1, g2 = _two_rounds(make_server_optimizer(_cfg("fedadam", learning_rate=lr, b1=0.0, b2=0.0, eps=tau)))
  for k in X0:
    x1 = X0[k] - lr * g1[k] / (np.abs(g1[k]) + tau)
    np.testing.assert_allclose(s1.params[k], x1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s2.params[k], x1 - lr * g2[k] / (np.abs(g2[k]) + tau), rtol=1e-5, atol=1e-6)


def test_fedadam_has_no_bias_correction_unlike_optax_adam():
  """With b1 = 0.9, b2 = 0.99 and a tiny tau, optax's corrections cancel at step 1
  ((1 - b1) / sqrt(1 - b2) = 1) while the paper's step 1 is lr (1 - b1) g / sqrt((1 - b2) g^2) = lr sign(g)
  too; at step 2 optax's step is sqrt(1 - b2^2) / (1 - b1^2) ~ 0.74 of the paper's."""
  lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-8
  kw = dict(learning_rate=lr, b1=b1, b2=b2, eps=tau)
  p1, p2, _, _ = _two_rounds(make_server_optimizer(_cfg("fedadam", **kw)))
  o1, o2, _, _ = _two_rounds(make_server_optimizer(_cfg("adam", **kw)))
  x0 = X0["b"][0]  # a coordinate with g = 0.5 then 0.2
  paper1, optax1 = x0 - float(p1.params["b"][0]), x0 - float(o1.params["b"][0])
  np.testing.assert_allclose(paper1, lr, rtol=1e-5)
  np.testing.assert_allclose(optax1, lr, rtol=1e-5)
  paper2 = float(p1.params["b"][0]) - float(p2.params["b"][0])
  optax2 = float(o1.params["b"][0]) - float(o2.params["b"][0])
  np.testing.assert_allclose(optax2 / paper2, np.sqrt(1 - b2 ** 2) / (1 - b1 ** 2), rtol=1e-4)
  assert abs(optax2 / paper2 - 1) > 0.2


# round 2 deltas for yogi: small |g2| where v1 is large (v decreases: sign +1, flipped from round 1's -1),
# large |g2| where v1 is small (v keeps increasing: sign -1), and |g2| < tau on the zero coordinates
YOGI_DELTA2 = {"a": np.array([[-0.01, 0.3], [0.02, -0.0005]]), "b": np.array([0.01, -0.3, 0.0005])}


def test_fedyogi_two_steps_by_hand_with_a_sign_flip():
  lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
  opt = make_server_optimizer(_cfg("fedyogi", learning_rate=lr, b1=b1, b2=b2, eps=tau))
  s1, s2, g1, g2 = _two_rounds(opt, YOGI_DELTA2)
  signs1, signs2 = [], []
  for k in X0:
    v0 = np.full_like(X0[k], tau ** 2)  # v_{-1} = tau^2
    m1 = (1 - b1) * g1[k]
    sign1 = np.sign(v0 - g1[k] ** 2)
    v1 = v0 - (1 - b2) * g1[k] ** 2 * sign1
    x1 = X0[k] - lr * m1 / (np.sqrt(v1) + tau)
    np.testing.assert_allclose(s1.params[k], x1, rtol=1e-6, atol=1e-7)
    _check_state(s1.opt_state, m1, v1, k)
    m2 = b1 * m1 + (1 - b1) * g2[k]
    sign2 = np.sign(v1 - g2[k] ** 2)
    v2 = v1 - (1 - b2) * g2[k] ** 2 * sign2
    x2 = x1 - lr * m2 / (np.sqrt(v2) + tau)
    np.testing.assert_allclose(s2.params[k], x2, rtol=1e-5, atol=1e-6)
    _check_state(s2.opt_state, m2, v2, k)
    signs1.append(sign1.ravel())
    signs2.append(sign2.ravel())
    # yogi's v changes by at most (1 - b2) g^2 per step, in the direction of g^2
    assert np.all(np.abs(v2 - v1) <= (1 - b2) * g2[k] ** 2 * (1 + 1e-12))
  signs1, signs2 = np.concatenate(signs1), np.concatenate(signs2)
  # round 1: every nonzero g has g^2 > tau^2, so v grows (sign -1); the zero coordinates have sign +1 (v - 0)
  np.testing.assert_array_equal(signs1, [-1, -1, -1, 1, -1, -1, 1])
  # round 2: the sign flips to +1 (v shrinks) where a large g1 is followed by a small g2, stays -1 where
  # |g2| is large, and stays +1 on the zero coordinates (g2^2 = 2.5e-7 < v1 = tau^2)
  np.testing.assert_array_equal(signs2, [1, -1, 1, 1, 1, -1, 1])
  flipped = (signs1 == -1) & (signs2 == 1)
  assert flipped.sum() == 3
  # with m_{-1} = 0 a zero pseudo-gradient does not move its coordinate (unlike optax.yogi, below)
  assert float(s1.params["a"][1, 1]) == 0.0


def test_fedyogi_sign_zero_leaves_v_unchanged():
  """sign(v - g^2) = 0 where v_{t-1} = g^2 exactly (dyadic numbers: tau = 0.5, g = +-0.5)."""
  lr, b1, b2, tau = 0.25, 0.5, 0.75, 0.5
  opt = fedopt_adaptive("yogi", lr, b1=b1, b2=b2, tau=tau)
  x = {"w": jnp.asarray([1.0, -1.0, 2.0], jnp.float32)}
  g = {"w": jnp.asarray([0.5, -0.5, 1.0], jnp.float32)}
  state = opt.init(x)
  updates, state = opt.update(g, state, x)
  np.testing.assert_array_equal(state.v["w"], [0.25, 0.25, 0.25 + 0.25 * 1.0])  # g^2 = v: unchanged; else grows
  np.testing.assert_array_equal(state.m["w"], [0.25, -0.25, 0.5])
  np.testing.assert_allclose(updates["w"], [-lr * 0.25 / 1.0, lr * 0.25 / 1.0, -lr * 0.5 / (np.sqrt(0.5) + 0.5)],
                             rtol=1e-6)


def test_fedadagrad_two_steps_by_hand():
  lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
  opt = make_server_optimizer(_cfg("fedadagrad", learning_rate=lr, b1=b1, b2=b2, eps=tau))
  s1, s2, g1, g2 = _two_rounds(opt)
  for k in X0:
    m1 = (1 - b1) * g1[k]  # the paper's FedAdagrad has the b1 momentum too
    v1 = tau ** 2 + g1[k] ** 2
    x1 = X0[k] - lr * m1 / (np.sqrt(v1) + tau)  # tau outside the square root
    np.testing.assert_allclose(s1.params[k], x1, rtol=1e-6, atol=1e-7)
    _check_state(s1.opt_state, m1, v1, k)
    m2 = b1 * m1 + (1 - b1) * g2[k]
    v2 = v1 + g2[k] ** 2  # running sum
    x2 = x1 - lr * m2 / (np.sqrt(v2) + tau)
    np.testing.assert_allclose(s2.params[k], x2, rtol=1e-5, atol=1e-6)
    _check_state(s2.opt_state, m2, v2, k)
  assert float(s1.params["a"][1, 1]) == 0.0


def test_fedadagrad_b1_zero_is_adagrad_and_ignores_b2():
  """b1 = 0: x -= lr g / (sqrt(tau^2 + sum g^2) + tau); b2 plays no part in FedAdagrad."""
  lr, tau = 0.05, 1e-3
  s1, s2, g1, g2 = _two_rounds(make_server_optimizer(_cfg("fedadagrad", learning_rate=lr, b1=0.0, b2=0.99, eps=tau)))
  t1, t2, _, _ = _two_rounds(make_server_optimizer(_cfg("fedadagrad", learning_rate=lr, b1=0.0, b2=0.5, eps=tau)))
  for k in X0:
    x1 = X0[k] - lr * g1[k] / (np.sqrt(tau ** 2 + g1[k] ** 2) + tau)
    np.testing.assert_allclose(s1.params[k], x1, rtol=1e-6, atol=1e-7)
    x2 = x1 - lr * g2[k] / (np.sqrt(tau ** 2 + g1[k] ** 2 + g2[k] ** 2) + tau)
    np.testing.assert_allclose(s2.params[k], x2, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(t2.params[k], s2.params[k])


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_state_is_a_checkpointable_pytree(name, tmp_path):
  from fedjax_llm.checkpoint import Checkpointer
  opt = make_server_optimizer(_cfg(name, learning_rate=0.05))
  step = jax.jit(lambda s, agg: server_step(s, agg, opt))
  s1 = step(init_server_state(_f32(X0), opt), _f32(AGG1))
  assert isinstance(s1.opt_state, FedOptAdaptiveState)
  assert len(jax.tree.leaves(s1.opt_state)) == 2 * len(jax.tree.leaves(s1.params))
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, s1, {"round": 1})
  restored, meta = ckpt.restore(1, init_server_state(_f32(X0), opt))
  ckpt.close()
  assert meta == {"round": 1} and isinstance(restored.opt_state, FedOptAdaptiveState)
  jax.tree.map(np.testing.assert_array_equal, restored, s1)
  # resuming from the restored state continues identically
  agg2 = {k: v + 0.125 for k, v in s1.params.items()}
  jax.tree.map(np.testing.assert_array_equal, step(restored, agg2), step(s1, agg2))


def test_fedopt_adaptive_rejects_bad_arguments():
  with pytest.raises(ValueError, match=r"unknown FedOpt kind 'adamw'; allowed: adagrad, adam, yogi"):
    fedopt_adaptive("adamw", 0.1)
  with pytest.raises(ValueError, match=r"tau"):
    fedopt_adaptive("adam", 0.1, tau=0.0)
  with pytest.raises(ValueError, match=r"b1"):
    fedopt_adaptive("yogi", 0.1, b1=1.0)


# ----------------------------------------------------------------------------- optax variants


def test_optax_adam_two_steps_by_hand():
  lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-3
  opt = make_server_optimizer(_cfg("adam", learning_rate=lr, b1=b1, b2=b2, eps=eps))
  s1, s2, g1, g2 = _two_rounds(opt)
  for k in X0:
    m1 = (1 - b1) * g1[k]
    v1 = (1 - b2) * g1[k] ** 2
    step1 = lr * (m1 / (1 - b1)) / (np.sqrt(v1 / (1 - b2)) + eps)  # = lr g / (|g| + eps) at t = 1
    x1 = X0[k] - step1
    np.testing.assert_allclose(s1.params[k], x1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(step1, lr * g1[k] / (np.abs(g1[k]) + eps), rtol=1e-12)
    m2 = b1 * m1 + (1 - b1) * g2[k]
    v2 = b2 * v1 + (1 - b2) * g2[k] ** 2
    x2 = x1 - lr * (m2 / (1 - b1 ** 2)) / (np.sqrt(v2 / (1 - b2 ** 2)) + eps)
    np.testing.assert_allclose(s2.params[k], x2, rtol=1e-5, atol=1e-6)
  assert float(s1.params["a"][1, 1]) == 0.0 and float(s1.params["b"][2]) == 3.0
  assert int(s2.round) == 2


def test_optax_yogi_one_step_by_hand():
  lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-3
  init = 1e-6  # optax.yogi's initial_accumulator_value for m and v
  s1, _, g1, _ = _two_rounds(make_server_optimizer(_cfg("yogi", learning_rate=lr, b1=b1, b2=b2, eps=eps)))
  for k in X0:
    g = g1[k]
    m1 = b1 * init + (1 - b1) * g
    v1 = init - (1 - b2) * np.sign(init - g ** 2) * g ** 2
    x1 = X0[k] - lr * (m1 / (1 - b1)) / (np.sqrt(v1 / (1 - b2)) + eps)
    np.testing.assert_allclose(s1.params[k], x1, rtol=1e-6, atol=1e-7)
  # with the 1e-6 initial moments even a zero pseudo-gradient moves its coordinate (by about -lr 1e-6 / 1e-2)
  assert float(s1.params["a"][1, 1]) < 0.0


def test_optax_adagrad_two_steps_by_hand():
  lr, eps = 0.05, 1e-3
  s1, s2, g1, g2 = _two_rounds(make_server_optimizer(_cfg("adagrad", learning_rate=lr, eps=eps)))
  for k in X0:
    g = g1[k]
    acc = g ** 2  # initial accumulator 0
    safe = np.where(acc > 0, acc, 1.0)
    x1 = X0[k] - lr * np.where(acc > 0, g / np.sqrt(safe + eps), 0.0)  # eps inside the sqrt (optax)
    np.testing.assert_allclose(s1.params[k], x1, rtol=1e-6, atol=1e-7)
    acc2 = acc + g2[k] ** 2  # and the second step uses the running sum
    x2 = x1 - lr * g2[k] / np.sqrt(acc2 + eps)
    np.testing.assert_allclose(s2.params[k], x2, rtol=1e-5, atol=1e-6)
  assert float(s1.params["a"][1, 1]) == 0.0  # zero accumulator: no move


# ----------------------------------------------------------------------------- FedAvg(M), configs


def test_fedavg_lr_one_returns_the_aggregate():
  opt = make_server_optimizer(_cfg("fedavg", learning_rate=1.0))
  # dyadic values: x - (x - agg) is exact in float32, so the new params ARE the aggregate
  s1 = server_step(init_server_state(_f32(X0), opt), _f32(AGG1), opt)
  for k in X0:
    np.testing.assert_array_equal(s1.params[k], np.float32(AGG1[k]))
  # arbitrary values: equal up to the one rounding of x - (x - agg)
  rng = np.random.default_rng(0)
  x = {"w": jnp.asarray(rng.normal(size=(50,)), jnp.float32)}
  agg = {"w": jnp.asarray(rng.normal(size=(50,)), jnp.float32)}
  s = server_step(init_server_state(x, opt), agg, opt)
  np.testing.assert_allclose(s.params["w"], agg["w"], rtol=0, atol=4e-7)
  # lr 0.5: halfway between x and the aggregate
  opt = make_server_optimizer(_cfg("fedavg", learning_rate=0.5))
  s1 = server_step(init_server_state(_f32(X0), opt), _f32(AGG1), opt)
  for k in X0:
    np.testing.assert_allclose(s1.params[k], 0.5 * (X0[k] + AGG1[k]), rtol=1e-6)


def test_fedavgm_config_wiring_two_steps():
  """lr 0.5, momentum 0.9 from the config: t = g + 0.9 t, x -= 0.5 t."""
  lr, beta = 0.5, 0.9
  s1, s2, g1, g2 = _two_rounds(make_server_optimizer(_cfg("fedavgm", learning_rate=lr, momentum=beta)))
  for k in X0:
    x1 = X0[k] - lr * g1[k]
    np.testing.assert_allclose(s1.params[k], x1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s2.params[k], x1 - lr * (g2[k] + beta * g1[k]), rtol=1e-5, atol=1e-6)


def test_fedadam_config():
  c = fedadam_config.get_config()
  assert c.algorithm == "fedit" and c.server_optimizer.name == "fedadam"
  assert c.server_optimizer.learning_rate == 1e-2
  opt = make_server_optimizer(c.server_optimizer)
  assert isinstance(opt, optax.GradientTransformation)
  assert isinstance(opt.init(_f32(X0)), FedOptAdaptiveState)  # the paper's FedAdam, not optax.adam


def test_fedadam_smoke_run(tmp_path):
  import math

  from experiments import run as run_cli
  from fedjax_llm import train
  c = fedadam_config.get_config("smoke")
  run_cli.apply_override(c, "fl.num_rounds", "2")
  s = train.run(c, str(tmp_path), progress=False)
  assert s["algorithm"] == "fedit" and s["rounds"] == 2
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "final_params_checksum"):
    assert math.isfinite(s[k]), k
