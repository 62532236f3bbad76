"""LoRA matmul y = x W + s ((x a) * mask) b at SmolLM2-135M shapes: XLA reference vs the Pallas kernel.

Shapes: K = 576 (d_model), N = 576 (q_proj) and 192 (v_proj), R = r_max = 16 with mixed client ranks, 4 x 256
tokens per client; cohort 1 is the single-client op, cohorts 16 / 64 the vmapped ``lora_matmul_cohort`` (W shared).
Each row times (best of `repeats`, after compiling) either the forward, or forward + backward (value and grad
w.r.t. x, a, b; W frozen), and reports achieved FLOP/s counted from the model FLOPs:
  forward 2 M (K N + K R + R N); backward adds g (2 M N R), dx (2 M (N K + R K)), da (2 M K R), db (2 M R N).

On CPU only the "xla" impl runs ("interpret" is the Pallas interpreter: a correctness tool, far too slow to
time); on GPU/TPU both "xla" and "pallas".

  python benchmarks/lora_matmul.py                              # all rows (a few minutes on a 2-core CPU)
  python benchmarks/lora_matmul.py --cohorts 1,16 --dtypes float32
Prints a markdown table and writes JSON to benchmarks/results/lora_matmul_<backend>.json. The suite calls
``run(impls, dtypes, cohorts, ...)`` (returns the rows as dicts).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import write_results  # noqa: E402
from kernels.lora_matmul import api  # noqa: E402

K, NS, R, TOKENS = 576, (576, 192), 16, 4 * 256
RANKS = (16, 8, 4, 12)  # client ranks cycle through these (r_max = 16)


def default_impls(backend: str | None = None) -> list[str]:
  """["xla", "pallas"] on GPU/TPU, ["xla"] on CPU (the interpreter is not worth timing)."""
  return ["xla", "pallas"] if (backend or jax.default_backend()) in ("gpu", "tpu") else ["xla"]


def model_flops(m: int, k: int, n: int, r: int, backward: bool) -> int:
  """FLOPs of the math (not of any padding) for M tokens: forward, or forward + grads of x, a, b."""
  fwd = 2 * m * (k * n + k * r + r * n)
  bwd = 2 * m * n * r + 2 * m * (n * k + r * k) + 2 * m * k * r + 2 * m * r * n
  return fwd + (bwd if backward else 0)


def _timed(fn: Any, *args: Any, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def _data(cohort: int, n: int, dtype: Any, seed: int = 0) -> tuple:
  keys = jax.random.split(jax.random.key(seed), 5)
  lead = (cohort, TOKENS) if cohort > 1 else (TOKENS,)
  x = jax.random.normal(keys[0], (*lead, K), jnp.float32).astype(dtype)
  w = jax.random.normal(keys[1], (K, n), jnp.float32) / np.sqrt(K)
  c = max(cohort, 1)
  a = jax.random.normal(keys[2], (c, K, R), jnp.float32) / np.sqrt(K)
  b = jax.random.normal(keys[3], (c, R, n), jnp.float32) * 0.1
  ct = jax.random.normal(keys[4], (*lead, n), jnp.float32).astype(dtype)
  scale = jnp.full((c,), 2.0, jnp.float32)
  rank = jnp.asarray([RANKS[i % len(RANKS)] for i in range(c)], jnp.int32)
  if cohort == 1:
    a, b, scale, rank = a[0], b[0], scale[0], rank[0]
  return x, w, a, b, scale, rank, ct


def _fns(impl: str, cohort: int, blocks: tuple[int, int, int] | None) -> tuple[Any, Any]:
  op = api.lora_matmul if cohort == 1 else api.lora_matmul_cohort

  def fwd(x, w, a, b, scale, rank):
    return op(x, w, a, b, scale, rank, impl, blocks=blocks)

  def loss(x, w, a, b, scale, rank, ct):
    return jnp.sum((fwd(x, w, a, b, scale, rank) * ct).astype(jnp.float32))

  return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3)))


def run(impls: Sequence[str] | None = None, dtypes: Sequence[str] = ("float32", "bfloat16"),
        cohorts: Sequence[int] = (1, 16, 64), ns: Sequence[int] = NS, repeats: int = 5,
        blocks: tuple[int, int, int] | None = None, verbose: bool = True) -> list[dict]:
  """Time every (dtype, N, cohort, impl, pass) and return one dict per row (see the module docstring)."""
  backend = jax.default_backend()
  impls = list(impls) if impls else default_impls(backend)
  rows = []
  for dtype_name in dtypes:
    dtype = jnp.dtype(dtype_name)
    for n in ns:
      for cohort in cohorts:
        x, w, a, b, scale, rank, ct = _data(cohort, n, dtype)
        m = cohort * TOKENS
        for impl in impls:
          fwd, fwd_bwd = _fns(impl, cohort, blocks)
          for name, fn, args in (("fwd", fwd, (x, w, a, b, scale, rank)),
                                 ("fwd+bwd", fwd_bwd, (x, w, a, b, scale, rank, ct))):
            row = {"dtype": dtype_name, "K": K, "N": n, "R": R, "tokens_per_client": TOKENS, "cohort": cohort,
                   "impl": impl, "pass": name}
            try:  # a kernel that fails to compile on some device records the error; the other rows still run
              t0 = time.perf_counter()
              compiled = fn.lower(*args).compile()
              compile_s = time.perf_counter() - t0
              jax.block_until_ready(compiled(*args))
              s = _timed(compiled, *args, repeats=repeats)
            except Exception as e:  # noqa: BLE001
              row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
              rows.append(row)
              if verbose:
                print(f"  {dtype_name} N={n} C={cohort} {impl} {name}: FAILED {row['error'][:200]}", flush=True)
              continue
            flops = model_flops(m, K, n, R, name == "fwd+bwd")
            row.update({"seconds": s, "tflops_per_s": flops / s / 1e12, "model_flops": flops, "compile_s": compile_s})
            rows.append(row)
            if verbose:
              print(f"  {dtype_name} N={n} C={cohort} {impl} {name}: {s * 1e3:.3f} ms "
                    f"{row['tflops_per_s']:.3f} TFLOP/s", flush=True)
  return rows


def table(rows: list[dict]) -> str:
  """Markdown table, with the kernel's speedup over XLA where both ran."""
  xla = {(r["dtype"], r["N"], r["cohort"], r["pass"]): r["seconds"] for r in rows
         if r["impl"] == "xla" and "error" not in r}
  out = ["| dtype | N | cohort | pass | impl | time (ms) | TFLOP/s | vs xla |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      out.append(f"| {r['dtype']} | {r['N']} | {r['cohort']} | {r['pass']} | {r['impl']} | failed | - | - |")
      continue
    base = xla.get((r["dtype"], r["N"], r["cohort"], r["pass"]))
    speed = f"{base / r['seconds']:.2f}x" if base else "-"
    out.append(f"| {r['dtype']} | {r['N']} | {r['cohort']} | {r['pass']} | {r['impl']} | {r['seconds'] * 1e3:.3f} | "
               f"{r['tflops_per_s']:.3f} | {speed} |")
  return "\n".join(out)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--impls", default="", help="comma-separated; default: xla, plus pallas on GPU/TPU")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--cohorts", default="1,16,64")
  p.add_argument("--ns", default=",".join(str(n) for n in NS))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--blocks", default="", help="bm,bn,bk caps for the kernel (powers of two); default the kernel's")
  args = p.parse_args()
  backend = jax.default_backend()
  impls = args.impls.split(",") if args.impls else default_impls(backend)
  if backend not in ("gpu", "tpu"):
    print(f"backend {backend}: timing {impls} only (the Pallas kernel needs a GPU/TPU; interpret mode is for "
          "correctness tests)")
  blocks = tuple(int(v) for v in args.blocks.split(",")) if args.blocks else None
  rows = run(impls, args.dtypes.split(","), [int(c) for c in args.cohorts.split(",")],
             [int(n) for n in args.ns.split(",")], args.repeats, blocks)
  print(f"\nlora_matmul on {backend} ({jax.devices()[0].device_kind}), K={K}, R={R}, {TOKENS} tokens/client\n")
  print(table(rows))
  path = write_results("lora_matmul", rows, backend)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
