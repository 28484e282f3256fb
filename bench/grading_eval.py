"""Accuracy of common.grade and of plain math-verify on the labelled grading sets, per kind.

    python bench/grading_eval.py [FILE.jsonl ...] [--errors] [--no-cold]

Default files: tests/data/grading_*.jsonl and ../shared/grading/dev_cases.jsonl (when present). Each line:
{"response", "reference", "equivalent", "category", "source"[, "marker"]}. Cases with "marker": false (no final-answer
marker in the response) are counted apart: `grade` gives them no credit by convention, so they are scored against
"not credited" for grade; the per-kind tables cover the marked cases, where both graders are scored against the label.
Plain math-verify is `verify(parse(gold), parse(response))` with its default configuration (gold wrapped in $...$
when it has no math delimiters). FP: credited though not equivalent; FN: not credited though equivalent. Last,
unless --no-cold: the first grade call in a fresh process (cold_start).
"""
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT = sorted((ROOT / "tests" / "data").glob("grading_*.jsonl")) + \
    [p for p in [ROOT.parent / "shared" / "grading" / "dev_cases.jsonl"] if p.exists()]


def math_verify_plain(response, reference):
    from math_verify import parse, verify
    gold = reference if any(t in reference for t in ("$", "\\boxed", "\\[", "\\(")) else f"${reference}$"
    try:
        return bool(verify(parse(gold), parse(response)))
    except Exception:
        return False


def _score(rows):
    """rows: (label, verdict) -> (n, accuracy %, FP, FN)."""
    fp = sum(v and not lab for lab, v in rows)
    fn = sum(lab and not v for lab, v in rows)
    return len(rows), 100.0 * (len(rows) - fp - fn) / max(len(rows), 1), fp, fn


WARM_UP = [("\\boxed{\\sqrt{2}}", "\\sqrt{2} + x"),
           ("\\boxed{F_n = \\sum_{k=0}^{n-2} F_k}", "F_n = \\sum_{k=0}^{n-1} F_k"),
           ("\\boxed{\\int_0^1 x dx}", "\\frac12"), ("\\boxed{x^2 + y^2 = 1}", "y^2 + x^2 = 1")]


def evaluate(path, show_errors=False):
    """Print the tables of one file; return the kinds where grade is below math-verify. The timings exclude the
    one-time costs (imports, sympy's first sum), paid by WARM_UP."""
    from common import extract_answer, grade
    for response, reference in WARM_UP:
        grade(response, reference), math_verify_plain(response, reference)
    cases = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    kinds, unmarked, slowest = defaultdict(lambda: ([], [])), ([], []), (0.0, None)
    for case in cases:
        start = time.perf_counter()
        ours = grade(case["response"], case["reference"])
        took = time.perf_counter() - start
        where = f"{case['category']}, {case['source'].split(' (')[0].split(' ')[-1][-50:]}"
        slowest = max(slowest, (took, where), key=lambda t: t[0])
        theirs = math_verify_plain(case["response"], case["reference"])
        if case.get("marker", True):
            kinds[case["category"]][0].append((case["equivalent"], ours))
            kinds[case["category"]][1].append((case["equivalent"], theirs))
            if show_errors and ours != case["equivalent"]:
                print(f"  {'FP' if ours else 'FN'} [{case['category']}] ref={case['reference'][-80:]!r} "
                      f"got={extract_answer(case['response'])!r} mv={theirs}", file=sys.stderr)
        else:
            unmarked[0].append((False, ours))
            unmarked[1].append((case["equivalent"], theirs))
    marked = [sum((k[i] for k in kinds.values()), []) for i in (0, 1)]
    print(f"\n### {Path(path).name}: {len(cases)} cases, {len(marked[0])} with a final-answer marker\n")
    print("| kind | n | grade acc | grade FP | grade FN | math-verify acc | mv FP | mv FN |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    below = []
    for kind in sorted(kinds) + ["**all marked**"]:
        ours, theirs = (marked if kind.startswith("**") else kinds[kind])
        (n, acc, fp, fn), (_, macc, mfp, mfn) = _score(ours), _score(theirs)
        flag = " (below)" if acc < macc else ""
        below += [kind] if acc < macc else []
        print(f"| {kind} | {n} | {acc:.1f}{flag} | {fp} | {fn} | {macc:.1f} | {mfp} | {mfn} |")
    if unmarked[0]:
        (n, acc, fp, fn), (_, macc, mfp, mfn) = _score(unmarked[0]), _score(unmarked[1])
        print(f"| no marker (no credit by convention) | {n} | {acc:.1f} | {fp} | {fn} | {macc:.1f} | {mfp} | {mfn} |")
    print(f"\nslowest grade call: {slowest[0] * 1000:.0f} ms ({slowest[1]})")
    return below


COLD = """
import sys, time
start = time.perf_counter()
import common
imported = time.perf_counter()
if sys.argv[1] == "after":
    common._WARM_UP.join()
warm = time.perf_counter()
common.grade(sys.argv[2], sys.argv[3])
print(imported - start, warm - imported, time.perf_counter() - warm)
"""


def cold_start():
    """The first grade call in fresh processes, one that reaches math-verify (a sum, sympy's slowest first use): right
    after `import common` (it waits for the rest of the background warm-up) and once the warm-up is done."""
    import subprocess
    response, reference = WARM_UP[1]
    for when in ("at-import", "after"):
        out = subprocess.run([sys.executable, "-c", COLD, when, response, reference], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
        imported, warm, call = (float(x) for x in out)
        waited = f", warm-up ended {warm:.2f} s later" if when == "after" else ""
        print(f"cold start, first call {when}: import common {imported:.2f} s{waited}, first call {call * 1000:.0f} ms")


def main(argv):
    logging.disable(logging.WARNING)
    files = [a for a in argv if not a.startswith("--")] or DEFAULT
    below = {f: evaluate(f, "--errors" in argv) for f in files}
    print("\nkinds where grade < math-verify:", {Path(f).name: b for f, b in below.items() if b} or "none")
    if "--no-cold" not in argv:
        cold_start()


if __name__ == "__main__":
    main(sys.argv[1:])
