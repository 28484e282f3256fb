"""weak_to_strong.py: the aux confidence loss against hand values, the alpha schedule, PGR, pooling, the head (its
device and precision), one data order for the strong runs, a learning test, a tiny end-to-end run and bad flags (all
on the 2-layer char-level Llama of conftest.py, CPU, seconds)."""
import json
import math
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import weak_to_strong as w2s
from conftest import ROOT


def logits_for(p0):
    """2-class logits whose softmax has class-0 probability p0 (B,)."""
    p0 = torch.tensor(p0, dtype=torch.float32)
    return torch.stack([torch.log(p0), torch.log(1 - p0)], -1)


# ---- auxiliary confidence loss -------------------------------------------------------------------------------
def test_logconf_threshold_hardening_and_mixing_match_hand_values():
    logits = logits_for([0.9, 0.8, 0.3, 0.6])
    weak = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])  # mean class-1 rate q = 0.25
    # quantile(p0, 0.25), linear interpolation over sorted [0.3, 0.6, 0.8, 0.9]: position 0.75 -> 0.3 + 0.75 * 0.3
    # = 0.525; class 1 only where p0 < 0.525, i.e. row 2
    target = w2s.logconf_target(logits, weak, alpha=0.5)
    hard = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert torch.allclose(target, 0.5 * weak + 0.5 * hard)
    assert torch.allclose(target[1], torch.tensor([0.75, 0.25]))
    assert torch.allclose(w2s.logconf_target(logits, weak, alpha=0.0), weak)  # alpha 0: plain weak labels
    assert torch.allclose(w2s.logconf_target(logits, weak, alpha=1.0), hard)
    # the loss is Eq. 1: (1 - a) CE(f, w) + a CE(f, f_t), evaluated by hand
    logp = torch.log(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]))
    ce = lambda t: float(-(t * logp).sum(-1).mean())
    assert w2s.logconf_loss(logits, weak, 0.3).item() == pytest.approx(0.7 * ce(weak) + 0.3 * ce(hard), abs=1e-5)


def test_hardening_keeps_the_weak_class_balance_not_the_median():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 2, generator=g)
    for rate in (0.25, 0.5, 0.75):
        weak = torch.zeros(32, 2)
        weak[:, 1] = rate  # mean class-1 probability = rate
        weak[:, 0] = 1 - rate
        hard = w2s.logconf_target(logits, weak, alpha=1.0)
        assert int(hard[:, 1].sum()) == round(rate * 32)  # a quarter / half / three quarters predicted class 1
        p0 = torch.softmax(logits, -1)[:, 0]
        assert hard[:, 1][p0.argsort()][: round(rate * 32)].all()  # ...and they are the rows with the lowest p0


def test_ties_at_the_zero_head_all_harden_to_class_0_and_the_target_is_detached():
    logits = torch.zeros(8, 2, requires_grad=True)  # p0 = 0.5 everywhere: threshold 0.5, nothing is < 0.5
    weak = torch.tensor([[0.2, 0.8]] * 8)
    target = w2s.logconf_target(logits, weak, alpha=0.5)
    assert torch.allclose(target, torch.tensor([[0.6, 0.4]] * 8))
    assert not target.requires_grad
    w2s.logconf_loss(logits, weak, 0.5).backward()
    # d CE / d logits = softmax - target = (0.5 - 0.6, 0.5 - 0.4) / B
    assert torch.allclose(logits.grad, torch.tensor([[-0.1, 0.1]] * 8) / 8)


def test_alpha_schedule_linear_ramp_plateau_and_the_released_codes_jump():
    a = lambda s, **kw: w2s.aux_alpha(s, **kw)
    assert a(0.0) == 0.0
    assert a(0.1) == pytest.approx(0.25)  # halfway through the 20% warm-up
    assert a(0.2) == pytest.approx(0.5) and a(0.5) == 0.5 and a(0.99) == 0.5
    assert a(0.05, alpha_max=0.75, warmup_frac=0.1) == pytest.approx(0.375)
    rel = lambda s: w2s.aux_alpha(s, alpha_max=0.5, warmup_frac=0.1, schedule="released")
    assert rel(0.1) == pytest.approx(0.05) and rel(0.11) == 0.5  # climbs to 0.05, then jumps to 0.5


def test_pgr_formula_and_zero_or_negative_gap():
    assert w2s.pgr(0.6, 0.8, 0.7) == pytest.approx(0.5)
    assert w2s.pgr(0.6, 0.8, 0.8) == pytest.approx(1.0)
    assert w2s.pgr(0.6, 0.8, 0.55) == pytest.approx(-0.25)
    assert math.isnan(w2s.pgr(0.7, 0.7, 0.8)) and math.isnan(w2s.pgr(0.8, 0.7, 0.75))


# ---- the classifier --------------------------------------------------------------------------------------------
def test_last_non_pad_token_pooling_with_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)  # state = its flat index
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert w2s.last_token_state(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert w2s.last_token_state(hidden, left).flatten().tolist() == [3.0, 7.0]


def test_classifier_logits_do_not_depend_on_padding_side(tiny_model_dir):
    torch.manual_seed(0)
    model = w2s.TransformerWithHead(common.load_model(tiny_model_dir, torch.device("cpu"))).eval()
    torch.nn.init.normal_(model.head.weight)  # a non-zero head so the logits carry the pooled state
    tok = common.load_tokenizer(tiny_model_dir)
    texts = ["What is 2 + 3?", "Hi"]
    with torch.no_grad():
        alone = torch.cat([model(*w2s.tokenize_texts(tok, [t], "cpu")) for t in texts])
        tok.padding_side = "left"
        left = model(*w2s.tokenize_texts(tok, texts, "cpu"))
        tok.padding_side = "right"
        right = model(*w2s.tokenize_texts(tok, texts, "cpu"))
    assert torch.allclose(left, alone, atol=1e-5) and torch.allclose(right, alone, atol=1e-5)
    assert not torch.allclose(alone[0], alone[1])


def test_zero_init_head_gives_p_one_half_and_weak_layers_truncate(tiny_model_dir):
    model = w2s.TransformerWithHead(common.load_model(tiny_model_dir, torch.device("cpu")), num_layers=1)
    assert len(model.trunk.layers) == 1 and model.head.bias is None
    tok = common.load_tokenizer(tiny_model_dir)
    with torch.no_grad():
        probs = torch.softmax(model(*w2s.tokenize_texts(tok, ["a b c", "What is 1 + 1?"], "cpu")), -1)
    assert torch.equal(probs, torch.full((2, 2), 0.5))
    with pytest.raises(SystemExit, match="only 2 layers"):
        w2s.TransformerWithHead(common.load_model(tiny_model_dir, torch.device("cpu")), num_layers=5)


def test_head_is_created_on_the_trunks_device_in_fp32():
    """The head must follow the trunk (on a GPU a CPU head fails at the first forward): a trunk built on the meta
    device (no memory, no GPU needed) must give a wrapper whose every parameter and buffer is on meta. The wrapper
    is built OUTSIDE the device context, so only an explicit device= puts the head there."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.device("meta"):
            lm = LlamaForCausalLM(config).to(dtype)
        model = w2s.TransformerWithHead(lm, num_layers=1)
        devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
        assert devices == {"meta"}, devices
        assert model.head.weight.dtype == torch.float32  # fp32 master weights, also beside a bf16 trunk


def test_logits_are_fp32_under_bf16_autocast_and_with_a_bf16_trunk(tiny_model_dir):
    tok = common.load_tokenizer(tiny_model_dir)
    batch = w2s.tokenize_texts(tok, ["What is 1 + 1? Answer: 2"], "cpu")
    model = w2s.TransformerWithHead(common.load_model(tiny_model_dir, torch.device("cpu")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(*batch).dtype == torch.float32  # the head runs outside autocast
    bf16 = w2s.TransformerWithHead(common.load_model(tiny_model_dir, torch.device("cpu"), torch.bfloat16))
    assert bf16(*batch).dtype == torch.float32  # --dtype pure-bfloat16: bf16 trunk, fp32 head


def test_make_examples_labels_and_wrong_candidates():
    recs = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(200)]
    ex = w2s.make_examples(recs, random.Random(0))
    assert 0.4 < sum(e["label"] for e in ex) / len(ex) < 0.6
    for e, r in zip(ex, recs):
        shown = e["text"].split("Answer: ")[1]
        assert (shown == r["answer"]) == bool(e["label"])
    words = [{"question": f"Q{i}", "answer": a} for i, a in enumerate(["red", "blue", "green"] * 10)]
    for e, r in zip(w2s.make_examples(words, random.Random(1)), words):
        assert (e["text"].split("Answer: ")[1] == r["answer"]) == bool(e["label"])
    for e, r in zip(w2s.make_examples(recs, random.Random(2), wrong="near"), recs):  # near misses: +-1..9
        offset = int(e["text"].split("Answer: ")[1]) - int(r["answer"])
        assert (offset == 0) == bool(e["label"]) and abs(offset) <= 9
    with pytest.raises(SystemExit, match="integer answers"):
        w2s.make_examples(words, random.Random(0), wrong="near")
    with pytest.raises(SystemExit, match="same answer"):
        w2s.make_examples([{"question": "a", "answer": "1"}] * 4, random.Random(0))


# ---- learning and the whole experiment ---------------------------------------------------------------------------
TINY_RUN = ["--weak-layers", "1", "--dataset", "arith:add:1", "--n-train", "64", "--batch-size", "16", "--steps", "2",
            "--eval-size", "16", "--max-length", "80", "--lr", "1e-3"]


def test_training_learns_a_separable_task_above_chance(tiny_model_dir, tmp_path):
    """Label 1 iff the text starts with a digit; seeded, a few seconds."""
    rng = random.Random(0)
    letters, digits = "abcdefgh", "0123456789"
    make = lambda n: [(rng.choice(digits if y else letters) + "".join(rng.choice(letters) for _ in range(5)), y)
                      for y in (int(rng.random() < 0.5) for _ in range(n))]
    train, test = make(256), make(128)
    args = w2s.parse_args(["--steps", "40", "--batch-size", "16", "--lr", "3e-3", "--dtype", "float32", "--seed", "0"])
    autocast = lambda: torch.autocast("cpu", enabled=False)
    torch.manual_seed(0)
    model = w2s.TransformerWithHead(common.load_model(tiny_model_dir, torch.device("cpu")))
    tok = common.load_tokenizer(tiny_model_dir)
    y = torch.tensor([label for _, label in train])
    test_set = {"texts": [t for t, _ in test], "labels": torch.tensor([label for _, label in test])}
    before = w2s.classifier_accuracy(w2s.predict_probs(model, tok, test_set["texts"], 64, autocast, "cpu"),
                                     test_set["labels"])
    with open(tmp_path / "metrics.jsonl", "w") as metrics_file:
        acc, _ = w2s.train_run("ceiling", model, tok, [t for t, _ in train], F.one_hot(y, 2).float(), y, test_set,
                               args, 3e-3, autocast, tmp_path, metrics_file)
    assert before < 0.65 and acc > 0.85, (before, acc)


def test_the_three_strong_runs_see_the_same_batches_in_the_same_order(tiny_model_dir, tmp_path, monkeypatch):
    """Spy on the texts fed to every training forward (grad enabled; evaluation and labelling run without)."""
    seen = []
    tokenize = w2s.tokenize_texts

    def spy(tokenizer, texts, device):
        if torch.is_grad_enabled():
            seen.append(list(texts))
        return tokenize(tokenizer, texts, device)
    monkeypatch.setattr(w2s, "tokenize_texts", spy)
    w2s.main(["--weak-model", tiny_model_dir, "--strong-model", tiny_model_dir, *TINY_RUN, "--steps", "3",
              "--batch-size", "8", "--no-save", "--output-dir", str(tmp_path / "run")])
    assert len(seen) == 4 * 3  # weak, ceiling, w2s_xent, w2s_aux: 3 steps each
    weak, ceiling, xent, aux = seen[0:3], seen[3:6], seen[6:9], seen[9:12]
    assert ceiling == xent == aux
    assert len({t for batch in ceiling for t in batch}) > 8  # different batches within a run
    assert not {t for batch in weak for t in batch} & {t for batch in ceiling for t in batch}  # halves A, B


def test_main_end_to_end_writes_metrics_table_and_models(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    res = w2s.main(["--weak-model", tiny_model_dir, "--strong-model", tiny_model_dir, *TINY_RUN,
                    "--gradient-checkpointing", "--save-dtype", "bfloat16", "--output-dir", str(out)])
    assert set(res) >= {"weak", "ceiling", "w2s_xent", "w2s_aux", "pgr_xent", "pgr_aux"}
    assert json.loads((out / "args.json").read_text())["weak_layers"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert {r["phase"] for r in steps} == {"weak", "ceiling", "w2s_xent", "w2s_aux"}
    assert all({"step", "loss", "lr", "grad_norm", "step_time"} <= set(r) for r in steps)
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in steps)  # gradients flow (checkpointed)
    assert [r["alpha"] for r in steps if r["phase"] == "w2s_aux"] == [0.0, 0.5]  # step_frac 0, then 0.5 >= 0.2
    evals = {r["phase"]: r["eval/accuracy"] for r in records if "eval/accuracy" in r}
    assert evals == {p: res[p] for p in ("weak", "ceiling", "w2s_xent", "w2s_aux")}
    assert records[-1]["phase"] == "summary" and "pgr_aux" in records[-1]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["phase"] for s in samples] == ["weak", "ceiling", "w2s_xent", "w2s_aux"]
    saved = out / "model" / "w2s_aux.safetensors"
    assert (out / "model" / "w2s_xent.safetensors").exists()
    from safetensors.torch import load_file
    assert {v.dtype for v in load_file(str(saved)).values()} == {torch.bfloat16}  # --save-dtype
    loaded = w2s.load_classifier(tiny_model_dir, saved)
    assert loaded.head.weight.abs().sum() > 0  # the trained head, not a fresh zero one
    assert loaded.head.weight.dtype == torch.float32


BAD_FLAGS = [["--n-train", "0"], ["--max-length", "0"], ["--epochs", "0"], ["--steps", "0"], ["--batch-size", "0"],
             ["--prompts-per-step", "0"], ["--num-generations", "0"], ["--max-new-tokens", "0"], ["--eval-size", "0"],
             ["--eval-batch-size", "0"], ["--lr", "0"], ["--lr", "nan"], ["--weak-lr=-1e-4"],
             ["--warmup-frac", "0"], ["--warmup-frac", "1.5"], ["--temperature", "0"], ["--weak-layers", "-1"],
             ["--fewshot", "-1"], ["--alpha-max", "-0.1"], ["--alpha-max", "2"], ["--eval-every", "-1"]]


@pytest.mark.parametrize("bad", BAD_FLAGS, ids=lambda b: " ".join(b))
def test_bad_numeric_flags_give_one_clear_line_and_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        w2s.parse_args(bad)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and f"error: {bad[0].split('=')[0]}" in err[-1], err


def test_defaults_and_a_bad_flag_on_the_command_line():
    args = w2s.parse_args([])
    assert (args.weak_layers, args.weak_lr, args.lr, args.dataset) == (6, 5e-5, 1e-4, "arith:add:3x1")  # docs' defaults
    assert (args.dtype, args.batch_size, args.steps) == ("auto", 32, None)
    assert w2s.parse_args(["--prompts-per-step", "8"]).batch_size == 8  # the shared flag is an alias
    out = subprocess.run([sys.executable, str(ROOT / "weak_to_strong.py"), "--eval-batch-size", "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith("--eval-batch-size must be >= 1 (got 0)")
