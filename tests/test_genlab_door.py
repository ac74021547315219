"""One door for a notebook: each notebook's first code cell imports the package in one ``from genlab import ...``
line (beside torch, matplotlib and the standard library), and every name ``genlab`` offers is the object at its
home, imported from there; ``python -m genlab`` is still the ``genlab`` command."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
import types

import nbformat
import pytest

import genlab
from conftest import REPO, subprocess_env

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
FIRST_CELL_MAY_IMPORT = {"genlab", "torch", "matplotlib"}  # plus the standard library


def first_code_cell(path) -> str:
    nb = nbformat.read(path, as_version=4)
    source = next(cell.source for cell in nb.cells if cell.cell_type == "code")
    return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))


def imports(source: str) -> list[ast.Import | ast.ImportFrom]:
    return [node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))]


def top_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    return [name.split(".")[0] for name in names]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 7


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_a_notebook_opens_with_one_genlab_import_and_no_other_module_of_the_package(notebook):
    found = imports(first_code_cell(notebook))
    doors = [node for node in found if isinstance(node, ast.ImportFrom) and node.module == "genlab"]
    assert len(doors) == 1, f"{notebook.name}: the first code cell has {len(doors)} `from genlab import` lines, not 1"
    others = sorted({top for node in found for top in top_modules(node)
                     if top not in FIRST_CELL_MAY_IMPORT and top not in sys.stdlib_module_names})
    assert not others, (f"{notebook.name}'s first cell imports {others}: the package through `from genlab import`, "
                        "a family's own code in the section that teaches it")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_no_later_cell_goes_around_the_door(notebook):
    """After the first cell a notebook imports a family's content (``labs``) where it teaches it, never ``lab_utils``
    and never ``genlab`` again."""
    cells = [cell.source for cell in nbformat.read(notebook, as_version=4).cells if cell.cell_type == "code"]
    for number, source in enumerate(cells[1:], start=2):
        python = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        around = sorted({top for node in imports(python) for top in top_modules(node)} & {"lab_utils", "genlab"})
        assert not around, f"{notebook.name}, code cell {number}, imports {around}: the first cell's `from genlab` only"


def test_every_name_of_genlab_is_the_object_at_its_home_and_imported_from_there():
    """``genlab.train is lab_utils.harness.run.train``, and genlab/__init__.py says ``from lab_utils.harness.run import
    train``: no chain of re-exports between a name and the module that defines it."""
    tree = ast.parse((REPO / "genlab" / "__init__.py").read_text())
    imported = {}
    for node in tree.body:
        assert not isinstance(node, ast.Import), "genlab/__init__.py: `from <home> import <name>` only"
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                assert alias.asname is None, f"genlab renames {alias.name}: one name, one meaning"
                imported[alias.name] = node.module
    assert sorted(imported) == sorted(genlab.__all__), "genlab's imports and its __all__ differ"
    for name, module in imported.items():
        value = getattr(genlab, name)
        if isinstance(value, types.ModuleType):  # the zoo: the module itself
            assert value.__name__ == f"{module}.{name}" and value is sys.modules[value.__name__], name
            continue
        home = value.__module__
        assert module == home, f"genlab imports {name} from {module}, not from its home {home}"
        assert getattr(importlib.import_module(home), name) is value, name


def test_genlab_says_what_it_offers_and_offers_only_what_a_notebook_uses():
    doc = genlab.__doc__ or ""
    assert all(name in doc for name in genlab.__all__), [name for name in genlab.__all__ if name not in doc]
    used = set()
    for notebook in NOTEBOOKS:
        for node in imports(first_code_cell(notebook)):
            if isinstance(node, ast.ImportFrom) and node.module == "genlab":
                used.update(alias.name for alias in node.names)
    assert set(genlab.__all__) == used, f"genlab offers what no notebook uses: {sorted(set(genlab.__all__) - used)}"


def test_python_m_genlab_is_the_genlab_command():
    """``python -m genlab`` (and torchrun's ``-m genlab``) runs the command through this door; the console script
    ``genlab`` goes straight to the CLI, which answers ``--help`` before torch loads."""
    run = [sys.executable, "-m", "genlab"]
    out = subprocess.run([*run, "--help"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert all(command in out.stdout for command in ("train", "sample", "compare", "notebooks"))
    bad = subprocess.run([*run, "frobnicate"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.startswith("genlab: error:")] == [
        "genlab: error: unknown command 'frobnicate'"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["genlab"] == "lab_utils.commands.cli:main"
