"""raft.py: the RAFT loss (masked NLL on accepted samples) and the RAFT++ ratio/clip against hand-computed values;
wrong samples contribute exactly zero; micro-batch losses sum to the mini-batch loss; pi_old stays frozen across
the mini-batch updates (the loop, not just the loss); a learning test that fails at lr = 0; RAFT++ == RAFT with
one update; an end-to-end run; bad input. The shared plumbing (sampler, training forward) is tested in
tests/test_shared.py on grpo.py's copy, which tests/test_consistency.py checks is byte-identical to raft.py's."""
import json

import pytest
import torch

import raft


# ---- advantages ------------------------------------------------------------------------------------------
def test_advantages_clamp_wrong_answers_to_zero_whatever_their_reward():
    for wrong in (-1.0, -0.3, 0.0):  # the paper's -1, anything in between, the released code's 0
        r = torch.tensor([1.0, wrong, wrong, 1.0])
        assert raft.raft_advantages(r).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert raft.raft_advantages(torch.tensor([0.5, -2.0])).tolist() == [0.5, 0.0]  # custom rewards: max(r, 0)


# ---- losses ----------------------------------------------------------------------------------------------
LP = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.125, 0.3, 0.3]]))  # log pi of 2 accepted samples
MASK = torch.tensor([[1.0, 1, 0], [1, 0, 0]])  # lengths 2 and 1
ADV = torch.ones(2)
LOG2 = 0.6931471805599453


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", (1.5 + 3) / 2 * LOG2),  # the paper's seq-mean-token-mean: (log 2 + log 4) / 2 and log 8, their mean
    ("dapo", 6 / 3 * LOG2),          # the code's token-mean: (log 2 + log 4 + log 8) / 3 valid tokens
])
def test_raft_loss_is_the_masked_nll_of_the_accepted_samples(loss_type, expected):
    lp = LP.clone().requires_grad_()
    loss, stats = raft.raft_loss(lp, lp.detach(), ADV, MASK, loss_type, clip=False)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["nll_sum"] == pytest.approx(6 * LOG2, rel=1e-6) and stats["clip_frac_sum"] == 0
    loss.backward()
    if loss_type == "grpo":  # d/dlogp: -1 / (|y_i| * |D|); masked positions get exactly 0
        assert torch.allclose(lp.grad, torch.tensor([[-1 / 4, -1 / 4, 0], [-1 / 2, 0, 0]]))
    else:
        assert torch.allclose(lp.grad, torch.tensor([[-1 / 3, -1 / 3, 0], [-1 / 3, 0, 0]]))


def test_raftpp_ratio_and_clip_hand_values():
    # token ratios s = pi/pi_old: 1.5 (clipped at 1 + 0.2), 0.5 (below 1 - eps: NOT clipped for A > 0), 1.1 (inside)
    old = torch.zeros(3, 1)
    lp = torch.log(torch.tensor([[1.5], [0.5], [1.1]])).requires_grad_()
    loss, stats = raft.raft_loss(lp, old, torch.ones(3), torch.ones(3, 1), eps_low=0.2, eps_high=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 0.5 + 1.1) / 3, abs=1e-6)  # -(1/|D|) sum min(s, clip(s))
    assert stats["clip_frac_sum"] == 1
    loss.backward()
    assert lp.grad[0].item() == 0  # the clipped token carries no gradient
    assert lp.grad[1].item() == pytest.approx(-0.5 / 3)  # d(-s)/dlogp = -s, over |D| = 3
    assert lp.grad[2].item() == pytest.approx(-1.1 / 3)
    _, stats = raft.raft_loss(lp, old, torch.ones(3), torch.ones(3, 1), clip=False)
    assert stats["clip_frac_sum"] == 0  # plain RAFT has no clipped branch, whatever the ratio


def test_raftpp_seq_mean_token_mean_hand_value():
    # sample 1: s = (2, 1), A = 1 -> min(s, clip(s)) = (1.2, 1), token mean 1.1; sample 2: s = 0.7 -> 0.7
    lp = torch.log(torch.tensor([[2.0, 1.0], [0.7, 5.0]]))
    loss, stats = raft.raft_loss(lp, torch.zeros(2, 2), ADV, torch.tensor([[1.0, 1], [1, 0]]), "grpo")
    assert loss.item() == pytest.approx(-(1.1 + 0.7) / 2, abs=1e-6)
    assert stats["clip_frac_sum"] == 1  # the masked token with s = 5 is not counted


def test_clip_higher_and_no_clip_ablation():
    lp, old, one = torch.log(torch.tensor([[1.25]])), torch.zeros(1, 1), torch.ones(1, 1)
    assert raft.raft_loss(lp, old, torch.ones(1), one, eps_low=0.2, eps_high=0.2)[0].item() == pytest.approx(-1.2)
    assert raft.raft_loss(lp, old, torch.ones(1), one, eps_low=0.2, eps_high=0.28)[0].item() == pytest.approx(-1.25)
    assert raft.raft_loss(lp, old, torch.ones(1), one, eps_low=1e9, eps_high=1e9)[0].item() == pytest.approx(-1.25)


def test_raftpp_gradient_equals_raft_gradient_at_ratio_one():
    lp = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    grads = []
    for clip in (False, True):
        lp.grad = None
        raft.raft_loss(lp, lp.detach(), torch.ones(3), mask, clip=clip)[0].backward()
        grads.append(lp.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_wrong_samples_contribute_exactly_zero_and_are_not_in_the_denominator():
    """The loop drops rows with A = 0. Were they kept (zeroed, as the released code does) the per-token terms would
    vanish but the denominator would grow: the loss over D must equal the mean over the accepted samples only."""
    lp = LP.clone().requires_grad_()
    wrong = torch.log(torch.tensor([[0.01, 0.02, 0.03]])).requires_grad_()
    for clip in (False, True):
        accepted_only, _ = raft.raft_loss(lp, lp.detach(), ADV, MASK, clip=clip)
        both = torch.cat([lp, wrong])
        with_zeroed, _ = raft.raft_loss(both, both.detach(), torch.tensor([1.0, 1, 0]),
                                        torch.cat([MASK, torch.ones(1, 3)]), num_seqs=2, clip=clip)  # |D| = 2
        assert with_zeroed.item() == pytest.approx(accepted_only.item())
        wrong.grad = None
        with_zeroed.backward()
        assert torch.count_nonzero(wrong.grad) == 0  # exactly zero, not small
        zeroed_in_denominator, _ = raft.raft_loss(both.detach(), both.detach(), torch.tensor([1.0, 1, 0]),
                                                  torch.cat([MASK, torch.ones(1, 3)]), clip=clip)
        assert zeroed_in_denominator.item() == pytest.approx(accepted_only.item() * 2 / 3)  # what dropping avoids


def test_k3_kl_and_entropy_bonus_hand_values():
    lp = torch.zeros(1, 1, requires_grad=True)
    ref = torch.log(torch.tensor([[2.0]]))  # pi_ref / pi = 2: k3 = 2 - log 2 - 1
    loss, stats = raft.raft_loss(lp, lp.detach(), torch.ones(1), torch.ones(1, 1), beta=0.1, ref_logprobs=ref,
                                 entropy_coef=0.01, entropy=torch.tensor([[3.0]]))
    k3 = 1 - LOG2
    assert stats["kl_sum"] == pytest.approx(k3)
    assert loss.item() == pytest.approx(-1 + 0.1 * k3 - 0.01 * 3.0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_micro_batch_losses_sum_to_the_mini_batch_loss(loss_type):
    lp = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    old = lp + 0.3 * torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(4)[None, :] < torch.tensor([4, 2, 3, 1, 4])[:, None]).float()
    for clip in (False, True):
        full = raft.raft_loss(lp, old, torch.ones(5), mask, loss_type, clip=clip)[0]
        norms = dict(num_seqs=5, num_tokens=mask.sum(), clip=clip)
        parts = [raft.raft_loss(lp[s], old[s], torch.ones(5)[s], mask[s], loss_type, **norms)[0]
                 for s in (slice(0, 2), slice(2, 5))]
        assert sum(parts).item() == pytest.approx(full.item(), abs=1e-6)


# ---- the training loop on the tiny model -----------------------------------------------------------------
REWARDS = '''
def digit_correct(prompts, completions, records):  # "correct" = more than 30% of the characters are digits
    return [1.0 if sum(c.isdigit() for c in t) / max(len(t), 1) > 0.3 else -1.0 for t in completions]

def always_right(prompts, completions, records):
    return [1.0] * len(completions)

def always_wrong(prompts, completions, records):
    return [-1.0] * len(completions)
'''


def run(tiny_model_dir, tmp_path, name, *extra, fn="digit_correct", steps=20):
    (tmp_path / "rewards.py").write_text(REWARDS)
    out = tmp_path / name
    raft.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'rewards.py'}:{fn}", "--steps", str(steps),
               "--prompts-per-step", "4", "--num-generations", "8", "--max-new-tokens", "8", "--lr", "3e-3",
               "--eval-every", "0", "--eval-size", "4", "--output-dir", str(out), "--no-save", "--seed", "0", *extra])
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "correct" in r]


def test_pi_old_stays_frozen_across_the_minibatch_updates(tiny_model_dir, tmp_path, monkeypatch):
    extra = ("--num-minibatches", "4", "--lr", "3e-2", "--warmup-steps", "0")  # every sample accepted: 4 x 8 rows
    frozen = run(tiny_model_dir, tmp_path, "frozen", *extra, fn="always_right", steps=3)
    assert all(r["updates"] == 4 for r in frozen)
    assert max(r["clip_frac"] for r in frozen) > 0  # with pi_old frozen, later updates move off it and clip
    original = raft.raft_loss  # the regression: old log-probs recomputed before every update, so ratio == 1
    monkeypatch.setattr(raft, "raft_loss", lambda lp, old, *a, **k: original(lp, lp.detach(), *a, **k))
    recomputed = run(tiny_model_dir, tmp_path, "recomputed", *extra, fn="always_right", steps=3)
    assert all(r["clip_frac"] == 0 for r in recomputed)
    assert [r["grad_norm"] for r in frozen] != [r["grad_norm"] for r in recomputed]


@pytest.mark.parametrize("variant", [[], ["--no-clip"]])
def test_learning_tiny_model_raises_the_fraction_correct(tiny_model_dir, tmp_path, variant):
    trained = [r["correct"] for r in run(tiny_model_dir, tmp_path, "lr", *variant)]
    frozen = [r["correct"] for r in run(tiny_model_dir, tmp_path, "lr0", *variant, "--lr", "1e-30")]
    first, last, last_frozen = sum(trained[:5]) / 5, sum(trained[-5:]) / 5, sum(frozen[-5:]) / 5
    assert last > first + 0.3 and last > last_frozen + 0.3, (first, last, last_frozen)


def test_raftpp_with_one_update_per_batch_is_raft_and_differs_with_two(tiny_model_dir, tmp_path):
    keys = ("correct", "entropy", "samples_used", "grad_norm")
    pick = lambda rs: [[r[k] for k in keys] for r in rs]
    pp1 = run(tiny_model_dir, tmp_path, "pp1", "--num-minibatches", "1", steps=6)
    raft1 = run(tiny_model_dir, tmp_path, "raft1", "--num-minibatches", "1", "--no-clip", steps=6)
    assert pick(pp1) == pick(raft1)  # s = 1 exactly: the same gradients, the same trajectory
    pp2 = run(tiny_model_dir, tmp_path, "pp2", "--num-minibatches", "2", steps=6)
    raft2 = run(tiny_model_dir, tmp_path, "raft2", "--num-minibatches", "2", "--no-clip", steps=6)
    assert pick(pp2) != pick(raft2)  # the second mini-batch is off-policy: the ratio changes its gradient
    assert all(r["updates"] == min(2, r["samples_used"]) for r in pp2)


def test_all_wrong_batches_leave_the_weights_untouched(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    records = run(tiny_model_dir, tmp_path, "wrong", "--weight-decay", "0.1", fn="always_wrong", steps=3)
    assert [r["updates"] for r in records] == [0, 0, 0] and records[-1]["skipped_updates"] == 3
    assert all(r["frac_no_correct"] == 1.0 and r["samples_used"] == 0 and r["loss"] is None for r in records)
    assert all(r["entropy"] is None and r["entropy_sampled"] > 0 for r in records)  # sampled entropy: every step
    assert "3 steps with no correct completion" in capsys.readouterr().out
    # and the saved model is bitwise the start model (no zero-gradient step, no weight decay step)
    raft.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'rewards.py'}:always_wrong", "--steps", "2",
               "--max-new-tokens", "4", "--eval-every", "0", "--eval-size", "2", "--weight-decay", "0.1",
               "--output-dir", str(tmp_path / "saved")])
    start, after = (AutoModelForCausalLM.from_pretrained(d) for d in (tiny_model_dir, tmp_path / "saved" / "model"))
    for a, b in zip(start.parameters(), after.parameters()):
        assert torch.equal(a, b)


def test_same_seed_same_metrics(tiny_model_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        raft.main(["--model", tiny_model_dir, "--steps", "2", "--prompts-per-step", "2", "--num-generations", "4",
                   "--max-new-tokens", "6", "--eval-every", "0", "--eval-size", "4", "--output-dir",
                   str(tmp_path / name), "--no-save", "--beta", "0.1", "--entropy-coef", "0.01", "--incorrect-reward",
                   "0", "--loss-type", "dapo"])
        runs.append([{k: v for k, v in json.loads(line).items() if "time" not in k and k != "tokens_per_s"}
                     for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert runs[0] == runs[1]


def test_end_to_end_on_embedded_model(embedded_model_dir, tmp_path):
    out = tmp_path / "run"
    raft.main(["--steps", "2", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "16",
               "--eval-size", "4", "--eval-every", "1", "--log-kl", "--output-dir", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("step_time", "entropy", "entropy_sampled", "frac_no_correct", "correct", "samples_used",
                "clip_frac", "nll", "kl", "loss", "skipped_updates"):
        assert all(key in r for r in steps), key
    assert all(r["entropy_sampled"] > 0 for r in steps)
    assert [r["step"] for r in evals] == [0, 1, 2] and all("eval/sampled_accuracy" in r for r in evals)
    assert json.loads((out / "args.json").read_text())["no_clip"] is False
    assert (out / "samples.jsonl").exists()
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.num_hidden_layers == 30
    assert not list(out.glob(".model.tmp*"))  # the atomic write left no temp dir behind


@pytest.mark.parametrize("argv, message", [
    (["--incorrect-reward", "0.5"], "--incorrect-reward must be <= 0"),
    (["--incorrect-reward", "nan"], "--incorrect-reward must be <= 0"),
    (["--num-minibatches", "0"], "--num-minibatches must be >= 1"),
    (["--loss-type", "sum"], "invalid choice"),
    (["--loss-type", "dr_grpo"], "invalid choice"),
    (["--epsilon", "0"], "--epsilon must be > 0"),
    (["--epsilon-high", "-1"], "--epsilon-high must be > 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--entropy-coef", "-0.1"], "--entropy-coef must be >= 0"),
    (["--beta", "nan"], "--beta must be >= 0"),
    (["--num-generations", "0"], "--num-generations must be >= 1"),
])
def test_bad_flags_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        raft.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_dataset_gives_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        raft.main(["--dataset", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "run")])


def test_reward_fn_that_raises_is_reported_with_the_sample(tiny_model_dir, tmp_path):
    (tmp_path / "bad.py").write_text("def boom(prompts, completions, records):\n    raise ValueError('no way')\n")
    with pytest.raises(SystemExit, match="ValueError: no way\n  on completion"):
        raft.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'bad.py'}:boom", "--steps", "1",
                   "--eval-size", "2", "--max-new-tokens", "4", "--output-dir", str(tmp_path / "run")])
