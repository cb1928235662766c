"""The harness never names a method: no string constant in benchmark/ equals a registered method name
(docstrings and comments may mention methods; code may not branch on them)."""
import ast
from pathlib import Path

import ensemble_bench.methods as methods

HARNESS = Path(__file__).resolve().parents[1] / "benchmark"


def _docstring_nodes(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                yield first.value


def method_names_in_code(path: Path, names: set[str]) -> list[str]:
    tree = ast.parse(path.read_text())
    docs = {id(n) for n in _docstring_nodes(tree)}
    return [f"{path.name}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs and n.value in names]


def test_no_method_name_in_harness_code():
    names = set(methods.names())
    assert len(names) >= 8
    hits = [h for p in sorted(HARNESS.glob("*.py")) for h in method_names_in_code(p, names)]
    assert not hits, hits


def test_the_check_catches_a_branch_on_a_method(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""mentions mimo in a docstring: fine"""\nif cfg.method == "mimo":\n    pass\n')
    assert method_names_in_code(bad, {"mimo"}) == ["bad.py:2: 'mimo'"]
