#!/usr/bin/env bash
# One-GPU smoke test: every script for 2 steps on a small hub model, printing step time and peak GPU memory
# (torch.cuda.max_memory_allocated). Needs CUDA and network access for the model (or a local model dir).
#   bash bench/gpu_smoke.sh                       # Qwen/Qwen2.5-0.5B-Instruct
#   MODEL=/path/to/model bash bench/gpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
OUT=${OUT:-runs/gpu_smoke}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: bench/gpu_smoke.sh needs a CUDA GPU (torch.cuda.is_available() is False)" >&2; exit 1; }
mkdir -p "$OUT"
COMMON=(--model "$MODEL" --eval-size 8 --eval-every 0 --max-new-tokens 256 --no-save)
run() {  # name, script, flags...
  local name=$1 script=$2; shift 2
  $PY - "$OUT/$name" "$script" "$@" <<'PYEOF'
import json, runpy, sys, time, torch
out, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = [script, *argv, "--output-dir", out]
t0 = time.perf_counter()
runpy.run_path(script, run_name="__main__")
steps = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if '"step_time"' in l]
times = [r["step_time"] for r in steps]
print(json.dumps({"script": script, "args": argv, "s_per_step": times, "wall_s": round(time.perf_counter() - t0, 1),
                  "max_memory_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}))
PYEOF
}
run grpo grpo.py "${COMMON[@]}" --steps 2 --gradient-checkpointing
run raft raft.py "${COMMON[@]}" --steps 2 --gradient-checkpointing
run reinforce_rej reinforce_rej.py "${COMMON[@]}" --steps 2 --gradient-checkpointing
run em em.py "${COMMON[@]}" --steps 2 --gradient-checkpointing
run rest_em rest_em.py "${COMMON[@]}" --iterations 1 --gradient-checkpointing
run weak_to_strong weak_to_strong.py --strong-model "$MODEL" --weak-model "$MODEL" --weak-layers 0 --steps 2 --n-train 256 --eval-size 64 --no-save
