"""Every notebook runs top to bottom in smoke mode; the student versions have failing checks.

Notebooks are executed from a copy in a temporary folder (so files they write do not land in
the repository), in a kernel of this interpreter, with ``GENLAB_SMOKE=1`` (tiny settings) and
``GENLAB_STRICT_CHECKS=1`` (a failed exercise check raises, so a broken solution fails here).
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

from lab_utils.notebooks import execute_notebook, has_solutions, make_student_versions

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
FIRST = NOTEBOOK_DIR / "00_setup_data_and_text.ipynb"
SMOKE_ENV = {"GENLAB_SMOKE": "1", "GENLAB_STRICT_CHECKS": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "2"}
CELL_TIMEOUT = 300  # seconds per cell; smoke notebooks should need a few


def outputs_text(nb) -> str:
    """Everything the notebook's code cells printed (streams, results and error tracebacks)."""
    chunks = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                chunks.append(output.text)
            elif output.output_type in ("execute_result", "display_data"):
                chunks.append(output.get("data", {}).get("text/plain", ""))
            elif output.output_type == "error":
                chunks.append(f"{output.ename}: {output.evalue}")
    return "\n".join(chunks)


def test_the_first_notebook_exists():
    assert FIRST in NOTEBOOKS


# Notebooks that load the shipped model by default (GENLAB_PRETRAINED unset) run that way here too; the ones that
# train by default run as they are.
LOADS_BY_DEFAULT = {"02_vae", "04_text_conditioning"}
TRAINS_BY_DEFAULT = ["01_gan", "03_diffusion", "06_latent_diffusion"]
# The other way of 01, 03 and 06 (GENLAB_PRETRAINED=1) is not in the suite, for time (~130 s in all on 2 cores; 03
# alone ~85 s: its sampling cells then draw with the full 1.5M-parameter DDPM): run it by hand, e.g.
# GENLAB_SMOKE=1 GENLAB_PRETRAINED=1 .venv/bin/jupyter nbconvert --to notebook --execute notebooks/03_diffusion.ipynb


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(notebook, tmp_path):
    copy = shutil.copy(notebook, tmp_path / notebook.name)
    env = {**SMOKE_ENV, "GENLAB_PRETRAINED": "1"} if notebook.stem in LOADS_BY_DEFAULT else SMOKE_ENV
    nb = execute_notebook(copy, timeout=CELL_TIMEOUT, env_overrides=env)  # raises on the first error
    text = outputs_text(nb)
    assert "❌" not in text, f"a check failed in {notebook.name}:\n{text}"
    if any(has_solutions(cell.source) for cell in nb.cells if cell.cell_type == "code"):
        assert "✅" in text, f"{notebook.name} has exercises but no check passed"


def test_kernel_is_this_interpreter(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os, sys\nprint(sys.executable)\nprint(os.getcwd())\nprint(os.environ['GENLAB_SMOKE'])")])
    path = tmp_path / "where.ipynb"
    nbformat.write(nb, path)
    executable, cwd, smoke = outputs_text(execute_notebook(path, env_overrides={"GENLAB_SMOKE": "1"})).split()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(cwd).resolve() == tmp_path.resolve()
    assert smoke == "1"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student")
    written = make_student_versions(NOTEBOOK_DIR, out)
    assert sorted(path.name for path in written) == [path.name for path in NOTEBOOKS]
    return out


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_student_version_replaces_every_solution(notebook, student_dir):
    solution = nbformat.read(notebook, as_version=4)
    student = nbformat.read(student_dir / notebook.name, as_version=4)
    assert "Student version" in student.cells[0].source
    assert len(student.cells) == len(solution.cells) + 1
    for solution_cell, student_cell in zip(solution.cells, student.cells[1:]):
        if solution_cell.cell_type != "code":
            assert student_cell.source == solution_cell.source
            continue
        regions = len(re.findall(r"^\s*#\s*BEGIN SOLUTION", solution_cell.source, flags=re.M))
        assert "SOLUTION" not in student_cell.source
        assert student_cell.source.count("raise NotImplementedError(") - solution_cell.source.count(
            "raise NotImplementedError(") == regions
        assert student_cell.outputs == [] and student_cell.execution_count is None


def test_student_version_of_00_fails_its_checks(student_dir):
    """Unsolved, the exercise check reports "not implemented yet" (and the notebook still runs on)."""
    env = dict(SMOKE_ENV, GENLAB_STRICT_CHECKS="0")
    nb = execute_notebook(student_dir / FIRST.name, timeout=CELL_TIMEOUT, env_overrides=env, allow_errors=True)
    check_lines = [line for line in outputs_text(nb).splitlines() if line.startswith(("✅", "❌"))]
    assert check_lines, "the check printed nothing"
    assert all(line.startswith("❌") and "not implemented yet" in line for line in check_lines), check_lines
    assert any(line.startswith("❌ attention:") for line in check_lines)
