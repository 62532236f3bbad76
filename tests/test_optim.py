"""FedProx's proximal term (fedjax_llm.optim.add_proximal): neutral at mu = 0, the hand-computed
step at mu > 0, through a FedIT round, smaller client drift, and the chain make_client_optimizer builds."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base as base_config
from configs import fedprox as fedprox_config
from fedjax_llm import tree as T
from fedjax_llm.algorithms import fedit
from fedjax_llm.core.round import build_round
from fedjax_llm.optim import ProximalState, add_proximal
from fedjax_llm.train import make_client_optimizer
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.helpers import random_cohort, tiny_lora_model


def _quadratic_grad(w, target):
  """Gradient of 0.5 ||w - target||^2 (and of a cubic term, so steps differ from a pure linear map)."""
  return jax.tree.map(lambda x, t: (x - t) + 0.1 * x ** 3, w, target)


def test_mu_zero_is_exactly_the_wrapped_optimizer_over_several_steps():
  rng = np.random.default_rng(0)
  w = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  target = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), w)
  for inner in (optax.sgd(0.1), optax.sgd(0.1, momentum=0.9), optax.adam(1e-2)):
    prox, plain = optax.chain(add_proximal(0.0), inner), inner
    wp, wq = w, w
    sp, sq = prox.init(wp), plain.init(wq)
    for _ in range(5):
      up, sp = prox.update(_quadratic_grad(wp, target), sp, wp)
      uq, sq = plain.update(_quadratic_grad(wq, target), sq, wq)
      wp, wq = optax.apply_updates(wp, up), optax.apply_updates(wq, uq)
    jax.tree.map(np.testing.assert_array_equal, wp, wq)


def test_one_sgd_step_with_mu_matches_hand_computation():
  """w1 = w0 - lr (grad(w0) + mu (w0 - anchor)), the anchor being the params the state was initialized with."""
  lr, mu = 0.1, 0.5
  opt = optax.chain(add_proximal(mu), optax.sgd(lr))
  anchor = {"w": jnp.array([1.0, -2.0, 0.5])}
  target = {"w": jnp.array([3.0, 0.0, -1.0])}
  state = opt.init(anchor)
  w0 = {"w": jnp.array([1.5, -1.0, 0.0])}  # the client has moved away from its starting point
  upd, state = opt.update(jax.tree.map(lambda x, t: x - t, w0, target), state, w0)
  w1 = optax.apply_updates(w0, upd)
  # grad = w0 - target = (-1.5, -1, 1); mu (w0 - anchor) = (0.25, 0.5, -0.25)
  np.testing.assert_allclose(w1["w"], [1.5 - 0.1 * (-1.25), -1.0 - 0.1 * (-0.5), 0.0 - 0.1 * 0.75], rtol=1e-6)
  np.testing.assert_array_equal(state[0].anchor["w"], anchor["w"])  # the anchor never moves

  # From the anchor itself: the first step is plain SGD, the second feels the pull back to w_t.
  state = opt.init(anchor)
  g = lambda w: {"w": w["w"] - target["w"]}
  u, state = opt.update(g(anchor), state, anchor)
  a1 = optax.apply_updates(anchor, u)
  np.testing.assert_allclose(a1["w"], anchor["w"] - lr * (anchor["w"] - target["w"]), rtol=1e-6)
  u, state = opt.update(g(a1), state, a1)
  a2 = optax.apply_updates(a1, u)
  np.testing.assert_allclose(a2["w"], a1["w"] - lr * ((a1["w"] - target["w"]) + mu * (a1["w"] - anchor["w"])),
                             rtol=1e-6)


def test_negative_mu_is_a_clear_error():
  with pytest.raises(ValueError, match=r"FedProx mu must be >= 0, got -0.1"):
    add_proximal(-0.1)


def test_fedit_with_prox_zero_equals_plain_fedit_through_a_round():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=2, nonzero_b=True)
  ids = np.array([0, 3, 1, -1], np.int32)
  data = random_cohort(ids, steps=3, seed=2)
  out = []
  for opt in (optax.chain(add_proximal(0.0), optax.sgd(0.2)), optax.sgd(0.2)):
    alg = fedit(loss_fn, client_optimizer=opt, server_optimizer=optax.sgd(1.0))
    server, _, m = build_round(alg, chunk_size=2, donate=False)(base, alg.init(trainable, None), {},
                                                                jnp.asarray(ids), data, jax.random.key(0))
    out.append((server, m))
  jax.tree.map(np.testing.assert_array_equal, out[0][0].params, out[1][0].params)
  for k in out[1][1]:
    np.testing.assert_array_equal(out[0][1][k], out[1][1][k], err_msg=k)


def test_proximal_term_reduces_client_drift_on_the_same_data():
  """Each client's distance ||y_k - x|| after 4 SGD steps is smaller with mu > 0 (lr mu = 0.5)."""
  peft, base, trainable, loss_fn = tiny_lora_model(rank=2, nonzero_b=True)
  ids = np.array([0, 1, 2], np.int32)
  data = random_cohort(ids, steps=4, seed=5)
  lr = 0.5
  drifts = {}
  for mu in (0.0, 1.0):
    alg = fedit(loss_fn, client_optimizer=optax.chain(add_proximal(mu), optax.sgd(lr)),
                server_optimizer=optax.sgd(1.0))
    server = alg.init(trainable, None)
    update = jax.jit(alg.client_update)
    drifts[mu] = []
    for c, cid in enumerate(ids):
      info = ClientInfo(jnp.int32(cid), data.num_steps[c], data.num_tokens[c])
      y, _, _ = update(base, server, {}, ClientBatches(data.tokens[c], data.mask[c]), info, jax.random.key(0))
      drifts[mu].append(float(T.tree_norm(T.tree_sub(y, trainable))))
  assert all(d > 0 for d in drifts[0.0])
  for free, prox in zip(drifts[0.0], drifts[1.0]):
    assert prox < 0.8 * free, (drifts,)  # measured ratio ~0.55


def _client_cfg(**kw):
  c = base_config.get_config().client_optimizer
  for k, v in kw.items():
    c[k] = v
  return c


def test_make_client_optimizer_builds_the_proximal_chain_first():
  lr, mu = 0.1, 0.5
  anchor = {"w": jnp.array([0.0, 0.0])}
  w = {"w": jnp.array([3.0, 4.0])}
  g = {"w": jnp.array([1.0, 0.0])}
  # prox_mu = 0: no proximal state, exactly SGD
  plain = make_client_optimizer(_client_cfg(name="sgd", learning_rate=lr, grad_clip=0.0, prox_mu=0.0))
  assert not any(isinstance(s, ProximalState) for s in jax.tree.leaves(
      plain.init(anchor), is_leaf=lambda s: isinstance(s, ProximalState)))
  # prox_mu > 0, no clipping: -lr (g + mu (w - anchor))
  opt = make_client_optimizer(_client_cfg(name="sgd", learning_rate=lr, grad_clip=0.0, prox_mu=mu))
  state = opt.init(anchor)
  assert isinstance(state[0], ProximalState)
  u, _ = opt.update(g, state, w)
  np.testing.assert_allclose(u["w"], [-lr * (1.0 + 1.5), -lr * 2.0], rtol=1e-6)
  # with clipping: the proximal gradient (2.5, 2) is clipped as a whole (prox first, then clip, then sgd)
  opt = make_client_optimizer(_client_cfg(name="sgd", learning_rate=lr, grad_clip=1.0, prox_mu=mu))
  u, _ = opt.update(g, opt.init(anchor), w)
  np.testing.assert_allclose(u["w"], -lr * np.array([2.5, 2.0]) / np.hypot(2.5, 2.0), rtol=1e-6)


def test_fedprox_config_is_fedit_with_prox_mu():
  c = fedprox_config.get_config()
  assert c.algorithm == "fedit" and c.client_optimizer.prox_mu == 0.01
  assert isinstance(make_client_optimizer(c.client_optimizer).init({"w": jnp.zeros(2)})[0], ProximalState)


def test_fedprox_smoke_run(tmp_path):
  import math

  from experiments import run as run_cli
  from fedjax_llm import train
  c = fedprox_config.get_config("smoke")
  run_cli.apply_override(c, "fl.num_rounds", "2")
  s = train.run(c, str(tmp_path), progress=False)
  assert s["algorithm"] == "fedit" and s["rounds"] == 2
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "final_params_checksum"):
    assert math.isfinite(s[k]), k
  assert s["mean_bytes_up_per_client_round"] == s["trainable_bytes"]  # the prox term costs no communication
