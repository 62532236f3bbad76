"""SLoRA: sparse stage on a fixed random mask, SVD switch to LoRA, then FedIT, in one compiled round."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import slora as slora_config
from fedjax_llm import train
from fedjax_llm.algorithms import common, fedit
from fedjax_llm.algorithms.slora import make_mask, mask_nnz, slora, switch_to_lora
from fedjax_llm.core.algorithm import init_server_state
from fedjax_llm.core.round import build_round
from fedjax_llm.types import ClientBatches, ClientInfo
from tests.algorithms.conformance import check_round_conformance
from tests.helpers import assert_trees_close, random_cohort, tiny_lora_model

S = 2.0  # LoRA scale alpha / r of tiny_lora_model(rank=4, alpha=8)


def _kernel_list(tree):
  """[kernel] of every targeted layer of a merged (eval_params / trainable) tree, in a fixed order."""
  out = []

  def go(t):
    if isinstance(t, dict):
      if "kernel" in t and "lora" in t:
        out.append((t["kernel"], t["lora"]))
        return
      for k in sorted(t):
        go(t[k])
  go(tree)
  return out


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _build(loss_fn, **kw):
  args = dict(client_optimizer=optax.sgd(0.5), server_optimizer=optax.sgd(1.0), lora_scale=S, seed=3,
              sparse_rounds=1, density=0.1)
  args.update(kw)
  return slora(loss_fn, **args)


def test_switch_by_hand_on_a_diagonal_update():
  """dW_s = diag(3, 2, 1) (4 x 3) held at flat indices 0, 4, 8; r = 2, s = 2: s a b = diag(3, 2, 0)."""
  w0 = jnp.arange(12.0).reshape(4, 3) / 10
  kernels = {"l": {"kernel": w0}}
  lora = {"l": {"lora": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.zeros((2, 3))}}}
  idx = {"l": {"kernel": jnp.array([0, 4, 8], jnp.int32)}}
  vals = {"l": {"kernel": jnp.array([3.0, 2.0, 1.0])}}
  new_k, new_l = switch_to_lora(kernels, lora, idx, vals, 2.0, "pretrained")
  a, b = new_l["l"]["lora"]["lora_a"], new_l["l"]["lora"]["lora_b"]
  np.testing.assert_allclose(a, [[math.sqrt(1.5), 0], [0, 1], [0, 0], [0, 0]], atol=1e-6)
  np.testing.assert_allclose(b, [[math.sqrt(1.5), 0, 0], [0, 1, 0]], atol=1e-6)
  np.testing.assert_array_equal(new_k["l"]["kernel"], w0)  # the paper: reset to W0
  res_k, _ = switch_to_lora(kernels, lora, idx, vals, 2.0, "residual")
  np.testing.assert_allclose(res_k["l"]["kernel"], w0 + np.diag([0.0, 0.0, 1.0, 0.0])[:, :3], atol=1e-6)


def test_mask_is_fixed_by_the_seed_and_has_the_density():
  kernels = {"q": {"kernel": jnp.zeros((40, 30))}, "v": {"kernel": jnp.zeros((40, 10))}}
  m = make_mask(kernels, 0.05, seed=7)
  assert mask_nnz((40, 30), 0.05) == 60 and mask_nnz((40, 10), 0.05) == 20 and mask_nnz((3, 3), 1e-6) == 1
  for leaf, n, size in zip(jax.tree.leaves(m), (60, 20), (1200, 400)):
    leaf = np.asarray(leaf)
    assert leaf.dtype == np.int32 and leaf.shape == (n,)
    assert np.all(np.diff(leaf) > 0) and leaf[0] >= 0 and leaf[-1] < size  # sorted, distinct, in range
  assert all(np.array_equal(x, y) for x, y in zip(_leaves(m), _leaves(make_mask(kernels, 0.05, seed=7))))
  assert not np.array_equal(_leaves(m)[0], _leaves(make_mask(kernels, 0.05, seed=8))[0])
  assert not np.array_equal(_leaves(m)[0][:20], _leaves(m)[1])  # each kernel its own mask


def test_sparse_stage_changes_only_masked_entries_and_averages_them():
  _, base, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0, mutable_base=True)
  algorithm = _build(loss_fn, sparse_rounds=2)
  state = algorithm.init(trainable, jax.random.key(0))
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state.params["lora"]))  # LoRA off
  ids = np.array([0, 1, 2, 4], np.int32)
  data = random_cohort(ids, seed=5)._replace(weights=jnp.array([1.0, 2.0, 3.0, 4.0]))
  key = jax.random.key(9)
  new, _, m = build_round(algorithm, chunk_size=2, donate=False)(base, state, {}, jnp.asarray(ids), data, key)
  assert int(new.round) == 1 and float(m["stage"]) == 1.0
  # FedAvg of the clients' sparse values (p_k = 0.1, 0.2, 0.3, 0.4)
  outs = []
  client_update = jax.jit(algorithm.client_update)
  for c, cid in enumerate(ids):
    info = ClientInfo(jnp.int32(cid), data.num_steps[c], data.num_tokens[c])
    out, _, _ = client_update(base, state, {}, ClientBatches(data.tokens[c], data.mask[c]), info,
                              jax.random.fold_in(key, cid))
    outs.append(out["sparse"])
  expected = jax.tree.map(lambda *xs: sum(p * x for p, x in zip((0.1, 0.2, 0.3, 0.4), xs)), *outs)
  assert_trees_close(new.params["sparse"], expected, rtol=1e-5, atol=1e-7)
  # the model: only the masked entries of the targeted kernels moved, the LoRA branch is still off
  mask = _leaves(state.extra["mask"])
  nnz = sum(x.size for x in mask)
  for (w0, _), (w, m_), idx in zip(_kernel_list(trainable), _kernel_list(algorithm.eval_params(new)), mask):
    diff = (np.asarray(w) - np.asarray(w0)).reshape(-1)
    outside = np.ones(diff.size, bool)
    outside[idx] = False
    assert np.all(diff[outside] == 0.0)
    assert np.count_nonzero(diff[idx]) == idx.size  # every kept entry trained
    assert float(jnp.abs(m_["lora_b"]).max()) == 0.0
  assert float(m["sum_bytes_up"]) == float(m["sum_bytes_down"]) == 4 * 8.0 * nnz  # (value, index) per entry


def test_switch_is_the_rank_r_svd_of_the_sparse_update_and_resets_to_w0():
  _, base, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0, mutable_base=True)
  ids = np.array([0, 1, 2, 4], np.int32)
  data, key = random_cohort(ids, seed=5), jax.random.key(9)

  def one_round(algorithm):
    state = algorithm.init(trainable, None)
    return build_round(algorithm, chunk_size=4, donate=False)(base, state, {}, jnp.asarray(ids), data, key)[0]

  no_switch = one_round(_build(loss_fn, sparse_rounds=2))  # the same stage-1 round, no switch yet
  mask = _leaves(no_switch.extra["mask"])
  dws = []
  for (w0, _), idx, v in zip(_kernel_list(trainable), mask, _leaves(no_switch.params["sparse"])):
    dw = np.zeros(w0.size)
    dw[idx] = v
    dws.append(dw.reshape(w0.shape))
  for rule in ("pretrained", "residual"):
    state = one_round(_build(loss_fn, sparse_rounds=1, frozen_weight=rule))
    assert int(state.round) == 1
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state.params["sparse"]))  # consumed
    layers = _kernel_list(_build(loss_fn).eval_params(state))
    for (w0, _), (w, m), dw in zip(_kernel_list(trainable), layers, dws):
      prod = S * np.asarray(m["lora_a"], np.float64) @ np.asarray(m["lora_b"], np.float64)
      sigma = np.linalg.svd(dw, compute_uv=False)
      assert sigma[4] > 0  # the update has rank > r, so the identity below is not trivial
      np.testing.assert_allclose(np.sum((dw - prod) ** 2), np.sum(sigma[4:] ** 2), rtol=1e-4)
      np.testing.assert_allclose(np.linalg.norm(prod), np.sqrt(np.sum(sigma[:4] ** 2)), rtol=1e-4)
      if rule == "pretrained":  # the paper: W <- W0, the model becomes W0 + s a b
        np.testing.assert_array_equal(w, w0)
      else:  # W <- W0 + dW_s - s a b: the model is continuous, W0 + dW_s
        np.testing.assert_allclose(np.asarray(w, np.float64) + prod, np.asarray(w0) + dw, atol=1e-6)


def test_stage_two_is_fedit_from_the_switched_state():
  """With FedAvgM on the server: stage 2 == FedIT started afresh from (a, b) with the switched kernels frozen."""
  _, base, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0, mutable_base=True)
  server_opt = optax.sgd(1.0, momentum=0.9)
  algorithm = _build(loss_fn, client_optimizer=optax.adam(0.01), server_optimizer=server_opt)
  step = build_round(algorithm, chunk_size=2, donate=False)
  ids = jnp.array([0, 3, 5, 6], jnp.int32)
  state, _, m1 = step(base, algorithm.init(trainable, None), {}, ids, random_cohort(np.asarray(ids), seed=0),
                      jax.random.key(0))
  assert float(m1["stage"]) == 1.0
  ref_alg = fedit(common.frozen_loss(loss_fn, state.extra["kernels"]), client_optimizer=optax.adam(0.01),
                  server_optimizer=server_opt)
  ref = init_server_state(state.params["lora"], server_opt)
  ref_step = build_round(ref_alg, chunk_size=2, donate=False)
  kernels = state.extra["kernels"]
  for r in (1, 2):
    data, key = random_cohort(np.asarray(ids), seed=r), jax.random.key(r)
    state, _, m = step(base, state, {}, ids, data, key)
    ref, _, ref_m = ref_step(base, ref, {}, ids, data, key)
    assert float(m["stage"]) == 2.0
    assert_trees_close(state.params["lora"], ref.params, rtol=1e-5, atol=1e-6)
    for k in ("train_loss", "sum_bytes_up", "sum_bytes_down", "update_norm"):
      np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, err_msg=k)
  assert_trees_close(state.extra["kernels"], kernels, rtol=0, atol=0)  # frozen in stage 2


def test_both_stages_compile_into_one_round_with_a_real_cond():
  """Under vmap the client branch stays a ``cond`` (one branch runs), holding local training in each branch."""
  _, base, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0, mutable_base=True)
  algorithm = _build(loss_fn)
  state = algorithm.init(trainable, None)
  ids = np.array([0, 1, 2, 3], np.int32)
  jaxpr = jax.make_jaxpr(build_round(algorithm, chunk_size=2, donate=False))(
      base, state, {}, jnp.asarray(ids), random_cohort(ids), jax.random.key(0))

  def eqns(jx):
    for e in jx.eqns:
      yield e
      for p in e.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            yield from eqns(inner)

  def has_scan(jx):
    return any(e.primitive.name == "scan" for e in eqns(jx))

  client_conds = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "cond"
                  and all(has_scan(b.jaxpr) for b in e.params["branches"])]
  assert client_conds, "the stage branch of client_update was turned into a select"


def test_slora_round_conformance_covers_both_stages():
  _, base, trainable, loss_fn = tiny_lora_model(rank=4, alpha=8.0, mutable_base=True)
  fedadam = optax.adam(1e-2, b1=0.9, b2=0.99, eps=1e-3)  # as train.py builds it (eps = tau of Reddi et al.)
  algorithm = _build(loss_fn, server_optimizer=fedadam, sparse_rounds=1)  # round 1 sparse, round 2 LoRA
  ref = check_round_conformance(algorithm, base, trainable)
  assert float(ref[2]["stage"]) == 2.0 and int(ref[0].round) == 2
  lora_b = ref[0].params["lora"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora"]["lora_b"]
  assert float(jnp.abs(lora_b).max()) > 0  # the LoRA stage ran


def test_bad_hyper_parameters_are_clear_errors():
  kw = dict(client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0))
  with pytest.raises(ValueError, match=r"sparse_rounds must be an integer >= 1 .*got 0"):
    slora(None, sparse_rounds=0, **kw)
  with pytest.raises(ValueError, match=r"sparse_rounds must be an integer >= 1 .*got 1.5"):
    slora(None, sparse_rounds=1.5, **kw)
  with pytest.raises(ValueError, match=r"density must be in \(0, 1\] .*got 0.0"):
    slora(None, density=0.0, **kw)
  with pytest.raises(ValueError, match=r"density must be in \(0, 1\] .*got 1.5"):
    slora(None, density=1.5, **kw)
  with pytest.raises(ValueError, match=r"frozen_weight must be one of residual, pretrained; got 'reset'"):
    slora(None, frozen_weight="reset", **kw)
  with pytest.raises(ValueError, match=r"lora_scale must be > 0, got -1"):
    slora(None, lora_scale=-1, **kw)
  _, _, plain, loss_fn = tiny_lora_model(rank=4)
  with pytest.raises(ValueError, match=r"slora changes the frozen kernels"):
    slora(loss_fn, **kw).init(plain, None)


def test_smoke_run_end_to_end(tmp_path):
  c = slora_config.get_config("smoke")
  assert c.slora.sparse_rounds < c.fl.num_rounds  # both stages run
  s = train.run(c, str(tmp_path), progress=False)
  for k in ("final_eval_loss", "initial_eval_loss", "final_train_loss", "total_bytes_up", "total_bytes_down",
            "final_params_checksum"):
    assert math.isfinite(s[k]), k
  assert s["algorithm"] == "slora" and s["final_eval_loss"] < s["initial_eval_loss"]
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_rows = [r for r in rows if "train/loss" in r]
  stages = [r["clients/stage"] for r in train_rows]
  assert stages == [1.0] * c.slora.sparse_rounds + [2.0] * (c.fl.num_rounds - c.slora.sparse_rounds)
  sparse_bytes = {r["comm/bytes_up_per_client"] for r in train_rows[:c.slora.sparse_rounds]}
  lora_bytes = {r["comm/bytes_up_per_client"] for r in train_rows[c.slora.sparse_rounds:]}
  assert len(sparse_bytes) == len(lora_bytes) == 1 and 0 < sparse_bytes.pop() < lora_bytes.pop()
