"""The package's imports go one way and never round in a circle.

Order, bottom to top (README, Layout): config; runtime, models, algorithms, rewards, data; rollout;
training; evaluation; cli (with doctor, behind `igrpo doctor`). Every ``import igrpo_megatron...``
of every module is read from the source (function-level imports too), so a lazy import cannot hide
an upward one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "igrpo_megatron"
LEVELS = {"config": 0, "runtime": 1, "models": 1, "algorithms": 1, "rewards": 1, "data": 1,
          "rollout": 2, "training": 3, "evaluation": 4, "cli": 5, "doctor": 5}  # doctor: `igrpo doctor`


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import of the package in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n == "igrpo_megatron" or n.startswith("igrpo_megatron.")]
    return found


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line}; a module importing its own package's __init__ is left out."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = _module_name(path)
        graph[mod] = {n: line for line, n in _imports(path) if not mod.startswith(n + ".")}
    return graph


def _level(module: str) -> int | None:
    parts = module.split(".")
    return LEVELS.get(parts[1]) if len(parts) > 1 else None


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph.get(root, ())))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_every_top_level_part_has_a_level():
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert parts - set(LEVELS) == set(), "give the new part a level here and in README's Layout section"


def _upward(graph: dict[str, dict[str, int]]) -> list[str]:
    upward = []
    for mod, imported in graph.items():
        for other, line in imported.items():
            mine, theirs = _level(mod), _level(other)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{mod}:{line} imports {other}")
    return upward


def test_no_upward_imports():
    assert _upward(_graph()) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The checks themselves: a made-up graph with both faults."""
    graph = {"igrpo_megatron.models.a": {"igrpo_megatron.training.b": 1},
             "igrpo_megatron.training.b": {"igrpo_megatron.models.a": 2}, "igrpo_megatron.config.c": {}}
    assert _cycles(graph) == [["igrpo_megatron.models.a", "igrpo_megatron.training.b"]]
    assert _upward(graph) == ["igrpo_megatron.models.a:1 imports igrpo_megatron.training.b"]
