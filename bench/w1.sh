#!/usr/bin/env bash
# Speed benchmark W1: grpo.py vs TRL's GRPOTrainer (peer baseline) on the same workload, same machine, one session.
# 4 prompts x 8 generations, <= 48 new tokens, T = 1.0, beta = 0, one update per generation batch.
# Needs ../shared/bench/trl_grpo_baseline.py and TRL in a separate venv:  python -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 trl==1.16.0
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}; TRL_PY=${TRL_PY:-/tmp/trl/bin/python}; OUT=${OUT:-runs/w1}
rm -rf "$OUT"
$PY grpo.py --steps 6 --prompts-per-step 4 --num-generations 8 --max-new-tokens 48 --temperature 1.0 --beta 0 \
    --eval-every 0 --eval-size 32 --output-dir "$OUT" --no-save > "$OUT.log" 2>&1
$PY - "$OUT/metrics.jsonl" <<'PYEOF'
import json, statistics, sys
t = [r["step_time"] for r in map(json.loads, open(sys.argv[1])) if "step_time" in r]
print(json.dumps({"tool": "grpo.py", "s_per_step_median": statistics.median(t[1:]), "s_per_step": t}))
PYEOF
$TRL_PY ../shared/bench/trl_grpo_baseline.py --model "$($PY common.py convert)" --steps 4 2>/dev/null | tail -1
