"""Run on 8 fake CPU devices (a subprocess of tests/core/test_sharding.py; XLA_FLAGS must be set before jax loads).

Prints one JSON line ``{"check": name, ...}`` per check; the pytest side asserts on them, so one process (one jax
start-up and one set of compiles) serves every sharding test.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

from fedjax_llm.algorithms import fedit  # noqa: E402
from fedjax_llm.algorithms.fedsa_lora import fedsa_lora  # noqa: E402
from fedjax_llm.core import client_store as store_lib  # noqa: E402
from fedjax_llm.core import round as round_lib  # noqa: E402
from fedjax_llm.core import sampling  # noqa: E402
from tests.helpers import random_cohort, sgd, tiny_lora_model  # noqa: E402

NUM_CLIENTS = 24  # divisible by 8: the store is split over the client axis


def emit(**kw):
  print(json.dumps(kw), flush=True)


def max_diff(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)))) for x, y in zip(la, lb))


def max_rel(a, b):
  return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30)) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def two_rounds(alg, step, base, trainable, ids, data, place_state=None, place_store=None):
  server = alg.init(trainable, jax.random.key(0))
  store = store_lib.init_store(alg.init_client, trainable, NUM_CLIENTS)
  if place_state:
    server, store = place_state(server), place_store(store)
  for r in range(2):
    server, store, metrics = step(base, server, store, ids, data, jax.random.key(10 + r))
  return server, store, jax.device_get(metrics)


def check_sharded_equals_single(name, alg, peft_model):
  """12 real clients: one device (chunk 4, cohort 12) vs 8 devices (chunk 1, cohort padded to 16 with weight 0)."""
  _, base, trainable, _ = peft_model
  ids = np.array([3, 17, 5, 0, 11, 9, 14, 2, 8, 19, 6, 22], np.int32)
  data = random_cohort(ids, steps=2, batch=2, seq=16)
  one = two_rounds(alg, round_lib.build_round(alg, chunk_size=4, donate=False), base, trainable, jnp.asarray(ids),
                   data)
  mesh = round_lib.client_mesh(8)
  padded = sampling.padded_cohort_size(len(ids), 8 * 1)
  ids_p = np.concatenate([ids, -np.ones(padded - len(ids), np.int32)])
  pad = lambda x: np.concatenate([np.asarray(x), np.zeros((padded - len(ids),) + x.shape[1:], x.dtype)])
  data_p = round_lib.shard_clients(mesh, jax.tree.map(pad, data))  # padded slots: zero tokens, mask, steps, weight
  ids_s = round_lib.shard_clients(mesh, ids_p)
  rep = lambda t: round_lib.place(t, lambda x: round_lib.replicated(mesh))
  step8 = round_lib.build_round(alg, chunk_size=1, mesh=mesh, donate=False)
  eight = two_rounds(alg, step8, rep(base), trainable, ids_s, data_p, rep,
                     lambda s: round_lib.shard_clients(mesh, s))
  store_devices = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(eight[1])})
  data_shard = data_p.tokens.sharding.shard_shape(data_p.tokens.shape)[0]
  emit(check=f"sharded_equals_single/{name}", server_diff=max_diff(one[0], eight[0]),
       server_rel=max_rel(one[0].params, eight[0].params), store_diff=max_diff(one[1], eight[1]) if one[1] else 0.0,
       metrics={k: [float(one[2][k]), float(eight[2][k])] for k in ("train_loss", "update_norm", "clients",
                                                                     "sum_tokens", "sum_bytes_up")},
       store_devices=store_devices, clients_per_device=int(data_shard),
       compiles=step8._cache_size() if hasattr(step8, "_cache_size") else -1)


def check_model_axis(peft_model):
  """A (clients=4, model=2) mesh with the base's matrices split over the model axis equals one device."""
  _, base, trainable, loss_fn = peft_model
  alg = fedit(loss_fn, client_optimizer=sgd(0.1), server_optimizer=sgd(1.0))
  ids = np.array([3, 17, 5, 0, 11, 9, 14, -1], np.int32)
  data = random_cohort(ids, steps=2, batch=2, seq=16)
  one = two_rounds(alg, round_lib.build_round(alg, chunk_size=4, donate=False), base, trainable, jnp.asarray(ids),
                   data)
  mesh = round_lib.client_mesh(8, model=2)
  base2 = round_lib.shard_base(mesh, base, min_size=256)
  split = sum(1 for x in jax.tree.leaves(base2) if "model" in str(x.sharding.spec))
  step = round_lib.build_round(alg, chunk_size=2, mesh=mesh, donate=False)
  two = two_rounds(alg, step, base2, trainable, round_lib.shard_clients(mesh, ids),
                   round_lib.shard_clients(mesh, data))
  emit(check="model_axis", server_diff=max_diff(one[0], two[0]), split_leaves=split,
       leaves=len(jax.tree.leaves(base2)), loss=[float(one[2]["train_loss"]), float(two[2]["train_loss"])])


def check_bad_cohort(peft_model):
  _, base, trainable, loss_fn = peft_model
  alg = fedit(loss_fn, client_optimizer=sgd(0.1), server_optimizer=sgd(1.0))
  step = round_lib.build_round(alg, chunk_size=1, mesh=round_lib.client_mesh(8), donate=False)
  ids = np.arange(12, dtype=np.int32)
  try:
    step(base, alg.init(trainable, jax.random.key(0)), {}, jnp.asarray(ids), random_cohort(ids), jax.random.key(1))
    emit(check="bad_cohort", error=None)
  except ValueError as e:
    emit(check="bad_cohort", error=str(e))
  try:
    round_lib.client_mesh(16)
    emit(check="bad_mesh", error=None)
  except ValueError as e:
    emit(check="bad_mesh", error=str(e))


def check_train_run():
  """train.run on 1 device vs a run killed after round 2 on 8 devices and resumed on 2 (checkpoints reshard)."""
  from configs import fedsa_lora as cfg_module
  from experiments import run as run_cli
  from fedjax_llm import train

  def cfg(devices):
    c = cfg_module.get_config("smoke")
    for k, v in {"fl.num_rounds": 4, "fl.cohort_size": 5, "mesh.devices": devices, "eval.every": 4,
                 "checkpoint_every": 1}.items():
      run_cli.apply_override(c, k, str(v))
    return c
  with tempfile.TemporaryDirectory() as tmp:
    one = train.run(cfg(1), os.path.join(tmp, "one"), progress=False)
    part = train.run(cfg(8), os.path.join(tmp, "sharded"), progress=False, stop_after_round=2)
    resumed = train.run(cfg(2), os.path.join(tmp, "sharded"), progress=False)
  keys = ("final_eval_loss", "final_params_checksum", "final_train_loss", "total_bytes_up", "final_personal_loss")
  emit(check="train_run", one={k: one[k] for k in keys}, sharded={k: resumed[k] for k in keys}, part=part)


def check_all_methods():
  """Every method's smoke config through train.run on 1 and on 8 devices (2 rounds each)."""
  import glob
  from experiments import run as run_cli
  from fedjax_llm import algorithms, train
  skip = {"base", "__init__"}
  configs = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "..",
                                                                             "configs", "*.py")))
  for name in (c for c in configs if c not in skip):
    out = {}
    for devices in (1, 8):
      c = run_cli.load_config(f"configs/{name}.py:smoke")
      for k, v in {"fl.num_rounds": 2, "mesh.devices": devices, "eval.every": 2}.items():
        run_cli.apply_override(c, k, str(v))
      with tempfile.TemporaryDirectory() as tmp:
        s = train.run(c, tmp, progress=False)
      out[devices] = [s["final_eval_loss"], s["final_params_checksum"]]
    assert c.algorithm in algorithms.REGISTRY
    emit(check=f"method/{name}", algorithm=c.algorithm, one=out[1], eight=out[8])


if __name__ == "__main__":
  assert len(jax.devices()) == 8, jax.devices()
  model = tiny_lora_model(nonzero_b=True)
  loss_fn = model[3]
  which = sys.argv[1:] or ["fedit", "fedsa_lora", "model_axis", "errors", "train_run"]
  if "fedit" in which:
    check_sharded_equals_single("fedit", fedit(loss_fn, client_optimizer=sgd(0.1), server_optimizer=sgd(1.0)), model)
  if "fedsa_lora" in which:  # a per-client store (each client's own B), split over the devices
    check_sharded_equals_single("fedsa_lora", fedsa_lora(loss_fn, client_optimizer=sgd(0.1),
                                                         server_optimizer=sgd(1.0)), model)
  if "model_axis" in which:
    check_model_axis(model)
  if "errors" in which:
    check_bad_cohort(model)
  if "train_run" in which:
    check_train_run()
  if "all_methods" in which:
    check_all_methods()
  emit(check="done")
