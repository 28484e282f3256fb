"""weak_to_strong.py and verifier.py under torchrun (2 processes, CPU, gloo): the same run as one process, data
parallel and with --fsdp (every trained trunk's blocks sharded; the saved weights within rtol 1e-4, the logged step
metrics equal; verifier.py on fixed samples, tests/dist_harness_w2s.py), rank 0 alone prints and logs, a real 2-step
verifier run, a batch the processes cannot split and --fsdp in one process are one clear line; and --lora-dropout is
on after setup (model.eval() comes before common.add_lora)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import verifier
import weak_to_strong as w2s
from conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
W2S = ["--weak-layers", "1", "--dataset", "arith:add:1", "--n-train", "64", "--batch-size", "8", "--steps", "2",
       "--eval-size", "16", "--eval-batch-size", "8", "--max-length", "80", "--lr", "1e-2", "--weak-lr", "1e-2",
       "--dtype", "float32", "--seed", "0"]
VERIFIER = ["--n-train", "4", "--num-generations", "4", "--batch-size", "8", "--steps", "2", "--eval-every", "1",
            "--eval-size", "4", "--eval-n", "4", "--eval-subsets", "8", "--eval-batch-size", "2", "--lr", "1e-2",
            "--dtype", "float32", "--seed", "0"]
VERIFIER_FIXED = [*VERIFIER, "--max-new-tokens", "64", "--lr", "1e-3"]  # (Adam's first step: about lr x sign(g), so
# a g ~ eps moves by up to lr x its rounding: a small lr keeps that under atol)
MODES = {"ddp": [], "fsdp": ["--fsdp"]}  # data parallel; --fsdp: also the trained trunks' blocks sharded (FSDP2)


def run(launcher, script, out, *args, ok=True):
    result = subprocess.run(launcher + [str(ROOT / script), *args, "--output-dir", str(out)], capture_output=True,
                            text=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if ok else None
    return result, records


def assert_same(one, two, keys):
    """Records (in order) with the same phase, step and the given keys' values (rel 1e-4)."""
    assert [(r["phase"], r["step"]) for r in two] == [(r["phase"], r["step"]) for r in one]
    for r1, r2 in zip(one, two):
        for key in (k for k in keys if r1.get(k) is not None):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (r1["phase"], r1["step"], key)


@pytest.fixture(scope="module")
def w2s_one(tiny_model_dir, tmp_path_factory):
    """The one-process weak_to_strong.py run that both 2-process cases reproduce: (its directory, its records)."""
    out = tmp_path_factory.mktemp("w2s") / "one"
    return out, run([sys.executable], "weak_to_strong.py", out, "--weak-model", tiny_model_dir, "--strong-model",
                    tiny_model_dir, *W2S)[1]


@pytest.fixture(scope="module")
def verifier_one(tiny_model_dir, tmp_path_factory):
    """The one-process verifier.py run on fixed samples that both 2-process cases reproduce: (directory, records)."""
    out = tmp_path_factory.mktemp("verifier") / "one"
    return out, run([sys.executable], "tests/dist_harness_w2s.py", out, "--model", tiny_model_dir, *VERIFIER_FIXED)[1]


def assert_same_weights(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_weak_to_strong_two_processes_make_the_one_process_runs(mode, w2s_one, tiny_model_dir, tmp_path):
    (one_dir, one), model = w2s_one, ["--weak-model", tiny_model_dir, "--strong-model", tiny_model_dir]
    result, two = run(TORCHRUN, "weak_to_strong.py", tmp_path / "two", *model, *W2S, *MODES[mode])
    sharded = lambda blocks: result.stdout.count(f"fsdp: {blocks} blocks sharded over 2 processes")
    assert (sharded(1), sharded(2)) == ((1, 3) if mode == "fsdp" else (0, 0))  # the weak trunk; the 3 strong ones
    for name in ("w2s_xent", "w2s_aux"):  # (the aux threshold is a quantile over the whole batch of both ranks)
        assert_same_weights(one_dir / "model" / f"{name}.safetensors",
                            tmp_path / "two" / "model" / f"{name}.safetensors")
    assert_same(one[:-1], two[:-1], ["loss", "grad_norm", "alpha", "train/acc_gt", "train/agree_target",
                                     "train/p1_mean", "eval/accuracy", "eval/agreement_weak", "weak_label/accuracy",
                                     "weak_label/p1_mean", "weak_label/confidence"])
    assert two[-1]["phase"] == "summary" and all(two[-1][k] == one[-1][k] for k in ("weak", "ceiling", "w2s_aux"))
    for phase in ("weak", "ceiling", "w2s_xent", "w2s_aux"):  # one record per step (rank 0 alone writes)
        assert [r["step"] for r in two if r["phase"] == phase and "loss" in r] == [1, 2]
    assert result.stdout.count("metrics: ") == 1 and result.stdout.count("weak labels on half B") == 1
    samples = (tmp_path / "two" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 4  # one eval per run, written once


@pytest.mark.parametrize("mode", MODES)
def test_verifier_two_processes_make_the_one_process_run_on_fixed_samples(mode, verifier_one, tiny_model_dir, tmp_path):
    (one_dir, one), fixed = verifier_one, ["--model", tiny_model_dir, *VERIFIER_FIXED, *MODES[mode]]
    result, two = run(TORCHRUN, "tests/dist_harness_w2s.py", tmp_path / "two", *fixed)
    assert result.stdout.count("fsdp: 2 blocks sharded over 2 processes") == (2 if mode == "fsdp" else 0)  # ORM, PRM
    data = [r for r in one if r["phase"] == "data"]
    assert data[0]["correct"] == 0.25 and 0 < data[0]["data/step_correct"] < 1  # the fixed samples: all kinds
    for kind in ("orm", "prm"):
        assert_same_weights(one_dir / "model" / f"{kind}.safetensors",
                            tmp_path / "two" / "model" / f"{kind}.safetensors")
    assert_same(one, two, ["correct", "data/no_answer", "data/step_correct", "loss", "grad_norm", "lr", "train/labels",
                           "train/accuracy", "train/positive", "eval/orm_auc", "eval/orm_accuracy", "eval/prm_auc",
                           "eval/prm_accuracy", "eval/prm_step_auc", "eval/prm_step_accuracy", "n",
                           *(f"eval/{m}" for m in verifier.METHODS)])
    assert [r["train/labels"] for r in two if r["phase"] == "orm" and "loss" in r] == [8, 8]  # both ranks' rows
    table = lambda d: json.loads((d / "best_of_n.json").read_text())
    assert table(tmp_path / "two") == table(one_dir)
    assert result.stdout.count("metrics and table in") == 1


def test_verifier_real_two_step_run_under_torchrun(tiny_model_dir, tmp_path):
    result, records = run(TORCHRUN, "verifier.py", tmp_path / "run", "--model", tiny_model_dir, *VERIFIER,
                          "--max-new-tokens", "12")
    assert result.stdout.count("metrics and table in") == 1  # rank 0 alone prints
    for kind in ("orm", "prm"):  # one record per step
        assert [r["step"] for r in records if r["phase"] == kind and "loss" in r] == [1, 2]
    assert [r["split"] for r in records if r["phase"] == "data"] == ["train", "eval"]
    assert [r["n"] for r in records if r["phase"] == "eval"] == [1, 2, 4]
    assert {p.name for p in (tmp_path / "run" / "model").iterdir()} == {"orm.safetensors", "prm.safetensors"}


def test_a_batch_the_processes_cannot_split_is_one_clear_line(tiny_model_dir, tmp_path):
    result, _ = run(TORCHRUN, "weak_to_strong.py", tmp_path / "run", "--model", tiny_model_dir, "--batch-size", "3",
                    ok=False)
    assert "--batch-size 3 must be divisible by the 2 processes" in result.stderr
    assert "weak_to_strong.py\", line" not in result.stderr and "common.py\", line" not in result.stderr


@pytest.mark.parametrize("script", [w2s, verifier])
def test_fsdp_in_one_process_is_one_clear_line(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--fsdp"])
    assert exit_info.value.code == 2 and "--fsdp shards over several processes" in capsys.readouterr().err


class Stop(Exception):
    pass


def test_lora_dropout_is_on_in_training(tiny_model_dir, tmp_path, monkeypatch):
    """model.eval() comes before common.add_lora: at the first training forward (grad enabled) of each script the
    LoRA dropout modules are in training mode (a model.eval() after add_lora switched them off); then stopped."""
    seen = []

    def spy(cls):
        real = cls.forward

        def forward(self, *args):
            if torch.is_grad_enabled():
                drops = [m for name, m in self.named_modules() if name.endswith("lora_dropout.default")]
                assert drops and all(m.training and m.p == 0.5 for m in drops), cls.__name__
                seen.append(cls.__name__)
                raise Stop
            return real(self, *args)
        monkeypatch.setattr(cls, "forward", forward)
    spy(w2s.TransformerWithHead), spy(verifier.ScalarHeadVerifier)
    lora = ["--lora-rank", "2", "--lora-dropout", "0.5", "--no-save"]
    with pytest.raises(Stop):
        w2s.main(["--weak-model", tiny_model_dir, "--strong-model", tiny_model_dir, *W2S, *lora,
                  "--output-dir", str(tmp_path / "w2s")])
    with pytest.raises(Stop):
        verifier.main(["--model", tiny_model_dir, *VERIFIER, "--max-new-tokens", "4", *lora,
                       "--output-dir", str(tmp_path / "verifier")])
    assert seen == ["TransformerWithHead", "ScalarHeadVerifier"]
