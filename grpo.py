"""GRPO: Group Relative Policy Optimization, one readable file.

Paper: Shao et al. 2024, "DeepSeekMath" (https://arxiv.org/abs/2402.03300), §4.1, Eq. 3 (objective) and Eq. 4
(k3 KL). Variants, as flags: Dr. GRPO (arXiv 2503.20783), DAPO (2503.14476: token-mean, clip-higher, §3.2 dynamic
sampling), GSPO (2507.18071 §4.1), CISPO (MiniMax-M1, 2506.13585 §3.1 Eq. 4-5), RLOO (Ahmadian et al., 2402.14740).
For each prompt x sample G completions y_1..G from pi_old and score them (r_i); for token t of completion i:
    A_i     = (r_i - mean(r)) / (std(r) + eps)  (Eq. 3, §4.1.2)  rloo: r_i - mean_{j!=i} r_j = G/(G-1) (r_i - mean(r))
    rho_t   = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, y_<t)      gspo: s_i = exp(mean_t log rho_t) at every t
    l_t     = -min(rho_t * A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_t
              cispo: -sg(min(rho_t, 1 + eps_high)) * A_i * log pi_theta(y_t | x, y_<t) + beta * KL_t
    KL_t    = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1             (k3, Eq. 4; unbiased and >= 0)
    loss    = aggregate(l_t)    grpo: mean over sequences of each sequence's token-mean (DeepSeekMath Eq. 3)
                                dapo (and cispo): token-mean over the whole generation batch (TRL >= 0.22 default)
                                dr_grpo: token-sum / (num sequences * max_new_tokens)
With mu = 1 rho = 1: the loss value is ~0 but its gradient is -A grad log pi (policy gradient, group-mean baseline).
    python grpo.py                                   # embedded SmolLM2-135M-Instruct, built-in arithmetic, CPU
    python grpo.py --model Qwen/Qwen2.5-Math-1.5B --dataset HuggingFaceH4/MATH-500 --fewshot 0 \
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

ALGO = "grpo"
CONSOLE_FIELDS = [("reward", "reward", ".3f"), ("frac_zero_std", "zero-std", ".2f"), ("completion_len", "len", ".1f"),
                  ("truncated", "trunc", ".2f"), ("entropy", "H", ".3f"), ("kl", "kl", ".4f"),
                  ("clip_frac", "clip", ".3f"), ("grad_norm", "gnorm", ".3f"), ("gen_time", "gen s", ".1f"),
                  ("train_time", "train s", ".1f")]  # the console line of a step: (key, label, format)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # model / data / sampling (shared flags: the same meaning in every script of the suite)
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
    p.add_argument("--steps", type=int, default=40, help="generation batches (each followed by --mu updates)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per generation batch")
    p.add_argument("--num-generations", type=int, default=8, help="G: completions sampled per prompt (>= 2)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion length cap")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use logits / T)")
    p.add_argument("--dynamic-sampling", action="store_true", help="DAPO: draw groups until P have reward variance")
    p.add_argument("--max-resample", type=int, default=None, help="most groups drawn per step (default: 3 x P)")
    p.add_argument("--loss-type", default="dapo", choices=["grpo", "dapo", "dr_grpo", "cispo"], help="see above")
    p.add_argument("--importance-sampling-level", default="token", choices=["token", "sequence"], help="GSPO: sequence")
    p.add_argument("--advantage", default="group", choices=["group", "rloo"], help="rloo: leave-one-out baseline")
    p.add_argument("--no-std-scaling", action="store_true", help="A = r - mean(r), no std division (Dr. GRPO)")
    p.add_argument("--beta", type=float, default=0.0, help="k3 KL coefficient against the frozen start model")
    p.add_argument("--log-kl", action="store_true", help="keep the start model to log the KL even with beta 0")
    p.add_argument("--epsilon", type=float, default=None, help="clip epsilon_low (default 0.2; sequence level: 3e-4)")
    p.add_argument("--epsilon-high", type=float, default=None, help="clip epsilon_high (default --epsilon or as low)")
    p.add_argument("--mu", type=int, default=1, help="optimizer updates per generation batch (pi_old frozen)")
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
    common.check_args(p, args, at_least_one=("steps", "prompts_per_step", "max_new_tokens", "mu", "eval_size",
                                             "eval_batch_size", "micro_batch_prompts", "max_resample"),
                      positive=("lr", "temperature", "epsilon", "epsilon_high", "max_grad_norm"),
                      non_negative=("beta", "warmup_steps", "weight_decay", "eval_every"),
                      one_process=("dynamic_sampling",), at_least_two=("num_generations",))  # G >= 2: a group
    args.max_resample = args.max_resample or 3 * args.prompts_per_step  # read only with --dynamic-sampling
    low, high = (3e-4, 4e-4) if args.importance_sampling_level == "sequence" else (0.2, 0.2)  # GSPO v2 §5.1, as TRL
    args.epsilon, args.epsilon_high = args.epsilon or low, args.epsilon_high or args.epsilon or high
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
# GRPO (algorithm logic)
# ----------------------------------------------------------------------------------------------------------
def group_advantages(rewards, num_generations, scale_std=True, eps=1e-4, leave_one_out=False):
    """rewards (P*G,) -> advantages (P*G,): r - group mean, / (the group's unbiased std + eps, TRL's 1e-4) unless
    scale_std is False (Dr. GRPO); leave_one_out: RLOO (after Kool et al. 2019), never std-scaled. Ties: A = 0."""
    r, G = rewards.view(-1, num_generations), num_generations
    if leave_one_out:
        return (r - (r.sum(1, keepdim=True) - r) / (G - 1)).view(-1)
    adv = r - r.mean(1, keepdim=True)
    return (adv / (r.std(1, keepdim=True) + eps) if scale_std else adv).view(-1)


def grpo_loss(logprobs, old_logprobs, advantages, mask, loss_type="dapo", eps_low=0.2, eps_high=0.2,
              beta=0.0, ref_logprobs=None, num_seqs=None, num_tokens=None, max_len=None, sequence_level=False):
    """Clipped surrogate (cispo: its term) + beta * k3 KL per `loss_type` (above; GSPO's s_i at every token, as TRL)
    on (B, T), advantages (B,); num_seqs / num_tokens / max_len: the WHOLE batch's, so micro-batch losses sum to it."""
    num_seqs, num_tokens, max_len = num_seqs or mask.shape[0], num_tokens or mask.sum(), max_len or mask.shape[1]
    log_ratio = logprobs - old_logprobs
    if sequence_level:  # (B, 1): one ratio per sequence, padding excluded
        log_ratio = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    ratio, adv = torch.exp(log_ratio), advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    if loss_type == "cispo":  # the weight clipped and detached: every token keeps a REINFORCE gradient
        per_token, clipped = -torch.clamp(ratio, max=1 + eps_high).detach() * adv * logprobs, ratio > 1 + eps_high
    kl = None
    if ref_logprobs is not None:
        d = ref_logprobs - logprobs
        kl = torch.exp(d) - d - 1  # k3: pi_ref/pi - log(pi_ref/pi) - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":  # each sequence's token-mean, then the mean over sequences
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_seqs
    else:  # dapo, cispo: token-mean over the batch; dr_grpo: token-sum / a constant
        loss = (per_token * mask).sum() / (num_seqs * max_len if loss_type == "dr_grpo" else num_tokens)
    stats = {"clip_frac_sum": float((clipped.float() * mask).sum()),  # tokens where a clip (cispo: the bound) acts
             "kl_sum": float((kl.detach() * mask).sum()) if kl is not None else 0.0}
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
    weight_dtype, autocast_dtype = common.resolve_dtype(args.dtype, device, lora=args.lora_rank > 0)
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    run_dir, tokenizer = common.make_run_dir(args, ALGO), common.load_tokenizer(args.model)
    train, test, fewshot = common.load_problems(args)
    prompt_of = lambda rec: common.build_prompt(tokenizer, rec["question"], fewshot, args.system_prompt)
    test_prompts, reward_fn = [prompt_of(r) for r in test], common.load_reward_fn(args.reward_fn)
    model = common.load_model(args.model, device, weight_dtype, args.gradient_checkpointing)
    model = common.add_lora(model.eval(), args)  # eval: no dropout, pi_old = pi_theta (--lora-dropout: LoRA's own)
    ref_model = common.reference_model(model) if args.beta or args.log_kl else None  # frozen start (LoRA: no copy)
    model, eos_ids = common.shard_blocks(model, args), common.stop_token_ids(tokenizer, model)  # --fsdp: FSDP2
    common.check_context_length(model, 0, args.max_new_tokens)
    optimizer = torch.optim.AdamW(common.param_groups(model), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / max(1, args.warmup_steps)))
    for param in (p for p in model.parameters() if p.requires_grad):  # zero, not None: an update whose groups
        param.grad = torch.zeros_like(param)  # were all skipped (below) steps AdamW as the full batch would
    common.gather_blocks(model, True)  # --fsdp: whole blocks for sampling, evaluation, no-grad forwards
    generator, data_rng, order = common.rank_generator(device, args.seed), random.Random(args.seed), []
    metrics_file, G, P = common.open_log(run_dir / "metrics.jsonl"), args.num_generations, args.prompts_per_step
    print(f"{ALGO}: {len(train)} train / {len(test)} eval problems, {len(fewshot)}-shot, model {args.model} on "
          f"{device} (weights {weight_dtype}, autocast {autocast_dtype}), output {run_dir}")
    before = evaluate(model, tokenizer, test_prompts, test, args, eos_ids, autocast, 0, run_dir, metrics_file)
    zero_std_streak, warned_truncated = 0, False
    for step in tqdm(range(1, args.steps + 1), desc=ALGO, dynamic_ncols=True):
        # ---- 1. sample G completions for P prompts, grade them; --dynamic-sampling (DAPO §3.2): more until P vary --
        t_step, batch = time.perf_counter(), common.shard(common.next_batch(train, order, data_rng, P))  # this rank's
        prompt_ids, prompt_mask, completion_ids, lens, rewards = sample_groups(
            model, tokenizer, [prompt_of(r) for r in batch], batch, G, args, reward_fn, eos_ids, generator, autocast)
        while args.dynamic_sampling and (kept := int((rewards.view(-1, G).std(1) > 0).sum())) < P \
                and len(batch) < args.max_resample:
            more = common.next_batch(train, order, data_rng, min(P - kept, args.max_resample - len(batch)))
            _, _, more_ids, more_lens, more_rewards = sample_groups(
                model, tokenizer, [prompt_of(r) for r in more], more, G, args, reward_fn, eos_ids, generator, autocast)
            completion_ids = torch.nn.utils.rnn.pad_sequence([*completion_ids, *more_ids], True, eos_ids[0])
            batch, lens, rewards = batch + more, torch.cat([lens, more_lens]), torch.cat([rewards, more_rewards])
            prompt_ids, prompt_mask = common.tokenize_prompts(tokenizer, [prompt_of(r) for r in batch], device)
        if args.dynamic_sampling and kept < P:
            tqdm.write(f"warning: step {step}: only {kept}/{P} groups with reward variance in {len(batch)} drawn")
        mask = completion_mask_from_lens(lens, completion_ids.shape[1])  # (N*G, T), N groups
        gen_time = time.perf_counter() - t_step  # ---- 2. advantages ---------------------------------------------
        advantages = group_advantages(rewards, G, not args.no_std_scaling, leave_one_out=args.advantage == "rloo")
        group_std = rewards.view(-1, G).std(1)  # (N,)
        # equal rewards -> A = 0: no gradient with beta = 0, so skipped (still in the normalizers); dynamic: dropped
        counted = [i for i in range(len(lens)) if not args.dynamic_sampling or group_std[i // G] > 0]
        rows = [i for i in counted if args.beta or group_std[i // G] > 0]
        updates = [rows] * args.mu  # GRPO: mu passes over the whole generation batch (DeepSeekMath Alg. 1)
        norms = dict(num_seqs=common.all_sum(len(counted)), num_tokens=common.all_sum(mask[counted].sum()),
                     max_len=args.max_new_tokens)  # the whole step's counts (summed over ranks under torchrun)
        # ---- 3. frozen log-probs: pi_old when there is more than one update, pi_ref for the KL ---------------
        t_train, frozen = time.perf_counter(), (prompt_ids, prompt_mask, completion_ids, args.temperature, autocast)
        batches, pad = micro_batches(rows, G, args.micro_batch_prompts, lens), micro_batches([0], G, 1, lens)[0]
        old_logprobs = frozen_logprobs(model, batches, *frozen)[0] if len(updates) > 1 else None
        with common.adapter_off(ref_model):  # pi_ref; with LoRA the same weights, the adapter off
            ref_logprobs = frozen_logprobs(ref_model, batches, *frozen)[0] if ref_model is not None else None
        common.gather_blocks(model, False)  # ---- 4. optimizer updates (--fsdp: on the sharded blocks) ---------
        stats = dict.fromkeys(("loss", "clip_frac_sum", "kl_sum", "entropy_sum", "tokens", "grad_norm"), 0.0)
        for k, update_rows in enumerate(updates):
            model.zero_grad(set_to_none=False)  # (not the optimizer's foreach zeroing: --fsdp mixes tensor types)
            for ps, prompt_index, r, T, live in common.even_micro_batches(  # --fsdp: as many on every rank
                    model, micro_batches(update_rows, G, args.micro_batch_prompts, lens), pad):
                with autocast():
                    logprobs, entropy = completion_logprobs(model, prompt_ids[ps], prompt_mask[ps],
                                                            completion_ids[r, :T], prompt_index, args.temperature)
                old = logprobs.detach() if k == 0 else old_logprobs[r, :T]  # before the first update pi_theta = pi_old
                ref = ref_logprobs[r, :T] if ref_logprobs is not None else None
                m = mask[r, :T] * live  # (b, T); a pad pass (live 0) counts nothing
                loss, s = grpo_loss(logprobs, old, advantages[r], m, args.loss_type, args.epsilon,
                                    args.epsilon_high, args.beta, ref, **norms,
                                    sequence_level=args.importance_sampling_level == "sequence")
                stop_if_not_finite(loss.item(), "the loss", step, run_dir)
                loss.backward()  # accumulates: the sum over micro-batches is the full-batch gradient
                s.update(loss=loss.item() / len(updates), entropy_sum=float((entropy.detach() * m).sum()),
                         tokens=float(m.sum()))
                stats = {key: stats[key] + s.get(key, 0.0) for key in stats}
            common.all_reduce_gradients(model)  # torchrun: the sum over ranks, i.e. the whole step's gradient
            grad_norm = common.clip_grad_norm(model, args.max_grad_norm)  # (--fsdp: over every rank's shard)
            stop_if_not_finite(grad_norm, "the gradient norm", step, run_dir)
            stats["grad_norm"] += grad_norm / len(updates)
            optimizer.step()
            scheduler.step()
        common.gather_blocks(model, True)
        train_time, step_time = time.perf_counter() - t_train, time.perf_counter() - t_step
        stats = {k: v if k == "grad_norm" else common.all_sum(v) for k, v in stats.items()}  # ---- 5. log, eval, save
        truncated, used = truncated_rows(completion_ids, lens, eos_ids).float(), int(common.all_sum(len(rows)))
        rewards, lens, truncated, group_std = (common.all_gather(x) for x in (rewards, lens, truncated, group_std))
        n_tok = stats["tokens"]  # every rank's rows above; loss keys are means over the tokens trained
        per_token = {k: stats[f"{k}_sum"] / n_tok if n_tok else None for k in ("entropy", "kl", "clip_frac")}
        record = {"step": step, "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                  "correct": float((rewards > 0).float().mean()), "groups_drawn": len(group_std), "groups_dropped":
                  len(group_std) - int(norms["num_seqs"]) // G, "samples_used": used, "updates": len(updates),
                  "frac_zero_std": float((group_std == 0).float().mean()), "truncated": float(truncated.mean()),
                  "completion_len": float(lens.float().mean()), "tokens_used": int(stats["tokens"]),
                  **per_token, "kl": per_token["kl"] if ref_model is not None else None, "loss": stats["loss"],
                  "grad_norm": stats["grad_norm"], "lr": scheduler.get_last_lr()[0], "gen_time": round(gen_time, 3),
                  "train_time": round(train_time, 3), "step_time": round(step_time, 3),
                  "tokens_per_s": round(float(lens.sum()) / step_time, 1)}
        log_step(metrics_file, record, CONSOLE_FIELDS)
        zero_std_streak = zero_std_streak + 1 if record["frac_zero_std"] == 1.0 else 0
        if zero_std_streak == 3:  # printed once per streak
            tqdm.write("warning: 3 steps with zero reward variance in every group: no learning signal (see --fewshot)")
        if record["truncated"] > 0.5 and not warned_truncated:
            warned_truncated = True
            tqdm.write(f"warning: {record['truncated']:.0%} of completions hit --max-new-tokens: consider raising it")
        if args.eval_every and step % args.eval_every == 0 and step != args.steps:
            evaluate(model, tokenizer, test_prompts, test, args, eos_ids, autocast, step, run_dir, metrics_file)
            common.save_model(model, tokenizer, run_dir, args)
    after = evaluate(model, tokenizer, test_prompts, test, args, eos_ids, autocast, args.steps, run_dir, metrics_file)
    common.save_model(model, tokenizer, run_dir, args, final=True)
    metrics_file.close()
    print(f"held-out greedy accuracy {before['eval/accuracy']:.1%} -> {after['eval/accuracy']:.1%}, sampled "
          f"{before['eval/sampled_accuracy']:.1%} -> {after['eval/sampled_accuracy']:.1%}; metrics in {run_dir}")
    return before, after


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the last saved model (if any) is intact; nothing half-written was kept")
