"""extract_answer / grade: our own cases for every grading convention, the labelled data files in tests/data
(math-verify's own test suite, constructed rewrites and near misses), the shared labelled dev set (when present
beside the checkout), pathological inputs (time-bounded), grading from worker threads, and batch speed."""
import json
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.grading_eval import math_verify_plain
from common import extract_answer, grade

DEV_CASES = Path(__file__).resolve().parents[1].parent / "shared" / "grading" / "dev_cases.jsonl"

# (response, reference, equivalent): written for this file, one or more per convention
OWN_CASES = [
    # extraction: the last complete \boxed{} (nested braces), \fbox, \boxed X; then ####; then "answer is"/"Answer:"
    ("We try \\boxed{3} first, then fix it: \\boxed{4}.", "4", True),
    ("We try \\boxed{3} first, then fix it: \\boxed{4}.", "3", False),
    ("Thus $\\boxed{\\sqrt{\\frac{1}{4}}}$.", "\\frac12", True),
    ("Hence \\fbox{$31$}.", "31", True),
    ("Hence $\\boxed 6$.", "6", True),
    ("She pays 2,000 + 450 dollars.\n#### 2,450", "2450", True),
    ("#### 64\nbecause 8^2 = 64", "64", True),
    ("Adding them, the final answer is 19.", "19", True),
    ("Answer: -11", "-11", True),
    ("**Final Answer:** **14**", "14", True),
    ("The roots are \\boxed{2} and \\boxed{5}.", "5, 2", True),
    # no final-answer marker: no credit even when the right number is there
    ("3 + 4 = 7, so there are 7 apples left", "7", False),
    ("", "7", False),
    # hedges and negations
    ("So it is $\\boxed{17}$ or $\\boxed{18}$.", "17", False),
    ("\\boxed{17 \\text{ or } 18}", "18", False),
    ("\\boxed{17, 18}", "17", False),
    ("\\boxed{17} \\quad \\text{or} \\quad \\boxed{18}", "18", False),
    ("The answer is not 17; it is 18.", "17", False),
    ("Is the answer 17? Maybe the answer is 17?", "17", False),
    # percent, units, degrees, dollars, thousands separators
    ("\\boxed{85\\%}", "85", True),
    ("The answer is 85%.", "85\\%", True),
    ("\\boxed{0.85}", "85\\%", False),
    ("\\boxed{36 \\text{ marbles}}", "36", True),
    ("The answer is 8 meters.", "8", True),
    ("\\boxed{72^\\circ}", "72", True),
    ("\\boxed{72^{\\circ}}", "108^\\circ", False),
    ("\\boxed{\\$7.25}", "7.25", True),
    ("\\boxed{\\$1,000,000}", "1000000", True),
    ("\\boxed{98,\\!765}", "98,765", True),
    ("\\boxed{9,87}", "987", False),
    # intervals keep their bracket types; tuples are ordered; sets and lists are not
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", True),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3]", False),
    ("\\boxed{(0,100]}", "(0, 100]", True),
    ("\\boxed{\\left(2, -\\frac{1}{2}\\right)}", "(2,-0.5)", True),
    ("\\boxed{(-\\frac{1}{2}, 2)}", "(2,-0.5)", False),
    ("\\boxed{\\{5, -2\\}}", "\\{-2, 5\\}", True),
    ("\\boxed{5, -2}", "-2, 5", True),
    ("\\boxed{1, 3, 5}", "1, 3", False),
    # assignments
    ("\\boxed{x = 3}", "3", True),
    ("\\boxed{x = -3}", "3", False),
    ("\\boxed{3}", "y = 3", True),
    ("\\boxed{x = 2, y = -1}", "(2, -1)", True),
    ("\\boxed{x^2 - 4 = 0}", "0", False),
    # mixed numbers are sums, not products
    ("\\boxed{3\\frac{1}{4}}", "\\frac{13}{4}", True),
    ("The answer is 3 1/4.", "3.25", True),
    ("\\boxed{3\\frac{1}{4}}", "\\frac{3}{4}", False),
    # tight numeric tolerance
    ("\\boxed{100001}", "100000", False),
    ("\\boxed{2^{-70}}", "2^{-71}", False),
    ("\\boxed{0.3333}", "\\frac{1}{3}", False),
    ("\\boxed{3.1416}", "\\pi", False),
    # negatives, fractions vs decimals, sqrt, pi, symbolic, text, choices
    ("\\boxed{-7}", "7", False),
    ("\\boxed{-\\frac{2}{3}}", "\\frac{-2}{3}", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{3}{8}}", "0.375", True),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", True),
    ("\\boxed{\\sqrt{3}}", "3", False),
    ("\\boxed{\\frac{\\pi}{4}}", "\\frac14\\pi", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{\\text{Yes}}", "yes", True),
    ("\\boxed{(B)}", "\\text{(B)}", True),
    # reference formats: AMC floats, OlympiadBench "$...$", a worked solution with its \boxed{} answer
    ("\\boxed{27}", "27.0", True),
    ("\\boxed{\\frac{1}{2}}", "$\\frac{1}{2}$", True),
    ("\\boxed{14}", "Adding, $9 + 5 = \\boxed{14}$.", True),
    # Minerva's form: the answer is X, not "The final answer is $X"
    ("Final Answer: The final answer is $(-6, 10)$. I hope it is correct.", "(-6,10)", True),
    ("Final Answer: The final answer is $14{,}916$. I hope it is correct.", "14916", True),
    ("Final Answer: The final answer is $[0,1)$. I hope it is correct.", "[0,1]", False),
    # several carets are no tower: sympy decides
    ("\\boxed{x^2+y^2}", "y^2+x^2", True),
    ("\\boxed{2^3 \\cdot 3^2}", "72", True),
    ("\\boxed{2^3 \\cdot 3^3}", "72", False),
    # equations: the reference's left side goes only when it is a label
    ("\\boxed{1}", "2x + z = 1", False),
    ("\\boxed{1}", "k = 1", True),
    ("\\boxed{x = -5, p = \\frac{14}{3}}", "-5, \\frac{14}{3}", True),
    ("\\boxed{x = \\frac{14}{3}, p = -5}", "-5, \\frac{14}{3}", False),
    ("\\boxed{a_{37} = 19, a_3 = 2}", "a_3 = 2, a_{37} = 19", True),
    ("\\boxed{-34x-45y+20z-100=0}", "34x+45y-20z+100=0", True),
    # clock times are not divisions by zero
    ("\\boxed{12:00}", "1:00", False),
    ("\\boxed{12:00}", "12:00", True),
    # sets and tuples in other brackets, "and"/"or" lists, plus-minus
    ("\\boxed{\\{1, 2\\}}", "2, 1", True),
    ("\\boxed{(7,11) \\text{ or } (11,7)}", "(11,7), (7,11)", True),
    ("\\boxed{\\pm 2021}", "-2021, 2021", True),
    ("\\boxed{2021}", "\\pm 2021", False),
    # inequalities are intervals with their brackets
    ("\\boxed{-2 \\le x \\le 7}", "x \\in [-2,7]", True),
    ("\\boxed{x \\ge 5}", "(5, \\infty)", False),
    ("\\boxed{-793 < a < 10}", "(-793, 10)", True),
    # matrices in any bracket environment
    ("\\boxed{\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("\\boxed{\\begin{bmatrix} 1 & 2 \\\\ 3 & 5 \\end{bmatrix}}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", False),
    # a 16-digit decimal is the fraction; a 4-digit one is not
    ("\\boxed{0.0833333333333333}", "\\frac{1}{12}", True),
    ("\\boxed{0.0833}", "\\frac{1}{12}", False),
    # text choices
    ("\\boxed{\\text{(C)}}", "C", True),
    # a reference chain of equalities ends in its value; a 2-sided equation is not its right side
    ("\\boxed{0}", "$1 = \\zzz = x = 0$", True),
    ("\\boxed{1}", "$1 = \\zzz = x = 0$", False),
    ("\\boxed{4}", "x = 2 + 2 = 4", True),
    ("\\boxed{5}", "x = 2 + 2 = 4", False),
    ("\\boxed{2 + 2}", "x = 2 + 2 = 4", True),
    ("\\boxed{0}", "x^2 - 4 = 0", False),
    # "and"/"or" glued to their neighbours still join items (an "or" list is no hedge credit for one item)
    ("\\boxed{W(x)=1orW(x)=-1}", "W(n) = 1 \\text{ and } W(n) = -1", True),
    ("\\boxed{W(x)=1orW(x)=2}", "W(n) = 1 \\text{ and } W(n) = -1", False),
    ("\\boxed{3or4}", "3, 4", True),
    ("\\boxed{3or4}", "3", False),
    ("\\boxed{(1,2)and(3,4)}", "(3,4), (1,2)", True),
    ("\\boxed{(1,2)and(3,4)}", "(1,2)", False),
    # a reference whose closing brace was lost: the box's content, nested braces included
    ("\\boxed{W(x)=1orW(x)=-1}", "\\\\boxed{W(n) = 1 \\\\text{ and } W(n) = -1", True),
    ("\\boxed{W(x)=1}", "\\\\boxed{W(n) = 1 \\\\text{ and } W(n) = -1", False),
    ("\\boxed{1 + \\frac{1}{2}}", "\\boxed{1 + \\frac{1}{2}", True),
    ("\\boxed{1 + \\frac{1}{3}}", "\\boxed{1 + \\frac{1}{2}", False),
    # a reference of boxes separated by symbols only lists them all; with words between, the last box is the answer
    ("\\boxed{{35 cm,4}}", "$\\boxed{35 cm} ++++++ \\boxed{4}$", True),
    ("\\boxed{4}", "$\\boxed{35 cm} ++++++ \\boxed{4}$", False),
    ("\\boxed{35, 5}", "$\\boxed{35 cm} ++++++ \\boxed{4}$", False),
    ("\\boxed{4}", "We get \\boxed{3} first, then the answer \\boxed{4}.", True),
    ("\\boxed{3, 4}", "We get \\boxed{3} first, then the answer \\boxed{4}.", False),
    # a final answer stated as a sentence with one number, nothing qualifying or scaling it
    ("Final Answer: Jane started growing Sphere 3 hours ago. I hope it is correct.", "3", True),
    ("Final Answer: Jane started growing Sphere 4 hours ago. I hope it is correct.", "3", False),
    ("Final Answer: Jane did not start growing Sphere 3 hours ago.", "3", False),
    ("Final Answer: Jane wasn't growing Sphere 3 hours ago.", "3", False),
    ("Final Answer: Jane started growing Sphere at least 3 hours ago.", "3", False),
    ("Final Answer: Sphere started 3 hours ago and Rod 8 hours ago.", "3", False),
    ("Final Answer: Jane earned 3 million dollars.", "3", False),
    ("Final Answer: Jane has 3 and a half apples.", "3", False),
    ("Final Answer: Jane ran 1250.5 meters in all.", "1250.5", True),
    ("Final Answer: I think it might be 3", "3", False),
    ("Final Answer: see step 3 above", "3", False),
    ("Final Answer: Jane cannot have started 3 hours ago", "3", False),
    ("Final Answer: June 3", "June 3", True),
    ("So Jane started growing Sphere 3 hours ago.", "3", False),  # no final-answer marker: no credit
    # a subscript digit then a digit is no "5 5" fragment
    ("\\boxed{\\log_2 8}", "3", True),
    ("\\boxed{\\log_2 8}", "4", False),
    ("\\boxed{2 8}", "16", False),
    ("\\boxed{x_1 2}", "2", False),
]


@pytest.mark.parametrize("response,reference,expected", OWN_CASES)
def test_own_cases(response, reference, expected):
    assert grade(response, reference) is expected, extract_answer(response)


@pytest.mark.parametrize("text,expected", [
    ("The answer is 3.\n#### 4\nso \\boxed{5}", "5"),  # \boxed first ...
    ("The answer is 3.\n#### 4", "4"),  # ... then #### ...
    ("First 2, then 3. So the final answer is 6.", "6"),  # ... then "the answer is"
    ("Answer: 12", "12"),
    ("\\boxed{3} and then \\boxed{4", "3"),  # an unterminated box is not an answer
    ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
    ("\\boxed{\\boxed{5}}", "5"),
    ("\\fbox{8}", "8"),
    ("\\boxed 7.", "7"),
    ("\\boxed{1}, \\boxed{2} and \\boxed{3}", "1, 2, 3"),
    ("<think>maybe \\boxed{1}</think>The answer is 2.", "2"),
    ("There are 3 + 4 = 7 apples.", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def _dev_cases():
    if not DEV_CASES.exists():
        return []
    cases = [json.loads(line) for line in DEV_CASES.read_text().splitlines() if line.strip()]
    return [pytest.param(c, id=f"{c['category'].replace(':', '_')}-{i}") for i, c in enumerate(cases)]


DEV = _dev_cases()
needs_dev = pytest.mark.skipif(not DEV, reason=f"the shared labelled dev set is not beside this checkout ({DEV_CASES})")


@needs_dev
@pytest.mark.parametrize("case", DEV or [None])
def test_dev_case(case):
    assert grade(case["response"], case["reference"]) is case["equivalent"], extract_answer(case["response"])


@needs_dev
def test_dev_accuracy_and_no_false_positives():
    cases = [p.values[0] for p in DEV]
    verdicts = [grade(c["response"], c["reference"]) for c in cases]
    accuracy = sum(v is c["equivalent"] for v, c in zip(verdicts, cases)) / len(cases)
    strict = [c for v, c in zip(verdicts, cases) if v and not c["equivalent"]
              and (c["category"].startswith("adversarial_") or "no_answer" in c["category"])]
    assert accuracy >= 0.97 and not strict, (accuracy, strict)


DATA = Path(__file__).resolve().parent / "data"
# accuracy (on the cases with a final-answer marker) each data file must reach; false positives: none at all
DATA_TARGETS = {"grading_mathverify.jsonl": 0.95, "grading_constructed.jsonl": 0.99, "grading_own.jsonl": 1.0}
# kinds where grade is still below plain math-verify, with how many cases it may trail by (docs/grading.md, known
# limitations); any other kind must be at least as good as math-verify
KNOWN_BELOW = {}


def _data(name):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", DATA_TARGETS)
def test_data_file_accuracy_and_no_false_positives(name):
    cases = _data(name)
    verdicts = [grade(c["response"], c["reference"]) for c in cases]
    false_positives = [c for v, c in zip(verdicts, cases) if v and not (c["equivalent"] and c.get("marker", True))]
    marked = [(v, c) for v, c in zip(verdicts, cases) if c.get("marker", True)]
    accuracy = sum(v is c["equivalent"] for v, c in marked) / len(marked)
    assert not false_positives, [(c["reference"], extract_answer(c["response"])) for c in false_positives]
    assert accuracy >= DATA_TARGETS[name], accuracy


@pytest.mark.parametrize("name", DATA_TARGETS)
def test_no_kind_below_math_verify(name):
    """Per kind, on the marked cases: grade right at least as often as math-verify alone (up to KNOWN_BELOW)."""
    right = defaultdict(lambda: [0, 0])
    for c in _data(name):
        if c.get("marker", True):
            right[c["category"]][0] += grade(c["response"], c["reference"]) is c["equivalent"]
            right[c["category"]][1] += math_verify_plain(c["response"], c["reference"]) is c["equivalent"]
    below = {kind: mv - ours for kind, (ours, mv) in right.items() if ours < mv}
    assert all(gap <= KNOWN_BELOW.get((name, kind), 0) for kind, gap in below.items()), below


def test_data_files_are_well_formed():
    for name in DATA_TARGETS:
        for c in _data(name):
            assert isinstance(c["response"], str) and isinstance(c["reference"], str), c
            assert isinstance(c["equivalent"], bool) and c["category"] and c["source"], c


def _garbage(n, chars="\\{}$^_()[]0123456789abcxyz +-=,.!#"):
    return "".join(chars[i * 7919 % len(chars)] for i in range(n))


PATHOLOGICAL = {
    "deep_frac": ("\\boxed{" + "\\frac{1}{" * 200 + "2" + "}" * 200 + "}", "2"),
    "garbage": (_garbage(10_000), "5"),
    "garbage_boxed": ("\\boxed{" + _garbage(3000) + "}", "5"),
    "garbage_short_boxed": ("\\boxed{" + _garbage(150) + "}", _garbage(149)),
    "tower": ("\\boxed{10^{10^{10}}}", "5"),
    "tower_no_braces": ("\\boxed{10^10^10}", "10^{100}"),
    "huge_exponent": ("\\boxed{2^{99999999}}", "2^{99999998}"),
    "huge_factorial": ("\\boxed{99999!}", "5"),
    "huge_binomial": ("\\boxed{\\binom{100000}{50000}}", "5"),
    "polynomial_power": ("\\boxed{(x+1)^{2000}}", "x^{2000}+1"),
    "exp_tower": ("\\boxed{e^{e^{e^{e^{e^{10}}}}}}", "e^{e^{e^{e^{e^{11}}}}}"),
    "long_boxed_sum": ("\\boxed{" + "1+" * 5000 + "1}", "5001"),
    "long_list": ("\\boxed{" + ",".join(map(str, range(3000))) + "}", ",".join(map(str, range(3001)))),
    "huge_integer": ("\\boxed{" + "9" * 6000 + "}", "9" * 5999 + "8"),
    "unterminated_boxes": ("\\boxed{" * 5000, "5"),
    "long_response": ("word " * 200_000 + "\\boxed{5}", "5"),
    "infinite_sum": ("\\boxed{\\sum_{n=1}^{\\infty} \\frac{\\sin n}{n^3}}", "1"),  # 15 s if sympy evaluated it
    "many_unions": ("\\boxed{" + "\\cup".join(["(0,1)"] * 2000) + "}", "(0,1)"),
    "not_a_string": (None, "5"),
    "numeric_reference": ("\\boxed{5}", 5.0),
}


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_pathological_inputs_are_fast_and_safe(name):
    grade("\\boxed{\\sqrt{2}}", "\\sqrt{2} + x")  # warm-up: imports sympy and math-verify
    response, reference = PATHOLOGICAL[name]
    start = time.perf_counter()
    verdict = grade(response, reference)
    assert time.perf_counter() - start < 2.0
    assert isinstance(verdict, bool)


def _fresh_cases(seed):
    """Cases no earlier test graded (the grader caches), with their labels, needing sympy and math-verify too."""
    cases = []
    for i in range(seed, seed + 12):
        cases += [(f"So the answer is $\\boxed{{{i}\\sqrt{{2}}}}$.", f"\\sqrt{{{2 * i * i}}}", True),
                  (f"So the answer is $\\boxed{{(x+{i})^2}}$.", f"x^2+{2 * i}x+{i * i}", True),
                  (f"#### {i + 1}", str(i), False)]
    return cases


def test_grading_in_worker_threads():
    cases = _fresh_cases(1000)
    with ThreadPoolExecutor(max_workers=4) as pool:  # math-verify's signal timeouts would raise here
        threaded = list(pool.map(lambda c: grade(c[0], c[1]), cases))
    assert threaded == [c[2] for c in cases]
    assert threaded == [grade(c[0], c[1]) for c in cases]


def test_batch_of_32_is_fast():
    grade("The answer is \\boxed{1}.", "1")  # warm-up
    batch = [(f"Adding the parts step by step gives the total. The answer is \\boxed{{{i + 40}}}.", str(i + 40 + i % 2))
             for i in range(32)]
    start = time.perf_counter()
    verdicts = [grade(response, reference) for response, reference in batch]
    assert time.perf_counter() - start < 2.0
    assert verdicts == [i % 2 == 0 for i in range(32)]


COLD_START = """
import sys, time
import common
common.warm_up_grader()  # as every script's load_reward_fn does at setup
loaded = "math_verify" in sys.modules, "sympy.concrete.summations" in sys.modules  # before the first call
start = time.perf_counter()
verdict = common.grade(sys.argv[1], sys.argv[2])
print(verdict, time.perf_counter() - start, *loaded)
"""


def test_first_call_in_a_fresh_process_is_warm():
    """The scripts warm the grader up at setup (math-verify, sympy, a first sum): the first grade call that needs
    math-verify, made once it has ended, pays none of those one-time costs (1-1.6 s without it)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", COLD_START, "\\boxed{\\sum_{k=0}^{m} 2k}", "m(m+1)"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True).stdout
    verdict, seconds, imported, summation = out.split()
    assert (verdict, imported, summation) == ("True", "True", "True")
    assert float(seconds) < 1.0
