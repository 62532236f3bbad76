"""Run several methods on the same clients and seed; write a results table (markdown + CSV) and a plot.

  python experiments/compare.py --configs fedit,ffa_lora,fedex_lora,hetlora,flora \\
      [--set fl.num_rounds=16 --set data.plays="('hamlet','macbeth')"] [--out runs/compare] [--smoke]

Each entry of ``--configs`` is ``[label=]config[:arg][@key=value@key=value...]``: a config
file (bare names resolve in configs/), an optional label (default: the file's name) and
per-run overrides, e.g. ``fedit_r2=fedit@lora.rank=2`` for a homogeneous min-rank baseline.
``--set`` overrides apply to every run (same data, clients, rounds and seed for all). Each
run is ``experiments/run.py`` in its own process, in ``<out>/<label>``; a run whose
``summary.json`` exists is reused (``--rerun`` to redo). Outputs in ``<out>``:

* ``results.md`` / ``results.csv``: final held-out loss and perplexity of the global model,
  the per-client distribution (mean, p10, p90 of client losses), the personalized loss for
  personalized methods, uploaded bytes per client per round and in total, wall time;
* ``compare.png``: held-out loss vs round and vs cumulative uploaded bytes.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def parse_spec(spec: str) -> tuple[str, str, list[tuple[str, str]]]:
  """``[label=]config[:arg][@k=v...]`` -> (label, config spec, overrides)."""
  spec = spec.strip()
  label = None
  head, *over = spec.split("@")
  if "=" in head:
    label, head = head.split("=", 1)
  overrides = []
  for o in over:
    if "=" not in o:
      raise SystemExit(f"error: override {o!r} in {spec!r} needs a value: @key=value")
    k, v = o.split("=", 1)
    overrides.append((k, v))
  if not label:
    label = os.path.splitext(os.path.basename(head.partition(":")[0]))[0]
  return label, head, overrides


def run_one(label: str, config: str, overrides: list[tuple[str, str]], out: str, rerun: bool) -> str:
  workdir = os.path.join(out, label)
  if not rerun and os.path.exists(os.path.join(workdir, "summary.json")):
    print(f"[compare] {label}: reusing {workdir}", flush=True)
    return workdir
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--config", config, "--workdir", workdir,
         "--no-progress"] + [f"--config.{k}={v}" for k, v in overrides]
  print(f"[compare] {label}: {' '.join(cmd[1:])}", flush=True)
  r = subprocess.run(cmd, cwd=ROOT)
  if r.returncode != 0:
    print(f"[compare] {label}: FAILED (exit {r.returncode}); see the messages above; continuing", flush=True)
    return None
  return workdir


def load_run(workdir: str) -> dict:
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if l.strip()]
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  config = json.load(open(os.path.join(workdir, "config.json")))
  cum, up = 0.0, {0: 0.0}
  for r in rows:
    if "comm/bytes_up" in r:
      cum += r["comm/bytes_up"]
      up[r["round"]] = cum
  key = "accuracy" if any("eval/accuracy" in r for r in rows) else "loss"  # classification: accuracy curves
  curve = [(r["round"], up.get(r["round"], cum), r[f"eval/{key}"], r.get(f"eval/personal_{key}"))
           for r in rows if f"eval/{key}" in r]
  return {"rows": rows, "summary": summary, "config": config, "curve": curve, "metric": key}


COLUMNS = [
    ("method", "method"), ("algorithm", "algorithm"), ("peft", "PEFT"), ("rank", "LoRA rank (r_max)"),
    ("trainable", "trainable params"),
    ("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("client_acc_mean", "client acc. mean"),
    ("client_acc_p10", "client acc. p10"), ("personal_acc", "personalized acc."),
    ("eval_loss", "held-out loss"), ("eval_ppl", "perplexity"),
    ("client_mean", "client loss mean"), ("client_p10", "client p10"), ("client_p90", "client p90"),
    ("personal_loss", "personalized loss"), ("personal_ppl", "personalized ppl"),
    ("up_per_client_round_kb", "upload KB / client / round"), ("down_per_client_round_kb", "download KB / client / round"),
    ("up_total_mb", "upload MB total"),
    ("round_s", "s / round"),
]


def table_row(label: str, run: dict) -> dict:
  s, fe = run["summary"], run["summary"].get("final_eval", {})
  f = lambda v, d=4: None if v is None else round(float(v), d)
  methods = tuple(run["config"].get("peft", {}).get("methods", ("lora",)))
  return {
      "method": label, "algorithm": s["algorithm"], "peft": "+".join(methods),
      "rank": run["config"]["lora"]["rank"] if "lora" in methods else None,
      "trainable": s.get("trainable_params"),
      "accuracy": f(fe.get("eval/accuracy")), "macro_f1": f(fe.get("eval/macro_f1")),
      "client_acc_mean": f(fe.get("eval/client_accuracy_mean")), "client_acc_p10": f(fe.get("eval/client_accuracy_p10")),
      "personal_acc": f(fe.get("eval/personal_accuracy")),
      "eval_loss": f(s["final_eval_loss"]), "eval_ppl": f(s.get("final_eval_perplexity"), 2),
      "client_mean": f(fe.get("eval/client_loss_mean")), "client_p10": f(fe.get("eval/client_loss_p10")),
      "client_p90": f(fe.get("eval/client_loss_p90")),
      "personal_loss": f(fe.get("eval/personal_loss")), "personal_ppl": f(fe.get("eval/personal_perplexity"), 2),
      "up_per_client_round_kb": f(s.get("mean_bytes_up_per_client_round", 0.0) / 1e3, 1),
      # the cohort is the same every round, so download per client scales like upload per client
      "down_per_client_round_kb": f(s.get("mean_bytes_up_per_client_round", 0.0) / 1e3 * s.get("total_bytes_down", 0.0)
                                    / max(s.get("total_bytes_up", 0.0), 1e-9), 1),
      "up_total_mb": f(s.get("total_bytes_up", 0.0) / 1e6, 2), "round_s": f(s.get("mean_round_time_s"), 2),
  }


def write_tables(rows: list[dict], out: str) -> str:
  keys = [k for k, _ in COLUMNS if any(r.get(k) is not None for r in rows)]
  heads = dict(COLUMNS)
  with open(os.path.join(out, "results.csv"), "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  fmt = lambda v: "" if v is None else str(v)
  lines = ["| " + " | ".join(heads[k] for k in keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
  md = "\n".join(lines) + "\n"
  with open(os.path.join(out, "results.md"), "w") as fh:
    fh.write(md)
  return md


def plot(runs: dict, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
  cmap = plt.get_cmap("tab20")
  for i, (label, run) in enumerate(runs.items()):
    c = cmap(i % 20)
    rounds, up, loss, pers = zip(*run["curve"]) if run["curve"] else ((), (), (), ())
    ax1.plot(rounds, loss, "o-", color=c, label=label, ms=3)
    ax2.plot([u / 1e6 for u in up], loss, "o-", color=c, label=label, ms=3)
    if any(p is not None for p in pers):
      pts = [(r, u, p) for r, u, p in zip(rounds, up, pers) if p is not None]
      ax1.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=c, label=f"{label} (personalized)", ms=4)
      ax2.plot([p[1] / 1e6 for p in pts], [p[2] for p in pts], "x--", color=c, ms=4)
  ax1.set_xlabel("round")
  ax2.set_xlabel("cumulative uploaded MB (all clients)")
  # linear below the smallest upload any run makes (kilobytes for seed-based zeroth-order methods), log above
  positive = [u / 1e6 for run in runs.values() for _, u, _, _ in run["curve"] if u > 0]
  ax2.set_xscale("symlog", linthresh=min(1.0, 10.0 ** math.floor(math.log10(min(positive)))) if positive else 1.0)
  for ax in (ax1, ax2):
    ax.set_ylabel("held-out accuracy" if any(r.get("metric") == "accuracy" for r in runs.values())
                  else "held-out NLL (nats)")
    ax.grid(alpha=0.3)
  ax1.legend(fontsize=7, ncol=2)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", required=True, help="comma-separated [label=]config[:arg][@key=value...]")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
  p.add_argument("--out", default=os.path.join("runs", "compare"))
  p.add_argument("--smoke", action="store_true", help="use each config's :smoke variant (tiny model; tests)")
  p.add_argument("--rerun", action="store_true", help="redo runs that already have a summary.json")
  p.add_argument("--title", default=None)
  args = p.parse_args(argv)
  specs = [parse_spec(s) for s in args.configs.split(",") if s.strip()]
  labels = [s[0] for s in specs]
  if len(set(labels)) != len(labels):
    raise SystemExit(f"error: duplicate labels in --configs: {labels}; name them with label=config")
  common = []
  for item in args.set:
    if "=" not in item:
      raise SystemExit(f"error: --set {item!r} needs KEY=VALUE")
    common.append(tuple(item.split("=", 1)))
  os.makedirs(args.out, exist_ok=True)
  runs, failed = {}, []
  for label, config, over in specs:
    if args.smoke:
      config += "+smoke" if ":" in config else ":smoke"
    workdir = run_one(label, config, common + over, args.out, args.rerun)
    if workdir is None:
      failed.append(label)
    else:
      runs[label] = load_run(workdir)
  if not runs:
    raise SystemExit("error: every run failed")
  rows = [table_row(label, run) for label, run in runs.items()]
  rows += [{"method": label, "algorithm": "FAILED"} for label in failed]
  md = write_tables(rows, args.out)
  first = next(iter(runs.values()))
  title = args.title or (f"{first['config']['model']['name']}, {first['summary']['num_clients']} clients, "
                         f"cohort {first['summary']['cohort_size']}, seed {first['config']['seed']}")
  plot(runs, os.path.join(args.out, "compare.png"), title)
  print(md)
  print(f"[compare] wrote {args.out}/results.md, results.csv, compare.png")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
