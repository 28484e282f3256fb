"""Derive grading cases from math-verify's own test suite (huggingface/Math-Verify, Apache-2.0, tests/).

Reads the parametrized (gold, prediction, expected) triples of test_all.py, test_numina_cases.py,
test_open_thoughts.py, test_yujianll.py and test_boxed.py with `ast` (commented-out cases are not read) and writes
one JSON object a line: the prediction becomes our `response`, the gold our `reference`.

    python bench/mathverify_cases.py PATH/TO/Math-Verify [COMMIT] > tests/data/grading_mathverify.jsonl
"""
import ast
import json
import math
import re
import sys
from pathlib import Path

FILES = ["test_all.py", "test_numina_cases.py", "test_open_thoughts.py", "test_yujianll.py", "test_boxed.py"]

# Cases whose math-verify label contradicts our labelling conventions (shared/grading/README.md, docs/grading.md):
# (file, test, index within the test) -> (our label, reason). Everything else keeps math-verify's label.
RELABEL = {
    ("test_all.py", "test_complex_math_expressions", 7):
        (False, "0.33 is not 1/3: approximations earn no credit for exact answers (math-verify's test: precision=2)"),
    ("test_all.py", "test_complex_math_expressions", 13):
        (False, "2.6667 is not 8/3: approximations earn no credit for exact answers (math-verify's test: precision=2)"),
    ("test_all.py", "test_set_rel_assymetry", 3):
        (True, "-2 <= x <= 7 is the set [-2, 7]; math-verify's label comes from its allow_set_relation_comp=False"),
    ("test_yujianll.py", "test_string_extraction", 9):
        (False, "1 - 1/e and 1 + 1/e are different numbers"),
}


def _math_only(pred):
    """The expression when a prediction is a bare answer (one math span, or a few words with no sentence), else None.
    Bare answers are not model responses; they are given to `grade` boxed, the prose ones verbatim."""
    text = pred.strip()
    if re.search(r"\\(?:boxed|fbox)", text):
        return None  # already marked
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if text.startswith(left) and text.endswith(right) and len(text) > len(left) + len(right) \
                and left not in text[len(left):-len(right)]:
            return text[len(left):-len(right)].strip()
    outside = re.sub(r"\$[^$]*\$|\\[A-Za-z]+\{[^{}]*\}|\\[A-Za-z]+", " ", text)
    prose = r"[A-Za-z]{2,}\s+[A-Za-z]{2,}|^\s*answer\b|^\s*[A-Za-z]{3,}\s*:"
    if re.search(prose, outside, re.IGNORECASE) or "\\boxed" in text:
        return None
    return text.replace("$", " ").strip()


def _kind(gold, pred):
    """A coarse kind from the pair's text, first match wins (the same rule for every case)."""
    both = gold + " " + pred
    tail = lambda t: t if len(t) < 300 else t[-300:]
    short = tail(gold) + " " + tail(pred)
    rules = [("long_response", lambda: len(pred) > 600 or len(gold) > 600),
             ("matrix", lambda: re.search(r"matrix|\\begin\{array", both)),
             ("inequality_interval", lambda: re.search(r"\\cup|\\in\b|[<>]|\\[lg]eq?\b|\\[lg]t\b|\\neq?\b|!=",
                                                       short)),
             ("equation_label", lambda: "=" in short or "\\approx" in short),
             ("plus_minus", lambda: "\\pm" in short),
             ("ratio_time", lambda: re.search(r"\d\s*:\s*\d", short)),
             ("percent", lambda: re.search(r"%|percent|pct", short)),
             ("tuple_set_list", lambda: re.search(r"\d\s*[,;]\s*\S|\\\{|\band\b|\bor\b|\)\s*,", short)
              and not re.search(r"\d,\d{3}(?!\d)|\d\{,\}\d|,\\!", short)),
             ("number_format", lambda: re.search(r"\d[,.]\d|\d \d|\{,\}|,\\!|^\s*\.\d", short)),
             ("text_choice", lambda: re.search(r"\\text\{\(?[A-Za-z]|^\W*[A-Za-z]+\W*$", short)),
             ("units", lambda: re.search(r"\\(?:text|mbox|textnormal)|\d\s*[a-z]{1,5}\b|\^\\circ", short)),
             ("symbolic", lambda: re.search(r"(?<!\\)\b[a-z]\b|\\(?:sin|cos|tan|sec|sum)", short)),
             ("numeric", lambda: True)]
    return next(name for name, rule in rules if rule())


def _marker(text):
    """Whether a response carries a final-answer marker of our convention (independent of common.py)."""
    return bool(re.search(r"\\(?:boxed|fbox)\b|####|the\s+(?:final\s+)?answer\s+is|final\s+answer\s*:|^\s*answer\s*:",
                          text, re.IGNORECASE | re.MULTILINE))


def _value(node):
    """A literal, or an f-string over `math` (test_float_precision's f"{math.sqrt(17):.15f}")."""
    if isinstance(node, ast.JoinedStr):
        return eval(compile(ast.Expression(node), "<case>", "eval"), {"__builtins__": {}, "math": math})
    return ast.literal_eval(node)


def _cases(path):
    tree = ast.parse(path.read_text())
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for dec in fn.decorator_list:
            if not (isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "parametrize"):
                continue
            names = [n.strip() for n in ast.literal_eval(dec.args[0]).split(",")]
            body = ast.unparse(fn)
            options = {}
            if (m := re.search(r"precision=(\d+)", body)):
                options["precision"] = int(m[1])
            if (m := re.search(r"match_types=(\[[^\]]*\])", body)):
                options["match_types"] = ast.literal_eval(m[1])
            for i, node in enumerate(dec.args[1].elts):
                values = dict(zip(names, [_value(x) for x in node.elts]))
                extra = {k: v for k, v in values.items() if k not in ("gold", "pred", "expected", "result")}
                yield fn.name, i, values["gold"], values["pred"], int(values.get("expected", values.get("result"))), \
                    {**options, **extra}


def main(repo, commit=""):
    for name in FILES:
        for test, i, gold, pred, expected, options in _cases(Path(repo) / "tests" / name):
            label, reason = RELABEL.get((name, test, i), (bool(expected), None))
            bare = _math_only(pred)
            response = pred if bare is None else f"\\boxed{{{bare}}}"
            case = {"response": response, "reference": gold, "equivalent": label, "marker": _marker(response),
                    "category": _kind(gold, pred),
                    "source": f"huggingface/Math-Verify{'@' + commit[:10] if commit else ''} "
                              f"tests/{name}::{test}[{i}] (Apache-2.0)",
                    "mathverify_expected": bool(expected)}
            if options:
                case["mathverify_options"] = options
            if bare is not None:
                case["prediction"] = pred  # math-verify's original prediction, a bare answer
            if reason:
                case["relabelled"] = reason
            print(json.dumps(case, ensure_ascii=False))


if __name__ == "__main__":
    main(*sys.argv[1:])
