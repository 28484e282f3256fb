"""grpo.py: advantages, losses, clipping and KL against hand-computed values; the training forward against a
plain forward (padding, prefix sharing, micro-batches); EOS masking; a learning test; an end-to-end run."""
import json
import math

import pytest
import torch

import common
import grpo


# ---- advantages ------------------------------------------------------------------------------------------
def test_group_advantages_hand_values():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    adv = grpo.group_advantages(r, 4)
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 2: zero variance -> 0
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / torch.tensor([0.5 + 1e-4] * 4 + [1e-4] * 4)
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(grpo.group_advantages(r, 4, scale_std=False), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))


# ---- losses ----------------------------------------------------------------------------------------------
MASK = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
ADV = torch.tensor([1.0, -0.5])


@pytest.mark.parametrize("loss_type, kwargs, expected", [
    ("grpo", {}, (-1.0 + 0.5) / 2),          # per-sequence token means -1 and 0.5, then their mean
    ("dapo", {}, (-1 - 1 + 0.5) / 3),        # token-sum over the 3 valid tokens
    ("dr_grpo", {"max_len": 4}, (-1 - 1 + 0.5) / (2 * 4)),  # token-sum / (B * L)
    ("dapo", {"num_tokens": 6.0}, (-1 - 1 + 0.5) / 6),      # a generation-batch normalizer overrides the local one
])
def test_loss_aggregation_hand_values(loss_type, kwargs, expected):
    lp = torch.zeros(2, 3, requires_grad=True)  # ratio 1: the per-token loss is -A
    loss, stats = grpo.grpo_loss(lp, lp.detach(), ADV, MASK, loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected)
    assert stats["clip_frac_sum"] == 0


def test_dapo_gradient_is_minus_advantage_over_token_count():
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = grpo.grpo_loss(lp, lp.detach(), ADV, MASK, "dapo")
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-1 / 3, -1 / 3, 0], [0.5 / 3, 0, 0]]))


def test_clipping_hand_values():
    # tokens: (ratio 1.5, A=+1) clipped at 1.2 | (ratio 0.5, A=-1) clipped at 0.8 | (ratio 0.5, A=+1) not clipped
    old = torch.zeros(3, 1)
    lp = torch.log(torch.tensor([[1.5], [0.5], [0.5]])).requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0, 1.0]), torch.ones(3, 1)
    loss, stats = grpo.grpo_loss(lp, old, adv, mask, "dapo", eps_low=0.2, eps_high=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5) / 3, abs=1e-6)
    assert stats["clip_frac_sum"] == 2
    loss.backward()
    assert lp.grad[0].item() == 0 and lp.grad[1].item() == 0  # clipped tokens carry no gradient
    assert lp.grad[2].item() == pytest.approx(-0.5 / 3)       # d(-ratio*A)/dlogp = -ratio*A = -0.5, over 3 tokens


def test_clip_higher():
    lp, old, adv, mask = torch.log(torch.tensor([[1.25]])), torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1)
    assert grpo.grpo_loss(lp, old, adv, mask, "dapo", 0.2, 0.2)[0].item() == pytest.approx(-1.2)
    assert grpo.grpo_loss(lp, old, adv, mask, "dapo", 0.2, 0.28)[0].item() == pytest.approx(-1.25)


def test_k3_kl_hand_values():
    lp = torch.zeros(1, 1, requires_grad=True)
    ref = torch.log(torch.tensor([[2.0]]))  # pi_ref / pi = 2: kl = 2 - log 2 - 1
    loss, stats = grpo.grpo_loss(lp, lp.detach(), torch.zeros(1), torch.ones(1, 1), "dapo", beta=0.1, ref_logprobs=ref)
    assert stats["kl_sum"] == pytest.approx(1 - math.log(2))
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2)))
    loss.backward()
    assert lp.grad.item() == pytest.approx(0.1 * (1 - 2.0))  # d/dlogp (e^d - d - 1) = 1 - e^d, d = ref - logp


def test_k3_is_zero_at_the_reference_and_nonnegative():
    lp = torch.randn(4, 5)
    _, stats = grpo.grpo_loss(lp, lp, torch.zeros(4), torch.ones(4, 5), "dapo", beta=1.0, ref_logprobs=lp)
    assert stats["kl_sum"] == pytest.approx(0, abs=1e-6)
    _, stats = grpo.grpo_loss(lp, lp, torch.zeros(4), torch.ones(4, 5), "dapo", beta=1.0, ref_logprobs=torch.randn(4, 5))
    assert stats["kl_sum"] > 0


# ---- pi_old frozen across the mu updates (the loop, not just the loss) -----------------------------------
def run_steps(tiny_model_dir, out):
    (out.parent / "reward.py").write_text(DIGIT_REWARD)
    grpo.main(["--model", tiny_model_dir, "--reward-fn", f"{out.parent / 'reward.py'}:digit_fraction", "--steps", "3", "--prompts-per-step", "2", "--num-generations", "4",
               "--max-new-tokens", "6", "--eval-every", "0", "--eval-size", "2", "--output-dir", str(out),
               "--no-save", "--mu", "4", "--lr", "3e-2", "--warmup-steps", "0"])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in line]


def test_pi_old_stays_frozen_across_mu_updates(tiny_model_dir, tmp_path, monkeypatch):
    frozen = run_steps(tiny_model_dir, tmp_path / "a")
    assert max(r["clip_frac"] for r in frozen) > 0  # with pi_old frozen, later updates move off it and clip
    original = grpo.grpo_loss  # the regression: old log-probs recomputed before every update, so ratio == 1
    monkeypatch.setattr(grpo, "grpo_loss", lambda lp, old, *a, **k: original(lp, lp.detach(), *a, **k))
    recomputed = run_steps(tiny_model_dir, tmp_path / "b")
    assert all(r["clip_frac"] == 0 for r in recomputed)
    assert [r["grad_norm"] for r in frozen] != [r["grad_norm"] for r in recomputed]


# ---- learning, end to end, bad input ---------------------------------------------------------------------
DIGIT_REWARD = '''
def digit_fraction(prompts, completions, records):
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]
'''


def test_learning_tiny_model_raises_reward(tiny_model_dir, tmp_path):
    (tmp_path / "reward.py").write_text(DIGIT_REWARD)
    out = tmp_path / "run"
    grpo.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'reward.py'}:digit_fraction", "--steps", "30",
               "--prompts-per-step", "4", "--num-generations", "8", "--max-new-tokens", "8", "--lr", "3e-3",
               "--eval-every", "0", "--eval-size", "4", "--output-dir", str(out), "--no-save", "--seed", "0"])
    rewards = [r["reward"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, (first, last)


def test_same_seed_same_metrics(tiny_model_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        grpo.main(["--model", tiny_model_dir, "--steps", "2", "--prompts-per-step", "2", "--num-generations", "4",
                   "--max-new-tokens", "6", "--eval-every", "0", "--eval-size", "4", "--output-dir", str(tmp_path / name),
                   "--no-save", "--mu", "2", "--beta", "0.1"])
        runs.append([{k: v for k, v in json.loads(line).items() if "time" not in k and k != "tokens_per_s"}
                     for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert runs[0] == runs[1]


def test_end_to_end_on_embedded_model(embedded_model_dir, tmp_path):
    out = tmp_path / "run"
    before, after = grpo.main(["--steps", "2", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens",
                               "16", "--eval-size", "4", "--eval-every", "1", "--output-dir", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2] and all("step_time" in r and "entropy" in r for r in steps)
    assert [r["step"] for r in evals] == [0, 1, 2] and all("eval/sampled_accuracy" in r for r in evals)
    assert json.loads((out / "args.json").read_text())["num_generations"] == 2
    assert (out / "samples.jsonl").exists()
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.num_hidden_layers == 30
    assert not list(out.glob(".model.tmp*"))  # the atomic write left no temp dir behind


@pytest.mark.parametrize("argv, message", [
    (["--num-generations", "1"], "--num-generations must be >= 2"),
    (["--loss-type", "ppo"], "invalid choice"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--micro-batch-prompts", "0"], "--micro-batch-prompts must be >= 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--beta", "nan"], "--beta must be >= 0"),
    (["--dtype", "fp8"], "invalid choice"),
])
def test_bad_flags_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        grpo.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_dataset_gives_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        grpo.main(["--dataset", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "run")])


def test_reward_fn_that_raises_is_reported_with_the_sample(tiny_model_dir, tmp_path):
    (tmp_path / "bad.py").write_text("def boom(prompts, completions, records):\n    raise ValueError('no way')\n")
    with pytest.raises(SystemExit, match="ValueError: no way\n  on completion"):
        grpo.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'bad.py'}:boom", "--steps", "1",
                   "--eval-size", "2", "--max-new-tokens", "4", "--output-dir", str(tmp_path / "run")])
