"""Runs em.py's or rest_em.py's main() on FIXED samples (the script's sampler replaced by a deterministic one: em's
generate, rest_em's sample_with_ids), so tests/test_distributed_em.py can compare `torchrun --nproc-per-node 2`
(each rank its share of the prompts / problems) with one process, where every draw is the same by construction.

    python tests/dist_harness_em.py em --model DIR --prompts-per-step 4 ...
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_harness_em.py rest_em --model DIR ...
"""
import importlib
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def fixed_ids(tokenizer, prompt, j, max_new_tokens, eos_id):
    """Sample j of a prompt (a function of the prompt's text and j alone, never of the batch it is in): j // 2
    spaces, then the boxed sum of the prompt's last 'a + b', right when (a + j) % 3 != 1, else one too many; EOS;
    cut at max_new_tokens (long rows are truncated, without EOS). Pairs of samples can be exact duplicates."""
    a, b = map(int, re.findall(r"(\d+) \+ (\d+)", prompt)[-1])
    text = " " * (j // 2) + f"\\boxed{{{a + b + ((a + j) % 3 == 1)}}}"
    return (tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id])[:max_new_tokens]


def fixed_generate(tokenizer):
    """A stand-in for em.generate (same arguments and outputs: (P*G, T) ids padded with EOS, (P*G,) lengths)."""
    def generate(model, prompt_ids, prompt_mask, num_samples, max_new_tokens, temperature, eos_ids, generator,
                 top_k=0, top_p=1.0, repetition_penalty=1.0):
        prompts = tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(prompt_ids, prompt_mask)],
                                         skip_special_tokens=True)
        rows = [fixed_ids(tokenizer, p, j, max_new_tokens, eos_ids[0]) for p in prompts for j in range(num_samples)]
        lens = torch.tensor([len(r) for r in rows], device=prompt_ids.device)
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], True, eos_ids[0])
        return ids.to(prompt_ids.device), lens
    return generate


def fixed_sample_with_ids(model, tokenizer, prompts, num_samples, temperature, args, eos_ids, autocast, generator):
    """A stand-in for rest_em.sample_with_ids: per prompt, num_samples (token ids incl. EOS, text)."""
    rows = [[fixed_ids(tokenizer, p, j, args.max_new_tokens, eos_ids[0]) for j in range(num_samples)] for p in prompts]
    return [[(r, tokenizer.decode(r, skip_special_tokens=True)) for r in rs] for rs in rows]


def patch(script, tokenizer):
    """Replace the script module's sampler by the fixed one."""
    if script.__name__ == "em":
        script.generate = fixed_generate(tokenizer)
    else:
        script.sample_with_ids = fixed_sample_with_ids


if __name__ == "__main__":
    script, argv = importlib.import_module(sys.argv[1]), sys.argv[2:]
    patch(script, common.load_tokenizer(argv[argv.index("--model") + 1]))
    script.main(argv)
