"""em.py: entropy, loss and skewness against hand values; the loss (chunked tau-entropy through completion_logprobs,
with gradient) against a plain full-softmax entropy in value and gradient; the mask on a left-padded batch with an
EOS against a per-row plain forward (a test that catches the reference code's padding leak and off-by-one); the
chunked eval diagnostics against full logits; prompt selection; a learning test; an end-to-end run; bad input.
(The sampler, top-p and the repetition penalty are tested once on grpo.py's copy in tests/test_shared.py.)"""
import argparse
import json
import math

import pytest
import torch

import common
import em

CPU = torch.device("cpu")


def moments_of(logits):
    """(N, V) -> (N, 3) float64: each row's mean and sums of squared and cubed deviations (em.logit_diagnostics)."""
    x = logits.double()
    d = x - x.mean(-1, keepdim=True)
    return torch.stack([x.mean(-1), (d ** 2).sum(-1), (d ** 3).sum(-1)], -1)


def full_skewness(x):
    """Sample skewness (biased, as scipy.stats.skew) of the values along the last dimension."""
    d = x.double() - x.double().mean(-1, keepdim=True)
    return (d ** 3).mean(-1) / (d ** 2).mean(-1) ** 1.5


# ---- entropy, loss, skewness: hand values ---------------------------------------------------------------
def test_entropy_of_known_distributions():
    assert em.token_entropy(torch.zeros(4)).item() == pytest.approx(math.log(4))  # uniform
    p = torch.tensor([0.5, 0.25, 0.25])
    assert em.token_entropy(p.log()).item() == pytest.approx(1.5 * math.log(2))  # -sum p log p
    q = torch.tensor([4.0, 1, 1]) / 6  # tau = 0.5 squares the probabilities: q = p^2 / sum p^2
    assert em.token_entropy(p.log(), tau=0.5).item() == pytest.approx(float(-(q * q.log()).sum()))
    assert em.token_entropy(torch.tensor([0.0, -1e4])).item() == pytest.approx(0, abs=1e-6)  # one-hot: 0


def test_em_loss_is_the_masked_token_mean():
    H = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    loss = em.em_loss(H, mask, mask.sum())
    assert loss.item() == pytest.approx((1 + 2 + 4) / 3)
    assert em.em_loss(H, mask, 7.0).item() == pytest.approx(7 / 7)  # the whole batch's normalizer
    halves = em.em_loss(H[:1], mask[:1], 3.0) + em.em_loss(H[1:], mask[1:], 3.0)
    assert halves.item() == pytest.approx(loss.item())  # micro-batches add up to the batch loss
    loss.backward()
    assert torch.allclose(H.grad, torch.tensor([[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]]))


def test_logit_skewness_hand_value():
    logits = torch.tensor([[0.0, 0, 0, 3], [3.0, 0, 0, 0]])
    per_position, pooled = em.logit_skewness(moments_of(logits), 4)
    assert per_position.tolist() == pytest.approx([2 / math.sqrt(3)] * 2)  # m3 / m2^1.5 = 2.53125 / 1.6875^1.5
    assert pooled == pytest.approx(2 / math.sqrt(3))
    assert em.logit_skewness(moments_of(torch.tensor([[-3.0, 0, 0, 0]])), 4)[0].item() == pytest.approx(-2 / 3 ** 0.5)
    # rows with different means: the pooled value combines the rows' moments exactly (all 2 x 5 values at once)
    rows = torch.tensor([[0.0, 1, 2, 3, 10], [5.0, 5, 6, 9, -1]])
    assert em.logit_skewness(moments_of(rows), 5)[1] == pytest.approx(full_skewness(rows.flatten()).item())


def test_gradient_flows_only_through_generated_positions():
    logits = torch.randn(2, 4, 7, requires_grad=True)  # (B, T, V)
    lens = torch.tensor([3, 1])  # row 0: 3 tokens (the 3rd is the EOS), then padding; row 1: only an EOS
    mask = em.completion_mask_from_lens(lens, 4)
    em.em_loss(em.token_entropy(logits, 0.5), mask, mask.sum()).backward()
    has_grad = logits.grad.abs().sum(-1) > 0  # (B, T)
    assert has_grad.tolist() == [[True, True, True, False], [True, False, False, False]]


# ---- the loss on a real forward: chunked, with gradient, left padding, EOS, exact positions ----------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = common.load_tokenizer(tiny_model_dir)
    return common.load_model(tiny_model_dir, CPU).eval(), tok


def _batch(tok):
    """Two prompts (the first left-padded), G = 2 completions each, of lengths 3, 5 (truncated, no EOS), 1, 4."""
    eos = tok.eos_token_id
    ids, mask = common.tokenize_prompts(tok, ["Q: 1+1?", "Question: what is 12 + 34?"], CPU)
    assert mask[0, 0] == 0 and mask[1].all()
    completions = torch.randint(2, 80, (4, 5), generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([3, 5, 1, 4])
    for i, n in enumerate(lens.tolist()):
        completions[i, n - 1] = eos if i != 1 else completions[i, n - 1]
        completions[i, n:] = eos  # padding after the end is the EOS id, like generate() writes it
    return ids, mask, completions, lens, torch.tensor([0, 0, 1, 1])


def em_batch_loss(model, ids, mask, completions, lens, index, tau, **kw):
    """em.py's loss on one batch: the tau-entropy from the chunked forward, with gradient, token-mean."""
    cmask = em.completion_mask_from_lens(lens, completions.shape[1])
    _, entropy = em.completion_logprobs(model, ids, mask, completions, index, tau, entropy_grad=True, **kw)
    return em.em_loss(entropy, cmask, cmask.sum()), entropy


def plain_entropy_loss(model, ids, mask, completions, lens, index, tau):
    """Reference: one padded forward over [prompt; completion], FULL (B, T, V) logits, H = -sum q log q."""
    seq = torch.cat([ids[index], completions], 1)
    attn = torch.cat([mask[index], torch.ones_like(completions)], 1)
    logits = model(input_ids=seq, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
    z = logits[:, ids.shape[1] - 1:-1].float() / tau  # (B, T, V): position Lp - 1 + t predicts token t
    entropy = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    cmask = em.completion_mask_from_lens(lens, completions.shape[1])
    return (entropy * cmask).sum() / cmask.sum()


@pytest.mark.parametrize("chunk_tokens, checkpointing", [(512, False), (3, False), (1, True)])
def test_chunked_entropy_loss_equals_full_softmax_entropy_value_and_grad(tiny_model_dir, tiny, chunk_tokens,
                                                                         checkpointing):
    model = tiny[0] if not checkpointing else common.load_model(tiny_model_dir, CPU, gradient_checkpointing=True)
    ids, mask, completions, lens, index = _batch(tiny[1])

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    ours, ours_grads = loss_and_grads(lambda: em_batch_loss(model, ids, mask, completions, lens, index, 0.5,
                                                            chunk_tokens=chunk_tokens)[0])
    ref, ref_grads = loss_and_grads(lambda: plain_entropy_loss(model, ids, mask, completions, lens, index, 0.5))
    model.zero_grad()
    assert ours == pytest.approx(ref, rel=1e-5)
    assert sum(float(g.abs().sum()) for g in ref_grads) > 0
    for a, b in zip(ours_grads, ref_grads):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-7


def _entropies_per_row(model, ids, mask, completions, lens, G, tau, shift=0, leak=False):
    """Hand reference: one plain forward per row over its UNPADDED [prompt; completion]. Sequence positions
    P-1 .. P+n-2 produced completion tokens 0..n-1. shift=1 mimics the code's off-by-one (positions P .. P+n-1);
    leak=True mimics its left-padding bug (mask from the non-pad prompt length on the PADDED sequence)."""
    out = []
    for i in range(len(completions)):
        p, n = i // G, int(lens[i])
        prompt = ids[p][mask[p].bool()] if not leak else ids[p]
        P = int(mask[p].sum())  # what the code calls prompt_len: non-pad tokens
        seq = torch.cat([prompt, completions[i, :n]])[None]
        attn = torch.ones_like(seq) if not leak else torch.cat([mask[p], torch.ones(n, dtype=mask.dtype)])[None]
        logits = model(input_ids=seq, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits[0]
        logits = torch.cat([logits, logits[-1:]]).float()  # room for shift=1's past-the-end position
        out.append(em.token_entropy(logits[P - 1 + shift:P - 1 + shift + n], tau))
    return out


def test_loss_equals_hand_masked_mean_with_left_padding_and_eos(tiny):
    model, tok = tiny
    ids, mask, completions, lens, index = _batch(tok)
    tau = 0.1  # a sharp tau spreads the near-uniform tiny model's entropies apart, so wrong positions show
    rows = lambda **bug: _entropies_per_row(model, ids, mask, completions, lens, 2, tau, **bug)
    with torch.no_grad():
        loss, H = em_batch_loss(model, ids, mask, completions, lens, index, tau)
        cmask = em.completion_mask_from_lens(lens, completions.shape[1])
        right = rows()
        assert sum(map(len, right)) == int(lens.sum())  # the EOS positions are in, the padding after them is not
        assert torch.allclose(H[cmask.bool()], torch.cat(right), atol=1e-4)  # position by position
        assert loss.item() == pytest.approx(torch.cat(right).mean().item(), rel=1e-5)
        for bug in (dict(shift=1), dict(leak=True)):  # the reference code's suspected bugs give other numbers
            wrong = rows(**bug)
            assert max((a - b).abs().max().item() for a, b in zip(wrong, right)) > 0.5, bug
            assert abs(torch.cat(wrong).mean().item() - loss.item()) > 0.1, bug
        ends_in_eos = [completions[i, int(lens[i]) - 1] == tok.eos_token_id for i in range(len(lens))]
        no_eos = torch.cat([h[:-1] if e else h for h, e in zip(right, ends_in_eos)])  # a `!= pad_id` mask
        assert abs(no_eos.mean().item() - loss.item()) > 1e-3


def test_padding_tokens_do_not_change_loss_or_gradient(tiny):
    model, tok = tiny
    ids, mask, completions, lens, index = _batch(tok)
    cmask = em.completion_mask_from_lens(lens, completions.shape[1])

    def loss_and_grads(ids, completions):
        model.zero_grad()
        loss = em_batch_loss(model, ids, mask, completions, lens, index, 0.5)[0]
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    base_loss, base_grads = loss_and_grads(ids, completions)
    other_ids, other_completions = ids.clone(), completions.clone()
    other_ids[mask == 0] = 7  # different left-pad token ids
    other_completions[cmask == 0] = 9  # different tokens after each EOS
    loss, grads = loss_and_grads(other_ids, other_completions)
    assert loss == pytest.approx(base_loss, abs=1e-6)
    for a, b in zip(grads, base_grads):
        assert torch.allclose(a, b, atol=1e-6)
    model.zero_grad()


@pytest.mark.parametrize("chunk_tokens", [1, 4, 256])
def test_chunked_diagnostics_equal_the_full_logits(tiny, chunk_tokens):
    model, tok = tiny
    ids, mask, completions, lens, _ = _batch(tok)
    ids, mask, completions, lens = ids[[0, 1]], mask[[0, 1]], completions[[0, 3]], lens[[0, 3]]  # one per prompt
    stats = em.logit_diagnostics(model, ids, mask, completions, lens, 0.5, chunk_tokens=chunk_tokens)
    with torch.no_grad():  # reference: full logits of the generated positions, every statistic at once
        seq, attn = torch.cat([ids, completions], 1), torch.cat([mask, torch.ones_like(completions)], 1)
        logits = model(input_ids=seq, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
        logits = logits[:, ids.shape[1] - 1:-1][em.completion_mask_from_lens(lens, completions.shape[1]).bool()]
    assert len(logits) == int(lens.sum()) == 7
    entropy = lambda z: -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1).mean().item()
    assert stats["eval/entropy"] == pytest.approx(entropy(logits), rel=1e-5)
    assert stats["eval/entropy_tau"] == pytest.approx(entropy(logits / 0.5), rel=1e-5)
    assert stats["eval/logit_skew"] == pytest.approx(full_skewness(logits).mean().item(), rel=1e-5)
    assert stats["eval/logit_skew_pooled"] == pytest.approx(full_skewness(logits.flatten()).item(), rel=1e-5)


# ---- prompt selection --------------------------------------------------------------------------------------
def test_selection_picks_the_highest_accuracy_variance(tiny, monkeypatch, tmp_path):
    model, tok = tiny
    candidates = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    outcomes = {"1": [1] * 8, "2": [0] * 8, "3": [1, 1, 0, 0, 0, 0, 0, 0], "4": [1, 0, 1, 0, 1, 0, 0, 1]}
    calls = {}

    def fake_grade(text, answer):  # the k-th sample of a candidate is right iff outcomes[answer][k]
        calls[answer] = calls.get(answer, -1) + 1
        return bool(outcomes[answer][calls[answer]])

    monkeypatch.setattr(em.common, "grade", fake_grade)
    args = em.parse_args(["--select-samples", "8", "--max-new-tokens", "2", "--num-prompts", "2"])
    pool = em.select_prompts(model, tok, candidates, lambda r: r["question"], args, [tok.eos_token_id],
                             lambda: torch.autocast("cpu", enabled=False), torch.Generator().manual_seed(0), tmp_path)
    ranked = json.loads((tmp_path / "selection.json").read_text())
    assert [r["index"] for r in ranked] == [3, 2, 0, 1]  # variances 0.25, 0.1875, 0, 0 (ties: earlier first)
    assert ranked[0]["accuracy"] == 0.5 and ranked[0]["variance"] == pytest.approx(0.25)
    assert ranked[1]["variance"] == pytest.approx(0.25 * 0.75)
    assert pool == [candidates[3], candidates[2]]


# ---- learning, determinism, end to end, bad input ----------------------------------------------------------
def _step_records(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


TINY = ["--prompt-index", "0", "--steps", "8", "--prompts-per-step", "2", "--num-generations", "8",
        "--max-new-tokens", "8", "--eval-every", "0", "--eval-size", "4", "--eval-temperatures", "0", "--no-save",
        "--seed", "0", "--dtype", "float32"]


def test_learning_entropy_on_the_training_prompt_falls(tiny_model_dir, tmp_path):
    def entropies(lr):
        em.main(["--model", tiny_model_dir, "--lr", lr, "--output-dir", str(tmp_path / lr)] + TINY)
        return [r["loss"] for r in _step_records(tmp_path / lr)]

    learned, frozen = entropies("3e-2"), entropies("1e-12")
    assert learned[-1] < 0.7 * learned[0], learned  # tau-entropy on fresh samples of the training prompt
    assert frozen[-1] > 0.9 * frozen[0], frozen  # a learning rate of ~0 cannot pass the check above


def test_same_seed_same_metrics(tiny_model_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        em.main(["--model", tiny_model_dir, "--steps", "2", "--prompts-per-step", "2", "--num-generations", "3",
                 "--max-new-tokens", "6", "--eval-every", "1", "--eval-size", "4", "--select-from", "3",
                 "--select-samples", "2", "--num-prompts", "2", "--output-dir", str(tmp_path / name), "--no-save"])
        runs.append([{k: v for k, v in json.loads(line).items() if "time" not in k and k != "tokens_per_s"}
                     for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
        assert len(json.loads((tmp_path / name / "selection.json").read_text())) == 3
    assert runs[0] == runs[1]


def test_end_to_end_on_embedded_model(embedded_model_dir, tmp_path):
    out = tmp_path / "run"
    before, after = em.main(["--steps", "2", "--prompts-per-step", "1", "--num-generations", "2", "--max-new-tokens",
                             "12", "--eval-size", "4", "--eval-every", "1", "--select-from", "2", "--select-samples",
                             "2", "--eval-temperatures", "0,1.0", "--output-dir", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2]
    keys = {"reward", "correct", "loss", "entropy", "truncated", "completion_len", "samples_used", "tokens_used",
            "updates", "grad_norm", "lr", "gen_time", "train_time", "step_time", "tokens_per_s"}
    assert all(keys <= r.keys() and r["reward"] is None and 0 <= r["correct"] <= 1 for r in steps)
    assert all(r["entropy"] == r["loss"] and r["updates"] == 1 for r in steps)
    assert [r["step"] for r in evals] == [0, 1, 2] and all("eval/sampled_accuracy" in r for r in evals)
    for r in (evals[0], evals[-1]):  # before and after carry the sweep and the diagnostics
        assert {"eval/accuracy_T0", "eval/accuracy_T1", "eval/entropy", "eval/logit_skew"} <= r.keys()
    assert "eval/accuracy_T1" not in evals[1]  # intermediate evals: greedy + training temperature only
    assert json.loads((out / "args.json").read_text())["num_generations"] == 2
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
    flags = numeric_flags(em.parse_args, monkeypatch)
    assert len(flags) >= 20 and ("--entropy-temperature", float) in flags
    for flag, kind in flags:
        if flag == "--seed":  # any integer is a seed
            continue
        with pytest.raises(SystemExit) as e:
            em.parse_args([flag, "-1" if kind is int else "nan"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{flag} must be" in err and "Traceback" not in err, (flag, err)


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--entropy-temperature", "0"], "--entropy-temperature must be > 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-p", "0"], "--top-p must be > 0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--select-from", "2", "--num-prompts", "3"], "--select-from 2 must be >= --num-prompts 3"),
    (["--select-from", "3", "--prompt-index", "3"], "not allowed with argument"),
    (["--eval-temperatures", "0,hot"], "expected comma-separated numbers"),
    (["--eval-temperatures", "0,-1"], "expected comma-separated numbers >= 0"),
    (["--dtype", "fp8"], "invalid choice"),
])
def test_bad_flags_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        em.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_prompt_index_dataset_and_context_give_clear_errors(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="error: --prompt-index 99999 .* out of range"):
        em.main(["--model", tiny_model_dir, "--prompt-index", "99999", "--output-dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="not found"):
        em.main(["--dataset", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="exceeds the model's context length"):
        em.main(["--model", tiny_model_dir, "--max-new-tokens", "5000", "--prompt-index", "0", "--eval-size", "2",
                 "--output-dir", str(tmp_path / "c")])
