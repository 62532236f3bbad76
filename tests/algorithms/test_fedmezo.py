"""FedMeZO: MeZO local steps by hand, seed upload == weight upload, conformance, bytes, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm import tree as T
from fedjax_llm import zo
from fedjax_llm.algorithms.fedmezo import fedmezo, step_directions
from fedjax_llm.core import client_store as store_lib
from fedjax_llm.core.round import build_round
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import assert_trees_close, random_cohort, tiny_lora_model


def _alg(loss_fn, **kw):
  args = dict(server_optimizer=optax.sgd(1.0), client_learning_rate=0.05, eps=1e-2)
  return fedmezo(loss_fn, **{**args, **kw})


def test_mezo_steps_by_hand_on_a_quadratic():
  """L = ||theta - c||^2 per batch: g_i = z_i . 2 (theta - c) (exact), theta -= (eta / n) sum_i g_i z_i."""
  theta = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([[0.1, 0.2]])}
  target = {"w": jnp.array([1.0, 1.0, 1.0]), "b": jnp.array([[0.0, -1.0]])}

  def loss_fn(base, t, tokens, mask, key):
    d = T.tree_sub(t, target)
    return T.tree_sq_norm(d) * jnp.sum(tokens), {"nll_sum": jnp.zeros(()), "tokens": jnp.sum(mask)}

  alg = _alg(loss_fn, num_perturbations=3, client_learning_rate=0.01)
  server = alg.init(theta, jax.random.key(0))
  batches = ClientBatches(jnp.ones((2, 1, 1), jnp.int32), jnp.ones((2, 1, 1), jnp.float32))
  info = ClientInfo(client_id=jnp.asarray(3), num_steps=jnp.asarray(2), num_tokens=jnp.asarray(2.0))
  key = jax.random.key(11)
  out, _, m = alg.client_update(None, server, {}, batches, info, key)
  want = theta
  for i in range(2):
    keys, _ = step_directions(3)(i, jax.random.fold_in(key, i))
    zs = [zo.tree_noise(theta, k) for k in keys]
    grad = T.tree_scale(T.tree_sub(want, target), 2.0)
    gs = [float(T.tree_vdot(z, grad)) for z in zs]
    for g, z in zip(gs, zs):
      want = T.tree_sub(want, T.tree_scale(z, 0.01 * g / 3))
  assert_trees_close(out, want, rtol=2e-3, atol=2e-4)
  assert float(m["sum_forward_passes"]) == 2 * 3 * 2
  assert float(m["sum_bytes_up"]) == T.tree_bytes(theta) == float(m["sum_bytes_down"])


def test_seed_upload_gives_the_same_model_as_weight_upload():
  """Linear in z, no weight decay: replaying (key, scalars) == FedAvg of the trained trees."""
  _, base, trainable, loss_fn = tiny_lora_model(nonzero_b=True)
  ids = np.array([4, 1, 6, -1], np.int32)
  data = random_cohort(ids, steps=2, num_steps=[2, 1, 2, 0])
  data = data._replace(weights=jnp.array([1.0, 3.0, 0.5, 0.0]))
  got = {}
  for upload in ("weights", "seeds"):
    alg = _alg(loss_fn, upload=upload, num_perturbations=2)
    server = alg.init(trainable, jax.random.key(0))
    store = store_lib.init_store(alg.init_client, trainable, 8)
    got[upload] = build_round(alg, chunk_size=2, donate=False)(base, server, store, jnp.asarray(ids), data,
                                                               jax.random.key(1))
  assert_trees_close(got["seeds"][0].params, got["weights"][0].params, rtol=1e-5, atol=1e-6)
  assert float(T.tree_norm(T.tree_sub(got["seeds"][0].params, trainable))) > 1e-4
  assert float(got["seeds"][2]["sum_bytes_up"]) == 3 * 8 + 4 * 2 * (2 + 1 + 2)  # key + n scalars per step
  assert float(got["weights"][2]["sum_bytes_up"]) == 3 * T.tree_bytes(trainable)


def test_round_conformance():
  """The seed upload (the weight upload is FedAvg of the trees, and equals it: the test above)."""
  _, base, trainable, loss_fn = tiny_lora_model(nonzero_b=True)
  check_round_conformance(_alg(loss_fn, upload="seeds", kind="rademacher"), base, trainable, rtol=2e-3, atol=2e-5)


def test_bad_hyper_parameters():
  _, _, _, loss_fn = tiny_lora_model()
  with pytest.raises(ValueError, match="num_perturbations must be an integer >= 1, got 0"):
    _alg(loss_fn, num_perturbations=0)
  with pytest.raises(ValueError, match=r"upload must be one of \('weights', 'seeds'\), got 'grads'"):
    _alg(loss_fn, upload="grads")
  with pytest.raises(ValueError, match="eps must be a finite number > 0"):
    _alg(loss_fn, eps=0.0)
