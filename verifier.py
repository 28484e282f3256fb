"""Verifiers: outcome and process reward models (ORM, PRM), best-of-N and weighted majority voting, one file.

Lightman et al. 2023, "Let's Verify Step by Step" (https://arxiv.org/abs/2305.20050), §2; Cobbe et al. 2021
(https://arxiv.org/abs/2110.14168), §4 (ORM); Math-Shepherd (https://arxiv.org/abs/2312.08935). No numbered equations.
    1. N graded solutions per training problem from the generator: outcome y in {0, 1}; steps = non-empty lines,
       labels l_s exact (equations checked: the built-in 'chain' task) or mc (Math-Shepherd: 1 if any of k
       completions from the prefix up to s reaches the reference); the first wrong step ends the labels (PRM800K)
    2. ORM: p = sigmoid(w . h_last + b), L = BCE(p, y);  PRM: p_s = sigmoid(w . h_end(s) + b), L = mean over the
       labelled steps of BCE(p_s, l_s), h_end(s) = the trunk's state at the newline closing step s
    3. held-out: N_max solutions per problem sampled once; for N = 1, 2, 4, ..., N_max (random subsets): pass@N,
       majority, ORM / PRM (min_s p_s, prod_s p_s) best-of-N, ORM- / PRM-weighted majority; the verifiers' AUC

    python verifier.py                              # embedded SmolLM2-135M-Instruct, built-in 'chain' task, CPU
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 verifier.py [--fsdp]   # data parallel (more: docs/verifier.md)
"""
import argparse
import contextlib
import hashlib
import json
import math
import random
import re
import time
from itertools import accumulate

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import common

ALGO = "verifier"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="generator: hub id, local dir, .gguf file, 'smollm2'")
    p.add_argument("--verifier-model", default=None, help="trunk of the ORM and the PRM (default: --model)")
    p.add_argument("--dataset", default="chain", help="'chain[:OPERANDS[:DIGITS[:SIGNS]]]', 'arith...', file, hub id")
    p.add_argument("--eval-dataset", default=None, help="held-out problems (default: test split, else every 10th row)")
    p.add_argument("--question-key", default=None, help="question column (default: auto-detected)")
    p.add_argument("--answer-key", default=None, help="answer column (default: auto-detected)")
    p.add_argument("--fewshot", type=int, default=None, help="solved examples as earlier chat turns (chain/arith: 1)")
    p.add_argument("--system-prompt", default=None, help="system message (default: the chat template's own)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "pure-bfloat16"],
                   help="auto/bfloat16: fp32 master weights + bf16 autocast; pure-bfloat16: bf16 weights (warns)")
    common.add_scale_args(p, fsdp=True)  # --fsdp, --gradient-checkpointing, --lora-rank/-alpha/..., --merge-lora
    p.add_argument("--n-train", type=int, default=64, help="training problems (each sampled --num-generations times)")
    p.add_argument("--num-generations", type=int, default=8, help="solutions sampled per training problem")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion length cap")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (training data and eval)")
    p.add_argument("--step-labels", default="exact", choices=["exact", "mc"], help="exact ('chain' only) or mc")
    p.add_argument("--mc-completions", type=int, default=4, help="k: completions per step prefix (--step-labels mc)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training solutions per verifier")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per verifier (default: epochs x N / batch)")
    p.add_argument("--batch-size", type=int, default=16, help="solutions per optimizer step")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (cosine decay after warm-up)")
    p.add_argument("--warmup-steps", type=int, default=8, help="linear LR warm-up, in optimizer updates")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--eval-n", type=int, default=16, help="N_max: solutions sampled per held-out problem")
    p.add_argument("--eval-subsets", type=int, default=64, help="random ordered subsets of N per problem and N")
    p.add_argument("--eval-every", type=int, default=0, help="held-out verifier AUC every N steps (0: at the end)")
    p.add_argument("--eval-size", type=int, default=50, help="held-out problems")
    p.add_argument("--eval-batch-size", type=int, default=8, help="prompts per generation call; 4x: texts per forward")
    p.add_argument("--output-dir", default=None, help="default: runs/<algo>__<seed>__<time>")
    p.add_argument("--no-save", action="store_true", help="do not write the trained verifiers")
    args = p.parse_args(argv)
    common.check_args(p, args, at_least_one=("n_train", "num_generations", "max_new_tokens", "mc_completions", "epochs",
                                             "steps", "batch_size", "eval_n", "eval_subsets", "eval_size",
                                             "eval_batch_size"), positive=("lr", "temperature", "max_grad_norm"),
                      non_negative=("warmup_steps", "weight_decay", "eval_every", "fewshot"), split=("batch_size",))
    args.verifier_model = args.verifier_model or args.model
    chain = re.fullmatch(r"chain(:[2-9](:[1-6](:[-+]+)?)?)?", args.dataset)  # default: 3 one-digit operands, +
    if args.dataset.startswith("chain") and not chain:
        p.error(f"--dataset {args.dataset}: expected chain[:OPERANDS[:DIGITS[:SIGNS]]] (2-9, 1-6, + and/or -)")
    parts = args.dataset.split(":")[1:] + ["3", "1", "+"][len(args.dataset.split(":")) - 1:]
    args.chain = [int(parts[0]), int(parts[1]), parts[2]] if chain else None
    if args.step_labels == "exact" and not args.chain:
        p.error(f"--step-labels exact needs the built-in 'chain' task; use --step-labels mc with {args.dataset}")
    return args


# ==== Plumbing shared by every script, copied byte for byte (tests/test_consistency.py checks): sampling, logging
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


# ==== Verifiers (algorithm logic) and their evaluation =====================================================
def make_chain(split, n, seed=0, operands=3, digits=1, signs="+"):
    """The built-in task: 'What is 7 + 5 - 8? ...' (signs '+-'), solved as '7 + 5 = 12\\n12 - 8 = 4\\nThe answer is
    \\boxed{4}.' A fixed hash puts each problem in one split (1 in 10 in test); `seed` picks and orders them."""
    rng, records, seen, lo = random.Random(f"chain:{seed}:{split}"), [], set(), 10 ** (digits - 1)
    while len(records) < n and len(seen) < 100 * n:
        nums, ops = [rng.randint(lo, 10 * lo - 1) for _ in range(operands)], rng.choices(signs, k=operands - 1)
        expr = " ".join([str(nums[0])] + [f"{o} {x}" for o, x in zip(ops, nums[1:])])
        if expr not in seen and (hashlib.md5(expr.encode()).digest()[0] % 10 == 0) == (split == "test"):
            values = list(accumulate([nums[0]] + [x if o == "+" else -x for o, x in zip(ops, nums[1:])]))
            lines = [f"{v} {o} {x} = {w}" for v, o, x, w in zip(values, ops, nums[1:], values[1:])]
            records.append({"question": f"What is {expr}? Compute it one step at a time.", "answer": str(values[-1]),
                            "solution": "\n".join(lines) + f"\nThe answer is \\boxed{{{values[-1]}}}."})
        seen.add(expr)
    return records


def split_steps(completion):
    """A solution's steps: its non-empty lines, stripped (Lightman: steps are lines). No line: one empty step."""
    return [line.strip() for line in completion.split("\n") if line.strip()] or [""]


def exact_step_labels(steps, question, reference):
    """1/0 per step of a 'chain' solution, up to the first 0 (PRM800K). A step is wrong if an equation 'a + b - c = d'
    in it is false or uses a signed term (+a, -b) that is neither the question's nor an earlier result, or if its
    final answer is wrong; no final answer at all: the last step is wrong (unfinished); other lines are right."""
    expr = question.split("What is", 1)[-1].split("?")[0].replace("+", "")
    available, labels = {int(sign + num) for sign, num in re.findall(r"(-?)\s*(\d+)", expr)}, []
    for step in steps:
        ok = True  # equations '7 + 5 = 12', '-1 + 5 - 2 = 2' (not '= 2.5')
        for lhs, rhs in re.findall(r"(-?\d+(?:\s*[-+]\s*\d+)+)\s*=\s*(-?\d+)(?![\d.]*\d)", step):
            terms = [int(sign.replace("+", "") + num) for sign, num in re.findall(r"([-+]?)\s*(\d+)", lhs)]
            ok &= sum(terms) == int(rhs) and all(t in available for t in terms)
            available.add(int(rhs))
        labels.append(int(ok and (common.extract_answer(step) is None or common.grade(step, reference))))
        if not labels[-1]:
            return labels
    labels[-1] = labels[-1] if any(common.extract_answer(step) is not None for step in steps) else 0
    return labels


def mc_step_labels(prompts, steps_list, references, complete, k):
    """Math-Shepherd's hard estimate, up to the first 0: step s < last is 1 if any of k completions from [prompt;
    steps 1..s] reaches the reference; the last is the outcome. complete(texts, k) -> k per text (row j: text j//k)."""
    queries = [(i, s) for i, steps in enumerate(steps_list) for s in range(len(steps) - 1)]
    prefixes = ["\n".join(steps_list[i][:s + 1]) + "\n" for i, s in queries]
    outs = complete([prompts[i] + text for (i, _), text in zip(queries, prefixes)], k) if queries else []
    labels = [[0] * (len(st) - 1) + [int(common.grade("\n".join(st), ref))] for st, ref in zip(steps_list, references)]
    for j, ((i, s), prefix) in enumerate(zip(queries, prefixes)):
        labels[i][s] = int(any(common.grade(prefix + out, references[i]) for out in outs[j * k:(j + 1) * k]))
    return [ls[:ls.index(0) + 1] if 0 in ls else ls for ls in labels]


class ScalarHeadVerifier(torch.nn.Module):  # an LM trunk (no LM head) + a linear head: one logit per position
    def __init__(self, lm):
        super().__init__()
        self.trunk = lm.get_decoder()  # the head: on the trunk's device, in fp32 whatever the trunk's dtype, p = 0.5
        self.head = torch.nn.Linear(lm.config.get_text_config().hidden_size, 1, device=lm.device, dtype=torch.float32)
        torch.nn.init.zeros_(self.head.weight), torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, rows, cols):  # (B, L) -> logits (n,) fp32 at (rows[i], cols[i])
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0)).last_hidden_state  # (B, L, H)
        with torch.autocast(hidden.device.type, enabled=False):  # the head runs in fp32, also under autocast
            return self.head(hidden[rows, cols].float()).squeeze(-1)


def verifier_batch(tokenizer, questions, steps_list, device):
    """Texts 'question\\n\\nstep 1\\nstep 2\\n' -> ids, mask (B, L), per row the token index of each step's newline."""
    texts = [q.strip() + "\n\n" + "".join(s + "\n" for s in steps) for q, steps in zip(questions, steps_list)]
    chars = [[len(t) - 1 - sum(len(s) + 1 for s in steps[i + 1:]) for i in range(len(steps))]
             for t, steps in zip(texts, steps_list)]  # the character index of each closing newline
    enc = tokenizer(texts, return_tensors="pt", padding=True, return_offsets_mapping=True)
    starts = torch.where(enc.attention_mask.bool(), enc.offset_mapping[..., 0], -1)  # (B, L); pads never match
    ends = [[int((starts[b] <= c).nonzero().max()) for c in row] for b, row in enumerate(chars)]  # the token with c
    return enc.input_ids.to(device), enc.attention_mask.to(device), ends


def bce_loss(logits, labels):
    """ORM: mean over the solutions of BCE(sigmoid(logit), y); PRM: mean over the labelled steps. (n,) each."""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())


def gather_lists(*lists):
    """Each list (or None) concatenated over the ranks in rank order: common.shard's shares -> the one-process list."""
    parts = [lists] + [None] * (common.world_size() - 1)
    common.world_size() > 1 and torch.distributed.all_gather_object(parts, lists)  # every rank gets every rank's
    return [None if values is None else [v for part in parts for v in part[i]] for i, values in enumerate(lists)]


def weighted_majority(answers, weights=None):
    """The answer of largest total weight (default 1 each: majority vote; ties: the first seen; None does not vote)."""
    totals = {}  # insertion-ordered: max() keeps the first of equal totals
    for answer, w in [(a, w) for a, w in zip(answers, weights or [1.0] * len(answers)) if a is not None]:
        totals[answer] = totals.get(answer, 0.0) + w
    return max(totals, key=totals.__getitem__) if totals else None


def auc(scores, labels):
    """ROC AUC = Mann-Whitney U / (n_pos n_neg): P(a positive scores above a negative), ties 1/2; None: one class."""
    s, y = torch.tensor(scores, dtype=torch.float64), torch.tensor(labels, dtype=torch.bool)
    pos, neg = s[y][:, None], s[~y][None, :]
    return float((pos > neg).double().mean() + 0.5 * (pos == neg).double().mean()) if y.any() and not y.all() else None


def rerank_accuracies(answers, correct, scores, ns, subsets, rng):
    """answers, correct: (P, N_max) lists (answer or None; bool); scores: {orm, prm_min, prm_prod: (P, N_max)} ->
    {N: {method: accuracy}}: the mean over `subsets` random subsets of size N in random order (order breaks ties);
    a solution without a final answer is no candidate of best-of-N (it cannot be right; nor does it vote)."""
    table = {}
    for n in ns:
        hits = dict.fromkeys(METHODS, 0)
        for p, (ans, ok) in enumerate(zip(answers, correct)):
            right = {a: c for a, c in zip(ans, ok) if a is not None}  # the grade depends on the answer only
            for idx in [rng.sample(range(len(ans)), n) for _ in range(subsets)]:
                sub, sc = [ans[i] for i in idx], {k: [v[p][i] for i in idx] for k, v in scores.items()}
                candidates = [j for j in range(n) if sub[j] is not None] or [0]  # none with an answer: a wrong pick
                hits["pass"] += any(ok[i] for i in idx)
                for k in scores:  # best-of-N; ties: the first
                    hits[f"{k}_best_of_n"] += ok[idx[max(candidates, key=sc[k].__getitem__)]]
                for key, w in (("majority", None), ("orm_weighted", sc["orm"]), ("prm_prod_weighted", sc["prm_prod"])):
                    hits[key] += right.get(weighted_majority(sub, w), False)  # (weighted) majority vote
        table[n] = {k: v / (len(answers) * subsets) for k, v in hits.items()}
    return table


def train_verifier(kind, model, tokenizer, data, heldout, args, autocast, run_dir, metrics_file):
    """Fine-tune the ORM (outcomes, last token) or PRM (steps, their newlines): BCE, AdamW; both: the same batches."""
    device, n = next(model.parameters()).device, len(data["steps"])
    nsteps = args.steps or math.ceil(args.epochs * n / args.batch_size)
    optimizer = torch.optim.AdamW(common.param_groups(model), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    schedule = lambda u: min(1.0, (u + 1) / max(1, args.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * u / nsteps))
    scheduler, data_rng, order = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), random.Random(args.seed), []
    for step in tqdm(range(1, nsteps + 1), desc=kind, dynamic_ncols=True, disable=common.rank() > 0):
        # ---- 1. a batch of solutions (torchrun: this rank's B / N); the positions the head reads, their labels -----
        t_step, batch = time.perf_counter(), common.shard(common.next_batch(range(n), order, data_rng, args.batch_size))
        ids, mask, ends = verifier_batch(tokenizer, [data["questions"][i] for i in batch],
                                         [data["steps"][i] for i in batch], device)
        picks = [(b, e[-1], data["correct"][i]) for b, (i, e) in enumerate(zip(batch, ends))] if kind == "orm" else \
            [(b, e[s], y) for b, (i, e) in enumerate(zip(batch, ends)) for s, y in enumerate(data["step_labels"][i])]
        rows, cols, labels = (torch.tensor(x, device=device) for x in zip(*picks))
        common.gather_blocks(model, False)  # ---- 2. the loss, the update (--fsdp: sharded blocks); 3. log, evaluate
        with autocast():
            logits = model(ids, mask, rows, cols)  # (n_labels,) fp32
        n_labels = int(common.all_sum(len(labels)))  # the whole batch's (every rank's) solutions or labelled steps
        loss = bce_loss(logits, labels) * (len(labels) / n_labels)  # the batch mean: this rank's sum / n_labels
        stop_if_not_finite(loss_value := common.all_sum(loss.item()), f"the {kind} loss", step, run_dir)  # all or none
        optimizer.zero_grad(set_to_none=True), loss.backward()
        common.all_reduce_gradients(model)  # torchrun: trunk and head, summed over ranks = the whole batch's gradient
        grad_norm = common.clip_grad_norm(model, args.max_grad_norm)  # (--fsdp: of the whole gradient, every shard)
        stop_if_not_finite(grad_norm, f"the {kind} gradient norm", step, run_dir)
        optimizer.step(), scheduler.step()
        acc, pos = (float(common.all_sum(x.float().sum()) / n_labels) for x in ((logits > 0) == labels.bool(), labels))
        log_step(metrics_file, {"phase": kind, "step": step, "loss": loss_value, "grad_norm": grad_norm, "lr":
                                scheduler.get_last_lr()[0], "train/labels": n_labels, "train/accuracy": acc,
                                "train/positive": pos, "step_time": round(time.perf_counter() - t_step, 3)},
                 [("loss", "loss", ".4f"), ("train/accuracy", "acc", ".2f"), ("step_time", "s", ".1f")])
        if args.eval_every and step % args.eval_every == 0 and step != nsteps:
            verifier_metrics(kind, model, tokenizer, heldout, args, autocast, step, metrics_file)
    return verifier_metrics(kind, model, tokenizer, heldout, args, autocast, nsteps, metrics_file)


@torch.no_grad()
def verifier_metrics(kind, model, tokenizer, heldout, args, autocast, step, metrics_file):
    """-> P(correct) at each step of each held-out solution (ORM score: the last); logged: AUC and accuracy (p > 0.5)
    of the ORM's or the PRM's product score vs the outcomes and, with step labels, of the PRM's step probabilities."""
    t0, probs, bs, device = time.perf_counter(), [], 4 * args.eval_batch_size, next(model.parameters()).device
    common.gather_blocks(model, True)  # --fsdp: whole blocks (the ranks may run different numbers of forwards)
    for i in common.shard(range(0, len(heldout["steps"]), bs)):  # torchrun: this rank's forwards (the same batches)
        ids, mask, ends = verifier_batch(tokenizer, heldout["questions"][i:i + bs], heldout["steps"][i:i + bs], device)
        rows, cols = (torch.tensor(x, device=device) for x in zip(*[(b, j) for b, e in enumerate(ends) for j in e]))
        with autocast():
            flat = torch.sigmoid(model(ids, mask, rows, cols)).tolist()
        probs += [[flat.pop(0) for _ in e] for e in ends]
    probs = gather_lists(probs)[0]  # every rank: every held-out solution's, in order
    score, y = [p[-1] if kind == "orm" else math.prod(p) for p in probs], heldout["correct"]
    record = {"phase": kind, "step": step, f"eval/{kind}_auc": auc(score, y),
              f"eval/{kind}_accuracy": sum((s > 0.5) == c for s, c in zip(score, y)) / len(y)}
    if kind == "prm" and heldout["step_labels"] is not None:
        pairs = [(q, label) for p, ls in zip(probs, heldout["step_labels"]) for q, label in zip(p, ls)]
        record.update({"eval/prm_step_auc": auc(*zip(*pairs)),
                       "eval/prm_step_accuracy": sum((q > 0.5) == label for q, label in pairs) / len(pairs)})
    log_step(metrics_file, {**record, "eval/time": round(time.perf_counter() - t0, 2)},
             [(k, k[5:], ".3f") for k in record if k.startswith("eval/")])
    return probs


METHODS = {"pass": "pass@N (oracle)", "majority": "majority vote", "orm_best_of_n": "ORM best-of-N",
           "prm_min_best_of_n": "PRM best-of-N (min)", "prm_prod_best_of_n": "PRM best-of-N (prod)",
           "orm_weighted": "ORM-weighted majority", "prm_prod_weighted": "PRM-weighted majority (prod)"}


def evaluate(heldout, probs, args, run_dir, metrics_file):
    """Reranking the held-out solutions: accuracy vs N, printed, logged, to best_of_n.{md,json} and best_of_n.png."""
    rows = lambda values: [values[i:i + args.eval_n] for i in range(0, len(values), args.eval_n)]  # -> (P, N_max)
    scores = {"orm": rows([p[-1] for p in probs["orm"]]), "prm_min": rows([min(p) for p in probs["prm"]]),
              "prm_prod": rows([math.prod(p) for p in probs["prm"]])}
    ns = [2 ** i for i in range(args.eval_n.bit_length()) if 2 ** i < args.eval_n] + [args.eval_n]
    table = rerank_accuracies(rows(heldout["answers"]), rows(heldout["correct"]), scores, ns, args.eval_subsets,
                              random.Random(args.seed))
    for n in ns:
        log_step(metrics_file, {"phase": "eval", "step": 0, "n": n, **{f"eval/{k}": v for k, v in table[n].items()}})
    lines = [f"| held-out accuracy, % ({len(scores['orm'])} problems) | " + " | ".join(f"N = {n}" for n in ns) + " |",
             "|---|" + "---|" * len(ns)] + [f"| {label} | " + " | ".join(f"{100 * table[n][k]:.1f}" for n in ns) + " |"
                                            for k, label in METHODS.items()]
    print("\n".join(lines)), (run_dir / "best_of_n.md").write_text("\n".join(lines) + "\n")
    (run_dir / "best_of_n.json").write_text(json.dumps({"n": ns, "accuracy": table}, indent=2))
    with contextlib.suppress(ImportError):  # the plot is optional
        import matplotlib.pyplot as plt
        [plt.plot(ns, [100 * table[n][k] for n in ns], marker="o", label=label) for k, label in METHODS.items()]
        plt.xscale("log"), plt.xticks(ns, ns), plt.xlabel("N (solutions per problem)"), plt.ylabel("accuracy (%)")
        plt.legend(fontsize=7), plt.savefig(run_dir / "best_of_n.png", dpi=120), plt.close()
    return table


def main(argv=None):
    args, t_start = parse_args(argv), time.perf_counter()  # ---- setup: arguments, precision, data, the generator -
    device = common.resolve_device(args.device, distributed=True)  # torchrun: one process per device
    weight_dtype, autocast_dtype = common.resolve_dtype(args.dtype, device)
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    run_dir, tokenizer = common.make_run_dir(args, ALGO), common.load_tokenizer(args.model)
    k = 1 if args.fewshot is None else args.fewshot  # chain: the few-shot examples come off the training problems
    chain = lambda split, n, seed: make_chain(split, n, seed, *args.chain)  # the test set: fixed, whatever --seed
    train, test, fewshot = (chain("train", args.n_train + k, args.seed)[k:], chain("test", args.eval_size, 1234),
                            chain("train", k, args.seed)) if args.chain else common.load_problems(args)
    prompt_of = lambda rec: common.build_prompt(tokenizer, rec["question"], fewshot, args.system_prompt)
    model = common.load_model(args.model, device, weight_dtype).eval()
    eos_ids, generator = common.stop_token_ids(tokenizer, model), common.rank_generator(device, args.seed)

    def complete(texts, n):  # n completions per text at --temperature, --eval-batch-size texts per generate() call
        out = []
        for i in range(0, len(texts), args.eval_batch_size):
            ids, mask = common.tokenize_prompts(tokenizer, texts[i:i + args.eval_batch_size], device)
            common.check_context_length(model, ids.shape[1], args.max_new_tokens)
            with autocast():
                ids, lens = generate(model, ids, mask, n, args.max_new_tokens, args.temperature, eos_ids, generator)
            out += common.decode(tokenizer, ids, lens)
        return out
    metrics_file, data = common.open_log(run_dir / "metrics.jsonl"), {}
    print(f"{ALGO}: generator {args.model}, verifiers {args.verifier_model}, {device}, output {run_dir}")
    # ---- 1. sample and grade the training solutions, and the held-out solutions (sampled once) ---------------------
    for split, records, n in (("train", train[:args.n_train], args.num_generations), ("eval", test, args.eval_n)):
        records = common.shard(records)  # torchrun: each rank samples (its own generator) and labels its share
        t0, recs, prompts = time.perf_counter(), [r for r in records for _ in range(n)], list(map(prompt_of, records))
        texts = complete(prompts, n)
        correct = [common.grade(t, r["answer"]) for t, r in zip(texts, recs)]
        steps, gen_time, exact = [split_steps(t) for t in texts], time.perf_counter() - t0, args.step_labels == "exact"
        labels = [exact_step_labels(s, r["question"], r["answer"]) for s, r in zip(steps, recs)] if exact else \
            mc_step_labels([p for p in prompts for _ in range(n)], steps, [r["answer"] for r in recs], complete,
                           args.mc_completions) if split == "train" else None  # MC: k per step, train only
        answers = [(a or "").replace(" ", "") or None for a in map(common.extract_answer, texts)]
        recs, steps, correct, labels, answers = gather_lists(recs, steps, correct, labels, answers)  # every rank: all
        data[split] = {"questions": [r["question"] for r in recs], "steps": steps, "correct": correct,
                       "step_labels": labels, "answers": answers}
        log_step(metrics_file, {"phase": "data", "step": 0, "split": split, "correct": sum(correct) / len(correct),
                                "data/no_answer": answers.count(None) / len(correct), "gen_time": round(gen_time, 1),
                                "data/step_correct": sum(map(sum, labels)) / sum(map(len, labels)) if labels else None},
                 [(k, k.split("/")[-1], ".3f") for k in ("correct", "data/no_answer", "data/step_correct", "gen_time")])
    del model, complete  # ---- 2. the ORM and the PRM: the same start, the same solutions in the same order -------
    probs, tokenizer = {}, common.load_tokenizer(args.verifier_model)  # the verifiers' (the generator is done)
    for kind in ("orm", "prm"):  # eval mode: no dropout. LoRA: on the trunk (the same start for both), the head full
        torch.manual_seed(args.seed)
        verifier = ScalarHeadVerifier(common.load_model(args.verifier_model, device, weight_dtype,
                                                        args.gradient_checkpointing)).eval()
        verifier.trunk = common.add_lora(verifier.trunk, args, decoder=verifier.trunk)  # after eval(): LoRA dropout on
        common.shard_blocks(verifier.trunk, args)  # --fsdp: FSDP2 on the trunk's blocks (the head stays whole)
        probs[kind] = train_verifier(kind, verifier, tokenizer, data["train"], data["eval"], args, autocast, run_dir,
                                     metrics_file)
        if not args.no_save:  # trunk + head (fp32 master weights), one file each (every rank: --fsdp gathers blocks)
            out, lora = run_dir / "model", common.is_lora(verifier.trunk)  # (LoRA: the head, the adapter (peft) in
            if lora and args.merge_lora:  # <kind>_adapter/; --merge-lora: the adapter merged, the full trunk + head)
                verifier.trunk, lora = verifier.trunk.merge_and_unload(), False
            state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()  # (DTensor: a collective)
                     for k, v in verifier.state_dict().items() if not lora or k[:5] == "head."}
            if common.rank() == 0:  # one writer
                out.mkdir(exist_ok=True), lora and verifier.trunk.save_pretrained(out / f"{kind}_adapter")
                save_file(state, str(out / f"{kind}.safetensors"))
        del verifier
    # ---- 3. rerank the held-out solutions ----------------------------------------------------------------------
    table = evaluate(data["eval"], probs, args, run_dir, metrics_file) if common.rank() == 0 else None  # one writer
    metrics_file.close(), print(f"metrics and table in {run_dir} ({time.perf_counter() - t_start:.0f}s)")
    return table


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the last saved model (if any) is intact; nothing half-written was kept")
