# NOTE TO THE ENGINEER CONVERTING THIS FILE (delete this comment when done): before anything else read
# /tmp/helper_common.md -- the rules for this conversion (files you may edit, flock for every torch run,
# metric keys, no git commits, deadline 12:55 UTC).
"""Reinforce and Reinforce-Rej, one readable file.

Paper: Xiong et al. 2025, "A Minimalist Approach to LLM Reasoning: from Rejection Sampling to Reinforce"
(https://arxiv.org/abs/2504.11343, v2), §3 Eq. 5 (Reinforce with importance sampling and clipping) and §5.1
(Reinforce-Rej and its ablations). Released code: RLHFlow/Minimal-RL, core_algos.py
`compute_reinforce_rej_outcome_advantage`.

For each prompt x sample n completions from pi_old and grade them: r = +1 if correct, else --incorrect-reward
(-1, the paper's scale). Then, for every token t of completion i:
    A_i     = r_i                                   vanilla Reinforce: the raw reward, no baseline (Eq. 5)
    rho_t   = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, y_<t)
    l_t     = -min(rho_t * A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_i)
    loss    = (1/|D|) sum_{i in D} (1/|y_i|) sum_t l_t     seq-mean-token-mean over the kept samples D (Eq. 5)
Reinforce-Rej (§5.1): D excludes every prompt whose n samples are all correct or all wrong (they are dropped,
so they are not in |D| either). Ablations: --reject all_wrong / all_correct (one side), --mean-zero
(A = r - mean_group(r)), --std-normalize (A /= std_group(r) + eps). Each generation batch is split into
--num-minibatches optimizer updates; pi_old (the sampling policy) is frozen across them, so clipping acts.

    python reinforce_rej.py                           # Reinforce-Rej, embedded SmolLM2-135M-Instruct, arithmetic, CPU
    python reinforce_rej.py --reject none             # vanilla Reinforce (A = r for every sample)
    python reinforce_rej.py --reject all_wrong        # the paper's "Reinforce + remove all wrong" ablation
    python reinforce_rej.py --incorrect-reward 0      # the released code's 0/1 rewards (= RAFT++ on mixed groups)
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

REJECT_SIDES = ("all_correct", "all_wrong")


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
    p.add_argument("--reward-fn", default=None, help="path/to/file.py:function(prompts, completions, records) -> floats, used as is; reward > 0 counts as correct (default: math grading, +1 / --incorrect-reward)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on GPU; fp32 weights + bf16 autocast on CPU")
    # sampling
    p.add_argument("--steps", type=int, default=40, help="generation batches (each followed by --num-minibatches optimizer updates)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per generation batch")
    p.add_argument("--num-generations", type=int, default=8, help="n: completions sampled per prompt (>= 2 for the rejection filter)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion length cap")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use logits / T)")
    # Reinforce / Reinforce-Rej
    p.add_argument("--reject", default="all_correct,all_wrong", help="prompt groups dropped before the update: 'all_correct,all_wrong' (Reinforce-Rej), 'all_wrong', 'all_correct', or 'none' (vanilla Reinforce)")
    p.add_argument("--incorrect-reward", type=float, default=-1.0, help="reward of a wrong answer (correct: +1). -1: the paper; 0: the released code (wrong answers then get zero weight)")
    p.add_argument("--mean-zero", action="store_true", help="ablation: A = r - mean of the prompt's group")
    p.add_argument("--std-normalize", action="store_true", help="ablation: divide A by the group's unbiased std + 1e-6")
    p.add_argument("--loss-agg", default="seq-mean-token-mean", choices=["seq-mean-token-mean", "token-mean"], help="seq-mean-token-mean: paper Eq. 5; token-mean: the released code (verl)")
    p.add_argument("--num-minibatches", type=int, default=2, help="optimizer updates per generation batch: the kept prompt groups are split into this many mini-batches")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip epsilon_low")
    p.add_argument("--epsilon-high", type=float, default=None, help="clip epsilon_high (default: --epsilon)")
    p.add_argument("--dual-clip", type=float, default=0.0, help="released-code extra: dual-clip constant c for A < 0 (verl: 3); 0: off")
    p.add_argument("--beta", type=float, default=0.0, help="released-code extra: k3 KL coefficient to the start model in the loss (code: 0.001); 0: off")
    p.add_argument("--entropy-coef", type=float, default=0.0, help="released-code extra: entropy bonus coefficient (code: 0.001); 0: off")
    p.add_argument("--log-kl", action=argparse.BooleanOptionalAction, default=True, help="log the k3 KL of the sampled tokens to the frozen start model (one no-grad reference forward per step)")
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
    p.add_argument("--output-dir", default=None, help="default: runs/reinforce_rej__<seed>__<time>")
    p.add_argument("--no-save", action="store_true", help="do not write the final model")
    args = p.parse_args(argv)
    sides = [s.strip() for s in args.reject.split(",") if s.strip()]
    if sides == ["none"]:
        sides = []
    if not sides and args.reject.strip() != "none" or any(s not in REJECT_SIDES for s in sides):
        p.error(f"--reject {args.reject!r}: expected 'none' or a comma list of {', '.join(REJECT_SIDES)}")
    args.reject_sides = sorted(set(sides))
    if args.num_generations < 2 and (sides or args.mean_zero or args.std_normalize):
        p.error("--num-generations must be >= 2 for the rejection filter, --mean-zero and --std-normalize (use --reject none with 1)")
    for flag in ("steps", "prompts_per_step", "num_generations", "max_new_tokens", "num_minibatches", "eval_size", "micro_batch_prompts"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.temperature <= 0:
        p.error("--temperature must be > 0 (Reinforce needs sampled completions)")
    if not args.incorrect_reward < 1.0:
        p.error(f"--incorrect-reward must be < 1 (the reward of a correct answer), got {args.incorrect_reward}")
    if args.dual_clip and args.dual_clip <= 1.0:
        p.error("--dual-clip must be > 1 (verl uses 3), or 0 to turn it off")
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
def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, num_samples, temperature, entropy_grad=False):
    """log pi(y_t | x, y_<t) from logits / T for every completion token (B, T), and the entropy of that
    distribution (B, T; with gradient only when entropy_grad, for the optional entropy bonus). The prompt runs once per prompt, not once per sample: its keys/values are
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
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = logz - (torch.softmax(logits, -1) * logits).sum(-1)
    return logprobs, entropy


# ----------------------------------------------------------------------------------------------------------
# Reinforce / Reinforce-Rej (algorithm logic)
# ----------------------------------------------------------------------------------------------------------
def reject_groups(rewards, correct, num_generations, reject_sides):
    """rewards/correct (P*G,) -> keep, all_correct, all_wrong, each (P,) bool. A group is uniform when its rewards
    are all equal (the released code's std == 0 test); a uniform group of correct samples is all-correct, of wrong
    ones all-wrong. Mixed groups are always kept; uniform ones are dropped on the sides listed in reject_sides."""
    r, c = rewards.view(-1, num_generations), correct.view(-1, num_generations)
    uniform = (r == r[:, :1]).all(1)
    all_correct, all_wrong = uniform & c.all(1), uniform & ~c.any(1)
    keep = torch.ones_like(uniform)
    if "all_correct" in reject_sides:
        keep &= ~all_correct
    if "all_wrong" in reject_sides:
        keep &= ~all_wrong
    return keep, all_correct, all_wrong


def reinforce_advantages(rewards, num_generations, mean_zero=False, std_normalize=False, eps=1e-6):
    """rewards (P*G,) -> advantages (P*G,). Reinforce: A = r, no baseline, no normalisation (Eq. 5). Ablations
    (§5.1): minus the group mean; divided by the group's unbiased std + eps (the MRL code's eps). A group with
    zero std is left undivided (r / eps would blow up; Reinforce-Rej drops such groups anyway)."""
    r = rewards.view(-1, num_generations)
    adv = r - r.mean(1, keepdim=True) if mean_zero else r.clone()
    if std_normalize:
        std = r.std(1, keepdim=True)
        adv = torch.where(std > 0, adv / (std + eps), adv)
    return adv.view(-1)


def reinforce_loss(logprobs, old_logprobs, advantages, mask, loss_agg="seq-mean-token-mean", eps_low=0.2, eps_high=0.2,
                   dual_clip=0.0, beta=0.0, ref_logprobs=None, entropy_coef=0.0, entropy=None, num_seqs=None, num_tokens=None):
    """Clipped importance-ratio surrogate with A = the (filtered) reward, aggregated per `loss_agg`.
    logprobs/old/ref/entropy/mask: (B, T) for KEPT samples only; advantages: (B,). num_seqs / num_tokens are the
    normalizers of the whole mini-batch of kept samples (default: this batch), so micro-batch losses sum to it."""
    num_seqs = mask.shape[0] if num_seqs is None else num_seqs
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    ratio = torch.exp(logprobs - old_logprobs)  # s_t in Eq. 5
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if dual_clip:  # released code (verl): for A < 0 the loss is capped at c * |A| however large the ratio gets
        per_token = torch.where(adv < 0, torch.min(per_token, -dual_clip * adv), per_token)
    if beta != 0.0:  # released code: + 0.001 * k3 KL to the start model (paper: none)
        d = ref_logprobs - logprobs
        per_token = per_token + beta * (torch.exp(d) - d - 1)
    if entropy_coef != 0.0:  # released code: - 0.001 * entropy (paper: none)
        per_token = per_token - entropy_coef * entropy
    if loss_agg == "seq-mean-token-mean":  # paper Eq. 5: (1/|D|) sum_i (1/|y_i|) sum_t
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_seqs
    elif loss_agg == "token-mean":  # released code: sum over tokens / number of tokens
        loss = (per_token * mask).sum() / num_tokens
    else:
        raise ValueError(f"unknown loss_agg {loss_agg}")
    with torch.no_grad():  # diagnostics: fraction of tokens where the clipped branch is the active one
        clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {"clip_frac_sum": float((clipped.float() * mask).sum())}
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
    run_dir = Path(args.output_dir or f"runs/reinforce_rej__{args.seed}__{int(time.time())}")
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

    # models: the policy, and a frozen copy of the start model when the KL is logged or in the loss
    model = common.load_model(args.model, device, weight_dtype)
    model.eval()  # no dropout: pi_old and pi_theta must be the same function of the weights
    ref_model = copy.deepcopy(model).requires_grad_(False) if args.log_kl or args.beta != 0.0 else None
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

    print(f"reinforce_rej: {len(train)} train / {len(test)} eval problems, {fewshot_k}-shot, model {args.model} on {device} "
          f"(weights {weight_dtype}, autocast {autocast_dtype}), reject {','.join(args.reject_sides) or 'none'}, "
          f"rewards {'from ' + args.reward_fn if args.reward_fn else f'+1 / {args.incorrect_reward:g}'}, output {run_dir}")
    before = run_eval(0)
    skipped_updates, warned = 0, set()
    bar = tqdm(range(1, args.steps + 1), desc="reinforce_rej", dynamic_ncols=True)
    for step in bar:
        t_step = time.perf_counter()
        # ---- 1. sample n completions for each of P prompts ---------------------------------------------------
        batch = []
        for _ in range(args.prompts_per_step):
            if not order:
                order = list(range(len(train)))
                data_rng.shuffle(order)
            batch.append(train[order.pop()])
        prompts = [prompt_of(r) for r in batch]
        prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, device)  # (P, Lp)
        P, G = len(batch), args.num_generations
        with autocast():
            completion_ids, lens = generate(model, prompt_ids, prompt_mask, G, args.max_new_tokens,
                                            args.temperature, eos_ids, generator)  # (P*G, T)
        mask = completion_mask_from_lens(lens, completion_ids.shape[1])  # (P*G, T)
        truncated = ~torch.isin(completion_ids.gather(1, (lens - 1)[:, None]).squeeze(1), torch.tensor(eos_ids, device=device))
        gen_time = time.perf_counter() - t_step

        # ---- 2. rewards (+1 / --incorrect-reward), the rejection filter, advantages A = r -----------------------
        texts = tokenizer.batch_decode([c[:n] for c, n in zip(completion_ids.tolist(), lens.tolist())], skip_special_tokens=True)
        rep = lambda xs: [x for x in xs for _ in range(G)]
        raw = torch.tensor(compute_rewards(reward_fn, rep(prompts), texts, rep(batch)), device=device)  # (P*G,)
        correct = raw > 0  # math grading returns 1/0; a custom reward counts as correct when > 0
        rewards = raw if args.reward_fn else torch.where(correct, 1.0, args.incorrect_reward)
        keep, all_correct, all_wrong = reject_groups(rewards, correct, G, args.reject_sides)  # (P,) each
        advantages = reinforce_advantages(rewards, G, args.mean_zero, args.std_normalize)  # (P*G,)
        kept = keep.nonzero().squeeze(1).tolist()  # prompt groups in the update: dropped ones are not in |D|

        def micro_batches_of(groups):  # whole prompt groups, each micro-batch trimmed to its longest completion
            out = []
            for i in range(0, len(groups), args.micro_batch_prompts):
                ps = groups[i:i + args.micro_batch_prompts]
                r = torch.cat([torch.arange(p * G, (p + 1) * G, device=device) for p in ps])  # completion rows
                T = int(lens[r].max())
                out.append((ps, r, completion_ids[r, :T], mask[r, :T]))
            return out

        def logprobs_of(m, ps, ids, grad):
            with torch.set_grad_enabled(grad), autocast():
                return completion_logprobs(m, prompt_ids[ps], prompt_mask[ps], ids, G, args.temperature,
                                           entropy_grad=grad and args.entropy_coef != 0.0)

        # ---- 3. frozen log-probs: pi_old (for mini-batches 2..k) and pi_ref (KL logging / KL loss), no grad -----
        t_train = time.perf_counter()
        n_mb = min(args.num_minibatches, len(kept))
        need_old, need_ref = args.log_kl or n_mb > 1, ref_model is not None
        old_lp, ref_lp, sampled_entropy = (torch.zeros_like(mask) for _ in range(3))  # (P*G, T)
        for ps, r, ids, _ in micro_batches_of(list(range(P)) if args.log_kl else kept):
            T = ids.shape[1]
            if need_old:
                old_lp[r, :T], sampled_entropy[r, :T] = logprobs_of(model, ps, ids, False)
            if need_ref:
                ref_lp[r, :T] = logprobs_of(ref_model, ps, ids, False)[0]
        kl_to_start = entropy_sampled = None
        if args.log_kl:  # k3 KL of the sampled tokens to the start model, at the sampling policy, every sample
            d = ref_lp - old_lp
            kl_to_start = float(((torch.exp(d) - d - 1) * mask).sum() / mask.sum())
            entropy_sampled = float((sampled_entropy * mask).sum() / mask.sum())

        # ---- 4. one optimizer update per mini-batch of kept prompt groups ----------------------------------------
        chunks = [kept[i * len(kept) // n_mb:(i + 1) * len(kept) // n_mb] for i in range(n_mb)]
        stats = {"loss": 0.0, "clip_frac_sum": 0.0, "entropy_sum": 0.0, "tokens": 0.0, "grad_norm": 0.0}
        for chunk in chunks:
            mbs = micro_batches_of(chunk)
            norms = dict(num_seqs=len(chunk) * G, num_tokens=sum(m.sum() for *_, m in mbs))  # this update's |D|
            optimizer.zero_grad(set_to_none=True)
            for ps, r, ids, mb_mask in mbs:
                T = ids.shape[1]
                logprobs, entropy = logprobs_of(model, ps, ids, True)  # (b, T)
                old = old_lp[r, :T] if n_mb > 1 else logprobs.detach()  # one update: pi_old = pi_theta, no extra forward
                loss, s = reinforce_loss(logprobs, old, advantages[r], mb_mask, args.loss_agg, args.epsilon, args.epsilon_high,
                                         args.dual_clip, args.beta, ref_lp[r, :T], args.entropy_coef, entropy, **norms)
                if not torch.isfinite(loss):
                    raise SystemExit(f"error: loss is {loss.item()} at step {step}; stopping before the update "
                                     f"(the last saved model in {run_dir / 'model'} is untouched)")
                loss.backward()  # accumulates: the sum over micro-batches is the mini-batch gradient
                stats["loss"] += loss.item() / n_mb
                stats["clip_frac_sum"] += s["clip_frac_sum"]
                stats["entropy_sum"] += float((entropy.detach() * mb_mask).sum())
                stats["tokens"] += float(mb_mask.sum())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise SystemExit(f"error: gradient norm is {grad_norm} at step {step}; stopping before the update")
            stats["grad_norm"] += grad_norm / n_mb
            optimizer.step()
            scheduler.step()
        if not chunks:  # every prompt rejected: nothing to divide by, so no update at all (not a zero-grad step)
            skipped_updates += 1
            tqdm.write(f"warning: step {step}: all {P} prompts rejected ({int(all_correct.sum())} all-correct, "
                       f"{int(all_wrong.sum())} all-wrong): update skipped ({skipped_updates} skipped so far)")
        train_time = time.perf_counter() - t_train
        step_time = time.perf_counter() - t_step

        # ---- 5. log -------------------------------------------------------------------------------------------
        n_tok = stats["tokens"]
        rej_c, rej_w = int((all_correct & ~keep).sum()), int((all_wrong & ~keep).sum())
        record = {"step": step, "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                  "correct": float(correct.float().mean()), "frac_zero_std": float((all_correct | all_wrong).float().mean()),
                  "rejected_all_correct": rej_c, "rejected_all_wrong": rej_w, "frac_rejected": (rej_c + rej_w) / P,
                  "kept_prompts": len(kept), "samples_used": len(kept) * G, "tokens_used": int(n_tok),
                  "updates": len(chunks), "skipped_updates": skipped_updates, "truncated": float(truncated.float().mean()),
                  "completion_len": float(lens.float().mean()),
                  "entropy": stats["entropy_sum"] / n_tok if n_tok else None, "entropy_sampled": entropy_sampled,
                  "kl": kl_to_start, "clip_frac": stats["clip_frac_sum"] / n_tok if n_tok else None,
                  "loss": stats["loss"] if chunks else None, "grad_norm": stats["grad_norm"] if chunks else None,
                  "lr": scheduler.get_last_lr()[0], "gen_time": round(gen_time, 3), "train_time": round(train_time, 3),
                  "step_time": round(step_time, 3), "tokens_per_s": round(float(lens.sum()) / step_time, 1)}
        log(record)
        bar.set_postfix(reward=f"{record['reward']:.2f}")
        fmt = lambda v, f: "-" if v is None else format(v, f)
        tqdm.write(f"step {step:4d} | reward {record['reward']:.3f} acc {record['correct']:.2f} | rejected {rej_c}c/{rej_w}w "
                   f"used {record['samples_used']}/{P * G} | len {record['completion_len']:.1f} trunc {record['truncated']:.2f} "
                   f"| H {fmt(record['entropy'], '.3f')} | kl {fmt(record['kl'], '.4f')} | clip {fmt(record['clip_frac'], '.3f')} "
                   f"| gnorm {fmt(record['grad_norm'], '.3f')} | gen {gen_time:.1f}s train {train_time:.1f}s")
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
    if skipped_updates:
        print(f"{skipped_updates} of {args.steps} steps had every prompt rejected and made no update")
    print(f"metrics: {run_dir / 'metrics.jsonl'}" + ("" if args.no_save else f"   model: {run_dir / 'model'}"))
    return before, after


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the last saved model (if any) is intact; nothing half-written was kept")
