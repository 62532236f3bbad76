"""Plot held-out loss of several runs vs round and vs cumulative uploaded bytes.

  python experiments/plot_runs.py runs/fedit runs/hetlora --out docs/img/fedit_vs_hetlora.png
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_curves(workdir: str):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if l.strip()]
  up, cum = {0: 0.0}, 0.0
  for r in rows:
    if "comm/bytes_up" in r:
      cum += r["comm/bytes_up"]
      up[r["round"]] = cum
  ev = [(r["round"], r["eval/loss"]) for r in rows if "eval/loss" in r]
  return [(rd, up.get(rd, cum), loss) for rd, loss in ev]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  for wd in args.workdirs:
    summary = json.load(open(os.path.join(wd, "summary.json")))
    label = summary.get("algorithm", os.path.basename(wd))
    curve = load_curves(wd)
    a1.plot([c[0] for c in curve], [c[2] for c in curve], "o-", label=label)
    a2.plot([c[1] / 1e6 for c in curve], [c[2] for c in curve], "o-", label=label)
  a1.set_xlabel("round")
  a2.set_xlabel("cumulative uploaded MB (all clients)")
  for a in (a1, a2):
    a.set_ylabel("held-out NLL (nats)")
    a.grid(alpha=0.3)
    a.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
