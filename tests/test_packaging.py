"""What the package declares: every third-party module the shipped code imports, the extras a command needs (and the
one line a command prints without its extra), the build requirement and the licence."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO, subprocess_env

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# Import name -> distribution name, where they differ by more than case and `_`/`-`.
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "hydra": "hydra-core", "IPython": "ipython",
                "torch_fidelity": "torch-fidelity", "sklearn": "scikit-learn", "skimage": "scikit-image",
                "cv2": "opencv-python", "google": "protobuf", "zmq": "pyzmq", "jupyter_client": "jupyter-client"}
# Modules imported only after `genlab`'s extras check (lab_utils.commands.cli.COMMAND_EXTRAS): their module-level imports may
# come from an extra. Every other module's module-level imports must be base dependencies.
EXTRA_GATED = {"lab_utils/commands/notebooks.py", "lab_utils/commands/grading.py"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalize(re.match(r"[A-Za-z0-9._-]+", req).group(0)) for req in requirements}


def shipped_files() -> dict[str, str]:
    """Every .py file of the packages pyproject.toml ships, relative to the repository: {path: its package}."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    package_dir = setuptools.get("package-dir", {})
    files = {}
    for package in setuptools["packages"]:
        folder = REPO / package_dir.get(package, package.replace(".", "/"))
        for path in folder.glob("*.py"):
            files[path.relative_to(REPO).as_posix()] = package
    return files


def third_party_imports() -> list[tuple[str, str, bool]]:
    """(file, top-level module, at module level) for every absolute import of a module that is neither the standard
    library's nor one of the shipped packages."""
    own = {package.split(".")[0] for package in PYPROJECT["tool"]["setuptools"]["packages"]}
    found = []
    for rel in shipped_files():
        tree = ast.parse((REPO / rel).read_text(encoding="utf-8"), rel)
        module_level = {id(node) for node in tree.body}  # plus those under module-level if/try (below)
        for node in tree.body:
            if isinstance(node, (ast.If, ast.Try)):
                module_level |= {id(child) for child in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in own and top != "__future__":
                    found.append((rel, top, id(node) in module_level))
    return found


def test_the_import_walk_sees_the_packages_imports():
    """The walk itself: it finds torch at module level and nbformat inside a function, and never the lab's own."""
    found = {(rel, top, top_level) for rel, top, top_level in third_party_imports()}
    assert ("lab_utils/commands/cli.py", "omegaconf", True) in found
    assert ("lab_utils/commands/notebooks.py", "nbformat", False) in found
    assert not {top for _, top, _ in found} & {"lab_utils", "labs", "genlab", "genlab_conf", "os", "typing"}


def test_every_third_party_import_is_declared():
    """A module the shipped code imports and pyproject.toml does not declare works in the developer's environment
    (which has everything) and fails in a student's: declare it in `dependencies` or in an extra."""
    base = requirement_names(PROJECT["dependencies"])
    extras = set().union(*(requirement_names(reqs) for reqs in PROJECT["optional-dependencies"].values()))
    undeclared, not_base = set(), set()
    for rel, top, top_level in third_party_imports():
        distribution = normalize(DISTRIBUTION.get(top, top))
        if distribution not in base | extras:
            undeclared.add(f"{rel}: {top} ({distribution})")
        elif top_level and rel not in EXTRA_GATED and distribution not in base:
            not_base.add(f"{rel}: {top} ({distribution})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"
    assert not not_base, (f"imported at module level, so every install needs it, but declared only in an extra: "
                          f"{sorted(not_base)}")


def test_the_base_dependencies_name_what_the_code_needs():
    base = requirement_names(PROJECT["dependencies"])
    assert {"pydantic", "omegaconf", "pillow", "tqdm"} <= base
    pins = {normalize(re.match(r"[A-Za-z0-9._-]+", req).group(0)): req for req in PROJECT["dependencies"]}
    assert pins["pydantic"].startswith("pydantic>=2")  # ConfigDict, field_validator
    assert pins["tqdm"].startswith("tqdm>=4.66")


def test_the_extras_a_user_names():
    extras = {name: requirement_names(reqs) for name, reqs in PROJECT["optional-dependencies"].items()}
    assert {"jupyterlab", "ipykernel", "ipywidgets", "nbformat"} <= extras["notebooks"]
    assert {"nbformat", "nbclient", "ipython"} <= extras["instructor"]
    dev = [req for req in PROJECT["optional-dependencies"]["dev"] if normalize(req).startswith("genlab[")]
    assert dev and {"notebooks", "instructor"} <= set(dev[0].split("[")[1].rstrip("]").split(","))


def test_the_cli_checks_the_modules_of_the_extra_it_names():
    """lab_utils.commands.cli checks a command's extra by import names: each must be a module of that extra's distributions."""
    from lab_utils.commands.cli import COMMAND_EXTRAS, EXTRA_MODULES

    assert set(COMMAND_EXTRAS) == {"notebooks", "grade"}
    for extra, modules in EXTRA_MODULES.items():
        declared = requirement_names(PROJECT["optional-dependencies"][extra])
        for module in modules:
            assert normalize(DISTRIBUTION.get(module, module)) in declared, f"{module} is not in the {extra} extra"


@pytest.mark.parametrize("command", ["grade", "notebooks"])
def test_a_command_without_its_extra_says_which_in_one_line(command, tmp_path):
    """As in an install without the instructor extra: nbformat cannot be imported (``sys.modules[name] = None``
    makes both ``import`` and ``find_spec`` see no module)."""
    hidden = ("import sys; sys.modules['nbformat'] = None; from lab_utils.commands.cli import main; "
              f"raise SystemExit(main([{command!r}, {str(tmp_path)!r}]))")
    out = subprocess.run([sys.executable, "-c", hidden], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert out.stderr.count("\n") == 1, out.stderr
    assert f"genlab {command}` needs the instructor extra (nbformat not installed)" in out.stderr
    assert 'pip install "genlab[instructor]"' in out.stderr


def test_a_command_with_its_extra_runs():
    from lab_utils.commands.cli import missing_extra

    assert missing_extra("grade") is None and missing_extra("notebooks") is None  # the dev install has the extras
    assert missing_extra("train") is None  # a command without an extra


def test_build_requirement_and_licence():
    """``license = "MIT"`` (an SPDX expression, PEP 639) and ``license-files`` need setuptools >= 77."""
    requires = PYPROJECT["build-system"]["requires"]
    setuptools = next(req for req in requires if normalize(req).startswith("setuptools"))
    minimum = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", setuptools).group(1).split("."))
    assert minimum >= (77,), setuptools
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the genlab authors" in text


def test_start_here_installs_the_wheel_with_the_notebooks_extra():
    """START_HERE.md names the wheel file `make notebooks` puts beside it (a shell does not expand
    ``genlab-*.whl[notebooks]``) with the extra that brings Jupyter; tests/test_student_install.py runs that line."""
    from lab_utils.commands.notebooks import STUDENT_START, wheel_name

    text = STUDENT_START.format(wheel=wheel_name())
    assert f'pip install "genlab-{PROJECT["version"]}-py3-none-any.whl[notebooks]"' in text
    assert "jupyter lab notebooks/" in text
