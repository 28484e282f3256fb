"""The plumbing every script shares, tested once on grpo.py's copy (tests/test_consistency.py checks that every
other script's copy is byte-identical): the sampler, the training forward (prefix sharing, chunked vocabulary
projection, gradient checkpointing), micro-batches, masks, the precision policy and the stop tokens."""
import pytest
import torch

import common
import grpo
from conftest import build_tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = common.load_tokenizer(tiny_model_dir)
    model = common.load_model(tiny_model_dir, CPU)
    return model.eval(), tok


@pytest.fixture(scope="module")
def big_vocab_dir(tmp_path_factory):
    """A 1-layer model over a 120k-token vocabulary: the chunking matters only where V is large."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=120_000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=1, pad_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("bigvocab") / "model"
    LlamaForCausalLM(config).save_pretrained(out)
    return str(out)


def plain_logprobs(model, prompt_ids, prompt_mask, completion_ids, prompt_index, temperature=1.0):
    """Reference: one forward over [prompt; completion] per completion, full-vocabulary log-softmax."""
    ids = torch.cat([prompt_ids[prompt_index], completion_ids], 1)
    mask = torch.cat([prompt_mask[prompt_index], torch.ones_like(completion_ids)], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    logits = logits[:, prompt_ids.shape[1] - 1:-1].float() / temperature
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, completion_ids[..., None]).squeeze(-1), entropy


def grads_of(model, fn):
    model.zero_grad()
    fn().backward()
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out


# ---- the training forward ------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt_index", [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 2]])  # GRPO groups, RAFT's kept rows
def test_prefix_shared_forward_equals_plain_forward_values_and_grads(tiny, prompt_index):
    model, tok = tiny
    ids, mask = common.tokenize_prompts(tok, ["Question: 1+1?\nAnswer:", "Q: 22 + 33 = ?", "Q: 5*5"], CPU)
    index = torch.tensor(prompt_index)
    completions = torch.randint(2, 80, (6, 5), generator=torch.Generator().manual_seed(0))
    weights = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    lp, ent = grpo.completion_logprobs(model, ids, mask, completions, index, 0.7)
    ref_lp, ref_ent = plain_logprobs(model, ids, mask, completions, index, 0.7)
    assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    ours = grads_of(model, lambda: (grpo.completion_logprobs(model, ids, mask, completions, index, 0.7)[0]
                                    * weights).sum())
    plain = grads_of(model, lambda: (plain_logprobs(model, ids, mask, completions, index, 0.7)[0] * weights).sum())
    for a, b in zip(ours, plain):
        assert torch.allclose(a, b, atol=1e-5)


def test_left_padding_does_not_change_completion_logprobs(tiny):
    model, tok = tiny
    short, long = "Q: 1+1?", "Question: what is 12 + 34? Think first."
    completions = torch.randint(2, 80, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ids, mask = common.tokenize_prompts(tok, [short], CPU)
        alone, _ = grpo.completion_logprobs(model, ids, mask, completions, torch.tensor([0, 0]), 0.7)
        ids, mask = common.tokenize_prompts(tok, [short, long], CPU)
        assert mask[0, 0] == 0  # the short prompt really is left-padded
        batched, _ = grpo.completion_logprobs(model, ids, mask, torch.cat([completions, completions]),
                                              torch.tensor([0, 0, 1, 1]), 0.7)
    assert torch.allclose(alone, batched[:2], atol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64])
def test_chunked_vocabulary_projection_equals_plain_at_large_vocab(big_vocab_dir, chunk_tokens):
    """V = 120k, T = 0.6, padded prompts and completions of different lengths: values and gradients (also
    through the entropy) equal the plain full-logits path, for chunks smaller than, across and above a row."""
    model = common.load_model(big_vocab_dir, CPU).eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 120_000, (2, 6), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    completions = torch.randint(2, 120_000, (4, 9), generator=gen)
    cmask = grpo.completion_mask_from_lens(torch.tensor([9, 4, 7, 1]), 9)
    index = torch.tensor([0, 0, 1, 1])
    lp, ent = grpo.completion_logprobs(model, ids, mask, completions, index, 0.6, chunk_tokens=chunk_tokens)
    ref_lp, ref_ent = plain_logprobs(model, ids, mask, completions, index, 0.6)
    assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    loss = lambda lp_ent: ((lp_ent[0] - 0.3 * lp_ent[1]) * cmask).sum()
    ours = grads_of(model, lambda: loss(grpo.completion_logprobs(model, ids, mask, completions, index, 0.6,
                                                                 entropy_grad=True, chunk_tokens=chunk_tokens)))
    plain = grads_of(model, lambda: loss(plain_logprobs(model, ids, mask, completions, index, 0.6)))
    for a, b in zip(ours, plain):  # fp32 summation order differs between chunkings: relative to the largest entry
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-7


def test_chunked_projection_never_holds_the_full_logits(big_vocab_dir):
    """The backward keeps one chunk of logits, not (B*T, V): the saved tensors stay far below B*T*V floats."""
    model = common.load_model(big_vocab_dir, CPU).eval()
    ids, mask = torch.randint(2, 120_000, (1, 4)), torch.ones(1, 4, dtype=torch.long)
    completions = torch.randint(2, 120_000, (8, 32))
    saved = []
    pack = lambda t: saved.append(t.numel()) or t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, _ = grpo.completion_logprobs(model, ids, mask, completions, torch.zeros(8, dtype=torch.long), 1.0,
                                         chunk_tokens=16)
    assert max(saved) < 8 * 32 * 120_000 / 4  # the largest saved tensor is the weight matrix, not the logits
    lp.sum().backward()


def test_gradient_checkpointing_equals_plain_path_with_prefix_sharing(tiny_model_dir, tiny):
    model, tok = tiny
    ckpt = common.load_model(tiny_model_dir, CPU, gradient_checkpointing=True).eval()
    ids, mask = common.tokenize_prompts(tok, ["Q: 1+1?", "Question: 12 + 34?"], CPU)
    completions = torch.randint(2, 80, (4, 6), generator=torch.Generator().manual_seed(4))
    index = torch.tensor([0, 0, 1, 1])
    fn = lambda m: lambda: grpo.completion_logprobs(m, ids, mask, completions, index, 1.0)[0].sum()
    for a, b in zip(grads_of(model, fn(model)), grads_of(ckpt, fn(ckpt))):
        assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():  # sampling with the cache still works on the checkpointed model
        out, lens = grpo.generate(ckpt, ids, mask, 2, 5, 0.0, [tok.eos_token_id], None)
        ref, ref_lens = grpo.generate(model, ids, mask, 2, 5, 0.0, [tok.eos_token_id], None)
    assert torch.equal(out, ref) and torch.equal(lens, ref_lens)


def test_gradient_checkpointing_recomputes_instead_of_saving(tiny_model_dir, tiny):
    model, tok = tiny
    ckpt = common.load_model(tiny_model_dir, CPU, gradient_checkpointing=True).eval()
    ids, mask = common.tokenize_prompts(tok, ["Question: 12 + 34?"], CPU)
    completions = torch.randint(2, 80, (4, 40))

    def saved_floats(m):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            grpo.completion_logprobs(m, ids, mask, completions, torch.zeros(4, dtype=torch.long), 1.0)
        return sum(sizes)
    assert saved_floats(ckpt) < 0.6 * saved_floats(model)


def test_micro_batches_give_the_full_batch_gradient(tiny):
    model, tok = tiny
    G = 2
    ids, mask = common.tokenize_prompts(tok, ["Q: 1+1?", "Q: 2+2 is", "Question: 7*8?"], CPU)
    completions = torch.randint(2, 80, (6, 5), generator=torch.Generator().manual_seed(2))
    lens = torch.tensor([5, 3, 4, 5, 1, 2])
    cmask = grpo.completion_mask_from_lens(lens, 5)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    norms = dict(num_seqs=6, num_tokens=cmask.sum(), max_len=8)
    batches = grpo.micro_batches(list(range(6)), G, 2, lens)
    assert [b[0] for b in batches] == [[0, 1], [2]] and [b[3] for b in batches] == [5, 2]  # trimmed to longest
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        def full():
            lp, _ = grpo.completion_logprobs(model, ids, mask, completions, torch.arange(3).repeat_interleave(G), 1.0)
            return grpo.grpo_loss(lp, lp.detach(), adv, cmask, loss_type, **norms)[0]

        def accumulated():
            total = 0
            for ps, prompt_index, r, T in batches:
                lp, _ = grpo.completion_logprobs(model, ids[ps], mask[ps], completions[r, :T], prompt_index, 1.0)
                total = total + grpo.grpo_loss(lp, lp.detach(), adv[r], cmask[r, :T], loss_type, **norms)[0]
            return total
        for a, b in zip(grads_of(model, full), grads_of(model, accumulated)):
            assert torch.allclose(a, b, atol=1e-6), loss_type


def test_micro_batches_with_uneven_rows_per_prompt():
    lens = torch.tensor([3, 1, 2, 2, 5, 1, 1, 4])  # G = 4: prompt 0 rows 0-3, prompt 1 rows 4-7
    ps, prompt_index, r, T = grpo.micro_batches([1, 2, 5, 7], 4, 8, lens)[0]
    assert ps == [0, 1] and prompt_index.tolist() == [0, 0, 1, 1] and r.tolist() == [1, 2, 5, 7] and T == 4


def test_frozen_logprobs_fill_only_their_rows(tiny):
    model, tok = tiny
    ids, mask = common.tokenize_prompts(tok, ["Q: 1+1?", "Q: 2+2 is"], CPU)
    completions = torch.randint(2, 80, (4, 3), generator=torch.Generator().manual_seed(5))
    lens = torch.tensor([3, 2, 3, 1])
    batches = grpo.micro_batches([0, 1, 3], 2, 1, lens)
    no_autocast = lambda: torch.autocast("cpu", enabled=False)
    lp, _ = grpo.frozen_logprobs(model, batches, ids, mask, completions, 1.0, no_autocast)
    ref, _ = plain_logprobs(model, ids, mask, completions, torch.tensor([0, 0, 1, 1]))
    assert not lp.requires_grad and lp[2].abs().sum() == 0
    assert torch.allclose(lp[0], ref[0], atol=1e-5) and torch.allclose(lp[1, :2], ref[1, :2], atol=1e-5)
    assert torch.allclose(lp[3, :1], ref[3, :1], atol=1e-5)


# ---- masks ----------------------------------------------------------------------------------------------
def test_completion_mask_from_lens():
    assert grpo.completion_mask_from_lens(torch.tensor([3, 1]), 4).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_eos_stays_in_the_loss_mask_when_pad_is_eos(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos  # the trap this test is about
    ids, mask = common.tokenize_prompts(tok, ["Q: 1+1?"], CPU)
    out, lens = grpo.generate(model, ids, mask, 32, 16, 1.0, [eos], torch.Generator().manual_seed(0))
    cmask = grpo.completion_mask_from_lens(lens, out.shape[1])
    finished = ~grpo.truncated_rows(out, lens, [eos])
    assert finished.any() and (~finished).any()
    assert (cmask * (out == eos)).sum(1).tolist() == finished.float().tolist()  # one masked EOS per finished row
    assert torch.equal(cmask.sum(1), lens.float())
    naive = (out != tok.pad_token_id).float()  # `ids != pad_id` would have dropped exactly those EOS tokens
    assert (cmask.sum() - (naive * cmask).sum()).item() == finished.sum().item()


# ---- the sampler ----------------------------------------------------------------------------------------
def next_token_probs(model, tok, prompt, temperature):
    ids, mask = common.tokenize_prompts(tok, [prompt], CPU)
    with torch.no_grad():
        return torch.softmax(model(input_ids=ids, attention_mask=mask).logits[0, -1].float() / temperature, -1)


def first_tokens(model, tok, prompt, n, **kw):
    ids, mask = common.tokenize_prompts(tok, [prompt], CPU)
    out, _ = grpo.generate(model, ids, mask, n, 1, kw.pop("temperature", 1.0), [tok.eos_token_id],
                           torch.Generator().manual_seed(0), **kw)
    return torch.bincount(out[:, 0], minlength=len(tok)).float() / n


def test_sampling_matches_softmax_of_logits_over_temperature(tiny):
    model, tok = tiny
    for temperature in (0.5, 1.0, 2.0):
        expected = next_token_probs(model, tok, "Q: 3+4?", temperature)
        empirical = first_tokens(model, tok, "Q: 3+4?", 20_000, temperature=temperature)
        assert 0.5 * (empirical - expected).abs().sum() < 0.03, temperature  # total variation


def test_top_k_and_top_p_masks(tiny):
    model, tok = tiny
    probs = next_token_probs(model, tok, "Q: 3+4?", 1.0)
    top5 = probs.topk(5).indices
    empirical = first_tokens(model, tok, "Q: 3+4?", 20_000, top_k=5)
    assert set(empirical.nonzero().squeeze(1).tolist()) <= set(top5.tolist())
    renorm = torch.zeros_like(probs).index_copy(0, top5, probs[top5] / probs[top5].sum())
    assert 0.5 * (empirical - renorm).abs().sum() < 0.03
    sorted_p, order = probs.sort(descending=True)
    nucleus = order[:int((sorted_p.cumsum(0) - sorted_p < 0.5).sum())]  # smallest prefix with mass >= 0.5
    empirical = first_tokens(model, tok, "Q: 3+4?", 20_000, top_p=0.5)
    assert set(empirical.nonzero().squeeze(1).tolist()) == set(nucleus.tolist())


def test_greedy_is_argmax_and_finished_rows_leave_the_batch(tiny):
    model, tok = tiny
    with torch.no_grad():  # two prompts whose first greedy tokens differ
        candidates = ["Q: 1+1?", "Question: 12 + 34?", "Q: 9", "What is 5*5?", "Q: 7-2 =", "x"]
        first = [model(**tok(c, return_tensors="pt")).logits[0, -1].argmax().item() for c in candidates]
    pair = next((a, b) for a in range(6) for b in range(6) if first[a] not in (first[b], tok.eos_token_id))
    ids, mask = common.tokenize_prompts(tok, [candidates[pair[0]], candidates[pair[1]]], CPU)
    for eos in (tok.eos_token_id, None):  # None: stop on the first greedy token of prompt 0, so that row finishes
        stop = [eos if eos is not None else first[pair[0]]]
        out, lens = grpo.generate(model, ids, mask, 1, 6, 0.0, stop, None)
        for i in range(2):  # each row equals plain argmax decoding of its prompt alone, up to and including its stop
            seq = ids[i][mask[i].bool()][None]
            for t in range(int(lens[i])):
                with torch.no_grad():
                    nxt = model(input_ids=seq).logits[0, -1].argmax()
                assert nxt == out[i, t]
                seq = torch.cat([seq, nxt.view(1, 1)], 1)
            assert (out[i, lens[i]:] == stop[0]).all()  # after the stop: padding
    assert lens[0] == 1 and lens[1] > 1  # the finished row left; the other went on


def test_repetition_penalty_follows_hf(tiny):
    from transformers import RepetitionPenaltyLogitsProcessor
    model, tok = tiny
    ids, mask = common.tokenize_prompts(tok, ["Q: 11+11?"], CPU)
    out, _ = grpo.generate(model, ids, mask, 1, 1, 0.0, [tok.eos_token_id], None, repetition_penalty=5.0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    assert out[0, 0] == RepetitionPenaltyLogitsProcessor(5.0)(ids, logits).argmax()


# ---- precision, stop tokens, context length ----------------------------------------------------------
def test_default_precision_keeps_small_updates(tiny_model_dir, tiny):
    """One AdamW step at lr 1e-6 under the default policy changes >= 99% of the elements that got a gradient;
    with bf16 weights (the opt-in) most of them round away."""
    _, tok = tiny
    ids, mask = common.tokenize_prompts(tok, ["Q: 1+1?"], CPU)
    changed = {}
    for dtype in ("bfloat16", "pure-bfloat16"):  # bf16 autocast over fp32 masters vs bf16 weights
        weight_dtype, autocast_dtype = common.resolve_dtype(dtype, CPU)
        model = common.load_model(tiny_model_dir, CPU, weight_dtype)
        before = [p.detach().clone() for p in model.parameters()]
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = model(input_ids=ids, attention_mask=mask).logits.float().logsumexp(-1).mean()
        loss.backward()
        has_grad = [p.grad != 0 for p in model.parameters()]
        torch.optim.AdamW(model.parameters(), lr=1e-6).step()
        moved = sum(int(((p.detach() != b) & g).sum()) for p, b, g in zip(model.parameters(), before, has_grad))
        changed[dtype] = moved / sum(int(g.sum()) for g in has_grad)
    changed["auto"] = changed["bfloat16"]  # auto differs only in whether autocast is on: masters are fp32 either way
    assert changed["auto"] >= 0.99 and changed["pure-bfloat16"] < 0.5, changed


def test_pure_bf16_warns_and_bad_dtype_is_one_line(capsys):
    assert common.resolve_dtype("pure-bfloat16", CPU) == (torch.bfloat16, None)
    assert "round away" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--dtype fp8"):
        common.resolve_dtype("fp8", CPU)


def test_stop_tokens_include_the_end_of_turn_token(tmp_path):
    """A tokenizer whose EOS (<|endoftext|>) differs from the token that ends a chat turn (<|im_end|>)."""
    from transformers import AutoTokenizer
    path = build_tiny_model(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tok.eos_token = "<|endoftext|>"
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model = common.load_model(str(path), CPU)
    stops = common.stop_token_ids(tok, model)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops and tok.eos_token_id in stops


def test_max_new_tokens_beyond_the_context_is_one_clear_line(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="exceeds the model's context length"):
        grpo.main(["--model", tiny_model_dir, "--max-new-tokens", "5000", "--steps", "1", "--eval-size", "2",
                   "--output-dir", str(tmp_path / "run")])
