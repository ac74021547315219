"""``genlab grade``: the verdict is decided in the grader, on what a sandboxed notebook's code returns.

One ``genlab grade`` run over a folder of small "students" (each a notebook with two graded exercises, attention from
notebook 00 and the KL divergence from notebook 02) checks honest answers and the attacks of issue 31: forged
records and keys, a patched checker, the solutions read from disk, a path as notebook id, a background process, a
kernel that rewrites the solutions or kills the grader, the reference reached under another name, a table of
recorded outputs, the grading channel read early, a notebook handed in twice, files outside the submission, the
grader's environment, and memory. Each scores 0 for what it targets; the honest answers score full.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess

import shutil
import threading
import time

import nbformat
import pytest

from conftest import GENLAB, REPO
from forked_cli import run_genlab_many

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
import lab_utils.core.exercises.checks as ex
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
    # named to be graded first (students go in name order): its 15 s limit passes while the others run
    "asleep": notebook(IMPORTS, KL_RIGHT, "check_kl_divergence(kl)", "import time\ntime.sleep(60)",
                     ATTENTION_RIGHT + "check_attention(attention)"),
}
EXPECTED = {"full": 3, "empty": 0, "ticks": 0, "half": 2, "calls_reference": 1, "asleep": 0}  # asleep: the checks run after the notebook



SECRET = "instructor-secret-value"
SOLUTIONS = "SOLUTIONS_FOLDER"  # replaced by the solutions folder's path in the attacks that look for it
OUTSIDE = "OUTSIDE_FILE"  # replaced by the path of a file outside the submission
WRONG_ATTENTION = "def attention(q, k, v, mask=None):\n    return v * 0\n"
ATTACKS = {
    # records written by hand with the old internals, and forged observation files in the working folder
    "write_record": [ATTENTION_STUB, KL_STUB, CHECKS,
                     "import lab_utils.core.exercises.records as ex\nfor e in ('attention', 'kl_divergence'):\n"
                     "    ex._write_record(e, True, '')"],
    "forged_files": [ATTENTION_STUB, KL_STUB, CHECKS,
                     "for i in range(4):\n    open(f'obs-{i}.bin', 'wb').write(b'garbage')\n"],
    # a key from the module, the environment or /proc
    "key": [ATTENTION_STUB, KL_STUB, CHECKS,
            "import os, lab_utils.core.exercises.records as ex\nkey = getattr(ex, '_GRADE_KEY', b'') or os.environ.get("
            "'GENLAB_GRADE_KEY', '')\nassert not key, key\nprint(open('/proc/self/environ').read())"],
    # the checker monkeypatched, with wrong answers
    "patched_difference": ["from lab_utils.core.exercises import cases, checks, difference, records\n"
                           "for m in (difference, cases, checks, records):\n"
                           "    m.difference = lambda *a, **k: None\n"
                           "records.judge = lambda *a, **k: (True, 'passed')", WRONG_ATTENTION, KL_WRONG, CHECKS],
    "patched_check_function": ["import lab_utils.core.exercises.checks as ex, labs.vae.exercises as vx, "
                               "labs.text_encoder.exercises as tx\n"
                               "stub = lambda *a, **k: ex.CheckResult('x', True, 'passed')\n"
                               "for m in (ex, vx, tx):\n    m.check_function = stub\n    m.check_module = stub",
                               ATTENTION_STUB, KL_STUB, CHECKS],
    # the solution notebook read from disk and its cells executed
    "reads_solutions": [ATTENTION_STUB, KL_STUB,
                        "import json, glob\nfor path in glob.glob('SOLUTIONS_FOLDER/*.ipynb'):\n"
                        "    for cell in json.load(open(path))['cells'][1:3]:\n        exec(''.join(cell['source']))",
                        CHECKS],
    # a background process in a session of its own: would outlive the notebook and rewrite a file outside
    "background": [ATTENTION_STUB, KL_STUB, CHECKS,
                   "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time, pathlib; "
                   "time.sleep(4); pathlib.Path(\"OUTSIDE_FILE\").write_text(\"999\")'], start_new_session=True)"],
    # the solutions' points rewritten by a kernel
    "rewrites_solutions": [ATTENTION_STUB, KL_STUB, CHECKS,
                           "import json\np = 'SOLUTIONS_FOLDER/graded_fixture.ipynb'\nnb = json.load(open(p))\n"
                           "nb['metadata']['genlab']['exercises'] = {'attention': 0.001, 'kl_divergence': 0.001}\n"
                           "json.dump(nb, open(p, 'w'))"],
    # the grader killed
    "kills_grader": [ATTENTION_RIGHT, KL_RIGHT, CHECKS, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"],
    # the reference under other names
    "sdpa_builtin": ["import torch\ndef attention(q, k, v, mask=None):\n"
                     "    return torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=mask)", KL_RIGHT, CHECKS],
    "sdpa_ops": ["import torch\ndef attention(q, k, v, mask=None):\n"
                 "    return torch.ops.aten.scaled_dot_product_attention.default(q, k, v, mask)", KL_RIGHT, CHECKS],
    "code_copy": ["import types\nfrom labs.text_encoder import model\n"
                  "f = model.scaled_dot_product_attention\n"
                  "attention = types.FunctionType(f.__code__, f.__globals__, 'attention', f.__defaults__)", KL_RIGHT, CHECKS],
    "source_reloaded": ["import importlib, labs.text_encoder.model as m\nfresh = importlib.reload(m)\n"
                        "attention = fresh.scaled_dot_product_attention\n", KL_RIGHT, CHECKS],
    "patch_during_check": ["import sys\ndef attention(q, k, v, mask=None):\n    sys.setprofile(None)\n"
                           "    from labs.text_encoder.model import scaled_dot_product_attention as f\n"
                           "    return f(q, k, v, mask)", KL_RIGHT, CHECKS],
    # a table of the reference's outputs on the notebook's fixed inputs
    "table": ["from labs.text_encoder.exercises import attention_cases\n"
              "from labs.text_encoder.model import scaled_dot_product_attention as f\n"
              "TABLE = [(c.args[0], f(*c.args, **c.kwargs)) for c in attention_cases()]\n"
              "def attention(q, k, v, mask=None):\n"
              "    return next(out for inp, out in TABLE if inp.shape == q.shape and torch.allclose(inp, q))",
              KL_RIGHT, CHECKS],
    # the draw read before the checks run
    "reads_channel": [ATTENTION_RIGHT, KL_RIGHT, CHECKS,
                      "import os\nfor fd in range(3, 64):\n    try:\n        os.read(fd, 64)\n"
                      "    except OSError:\n        pass"],
    # files outside, the grader's environment, memory
    "outside": [ATTENTION_STUB, KL_STUB, CHECKS, "import os, pathlib\npathlib.Path('OUTSIDE_FILE').write_text('x')",
                "assert 'GENLAB_TEST_SECRET' not in os.environ, 'the secret'", "x = bytearray(int(4.75 * 2**30))"],
}
EXPECTED_ATTACKS = {name: 0 for name in ATTACKS}
EXPECTED_ATTACKS.update({"sdpa_builtin": 1, "sdpa_ops": 1, "code_copy": 1, "source_reloaded": 1,
                         "patch_during_check": 1, "table": 1, "kills_grader": 3})

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="bubblewrap (Debian: bubblewrap) is not installed: .ci/run installs it")


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> dict:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    root = tmp_path_factory.mktemp("grade")
    solutions, submissions, out = root / "solutions", root / "submissions", root / "grades"
    outside = root / "outside.txt"
    outside.write_text("untouched")
    solutions.mkdir()
    nbformat.write(notebook(IMPORTS, ATTENTION_RIGHT, KL_RIGHT, CHECKS), solutions / "graded_fixture.ipynb")
    solution_bytes = (solutions / "graded_fixture.ipynb").read_bytes()
    students = dict(STUDENTS)
    for name, cells in ATTACKS.items():
        cells = [cell.replace(SOLUTIONS, str(solutions)).replace(OUTSIDE, str(outside)) for cell in cells]
        students[name] = notebook(IMPORTS, *cells)
    students["path_id"] = notebook(IMPORTS, ATTENTION_STUB, KL_STUB, CHECKS)
    students["path_id"].metadata["genlab"]["notebook"] = str(root / "evil")
    (root / "evil.ipynb").write_bytes(solution_bytes.replace(b'"attention": 2', b'"attention": 1000'))
    for student, nb in students.items():
        (submissions / student).mkdir(parents=True)
        nbformat.write(nb, submissions / student / "graded_fixture.ipynb")
    nbformat.write(students["full"], submissions / "full" / "graded_fixture_copy.ipynb")  # handed in twice
    (submissions / "unreadable").mkdir()
    (submissions / "unreadable" / "graded_fixture.ipynb").write_text("{not json")
    # each notebook but `asleep` needs ~2 s on 2 cores: 15 s ends it sooner; three at once, as it mostly sleeps
    grader = subprocess.Popen([*GENLAB, "grade", str(submissions), f"out={out}",  # key=value, as every command
                               f"solutions={solutions}", "time_limit=15", "jobs=3", "--memory-limit", "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "GENLAB_TEST_SECRET": SECRET})
    output = {"stdout": [], "stderr": []}
    graded_at = {}  # student -> when the grader reported their notebook graded (its sandbox gone)

    def read(name: str) -> None:
        for line in getattr(grader, name):
            output[name].append(line)
            if name == "stderr" and line.startswith("graded "):
                graded_at.setdefault(line.split()[1].split("/")[0], time.monotonic())

    readers = [threading.Thread(target=read, args=(name,), daemon=True) for name in output]
    for reader in readers:
        reader.start()
    try:
        grader.wait(timeout=900)
    finally:
        grader.kill()
        for reader in readers:
            reader.join(timeout=60)
    stdout, stderr = "".join(output["stdout"]), "".join(output["stderr"])
    assert grader.returncode == 0, stderr
    grades_text = (out / "grades.json").read_text()
    # the background process's time to strike, had it survived: it sleeps 4 s; wait until 10 s after its notebook's
    # sandbox ended (graded second, it has mostly passed while the others ran)
    time.sleep(max(0.0, graded_at["background"] + 10 - time.monotonic()))
    return {"stdout": stdout, "json": json.loads(grades_text),
            "grades_kept": (out / "grades.json").read_text() == grades_text,
            "csv": list(csv.DictReader(open(out / "grades.csv", encoding="utf-8"))),
            "outside": outside.read_text(),
            "solution_unchanged": (solutions / "graded_fixture.ipynb").read_bytes() == solution_bytes}


def test_each_student_scores_what_their_answers_earn(graded):
    scores = {name: entry["earned"] for name, entry in graded["json"]["students"].items()}
    for name, expected in {**EXPECTED, **EXPECTED_ATTACKS, "path_id": 0, "unreadable": 0}.items():
        assert scores[name] == expected, (name, graded["json"]["students"][name])


def test_points_come_from_the_solutions_read_before_any_submission(graded):
    students = graded["json"]["students"]
    assert all(entry["possible"] == 3 for name, entry in students.items()
               if name not in ("path_id", "unreadable", "full"))
    assert students["path_id"]["possible"] == 0
    assert "plain name" in students["path_id"]["notebooks"][0]["problems"][0]
    assert graded["solution_unchanged"], "a kernel rewrote the solutions"


def test_per_exercise_results_say_why(graded):
    rows = {(row["student"], row["exercise"]): row for row in graded["csv"]}
    assert rows[("half", "attention")]["status"] == "passed" and rows[("half", "attention")]["earned"] == "2.0"
    assert rows[("half", "kl_divergence")]["status"] == "failed"
    assert "not implemented yet" in rows[("empty", "attention")]["detail"]
    assert rows[("ticks", "attention")]["status"] == "failed", "printed ticks count for nothing"
    for name in ("calls_reference", "sdpa_builtin", "sdpa_ops", "code_copy", "source_reloaded", "patch_during_check"):
        assert "calls" in rows[(name, "attention")]["detail"], (name, rows[(name, "attention")]["detail"])
    assert rows[("asleep", "kl_divergence")]["status"] == "not run"
    assert rows[("asleep", "attention")]["status"] == "not run"
    assert rows[("unreadable", "")]["status"] == "not graded"
    assert "not a readable notebook" in rows[("unreadable", "")]["detail"]


def test_the_sandbox_keeps_the_grader_and_other_files_out_of_reach(graded):
    assert graded["outside"] == "untouched" and graded["grades_kept"], "something outside the sandbox was written"
    assert SECRET not in graded["stdout"] + json.dumps(graded["json"])
    notebooks = {name: entry["notebooks"] for name, entry in graded["json"]["students"].items()}
    assert len(notebooks["full"]) == 2 and sum(nb["earned"] for nb in notebooks["full"]) == 3
    assert any("a second copy" in problem for nb in notebooks["full"] for problem in nb["problems"])
    assert any("grading channel" in problem for problem in notebooks["reads_channel"][0]["problems"])
    problems = notebooks["outside"][0]["problems"]
    assert any("MemoryError" in problem for problem in problems), problems
    assert any("the secret" in problem for problem in problems) is False, problems
    assert any("time limit of 15 s" in problem for problem in notebooks["asleep"][0]["problems"])


BAD_ARGUMENTS = [
    (["/no/such/folder"], "no notebook or folder"),
    (["README.md"], "is not a notebook"),
    (["tests", "--time-limit", "0"], "time_limit must be a positive"),
    (["tests", "time_limit=nan"], "time_limit must be a positive"),
    (["tests", "--time-limit", "inf"], "time_limit must be a positive"),
    (["tests", "jobs=0"], "jobs must be at least 1, got jobs=0"),
    (["tests", "out=README.md"], "out=README.md is a file"),
    (["tests", "outt=x"], "unknown setting outt= for genlab grade; its settings are out=, time_limit="),
    (["tests", "full=maybe"], "full=maybe: full is true or false"),
    (["tests", "--solutions", "/no/such"], "no solutions folder"),
    (["conf"], "no notebooks (.ipynb) under conf"),
]


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> list[subprocess.CompletedProcess]:
    """Each bad command line a process of its own that runs the `genlab` console script, forked from one that
    imported the CLI and torch once (tests/forked_cli.py)."""
    return run_genlab_many(GENLAB, [(["grade", *args], REPO) for args, _ in BAD_ARGUMENTS],
                           tmp_path_factory.mktemp("refused"), dict(os.environ))


@pytest.mark.parametrize("index", range(len(BAD_ARGUMENTS)), ids=[" ".join(args) for args, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line(refused, index):
    result, message = refused[index], BAD_ARGUMENTS[index][1]
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (REPO / "grades").exists()


def test_the_reports_give_every_submission_a_row_and_add_up_per_student(tmp_path, capsys):
    """grades.csv has a row per exercise, and one for a submission that could not be graded; grades.json adds up each
    student's points; both are written whole (no partial file left); the table ends each notebook with its total."""
    from lab_utils.commands.grades import ExerciseGrade, NotebookGrade, print_table, write_reports

    grades = [NotebookGrade("ann", "00_setup", "ann/00_setup.ipynb", 2.0, 3.0, 1.2, True, [],
                            [ExerciseGrade("attention", 2.0, 2.0, "passed", "passed (6 cases)"),
                             ExerciseGrade("kl_divergence", 1.0, 0.0, "failed", "case 1/4: values differ")]),
              NotebookGrade("bob", "00_setup", "bob/00_setup.ipynb", 0.0, 0.0, 0.0, False,
                            ["not a readable notebook: JSONDecodeError"])]
    csv_path, json_path = write_reports(grades, tmp_path / "out")
    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    assert [(row["student"], row["exercise"], row["status"]) for row in rows] == [
        ("ann", "attention", "passed"), ("ann", "kl_divergence", "failed"), ("bob", "", "not graded")]
    assert rows[2]["detail"] == "not a readable notebook: JSONDecodeError"
    students = json.loads(json_path.read_text())["students"]
    assert (students["ann"]["earned"], students["ann"]["possible"]) == (2.0, 3.0)
    assert students["bob"]["notebooks"][0]["problems"] == ["not a readable notebook: JSONDecodeError"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["grades.csv", "grades.json"]
    print_table(grades)
    out = capsys.readouterr().out
    assert "kl_divergence" in out and "failed: case 1/4: values differ" in out and "2/3" in out
    assert "note: bob/00_setup: not a readable notebook" in out
