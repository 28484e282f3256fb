"""LoRA (--lora-rank) in em, rest_em, ppo, iterative_dpo, weak_to_strong and verifier: a short run on the tiny model
prints the trainable share, trains only the adapters (and the heads that train fully: the critic's, the
classifiers'), reads the KL / DPO reference with the adapter off, and saves something that loads back to the same
model (the adapter, or with --merge-lora a full model). CPU, seconds each."""
import json

import pytest
import torch

import common
import em
import iterative_dpo
import ppo
import rest_em
import verifier
import weak_to_strong as w2s

REWARDS = ("def alternate(prompts, completions, records):\n    return [float(i % 2) for i in range(len(completions))]\n"
           "def always(prompts, completions, records):\n    return [1.0] * len(completions)\n")
SAMPLING = ["--prompts-per-step", "2", "--num-generations", "4", "--max-new-tokens", "6", "--eval-size", "2",
            "--seed", "0", "--dtype", "float32", "--lora-rank", "4"]
IDS, MASK = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]), torch.ones(2, 6, dtype=torch.long)


@pytest.fixture
def lora_models(monkeypatch):
    """Every model common.add_lora wraps in the run, with its state just after wrapping: [(model, start state)]."""
    made, real = [], common.add_lora

    def add_lora(model, args, decoder=None):
        out = real(model, args, decoder=decoder)
        made.append((out, {k: v.detach().clone() for k, v in out.state_dict().items()}))
        return out
    monkeypatch.setattr(common, "add_lora", add_lora)
    return made


def adapter_active(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    return not any(m.disable_adapters for m in layers)


def assert_only_lora_changed(model, start):
    now = model.state_dict()
    assert common.is_lora(model) and now.keys() == start.keys()
    changed = sorted(k for k in start if not torch.equal(now[k], start[k]))
    assert any("lora_B" in k for k in changed), "the adapter did not train"
    assert all("lora_" in k for k in changed), [k for k in changed if "lora_" not in k][:5]  # the base is frozen


def reward_file(tmp_path, name):
    (tmp_path / "rewards.py").write_text(REWARDS)
    return ["--reward-fn", f"{tmp_path / 'rewards.py'}:{name}"]


def assert_adapter_loads_and_matches(tiny_model_dir, saved, model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (saved / "adapter_config.json").is_file() and not (saved / "model.safetensors").exists()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), saved)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=IDS).logits
    assert (loaded(input_ids=IDS).logits - base).abs().max() > 1e-5  # the trained adapter, not the base


# ---- the policy scripts ----------------------------------------------------------------------------------------
def test_em(tiny_model_dir, tmp_path, lora_models, capsys):
    out = tmp_path / "run"
    em.main(["--model", tiny_model_dir, "--prompt-index", "0", "--steps", "2", "--eval-every", "0",
             "--eval-temperatures", "0", "--lr", "1e-2", "--output-dir", str(out), *SAMPLING])
    assert "trainable: " in capsys.readouterr().out
    [(model, start)] = lora_models
    assert_only_lora_changed(model, start)
    assert_adapter_loads_and_matches(tiny_model_dir, out / "model", model)


def test_rest_em_restarts_every_m_step_from_the_start_adapter(tiny_model_dir, tmp_path, lora_models, monkeypatch,
                                                              capsys):
    first_forward, real_m_step, real_logprobs = [], rest_em.m_step, rest_em.completion_logprobs

    def m_step(*a, **kw):
        first_forward.append(None)  # a new M-step: its first training forward fills this in
        return real_m_step(*a, **kw)

    def completion_logprobs(model, *a, **kw):
        if first_forward[-1] is None:  # the adapter when the M-step starts training
            first_forward[-1] = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
        return real_logprobs(model, *a, **kw)
    monkeypatch.setattr(rest_em, "m_step", m_step)
    monkeypatch.setattr(rest_em, "completion_logprobs", completion_logprobs)
    out = tmp_path / "run"
    rest_em.main(["--model", tiny_model_dir, "--iterations", "2", "--steps", "2", "--eval-samples", "2", "--pass-k",
                  "2", "--lr", "1e-2", "--batch-size", "4", "--output-dir", str(out), *reward_file(tmp_path, "always"),
                  *SAMPLING])
    assert "trainable: " in capsys.readouterr().out
    [(model, start)] = lora_models
    assert len(first_forward) == 2 and all(s is not None for s in first_forward)
    for adapter in first_forward:  # theta <- theta_base: iteration 2 restarts from the start adapter, not iterate 1
        assert all(torch.equal(v, start[k]) for k, v in adapter.items())
    assert_only_lora_changed(model, start)
    assert_adapter_loads_and_matches(tiny_model_dir, out / "model", model)


def test_rest_em_resume_with_lora_continues_exactly(tiny_model_dir, tmp_path):
    flags = ["--model", tiny_model_dir, "--steps", "2", "--eval-samples", "2", "--pass-k", "2", "--lr", "1e-2",
             "--batch-size", "4", *reward_file(tmp_path, "always"), *SAMPLING]
    rest_em.main([*flags, "--iterations", "2", "--output-dir", str(tmp_path / "straight")])
    rest_em.main([*flags, "--iterations", "1", "--output-dir", str(tmp_path / "cut")])
    rest_em.main(["--resume", str(tmp_path / "cut"), "--iterations", "2"])
    strip = lambda run: [{k: v for k, v in json.loads(line).items() if "time" not in k and k != "tokens_per_s"}
                         for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "straight") == strip(tmp_path / "cut")
    assert (tmp_path / "cut" / "model" / "adapter_config.json").is_file()


def test_rest_em_merge_lora_writes_a_full_model_at_the_last_iteration(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    rest_em.main(["--model", tiny_model_dir, "--iterations", "1", "--steps", "2", "--eval-samples", "2", "--pass-k",
                  "2", "--lr", "1e-2", "--batch-size", "4", "--merge-lora", "--output-dir", str(out),
                  *reward_file(tmp_path, "always"), *SAMPLING])
    assert not (out / "model" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        assert (merged(input_ids=IDS).logits - base(input_ids=IDS).logits).abs().max() > 1e-5
    with pytest.raises(SystemExit, match="merge-lora"):  # the adapter (and theta_0's) is gone: a clear error
        rest_em.main(["--resume", str(out), "--iterations", "2"])


def test_ppo_policy_and_critic(tiny_model_dir, tmp_path, lora_models, monkeypatch, capsys):
    calls, real = [], ppo.frozen_logprobs
    monkeypatch.setattr(ppo, "frozen_logprobs",
                        lambda model, *a: calls.append(adapter_active(model)) or real(model, *a))
    critics, real_critic = [], ppo.build_critic
    monkeypatch.setattr(ppo, "build_critic", lambda *a: critics.append(real_critic(*a)) or critics[-1])
    out = tmp_path / "run"
    records = [r for r in ppo_run(tiny_model_dir, out, tmp_path) if "kl" in r]
    assert capsys.readouterr().out.count("trainable: ") == 2  # the policy's adapter and the critic's
    assert calls == [True, False] * 2  # per step: pi_old with the adapter, pi_ref = the same model, adapter off
    assert records[-1]["kl"] > 0  # the KL to the adapter-off start model moves once the adapter has trained
    (policy, policy_start), (trunk, trunk_start) = lora_models
    assert_only_lora_changed(policy, policy_start)
    assert critics[0]["trunk"] is trunk  # the critic: its own adapter on its trunk, the head trained fully
    assert_only_lora_changed(trunk, trunk_start)
    assert critics[0]["head"].weight.requires_grad and critics[0]["head"].weight.abs().max() > 0  # from zero
    assert_adapter_loads_and_matches(tiny_model_dir, out / "model", policy)


def ppo_run(tiny_model_dir, out, tmp_path, *extra):
    ppo.main(["--model", tiny_model_dir, "--steps", "2", "--eval-every", "0", "--lr", "1e-2", "--critic-lr", "1e-2",
              "--output-dir", str(out), *reward_file(tmp_path, "alternate"), *SAMPLING, *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("reference", ["iteration", "initial"])
def test_iterative_dpo_reference(reference, tiny_model_dir, tmp_path, lora_models, monkeypatch, capsys):
    calls, real = [], iterative_dpo.frozen_logprobs
    monkeypatch.setattr(iterative_dpo, "frozen_logprobs",
                        lambda model, *a: calls.append(adapter_active(model)) or real(model, *a))
    out = tmp_path / "run"
    iterative_dpo.main(["--model", tiny_model_dir, "--steps", "2", "--eval-every", "0", "--lr", "1e-2",
                        "--reference", reference, "--output-dir", str(out), *reward_file(tmp_path, "alternate"),
                        *SAMPLING])
    assert "trainable: " in capsys.readouterr().out
    # per step: pi_ref (initial: the start model = the adapter off; iteration: the policy as it is), then the
    # implicit rewards under the updated policy (adapter on)
    assert calls == [reference == "iteration", True] * 2
    [(model, start)] = lora_models
    assert_only_lora_changed(model, start)
    assert_adapter_loads_and_matches(tiny_model_dir, out / "model", model)


# ---- the scripts with a head: LoRA on the trunk, the head trained fully -----------------------------------------
W2S = ["--weak-layers", "1", "--dataset", "arith:add:1", "--n-train", "32", "--batch-size", "8", "--steps", "2",
       "--eval-size", "8", "--max-length", "80", "--lr", "1e-2", "--weak-lr", "1e-2", "--seed", "0", "--lora-rank", "4"]


def test_weak_to_strong(tiny_model_dir, tmp_path, lora_models, monkeypatch, capsys):
    runs, real = {}, w2s.train_run
    monkeypatch.setattr(w2s, "train_run",
                        lambda phase, model, *a: runs.setdefault(phase, model) and real(phase, model, *a))
    out = tmp_path / "run"
    w2s.main(["--weak-model", tiny_model_dir, "--strong-model", tiny_model_dir, *W2S, "--output-dir", str(out)])
    assert capsys.readouterr().out.count("trainable: ") == 4  # weak, ceiling, w2s_xent, w2s_aux
    assert [m.trunk for m in runs.values()] == [m for m, _ in lora_models]
    for (trunk, start), model in zip(lora_models, runs.values()):
        assert_only_lora_changed(trunk, start)
        assert model.head.weight.abs().max() > 0  # the head trained (from zero)
    strong_start = lora_models[1][1]  # the three strong runs start from the same adapter
    assert all(all(torch.equal(s[k], strong_start[k]) for k in s) for _, s in lora_models[2:])
    for phase in ("w2s_xent", "w2s_aux"):
        saved = out / "model" / f"{phase}.safetensors"
        assert (out / "model" / f"{phase}_adapter" / "adapter_config.json").is_file()
        from safetensors.torch import load_file
        assert set(load_file(str(saved))) == {"head.weight"}  # the head alone beside the adapter
        loaded = w2s.load_classifier(tiny_model_dir, saved)
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS, MASK), runs[phase](IDS, MASK))


def test_weak_to_strong_merge_lora_saves_a_full_classifier(tiny_model_dir, tmp_path, lora_models, monkeypatch):
    runs, real = {}, w2s.train_run
    monkeypatch.setattr(w2s, "train_run",
                        lambda phase, model, *a: runs.setdefault(phase, model) and real(phase, model, *a))
    out = tmp_path / "run"
    w2s.main(["--weak-model", tiny_model_dir, "--strong-model", tiny_model_dir, *W2S, "--merge-lora", "--output-dir",
              str(out)])
    assert not (out / "model" / "w2s_aux_adapter").exists()
    loaded = w2s.load_classifier(tiny_model_dir, out / "model" / "w2s_aux.safetensors")  # the full-model format
    assert not common.is_lora(loaded.trunk)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS, MASK), runs["w2s_aux"](IDS, MASK), rtol=1e-4, atol=1e-5)


VERIFIER = ["--n-train", "3", "--num-generations", "2", "--eval-size", "3", "--eval-n", "2", "--eval-subsets", "2",
            "--max-new-tokens", "12", "--steps", "2", "--batch-size", "4", "--lr", "1e-2", "--seed", "0",
            "--lora-rank", "4"]


def load_verifier(tiny_model_dir, out, kind):
    from peft import PeftModel
    from safetensors.torch import load_file

    model = verifier.ScalarHeadVerifier(common.load_model(tiny_model_dir, torch.device("cpu")))
    state = load_file(str(out / "model" / f"{kind}.safetensors"))
    if (out / "model" / f"{kind}_adapter").is_dir():
        assert set(state) == {"head.weight", "head.bias"}
        model.trunk = PeftModel.from_pretrained(model.trunk, out / "model" / f"{kind}_adapter")
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()})
    else:
        model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("merge", [False, True])
def test_verifier(merge, tiny_model_dir, tmp_path, lora_models, monkeypatch, capsys):
    runs, real = {}, verifier.train_verifier
    monkeypatch.setattr(verifier, "train_verifier", lambda kind, model, *a: runs.setdefault(kind, model) and
                        real(kind, model, *a))
    out = tmp_path / "run"
    verifier.main(["--model", tiny_model_dir, *VERIFIER, "--output-dir", str(out), *(["--merge-lora"] * merge)])
    assert capsys.readouterr().out.count("trainable: ") == 2  # the ORM's trunk and the PRM's; not the generator
    assert sorted(p.name for p in (out / "model").iterdir()) == (
        ["orm.safetensors", "prm.safetensors"] if merge else
        ["orm.safetensors", "orm_adapter", "prm.safetensors", "prm_adapter"])
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([5, 2, 5])
    for (trunk, start), kind in zip(lora_models, ("orm", "prm")):
        if not merge:  # (merging changed the trunk in place at the save)
            assert runs[kind].trunk is trunk
            assert_only_lora_changed(trunk, start)
        assert runs[kind].head.weight.abs().max() > 0  # the head trained (from zero)
        loaded = load_verifier(tiny_model_dir, out, kind)
        assert common.is_lora(loaded.trunk) != merge
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS, MASK, rows, cols), runs[kind](IDS, MASK, rows, cols),
                                       rtol=1e-4, atol=1e-5)
    assert all(torch.equal(lora_models[0][1][k], v) for k, v in lora_models[1][1].items())  # the same start
