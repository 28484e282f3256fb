"""Runs verifier.py's main() on FIXED samples (its generate() replaced by a deterministic one), so
tests/test_distributed_w2s.py can compare `torchrun --nproc-per-node 2` (each rank samples half the problems) with
one process. (weak_to_strong.py samples nothing: the tests run the real script.)

    python tests/dist_harness_w2s.py --model DIR --steps 2 ...
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_harness_w2s.py --model DIR ...
"""
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import verifier  # noqa: E402

TOKENIZER = None


def solution(question, j):
    """A 'chain' solution of the question: right (j % 4 == 0), wrong from its first step (1), with a wrong final
    answer (2), or unfinished (3): every kind of outcome and step label."""
    nums = [int(x) for x in re.findall(r"\d+", question)]
    values = [nums[0]]
    for x in nums[1:]:
        values.append(values[-1] + x + (j % 4 == 1 and len(values) == 1))  # variant 1: the first sum is off by one
    lines = [f"{v} + {x} = {w}" for v, x, w in zip(values, nums[1:], values[1:])]
    final = {2: values[-1] + 1, 3: None}.get(j % 4, values[-1])
    return "\n".join(lines + ([f"The answer is \\boxed{{{final}}}."] if final is not None else []))


def fixed_generate(model, prompt_ids, prompt_mask, num_samples, max_new_tokens, temperature, eos_ids, generator,
                   **unused):
    """Completion j of each prompt: solution(its last question, j), then EOS (no model call, no random draw)."""
    prompts = TOKENIZER.batch_decode(prompt_ids, skip_special_tokens=True)
    rows = [TOKENIZER(solution(p.rsplit("What is", 1)[-1].split("?")[0], j), add_special_tokens=False)["input_ids"]
            [:max_new_tokens - 1] + [eos_ids[0]] for p in prompts for j in range(num_samples)]
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], True, eos_ids[0])
    return ids.to(prompt_ids.device), torch.tensor([len(r) for r in rows], device=prompt_ids.device)


if __name__ == "__main__":
    argv = sys.argv[1:]
    TOKENIZER = common.load_tokenizer(argv[argv.index("--model") + 1])
    verifier.generate = fixed_generate
    verifier.main(argv)
