"""FedOpt server optimizers built by ``train.make_server_optimizer``, checked step by step by hand.

The server applies an optax optimizer to the pseudo-gradient g = x - mean_k y_k (``server_step``).
Differences from Reddi et al. 2021 ("Adaptive Federated Optimization", arXiv:2003.00295,
Algorithm 2: m = b1 m + (1 - b1) D, x += eta m / (sqrt(v) + tau), D = -g, m_{-1} = 0,
v_{-1} >= tau^2, no bias correction), which these tests pin down as implemented:
  * fedadam = optax.adam: bias-corrected (m / (1 - b1^t), v / (1 - b2^t)), v starts at 0;
  * fedyogi = optax.yogi: bias-corrected, and BOTH m and v start at 1e-6 (optax's
    initial_accumulator_value), not m = 0 and v = tau^2;
  * fedadagrad = optax.adagrad: no first-moment momentum (the paper's b1 is ignored) and eps is
    added INSIDE the square root: step = g / sqrt(sum g^2 + eps), not g / (sqrt(sum g^2) + tau);
    a coordinate whose accumulator is 0 does not move.
eps is the config's ``server_optimizer.eps`` (tau). FedAvgM with lr 1 is covered in
tests/algorithms/test_fedit.py (momentum math); here only its config wiring with lr != 1.
"""
import jax.numpy as jnp
import numpy as np
import optax

from configs import base as base_config
from configs import fedadam as fedadam_config
from fedjax_llm.core.algorithm import init_server_state, server_step
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


def _two_rounds(opt):
  """Round 1 aggregates to AGG1, round 2 to x1 + AGG2_DELTA; returns (x1, x2, g1, g2) (float64 g's)."""
  s = init_server_state(_f32(X0), opt)
  s1 = server_step(s, _f32(AGG1), opt)
  x1 = {k: np.asarray(v, np.float64) for k, v in s1.params.items()}
  agg2 = {k: x1[k] + AGG2_DELTA[k] for k in X0}
  s2 = server_step(s1, _f32(agg2), opt)
  g1 = {k: X0[k] - AGG1[k] for k in X0}
  g2 = {k: x1[k] - np.float32(agg2[k]).astype(np.float64) for k in X0}
  return s1, s2, g1, g2


def test_fedadam_two_steps_by_hand():
  lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-3
  opt = make_server_optimizer(_cfg("fedadam", learning_rate=lr, b1=b1, b2=b2, eps=eps))
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
  # the zero pseudo-gradient coordinate does not move in round 1
  assert float(s1.params["a"][1, 1]) == 0.0 and float(s1.params["b"][2]) == 3.0
  assert int(s2.round) == 2


def test_fedadam_differs_from_the_papers_uncorrected_update():
  """Reddi et al.'s FedAdam has no bias correction. With b1 = 0.9, b2 = 0.99 the corrections cancel at
  step 1 ((1 - b1) / sqrt(1 - b2) = 1), but step 2 of optax is sqrt(1 - b2^2) / (1 - b1^2) ~ 0.74 of the
  paper's (eps tiny here so that the ratio is exact)."""
  lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-8
  s1, s2, g1, g2 = _two_rounds(make_server_optimizer(_cfg("fedadam", learning_rate=lr, b1=b1, b2=b2, eps=eps)))
  x0, ga, gb = X0["b"][0], g1["b"][0], g2["b"][0]  # a coordinate with g = 0.5 then 0.2
  m1, v1 = (1 - b1) * ga, b2 * eps ** 2 + (1 - b2) * ga ** 2  # the paper: m_{-1} = 0, v_{-1} = tau^2
  paper1 = lr * m1 / (np.sqrt(v1) + eps)
  m2, v2 = b1 * m1 + (1 - b1) * gb, b2 * v1 + (1 - b2) * gb ** 2
  paper2 = lr * m2 / (np.sqrt(v2) + eps)
  step1 = x0 - float(s1.params["b"][0])
  step2 = float(s1.params["b"][0]) - float(s2.params["b"][0])
  np.testing.assert_allclose(step1, paper1, rtol=1e-5)
  np.testing.assert_allclose(step2 / paper2, np.sqrt(1 - b2 ** 2) / (1 - b1 ** 2), rtol=1e-4)
  assert abs(step2 / paper2 - 1) > 0.2


def test_fedyogi_one_step_by_hand():
  lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-3
  init = 1e-6  # optax.yogi's initial_accumulator_value for m and v
  s1, _, g1, _ = _two_rounds(make_server_optimizer(_cfg("fedyogi", learning_rate=lr, b1=b1, b2=b2, eps=eps)))
  for k in X0:
    g = g1[k]
    m1 = b1 * init + (1 - b1) * g
    v1 = init - (1 - b2) * np.sign(init - g ** 2) * g ** 2
    x1 = X0[k] - lr * (m1 / (1 - b1)) / (np.sqrt(v1 / (1 - b2)) + eps)
    np.testing.assert_allclose(s1.params[k], x1, rtol=1e-6, atol=1e-7)
  # with the 1e-6 initial moments even a zero pseudo-gradient moves its coordinate (by about -lr 1e-6 / 1e-2)
  assert float(s1.params["a"][1, 1]) < 0.0


def test_fedadagrad_one_step_by_hand():
  lr, eps = 0.05, 1e-3
  s1, s2, g1, g2 = _two_rounds(make_server_optimizer(_cfg("fedadagrad", learning_rate=lr, eps=eps)))
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
  assert isinstance(make_server_optimizer(c.server_optimizer), optax.GradientTransformation)


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
