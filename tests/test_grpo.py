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


def test_rloo_advantage_hand_values_and_identity():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    # group 1: 1 - mean(0, 0, 0) = 1 and 0 - mean(1, 0, 0) = -1/3; group 2: 1 - 1 = 0; never divided by the std
    expected = torch.tensor([1, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0])
    for scale_std in (True, False):  # --no-std-scaling changes nothing for rloo
        assert torch.allclose(grpo.group_advantages(r, 4, scale_std, leave_one_out=True), expected)
    r = torch.rand(5 * 6, generator=torch.Generator().manual_seed(0))
    G, groups = 6, r.view(5, 6)
    identity = G / (G - 1) * (groups - groups.mean(1, keepdim=True))  # A = G/(G-1) (r - mean r)
    assert torch.allclose(grpo.group_advantages(r, G, leave_one_out=True), identity.view(-1), atol=1e-6)


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


# ---- GSPO: one ratio per sequence, s_i = exp(mean_t log rho_t), clipped per sequence ------------------------
# old log-probs 0, so log-probs = log rho. Four sequences (eps 0.2): rho (2, 0.5) -> s = 1, A = 1, not clipped |
# rho 1.5 (+ a padded token) -> s = 1.5, A = 1, clipped at 1.2 | rho (0.25, 1) -> s = 0.5, A = -1, clipped at 0.8 |
# rho (1.1, 1.1) -> s = 1.1, A = -0.5, not clipped. Sequence losses -1, -1.2, 0.8, 0.55; d s_i / d log pi_t = s_i / |y_i|
GSPO_LP = torch.log(torch.tensor([[2.0, 0.5], [1.5, math.exp(5.0)], [0.25, 1.0], [1.1, 1.1]]))
GSPO_MASK, GSPO_ADV = torch.tensor([[1.0, 1], [1, 0], [1, 1], [1, 1]]), torch.tensor([1.0, 1, -1, -0.5])


@pytest.mark.parametrize("loss_type, expected_loss, grad_seq0, grad_seq3", [
    # grpo (the paper's 1/G sum over sequences): token weight A_i s_i / (|y_i| G)
    ("grpo", (-1 - 1.2 + 0.8 + 0.55) / 4, -1 / 2 / 4, 0.5 * 1.1 / 2 / 4),
    # dapo (TRL's broadcast, token-mean over 7 tokens): |y_i| copies of l_i, so the 1/|y_i| cancels: A_i s_i / 7
    ("dapo", (2 * -1 + 1 * -1.2 + 2 * 0.8 + 2 * 0.55) / 7, -1 / 7, 0.5 * 1.1 / 7),
])
def test_gspo_hand_values(loss_type, expected_loss, grad_seq0, grad_seq3):
    lp = GSPO_LP.clone().requires_grad_()
    loss, stats = grpo.grpo_loss(lp, torch.zeros(4, 2), GSPO_ADV, GSPO_MASK, loss_type, sequence_level=True)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert stats["clip_frac_sum"] == 3  # the 1 + 2 tokens of the two clipped sequences
    loss.backward()
    expected = torch.tensor([[grad_seq0] * 2, [0, 0], [0, 0], [grad_seq3] * 2])  # clipped sequences: no gradient
    assert torch.allclose(lp.grad, expected, atol=1e-6)
    # token level, the first sequence's rho = 2 token is clipped away (and rho = 0.5 is not): GSPO keeps both
    lp = GSPO_LP.clone().requires_grad_()
    grpo.grpo_loss(lp, torch.zeros(4, 2), GSPO_ADV, GSPO_MASK, loss_type)[0].backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] != 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "cispo"])
def test_gspo_with_one_token_completions_equals_grpo(loss_type):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(8, 1, generator=g)
    lp0 = old + 0.3 * torch.randn(8, 1, generator=g)  # mu > 1: ratios off 1, several clipped
    adv, mask = torch.randn(8, generator=g), torch.ones(8, 1)
    out = []
    for sequence_level in (False, True):
        lp = lp0.clone().requires_grad_()
        loss, stats = grpo.grpo_loss(lp, old, adv, mask, loss_type, sequence_level=sequence_level)
        loss.backward()
        out.append((loss.item(), stats["clip_frac_sum"], lp.grad))
    assert out[0][1] > 0 and out[0][:2] == pytest.approx(out[1][:2]) and torch.allclose(out[0][2], out[1][2])


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_gspo_at_ratio_one_has_grpos_gradient(loss_type):
    # mu = 1: s_i = rho_t = 1, and broadcasting l_i over the sequence's tokens gives back GRPO's gradient
    lp0, mask, adv = torch.randn(3, 4), torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]), torch.randn(3)
    grads = []
    for sequence_level in (False, True):
        lp = lp0.clone().requires_grad_()
        grpo.grpo_loss(lp, lp.detach(), adv, mask, loss_type, sequence_level=sequence_level)[0].backward()
        grads.append(lp.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


# ---- CISPO: l_t = -sg(min(rho_t, 1 + eps_high)) A log pi_t, token-mean --------------------------------------
def test_cispo_hand_values():
    # tokens: (rho 1.5, A=+1) weight capped at 1.2 | (rho 0.5, A=-1) weight 0.5 (no lower bound) | (rho 1.1, A=+1)
    lp = torch.log(torch.tensor([[1.5], [0.5], [1.1]])).requires_grad_()
    old, adv, mask = torch.zeros(3, 1), torch.tensor([1.0, -1, 1]), torch.ones(3, 1)
    loss, stats = grpo.grpo_loss(lp, old, adv, mask, "cispo", eps_low=0.2, eps_high=0.2)
    w = torch.tensor([1.2, 0.5, 1.1])
    assert loss.item() == pytest.approx(float(-(w * adv * lp.detach().squeeze(1)).sum() / 3), abs=1e-6)
    assert stats["clip_frac_sum"] == 1  # only the capped weight
    loss.backward()
    # every token keeps a gradient -w A / 3, even the two that GRPO's clipped surrogate zeroes
    assert torch.allclose(lp.grad.squeeze(1), torch.tensor([-1.2 / 3, 0.5 / 3, -1.1 / 3]))
    lp_grpo = lp.detach().clone().requires_grad_()
    grpo.grpo_loss(lp_grpo, old, adv, mask, "dapo", 0.2, 0.2)[0].backward()
    assert torch.allclose(lp_grpo.grad.squeeze(1), torch.tensor([0, 0, -1.1 / 3]))


@pytest.mark.parametrize("spread", [0.0, 0.1])  # 0: mu = 1 (rho = 1); 0.1: every rho inside [0.8, 1.2]
def test_cispo_inside_the_clip_range_has_grpos_gradient(spread):
    g = torch.Generator().manual_seed(1)
    old, mask, adv = torch.randn(4, 5, generator=g), (torch.rand(4, 5, generator=g) > 0.3).float(), torch.randn(4)
    lp0 = old + spread * (2 * torch.rand(4, 5, generator=g) - 1) * math.log(1.15)
    grads = []
    for loss_type in ("dapo", "cispo"):
        lp = lp0.clone().requires_grad_()
        loss, stats = grpo.grpo_loss(lp, old if spread else lp.detach(), adv, mask, loss_type, 0.2, 0.2)
        loss.backward()
        grads.append(lp.grad)
        assert stats["clip_frac_sum"] == 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_gspo_epsilon_defaults():
    assert (lambda a: (a.epsilon, a.epsilon_high))(grpo.parse_args([])) == (0.2, 0.2)
    seq = ["--importance-sampling-level", "sequence"]
    assert (lambda a: (a.epsilon, a.epsilon_high))(grpo.parse_args(seq)) == (3e-4, 4e-4)
    assert (lambda a: (a.epsilon, a.epsilon_high))(grpo.parse_args(seq + ["--epsilon", "1e-3"])) == (1e-3, 1e-3)
    assert (lambda a: (a.epsilon, a.epsilon_high))(grpo.parse_args(["--epsilon-high", "0.28"])) == (0.2, 0.28)
    assert grpo.parse_args(["--dynamic-sampling", "--prompts-per-step", "5"]).max_resample == 15


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


# ---- DAPO dynamic sampling -------------------------------------------------------------------------------
PARITY_REWARD = '''
def parity(prompts, completions, records):  # odd answers: every completion 0 (a zero-variance group)
    return [float(len(c) % 2) if int(r["answer"]) % 2 == 0 else 0.0 for c, r in zip(completions, records)]

def zero(prompts, completions, records):
    return [0.0] * len(completions)
'''


def dynamic_run(tiny_model_dir, tmp_path, monkeypatch, name, reward, extra):
    (tmp_path / "rewards.py").write_text(PARITY_REWARD)
    calls, original = [], grpo.grpo_loss  # every micro-batch (one prompt group) that is trained
    monkeypatch.setattr(grpo, "grpo_loss", lambda lp, old, adv, *a, **k: calls.append(adv.clone()) or
                        original(lp, old, adv, *a, **k))
    grpo.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'rewards.py'}:{reward}", "--steps", "4",
               "--prompts-per-step", "2", "--num-generations", "4", "--max-new-tokens", "6", "--eval-every", "0",
               "--eval-size", "2", "--output-dir", str(tmp_path / name), "--no-save", "--beta", "0.1", *extra])
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return calls, [r for r in map(json.loads, lines) if "reward" in r]


def test_dynamic_sampling_never_trains_a_zero_variance_group(tiny_model_dir, tmp_path, monkeypatch):
    # beta > 0: without dynamic sampling the zero-variance groups are trained (for their KL term)
    calls, records = dynamic_run(tiny_model_dir, tmp_path, monkeypatch, "plain", "parity", [])
    assert any((adv == 0).all() for adv in calls)
    assert all(r["groups_drawn"] == 2 and r["groups_dropped"] == 0 and r["samples_used"] == 8 for r in records)
    calls, records = dynamic_run(tiny_model_dir, tmp_path, monkeypatch, "dyn", "parity", ["--dynamic-sampling"])
    assert calls and all((adv != 0).any() for adv in calls)
    assert sum(r["groups_dropped"] for r in records) > 0 and all(r["groups_drawn"] <= 6 for r in records)
    for r in records:  # the step holds P = 2 groups with variance unless the bound (3 x 2 groups) was reached
        assert r["groups_drawn"] - r["groups_dropped"] == 2 or r["groups_drawn"] == 6
        assert r["samples_used"] == 4 * (r["groups_drawn"] - r["groups_dropped"])


def test_dynamic_sampling_stops_at_the_bound_with_a_warning(tiny_model_dir, tmp_path, monkeypatch, capsys):
    calls, records = dynamic_run(tiny_model_dir, tmp_path, monkeypatch, "zero", "zero",
                                 ["--dynamic-sampling", "--max-resample", "3"])
    assert not calls and len(records) == 4  # nothing to train on, and the run goes on
    assert all(r["groups_drawn"] == 3 and r["groups_dropped"] == 3 and r["samples_used"] == 0 for r in records)
    assert capsys.readouterr().out.count("only 0/2 groups with reward variance in 3 drawn") == 4


@pytest.mark.parametrize("flags", [["--importance-sampling-level", "sequence"], ["--loss-type", "cispo"],
                                   ["--advantage", "rloo", "--dynamic-sampling"]])
def test_variants_run_with_mu_2(tiny_model_dir, tmp_path, flags):
    (tmp_path / "reward.py").write_text(DIGIT_REWARD)
    grpo.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'reward.py'}:digit_fraction", "--steps", "2",
               "--prompts-per-step", "2", "--num-generations", "4", "--max-new-tokens", "6", "--eval-every", "0",
               "--eval-size", "2", "--output-dir", str(tmp_path / "run"), "--no-save", "--mu", "2", "--lr", "3e-2",
               "--warmup-steps", "0", *flags])
    records = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) and r["updates"] == 2 for r in records)
    if "sequence" in flags:  # after one update at lr 3e-2 the sequence ratios leave GSPO's 3e-4 / 4e-4 range
        assert max(r["clip_frac"] for r in records) > 0


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
    (["--loss-type", "gspo"], "invalid choice"),
    (["--importance-sampling-level", "seq"], "invalid choice"),
    (["--advantage", "loo"], "invalid choice"),
    (["--max-resample", "0"], "--max-resample must be >= 1"),
    (["--epsilon", "-0.1"], "--epsilon must be > 0"),
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
