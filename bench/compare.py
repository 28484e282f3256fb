"""Run every algorithm on the embedded default with the same sampling budget per step and several seeds, then
collect their metrics.jsonl into one results table (markdown) and learning curves (PNG, if matplotlib is
installed: `pip install matplotlib`; it is an optional extra, not a core requirement).

    python bench/compare.py --seeds 0 1                          # run everything (~2 h on 2 CPU cores), then report
    python bench/compare.py --report-only                        # only rebuild the table/plots from runs/compare
    python bench/compare.py --runs grpo raft --seeds 0 --dry-run # print the commands

Budget per step (shared by the sampling algorithms): --prompts-per-step P x --num-generations G completions of
at most --max-new-tokens tokens, for --steps steps. EM uses the same P x G per step but keeps its own step count
(10, the paper's); ReST-EM samples its whole E-step at once (64 problems x 4 samples per iteration, 3
iterations) and weak-to-strong samples nothing (it fine-tunes classifiers): their rows are reported beside the
others but are not budget-matched.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run name -> (script, extra flags). Variants of one script are separate rows.
RUNS = {
    "grpo": ("grpo", []),
    "raftpp": ("raft", []),                                   # RAFT++ (raft.py's default)
    "raft": ("raft", ["--no-clip"]),                          # plain RAFT
    "reinforce_rej": ("reinforce_rej", ["--log-kl"]),                  # Reinforce-Rej (drop all-correct and all-wrong groups)
    "reinforce": ("reinforce_rej", ["--reject", "none", "--log-kl"]),     # vanilla Reinforce, A = r
    # GRPO's advantage (r - mean) / std inside reinforce_rej.py: the same update as "grpo" up to the loss
    # aggregation (seq-mean-token-mean), run there because that script logs the KL to the start model
    "grpo_adv": ("reinforce_rej", ["--reject", "none", "--mean-zero", "--std-normalize", "--log-kl"]),
    "ppo": ("ppo", []),                                      # PPO with a value model (critic from the policy)
    "iterative_dpo": ("iterative_dpo", []),                  # online iterative DPO: one pair per prompt, 2 updates/step
    "em": ("em", ["--eval-every", "5"]),                    # evaluate at steps 0, 5, 10 (default: every 2)
    "rest_em": ("rest_em", []),
    "weak_to_strong": ("weak_to_strong", []),                 # weak = the first 6 layers at lr 5e-5 (the defaults)
    "weak_to_strong_l5": ("weak_to_strong", ["--weak-layers", "5", "--weak-lr", "1e-4"]),  # a near-chance supervisor
}
BUDGET_MATCHED = {"grpo", "raft", "reinforce_rej", "iterative_dpo", "ppo"}  # scripts that take the shared sampling-budget flags as given


def command(name, seed, args, out):
    script, extra = RUNS[name]
    cmd = [sys.executable, str(ROOT / f"{script}.py"), "--seed", str(seed), "--output-dir", str(out), "--no-save"]
    if script in BUDGET_MATCHED:
        cmd += ["--steps", str(args.steps), "--eval-every", str(args.eval_every), "--eval-size", str(args.eval_size)]
    if script in BUDGET_MATCHED | {"em"}:
        cmd += ["--prompts-per-step", str(args.prompts_per_step), "--num-generations", str(args.num_generations),
                "--max-new-tokens", str(args.max_new_tokens)]
    return cmd + extra


def read_metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def pct(v):
    return f"{v:.1%}" if isinstance(v, (int, float)) else "-"


def report(out_root, names, seeds):
    rows, summary, curves, w2s_rows = [], [], {}, []
    for name in names:
        per_seed = []
        for seed in seeds:
            run = out_root / f"{name}__{seed}"
            if not run.is_dir():  # not run (yet): no row
                continue
            records = read_metrics(run)
            evals = [r for r in records if "eval/accuracy" in r]
            steps = [r for r in records if "reward" in r and "step_time" in r]
            wall = (run / "wall_seconds.txt").read_text().strip() if (run / "wall_seconds.txt").exists() else "-"
            if RUNS[name][0] == "weak_to_strong":  # a classifier experiment: its own table (test accuracy, PGR)
                final = next((r for r in reversed(records) if r.get("phase") == "summary"), None)
                if final:
                    w2s_rows.append(final | {"name": name, "seed": seed, "wall": wall})
                continue
            if not evals:
                rows.append(f"| {name} | {seed} | - | - | - | - | - | - | {wall} |")
                continue
            first, last = evals[0], evals[-1]
            correct = [r.get("correct") for r in steps]  # fraction of the step's samples graded correct
            tail = [c for c in correct[-5:] if c is not None]
            kls = [r["kl"] for r in steps if r.get("kl") is not None]
            rows.append(f"| {name} | {seed} | {pct(first['eval/accuracy'])} | {pct(last['eval/accuracy'])} | "
                        f"{pct(first.get('eval/sampled_accuracy'))} | {pct(last.get('eval/sampled_accuracy'))} | "
                        f"{pct(statistics.mean(tail)) if tail else '-'} | {f'{kls[-1]:.4f}' if kls else '-'} | {wall} |")
            per_seed.append((first["eval/accuracy"], last["eval/accuracy"], first.get("eval/sampled_accuracy"),
                             last.get("eval/sampled_accuracy")))
            if RUNS[name][0] in BUDGET_MATCHED:  # same x axis (sampling steps of equal budget): plot these
                curves[(name, seed)] = {"step": [r["step"] for r in steps], "correct": correct,
                                        "entropy": [r.get("entropy") for r in steps],
                                        "kl": [r.get("kl") for r in steps],
                                        "eval_step": [r["step"] for r in evals], "greedy": [r["eval/accuracy"] for r in evals]}
        if per_seed:
            m = [statistics.mean(v[i] for v in per_seed if v[i] is not None) for i in range(4)]
            summary.append(f"| {name} | {len(per_seed)} | {pct(m[0])} → {pct(m[1])} | {pct(m[2])} → {pct(m[3])} |")
    table = ("| run | seed | greedy before | greedy after | sampled before | sampled after | train correct (last 5 steps) "
             "| KL to start (last step) | wall s |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    means = ("| run | seeds | greedy before → after (mean) | sampled before → after (mean) |\n|---|---|---|---|\n"
             + "\n".join(summary))
    if w2s_rows:  # weak_to_strong.py: held-out classification accuracy of the four models and PGR per loss
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
        lines = [f"| {r['name']} | {r['seed']} | {pct(r['weak'])} | {pct(r['ceiling'])} | {pct(r['w2s_xent'])} | {pct(r['w2s_aux'])} "
                 f"| {fmt(r['pgr_xent'])} | {fmt(r['pgr_aux'])} | {r['wall']} |" for r in w2s_rows]
        for name in dict.fromkeys(r["name"] for r in w2s_rows):  # a mean row per variant
            rs = [r for r in w2s_rows if r["name"] == name]
            mean = lambda k: statistics.mean(r[k] for r in rs if r[k] is not None) if any(r[k] is not None for r in rs) else None
            lines.append(f"| {name} | mean | {pct(mean('weak'))} | {pct(mean('ceiling'))} | {pct(mean('w2s_xent'))} | {pct(mean('w2s_aux'))} "
                         f"| {fmt(mean('pgr_xent'))} | {fmt(mean('pgr_aux'))} | |")
        table += ("\n\n| run | seed | weak | strong ceiling | w2s xent | w2s aux | PGR xent | PGR aux | wall s |\n"
                  "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines))
    (out_root / "results.md").write_text(means + "\n\n" + table + "\n")
    print(means + "\n\n" + table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the learning-curve plot (pip install matplotlib)")
        return
    smooth = lambda ys, k=5: [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
    panels = [("correct", "training samples correct (moving avg of 5 steps)", True),
              ("entropy", "policy entropy on the trained tokens (nats/token)", False),
              ("kl", "KL to the start model (k3; with --log-kl or beta > 0)", False),
              ("greedy", "held-out greedy accuracy", False)]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    for ax, (key, label, smoothed) in zip(axes, panels):
        for (name, seed), c in curves.items():
            xs = c["eval_step"] if key == "greedy" else c["step"]
            pts = [(x, y) for x, y in zip(xs, c[key]) if y is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, smooth(list(y)) if smoothed else y, color=colors[name], alpha=0.85,
                        linestyle="-" if seed == seeds[0] else "--", marker="o" if key == "greedy" else None,
                        label=f"{name} s{seed}")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_root / "curves.png", dpi=110)
    print(f"wrote {out_root / 'curves.png'}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which runs (algorithm variants)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds (>= 2 for a comparison)")
    p.add_argument("--steps", type=int, default=20, help="training steps per run (budget-matched scripts)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="P: prompts per step")
    p.add_argument("--num-generations", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion length cap")
    p.add_argument("--eval-every", type=int, default=10, help="eval interval in steps")
    p.add_argument("--eval-size", type=int, default=100, help="held-out problems per eval")
    p.add_argument("--out", default=str(ROOT / "runs" / "compare"), help="where the runs and the table go")
    p.add_argument("--report-only", action="store_true", help="only collect existing runs")
    p.add_argument("--skip-done", action="store_true", help="do not rerun a run whose wall_seconds.txt exists")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = p.parse_args()
    out_root = Path(args.out)
    if args.report_only and not out_root.is_dir():
        raise SystemExit(f"error: --report-only: no runs at {out_root} (run without --report-only first)")
    if not args.report_only:
        for seed in args.seeds:
            for name in args.runs:
                run = out_root / f"{name}__{seed}"
                if args.skip_done and (run / "wall_seconds.txt").exists():
                    continue
                cmd = command(name, seed, args, run)
                print(" ".join(cmd), flush=True)
                if args.dry_run:
                    continue
                run.mkdir(parents=True, exist_ok=True)
                t0 = time.time()
                with open(run / "console.log", "w") as log:
                    rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
                if rc != 0:
                    print(f"warning: {name} seed {seed} failed (exit {rc}); see {run / 'console.log'}", file=sys.stderr)
                    continue
                (run / "wall_seconds.txt").write_text(f"{time.time() - t0:.0f}\n")
    if not args.dry_run:
        report(out_root, args.runs, args.seeds)


if __name__ == "__main__":
    main()
