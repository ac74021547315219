"""What ``genlab grade`` reports: each notebook's grade and its exercises', as a table, grades.csv and grades.json.

A :class:`NotebookGrade` is one student's notebook (points earned and possible, how long it ran, whether in smoke
mode, the problems met, such as a time limit or a submission that could not be graded) with an :class:`ExerciseGrade`
per exercise. The grader (:mod:`lab_utils.commands.grading`) rewrites both files as each notebook finishes
(:func:`write_reports`: each file replaced whole, so a reader never sees half of one and a grader stopped half-way
keeps the grades it finished) and prints :func:`print_table` at the end.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


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


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_reports(grades: list[NotebookGrade], out: Path) -> tuple[Path, Path]:
    """``grades.csv`` and ``grades.json`` in ``out``, each replaced whole (a reader never sees half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "grades.csv", out / "grades.json"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["student", "notebook", "exercise", "points", "earned", "status", "detail"])
    for grade in grades:
        for item in grade.exercises:
            writer.writerow([grade.student, grade.notebook, item.exercise, item.points, item.earned, item.status,
                             item.detail])
        if not grade.exercises:  # every submission has a row, with what kept it from being graded
            writer.writerow([grade.student, grade.notebook, "", 0, 0, "not graded", "; ".join(grade.problems)])
    _write_atomically(csv_path, buffer.getvalue())
    students: dict[str, dict] = {}
    for grade in grades:
        entry = students.setdefault(grade.student, {"earned": 0.0, "possible": 0.0, "notebooks": []})
        entry["earned"] += grade.earned
        entry["possible"] += grade.possible
        entry["notebooks"].append(asdict(grade))
    _write_atomically(json_path, json.dumps({"students": students}, indent=2) + "\n")
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
