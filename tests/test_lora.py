"""LoRA (--lora-rank, peft): only the adapter trains, the adapter off is the base model, the start model for the KL
needs no copy, save -> load round trips (adapter and --merge-lora), and LoRA with gradient checkpointing."""
import argparse
import json

import pytest
import torch

import common
import grpo
import raft
import reinforce_rej

DIGIT_REWARD = '''
def digit_fraction(prompts, completions, records):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]
'''


def lora_args(**kw):
    p = argparse.ArgumentParser()
    common.add_scale_args(p)
    return p.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def tiny_lora(tiny_model_dir, **kw):
    base = common.load_model(tiny_model_dir, torch.device("cpu"))
    return common.add_lora(base, lora_args(lora_rank=4, **kw))


def test_only_adapter_weights_are_trainable_and_the_share_is_printed(tiny_model_dir, capsys):
    model = tiny_lora(tiny_model_dir)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # every linear projection of the blocks is adapted (q, k, v, o, gate, up, down), the head and embeddings not
    adapted = {n.split(".lora_")[0].split(".")[-1] for n in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "trainable: " in capsys.readouterr().out


def test_adapter_off_is_the_base_model(tiny_model_dir):
    base = common.load_model(tiny_model_dir, torch.device("cpu"))
    model = tiny_lora(tiny_model_dir)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # peft starts B at 0 (adapter = identity): make it matter
            p.data.normal_(0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        reference = base(input_ids=ids).logits
        with common.adapter_off(model):
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
    torch.testing.assert_close(off, reference)
    assert (on - reference).abs().max() > 1e-3
    assert common.reference_model(model) is model  # the KL's start model is no second copy
    assert common.reference_model(base) is not base


def run(script, tiny_model_dir, out, *extra):
    script.main(["--model", tiny_model_dir, "--steps", "2", "--prompts-per-step", "2", "--num-generations", "4",
                 "--max-new-tokens", "6", "--eval-every", "0", "--eval-size", "2", "--output-dir", str(out),
                 "--seed", "0", "--lr", "1e-2", *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script", [grpo, raft, reinforce_rej])
def test_training_changes_only_the_adapter_and_saves_it(script, tiny_model_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained, save = [], common.save_model  # the model object at the final save: inspected in-process
    monkeypatch.setattr(common, "save_model", lambda model, *a, **k: trained.append(model) or save(model, *a, **k))
    (tmp_path / "reward.py").write_text("def r(p, c, recs):\n    return [float(i % 2) for i in range(len(c))]\n")
    records = run(script, tiny_model_dir, tmp_path / "run", "--lora-rank", "4", "--beta", "0.1",
                  "--reward-fn", f"{tmp_path / 'reward.py'}:r")
    assert any(r.get("kl") for r in records)  # the KL to the adapter-off start model was computed
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed = {name: not torch.equal(p.detach(), start[name.replace("base_layer.", "").replace("base_model.model.", "")
                                                      ].to(p.dtype)) if "lora_" not in name else None
               for name, p in trained[-1].named_parameters()}
    assert not any(v for v in changed.values() if v is not None)  # every base weight as it started
    assert any(p.abs().max() > 0 for n, p in trained[-1].named_parameters() if "lora_B" in n)  # B left 0: trained
    saved = tmp_path / "run" / "model"
    assert (saved / "adapter_config.json").is_file() and not (saved / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), saved)
    for (n1, p1), (n2, p2) in zip(reloaded.named_parameters(), trained[-1].named_parameters()):
        if "lora_" in n1:
            torch.testing.assert_close(p1, p2.float(), msg=n1)  # the saved adapter is the trained one


@pytest.mark.parametrize("script", [grpo, raft, reinforce_rej])
def test_lora_dropout_is_on_in_training_and_everything_else_is_off(script, tiny_model_dir, tmp_path, monkeypatch):
    seen = []  # the model at the final save: which modules train (dropout on)
    monkeypatch.setattr(common, "save_model", lambda model, *a, **k: seen.append(
        {n for n, m in model.named_modules() if m.training}))
    run(script, tiny_model_dir, tmp_path / "run", "--lora-rank", "2", "--lora-dropout", "0.5")
    assert seen[-1] and all("lora_dropout" in n for n in seen[-1])  # LoRA's dropout alone: on (it was a no-op)


def test_merged_save_loads_with_from_pretrained_and_equals_the_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / "reward.py").write_text("def r(p, c, recs):\n    return [float(i % 2) for i in range(len(c))]\n")
    flags = ["--lora-rank", "4", "--reward-fn", f"{tmp_path / 'reward.py'}:r", "--dtype", "float32"]
    run(grpo, tiny_model_dir, tmp_path / "adapter", *flags)
    run(grpo, tiny_model_dir, tmp_path / "merged", *flags, "--merge-lora")
    assert not (tmp_path / "merged" / "model" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model")
    adapter = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "model")  # transformers reads the adapter
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        logits = [m(input_ids=ids).logits for m in (merged, adapter, base)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)
    assert (logits[0] - logits[2]).abs().max() > 1e-4  # and it is not the base model


def test_learning_with_lora_raises_reward(tiny_model_dir, tmp_path):
    # The tiny model's tied embeddings start at std 0.02: its logits are ~0 whatever the hidden state, so only
    # training the embeddings moves them (full fine-tuning does). Scaled up, the adapted blocks can steer the output.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.get_input_embeddings().weight.data *= 10
    steerable = common.save_pretrained_atomic(model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "m")
    (tmp_path / "reward.py").write_text(DIGIT_REWARD)
    out = tmp_path / "run"
    grpo.main(["--model", str(steerable), "--reward-fn", f"{tmp_path / 'reward.py'}:digit_fraction", "--steps", "30",
               "--prompts-per-step", "4", "--num-generations", "8", "--max-new-tokens", "8", "--lr", "1e-2",
               "--lora-rank", "8", "--eval-every", "0", "--eval-size", "4", "--output-dir", str(out), "--no-save"])
    rewards = [r["reward"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, (first, last)


def test_lora_with_gradient_checkpointing_has_the_same_gradient(tiny_model_dir):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = common.load_model(tiny_model_dir, torch.device("cpu"), gradient_checkpointing=checkpointing)
        model = common.add_lora(base, lora_args(lora_rank=4))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        prompt_ids, prompt_mask = torch.tensor([[1, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
        completion_ids = torch.tensor([[10, 11, 12, 1], [13, 14, 1, 1], [15, 16, 17, 18]])
        logprobs, _ = grpo.completion_logprobs(model, prompt_ids, prompt_mask, completion_ids,
                                               torch.tensor([0, 0, 1]), 1.0)
        logprobs.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


@pytest.mark.parametrize("flags, message", [(["--lora-rank", "-1"], "--lora-rank must be >= 0"),
                                            (["--lora-rank", "4", "--lora-target-modules", "nope"], "no such module")])
def test_bad_lora_flags_give_a_clear_error(tiny_model_dir, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        run(grpo, tiny_model_dir, tmp_path / "bad", *flags)


def test_lora_stores_the_frozen_base_in_the_compute_dtype_and_the_adapter_in_fp32(tiny_model_dir):
    weight_dtype, autocast_dtype = common.resolve_dtype("bfloat16", torch.device("cpu"), lora=True)
    assert (weight_dtype, autocast_dtype) == (torch.bfloat16, torch.bfloat16)
    assert common.resolve_dtype("bfloat16", torch.device("cpu"))[0] == torch.float32  # full fine-tuning: fp32 masters
    assert common.resolve_dtype("float32", torch.device("cpu"), lora=True)[0] == torch.float32
    base = common.load_model(tiny_model_dir, torch.device("cpu"), weight_dtype)
    model = common.add_lora(base, lora_args(lora_rank=4))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)  # the trained part: fp32 masters
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
