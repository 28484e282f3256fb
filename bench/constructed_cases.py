"""Construct grading cases from the answer formats of the eval sets in ../shared/data (read, never copied).

For each rule, up to PER_RULE references per set (MATH500 `answer`, Minerva's last \\boxed{} of `solution`,
OlympiadBench `final_answer`, AMC23 `answer`; read as common.normalize_records reads them) are rewritten into an
equivalent answer ("rewrite:*") or a near miss ("near:*") and wrapped in a response format; the label comes from the
rule. Rules only fire where their label is certain (e.g. a tuple swap needs two different entries).

    python bench/constructed_cases.py > tests/data/grading_constructed.jsonl
"""
import json
import random
import re
import sys
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PER_RULE = 6
INT = r"-?\d+"
FRAC = r"(-?)\\frac\{(\d+)\}\{(\d+)\}"


def _last_boxed(text):
    i = text.rfind("\\boxed{")
    depth, start = 0, i + len("\\boxed{")
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth < 0:
            return text[start:j]
    return None


def _strip(v):
    v = str(v).strip()
    return v[1:-1].strip() if len(v) > 1 and v[0] == v[-1] == "$" else v


def references():
    """(set name, reference string) pairs, in file order."""
    refs = []
    for line in (DATA / "math500.jsonl").read_text().splitlines():
        refs.append(("MATH500", _strip(json.loads(line)["answer"])))
    for line in (DATA / "minerva_math.jsonl").read_text().splitlines():
        if (b := _last_boxed(json.loads(line)["solution"])):
            refs.append(("Minerva", _strip(b)))
    for line in (DATA / "olympiadbench.jsonl").read_text().splitlines():
        refs.append(("OlympiadBench", ", ".join(_strip(v) for v in json.loads(line)["final_answer"])))
    for line in (DATA / "amc23.jsonl").read_text().splitlines():
        a = json.loads(line)["answer"]
        refs.append(("AMC23", str(int(a)) if float(a).is_integer() else repr(a)))
    return refs


def _split_top(s):
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts, cur = parts + [cur.strip()], ""
        else:
            cur += ch
    return parts + [cur.strip()]


def _balanced(s):
    depth = 0
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")
        if depth < 0:
            return False
    return depth == 0


def _is_list(r):
    """Several top-level items, and not one number written with thousands separators (58,500; 32,\\!348)."""
    return len(_split_top(r)) > 1 and not re.search(r"\d,(?:\\!)?\s?\d{3}\b", r)


def _thousands(n, sep):
    s = f"{abs(int(n)):,}".replace(",", sep)
    return ("-" if int(n) < 0 else "") + s


def _factorized(n):
    n, f, p = int(n), {}, 2
    while p * p <= n:
        while n % p == 0:
            f[p], n = f.get(p, 0) + 1, n // p
        p += 1
    if n > 1:
        f[n] = f.get(n, 0) + 1
    return f


def _terminating(q):
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _decimal(q, digits):
    return f"{float(q):.{digits}f}"


def _frac(r):
    m = re.fullmatch(FRAC, r)
    return (Fraction(int(m[2]), int(m[3])) * (-1 if m[1] else 1), m) if m else (None, None)


def _signed_terms(expr):
    """Top-level signed terms of a sum, or None."""
    terms, depth, cur = [], 0, ""
    for i, ch in enumerate(expr):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch in "+-" and depth == 0 and cur.strip() and not cur.rstrip().endswith(("^", "_", "\\pm", "(")):
            terms.append(cur.strip())
            cur = ch
        else:
            cur += ch
    terms.append(cur.strip())
    return terms if len(terms) > 1 else None


def _join(terms):
    out = ""
    for t in terms:
        t = t if t[0] in "+-" else "+" + t
        out += (" " + t[0] + " " + t[1:].strip()) if out else (t[1:].strip() if t[0] == "+" else t)
    return out


# Each rule: reference -> rewritten answer or None (rule does not apply). (name, equivalent, rule)
RULES = [
    ("rewrite:same", True, lambda r: r),
    ("rewrite:dfrac", True, lambda r: r.replace("\\frac", "\\dfrac") if "\\frac" in r else None),
    ("rewrite:slash_fraction", True,
     lambda r: f"{m[1]}{m[2]}/{m[3]}" if (m := re.fullmatch(FRAC, r)) else None),
    ("rewrite:fraction_to_decimal", True,
     lambda r: str(float(q)) if (q := _frac(r)[0]) is not None and _terminating(q) and q.denominator > 1 else None),
    ("rewrite:decimal_to_fraction", True,
     lambda r: f"\\frac{{{q.numerator}}}{{{q.denominator}}}" if re.fullmatch(r"\d*\.\d+", r)
     and (q := Fraction(r)).denominator > 1 else None),
    ("rewrite:integer_dot_zero", True, lambda r: r + ".0" if re.fullmatch(INT, r) else None),
    ("rewrite:thousands_comma", True, lambda r: _thousands(r, ",") if re.fullmatch(INT, r) and abs(int(r)) >= 1000
     else None),
    ("rewrite:thousands_braces", True, lambda r: _thousands(r, "{,}") if re.fullmatch(INT, r) and abs(int(r)) >= 1000
     else None),
    ("rewrite:thousands_thinspace", True, lambda r: _thousands(r, ",\\!") if re.fullmatch(INT, r)
     and abs(int(r)) >= 1000 else None),
    ("rewrite:factorized_integer", True,
     lambda r: " \\cdot ".join(f"{p}^{{{e}}}" if e > 1 else str(p) for p, e in f.items())
     if re.fullmatch(r"\d+", r) and 1 < int(r) < 10**7 and len(f := _factorized(r)) >= 2
     and max(f.values()) > 1 else None),
    ("rewrite:label_value", True, lambda r: f"x = {r}" if "=" not in r and len(_split_top(r)) == 1 else None),
    ("rewrite:left_right", True,
     lambda r: f"\\left{r[0]} {r[1:-1]} \\right{r[-1]}" if r[:1] in "([" and r[-1:] in ")]"
     and _balanced(r[1:-1]) and len(_split_top(r[1:-1])) > 1 and "\\left" not in r else None),
    ("rewrite:list_reversed", True,
     lambda r: ", ".join(reversed(p)) if _is_list(r) and (p := _split_top(r)) and len(set(p)) == len(p)
     and "=" not in r else None),
    ("rewrite:list_as_set", True,
     lambda r: "\\{" + ", ".join(p) + "\\}" if _is_list(r) and (p := _split_top(r)) and "=" not in r
     and not re.search(r"[a-zA-Z]{3,}", r.replace("\\frac", "").replace("\\sqrt", "")) else None),
    ("rewrite:sqrt_shorthand", True,
     lambda r: re.sub(r"\\sqrt\{(\d)\}", r"\\sqrt\1", r) if re.search(r"\\sqrt\{\d\}", r) else None),
    ("rewrite:terms_reordered", True,
     lambda r: _join(t[::-1]) if "=" not in r and "," not in r and "\\pm" not in r
     and not re.search(r"\de[-+]|\\begin|\$", r)
     and (t := _signed_terms(r)) and len(set(t)) == len(t) else None),
    ("rewrite:pm_expanded", True,
     lambda r: f"{m[1].strip()} + {m[2].strip()}, {m[1].strip()} - {m[2].strip()}"
     if (m := re.fullmatch(r"([^,\\{}=]+?)\s*\\pm\s*([^,=]+)", r)) and m[1].strip() else None),
    ("rewrite:bmatrix", True, lambda r: r.replace("pmatrix", "bmatrix") if "pmatrix" in r else None),
    ("rewrite:choice_letter", True,
     lambda r: m[1] if (m := re.fullmatch(r"\\text(?:bf)?\{\(([A-E])\)\}", r)) else None),
    ("rewrite:degrees_dropped", True, lambda r: m[1] if (m := re.fullmatch(r"(\d+)\^\{?\\circ\}?", r)) else None),
    ("rewrite:percent_dropped", True, lambda r: m[1] if (m := re.fullmatch(r"(\d+(?:\.\d+)?)\\%", r)) else None),
    ("near:integer_plus_one", False, lambda r: str(int(r) + 1) if re.fullmatch(INT, r) else None),
    ("near:integer_negated", False, lambda r: str(-int(r)) if re.fullmatch(INT, r) and int(r) != 0 else None),
    ("near:integer_times_ten", False, lambda r: str(10 * int(r)) if re.fullmatch(INT, r) and int(r) != 0 else None),
    ("near:thousands_as_list", False,
     lambda r: _thousands(r, ", ") if re.fullmatch(r"\d+", r) and int(r) >= 1000 else None),
    ("near:hedge_or", False,
     lambda r: f"{r} \\text{{ or }} {int(r) + 1}" if re.fullmatch(INT, r) else None),
    ("near:hedge_two_numbers", False, lambda r: f"{r}, {int(r) + 1}" if re.fullmatch(INT, r) else None),
    ("near:fraction_flipped", False,
     lambda r: f"{m[1]}\\frac{{{m[3]}}}{{{m[2]}}}" if (m := re.fullmatch(FRAC, r)) and m[2] != m[3] else None),
    ("near:fraction_rounded", False,
     lambda r: _decimal(q, 4) if (q := _frac(r)[0]) is not None and not _terminating(q) else None),
    ("near:decimal_last_digit", False,
     lambda r: r[:-1] + str((int(r[-1]) + 1) % 10) if re.fullmatch(r"-?\d*\.\d*[1-8]", r) else None),
    ("near:tuple_swapped", False,
     lambda r: f"{r[0]}{p[1]}, {p[0]}{r[-1]}" if r[:1] == "(" and r[-1:] == ")" and len(_split_top(r)) == 1
     and len(p := _split_top(r[1:-1])) == 2 and p[0] != p[1] and not re.search(r"\\infty", r) else None),
    ("near:tuple_entry_changed", False,
     lambda r: f"{r[0]}{', '.join(p[:-1] + [str(int(p[-1]) + 1)])}{r[-1]}" if r[:1] in "([" and r[-1:] in ")]"
     and len(_split_top(r)) == 1 and len(p := _split_top(r[1:-1])) >= 2 and re.fullmatch(INT, p[-1]) else None),
    ("near:interval_bracket", False,
     lambda r: "[" + r[1:] if r[:1] == "(" and r[-1:] in ")]" and "," in r and not r.startswith("(-\\infty")
     and len(_split_top(r)) == 1 else None),
    ("near:list_item_dropped", False,
     lambda r: ", ".join(p[:-1]) if _is_list(r) and (p := _split_top(r)) and p[-1] not in p[:-1] and "=" not in r
     else None),
    ("near:sqrt_changed", False,
     lambda r: re.sub(r"\\sqrt\{(\d+)\}", lambda m: f"\\sqrt{{{int(m[1]) + 1}}}", r, count=1)
     if re.search(r"\\sqrt\{\d+\}", r) and "," not in r else None),
    ("near:sign_flipped", False,
     lambda r: _join([("-" if t[0] != "-" else "+") + t.lstrip("+-")] + terms[1:])
     if "=" not in r and "," not in r and "\\pm" not in r and not re.search(r"\de[-+]|\\begin|\$", r)
     and (terms := _signed_terms(r))
     and re.search(r"[a-z]|\\sqrt|\\pi", r) and (t := terms[0]) and len(set(terms)) == len(terms) else None),
    ("near:matrix_entry", False,
     lambda r: re.sub(r"(\\begin\{pmatrix\}\s*)(-?\d+)", lambda m: m[1] + str(int(m[2]) + 1), r, count=1)
     if re.search(r"\\begin\{pmatrix\}\s*-?\d+\b", r) else None),
    ("near:choice_letter", False,
     lambda r: f"\\text{{({'B' if m[1] != 'B' else 'C'})}}" if (m := re.fullmatch(r"\\text\{\(([A-E])\)\}", r))
     else None),
    ("near:factorized_exponent", False,
     lambda r: " \\cdot ".join(f"{p}^{{{e + (i == 0)}}}" for i, (p, e) in enumerate(f.items()))
     if re.fullmatch(r"\d+", r) and 1 < int(r) < 10**7 and len(f := _factorized(r)) >= 2 else None),
    ("near:negation", False, lambda r: r),  # wrapped as "The answer is not $X$."
]

TEMPLATES = [
    ("boxed", "Collecting the results above, the answer is $\\boxed{{{x}}}$."),
    ("minerva", "Final Answer: The final answer is ${x}$. I hope it is correct."),
    ("answer_is", "Putting it together, the final answer is ${x}$."),
    ("answer_colon", "We simplify once more.\nAnswer: ${x}$"),
]


def main():
    rng = random.Random(0)
    refs = references()
    seen = set()
    for name, equivalent, rule in RULES:
        for source in ("MATH500", "Minerva", "OlympiadBench", "AMC23"):
            pool = [r for s, r in refs if s == source and len(r) < 200]
            rng.shuffle(pool)
            made = 0
            for ref in pool:
                if made >= PER_RULE:
                    break
                try:
                    answer = rule(ref)
                except (ValueError, ZeroDivisionError, IndexError):
                    answer = None
                if answer is None or (answer == ref and name != "rewrite:same" and name != "near:negation"):
                    continue
                if name == "near:negation":
                    response = f"The answer is not ${answer}$."
                else:
                    template = TEMPLATES[made % len(TEMPLATES)]
                    response = template[1].format(x=answer)
                if (response, ref) in seen:
                    continue
                seen.add((response, ref))
                made += 1
                print(json.dumps({"response": response, "reference": ref, "equivalent": equivalent,
                                  "category": name, "source": f"constructed from {source} (../shared/data)"}))


if __name__ == "__main__":
    sys.exit(main())
