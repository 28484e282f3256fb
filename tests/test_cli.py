"""Every algorithm script accepts the shared flags with the same meaning, and `--help` works."""
import importlib
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ["grpo", "em", "raft", "reinforce_rej", "rest_em", "weak_to_strong", "iterative_dpo", "ppo"]
SHARED_FLAGS = {  # flag -> (value passed, attribute, parsed value)
    "--model": ("some/model", "model", "some/model"),
    "--dataset": ("arith:mul:1", "dataset", "arith:mul:1"),
    "--eval-dataset": ("test.jsonl", "eval_dataset", "test.jsonl"),
    "--question-key": ("q", "question_key", "q"),
    "--answer-key": ("a", "answer_key", "a"),
    "--fewshot": ("2", "fewshot", 2),
    "--system-prompt": ("Be brief.", "system_prompt", "Be brief."),
    "--seed": ("7", "seed", 7),
    "--device": ("cpu", "device", "cpu"),
    "--dtype": ("float32", "dtype", "float32"),
    "--lr": ("3e-6", "lr", 3e-6),
    "--steps": ("3", "steps", 3),
    "--prompts-per-step": ("5", "prompts_per_step", 5),
    "--num-generations": ("4", "num_generations", 4),
    "--max-new-tokens": ("20", "max_new_tokens", 20),
    "--temperature": ("0.7", "temperature", 0.7),
    "--eval-every": ("2", "eval_every", 2),
    "--eval-size": ("10", "eval_size", 10),
    "--output-dir": ("out", "output_dir", "out"),
}
PRESENT = [s for s in SCRIPTS if (ROOT / f"{s}.py").exists()]


@pytest.mark.parametrize("script", PRESENT)
def test_shared_flags_parse_to_the_same_attributes(script):
    module = importlib.import_module(script)
    argv = [a for flag, (value, _, _) in SHARED_FLAGS.items() for a in (flag, value)] + ["--no-save"]
    args = module.parse_args(argv)
    for flag, (_, attr, expected) in SHARED_FLAGS.items():
        assert getattr(args, attr) == expected, f"{script} {flag}"
    assert args.no_save is True


@pytest.mark.parametrize("script", PRESENT)
def test_help_works_and_documents_every_shared_flag(script):
    out = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in SHARED_FLAGS:
        assert flag in out.stdout, f"{script} --help lacks {flag}"


def test_all_scripts_exist():
    assert PRESENT == SCRIPTS, f"missing: {sorted(set(SCRIPTS) - set(PRESENT))}"
