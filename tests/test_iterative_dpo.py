"""iterative_dpo.py: the DPO loss and its gradient against hand-computed values; sequence log-probs (summed, EOS
included, padding ignored) against a plain forward; pair construction (ties, all-correct and all-wrong prompts);
the reference frozen within an iteration (and the initial model with --reference initial); a learning test; no
update when there is no pair; an end-to-end run; bad flags."""
import json
import math
import random

import pytest
import torch

import common
import iterative_dpo as dpo

LOG_SIGMOID = lambda x: -math.log1p(math.exp(-x))


# ---- the DPO loss --------------------------------------------------------------------------------------------
def test_dpo_loss_hand_values_and_gradient():
    # pair 1: h_w = -1 - (-2) = 1, h_l = -3 - (-1) = -2, margin 0.5 * 3 = 1.5; pair 2: h_w = -1, h_l = 1, margin -1
    chosen = torch.tensor([-1.0, -4.0], requires_grad=True)
    rejected = torch.tensor([-3.0, -2.0], requires_grad=True)
    loss, stats = dpo.dpo_loss(chosen, rejected, torch.tensor([-2.0, -3.0]), torch.tensor([-1.0, -3.0]), beta=0.5)
    assert loss.item() == pytest.approx(-(LOG_SIGMOID(1.5) + LOG_SIGMOID(-1.0)) / 2, rel=1e-6)
    assert stats == {"right_sum": 1.0, "chosen_sum": pytest.approx(0.0), "rejected_sum": pytest.approx(-1.0)}
    loss.backward()  # d/d log pi(y_w) = -beta * sigmoid(-margin) / n; d/d log pi(y_l) = +beta * sigmoid(-margin) / n
    sig = lambda x: 1 / (1 + math.exp(-x))
    expected = torch.tensor([-0.5 * sig(-1.5) / 2, -0.5 * sig(1.0) / 2])
    assert torch.allclose(chosen.grad, expected) and torch.allclose(rejected.grad, -expected)


def test_dpo_loss_is_log2_at_the_reference_and_its_micro_batches_sum_to_it():
    lp = torch.randn(5, generator=torch.Generator().manual_seed(0))
    loss, stats = dpo.dpo_loss(lp, lp + 1, lp, lp + 1, beta=0.1)  # pi_theta = pi_ref: every margin is 0
    assert loss.item() == pytest.approx(math.log(2)) and stats["right_sum"] == 0  # a tie is not ranked right
    c, r, rc, rr = (torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(4))
    full, _ = dpo.dpo_loss(c, r, rc, rr, 0.1)
    parts = [dpo.dpo_loss(c[s], r[s], rc[s], rr[s], 0.1, num_pairs=5)[0] for s in (slice(0, 2), slice(2, 5))]
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-6)
    assert dpo.dpo_loss(c, r, rc, rr, 0.1)[0].item() != pytest.approx(dpo.dpo_loss(c, r, rc, rr, 1.0)[0].item())


def test_sequence_logprobs_sum_the_completion_with_its_eos_and_ignore_padding():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9, 0.3], [0.125, 0.7, 0.7, 0.7]]))
    mask = dpo.completion_mask_from_lens(torch.tensor([3, 1]), 4)  # row 0: 2 tokens + EOS; row 1: EOS only
    seq = dpo.sequence_logprobs(lp, mask)
    assert torch.allclose(seq, torch.log(torch.tensor([0.5 * 0.25 * 0.9, 0.125])))
    junk = lp.clone()
    junk[0, 3], junk[1, 1:] = -1e4, -1e4  # whatever sits in the padding changes nothing
    assert torch.equal(dpo.sequence_logprobs(junk, mask), seq)
    rows, pairs = torch.tensor([3, 6]), [(6, 3)]  # row ids -> positions; chosen first
    assert dpo.pair_sequence_logprobs(seq, rows, pairs)[0].tolist() == [seq[1].item()]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return common.load_model(tiny_model_dir, torch.device("cpu")).eval(), common.load_tokenizer(tiny_model_dir)


def test_sequence_logprob_in_a_padded_batch_equals_the_plain_forward_with_eos(tiny):
    model, tok = tiny
    ids, pmask = common.tokenize_prompts(tok, ["Q: 1+1?", "Question: 22 + 33 = ?"], "cpu")
    completions = torch.tensor([[5, 9, 1, 1, 1], [7, 8, 9, 10, 1]])  # EOS (id 1) is also the padding id
    lens = torch.tensor([3, 5])
    lp, _ = dpo.completion_logprobs(model, ids, pmask, completions, torch.tensor([0, 1]), 1.0)
    seq = dpo.sequence_logprobs(lp, dpo.completion_mask_from_lens(lens, 5))
    for b in range(2):  # the plain forward over [prompt; completion up to and including its EOS], unpadded
        n, real = int(lens[b]), pmask[b].bool()
        full = torch.cat([ids[b, real], completions[b, :n]])[None]
        logits = model(input_ids=full).logits[0, int(real.sum()) - 1:-1].log_softmax(-1)
        plain = logits.gather(-1, completions[b, :n, None]).squeeze(-1)
        assert seq[b].item() == pytest.approx(plain.sum().item(), abs=1e-4)
        assert abs(seq[b].item() - plain[:-1].sum().item()) > 1e-3  # the EOS term is in the sum


# ---- pairs ---------------------------------------------------------------------------------------------------
def test_pairs_skip_all_correct_and_all_wrong_prompts_and_break_ties_at_random():
    rewards = torch.tensor([1.0, 0, 0, 1,  1, 1, 1, 1,  0, 0, 0, 0,  0.2, 0.9, 0.9, 0.1])
    seen = set()
    for seed in range(100):
        pairs = dpo.best_vs_worst_pairs(rewards, 4, random.Random(seed))
        assert len(pairs) == 2  # prompt 1 (all correct) and prompt 2 (all wrong) give none
        (w0, l0), (w3, l3) = pairs
        assert w0 in (0, 3) and l0 in (1, 2)  # a correct one vs an incorrect one, ties among both
        assert w3 in (13, 14) and l3 == 15  # graded rewards: best (tied 0.9) vs worst (0.1)
        seen.add((w0, l0, w3))
    assert len(seen) == 8  # every tie resolution occurs: a random choice, not always the first
    assert dpo.best_vs_worst_pairs(rewards, 4, random.Random(1)) == dpo.best_vs_worst_pairs(rewards, 4, random.Random(1))
    assert dpo.best_vs_worst_pairs(torch.tensor([-1.0, 1]), 2, random.Random(0)) == [(1, 0)]  # +-1 rewards too


# ---- the loop: reference frozen within an iteration, learning, no pair, end to end --------------------------
REWARDS = '''
def digit_correct(prompts, completions, records):  # "correct" = more than 30% of the characters are digits
    return [1.0 if sum(c.isdigit() for c in t) / max(len(t), 1) > 0.3 else -1.0 for t in completions]

def always_wrong(prompts, completions, records):
    return [-1.0] * len(completions)
'''


def run(tiny_model_dir, tmp_path, name, *extra, fn="digit_correct", steps=20):
    (tmp_path / "rewards.py").write_text(REWARDS)
    out = tmp_path / name
    dpo.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'rewards.py'}:{fn}", "--steps", str(steps),
              "--prompts-per-step", "4", "--num-generations", "8", "--max-new-tokens", "8", "--lr", "3e-3",
              "--eval-every", "0", "--eval-size", "4", "--output-dir", str(out), "--no-save", "--seed", "0", *extra])
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "correct" in r]


def record_dpo_calls(monkeypatch):
    """Every dpo_loss call as (training?, policy chosen log-probs, reference chosen log-probs)."""
    calls, original = [], dpo.dpo_loss

    def spy(chosen, rejected, ref_chosen, ref_rejected, beta, num_pairs=None):
        calls.append((chosen.requires_grad, chosen.detach().clone(), ref_chosen.clone()))
        return original(chosen, rejected, ref_chosen, ref_rejected, beta, num_pairs)
    monkeypatch.setattr(dpo, "dpo_loss", spy)
    return calls


def iterations(calls):
    """Split the calls into iterations: training calls, then the no-grad diagnostic call that ends each step."""
    out, current = [], []
    for training, chosen, ref in calls:
        if training:
            current.append((chosen, ref))
        else:
            out, current = out + [current], []
    return out


@pytest.mark.parametrize("reference", ["iteration", "initial"])
def test_reference_is_frozen_within_an_iteration(tiny_model_dir, tmp_path, monkeypatch, reference):
    calls = record_dpo_calls(monkeypatch)
    run(tiny_model_dir, tmp_path, reference, "--reference", reference, "--dtype", "float32", "--lr", "1e-2",
        "--micro-batch-prompts", "8", "--warmup-steps", "0", steps=8)  # one call per update
    its = iterations(calls)
    assert sum(len(it) == 2 for it in its) >= 2  # iterations with two updates occur
    moved = lambda c, r: (c - r).abs().max().item() > 1e-3
    first = [moved(*it[0]) for it in its]
    assert not first[0]  # the first update of the run: pi_theta = pi_ref (the start model) in both modes
    if reference == "iteration":  # every iteration starts at pi_ref: its reference is this iteration's policy
        assert not any(first)
    else:  # the initial model: later iterations start away from it
        assert all(first[1:])
    # the second update of an iteration has moved off pi_ref: the reference is not re-read from the updated policy
    assert all(moved(*it[1]) for it in its if len(it) == 2)


def test_learning_tiny_model_raises_the_fraction_correct(tiny_model_dir, tmp_path):
    trained = [r["correct"] for r in run(tiny_model_dir, tmp_path, "lr")]
    control = [r["correct"] for r in run(tiny_model_dir, tmp_path, "lr-tiny", "--lr", "1e-12")]
    first, last, last_control = sum(trained[:5]) / 5, sum(trained[-5:]) / 5, sum(control[-5:]) / 5
    assert last > first + 0.2 and last > last_control + 0.2, (first, last, last_control)


def test_no_pair_means_no_update_and_untouched_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    records = run(tiny_model_dir, tmp_path, "wrong", "--weight-decay", "0.1", fn="always_wrong", steps=2)
    assert [(r["pairs"], r["updates"], r["frac_no_pair"]) for r in records] == [(0, 0, 1.0)] * 2
    assert records[-1]["skipped_updates"] == 2 and all(r["loss"] is None and r["reward_accuracy"] is None
                                                       for r in records)
    (tmp_path / "rewards.py").write_text(REWARDS)
    dpo.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'rewards.py'}:always_wrong", "--steps", "2",
              "--max-new-tokens", "4", "--eval-every", "0", "--eval-size", "2", "--weight-decay", "0.1",
              "--output-dir", str(tmp_path / "saved")])
    start, after = (AutoModelForCausalLM.from_pretrained(d) for d in (tiny_model_dir, tmp_path / "saved" / "model"))
    assert all(torch.equal(a, b) for a, b in zip(start.parameters(), after.parameters()))


def test_same_seed_same_metrics(tiny_model_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        records = run(tiny_model_dir, tmp_path, name, "--reference", "initial", steps=3)
        runs.append([{k: v for k, v in r.items() if "time" not in k and k != "tokens_per_s"} for r in records])
    assert runs[0] == runs[1]


def test_end_to_end_on_embedded_model(embedded_model_dir, tmp_path):
    out = tmp_path / "run"
    dpo.main(["--steps", "2", "--prompts-per-step", "2", "--num-generations", "4", "--max-new-tokens", "16",
              "--eval-size", "4", "--eval-every", "1", "--output-dir", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps, evals = [r for r in records if "reward" in r], [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("pairs", "frac_no_pair", "loss", "reward_accuracy", "chosen_logratio", "rejected_logratio",
                "samples_used", "updates", "skipped_updates", "correct", "step_time"):
        assert all(key in r for r in steps), key
    assert all(r["samples_used"] == 2 * r["pairs"] and r["updates"] == min(2, r["pairs"]) for r in steps)
    assert [r["step"] for r in evals] == [0, 1, 2] and all("eval/sampled_accuracy" in r for r in evals)
    assert json.loads((out / "args.json").read_text())["reference"] == "iteration"
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.num_hidden_layers == 30


@pytest.mark.parametrize("argv, message", [
    (["--num-generations", "1"], "--num-generations must be >= 2"),
    (["--beta", "0"], "--beta must be > 0"),
    (["--num-minibatches", "0"], "--num-minibatches must be >= 1"),
    (["--reference", "sft"], "invalid choice"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_flags_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        dpo.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
