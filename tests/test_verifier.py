"""verifier.py: the exact step checker and the Monte-Carlo labeler (a stand-in generator), the loss on hand values,
best-of-N / (weighted) majority / AUC on hand-made scores (ties included), the head's read positions, an ORM learning
test on the tiny model (held-out AUC rises), end-to-end runs with tiny settings, bad inputs."""
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

import common
import verifier

Q = "What is 7 + 5 - 8? Compute it one step at a time."


# ---- the built-in task and the exact step checker ------------------------------------------------------------
def test_make_chain_solutions_are_right_and_splits_disjoint():
    train, test = verifier.make_chain("train", 50, 0, 3, 1, "+-"), verifier.make_chain("test", 20, 0, 3, 1, "+-")
    assert len(train) == 50 and len(test) == 20 and not {r["question"] for r in train} & {r["question"] for r in test}
    for rec in train + test:
        expr = rec["question"].split("What is ")[1].split("?")[0]
        assert int(rec["answer"]) == eval(expr)  # the task's own arithmetic
        steps = verifier.split_steps(rec["solution"])  # a worked solution is right at every step
        assert len(steps) == 3 and verifier.exact_step_labels(steps, rec["question"], rec["answer"]) == [1, 1, 1]
        assert common.grade(rec["solution"], rec["answer"])


@pytest.mark.parametrize("solution, labels", [  # the labels stop at the first wrong step (PRM800K)
    ("7 + 5 = 12\n12 - 8 = 4\nThe answer is \\boxed{4}.", [1, 1, 1]),        # right
    ("7 + 5 = 13\n13 - 8 = 5\nThe answer is \\boxed{5}.", [0]),              # a false equation
    ("7 + 6 = 13\n13 - 8 = 5\nThe answer is \\boxed{5}.", [0]),              # true, but +6 is not in the question
    ("7 + 5 = 12\n12 + 8 = 20\nThe answer is \\boxed{20}.", [1, 0]),         # +8: the question has -8
    ("7 + 5 = 12\n13 - 8 = 5\nThe answer is \\boxed{5}.", [1, 0]),           # 13: not an earlier result
    ("7 - 8 = -1\n-1 + 5 = 4\nThe answer is \\boxed{4}.", [1, 1, 1]),        # reordered, a negative intermediate
    ("7 + 5 - 8 = 4\nThe answer is \\boxed{4}.", [1, 1]),                    # one line for the whole chain
    ("Let's add.\n7 + 5 = 12\n12 - 8 = 4\nThe answer is \\boxed{4}.", [1, 1, 1, 1]),  # nothing to check: right
    ("7 + 5 = 12\n12 - 8 = 4", [1, 0]),                                        # no final answer: unfinished
    ("7 + 5 = 12\n12 - 8 = 4\nThe answer is \\boxed{3}.", [1, 1, 0]),        # a wrong final answer
    ("7 + 5 = 12 and 12 - 8 = 4 so \\boxed{4}", [1]),                         # two equations and the answer
    ("7 + 5 = 12.5\n\\boxed{4}", [1, 1]),                                     # not an integer equation: unchecked
])
def test_exact_step_labels_hand_cases(solution, labels):
    assert verifier.exact_step_labels(verifier.split_steps(solution), Q, "4") == labels


def test_split_steps():
    assert verifier.split_steps("a\n\n  b  \n") == ["a", "b"] and verifier.split_steps("") == [""]


# ---- Monte-Carlo step labels (Math-Shepherd hard estimate) with a stand-in generator --------------------------
def test_mc_step_labels_with_a_stand_in_generator():
    calls = []

    def complete(texts, k):  # fixed continuations: from a prefix with '13' none reaches 4, else 1 of k does
        calls.append((list(texts), k))
        good = ["\\boxed{9}"] * (k - 1) + ["\\boxed{4}"]
        return [c for t in texts for c in (["\\boxed{5}"] * k if "13" in t else good)]
    steps = [["7 + 5 = 12", "12 - 8 = 4", "\\boxed{4}"], ["7 + 5 = 13", "13 - 8 = 5", "\\boxed{5}"], ["\\boxed{4}"],
             ["7 + 5 = 12", "7 + 5 = 13", "\\boxed{4}"]]
    labels = verifier.mc_step_labels(["P0:", "P1:", "P2:", "P3:"], steps, ["4"] * 4, complete, 3)
    # the last step: the solution's own outcome (no completion); the labels stop at the first 0 (PRM800K)
    assert labels == [[1, 1, 1], [0], [1], [1, 0]]
    assert len(calls) == 1 and calls[0][1] == 3  # one batched call over every non-final prefix
    assert calls[0][0] == ["P0:7 + 5 = 12\n", "P0:7 + 5 = 12\n12 - 8 = 4\n", "P1:7 + 5 = 13\n",
                           "P1:7 + 5 = 13\n13 - 8 = 5\n", "P3:7 + 5 = 12\n", "P3:7 + 5 = 12\n7 + 5 = 13\n"]
    assert verifier.mc_step_labels(["P:"], [["\\boxed{4}"]], ["4"], None, 3) == [[1]]  # nothing to complete


# ---- the loss; best-of-N, majority, weighted majority; AUC ----------------------------------------------------
def test_bce_loss_hand_values():
    logits, labels = torch.tensor([0.0, math.log(3.0)]), torch.tensor([1, 0])
    # -log sigmoid(0) = log 2; -log(1 - sigmoid(log 3)) = -log(1/4) = log 4
    assert verifier.bce_loss(logits, labels).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    logits.requires_grad_(True)
    verifier.bce_loss(logits, labels).backward()  # d/dlogit = (sigmoid - y) / n
    assert torch.allclose(logits.grad, torch.tensor([(0.5 - 1) / 2, 0.75 / 2]))


def test_weighted_majority_with_ties():
    assert verifier.weighted_majority(["3", "4", "4", "3", None]) == "3"  # 2-2 tie: the first seen
    assert verifier.weighted_majority(["3", "4", "4", None, None]) == "4"  # None does not vote
    assert verifier.weighted_majority([None, None]) is None
    assert verifier.weighted_majority(["3", "4", "4"], [0.9, 0.3, 0.4]) == "3"  # 0.9 > 0.7
    assert verifier.weighted_majority(["3", "4", "4"], [0.6, 0.3, 0.3]) == "3"  # weighted tie: the first seen


def test_auc_mann_whitney_with_ties():
    assert verifier.auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0 and verifier.auc([0.1, 0.9], [1, 0]) == 0.0
    assert verifier.auc([0.5, 0.5, 0.5], [1, 0, 0]) == 0.5  # all tied
    # pairs (pos, neg): (0.8, 0.3) win, (0.8, 0.8) tie, (0.2, 0.3) loss, (0.2, 0.8) loss -> 1.5 / 4
    assert verifier.auc([0.8, 0.2, 0.3, 0.8], [1, 1, 0, 0]) == pytest.approx(0.375)
    assert verifier.auc([0.3, 0.4], [1, 1]) is None and verifier.auc([0.3], [0]) is None


def test_rerank_accuracies_hand_table():
    # one problem, N_max = 4: answers 3 3 4 5, only "4" is right; the ORM likes the right one, the PRM a wrong one
    answers, correct = [["3", "3", "4", "5"]], [[False, False, True, False]]
    scores = {"orm": [[0.1, 0.2, 0.9, 0.3]], "prm_min": [[0.5, 0.5, 0.1, 0.5]], "prm_prod": [[0.3, 0.3, 0.2, 0.1]]}
    table = verifier.rerank_accuracies(answers, correct, scores, [1, 4], 2000, random.Random(0))
    full = table[4]
    assert full["pass"] == 1 and full["majority"] == 0 and full["orm_best_of_n"] == 1
    assert full["prm_min_best_of_n"] == 0 and full["prm_prod_best_of_n"] == 0
    assert full["orm_weighted"] == 1 and full["prm_prod_weighted"] == 0  # 0.9 > 0.3; 0.6 > 0.2
    for method in full:  # N = 1: every method picks the one solution, right 1 time in 4
        assert table[1][method] == pytest.approx(0.25, abs=0.04)


def test_rerank_best_of_n_skips_solutions_without_an_answer():
    # the top-scored solution has no final answer (an unfinished one, which a causal PRM cannot tell from a prefix):
    # best-of-N picks the best among those with an answer; with no answer at all, the pick is wrong
    scores = {k: [[0.9, 0.2, 0.5], [0.9, 0.8, 0.1]] for k in ("orm", "prm_min", "prm_prod")}
    table = verifier.rerank_accuracies([[None, "4", "5"], [None, None, None]], [[False, False, True], [False] * 3],
                                       scores, [3], 10, random.Random(0))[3]
    assert table["pass"] == 0.5 and all(table[f"{k}_best_of_n"] == 0.5 for k in scores)  # "5" (0.5 > 0.2); none


def test_rerank_ties_break_by_order():
    # N = 2 of 2 in random orders: a best-of-N tie (0.5, 0.5) and a 1-1 vote go to whichever comes first: half the time
    table = verifier.rerank_accuracies([["4", "5"]], [[True, False]], {k: [[0.5, 0.5]] for k in ("orm", "prm_min",
                                       "prm_prod")}, [2], 4000, random.Random(0))[2]
    assert table["pass"] == 1 and all(table[m] == pytest.approx(0.5, abs=0.03) for m in table if m != "pass")


# ---- the verifier model: read positions, head, learning --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return common.load_tokenizer(tiny_model_dir), common.load_model(tiny_model_dir, torch.device("cpu"))


@pytest.mark.parametrize("which", ["tiny", "embedded"])  # a character-level and a byte-level BPE tokenizer
def test_step_ends_are_the_closing_newlines_under_left_padding(which, tiny_model_dir, embedded_model_dir):
    tok = common.load_tokenizer(tiny_model_dir if which == "tiny" else embedded_model_dir)
    questions, steps = ["Q: 1+1?", "What is 12 + 3? Compute it."], [["1+1=2", "The answer is \\boxed{2}."], ["x"]]
    ids, mask, ends = verifier.verifier_batch(tok, questions, steps, torch.device("cpu"))
    assert mask[0].all() and mask[1, 0] == 0  # the second row is left-padded
    for b, row in enumerate(ends):
        assert tok.decode(ids[b][mask[b].bool()]) == questions[b] + "\n\n" + "".join(s + "\n" for s in steps[b])
        assert [tok.decode([int(ids[b, j])]) for j in row] == ["\n"] * len(row)  # each step's closing newline
        assert row[-1] == ids.shape[1] - 1  # the last step's newline is the last token: where the ORM reads
        assert tok.decode(ids[b, row[0] + 1:]) == "".join(s + "\n" for s in steps[b][1:])  # after the 1st step


def test_head_starts_at_one_half_in_fp32_on_the_trunks_device(tiny, tmp_path):
    tok, lm = tiny
    model = verifier.ScalarHeadVerifier(lm)
    assert model.head.weight.dtype == torch.float32 and model.head.weight.device == next(lm.parameters()).device
    heldout = {"questions": ["Q"] * 3, "steps": [["a", "b"], ["c"], ["d", "e", "f"]], "correct": [True, False, True],
               "step_labels": [[1, 1], [0], [1, 0]]}
    with open(tmp_path / "m.jsonl", "w") as f:
        probs = verifier.verifier_metrics("prm", model, tok, heldout, SimpleNamespace(eval_batch_size=1),
                                          lambda: torch.autocast("cpu", dtype=torch.bfloat16), 0, f)
    assert [len(p) for p in probs] == [2, 1, 3] and all(q == 0.5 for p in probs for q in p)
    record = json.loads((tmp_path / "m.jsonl").read_text())
    assert record["eval/prm_step_auc"] == 0.5  # every step probability tied
    assert record["eval/prm_auc"] == 0.0  # the products 0.25, 0.125 (right) < 0.5 (wrong): more steps, lower score
    assert record["eval/prm_accuracy"] == pytest.approx(1 / 3)  # p = 0.25 or 0.5, never > 0.5: "wrong" for all


def learning_args(**kw):
    return SimpleNamespace(**{"steps": 30, "epochs": 1, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2,
                              "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0, "eval_every": 0,
                              "eval_batch_size": 16, **kw})


def test_orm_learning_raises_held_out_auc(tiny_model_dir, tmp_path):
    """A separable outcome (the final line says 'yes' or 'no'): the held-out AUC goes from 0.5 (the zero head ties
    every score) to near 1 in 30 steps on the tiny model."""
    rng = random.Random(0)
    make = lambda n: [(f"What is {rng.randint(1, 9)} + {rng.randint(1, 9)}?", rng.random() < 0.5) for _ in range(n)]
    split = lambda rows: {"questions": [q for q, _ in rows], "correct": [y for _, y in rows], "step_labels": None,
                          "steps": [[f"{rng.randint(1, 9)} + {rng.randint(1, 9)} = {rng.randint(2, 18)}",
                                     "yes" if y else "no"] for _, y in rows]}
    train, heldout = split(make(64)), split(make(32))
    tok, args = common.load_tokenizer(tiny_model_dir), learning_args()
    torch.manual_seed(0)
    model = verifier.ScalarHeadVerifier(common.load_model(tiny_model_dir, torch.device("cpu")))
    fp32 = lambda: torch.autocast("cpu", enabled=False)
    with open(tmp_path / "m.jsonl", "w") as f:
        before = verifier.verifier_metrics("orm", model, tok, heldout, args, fp32, 0, f)
        after = verifier.train_verifier("orm", model, tok, train, heldout, args, fp32, tmp_path, f)
    auc = lambda probs: verifier.auc([p[-1] for p in probs], heldout["correct"])
    assert auc(before) == 0.5 and auc(after) > 0.9
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    assert records[-1]["eval/orm_auc"] == pytest.approx(auc(after))


# ---- end to end -------------------------------------------------------------------------------------------------
def test_end_to_end_exact_labels_on_the_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    table = verifier.main(["--model", tiny_model_dir, "--n-train", "3", "--num-generations", "2", "--eval-size", "3",
                           "--eval-n", "4", "--eval-subsets", "3", "--max-new-tokens", "12", "--steps", "2",
                           "--batch-size", "4", "--eval-every", "1", "--output-dir", str(out)])
    assert sorted(table) == [1, 2, 4] and set(table[4]) == set(verifier.METHODS)
    assert all(table[n]["pass"] >= table[n][m] for n in table for m in table[n])  # the oracle bounds every method
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    data = [r for r in records if r["phase"] == "data"]
    assert [r["split"] for r in data] == ["train", "eval"] and all(r["data/step_correct"] is not None for r in data)
    assert [r["step"] for r in records if r["phase"] == "orm" and "loss" in r] == [1, 2]
    prm_evals = [r for r in records if r["phase"] == "prm" and "eval/prm_auc" in r]
    assert [r["step"] for r in prm_evals] == [1, 2] and "eval/prm_step_auc" in prm_evals[-1]
    assert [r["n"] for r in records if r["phase"] == "eval"] == [1, 2, 4]
    assert (out / "best_of_n.md").read_text().count("\n") == 9 and json.loads((out / "best_of_n.json").read_text())
    assert {p.name for p in (out / "model").iterdir()} == {"orm.safetensors", "prm.safetensors"}  # trunk + head
    from safetensors.torch import load_file
    assert load_file(str(out / "model" / "prm.safetensors"))["head.weight"].shape == (1, 32)


def test_end_to_end_mc_labels_on_another_dataset(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    verifier.main(["--model", tiny_model_dir, "--dataset", "arith", "--step-labels", "mc", "--mc-completions", "2",
                   "--n-train", "2", "--num-generations", "2", "--eval-size", "2", "--eval-n", "2", "--max-new-tokens",
                   "8", "--steps", "1", "--no-save", "--output-dir", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/step_correct"] is None for r in records if r["phase"] == "data"] == [False, True]
    assert not (out / "model").exists()


@pytest.mark.parametrize("argv, message", [
    (["--eval-n", "0"], "--eval-n must be >= 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--mc-completions", "0"], "--mc-completions must be >= 1"),
    (["--temperature", "nan"], "--temperature must be > 0"),
    (["--dataset", "chain:1"], "expected chain[:OPERANDS[:DIGITS[:SIGNS]]]"),
    (["--dataset", "chain:3:x"], "expected chain[:OPERANDS[:DIGITS[:SIGNS]]]"),
    (["--dataset", "chain:3:1:*"], "expected chain[:OPERANDS[:DIGITS[:SIGNS]]]"),
    (["--dataset", "arith"], "--step-labels exact needs the built-in 'chain' task"),
    (["--step-labels", "human"], "invalid choice"),
])
def test_bad_flags_give_one_clear_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        verifier.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_defaults_parse():
    args = verifier.parse_args([])
    assert args.chain == [3, 1, "+"] and args.verifier_model == args.model and args.step_labels == "exact"
    assert verifier.parse_args(["--dataset", "chain:4:2:+-"]).chain == [4, 2, "+-"]
    assert verifier.parse_args(["--dataset", "chain:4"]).chain == [4, 1, "+"]
