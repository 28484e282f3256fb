"""ppo.py and iterative_dpo.py under torchrun (gloo, CPU): on a FIXED generation batch (tests/dist_harness_ppo.py),
2 processes x P/2 prompts make the same update as 1 process x P prompts (the saved weights, and the logged steps:
whole-step metrics, not rank 0's half), data parallel and with --fsdp (FSDP2: the policy's blocks, and ppo.py's
critic's, sharded; iterative_dpo.py's rank 1 has no pair at step 2, so it runs pad passes; ppo.py's step 1 trains
only the critic there, --critic-warmup-steps 1); the real scripts run 2 steps under torchrun with one writer; and
--lora-dropout is switched on after setup, and nothing else (model.eval() before common.add_lora, whose train() on
the new peft root reaches every module: main() puts them back)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

import iterative_dpo
import ppo

HARNESS = str(ROOT / "tests" / "dist_harness_ppo.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
TINY = ["--steps", "2", "--num-generations", "4", "--max-new-tokens", "8", "--eval-size", "4", "--dtype", "float32"]
# one mini-batch per epoch: with several, update k is every rank's k-th slice (one process: the k-th of all P)
FLAGS = {"ppo": ["--num-minibatches", "1", "--num-ppo-epochs", "2", "--beta", "0.1", "--critic-lr", "1e-3"],
         "iterative_dpo": ["--num-minibatches", "1"]}
TIMING = {"gen_time", "train_time", "step_time", "tokens_per_s", "eval/time", "eval/sampled_accuracy"}
# ppo.py's value_clip_frac counts tokens whose clipped squared error exceeds the unclipped one; inside the clip range
# the two differ by rounding alone (V_old + (V - V_old) vs V), so another summation order (--fsdp's sharded
# reductions) may flip a few (2 of 168 at step 2 with --fsdp): compared to within 5% of the tokens
TIE_COUNTS = {"value_clip_frac"}


def run(launcher, script, model_dir, out, *extra):
    result = subprocess.run(launcher + [*script, "--model", model_dir, "--output-dir", str(out), *TINY, *extra],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script, mode", [("ppo", "ddp"), ("iterative_dpo", "ddp"), ("ppo", "fsdp"),
                                          ("iterative_dpo", "fsdp")])
def test_two_processes_make_the_one_process_update(script, mode, tiny_model_dir, tmp_path):
    flags = ["--prompts-per-step", "4", "--eval-every", "0", "--lr", "1e-3", *FLAGS[script]]
    if mode == "fsdp" and script == "ppo":  # the warm-up's actor passes run without gradients: sharded all the same
        flags += ["--critic-warmup-steps", "1"]
    _, one = run([sys.executable], [HARNESS, script], tiny_model_dir, tmp_path / "one", *flags)
    result, two = run(TORCHRUN, [HARNESS, script], tiny_model_dir, tmp_path / "two", *flags,
                      *(["--fsdp"] if mode == "fsdp" else []))
    sharded = {"ddp": 0, "fsdp": 2 if script == "ppo" else 1}[mode]  # ppo.py: the actor's blocks and the critic's
    assert result.stdout.count("fsdp: 2 blocks sharded over 2 processes") == sharded
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("one", "two"))
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], start[k]) for k in a)  # the update is real
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
    assert len(one) == len(two) == 4  # eval, step 1, step 2, eval
    for r1, r2 in zip(one, two):
        assert r1.keys() == r2.keys()
        for key in r1.keys() - TIMING:  # every logged number of the step (the sampled eval: each rank its draws)
            tolerance = 0.05 if key in TIE_COUNTS else 1e-6
            assert r2[key] == (r1[key] if r1[key] is None else pytest.approx(r1[key], rel=1e-4, abs=tolerance)), key
    steps = [r for r in one if "reward" in r]
    if script == "iterative_dpo":  # the harness's ties: 2 of 4 prompts without a pair a step, rank 1's both at step 2
        assert [(r["pairs"], r["frac_no_pair"], r["updates"]) for r in steps] == [(2, 0.5, 1)] * 2
    else:  # the critic trained at step 1 (V = 0 before: explained variance 0)
        assert steps[0]["explained_var"] == 0 and steps[1]["explained_var"] not in (None, 0)
    assert result.stdout.count("held-out greedy accuracy") == 1  # rank 0 alone prints


@pytest.mark.parametrize("script", ["ppo.py", "iterative_dpo.py"])
def test_real_script_under_torchrun(script, tiny_model_dir, tmp_path):
    out = tmp_path / "run"  # LoRA and an eval + save mid-run: every collective of those paths on both ranks
    result, records = run(TORCHRUN, [str(ROOT / script)], tiny_model_dir, out, "--prompts-per-step", "2",
                          "--eval-every", "1", "--lora-rank", "2")
    assert result.stdout.count("held-out greedy accuracy") == 1  # the final line, rank 0's alone
    assert [r["step"] for r in records if "reward" in r] == [1, 2]  # one record a step (one writer)
    assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 1, 2]
    assert (out / "model" / "adapter_model.safetensors").is_file()


class SetUp(Exception):
    """Raised by the first evaluation: main() has built its models."""


@pytest.mark.parametrize("script", [ppo, iterative_dpo])
def test_lora_dropout_is_on_after_setup(script, tiny_model_dir, tmp_path, monkeypatch):
    models = []

    def first_evaluation(model, *args):
        models.append(model)
        raise SetUp
    monkeypatch.setattr(script, "evaluate", first_evaluation)
    if script is ppo:  # the critic's trunk has its own adapter
        real = ppo.build_critic
        monkeypatch.setattr(ppo, "build_critic", lambda *a: models.append(real(*a)) or models[-1])
    with pytest.raises(SetUp):
        script.main(["--model", tiny_model_dir, "--output-dir", str(tmp_path / "run"), "--lora-rank", "2",
                     "--lora-dropout", "0.5", *TINY])
    assert len(models) == (2 if script is ppo else 1)
    for model in models:  # the policy (and the critic): LoRA's dropout on, every other module in eval mode
        dropout = [m for name, m in model.named_modules() if "lora_dropout" in name and isinstance(m, torch.nn.Dropout)]
        assert dropout and all(m.training and m.p == 0.5 for m in dropout)
        assert all("lora_dropout" in name for name, m in model.named_modules() if m.training)
