#!/usr/bin/env bash
# The comparison in docs/results.md: the federated LoRA family on SmolLM2-135M + Shakespeare-by-role,
# 3 plays (non-IID: each client is one role), heterogeneous client ranks 2/4/8 (configs/base.py clients.*),
# same seed, clients, rounds and data for every method. About 45 min on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" experiments/compare.py --out "${OUT:-runs/compare_lora}" \
  --set "data.plays=('hamlet','macbeth','a-midsummer-night-s-dream')" \
  --set fl.num_rounds=16 --set eval.every=4 --set eval.max_seqs_per_client=4 --set checkpoint_every=0 \
  --configs "${CONFIGS:-fedit,fedit_r2=fedit@lora.rank=2,hetlora,flora,flexlora,rbla,fedex_lora,lora_fair,ffa_lora,fedsa_lora,rolora,flasc,federa,slora,fedprox,scaffold,fedadam,fdlora,feddpa}" "$@"
