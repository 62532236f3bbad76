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
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fedjax_llm.algorithms import fedit  # noqa: E402
from fedjax_llm.core.round import CohortData, build_round, build_sequential_round  # noqa: E402
from fedjax_llm.models import llama as llama_lib  # noqa: E402
from fedjax_llm.peft import lora as lora_lib  # noqa: E402
from fedjax_llm.peft.base import make_lm_loss, split_model  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
  """Best-of-``repeats`` dense matmul FLOP/s (n x n @ n x n) on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def make_model(name: str, rank: int, dtype: str):
  from fedjax_llm import models
  if name == "tiny":
    cfg = models.tiny_llama_config(vocab_size=258, max_position_embeddings=256, dtype=dtype)
    model = models.random_llama(cfg, seed=0)
  else:
    model, _ = models.load_pretrained("smollm2-135m", dtype=dtype)
  lora_lib.apply_lora(model, target=r"(q_proj|v_proj)$", rank=rank, alpha=2.0 * rank, seed=0)
  peft, base, trainable = split_model(model, nnx.LoRAParam)
  return model.config, peft, base, trainable


def cohort_data(c: int, steps: int, batch: int, seq: int, vocab: int, seed: int = 0) -> CohortData:
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, vocab, (c, steps, batch, seq)), jnp.int32)
  mask = jnp.ones((c, steps, batch, seq), jnp.float32)
  ntok = jnp.full((c,), steps * batch * (seq - 1), jnp.float32)
  return CohortData(tokens, mask, jnp.full((c,), steps, jnp.int32), ntok, ntok)


def time_round(step, base, server, ids, data, rounds: int) -> float:
  """Mean seconds per round after one warm-up (compile) round."""
  key = jax.random.key(0)
  out = step(base, server, {}, ids, data, key)
  jax.block_until_ready(out)
  times = []
  for r in range(rounds):
    t = time.perf_counter()
    out = step(base, server, {}, ids, data, jax.random.fold_in(key, r))
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def bench_one(model_name, cfg, peft, base, trainable, c, *, steps, batch, seq, chunk, peak, rounds, loop,
              timed=True):
  loss_fn = make_lm_loss(peft)
  algorithm = fedit(loss_fn, client_optimizer=optax.sgd(1e-3), server_optimizer=optax.sgd(1.0))
  server = algorithm.init(trainable, None)
  ids = jnp.arange(c, dtype=jnp.int32)
  data = cohort_data(c, steps, batch, seq, cfg.vocab_size)
  tokens = c * steps * batch * seq
  flops = 2 * llama_lib.llama_flops_per_token(cfg, seq, causal=True) * tokens  # 4 N per token
  chunk = min(chunk, c)
  compiled_step = build_round(algorithm, chunk_size=chunk, donate=False)
  compiled = compiled_step.lower(base, server, {}, ids, data, jax.random.key(0)).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA's cost analysis counts a while-loop body once: scale by the chunk loop and the local-step loop.
  xla_flops = float(cost.get("flops", float("nan"))) * (c // chunk) * steps if cost else float("nan")
  row = {
      "model": model_name, "clients": c, "chunk": chunk, "tokens_per_round": tokens,
      "shape": f"{steps}x{batch}x{seq}", "model_flops_per_round": flops, "xla_flops_per_round": xla_flops,
      "mem_args_bytes": getattr(mem, "argument_size_in_bytes", None),
      "mem_temp_bytes": getattr(mem, "temp_size_in_bytes", None),
      "mem_out_bytes": getattr(mem, "output_size_in_bytes", None),
      "trainable_bytes_per_client": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainable))),
  }
  if not timed:  # memory analysis only (cohorts too slow to time on this machine)
    return row
  t_round = time_round(compiled_step, base, server, ids, data, rounds)
  row.update({"compiled_s": t_round, "compiled_clients_per_s": c / t_round, "compiled_tokens_per_s": tokens / t_round,
              "compiled_flops_per_s": flops / t_round, "compiled_frac_of_matmul_peak": flops / t_round / peak})
  if loop:
    t_loop = time_round(build_sequential_round(algorithm), base, server, ids, data, max(1, rounds // 2))
    row.update({"loop_s": t_loop, "loop_clients_per_s": c / t_loop, "loop_tokens_per_s": tokens / t_loop,
                "loop_frac_of_matmul_peak": flops / t_loop / peak, "speedup": t_loop / t_round})
  return row


def fmt_bytes(b):
  return "-" if b is None else f"{b / 2**20:,.1f} MiB"


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
