"""End to end: one short federated run per PEFT family on the real MiniLM encoder + BBC News (Dirichlet
label skew), each improving held-out accuracy over the untrained head; plus the decoder verbalizer path.

To keep CI short the encoder keeps its first 2 blocks (``model.num_layers=2``) and examples are cut to 32
tokens; the real pretrained weights and the real corpus are used.
"""
import json
import os

import pytest

from configs import adapter, bitfit, fedbpt, fedit, partial, personal_prompt, prefix, prompt
from experiments import run as run_cli
from fedjax_llm import train

QUICK = {"model.num_layers": 2, "data.seq_len": 32, "data.num_clients": 20, "data.alpha": 1.0,
         "fl.num_rounds": 3, "fl.cohort_size": 4, "fl.chunk_size": 4, "fl.local_steps": 3, "fl.batch_size": 8,
         "eval.every": 3, "eval.num_clients": 10, "eval.max_seqs_per_client": 8, "eval.batch_size": 40,
         "checkpoint_every": 0}


def _bbc(module, **overrides):
  c = module.get_config("bbc")
  for k, v in {**QUICK, **overrides}.items():
    run_cli.apply_override(c, k, str(v))
  return c


@pytest.mark.parametrize("module,overrides", [
    pytest.param(prompt, {"prompt.length": 4}, id="prompt"),
    pytest.param(prefix, {"prefix.length": 4}, id="prefix", marks=pytest.mark.extended),
    pytest.param(adapter, {"adapter.width": 8}, id="adapter"),
    pytest.param(bitfit, {}, id="bitfit"),
    pytest.param(partial, {}, id="partial", marks=pytest.mark.extended),
    pytest.param(fedit, {}, id="lora"),  # LoRA + head, for reference
])
def test_each_family_beats_the_untrained_head_on_bbc(tmp_path, module, overrides):
  s = train.run(_bbc(module, **overrides), str(tmp_path), progress=False)
  assert s["task"] == "classification" and s["final_accuracy"] is not None
  assert s["final_accuracy"] > s["initial_accuracy"] + 0.2, (s["initial_accuracy"], s["final_accuracy"])
  assert 0.0 <= s["final_macro_f1"] <= 1.0
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  ev = [r for r in rows if "eval/accuracy" in r][-1]
  for k in ("eval/macro_f1", "eval/client_accuracy_mean", "eval/client_accuracy_p10", "eval/client_macro_f1_mean"):
    assert k in ev, k


def test_personalized_prompt_reports_personal_accuracy(tmp_path):
  s = train.run(_bbc(personal_prompt, **{"prompt.length": 2, "prompt.local_length": 2}), str(tmp_path), progress=False)
  assert s["final_personal_accuracy"] is not None and s["final_accuracy"] > s["initial_accuracy"]


def test_decoder_verbalizer_classification_smoke(tmp_path):
  """SmolLM2-style classification by label words, on the tiny random decoder (pipeline and metrics)."""
  c = prompt.get_config("bbc+decoder+smoke")
  assert c.model.name == "tiny-random" and c.task == "classification"
  s = train.run(c, str(tmp_path), progress=False)
  assert s["final_accuracy"] is not None and s["final_eval_loss"] < 5.0  # 5 classes: chance CE is ln 5 = 1.61


def test_verbalizer_tokens_and_template():
  from fedjax_llm.models.byte_tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  assert train.verbalizer(tok, ("business", "tech")) == (ord("b"), ord("t"))
  with pytest.raises(ValueError, match="share first tokens"):
    train.verbalizer(tok, ("sport", "science"))
  enc = train.decoder_encoder(tok, "A: {text}\nT:", 12)
  ids = enc("hello world, long text")
  assert len(ids) == 12 and bytes(ids).decode() == "A: hello \nT:"  # 6 text bytes fit
  with pytest.raises(ValueError, match="exactly once"):
    train.decoder_encoder(tok, "no placeholder", 12)


def test_classification_config_errors(tmp_path):
  c = prompt.get_config("bbc+smoke")
  run_cli.apply_override(c, "data.partition", "pathological")
  with pytest.raises(ValueError, match="pathological"):
    train.run(c, str(tmp_path / "a"), progress=False)
  c = prompt.get_config("smoke")
  run_cli.apply_override(c, "model.name", "tiny-bert")
  with pytest.raises(ValueError, match="encoder"):
    train.run(c, str(tmp_path / "b"), progress=False)
  with pytest.raises(ValueError, match="unknown config argument"):
    prompt.get_config("bbc+typo")


def test_bring_your_own_csv_with_natural_clients(tmp_path):
  """A local CSV with text, label and client-id columns, partitioned by its client column."""
  import csv
  path = tmp_path / "reviews.csv"
  rows = [("great product, works well", "pos"), ("terrible, broke in a day", "neg"),
          ("love it, would buy again", "pos"), ("awful support, never again", "neg")]
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["review", "stars", "user"])
    for i in range(120):
      text, label = rows[i % 4]
      w.writerow([f"{text} #{i}", label, f"u{i % 6}"])
  c = prompt.get_config("bbc+smoke")
  for k, v in {"data.dataset": str(path), "data.text_column": "review", "data.label_column": "stars",
               "data.client_column": "user", "data.partition": "column", "fl.cohort_size": 4}.items():
    run_cli.apply_override(c, k, v)
  s = train.run(c, str(tmp_path / "run"), progress=False)
  assert s["num_clients"] == 6 and s["final_accuracy"] is not None
