"""GRPO: Group Relative Policy Optimization, one readable file.

Paper: Shao et al. 2024, "DeepSeekMath" (https://arxiv.org/abs/2402.03300), §4.1, Eq. 3 (objective) and Eq. 4
(k3 KL estimator). Variants: Dr. GRPO (Liu et al. 2025, https://arxiv.org/abs/2503.20783: no std scaling,
token-sum / constant) and DAPO (Yu et al. 2025, https://arxiv.org/abs/2503.14476: token-mean, clip-higher).

For each prompt x sample G completions y_1..G from pi_old and score them (reward r_i). Then, for every token t
of completion i:
    A_i     = (r_i - mean(r_1..G)) / (std(r_1..G) + eps)          group-normalized advantage (Eq. 3, §4.1.2)
    rho_t   = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, y_<t)
    l_t     = -min(rho_t * A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_t
    KL_t    = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1             (k3, Eq. 4; unbiased and >= 0)
    loss    = aggregate(l_t)    grpo: mean over sequences of each sequence's token-mean (DeepSeekMath Eq. 3)
                                dapo: token-mean over the whole generation batch (TRL >= 0.22 default)
                                dr_grpo: token-sum / (num sequences * max_new_tokens)
With mu = 1 (one update per generation batch) rho = 1 and the loss value is ~0 at every step while its
gradient is not: it is -A * grad log pi, a policy gradient with the group mean as baseline.

    python grpo.py                                   # embedded SmolLM2-135M-Instruct, built-in arithmetic, CPU
    python grpo.py --model Qwen/Qwen2.5-Math-1.5B --dataset HuggingFaceH4/MATH-500 --fewshot 0 \
        --max-new-tokens 1024 --lr 1e-6 --prompts-per-step 16 --micro-batch-prompts 2   # a GPU with network
"""
import argparse
import copy
import importlib.util
import json
import math
import random
import sys
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
    p.add_argument("--reward-fn", default=None, help="path/to/file.py:function(prompts, completions, records) -> floats (default: math grading)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on GPU; fp32 weights + bf16 autocast on CPU")
    # sampling
    p.add_argument("--steps", type=int, default=40, help="generation batches (each followed by --mu optimizer updates)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per generation batch")
    p.add_argument("--num-generations", type=int, default=8, help="G: completions sampled per prompt (>= 2)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion length cap")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use logits / T)")
    # GRPO
    p.add_argument("--loss-type", default="dapo", choices=["grpo", "dapo", "dr_grpo"], help="loss aggregation (see docstring)")
    p.add_argument("--no-std-scaling", action="store_true", help="A = r - mean(r) without the std division (Dr. GRPO)")
    p.add_argument("--beta", type=float, default=0.0, help="k3 KL coefficient against the frozen start model (0: no reference model is loaded)")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip epsilon_low")
    p.add_argument("--epsilon-high", type=float, default=None, help="clip epsilon_high (default: --epsilon; DAPO: 0.28)")
    p.add_argument("--mu", type=int, default=1, help="optimizer updates per generation batch (old log-probs stored)")
    # optimization
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (constant after warm-up)")
    p.add_argument("--warmup-steps", type=int, default=2, help="linear LR warm-up, in optimizer updates")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--micro-batch-prompts", type=int, default=1, help="prompt groups per forward/backward (gradient accumulation)")
    # evaluation / logging
    p.add_argument("--eval-every", type=int, default=20, help="evaluate every N steps (0: only before and after)")
    p.add_argument("--eval-size", type=int, default=100, help="held-out problems per evaluation")
    p.add_argument("--eval-batch-size", type=int, default=64, help="prompts per generation call during eval")
    p.add_argument("--output-dir", default=None, help="default: runs/grpo__<seed>__<time>")
    p.add_argument("--no-save", action="store_true", help="do not write the final model")
    args = p.parse_args(argv)
    if args.num_generations < 2:
        p.error("--num-generations must be >= 2: group-normalized advantages need at least two samples per prompt")
    for flag in ("steps", "prompts_per_step", "max_new_tokens", "mu", "eval_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.temperature <= 0:
        p.error("--temperature must be > 0 (GRPO needs sampled groups)")
    args.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    return args


# ----------------------------------------------------------------------------------------------------------
# Sampling (plumbing): prefill each prompt once, share its KV cache across the G samples, drop finished rows
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, num_samples, max_new_tokens, temperature, eos_ids, generator):
    """Sample `num_samples` completions per prompt (temperature 0: greedy).
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
    B, device = P * G, prompt_ids.device
    tokens = torch.full((B, max_new_tokens), eos_ids[0], dtype=torch.long, device=device)
    lens = torch.zeros(B, dtype=torch.long, device=device)
    alive = torch.arange(B, device=device)  # rows of the batch still decoding
    eos = torch.tensor(eos_ids, device=device)
    for t in range(max_new_tokens):
        if temperature > 0:  # inverse-CDF sampling: one uniform per row (torch.multinomial is ~40x slower on CPU)
            cdf = torch.softmax(logits / temperature, -1).cumsum(-1)  # (b, V)
            u = torch.rand(len(cdf), 1, generator=generator, device=device) * cdf[:, -1:]
            tok = torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[1] - 1)
        else:
            tok = logits.argmax(-1)
        tokens[alive, t] = tok
        lens[alive] += 1
        keep = ~torch.isin(tok, eos)
        if t == max_new_tokens - 1 or not keep.any():
            break
        if not keep.all():  # finished rows leave the batch: later steps decode only live ones
            idx = keep.nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            alive, attn, next_pos, tok = alive[idx], attn[idx], next_pos[idx], tok[idx]
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
# Log-probs of the completion tokens under the current policy (the training forward)
# ----------------------------------------------------------------------------------------------------------
def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, num_samples, temperature):
    """log pi(y_t | x, y_<t) from logits / T for every completion token (B, T), and the entropy of that
    distribution (B, T, no grad). The prompt runs once per prompt, not once per sample: its keys/values are
    repeated for the G completions and gradients flow back through the repeat, so this equals the plain forward
    over [prompt; completion] (tested) at a fraction of the cost. Logits are computed only where a completion
    token is predicted: the last prompt position and completion positions 0..T-2."""
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
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    logz = logits.logsumexp(-1)  # no full (B, T, V) log-softmax tensor is kept for the backward
    logprobs = logits.gather(-1, completion_ids[..., None]).squeeze(-1) - logz
    with torch.no_grad():
        entropy = logz - (torch.softmax(logits, -1) * logits).sum(-1)
    return logprobs, entropy


# ----------------------------------------------------------------------------------------------------------
# GRPO (algorithm logic)
# ----------------------------------------------------------------------------------------------------------
def group_advantages(rewards, num_generations, scale_std=True, eps=1e-4):
    """rewards (P*G,) -> advantages (P*G,): r - group mean, divided by the group's unbiased std + eps (TRL's
    eps 1e-4) unless scale_std is False (Dr. GRPO). Zero-variance groups get advantage 0."""
    r = rewards.view(-1, num_generations)
    adv = r - r.mean(1, keepdim=True)
    if scale_std:
        adv = adv / (r.std(1, keepdim=True) + eps)
    return adv.view(-1)


def grpo_loss(logprobs, old_logprobs, advantages, mask, loss_type="dapo", eps_low=0.2, eps_high=0.2,
              beta=0.0, ref_logprobs=None, num_seqs=None, num_tokens=None, max_len=None):
    """Clipped surrogate + beta * k3 KL, aggregated per `loss_type`. logprobs/old/ref/mask: (B, T); advantages:
    (B,). num_seqs / num_tokens / max_len are the normalizers of the WHOLE generation batch (default: this
    batch), so summing the losses of micro-batches gives exactly the full-batch loss and gradient."""
    num_seqs = mask.shape[0] if num_seqs is None else num_seqs
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    max_len = mask.shape[1] if max_len is None else max_len
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    per_token = -surrogate
    kl = None
    if beta != 0.0:
        d = ref_logprobs - logprobs
        kl = torch.exp(d) - d - 1  # k3: pi_ref/pi - log(pi_ref/pi) - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_seqs
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / num_tokens
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (num_seqs * max_len)
    else:
        raise ValueError(f"unknown loss_type {loss_type}")
    with torch.no_grad():  # diagnostics: fraction of tokens where the clipped branch is the active one
        clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {"clip_frac_sum": float((clipped.float() * mask).sum()),
                 "kl_sum": float((kl * mask).sum()) if kl is not None else 0.0}
    return loss, stats


# ----------------------------------------------------------------------------------------------------------
# Rewards, prompts, evaluation (plumbing)
# ----------------------------------------------------------------------------------------------------------
def math_reward(prompts, completions, records):
    return [1.0 if common.grade(c, r["answer"]) else 0.0 for c, r in zip(completions, records)]


def load_reward_fn(spec):
    path, _, name = spec.rpartition(":")
    if not path or not Path(path).is_file() or not name:
        raise SystemExit(f"error: --reward-fn {spec}: expected path/to/file.py:function with an existing file")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, name, None)):
        raise SystemExit(f"error: --reward-fn {spec}: {path} has no function '{name}'")
    return getattr(module, name)


def compute_rewards(reward_fn, prompts, completions, records):
    """Call the reward function; if it raises, find and show the failing sample instead of swallowing it."""
    try:
        rewards = [float(r) for r in reward_fn(prompts, completions, records)]
    except Exception as batch_error:
        for p, c, r in zip(prompts, completions, records):
            try:
                reward_fn([p], [c], [r])
            except Exception as e:
                raise SystemExit(f"error: reward function raised {type(e).__name__}: {e}\n  on completion: {c!r}\n"
                                 f"  answer: {r.get('answer')!r}\n  prompt (end): {p[-200:]!r}")
        raise SystemExit(f"error: reward function raised {type(batch_error).__name__}: {batch_error}")
    if len(rewards) != len(completions) or not all(math.isfinite(r) for r in rewards):
        raise SystemExit(f"error: reward function must return {len(completions)} finite floats, got {rewards[:8]}...")
    return rewards


def tokenize_prompts(tokenizer, prompts, device):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def evaluate(model, tokenizer, prompts, records, args, eos_ids, autocast, generator):
    """Greedy accuracy and sampled accuracy (one sample at the training temperature) on held-out problems."""
    results = {}
    for name, temperature in (("accuracy", 0.0), ("sampled_accuracy", args.temperature)):
        correct, samples = 0, []
        for i in range(0, len(prompts), args.eval_batch_size):
            ids, mask = tokenize_prompts(tokenizer, prompts[i:i + args.eval_batch_size], model.device)
            with autocast():
                out, lens = generate(model, ids, mask, 1, args.max_new_tokens, temperature, eos_ids, generator)
            texts = tokenizer.batch_decode([o[:n] for o, n in zip(out.tolist(), lens.tolist())], skip_special_tokens=True)
            for text, rec in zip(texts, records[i:i + args.eval_batch_size]):
                ok = common.grade(text, rec["answer"])
                correct += ok
                samples.append({"question": rec["question"], "answer": rec["answer"], "completion": text, "correct": ok})
        results[f"eval/{name}"] = correct / len(prompts)
        results[f"samples/{name}"] = samples[:4]
    return results


def main(argv=None):
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = common.resolve_device(args.device)
    weight_dtype, autocast_dtype = common.resolve_dtype(args.dtype, device)
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    run_dir = Path(args.output_dir or f"runs/grpo__{args.seed}__{int(time.time())}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
    (run_dir / "samples.jsonl").write_text("")  # a few eval completions, appended at every eval

    # data and prompts
    train, test = common.train_eval_records(args.dataset, args.eval_dataset, args.question_key, args.answer_key,
                                            seed=args.seed, eval_size=args.eval_size)
    tokenizer = common.load_tokenizer(args.model)
    fewshot_k = common.default_fewshot(args.dataset) if args.fewshot is None else args.fewshot
    fewshot, train = train[:fewshot_k], train[fewshot_k:]  # the examples are not also training problems
    if not train:
        raise SystemExit(f"error: dataset {args.dataset} has no training problems left after {fewshot_k} few-shot examples")
    prompt_of = lambda rec: common.build_prompt(tokenizer, rec["question"], fewshot, args.system_prompt)
    test_prompts = [prompt_of(r) for r in test]
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else math_reward

    # models: the policy, and a frozen reference only when the KL term is on
    model = common.load_model(args.model, device, weight_dtype)
    model.eval()  # no dropout: pi_old and pi_theta must be the same function of the weights
    ref_model = copy.deepcopy(model).requires_grad_(False) if args.beta != 0.0 else None
    gen_eos = model.generation_config.eos_token_id  # an int, a list, or None
    eos_ids = sorted({tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})
    # fused AdamW: one kernel for all parameters (~8x faster than the per-tensor loop on CPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / max(1, args.warmup_steps)))
    generator = torch.Generator(device).manual_seed(args.seed)
    data_rng = random.Random(args.seed)
    order = []

    metrics_file = open(run_dir / "metrics.jsonl", "w")
    def log(record):
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    def run_eval(step):
        t0 = time.perf_counter()
        eval_generator = torch.Generator(device).manual_seed(args.seed + 1)  # the same draws at every eval
        res = evaluate(model, tokenizer, test_prompts, test, args, eos_ids, autocast, eval_generator)
        log({"step": step, "eval/accuracy": res["eval/accuracy"], "eval/sampled_accuracy": res["eval/sampled_accuracy"],
             "eval/time": round(time.perf_counter() - t0, 2)})
        with open(run_dir / "samples.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "greedy": res["samples/accuracy"], "sampled": res["samples/sampled_accuracy"]}) + "\n")
        tqdm.write(f"eval step {step}: greedy acc {res['eval/accuracy']:.1%}  sampled acc (T={args.temperature}) "
                   f"{res['eval/sampled_accuracy']:.1%}  ({len(test)} problems, {time.perf_counter() - t0:.0f}s)")
        return res

    print(f"grpo: {len(train)} train / {len(test)} eval problems, {fewshot_k}-shot, model {args.model} on {device} "
          f"(weights {weight_dtype}, autocast {autocast_dtype}), output {run_dir}")
    before = run_eval(0)
    zero_std_streak, warned = 0, set()
    bar = tqdm(range(1, args.steps + 1), desc="grpo", dynamic_ncols=True)
    for step in bar:
        t_step = time.perf_counter()
        # ---- 1. sample G completions for each of P prompts ---------------------------------------------------
        batch = []
        for _ in range(args.prompts_per_step):
            if not order:
                order = list(range(len(train)))
                data_rng.shuffle(order)
            batch.append(train[order.pop()])
        prompts = [prompt_of(r) for r in batch]
        prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, device)  # (P, Lp)
        G = args.num_generations
        with autocast():
            completion_ids, lens = generate(model, prompt_ids, prompt_mask, G, args.max_new_tokens,
                                            args.temperature, eos_ids, generator)  # (P*G, T)
        mask = completion_mask_from_lens(lens, completion_ids.shape[1])  # (P*G, T)
        truncated = ~torch.isin(completion_ids.gather(1, (lens - 1)[:, None]).squeeze(1), torch.tensor(eos_ids, device=device))
        gen_time = time.perf_counter() - t_step

        # ---- 2. rewards and group-normalized advantages -------------------------------------------------------
        texts = tokenizer.batch_decode([c[:n] for c, n in zip(completion_ids.tolist(), lens.tolist())], skip_special_tokens=True)
        rep = lambda xs: [x for x in xs for _ in range(G)]
        rewards = torch.tensor(compute_rewards(reward_fn, rep(prompts), texts, rep(batch)), device=device)
        advantages = group_advantages(rewards, G, scale_std=not args.no_std_scaling)  # (P*G,)
        group_std = rewards.view(-1, G).std(1)
        # Groups with equal rewards have A = 0: with beta = 0 they add exactly zero gradient, so we skip their
        # forward/backward (the loss normalizers below still count them, so the update is unchanged).
        trainable = [p for p in range(len(batch)) if args.beta != 0.0 or group_std[p] > 0]
        norms = dict(num_seqs=len(lens), num_tokens=mask.sum(), max_len=args.max_new_tokens)

        # ---- 3. mu optimizer updates on this batch -------------------------------------------------------------
        t_train = time.perf_counter()
        # micro-batches of whole prompt groups; each is trimmed to its own longest completion (no pad columns)
        micro_batches = []
        for i in range(0, len(trainable), args.micro_batch_prompts):
            ps = trainable[i:i + args.micro_batch_prompts]
            r = torch.cat([torch.arange(p * G, (p + 1) * G, device=device) for p in ps])  # completion rows
            T = int(lens[r].max())
            micro_batches.append((ps, r, completion_ids[r, :T], mask[r, :T]))

        def logprobs_of(m, ps, ids, grad):
            with torch.set_grad_enabled(grad), autocast():
                return completion_logprobs(m, prompt_ids[ps], prompt_mask[ps], ids, G, args.temperature)

        # pi_old is frozen across the mu updates (with mu = 1 it is the current policy: no extra forward);
        # pi_ref is the start model (only with beta > 0)
        old_logprobs = [logprobs_of(model, ps, ids, False)[0] for ps, _, ids, _ in micro_batches] if args.mu > 1 else None
        ref_logprobs = [logprobs_of(ref_model, ps, ids, False)[0] for ps, _, ids, _ in micro_batches] if ref_model else None
        stats = {"loss": 0.0, "clip_frac_sum": 0.0, "kl_sum": 0.0, "entropy_sum": 0.0, "tokens": 0.0}
        for _ in range(args.mu):
            optimizer.zero_grad(set_to_none=False)  # zero (not None) grads: an all-skipped batch still steps AdamW
            for k, (ps, r, ids, mb_mask) in enumerate(micro_batches):
                logprobs, entropy = logprobs_of(model, ps, ids, True)  # (b, T)
                old = old_logprobs[k] if old_logprobs else logprobs.detach()
                loss, s = grpo_loss(logprobs, old, advantages[r], mb_mask, args.loss_type, args.epsilon, args.epsilon_high,
                                    args.beta, ref_logprobs[k] if ref_logprobs else None, **norms)
                if not torch.isfinite(loss):
                    raise SystemExit(f"error: loss is {loss.item()} at step {step}; stopping before the update "
                                     f"(the last saved model in {run_dir / 'model'} is untouched)")
                loss.backward()  # accumulates: the sum over micro-batches is the full-batch gradient
                stats["loss"] += loss.item() / args.mu
                stats["clip_frac_sum"] += s["clip_frac_sum"]
                stats["kl_sum"] += s["kl_sum"]
                stats["entropy_sum"] += float((entropy * mb_mask).sum())
                stats["tokens"] += float(mb_mask.sum())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise SystemExit(f"error: gradient norm is {grad_norm} at step {step}; stopping before the update")
            optimizer.step()
            scheduler.step()
        train_time = time.perf_counter() - t_train
        step_time = time.perf_counter() - t_step

        # ---- 4. log -------------------------------------------------------------------------------------------
        n_tok = stats["tokens"] or float("nan")
        frac_zero_std = float((group_std == 0).float().mean())
        record = {"step": step, "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                  "frac_zero_std": frac_zero_std, "truncated": float(truncated.float().mean()),
                  "completion_len": float(lens.float().mean()),
                  "entropy": stats["entropy_sum"] / n_tok if stats["tokens"] else None,
                  "kl": stats["kl_sum"] / n_tok if args.beta and stats["tokens"] else None,
                  "clip_frac": stats["clip_frac_sum"] / n_tok if stats["tokens"] else None,
                  "loss": stats["loss"], "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                  "gen_time": round(gen_time, 3), "train_time": round(train_time, 3), "step_time": round(step_time, 3),
                  "tokens_per_s": round(float(lens.sum()) / step_time, 1)}
        log(record)
        bar.set_postfix(reward=f"{record['reward']:.2f}")
        fmt = lambda v, f: "-" if v is None else format(v, f)
        tqdm.write(f"step {step:4d} | reward {record['reward']:.3f} ±{record['reward_std']:.2f} | zero-std {frac_zero_std:.2f} "
                   f"| len {record['completion_len']:.1f} trunc {record['truncated']:.2f} | H {fmt(record['entropy'], '.3f')} "
                   f"| kl {fmt(record['kl'], '.4f')} | clip {fmt(record['clip_frac'], '.3f')} | gnorm {grad_norm:.3f} "
                   f"| gen {gen_time:.1f}s train {train_time:.1f}s")
        zero_std_streak = zero_std_streak + 1 if frac_zero_std == 1.0 else 0
        if zero_std_streak >= 3 and "zero_std" not in warned:
            warned.add("zero_std")
            tqdm.write("warning: every group has had zero reward variance for 3 steps: no learning signal. The task is "
                       "too hard/easy for this model; try --fewshot, a higher --temperature or more --num-generations.")
        if record["truncated"] > 0.5 and "truncated" not in warned:
            warned.add("truncated")
            tqdm.write(f"warning: {record['truncated']:.0%} of completions hit --max-new-tokens {args.max_new_tokens}; "
                       "truncated answers usually score 0: consider raising it.")
        if args.eval_every and step % args.eval_every == 0 and step != args.steps:
            run_eval(step)
            if not args.no_save:
                common.save_pretrained_atomic(model, tokenizer, run_dir / "model")
    bar.close()

    after = run_eval(args.steps)
    if not args.no_save:
        common.save_pretrained_atomic(model, tokenizer, run_dir / "model")
    metrics_file.close()
    print(f"\n{'held-out (' + str(len(test)) + ' problems)':<28}{'before':>8}{'after':>8}")
    print(f"{'greedy accuracy':<28}{before['eval/accuracy']:>8.1%}{after['eval/accuracy']:>8.1%}")
    print(f"{'sampled accuracy (T=' + str(args.temperature) + ')':<28}{before['eval/sampled_accuracy']:>8.1%}"
          f"{after['eval/sampled_accuracy']:>8.1%}")
    print(f"metrics: {run_dir / 'metrics.jsonl'}" + ("" if args.no_save else f"   model: {run_dir / 'model'}"))
    return before, after


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the last saved model (if any) is intact; nothing half-written was kept")
