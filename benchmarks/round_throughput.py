"""Round throughput: the compiled (vmapped, chunked) round vs a per-client Python loop.

For each model (tiny random Llama, SmolLM2-135M) and cohort size, one run measures
side by side:
  * compiled round: ``build_round`` (all clients in one jit, chunked);
  * per-client loop: ``build_sequential_round`` (a Python loop over a jitted
    single-client step, then a jitted aggregation: how PyTorch FL simulators run);
and reports clients/s, tokens/s, achieved FLOP/s and its fraction of this machine's
measured dense f32 matmul FLOP/s, and the compiled round's memory (XLA memory
analysis: arguments + temporaries; the base model is an argument, stored once).

FLOPs are counted as 4 N_fwd per token for LoRA on a frozen base (forward 2N,
backward to activations 2N; the LoRA factors' own FLOPs are negligible), with
N_fwd the model's forward matmul FLOPs per token / 2 (``llama_flops_per_token``,
attention included). XLA's own cost analysis of the compiled round is printed too.

  python benchmarks/round_throughput.py            # the whole table (about 10 min on a 2-core CPU)
  python benchmarks/round_throughput.py --models smollm2 --smollm2-cohorts 16 --smollm2-chunk 2
  (--help lists every option: cohorts, shapes, chunk sizes, the cross-device rows, memory-only rows)
The shared pieces (peak, workload, compile + timing) live in ``benchmarks/common.py``; the whole suite
(this table's rows, sweeps, kernels, the GPU round) is ``benchmarks/suite.py``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (bench_one, cohort_data, fmt_bytes, make_model, measure_matmul_peak,  # noqa: E402,F401
                    time_round)


def print_table(rows, peak):
  print(f"\nmeasured dense f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
  head = ("model", "clients", "chunk", "shape", "compiled s", "clients/s", "tokens/s", "%peak",
          "loop s", "loop %peak", "speedup", "args mem", "temp mem")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    timed = "compiled_s" in r
    lines.append("| " + " | ".join([
        r["model"], str(r["clients"]), str(r["chunk"]), r["shape"], f"{r['compiled_s']:.3f}" if timed else "-",
        f"{r['compiled_clients_per_s']:.1f}" if timed else "-", f"{r['compiled_tokens_per_s']:,.0f}" if timed else "-",
        f"{100 * r['compiled_frac_of_matmul_peak']:.1f}%" if timed else "-",
        f"{r['loop_s']:.3f}" if "loop_s" in r else "-",
        f"{100 * r['loop_frac_of_matmul_peak']:.1f}%" if "loop_s" in r else "-",
        f"{r['speedup']:.1f}x" if "speedup" in r else "-",
        fmt_bytes(r["mem_args_bytes"]), fmt_bytes(r["mem_temp_bytes"])]) + " |")
  table = "\n".join(lines)
  print(table)
  return table


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="tiny,smollm2")
  p.add_argument("--cohorts", default="8,64,256,1024", help="cohort sizes for the tiny model")
  p.add_argument("--smollm2-cohorts", default="8,16,64", help="cohort sizes for SmolLM2 (CPU time grows linearly)")
  p.add_argument("--smollm2-memory-cohorts", default="256,1024",
                 help="SmolLM2 cohorts compiled for the memory analysis only (too slow to time on a CPU)")
  p.add_argument("--xdev-cohorts", default="256,1024",
                 help="cross-device regime (tiny model, a few short sequences per client): cohort sizes")
  p.add_argument("--xdev-shape", default="1,2,16", help="local steps, batch, seq in the cross-device regime")
  p.add_argument("--tiny-shape", default="2,2,32", help="local steps, batch, seq for the tiny model")
  p.add_argument("--smollm2-shape", default="1,2,64", help="local steps, batch, seq for SmolLM2")
  p.add_argument("--chunk", type=int, default=64, help="clients vmapped together (tiny model)")
  p.add_argument("--smollm2-chunk", type=int, default=4, help="clients vmapped together (SmolLM2)")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds per point (median)")
  p.add_argument("--loop-max-clients", type=int, default=1024, help="skip the per-client loop above this cohort")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  args = p.parse_args(argv)

  peak = measure_matmul_peak()
  rows = []
  plan = []  # (model, cohorts, shape, chunk)
  for name in args.models.split(","):
    if name == "tiny":
      plan += [("tiny", args.cohorts, args.tiny_shape, args.chunk), ("tiny", args.xdev_cohorts, args.xdev_shape, args.chunk)]
    elif name == "smollm2":
      plan.append(("smollm2", args.smollm2_cohorts, args.smollm2_shape, args.smollm2_chunk))
      plan.append(("smollm2-memory", args.smollm2_memory_cohorts, args.smollm2_shape, args.smollm2_chunk))
    else:
      raise SystemExit(f"unknown model {name!r}; allowed: tiny, smollm2")
  models = {}
  for name, cohorts, shape, chunk in plan:
    timed = not name.endswith("-memory")
    name = name.removesuffix("-memory")
    if name not in models:
      models = {name: make_model(name, args.rank, args.dtype)}  # one base model in memory at a time
    cfg, peft, base, trainable = models[name]
    steps, batch, seq = (int(x) for x in shape.split(","))
    for c in (int(x) for x in cohorts.split(",") if x):
      row = bench_one(name, cfg, peft, base, trainable, c, steps=steps, batch=batch, seq=seq, chunk=chunk,
                      peak=peak, rounds=args.rounds, loop=timed and c <= args.loop_max_clients, timed=timed)
      rows.append(row)
      print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
  table = print_table(rows, peak)
  os.makedirs(args.out, exist_ok=True)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  meta = {"date": stamp, "machine": platform.processor() or platform.machine(), "devices": [str(d) for d in jax.devices()],
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "matmul_peak_flops": peak,
          "command": " ".join(sys.argv), "rows": rows, "table": table}
  path = os.path.join(args.out, f"round_throughput_{stamp}.json")
  with open(path, "w") as f:
    json.dump(meta, f, indent=2)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
