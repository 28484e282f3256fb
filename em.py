"""One-shot entropy minimization (EM): unsupervised post-training from a single unlabeled prompt, one readable file.

Paper: Gao et al. 2025, "One-shot Entropy Minimization" (https://arxiv.org/abs/2505.20282); code:
github.com/zitian-gao/one-shot-em `train.py` (L131-163: sampling and loss), `logits_shift.py` (skewness).

Pick one prompt x (the paper: the candidate whose samples' accuracy varies most), sample responses y ~ pi_theta(.|x)
(T = 0.5, top-p 0.95, repetition penalty 1.15; no gradient through sampling) and minimise the entropy of the
model's own next-token distribution at every generated position:
    q_t   = softmax(z_theta(x, y_<t) / tau)                  tau = 0.5: the "entropy temperature" of the code
    H_t   = -sum_v q_t(v) log q_t(v)                         full vocabulary, gradient through every q_t(v)
    loss  = sum_{i,t} M_it H_it / sum_{i,t} M_it             token-mean over the whole batch of samples
M covers exactly the positions that predicted a generated token, the last prompt position through the one that
predicted the EOS. No reward, no label, no KL, no reference model: labels only pick the prompt and evaluate.

    python em.py                                     # embedded SmolLM2-135M-Instruct, built-in arithmetic, CPU
    python em.py --model Qwen/Qwen2.5-Math-7B --dataset HuggingFaceH4/MATH-500 --fewshot 0 --lr 2e-5 \
        --max-new-tokens 512 --prompts-per-step 64 --num-generations 1 --micro-batch-prompts 2   # paper, a GPU
"""
import argparse
import json
import math
import random
import re
import time

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common

ALGO = "em"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # model / data (shared flags: the same meaning in every script of the suite)
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="hub id, local dir, .gguf file, or 'smollm2'")
    p.add_argument("--dataset", default="arith", help="'arith[:add|sub|mul[:DIGITS]]', a local file, or a hub id")
    p.add_argument("--eval-dataset", default=None, help="held-out problems (default: test split, else every 10th row)")
    p.add_argument("--question-key", default=None, help="question column (default: auto-detected)")
    p.add_argument("--answer-key", default=None, help="answer column (default: auto-detected)")
    p.add_argument("--fewshot", type=int, default=None, help="solved examples as earlier chat turns (arith: 1, else 0)")
    p.add_argument("--system-prompt", default=None, help="system message (default: the chat template's own)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "pure-bfloat16"],
                   help="auto/bfloat16: fp32 master weights + bf16 autocast; pure-bfloat16: bf16 weights (warns)")
    common.add_scale_args(p, fsdp=True)  # --gradient-checkpointing, --lora-rank/-alpha/-dropout/-target-modules, --fsdp
    which = p.add_mutually_exclusive_group()
    which.add_argument("--select-from", type=int, default=16, help="N: select among the first N training rows")
    which.add_argument("--prompt-index", type=int, default=None, help="train on row i (--num-prompts N: i..i+N-1)")
    p.add_argument("--select-samples", type=int, default=8, help="k: samples per candidate for its accuracy variance")
    p.add_argument("--num-prompts", type=int, default=1, help="1: one-shot EM; > 1: multi-shot EM over that many")
    # sampling (the paper's code: T 0.5, top-p 0.95, repetition penalty 1.15)
    p.add_argument("--steps", type=int, default=10, help="optimizer updates (paper: ~10), one per generation batch")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompt rows per update (from the selected pool)")
    p.add_argument("--num-generations", type=int, default=8, help="G: completions sampled per prompt row")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion length cap")
    p.add_argument("--temperature", type=float, default=0.5, help="sampling temperature (paper code: 0.5)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling of the training samples (code: 0.95)")
    p.add_argument("--repetition-penalty", type=float, default=1.15, help="HF repetition penalty, training (1.15)")
    p.add_argument("--entropy-temperature", type=float, default=0.5, help="tau: entropy of softmax(logits / tau) (0.5)")
    # optimization
    p.add_argument("--lr", type=float, default=2e-6, help="AdamW learning rate, constant (paper 2e-5; docs/em.md)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up, in optimizer updates (code: none)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (paper code: torch's 0.01)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--micro-batch-prompts", type=int, default=1, help="prompts per forward/backward (accumulation)")
    # evaluation / logging / saving
    p.add_argument("--eval-every", type=int, default=2, help="evaluate every N steps (0: only before and after)")
    p.add_argument("--eval-size", type=int, default=100, help="held-out problems per evaluation")
    p.add_argument("--eval-temperatures", default="0,0.3,0.6,1.0", help="accuracy sweep, before and after training")
    p.add_argument("--diag-size", type=int, default=16, help="held-out prompts for the entropy / skewness diagnostics")
    p.add_argument("--eval-batch-size", type=int, default=64, help="prompts per generation call during eval")
    p.add_argument("--output-dir", default=None, help="default: runs/<algo>__<seed>__<time>")
    p.add_argument("--no-save", action="store_true", help="do not write the final model")
    p.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16"], help="saved weights (default: fp32)")
    args = p.parse_args(argv)
    common.check_args(p, args, at_least_one=("steps", "prompts_per_step", "num_generations", "max_new_tokens",
                      "eval_size", "eval_batch_size", "micro_batch_prompts", "select_from", "select_samples",
                      "num_prompts", "diag_size"), positive=("lr", "temperature", "top_p", "repetition_penalty",
                      "entropy_temperature", "max_grad_norm", "lora_alpha"), non_negative=("fewshot", "prompt_index",
                      "warmup_steps", "weight_decay", "eval_every", "lora_rank", "lora_dropout"))
    if args.top_p > 1:
        p.error(f"--top-p must be in (0, 1] (got {args.top_p})")
    if args.prompt_index is None and args.select_from < args.num_prompts:
        p.error(f"--select-from {args.select_from} must be >= --num-prompts {args.num_prompts}")
    temperatures = [t.strip() for t in args.eval_temperatures.split(",") if t.strip()]
    if not temperatures or not all(re.fullmatch(r"\d+\.?\d*|\.\d+", t) for t in temperatures):
        p.error(f"--eval-temperatures {args.eval_temperatures!r}: expected comma-separated numbers >= 0, e.g. 0,0.3,1")
    args.eval_temperatures = [float(t) for t in temperatures]
    return args


# ----------------------------------------------------------------------------------------------------------
# Plumbing shared by every script, copied byte for byte (tests/test_consistency.py checks): sampling, the
# training forward, logging
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, num_samples, max_new_tokens, temperature, eos_ids, generator,
             top_k=0, top_p=1.0, repetition_penalty=1.0):
    """G = num_samples completions per (P, Lp) left-padded prompt (temperature 0: greedy), optionally top-k, top-p,
    HF's repetition penalty. -> ids (P*G, T), lens (P*G,): row i continues prompt i // G, EOS included."""
    P, G = prompt_ids.shape[0], num_samples
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache = out.cache
    cache.batch_repeat_interleave(G)  # (P, ...) -> (P*G, ...): the prompt is encoded once per group
    logits = out.logits[:, -1].float().repeat_interleave(G, 0)  # (B, V), B = P*G
    attn = prompt_mask.repeat_interleave(G, 0)  # (B, Lp) grows by one column per decoded token
    next_pos = prompt_mask.sum(1).repeat_interleave(G, 0)  # (B,) position id of the next token
    B, V, device = P * G, logits.shape[-1], prompt_ids.device
    tokens = torch.full((B, max_new_tokens), eos_ids[0], dtype=torch.long, device=device)
    lens = torch.zeros(B, dtype=torch.long, device=device)
    alive, eos = torch.arange(B, device=device), torch.tensor(eos_ids, device=device)  # rows still decoding; stop ids
    seen = None  # (b, V) tokens already in the prompt (padding excluded) or the completion, for the penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros_like(logits).scatter_add_(1, prompt_ids.repeat_interleave(G, 0), attn.float()) > 0
    for t in range(max_new_tokens):
        if seen is not None:  # HF RepetitionPenaltyLogitsProcessor: positive logits / penalty, negative * penalty
            penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        if temperature > 0:  # inverse-CDF sampling: one uniform per row (torch.multinomial is ~40x slower on CPU)
            candidates = None  # (b, K) token ids when the choice is cut down to a subset
            if 0 < top_k < V:
                logits, candidates = logits.topk(top_k, -1)  # (b, K), sorted
            probs = torch.softmax(logits / temperature, -1)
            if top_p < 1.0:  # nucleus: keep the most likely tokens until the mass before them reaches top_p
                probs, order = probs.sort(-1, descending=True)
                candidates = order if candidates is None else candidates.gather(1, order)
                probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
            cdf = probs.cumsum(-1)
            u = torch.rand(len(cdf), 1, generator=generator, device=device) * cdf[:, -1:]
            tok = torch.searchsorted(cdf, u).clamp(max=cdf.shape[1] - 1)  # (b, 1)
            tok = (candidates.gather(1, tok) if candidates is not None else tok).squeeze(1)
        else:
            tok = logits.argmax(-1)
        tokens[alive, t], lens[alive] = tok, lens[alive] + 1
        keep = ~torch.isin(tok, eos)
        if t == max_new_tokens - 1 or not keep.any():
            break
        if seen is not None:
            seen[torch.arange(len(tok), device=device), tok] = True
        if not keep.all():  # finished rows leave the batch: later steps decode only live ones
            idx = keep.nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            alive, attn, next_pos, tok = alive[idx], attn[idx], next_pos[idx], tok[idx]
            seen = seen[idx] if seen is not None else None
        attn = torch.cat([attn, attn.new_ones(len(alive), 1)], 1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None], cache=cache,
                    use_cache=True)
        next_pos, logits = next_pos + 1, out.logits[:, -1].float()
    T = max(int(lens.max()), 1)
    return tokens[:, :T], lens  # trim pad columns


def completion_mask_from_lens(lens, T):
    """(B, T) mask of the completion tokens, EOS included. Built from lengths, never from `ids != pad_id`:
    with pad == EOS that would drop the EOS the model generated (and its learning signal)."""
    return (torch.arange(T, device=lens.device)[None, :] < lens[:, None]).float()


def truncated_rows(completion_ids, lens, eos_ids):
    """(B,) bool: the completion hit the length cap without emitting a stop token."""
    last = completion_ids.gather(1, (lens - 1)[:, None]).squeeze(1)
    return ~torch.isin(last, torch.tensor(eos_ids, device=completion_ids.device))


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, prompt_index, temperature,
                        entropy_grad=False, chunk_tokens=512):
    """log pi(y_t | x, y_<t) under logits / T (B, T) and the entropy there (B, T; grad only if entropy_grad);
    completion b continues prompt prompt_index[b]. Each prompt runs once, its KV gathered for its completions.
    The vocabulary projection runs `chunk_tokens` positions at a time and is recomputed in the backward: never
    (B, T, V) fp32 logits at once. Equal to the plain [prompt; completion] forward in value and grad (tested)."""
    B, T = completion_ids.shape
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    prompt_out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True)
    cache = prompt_out.cache
    cache.batch_select_indices(prompt_index)  # (P, ...) -> (B, ...): row b holds the keys/values of its prompt
    hidden = prompt_out.last_hidden_state[prompt_index, -1:]  # (B, 1, H): predicts completion token 0
    if T > 1:
        attn = torch.cat([prompt_mask[prompt_index], prompt_mask.new_ones(B, T - 1)], 1)
        pos = prompt_mask.sum(1, keepdim=True)[prompt_index] + torch.arange(T - 1, device=completion_ids.device)
        out = decoder(input_ids=completion_ids[:, :-1], attention_mask=attn, position_ids=pos, cache=cache,
                      use_cache=True)
        hidden = torch.cat([hidden, out.last_hidden_state], 1)  # (B, T, H)
    hidden, targets = hidden.reshape(B * T, -1), completion_ids.reshape(B * T)
    entropy_grad = entropy_grad and torch.is_grad_enabled()
    parts = []  # (log-probs, entropy) of each chunk
    for s in range(0, B * T, chunk_tokens):
        chunk = (lm_head, hidden[s:s + chunk_tokens], targets[s:s + chunk_tokens], temperature, entropy_grad)
        parts.append(checkpoint(token_logprobs, *chunk, use_reentrant=False) if hidden.requires_grad else
                     token_logprobs(*chunk))
    return tuple(torch.cat(x).view(B, T) for x in zip(*parts))


def token_logprobs(lm_head, hidden, targets, temperature, entropy_grad):
    """hidden (N, H) -> log-prob of targets (N,) and entropy (N,) under softmax(lm_head(hidden) / T), in fp32."""
    logits = lm_head(hidden).float()
    logits = logits / temperature if temperature != 1.0 else logits
    logz = logits.logsumexp(-1)  # no full log-softmax tensor is kept
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    with torch.set_grad_enabled(entropy_grad):
        entropy = logz - (torch.softmax(logits, -1) * logits).sum(-1)
    return logprobs, entropy


def micro_batches(rows, num_generations, prompts_per_micro_batch, lens):
    """Split completion rows (sorted; row i continues prompt i // G) into micro-batches of whole prompts:
    [(prompt indices ps, prompt_index (b,) into ps, rows (b,), T)], each trimmed to its longest completion T."""
    prompts = sorted({r // num_generations for r in rows})
    out = []
    for i in range(0, len(prompts), prompts_per_micro_batch):
        ps = prompts[i:i + prompts_per_micro_batch]
        r = torch.tensor([x for x in rows if x // num_generations in ps], device=lens.device)
        prompt_index = torch.searchsorted(torch.tensor(ps, device=lens.device), r // num_generations)
        out.append((ps, prompt_index, r, int(lens[r].max())))
    return out


def log_step(metrics_file, record, fields=()):
    """Append a record to metrics.jsonl; with fields [(key, label, format)], print them as one compact line."""
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()
    show = lambda key, fmt: "-" if record.get(key) is None else format(record[key], fmt)
    if fields:  # the console line
        tqdm.write(" | ".join([f"step {record['step']:4d}"] + [f"{lbl} {show(key, fmt)}" for key, lbl, fmt in fields]))


def stop_if_not_finite(value, what, step, run_dir):
    if not math.isfinite(value):
        raise SystemExit(f"error: {what} is {value} at step {step}; stopping before the update "
                         f"(the last saved model in {run_dir / 'model'} is untouched)")


# ----------------------------------------------------------------------------------------------------------
# EM (algorithm logic): the loss, the entropy / logit-skewness diagnostics, the prompt selection
# ----------------------------------------------------------------------------------------------------------
def em_loss(entropy, mask, num_tokens):
    """sum(M * H) / num_tokens, entropy and mask (B, T), num_tokens of the WHOLE batch: micro-batch losses add up."""
    return (entropy * mask).sum() / num_tokens


def token_entropy(logits, tau=1.0):
    """H(softmax(z)), z = logits / tau, per row (..., V) -> (...): logsumexp(z) - sum_v softmax(z)_v z_v, the code's
    -sum q log(q + 1e-12) without the epsilon. For the diagnostics; the loss gets it from completion_logprobs."""
    z = logits / tau
    return z.logsumexp(-1) - (torch.softmax(z, -1) * z).sum(-1)


def logit_skewness(moments, vocab_size):
    """The paper's diagnostic from each logits row's (mean, sum of squared, of cubed deviations), (N, 3) fp64:
    the skewness (biased, as scipy.stats.skew) of each row (N,) and of all N*V logits pooled (as the paper's
    logits_shift.py flattens them), combined exactly from the rows' moments, never all N*V values at once."""
    mean, m2, m3 = moments.unbind(-1)
    V, n = vocab_size, vocab_size * len(moments)
    delta = mean - mean.mean()  # each row's offset from the pooled mean (every row holds V values)
    pooled_m2, pooled_m3 = (m2 + V * delta ** 2).sum(), (m3 + 3 * delta * m2 + V * delta ** 3).sum()
    return (m3 / V) / (m2 / V) ** 1.5, float((pooled_m3 / n) / (pooled_m2 / n) ** 1.5)


@torch.no_grad()
def logit_diagnostics(model, prompt_ids, prompt_mask, completion_ids, lens, tau, chunk_tokens=256):
    """Mean entropy at T = 1 and at tau, logit skewness (per position, pooled) over EVERY generated position (EOS
    included) of one completion per prompt. A separate no-grad pass: one decoder forward, then the vocabulary
    projection `chunk_tokens` positions at a time, reduced per chunk: never (B, T, V) logits at once."""
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    attn = torch.cat([prompt_mask, torch.ones_like(completion_ids)], 1)
    hidden = decoder(input_ids=torch.cat([prompt_ids, completion_ids], 1), attention_mask=attn,
                     position_ids=(attn.cumsum(1) - 1).clamp(min=0), use_cache=False).last_hidden_state
    # position Lp - 1 + t predicts completion token t; keep the generated ones: (N, H)
    hidden = hidden[:, prompt_ids.shape[1] - 1:-1][completion_mask_from_lens(lens, completion_ids.shape[1]).bool()]
    entropies, moments = [], []
    for s in range(0, len(hidden), chunk_tokens):
        logits = lm_head(hidden[s:s + chunk_tokens]).float()  # (n, V)
        entropies.append(torch.stack([token_entropy(logits), token_entropy(logits, tau)], -1))
        d = logits - logits.mean(-1, keepdim=True)  # each row's moments in fp32, combined in fp64
        moments.append(torch.stack([logits.mean(-1), (d ** 2).sum(-1), (d ** 3).sum(-1)], -1).double())
    entropy, entropy_tau = torch.cat(entropies).mean(0).tolist()
    skew, pooled = logit_skewness(torch.cat(moments), logits.shape[-1])
    return {"eval/entropy": entropy, "eval/entropy_tau": entropy_tau, "eval/logit_skew": float(skew.mean()),
            "eval/logit_skew_pooled": pooled}


def select_prompts(model, tokenizer, train, prompt_of, args, eos_ids, autocast, generator, run_dir):
    """The training records: the --prompt-index rows, or the paper's selection: sample k responses per candidate
    with the training sampler, grade them, keep the highest accuracy variance p(1 - p) (the model is most unsure
    there; ties: the earlier row). The ranking of the candidates goes to selection.json."""
    if args.prompt_index is not None:
        if args.prompt_index > len(train) - args.num_prompts:
            raise SystemExit(f"error: --prompt-index {args.prompt_index} (with --num-prompts {args.num_prompts}) is "
                             f"out of range: the training split has {len(train)} rows")
        return train[args.prompt_index:args.prompt_index + args.num_prompts]
    candidates, k = train[:args.select_from], args.select_samples
    accuracy = torch.zeros(len(candidates), dtype=torch.float64, device=model.device)  # torchrun: summed over ranks
    for i in range(8 * common.rank(), len(candidates), 8 * common.world_size()):  # torchrun: every w-th batch of 8
        ids, mask = common.tokenize_prompts(tokenizer, [prompt_of(r) for r in candidates[i:i + 8]], model.device)
        common.check_context_length(model, ids.shape[1], args.max_new_tokens)
        with autocast():
            out, lens = generate(model, ids, mask, k, args.max_new_tokens, args.temperature, eos_ids, generator,
                                 0, args.top_p, args.repetition_penalty)
        texts = common.decode(tokenizer, out, lens)
        for j, rec in enumerate(candidates[i:i + 8]):
            accuracy[i + j] = sum(common.grade(t, rec["answer"]) for t in texts[j * k:(j + 1) * k]) / k
    ranked = [{"index": i, "question": r["question"], "answer": r["answer"], "accuracy": a, "variance": a * (1 - a)}
              for i, (r, a) in enumerate(zip(candidates, common.all_sum(accuracy).tolist()))]
    ranked.sort(key=lambda r: (-r["variance"], r["index"]))
    with common.open_log(run_dir / "selection.json") as f:  # rank 0 writes
        f.write(json.dumps(ranked, indent=2))
    best = ranked[0]
    print(f"{ALGO}: selected training row {best['index']} {best['question']!r} (answer {best['answer']}): {k} samples "
          f"{best['accuracy']:.0%} correct, the top accuracy variance of {len(ranked)} (ranking: selection.json)")
    if best["variance"] == 0:
        print("warning: every candidate was all right or all wrong; try a larger --select-from or --select-samples")
    return [candidates[r["index"]] for r in ranked[:args.num_prompts]]


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, prompts, records, temperatures, args, eos_ids, autocast, step, run_dir, metrics_file):
    """Held-out accuracy at each temperature (0: greedy; one plain sample per problem, no top-p or penalty, as the
    paper evaluates; the same draws every eval) + logit_diagnostics() of the first --diag-size samples at T; logged."""
    t0, results, shown, diag = time.perf_counter(), {}, {}, None
    generator = torch.Generator(model.device).manual_seed(args.seed + 1)
    prompts, records, n = common.shard(prompts), common.shard(records), len(prompts)  # this rank's share of n
    for temperature in temperatures:
        correct, samples = 0, []
        for i in range(0, len(prompts), args.eval_batch_size):
            ids, mask = common.tokenize_prompts(tokenizer, prompts[i:i + args.eval_batch_size], model.device)
            with autocast():
                out, lens = generate(model, ids, mask, 1, args.max_new_tokens, temperature, eos_ids, generator)
            if diag is None and temperature == args.temperature:  # torchrun: rank 0's ones are logged
                diag = (ids[:args.diag_size], mask[:args.diag_size], out[:args.diag_size], lens[:args.diag_size])
            for text, rec in zip(common.decode(tokenizer, out, lens), records[i:i + args.eval_batch_size]):
                ok = common.grade(text, rec["answer"])
                correct += ok
                samples.append(dict(question=rec["question"], answer=rec["answer"], completion=text, correct=ok))
        results[temperature], shown[temperature] = common.all_sum(correct) / n, samples[:4]
    with autocast():
        stats = logit_diagnostics(model, *diag, args.entropy_temperature)
    record = {"step": step, "eval/accuracy": results[0.0], "eval/sampled_accuracy": results[args.temperature],
              **{f"eval/accuracy_T{t:g}": results[t] for t in temperatures if t in args.eval_temperatures},
              **stats, "eval/time": round(time.perf_counter() - t0, 2)}
    log_step(metrics_file, record)
    with common.open_log(run_dir / "samples.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "greedy": shown[0.0], "sampled": shown[args.temperature]}) + "\n")
    tqdm.write(f"eval step {step}: " + "  ".join(f"acc T={t:g} {results[t]:.1%}" for t in temperatures) + f" | H "
               f"{stats['eval/entropy']:.3f} skew {stats['eval/logit_skew']:.3f} ({time.perf_counter() - t0:.0f}s)")
    return record


def main(argv=None):
    args = parse_args(argv)  # ---- setup: arguments, precision, data, model, optimizer, the training prompt(s) -------
    common.seed_all(args.seed)
    device = common.resolve_device(args.device, distributed=True)  # torchrun: one process per device
    weight_dtype, autocast_dtype = common.resolve_dtype(args.dtype, device)
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    run_dir, tokenizer = common.make_run_dir(args, ALGO), common.load_tokenizer(args.model)
    train, test, fewshot = common.load_problems(args)
    if len(test) < common.world_size():  # torchrun: every rank evaluates a share of the held-out problems
        raise SystemExit(f"error: {len(test)} eval problems for {common.world_size()} processes: raise --eval-size")
    prompt_of = lambda rec: common.build_prompt(tokenizer, rec["question"], fewshot, args.system_prompt)
    test_prompts = [prompt_of(r) for r in test]
    sweep, quick = sorted(set(args.eval_temperatures) | {0.0, args.temperature}), sorted({0.0, args.temperature})
    model = common.load_model(args.model, device, weight_dtype, args.gradient_checkpointing)
    model = common.add_lora(model.eval(), args)  # eval: no dropout, samples and loss: one function
    model, eos_ids = common.shard_blocks(model, args), common.stop_token_ids(tokenizer, model)  # --fsdp: FSDP2
    common.check_context_length(model, 0, args.max_new_tokens)
    optimizer = torch.optim.AdamW(common.param_groups(model), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / max(1, args.warmup_steps)))
    common.gather_blocks(model, True)  # --fsdp: whole blocks for sampling, selection, evaluation, diagnostics
    generator = common.rank_generator(device, args.seed)  # torchrun: each rank its own draws (rank 0: as one process)
    data_rng, order = random.Random(args.seed), []  # the same draws on every rank
    pool = select_prompts(model, tokenizer, train, prompt_of, args, eos_ids, autocast, generator, run_dir)
    metrics_file, G = common.open_log(run_dir / "metrics.jsonl"), args.num_generations
    print(f"{ALGO}: {len(pool)} training prompt(s), {len(test)} eval problems, {len(fewshot)}-shot, model {args.model} "
          f"on {device} (weights {weight_dtype}, autocast {autocast_dtype}), output {run_dir}")
    before = evaluate(model, tokenizer, test_prompts, test, sweep, args, eos_ids, autocast, 0, run_dir, metrics_file)
    first_loss, warned = None, False
    for step in tqdm(range(1, args.steps + 1), desc=ALGO, dynamic_ncols=True):
        t_step = time.perf_counter()
        # ---- 1. sample G responses for each of P prompt rows (one-shot: P copies of the same prompt) ----------
        batch = common.shard(common.next_batch(pool, order, data_rng, args.prompts_per_step))  # this rank's share
        prompt_ids, prompt_mask = common.tokenize_prompts(tokenizer, [prompt_of(r) for r in batch], device)  # (P, Lp)
        common.check_context_length(model, prompt_ids.shape[1], args.max_new_tokens)
        with autocast():
            completion_ids, lens = generate(model, prompt_ids, prompt_mask, G, args.max_new_tokens, args.temperature,
                                            eos_ids, generator, 0, args.top_p, args.repetition_penalty)  # (P*G, T)
        mask = completion_mask_from_lens(lens, completion_ids.shape[1])  # (P*G, T)
        gen_time, num_tokens = time.perf_counter() - t_step, common.all_sum(mask.sum())  # all ranks' tokens
        # ---- 2. no reward. Monitoring only, never in the loss: the fraction of the samples graded correct -------
        texts, labels = common.decode(tokenizer, completion_ids, lens), [r["answer"] for r in batch for _ in range(G)]
        correct = common.all_sum(sum(map(common.grade, texts, labels))) / common.all_sum(len(texts))
        # ---- 3. no frozen log-probs (no old or reference policy). 4. one update on the token-mean tau-entropy ---
        t_train, loss_sum = time.perf_counter(), 0.0
        common.gather_blocks(model, False)  # --fsdp: on the sharded blocks (P / N prompts a rank: as many passes)
        model.zero_grad(set_to_none=False)  # (not the optimizer's foreach zeroing: --fsdp mixes tensor types)
        for ps, prompt_index, r, T in micro_batches(list(range(len(lens))), G, args.micro_batch_prompts, lens):
            with autocast():  # entropy of softmax(logits / tau) over the full vocabulary, with gradient: (b, T)
                _, entropy = completion_logprobs(model, prompt_ids[ps], prompt_mask[ps], completion_ids[r, :T],
                                                 prompt_index, args.entropy_temperature, entropy_grad=True)
            loss = em_loss(entropy, mask[r, :T], num_tokens)  # the whole batch's token count: micro-batches sum up
            loss.backward()  # accumulates: the sum over micro-batches is the full-batch gradient
            loss_sum += loss.item()
        loss_sum = common.all_sum(loss_sum)  # the whole step's: every rank stops on a non-finite one, before the update
        stop_if_not_finite(loss_sum, "the loss", step, run_dir)
        common.all_reduce_gradients(model)  # torchrun: the sum over ranks, i.e. the whole step's gradient
        grad_norm = common.clip_grad_norm(model, args.max_grad_norm)  # (--fsdp: over every rank's shard)
        stop_if_not_finite(grad_norm, "the gradient norm", step, run_dir)
        optimizer.step()
        scheduler.step()
        common.gather_blocks(model, True)
        train_time, step_time = time.perf_counter() - t_train, time.perf_counter() - t_step
        # ---- 5. log (the whole step: every rank's samples), evaluate, save ------------------------------------
        trunc = common.all_gather(truncated_rows(completion_ids, lens, eos_ids).float())  # (P*G,) of all ranks
        lens = common.all_gather(lens.float())
        record = {"step": step, "reward": None, "correct": correct, "loss": loss_sum, "entropy": loss_sum, "updates": 1,
                  "truncated": float(trunc.mean()), "completion_len": float(lens.mean()), "samples_used": len(lens),
                  "tokens_used": int(num_tokens), "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                  "gen_time": round(gen_time, 3), "train_time": round(train_time, 3), "step_time": round(step_time, 3),
                  "tokens_per_s": round(float(lens.sum()) / step_time, 1)}
        log_step(metrics_file, record, [("loss", "H_tau", ".4f"), ("correct", "acc", ".3f"), ("completion_len", "len",
                 ".1f"), ("truncated", "trunc", ".2f"), ("grad_norm", "gnorm", ".3f"), ("step_time", "s", ".1f")])
        first_loss = loss_sum if first_loss is None else first_loss
        if loss_sum < 0.1 * first_loss and not warned:
            warned = True
            tqdm.write("warning: the training entropy fell below 10% of its start, the paper's 'over-confidence' "
                       "regime where accuracy declines: watch the evals; fewer --steps or a smaller --lr may be better")
        if args.eval_every and step % args.eval_every == 0 and step != args.steps:
            evaluate(model, tokenizer, test_prompts, test, quick, args, eos_ids, autocast, step, run_dir, metrics_file)
            common.save_model(model, tokenizer, run_dir, args)
    after = evaluate(model, tokenizer, test_prompts, test, sweep, args, eos_ids, autocast, args.steps, run_dir,
                     metrics_file)
    common.save_model(model, tokenizer, run_dir, args, final=True)  # --merge-lora: the merged model
    metrics_file.close()
    print(f"held-out greedy accuracy {before['eval/accuracy']:.1%} -> {after['eval/accuracy']:.1%}, sampled (T="
          f"{args.temperature:g}) {before['eval/sampled_accuracy']:.1%} -> {after['eval/sampled_accuracy']:.1%}")
    return before, after


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the last saved model (if any) is intact; nothing half-written was kept")
