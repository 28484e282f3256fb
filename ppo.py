"""PPO with a value model: a k1 KL in the token rewards, GAE, clipped policy and value losses, one readable file.

Schulman et al. 2017 (https://arxiv.org/abs/1707.06347) Eq. 7 (clip), 9 (value loss), 11-12 (GAE); for LLMs Ouyang
et al. 2022 (arXiv 2203.02155) Eq. 2 (KL in the reward), Huang et al. 2024, "The N+ Implementation Details of RLHF
with PPO" (arXiv 2403.17031). Defaults: verl's PPO trainer, the RAFT++ paper's PPO baseline (arXiv 2504.11343 v2).

    python ppo.py                                   # embedded SmolLM2-135M-Instruct, built-in arithmetic, CPU
    python ppo.py --model Qwen/Qwen2.5-Math-1.5B --dataset HuggingFaceH4/MATH-500 --fewshot 0 --max-new-tokens 1024 \
        --lr 1e-6 --critic-lr 1e-5 --prompts-per-step 16 --gradient-checkpointing    # one GPU, network
"""
import argparse
import collections
import json
import math
import random
import time

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common

ALGO = "ppo"


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
    # sampling
    p.add_argument("--steps", type=int, default=40, help="generation batches (each: minibatches x epochs updates)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per generation batch")
    p.add_argument("--num-generations", type=int, default=8, help="G: completions sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion length cap")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use logits / T)")
    # PPO
    p.add_argument("--beta", type=float, default=0.001, help="k1 KL coefficient in the token rewards (verl kl_coef)")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip epsilon (policy ratio)")
    p.add_argument("--gamma", type=float, default=1.0, help="GAE discount (verl, TRL: 1.0)")
    p.add_argument("--lam", type=float, default=1.0, help="GAE lambda (verl: 1.0; TRL, N+ details: 0.95)")
    p.add_argument("--num-minibatches", type=int, default=2, help="updates per epoch (whole prompts; <= P per process)")
    p.add_argument("--num-ppo-epochs", type=int, default=1, help="passes over each generation batch (verl: 1)")
    p.add_argument("--critic-lr", type=float, default=1e-4, help="critic AdamW learning rate (verl: 10x the actor's)")
    p.add_argument("--cliprange-value", type=float, default=0.2, help="eps_v: value clip around V_old (verl: 0.5)")
    p.add_argument("--critic-warmup-steps", type=int, default=0, help="the first N steps train only the critic")
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
    common.check_args(p, args, at_least_one=("steps", "prompts_per_step", "num_generations", "max_new_tokens",
                      "num_minibatches", "num_ppo_epochs", "eval_size", "eval_batch_size", "micro_batch_prompts"),
                      positive=("lr", "critic_lr", "temperature", "epsilon", "cliprange_value", "max_grad_norm"),
                      non_negative=("beta", "gamma", "lam", "critic_warmup_steps", "warmup_steps", "weight_decay",
                                    "eval_every"))
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
# PPO (algorithm logic): the critic, token rewards, GAE, whitening, the two losses
# ----------------------------------------------------------------------------------------------------------
def build_critic(model_name, device, dtype, gradient_checkpointing=False):
    """V_phi: a separate trunk copy (no LM head) + a zero, bias-free (as TRL) scalar head ON THE TRUNK'S DEVICE."""
    trunk = common.load_model(model_name, device, dtype, gradient_checkpointing).get_decoder()
    embed = trunk.get_input_embeddings().weight
    head = torch.nn.Linear(embed.shape[1], 1, bias=False, device=embed.device, dtype=dtype)
    torch.nn.init.zeros_(head.weight)
    return torch.nn.ModuleDict({"trunk": trunk, "head": head})


def completion_values(critic, prompt_ids, prompt_mask, completion_ids, prompt_index):
    """V(x, y_<t) (B, T) in fp32, read where completion_logprobs reads y_t's logits; prompts run once, KV shared."""
    (B, T), trunk = completion_ids.shape, critic["trunk"]
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    prompt_out = trunk(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True)
    prompt_out.cache.batch_select_indices(prompt_index)  # (P, ...) -> (B, ...)
    attn = torch.cat([prompt_mask[prompt_index], prompt_mask.new_ones(B, T)], 1)
    pos = prompt_mask.sum(1, keepdim=True)[prompt_index] + torch.arange(T, device=completion_ids.device)
    out = trunk(input_ids=completion_ids, attention_mask=attn, position_ids=pos, cache=prompt_out.cache,
                use_cache=True)  # y_T-1's own state is not needed, one extra position spares a T = 1 branch
    hidden = torch.cat([prompt_out.last_hidden_state[prompt_index, -1:], out.last_hidden_state[:, :-1]], 1)
    return (hidden.float() * critic["head"].weight[0].float()).sum(-1)  # the head in fp32 (autocast: Linear in bf16)


def gae_advantages(rewards, values, mask, gamma, lam):
    """delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, V = A = 0 past the end; -> A, A + V"""
    rewards, values = rewards * mask, values * mask
    advantages, next_value, next_adv = torch.zeros_like(values), values[:, 0] * 0, values[:, 0] * 0
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t], next_value = next_adv, values[:, t]
    return advantages, (advantages + values) * mask


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over every rank's entries where mask = 1 (unbiased var, as verl, TRL); else 0."""
    count = common.all_sum(mask.sum())
    mean = common.all_sum((x * mask).sum()) / count
    var = common.all_sum((((x - mean) * mask) ** 2).sum()) / (count - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, eps, num_tokens, ref_logprobs):
    """-min(rho A, clip(rho, 1 - eps, 1 + eps) A) per token, summed / num_tokens (the mini-batch's token count)."""
    ratio = torch.exp(logprobs - old_logprobs)
    per_token = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - eps, 1 + eps) * advantages)
    with torch.no_grad():  # token sums for the logs: the clipped branch active; k3 KL(pi_theta || pi_ref)
        clipped = ((ratio < 1 - eps) & (advantages < 0)) | ((ratio > 1 + eps) & (advantages > 0))
        d = ref_logprobs - logprobs
    return (per_token * mask).sum() / num_tokens, {"clip_frac": float((clipped.float() * mask).sum()),
                                                    "kl": float(((torch.exp(d) - d - 1) * mask).sum())}


def clipped_value_loss(values, old_values, returns, mask, clip_range, num_tokens):
    """1/2 max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2), summed / num_tokens (verl, TRL)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * (torch.max(unclipped_loss, clipped_loss) * mask).sum() / num_tokens
    return loss, {"value_clip_frac": float(((clipped_loss > unclipped_loss).float() * mask).sum())}


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
    args = parse_args(argv)  # ---- setup: arguments, precision, data, models, optimizers --------------------------
    common.seed_all(args.seed)
    device = common.resolve_device(args.device, distributed=True)  # torchrun: one process per device
    weight_dtype, autocast_dtype = common.resolve_dtype(args.dtype, device)
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    run_dir, tokenizer = common.make_run_dir(args, ALGO), common.load_tokenizer(args.model)
    train, test, fewshot = common.load_problems(args)
    prompt_of = lambda rec: common.build_prompt(tokenizer, rec["question"], fewshot, args.system_prompt)
    test_prompts, reward_fn = [prompt_of(r) for r in test], common.load_reward_fn(args.reward_fn)
    model = common.load_model(args.model, device, weight_dtype, args.gradient_checkpointing)
    model = common.add_lora(model.eval(), args)  # eval: no dropout (N+ details), pi_old = pi_theta (--lora-dropout on)
    ref_model = common.reference_model(model)  # pi_ref, the frozen start (LoRA: adapter off; --fsdp: whole, frozen)
    critic = build_critic(args.model, device, weight_dtype, args.gradient_checkpointing).eval()
    critic["trunk"] = common.add_lora(critic["trunk"], args, decoder=critic["trunk"])  # LoRA: its own; the head: full
    model, critic["trunk"] = common.shard_blocks(model, args), common.shard_blocks(critic["trunk"], args)  # --fsdp
    eos_ids = common.stop_token_ids(tokenizer, model)
    common.check_context_length(model, 0, args.max_new_tokens)
    groups = common.param_groups(model, lr=args.lr) + common.param_groups(critic, lr=args.critic_lr)
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay, fused=True)  # the critic's lr: its own
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / max(1, args.warmup_steps)))
    actor_critic = common.gather_blocks(torch.nn.ModuleList([model, critic]), True)  # --fsdp: whole, for no-grad
    generator, data_rng, order = common.rank_generator(device, args.seed), random.Random(args.seed), []
    metrics_file, G, P_all = common.open_log(run_dir / "metrics.jsonl"), args.num_generations, args.prompts_per_step
    print(f"{ALGO}: {len(train)} train / {len(test)} eval problems, {len(fewshot)}-shot, model {args.model} on "
          f"{device} (weights {weight_dtype}, autocast {autocast_dtype}), output {run_dir}")
    before = evaluate(model, tokenizer, test_prompts, test, args, eos_ids, autocast, 0, run_dir, metrics_file)
    for step in tqdm(range(1, args.steps + 1), desc=ALGO, dynamic_ncols=True):
        # ---- 1. sample G completions for each of P prompts, grade them (torchrun: all draw the same, each its share)
        t_step, batch = time.perf_counter(), common.shard(common.next_batch(train, order, data_rng, P_all))
        prompt_ids, prompt_mask, completion_ids, lens, rewards = sample_groups(
            model, tokenizer, [prompt_of(r) for r in batch], batch, G, args, reward_fn, eos_ids, generator, autocast)
        mask, gen_time = completion_mask_from_lens(lens, completion_ids.shape[1]), time.perf_counter() - t_step
        # ---- 2. frozen forwards: pi_old (ratio, k1), pi_ref (k1), V_old; token rewards, GAE, whitening ----------
        t_train, frozen = time.perf_counter(), (prompt_ids, prompt_mask, completion_ids, args.temperature, autocast)
        batches = micro_batches(range(len(lens)), G, args.micro_batch_prompts, lens)
        old_logprobs = frozen_logprobs(model, batches, *frozen)[0]
        with common.adapter_off(ref_model):  # with LoRA the same weights, the adapter off
            ref_logprobs = frozen_logprobs(ref_model, batches, *frozen)[0]
        old_values = torch.zeros_like(mask)  # V_old: the critic before this step's updates
        with torch.no_grad(), autocast():
            for ps, i, r, T in batches:
                old_values[r, :T] = completion_values(critic, prompt_ids[ps], prompt_mask[ps], completion_ids[r, :T], i)
        kl = (old_logprobs - ref_logprobs) * mask  # k1 at the sampled tokens
        token_rewards = -args.beta * kl  # + the score at each completion's last token: its EOS, or the truncation point
        token_rewards[torch.arange(len(lens), device=device), lens - 1] += rewards
        advantages, returns = gae_advantages(token_rewards, old_values, mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask)  # over the whole generation batch, every rank's (verl, TRL)
        common.gather_blocks(actor_critic, False)  # ---- 3. updates (--fsdp: sharded): mini-batches of whole prompts
        P, n_mb, warmup = len(batch), min(args.num_minibatches, len(batch)), step <= args.critic_warmup_steps
        updates = [list(range(k * P // n_mb * G, (k + 1) * P // n_mb * G)) for k in range(n_mb)] * args.num_ppo_epochs
        stats = collections.Counter()  # sums over micro-batches and updates
        for update_rows in updates:
            num_tokens = common.all_sum(mask[update_rows].sum())  # both: token-means over the mini-batch, all ranks'
            for ps, idx, r, T, live in common.even_micro_batches(  # --fsdp: as many on every rank (a pad counts 0)
                    model, micro_batches(update_rows, G, args.micro_batch_prompts, lens), batches[0]):
                part, m = (prompt_ids[ps], prompt_mask[ps], completion_ids[r, :T], idx), mask[r, :T] * live
                with autocast():
                    values = completion_values(critic, *part)
                    with torch.set_grad_enabled(not warmup):  # critic warm-up: the actor's loss is only measured
                        logprobs, entropy = completion_logprobs(model, *part, args.temperature)
                loss, s = ppo_policy_loss(logprobs, old_logprobs[r, :T], advantages[r, :T], m, args.epsilon,
                                          num_tokens, ref_logprobs[r, :T])
                value_loss, s_value = clipped_value_loss(values, old_values[r, :T], returns[r, :T], m,
                                                         args.cliprange_value, num_tokens)
                stop_if_not_finite(loss.item() + value_loss.item(), "the policy + value loss", step, run_dir)
                (loss + value_loss).backward()  # two disjoint graphs; micro-batch gradients add up to the mini-batch's
                stats.update(s, **s_value, loss=loss.item(), value_loss=value_loss.item(), tokens=float(m.sum()),
                             entropy=float((entropy.detach() * m).sum()))
            for key, net in (("grad_norm", model), ("value_grad_norm", critic)):  # each clipped on its own (verl)
                if net is critic or not warmup:  # torchrun: the sum over ranks (warm-up: the actor's grads stay None)
                    common.all_reduce_gradients(net)
                stats[key] += common.clip_grad_norm(net, args.max_grad_norm)  # (--fsdp: over every rank's shard)
            stop_if_not_finite(stats["grad_norm"] + stats["value_grad_norm"], "the gradient norm", step, run_dir)
            optimizer.step()  # the actor has no grads (None) during the critic warm-up: AdamW leaves it untouched
            scheduler.step()
            optimizer.zero_grad()  # to None (no foreach zeroing, which could not mix --fsdp's DTensors and tensors)
        common.gather_blocks(actor_critic, True)
        train_time, step_time = time.perf_counter() - t_train, time.perf_counter() - t_step
        stats = {k: v if "norm" in k else common.all_sum(v) for k, v in stats.items()}  # ---- 4. log, eval, save
        tok = [common.all_gather(torch.nn.functional.pad(x, (0, args.max_new_tokens - x.shape[1])))
               for x in (old_values, returns, kl, mask)]  # every rank's (sums, token values padded to one width)
        v, ret, kl, n_tok, n_up = *(x[tok[3] > 0] for x in tok[:3]), stats["tokens"], len(updates)
        trunc = float(common.all_gather(truncated_rows(completion_ids, lens, eos_ids).float()).mean())
        rewards, lens = common.all_gather(rewards), common.all_gather(lens)  # every rank's rows
        record = {"step": step, "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                  "correct": float((rewards > 0).float().mean()), "completion_len": float(lens.float().mean()),
                  "truncated": trunc, "samples_used": len(lens), "tokens_used": int(n_tok), "updates": n_up,
                  **{k: stats[k] / n_tok for k in ("entropy", "kl", "clip_frac", "value_clip_frac")},  # token means
                  **{k: stats[k] / n_up for k in ("loss", "value_loss", "value_grad_norm")},  # means over updates
                  "grad_norm": None if warmup else stats["grad_norm"] / n_up, "reward_kl": float(kl.mean()),
                  "explained_var": float(1 - (ret - v).var() / ret.var()) if ret.var() > 0 else None,
                  "lr": scheduler.get_last_lr()[0], "gen_time": round(gen_time, 3), "train_time": round(train_time, 3),
                  "step_time": round(step_time, 3), "tokens_per_s": round(float(lens.sum()) / step_time, 1)}
        log_step(metrics_file, record, [("reward", "reward", ".3f"), ("completion_len", "len", ".1f"),
                                        ("entropy", "H", ".3f"), ("kl", "kl", ".4f"), ("clip_frac", "clip", ".3f"),
                                        ("value_loss", "vloss", ".4f"), ("explained_var", "ev", ".2f")])
        if args.eval_every and step % args.eval_every == 0 and step != args.steps:
            evaluate(model, tokenizer, test_prompts, test, args, eos_ids, autocast, step, run_dir, metrics_file)
            common.save_model(model, tokenizer, run_dir, args)
    after = evaluate(model, tokenizer, test_prompts, test, args, eos_ids, autocast, args.steps, run_dir, metrics_file)
    common.save_model(model, tokenizer, run_dir, args, final=True)  # the policy (--merge-lora: merged)
    metrics_file.close()
    print(f"held-out greedy accuracy {before['eval/accuracy']:.1%} -> {after['eval/accuracy']:.1%}, sampled "
          f"{before['eval/sampled_accuracy']:.1%} -> {after['eval/sampled_accuracy']:.1%}; metrics in {run_dir}")
    return before, after


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the last saved model (if any) is intact; nothing half-written was kept")
