# NOTE TO THE ENGINEER CONVERTING THIS FILE (delete this comment when done): before anything else read
# /tmp/helper_common.md -- the rules for this conversion (files you may edit, flock for every torch run,
# metric keys, no git commits, deadline 12:55 UTC).
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
After every iteration: held-out greedy accuracy, pass@k (unbiased) and maj@k, and greedy accuracy on the
training problems beside it, so over-fitting (train up, test flat or down) is visible.

    python rest_em.py                                # embedded SmolLM2-135M-Instruct, built-in arithmetic, CPU
    python rest_em.py --resume runs/rest_em__0__1700000000 --iterations 4     # continue / extend a run
    python rest_em.py --model Qwen/Qwen2.5-Math-1.5B --dataset HuggingFaceH4/MATH-500 --fewshot 0 \
        --max-new-tokens 1024 --num-generations 32 --prompts-per-step 500 --lr 1e-6   # a GPU with network
"""
import argparse
import importlib.util
import json
import math
import os
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
    p.add_argument("--reward-fn", default=None, help="path/to/file.py:function(prompts, completions, records) -> 0/1 floats (default: math grading)")
    p.add_argument("--seed", type=int, default=0, help="seed for the problem choice, sampling and data order")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on GPU; fp32 weights + bf16 autocast on CPU")
    # ReST-EM: E-step
    p.add_argument("--iterations", type=int, default=None, help="EM iterations (default 3; paper: up to 3). With --resume: the new total")
    p.add_argument("--prompts-per-step", type=int, default=64, help="training problems: the same set is sampled at every E-step")
    p.add_argument("--num-generations", type=int, default=4, help="N: solutions sampled per problem per E-step (paper: 32 MATH, 64 APPS)")
    p.add_argument("--max-per-problem", type=int, default=10, help="cap on correct solutions kept per problem (paper: 10)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="solution length cap")
    p.add_argument("--temperature", type=float, default=0.7, help="E-step (and eval-sample) temperature (paper: 0.7)")
    p.add_argument("--top-k", type=int, default=40, help="sample from the K most likely tokens (paper: 40; 0: full vocabulary)")
    # ReST-EM: M-step
    p.add_argument("--steps", type=int, default=8, help="M-step optimizer steps per iteration (ignored when --epochs is given)")
    p.add_argument("--epochs", type=float, default=None, help="M-step epochs over the kept set; when given it wins over --steps")
    p.add_argument("--batch-size", type=int, default=16, help="kept solutions per M-step optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=8, help="solutions per forward/backward (gradient accumulation)")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate of the M-step, constant after warm-up (paper: not given; HF Trainer default)")
    p.add_argument("--warmup-steps", type=int, default=2, help="linear LR warm-up, in optimizer steps, at every M-step")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping")
    # evaluation / logging
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N iterations (0: only before and after)")
    p.add_argument("--eval-size", type=int, default=50, help="held-out problems per evaluation (and training problems for train accuracy)")
    p.add_argument("--eval-samples", type=int, default=8, help="n: samples per held-out problem for pass@k / maj@k (T = --temperature)")
    p.add_argument("--pass-k", type=int, default=4, help="k of pass@k and maj@k (<= --eval-samples)")
    p.add_argument("--gen-batch-size", type=int, default=64, help="sequences per generation call")
    p.add_argument("--output-dir", default=None, help="default: runs/rest_em__<seed>__<time>")
    p.add_argument("--no-save", action="store_true", help="do not write the model after each iteration (then --resume is impossible)")
    p.add_argument("--resume", default=None, help="RUN_DIR: continue that run after its last completed iteration (its args.json is used)")
    args = p.parse_args(argv)
    if args.resume:
        saved = Path(args.resume) / "args.json"
        if not saved.is_file():
            raise SystemExit(f"error: --resume {args.resume}: no args.json there (not a rest_em run directory)")
        iterations = args.iterations
        args = argparse.Namespace(**json.loads(saved.read_text()))
        args.iterations, args.resume = iterations or args.iterations, str(Path(saved).parent)
        args.output_dir = args.resume
    args.iterations = 3 if args.iterations is None else args.iterations
    for flag in ("iterations", "steps", "prompts_per_step", "num_generations", "max_per_problem", "max_new_tokens",
                 "batch_size", "micro_batch_size", "eval_size", "eval_samples", "pass_k", "gen_batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.pass_k > args.eval_samples:
        p.error(f"--pass-k {args.pass_k} must be <= --eval-samples {args.eval_samples} (unbiased pass@k needs n >= k)")
    if args.temperature <= 0:
        p.error("--temperature must be > 0 (the E-step samples)")
    if args.epochs is not None and args.epochs <= 0:
        p.error("--epochs must be > 0")
    return args


# ----------------------------------------------------------------------------------------------------------
# Sampling (plumbing): prefill each prompt once, share its KV cache across the N samples, drop finished rows
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, num_samples, max_new_tokens, temperature, eos_ids, generator, top_k=0):
    """Sample `num_samples` completions per prompt (temperature 0: greedy) from the top_k most likely tokens
    (0: all). prompt_ids/prompt_mask: (P, Lp), left-padded. Returns completion_ids (P*N, T), completion_lens (P*N,):
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
            cand = None
            if 0 < top_k < logits.shape[1]:  # top-k (paper: K = 40): renormalize over the K largest logits
                logits, cand = logits.topk(top_k, -1)  # (b, K) values, (b, K) token ids
            cdf = torch.softmax(logits / temperature, -1).cumsum(-1)  # (b, V or K)
            u = torch.rand(len(cdf), 1, generator=generator, device=device) * cdf[:, -1:]
            tok = torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[1] - 1)
            if cand is not None:
                tok = cand.gather(1, tok[:, None]).squeeze(1)
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
    """(B, T) mask of the solution tokens, EOS included. Built from lengths, never from `ids != pad_id`:
    with pad == EOS that would drop the EOS the model generated (and the model would never learn to stop)."""
    return (torch.arange(T, device=lens.device)[None, :] < lens[:, None]).float()


def tokenize_prompts(tokenizer, prompts, device):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def sample_solutions(model, tokenizer, prompts, num_samples, temperature, args, eos_ids, autocast, generator):
    """-> for every prompt, a list of num_samples (token ids incl. EOS, decoded text), in generation calls of
    about --gen-batch-size sequences."""
    per_call = max(1, args.gen_batch_size // num_samples)
    results = []
    for i in range(0, len(prompts), per_call):
        ids, mask = tokenize_prompts(tokenizer, prompts[i:i + per_call], model.device)
        with autocast():
            out, lens = generate(model, ids, mask, num_samples, args.max_new_tokens, temperature, eos_ids, generator,
                                 args.top_k)
        token_lists = [o[:n] for o, n in zip(out.tolist(), lens.tolist())]
        texts = tokenizer.batch_decode(token_lists, skip_special_tokens=True)
        pairs = list(zip(token_lists, texts))
        results += [pairs[j:j + num_samples] for j in range(0, len(pairs), num_samples)]
    return results


# ----------------------------------------------------------------------------------------------------------
# ReST-EM (algorithm logic): the E-step filter, the M-step loss, pass@k and maj@k
# ----------------------------------------------------------------------------------------------------------
def filter_and_cap(texts, rewards, cap, rng):
    """E-step selection for ONE problem: indices of the samples to keep. Only reward-1 samples; exact-duplicate
    strings count once (the first copy); then at most `cap` of them, chosen at random (the paper's per-problem
    cap balances easy and hard problems in D_i)."""
    first_copy = {}
    for i, (text, r) in enumerate(zip(texts, rewards)):
        if r == 1.0 and text not in first_copy:
            first_copy[text] = i
    correct = list(first_copy.values())
    return sorted(rng.sample(correct, cap)) if len(correct) > cap else correct


def solution_logprobs(model, prompt_ids, prompt_mask, completion_ids):
    """log p_theta(y_t | x, y_<t) (B, T) of every solution token, from the raw logits (SFT: no temperature).
    One forward over [left-padded prompt; solution]; logits only at the T positions that predict a solution
    token (the last prompt position and solution positions 0..T-2). Positions after a solution's EOS hold
    padding and are masked out by the loss; the causal mask keeps them from affecting earlier positions."""
    T = completion_ids.shape[1]
    ids = torch.cat([prompt_ids, completion_ids], 1)  # (B, Lp + T)
    attn = torch.cat([prompt_mask, prompt_mask.new_ones(completion_ids.shape)], 1)
    positions = (attn.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, logits_to_keep=T + 1).logits[:, :-1]
    logits = logits.float()  # (B, T, V)
    return logits.gather(-1, completion_ids[..., None]).squeeze(-1) - logits.logsumexp(-1)


def nll_loss(logprobs, mask, num_tokens):
    """M-step loss (Eq. 3 with r = 1 on every kept sample): -sum of solution-token log-probs / num_tokens, where
    num_tokens counts the solution tokens of the whole optimizer batch, so micro-batch losses sum to its token-mean."""
    return -(logprobs * mask).sum() / num_tokens


def m_step(model, base_state, kept, prompts, tokenizer, args, eos_ids, autocast, rng, progress=None):
    """theta <- theta_base, then SFT on the kept set D_i: AdamW (fresh at every M-step) on the token-mean NLL of
    the solution tokens of `--batch-size` kept samples per step, in micro-batches. kept: [(problem index, token
    ids incl. EOS)]. Returns (steps, per-step losses, per-step grad norms)."""
    device = model.device
    model.load_state_dict(base_state)  # ReST-EM: restart from the BASE model (paper §3: limits over-fitting, drift)
    steps = 0 if not kept else math.ceil(args.epochs * len(kept) / args.batch_size) if args.epochs is not None else args.steps
    # fused AdamW: one kernel for all parameters (~8x faster than the per-tensor loop on CPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / max(1, args.warmup_steps)))
    order, losses, grad_norms = [], [], []
    for step in range(steps):
        batch = []
        while len(batch) < min(args.batch_size, len(kept)):  # reshuffle the kept set at every epoch
            if not order:
                order = list(range(len(kept)))
                rng.shuffle(order)
            batch.append(kept[order.pop()])
        num_tokens = sum(len(ids) for _, ids in batch)  # the whole batch's normalizer
        optimizer.zero_grad(set_to_none=False)
        step_loss = 0.0
        for i in range(0, len(batch), args.micro_batch_size):
            micro = batch[i:i + args.micro_batch_size]
            prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [prompts[p] for p, _ in micro], device)  # (b, Lp)
            seq_lens = torch.tensor([len(ids) for _, ids in micro], device=device)
            T = int(seq_lens.max())  # each micro-batch trimmed to its own longest solution
            completion_ids = torch.tensor([ids + [eos_ids[0]] * (T - len(ids)) for _, ids in micro], device=device)
            mask = completion_mask_from_lens(seq_lens, T)  # (b, T), EOS included
            with autocast():
                logprobs = solution_logprobs(model, prompt_ids, prompt_mask, completion_ids)  # (b, T)
            loss = nll_loss(logprobs, mask, num_tokens)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at M-step step {step + 1}; stopping before the update "
                                 "(the model saved by the last completed iteration is untouched)")
            loss.backward()  # accumulates: the sum over micro-batches is the whole batch's token-mean NLL
            step_loss += loss.item()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm))
        if not math.isfinite(grad_norm):
            raise SystemExit(f"error: gradient norm is {grad_norm} at M-step step {step + 1}; stopping before the update")
        optimizer.step()
        scheduler.step()
        losses.append(step_loss)
        grad_norms.append(grad_norm)
        if progress:
            progress(step + 1, steps, step_loss)
    return steps, losses, grad_norms


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021) of one problem with c correct among n samples: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(texts, reference):
    """maj@k: the most frequent extracted answer among `texts` (equal answers grouped with common.grade on the
    answer boxed, so 0.5 and 1/2 vote together; tie: the answer seen first), scored against the reference.
    Samples without an extractable answer do not vote; no votes at all scores 0."""
    groups = []  # [answer, votes, a completion that gave it]
    for text in texts:
        answer = common.extract_answer(text)
        if answer is None:
            continue
        group = next((g for g in groups if common.grade(f"\\boxed{{{answer}}}", g[0])), None)
        if group:
            group[1] += 1
        else:
            groups.append([answer, 1, text])
    if not groups:
        return False
    best = max(groups, key=lambda g: g[1])  # max keeps the first of equal counts
    return common.grade(best[2], reference)


# ----------------------------------------------------------------------------------------------------------
# Rewards, evaluation (plumbing)
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
    """Call the reward function; if it raises, show the failing sample. ReST-EM needs a binary reward."""
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
    if len(rewards) != len(completions) or any(r not in (0.0, 1.0) for r in rewards):
        raise SystemExit(f"error: ReST-EM needs a binary reward: the reward function must return {len(completions)} "
                         f"values that are each 0 or 1, got {rewards[:8]}...")
    return rewards


def evaluate(model, tokenizer, test_prompts, test, train_prompts, train_recs, args, eos_ids, autocast, generator):
    """Held-out greedy accuracy, sampled accuracy (pass@1 over n samples at T), pass@k, maj@k; greedy accuracy
    on training problems (beside the test one, so over-fitting shows)."""
    greedy = lambda prompts: [s[0][1] for s in sample_solutions(model, tokenizer, prompts, 1, 0.0, args, eos_ids,
                                                                 autocast, generator)]
    test_greedy = greedy(test_prompts)
    train_greedy = greedy(train_prompts)
    sampled = sample_solutions(model, tokenizer, test_prompts, args.eval_samples, args.temperature, args, eos_ids,
                               autocast, generator)
    n, k = args.eval_samples, args.pass_k
    correct = [[common.grade(text, rec["answer"]) for _, text in s] for s, rec in zip(sampled, test)]
    mean = lambda xs: sum(xs) / len(xs)
    res = {"eval/accuracy": mean([common.grade(t, r["answer"]) for t, r in zip(test_greedy, test)]),
           "eval/sampled_accuracy": mean([sum(c) / n for c in correct]),
           "eval/pass@k": mean([pass_at_k(n, sum(c), k) for c in correct]),
           "eval/maj@k": mean([majority_vote([t for _, t in s[:k]], r["answer"]) for s, r in zip(sampled, test)]),
           "eval/k": k,
           "eval/train_accuracy": mean([common.grade(t, r["answer"]) for t, r in zip(train_greedy, train_recs)])}
    res["samples"] = [{"question": r["question"], "answer": r["answer"], "greedy": g, "sampled": [t for _, t in s[:2]]}
                      for r, g, s in list(zip(test, test_greedy, sampled))[:4]]
    return res


def write_json_atomic(path, obj):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = common.resolve_device(args.device)
    weight_dtype, autocast_dtype = common.resolve_dtype(args.dtype, device)
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    run_dir = Path(args.output_dir or f"runs/rest_em__{args.seed}__{int(time.time())}")
    start = 0  # iterations already completed
    if args.resume:
        state_file = run_dir / "state.json"
        if not state_file.is_file() or not (run_dir / "model" / "config.json").is_file():
            raise SystemExit(f"error: --resume {run_dir}: no completed iteration to resume from (no state.json/model; "
                             "was it run with --no-save, or stopped during its first iteration?)")
        start = json.loads(state_file.read_text())["completed_iterations"]
        # drop records of the iteration that was interrupted: it is run again from its start
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
        (run_dir / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= start))
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "samples.jsonl").write_text("")  # a few eval completions, appended at every eval
    (run_dir / "args.json").write_text(json.dumps({**vars(args), "resume": None}, indent=2))

    # data and prompts: the E-step problem set is fixed for the whole run (the paper samples its whole train set)
    train, test = common.train_eval_records(args.dataset, args.eval_dataset, args.question_key, args.answer_key,
                                            seed=args.seed, eval_size=args.eval_size)
    tokenizer = common.load_tokenizer(args.model)
    fewshot_k = common.default_fewshot(args.dataset) if args.fewshot is None else args.fewshot
    fewshot, train = train[:fewshot_k], train[fewshot_k:]  # the examples are not also training problems
    if not train:
        raise SystemExit(f"error: dataset {args.dataset} has no training problems left after {fewshot_k} few-shot examples")
    random.Random(args.seed).shuffle(train)
    problems = train[:args.prompts_per_step]
    prompt_of = lambda rec: common.build_prompt(tokenizer, rec["question"], fewshot, args.system_prompt)
    prompts, test_prompts = [prompt_of(r) for r in problems], [prompt_of(r) for r in test]
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else math_reward

    # models: the base weights stay in a CPU copy; every M-step starts from them
    model = common.load_model(args.model, device, weight_dtype)
    model.eval()  # no dropout
    base_state = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
    if start:  # the policy for the next E-step is the last completed iterate
        model.load_state_dict(common.load_model(str(run_dir / "model"), torch.device("cpu"), weight_dtype).state_dict())
    gen_eos = model.generation_config.eos_token_id  # an int, a list, or None
    eos_ids = sorted({tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})

    metrics_file = open(run_dir / "metrics.jsonl", "a")
    def log(record):
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    def run_eval(iteration):
        t0 = time.perf_counter()
        eval_generator = torch.Generator(device).manual_seed(args.seed + 1)  # the same draws at every eval
        res = evaluate(model, tokenizer, test_prompts, test, prompts[:args.eval_size], problems[:args.eval_size],
                       args, eos_ids, autocast, eval_generator)
        log({"step": iteration, **{k: v for k, v in res.items() if k != "samples"}, "eval/time": round(time.perf_counter() - t0, 2)})
        with open(run_dir / "samples.jsonl", "a") as f:
            f.write(json.dumps({"step": iteration, "samples": res["samples"]}) + "\n")
        k = args.pass_k
        tqdm.write(f"eval iter {iteration}: test greedy {res['eval/accuracy']:.1%} | pass@{k} {res['eval/pass@k']:.1%} | "
                   f"maj@{k} {res['eval/maj@k']:.1%} | sampled (T={args.temperature}) {res['eval/sampled_accuracy']:.1%} | "
                   f"train greedy {res['eval/train_accuracy']:.1%}  ({len(test)} test problems, {time.perf_counter() - t0:.0f}s)")

    print(f"rest_em: {len(problems)} train problems x {args.num_generations} samples per E-step, {len(test)} eval problems, "
          f"{fewshot_k}-shot, model {args.model} on {device} (weights {weight_dtype}, autocast {autocast_dtype}), output {run_dir}"
          + (f"; resuming after iteration {start}" if start else ""))
    if start >= args.iterations:
        print(f"nothing to do: {start} iterations already completed (pass a larger --iterations to continue)")
    if start == 0:
        run_eval(0)
    bar = tqdm(range(start + 1, args.iterations + 1), desc="rest_em", dynamic_ncols=True)
    for it in bar:
        t_iter = time.perf_counter()
        generator = torch.Generator(device).manual_seed(args.seed * 1000 + it)  # per-iteration: resume reproduces
        rng = random.Random(f"{args.seed}:{it}")
        # ---- E-step: sample N solutions per problem from the current policy, grade, filter, cap ----------------
        samples = sample_solutions(model, tokenizer, prompts, args.num_generations, args.temperature, args, eos_ids,
                                   autocast, generator)
        N = args.num_generations
        rep = lambda xs: [x for x in xs for _ in range(N)]
        rewards = compute_rewards(reward_fn, rep(prompts), [t for s in samples for _, t in s], rep(problems))
        kept, rows = [], []
        for p, s in enumerate(samples):
            r = rewards[p * N:(p + 1) * N]
            keep = set(filter_and_cap([t for _, t in s], r, args.max_per_problem, rng))
            kept += [(p, s[i][0]) for i in sorted(keep)]
            rows += [{"iteration": it, "problem": p, "question": problems[p]["question"], "answer": problems[p]["answer"],
                      "sample": t, "reward": r[i], "kept": i in keep} for i, (_, t) in enumerate(s)]
        with open(run_dir / f"estep_iter{it}.jsonl", "w") as f:  # the E-step dataset, for inspection
            f.writelines(json.dumps(row) + "\n" for row in rows)
        lens = [len(ids) for s in samples for ids, _ in s]
        truncated = sum(ids[-1] not in eos_ids for s in samples for ids, _ in s) / len(lens)  # hit --max-new-tokens
        solved = sum(any(rewards[p * N:(p + 1) * N]) for p in range(len(problems))) / len(problems)
        gen_time = time.perf_counter() - t_iter

        # ---- M-step: fine-tune the BASE model (not the last iterate) on D_i; NLL on solution tokens only -------
        t_train = time.perf_counter()
        if not kept:
            tqdm.write(f"warning: iteration {it}: no correct sample to keep; the next policy is the base model")
        steps, losses, grad_norms = m_step(model, base_state, kept, prompts, tokenizer, args, eos_ids, autocast, rng,
                                           progress=lambda k, n, l: bar.set_postfix(m_step=f"{k}/{n}", nll=f"{l:.3f}"))
        train_time = time.perf_counter() - t_train
        iter_time = time.perf_counter() - t_iter

        # ---- log, evaluate, save the iterate and the resume state ----------------------------------------------
        record = {"step": it, "reward": sum(rewards) / len(rewards), "solved": solved, "kept": len(kept),
                  "kept_per_problem": len(kept) / len(problems), "truncated": truncated,
                  "completion_len": sum(lens) / len(lens), "m_steps": steps,
                  "epochs": steps * args.batch_size / len(kept) if kept else 0.0,
                  "loss_first": losses[0] if losses else None, "loss": losses[-1] if losses else None,
                  "grad_norm": grad_norms[-1] if grad_norms else None, "lr": args.lr,
                  "gen_time": round(gen_time, 3), "train_time": round(train_time, 3), "step_time": round(iter_time, 3),
                  "tokens_per_s": round(sum(lens) / gen_time, 1)}
        log(record)
        fmt = lambda v, f: "-" if v is None else format(v, f)
        tqdm.write(f"iter {it:2d} | E-step: train acc (T={args.temperature}) {record['reward']:.3f} | solved {solved:.2f} "
                   f"| kept {len(kept)} ({record['kept_per_problem']:.2f}/problem) | len {record['completion_len']:.1f} "
                   f"trunc {truncated:.2f} | M-step: {steps} steps ({record['epochs']:.1f} ep) nll {fmt(record['loss_first'], '.3f')}"
                   f" -> {fmt(record['loss'], '.3f')} gnorm {fmt(record['grad_norm'], '.2f')} | gen {gen_time:.0f}s train {train_time:.0f}s")
        if (args.eval_every and it % args.eval_every == 0) or it == args.iterations:
            run_eval(it)
        if not args.no_save:  # the iterate is the model of the run and the resume point
            common.save_pretrained_atomic(model, tokenizer, run_dir / "model")
            write_json_atomic(run_dir / "state.json", {"completed_iterations": it})
    bar.close()
    metrics_file.close()

    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval/accuracy" in r]
    kept_of = {r["step"]: r["kept"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "kept" in r}
    k = args.pass_k
    print(f"\n{'iter':>4} {'kept':>6} {'train greedy':>13} {'test greedy':>12} {'sampled':>8} {f'pass@{k}':>8} {f'maj@{k}':>8}")
    for r in evals:
        print(f"{r['step']:>4} {kept_of.get(r['step'], '-'):>6} {r['eval/train_accuracy']:>13.1%} {r['eval/accuracy']:>12.1%} "
              f"{r['eval/sampled_accuracy']:>8.1%} {r['eval/pass@k']:>8.1%} {r['eval/maj@k']:>8.1%}")
    print(f"({len(test)} held-out problems; train greedy on {min(args.eval_size, len(problems))} of the E-step problems; "
          f"sampled/pass@{k}/maj@{k} from {args.eval_samples} samples at T={args.temperature}, top-k {args.top_k})")
    print(f"metrics: {run_dir / 'metrics.jsonl'}" + ("" if args.no_save else f"   model: {run_dir / 'model'}"))
    return evals


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the last completed iteration is saved; continue with --resume RUN_DIR")
