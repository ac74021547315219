"""``genlab grade``: run students' notebooks in a sandbox and judge each exercise in the grader's own process.

    genlab grade submissions/            # submissions/<student>/<notebook>.ipynb, or submissions/<student>.ipynb
    genlab grade alice/01_gan.ipynb out=grades time_limit=600
    genlab grade submissions/ jobs=2         # two notebooks at once (--jobs 2 works too)

Before any submission runs, the solution notebooks are read into memory: per notebook (a plain name, the file's
stem) the points of each exercise, whether it is graded in smoke mode, and the instructor's check call for each
exercise (``check_attention(attention)``: which check, given which of the student's names). A submission is data:
its metadata may only *name* one of those notebooks.

Each notebook runs in a sandbox (:mod:`lab_utils.commands.sandbox`, bubblewrap; without it ``genlab grade`` refuses unless
``unsandboxed=true`` says the instructor accepts running students' code as themself) in a fresh work folder, by
:mod:`lab_utils.commands.grade_runner`: the student's cells in order, then, for each exercise, the instructor's check on
inputs drawn for this run (the draw is handed over on the runner's stdin, readable once). The sandbox only sends
back what the student's code *returned* (JSON and safetensors) and the guard's reports of forbidden calls; the
verdict is :func:`lab_utils.core.exercises.records.judge` here: the reference computed in this process on the same
inputs, compared with the same tolerances and hints as in the notebook. Nothing the submission prints, writes or
signs is read as a grade.

Output (:mod:`lab_utils.commands.grades`): a table on stdout, and ``grades.csv`` (one row per student, notebook and
exercise; a submission that could not be graded gets one row with its problem) and ``grades.json`` in ``out=``,
rewritten as each notebook finishes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import resource
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from lab_utils.commands.arguments import key_value_arguments
from lab_utils.commands.grades import ExerciseGrade, NotebookGrade, print_table, write_reports
from lab_utils.commands.notebooks import NOTEBOOK_FOLDER
from lab_utils.commands.sandbox import INSIDE_WORK, Limits, SandboxUnavailable, bwrap_command, check_sandbox, \
    sandbox_environment
from lab_utils.core.exercises import records

DEFAULT_TIME_LIMIT = 600  # seconds per notebook: the lab's promise is <= 10 minutes on a laptop CPU


class GradingError(Exception):
    """A bad argument of ``genlab grade`` (one line, exit 1)."""


PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # a notebook id: a file name, never a path
MAX_NOTEBOOK_BYTES = 64 * 2**20
CHECK_MODULES = re.compile(r"^labs\.[a-z_]+\.exercises$")


def genlab_metadata(nb) -> dict:
    meta = nb.metadata.get("genlab", {})
    return meta if isinstance(meta, dict) else {}


@dataclass(frozen=True)
class GradedCheck:
    exercise: str
    module: str  # e.g. labs.text_encoder.exercises
    check: str  # e.g. check_attention
    argument: str  # the student's name it is given, e.g. attention


@dataclass(frozen=True)
class SolutionNotebook:
    """What the grader keeps of a solution notebook (read once, before any submission runs)."""

    notebook: str
    points: dict[str, float]
    smoke: bool
    checks: tuple[GradedCheck, ...]


def _code_without_magics(source: str) -> str:
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def graded_checks(nb) -> list[GradedCheck]:
    """The instructor's check calls in a solution notebook: ``check_x(name)`` for each graded check it imports."""
    import ast

    imported: dict[str, tuple[str, str]] = {}
    calls: list[tuple[str, str]] = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(_code_without_magics(cell.source))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and CHECK_MODULES.match(node.module):
                for alias in node.names:
                    imported[alias.asname or alias.name] = (node.module, alias.name)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args
                  and isinstance(node.args[0], ast.Name)):
                calls.append((node.func.id, node.args[0].id))
    found: dict[str, GradedCheck] = {}
    for function, argument in calls:
        if function not in imported:
            continue
        module, name = imported[function]
        exercise = getattr(getattr(importlib.import_module(module), name), "exercise", None)
        if exercise and exercise not in found:
            found[exercise] = GradedCheck(exercise, module, name, argument)
    return list(found.values())


def load_solutions(folder: Path) -> dict[str, SolutionNotebook]:
    """Every solution notebook in ``folder`` whose file name is a plain id matching its metadata: points, smoke flag
    and the check calls, read into memory once."""
    import nbformat

    out = {}
    for path in sorted(folder.glob("*.ipynb")):
        if not PLAIN_NAME.match(path.stem) or path.is_symlink():
            continue
        nb = nbformat.read(path, as_version=4)
        meta = genlab_metadata(nb)
        points = meta.get("exercises")
        if meta.get("notebook", path.stem) != path.stem or not isinstance(points, dict) or not points:
            continue
        checks = {check.exercise: check for check in graded_checks(nb)}
        missing = [name for name in points if name not in checks]
        if missing:
            raise GradingError(f"{path}: no check call for exercise(s) {missing} in the solution notebook")
        out[path.stem] = SolutionNotebook(path.stem, {str(k): float(v) for k, v in points.items()},
                                          bool(meta.get("grade_in_smoke_mode", True)),
                                          tuple(checks[name] for name in points))
    return out


def find_submissions(target: Path) -> list[tuple[str, Path]]:
    """``(student, notebook path)`` pairs: a file is one notebook (its folder names the student); in a folder,
    ``<student>/<...>.ipynb`` or ``<student>.ipynb`` (checkpoint folders and symbolic links are skipped)."""
    if target.is_file():
        if target.suffix != ".ipynb":
            raise GradingError(f"{target} is not a notebook (.ipynb); give a notebook or a folder of them")
        return [(target.resolve().parent.name, target)]
    if not target.is_dir():
        raise GradingError(f"no notebook or folder {target}; give a student's notebook or a folder of submissions")
    found = []
    for path in sorted(target.rglob("*.ipynb")):
        parts = path.relative_to(target).parts
        if any(part.startswith(".") for part in parts) or path.is_symlink():  # .ipynb_checkpoints
            continue
        found.append((parts[0] if len(parts) > 1 else path.stem, path))
    if not found:
        raise GradingError(f"no notebooks (.ipynb) under {target}")
    return found


def _read_submission(path: Path):
    import nbformat

    if path.stat().st_size > MAX_NOTEBOOK_BYTES:
        raise ValueError(f"larger than {MAX_NOTEBOOK_BYTES // 2**20} MiB")
    return nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)


def _run_sandboxed(work: Path, draw: int, env: dict[str, str], time_limit: float, sandboxed: bool,
                   limits: Limits) -> list[str]:
    """Run the runner on ``work``; the problems met (time limit, a crash) besides the notebook's own."""
    argv = [sys.executable, "-m", "lab_utils.commands.grade_runner"]
    if sandboxed:
        command = bwrap_command(work, argv + [INSIDE_WORK], sandbox_environment(env, inside=True))
        process_env, cwd = {}, None
    else:
        command = argv + [str(work)]
        process_env = sandbox_environment({**env, "HOME": str(work / "home"),
                                           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}, inside=False)
        cwd = work
    problems = []
    with open(work / "output.log", "wb") as log:
        rlimits = limits.rlimits()  # worked out here: the child between fork and exec only sets them
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                   env=process_env, start_new_session=True,
                                   preexec_fn=lambda: [resource.setrlimit(*item) for item in rlimits])
        try:
            process.stdin.write(f"{draw}\n".encode())
            process.stdin.close()
        except OSError:
            pass
        try:
            code = process.wait(timeout=time_limit)
            if code != 0:
                problems.append(f"the notebook's process ended with exit code {code}")
        except subprocess.TimeoutExpired:
            problems.append(f"time limit of {time_limit:g} s reached")
        finally:
            try:
                os.killpg(process.pid, 9)  # the sandbox, and everything the notebook started
            except OSError:
                pass
            process.wait()
    return problems


def _read_json(path: Path, limit: int = 2**20):
    if not path.is_file() or path.stat().st_size > limit:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError:
        return None


def _violations(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = path.read_bytes()[: 2**20].decode("utf-8", errors="replace").splitlines()
    return list(dict.fromkeys(line[2:].strip() for line in lines if line.startswith("V ")))


def judge_exercise(check: GradedCheck, points: float, draw: int, work: Path, index: int,
                   ran: bool) -> ExerciseGrade:
    """The verdict on one exercise from what the sandbox sent back (data), against the reference computed here."""
    from lab_utils.commands.grade_runner import decode_observations

    spec = records.check_spec(getattr(importlib.import_module(check.module), check.check), draw)
    violations = _violations(work / f"bad-{index}.txt")
    if violations:
        called = ", ".join(f"`{name}`" for name in violations[:3])
        return ExerciseGrade(check.exercise, points, 0.0, "failed",
                             f"your code calls {called} while its check runs: the lab's own version of what this "
                             f"exercise asks you to write (or a way around the grader's guard); write it from the "
                             f"operations themselves")
    observation_file = work / f"obs-{index}.bin"
    if not ran or not observation_file.is_file() or observation_file.stat().st_size == 0:
        return ExerciseGrade(check.exercise, points, 0.0, "not run", "its check did not run (the notebook did not "
                                                                      "reach it within the time limit?)")
    try:
        observations = decode_observations(observation_file.read_bytes())
    except Exception as err:  # noqa: BLE001 - data from the sandbox: anything garbled is the submission's
        return ExerciseGrade(check.exercise, points, 0.0, "failed", f"its check sent back nothing readable ({err})"[:300])
    if len(observations) != 1:
        return ExerciseGrade(check.exercise, points, 0.0, "failed",
                             f"its check sent back {len(observations)} observations, not one")
    passed, detail = records.judge(spec, observations[0])
    return ExerciseGrade(check.exercise, points, points if passed else 0.0, "passed" if passed else "failed",
                         detail[:1000])


def grade_notebook(student: str, path: Path, solutions: dict[str, SolutionNotebook] | Path, time_limit: float,
                   full: bool, env: dict[str, str] | None = None, sandboxed: bool = True,
                   limits: Limits = Limits()) -> NotebookGrade:
    """Run one notebook in a sandbox and score it; ``env`` adds to the notebook's (cleared) environment."""
    if isinstance(solutions, Path):
        solutions = load_solutions(solutions)
    try:
        nb = _read_submission(path)
    except Exception as err:  # noqa: BLE001 - a submission that is not a readable notebook scores zero
        return NotebookGrade(student, path.stem, str(path), 0.0, 0.0, 0.0, False,
                             [f"not a readable notebook: {type(err).__name__}: {err}"[:300]])
    claimed = genlab_metadata(nb).get("notebook") or path.stem
    notebook_id = claimed if isinstance(claimed, str) and PLAIN_NAME.match(claimed) else None
    solution = solutions.get(notebook_id) if notebook_id else None
    if solution is None:
        return NotebookGrade(student, str(claimed)[:100], str(path), 0.0, 0.0, 0.0, False,
                             [f"no graded notebook {str(claimed)[:100]!r} among the solutions (a notebook id is a "
                              f"plain name such as 01_gan)"])
    smoke = solution.smoke and not full
    cells = [(index, cell.source) for index, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and isinstance(cell.source, str)]
    draw = 1 + secrets.randbelow(2**62 - 2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="genlab-grade-") as folder:
        work = Path(folder)
        os.chmod(work, 0o700)
        (work / "plan.json").write_text(json.dumps({"cells": cells, "checks": [asdict(c) for c in solution.checks]}),
                                        encoding="utf-8")
        problems = _run_sandboxed(work, draw, {**(env or {}), "GENLAB_SMOKE": "1" if smoke else "0",
                                               "GENLAB_STRICT_CHECKS": "0"}, time_limit, sandboxed, limits)
        seconds = time.perf_counter() - start
        cell_problems = _read_json(work / "cells.json")
        notebook_problems = cell_problems[:50] if isinstance(cell_problems, list) else []
        problems = [str(item)[:300] for item in notebook_problems] + problems
        channel_read = (work / "channel").exists()
        if channel_read:
            problems.append("the notebook read the grading channel (the inputs drawn for this run) before its checks "
                            "ran: nothing is scored")
        if not sandboxed:
            problems.append("graded without a sandbox (unsandboxed=true): not for credit")
        exercises_out = [judge_exercise(check, solution.points[check.exercise], draw, work, index,
                                        ran=not channel_read)
                         for index, check in enumerate(solution.checks)]
    earned = sum(item.earned for item in exercises_out)
    return NotebookGrade(student, solution.notebook, str(path), earned, sum(solution.points.values()),
                         round(seconds, 1), smoke, problems, exercises_out)


def _notebook_key(student: str, path: Path) -> str:
    """Which notebook a submission claims to be (for one grade per student and notebook); its file name if unreadable."""
    try:
        claimed = genlab_metadata(_read_submission(path)).get("notebook") or path.stem
    except Exception:  # noqa: BLE001 - graded (as unreadable) on its own
        return f"{student}/{path}"
    return f"{student}/{claimed}"


def grade_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="genlab grade", description="run students' notebooks in a sandbox and "
                                     "score each exercise (CSV and JSON in out=)")
    parser.add_argument("target", help="a student's notebook, or a folder: <student>/<notebook>.ipynb or "
                                       "<student>.ipynb")
    parser.add_argument("--out", default="grades", help="out=: folder for grades.csv and grades.json "
                                                        "(default: grades)")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT,
                        help=f"time_limit=: seconds per notebook (default {DEFAULT_TIME_LIMIT})")
    parser.add_argument("--full", action="store_true", help="full=true: run notebooks as written, not in smoke mode")
    parser.add_argument("--jobs", type=int, default=1, help="jobs=: notebooks run at once (default 1; each is its "
                                                            "own process: more than the cores only slows them)")
    parser.add_argument("--solutions", default=str(NOTEBOOK_FOLDER),
                        help="solutions=: folder of the solution notebooks the points and checks are read from "
                             "(default: the "
                             "lab's)")
    parser.add_argument("--memory-limit", type=float, default=Limits().memory_bytes / 2**30,
                        help="memory_limit=: GiB of memory per notebook (default 6)")
    parser.add_argument("--unsandboxed", action="store_true",
                        help="unsandboxed=true: run students' code without a sandbox, as yourself: not for credit "
                             "(bubblewrap missing)")
    options = parser.parse_args(key_value_arguments(args, parser))
    try:
        if options.jobs < 1:
            raise GradingError(f"jobs must be at least 1, got jobs={options.jobs}")
        if not (math.isfinite(options.time_limit) and options.time_limit > 0):
            raise GradingError(f"time_limit must be a positive number of seconds, got time_limit={options.time_limit:g}")
        if not (math.isfinite(options.memory_limit) and options.memory_limit >= 0.5):
            raise GradingError(f"memory_limit must be at least 0.5 GiB, got memory_limit={options.memory_limit:g}")
        solutions_folder = Path(options.solutions)
        if not solutions_folder.is_dir():
            raise GradingError(f"no solutions folder {solutions_folder}; pass solutions=<folder of the lab's "
                               f"notebooks>")
        out = Path(options.out)
        if out.exists() and not out.is_dir():
            raise GradingError(f"out={out} is a file; give a folder for grades.csv and grades.json")
        submissions = find_submissions(Path(options.target))
        solutions = load_solutions(solutions_folder)
        if not solutions:
            raise GradingError(f"no solution notebooks with graded exercises in {solutions_folder}")
        if not options.unsandboxed:
            check_sandbox()
    except (GradingError, SandboxUnavailable) as err:
        print(f"genlab: error: {err}", file=sys.stderr)
        return 1
    limits = Limits(memory_bytes=int(options.memory_limit * 2**30))
    seen: dict[str, Path] = {}
    jobs, duplicates = [], []
    for student, path in submissions:
        key = _notebook_key(student, path)
        if key in seen:
            duplicates.append(NotebookGrade(student, key.split("/", 1)[1][:100], str(path), 0.0, 0.0, 0.0, False,
                                            [f"a second copy of this notebook from {student}: graded once, from "
                                             f"{seen[key]}"]))
        else:
            seen[key] = path
            jobs.append((student, path))
    grades: list[NotebookGrade] = list(duplicates)
    lock = threading.Lock()
    out = Path(options.out)
    write_reports(grades, out)

    def run(job: tuple[str, Path]) -> None:
        student, path = job
        grade = grade_notebook(student, path, solutions, options.time_limit, options.full,
                               sandboxed=not options.unsandboxed, limits=limits)
        with lock:  # each grade lands as soon as it is known: a grader stopped half-way keeps the finished ones
            grades.append(grade)
            write_reports(grades, out)
            print(f"graded {grade.student}/{grade.notebook}: {grade.earned:g}/{grade.possible:g}", file=sys.stderr)

    with ThreadPoolExecutor(max_workers=options.jobs) as pool:  # threads: each waits on its own sandbox process
        list(pool.map(run, jobs))
    order = {id(grade): index for index, grade in enumerate(grades)}
    grades.sort(key=lambda grade: (grade.student, grade.notebook, order[id(grade)]))
    print_table(grades)
    csv_path, json_path = write_reports(grades, out)
    print(f"wrote {csv_path} and {json_path}")
    return 0
