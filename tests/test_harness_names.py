"""The harness never names a method: no string constant in benchmark/ equals a registered method name
(docstrings and comments may mention methods; code may not branch on them), and no module under benchmark/
imports from methods/ except the registry package itself (``ensemble_bench.methods``): method machinery
(curves, sparse training) lives in methods/_lib/."""
import ast
from pathlib import Path

import ensemble_bench.methods as methods

HARNESS = Path(__file__).resolve().parents[1] / "benchmark"
METHODS = Path(__file__).resolve().parents[1] / "methods"
REGISTRY = "ensemble_bench.methods"


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
    hits = [h for p in sorted(HARNESS.rglob("*.py")) for h in method_names_in_code(p, names)]   # report/ too
    assert not hits, hits


def test_the_check_catches_a_branch_on_a_method(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""mentions mimo in a docstring: fine"""\nif cfg.method == "mimo":\n    pass\n')
    assert method_names_in_code(bad, {"mimo"}) == ["bad.py:2: 'mimo'"]


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _is_below_registry(name: str) -> bool:
    return name.startswith(REGISTRY + ".")


def method_imports(path: Path, root: Path = HARNESS, package: str = "ensemble_bench",
                   methods_dir: Path = METHODS) -> list[str]:
    """Imports in ``path`` (a module of ``package`` rooted at ``root``) that reach below the registry
    package: ``ensemble_bench.methods.<module>`` in any spelling (absolute, relative, ``from
    ensemble_bench.methods import <module>``, or an ``importlib`` string)."""
    tree = ast.parse(path.read_text())
    module = _module_name(path, root, package)
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    submodules = {p.stem for p in methods_dir.glob("*.py") if p.stem != "__init__"}
    submodules |= {p.name for p in methods_dir.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    hits = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")
                base = base[:len(base) - (n.level - 1)]
                source = ".".join(base + ([n.module] if n.module else []))
            else:
                source = n.module or ""
            names = [source]
            if source == REGISTRY:
                names += [f"{source}.{a.name}" for a in n.names if a.name in submodules]
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            names = [n.value] if _is_below_registry(n.value) and " " not in n.value else []
        else:
            continue
        hits += [f"{path.name}:{n.lineno}: {name}" for name in names if _is_below_registry(name)]
    return hits


def test_harness_imports_only_the_method_registry():
    files = sorted(HARNESS.rglob("*.py"))
    assert any(p.parent != HARNESS for p in files)          # sub-packages (report/) are checked too
    hits = [h for p in files for h in method_imports(p)]
    assert not hits, hits


def test_the_import_check_catches_method_machinery(tmp_path):
    pkg = tmp_path / "benchmark"
    (pkg / "sub").mkdir(parents=True)
    mdir = tmp_path / "methods"
    (mdir / "_lib").mkdir(parents=True)
    (mdir / "_lib" / "__init__.py").write_text("")
    (mdir / "bridge.py").write_text("")
    fine = pkg / "fine.py"
    fine.write_text("import ensemble_bench.methods as methods\nfrom ensemble_bench import methods\n"
                    "from ensemble_bench.methods import register\nx = 'ensemble_bench.methods'\n")
    assert method_imports(fine, pkg, methods_dir=mdir) == []
    bad = pkg / "sub" / "bad.py"
    bad.write_text("from ensemble_bench.methods._lib.sparse import DynamicSparsity\n"
                   "import ensemble_bench.methods.bridge\n"
                   "from ..methods import bridge\n"
                   "from ensemble_bench.methods import _lib\n"
                   "m = importlib.import_module('ensemble_bench.methods.bridge')\n")
    assert method_imports(bad, pkg, methods_dir=mdir) == [
        "bad.py:1: ensemble_bench.methods._lib.sparse", "bad.py:2: ensemble_bench.methods.bridge",
        "bad.py:3: ensemble_bench.methods.bridge", "bad.py:4: ensemble_bench.methods._lib",
        "bad.py:5: ensemble_bench.methods.bridge"]
