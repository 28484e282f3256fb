"""Runs a script's main() on a FIXED generation batch (its sample_groups replaced by a deterministic one), so
tests/test_distributed.py can compare `torchrun --nproc-per-node 2` (P/2 prompts a rank) with one process (P).

    python tests/dist_harness.py grpo --model DIR --prompts-per-step 4 ...
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_harness.py grpo ...
"""
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def fixed_groups(model, tokenizer, prompts, records, G, args, reward_fn, eos_ids, generator, autocast):
    """Completion j of a prompt: its answer followed by j nines, then EOS; reward 1 for odd j, except prompt 2 of
    the step: all 0 (no variance: skipped or rejected, so rank 1 trains fewer micro-batches than rank 0)."""
    prompt_ids, prompt_mask = common.tokenize_prompts(tokenizer, prompts, model.device)
    rows = [tokenizer(f"{rec['answer']}{'9' * j}", add_special_tokens=False)["input_ids"][:args.max_new_tokens - 1]
            + [eos_ids[0]] for rec in records for j in range(G)]
    lens = torch.tensor([len(r) for r in rows], device=model.device)
    completion_ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], True, eos_ids[0])
    first = common.rank() * len(records)  # the index in the whole step of this rank's first prompt
    rewards = torch.tensor([0.0 if first + i == 2 else float(j % 2) for i in range(len(records)) for j in range(G)],
                           device=model.device)  # prompt 2: all wrong, so the ranks' micro-batch counts differ
    return prompt_ids, prompt_mask, completion_ids.to(model.device), lens, rewards


if __name__ == "__main__":
    script = importlib.import_module(sys.argv[1])
    script.sample_groups = fixed_groups
    script.main(sys.argv[2:])
