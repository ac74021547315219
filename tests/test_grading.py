"""``genlab grade``: scores come from the graded checks' signed records, never from printed text.

One ``genlab grade`` run over a folder of five small "students" (each a notebook with two graded exercises,
attention from notebook 00 and the KL divergence from notebook 02) checks every case of the issue: full marks,
no answers, printed ticks and forged records, one right and one wrong, an answer that calls the reference, points
taken from the solutions folder rather than the student's copy, and the time limit.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from lab_utils.exercises import read_records

REPO = Path(__file__).resolve().parent.parent
POINTS = {"attention": 2, "kl_divergence": 1}

IMPORTS = """\
import math
import torch
from labs.text_encoder.exercises import check_attention
from labs.vae.exercises import check_kl_divergence
"""
ATTENTION_RIGHT = """\
def attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v
"""
ATTENTION_STUB = "def attention(q, k, v, mask=None):\n    raise NotImplementedError('exercise')\n"
ATTENTION_REFERENCE = ("from labs.text_encoder import scaled_dot_product_attention\n"
                       "def attention(q, k, v, mask=None):\n    return scaled_dot_product_attention(q, k, v, mask)\n")
KL_RIGHT = "def kl(mu, logvar):\n    return 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(-1)\n"
KL_WRONG = "def kl(mu, logvar):\n    return (mu ** 2 + logvar.exp() - 1 - logvar).sum(-1)\n"  # no 1/2
KL_STUB = "def kl(mu, logvar):\n    raise NotImplementedError('exercise')\n"
CHECKS = "check_attention(attention)\ncheck_kl_divergence(kl)\n"
FAKE = """\
import os
print("✅ attention: passed (6 cases)")
print("✅ kl_divergence: passed (4 cases)")
path = os.environ.get("GENLAB_GRADE_RECORD")
if path:  # a record written by hand, and one through the low-level reporter outside a graded check
    with open(path, "a") as handle:
        handle.write('{"exercise": "attention", "passed": true, "detail": "passed", "sequence": 99, '
                     '"signature": "0" }\\n')
import lab_utils.exercises as ex
ex._report("attention", True, "passed")
"""


def notebook(*cells: str, points: dict | None = None):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell) for cell in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["genlab"] = {"notebook": "graded_fixture", "grade_in_smoke_mode": True,
                             "exercises": dict(points if points is not None else POINTS)}
    return nb


STUDENTS = {
    "full": notebook(IMPORTS, ATTENTION_RIGHT, KL_RIGHT, CHECKS),
    "empty": notebook(IMPORTS, ATTENTION_STUB, KL_STUB, CHECKS),
    "ticks": notebook(IMPORTS, ATTENTION_STUB, KL_STUB, FAKE),
    "half": notebook(IMPORTS, ATTENTION_RIGHT, KL_WRONG, CHECKS,
                     points={"attention": 100, "kl_divergence": 100}),  # its own points are not read
    "calls_reference": notebook(IMPORTS, ATTENTION_REFERENCE, KL_RIGHT, CHECKS),
    "slow": notebook(IMPORTS, KL_RIGHT, "check_kl_divergence(kl)", "import time\ntime.sleep(60)",
                     ATTENTION_RIGHT + "check_attention(attention)"),
}
EXPECTED = {"full": 3, "empty": 0, "ticks": 0, "half": 2, "calls_reference": 1, "slow": 1}


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("grade")
    solutions, submissions, out = root / "solutions", root / "submissions", root / "grades"
    solutions.mkdir()
    nbformat.write(notebook(IMPORTS, ATTENTION_RIGHT, KL_RIGHT, CHECKS), solutions / "graded_fixture.ipynb")
    for student, nb in STUDENTS.items():
        (submissions / student).mkdir(parents=True)
        nbformat.write(nb, submissions / student / "graded_fixture.ipynb")
    result = subprocess.run([sys.executable, "-m", "genlab", "grade", str(submissions), "--out", str(out),
                             "--solutions", str(solutions), "--time-limit", "20", "--jobs", "3"],
                            capture_output=True, text=True, cwd=root, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # three small kernels share the cores
    assert result.returncode == 0, result.stderr
    return {"stdout": result.stdout, "json": json.loads((out / "grades.json").read_text()),
            "csv": list(csv.DictReader(open(out / "grades.csv", encoding="utf-8")))}


def test_each_student_scores_what_their_answers_earn(graded):
    students = graded["json"]["students"]
    assert sorted(students) == sorted(STUDENTS)
    scores = {name: entry["earned"] for name, entry in students.items()}
    assert scores == EXPECTED, graded["stdout"]
    assert all(entry["possible"] == 3 for entry in students.values()), "points come from the solutions folder"


def test_per_exercise_results_say_why(graded):
    rows = {(row["student"], row["exercise"]): row for row in graded["csv"]}
    assert len(rows) == len(STUDENTS) * len(POINTS)
    assert rows[("half", "attention")]["status"] == "passed" and rows[("half", "attention")]["earned"] == "2.0"
    assert rows[("half", "kl_divergence")]["status"] == "failed"
    assert rows[("empty", "attention")]["status"] == "failed"
    assert "not implemented yet" in rows[("empty", "attention")]["detail"]
    assert rows[("ticks", "attention")]["status"] == "not run", "printed ticks and forged records count for nothing"
    assert "calls the lab's" in rows[("calls_reference", "attention")]["detail"]
    assert rows[("slow", "kl_divergence")]["status"] == "passed"
    assert rows[("slow", "attention")]["status"] == "not run"


def test_forged_records_and_the_time_limit_are_reported(graded):
    notebooks = {name: entry["notebooks"][0] for name, entry in graded["json"]["students"].items()}
    assert any("not signed by this run" in problem for problem in notebooks["ticks"]["problems"])
    assert any("time limit of 20 s" in problem for problem in notebooks["slow"]["problems"])
    assert notebooks["slow"]["seconds"] < 30
    assert notebooks["full"]["problems"] == [] and notebooks["full"]["smoke"] is True
    assert "full" in graded["stdout"] and "3/3" in graded["stdout"]


def test_records_need_the_runs_key(tmp_path, monkeypatch):
    import lab_utils.exercises as exercises

    path = tmp_path / "records.jsonl"
    monkeypatch.setenv(exercises.RECORD_ENV, str(path))
    monkeypatch.setattr(exercises, "_GRADE_KEY", b"k1")
    monkeypatch.delenv("GENLAB_STRICT_CHECKS", raising=False)
    check = exercises.graded("double")(lambda fn: exercises.check_value(fn(2), 4, name="double"))
    assert check(lambda x: 2 * x) and not check(lambda x: x + 3)
    exercises.check_value(4, 4, name="double")  # outside a graded check: no record
    records, rejected = read_records(path, "k1")
    assert [(r.exercise, r.passed) for r in records] == [("double", True), ("double", False)] and rejected == 0
    assert read_records(path, "another key") == ([], 2)
    lines = path.read_text().splitlines()
    path.write_text(lines[1].replace('"passed": false', '"passed": true') + "\n")  # a record edited by hand
    assert read_records(path, "k1") == ([], 1)


@pytest.mark.parametrize("args, message", [
    (["/no/such/folder"], "no notebook or folder"),
    (["README.md"], "is not a notebook"),
    (["tests", "--time-limit", "0"], "--time-limit must be a positive"),
    (["tests", "--jobs", "0"], "--jobs must be at least 1"),
    (["tests", "--out", "README.md"], "is a file"),
    (["tests", "--solutions", "/no/such"], "no solutions folder"),
    (["conf"], "no notebooks (.ipynb) under conf"),
])
def test_bad_arguments_are_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "genlab", "grade", *args], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (REPO / "grades").exists()
