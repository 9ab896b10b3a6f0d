"""Imports run one way, in the order of the data: no circle, nothing imports a later stage.

The stages, from the top down (a module may import its own stage and any stage
below it, never one above):

    cli -> demo -> {bench, serve} -> export -> validate -> {train, runtime, data}
        -> the folder contract (folders, atomic) -> errors

Imports inside functions count too: a lazy import that runs back up is still a
circle in the design, only hidden until run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "segdeploy"

#: (module prefix, stage): the first matching prefix gives a module's stage; higher
#: stages may import lower ones. Every module of the package must match one.
STAGES: list[tuple[str, int]] = [
    ("segdeploy.__main__", 9),
    ("segdeploy.cli", 8),
    ("segdeploy.demo", 7),
    ("segdeploy.bench", 6),
    # `segdeploy serve`: a front end over the runtime's Segmenter, beside bench.
    ("segdeploy.serve", 6),
    ("segdeploy.export", 5),
    ("segdeploy.validate", 4),
    ("segdeploy.train", 3),
    ("segdeploy.runtime", 3),
    ("segdeploy.data", 3),
    ("segdeploy.folders", 2),
    # The model-family registry: torch-free data every stage reads, like the folders.
    ("segdeploy.families", 2),
    ("segdeploy.atomic", 1),
    ("segdeploy.writable", 1),
    ("segdeploy.errors", 0),
]
#: The package root: imported by everyone for __version__, it imports nothing of
#: its own at module level (checked below), so it sits under every stage.
ROOT = "segdeploy"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stage_of(module: str) -> int | None:
    if module == ROOT:
        return 0
    for prefix, stage in STAGES:
        if module == prefix or module.startswith(prefix + "."):
            return stage
    return None


def imports_of(path: Path) -> set[str]:
    """segdeploy modules that `path` imports, at any depth of its code."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "segdeploy")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "segdeploy":
                continue
            for alias in node.names:
                # `from segdeploy.x import y` imports segdeploy.x.y when y is a module.
                sub = f"{base}.{alias.name}"
                found.add(sub if module_file(sub) else base)
    found.discard(me)
    return found


def module_file(module: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[module_name(path)] = {m for m in imports_of(path) if module_file(m)}
    return graph


def test_every_module_has_a_stage():
    unplaced = [m for m in import_graph() if stage_of(m) is None]
    assert not unplaced, f"give these modules a stage in STAGES: {unplaced}"


def test_no_import_runs_against_the_stage_order():
    graph = import_graph()
    upward = [
        f"{m} (stage {stage_of(m)}) imports {dep} (stage {stage_of(dep)})"
        for m, deps in graph.items()
        for dep in sorted(deps)
        if (stage_of(dep) or 0) > (stage_of(m) or 0)
    ]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = import_graph()
    # Package __init__ files that re-export their own submodules are not circles of
    # design: a module importing its package's namespace is how Python packages work.
    edges = {
        m: {d for d in deps if not (m.startswith(d + ".") and module_file(d).name == "__init__.py")}
        for m, deps in graph.items()
    }
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_package_root_stays_light():
    """`import segdeploy` must import nothing of its own at module level (torch-free, instant)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not top_level


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from segdeploy.errors import SegdeployError\n", {"segdeploy.errors"}),
        ("def f():\n    from segdeploy.runtime import upsample\n", {"segdeploy.runtime.upsample"}),
    ],
)
def test_imports_of_sees_lazy_and_submodule_imports(tmp_path, monkeypatch, source, expected):
    """The checker itself: it must see function-level imports and `from pkg import module`."""
    fake = PACKAGE / "cli" / "_probe_for_test.py"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    assert imports_of(fake) == expected
