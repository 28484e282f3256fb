"""One skeleton: every function that two or more scripts define (main, parse_args and evaluate aside) has the same
source in each (docstrings may differ), so a reader who learned `generate` in grpo.py knows it everywhere. Also the
suite's shape: files <= 450 lines, no line over 120 characters, no function defined inside a loop."""
import ast

import pytest

from conftest import ROOT

SCRIPTS = ["grpo.py", "em.py", "raft.py", "reinforce_rej.py", "rest_em.py", "weak_to_strong.py", "verifier.py",
           "ppo.py", "iterative_dpo.py"]
PRESENT = [s for s in SCRIPTS if (ROOT / s).exists()]
EXEMPT = {"main", "parse_args", "evaluate"}


def functions_without_docstrings(path):
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                node.body = body[1:] or [ast.Pass()]
            out[node.name] = ast.unparse(node)
    return out


def test_same_name_same_code():
    sources = {s: functions_without_docstrings(ROOT / s) for s in PRESENT}
    names = {n for funcs in sources.values() for n in funcs} - EXEMPT
    differ = []
    for name in sorted(names):
        copies = {s: funcs[name] for s, funcs in sources.items() if name in funcs}
        if len(set(copies.values())) > 1:
            differ.append(f"{name}: {', '.join(sorted(copies))}")
    assert not differ, "same-named functions with different code:\n  " + "\n  ".join(differ)


def test_the_check_can_fail(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text('def f(x):\n    """doc a"""\n    return x\n')
    b.write_text('def f(x):\n    """doc b"""\n    return x + 1\n')
    assert functions_without_docstrings(a)["f"] != functions_without_docstrings(b)["f"]
    b.write_text('def f(x):\n    """another doc"""\n    return x\n')
    assert functions_without_docstrings(a)["f"] == functions_without_docstrings(b)["f"]


@pytest.mark.parametrize("script", PRESENT)
def test_file_shape(script):
    lines = (ROOT / script).read_text().splitlines()
    assert len(lines) <= 450, f"{script}: {len(lines)} lines"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 120]
    assert not long, f"{script}: lines over 120 characters: {long[:10]}"
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.For, ast.While)):
            inner = [n for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.Lambda))]
            assert not inner, f"{script}: a function defined inside the loop at line {node.lineno}"
