"""Peak memory of workload M1: one GRPO step, 2 prompts x 8 samples, every completion forced to the length cap
(T = 5), rewards 1, 0, 1, 0, ... so every group trains. Each configuration runs in a fresh process; peak RSS is
the child's ru_maxrss. Prints a markdown table; --json writes the rows too.

    python bench/memory.py                                     # 128 and 512 new tokens, with/without checkpointing
    python bench/memory.py --tokens 512 --configs ckpt         # one row
    python bench/memory.py --script /path/to/old/grpo.py       # another checkout's grpo.py (a baseline)
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REWARD = ROOT.parent / "shared" / "bench" / "alternating_reward.py"
ALTERNATING = "def reward(prompts, completions, records):\n    return [float(i % 2 == 0) for i in range(len(completions))]\n"
CHILD = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")


def m1_command(script, tokens, checkpointing, reward_spec, dtype):
    cmd = [sys.executable, str(script), "--temperature", "5", "--max-new-tokens", str(tokens), "--prompts-per-step",
           "2", "--num-generations", "8", "--steps", "1", "--eval-size", "2", "--eval-every", "0", "--no-save",
           "--reward-fn", reward_spec, "--output-dir", f"/tmp/m1_{tokens}_{int(checkpointing)}", "--dtype", dtype]
    return cmd + (["--gradient-checkpointing"] if checkpointing else [])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512], help="--max-new-tokens values")
    p.add_argument("--configs", nargs="+", default=["plain", "ckpt"], choices=["plain", "ckpt"])
    p.add_argument("--script", default=str(ROOT / "grpo.py"), help="the grpo.py to measure")
    p.add_argument("--dtype", default="auto", help="the scripts' --dtype (float32 to compare across CPUs)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    reward_path = REWARD if REWARD.is_file() else Path("/tmp/alternating_reward.py")
    if not REWARD.is_file():
        reward_path.write_text(ALTERNATING)
    rows = []
    print(f"{args.script} --dtype {args.dtype}\n| new tokens | gradient checkpointing | peak RSS (GB) | wall (s) |\n"
          "|---|---|---|---|")
    for tokens in args.tokens:
        for config in args.configs:
            cmd = m1_command(args.script, tokens, config == "ckpt", f"{reward_path}:reward", args.dtype)
            if config == "ckpt" and "--gradient-checkpointing" not in subprocess.run(
                    [sys.executable, args.script, "--help"], capture_output=True, text=True).stdout:
                continue  # a baseline without the flag
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, *cmd], capture_output=True, text=True,
                                 cwd=Path(args.script).parent)
            wall = time.perf_counter() - t0
            maxrss_kb, rc = out.stdout.strip().splitlines()[-1].split()
            if rc != "0":
                raise SystemExit(f"error: M1 failed ({' '.join(cmd)}):\n{out.stdout[-2000:]}")
            rows.append({"tokens": tokens, "checkpointing": config == "ckpt", "peak_rss_gb": int(maxrss_kb) / 1e6,
                         "wall_s": round(wall, 1), "script": args.script})
            print(f"| {tokens} | {'yes' if config == 'ckpt' else 'no'} | {int(maxrss_kb) / 1e6:.2f} | {wall:.0f} |",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
