"""em.py: entropy and loss against hand-computed values; the loss mask on a left-padded batch with an EOS against a
per-row plain forward (a test that catches the reference code's padding leak and off-by-one); gradients only
through generated positions; the sampler's top-p and repetition penalty against HF; prompt selection; a learning
test; an end-to-end run on the embedded model; bad input."""
import json
import math

import pytest
import torch

import common
import em


# ---- entropy, loss, skewness: hand values ---------------------------------------------------------------
def test_entropy_of_known_distributions():
    uniform = torch.zeros(4)
    assert em.token_entropy(uniform).item() == pytest.approx(math.log(4))
    p = torch.tensor([0.5, 0.25, 0.25])
    assert em.token_entropy(p.log()).item() == pytest.approx(1.5 * math.log(2))  # -sum p log p
    # tau = 0.5 squares the probabilities: q = p^2 / sum p^2 = (4, 1, 1) / 6
    q = torch.tensor([4.0, 1, 1]) / 6
    assert em.token_entropy(p.log(), tau=0.5).item() == pytest.approx(float(-(q * q.log()).sum()))
    assert em.token_entropy(torch.tensor([0.0, -1e4])).item() == pytest.approx(0, abs=1e-6)  # one-hot: 0


def test_em_loss_is_the_masked_token_mean():
    H = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    loss = em.em_loss(H, mask)
    assert loss.item() == pytest.approx((1 + 2 + 4) / 3)
    assert em.em_loss(H, mask, num_tokens=7.0).item() == pytest.approx(7 / 7)  # a whole-batch normalizer wins
    loss.backward()
    assert torch.allclose(H.grad, torch.tensor([[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]]))


def test_logit_skewness_hand_value():
    per_position, pooled = em.logit_skewness(torch.tensor([[0.0, 0, 0, 3], [3.0, 0, 0, 0]]))
    assert per_position.tolist() == pytest.approx([2 / math.sqrt(3)] * 2)  # m3 / m2^1.5 = 2.53125 / 1.6875^1.5
    assert pooled == pytest.approx(2 / math.sqrt(3))
    assert em.logit_skewness(torch.tensor([[-3.0, 0, 0, 0]]))[0].item() == pytest.approx(-2 / math.sqrt(3))


def test_gradient_flows_only_through_generated_positions():
    logits = torch.randn(2, 4, 7, requires_grad=True)  # (B, T, V)
    lens = torch.tensor([3, 1])  # row 0: 3 tokens (the 3rd is the EOS), then padding; row 1: only an EOS
    mask = em.completion_mask_from_lens(lens, 4)
    em.em_loss(em.token_entropy(logits, 0.5), mask).backward()
    has_grad = logits.grad.abs().sum(-1) > 0  # (B, T)
    assert has_grad.tolist() == [[True, True, True, False], [True, False, False, False]]


# ---- the mask on a real forward: left padding, EOS, exact positions ---------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = common.load_tokenizer(tiny_model_dir)
    model = common.load_model(tiny_model_dir, torch.device("cpu"))
    return model.eval(), tok


def _batch(tok):
    eos = tok.eos_token_id
    ids, mask = em.tokenize_prompts(tok, ["Q: 1+1?", "Question: what is 12 + 34?"], "cpu")
    assert mask[0, 0] == 0 and mask[1].all()  # the first prompt is left-padded
    g = torch.Generator().manual_seed(0)
    completions = torch.randint(2, 80, (4, 5), generator=g)  # G = 2 per prompt
    lens = torch.tensor([3, 5, 1, 4])
    for i, n in enumerate(lens.tolist()):
        completions[i, n - 1] = eos if i != 1 else completions[i, n - 1]  # row 1 is truncated (no EOS)
        completions[i, n:] = eos  # padding after the end is the EOS id, like generate() writes it
    return ids, mask, completions, lens


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
        logits = model(input_ids=seq, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits[0].float()
        logits = torch.cat([logits, logits[-1:]])  # room for shift=1's past-the-end position
        out.append(em.token_entropy(logits[P - 1 + shift:P - 1 + shift + n], tau))
    return out


def test_loss_equals_hand_masked_mean_with_left_padding_and_eos(tiny):
    model, tok = tiny
    ids, mask, completions, lens = _batch(tok)
    tau = 0.1  # a sharp tau spreads the near-uniform tiny model's entropies apart, so wrong positions show
    rows = lambda **bug: _entropies_per_row(model, ids, mask, completions, lens, 2, tau, **bug)
    with torch.no_grad():
        H = em.token_entropy(em.completion_logits(model, ids, mask, completions, 2), tau)  # (B, T)
        cmask = em.completion_mask_from_lens(lens, completions.shape[1])
        loss = em.em_loss(H, cmask)
        right = rows()
        assert sum(map(len, right)) == int(lens.sum())  # the EOS positions are in, the padding after them is not
        assert torch.allclose(H[cmask.bool()], torch.cat(right), atol=1e-4)  # position by position
        assert loss.item() == pytest.approx(torch.cat(right).mean().item(), rel=1e-5)
        # the suspected bugs of the reference code give different numbers, so this test would catch them
        for bug in (dict(shift=1), dict(leak=True)):  # off by one; left-pad tail leaking into the mask
            wrong = rows(**bug)
            assert max((a - b).abs().max().item() for a, b in zip(wrong, right)) > 0.5, bug
            assert abs(torch.cat(wrong).mean().item() - loss.item()) > 0.1, bug
        ends_in_eos = [completions[i, int(lens[i]) - 1] == tok.eos_token_id for i in range(len(lens))]
        no_eos = torch.cat([h[:-1] if e else h for h, e in zip(right, ends_in_eos)])  # a `!= pad_id` mask
        assert abs(no_eos.mean().item() - loss.item()) > 1e-3


def test_padding_tokens_do_not_change_loss_or_gradient(tiny):
    model, tok = tiny
    ids, mask, completions, lens = _batch(tok)
    cmask = em.completion_mask_from_lens(lens, completions.shape[1])

    def loss_and_grads(ids, completions):
        model.zero_grad()
        loss = em.em_loss(em.token_entropy(em.completion_logits(model, ids, mask, completions, 2), 0.5), cmask)
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


# ---- the sampler: repetition penalty and top-p against Hugging Face ----------------------------------------
def test_greedy_with_repetition_penalty_matches_hf_generate(tiny):
    model, tok = tiny
    ids, mask = em.tokenize_prompts(tok, ["Q: 1+1?"], "cpu")
    for penalty in (1.0, 1.15, 3.0):
        ours, lens = em.generate(model, ids, mask, 1, 12, 0.0, [tok.eos_token_id], None, repetition_penalty=penalty)
        hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, repetition_penalty=penalty,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        assert ours[0, :int(lens[0])].tolist() == hf[:int(lens[0])].tolist(), penalty


def test_top_p_samples_only_the_nucleus_with_renormalized_probabilities(tiny):
    model, tok = tiny
    ids, mask = em.tokenize_prompts(tok, ["Q: 1+1?"], "cpu")
    T, top_p, n = 0.3, 0.8, 4000
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0, -1].float() / T, -1)
    sorted_p, order = probs.sort(descending=True)
    nucleus = order[:int((sorted_p.cumsum(0) < top_p).sum()) + 1]  # smallest set with mass >= top_p
    out, _ = em.generate(model, ids, mask, n, 1, T, [tok.eos_token_id], torch.Generator().manual_seed(0), top_p=top_p)
    counts = torch.bincount(out[:, 0], minlength=len(probs)).float()
    assert set(out[:, 0].tolist()) <= set(nucleus.tolist()) and len(nucleus) > 1
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert 0.5 * (counts / n - expected).abs().sum() < 0.05  # total variation to the renormalized nucleus
    greedy, _ = em.generate(model, ids, mask, 1, 6, 0.0, [tok.eos_token_id], None)
    tiny_p, _ = em.generate(model, ids, mask, 3, 6, 1.0, [tok.eos_token_id], torch.Generator().manual_seed(1), top_p=1e-6)
    assert all(row.tolist() == greedy[0].tolist() for row in tiny_p[:, :greedy.shape[1]])  # top_p -> 0 is greedy


# ---- prompt selection --------------------------------------------------------------------------------------
def test_selection_picks_the_highest_accuracy_variance(tiny, monkeypatch):
    model, tok = tiny
    candidates = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    outcomes = {"1": [1] * 8, "2": [0] * 8, "3": [1, 1, 0, 0, 0, 0, 0, 0], "4": [1, 0, 1, 0, 1, 0, 0, 1]}
    calls = {}

    def fake_grade(text, answer):  # the k-th sample of a candidate is right iff outcomes[answer][k]
        calls[answer] = calls.get(answer, -1) + 1
        return bool(outcomes[answer][calls[answer]])

    monkeypatch.setattr(em.common, "grade", fake_grade)
    args = em.parse_args(["--select-samples", "8", "--max-new-tokens", "2"])
    ranked = em.select_prompts(model, tok, candidates, lambda r: r["question"], args, [tok.eos_token_id],
                               lambda: torch.autocast("cpu", enabled=False),
                               torch.Generator().manual_seed(0))
    assert [r["index"] for r in ranked] == [3, 2, 0, 1]  # variances 0.25, 0.1875, 0, 0 (ties: earlier first)
    assert ranked[0]["accuracy"] == 0.5 and ranked[0]["variance"] == pytest.approx(0.25)
    assert ranked[1]["variance"] == pytest.approx(0.25 * 0.75)


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

    learned, frozen = entropies("3e-2"), entropies("0")
    assert learned[-1] < 0.7 * learned[0], learned  # tau-entropy on fresh samples of the training prompt
    assert frozen[-1] > 0.9 * frozen[0], frozen  # lr = 0 cannot pass the check above


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
    steps = [r for r in records if "reward" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all({"loss", "entropy", "step_time", "grad_norm", "completion_len"} <= r.keys() for r in steps)
    assert [r["step"] for r in evals] == [0, 1, 2] and all("eval/sampled_accuracy" in r for r in evals)
    for r in (evals[0], evals[-1]):  # before and after carry the sweep and the diagnostics
        assert {"eval/accuracy_T0", "eval/accuracy_T1", "eval/entropy", "eval/logit_skew"} <= r.keys()
    assert "eval/accuracy_T1" not in evals[1]  # intermediate evals: greedy + training temperature only
    assert json.loads((out / "args.json").read_text())["num_generations"] == 2
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.num_hidden_layers == 30
    assert not list(out.glob(".model.tmp*"))  # the atomic write left no temp dir behind


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "0"], "--temperature and --entropy-temperature must be > 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--select-from", "2", "--num-prompts", "3"], "--select-from 2 must be >= --num-prompts 3"),
    (["--prompt", "What is 2+2?", "--num-prompts", "2"], "cannot be combined with --num-prompts"),
    (["--prompt", "x", "--prompt-index", "3"], "not allowed with argument"),
    (["--eval-temperatures", "0,hot"], "expected comma-separated numbers"),
])
def test_bad_flags_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        em.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_prompt_index_and_dataset_give_clear_errors(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="error: --prompt-index 99999 .* out of range"):
        em.main(["--model", tiny_model_dir, "--prompt-index", "99999", "--output-dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="not found"):
        em.main(["--dataset", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "b")])
