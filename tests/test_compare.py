"""bench/compare.py: the budget flags reach the scripts that take them, and the report turns metrics.jsonl files
into the means table, the per-seed table and the weak-to-strong table (synthetic runs; nothing is trained)."""
import importlib.util
import json
from types import SimpleNamespace

from conftest import ROOT

spec = importlib.util.spec_from_file_location("compare", ROOT / "bench" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

BUDGET = SimpleNamespace(steps=20, eval_every=10, eval_size=100, prompts_per_step=4, num_generations=8, max_new_tokens=48)


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_every_run_gets_the_same_sampling_budget_where_the_script_takes_it(tmp_path):
    for name in ("grpo", "raftpp", "raft", "reinforce_rej", "reinforce", "grpo_adv"):
        cmd = compare.command(name, 3, BUDGET, tmp_path)
        assert (flag(cmd, "--seed"), flag(cmd, "--steps"), flag(cmd, "--prompts-per-step"), flag(cmd, "--num-generations"),
                flag(cmd, "--max-new-tokens")) == ("3", "20", "4", "8", "48"), name
    assert "--no-clip" in compare.command("raft", 0, BUDGET, tmp_path)
    assert flag(compare.command("reinforce", 0, BUDGET, tmp_path), "--reject") == "none"
    em = compare.command("em", 0, BUDGET, tmp_path)
    assert flag(em, "--steps") is None and flag(em, "--prompts-per-step") == "4"  # EM keeps its own 10 steps
    assert flag(compare.command("rest_em", 0, BUDGET, tmp_path), "--steps") is None
    assert flag(compare.command("weak_to_strong", 1, BUDGET, tmp_path), "--seed") == "1"
    assert flag(compare.command("weak_to_strong_l5", 1, BUDGET, tmp_path), "--weak-layers") == "5"


def write_run(root, name, seed, records, wall):
    run = root / f"{name}__{seed}"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "wall_seconds.txt").write_text(f"{wall}\n")


def test_report_means_per_seed_rows_and_weak_to_strong_table(tmp_path, capsys):
    for seed, (before, after) in enumerate([(0.30, 0.60), (0.40, 0.80)]):
        steps = [{"step": s, "reward": 0.1 * s, "correct": 0.1 * s, "step_time": 1.0, "entropy": 0.5, "kl": 0.01 * s}
                 for s in range(1, 7)]
        write_run(tmp_path, "grpo", seed, [{"step": 0, "eval/accuracy": before, "eval/sampled_accuracy": 0.1}] + steps
                  + [{"step": 6, "eval/accuracy": after, "eval/sampled_accuracy": 0.5}], 100 + seed)
        write_run(tmp_path, "weak_to_strong", seed, [{"phase": "summary", "step": 0, "weak": 0.6, "ceiling": 0.8 + 0.1 * seed,
                  "w2s_xent": 0.7, "w2s_aux": 0.75, "pgr_xent": 0.5 if seed == 0 else 1 / 3,
                  "pgr_aux": 0.75 if seed == 0 else 0.5}], 50)
    write_run(tmp_path, "weak_to_strong_l5", 0, [{"phase": "summary", "step": 0, "weak": 0.5, "ceiling": 0.9,
              "w2s_xent": 0.6, "w2s_aux": 0.9, "pgr_xent": 0.25, "pgr_aux": 1.0}], 40)  # a variant: its own mean row
    compare.report(tmp_path, ["grpo", "weak_to_strong", "weak_to_strong_l5"], [0, 1])
    text = (tmp_path / "results.md").read_text()
    assert "| grpo | 2 | 35.0% → 70.0% | 10.0% → 50.0% |" in text  # means over the two seeds
    # per seed: last-5-step mean of `correct` (0.2..0.6 -> 0.4), last KL 0.06, wall seconds
    assert "| grpo | 1 | 40.0% | 80.0% | 10.0% | 50.0% | 40.0% | 0.0600 | 101 |" in text
    assert "| weak_to_strong | 0 | 60.0% | 80.0% | 70.0% | 75.0% | 0.50 | 0.75 | 50 |" in text
    assert "| weak_to_strong | mean | 60.0% | 85.0% | 70.0% | 75.0% | 0.42 | 0.62 | |" in text
    assert "| weak_to_strong_l5 | mean | 50.0% | 90.0% | 60.0% | 90.0% | 0.25 | 1.00 | |" in text


def test_report_only_without_runs_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["compare.py", "--report-only", "--out", str(tmp_path / "nothing_here")])
    try:
        compare.main()
    except SystemExit as e:
        assert "no runs at" in str(e)
    else:
        raise AssertionError("expected a clear error")
