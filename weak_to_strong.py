"""Weak-to-strong generalization with the auxiliary confidence loss, one readable file.

Paper: Burns et al. 2023, "Weak-to-Strong Generalization: Eliciting Strong Capabilities With Weak Supervision"
(https://arxiv.org/abs/2312.09390), §4.3.2 and App. A.4; code: https://github.com/openai/weak-to-strong
(loss.py `logconf_loss_fn`, model.py `TransformerWithHead`, train_weak_to_strong.py).

Protocol (on a binary task with ground truth; here: "is this candidate final answer correct?"):
    1. split the training items 50/50 into half A and half B
    2. weak supervisor:  fine-tune the weak model on half A's ground truth            -> acc_weak (test)
    3. weak labels:      w(x) = softmax(weak logits) on half B (soft labels, not hardened)
    4. weak-to-strong:   fine-tune the strong model on half B's weak labels, with
                           xent:    L = CE(f(x), w(x))
                           logconf: L = (1 - a) CE(f(x), w(x)) + a CE(f(x), f_t(x))     (Eq. 1)  -> acc_w2s
    5. strong ceiling:   fine-tune the strong model on half B's ground truth                -> acc_ceiling
    6. PGR = (acc_w2s - acc_weak) / (acc_ceiling - acc_weak)  (1: the whole gap recovered; 0: imitates the weak)
In Eq. 1, f_t(x) is the strong model's own prediction hardened at an adaptive threshold t: per batch of 32,
t = quantile(p0, q = mean of the weak labels' class-1 probability), class 1 where p0 < t (so the hardened labels
keep the weak labels' class balance). a ramps linearly from 0 to alpha_max over the first warmup_frac of training.
The three strong runs start from the same weights and see the same batches of half B in the same order.

    python weak_to_strong.py                        # embedded SmolLM2-135M (strong) vs its first 6 layers (weak), CPU
    for s in 0 1; do python weak_to_strong.py --seed $s --output-dir runs/w2s_s$s; done    # several seeds
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 weak_to_strong.py [--fsdp]   # data parallel: each batch split in 2
    python weak_to_strong.py --weak-model Qwen/Qwen2.5-0.5B --weak-layers 0 --strong-model Qwen/Qwen2.5-7B \
        --lr 1e-5 --dataset my_problems.jsonl --gradient-checkpointing                   # a GPU with network
Saved models: OUTPUT_DIR/model/w2s_{xent,aux}.safetensors (trunk + head; LoRA: the head, the adapter in
w2s_{xent,aux}_adapter/); `load_classifier(strong_model, path)`.
"""
import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import common

ALGO = "weak_to_strong"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # models
    p.add_argument("--strong-model", "--model", dest="model", default=common.DEFAULT_MODEL,
                   help="strong model: hub id, local dir, .gguf file, or 'smollm2'; --model is an alias")
    p.add_argument("--weak-model", default=common.DEFAULT_MODEL, help="weak supervisor: hub id, local dir, .gguf, ...")
    p.add_argument("--weak-layers", type=int, default=6,
                   help="keep only the first N transformer layers of the weak model (0: all; default 6: see docs)")
    # data (shared flags: the same meaning in every script of the suite)
    p.add_argument("--dataset", default="arith:add:3x1",
                   help="'arith[:add|sub|mul[:DIGITS|AxB]]' (default 3-digit + 1-digit), a local file, or a hub id")
    p.add_argument("--eval-dataset", default=None, help="held-out problems (default: test split, else every 10th row)")
    p.add_argument("--question-key", default=None, help="question column (default: auto-detected)")
    p.add_argument("--answer-key", default=None, help="answer column (default: auto-detected)")
    p.add_argument("--wrong-answers", default="other", choices=["other", "near"],
                   help="wrong candidates: another problem's answer, or the correct one +- 1..9")
    p.add_argument("--n-train", type=int, default=2048, help="training problems, split 50/50 into halves A and B")
    p.add_argument("--max-length", type=int, default=64, help="longer examples are dropped, not truncated")
    p.add_argument("--fewshot", type=int, default=None, help="unused here (a classifier sees no examples)")
    p.add_argument("--system-prompt", default=None, help="unused here (no chat prompt)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, candidate answers and data order")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "pure-bfloat16"],
                   help="auto/bfloat16: fp32 master weights + bf16 autocast; pure-bfloat16: bf16 weights (warns)")
    common.add_scale_args(p, fsdp=True)  # --fsdp, --gradient-checkpointing, --lora-rank/-alpha/..., --merge-lora
    # optimization (the paper code's defaults: batch 32, 2 epochs, Adam, cosine annealing, no warm-up)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the strong runs (see docs)")
    p.add_argument("--weak-lr", type=float, default=5e-5, help="Adam learning rate of the weak model (see docs)")
    p.add_argument("--epochs", type=int, default=2, help="epochs over a half per training run (paper code: 2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: epochs x half / batch)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step (and per aux threshold)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="alias of --batch-size")
    p.add_argument("--num-generations", type=int, default=None, help="unused here (nothing is sampled)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="unused here (nothing is generated)")
    p.add_argument("--temperature", type=float, default=None, help="unused here (nothing is sampled)")
    # auxiliary confidence loss
    p.add_argument("--alpha-max", type=float, default=0.5, help="final aux weight (paper: 0.5; 0.75 largest students)")
    p.add_argument("--warmup-frac", type=float, default=0.2, help="alpha ramps from 0 over this fraction of training")
    p.add_argument("--alpha-schedule", default="linear", choices=["linear", "released"],
                   help="linear ramp, or the released code's (alpha = alpha_max * s, then a jump)")
    # evaluation / logging / saving
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: at the end of each run)")
    p.add_argument("--eval-size", type=int, default=400, help="held-out problems (test examples)")
    p.add_argument("--eval-batch-size", type=int, default=128, help="examples per forward in evaluation and labelling")
    p.add_argument("--output-dir", default=None, help="default: runs/<algo>__<seed>__<time>")
    p.add_argument("--no-save", action="store_true", help="do not write the final model")
    p.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16"], help="saved weights (default: fp32)")
    args = p.parse_args(argv)
    common.check_args(p, args, at_least_one=("n_train", "max_length", "epochs", "steps", "batch_size",
                                             "prompts_per_step", "num_generations", "max_new_tokens", "eval_size",
                                             "eval_batch_size"),
                      positive=("lr", "weak_lr", "warmup_frac", "temperature"),
                      non_negative=("weak_layers", "fewshot", "alpha_max", "eval_every"))
    for name in (n for n in ("warmup_frac", "alpha_max") if getattr(args, n) > 1):  # fractions
        p.error(f"--{name.replace('_', '-')} must be <= 1 (got {getattr(args, name)})")
    args.batch_size = args.batch_size if args.prompts_per_step is None else args.prompts_per_step  # the alias
    if args.batch_size % int(os.environ.get("WORLD_SIZE", "1")):  # torchrun: each rank trains on B / N rows
        p.error(f"--batch-size {args.batch_size} must be divisible by the {os.environ['WORLD_SIZE']} processes")
    return args


# ----------------------------------------------------------------------------------------------------------
# Plumbing shared by every script, copied byte for byte (tests/test_consistency.py checks): logging
# ----------------------------------------------------------------------------------------------------------
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
# Weak-to-strong (algorithm logic). The classifier: a causal LM trunk + a zero-initialised linear head on the
# last non-pad token (model.py)
# ----------------------------------------------------------------------------------------------------------
class TransformerWithHead(torch.nn.Module):
    def __init__(self, lm, num_layers=0):
        super().__init__()
        self.trunk = lm.base_model  # e.g. LlamaModel: embeddings + decoder layers + final norm, no LM head
        if num_layers:  # the weak model: only the first `num_layers` blocks (the final norm is kept)
            if num_layers > len(self.trunk.layers):
                raise SystemExit(f"error: --weak-layers {num_layers}: only {len(self.trunk.layers)} layers exist")
            self.trunk.layers = self.trunk.layers[:num_layers]
            self.trunk.config.num_hidden_layers = num_layers
            if getattr(self.trunk.config, "layer_types", None):
                self.trunk.config.layer_types = self.trunk.config.layer_types[:num_layers]
        # on the trunk's device, in fp32 whatever the trunk's dtype (fp32 master weights; 2 x H parameters)
        device = next(self.trunk.parameters()).device
        self.head = torch.nn.Linear(self.trunk.config.hidden_size, 2, bias=False, device=device, dtype=torch.float32)
        torch.nn.init.zeros_(self.head.weight)  # p = (0.5, 0.5) for every input at the start

    def forward(self, input_ids, attention_mask):
        """input_ids/attention_mask (B, L), left or right padded -> logits (B, 2) in float32."""
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)  # real tokens get 0..n-1 whatever the padding side
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            use_cache=False).last_hidden_state  # (B, L, H)
        pooled = last_token_state(hidden, attention_mask).float()  # (B, H)
        with torch.autocast(pooled.device.type, enabled=False):  # the head runs in fp32, also under autocast
            return self.head(pooled)


def last_token_state(hidden, attention_mask):
    """hidden (B, L, H), attention_mask (B, L) -> (B, H): the state of each row's last non-pad token. From the
    mask, not from `ids != pad` (pad == EOS here), and valid for left and right padding alike."""
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)  # (B,) index of the last 1 in each row
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def save_classifier(model, path, dtype=None, merge=False):
    """Trunk + head weights (as trained, or cast to dtype) as one safetensors file, written by rank 0 beside `path`,
    renamed into place (atomic); every rank calls it (--fsdp: all gather the blocks). A LoRA trunk: the head, the
    adapter (peft) in <name>_adapter/; with merge (--merge-lora) the adapter is merged in first and saved full."""
    path, lora = Path(path), common.is_lora(model.trunk)
    if lora and merge:
        model.trunk, lora = model.trunk.merge_and_unload(), False
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to(dtype or v.dtype).contiguous().cpu()
             for k, v in model.state_dict().items() if not lora or k.startswith("head.")}  # (a DTensor: a collective)
    if common.rank() > 0:  # one writer
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if lora:
        common.save_pretrained_atomic(model.trunk, None, path.with_name(f"{path.stem}_adapter"))
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def load_classifier(model_name, path, device="cpu"):
    """Rebuild a saved weak-to-strong classifier: the same --strong-model, then the saved trunk + head (a LoRA run:
    the base trunk + the saved adapter, then the head)."""
    model = TransformerWithHead(common.load_model(model_name, torch.device(device)))  # the head follows the trunk
    state, adapter = load_file(str(path), device=str(device)), Path(path).with_name(f"{Path(path).stem}_adapter")
    if adapter.is_dir():
        from peft import PeftModel

        model.trunk = PeftModel.from_pretrained(model.trunk, adapter)
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()})
    else:
        model.load_state_dict(state)
    return model.eval()


# ---- losses (loss.py): soft cross-entropy, and the auxiliary confidence loss with its alpha schedule ---------
def soft_ce(logits, target):
    """Mean over the batch of -sum_c target_c log softmax(logits)_c. logits, target: (B, 2)."""
    return -(target * F.log_softmax(logits.float(), -1)).sum(-1).mean()


def aux_alpha(step_frac, alpha_max=0.5, warmup_frac=0.2, schedule="linear"):
    """alpha at training progress step_frac = step / nsteps in [0, 1). linear (the paper; PR #33 and the EleutherAI
    fork): alpha_max * min(1, step_frac / warmup_frac). released (loss.py as published): alpha_max * step_frac while
    step_frac <= warmup_frac, then alpha_max: with 0.1 / 0.5, alpha climbs only to 0.05 and then jumps to 0.5."""
    if schedule == "released":
        return alpha_max * (step_frac if step_frac <= warmup_frac else 1.0)
    return alpha_max * min(1.0, step_frac / warmup_frac)


def logconf_target(logits, weak_probs, alpha):
    """The aux-loss target (B, 2), detached. logits: (B, 2) strong logits; weak_probs: (B, 2) weak soft labels.
    t = quantile(p0 over the batch, q = batch mean of w1); hardened prediction = class 1 where p0 < t, else class 0
    (ties, e.g. at the zero-initialised head where every p0 = 0.5, all go to class 0, as in the released code)."""
    with torch.no_grad():
        p0 = torch.softmax(logits.float(), -1)[:, 0]  # (B,)
        threshold = torch.quantile(p0, weak_probs[:, 1].float().mean())
        hard = F.one_hot((p0 < threshold).long(), 2).float()  # (B, 2): about q of the batch is class 1
        return (1 - alpha) * weak_probs.float() + alpha * hard


def logconf_loss(logits, weak_probs, alpha):
    """Eq. 1: (1-a) CE(f, w) + a CE(f, f_t) = CE(f, (1-a) w + a f_t), since CE is linear in its target. (train_run
    computes the same with soft_ce and logconf_target, whose threshold it takes over the whole batch of every rank.)"""
    return soft_ce(logits, logconf_target(logits, weak_probs, alpha))


def pgr(acc_weak, acc_ceiling, acc_w2s):
    """Performance gap recovered. NaN when the ceiling does not beat the weak model (the ratio means nothing)."""
    gap = acc_ceiling - acc_weak
    return (acc_w2s - acc_weak) / gap if gap > 0 else float("nan")


# ---- the task: "is this candidate final answer correct?" (an outcome-reward-model task) built from problems -----
def make_examples(records, rng, wrong="other"):
    """Each problem once, with its correct answer (label 1) or, 50/50, a wrong one (label 0): another problem's
    different answer (wrong="other"), or the correct number plus a nonzero offset in [-9, 9] (wrong="near": the
    leading digits match, only the last ones differ). The text ends on the candidate, so the pooled last token is
    the answer's last token."""
    if len({r["answer"] for r in records}) < 2:
        raise SystemExit("error: every problem has the same answer: cannot build wrong candidates")
    examples = []
    for rec in records:
        label, candidate = rng.random() < 0.5, rec["answer"]
        if not label and wrong == "near":
            try:
                candidate = str(int(rec["answer"]) + rng.choice([d for d in range(-9, 10) if d]))
            except ValueError:
                raise SystemExit(f"error: --wrong-answers near needs integer answers, got {rec['answer']!r}")
        while not label and candidate == rec["answer"]:
            candidate = rng.choice(records)["answer"]
        examples.append({"text": f"{rec['question'].strip()} Answer: {candidate}", "label": int(label)})
    return examples


def tokenize_texts(tokenizer, texts, device):
    """(N, L) padded ids and attention mask of plain texts, with the tokenizer's own special tokens (e.g. BOS)."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


@torch.no_grad()
def predict_probs(model, tokenizer, texts, batch_size, autocast, device):
    """Class probabilities (N, 2) in float32, `batch_size` texts per forward. torchrun: each rank runs its share of
    the forwards, and every rank gets all N rows, in order."""
    out = [torch.zeros(0, 2, device=device)]
    common.gather_blocks(model, True)  # --fsdp: whole blocks (the ranks may run different numbers of forwards)
    for i in common.shard(range(0, len(texts), batch_size)):  # torchrun: this rank's forwards (the same batches)
        with autocast():
            out.append(torch.softmax(model(*tokenize_texts(tokenizer, texts[i:i + batch_size], device)), -1))
    return torch.tensor(gather_lists(torch.cat(out).float().tolist())[0], device=device).view(-1, 2)


def gather_lists(*lists):
    """Each list (or None) concatenated over the ranks in rank order: common.shard's shares -> the one-process list."""
    parts = [lists] + [None] * (common.world_size() - 1)
    common.world_size() > 1 and torch.distributed.all_gather_object(parts, lists)  # every rank gets every rank's
    return [None if values is None else [v for part in parts for v in part[i]] for i, values in enumerate(lists)]


def classifier_accuracy(probs, labels):
    """Fraction of rows whose argmax class (N, 2) equals the label (N,)."""
    return float((probs.argmax(-1).cpu() == labels.cpu()).float().mean())


def train_run(phase, model, tokenizer, texts, targets, labels, test, args, lr, autocast, run_dir, metrics_file):
    """One training run (train.py): fine-tune `model` on texts (N) with soft targets (N, 2) (ground truth one-hot,
    or weak soft labels); Adam, cosine annealing over nsteps, one loss over the whole batch. The loss is logconf in
    phase w2s_aux, soft cross-entropy otherwise; labels (N,) (ground truth) only feed the train/acc_gt diagnostic.
    Batches: common.next_batch with a fresh random.Random(--seed) in every run (and rank), so the three strong runs
    (same half B) see the same batches in the same order. -> (test accuracy, test probabilities (N_test, 2))."""
    device, n = next(model.parameters()).device, len(texts)
    nsteps = args.steps or max(1, args.epochs * n // args.batch_size)
    optimizer = torch.optim.Adam(common.param_groups(model), lr=lr, fused=True)  # (--fsdp: two groups)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=nsteps)
    data_rng, order = random.Random(args.seed), []
    for step in tqdm(range(1, nsteps + 1), desc=phase, dynamic_ncols=True, disable=common.rank() > 0):
        # ---- 1. the batch: B examples without replacement, reshuffled at each pass over the half -------------
        t_step, rows = time.perf_counter(), common.next_batch(range(n), order, data_rng, args.batch_size)  # (B,)
        mine = common.shard(rows)  # torchrun: this rank's b = B / N of them (all B in one process)
        ids, mask = tokenize_texts(tokenizer, [texts[i] for i in mine], device)  # (b, L)
        target = targets[mine].to(device)  # (b, 2)
        common.gather_blocks(model, False)  # ---- 2. the loss over the whole batch (--fsdp: on the sharded blocks)
        with autocast():
            logits = model(ids, mask)  # (b, 2) fp32
        batch_logits, alpha = common.all_gather(logits.detach()), None  # (B, 2): every rank's rows, in batch order
        if phase == "w2s_aux":  # logconf_loss, with t the quantile over the whole batch
            alpha = aux_alpha((step - 1) / nsteps, args.alpha_max, args.warmup_frac, args.alpha_schedule)
            target = common.shard(logconf_target(batch_logits, targets[rows].to(device), alpha))  # this rank's rows
        loss = soft_ce(logits, target) * (len(mine) / len(rows))  # the batch mean: this rank's sum / B
        loss_value = common.all_sum(loss.item())  # the whole batch's loss (every rank stops, or none)
        stop_if_not_finite(loss_value, f"the {phase} loss", step, run_dir)
        optimizer.zero_grad(set_to_none=True)  # ---- 3. the update -----------------------------------------------
        loss.backward()
        common.all_reduce_gradients(model)  # torchrun: trunk and head, summed over ranks = the whole batch's gradient
        grad_norm = common.clip_grad_norm(model, float("inf"))  # measured, not clipped (--fsdp: over every shard)
        stop_if_not_finite(grad_norm, f"the {phase} gradient norm", step, run_dir)
        optimizer.step(), scheduler.step()
        # ---- 4. log, evaluate -------------------------------------------------------------------------------------
        pred = batch_logits.argmax(-1).cpu()  # (B,) the whole batch: the record describes every rank's rows
        record = {"phase": phase, "step": step, "loss": loss_value, "alpha": alpha, "lr": scheduler.get_last_lr()[0],
                  "grad_norm": grad_norm, "train/acc_gt": float((pred == labels[rows]).float().mean()),
                  "train/agree_target": float((pred == targets[rows].argmax(-1)).float().mean()),
                  "train/p1_mean": float(torch.softmax(batch_logits, -1)[:, 1].mean()),
                  "step_time": round(time.perf_counter() - t_step, 3)}
        log_step(metrics_file, record, [("phase", "phase", "s"), ("loss", "loss", ".4f"), ("alpha", "alpha", ".3f"),
                                        ("train/acc_gt", "acc(gt)", ".2f"), ("train/agree_target", "agree", ".2f"),
                                        ("train/p1_mean", "p1", ".2f"), ("grad_norm", "gnorm", ".2f"),
                                        ("lr", "lr", ".2e"), ("step_time", "s", ".1f")])
        if args.eval_every and step % args.eval_every == 0 and step != nsteps:
            evaluate(model, tokenizer, test, args, autocast, phase, step, run_dir, metrics_file)
    return evaluate(model, tokenizer, test, args, autocast, phase, nsteps, run_dir, metrics_file)


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, test, args, autocast, phase, step, run_dir, metrics_file):
    """Held-out test accuracy (argmax class vs ground truth), logged; with test["weak_probs"], also the agreement
    with the weak supervisor's test predictions. -> (accuracy, test probabilities (N_test, 2))."""
    t0, device = time.perf_counter(), next(model.parameters()).device
    probs = predict_probs(model, tokenizer, test["texts"], args.eval_batch_size, autocast, device)  # all N_test rows
    record = {"phase": phase, "step": step, "eval/accuracy": classifier_accuracy(probs, test["labels"])}
    if "weak_probs" in test:  # how often the strong model agrees with its weak supervisor on the test set
        record["eval/agreement_weak"] = classifier_accuracy(probs, test["weak_probs"].argmax(-1))
    record["eval/time"] = round(time.perf_counter() - t0, 2)
    log_step(metrics_file, record)
    shown = [{"text": t, "label": int(y), "p_correct": round(float(p[1]), 4)}
             for t, y, p in zip(test["texts"][:4], test["labels"][:4], probs[:4])]
    with common.open_log(run_dir / "samples.jsonl", "a") as f:
        f.write(json.dumps({"phase": phase, "step": step, "examples": shown}) + "\n")
    tqdm.write(f"eval {phase} step {step}: accuracy {record['eval/accuracy']:.1%}"
               + (f"  agreement with weak {record['eval/agreement_weak']:.1%}" if "weak_probs" in test else "")
               + f"  ({len(test['texts'])} test examples, {record['eval/time']:.0f}s)")
    return record["eval/accuracy"], probs


def main(argv=None):
    # ---- setup: arguments, precision, run directory ------------------------------------------------------------
    args = parse_args(argv)
    for flag in ("fewshot", "system_prompt", "num_generations", "max_new_tokens", "temperature"):
        if getattr(args, flag) is not None:
            print(f"note: --{flag.replace('_', '-')} has no effect in {ALGO}.py (a classifier; nothing is generated)")
    common.seed_all(args.seed)
    device = common.resolve_device(args.device, distributed=True)  # torchrun: one process per device
    weight_dtype, autocast_dtype = common.resolve_dtype(args.dtype, device)
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    run_dir, t_start = common.make_run_dir(args, ALGO), time.perf_counter()
    metrics_file = common.open_log(run_dir / "metrics.jsonl")

    # ---- data: problems -> (text, label) examples; halves A and B; a held-out test split ----------------------
    train, test_records = common.train_eval_records(args.dataset, args.eval_dataset, args.question_key,
                                                    args.answer_key, seed=args.seed, eval_size=args.eval_size)
    rng = random.Random(args.seed)  # torchrun: every rank draws the same examples, halves and order (same seeds)
    train = make_examples(train[:args.n_train], rng, args.wrong_answers)
    test = make_examples(test_records, random.Random(1234), args.wrong_answers)  # the same examples for every seed
    weak_tok, strong_tok = common.load_tokenizer(args.weak_model), common.load_tokenizer(args.model)
    too_long = lambda e: max(len(t(e["text"]).input_ids) for t in (weak_tok, strong_tok)) > args.max_length
    train, test = [e for e in train if not too_long(e)], [e for e in test if not too_long(e)]
    rng.shuffle(train)
    half_a, half_b = train[:len(train) // 2], train[len(train) // 2:]
    if len(half_a) < args.batch_size or not test:
        raise SystemExit(f"error: {len(train)} training / {len(test)} test examples of <= {args.max_length} tokens: "
                         f"need 2 x --batch-size ({args.batch_size}) and a test set; raise --n-train or --max-length")
    labels = lambda examples: torch.tensor([e["label"] for e in examples])  # (N,)
    one_hot = lambda examples: F.one_hot(labels(examples), 2).float()  # (N, 2)
    test = {"texts": [e["text"] for e in test], "labels": labels(test)}
    texts_a, texts_b, labels_b = [e["text"] for e in half_a], [e["text"] for e in half_b], labels(half_b)
    print(f"{ALGO}: half A {len(half_a)} / half B {len(half_b)} / test {len(test['texts'])} examples "
          f"({float(labels_b.float().mean()):.0%} correct candidates in B), e.g. {texts_b[0]!r} -> {int(labels_b[0])}"
          f"\nstrong {args.model} | weak {args.weak_model} (first {args.weak_layers or 'all'} layers) | {device} "
          f"(weights {weight_dtype}, autocast {autocast_dtype}) | output {run_dir}")

    # ---- 1. the weak supervisor: ground truth of half A ---------------------------------------------------------
    def classifier(name, layers=0):  # LoRA: on the trunk; the head trains fully
        model = TransformerWithHead(common.load_model(name, device, weight_dtype, args.gradient_checkpointing), layers)
        model.eval()  # dropout off, as in the paper's code (train.py calls model.eval() during training)
        model.trunk = common.add_lora(model.trunk, args, decoder=model.trunk)  # after eval(): --lora-dropout is on
        common.shard_blocks(model.trunk, args)  # --fsdp: FSDP2 on the trunk's blocks (the head stays whole)
        return model
    weak = classifier(args.weak_model, args.weak_layers)
    acc_weak, test["weak_probs"] = train_run("weak", weak, weak_tok, texts_a, one_hot(half_a), labels(half_a), test,
                                             args, args.weak_lr, autocast, run_dir, metrics_file)
    # ---- 2. weak labels on half B: soft probabilities, not hardened ---------------------------------------------
    weak_labels = predict_probs(weak, weak_tok, texts_b, args.eval_batch_size, autocast, device).cpu()  # (N_B, 2)
    label_acc = classifier_accuracy(weak_labels, labels_b)
    log_step(metrics_file, {"phase": "weak_labels", "step": 0, "weak_label/accuracy": label_acc,
                            "weak_label/p1_mean": float(weak_labels[:, 1].mean()),
                            "weak_label/confidence": float(weak_labels.max(-1).values.mean())})
    print(f"weak labels on half B: accuracy {label_acc:.1%}, mean p(correct) {float(weak_labels[:, 1].mean()):.2f}")
    del weak

    # ---- 3. strong runs, the same start and data order: ceiling (ground truth of B), w2s xent / aux (weak labels) -
    results = {"weak": acc_weak}
    for phase, targets in (("ceiling", one_hot(half_b)), ("w2s_xent", weak_labels), ("w2s_aux", weak_labels)):
        torch.manual_seed(args.seed)
        strong = classifier(args.model)  # the same start (and LoRA adapter start) in each run
        results[phase], _ = train_run(phase, strong, strong_tok, texts_b, targets, labels_b, test, args, args.lr,
                                      autocast, run_dir, metrics_file)
        if phase != "ceiling" and not args.no_save:  # every rank (--fsdp: all gather the blocks); rank 0 writes
            save_classifier(strong, run_dir / "model" / f"{phase}.safetensors",
                            getattr(torch, args.save_dtype) if args.save_dtype else None, args.merge_lora)
        del strong

    # ---- 4. the table ------------------------------------------------------------------------------------------
    results.update({f"pgr_{k}": pgr(results["weak"], results["ceiling"], results[f"w2s_{k}"]) for k in ("xent", "aux")})
    results["wall_time"] = round(time.perf_counter() - t_start, 1)
    nan_to_none = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in results.items()}
    log_step(metrics_file, {"phase": "summary", "step": 0, **nan_to_none})
    metrics_file.close()
    fmt_pgr = lambda v: "n/a (ceiling <= weak)" if math.isnan(v) else f"{v:.2f}"
    print(f"\n{'test accuracy (' + str(len(test['texts'])) + ' examples)':<34}{'':>8}PGR")
    print(f"{'weak supervisor':<34}{results['weak']:>7.1%}")
    print(f"{'strong ceiling (ground truth)':<34}{results['ceiling']:>7.1%}")
    print(f"{'weak-to-strong, xent':<34}{results['w2s_xent']:>7.1%}  {fmt_pgr(results['pgr_xent'])}")
    print(f"{'weak-to-strong, aux conf loss':<34}{results['w2s_aux']:>7.1%}  {fmt_pgr(results['pgr_aux'])}")
    if math.isnan(results["pgr_xent"]):
        print("note: the strong ceiling does not beat the weak model, so PGR is undefined: pick a weaker weak model")
    print(f"metrics: {run_dir / 'metrics.jsonl'}  wall time {results['wall_time']:.0f}s"
          + ("" if args.no_save else f"   models: {run_dir / 'model'}/w2s_xent.safetensors, w2s_aux.safetensors"))
    return results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the last saved model (if any) is intact; nothing half-written was kept")
