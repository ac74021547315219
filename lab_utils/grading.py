"""``genlab grade``: run students' notebooks and score each exercise from the checks' signed records.

    genlab grade submissions/            # submissions/<student>/<notebook>.ipynb, or submissions/<student>.ipynb
    genlab grade alice/01_gan.ipynb --out grades --time-limit 600
    genlab grade submissions/ --jobs 2      # two notebooks at once

Each notebook runs top to bottom in a fresh kernel, in a copy in a temporary folder (what it writes does not land
beside the submission), in smoke mode when its metadata says that is how it is graded (``--full`` runs it as
written), with a time limit for the whole notebook. The graded checks (:func:`lab_utils.exercises.graded`) append
one signed line per result to a record file; the signing key is made here for each run and never written to
disk. An exercise earns its points when its last record passed; printed text is never read, so a cell that
prints a tick earns nothing, and a line not signed with the run's key is counted as rejected.

Points come from the *solution* notebook of the same name in ``notebooks/`` (a student cannot give themself
points by editing their copy's metadata)::

    "metadata": {"genlab": {"notebook": "01_gan", "grade_in_smoke_mode": true,
                            "exercises": {"bce_critic_loss": 1, "gradient_penalty": 2, ...}}}

Output: a table on stdout, and ``grades.csv`` (one row per student, notebook and exercise) and ``grades.json``
(per student: total, and per notebook its score, time, and each exercise's result and message) in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import secrets
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lab_utils.exercises import KEY_ENV, RECORD_ENV, read_records
from lab_utils.notebooks import NOTEBOOK_FOLDER, kernel_environment

DEFAULT_TIME_LIMIT = 600  # seconds per notebook: the lab's promise is <= 10 minutes on a laptop CPU


@dataclass
class ExerciseGrade:
    exercise: str
    points: float
    earned: float
    status: str  # "passed", "failed" or "not run"
    detail: str = ""


@dataclass
class NotebookGrade:
    student: str
    notebook: str
    path: str
    earned: float
    possible: float
    seconds: float
    smoke: bool
    problems: list[str] = field(default_factory=list)
    exercises: list[ExerciseGrade] = field(default_factory=list)


class GradingError(Exception):
    """A bad argument of ``genlab grade`` (one line, exit 1)."""


def genlab_metadata(nb) -> dict:
    meta = nb.metadata.get("genlab", {})
    return meta if isinstance(meta, dict) else {}


def official_points(notebook_id: str, solutions: Path) -> tuple[dict[str, float], bool] | None:
    """The points per exercise and the smoke-mode flag from the solution notebook ``notebook_id``, if it is there."""
    import nbformat

    path = solutions / f"{notebook_id}.ipynb"
    if not path.is_file():
        return None
    meta = genlab_metadata(nbformat.read(path, as_version=4))
    exercises = meta.get("exercises")
    if not isinstance(exercises, dict) or not exercises:
        return None
    return {str(name): float(points) for name, points in exercises.items()}, bool(meta.get("grade_in_smoke_mode", True))


def find_submissions(target: Path) -> list[tuple[str, Path]]:
    """``(student, notebook path)`` pairs: a file is one notebook (its folder names the student); in a folder,
    ``<student>/<...>.ipynb`` or ``<student>.ipynb`` (checkpoint folders are skipped)."""
    if target.is_file():
        if target.suffix != ".ipynb":
            raise GradingError(f"{target} is not a notebook (.ipynb); give a notebook or a folder of them")
        return [(target.resolve().parent.name, target)]
    if not target.is_dir():
        raise GradingError(f"no notebook or folder {target}; give a student's notebook or a folder of submissions")
    found = []
    for path in sorted(target.rglob("*.ipynb")):
        parts = path.relative_to(target).parts
        if any(part.startswith(".") for part in parts):  # .ipynb_checkpoints
            continue
        found.append((parts[0] if len(parts) > 1 else path.stem, path))
    if not found:
        raise GradingError(f"no notebooks (.ipynb) under {target}")
    return found


def run_notebook(path: Path, env: dict[str, str], time_limit: float) -> tuple[float, list[str]]:
    """Execute ``path`` in a fresh kernel with ``env``; stop at ``time_limit`` seconds. Returns the time and the
    problems met (a cell that raised, the time limit); the checks' records are the grade, not these."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=int(time_limit), kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}})
    problems: list[str] = []
    start = time.perf_counter()
    try:
        with client.setup_kernel(env=env):
            for index, cell in enumerate(nb.cells):
                remaining = time_limit - (time.perf_counter() - start)
                if remaining <= 0:
                    problems.append(f"time limit of {time_limit:g} s reached before cell {index}")
                    break
                client.timeout = max(1, int(remaining))
                try:
                    client.execute_cell(cell, index)
                except CellTimeoutError:
                    problems.append(f"time limit of {time_limit:g} s reached in cell {index}")
                    break
                except CellExecutionError:
                    pass  # allow_errors: recorded in the cell's outputs, listed below
                errors = [out for out in cell.get("outputs", []) if out.get("output_type") == "error"]
                if errors:
                    problems.append(f"cell {index} raised {errors[0].get('ename')}: {errors[0].get('evalue')}"[:300])
    except DeadKernelError as err:
        problems.append(f"the kernel died: {err}"[:300])
    return time.perf_counter() - start, problems


def grade_notebook(student: str, path: Path, solutions: Path, time_limit: float, full: bool,
                   env: dict[str, str] | None = None) -> NotebookGrade:
    """Run one notebook and score it; ``env`` adds to the kernel's environment (e.g. ``GENLAB_PRETRAINED``)."""
    import nbformat

    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as err:  # noqa: BLE001 - a submission that is not a readable notebook scores zero
        return NotebookGrade(student, path.stem, str(path), 0.0, 0.0, 0.0, False,
                             [f"not a readable notebook: {type(err).__name__}: {err}"[:300]])
    notebook_id = str(genlab_metadata(nb).get("notebook") or path.stem)
    official = official_points(notebook_id, solutions)
    if official is None:
        return NotebookGrade(student, notebook_id, str(path), 0.0, 0.0, 0.0, False,
                             [f"no graded notebook {notebook_id!r} in {solutions} (its points are read from there)"])
    points, smoke = official
    smoke = smoke and not full
    with tempfile.TemporaryDirectory(prefix="genlab-grade-") as folder:
        copy = Path(shutil.copy(path, Path(folder) / path.name))
        record, key = Path(folder) / "records.jsonl", secrets.token_hex(32)
        kernel_env = kernel_environment({**(env or {}), RECORD_ENV: str(record), KEY_ENV: key,
                                         "GENLAB_SMOKE": "1" if smoke else "0", "GENLAB_STRICT_CHECKS": "0",
                                         "MPLBACKEND": "Agg"})
        seconds, problems = run_notebook(copy, kernel_env, time_limit)
        records, rejected = read_records(record, key)
    if rejected:
        problems.append(f"{rejected} record line(s) not signed by this run were ignored")
    last = {}
    for entry in sorted(records, key=lambda item: item.sequence):
        last[entry.exercise] = entry
    exercises = []
    for name, value in points.items():
        entry = last.get(name)
        if entry is None:
            exercises.append(ExerciseGrade(name, value, 0.0, "not run", "its check did not run"))
        else:
            exercises.append(ExerciseGrade(name, value, value if entry.passed else 0.0,
                                           "passed" if entry.passed else "failed", entry.detail))
    earned = sum(item.earned for item in exercises)
    return NotebookGrade(student, notebook_id, str(path), earned, sum(points.values()), round(seconds, 1), smoke,
                         problems, exercises)


def write_reports(grades: list[NotebookGrade], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "grades.csv", out / "grades.json"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["student", "notebook", "exercise", "points", "earned", "status", "detail"])
        for grade in grades:
            for item in grade.exercises:
                writer.writerow([grade.student, grade.notebook, item.exercise, item.points, item.earned, item.status,
                                 item.detail])
    students: dict[str, dict] = {}
    for grade in grades:
        entry = students.setdefault(grade.student, {"earned": 0.0, "possible": 0.0, "notebooks": []})
        entry["earned"] += grade.earned
        entry["possible"] += grade.possible
        entry["notebooks"].append(asdict(grade))
    json_path.write_text(json.dumps({"students": students}, indent=2) + "\n", encoding="utf-8")
    return csv_path, json_path


def print_table(grades: list[NotebookGrade]) -> None:
    rows = [("student", "notebook", "exercise", "points", "result")]
    for grade in grades:
        for item in grade.exercises:
            rows.append((grade.student, grade.notebook, item.exercise, f"{item.earned:g}/{item.points:g}",
                         item.status + (f": {item.detail}" if item.status == "failed" else "")))
        rows.append((grade.student, grade.notebook, "total", f"{grade.earned:g}/{grade.possible:g}",
                     f"{grade.seconds:.0f} s{' (smoke mode)' if grade.smoke else ''}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4][:120])
    for grade in grades:
        for problem in grade.problems:
            print(f"note: {grade.student}/{grade.notebook}: {problem}")


def grade_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="genlab grade", description="run students' notebooks and score each "
                                     "exercise (CSV and JSON in --out)")
    parser.add_argument("target", help="a student's notebook, or a folder: <student>/<notebook>.ipynb or "
                                       "<student>.ipynb")
    parser.add_argument("--out", default="grades", help="folder for grades.csv and grades.json (default: grades)")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT,
                        help=f"seconds per notebook (default {DEFAULT_TIME_LIMIT})")
    parser.add_argument("--full", action="store_true", help="run notebooks as written, not in smoke mode")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks run at once (default 1; each kernel is its "
                                                            "own process: more than the cores only slows them)")
    parser.add_argument("--solutions", default=str(NOTEBOOK_FOLDER),
                        help="folder of the solution notebooks the points are read from (default: the lab's)")
    options = parser.parse_args(args)
    try:
        if options.jobs < 1:
            raise GradingError(f"--jobs must be at least 1, got {options.jobs}")
        if options.time_limit <= 0:
            raise GradingError(f"--time-limit must be a positive number of seconds, got {options.time_limit:g}")
        solutions = Path(options.solutions)
        if not solutions.is_dir():
            raise GradingError(f"no solutions folder {solutions}; pass --solutions <folder of the lab's notebooks>")
        out = Path(options.out)
        if out.exists() and not out.is_dir():
            raise GradingError(f"--out {out} is a file; give a folder for grades.csv and grades.json")
        submissions = find_submissions(Path(options.target))
    except GradingError as err:
        print(f"genlab: error: {err}", file=sys.stderr)
        return 1
    with ThreadPoolExecutor(max_workers=options.jobs) as pool:  # threads: each waits on its own kernel process
        grades = list(pool.map(lambda item: grade_notebook(item[0], item[1], solutions, options.time_limit,
                                                           options.full), submissions))
    print_table(grades)
    csv_path, json_path = write_reports(grades, Path(options.out))
    print(f"wrote {csv_path} and {json_path}")
    return 0
