"""reinforce_rej.py: the rejection filter (every --reject choice), advantages, the loss against hand-computed values
(aggregation, dropped prompts out of the denominator, clipping, KL, entropy), the +-1 vs 0/1 reward scale, pi_old
frozen across the mini-batch updates (the loop, not just the loss), the all-rejected step, a learning test,
determinism, an end-to-end run and bad flags. The shared plumbing is tested in tests/test_shared.py."""
import json
import math

import pytest
import torch

import reinforce_rej as rr


# ---- the rejection filter --------------------------------------------------------------------------------
# 4 prompts x 3 samples: mixed, all correct, all wrong, mixed (rewards +1 / -1: correct means r > 0)
REWARDS = torch.tensor([1.0, -1, 1, 1, 1, 1, -1, -1, -1, -1, -1, 1])


@pytest.mark.parametrize("reject, kept", [
    ("all_correct,all_wrong", [True, False, False, True]),  # Reinforce-Rej: only mixed groups survive
    ("all_wrong", [True, True, False, True]),               # ablation "remove all wrong"
    ("all_correct", [True, False, True, True]),             # ablation "remove all correct"
    ("none", [True, True, True, True]),                     # vanilla Reinforce
])
def test_reject_groups_choices(reject, kept):
    keep, rejected_correct, rejected_wrong = rr.reject_groups(REWARDS, 3, reject)
    assert keep.tolist() == kept
    assert rejected_correct.tolist() == [False, "all_correct" in reject, False, False]
    assert rejected_wrong.tolist() == [False, False, "all_wrong" in reject, False]


def test_reject_groups_with_zero_one_rewards_and_continuous_custom_rewards():
    keep, _, _ = rr.reject_groups(torch.where(REWARDS > 0, 1.0, 0.0), 3, "all_correct,all_wrong")
    assert keep.tolist() == [True, False, False, True]  # the scale does not change which groups are uniform
    r = torch.tensor([0.2, 0.5, 0.9, 0.4, 0.4, 0.4])  # custom reward: only equal rewards make a group uniform
    keep, rejected_correct, rejected_wrong = rr.reject_groups(r, 3, "all_correct,all_wrong")
    assert keep.tolist() == [True, False] and rejected_correct.tolist() == [False, True]
    assert rejected_wrong.tolist() == [False, False]


# ---- advantages ------------------------------------------------------------------------------------------
def test_advantages_hand_values():
    r = torch.tensor([1.0, -1, -1, -1, 1, 1])  # groups of 3: mean -1/3 and 1/3
    assert rr.reinforce_advantages(r, 3).tolist() == r.tolist()  # vanilla: A = r, no baseline
    mz = rr.reinforce_advantages(r, 3, mean_zero=True)
    assert torch.allclose(mz, torch.tensor([4 / 3, -2 / 3, -2 / 3, -4 / 3, 2 / 3, 2 / 3]))
    std = math.sqrt(((4 / 3) ** 2 + 2 * (2 / 3) ** 2) / 2)  # unbiased std of both groups
    both = rr.reinforce_advantages(r, 3, mean_zero=True, std_normalize=True)
    assert torch.allclose(both, mz / (std + 1e-6))
    assert torch.allclose(rr.reinforce_advantages(r, 3, std_normalize=True), r / (std + 1e-6))
    uniform = torch.tensor([1.0, 1, 1])  # zero std: left undivided, no 1/eps blow-up
    assert rr.reinforce_advantages(uniform, 3, std_normalize=True).tolist() == [1, 1, 1]


# ---- the loss --------------------------------------------------------------------------------------------
MASK = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
ADV = torch.tensor([1.0, -1.0])


@pytest.mark.parametrize("loss_type, kwargs, expected", [
    ("grpo", {}, (-1.0 + 1.0) / 2),                 # the paper's: per-sequence token means -1 and +1, then mean
    ("dapo", {}, (-1 - 1 + 1) / 3),                 # the code's token-mean over the 3 valid tokens
    ("grpo", {"num_seqs": 4}, (-1.0 + 1.0) / 4),    # a mini-batch normalizer overrides the local one
    ("dapo", {"num_tokens": 6.0}, (-1 - 1 + 1) / 6),
])
def test_loss_aggregation_hand_values(loss_type, kwargs, expected):
    lp = torch.zeros(2, 3, requires_grad=True)  # ratio 1: the per-token loss is -A = -r
    loss, stats = rr.reinforce_loss(lp, lp.detach(), ADV, MASK, loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected)
    assert stats["clip_frac_sum"] == 0


def test_paper_aggregation_gradient_hand_values():
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = rr.reinforce_loss(lp, lp.detach(), ADV, MASK, "grpo")
    loss.backward()  # d/dlogp of -(1/2) * (1/|y_i|) * A_i: -1/4 on the 2 tokens of y_1, +1/2 on the 1 token of y_2
    assert torch.allclose(lp.grad, torch.tensor([[-0.25, -0.25, 0], [0.5, 0, 0]]))


def test_dropped_prompts_leave_the_denominator():
    """Reinforce-Rej as the paper defines it: the loss over the kept samples only. The released code instead keeps
    the filtered samples with A = 0, which shrinks the gradient by kept / total; we check we do the former."""
    lp = torch.zeros(4, 2, requires_grad=True)
    rewards = torch.tensor([1.0, -1, 1, 1])  # 2 groups of 2: mixed, all correct
    keep, _, _ = rr.reject_groups(rewards, 2, "all_correct,all_wrong")
    assert keep.tolist() == [True, False]
    rows = torch.tensor([0, 1])  # the training loop passes only the kept groups' rows and their count
    loss, _ = rr.reinforce_loss(lp[rows], lp[rows].detach(), rewards[rows], torch.ones(2, 2), num_seqs=2)
    assert loss.item() == pytest.approx((-1 + 1) / 2)
    loss.backward()
    assert torch.allclose(lp.grad[:2], torch.tensor([[-0.25, -0.25], [0.25, 0.25]])) and lp.grad[2:].abs().sum() == 0
    zeroed = torch.where(torch.tensor([1.0, 1, 0, 0]) > 0, rewards, 0.0)  # the code's variant: |D| = 4 samples
    lp2 = torch.zeros(4, 2, requires_grad=True)
    rr.reinforce_loss(lp2, lp2.detach(), zeroed, torch.ones(4, 2))[0].backward()
    assert torch.allclose(lp2.grad[:2], lp.grad[:2] / 2)  # half the step: why we drop instead of zeroing


def test_clipping_hand_values():
    # tokens: (ratio 1.5, A=+1) clipped at 1.2 | (ratio 0.5, A=-1) clipped at 0.8 | (ratio 0.5, A=+1) not clipped
    old = torch.zeros(3, 1)
    lp = torch.log(torch.tensor([[1.5], [0.5], [0.5]])).requires_grad_()
    loss, stats = rr.reinforce_loss(lp, old, torch.tensor([1.0, -1.0, 1.0]), torch.ones(3, 1), "dapo")
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5) / 3, abs=1e-6)
    assert stats["clip_frac_sum"] == 2
    loss.backward()
    assert lp.grad[0].item() == 0 and lp.grad[1].item() == 0  # clipped tokens carry no gradient
    assert lp.grad[2].item() == pytest.approx(-0.5 / 3)


def test_kl_and_entropy_extras_hand_values():
    lp = torch.zeros(1, 1, requires_grad=True)
    ref, ent = torch.log(torch.tensor([[2.0]])), torch.tensor([[0.7]])
    loss, stats = rr.reinforce_loss(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 1), beta=0.1,
                                    ref_logprobs=ref, entropy_coef=0.01, entropy=ent)
    assert stats["kl_sum"] == pytest.approx(2 - math.log(2) - 1)
    assert loss.item() == pytest.approx(-1 + 0.1 * (2 - math.log(2) - 1) - 0.01 * 0.7)


def test_incorrect_reward_zero_gives_wrong_answers_no_gradient():
    """The released code's 0/1 scale: in a mixed group the wrong answer has A = 0 and no gradient, so Reinforce-Rej
    becomes RAFT++ on mixed groups. With the paper's +-1 the wrong answer's probability is pushed down."""
    correct = torch.tensor([True, False, False, True])  # one mixed group of 4
    grads = {}
    for wrong in (-1.0, 0.0):
        rewards = torch.where(correct, 1.0, wrong)
        assert rr.reject_groups(rewards, 4, "all_correct,all_wrong")[0].tolist() == [True]
        lp = torch.zeros(4, 1, requires_grad=True)
        rr.reinforce_loss(lp, lp.detach(), rr.reinforce_advantages(rewards, 4), torch.ones(4, 1))[0].backward()
        grads[wrong] = lp.grad.squeeze(1)
    assert torch.allclose(grads[-1.0], torch.tensor([-0.25, 0.25, 0.25, -0.25]))  # descent lowers wrong log-probs
    assert torch.allclose(grads[0.0], torch.tensor([-0.25, 0.0, 0.0, -0.25]))     # wrong answers: no signal at all
    raft_pp = torch.zeros(4, 1, requires_grad=True)  # RAFT++: PPO-clip with A = 1 on correct samples, 0 otherwise
    rr.reinforce_loss(raft_pp, raft_pp.detach(), correct.float(), torch.ones(4, 1))[0].backward()
    assert torch.allclose(raft_pp.grad.squeeze(1), grads[0.0])


def test_micro_batches_sum_to_the_mini_batch_loss():
    lp = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    old = lp + 0.3 * torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(4)[None, :] < torch.tensor([4, 2, 3, 1, 4, 2])[:, None]).float()
    adv = torch.tensor([1.0, -1, 1, 1, -1, -1])
    for loss_type in ("grpo", "dapo"):
        full = rr.reinforce_loss(lp, old, adv, mask, loss_type)[0]
        norms = dict(num_seqs=6, num_tokens=mask.sum())
        parts = sum(rr.reinforce_loss(lp[s], old[s], adv[s], mask[s], loss_type, **norms)[0]
                    for s in (slice(0, 2), slice(2, 6)))
        assert parts.item() == pytest.approx(full.item(), abs=1e-6), loss_type


# ---- the training loop on the tiny model -----------------------------------------------------------------
SIGNED_DIGIT_REWARD = '''
def signed_digits(prompts, completions, records):  # in [-1, 1]: +1 for all digits, -1 for none
    return [2 * sum(c.isdigit() for c in text) / max(len(text), 1) - 1 for text in completions]

def always_right(prompts, completions, records):
    return [1.0] * len(completions)
'''


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run(tiny_model_dir, tmp_path, name, *extra, fn="signed_digits", steps=25):
    (tmp_path / "reward.py").write_text(SIGNED_DIGIT_REWARD)
    rr.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'reward.py'}:{fn}", "--steps", str(steps),
             "--prompts-per-step", "4", "--num-generations", "8", "--max-new-tokens", "8", "--eval-every", "0",
             "--eval-size", "4", "--output-dir", str(tmp_path / name), "--no-save", "--seed", "0", *extra])
    return [r for r in read_metrics(tmp_path / name) if "reward" in r]


def test_pi_old_stays_frozen_across_the_minibatch_updates(tiny_model_dir, tmp_path, monkeypatch):
    extra = ("--num-minibatches", "4", "--lr", "3e-2", "--warmup-steps", "0")  # continuous rewards: 4 groups kept
    frozen = run(tiny_model_dir, tmp_path, "frozen", *extra, steps=3)
    assert all(r["updates"] == 4 for r in frozen)
    assert max(r["clip_frac"] for r in frozen) > 0  # with pi_old frozen, later updates move off it and clip
    original = rr.reinforce_loss  # the regression: old log-probs recomputed before every update, so ratio == 1
    monkeypatch.setattr(rr, "reinforce_loss", lambda lp, old, *a, **k: original(lp, lp.detach(), *a, **k))
    recomputed = run(tiny_model_dir, tmp_path, "recomputed", *extra, steps=3)
    assert all(r["clip_frac"] == 0 for r in recomputed)
    assert [r["grad_norm"] for r in frozen] != [r["grad_norm"] for r in recomputed]


def test_learning_tiny_model_raises_reward_and_lr_zero_does_not(tiny_model_dir, tmp_path):
    rewards = [r["reward"] for r in run(tiny_model_dir, tmp_path, "lr", "--lr", "1e-2")]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.5, (first, last)  # measured: -0.72 -> +0.99
    rewards = [r["reward"] for r in run(tiny_model_dir, tmp_path, "lr0", "--lr", "1e-30")]
    first0, last0 = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5  # the same run without learning fails the bar
    assert last0 < first0 + 0.5, (first0, last0)


def test_all_rejected_steps_skip_the_update(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "reward.py").write_text(SIGNED_DIGIT_REWARD)
    out = tmp_path / "run"
    rr.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'reward.py'}:always_right", "--steps", "2",
             "--prompts-per-step", "2", "--num-generations", "3", "--max-new-tokens", "4", "--eval-every", "0",
             "--eval-size", "2", "--weight-decay", "0.1", "--output-dir", str(out)])
    steps = [r for r in read_metrics(out) if "reward" in r]
    assert [r["skipped_updates"] for r in steps] == [1, 2]
    assert all(r["rejected_all_correct"] == 2 and r["frac_rejected"] == 1 and r["samples_used"] == 0
               and r["updates"] == 0 and r["loss"] is None for r in steps)
    assert "update skipped (2 so far)" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM
    start, end = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (tiny_model_dir, out / "model"))
    assert all(torch.equal(start[k], end[k]) for k in start)  # no update means no AdamW step either


def test_same_seed_same_metrics(tiny_model_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        rr.main(["--model", tiny_model_dir, "--steps", "2", "--prompts-per-step", "2", "--num-generations", "4",
                 "--max-new-tokens", "6", "--eval-every", "0", "--eval-size", "4", "--output-dir",
                 str(tmp_path / name), "--no-save", "--reject", "none", "--beta", "0.1", "--entropy-coef", "0.01"])
        runs.append([{k: v for k, v in r.items() if "time" not in k and k != "tokens_per_s"}
                     for r in read_metrics(tmp_path / name)])
    assert runs[0] == runs[1]
    assert all(r["samples_used"] == 8 and r["kl"] is not None for r in runs[0] if "reward" in r)


def test_end_to_end_on_embedded_model(embedded_model_dir, tmp_path):
    out = tmp_path / "run"
    rr.main(["--steps", "2", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "16",
             "--eval-size", "4", "--eval-every", "1", "--reject", "all_wrong", "--log-kl", "--output-dir", str(out)])
    records = read_metrics(out)
    steps = [r for r in records if "reward" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("step_time", "entropy", "kl", "rejected_all_correct", "rejected_all_wrong", "kept_prompts",
                "frac_rejected", "samples_used", "correct", "skipped_updates"):
        assert all(key in r for r in steps), key
    assert all(r["rejected_all_correct"] == 0 for r in steps)  # only the all-wrong side is switched on
    assert [r["step"] for r in evals] == [0, 1, 2] and all("eval/sampled_accuracy" in r for r in evals)
    assert json.loads((out / "args.json").read_text())["reject"] == "all_wrong"
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.num_hidden_layers == 30
    assert not list(out.glob(".model.tmp*"))


@pytest.mark.parametrize("argv, message", [
    (["--reject", "all_right"], "invalid choice"),
    (["--reject", ""], "invalid choice"),
    (["--incorrect-reward", "0.5"], "--incorrect-reward must be <= 0"),
    (["--incorrect-reward", "nan"], "--incorrect-reward must be <= 0"),
    (["--num-generations", "1"], "--num-generations must be >= 2"),
    (["--num-minibatches", "0"], "--num-minibatches must be >= 1"),
    (["--loss-type", "sum"], "invalid choice"),
    (["--epsilon", "-0.2"], "--epsilon must be > 0"),
    (["--entropy-coef", "-1"], "--entropy-coef must be >= 0"),
    (["--beta", "-1"], "--beta must be >= 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--lr", "0"], "--lr must be > 0"),
])
def test_bad_flags_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        rr.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_vanilla_reinforce_accepts_one_generation():
    assert rr.parse_args(["--reject", "none", "--num-generations", "1"]).num_generations == 1
