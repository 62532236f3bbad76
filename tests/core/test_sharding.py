"""The client axis sharded over 8 (fake CPU) devices gives the single-device results.

The checks run in one subprocess (``tests/core/sharded_checks.py``): the device count is fixed when jax starts, and
the test session itself runs on one device. Tolerances: the sharded round sums the clients' contributions per
device and then across devices, a different float32 summation order than one device's sum, so parameters agree to
a few ulp (measured max abs diff 4.5e-8, max relative 2.6e-7 after two rounds), not bitwise.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.lru_cache(maxsize=None)
def _run_checks(*which: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "core", "sharded_checks.py"), *which],
                       capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  rows = {}
  for line in out.stdout.splitlines():
    if line.startswith("{"):
      row = json.loads(line)
      rows[row.pop("check")] = row
  assert out.returncode == 0 and "done" in rows, out.stdout[-2000:] + out.stderr[-4000:]
  return rows


def _assert_same_round(row):
  assert row["server_diff"] < 2e-7 and row["server_rel"] < 2e-6, row
  assert row["store_diff"] < 2e-7, row
  m = row["metrics"]
  assert m["clients"] == [12.0, 12.0]  # the 4 padding slots count for nothing
  assert m["sum_tokens"][0] == m["sum_tokens"][1] and m["sum_bytes_up"][0] == m["sum_bytes_up"][1]
  for k in ("train_loss", "update_norm"):
    assert abs(m[k][0] - m[k][1]) <= 2e-6 * abs(m[k][0]), (k, m[k])
  assert row["clients_per_device"] == 2  # 16 slots over 8 devices
  assert row["compiles"] == 1  # the state comes back placed as it went in: round 2 reuses round 1's executable


def test_sharded_round_with_client_store_equals_one_device():
  """FedSA-LoRA (shared A, per-client B in the store split over 8 devices), 12 clients padded to 16."""
  row = _run_checks("fedsa_lora", "errors", "train_run")["sharded_equals_single/fedsa_lora"]
  _assert_same_round(row)
  assert row["store_devices"] == [8]  # 24 clients' B factors: 3 per device


def test_sharded_errors_name_what_is_allowed():
  rows = _run_checks("fedsa_lora", "errors", "train_run")
  assert "not a multiple of 8 client shard(s) x chunk_size 1" in rows["bad_cohort"]["error"]
  assert "padded_cohort_size" in rows["bad_cohort"]["error"]
  assert "num_devices=16 but 8 devices are visible" in rows["bad_mesh"]["error"]


def test_train_run_killed_on_8_devices_resumes_on_2_to_the_one_device_result():
  """config mesh.devices: a 4-round run on 1 device == killed after round 2 on 8 devices, resumed on 2."""
  row = _run_checks("fedsa_lora", "errors", "train_run")["train_run"]
  one, sharded = row["one"], row["sharded"]
  assert row["part"] == {"stopped_at_round": 2}
  assert one["total_bytes_up"] == sharded["total_bytes_up"]
  for k in ("final_eval_loss", "final_train_loss", "final_personal_loss"):
    assert abs(one[k] - sharded[k]) <= 1e-6 * abs(one[k]), (k, one[k], sharded[k])
  assert abs(one["final_params_checksum"] - sharded["final_params_checksum"]) <= 1e-6 * one["final_params_checksum"]


@pytest.mark.extended
def test_sharded_fedit_and_model_axis():
  """FedIT on 8 client shards, and a (clients=4, model=2) mesh whose base matrices are split over 'model'."""
  rows = _run_checks("fedit", "model_axis")
  _assert_same_round(rows["sharded_equals_single/fedit"])
  m = rows["model_axis"]
  assert m["split_leaves"] >= 10 and m["server_diff"] < 2e-7, m
  assert abs(m["loss"][0] - m["loss"][1]) <= 2e-6 * m["loss"][0]


@pytest.mark.extended
def test_every_method_gives_the_one_device_run_on_8_devices():
  """Every config (each method of the registry, PEFT families, server optimizers): 2 smoke rounds on 1 and 8 devices.

  FLASC picks its uploaded entries by top-k magnitude, a discontinuous choice that ulp differences can flip, so
  it agrees less tightly (measured: eval loss 3.8e-6 relative, parameters' checksum 1.3e-4).
  """
  rows = {k: v for k, v in _run_checks("all_methods").items() if k.startswith("method/")}
  assert len(rows) >= 30, sorted(rows)
  for name, row in rows.items():
    tol = 1e-3 if row["algorithm"] == "flasc" else 2e-6
    (l1, c1), (l8, c8) = row["one"], row["eight"]
    assert abs(l1 - l8) <= tol * abs(l1), (name, l1, l8)
    assert abs(c1 - c8) <= max(tol, 1e-6) * 10 * abs(c1), (name, c1, c8)
