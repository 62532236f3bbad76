"""fedjax_llm.zo: seed-defined directions over pytrees, replay, SPSA (unbiased on a quadratic), local ZO-SGD."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm import zo
from fedjax_llm.types import ClientBatches
from tests.helpers import assert_trees_close

TREE = {"a": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 10, "b": {"c": jnp.ones((5,), jnp.float32)}}


@pytest.mark.parametrize("kind", zo.KINDS)
def test_perturb_is_tree_plus_scaled_noise(kind):
  key = jax.random.key(3)
  z = zo.tree_noise(TREE, key, kind)
  assert jax.tree.structure(z) == jax.tree.structure(TREE)
  assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(z), jax.tree.leaves(TREE)))
  got = zo.tree_perturb(TREE, key, 0.25, kind)
  assert_trees_close(got, jax.tree.map(lambda t, u: t + 0.25 * u, TREE, z), rtol=2e-7, atol=1e-7)  # fma: 1 ulp
  if kind == "rademacher":
    assert all(set(np.unique(np.asarray(l))) <= {-1.0, 1.0} for l in jax.tree.leaves(z))
  # leaves get different noise (leaf index folded into the key); another key gives other noise
  za, zc = np.asarray(z["a"]).ravel(), np.asarray(z["b"]["c"])
  assert not np.array_equal(za[:5], zc)
  assert not np.array_equal(np.asarray(zo.tree_noise(TREE, jax.random.key(4), kind)["a"]), np.asarray(z["a"]))


def test_replay_equals_sequential_application_and_is_order_free():
  keys = jax.vmap(lambda j: zo.direction_key(jax.random.key(0), j))(jnp.arange(6))
  scales = jnp.array([0.5, 0.0, -1.25, 2.0, 0.0, 0.75], jnp.float32)
  want = TREE
  for k, s in zip(keys, scales):
    want = jax.tree.map(lambda t, u: t + float(s) * u, want, zo.tree_noise(TREE, k))
  got = zo.tree_replay(TREE, keys, scales)
  assert_trees_close(got, want, rtol=1e-6, atol=1e-6)
  assert_trees_close(zo.tree_replay(TREE, keys, scales, skip_zeros=False), got, rtol=1e-6, atol=1e-6)
  perm = jnp.array([3, 5, 0, 2, 4, 1])
  assert_trees_close(zo.tree_replay(TREE, keys[perm], scales[perm]), got, rtol=1e-6, atol=1e-6)
  assert_trees_close(zo.tree_replay(TREE, keys, jnp.zeros(6)), TREE, rtol=0, atol=0)


@pytest.mark.parametrize("kind", zo.KINDS)
def test_spsa_is_unbiased_on_a_quadratic(kind):
  """L = 1/2 x^T A x + b^T x: the central difference is exact, g = z . grad L, and E[g z] = grad L.

  Bound: per coordinate, Var(g z_i) = ||grad||^2 + grad_i^2 (Gaussian, E z^4 = 3) or ||grad||^2 - grad_i^2
  (Rademacher), so the mean of M = 20,000 estimates is within 5 sigma = 5 sqrt(Var / M) of grad_i.
  """
  rng = np.random.default_rng(0)
  n = 12
  q = rng.normal(size=(n, n)).astype(np.float32)
  a = jnp.asarray(q @ q.T / n + np.eye(n, dtype=np.float32))
  b = jnp.asarray(rng.normal(size=(n,)).astype(np.float32))
  theta = {"u": jnp.asarray(rng.normal(size=(4,)).astype(np.float32)),
           "v": jnp.asarray(rng.normal(size=(2, 4)).astype(np.float32))}

  def flat(t):
    return jnp.concatenate([t["u"], t["v"].ravel()])

  def loss_at(t):
    x = flat(t)
    return 0.5 * x @ a @ x + b @ x, {"tokens": jnp.ones(())}

  grad = np.asarray(a @ flat(theta) + b)
  m = 20_000
  keys = jax.random.split(jax.random.key(1), m)

  def estimate(k):
    g, _, _, _ = zo.spsa(loss_at, theta, k, 1e-2, kind)
    return g, flat(zo.tree_noise(theta, k, kind))

  g, z = jax.jit(jax.vmap(estimate))(keys)
  np.testing.assert_allclose(g, z @ grad, rtol=2e-3, atol=2e-3)  # exact directional derivative per sample
  est = np.asarray(jnp.mean(g[:, None] * z, axis=0))
  sq = float(np.sum(grad ** 2))
  var = sq + grad ** 2 if kind == "gaussian" else sq - grad ** 2
  assert np.all(np.abs(est - grad) < 5 * np.sqrt(var / m)), (est, grad)
  # and the projection on any fixed direction u: mean of (g z) . u -> grad . u
  u = rng.normal(size=(n,)).astype(np.float32)
  proj = np.asarray((g[:, None] * z) @ u)
  assert abs(proj.mean() - grad @ u) < 5 * proj.std() / np.sqrt(m)


def test_local_training_masks_steps_and_skips_non_finite_losses():
  theta = {"w": jnp.array([1.0, -2.0, 0.5])}

  def loss_fn(base, t, tokens, mask, key):
    del base, key
    scale = jnp.sum(tokens)  # the step's "data": 1 -> finite loss, 0 -> NaN loss
    l = jnp.where(scale > 0, jnp.sum(t["w"] ** 2) * scale, jnp.nan)
    return l, {"tokens": jnp.sum(mask)}

  def directions(i, k):
    return jax.random.key(7)[None], jnp.zeros((1,), jnp.int32)

  tokens = jnp.array([1, 0, 1, 1], jnp.int32).reshape(4, 1, 1)
  batches = ClientBatches(tokens, jnp.ones((4, 1, 1), jnp.float32))
  got, _, scalars, m = zo.zo_local_training(loss_fn, None, theta, batches, jnp.asarray(3), jax.random.key(0),
                                              directions, 0.1, 1e-3)
  # by hand: steps 0 and 2 update along the same z, step 1 (NaN) and step 3 (inactive) do nothing
  z = zo.tree_noise(theta, jax.random.key(7))["w"]
  w = theta["w"]
  for _ in range(2):
    g = 2 * float(w @ z)  # exact for L = ||w||^2 (central difference)
    w = w - 0.1 * g * z
  np.testing.assert_allclose(got["w"], w, rtol=2e-3, atol=2e-4)
  assert float(scalars[1, 0]) == 0.0 and float(scalars[3, 0]) == 0.0 and float(scalars[0, 0]) != 0.0
  assert float(m["tokens"]) == 3.0  # the NaN step's tokens count, the inactive step's do not


def test_index_bytes_and_bad_kind():
  assert [zo.index_bytes(k) for k in (1, 256, 257, 65536, 65537)] == [1, 1, 2, 2, 4]
  with pytest.raises(ValueError, match="unknown perturbation kind 'uniform'; allowed: gaussian, rademacher"):
    zo.check_kind("uniform")
