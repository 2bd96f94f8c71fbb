"""The architecture, checked on the import graph of ``router/`` (read with ``ast``; no
module is imported or run).

The rules are written once, here:

* ``LAYERS`` ranks every unit of ``router`` (a top-level module or a package). A unit may
  import itself and units of a strictly lower rank, nothing else: lower layers never
  import higher ones, and two units of one rank stay independent.
* ``PURE`` units (the engine and the policy code) import nothing that does I/O on the
  network or runs an event loop: no gRPC, generated stubs, etcd, ClickHouse, asyncio.
* No import cycle between modules anywhere in ``router/`` (``TYPE_CHECKING`` imports
  count: a cycle for the type checker is a cycle in the design).
* ``bench/`` imports ``router`` and libraries, never the test suite.
* ``ARCHITECTURE.md`` names every unit, and every ``router/...`` path it names exists.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Bottom first. A new package gets its row before it lands (the test fails otherwise).
LAYERS: list[tuple[str, ...]] = [
    ("router._queue_core", "router.model", "router.config", "router.erlang", "router.v1"),
    ("router.contracts",),
    ("router.pqueue", "router.policy", "router.overflow", "router.journal", "router.status", "router.alerts"),
    ("router.engine", "router.plans"),
    ("router.coord", "router.history", "router.whatif"),
    ("router.security",),
    ("router.node", "router.local"),
    ("router.sim", "router.partner", "router.capacity"),
    ("router.ctl",),
    ("router.cli",),
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
PURE = {"router.model", "router.config", "router.erlang", "router.pqueue", "router.policy",
        "router.overflow", "router.engine", "router.alerts", "router.whatif", "router.contracts",
        "router.plans"}
# Modules a pure unit must not import (prefix match on the dotted name).
IMPURE = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "google.rpc", "aetcd", "chdb",
          "clickhouse_driver", "asyncio", "socket", "subprocess", "uvloop", "router.v1")


@dataclass
class Graph:
    """Module -> the router modules it imports, and the outside modules it imports."""

    internal: dict[str, set[str]] = field(default_factory=dict)
    external: dict[str, set[str]] = field(default_factory=dict)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, package: str = "router") -> Graph:
    """Every ``import`` in ``root/package`` (generated ``v1`` stubs left out), resolved to
    dotted names; ``from X import Y`` counts as an import of ``X.Y`` when that is a
    module of the package, of ``X`` otherwise."""
    files = [p for p in (root / package).rglob("*.py") if "v1" not in p.relative_to(root / package).parts]
    modules = {module_name(root, p) for p in files}
    modules |= {module_name(root, p.with_suffix(".py")) for p in (root / package).rglob("*.pyi")}
    graph = Graph()
    for path in files:
        mod = module_name(root, path)
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        internal, external = graph.internal.setdefault(mod, set()), graph.external.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules
                        or f"{target}.{a.name}".startswith(f"{package}.v1.")]
                names = subs or [target]
            for name in names:
                if name == package or name.startswith(package + "."):
                    internal.add(name)
                else:
                    external.add(name)
    return graph


def unit_of(name: str) -> str:
    """``router.engine.core`` -> ``router.engine``; ``router.model`` -> itself."""
    return ".".join(name.split(".")[:2])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module
    that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def violations(graph: Graph) -> list[str]:
    """Every broken rule, as a sentence naming the modules."""
    out: list[str] = []
    for mod, targets in sorted(graph.internal.items()):
        src = unit_of(mod)
        if src not in RANK and mod != "router":
            out.append(f"{mod}: its unit {src} has no row in LAYERS (tests/test_layout.py)")
            continue
        for target in sorted(targets):
            dst = unit_of(target)
            if mod == "router" or dst == src or target == "router":
                continue
            if dst not in RANK:
                out.append(f"{mod} imports {target}: {dst} has no row in LAYERS")
            elif RANK[dst] >= RANK[src]:
                out.append(f"{mod} imports {target}: {src} (layer {RANK[src]}) may not import "
                           f"{dst} (layer {RANK[dst]})")
        if src in PURE:
            for name in sorted(graph.external.get(mod, set()) | targets):
                if any(name == bad or name.startswith(bad + ".") for bad in IMPURE):
                    out.append(f"{mod} is pure and imports {name}")
    for comp in cycles(graph.internal):
        out.append("import cycle: " + " -> ".join(comp))
    return out


def test_router_keeps_the_layers_and_has_no_cycle():
    problems = violations(import_graph(ROOT))
    assert not problems, "\n".join(problems)


def test_top_level_keeps_only_shared_modules():
    top = sorted(p.stem for p in (ROOT / "router").glob("*.py") if p.stem != "__init__")
    assert len(top) <= 12, top
    for stem in top:
        assert f"router.{stem}" in RANK, f"router/{stem}.py has no row in LAYERS"


def test_bench_imports_only_router():
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")}
    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in test_modules | {"tests"}, f"{path.name} imports {name}"
        assert not re.search(r"sys\.path\.\w+\([^)]*tests", path.read_text()), f"{path.name} puts tests/ on sys.path"


def test_architecture_md_matches_the_tree():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    units = {unit_of(m) for m in import_graph(ROOT).internal if m != "router"}
    for unit in sorted(units):
        path = unit.replace(".", "/")
        assert f"`{path}/`" in text or f"`{path}.py`" in text, f"ARCHITECTURE.md does not describe {path}"
    for named in sorted(set(re.findall(r"`(router/[\w/.]+)`", text))):
        assert (ROOT / named).exists(), f"ARCHITECTURE.md names {named}, which does not exist"


# --- the checker itself catches what it is for ------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Graph:
    for name, body in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(body)
    return import_graph(tmp_path)


def test_checker_finds_a_cycle_through_type_checking(tmp_path):
    g = _tree(tmp_path, {
        "router/__init__.py": "",
        "router/coord/__init__.py": "",
        "router/coord/a.py": "from router.coord.b import X\n",
        "router/coord/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from router.coord import a\n",
    })
    assert any("import cycle" in p and "router.coord.a" in p for p in violations(g))


def test_checker_finds_an_upward_and_an_impure_import(tmp_path):
    g = _tree(tmp_path, {
        "router/__init__.py": "",
        "router/engine/__init__.py": "from router.node import server\nimport grpc\n",
        "router/node/__init__.py": "",
        "router/node/server.py": "from ..engine import Engine\n",
        "router/gadget.py": "",
    })
    problems = violations(g)
    assert any("router.engine imports router.node.server" in p for p in problems), problems
    assert any("pure and imports grpc" in p for p in problems), problems
    assert not any("router.node.server imports router.engine:" in p for p in problems), problems


@pytest.mark.parametrize("relative", ["from ..engine import Engine", "from router.engine import Engine"])
def test_checker_resolves_relative_and_absolute_imports(tmp_path, relative):
    g = _tree(tmp_path, {
        "router/__init__.py": "",
        "router/engine/__init__.py": "",
        "router/node/__init__.py": "",
        "router/node/server.py": relative + "\n",
    })
    assert "router.engine" in g.internal["router.node.server"]
