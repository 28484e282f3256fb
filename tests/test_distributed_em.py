"""em.py and rest_em.py under torchrun (2 CPU processes, gloo). On FIXED samples (tests/dist_harness_em.py), 2
processes (each its share of the prompts / problems) make the same run as 1 process: the saved weights, the logged
step and eval records, em's prompt ranking and rest_em's E-step log agree; also with --fsdp (the blocks sharded; for
rest_em over 2 iterations, so the second M-step restores theta_0 into the sharded model, and with a rank that trains
fewer micro-batches). The real scripts run 2 steps under torchrun with --fsdp (their real sampler: the ranks decode
different numbers of tokens on whole blocks; rank 0 alone prints and logs). --lora-dropout is on after setup
(model.eval() before common.add_lora)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import dist_harness_em
import em
import rest_em
from conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
SCRIPTS = {"em": em, "rest_em": rest_em}
# lr 1e-3: the weights move well past the tolerance; eval on 6 problems, 3 a rank; rest_em's M-step batches of 3
# solutions: 1 and 2 a rank (--fsdp: rank 0 adds a pad pass, so both run as many training passes)
FIXED = {
    "em": ["--steps", "2", "--prompts-per-step", "4", "--num-generations", "4", "--max-new-tokens", "12",
           "--eval-every", "1", "--eval-size", "6", "--select-from", "12", "--select-samples", "4", "--num-prompts",
           "2", "--eval-temperatures", "0,1", "--diag-size", "3"],
    "rest_em": ["--iterations", "2", "--prompts-per-step", "4", "--num-generations", "6", "--max-per-problem", "2",
                "--max-new-tokens", "12", "--steps", "3", "--batch-size", "3", "--micro-batch-size", "1",
                "--eval-size", "6", "--eval-samples", "4", "--pass-k", "2", "--eval-every", "1"]}
SMOKE = {
    "em": ["--steps", "2", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "6",
           "--eval-every", "0", "--eval-size", "4", "--select-from", "3", "--select-samples", "2",
           "--eval-temperatures", "0", "--diag-size", "2"],
    "rest_em": ["--iterations", "2", "--prompts-per-step", "4", "--num-generations", "2", "--max-new-tokens", "6",
                "--steps", "2", "--batch-size", "2", "--micro-batch-size", "1", "--eval-every", "0", "--eval-size",
                "4", "--eval-samples", "2", "--pass-k", "1"]}
FINAL_LINE = {"em": "held-out greedy accuracy", "rest_em": "held-out greedy accuracy by iteration"}


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def torchrun(argv, timeout=300):
    result = subprocess.run(TORCHRUN + argv, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("script, mode", [("em", "ddp"), ("rest_em", "ddp"), ("em", "lora"), ("em", "fsdp"),
                                          ("rest_em", "fsdp")])
def test_two_processes_make_the_one_process_run(script, mode, tiny_model_dir, tmp_path, monkeypatch):
    lora, extra = mode == "lora", ["--fsdp"] if mode == "fsdp" else []  # (one process: never --fsdp)
    argv = ["--model", tiny_model_dir, "--lr", "1e-3", "--dtype", "float32", "--seed", "0", *FIXED[script],
            *(["--lora-rank", "2"] if lora else [])]
    with monkeypatch.context() as m:  # one process, in this one: the same fixed sampler
        m.setattr(SCRIPTS[script], "generate" if script == "em" else "sample_with_ids",
                  dist_harness_em.fixed_generate(common.load_tokenizer(tiny_model_dir)) if script == "em"
                  else dist_harness_em.fixed_sample_with_ids)
        SCRIPTS[script].main([*argv, "--output-dir", str(tmp_path / "one")])
    harness = str(ROOT / "tests" / "dist_harness_em.py")
    result = torchrun([harness, script, *argv, "--output-dir", str(tmp_path / "two"), *extra])
    assert result.stdout.count(FINAL_LINE[script]) == 1  # rank 0 alone prints
    assert ("fsdp: 2 blocks sharded over 2 processes" in result.stdout) == (mode == "fsdp")
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = (load_file(tmp_path / d / "model" / weights) for d in ("one", "two"))
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    assert a.keys() == b.keys()  # the update is real (LoRA: B starts at 0)
    assert any(not torch.equal(a[k], start[k]) if k in start else "lora_B" in k and a[k].abs().max() > 0 for k in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) == 5  # 2 steps, 3 evals
    for r1, r2 in zip(one, two):  # the logged records describe every rank's samples, not rank 0's share
        assert r1.keys() == r2.keys()
        for key in (k for k in r1 if "time" not in k and k != "tokens_per_s" and r1[k] is not None):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (r1["step"], key)
    for name in ("selection.json",) if script == "em" else ("estep_iter1.jsonl", "estep_iter2.jsonl"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    if script == "rest_em":  # the cap drew from the rng, duplicates were dropped, the M-step had data
        estep = [json.loads(line) for line in (tmp_path / "one" / "estep_iter1.jsonl").read_text().splitlines()]
        assert 0 < sum(r["kept"] for r in estep) < sum(r["reward"] for r in estep)
        assert all(r["samples_used"] > 0 for r in one if "kept" in r)


@pytest.mark.parametrize("script", ["em", "rest_em"])
def test_real_script_runs_two_steps_under_torchrun(script, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = torchrun([str(ROOT / f"{script}.py"), "--model", tiny_model_dir, "--output-dir", str(out), "--no-save",
                       "--fsdp", *SMOKE[script]])
    assert result.stdout.count(FINAL_LINE[script]) == 1  # rank 0 alone prints the final line
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == [1, 2]  # one record per step (rank 0 alone writes)


class SetupDone(Exception):
    pass


@pytest.mark.parametrize("script, first_call", [("em", "select_prompts"), ("rest_em", "evaluate")])
def test_lora_dropout_is_on_after_setup(script, first_call, tiny_model_dir, tmp_path, monkeypatch):
    def stop(model, *args, **kwargs):  # the first use of the finished model: look at it, stop the run
        raise SetupDone(model)
    monkeypatch.setattr(SCRIPTS[script], first_call, stop)
    argv = ["--model", tiny_model_dir, "--lora-rank", "2", "--dtype", "float32", "--output-dir", str(tmp_path)]
    for dropout, on in (("0.5", True), ("0", False)):
        with pytest.raises(SetupDone) as e:
            SCRIPTS[script].main([*argv, "--lora-dropout", dropout])
        modules = dict(e.value.args[0].named_modules())
        lora_dropout = [m for n, m in modules.items() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
        assert bool(lora_dropout) == on and all(m.training for m in lora_dropout)  # p = 0: peft uses Identity
        assert not any(m.training for n, m in modules.items() if "lora_dropout" not in n)  # the rest: eval mode
