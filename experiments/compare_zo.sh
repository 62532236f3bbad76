#!/usr/bin/env bash
# The comparison in docs/results.md: zeroth-order FedKSeed vs FedIT-LoRA on SmolLM2-135M + Shakespeare-by-role,
# the LoRA-family setting (3 plays, 8 clients per round, same seed and held-out set). The FedIT run of
# experiments/compare_lora_family.sh is reused when present (copied into the output directory).
# Full-parameter FedKSeed runs 12 rounds of 8 local steps with K = 128 seeds (its replay costs up to K passes
# over the 135M weights per rebuild: ~0.24 s each on a 2-core CPU); FedKSeed on the LoRA factors 8 rounds of
# 16 steps. About 60 min on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/compare_zo}
mkdir -p "$OUT"
if [ -f runs/compare_lora/fedit/summary.json ] && [ ! -e "$OUT/fedit" ]; then cp -r runs/compare_lora/fedit "$OUT/fedit"; fi
exec "$PY" experiments/compare.py --out "$OUT" --title "Zeroth order (FedKSeed) vs FedIT-LoRA on SmolLM2-135M + Shakespeare" \
  --set "data.plays=('hamlet','macbeth','a-midsummer-night-s-dream')" \
  --set fl.num_rounds=16 --set eval.every=4 --set eval.max_seqs_per_client=4 --set checkpoint_every=0 \
  --configs "${CONFIGS:-fedit,fedkseed_full=fedkseed@fl.num_rounds=12@fl.local_steps=8@fedkseed.num_seeds=128,fedkseed_lora@fl.num_rounds=8}" "$@"
