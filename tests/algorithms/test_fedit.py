"""FedIT: FedAvg of A and B, and its exactness from B = 0 after one SGD step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_llm import tree as T
from fedjax_llm.algorithms import fedit
from fedjax_llm.core import client_store as store_lib
from fedjax_llm.core.round import build_round
from fedjax_llm.peft import lora as lora_lib
from tests.helpers import assert_trees_close, random_cohort, tiny_lora_model


def _client_params(algorithm, base, server, ids, data, key):
  """Each client's trained factors, computed one by one."""
  outs = []
  for c, cid in enumerate(ids):
    from fedjax_llm.types import ClientBatches, ClientInfo
    info = ClientInfo(jnp.int32(cid), data.num_steps[c], data.num_tokens[c])
    out, _, _ = algorithm.client_update(base, server, {}, ClientBatches(data.tokens[c], data.mask[c]), info,
                                        jax.random.fold_in(key, cid))
    outs.append(out)
  return outs


def test_fedit_aggregate_is_weighted_mean_of_factors():
  peft, base, trainable, loss_fn = tiny_lora_model(rank=2, nonzero_b=True)
  algorithm = fedit(loss_fn, client_optimizer=optax.sgd(0.3), server_optimizer=optax.sgd(1.0))
  ids = np.array([0, 1, 2], np.int32)
  data = random_cohort(ids, steps=2)
  server = algorithm.init(trainable, None)
  key = jax.random.key(4)
  outs = _client_params(algorithm, base, server, ids, data, key)
  data = data._replace(weights=jnp.array([1.0, 3.0, 6.0]))  # the cohort's p_k, independent of round tokens
  p = np.array([0.1, 0.3, 0.6])
  expected = jax.tree.map(lambda *xs: sum(pi * x for pi, x in zip(p, xs)), *outs)
  new, _, _ = build_round(algorithm, chunk_size=3, donate=False)(base, server, {}, jnp.asarray(ids), data, key)
  assert_trees_close(new.params, expected, rtol=1e-5, atol=1e-7)
  # With B != 0 and several steps, FedAvg of factors is NOT the mean of products (aggregation noise).
  noise = []
  for path, m in lora_lib.lora_modules(new.params):
    prod_mean = sum(pi * (o_a @ o_b) for pi, (o_a, o_b) in
                    zip(p, [(dict(lora_lib.lora_modules(o))[path]["lora_a"],
                             dict(lora_lib.lora_modules(o))[path]["lora_b"]) for o in outs]))
    noise.append(float(jnp.max(jnp.abs(prod_mean - m["lora_a"] @ m["lora_b"]))))
  assert max(noise) > 1e-6


def test_fedit_one_sgd_step_from_zero_b_is_exact_aggregation():
  """From B = 0, one SGD step leaves every A_k = A, so sum p_k B_k A_k = B_bar A_bar exactly."""
  peft, base, trainable, loss_fn = tiny_lora_model(rank=3)
  algorithm = fedit(loss_fn, client_optimizer=optax.sgd(0.5), server_optimizer=optax.sgd(1.0))
  ids = np.array([0, 1, 2, 3], np.int32)
  data = random_cohort(ids, steps=1, seed=11)
  server = algorithm.init(trainable, None)
  key = jax.random.key(1)
  outs = _client_params(algorithm, base, server, ids, data, key)
  p = np.asarray(data.weights) / np.sum(data.weights)
  new, _, _ = build_round(algorithm, chunk_size=2, donate=False)(base, server, {}, jnp.asarray(ids), data, key)
  n_modules = 0
  for path, m in lora_lib.lora_modules(new.params):
    client_mods = [dict(lora_lib.lora_modules(o))[path] for o in outs]
    for cm in client_mods:  # A untouched (its gradient is s * x^T (dL/dy) B^T = 0 at B = 0)
      np.testing.assert_array_equal(cm["lora_a"], dict(lora_lib.lora_modules(trainable))[path]["lora_a"])
    exact = sum(pi * cm["lora_a"] @ cm["lora_b"] for pi, cm in zip(p, client_mods))
    np.testing.assert_allclose(m["lora_a"] @ m["lora_b"], exact, rtol=1e-5, atol=1e-8)
    assert float(jnp.abs(m["lora_b"]).max()) > 0  # B did move
    n_modules += 1
  assert n_modules == 4  # q and v in each of 2 layers


def test_server_fedavgm_applies_momentum_to_pseudo_gradient():
  """Hand computation: two rounds of FedAvgM(lr=1, beta=0.5) on a fixed pseudo-gradient."""
  from fedjax_llm.core.algorithm import init_server_state, server_step
  opt = optax.sgd(1.0, momentum=0.5)
  params = {"w": jnp.array([1.0, 2.0])}
  s = init_server_state(params, opt)
  s = server_step(s, {"w": jnp.array([0.0, 2.0])}, opt)  # pseudo-grad (1, 0) -> params (0, 2)
  np.testing.assert_allclose(s.params["w"], [0.0, 2.0])
  s = server_step(s, {"w": jnp.array([-1.0, 2.0])}, opt)  # grad (1, 0); momentum 1 + 0.5 = 1.5
  np.testing.assert_allclose(s.params["w"], [-1.5, 2.0])
  assert int(s.round) == 2
  assert float(T.tree_norm(s.params)) > 0
