#!/usr/bin/env bash
# What a session with a GPU runs (device tool; the image has jax, flax, optax, pytest): the compiled Pallas kernels
# against XLA, then the benchmarks, each stage within the tool's 10-minute limit. Results go to $OUT (or ./gpu_out).
#   bash scripts/gpu_check.sh kernels     # tests/kernels/test_on_device.py + both kernel benchmarks
#   bash scripts/gpu_check.sh suite       # benchmarks/suite.py --preset gpu (SmolLM2 random weights if not installed)
#   bash scripts/gpu_check.sh mfu [CHUNK] # only section 7: 1,024 clients x 4 x 256 tokens, bf16
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
case "${1:-kernels}" in
  kernels)
    $PY -m pytest -q -p no:cacheprovider tests/kernels/test_on_device.py 2>&1 | tee "$OUT/kernel_tests.log"
    $PY benchmarks/lora_matmul.py 2>&1 | tee "$OUT/lora_matmul.log"
    cp benchmarks/results/lora_matmul_*.json "$OUT/" 2>/dev/null
    $PY benchmarks/zo_perturb.py --impls xla,pallas 2>&1 | tee "$OUT/zo_perturb.log"
    cp benchmarks/results/zo_perturb_*.json "$OUT/" 2>/dev/null ;;
  suite)
    $PY benchmarks/suite.py --preset gpu --sections 1,2,3,4,5,6 --out "$OUT" 2>&1 | tee "$OUT/suite.log" ;;
  mfu)
    $PY benchmarks/suite.py --preset gpu --sections 1,7 --gpu-chunk "${2:-64}" --out "$OUT" 2>&1 | tee "$OUT/mfu.log" ;;
  *) echo "unknown stage ${1}; allowed: kernels, suite, mfu" >&2; exit 2 ;;
esac
