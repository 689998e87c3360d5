"""The import layers of docs/architecture.md, checked over the source (AST; nothing is imported).

    sunray.models  <  sunray.engine  <  sunray.kv  <  {sunray.serve, sunray.sun, sunray.bench}  <  sunray.cli
    loadgen: imports nothing of sunray (it talks HTTP), of experiments or of tests
    experiments: drivers on top; may import sunray and loadgen, never tests
    sunray: never imports experiments, loadgen or tests

A module may import its own layer and the layers below it; never a layer above, nor another layer of the same rank
(serve, sun and bench never import each other). Every import counts: at module top, inside functions, under
`if TYPE_CHECKING`, relative imports, and `importlib.import_module("...")` with a literal name.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("sunray", "loadgen", "experiments")

# sunray's layers, lowest first. A module of sunray that none of these prefixes covers fails the test: give it a
# layer here (and in docs/architecture.md).
SUNRAY_LAYERS: dict[str, int] = {
    "sunray.models": 0,
    "sunray.engine": 1,
    "sunray.kv": 2,
    "sunray.serve": 3,
    "sunray.sun": 3,
    "sunray.bench": 3,
    "sunray.cli": 4,
}
# Imports that break a rule and are known to: (importing layer, imported layer) -> why. Each must still occur (a
# stale entry fails the test too), so the list only shrinks.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


@dataclasses.dataclass(frozen=True)
class Import:
    path: Path  # relative to ROOT
    line: int
    importer: str  # dotted module name of the file
    target: str  # dotted module name imported

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module of a relative `from ... import` in `importer`."""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(source: str, rel: Path) -> Iterator[Import]:
    """Every import in `source` (the file `rel`), wherever it sits in the file."""
    importer = module_name(rel)
    is_package = rel.name == "__init__.py"
    for node in ast.walk(ast.parse(source, str(rel))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = (
                _resolve(importer, is_package, node.level, node.module) if node.level else node.module or ""
            )
            # `from sunray.models import int4` may import the module sunray.models.int4: name what is imported.
            targets = [module if a.name == "*" else f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and _is_import_call(node):
            targets = [node.args[0].value]
        for t in targets:
            yield Import(rel, node.lineno, importer, t)


def _is_import_call(node: ast.Call) -> bool:
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    return (
        name in ("import_module", "__import__")
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    )


def sunray_layer(module: str) -> str | None:
    """The SUNRAY_LAYERS prefix that `module` belongs to (the longest), or None."""
    best = None
    for prefix in SUNRAY_LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best)
        ):
            best = prefix
    return best


def top(module: str) -> str:
    return module.split(".")[0]


def violation(imp: Import) -> tuple[str, str, str] | None:
    """(importing layer, imported layer, the rule broken) if `imp` breaks a rule, else None."""
    src, dst = top(imp.importer), top(imp.target)
    if dst not in (*SCANNED, "tests"):
        return None  # the standard library or a third-party package
    if src == "loadgen" and dst != "loadgen":
        return "loadgen", dst, f"loadgen imports nothing of {dst} (it reaches sunray over HTTP only)"
    if src == "experiments":
        if dst == "tests":
            return (
                "experiments",
                "tests",
                "experiments never import tests (put what they need in the library)",
            )
        return None
    if src != "sunray":
        return None
    if dst != "sunray":
        return "sunray", dst, f"sunray never imports {dst}"
    if imp.target == "sunray":
        return None  # the package itself (its __init__ imports nothing)
    a, b = sunray_layer(imp.importer), sunray_layer(imp.target)
    if a is None or b is None:
        return None  # reported by test_every_sunray_module_has_a_layer
    if a == b:
        return None
    if SUNRAY_LAYERS[b] > SUNRAY_LAYERS[a]:
        return (
            a,
            b,
            f"{a} (layer {SUNRAY_LAYERS[a]}) must not import the layer above it, {b} ({SUNRAY_LAYERS[b]})",
        )
    if SUNRAY_LAYERS[b] == SUNRAY_LAYERS[a]:
        return a, b, f"{a} and {b} are side by side (layer {SUNRAY_LAYERS[a]}) and never import each other"
    return None


def source_files() -> list[Path]:
    out = []
    for pkg in SCANNED:
        out += sorted(p.relative_to(ROOT) for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    return out


@functools.cache
def all_imports() -> tuple[Import, ...]:
    return tuple(imp for rel in source_files() for imp in imports_of((ROOT / rel).read_text(), rel))


def test_layers_are_one_way():
    broken: dict[tuple[str, str, str], list[str]] = {}  # (file:line, importer, rule) -> what it imports
    seen = set()
    for imp in all_imports():
        v = violation(imp)
        if v is None:
            continue
        if (v[0], v[1]) in KNOWN_EXCEPTIONS:
            seen.add((v[0], v[1]))
            continue
        broken.setdefault((imp.where(), imp.importer, v[2]), []).append(imp.target)
    lines = [
        f"{where}: {importer} imports {', '.join(t)}: {rule}" for (where, importer, rule), t in broken.items()
    ]
    stale = [f"{a} -> {b}" for a, b in KNOWN_EXCEPTIONS if (a, b) not in seen]
    assert not lines, "imports against the layers (docs/architecture.md, 'Layers'):\n" + "\n".join(lines)
    assert not stale, f"KNOWN_EXCEPTIONS lists imports that no longer occur; drop them: {stale}"


def test_every_sunray_module_has_a_layer():
    modules = {module_name(rel) for rel in source_files() if rel.parts[0] == "sunray"} - {"sunray"}
    missing = sorted(m for m in modules if sunray_layer(m) is None)
    assert not missing, (
        f"sunray modules without a layer (add them to SUNRAY_LAYERS and docs/architecture.md): {missing}"
    )


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of SCANNED it imports (anywhere in the file)."""
    modules = {module_name(rel) for rel in source_files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in all_imports():
        target = imp.target
        while target and target not in modules:  # `from a.b import name`: the module a.b
            target = target.rpartition(".")[0]
        if target and target != imp.importer:
            graph[imp.importer].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """No two modules import each other, even through function-level imports: move the shared piece down."""
    graph = import_graph()
    found = cycles(graph)
    lines = [
        " <-> ".join(c) + ": " + "; ".join(f"{a} -> {', '.join(sorted(graph[a] & set(c)))}" for a in c)
        for c in found
    ]
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join(lines)


# -- the checker itself ---------------------------------------------------------------------------------------------
def _check(source: str, rel: str) -> list[str]:
    found = sorted(imports_of(source, Path(rel)), key=lambda i: i.line)
    return [f"{i.line}: {i.target}: {v[2]}" for i in found if (v := violation(i))]


def test_checker_sees_imports_anywhere():
    source = "\n".join(
        [
            "from sunray.models import decoder",  # fine: below
            "def f():",
            "    from sunray.engine.sequence import Sequence",  # function level, upward
            "    import sunray.serve.config",  # upward
            "if False:",
            "    from ..kv import transport",  # relative: sunray.kv
            "import importlib",
            "importlib.import_module('sunray.sun.train')",
            "from sunray import bench",
        ]
    )
    found = _check(source, "sunray/models/decoder.py")
    assert [f.split(":")[0] for f in found] == ["3", "4", "6", "8", "9"], found
    assert "sunray.kv.transport" in found[2] and "must not import the layer above" in found[2]


@pytest.mark.parametrize(
    ("rel", "source", "rule"),
    [
        ("sunray/serve/app.py", "from sunray.sun.train import train", "side by side"),
        ("sunray/sun/train.py", "from sunray.serve import config", "side by side"),
        ("sunray/sun/cli.py", "from sunray.cli import main", "must not import the layer above"),
        ("sunray/kv/handoff.py", "def f():\n    from sunray.engine import x", None),
        (
            "sunray/engine/local.py",
            "from sunray.kv.transport import KVTransport",
            "must not import the layer above",
        ),
        ("sunray/engine/x.py", "import experiments.accuracy", "sunray never imports experiments"),
        (
            "sunray/bench.py",
            "from tests.tiny_models import make_tiny_model_dir",
            "sunray never imports tests",
        ),
        ("loadgen/cli.py", "from sunray.bench import bench_decode", "loadgen imports nothing of sunray"),
        (
            "loadgen/sim/x.py",
            "from experiments import measure_profile",
            "loadgen imports nothing of experiments",
        ),
        ("experiments/bench_worker.py", "from tests.tiny_models import x", "experiments never import tests"),
        ("experiments/accuracy.py", "from sunray.sun.train import train\nimport loadgen.cli", None),
        ("sunray/cli.py", "from sunray.serve.config import AppArgs\nfrom sunray.sun import train", None),
    ],
)
def test_checker_rules(rel, source, rule):
    found = _check(source, rel)
    if rule is None:
        assert found == []
    else:
        assert len(found) == 1 and rule in found[0], found


def test_cycle_finder():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]
