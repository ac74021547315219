"""The layers of lab_utils/__init__.py hold: every import of every module (at the top or inside a function)
goes to the same layer or a lower one, no lab imports another lab, and no set of modules imports in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO
from lab_utils import COMPOSITE_LABS, LAYERS, ORDER

SHARED_LAB = "labs.text_encoder"  # the text encoder every family uses


def modules() -> dict[str, Path]:
    found = {}
    for top in ("lab_utils", "labs", "genlab"):
        for path in (REPO / top).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (relative imports resolved), with every parent
    package of each: importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in known)
    result = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        while target:  # the module, then each package Python runs on the way to it
            if target in known and target != name:
                result.add(target)
            target = target.rpartition(".")[0]
    return result


def layer(name: str) -> str:
    prefixes = [p for p in LAYERS if name == p or name.startswith(p + ".")]
    assert prefixes, f"{name} has no layer: add it to LAYERS in lab_utils/__init__.py"
    return LAYERS[max(prefixes, key=len)]


def lab_of(name: str) -> str | None:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "labs" and len(parts) > 1 else None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer_and_no_import_runs_upward(graph):
    upward = [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, targets in graph.items() for b in targets
              if ORDER.index(layer(b)) > ORDER.index(layer(a))]
    assert not upward, "\n".join(upward)


def test_no_lab_imports_another_lab(graph):
    crossing = [f"{a} imports {b}" for a, targets in graph.items() for b in targets
                if lab_of(a) and lab_of(b) and lab_of(a) != lab_of(b) and lab_of(b) != SHARED_LAB
                and lab_of(b) not in COMPOSITE_LABS.get(lab_of(a), ())]
    assert not crossing, "\n".join(crossing)


def test_a_composite_lab_says_what_it_composes(graph):
    import importlib

    for composite, parts in COMPOSITE_LABS.items():
        doc = importlib.import_module(composite).__doc__ or ""
        assert all(f"``{part}``" in doc for part in parts), f"{composite}'s docstring must name {parts}"
        used = {lab_of(b) for a, targets in graph.items() if lab_of(a) == composite for b in targets}
        assert set(parts) <= used, f"{composite} lists {parts} in COMPOSITE_LABS but imports only {used}"


def test_no_circle_of_imports(graph):
    """Depth-first search; a module met again while still on the path closes a circle."""
    state: dict[str, str] = {}
    circles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if name.startswith(target + "."):
                continue  # a module importing its own package (``from . import x``) is Python's normal way
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(circles)


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    """The checks above are only as good as the walker: it must find imports inside functions."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .b import g\n    import pkg.c\n")
    (package / "b.py").write_text("from pkg import a\n")
    (package / "c.py").write_text("")
    known = {"pkg": package / "__init__.py", "pkg.a": package / "a.py", "pkg.b": package / "b.py",
             "pkg.c": package / "c.py"}
    assert imported("pkg.a", known["pkg.a"], known) == {"pkg", "pkg.b", "pkg.c"}
    assert imported("pkg.b", known["pkg.b"], known) == {"pkg", "pkg.a"}


def test_the_walker_counts_the_parent_packages_an_import_runs(tmp_path):
    """``import top.low.leaf`` runs ``top/__init__.py`` and ``top/low/__init__.py``: an import of a low module
    inside a high package runs the high package, and the walker must see it (it did not, once)."""
    top = tmp_path / "top"
    (top / "high").mkdir(parents=True)
    (top / "__init__.py").write_text("")
    (top / "high" / "__init__.py").write_text("from top.high import app\n")
    (top / "high" / "leaf.py").write_text("")
    (top / "high" / "app.py").write_text("")
    (top / "low.py").write_text("def f():\n    from top.high.leaf import x\n")
    known = {"top": top / "__init__.py", "top.high": top / "high" / "__init__.py",
             "top.high.leaf": top / "high" / "leaf.py", "top.high.app": top / "high" / "app.py", "top.low": top / "low.py"}
    assert imported("top.low", known["top.low"], known) == {"top", "top.high", "top.high.leaf"}


def test_the_layer_folders_are_the_layers():
    """``ls lab_utils`` states the rule: each layer of lab_utils is a folder named in LAYERS, and no module
    of lab_utils sits outside one (bar the package file that states the rule)."""
    folders = {p.name for p in (REPO / "lab_utils").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {"core", "harness", "commands"}
    assert {f"lab_utils.{f}" for f in folders} <= set(LAYERS)
    assert [p.name for p in (REPO / "lab_utils").glob("*.py")] == ["__init__.py"]


def test_importing_a_lab_loads_no_command():
    """What Python really loads, not what the walker reads: a fresh interpreter imports every labs module in
    turn and names the first one after which a module of the applications layer is in sys.modules."""
    import subprocess
    import sys

    labs = sorted(n for n in modules() if n.startswith("labs"))
    code = ("import importlib, sys\n"
            f"for lab in {labs!r}:\n"
            "    importlib.import_module(lab)\n"
            "    print(lab, *[m for m in sys.modules if m.split('.')[0] in ('lab_utils', 'labs', 'genlab')])\n")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert len(loaded.stdout.splitlines()) == len(labs)
    for line in loaded.stdout.splitlines():
        lab, *present = line.split()
        above = [m for m in present if ORDER.index(layer(m)) > ORDER.index("content")]
        assert not above, f"importing {lab} (after the labs modules before it) loads {above}"
