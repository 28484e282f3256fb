"""rest_em.py: the E-step filter/cap, the M-step loss, its batches (epochs really are passes over the kept set) and
its restart from the base weights, pass@k / maj@k against hand values, a learning test on the tiny model, resume, an
end-to-end run, bad input. (The sampler, top-k and the chunked training forward are tested once on grpo.py's copy in
tests/test_shared.py.)"""
import argparse
import json
import math
import random
from collections import Counter

import pytest
import torch

import common
import rest_em


# ---- E-step: filter and cap ------------------------------------------------------------------------------
def test_filter_keeps_only_correct_distinct_samples():
    texts = ["a", "b", "a", "c", "d"]
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0]
    # "a" is correct twice (one copy kept), "b" and "d" are wrong, "c" correct: cap not binding
    assert rest_em.filter_and_cap(texts, rewards, 10, random.Random(0)) == [0, 3]
    assert rest_em.filter_and_cap(texts, [0.0] * 5, 10, random.Random(0)) == []


def test_cap_keeps_a_random_subset_of_the_correct_ones():
    texts = [f"s{i}" for i in range(20)]
    rewards = [1.0 if i % 2 == 0 else 0.0 for i in range(20)]  # 10 correct: 0, 2, ..., 18
    picks = [tuple(rest_em.filter_and_cap(texts, rewards, 3, random.Random(seed))) for seed in range(10)]
    for kept in picks:
        assert len(kept) == 3 and len(set(kept)) == 3 and all(i % 2 == 0 for i in kept)
    assert len(set(picks)) > 1  # random, not always the first three
    assert picks[0] == tuple(rest_em.filter_and_cap(texts, rewards, 3, random.Random(0)))  # seeded


# ---- M-step: loss, batches ---------------------------------------------------------------------------------
def test_nll_loss_hand_values_and_micro_batch_sum():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.5, 0.9, 0.9]])).requires_grad_()
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    loss = rest_em.nll_loss(lp, mask, 3)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4) + math.log(2)) / 3)  # masked tokens ignored
    loss.backward()
    assert torch.allclose(lp.grad, -mask / 3)
    halves = rest_em.nll_loss(lp[:1], mask[:1], 3) + rest_em.nll_loss(lp[1:], mask[1:], 3)
    assert halves.item() == pytest.approx(loss.item())  # whole-batch normalizer: micro-batches sum to the batch loss


@pytest.mark.parametrize("num_kept, batch_size, epochs, steps, expected_batches", [
    (5, 16, 2.0, 8, 2),      # the defect: a kept set smaller than a batch; was ceil(2 * 5 / 16) = 1 batch (1 pass)
    (40, 16, 2.0, 8, 5),     # ceil(80 / 16) = 5 batches of 16 = 2.0 passes
    (10, 4, 1.5, 8, 4),      # ceil(15 / 4) = 4 batches of 4 = 1.6 passes (the true number is logged)
    (10, 1, 0.7, 8, 7),      # 0.7 * 10 is 7.000000000000001: 7 batches, not 8
    (3, 16, None, 8, 8),     # --steps: 8 batches of all 3
    (0, 16, 2.0, 8, 0),      # nothing kept: no update
])
def test_m_step_batches_make_whole_passes(num_kept, batch_size, epochs, steps, expected_batches):
    batches = rest_em.m_step_batches(num_kept, batch_size, epochs, steps, random.Random(0))
    size = min(batch_size, num_kept)
    assert len(batches) == expected_batches and all(len(b) == size for b in batches)
    order = [i for b in batches for i in b]
    for start in range(0, len(order) - num_kept + 1, num_kept or 1):  # every full pass is a permutation
        assert sorted(order[start:start + num_kept]) == list(range(num_kept))
    if epochs is not None and num_kept:
        assert epochs <= len(order) / num_kept < epochs + size / num_kept  # at least E passes, less than one more batch


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = common.load_tokenizer(tiny_model_dir)
    return common.load_model(tiny_model_dir, torch.device("cpu")).eval(), tok


def m_step_args(lr, *extra):
    return rest_em.parse_args(["--steps", "3", "--batch-size", "4", "--micro-batch-size", "2", "--lr", str(lr),
                               "--dtype", "float32", *extra])


def run_m_step(model, tok, base, kept, args, tmp_path):
    return rest_em.m_step(model, base, kept, ["Q: 1+1?", "Q: 2+3?"], tok, args, [1],
                          lambda: torch.autocast("cpu", enabled=False), random.Random(0), 1, tmp_path)


def test_m_step_starts_from_the_base_weights(tiny, tmp_path):
    model, tok = tiny
    base = {k: v.clone() for k, v in model.state_dict().items()}
    kept = [(0, [tok.convert_tokens_to_ids("2"), 1]), (1, [tok.convert_tokens_to_ids("5"), 1]), (1, [5, 6, 7, 1])]
    stats = run_m_step(model, tok, base, kept, m_step_args(1e-2), tmp_path)
    assert stats["updates"] == 3 and stats["samples_used"] == 3 and stats["tokens_used"] == 8
    assert stats["nll_last"] < stats["nll_first"] and stats["entropy"] > 0
    from_base = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(from_base[k], base[k]) for k in base)  # the M-step did train
    with torch.no_grad():  # pretend the model is a trained iterate: its weights are no longer the base ones
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    run_m_step(model, tok, base, kept, m_step_args(1e-2), tmp_path)
    for k in base:  # same result as training from the base: the iterate's weights were discarded
        assert torch.allclose(model.state_dict()[k], from_base[k], atol=1e-6), k
    model.load_state_dict(base)


def test_epochs_are_true_passes_over_a_kept_set_smaller_than_a_batch(tiny, tmp_path, monkeypatch):
    """--epochs 2 with 3 kept solutions: two updates on all 3 and a logged `epochs` of 2.0, whatever --batch-size.
    The old code made ceil(2 * 3 / 16) = 1 update (one pass) with --batch-size 16 and logged 16 / 3 = 5.3 epochs;
    with --batch-size 4 it made 2 updates but logged 2 * 4 / 3 = 2.7."""
    model, tok = tiny
    base = {k: v.clone() for k, v in model.state_dict().items()}
    kept = [(0, [5, 1]), (1, [6, 7, 1]), (1, [8, 1])]
    rows, original = Counter(), rest_em.completion_logprobs

    def counting(m, ids, mask, completions, index, temperature):  # count each solution (EOS = 1 and padding cut)
        rows.update(tuple(x for x in row if x != 1) for row in completions.tolist())
        return original(m, ids, mask, completions, index, temperature)
    monkeypatch.setattr(rest_em, "completion_logprobs", counting)
    for batch_size in ("4", "16"):
        rows.clear()
        stats = run_m_step(model, tok, base, kept, m_step_args(1e-3, "--epochs", "2", "--batch-size", batch_size),
                           tmp_path)
        assert stats["updates"] == 2 and stats["epochs"] == 2.0 and stats["samples_used"] == 3
        assert sorted(rows.values()) == [2, 2, 2]  # every kept solution trained on exactly twice
    model.load_state_dict(base)


# ---- pass@k, maj@k ---------------------------------------------------------------------------------------
def test_pass_at_k_hand_values():
    assert rest_em.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert rest_em.pass_at_k(8, 3, 4) == pytest.approx(1 - 5 / 70)  # 1 - C(5,4)/C(8,4)
    assert rest_em.pass_at_k(10, 3, 1) == pytest.approx(0.3)        # k = 1: c / n
    assert rest_em.pass_at_k(4, 0, 2) == 0.0
    assert rest_em.pass_at_k(3, 2, 2) == 1.0                         # n - c < k: every k-subset has a correct one
    from itertools import combinations  # the probability that a random k-subset holds a correct sample
    subsets = list(combinations([1, 0, 0, 1, 0, 0], 3))
    assert rest_em.pass_at_k(6, 2, 3) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_majority_vote_groups_equivalent_answers():
    texts = ["so \\boxed{5}", "\\boxed{1/2}", "it is \\boxed{0.5}", "no answer here"]
    assert rest_em.majority_vote(texts, "0.5")  # 1/2 and 0.5 form one group of 2 votes against 5's one
    assert not rest_em.majority_vote(texts, "5")
    assert rest_em.majority_vote(["\\boxed{3}", "\\boxed{4}"], "3")  # tie: the first seen answer wins
    assert not rest_em.majority_vote(["\\boxed{3}", "\\boxed{4}"], "4")
    assert not rest_em.majority_vote(["nothing", "at all"], "4")


# ---- learning, resume, end to end, bad input ---------------------------------------------------------------
DIGIT_REWARD = '''
def starts_with_digit(prompts, completions, records):
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]
'''
TINY = ["--fewshot", "0", "--prompts-per-step", "8", "--num-generations", "8", "--max-new-tokens", "4",
        "--batch-size", "8", "--micro-batch-size", "8", "--eval-size", "2", "--eval-samples", "2", "--pass-k", "1",
        "--eval-every", "0", "--dtype", "float32"]


def iteration_records(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "kept" in r]


def test_learning_tiny_model_raises_the_estep_reward(tiny_model_dir, tmp_path):
    (tmp_path / "reward.py").write_text(DIGIT_REWARD)
    runs = {}
    for lr in ("1e-2", "1e-12"):
        runs[lr] = tmp_path / f"lr{lr}"
        rest_em.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'reward.py'}:starts_with_digit",
                      "--iterations", "3", "--steps", "8", "--lr", lr, "--output-dir", str(runs[lr]), "--no-save",
                      *TINY])
    learned = [r["reward"] for r in iteration_records(runs["1e-2"])]
    frozen = [r["reward"] for r in iteration_records(runs["1e-12"])]
    # iteration 1 samples the base model; iteration 3 the model fine-tuned (from the base) on iteration 2's kept set
    assert learned[2] > learned[0] + 0.25 and learned[1] > learned[0], learned
    assert abs(frozen[2] - frozen[0]) < 0.15, frozen  # a learning rate of ~0: the same test would fail
    rows = [json.loads(line) for line in (runs["1e-2"] / "estep_iter1.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 8 and all(r["reward"] == 1.0 for r in rows if r["kept"])
    assert {"problem", "question", "answer", "sample", "reward", "kept"} <= set(rows[0])
    first = iteration_records(runs["1e-2"])[0]
    assert first["kept"] == sum(r["kept"] for r in rows) and first["updates"] == 8
    assert first["correct"] == first["reward"]  # a binary reward: the fraction with reward > 0 is its mean


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_model_dir, tmp_path):
    common_args = ["--model", tiny_model_dir, "--steps", "2", "--lr", "1e-3", "--eval-every", "1", *TINY[:-4]]
    rest_em.main([*common_args, "--iterations", "2", "--output-dir", str(tmp_path / "straight")])
    rest_em.main([*common_args, "--iterations", "1", "--output-dir", str(tmp_path / "cut")])
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["completed_iterations"] == 1
    rest_em.main(["--resume", str(tmp_path / "cut"), "--iterations", "2"])
    strip = lambda run: [{k: v for k, v in json.loads(line).items() if "time" not in k and k != "tokens_per_s"}
                         for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "straight") == strip(tmp_path / "cut")  # same seed, same metrics, across the resume
    assert [r["step"] for r in strip(tmp_path / "cut")] == [0, 1, 1, 2, 2]
    assert (tmp_path / "cut" / "estep_iter2.jsonl").exists()
    assert json.loads((tmp_path / "cut" / "args.json").read_text())["iterations"] == 2
    rest_em.main([*common_args, "--iterations", "1", "--no-save", "--output-dir", str(tmp_path / "nosave")])
    with pytest.raises(SystemExit, match="no completed iteration"):
        rest_em.main(["--resume", str(tmp_path / "nosave")])


def test_end_to_end_on_embedded_model(embedded_model_dir, tmp_path):
    out = tmp_path / "run"
    evals = rest_em.main(["--iterations", "1", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens",
                          "16", "--steps", "1", "--eval-size", "2", "--eval-samples", "2", "--pass-k", "2",
                          "--output-dir", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    iters = [r for r in records if "kept" in r]
    keys = {"reward", "reward_std", "correct", "solved", "kept", "kept_per_problem", "truncated", "completion_len",
            "samples_used", "tokens_used", "updates", "epochs", "nll_first", "nll_last", "loss", "entropy",
            "grad_norm", "lr", "gen_time", "train_time", "step_time", "tokens_per_s"}
    assert [r["step"] for r in iters] == [1] and keys <= set(iters[0])
    assert [r["step"] for r in evals] == [0, 1]
    assert all({"eval/accuracy", "eval/sampled_accuracy", "eval/pass@k", "eval/maj@k", "eval/train_accuracy"} <= set(r)
               for r in evals)
    assert (out / "estep_iter1.jsonl").exists() and (out / "samples.jsonl").exists()
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.num_hidden_layers == 30
    assert not list(out.glob(".model.tmp*"))  # the atomic write left no temp dir behind


def numeric_flags(parse_args, monkeypatch):
    """Every int/float option of a script's parser (spied on while it parses no arguments)."""
    parsers, original = [], argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    parse_args([])
    monkeypatch.undo()
    return [(a.option_strings[0], a.type) for a in parsers[0]._actions if a.type in (int, float)]


def test_every_numeric_flag_is_checked(monkeypatch, capsys):
    flags = numeric_flags(rest_em.parse_args, monkeypatch)
    assert len(flags) >= 20 and ("--epochs", float) in flags
    for flag, kind in flags:
        if flag == "--seed":  # any integer is a seed
            continue
        with pytest.raises(SystemExit) as e:
            rest_em.parse_args([flag, "-1" if kind is int else "nan"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{flag} must be" in err and "Traceback" not in err, (flag, err)


@pytest.mark.parametrize("argv, message", [
    (["--pass-k", "8", "--eval-samples", "4"], "--pass-k 8 must be <= --eval-samples 4"),
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--dtype", "fp8"], "invalid choice"),
])
def test_bad_flags_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        rest_em.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_resume_of_a_non_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="error: --resume .*no args.json"):
        rest_em.parse_args(["--resume", str(tmp_path)])


def test_non_binary_reward_and_long_max_new_tokens_are_clear_errors(tiny_model_dir, tmp_path):
    (tmp_path / "half.py").write_text("def half(prompts, completions, records):\n    return [0.5] * len(completions)\n")
    with pytest.raises(SystemExit, match="ReST-EM needs a binary reward"):
        rest_em.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'half.py'}:half", "--iterations", "1",
                      "--output-dir", str(tmp_path / "run"), *TINY])
    with pytest.raises(SystemExit, match="exceeds the model's context length"):
        rest_em.main(["--model", tiny_model_dir, "--max-new-tokens", "5000", "--iterations", "1",
                      "--output-dir", str(tmp_path / "long")])
