"""tests/dist_harness.py's FIXED generation batch (completion j of a prompt: its answer, j nines, EOS; reward 1 for
odd j), except that a prompt with an even answer scores 0 on every completion: a rule of the data, the same in
any number of processes, so some prompts have no DPO pair and a constant PPO reward, and (seed 0, 4 prompts a step,
2 processes) rank 1 has no pair at all at step 2: its update adds zero gradients. tests/test_distributed_ppo.py
compares `torchrun --nproc-per-node 2` with one process on it.

    python tests/dist_harness_ppo.py iterative_dpo --model DIR --prompts-per-step 4 ...
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_harness_ppo.py ppo ...
"""
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_harness  # noqa: E402  (it puts the checkout on sys.path)


def tied(record):
    return int(record["answer"]) % 2 == 0


def fixed_groups_some_tied(model, tokenizer, prompts, records, G, args, *rest):
    prompt_ids, prompt_mask, completion_ids, lens, rewards = dist_harness.fixed_groups(
        model, tokenizer, prompts, records, G, args, *rest)
    zero = torch.tensor([tied(rec) for rec in records for _ in range(G)], device=rewards.device)
    return prompt_ids, prompt_mask, completion_ids, lens, rewards.masked_fill(zero, 0.0)


if __name__ == "__main__":
    script = importlib.import_module(sys.argv[1])
    script.sample_groups = fixed_groups_some_tied
    script.main(sys.argv[2:])
