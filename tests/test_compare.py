"""experiments/compare.py: spec parsing, and an end-to-end smoke comparison writing table, CSV and plot."""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import compare  # noqa: E402


def test_parse_spec():
  assert compare.parse_spec("fedit") == ("fedit", "fedit", [])
  assert compare.parse_spec("configs/hetlora.py:smoke") == ("hetlora", "configs/hetlora.py:smoke", [])
  assert compare.parse_spec("r2=fedit@lora.rank=2@fl.cohort_size=4") == (
      "r2", "fedit", [("lora.rank", "2"), ("fl.cohort_size", "4")])
  with pytest.raises(SystemExit, match="needs a value"):
    compare.parse_spec("fedit@lora.rank")


def test_compare_smoke_writes_table_csv_and_plot(tmp_path):
  out = tmp_path / "cmp"
  r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "compare.py"), "--smoke",
                      "--configs", "fedit,r2=fedit@lora.rank=2", "--set", "fl.num_rounds=1", "--out", str(out)],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = list(csv.DictReader(open(out / "results.csv")))
  assert [row["method"] for row in rows] == ["fedit", "r2"]
  assert [row["rank"] for row in rows] == ["8", "2"]
  # upload per client per round is the LoRA size: rank 2 sends a quarter of rank 8
  assert float(rows[0]["up_per_client_round_kb"]) == pytest.approx(4 * float(rows[1]["up_per_client_round_kb"]),
                                                                     rel=1e-3)
  assert (out / "compare.png").stat().st_size > 10000
  assert "| method |" in open(out / "results.md").read()
