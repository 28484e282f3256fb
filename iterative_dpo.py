"""Online iterative DPO: sample, grade, pair, a few DPO updates, resample; one readable file.

Papers: Rafailov et al. 2023, "Direct Preference Optimization" (https://arxiv.org/abs/2305.18290), Eq. 7 (the loss);
the online/iterative scheme: Xiong et al. 2024 (https://arxiv.org/abs/2312.11456) and Dong et al. 2024, "RLHF
Workflow" (https://arxiv.org/abs/2405.07863). The RAFT++ paper's baseline (Xiong et al. 2025, arXiv 2504.11343 v2,
Table 1: Qwen2.5-Math-7B average 48.8).

One step = one iteration: sample G completions y_1..G for each of P prompts from the current policy pi_theta and
grade them (reward r_i). A prompt whose rewards are not all equal gives one pair: chosen y_w = a random completion
with the group's highest reward, rejected y_l = a random one with its lowest (best vs worst; with 0/1 rewards a
random correct vs a random incorrect one). All-correct and all-wrong prompts give no pair. Then, per pair:
    log pi(y|x)  = sum_t log pi(y_t | x, y_<t)      over the completion's tokens, EOS included, padding excluded;
                                                    logits at T = 1: DPO's policy is the model itself
    h_w, h_l     = log pi_theta(y_w|x) - log pi_ref(y_w|x),  log pi_theta(y_l|x) - log pi_ref(y_l|x)
    loss         = mean over pairs of -log sigmoid(beta * (h_w - h_l))                  (DPO, Eq. 7)
pi_ref is the policy at the start of the iteration (RLHF Workflow; default) or the initial model (--reference
initial). The pairs are cut into --num-minibatches optimizer updates; then the next step samples again.

    python iterative_dpo.py                            # embedded SmolLM2-135M-Instruct, built-in arithmetic, CPU
    python iterative_dpo.py --model Qwen/Qwen2.5-Math-1.5B --dataset HuggingFaceH4/MATH-500 --fewshot 0 \
        --max-new-tokens 1024 --lr 1e-6 --prompts-per-step 16 --gradient-checkpointing   # one GPU, network
"""
import argparse
import json
import math
import random
import time

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common

ALGO = "iterative_dpo"


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
    # sampling (one step = one iteration: a generation batch, its pairs, --num-minibatches DPO updates)
    p.add_argument("--steps", type=int, default=40, help="iterations: generation batches, each followed by its updates")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per generation batch")
    p.add_argument("--num-generations", type=int, default=8, help="n: completions sampled per prompt (>= 2)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion length cap")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (DPO log-probs use T = 1)")
    # DPO
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta: strength of the implicit KL to the reference")
    p.add_argument("--reference", default="iteration", choices=["iteration", "initial"],
                   help="pi_ref: the policy at the start of each iteration (RLHF Workflow) or the initial model")
    p.add_argument("--num-minibatches", type=int, default=2, help="updates per iteration: the pairs, split")
    # optimization
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (constant after warm-up)")
    p.add_argument("--warmup-steps", type=int, default=2, help="linear LR warm-up, in optimizer updates")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--micro-batch-prompts", type=int, default=1, help="prompts per forward/backward (accumulation)")
    # evaluation / logging / saving
    p.add_argument("--eval-every", type=int, default=20, help="evaluate every N steps (0: only before and after)")
    p.add_argument("--eval-size", type=int, default=100, help="held-out problems per evaluation")
    p.add_argument("--eval-batch-size", type=int, default=64, help="prompts per generation call during eval")
    p.add_argument("--output-dir", default=None, help="default: runs/<algo>__<seed>__<time>")
    p.add_argument("--no-save", action="store_true", help="do not write the final model")
    p.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16"], help="saved weights (default: fp32)")
    args = p.parse_args(argv)
    common.check_args(p, args, at_least_one=("steps", "prompts_per_step", "max_new_tokens", "num_minibatches",
                                             "eval_size", "eval_batch_size", "micro_batch_prompts"),
                      positive=("lr", "temperature", "beta", "max_grad_norm"),
                      non_negative=("warmup_steps", "weight_decay", "eval_every"))
    if args.num_generations < 2:
        p.error("--num-generations must be >= 2: a preference pair needs two completions of the same prompt")
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


@torch.no_grad()
def frozen_logprobs(model, batches, prompt_ids, prompt_mask, completion_ids, temperature, autocast):
    """(P*G, T) log-probs and entropies of the rows in `batches`, no grad (pi_old, pi_ref); other rows 0."""
    logprobs, entropy = (torch.zeros(completion_ids.shape, device=completion_ids.device) for _ in range(2))
    for ps, prompt_index, r, T in batches:
        with autocast():
            logprobs[r, :T], entropy[r, :T] = completion_logprobs(
                model, prompt_ids[ps], prompt_mask[ps], completion_ids[r, :T], prompt_index, temperature)
    return logprobs, entropy


def sample_groups(model, tokenizer, prompts, records, G, args, reward_fn, eos_ids, generator, autocast):
    """G graded completions per prompt -> prompt ids/mask (P, Lp), completion ids (P*G, T), lens, rewards (P*G,)."""
    prompt_ids, prompt_mask = common.tokenize_prompts(tokenizer, prompts, model.device)
    common.check_context_length(model, prompt_ids.shape[1], args.max_new_tokens)
    with autocast():
        completion_ids, lens = generate(model, prompt_ids, prompt_mask, G, args.max_new_tokens, args.temperature,
                                        eos_ids, generator)  # (P*G, T)
    texts = common.decode(tokenizer, completion_ids, lens)
    rewards = common.compute_rewards(reward_fn, [p for p in prompts for _ in range(G)], texts,
                                     [r for r in records for _ in range(G)])
    return prompt_ids, prompt_mask, completion_ids, lens, torch.tensor(rewards, device=model.device)


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
# Online iterative DPO (algorithm logic)
# ----------------------------------------------------------------------------------------------------------
def best_vs_worst_pairs(rewards, num_generations, rng):
    """rewards (P*G,) -> [(chosen row, rejected row)], one per prompt whose rewards are not all equal: a random row
    with the group's highest reward vs a random row with its lowest (ties broken by `rng`, a random.Random)."""
    pairs = []
    for p, group in enumerate(rewards.view(-1, num_generations).tolist()):
        best, worst = max(group), min(group)
        if best > worst:  # all-correct and all-wrong prompts give no pair
            pairs.append((p * num_generations + rng.choice([i for i, r in enumerate(group) if r == best]),
                          p * num_generations + rng.choice([i for i, r in enumerate(group) if r == worst])))
    return pairs


def sequence_logprobs(logprobs, mask):
    """log pi(y|x) (B,): the token log-probs (B, T) summed over the completion mask (EOS in, padding out)."""
    return (logprobs * mask).sum(1)


def pair_sequence_logprobs(seq_logprobs, rows, pairs):
    """seq_logprobs (b,) of completion rows `rows` (b,) -> (chosen (n,), rejected (n,)) of `pairs` [(row, row)]."""
    at = {row: i for i, row in enumerate(rows.tolist())}
    return seq_logprobs[[at[w] for w, _ in pairs]], seq_logprobs[[at[l] for _, l in pairs]]


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, num_pairs=None):
    """Sum over the pairs of -log sigmoid(beta * (h_w - h_l)), h = log pi_theta(y|x) - log pi_ref(y|x) (n,), divided
    by num_pairs: the whole mini-batch's count (default: these pairs), so micro-batch losses sum to its loss."""
    num_pairs = len(chosen_logps) if num_pairs is None else num_pairs
    chosen, rejected = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    margin = beta * (chosen - rejected)
    loss = -torch.nn.functional.logsigmoid(margin).sum() / num_pairs
    with torch.no_grad():  # diagnostics: pairs the implicit reward ranks right, and the two log-ratio terms
        stats = {"right_sum": float((margin > 0).sum()), "chosen_sum": float(chosen.sum()),
                 "rejected_sum": float(rejected.sum())}
    return loss, stats


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, prompts, records, args, eos_ids, autocast, step, run_dir, metrics_file):
    """Held-out greedy and sampled accuracy (one sample at T, the same draws at every eval), logged."""
    t0, results, shown, generator = time.perf_counter(), {}, {}, torch.Generator(model.device).manual_seed(args.seed+1)
    prompts, records, n = common.shard(prompts), common.shard(records), len(prompts)  # this rank's share of n
    for name, temperature in (("accuracy", 0.0), ("sampled_accuracy", args.temperature)):
        samples = []
        for i in range(0, len(prompts), args.eval_batch_size):
            ids, mask = common.tokenize_prompts(tokenizer, prompts[i:i + args.eval_batch_size], model.device)
            with autocast():
                out, lens = generate(model, ids, mask, 1, args.max_new_tokens, temperature, eos_ids, generator)
            samples += [dict(question=rec["question"], answer=rec["answer"], completion=text,
                             correct=common.grade(text, rec["answer"]))
                        for text, rec in zip(common.decode(tokenizer, out, lens), records[i:i + args.eval_batch_size])]
        results[f"eval/{name}"], shown[name] = common.all_sum(sum(s["correct"] for s in samples)) / n, samples[:4]
    log_step(metrics_file, {"step": step, **results, "eval/time": round(time.perf_counter() - t0, 2)})
    with common.open_log(run_dir / "samples.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "greedy": shown["accuracy"], "sampled": shown["sampled_accuracy"]}) + "\n")
    tqdm.write(f"eval step {step}: greedy acc {results['eval/accuracy']:.1%}  sampled acc (T={args.temperature}) "
               f"{results['eval/sampled_accuracy']:.1%}  ({n} problems, {time.perf_counter() - t0:.0f}s)")
    return results


def main(argv=None):
    args = parse_args(argv)  # ---- setup: arguments, precision, data, models, optimizer ---------------------------
    common.seed_all(args.seed)
    device = common.resolve_device(args.device, distributed=True)  # torchrun: one process per device
    weight_dtype, autocast_dtype = common.resolve_dtype(args.dtype, device)
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    run_dir, tokenizer = common.make_run_dir(args, ALGO), common.load_tokenizer(args.model)
    train, test, fewshot = common.load_problems(args)
    prompt_of = lambda rec: common.build_prompt(tokenizer, rec["question"], fewshot, args.system_prompt)
    test_prompts, reward_fn = [prompt_of(r) for r in test], common.load_reward_fn(args.reward_fn)
    model = common.load_model(args.model, device, weight_dtype, args.gradient_checkpointing)
    model = common.add_lora(model.eval(), args)  # eval: no dropout; the reference and policy: one function
    # --reference initial: a frozen copy of the start model (LoRA: the policy, its adapter off; --fsdp: whole, frozen:
    # nothing to shard); iteration: the policy itself (adapter on; --fsdp: sharded), before the step's updates
    ref_model = common.reference_model(model) if args.reference == "initial" else model
    model, eos_ids = common.shard_blocks(model, args), common.stop_token_ids(tokenizer, model)  # --fsdp: FSDP2
    common.check_context_length(model, 0, args.max_new_tokens)
    optimizer = torch.optim.AdamW(common.param_groups(model), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / max(1, args.warmup_steps)))
    common.gather_blocks(model, True)  # --fsdp: whole blocks for sampling, evaluation, no-grad forwards
    generator, data_rng, order = common.rank_generator(device, args.seed), random.Random(args.seed), []
    pair_rng = random.Random(args.seed + 2)  # the same on every rank: each pairs the whole step (below)
    metrics_file, G, P_all = common.open_log(run_dir / "metrics.jsonl"), args.num_generations, args.prompts_per_step
    print(f"{ALGO}: {len(train)} train / {len(test)} eval problems, {len(fewshot)}-shot, model {args.model} on "
          f"{device} (weights {weight_dtype}, autocast {autocast_dtype}), output {run_dir}")
    before = evaluate(model, tokenizer, test_prompts, test, args, eos_ids, autocast, 0, run_dir, metrics_file)
    no_pair_streak, warned_truncated, skipped_updates = 0, False, 0
    for step in tqdm(range(1, args.steps + 1), desc=ALGO, dynamic_ncols=True):
        # ---- 1. sample n completions for each of P prompts, rewards (torchrun: all draw the same, each its share) --
        t_step, batch = time.perf_counter(), common.shard(common.next_batch(train, order, data_rng, P_all))
        prompt_ids, prompt_mask, completion_ids, lens, rewards = sample_groups(
            model, tokenizer, [prompt_of(r) for r in batch], batch, G, args, reward_fn, eos_ids, generator, autocast)
        mask, gen_time = completion_mask_from_lens(lens, completion_ids.shape[1]), time.perf_counter() - t_step
        # ---- 2. one (chosen, rejected) pair per prompt with unequal rewards: every rank pairs the whole step with the
        # same pair_rng (one process's draws), keeps its own; update k: each rank's k-th slice, never empty on all
        all_rewards, B = common.all_gather(rewards), len(lens)  # (world * B,): rank r's rows are r * B ...
        all_pairs = best_vs_worst_pairs(all_rewards, G, pair_rng)
        pairs = [(w - common.rank() * B, l - common.rank() * B) for w, l in all_pairs if w // B == common.rank()]
        rows = sorted(row for pair in pairs for row in pair)  # this rank's completions in the loss
        n_mb = min(args.num_minibatches, max(map([w // B for w, _ in all_pairs].count, range(common.world_size()))))
        updates = [pairs[k * len(pairs) // n_mb:(k + 1) * len(pairs) // n_mb] for k in range(n_mb)]
        # ---- 3. frozen log-probs: pi_ref of every paired completion, before any update (T = 1: DPO's policy) -----
        t_train, frozen = time.perf_counter(), (prompt_ids, prompt_mask, completion_ids, 1.0, autocast)
        batches, pad = micro_batches(rows, G, args.micro_batch_prompts, lens), micro_batches([0], G, 1, lens)[0]
        with common.adapter_off(ref_model if args.reference == "initial" else None):  # iteration: the adapter on
            ref_seq = sequence_logprobs(frozen_logprobs(ref_model, batches, *frozen)[0], mask)  # (P*G,) summed
        common.gather_blocks(model, False)  # ---- 4. optimizer updates (--fsdp: sharded): --num-minibatches of pairs
        stats = dict.fromkeys(("loss", "entropy_sum", "tokens", "grad_norm"), 0.0)
        for update_pairs in updates:
            model.zero_grad(set_to_none=False)  # (not the optimizer's foreach zeroing: --fsdp mixes tensor types)
            update_rows = sorted(row for pair in update_pairs for row in pair)
            num_pairs = common.all_sum(len(update_pairs))  # the DPO mean's count: the update's pairs on every rank
            for ps, prompt_index, r, T, live in common.even_micro_batches(  # --fsdp: as many on every rank
                    model, micro_batches(update_rows, G, args.micro_batch_prompts, lens), pad):
                with autocast():
                    logprobs, entropy = completion_logprobs(model, prompt_ids[ps], prompt_mask[ps],
                                                            completion_ids[r, :T], prompt_index, 1.0)
                m = mask[r, :T] * live  # (b, T); a pad pass (live 0) has no pair and counts no token
                mb_pairs = [pair for pair in update_pairs if pair[0] // G in ps and live]  # its rows share a prompt
                chosen, rejected = pair_sequence_logprobs(sequence_logprobs(logprobs, m), r, mb_pairs)
                w, l = [w for w, _ in mb_pairs], [l for _, l in mb_pairs]
                loss, _ = dpo_loss(chosen, rejected, ref_seq[w], ref_seq[l], args.beta, num_pairs=num_pairs)
                stop_if_not_finite(loss.item(), "the loss", step, run_dir)
                loss.backward()  # accumulates: the sum over micro-batches is the mini-batch gradient
                s = dict(loss=loss.item() / len(updates), entropy_sum=float((entropy.detach() * m).sum()),
                         tokens=float(m.sum()))
                stats = {key: stats[key] + s.get(key, 0.0) for key in stats}
            common.all_reduce_gradients(model)  # torchrun: the sum over ranks, i.e. the whole update's gradient
            grad_norm = common.clip_grad_norm(model, args.max_grad_norm)  # (--fsdp: over every rank's shard)
            stop_if_not_finite(grad_norm, "the gradient norm", step, run_dir)
            stats["grad_norm"] += grad_norm / len(updates)
            optimizer.step()
            scheduler.step()
        common.gather_blocks(model, True)
        stats = {k: v if k == "grad_norm" else common.all_sum(v) for k, v in stats.items()}  # the whole step's sums
        implicit = {}  # the implicit rewards after this iteration's updates, on its pairs (one no-grad forward)
        if all_pairs:  # (before the first update h_w = h_l = 0 with the iteration's reference: nothing to measure)
            seq = sequence_logprobs(frozen_logprobs(model, batches, *frozen)[0], mask)
            w, l = [w for w, _ in pairs], [l for _, l in pairs]
            _, s = dpo_loss(seq[w], seq[l], ref_seq[w], ref_seq[l], args.beta, num_pairs=len(all_pairs))
            implicit = {key: common.all_sum(value) / len(all_pairs) for key, value in s.items()}  # every rank's
        else:  # no prompt has both a better and a worse completion: no update at all (not a zero-gradient step)
            skipped_updates, stats["loss"], stats["grad_norm"] = skipped_updates + 1, None, None
        train_time, step_time = time.perf_counter() - t_train, time.perf_counter() - t_step
        # ---- 5. log, evaluate, save ---------------------------------------------------------------------------
        n_tok, correct, rewards = stats["tokens"] or None, (all_rewards > 0).view(-1, G), all_rewards
        trunc = float(common.all_gather(truncated_rows(completion_ids, lens, eos_ids).float()).mean())
        lens = common.all_gather(lens)  # every rank's rows, as the rewards
        record = {"step": step, "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                  "correct": float(correct.float().mean()), "pairs": len(all_pairs),
                  "frac_no_pair": 1 - len(all_pairs) / len(correct),  # prompts without a pair, of every rank's
                  "frac_no_correct": float((~correct.any(1)).float().mean()),
                  "frac_all_correct": float(correct.all(1).float().mean()),
                  "truncated": trunc, "completion_len": float(lens.float().mean()), "samples_used": 2 * len(all_pairs),
                  "tokens_used": int(stats["tokens"]), "updates": len(updates), "skipped_updates": skipped_updates,
                  "entropy": stats["entropy_sum"] / n_tok if n_tok and args.temperature == 1.0 else None,
                  "loss": stats["loss"], "reward_accuracy": implicit.get("right_sum"),
                  "chosen_logratio": implicit.get("chosen_sum"), "rejected_logratio": implicit.get("rejected_sum"),
                  "grad_norm": stats["grad_norm"], "lr": scheduler.get_last_lr()[0],
                  "gen_time": round(gen_time, 3), "train_time": round(train_time, 3), "step_time": round(step_time, 3),
                  "tokens_per_s": round(float(lens.sum()) / step_time, 1)}
        log_step(metrics_file, record, [("reward", "reward", ".3f"), ("pairs", "pairs", "d"),
                                        ("completion_len", "len", ".1f"), ("truncated", "trunc", ".2f"),
                                        ("loss", "loss", ".4f"), ("reward_accuracy", "rew acc", ".2f"),
                                        ("chosen_logratio", "h_w", ".3f"), ("rejected_logratio", "h_l", ".3f"),
                                        ("grad_norm", "gnorm", ".3f"), ("gen_time", "gen s", ".1f"),
                                        ("train_time", "train s", ".1f")])
        no_pair_streak = no_pair_streak + 1 if not all_pairs else 0
        if no_pair_streak == 3:  # printed once per streak
            tqdm.write("warning: no prompt has had both a correct and a wrong completion for 3 steps: no pairs, no "
                       "learning signal. Try --fewshot, a higher --temperature or more --num-generations.")
        if record["truncated"] > 0.5 and not warned_truncated:
            warned_truncated = True
            tqdm.write(f"warning: {record['truncated']:.0%} of completions hit --max-new-tokens {args.max_new_tokens}; "
                       "truncated answers usually score 0: consider raising it.")
        if args.eval_every and step % args.eval_every == 0 and step != args.steps:
            evaluate(model, tokenizer, test_prompts, test, args, eos_ids, autocast, step, run_dir, metrics_file)
            common.save_model(model, tokenizer, run_dir, args)
    after = evaluate(model, tokenizer, test_prompts, test, args, eos_ids, autocast, args.steps, run_dir, metrics_file)
    common.save_model(model, tokenizer, run_dir, args, final=True)  # --merge-lora: the merged model
    metrics_file.close()
    print(f"held-out greedy accuracy {before['eval/accuracy']:.1%} -> {after['eval/accuracy']:.1%}, sampled "
          f"{before['eval/sampled_accuracy']:.1%} -> {after['eval/sampled_accuracy']:.1%}; metrics in {run_dir}")
    return before, after


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the last saved model (if any) is intact; nothing half-written was kept")
