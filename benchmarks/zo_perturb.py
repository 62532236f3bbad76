"""Zeroth-order perturbation: theta + c z(key) over SmolLM2-135M-shaped weights, every impl side by side.

For each kind (gaussian, rademacher) and impl (XLA reference; Pallas on GPU/TPU), one run times:
  * perturb: one direction added to every leaf (what each SPSA side costs), as GB/s of weights read + written;
  * replay: 16 directions added one after the other (``zo.tree_replay``, FedKSeed's rebuild), s per direction;
and reports the compiled programs' temporary memory (XLA memory analysis): z is never materialized, so it
stays ~0 for perturb (the output buffer is an argument-sized result, not a temporary).

  python benchmarks/zo_perturb.py                       # SmolLM2-135M shapes (~1 min on a 2-core CPU)
  python benchmarks/zo_perturb.py --layers 4 --impls xla,interpret   # small, also the Pallas interpreter
Writes a markdown table to stdout and JSON to benchmarks/results/zo_perturb_<backend>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

from common import write_results  # noqa: E402
from fedjax_llm import zo  # noqa: E402
from fedjax_llm.algorithms.fedkseed import seed_keys  # noqa: E402


def smollm2_like(layers: int, dtype) -> list:
  """The weight shapes of SmolLM2-135M (d 576, MLP 1536, 9 heads x 64, 3 KV heads, vocab 49,152)."""
  d, f, kv = 576, 1536, 192
  tree = [jnp.zeros((49152, d), dtype)]
  for _ in range(layers):
    tree += [jnp.zeros((d, d), dtype), jnp.zeros((d, kv), dtype), jnp.zeros((d, kv), dtype), jnp.zeros((d, d), dtype),
             jnp.zeros((d, f), dtype), jnp.zeros((d, f), dtype), jnp.zeros((f, d), dtype),
             jnp.zeros((d,), dtype), jnp.zeros((d,), dtype)]
  return tree + [jnp.zeros((d,), dtype)]


def timed(fn, *args, repeats: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--impls", default="", help="comma-separated; default: xla, plus pallas on GPU/TPU")
  p.add_argument("--replay", type=int, default=16, help="directions in the replay row")
  args = p.parse_args()
  backend = jax.default_backend()
  impls = args.impls.split(",") if args.impls else (["xla", "pallas"] if backend in ("gpu", "tpu") else ["xla"])
  dtype = jnp.dtype(args.dtype)
  tree = smollm2_like(args.layers, dtype)
  n = sum(x.size for x in tree)
  nbytes = n * dtype.itemsize
  rows = []
  for kind in zo.KINDS:
    for impl in impls:
      pert = jax.jit(lambda t, k, kind=kind, impl=impl: zo.tree_perturb(t, k, 1e-3, kind, impl))
      t0 = time.perf_counter()
      compiled = pert.lower(tree, jax.random.key(0)).compile()
      compile_s = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      s = timed(pert, tree, jax.random.key(1))
      keys = seed_keys(0, args.replay)
      rep = jax.jit(lambda t, c, kind=kind, impl=impl: zo.tree_replay(t, keys, c, kind, impl))
      r = timed(rep, tree, jnp.ones((args.replay,), jnp.float32), repeats=1)
      rows.append({"kind": kind, "impl": impl, "params": n, "perturb_s": s, "perturb_GBps": 2 * nbytes / s / 1e9,
                   "replay_s_per_direction": r / args.replay, "compile_s": compile_s,
                   "perturb_temp_bytes": getattr(mem, "temp_size_in_bytes", None)})
  print(f"\nzo_perturb on {backend} ({jax.devices()[0].device_kind}), {n / 1e6:.1f}M params {args.dtype}\n")
  print("| kind | impl | perturb (s) | GB/s (read+write) | replay s/direction | compile (s) | temp memory |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['kind']} | {r['impl']} | {r['perturb_s']:.3f} | {r['perturb_GBps']:.1f} | "
          f"{r['replay_s_per_direction']:.3f} | {r['compile_s']:.1f} | {r['perturb_temp_bytes']} |")
  path = write_results("zo_perturb", rows, backend)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
