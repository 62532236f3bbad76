"""FLASC: top-k sparse download of the global LoRA, dense local training, top-k sparse upload of the update."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import flasc as flasc_config
from fedjax_llm import train
from fedjax_llm.algorithms import fedit
from fedjax_llm.algorithms.flasc import flasc, message_bytes, num_kept, sparsify, sparsity_mask, topk_mask
from fedjax_llm.core.round import build_round
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import random_cohort, tiny_lora_model


def _toy_tree(a, b):
  return {"m": {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}}


def test_num_kept_is_ceil_of_density_times_n():
  assert num_kept(10, 0.7) == 7  # 0.7 * 10 = 7.000000000000001 in floating point: still 7
  assert num_kept(10, 0.71) == 8
  assert num_kept(3, 0.01) == 1  # at least one entry
  assert num_kept(4, 1.0) == 4
  assert num_kept(1000, 0.25) == 250


def test_topk_mask_keeps_the_largest_magnitudes_by_hand():
  x = jnp.array([0.1, -3.0, 2.0, 0.5, -0.2])
  np.testing.assert_array_equal(topk_mask(x, 2), [False, True, True, False, False])
  np.testing.assert_array_equal(topk_mask(x, 3), [False, True, True, True, False])
  np.testing.assert_array_equal(topk_mask(x.reshape(1, 5), 5), np.ones((1, 5), bool))


def test_global_and_per_tensor_masks_and_bytes_by_hand():
  tree = _toy_tree([[5.0, 0.1], [0.2, 0.3]], [[1.0, -2.0]])  # 6 entries
  g = sparsity_mask(tree, 0.5, "global")  # k = 3: 5, -2, 1
  np.testing.assert_array_equal(g["m"]["lora_a"], [[True, False], [False, False]])
  np.testing.assert_array_equal(g["m"]["lora_b"], [[True, True]])
  t = sparsity_mask(tree, 0.5, "tensor")  # a: k = 2 (5, 0.3); b: k = 1 (-2)
  np.testing.assert_array_equal(t["m"]["lora_a"], [[True, False], [False, True]])
  np.testing.assert_array_equal(t["m"]["lora_b"], [[False, True]])
  np.testing.assert_array_equal(sparsify(tree, 0.5, "global")["m"]["lora_a"], [[5.0, 0.0], [0.0, 0.0]])
  # bytes: value (4) + int32 index (4) per kept entry, or the dense 4 bytes per entry when smaller
  assert message_bytes(tree, 1 / 3, "global") == 2 * 8  # k = 2
  assert message_bytes(tree, 0.5, "global") == 3 * 8  # k = 3: 24 = dense 6 * 4 too
  assert message_bytes(tree, 0.9, "global") == 6 * 4  # k = 6: the dense encoding is smaller than 48
  assert message_bytes(tree, 1.0, "global") == 6 * 4
  assert message_bytes(tree, 0.25, "tensor") == 8 + 8  # a: k = 1, b: k = ceil(0.5) = 1
  assert message_bytes(tree, 0.75, "tensor") == 4 * 4 + 2 * 4  # a: k = 3 (24 > 16), b: k = 2 (16 > 8)


def test_server_applies_the_mean_sparse_update_to_its_dense_params_by_hand():
  alg = flasc(None, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), density_down=0.5,
              density_up=0.25)
  server = alg.init(_toy_tree([[4.0, -1.0]], [[0.5], [3.0]]), None)
  down = alg.eval_params(server)  # the clients' model: top 2 of |4, -1, 0.5, 3|
  np.testing.assert_array_equal(down["m"]["lora_a"], [[4.0, 0.0]])
  np.testing.assert_array_equal(down["m"]["lora_b"], [[0.0], [3.0]])
  # client 1 sends u1 = +1 at a[0, 1] (an entry the download pruned), client 2 sends u2 = +2 at b[0, 0]
  out1 = _toy_tree([[4.0, 1.0]], [[0.0], [3.0]])
  out2 = _toy_tree([[4.0, 0.0]], [[2.0], [3.0]])
  outputs = jax.tree.map(lambda *x: jnp.stack(x), out1, out2, out1)
  new, m = alg.aggregate(server, outputs, jnp.array([1.0, 1.0, 0.0]))  # third slot empty
  # P + 0.5 u1 + 0.5 u2: the pruned -1 is not lost, it moves to -0.5
  np.testing.assert_allclose(new.params["m"]["lora_a"], [[4.0, -0.5]], rtol=1e-6)
  np.testing.assert_allclose(new.params["m"]["lora_b"], [[1.5], [3.0]], rtol=1e-6)
  np.testing.assert_allclose(m["update_norm"], np.sqrt(0.25 + 1.0), rtol=1e-6)


def _one_client(alg, base, trainable, data, key, c=0):
  server = alg.init(trainable, None)
  info = ClientInfo(jnp.int32(c), data.num_steps[c], data.num_tokens[c])
  out, _, m = jax.jit(alg.client_update)(base, server, {}, ClientBatches(data.tokens[c], data.mask[c]), info, key)
  return server, out, m


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_uploaded_update_keeps_exactly_the_top_k_entries(scope):
  _, base, trainable, loss_fn = tiny_lora_model(rank=2, nonzero_b=True)
  opt = optax.adam(0.02)
  data = random_cohort(np.array([0], np.int32), steps=2)
  key = jax.random.key(5)
  d_up, d_down = 0.1, 0.5
  sparse = flasc(loss_fn, client_optimizer=opt, server_optimizer=optax.sgd(1.0), density_down=d_down,
                 density_up=d_up, scope=scope)
  dense = flasc(loss_fn, client_optimizer=opt, server_optimizer=optax.sgd(1.0), density_down=d_down,
                density_up=1.0, scope=scope)
  server, out, m = _one_client(sparse, base, trainable, data, key)
  _, trained, _ = _one_client(dense, base, trainable, data, key)  # the same dense local training
  start = sparse.eval_params(server)  # P_down, what the client started from
  leaves = lambda t: [np.asarray(x).ravel() for x in jax.tree.leaves(t)]
  s, o, t = leaves(start), leaves(out), leaves(trained)
  kept = [oi != si for oi, si in zip(o, s)]
  delta = [ti - si for ti, si in zip(t, s)]
  # the download: ceil(d_down n) entries of P survive (globally or per tensor)
  p = leaves(trainable)
  if scope == "global":
    assert sum(int(np.count_nonzero(x)) for x in s) == num_kept(sum(x.size for x in p), d_down)
    groups = [(np.concatenate(kept), np.concatenate(delta))]
  else:
    assert [int(np.count_nonzero(x)) for x in s] == [num_kept(x.size, d_down) for x in p]
    groups = list(zip(kept, delta))
  for k, d in groups:
    assert int(k.sum()) == num_kept(k.size, d_up)  # exactly ceil(d_up n) nonzero update entries
    # ... and they are the largest |delta| (the dense reference is a separately compiled run: allow 1 ulp)
    assert np.abs(d[k]).min() >= np.abs(d[~k]).max() - 1e-7
  for oi, ti, ki in zip(o, t, kept):
    np.testing.assert_allclose(oi[ki], ti[ki], rtol=1e-6, atol=1e-9)  # the kept entries are the client's values
  n = sum(x.size for x in p)
  if scope == "global":
    assert float(m["sum_bytes_up"]) == 8 * num_kept(n, d_up)
    assert float(m["sum_bytes_down"]) == min(8 * num_kept(n, d_down), 4 * n)
  else:
    assert float(m["sum_bytes_up"]) == sum(8 * num_kept(x.size, d_up) for x in p)


def test_density_one_is_exactly_fedit():
  _, base, trainable, loss_fn = tiny_lora_model(rank=2, nonzero_b=True)
  opt, sopt = optax.adamw(1e-2, weight_decay=0.1), optax.adam(1e-2)
  ids = np.array([0, 2, 5, -1], np.int32)
  runs = []
  for alg in (flasc(loss_fn, client_optimizer=opt, server_optimizer=sopt, density_down=1.0, density_up=1.0),
              fedit(loss_fn, client_optimizer=opt, server_optimizer=sopt)):
    step = build_round(alg, chunk_size=2, donate=False)
    server = alg.init(trainable, None)
    for r in range(2):
      server, _, m = step(base, server, {}, jnp.asarray(ids), random_cohort(ids, seed=r), jax.random.key(r))
    runs.append((server, m))
  (s1, m1), (s2, m2) = runs
  for x, y in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_array_equal(x, y)
  for k in m2:
    np.testing.assert_array_equal(m1[k], m2[k], err_msg=k)


def test_round_conformance():
  _, base, trainable, loss_fn = tiny_lora_model(rank=2, nonzero_b=True)
  alg = flasc(loss_fn, client_optimizer=optax.adamw(1e-2, weight_decay=0.1), server_optimizer=optax.adam(1e-2),
              density_down=0.5, density_up=0.3)
  check_round_conformance(alg, base, trainable, num_clients=8)


@pytest.mark.parametrize("kwargs, message", [
    ({"density_up": 0.0}, r"density_up must be in \(0, 1\] \(the fraction of entries sent\), got 0.0"),
    ({"density_up": -0.5}, r"density_up must be in \(0, 1\] .*got -0.5"),
    ({"density_down": 1.5}, r"density_down must be in \(0, 1\] .*got 1.5"),
    ({"density_down": "dense"}, r"density_down must be a number in \(0, 1\], got 'dense'"),
    ({"scope": "layer"}, r"scope must be one of global, tensor, got 'layer'"),
])
def test_bad_hyper_parameters_are_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    flasc(None, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), **kwargs)


def test_tree_without_lora_modules_is_a_clear_error():
  alg = flasc(None, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0))
  with pytest.raises(ValueError, match=r"flasc needs LoRA modules .* top-level keys \['w'\]"):
    alg.init({"w": jnp.ones((2, 2))}, None)


def test_smoke_run_end_to_end(tmp_path):
  c = flasc_config.get_config("smoke")
  with c.unlocked():
    c.fl.num_rounds = 2
  s = train.run(c, str(tmp_path), progress=False)
  assert s["algorithm"] == "flasc" and s["rounds"] == 2
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "final_params_checksum"):
    assert np.isfinite(s[k]), k
  # smoke model: 1792 LoRA entries; density 0.25 -> 448 entries at 8 bytes, each way
  assert s["trainable_params"] == 1792
  assert s["mean_bytes_up_per_client_round"] == 448 * 8
  assert s["total_bytes_up"] == s["total_bytes_down"]
  # the config's per-tensor scope downloads B from round 1, so the global model learns
  assert s["final_eval_loss"] < s["initial_eval_loss"] - 1e-3
