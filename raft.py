"""RAFT and RAFT++: rejection-sampling fine-tuning, plain or with importance sampling and clipping, one readable file.

Paper: Xiong et al. 2025, "A Minimalist Approach to LLM Reasoning: from Rejection Sampling to Reinforce"
(https://arxiv.org/abs/2504.11343, v2), §3 Eq. 1 (RAFT, after Dong et al. 2023, https://arxiv.org/abs/2304.06767)
and Eq. 6 (RAFT++). Released code: RLHFlow/Minimal-RL, core_algos.py `compute_raft_outcome_advantage`, dp_actor.py
`policy_loss` = vanilla (RAFT) / plusplus (RAFT++).

For each prompt x sample n completions from pi_old and grade them: r = +1 if correct, else --incorrect-reward (-1,
the paper's scale). A = max(r, 0) (the code's clamp; with the paper's rewards it is Eq. 6's indicator "y is
correct"), and the accepted set is D = {(x, y): A > 0}: wrong samples are dropped, not zeroed (they are in
neither |D| nor any token count). Then, over the samples of D:
    RAFT    (Eq. 1)  loss = -(1/|D|) sum_{y in D} (1/|y|) sum_t A * log pi_theta(y_t | x, y_<t)    SFT on D
    RAFT++  (Eq. 6)  s_t  = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, y_<t)
                     loss = -(1/|D|) sum_{y in D} (1/|y|) sum_t min(s_t * A, clip(s_t, 1 - eps_low, 1 + eps_high) * A)
D is split into --num-minibatches optimizer updates; pi_old (the sampling policy) is frozen across them, so from the
second update on s != 1 and the clip acts. At s = 1 the RAFT++ gradient is A * grad log pi: with one update per
batch RAFT++ is RAFT exactly. The loss value of RAFT++ is about -1 at every step (mean of s * A); its gradient is not.

    python raft.py                                    # RAFT++, embedded SmolLM2-135M-Instruct, arithmetic, CPU
    python raft.py --no-clip                          # plain RAFT (NLL on the accepted samples)
    python raft.py --epsilon 1e9                      # ablation: importance sampling without clipping (paper Fig. 2)
    python raft.py --loss-agg token-mean --beta 0.001 --entropy-coef 0.001   # the released code's loss
"""
import argparse
import copy
import importlib.util
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
    p.add_argument("--reward-fn", default=None, help="path/to/file.py:function(prompts, completions, records) -> floats, used as is: A = max(r, 0), a sample is accepted when r > 0 (default: math grading, +1 / --incorrect-reward)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on GPU; fp32 weights + bf16 autocast on CPU")
    # sampling
    p.add_argument("--steps", type=int, default=40, help="generation batches (each followed by --num-minibatches optimizer updates)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per generation batch")
    p.add_argument("--num-generations", type=int, default=8, help="n: completions sampled per prompt (paper: 4)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion length cap")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use logits / T)")
    # RAFT / RAFT++
    p.add_argument("--no-clip", action="store_true", help="plain RAFT: NLL of the accepted samples, no importance ratio, no clip (default: RAFT++)")
    p.add_argument("--incorrect-reward", type=float, default=-1.0, help="reward of a wrong answer (correct: +1); must be <= 0, so A = max(r, 0) drops it. -1: the paper; 0: the released code")
    p.add_argument("--loss-agg", default="seq-mean-token-mean", choices=["seq-mean-token-mean", "token-mean"], help="seq-mean-token-mean: paper Eq. 6; token-mean: the released code (verl)")
    p.add_argument("--num-minibatches", type=int, default=2, help="optimizer updates per generation batch: the accepted samples are split into this many mini-batches (released scripts: 4)")
    p.add_argument("--epsilon", type=float, default=0.2, help="RAFT++ clip epsilon_low (1e9: importance sampling without clipping)")
    p.add_argument("--epsilon-high", type=float, default=None, help="RAFT++ clip epsilon_high (default: --epsilon; clip-higher, paper §5.1: 0.28)")
    p.add_argument("--beta", type=float, default=0.0, help="released-code extra: k3 KL coefficient to the start model in the loss (code: 0.001); 0: off")
    p.add_argument("--entropy-coef", type=float, default=0.0, help="released-code extra: entropy bonus coefficient (code: 0.001); 0: off")
    # optimization
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (constant after warm-up)")
    p.add_argument("--warmup-steps", type=int, default=2, help="linear LR warm-up, in optimizer updates")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--micro-batch-prompts", type=int, default=1, help="prompts (with their samples) per forward/backward (gradient accumulation)")
    # evaluation / logging
    p.add_argument("--eval-every", type=int, default=20, help="evaluate every N steps (0: only before and after)")
    p.add_argument("--eval-size", type=int, default=100, help="held-out problems per evaluation")
    p.add_argument("--eval-batch-size", type=int, default=64, help="prompts per generation call during eval")
    p.add_argument("--output-dir", default=None, help="default: runs/raft__<seed>__<time> (raftpp__... for RAFT++)")
    p.add_argument("--no-save", action="store_true", help="do not write the final model")
    args = p.parse_args(argv)
    for flag in ("steps", "prompts_per_step", "num_generations", "max_new_tokens", "num_minibatches", "eval_size", "micro_batch_prompts"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.temperature <= 0:
        p.error("--temperature must be > 0 (RAFT trains on sampled completions)")
    if args.incorrect_reward > 0:
        p.error(f"--incorrect-reward must be <= 0 (got {args.incorrect_reward}): a positive reward would put wrong answers into the accepted set")
    if args.epsilon <= 0 or (args.epsilon_high is not None and args.epsilon_high <= 0):
        p.error("--epsilon and --epsilon-high must be > 0")
    args.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    args.algo = "raft" if args.no_clip else "raftpp"
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
def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, prompt_index, temperature, entropy_grad=False):
    """log pi(y_t | x, y_<t) from logits / T for every completion token (B, T), and the entropy of that distribution
    (B, T; with gradient only when entropy_grad, for the optional entropy bonus). Completion b continues prompt
    prompt_index[b] (B,): RAFT keeps a different number of samples per prompt. Each prompt runs once; its keys/values
    are gathered for its completions and gradients flow back through the gather, so this equals the plain forward
    over [prompt; completion] (tested) at a fraction of the cost. Logits are computed only where a completion token
    is predicted: the last prompt position and completion positions 0..T-2."""
    B, T = completion_ids.shape
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    prompt_out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = prompt_out.past_key_values
    cache.batch_select_indices(prompt_index)  # (P, ...) -> (B, ...): row b holds the keys/values of its prompt
    attn = torch.cat([prompt_mask[prompt_index], prompt_mask.new_ones(B, T)], 1)
    pos = prompt_mask.sum(1, keepdim=True)[prompt_index] + torch.arange(T, device=completion_ids.device)
    logits = prompt_out.logits[prompt_index, -1:]  # (B, 1, V): predicts completion token 0
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
# RAFT / RAFT++ (algorithm logic)
# ----------------------------------------------------------------------------------------------------------
def raft_advantages(rewards):
    """rewards (N,) -> advantages (N,) = max(r, 0) (the released code's clamp). With the paper's rewards (+1 / -1)
    this is 1 on correct samples and 0 on wrong ones; only samples with A > 0 enter the loss (the accepted set D)."""
    return rewards.clamp(min=0)


def raft_loss(logprobs, old_logprobs, advantages, mask, clip=True, loss_agg="seq-mean-token-mean", eps_low=0.2,
              eps_high=0.2, beta=0.0, ref_logprobs=None, entropy_coef=0.0, entropy=None, num_seqs=None, num_tokens=None):
    """RAFT (clip=False): -A * log pi per token (SFT on the accepted samples). RAFT++ (clip=True): the PPO-clip
    surrogate -min(s * A, clip(s, 1 - eps_low, 1 + eps_high) * A), s = pi_theta / pi_old. logprobs/old/ref/entropy/
    mask: (B, T) of ACCEPTED samples only (wrong ones are dropped before this); advantages: (B,), > 0. num_seqs /
    num_tokens are the normalizers of the whole mini-batch (default: this batch), so micro-batch losses sum to it."""
    num_seqs = mask.shape[0] if num_seqs is None else num_seqs
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    adv = advantages[:, None]
    if clip:
        ratio = torch.exp(logprobs - old_logprobs)  # s_t in Eq. 6
        per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    else:
        ratio = None
        per_token = -adv * logprobs  # Eq. 1: the NLL of the accepted samples (weighted by A = 1)
    kl = None
    if beta != 0.0:  # released code: + 0.001 * k3 KL to the start model (paper: none)
        d = ref_logprobs - logprobs
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    if entropy_coef != 0.0:  # released code: - 0.001 * entropy (paper: none)
        per_token = per_token - entropy_coef * entropy
    if loss_agg == "seq-mean-token-mean":  # paper Eq. 6: (1/|D|) sum_y (1/|y|) sum_t
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_seqs
    elif loss_agg == "token-mean":  # released code: sum over tokens / number of tokens
        loss = (per_token * mask).sum() / num_tokens
    else:
        raise ValueError(f"unknown loss_agg {loss_agg}")
    with torch.no_grad():  # diagnostics: tokens where the clip is active (A > 0: only the upper side can clip)
        clipped = (ratio > 1 + eps_high) & (adv > 0) if clip else torch.zeros_like(mask, dtype=torch.bool)
        stats = {"clip_frac_sum": float((clipped.float() * mask).sum()), "nll_sum": float((-logprobs * mask).sum()),
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
    run_dir = Path(args.output_dir or f"runs/{args.algo}__{args.seed}__{int(time.time())}")
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

    # models: the policy, and a frozen copy of the start model only when the KL term is on
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

    name = "RAFT" if args.no_clip else "RAFT++"
    print(f"{args.algo}: {name}, {len(train)} train / {len(test)} eval problems, {fewshot_k}-shot, model {args.model} on "
          f"{device} (weights {weight_dtype}, autocast {autocast_dtype}), rewards "
          f"{'from ' + args.reward_fn if args.reward_fn else f'+1 / {args.incorrect_reward:g}'}, output {run_dir}")
    before = run_eval(0)
    skipped_updates, no_signal_streak, warned = 0, 0, set()
    bar = tqdm(range(1, args.steps + 1), desc=args.algo, dynamic_ncols=True)
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
                                            args.temperature, eos_ids, generator)  # (P*G, T), row i continues prompt i // G
        mask = completion_mask_from_lens(lens, completion_ids.shape[1])  # (P*G, T)
        truncated = ~torch.isin(completion_ids.gather(1, (lens - 1)[:, None]).squeeze(1), torch.tensor(eos_ids, device=device))
        gen_time = time.perf_counter() - t_step

        # ---- 2. rewards (+1 / --incorrect-reward), A = max(r, 0), the accepted set D = {A > 0} -------------------
        texts = tokenizer.batch_decode([c[:n] for c, n in zip(completion_ids.tolist(), lens.tolist())], skip_special_tokens=True)
        rep = lambda xs: [x for x in xs for _ in range(G)]
        raw = torch.tensor(compute_rewards(reward_fn, rep(prompts), texts, rep(batch)), device=device)  # (P*G,)
        correct = raw > 0  # math grading returns 1/0; a custom reward counts as correct when > 0
        rewards = raw if args.reward_fn else torch.where(correct, 1.0, args.incorrect_reward)
        advantages = raft_advantages(rewards)  # (P*G,)
        accepted = (advantages > 0).nonzero().squeeze(1).tolist()  # rows of D, grouped by prompt; the rest is dropped
        per_prompt = (advantages > 0).view(P, G).sum(1)  # (P,) accepted samples per prompt

        def micro_batches_of(rows):  # up to --micro-batch-prompts prompts each, trimmed to its longest completion
            prompts_in = sorted({r // G for r in rows})
            out = []
            for i in range(0, len(prompts_in), args.micro_batch_prompts):
                ps = prompts_in[i:i + args.micro_batch_prompts]
                r = torch.tensor([x for x in rows if x // G in ps], device=device)  # completion rows
                prompt_index = torch.searchsorted(torch.tensor(ps, device=device), r // G)  # (b,) row -> index into ps
                T = int(lens[r].max())
                out.append((ps, prompt_index, r, completion_ids[r, :T], mask[r, :T]))
            return out

        def logprobs_of(m, mb, grad):
            ps, prompt_index, _, ids, _ = mb
            with torch.set_grad_enabled(grad), autocast():
                return completion_logprobs(m, prompt_ids[ps], prompt_mask[ps], ids, prompt_index, args.temperature,
                                           entropy_grad=grad and args.entropy_coef != 0.0)

        # ---- 3. one no-grad forward at the sampling policy over every sample: pi_old for the ratio (RAFT++) and the
        #         policy entropy (logged every step; wrong samples included, so it is not biased towards D) ------------
        t_train = time.perf_counter()
        old_lp, sampled_entropy, ref_lp = (torch.zeros_like(mask) for _ in range(3))  # (P*G, T)
        for mb in micro_batches_of(list(range(P * G))):
            r, T = mb[2], mb[3].shape[1]
            old_lp[r, :T], sampled_entropy[r, :T] = logprobs_of(model, mb, False)
        if ref_model is not None:
            for mb in micro_batches_of(accepted):
                ref_lp[mb[2], :mb[3].shape[1]] = logprobs_of(ref_model, mb, False)[0]

        # ---- 4. one optimizer update per mini-batch of D (contiguous, near-equal numbers of samples) --------------
        n_mb = min(args.num_minibatches, len(accepted))
        chunks = [accepted[i * len(accepted) // n_mb:(i + 1) * len(accepted) // n_mb] for i in range(n_mb)]
        stats = {"loss": 0.0, "clip_frac_sum": 0.0, "nll_sum": 0.0, "kl_sum": 0.0, "entropy_sum": 0.0, "tokens": 0.0, "grad_norm": 0.0}
        for k, chunk in enumerate(chunks):
            mbs = micro_batches_of(chunk)
            norms = dict(num_seqs=len(chunk), num_tokens=sum(m[4].sum() for m in mbs))  # this update's |D| and tokens
            optimizer.zero_grad(set_to_none=True)
            for mb in mbs:
                r, mb_mask, T = mb[2], mb[4], mb[4].shape[1]
                logprobs, entropy = logprobs_of(model, mb, True)  # (b, T)
                old = logprobs.detach() if k == 0 else old_lp[r, :T]  # before the first update pi_theta IS pi_old: s = 1
                loss, s = raft_loss(logprobs, old, advantages[r], mb_mask, not args.no_clip, args.loss_agg,
                                    args.epsilon, args.epsilon_high, args.beta, ref_lp[r, :T], args.entropy_coef,
                                    entropy, **norms)
                if not torch.isfinite(loss):
                    raise SystemExit(f"error: loss is {loss.item()} at step {step}; stopping before the update "
                                     f"(the last saved model in {run_dir / 'model'} is untouched)")
                loss.backward()  # accumulates: the sum over micro-batches is the mini-batch gradient
                stats["loss"] += loss.item() / n_mb
                stats["clip_frac_sum"] += s["clip_frac_sum"]
                stats["nll_sum"] += s["nll_sum"]
                stats["kl_sum"] += s["kl_sum"]
                stats["entropy_sum"] += float((entropy.detach() * mb_mask).sum())
                stats["tokens"] += float(mb_mask.sum())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise SystemExit(f"error: gradient norm is {grad_norm} at step {step}; stopping before the update")
            stats["grad_norm"] += grad_norm / n_mb
            optimizer.step()
            scheduler.step()
        if not chunks:  # no correct sample at all: D is empty, so there is no update (not a zero-gradient step)
            skipped_updates += 1
        train_time = time.perf_counter() - t_train
        step_time = time.perf_counter() - t_step

        # ---- 5. log -------------------------------------------------------------------------------------------
        n_tok = stats["tokens"]
        record = {"step": step, "reward": float(rewards.mean()), "reward_std": float(rewards.std()) if P * G > 1 else 0.0,
                  "correct": float(correct.float().mean()),
                  "frac_no_correct": float((per_prompt == 0).float().mean()), "frac_all_correct": float((per_prompt == G).float().mean()),
                  "samples_used": len(accepted), "tokens_used": int(n_tok), "updates": len(chunks),
                  "skipped_updates": skipped_updates, "truncated": float(truncated.float().mean()),
                  "completion_len": float(lens.float().mean()),
                  "entropy": float((sampled_entropy * mask).sum() / mask.sum()),
                  "entropy_accepted": stats["entropy_sum"] / n_tok if n_tok else None,
                  "nll": stats["nll_sum"] / n_tok if n_tok else None,
                  "kl": stats["kl_sum"] / n_tok if ref_model is not None and n_tok else None,
                  "clip_frac": stats["clip_frac_sum"] / n_tok if n_tok and not args.no_clip else None,
                  "loss": stats["loss"] if chunks else None, "grad_norm": stats["grad_norm"] if chunks else None,
                  "lr": scheduler.get_last_lr()[0], "gen_time": round(gen_time, 3), "train_time": round(train_time, 3),
                  "step_time": round(step_time, 3), "tokens_per_s": round(float(lens.sum()) / step_time, 1)}
        log(record)
        bar.set_postfix(acc=f"{record['correct']:.2f}")
        fmt = lambda v, f: "-" if v is None else format(v, f)
        tqdm.write(f"step {step:4d} | reward {record['reward']:.3f} acc {record['correct']:.2f} | no-correct "
                   f"{record['frac_no_correct']:.2f} used {len(accepted)}/{P * G} | len {record['completion_len']:.1f} "
                   f"trunc {record['truncated']:.2f} | H {record['entropy']:.3f} | nll {fmt(record['nll'], '.3f')} "
                   f"| clip {fmt(record['clip_frac'], '.3f')} | gnorm {fmt(record['grad_norm'], '.3f')} "
                   f"| gen {gen_time:.1f}s train {train_time:.1f}s")
        no_signal_streak = no_signal_streak + 1 if not chunks else 0
        if no_signal_streak >= 3 and "no_signal" not in warned:
            warned.add("no_signal")
            tqdm.write("warning: no completion has been correct for 3 steps: RAFT has nothing to train on. The task is "
                       "too hard for this model; try --fewshot, more --num-generations or an easier --dataset.")
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
        print(f"{skipped_updates} of {args.steps} steps had no correct sample and made no update")
    print(f"metrics: {run_dir / 'metrics.jsonl'}" + ("" if args.no_save else f"   model: {run_dir / 'model'}"))
    return before, after


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the last saved model (if any) is intact; nothing half-written was kept")
