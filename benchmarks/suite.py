"""The benchmark suite: one command, every section, JSON + a markdown table per section.

  python benchmarks/suite.py [--preset cpu|gpu|quick] [--out DIR] [--sections 1,2,...] [--gpu-chunk 64]

Sections (each a list of rows, printed as a markdown table as soon as it is done):
  1. peak: measured dense matmul FLOP/s, best of N (f32 on CPU; f32 and bf16 on GPU/TPU).
  2. compiled vs loop: the compiled round (``build_round``) vs the per-client Python loop
     (``build_sequential_round``) on the same workload in the same run: the cross-device regime (tiny
     model, many clients x 1 step x 2 seqs x 16 tokens) and SmolLM2-135M LoRA; ratio column.
  3. FLOP/s fraction: the rounds of section 2 (SmolLM2-135M LoRA r=8 on q, v) as model FLOPs (4N per token:
     forward 2N + backward to activations 2N, attention included, LoRA FLOPs neglected), XLA's cost
     analysis (scaled by the loop trip counts), achieved FLOP/s / measured peak.
  4. cohort sweep (tiny model, 1x2x16 per client, fixed chunk): round s, clients/s, tokens/s, XLA memory
     analysis (args, temp, output), trainable bytes x C and, on GPU/TPU, the measured peak bytes in use
     (each point in a fresh subprocess, since the allocator's peak cannot be reset).
  5. chunk sweep (tiny model, fixed cohort): round s, clients/s, temp memory vs chunk size.
  6. kernel vs XLA: ``benchmarks/lora_matmul.run`` on GPU/TPU (skipped on CPU: Pallas runs only in
     interpret mode there).
  7. (gpu preset) SmolLM2-135M, 1,024 clients x 4 x 256 tokens, bf16 compute, LoRA r=8 q,v, one local
     step: round time, tokens/s, MFU against the nominal bf16 dense peak (H100/H200) and the fraction of
     the measured bf16 matmul peak.
  8. SmolLM2-135M memory vs cohort size (8 to 4,096 clients, compiled only): XLA's memory analysis shows the
     base counted once and C x trainable, never C x base.

Rounds are timed as the median of N after a warm-up round; compiling (ahead of time) is timed apart.
Results go to ``<out>/suite_<backend>_<stamp>.json`` and ``.md`` (rewritten after every section, so a
run cut short keeps what it measured). A section that cannot run leaves a row saying why.

Presets: ``quick`` (~2 min on a 2-core CPU, small cohorts: for checking the suite runs), ``cpu`` (the
full suite on a CPU, <= 20 min on 2 cores), ``gpu`` (larger GPU workloads + section 7).
"""
from __future__ import annotations

import os

# GPU memory on demand (no 75% preallocation): the per-point subprocesses run beside this process, and the
# measured peak of a point is its own process's ``peak_bytes_in_use``. Set before jax is imported.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import (bench_one, fmt_bytes, machine_info, make_model, markdown_table, measure_matmul_peak,  # noqa: E402
                    smollm2_name)

POINT_TAG = "SUITE_POINT_RESULT "

# Nominal dense bf16 peaks (FLOP/s, no sparsity) by device_kind substring; first match wins.
NOMINAL_BF16_PEAK = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12))

PRESETS = {
    "quick": {
        "peak": {"cpu": [("float32", 2048, 5)], "accel": [("float32", 8192, 10), ("bfloat16", 8192, 10)]},
        "rounds": 2, "loop_rounds": 1,
        "xdev": {"clients": 64, "shape": (1, 2, 16), "chunk": 64},
        "smollm2": {"clients": 2, "shape": (1, 2, 64), "chunk": 2},
        "cohort_sweep": {"cohorts": [8, 64, 256], "chunk": 256, "shape": (1, 2, 16)},
        "chunk_sweep": {"clients": 256, "chunks": [8, 32, 256], "shape": (1, 2, 16)},
        "kernel": {"cohorts": [1, 16], "dtypes": ["float32", "bfloat16"]},
        "gpu_round": None,
        "smollm2_memory": {"cohorts": [8, 64], "shape": (1, 2, 64), "chunk": 4, "dtype": "float32"},
    },
    "cpu": {
        "peak": {"cpu": [("float32", 2048, 10)], "accel": [("float32", 8192, 20), ("bfloat16", 8192, 20)]},
        "rounds": 5, "loop_rounds": 3,
        "xdev": {"clients": 256, "shape": (1, 2, 16), "chunk": 64},
        "smollm2": {"clients": 8, "shape": (1, 2, 64), "chunk": 4},
        "cohort_sweep": {"cohorts": [8, 64, 256, 1024, 4096], "chunk": 256, "shape": (1, 2, 16)},
        "chunk_sweep": {"clients": 1024, "chunks": [8, 32, 128, 512, 1024], "shape": (1, 2, 16)},
        "kernel": {"cohorts": [1, 16, 64, 256], "dtypes": ["float32", "bfloat16"]},
        "gpu_round": None,
        "smollm2_memory": {"cohorts": [8, 64, 256, 1024, 4096], "shape": (1, 2, 64), "chunk": 4, "dtype": "float32"},
    },
}
PRESETS["gpu"] = {  # the cpu preset with accelerator-sized workloads
    **PRESETS["cpu"],
    "xdev": {"clients": 256, "shape": (1, 2, 16), "chunk": 256},
    "smollm2": {"clients": 64, "shape": (1, 2, 64), "chunk": 16},
    "gpu_round": {"clients": 1024, "shape": (1, 4, 256), "dtype": "bfloat16", "rounds": 3},
    "smollm2_memory": {"cohorts": [64, 256, 1024, 4096], "shape": (1, 4, 256), "chunk": 16, "dtype": "bfloat16"},
}

SECTION_TITLES = {
    1: "Measured dense matmul peak",
    2: "Compiled round vs per-client loop",
    3: "FLOP/s fraction of the measured peak",
    4: "Cohort sweep (tiny model, fixed chunk)",
    5: "Chunk sweep (tiny model, fixed cohort)",
    6: "Multi-client LoRA matmul: kernel vs XLA",
    7: "GPU round: SmolLM2-135M LoRA, bf16 (default 1,024 clients x 4 x 256 tokens)",
    8: "SmolLM2-135M round memory vs cohort size (compiled, not run)",
}


# ----------------------------------------------------------------------------------------------------------
# Points: one workload, compiled and timed, in this process or (GPU/TPU) a fresh subprocess.

def peak_bytes_in_use():
  """The default device allocator's peak bytes in use since process start (None where not reported)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  return stats.get("peak_bytes_in_use") if stats else None


_MODELS = {}


def get_model(name: str, rank: int, dtype: str):
  """Cached ``make_model``; one SmolLM2 copy in memory at a time."""
  key = (name, rank, dtype)
  if key not in _MODELS:
    for k in [k for k in _MODELS if k[0] != "tiny"]:
      del _MODELS[k]
    _MODELS[key] = make_model(name, rank, dtype)
  return _MODELS[key]


def run_point(spec: dict) -> dict:
  """``bench_one`` for a spec dict (model, dtype, rank, clients, shape, chunk, peak, rounds, loop...)."""
  cfg, peft, base, trainable = get_model(spec["model"], spec.get("rank", 8), spec.get("dtype", "float32"))
  steps, batch, seq = spec["shape"]
  row = bench_one(spec["model"], cfg, peft, base, trainable, spec["clients"], steps=steps, batch=batch, seq=seq,
                  chunk=spec["chunk"], peak=spec["peak"], rounds=spec["rounds"], loop=spec.get("loop", False),
                  loop_rounds=spec.get("loop_rounds"), timed=spec.get("timed", True))
  return row


def run_point_isolated(spec: dict, use_subprocess: bool, timeout: float = 1800) -> dict:
  """``run_point`` here, or in a fresh process that also reports the device's measured peak bytes."""
  if not use_subprocess:
    return run_point(spec)
  cmd = [sys.executable, os.path.abspath(__file__), "--point", json.dumps(spec)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {**_spec_cols(spec), "error": f"subprocess timed out after {timeout:.0f} s"}
  for line in proc.stdout.splitlines():
    if line.startswith(POINT_TAG):
      return json.loads(line[len(POINT_TAG):])
  tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])[-400:]
  return {**_spec_cols(spec), "error": f"subprocess exited with {proc.returncode}: {tail}"}


def _spec_cols(spec):
  return {"model": spec["model"], "clients": spec["clients"], "chunk": min(spec["chunk"], spec["clients"]),
          "shape": "x".join(str(x) for x in spec["shape"])}


def point_main(spec_json: str):
  """Child process entry: run one point, print it as one tagged JSON line."""
  spec = json.loads(spec_json)
  row = run_point(spec)
  row["measured_peak_bytes"] = peak_bytes_in_use()
  print(POINT_TAG + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Formatting helpers.

def f_s(x):
  return "-" if x is None else f"{x:.4f}" if x < 0.1 else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def f_num(x, digits=0):
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def f_pct(x):
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def f_flops(x):
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  return f"{x / 1e12:,.1f} T" if x >= 1e12 else f"{x / 1e9:,.2f} G"


def note_of(row):
  return row.get("skipped") or row.get("error")


# ----------------------------------------------------------------------------------------------------------
# Sections: each returns (rows, markdown table, notes).

class Suite:
  """Runs the sections of one preset and writes the results after each."""

  def __init__(self, args):
    self.args = args
    self.preset = PRESETS[args.preset]
    self.backend = jax.default_backend()
    self.accel = self.backend != "cpu"
    self.use_subprocess = {"auto": self.accel, "on": True, "off": False}[args.isolate]
    self.rounds = args.rounds or self.preset["rounds"]
    self.loop_rounds = args.loop_rounds or self.preset["loop_rounds"]
    self.peaks = {}  # dtype -> measured FLOP/s
    self.sections = {}  # number -> {"title", "rows", "table", "notes", "wall_s"}
    self.stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    self.info = machine_info()
    self.t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"suite_{self.backend}_{self.stamp}")
    self.json_path, self.md_path = base + ".json", base + ".md"

  def peak_for(self, dtype: str):
    """The measured peak for ``dtype`` (f32 if that dtype was not measured; section 1 runs first if needed)."""
    if not self.peaks:
      self.measure_peaks()
    return self.peaks.get(dtype, self.peaks.get("float32"))

  def measure_peaks(self):
    rows = []
    for dtype, n, repeats in self.preset["peak"]["accel" if self.accel else "cpu"]:
      flops = measure_matmul_peak(n, jnp.dtype(dtype), repeats)
      self.peaks[dtype] = flops
      rows.append({"dtype": dtype, "n": n, "repeats": repeats, "flops_per_s": flops,
                   "best_s": 2 * n ** 3 / flops})
    return rows

  # 1 -------------------------------------------------------------------------------------------------------
  def section1(self):
    rows = self.measure_peaks()
    prec = getattr(jax.config, "jax_default_matmul_precision", None)
    notes = [f"best of N dense n x n @ n x n matmuls in one jit; default matmul precision ({prec or 'default'}"
             + ("; on GPU f32 may use TF32" if self.backend == "gpu" else "") + ")"]
    table = markdown_table(("dtype", "n", "best of", "best s", "FLOP/s"),
                           [(r["dtype"], r["n"], r["repeats"], f"{r['best_s']:.5f}", f_flops(r["flops_per_s"]))
                            for r in rows])
    return rows, table, notes

  # 2 -------------------------------------------------------------------------------------------------------
  def workload_specs(self):
    p = self.preset
    return [
        {"label": "tiny, cross-device", "model": "tiny", "clients": p["xdev"]["clients"], "shape": p["xdev"]["shape"],
         "chunk": p["xdev"]["chunk"]},
        {"label": "SmolLM2-135M LoRA" + ("" if smollm2_name() == "smollm2" else " (random weights)"),
         "model": smollm2_name(), "clients": p["smollm2"]["clients"],
         "shape": p["smollm2"]["shape"], "chunk": p["smollm2"]["chunk"]},
    ]

  def section2(self):
    rows = []
    for w in self.workload_specs():
      spec = {**w, "dtype": "float32", "rank": 8, "peak": self.peak_for("float32"), "rounds": self.rounds,
              "loop": True, "loop_rounds": self.loop_rounds}
      spec.pop("label")
      try:
        row = run_point(spec)  # in process: the loop's dispatch overhead is part of what is measured
      except Exception as e:  # noqa: BLE001
        row = {**_spec_cols(spec), "error": f"{type(e).__name__}: {e}"}
      row["label"] = w["label"]
      rows.append(row)
      self._progress(row)
    head = ("workload", "clients", "chunk", "shape", "compile s", "compiled s", "loop s", "loop 1st round s",
            "compiled clients/s", "loop clients/s", "tokens/s (compiled)", "ratio loop/compiled")
    lines = [(r["label"], r["clients"], r["chunk"], r["shape"], f_s(r.get("compile_s")), f_s(r.get("compiled_s")),
              f_s(r.get("loop_s")), f_s(r.get("loop_first_round_s")), f_num(r.get("compiled_clients_per_s"), 1),
              f_num(r.get("loop_clients_per_s"), 1), f_num(r.get("compiled_tokens_per_s")),
              f"{r['speedup']:.2f}x" if "speedup" in r else "-") for r in rows if not note_of(r)]
    notes = [f"{r['label']}: {note_of(r)}" for r in rows if note_of(r)]
    notes.append(f"f32 compute, LoRA r=8 on q_proj, v_proj, FedIT with client SGD; median of {self.rounds} "
                 f"compiled / {self.loop_rounds} loop rounds after a warm-up round; 'loop 1st round' includes "
                 "jit-compiling the client step; shape = local steps x sequences x tokens per client")
    self.workload_rows = rows
    return rows, markdown_table(head, lines), notes

  # 3 -------------------------------------------------------------------------------------------------------
  def section3(self):
    rows = getattr(self, "workload_rows", None)
    if rows is None:  # section 2 not run: time the compiled rounds alone
      rows = []
      for w in self.workload_specs():
        spec = {**w, "dtype": "float32", "rank": 8, "peak": self.peak_for("float32"), "rounds": self.rounds}
        spec.pop("label")
        try:
          row = run_point(spec)
        except Exception as e:  # noqa: BLE001
          row = {**_spec_cols(spec), "error": f"{type(e).__name__}: {e}"}
        row["label"] = w["label"]
        rows.append(row)
    peak = self.peak_for("float32")
    out = []
    for r in rows:
      if note_of(r):
        out.append({"label": r["label"], "skipped": note_of(r)})
        continue
      t = r["compiled_s"]
      out.append({"label": r["label"], "clients": r["clients"], "shape": r["shape"], "chunk": r["chunk"],
                  "tokens_per_round": r["tokens_per_round"], "compiled_s": t,
                  "model_flops_per_round": r["model_flops_per_round"], "xla_flops_per_round": r["xla_flops_per_round"],
                  "xla_over_model": r["xla_flops_per_round"] / r["model_flops_per_round"],
                  "model_flops_per_s": r["model_flops_per_round"] / t, "xla_flops_per_s": r["xla_flops_per_round"] / t,
                  "peak_flops_per_s": peak, "model_frac_of_peak": r["model_flops_per_round"] / t / peak,
                  "xla_frac_of_peak": r["xla_flops_per_round"] / t / peak,
                  "loop_frac_of_peak": r.get("loop_frac_of_matmul_peak")})
    head = ("workload", "clients", "shape", "tokens/round", "round s", "model FLOP/round", "XLA FLOP/round",
            "XLA/model", "model FLOP/s", "% measured peak (model)", "% peak (XLA)", "% peak (loop, model)")
    lines = [(r["label"], r["clients"], r["shape"], f_num(r["tokens_per_round"]), f_s(r["compiled_s"]),
              f_flops(r["model_flops_per_round"]), f_flops(r["xla_flops_per_round"]), f"{r['xla_over_model']:.3f}",
              f_flops(r["model_flops_per_s"]), f_pct(r["model_frac_of_peak"]), f_pct(r["xla_frac_of_peak"]),
              f_pct(r["loop_frac_of_peak"])) for r in out if not note_of(r)]
    notes = [f"{r['label']}: {note_of(r)}" for r in out if note_of(r)]
    notes.append(f"model FLOPs = 4N per token, 2N = forward FLOPs per token (matmul weights + attention, "
                 f"llama_flops_per_token; forward 2N + backward to activations 2N, LoRA FLOPs neglected); "
                 f"XLA = the compiled round's "
                 f"cost analysis x chunk-loop x local-step trip counts; peak = measured f32 matmul "
                 f"{f_flops(peak)}FLOP/s (section 1); same rounds as section 2")
    return out, markdown_table(head, lines), notes

  # 4 / 5 ---------------------------------------------------------------------------------------------------
  def _sweep(self, specs):
    rows = []
    for spec in specs:
      try:
        row = run_point_isolated(spec, self.use_subprocess)
      except Exception as e:  # noqa: BLE001
        row = {**_spec_cols(spec), "error": f"{type(e).__name__}: {e}"}
      rows.append(row)
      self._progress(row)
    return rows

  def _mem_note(self):
    if self.use_subprocess:
      return ("memory: XLA memory analysis of the compiled round (args = base model once + cohort data + state; "
              "temp = one chunk's activations + per-client outputs) and the measured peak bytes in use "
              "(device allocator, each point in a fresh process; includes the base model, the data and the "
              "timing rounds' buffers; '-' where the backend reports no allocator stats)")
    return ("memory: XLA memory analysis of the compiled round only (args = base model once + cohort data + "
            f"state; temp = one chunk's activations + per-client outputs); no measured peak on {self.backend}")

  def section4(self):
    p = self.preset["cohort_sweep"]
    specs = [{"model": "tiny", "dtype": "float32", "rank": 8, "clients": c, "shape": p["shape"], "chunk": p["chunk"],
              "peak": self.peak_for("float32"), "rounds": self.rounds} for c in p["cohorts"]]
    rows = self._sweep(specs)
    head = ["clients", "chunk", "compile s", "round s", "clients/s", "tokens/s", "args mem", "temp mem", "out mem",
            "trainable bytes x C"]
    if self.use_subprocess:
      head.append("measured peak")
    lines = []
    for r in rows:
      if note_of(r):
        continue
      line = [r["clients"], r["chunk"], f_s(r["compile_s"]), f_s(r["compiled_s"]),
              f_num(r["compiled_clients_per_s"], 1), f_num(r["compiled_tokens_per_s"]), fmt_bytes(r["mem_args_bytes"]),
              fmt_bytes(r["mem_temp_bytes"]), fmt_bytes(r["mem_out_bytes"]),
              fmt_bytes(r["trainable_bytes_per_client"] * r["clients"])]
      if self.use_subprocess:
        line.append(fmt_bytes(r.get("measured_peak_bytes")))
      lines.append(line)
    notes = [f"clients {r['clients']}: {note_of(r)}" for r in rows if note_of(r)]
    good = [r for r in rows if not note_of(r)]
    if good:
      notes.append(f"tiny model (2 layers, d=32, vocab 258), per client {p['shape'][0]} step x {p['shape'][1]} seqs x "
                   f"{p['shape'][2]} tokens, chunk = min({p['chunk']}, C); base model "
                   f"{fmt_bytes(good[0]['base_bytes'])}, trainable {good[0]['trainable_bytes_per_client']:,} bytes "
                   "per client; expected: memory = base + chunk x activations + C x trainable")
    notes.append(self._mem_note())
    return rows, markdown_table(head, lines), notes

  def section8(self):
    p = self.preset["smollm2_memory"]
    name = smollm2_name()
    specs = [{"model": name, "dtype": p["dtype"], "rank": 8, "clients": c, "shape": p["shape"], "chunk": p["chunk"],
              "peak": self.peak_for("float32"), "rounds": 0, "timed": False} for c in p["cohorts"]]
    rows = self._sweep(specs)
    head = ["clients", "chunk", "shape", "compile s", "args mem", "temp mem", "out mem", "trainable bytes x C",
            "C x base (never allocated)"]
    lines = [[r["clients"], r["chunk"], r["shape"], f_s(r["compile_s"]), fmt_bytes(r["mem_args_bytes"]),
              fmt_bytes(r["mem_temp_bytes"]), fmt_bytes(r["mem_out_bytes"]),
              fmt_bytes(r["trainable_bytes_per_client"] * r["clients"]), fmt_bytes(r["base_bytes"] * r["clients"])]
             for r in rows if not note_of(r)]
    notes = [f"clients {r['clients']}: {note_of(r)}" for r in rows if note_of(r)]
    good = [r for r in rows if not note_of(r)]
    if len(good) >= 2:
      a, b = good[0], good[-1]
      per = (b["mem_temp_bytes"] - a["mem_temp_bytes"]) / (b["clients"] - a["clients"])
      notes.append(f"from {a['clients']} to {b['clients']} clients: args {fmt_bytes(a['mem_args_bytes'])} -> "
                   f"{fmt_bytes(b['mem_args_bytes'])} (the base once, plus the cohort's tokens), temp grows "
                   f"{per / 1e6:.2f} MB per added client = {per / a['trainable_bytes_per_client']:.2f} x its "
                   f"{a['trainable_bytes_per_client'] / 1e6:.2f} MB of LoRA factors (the per-client outputs the "
                   "aggregation reduces); the rest is one chunk's activations, whatever the cohort")
    notes.append(f"SmolLM2-135M ({'pretrained' if name == 'smollm2' else 'random weights, same shapes'}), "
                 f"{p['dtype']} compute, LoRA r=8 q,v, FedIT; XLA memory analysis of the compiled round (compiled "
                 "only: timing 4,096 SmolLM2 clients is out of reach of a CPU)")
    return rows, markdown_table(head, lines), notes

  def section5(self):
    p = self.preset["chunk_sweep"]
    specs = [{"model": "tiny", "dtype": "float32", "rank": 8, "clients": p["clients"], "shape": p["shape"],
              "chunk": k, "peak": self.peak_for("float32"), "rounds": self.rounds} for k in p["chunks"]]
    rows = self._sweep(specs)
    head = ["clients", "chunk", "compile s", "round s", "clients/s", "tokens/s", "temp mem", "args mem"]
    if self.use_subprocess:
      head.append("measured peak")
    lines = []
    for r in rows:
      if note_of(r):
        continue
      line = [r["clients"], r["chunk"], f_s(r["compile_s"]), f_s(r["compiled_s"]),
              f_num(r["compiled_clients_per_s"], 1),
              f_num(r["compiled_tokens_per_s"]), fmt_bytes(r["mem_temp_bytes"]), fmt_bytes(r["mem_args_bytes"])]
      if self.use_subprocess:
        line.append(fmt_bytes(r.get("measured_peak_bytes")))
      lines.append(line)
    notes = [f"chunk {r['chunk']}: {note_of(r)}" for r in rows if note_of(r)]
    notes.append(f"tiny model, {p['clients']} clients x {'x'.join(map(str, p['shape']))}; chunks run one after "
                 "another under lax.scan, clients within a chunk are vmapped")
    notes.append(self._mem_note())
    return rows, markdown_table(head, lines), notes

  # 6 -------------------------------------------------------------------------------------------------------
  def section6(self):
    if not self.accel:
      row = {"skipped": "CPU (Pallas runs only in interpret mode here)"}
      return [row], "", [f"skipped: {row['skipped']}"]
    try:
      mod = importlib.import_module("lora_matmul")
    except Exception as e:  # noqa: BLE001
      row = {"skipped": f"benchmarks/lora_matmul.py could not be imported ({type(e).__name__}: {e})"}
      return [row], "", [f"skipped: {row['skipped']}"]
    run = getattr(mod, "run", None)
    if run is None:
      row = {"skipped": "benchmarks/lora_matmul.py has no run(...)"}
      return [row], "", [f"skipped: {row['skipped']}"]
    p = self.preset["kernel"]
    params = inspect.signature(run).parameters
    kwargs = {k: v for k, v in {"dtypes": p["dtypes"], "cohorts": p["cohorts"]}.items() if k in params}
    if "impls" in params and params["impls"].default is inspect.Parameter.empty:
      kwargs["impls"] = ["xla", "pallas"]
    try:
      rows = list(run(**kwargs))
    except Exception as e:  # noqa: BLE001
      row = {"error": f"lora_matmul.run({kwargs}) failed: {type(e).__name__}: {e}"}
      return [row], "", [f"error: {row['error']}"]
    notes = [f"lora_matmul.run({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): the multi-client LoRA "
             "matmul at SmolLM2-135M shapes (see benchmarks/lora_matmul.py's docstring)"]
    notes += [f"failed: {r.get('impl')} {r.get('dtype')} cohort {r.get('cohort')} {r.get('pass', '')}: {r['error']}"
              for r in rows if "error" in r]
    if callable(getattr(mod, "table", None)):
      try:
        return rows, mod.table(rows), notes
      except Exception:  # noqa: BLE001 (fall back to the generic table)
        pass
    keys = []
    for r in rows:
      keys += [k for k in r if k not in keys and not isinstance(r[k], (list, dict))]
    fmt = lambda v: (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    return rows, markdown_table(keys, [[fmt(r.get(k, "-")) for k in keys] for r in rows]), notes

  # 7 -------------------------------------------------------------------------------------------------------
  def nominal_bf16_peak(self):
    kind = jax.devices()[0].device_kind
    for key, flops in NOMINAL_BF16_PEAK:
      if key.lower() in kind.lower():
        return flops, f"nominal dense bf16 of {kind}"
    return None, None

  def section7(self):
    p = self.preset["gpu_round"]
    if p is None:
      row = {"skipped": f"gpu preset only (this run: --preset {self.args.preset})"}
      return [row], "", [f"skipped: {row['skipped']}"]
    if not self.accel:
      row = {"skipped": f"no GPU/TPU (backend {self.backend}): a 1,024 x 4 x 256-token SmolLM2 round is out of "
                        "reach of this CPU"}
      return [row], "", [f"skipped: {row['skipped']}"]
    measured = self.peak_for("bfloat16")
    nominal, source = self.nominal_bf16_peak()
    if nominal is None:
      nominal, source = measured, "measured bf16 matmul peak (device kind not in the nominal table)"
    clients = self.args.gpu_clients or p["clients"]
    shape = tuple(int(x) for x in self.args.gpu_shape.split(",")) if self.args.gpu_shape else p["shape"]
    chunk, notes = self.args.gpu_chunk, []
    while True:  # out of memory: halve the chunk (noted), down to 1
      spec = {"model": smollm2_name(), "dtype": p["dtype"], "rank": 8, "clients": clients, "shape": shape,
              "chunk": chunk, "peak": measured, "rounds": p["rounds"]}
      try:
        row = run_point_isolated(spec, self.use_subprocess)
      except Exception as e:  # noqa: BLE001
        row = {**_spec_cols(spec), "error": f"{type(e).__name__}: {e}"}
      err = note_of(row) or ""
      if chunk > 1 and any(x in err.lower() for x in ("resource_exhausted", "out of memory", "oom")):
        notes.append(f"chunk {chunk}: out of memory ({err[:200]}); retrying with chunk {chunk // 2}")
        self._progress(row)
        chunk //= 2
        continue
      break
    if not note_of(row):
      t = row["compiled_s"]
      row.update({"nominal_peak_flops_per_s": nominal, "nominal_peak_source": source,
                  "mfu": row["model_flops_per_round"] / t / nominal,
                  "frac_of_measured_bf16_peak": row["model_flops_per_round"] / t / measured,
                  "xla_mfu": row["xla_flops_per_round"] / t / nominal})
    self._progress(row)
    head = ("clients", "chunk", "shape", "compile s", "round s", "tokens/s", "model FLOP/round", "MFU",
            "% measured bf16 peak", "MFU (XLA FLOPs)", "args mem", "temp mem", "measured peak")
    lines = [] if note_of(row) else [(
        row["clients"], row["chunk"], row["shape"], f_s(row["compile_s"]), f_s(row["compiled_s"]),
        f_num(row["compiled_tokens_per_s"]), f_flops(row["model_flops_per_round"]), f_pct(row["mfu"]),
        f_pct(row["frac_of_measured_bf16_peak"]), f_pct(row["xla_mfu"]), fmt_bytes(row["mem_args_bytes"]),
        fmt_bytes(row["mem_temp_bytes"]), fmt_bytes(row.get("measured_peak_bytes")))]
    notes += [f"error: {note_of(row)}"] if note_of(row) else []
    notes.append(f"SmolLM2-135M ({'pretrained' if spec['model'] == 'smollm2' else 'random weights: the weights package is not installed here; same FLOPs and speed'}), {clients} clients x {'x'.join(map(str, shape))} (steps x seqs x tokens), bf16 "
                 f"compute (params f32), LoRA r=8 q,v, chunk {chunk} (--gpu-chunk {self.args.gpu_chunk}); "
                 f"MFU = model FLOPs (4N per token) / round s / {f_flops(nominal)}FLOP/s ({source}); "
                 f"measured bf16 peak {f_flops(measured)}FLOP/s; median of {p['rounds']} rounds")
    return [row], markdown_table(head, lines), notes

  # ---------------------------------------------------------------------------------------------------------
  def _progress(self, row):
    short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
             if not isinstance(v, (list, dict))}
    print("  " + json.dumps(short), flush=True)

  def run(self, numbers):
    print(self.header(), flush=True)
    for n in numbers:
      t = time.perf_counter()
      print(f"\n## {n}. {SECTION_TITLES[n]}  (running...)", flush=True)
      try:
        rows, table, notes = getattr(self, f"section{n}")()
      except Exception as e:  # noqa: BLE001 (a failing section must not lose the others)
        traceback.print_exc()
        rows, table, notes = [{"error": f"{type(e).__name__}: {e}"}], "", [f"error: {type(e).__name__}: {e}"]
      self.sections[n] = {"title": SECTION_TITLES[n], "rows": rows, "table": table, "notes": notes,
                          "wall_s": time.perf_counter() - t}
      print("\n" + self.section_md(n), flush=True)
      self.write()
    print(f"\nwrote {self.json_path}\nwrote {self.md_path}\n(total {time.perf_counter() - self.t0:.0f} s)")

  def header(self):
    i = self.info
    dev = i["device_kind"] if self.accel else f"{i['cpu']} x {i['cpu_count']} cores (no accelerator)"
    peaks = ", ".join(f"{k} {f_flops(v)}FLOP/s" for k, v in self.peaks.items()) or "(section 1)"
    return "\n".join([
        f"# Benchmark suite ({self.args.preset} preset, {self.backend})", "",
        f"- **Date**: {datetime.datetime.now().isoformat(timespec='seconds')} (run started {self.stamp})",
        f"- **Machine**: {i['platform']}; CPU {i['cpu']} x {i['cpu_count']}; device: {dev}",
        f"- **Software**: Python {i['python']}, jax {i['jax']} (jaxlib {i['jaxlib']}), backend {self.backend}",
        f"- **Command**: `{self.command()}`",
        f"- **Measured peaks**: {peaks}",
    ])

  def command(self):
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0].endswith(".py") else sys.argv[0]]
                                + sys.argv[1:])

  def section_md(self, n):
    s = self.sections[n]
    out = [f"## {n}. {s['title']}", ""]
    if s["table"]:
      out += [s["table"], ""]
    out += [f"- {x}" for x in s["notes"]]
    out.append(f"- section wall time: {s['wall_s']:.1f} s")
    return "\n".join(out)

  def write(self):
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "stamp": self.stamp,
            "preset": self.args.preset, "preset_config": self.preset, "command": self.command(),
            "machine": self.info, "measured_peaks_flops_per_s": self.peaks, "rounds": self.rounds,
            "loop_rounds": self.loop_rounds, "wall_s": time.perf_counter() - self.t0,
            "sections": {str(n): s for n, s in self.sections.items()}}
    with open(self.json_path + ".tmp", "w") as f:
      json.dump(meta, f, indent=1, default=str)
    os.replace(self.json_path + ".tmp", self.json_path)
    md = [self.header(), ""] + [self.section_md(n) + "\n" for n in sorted(self.sections)]
    with open(self.md_path, "w") as f:
      f.write("\n".join(md))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                 help="default: gpu on a GPU/TPU backend, cpu otherwise")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  p.add_argument("--sections", default="1,2,3,4,5,6,7,8", help="comma-separated section numbers")
  p.add_argument("--gpu-chunk", type=int, default=64, help="chunk size of section 7's SmolLM2 round")
  p.add_argument("--rounds", type=int, default=None, help="timed rounds per point (median); default: the preset's")
  p.add_argument("--loop-rounds", type=int, default=None, help="timed rounds of the per-client loop")
  p.add_argument("--gpu-clients", type=int, default=None, help="section 7's cohort size (default 1024)")
  p.add_argument("--gpu-shape", default=None,
                 help="section 7's local steps,sequences,tokens per client (default 1,4,256)")
  p.add_argument("--isolate", choices=("auto", "on", "off"), default="auto",
                 help="run each sweep / section-7 point in a fresh subprocess and report its measured peak bytes "
                      "(auto: on GPU/TPU only; off: in this process, no per-point measured peak)")
  p.add_argument("--point", default=None, help=argparse.SUPPRESS)  # internal: one point in a child process
  args = p.parse_args(argv)
  if args.point is not None:
    return point_main(args.point)
  if args.preset is None:
    args.preset = "cpu" if jax.default_backend() == "cpu" else "gpu"
  numbers = [int(x) for x in args.sections.split(",") if x]
  bad = [n for n in numbers if n not in SECTION_TITLES]
  if bad:
    raise SystemExit(f"unknown sections {bad}; allowed: {sorted(SECTION_TITLES)}")
  Suite(args).run(numbers)


if __name__ == "__main__":
  main()
