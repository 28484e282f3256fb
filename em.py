# NOTE TO THE ENGINEER CONVERTING THIS FILE (delete this comment when done): before anything else read
# /tmp/helper_common.md -- the rules for this conversion (files you may edit, flock for every torch run,
# metric keys, no git commits, deadline 12:55 UTC).
"""One-shot entropy minimization (EM): unsupervised post-training from a single unlabeled prompt, one readable file.

Paper: Gao et al. 2025, "One-shot Entropy Minimization" (https://arxiv.org/abs/2505.20282); code:
github.com/zitian-gao/one-shot-em `train.py` (L131-163: sampling and loss), `logits_shift.py` (skewness).

Pick one prompt x (the paper: the candidate whose sampled answers have the highest accuracy variance). Each step
sample responses y ~ pi_theta(.|x) (T = 0.5, top-p 0.95, repetition penalty 1.15; no gradient through sampling)
and minimise the entropy of the model's own next-token distribution at every generated position:
    q_t   = softmax(z_theta(x, y_<t) / tau)                  tau = 0.5: the "entropy temperature" of the code
    H_t   = -sum_v q_t(v) log q_t(v)                         full vocabulary, gradient through every q_t(v)
    loss  = sum_{i,t} M_it H_it / sum_{i,t} M_it             token-mean over the whole batch of samples
M covers exactly the positions that predicted a generated token: the last prompt position through the position
that predicted the EOS (never the prompt, never padding). No reward, no label, no KL, no reference model:
labels are used only to pick the prompt and to evaluate.

    python em.py                                     # embedded SmolLM2-135M-Instruct, built-in arithmetic, CPU
    python em.py --num-prompts 8                     # multi-shot EM on the 8 highest-variance prompts
    python em.py --model Qwen/Qwen2.5-Math-7B --dataset HuggingFaceH4/MATH-500 --fewshot 0 --lr 2e-5 \
        --max-new-tokens 512 --prompts-per-step 64 --num-generations 1 --micro-batch-prompts 2   # paper, a GPU
"""
import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # model / data (shared flags: the same meaning in every script of the suite)
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="hub id, local dir, .gguf file, or 'smollm2' (embedded)")
    p.add_argument("--dataset", default="arith", help="'arith[:add|sub|mul[:DIGITS]]', a .jsonl/.json/.parquet/.csv file, or a hub id")
    p.add_argument("--eval-dataset", default=None, help="held-out problems (default: test split, else every 10th row of --dataset)")
    p.add_argument("--question-key", default=None, help="question column (default: auto-detected)")
    p.add_argument("--answer-key", default=None, help="answer column (default: auto-detected)")
    p.add_argument("--fewshot", type=int, default=None, help="solved examples shown as earlier chat turns (default: 1 for arith, else 0)")
    p.add_argument("--system-prompt", default=None, help="system message (default: the chat template's own)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompt selection, sampling and data order")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on GPU; fp32 weights + bf16 autocast on CPU")
    # which prompt(s): the paper's variance-based selection, or given directly
    which = p.add_mutually_exclusive_group()
    which.add_argument("--select-from", type=int, default=None, help="N: pick the highest accuracy-variance prompt(s) among the first N training problems (default 16)")
    which.add_argument("--prompt", default=None, help="train on this question text instead (no label: the train accuracy is not logged)")
    which.add_argument("--prompt-index", type=int, default=None, help="train on this row of the training split (with --num-prompts N: rows i..i+N-1)")
    p.add_argument("--select-samples", type=int, default=8, help="k: responses sampled per candidate to estimate its accuracy variance")
    p.add_argument("--num-prompts", type=int, default=1, help="1: one-shot EM; > 1: multi-shot EM over that many prompts (for comparison)")
    # sampling (the paper's code: T 0.5, top-p 0.95, repetition penalty 1.15)
    p.add_argument("--steps", type=int, default=10, help="optimizer updates (the paper's ~10; its code's counter counts micro-batches)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompt rows per update, drawn from the --num-prompts pool (one-shot: all the same prompt)")
    p.add_argument("--num-generations", type=int, default=8, help="responses sampled per prompt row (the update sees prompts-per-step x this)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="response length cap")
    p.add_argument("--temperature", type=float, default=0.5, help="sampling temperature of the training responses (paper code: 0.5)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling for the training responses (paper code: 0.95)")
    p.add_argument("--repetition-penalty", type=float, default=1.15, help="HF-style repetition penalty for the training responses (paper code: 1.15)")
    # EM objective and optimization
    p.add_argument("--entropy-temperature", type=float, default=0.5, help="tau: the entropy is that of softmax(logits / tau) (paper code: 0.5)")
    p.add_argument("--lr", type=float, default=2e-6, help="AdamW learning rate, constant (paper: 2e-5; see docs/em.md for why ours is 10x smaller)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up, in optimizer updates (paper code: none)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (paper code: torch's default 0.01)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping (paper code: 1.0)")
    p.add_argument("--micro-batch-prompts", type=int, default=1, help="prompt rows per forward/backward (gradient accumulation)")
    p.add_argument("--min-entropy", type=float, default=0.0, help="stop early once the training entropy (tau) falls below this (0: never)")
    # evaluation / logging
    p.add_argument("--eval-every", type=int, default=2, help="evaluate every N steps (0: only before and after)")
    p.add_argument("--eval-size", type=int, default=100, help="held-out problems per evaluation")
    p.add_argument("--eval-temperatures", default="0,0.3,0.6,1.0", help="temperature sweep of held-out accuracy, before and after training")
    p.add_argument("--sweep-every-eval", action="store_true", help="run the temperature sweep at every eval, not only before/after")
    p.add_argument("--diag-size", type=int, default=16, help="held-out prompts for the entropy / logit-skewness diagnostics")
    p.add_argument("--eval-batch-size", type=int, default=64, help="prompts per generation call during eval")
    p.add_argument("--output-dir", default=None, help="default: runs/em__<seed>__<time>")
    p.add_argument("--no-save", action="store_true", help="do not write the final model")
    args = p.parse_args(argv)
    for flag in ("steps", "prompts_per_step", "num_generations", "max_new_tokens", "eval_size", "select_samples",
                 "num_prompts", "micro_batch_prompts", "eval_batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.select_from is not None and args.select_from < args.num_prompts:
        p.error(f"--select-from {args.select_from} must be >= --num-prompts {args.num_prompts}")
    if args.prompt is not None and args.num_prompts != 1:
        p.error("--prompt gives one prompt: it cannot be combined with --num-prompts > 1")
    if args.temperature <= 0 or args.entropy_temperature <= 0:
        p.error("--temperature and --entropy-temperature must be > 0 (EM trains on sampled responses)")
    if not 0 < args.top_p <= 1 or args.repetition_penalty <= 0:
        p.error("--top-p must be in (0, 1] and --repetition-penalty > 0")
    try:
        args.eval_temperatures = [float(t) for t in args.eval_temperatures.split(",") if t.strip()]
    except ValueError:
        p.error(f"--eval-temperatures {args.eval_temperatures!r}: expected comma-separated numbers, e.g. 0,0.3,0.6,1.0")
    if any(t < 0 for t in args.eval_temperatures):
        p.error("--eval-temperatures must be >= 0 (0: greedy)")
    if args.select_from is None and args.prompt is None and args.prompt_index is None:
        args.select_from = max(16, args.num_prompts)
    return args


# ----------------------------------------------------------------------------------------------------------
# Sampling (plumbing): prefill each prompt once, share its KV cache across the G samples, drop finished rows
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, num_samples, max_new_tokens, temperature, eos_ids, generator,
             top_p=1.0, repetition_penalty=1.0):
    """Sample `num_samples` completions per prompt (temperature 0: greedy), optionally with nucleus sampling and
    HF's repetition penalty (applied to the raw logits, before temperature, as HF's processors are ordered).
    prompt_ids/prompt_mask: (P, Lp), left-padded. Returns completion_ids (P*G, T) and completion_lens (P*G,):
    row i holds tokens [0, len_i) including the EOS it generated; positions after it are padding (EOS id)."""
    P, G = prompt_ids.shape[0], num_samples
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(G)  # (P, ...) -> (P*G, ...): the prompt is encoded once per group
    logits = out.logits[:, -1].float().repeat_interleave(G, 0)  # (B, V), B = P*G
    attn = prompt_mask.repeat_interleave(G, 0)  # (B, Lp) grows by one column per decoded token
    next_pos = prompt_mask.sum(1).repeat_interleave(G, 0)  # (B,) position id of the next token
    B, V, device = P * G, logits.shape[-1], prompt_ids.device
    tokens = torch.full((B, max_new_tokens), eos_ids[0], dtype=torch.long, device=device)
    lens = torch.zeros(B, dtype=torch.long, device=device)
    alive = torch.arange(B, device=device)  # rows of the batch still decoding
    eos = torch.tensor(eos_ids, device=device)
    seen = None  # (b, V) tokens already in the prompt (padding excluded) or the completion, for the penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros(P, V, dtype=torch.bool, device=device)
        rows, cols = prompt_mask.nonzero(as_tuple=True)
        seen[rows, prompt_ids[rows, cols]] = True
        seen = seen.repeat_interleave(G, 0)
    for t in range(max_new_tokens):
        if seen is not None:  # HF RepetitionPenaltyLogitsProcessor: positive logits / penalty, negative * penalty
            logits = torch.where(seen, torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty), logits)
        if temperature > 0:  # inverse-CDF sampling: one uniform per row (torch.multinomial is ~40x slower on CPU)
            probs = torch.softmax(logits / temperature, -1)  # (b, V)
            order = None
            if top_p < 1.0:  # nucleus: keep the most likely tokens until the mass before them reaches top_p
                probs, order = probs.sort(-1, descending=True)
                probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
            cdf = probs.cumsum(-1)
            u = torch.rand(len(cdf), 1, generator=generator, device=device) * cdf[:, -1:]
            tok = torch.searchsorted(cdf, u).clamp(max=V - 1)  # (b, 1)
            tok = (order.gather(1, tok) if order is not None else tok).squeeze(1)
        else:
            tok = logits.argmax(-1)
        tokens[alive, t] = tok
        lens[alive] += 1
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
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        next_pos = next_pos + 1
        logits = out.logits[:, -1].float()
    T = max(int(lens.max()), 1)
    return tokens[:, :T], lens  # trim pad columns


def completion_mask_from_lens(lens, T):
    """(B, T) mask of the completion tokens, EOS included. Built from lengths, never from `ids != pad_id`:
    with pad == EOS that would drop the EOS the model generated (and its learning signal)."""
    return (torch.arange(T, device=lens.device)[None, :] < lens[:, None]).float()


# ----------------------------------------------------------------------------------------------------------
# The training forward: logits of exactly the distributions that produced each completion token
# ----------------------------------------------------------------------------------------------------------
def completion_logits(model, prompt_ids, prompt_mask, completion_ids, num_samples):
    """(B, T, V) fp32 logits at the positions that predicted completion tokens 0..T-1: the last prompt position and
    completion positions 0..T-2 (absolute positions P-1 .. P+T-2 of [prompt; completion]). The paper's code takes
    positions >= prompt_len instead (one too late, and counted without the left padding); see docs/em.md.
    The prompt runs once per prompt and its keys/values are repeated for its G completions (gradients flow back
    through the repeat), which equals the plain forward over [prompt; completion] at a fraction of the cost."""
    G = num_samples
    B, T = completion_ids.shape
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    prompt_out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = prompt_out.past_key_values
    cache.batch_repeat_interleave(G)
    attn = torch.cat([prompt_mask.repeat_interleave(G, 0), prompt_mask.new_ones(B, T)], 1)
    pos = prompt_mask.sum(1, keepdim=True).repeat_interleave(G, 0) + torch.arange(T, device=completion_ids.device)
    logits = prompt_out.logits[:, -1:].repeat_interleave(G, 0)  # (B, 1, V): predicts completion token 0
    if T > 1:
        out = model(input_ids=completion_ids[:, :-1], attention_mask=attn[:, :-1], position_ids=pos[:, :-1],
                    past_key_values=cache, use_cache=True)
        logits = torch.cat([logits, out.logits], 1)  # (B, T, V)
    return logits.float()


# ----------------------------------------------------------------------------------------------------------
# EM (algorithm logic)
# ----------------------------------------------------------------------------------------------------------
def token_entropy(logits, tau=1.0):
    """H(softmax(logits / tau)) per position, (..., V) -> (...), differentiable through the whole vocabulary.
    H = logsumexp(z) - sum_v softmax(z)_v z_v  (the code's -sum q log(q + 1e-12) without the epsilon)."""
    z = logits / tau
    return z.logsumexp(-1) - (torch.softmax(z, -1) * z).sum(-1)


def em_loss(entropy, mask, num_tokens=None):
    """Token-mean of the entropies over the mask: sum(M * H) / num_tokens. entropy, mask: (B, T). num_tokens is
    the masked-token count of the WHOLE batch (default: this one), so the micro-batch losses sum to the batch loss.
    The paper's code takes the token-mean per micro-batch of 2 and averages those means; same thing in spirit."""
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    return (entropy * mask).sum() / num_tokens


def logit_skewness(logits):
    """The paper's diagnostic: sample skewness (Fisher-Pearson, biased, as scipy.stats.skew) of each logits vector.
    logits (N, V) -> per-position skewness (N,) and the pooled skewness of all N*V values (the variant of the
    paper's logits_shift.py, which flattens every logit of every step into one array)."""
    x = logits.double()
    d = x - x.mean(-1, keepdim=True)
    per_position = (d ** 3).mean(-1) / (d ** 2).mean(-1) ** 1.5
    d = x - x.mean()
    pooled = float((d ** 3).mean() / (d ** 2).mean() ** 1.5)
    return per_position, pooled


# ----------------------------------------------------------------------------------------------------------
# Prompts, selection, evaluation (plumbing)
# ----------------------------------------------------------------------------------------------------------
def tokenize_prompts(tokenizer, prompts, device):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def decode(tokenizer, ids, lens):
    return tokenizer.batch_decode([c[:n] for c, n in zip(ids.tolist(), lens.tolist())], skip_special_tokens=True)


def select_prompts(model, tokenizer, candidates, prompt_of, args, eos_ids, autocast, generator):
    """The paper's selection: sample k responses per candidate with the training sampler, grade them, and rank the
    candidates by the variance of their accuracy p(1 - p) (highest first: the model is most unsure there)."""
    k, rows = args.select_samples, []
    for i in range(0, len(candidates), 8):
        chunk = candidates[i:i + 8]
        ids, mask = tokenize_prompts(tokenizer, [prompt_of(r) for r in chunk], model.device)
        with autocast():
            out, lens = generate(model, ids, mask, k, args.max_new_tokens, args.temperature, eos_ids, generator,
                                 args.top_p, args.repetition_penalty)
        texts = decode(tokenizer, out, lens)
        for j, rec in enumerate(chunk):
            acc = sum(common.grade(t, rec["answer"]) for t in texts[j * k:(j + 1) * k]) / k
            rows.append({"index": i + j, "question": rec["question"], "answer": rec["answer"], "accuracy": acc,
                         "variance": acc * (1 - acc)})
    return sorted(rows, key=lambda r: (-r["variance"], r["index"]))  # ties: the earlier candidate


def evaluate(model, tokenizer, prompts, records, temperatures, args, eos_ids, autocast, generator):
    """Held-out accuracy at each temperature (0: greedy; one plain sample per problem, no top-p / penalty, like
    the paper's evaluation), plus mean entropy and logit skewness on the first --diag-size prompts' responses
    sampled at the training temperature (one teacher-forced forward over them)."""
    results, diag = {}, None
    for temperature in temperatures:
        correct, samples = 0, []
        for i in range(0, len(prompts), args.eval_batch_size):
            ids, mask = tokenize_prompts(tokenizer, prompts[i:i + args.eval_batch_size], model.device)
            with autocast():
                out, lens = generate(model, ids, mask, 1, args.max_new_tokens, temperature, eos_ids, generator)
            if diag is None and temperature == args.temperature:
                n = min(args.diag_size, len(lens))
                diag = (ids[:n], mask[:n], out[:n], lens[:n])
            for text, rec in zip(decode(tokenizer, out, lens), records[i:i + args.eval_batch_size]):
                ok = common.grade(text, rec["answer"])
                correct += ok
                samples.append({"question": rec["question"], "answer": rec["answer"], "completion": text, "correct": ok})
        results[temperature] = (correct / len(prompts), samples[:4])
    ids, mask, out, lens = diag
    with torch.no_grad(), autocast():
        logits = completion_logits(model, ids, mask, out, 1)  # (n, T, V)
    logits = logits[completion_mask_from_lens(lens, out.shape[1]).bool()]  # (tokens, V): generated positions only
    skew, pooled = logit_skewness(logits)
    stats = {"eval/entropy": float(token_entropy(logits).mean()),
             "eval/entropy_tau": float(token_entropy(logits, args.entropy_temperature).mean()),
             "eval/logit_skew": float(skew.mean()), "eval/logit_skew_pooled": pooled}
    return results, stats


def main(argv=None):
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = common.resolve_device(args.device)
    weight_dtype, autocast_dtype = common.resolve_dtype(args.dtype, device)
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    run_dir = Path(args.output_dir or f"runs/em__{args.seed}__{int(time.time())}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
    (run_dir / "samples.jsonl").write_text("")  # a few eval completions, appended at every eval

    # data and prompts
    train, test = common.train_eval_records(args.dataset, args.eval_dataset, args.question_key, args.answer_key,
                                            seed=args.seed, eval_size=args.eval_size)
    tokenizer = common.load_tokenizer(args.model)
    fewshot_k = common.default_fewshot(args.dataset) if args.fewshot is None else args.fewshot
    fewshot, train = train[:fewshot_k], train[fewshot_k:]  # the examples are not also training problems
    if not train and args.prompt is None:
        raise SystemExit(f"error: dataset {args.dataset} has no training problems left after {fewshot_k} few-shot examples")
    if args.prompt_index is not None and not 0 <= args.prompt_index <= len(train) - args.num_prompts:
        raise SystemExit(f"error: --prompt-index {args.prompt_index} (with --num-prompts {args.num_prompts}) is out of "
                         f"range: the training split has {len(train)} rows")
    prompt_of = lambda rec: common.build_prompt(tokenizer, rec["question"], fewshot, args.system_prompt)
    test_prompts = [prompt_of(r) for r in test]
    sweep = sorted(set(args.eval_temperatures) | {0.0, args.temperature})

    model = common.load_model(args.model, device, weight_dtype)
    model.eval()  # no dropout: the sampled responses come from the same function the loss differentiates
    gen_eos = model.generation_config.eos_token_id  # an int, a list, or None
    eos_ids = sorted({tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})
    # fused AdamW: one kernel for all parameters (~8x faster than the per-tensor loop on CPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / max(1, args.warmup_steps)))
    generator = torch.Generator(device).manual_seed(args.seed)
    data_rng = random.Random(args.seed)

    # ---- 0. the training prompt(s): given, or the paper's highest accuracy-variance selection -----------------
    if args.prompt is not None:
        pool = [{"question": args.prompt, "answer": None}]
        print(f"em: training prompt given with --prompt (no label): {args.prompt!r}")
    elif args.prompt_index is not None:
        pool = train[args.prompt_index:args.prompt_index + args.num_prompts]
        print(f"em: training prompt(s) = training row(s) {args.prompt_index}..{args.prompt_index + args.num_prompts - 1}: "
              f"{pool[0]['question']!r}" + (" ..." if len(pool) > 1 else ""))
    else:
        t0 = time.perf_counter()
        candidates = train[:args.select_from]
        ranked = select_prompts(model, tokenizer, candidates, prompt_of, args, eos_ids, autocast, generator)
        pool = [candidates[r["index"]] for r in ranked[:args.num_prompts]]
        (run_dir / "selection.json").write_text(json.dumps(ranked, indent=2))
        best, ties = ranked[0], sum(r["variance"] == ranked[0]["variance"] for r in ranked)
        print(f"em: selected training row {best['index']} {best['question']!r} (answer {best['answer']}) because its "
              f"{args.select_samples} samples at T={args.temperature} were {best['accuracy']:.0%} correct: accuracy "
              f"variance {best['variance']:.3f}, the highest of {len(ranked)} candidates ({ties} tied; the first "
              f"wins); {time.perf_counter() - t0:.0f}s. Ranking: {run_dir / 'selection.json'}")
        if best["variance"] == 0:
            print("warning: every candidate was all right or all wrong; try a larger --select-from or --select-samples")
    order = []

    metrics_file = open(run_dir / "metrics.jsonl", "w")
    def log(record):
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    def run_eval(step, full):
        t0 = time.perf_counter()
        eval_generator = torch.Generator(device).manual_seed(args.seed + 1)  # the same draws at every eval
        temps = sweep if full or args.sweep_every_eval else [0.0, args.temperature]
        res, stats = evaluate(model, tokenizer, test_prompts, test, temps, args, eos_ids, autocast, eval_generator)
        record = {"step": step, "eval/accuracy": res[0.0][0], "eval/sampled_accuracy": res[args.temperature][0],
                  **{f"eval/accuracy_T{t:g}": res[t][0] for t in temps if t in args.eval_temperatures}, **stats,
                  "eval/time": round(time.perf_counter() - t0, 2)}
        log(record)
        with open(run_dir / "samples.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "greedy": res[0.0][1], "sampled": res[args.temperature][1]}) + "\n")
        parts = [f"greedy acc {res[0.0][0]:.1%}", f"sampled acc (T={args.temperature:g}) {res[args.temperature][0]:.1%}"]
        parts += [f"T={t:g} {res[t][0]:.0%}" for t in temps if t not in (0.0, args.temperature)]
        tqdm.write(f"eval step {step}: {'  '.join(parts)} | H {stats['eval/entropy']:.3f} skew "
                   f"{stats['eval/logit_skew']:.3f} ({len(test)} problems, {time.perf_counter() - t0:.0f}s)")
        return record

    print(f"em: {len(pool)} training prompt(s), {len(test)} eval problems, {fewshot_k}-shot, model {args.model} on "
          f"{device} (weights {weight_dtype}, autocast {autocast_dtype}), output {run_dir}")
    before = run_eval(0, full=True)
    first_entropy, warned = None, False
    bar = tqdm(range(1, args.steps + 1), desc="em", dynamic_ncols=True)
    for step in bar:
        t_step = time.perf_counter()
        # ---- 1. sample G responses for each of P prompt rows (one-shot: P copies of the same prompt) ------------
        batch = []
        for _ in range(args.prompts_per_step):
            if not order:
                order = list(range(len(pool)))
                data_rng.shuffle(order)
            batch.append(pool[order.pop()])
        prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [prompt_of(r) for r in batch], device)  # (P, Lp)
        G = args.num_generations
        with autocast():
            completion_ids, lens = generate(model, prompt_ids, prompt_mask, G, args.max_new_tokens, args.temperature,
                                            eos_ids, generator, args.top_p, args.repetition_penalty)  # (P*G, T)
        mask = completion_mask_from_lens(lens, completion_ids.shape[1])  # (P*G, T)
        truncated = ~torch.isin(completion_ids.gather(1, (lens - 1)[:, None]).squeeze(1), torch.tensor(eos_ids, device=device))
        gen_time = time.perf_counter() - t_step
        # monitoring only (never in the loss): how often the training samples are right, when the prompt has a label
        texts = decode(tokenizer, completion_ids, lens)
        labels = [r["answer"] for r in batch for _ in range(G)]
        train_acc = (sum(common.grade(t, a) for t, a in zip(texts, labels)) / len(texts)) if batch[0]["answer"] else None

        # ---- 2. one optimizer update on the token-mean entropy (micro-batches of whole prompt rows) -----------
        t_train = time.perf_counter()
        num_tokens = mask.sum()  # the normalizer of the whole batch
        optimizer.zero_grad(set_to_none=False)
        stats = {"loss": 0.0, "entropy_sum": 0.0}
        for i in range(0, len(batch), args.micro_batch_prompts):
            ps = list(range(i, min(i + args.micro_batch_prompts, len(batch))))
            r = torch.arange(i * G, (ps[-1] + 1) * G, device=device)  # completion rows of these prompts
            T = int(lens[r].max())  # trimmed to this micro-batch's longest response
            with autocast():
                logits = completion_logits(model, prompt_ids[ps], prompt_mask[ps], completion_ids[r, :T], G)  # (b, T, V)
            entropy = token_entropy(logits, args.entropy_temperature)  # (b, T), with grad
            loss = em_loss(entropy, mask[r, :T], num_tokens)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; stopping before the update "
                                 f"(the last saved model in {run_dir / 'model'} is untouched)")
            loss.backward()  # accumulates: the sum over micro-batches is the full-batch gradient
            stats["loss"] += loss.item()
            with torch.no_grad():
                stats["entropy_sum"] += float((token_entropy(logits) * mask[r, :T]).sum())
            del logits, entropy, loss
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm))
        if not math.isfinite(grad_norm):
            raise SystemExit(f"error: gradient norm is {grad_norm} at step {step}; stopping before the update")
        optimizer.step()
        scheduler.step()
        train_time = time.perf_counter() - t_train
        step_time = time.perf_counter() - t_step

        # ---- 3. log -------------------------------------------------------------------------------------------
        record = {"step": step, "reward": train_acc, "loss": stats["loss"],
                  "entropy": stats["entropy_sum"] / float(num_tokens), "truncated": float(truncated.float().mean()),
                  "completion_len": float(lens.float().mean()), "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                  "gen_time": round(gen_time, 3), "train_time": round(train_time, 3), "step_time": round(step_time, 3),
                  "tokens_per_s": round(float(lens.sum()) / step_time, 1)}
        log(record)
        bar.set_postfix(H_tau=f"{record['loss']:.3f}")
        tqdm.write(f"step {step:4d} | H_tau {record['loss']:.4f} | H {record['entropy']:.4f} | train acc "
                   f"{'-' if train_acc is None else format(train_acc, '.3f')} | len {record['completion_len']:.1f} "
                   f"trunc {record['truncated']:.2f} | gnorm {grad_norm:.3f} | gen {gen_time:.1f}s train {train_time:.1f}s")
        first_entropy = record["loss"] if first_entropy is None else first_entropy
        if record["loss"] < 0.1 * first_entropy and not warned:
            warned = True
            tqdm.write("warning: the training entropy fell below 10% of its start: the paper's 'over-confidence' "
                       "regime, where accuracy declines. Watch the evals; fewer --steps or a smaller --lr may be better.")
        stop = record["loss"] < args.min_entropy
        if stop:
            tqdm.write(f"stopping: training entropy {record['loss']:.4f} < --min-entropy {args.min_entropy}")
        if args.eval_every and step % args.eval_every == 0 and step != args.steps and not stop:
            run_eval(step, full=False)
            if not args.no_save:
                common.save_pretrained_atomic(model, tokenizer, run_dir / "model")
        if stop:
            break
    bar.close()

    after = run_eval(step, full=True)
    if not args.no_save:
        common.save_pretrained_atomic(model, tokenizer, run_dir / "model")
    metrics_file.close()
    rows = [("greedy accuracy (T=0)", "eval/accuracy", ".1%"), (f"sampled accuracy (T={args.temperature:g})", "eval/sampled_accuracy", ".1%")]
    rows += [(f"accuracy at T={t:g}", f"eval/accuracy_T{t:g}", ".1%") for t in args.eval_temperatures if t not in (0.0, args.temperature)]
    rows += [("mean token entropy (T=1)", "eval/entropy", ".3f"), (f"mean token entropy (tau={args.entropy_temperature:g})",
             "eval/entropy_tau", ".3f"), ("logit skewness (per position)", "eval/logit_skew", ".3f"),
             ("logit skewness (pooled)", "eval/logit_skew_pooled", ".3f")]
    print(f"\n{'held-out (' + str(len(test)) + ' problems)':<34}{'before':>8}{'after':>8}")
    for name, key, f in rows:
        print(f"{name:<34}{format(before[key], f):>8}{format(after[key], f):>8}")
    print(f"metrics: {run_dir / 'metrics.jsonl'}" + ("" if args.no_save else f"   model: {run_dir / 'model'}"))
    return before, after


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the last saved model (if any) is intact; nothing half-written was kept")
