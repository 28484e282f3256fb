"""ReST-EM: expectation-maximization self-training with a binary reward, one readable file.

Paper: Singh et al. 2023, "Beyond Human Data: Scaling Self-Training for Problem-Solving with Language Models"
(https://arxiv.org/abs/2312.06585), §3, Algorithm 1 (ReST-EM), Eq. 3 (M-step); settings from §5.

Iterate I times, starting from the base model theta_0:
    E-step  for every training problem x sample N solutions y ~ p_theta_i(.|x) (T = 0.7, top-k 40), grade them
            with a binary reward r(x, y) in {0, 1}; keep the correct ones, at most K per problem (random, after
            removing exact duplicates)                                      D_i = {(x, y): r(x, y) = 1}
    M-step  theta_{i+1} = argmax_theta  sum_{(x,y) in D_i} r(x, y) log p_theta(y | x)          (Eq. 3)
            fine-tuned FROM THE BASE MODEL theta_0 (not from theta_i), NLL on the solution tokens only
            (with binary r this is SFT on the kept set); theta_{i+1} does the next E-step.

    python rest_em.py                                # embedded SmolLM2-135M-Instruct, built-in arithmetic, CPU
    python rest_em.py --resume runs/rest_em__0__1700000000 --iterations 4     # continue / extend a run
    torchrun --nproc-per-node 2 rest_em.py [--fsdp]  # data parallel: each process its share of the E-step problems
"""
import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common

ALGO = "rest_em"


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
    p.add_argument("--reward-fn", default=None, help="file.py:function(prompts, completions, records) -> floats")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "pure-bfloat16"],
                   help="auto/bfloat16: fp32 master weights + bf16 autocast; pure-bfloat16: bf16 weights (warns)")
    common.add_scale_args(p, fsdp=True)  # --gradient-checkpointing, --lora-rank/-alpha/-dropout/-target-modules, --fsdp
    # ReST-EM: E-step
    p.add_argument("--iterations", type=int, default=None, help="EM iterations (default 3; --resume: the new total)")
    p.add_argument("--prompts-per-step", type=int, default=64, help="training problems, the same set at every E-step")
    p.add_argument("--num-generations", type=int, default=4, help="N: solutions per problem per E-step (paper: 32)")
    p.add_argument("--max-per-problem", type=int, default=10, help="cap on correct solutions kept per problem (10)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion length cap")
    p.add_argument("--temperature", type=float, default=0.7, help="E-step (and eval-sample) temperature (paper: 0.7)")
    p.add_argument("--top-k", type=int, default=40, help="sample from the K most likely tokens (paper: 40; 0: all)")
    # ReST-EM: M-step
    p.add_argument("--steps", type=int, default=8, help="M-step optimizer updates per iteration (unless --epochs)")
    p.add_argument("--epochs", type=float, default=None, help="M-step passes over the kept set (wins over --steps)")
    p.add_argument("--batch-size", type=int, default=16, help="kept solutions per M-step update (at most all of them)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="solutions per forward/backward (accumulation)")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate of the M-step (HF Trainer's default)")
    p.add_argument("--warmup-steps", type=int, default=2, help="linear LR warm-up, in optimizer updates, every M-step")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping")
    # evaluation / logging / saving
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N iterations (0: only before and after)")
    p.add_argument("--eval-size", type=int, default=50, help="held-out problems (and train problems) per evaluation")
    p.add_argument("--eval-samples", type=int, default=8, help="n: samples per held-out problem for pass@k and maj@k")
    p.add_argument("--pass-k", type=int, default=4, help="k of pass@k and maj@k (<= --eval-samples)")
    p.add_argument("--gen-batch-size", type=int, default=64, help="sequences per generation call (E-step and eval)")
    p.add_argument("--output-dir", default=None, help="default: runs/<algo>__<seed>__<time>")
    p.add_argument("--no-save", action="store_true", help="do not write the final model")
    p.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16"], help="saved weights (default: fp32)")
    p.add_argument("--resume", default=None, help="RUN_DIR: continue after its last saved iteration (its args.json)")
    args = p.parse_args(argv)
    if args.resume:
        saved = Path(args.resume) / "args.json"  # the run's own flags; only --iterations may change (to extend it)
        if not saved.is_file():
            raise SystemExit(f"error: --resume {args.resume}: no args.json there (not a rest_em run directory)")
        saved = json.loads(saved.read_text())
        args = argparse.Namespace(**{**vars(p.parse_args([])), **saved, "resume": args.resume, "output_dir":
                                     args.resume, "iterations": args.iterations or saved["iterations"]})
    args.iterations = 3 if args.iterations is None else args.iterations
    common.check_args(p, args, at_least_one=("iterations", "prompts_per_step", "num_generations", "max_per_problem",
                      "max_new_tokens", "steps", "batch_size", "micro_batch_size", "eval_size", "eval_samples",
                      "pass_k", "gen_batch_size"), positive=("temperature", "epochs", "lr", "max_grad_norm",
                      "lora_alpha"), non_negative=("fewshot", "top_k", "warmup_steps", "weight_decay", "eval_every",
                      "lora_rank", "lora_dropout"))
    if args.pass_k > args.eval_samples:
        p.error(f"--pass-k {args.pass_k} must be <= --eval-samples {args.eval_samples} (unbiased pass@k needs n >= k)")
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
# ReST-EM (algorithm logic): the E-step filter, the M-step (batches, loss, updates), pass@k, maj@k; sampling, eval
# ----------------------------------------------------------------------------------------------------------
def filter_and_cap(texts, rewards, cap, rng):
    """E-step selection for ONE problem: indices of the samples to keep. Only reward-1 samples, exact duplicates
    once (the first copy), at most `cap` of them at random (the paper's cap balances easy and hard problems)."""
    correct = [i for i, (text, r) in enumerate(zip(texts, rewards)) if r == 1.0 and text not in texts[:i]]
    return sorted(rng.sample(correct, cap)) if len(correct) > cap else correct


def nll_loss(logprobs, mask, num_tokens):
    """M-step loss (Eq. 3 with r = 1 on every kept sample): -sum of solution-token log-probs / num_tokens, where
    num_tokens counts the solution tokens of the whole optimizer batch, so micro-batch losses sum to its token-mean."""
    return -(logprobs * mask).sum() / num_tokens


def m_step_batches(num_kept, batch_size, epochs, steps, rng):
    """The M-step's batches (index lists into the kept set) of min(batch_size, num_kept), a fresh shuffle each pass:
    ceil(E * num_kept / batch) for `epochs` E (E passes even over a kept set smaller than a batch), else `steps`."""
    size = min(batch_size, num_kept)
    count = (math.ceil(round(epochs * num_kept / size, 6)) if epochs is not None else steps) if num_kept else 0
    order = []  # passes over the kept set, each a fresh shuffle (taken from its end)
    while len(order) < count * size:
        perm = list(range(num_kept))
        rng.shuffle(perm)
        order += perm[::-1]
    return [order[k * size:(k + 1) * size] for k in range(count)]  # round() above: 0.7 * 10 / 1 is not 7.0


def m_step(model, base_state, kept, prompts, tokenizer, args, eos_ids, autocast, rng, step, run_dir):
    """theta <- theta_base, then SFT on the kept set D_i [(problem, token ids incl. EOS)]: a fresh AdamW on the
    token-mean NLL of each m_step_batches() batch, in micro-batches. -> the stats of the iteration's record."""
    common.gather_blocks(model, False)  # --fsdp: the M-step on the sharded blocks (gathered again at its end)
    common.load_full_state(model, base_state, strict=not common.is_lora(model))  # restart from the BASE model (§3)
    optimizer = torch.optim.AdamW(common.param_groups(model), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / max(1, args.warmup_steps)))
    batches = m_step_batches(len(kept), args.batch_size, args.epochs, args.steps, rng)
    losses, grad_norms, entropy_sum, tokens = [0.0] * len(batches), [], 0.0, 0
    for k, batch in enumerate([kept[i] for i in b] for b in batches):  # torchrun: the same on every rank, each split
        batch, num_tokens = common.shard(batch), sum(len(ids) for _, ids in batch)  # its share; the whole's tokens
        model.zero_grad(set_to_none=False)  # (not the optimizer's foreach zeroing: --fsdp mixes tensor types)
        micros = [(batch[i:i + args.micro_batch_size],) for i in range(0, len(batch), args.micro_batch_size)]
        for micro, live in common.even_micro_batches(model, micros, ([kept[0]],)):  # --fsdp: as many on every rank
            problems, device = sorted({p for p, _ in micro}), model.device  # each prompt runs once for its solutions
            prompt_ids, prompt_mask = common.tokenize_prompts(tokenizer, [prompts[p] for p in problems], device)
            index = torch.tensor([problems.index(p) for p, _ in micro], device=device)  # (b,): each one's prompt
            lens, T = torch.tensor([len(ids) for _, ids in micro], device=device), max(len(ids) for _, ids in micro)
            completion_ids = torch.tensor([ids + [eos_ids[0]] * (T - len(ids)) for _, ids in micro], device=device)
            mask = completion_mask_from_lens(lens, T) * live  # (b, T), EOS included; a pad pass (live 0): all 0
            with autocast():  # SFT: log-probs of the raw logits (T = 1), (b, T) each, chunked vocabulary projection
                logprobs, entropy = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, index, 1.0)
            loss = nll_loss(logprobs, mask, num_tokens)
            stop_if_not_finite(loss.item(), "the M-step loss", step, run_dir)
            loss.backward()  # accumulates: the sum over micro-batches is the whole batch's token-mean NLL
            losses[k] += loss.item()
            entropy_sum, tokens = entropy_sum + float((entropy.detach() * mask).sum()), tokens + int(mask.sum())
        common.all_reduce_gradients(model)  # torchrun: the sum over ranks, i.e. the whole batch's gradient
        grad_norms.append(common.clip_grad_norm(model, args.max_grad_norm))  # (--fsdp: over every rank's shard)
        stop_if_not_finite(grad_norms[-1], "the M-step gradient norm", step, run_dir)
        optimizer.step()
        scheduler.step()
    common.gather_blocks(model, True)
    losses, entropy_sum, tokens = [*map(common.all_sum, losses)], common.all_sum(entropy_sum), common.all_sum(tokens)
    used, mean = {i for b in batches for i in b}, lambda xs: sum(xs) / len(xs) if xs else None
    return {"samples_used": len(used), "tokens_used": sum(len(kept[i][1]) for i in used), "updates": len(batches),
            "epochs": sum(map(len, batches)) / len(kept) if kept else 0.0, "nll_first": (losses or [None])[0],
            "nll_last": (losses or [None])[-1], "loss": mean(losses), "grad_norm": mean(grad_norms),
            "entropy": entropy_sum / tokens if tokens else None, "lr": scheduler.get_last_lr()[0]}


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021) of one problem with c correct among n samples: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(texts, reference):
    """maj@k: the most frequent extracted answer among `texts` (grouped by common.grade of the boxed answer, so 0.5
    and 1/2 vote together; ties: the first seen), graded. Samples without an answer do not vote; no votes: 0."""
    groups = []  # [answer, votes, a completion that gave it]
    for text, answer in ((text, common.extract_answer(text)) for text in texts):
        group = next((g for g in groups if answer is not None and common.grade(f"\\boxed{{{answer}}}", g[0])), None)
        if group:
            group[1] += 1
        elif answer is not None:
            groups.append([answer, 1, text])
    return bool(groups) and common.grade(max(groups, key=lambda g: g[1])[2], reference)  # max: the first of ties


def sample_with_ids(model, tokenizer, prompts, num_samples, temperature, args, eos_ids, autocast, generator):
    """-> per prompt, num_samples (token ids incl. EOS, text) at top-k --top-k, ~--gen-batch-size rows per call."""
    per_call, results = max(1, args.gen_batch_size // num_samples), []
    for i in range(0, len(prompts), per_call):
        ids, mask = common.tokenize_prompts(tokenizer, prompts[i:i + per_call], model.device)
        common.check_context_length(model, ids.shape[1], args.max_new_tokens)
        with autocast():
            out, lens = generate(model, ids, mask, num_samples, args.max_new_tokens, temperature, eos_ids, generator,
                                 top_k=args.top_k)
        pairs = list(zip([o[:n] for o, n in zip(out.tolist(), lens.tolist())], common.decode(tokenizer, out, lens)))
        results += [pairs[j:j + num_samples] for j in range(0, len(pairs), num_samples)]
    return results


def evaluate(model, tokenizer, test_prompts, test, train_prompts, train_recs, args, eos_ids, autocast, step, run_dir,
             metrics_file):
    """Held-out greedy and sampled accuracy (n at T), pass@k, maj@k; train problems' greedy accuracy; logged.
    torchrun: each rank evaluates its share of the problems; each mean sums every rank's values and counts."""
    t0, generator, n_test = time.perf_counter(), torch.Generator(model.device).manual_seed(args.seed + 1), len(test)
    test_prompts, test, train_prompts, train_recs = map(common.shard, (test_prompts, test, train_prompts, train_recs))
    sample = lambda prompts, n, T: sample_with_ids(model, tokenizer, prompts, n, T, args, eos_ids, autocast, generator)
    test_greedy, train_greedy = ([s[0][1] for s in sample(x, 1, 0.0)] for x in (test_prompts, train_prompts))
    sampled = sample(test_prompts, args.eval_samples, args.temperature)
    n, k, mean = args.eval_samples, args.pass_k, lambda xs: common.all_sum(sum(xs)) / common.all_sum(len(xs))
    accuracy = lambda texts, recs: mean([common.grade(t, r["answer"]) for t, r in zip(texts, recs)])
    correct = [[common.grade(text, rec["answer"]) for _, text in s] for s, rec in zip(sampled, test)]  # (P, n)
    res = {"step": step, "eval/accuracy": accuracy(test_greedy, test),
           "eval/sampled_accuracy": mean([sum(c) / n for c in correct]),
           "eval/pass@k": mean([pass_at_k(n, sum(c), k) for c in correct]),
           "eval/maj@k": mean([majority_vote([t for _, t in s[:k]], r["answer"]) for s, r in zip(sampled, test)]),
           "eval/k": k, "eval/train_accuracy": accuracy(train_greedy, train_recs),
           "eval/time": round(time.perf_counter() - t0, 2)}
    log_step(metrics_file, res)
    with common.open_log(run_dir / "samples.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "samples": [dict(question=r["question"], answer=r["answer"], greedy=g,
                sampled=[t for _, t in s[:2]]) for r, g, s in list(zip(test, test_greedy, sampled))[:4]]}) + "\n")
    tqdm.write(f"eval iter {step}: test greedy {res['eval/accuracy']:.1%} | pass@{k} {res['eval/pass@k']:.1%} | maj@{k}"
               f" {res['eval/maj@k']:.1%} | sampled (T={args.temperature}) {res['eval/sampled_accuracy']:.1%} | train "
               f"greedy {res['eval/train_accuracy']:.1%} ({n_test} test problems, {res['eval/time']:.0f}s)")
    return res


def main(argv=None):
    args = parse_args(argv)  # ---- setup: arguments, precision, run directory (or the resumed one), data, models ----
    common.seed_all(args.seed)
    device = common.resolve_device(args.device, distributed=True)  # torchrun: one process per device
    weight_dtype, autocast_dtype = common.resolve_dtype(args.dtype, device)
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    run_dir, start = Path(args.resume) if args.resume else common.make_run_dir(args, ALGO), 0
    if args.resume:  # state.json (written after each saved iterate): the iterations done; drop any later records
        saved = run_dir / "model" / ("adapter_config.json" if args.lora_rank else "config.json")  # LoRA: the adapter
        if not (run_dir / "state.json").is_file() or not saved.is_file():
            raise SystemExit(f"error: --resume {run_dir}: no completed iteration to resume from (no state.json/"
                             f"{saved.name}; was it run with --no-save or --merge-lora, or stopped in iteration 1?)")
        start = json.loads((run_dir / "state.json").read_text())["completed_iterations"]
        if common.rank() == 0:  # one writer (torchrun); no other rank reads these files
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            (run_dir / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= start))
            (run_dir / "args.json").write_text(json.dumps({**vars(args), "resume": None}, indent=2))
    tokenizer, (train, test, fewshot) = common.load_tokenizer(args.model), common.load_problems(args)
    random.Random(args.seed).shuffle(train)
    problems = train[:args.prompts_per_step]  # the E-step's problems, fixed for the run (the paper: its train set)
    prompt_of = lambda rec: common.build_prompt(tokenizer, rec["question"], fewshot, args.system_prompt)
    prompts, test_prompts = [prompt_of(r) for r in problems], [prompt_of(r) for r in test]
    reward_fn, N, mine = common.load_reward_fn(args.reward_fn), args.num_generations, common.shard(prompts)
    rep_prompts, rep_problems = ([x for x in common.shard(xs) for _ in range(N)] for xs in (prompts, problems))
    model = common.load_model(args.model, device, weight_dtype, args.gradient_checkpointing)
    model = common.add_lora(model.eval(), args)  # eval: no dropout (--lora-dropout: LoRA's own)
    base_state = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()  # theta_0, whole,
                  if "lora_" in name or not common.is_lora(model)}  # for every M-step; LoRA: the start adapter (B = 0)
    if start and common.is_lora(model):  # the policy of the next E-step is the last completed iterate (its adapter)
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(str(run_dir / "model" / "adapter_model.safetensors")))
    elif start:
        model.load_state_dict(common.load_model(str(run_dir / "model"), torch.device("cpu"), weight_dtype).state_dict())
    model, eos_ids = common.shard_blocks(model, args), common.stop_token_ids(tokenizer, model)  # --fsdp: FSDP2
    common.check_context_length(model, 0, args.max_new_tokens)
    common.gather_blocks(model, True)  # --fsdp: whole blocks for sampling and evaluation
    metrics_file = common.open_log(run_dir / "metrics.jsonl", "a")
    eval_args = (model, tokenizer, test_prompts, test, prompts[:args.eval_size], problems[:args.eval_size], args,
                 eos_ids, autocast)
    print(f"{ALGO}: {len(problems)} x {N} samples per E-step, {len(test)} eval problems, {device}, output {run_dir}")
    if start == 0:
        evaluate(*eval_args, 0, run_dir, metrics_file)
    for it in tqdm(range(start + 1, args.iterations + 1), desc=ALGO, dynamic_ncols=True):
        t_step, rng = time.perf_counter(), random.Random(f"{args.seed}:{it}")  # per iteration: resume reproduces
        generator = common.rank_generator(device, args.seed * 1000 + it)  # torchrun: each rank its own draws
        # ---- 1. E-step: sample N solutions per problem from the current policy -------------------------------
        samples = sample_with_ids(model, tokenizer, mine, N, args.temperature, args, eos_ids, autocast, generator)
        gen_time = time.perf_counter() - t_step
        # ---- 2. binary rewards; D_i = the correct, distinct samples, at most --max-per-problem per problem -------
        rewards = common.compute_rewards(reward_fn, rep_prompts, [t for s in samples for _, t in s], rep_problems)
        if common.world_size() > 1:  # torchrun: every rank gets all problems' samples and rewards, in problem order
            torch.distributed.all_gather_object(parts := [None] * common.world_size(), (samples, rewards))
            samples, rewards = [x for p in parts for x in p[0]], [x for p in parts for x in p[1]]
        lens = [len(ids) for s in samples for ids, _ in s]
        if any(r not in (0.0, 1.0) for r in rewards):
            raise SystemExit(f"error: ReST-EM needs a binary reward: every value 0 or 1, got {rewards[:8]}...")
        kept = []  # D_i: (problem, token ids incl. EOS)
        with common.open_log(run_dir / f"estep_iter{it}.jsonl") as f:  # every E-step sample, for inspection
            for p, s in enumerate(samples):
                keep = filter_and_cap([t for _, t in s], rewards[p * N:(p + 1) * N], args.max_per_problem, rng)
                kept += [(p, s[i][0]) for i in keep]
                f.writelines(json.dumps(dict(problem=p, question=problems[p]["question"], answer=problems[p]["answer"],
                             sample=t, reward=rewards[p * N + i], kept=i in keep)) + "\n" for i, (_, t) in enumerate(s))
        # ---- 3. no frozen log-probs (SFT). 4. M-step: fine-tune the BASE model on D_i, NLL of solution tokens ----
        t_train = time.perf_counter()
        if not kept:
            tqdm.write(f"warning: iteration {it}: no correct sample to keep; the next policy is the base model")
        stats = m_step(model, base_state, kept, prompts, tokenizer, args, eos_ids, autocast, rng, it, run_dir)
        train_time, step_time = time.perf_counter() - t_train, time.perf_counter() - t_step
        # ---- 5. log, evaluate, save the iterate and the resume state ------------------------------------------
        record = {"step": it, "reward": sum(rewards) / len(rewards), "reward_std": float(torch.tensor(rewards).std()),
                  "correct": sum(r > 0 for r in rewards) / len(rewards),
                  "solved": sum(any(rewards[p * N:(p + 1) * N]) for p in range(len(problems))) / len(problems),
                  "kept": len(kept), "kept_per_problem": len(kept) / len(problems),
                  "truncated": sum(ids[-1] not in eos_ids for s in samples for ids, _ in s) / len(lens),
                  "completion_len": sum(lens) / len(lens), **stats, "gen_time": round(gen_time, 3),
                  "train_time": round(train_time, 3), "step_time": round(step_time, 3),
                  "tokens_per_s": round(sum(lens) / step_time, 1)}
        log_step(metrics_file, record, [("reward", "E-step acc", ".3f"), ("solved", "solved", ".2f"), ("kept", "kept",
                 "d"), ("truncated", "trunc", ".2f"), ("updates", "M-step updates", "d"), ("epochs", "epochs", ".1f"),
                 ("nll_first", "nll", ".3f"), ("nll_last", "->", ".3f"), ("step_time", "s", ".0f")])
        if (args.eval_every and it % args.eval_every == 0) or it == args.iterations:
            evaluate(*eval_args, it, run_dir, metrics_file)
        common.save_model(model, tokenizer, run_dir, args, final=it == args.iterations)  # --fsdp: every rank gathers
        if not args.no_save and common.rank() == 0:  # the resume point, after its iterate (--merge-lora: the last)
            (run_dir / "state.tmp").write_text(json.dumps({"completed_iterations": it}))
            (run_dir / "state.tmp").replace(run_dir / "state.json")  # atomic: never a half-written state.json
    metrics_file.close()  # read back: rank 0's records (torchrun: the other ranks' file is /dev/null, empty)
    evals = [r for r in map(json.loads, Path(metrics_file.name).read_text().splitlines()) if "eval/accuracy" in r]
    print("held-out greedy accuracy by iteration: " + " -> ".join(f"{r['eval/accuracy']:.1%}" for r in evals) +
          f"; metrics in {run_dir}")
    return evals


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the last completed iteration is saved; continue with --resume RUN_DIR")
