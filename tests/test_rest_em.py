"""rest_em.py: the E-step filter/cap, the M-step loss and its restart from the base weights, pass@k / maj@k
against hand values, top-k sampling, a learning test on the tiny model, resume, an end-to-end run."""
import json
import math
import random

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


# ---- M-step loss ---------------------------------------------------------------------------------------------
def test_nll_loss_hand_values_and_micro_batch_sum():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.5, 0.9, 0.9]])).requires_grad_()
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    loss = rest_em.nll_loss(lp, mask, 3)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4) + math.log(2)) / 3)  # masked tokens ignored
    loss.backward()
    assert torch.allclose(lp.grad, -mask / 3)
    halves = rest_em.nll_loss(lp[:1], mask[:1], 3) + rest_em.nll_loss(lp[1:], mask[1:], 3)
    assert halves.item() == pytest.approx(loss.item())  # whole-batch normalizer: micro-batches sum to the batch loss


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = common.load_tokenizer(tiny_model_dir)
    model = common.load_model(tiny_model_dir, torch.device("cpu"))
    return model.eval(), tok


def test_solution_logprobs_equal_a_plain_forward_with_left_padding(tiny):
    model, tok = tiny
    ids, mask = rest_em.tokenize_prompts(tok, ["Q: 1+1?", "Question: what is 12 + 34?"], "cpu")
    assert mask[0, 0] == 0  # the short prompt is left-padded
    completions = torch.randint(2, 80, (2, 5), generator=torch.Generator().manual_seed(0))
    lp = rest_em.solution_logprobs(model, ids, mask, completions)
    for i in range(2):  # reference: the unpadded [prompt; completion] alone, full log-softmax
        seq = torch.cat([ids[i][mask[i].bool()], completions[i]])[None]
        logits = model(input_ids=seq).logits[0, -6:-1]
        ref = logits.log_softmax(-1).gather(-1, completions[i][:, None]).squeeze(-1)
        assert torch.allclose(lp[i], ref, atol=1e-5)


def m_step_args(lr):
    return rest_em.parse_args(["--steps", "3", "--batch-size", "4", "--micro-batch-size", "2", "--lr", str(lr),
                               "--dtype", "float32"])


def test_m_step_starts_from_the_base_weights(tiny):
    model, tok = tiny
    base = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = ["Q: 1+1?", "Q: 2+3?"]
    kept = [(0, [tok.convert_tokens_to_ids("2"), 1]), (1, [tok.convert_tokens_to_ids("5"), 1]), (1, [5, 6, 7, 1])]
    run = lambda: rest_em.m_step(model, base, kept, prompts, tok, m_step_args(1e-2), [1], lambda: torch.autocast("cpu", enabled=False),
                                 random.Random(0))
    run()
    from_base = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(from_base[k], base[k]) for k in base)  # the M-step did train
    with torch.no_grad():  # pretend the model is a trained iterate: its weights are no longer the base ones
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    run()
    for k in base:  # same result as training from the base: the iterate's weights were discarded
        assert torch.allclose(model.state_dict()[k], from_base[k], atol=1e-6), k
    model.load_state_dict(base)


# ---- pass@k, maj@k ---------------------------------------------------------------------------------------
def test_pass_at_k_hand_values():
    assert rest_em.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert rest_em.pass_at_k(8, 3, 4) == pytest.approx(1 - 5 / 70)  # 1 - C(5,4)/C(8,4)
    assert rest_em.pass_at_k(10, 3, 1) == pytest.approx(0.3)        # k = 1: c / n
    assert rest_em.pass_at_k(4, 0, 2) == 0.0
    assert rest_em.pass_at_k(3, 2, 2) == 1.0                         # n - c < k: every k-subset has a correct one
    # the formula is the probability that a random k-subset holds a correct sample: check by enumeration
    from itertools import combinations
    samples = [1, 0, 0, 1, 0, 0]
    subsets = list(combinations(samples, 3))
    assert rest_em.pass_at_k(6, 2, 3) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_majority_vote_groups_equivalent_answers():
    texts = ["so \\boxed{5}", "\\boxed{1/2}", "it is \\boxed{0.5}", "no answer here"]
    assert rest_em.majority_vote(texts, "0.5")  # 1/2 and 0.5 form one group of 2 votes against 5's one
    assert not rest_em.majority_vote(texts, "5")
    assert rest_em.majority_vote(["\\boxed{3}", "\\boxed{4}"], "3")  # tie: the first seen answer wins
    assert not rest_em.majority_vote(["\\boxed{3}", "\\boxed{4}"], "4")
    assert not rest_em.majority_vote(["nothing", "at all"], "4")


# ---- sampling ------------------------------------------------------------------------------------------------
def test_top_k_1_sampling_is_greedy(tiny):
    model, tok = tiny
    ids, mask = rest_em.tokenize_prompts(tok, ["Q: 1+1?", "Question: 12 + 34?"], "cpu")
    greedy, glens = rest_em.generate(model, ids, mask, 1, 8, 0.0, [tok.eos_token_id], None)
    top1, tlens = rest_em.generate(model, ids, mask, 1, 8, 5.0, [tok.eos_token_id], torch.Generator().manual_seed(0), top_k=1)
    assert torch.equal(greedy, top1) and torch.equal(glens, tlens)
    sample = lambda k: rest_em.generate(model, ids[:1], mask[:1], 32, 8, 5.0, [tok.eos_token_id],
                                        torch.Generator().manual_seed(0), top_k=k)[0][:, 0]  # first tokens (32,)
    assert len(set(sample(3).tolist())) <= 3 < len(set(sample(0).tolist()))  # at T = 5 the full vocabulary spreads


# ---- learning, resume, end to end, bad input ---------------------------------------------------------------
DIGIT_REWARD = '''
def starts_with_digit(prompts, completions, records):
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]
'''
TINY = ["--fewshot", "0", "--prompts-per-step", "8", "--num-generations", "8", "--max-new-tokens", "4",
        "--batch-size", "8", "--micro-batch-size", "8", "--eval-size", "2", "--eval-samples", "2", "--pass-k", "1",
        "--eval-every", "0", "--dtype", "float32"]


def estep_rewards(run):
    return [r["reward"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "reward" in r]


def test_learning_tiny_model_raises_the_estep_reward(tiny_model_dir, tmp_path):
    (tmp_path / "reward.py").write_text(DIGIT_REWARD)
    runs = {}
    for lr in ("1e-2", "0"):
        runs[lr] = tmp_path / f"lr{lr}"
        rest_em.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'reward.py'}:starts_with_digit",
                      "--iterations", "3", "--steps", "8", "--lr", lr, "--output-dir", str(runs[lr]), "--no-save", *TINY])
    learned, frozen = estep_rewards(runs["1e-2"]), estep_rewards(runs["0"])
    # iteration 1 samples the base model; iteration 3 the model fine-tuned (from the base) on iteration 2's kept set
    assert learned[2] > learned[0] + 0.25 and learned[1] > learned[0], learned  # measured: 0.14, 0.44, 0.50
    assert abs(frozen[2] - frozen[0]) < 0.15, frozen  # lr = 0: the same test would fail
    rows = [json.loads(l) for l in (runs["1e-2"] / "estep_iter1.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 8 and all(r["reward"] == 1.0 for r in rows if r["kept"])
    assert {"problem", "question", "answer", "sample", "reward", "kept"} <= set(rows[0])


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_model_dir, tmp_path):
    common_args = ["--model", tiny_model_dir, "--steps", "2", "--lr", "1e-3", "--eval-every", "1", *TINY[:-4]]
    rest_em.main([*common_args, "--iterations", "2", "--output-dir", str(tmp_path / "straight")])
    rest_em.main([*common_args, "--iterations", "1", "--output-dir", str(tmp_path / "cut")])
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["completed_iterations"] == 1
    rest_em.main(["--resume", str(tmp_path / "cut"), "--iterations", "2"])
    strip = lambda run: [{k: v for k, v in json.loads(l).items() if "time" not in k and k != "tokens_per_s"}
                         for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "straight") == strip(tmp_path / "cut")  # same seed, same metrics, across the resume
    assert [r["step"] for r in strip(tmp_path / "cut")] == [0, 1, 1, 2, 2]
    assert (tmp_path / "cut" / "estep_iter2.jsonl").exists()
    with pytest.raises(SystemExit, match="no completed iteration"):
        rest_em.main([*common_args, "--iterations", "1", "--no-save", "--output-dir", str(tmp_path / "nosave")])
        rest_em.main(["--resume", str(tmp_path / "nosave")])


def test_end_to_end_on_embedded_model(embedded_model_dir, tmp_path):
    out = tmp_path / "run"
    evals = rest_em.main(["--iterations", "1", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens",
                          "16", "--steps", "1", "--eval-size", "2", "--eval-samples", "2", "--pass-k", "2",
                          "--output-dir", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    iters = [r for r in records if "reward" in r]
    assert [r["step"] for r in iters] == [1] and {"kept", "solved", "loss", "step_time", "m_steps"} <= set(iters[0])
    assert [r["step"] for r in evals] == [0, 1]
    assert all({"eval/accuracy", "eval/sampled_accuracy", "eval/pass@k", "eval/maj@k", "eval/train_accuracy"} <= set(r)
               for r in evals)
    assert (out / "estep_iter1.jsonl").exists() and (out / "samples.jsonl").exists()
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.num_hidden_layers == 30
    assert not list(out.glob(".model.tmp*"))  # the atomic write left no temp dir behind


@pytest.mark.parametrize("argv, message", [
    (["--pass-k", "8", "--eval-samples", "4"], "--pass-k 8 must be <= --eval-samples 4"),
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
])
def test_bad_flags_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        rest_em.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_resume_of_a_non_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="error: --resume .*no args.json"):
        rest_em.parse_args(["--resume", str(tmp_path)])


def test_non_binary_reward_is_a_clear_error(tiny_model_dir, tmp_path):
    (tmp_path / "half.py").write_text("def half(prompts, completions, records):\n    return [0.5] * len(completions)\n")
    with pytest.raises(SystemExit, match="ReST-EM needs a binary reward"):
        rest_em.main(["--model", tiny_model_dir, "--reward-fn", f"{tmp_path / 'half.py'}:half", "--iterations", "1",
                      "--output-dir", str(tmp_path / "run"), *TINY])
