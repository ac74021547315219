"""Every bad input, through the real `genlab` entry point: exit code 1, one line that says what was wrong and
how to fix it, no traceback, and every file that existed before byte-identical afterwards.

The table below is run once per module, each case a real process that runs the `genlab` console script, forked
from one that imported torch and the CLI once (tests/forked_cli.py); each case then asserts on its own result.
Files that come from outside (checkpoints, dataset files) include hostile ones: a checkpoint naming a module that
lies beside it, a checkpoint holding pickled code, a CIFAR batch with a ``__reduce__`` payload. Each would leave a
marker file if its code ran.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from filelock import FileLock

from conftest import GENLAB, TESTS, subprocess_env
from forked_cli import run_genlab_many

MARKER = "CODE_RAN"  # what a hostile file's payload creates


def genlab(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    return subprocess.run([*GENLAB, *args], cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (by relative path)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_clear_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("genlab: error:")]
    assert len(errors) == 1, result.stderr
    line = errors[0]
    assert "Config search path" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr, result.stderr
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    return line


# ------------------------------------------------------------------------------------ fixtures
def train_smoke(run_dir: Path, *overrides: str) -> Path:
    from lab_utils.core.config import compose
    from lab_utils.harness.run import train

    cfg = compose(["preset=smoke", "trainer.progress=false", f"out={run_dir}", *overrides])
    with torch.random.fork_rng():
        train(cfg)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"ddpm": train_smoke(root / "ddpm"), "vae": train_smoke(root / "vae", "model=vae")}


def hostile_target(case: Path, runs: dict[str, Path]) -> None:
    """A run folder shipped with probe_evil.py and a checkpoint whose model._target_ is probe_evil.Lab."""
    run = case / "run"
    shutil.copytree(runs["ddpm"], run)
    (run / "probe_evil.py").write_text(f"from pathlib import Path\nPath({str(case / MARKER)!r}).touch()\n"
                                       "from labs.diffusion import DiffusionLab as Lab\n")
    for path in (run / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        state["config"]["model"]["_target_"] = "probe_evil.Lab"
        path.unlink()
        torch.save(state, path)


class Payload:
    """Pickles to "call os.system(touch MARKER)" on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickled_code(case: Path, runs: dict[str, Path]) -> None:
    (case / "checkpoints").mkdir()
    torch.save({"format": "genlab-checkpoint", "config": Payload(case / MARKER)}, case / "checkpoints" / "last.pt")


def hostile_cifar(case: Path, runs: dict[str, Path]) -> None:
    folder = case / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"hook": Payload(case / MARKER)}
    for name in ["test_batch"] + [f"data_batch_{k}" for k in range(1, 6)]:
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def empty_checkpoint(case: Path, runs: dict[str, Path]) -> None:
    (case / "run" / "checkpoints").mkdir(parents=True)
    (case / "run" / "checkpoints" / "last.pt").write_bytes(b"")


def checkpoint_outside_a_run(case: Path, runs: dict[str, Path]) -> None:
    """/x/dl/model.pt beside the user's own /x/config.yaml and /x/metrics.jsonl."""
    (case / "x" / "dl").mkdir(parents=True)
    shutil.copyfile(runs["ddpm"] / "checkpoints" / "last.pt", case / "x" / "dl" / "model.pt")
    (case / "x" / "config.yaml").write_text("the user's own config\n")
    (case / "x" / "metrics.jsonl").write_text('{"mine": 1}\n')


def copy_run(case: Path, runs: dict[str, Path]) -> None:
    shutil.copytree(runs["ddpm"], case / "run")
    shutil.copytree(runs["ddpm"], case / "other")


HELD_LOCKS: list[FileLock] = []  # held by this test process while the table's subprocesses run


def locked_run(case: Path, runs: dict[str, Path]) -> None:
    """A run whose lock this (live) test process holds, its owner record beside it."""
    copy_run(case, runs)
    lock = FileLock(str(case / "run" / ".lock"), timeout=0)
    lock.acquire()
    HELD_LOCKS.append(lock)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-12-01 10:00:00"}
    (case / "run" / ".lock.json").write_text(json.dumps(owner))


def project_folder(case: Path, runs: dict[str, Path]) -> None:
    (case / "project").mkdir()
    (case / "project" / "README.md").write_text("my project\n")
    (case / "project" / "config.yaml").write_text("my own config\n")


@dataclass
class Case:
    id: str
    args: list[str]  # "{case}", "{ddpm}", "{vae}" are filled in
    expected: tuple[str, ...]  # each is part of the one error line
    setup: Callable[[Path, dict], None] | None = None
    cwd: str | None = None  # relative to the case folder
    result: subprocess.CompletedProcess | None = field(default=None, repr=False)
    unchanged: bool = False  # every file of its folder byte-identical afterwards, and no payload ran


CASES = [
    # --- security: files from outside are data, never code
    Case("sample-hostile-target", ["sample", "run=."], ("probe_evil.Lab", "not a lab genlab knows",
                                                        "GENLAB_LABS"), hostile_target, cwd="run"),
    Case("resume-hostile-target", ["train", "resume=.", "trainer.steps=8"], ("probe_evil.Lab", "not imported"),
         hostile_target, cwd="run"),
    Case("sample-pickled-code", ["sample", "run={case}"], ("refuses to load", "could run code", "posix.system"),
         pickled_code),
    Case("cifar-pickled-code", ["data", "data=cifar10", "data.root={case}", "split=test"],
         ("not a CIFAR batch", "posix.system", "could run code"), hostile_cifar),
    Case("empty-checkpoint", ["sample", "run={case}/run"], ("not a readable checkpoint", "an empty file"),
         empty_checkpoint),
    # --- runs are never clobbered
    Case("resume-outside-a-run", ["train", "resume={case}/x/dl/model.pt"],
         ("outside a run folder", "out=<new folder>"), checkpoint_outside_a_run),
    Case("resume-changes-model", ["train", "resume={case}/run", "model.lr=1e6"],
         ("model.lr=1000000.0 cannot change when resuming", "start a new run"), copy_run),
    Case("resume-below-current-step", ["train", "resume={case}/run", "trainer.steps=2"],
         ("already at step 4", "trainer.steps=2", "raise it"), copy_run),
    Case("resume-into-another-run", ["train", "resume={case}/run", "out={case}/other", "trainer.steps=8"],
         ("already holds a run",), copy_run),
    Case("resume-locked-run", ["train", "resume={case}/run", "trainer.steps=8"],
         ("in use by another training", f"pid {os.getpid()}", ".lock"), locked_run),
    Case("train-into-a-project-folder", ["train", "preset=smoke", "out={case}/project"],
         ("holds files a run does not write", "README.md", "new or empty folder"), project_folder),
    Case("train-hydra-run-dir", ["train", "preset=smoke", "hydra.run.dir={case}/out"],
         ("`hydra.run.dir` is not used by genlab train", "out=<folder>"), project_folder),
    Case("compare-hydra-run-dir", ["compare", "preset=smoke", "hydra.run.dir={case}/out"],
         ("`hydra.run.dir` is not used by genlab compare", "out=<folder>"), project_folder),
    Case("train-old-run-dir-key", ["train", "preset=smoke", "run_dir={case}/project"],
         ("`run_dir` is now called `out`", "out=<folder>"), project_folder),
    Case("bench-old-out-dir-key", ["bench", "preset=smoke", "out_dir={case}/project"],
         ("`out_dir` is now called `out`", "out=<folder>"), project_folder),
    Case("unknown-model", ["train", "model=foo"], ("unknown model=foo", "choose one of", "ddpm")),
    Case("unknown-preset", ["compare", "preset=huge"], ("unknown preset=huge", "smoke")),
    Case("unknown-key", ["train", "trainer.stepz=3"], ("trainer.stepz", "not in 'TrainerConfig'", "--cfg job")),
    Case("sample-without-run", ["sample"], ("which model?", "run=<", "pretrained=<name>")),
    Case("sample-pretrained-path", ["sample", "pretrained=../../etc/passwd"], ("no pretrained model", "genlab pretrained")),
    Case("sample-run-and-pretrained", ["sample", "run={vae}", "pretrained=vae"], ("one of the", "two")),
    Case("eval-out-not-json", ["eval", "pretrained=vae", "out={case}/x.txt"], ("eval writes a JSON file",)),
    Case("serve-unknown-model", ["serve", "models=[gpt]"], ("no pretrained model 'gpt'", "the zoo has")),
    Case("serve-bad-port", ["serve", "port=70000"], ("port must be in 1..65535",)),
    Case("serve-runs-missing", ["serve", "models=[]", "runs={case}/nothing"], ("runs=", "no such folder")),
    Case("pretrained-bad-action", ["pretrained", "action=drop"], ("action must be list, build or export",)),
    Case("pretrained-unknown-family", ["pretrained", "action=export", "models=[gpt]"], ("are not families of genlab",)),
    Case("sample-bad-layout", ["sample", "pretrained=vae", "layout=grid"], ("layout=grid", "tiles")),
    Case("eval-pretrained-unknown", ["eval", "pretrained=nope"], ("no pretrained model 'nope'",)),
    Case("sample-too-many", ["sample", "run={ddpm}", "n=100000"], ("n=100000", "256")),
    Case("sample-added-option", ["sample", "run={vae}", "+temperature=0.5"],
         ("unknown setting(s) temperature", "without +")),
    Case("sample-option-of-another-family", ["sample", "run={vae}", "steps=10"],
         ("does not take option(s) ['steps']", "temperature")),
    Case("sample-bad-suffix", ["sample", "run={ddpm}", "out={case}/grid.xyz"], (".xyz", ".png")),
    Case("sample-no-prompt", ["sample", "run={ddpm}", "prompt=[]"], ("prompt=[] holds no prompt",)),
    # --- values no sampler can use: NaN and inf pass a `>= 0` check (they once wrote black images with exit 0)
    Case("sample-guidance-nan", ["sample", "run={ddpm}", "guidance=nan", "out={case}/grid.png"],
         ("sampling.guidance must be a finite number >= 0, got nan",)),
    Case("eval-guidance-inf", ["eval", "run={ddpm}", "eval.sample_options.guidance=inf", "out={case}/e.json"],
         ("sampling.guidance must be a finite number >= 0, got inf",)),
    Case("sample-eta-above-one", ["sample", "run={ddpm}", "eta=5", "out={case}/grid.png"],
         ("sampling.eta must be a finite number in [0, 1], got 5.0",)),
    Case("sample-temperature-nan", ["sample", "run={vae}", "temperature=nan", "out={case}/grid.png"],
         ("sampling.temperature must be a finite number >= 0, got nan",)),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory, runs) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("bad_inputs")
    before_runs = {name: snapshot(path) for name, path in runs.items()}
    cases = {}
    for case in CASES:
        folder = root / case.id
        folder.mkdir()
        if case.setup:
            case.setup(folder, runs)
        cases[case.id] = (case, folder, snapshot(folder))

    invocations = [([a.format(case=folder, ddpm=runs["ddpm"], vae=runs["vae"]) for a in case.args],
                    folder / case.cwd if case.cwd else folder) for case, folder, _ in cases.values()]
    # each case a process of its own that runs the console script, forked from one that imported torch once
    done = run_genlab_many(GENLAB, invocations, tmp_path_factory.mktemp("bad_inputs_output"), subprocess_env())
    for (case, _, _), result in zip(cases.values(), done):
        case.result = result
    for case, folder, before in cases.values():
        case.unchanged = snapshot(folder) == before and not (folder / MARKER).exists()
    while HELD_LOCKS:
        HELD_LOCKS.pop().release()
    assert {name: snapshot(path) for name, path in runs.items()} == before_runs, "a shared run was changed"
    return {case.id: case for case, _, _ in cases.values()}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(results, case):
    done = results[case.id]
    assert_one_clear_line(done.result, *done.expected)
    assert done.unchanged, "files changed (or a payload ran) although the input was refused"


# ------------------------------------------------------------------------------------ behaviour, not refusal
def test_hostile_target_is_refused_in_process_before_import(tmp_path, runs):
    from lab_utils.core.schema import ConfigError
    from lab_utils.harness.checkpoint import load_lab

    hostile_target(tmp_path, runs)
    sys.path.insert(0, str(tmp_path / "run"))
    try:
        with pytest.raises(ConfigError, match="not a lab genlab knows"):
            load_lab(tmp_path / "run")
    finally:
        sys.path.remove(str(tmp_path / "run"))
    assert "probe_evil" not in sys.modules and not (tmp_path / MARKER).exists()


def test_a_checkpoint_cannot_choose_where_genlab_writes(tmp_path, runs):
    """data.cache_dir / data.download in a shipped checkpoint would make sample, eval or resume write elsewhere."""
    from lab_utils.harness.checkpoint import load_checkpoint

    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(runs["vae"], run)
    for path in (run / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        state["config"]["data"].update(cache_dir=str(elsewhere), download=True)
        torch.save(state, path)
    data = load_checkpoint(run)["config"]["data"]
    assert data["cache_dir"] is None and data["download"] is False
    out = genlab("sample", f"run={run}", "mode=reconstruct", "n=2", f"out={tmp_path / 'recon.png'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert not elsewhere.exists() and (tmp_path / "recon.png").is_file()
    # where the data lives is the user's to say on resume (it does not change the data)
    from lab_utils.harness.run_folder import resume_config

    cfg = resume_config(str(run), [f"data.cache_dir={tmp_path / 'mine'}", "trainer.steps=6"])
    assert cfg.data.cache_dir == str(tmp_path / "mine") and cfg.data.download is False


def test_a_moved_lab_keeps_loading_under_its_old_name():
    """The evaluator moved from lab_utils.evaluation to labs.evaluator: checkpoints saved before still load."""
    from lab_utils.core import registry
    from labs.evaluator import EvaluatorLab

    assert registry.lab_class("labs.evaluator.EvaluatorLab") is EvaluatorLab
    assert registry.lab_class("lab_utils.evaluation.EvaluatorLab") is EvaluatorLab
    assert registry.target_of(EvaluatorLab) == "labs.evaluator.lab.EvaluatorLab"


def test_registered_labs_build_and_unregistered_ones_do_not(monkeypatch):
    from lab_utils.core import registry

    monkeypatch.setattr(registry, "_registered", {})
    with pytest.raises(registry.UnknownLab, match="GENLAB_LABS=tiny_lab.TinyLab"):
        registry.lab_class("tiny_lab.TinyLab")
    monkeypatch.setenv(registry.ENV_VAR, "tiny_lab.TinyLab")  # the user's own environment registers it
    import tiny_lab

    assert registry.lab_class("tiny_lab.TinyLab") is tiny_lab.TinyLab
    monkeypatch.delenv(registry.ENV_VAR)
    assert registry.register_lab(tiny_lab.TinyLab) == "tiny_lab.TinyLab"  # ... or the user's code
    assert registry.lab_class("tiny_lab.TinyLab") is tiny_lab.TinyLab
    registry.register_lab("os.path")  # a name that is not a Lab class is refused when built
    with pytest.raises(registry.UnknownLab, match="not a subclass"):
        registry.lab_class("os.path")


def test_cifar_reader_keeps_real_batches_and_refuses_payloads(tmp_path, caplog):
    from lab_utils.core.data import CorruptData
    from lab_utils.core.data.cifar import read_batch

    data = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072).astype(np.uint8)
    for protocol, keys in ((2, (b"data", b"labels")), (4, ("data", "labels"))):  # Python 2 style and 3 style
        path = tmp_path / "test_batch"
        path.write_bytes(pickle.dumps({keys[0]: data, keys[1]: [3, 7], b"batch_label": b"testing"},
                                      protocol=protocol))
        images, labels = read_batch(path)
        assert images.shape == (2, 3, 32, 32) and np.array_equal(images.reshape(2, -1), data)
        assert labels.tolist() == [3, 7]
    assert "not torchvision's published file" in caplog.text  # test_batch, but not the standard bytes
    path.write_bytes(pickle.dumps({"data": data, "labels": [0, 1], "x": Payload(tmp_path / MARKER)}))
    with pytest.raises(CorruptData, match="posix.system"):
        read_batch(path)
    assert not (tmp_path / MARKER).exists()


def test_checkpoint_outside_a_run_continues_only_into_a_new_folder(tmp_path, runs):
    checkpoint_outside_a_run(tmp_path, runs)
    before = snapshot(tmp_path / "x")
    new = tmp_path / "continued"
    out = genlab("train", f"resume={tmp_path / 'x' / 'dl' / 'model.pt'}", f"out={new}", "trainer.steps=6")
    assert out.returncode == 0, out.stderr[-3000:]
    assert snapshot(tmp_path / "x") == before  # the user's files untouched
    rows = [json.loads(line) for line in (new / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 6]  # no run folder to bring history from
    assert torch.load(new / "checkpoints" / "last.pt", weights_only=True)["trainer"]["step"] == 6


def test_resume_applies_trainer_overrides_truthfully_and_forks_into_run_dir(tmp_path, runs):
    source = tmp_path / "run"
    shutil.copytree(runs["ddpm"], source)
    before = snapshot(source)
    fork = tmp_path / "fork"
    out = genlab("train", f"resume={source}", f"out={fork}", "trainer.steps=6", "trainer.grad_clip=0.5")
    assert out.returncode == 0, out.stderr[-3000:]
    assert snapshot(source) == before, "continuing into out= must leave the original run untouched"
    saved = (fork / "config.yaml").read_text()
    assert "steps: 6" in saved and "grad_clip: 0.5" in saved and f"out: {fork}" in saved
    state = torch.load(fork / "checkpoints" / "last.pt", weights_only=True)
    assert state["trainer"]["step"] == 6
    steps = [json.loads(line)["step"] for line in (fork / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # the original's history came along, then the new steps, no duplicates
    # in place (the command's own functions, in this process): the same folder, config.yaml says what ran
    from lab_utils.core.config import validate
    from lab_utils.harness.run import train
    from lab_utils.harness.run_folder import resume_config

    cfg = validate(resume_config(str(source), [f"resume={source}", "trainer.steps=5"]))
    assert cfg.out == str(source) and cfg.trainer.steps == 5
    with torch.random.fork_rng():
        train(cfg, resume=cfg.resume)
    assert "steps: 5" in (source / "config.yaml").read_text()
    assert torch.load(source / "checkpoints" / "last.pt", weights_only=True)["trainer"]["step"] == 5


def test_two_trainings_cannot_share_a_run_folder(tmp_path):
    run_dir = tmp_path / "shared"
    env = subprocess_env()
    first = subprocess.Popen([sys.executable, str(TESTS / "tiny_lab.py"), str(run_dir), "--sleep", "0.3"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run_dir / ".lock").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (run_dir / ".lock").exists(), first.communicate()[0][-2000:]
    second = genlab("train", "preset=smoke", f"out={run_dir}", env=env)
    line = assert_one_clear_line(second, "in use by another training", f"pid {first.pid}")
    assert socket.gethostname() in line
    output, _ = first.communicate(timeout=240)
    assert first.returncode == 0, output[-2000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss/critic" in line]
    assert steps == list(range(1, 9))  # one writer: no interleaved rows
    assert not (run_dir / ".lock").exists()  # released at the end


def test_stale_lock_and_partial_files_of_a_killed_run_are_cleaned_up(tmp_path, runs, caplog):
    from lab_utils.core.config import compose
    from lab_utils.harness.checkpoint import load_checkpoint
    from lab_utils.harness.run import train

    run_dir = tmp_path / "run"
    shutil.copytree(runs["ddpm"], run_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "?"}))
    partial = run_dir / "checkpoints" / f".step_00000006.pt.{dead.pid}.tmp"
    partial.write_bytes(b"PK\x03\x04 half a checkpoint")
    cfg = compose(["preset=smoke", "trainer.progress=false", f"out={run_dir}", "trainer.steps=6"])
    with torch.random.fork_rng():
        result = train(cfg, resume=run_dir)
    assert result.step == 6 and load_checkpoint(run_dir)["trainer"]["step"] == 6
    assert f"process {dead.pid}" in caplog.text and "stale lock" in caplog.text
    assert not partial.exists() and partial.name in caplog.text
    assert not (run_dir / ".lock").exists()


SITECUSTOMIZE = '''
import errno, os
_fail_at = int(os.environ["GENLAB_TEST_FAIL_CHECKPOINT"])  # fail the Nth checkpoint write, as a full disk does
_errno = int(os.environ["GENLAB_TEST_ERRNO"])
_fsync, _seen = os.fsync, [0]

def fsync(fd):
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    if "/checkpoints/." in name and name.endswith(".tmp"):
        _seen[0] += 1
        if _seen[0] == _fail_at:
            raise OSError(_errno, os.strerror(_errno), name)
    return _fsync(fd)

os.fsync = fsync
'''


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="the fault injection reads /proc/self/fd")
def test_a_full_disk_stops_training_with_the_last_good_checkpoint_intact(tmp_path):
    error, expected = errno.ENOSPC, "No space left on device"
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = subprocess_env(GENLAB_TEST_FAIL_CHECKPOINT="2", GENLAB_TEST_ERRNO=str(error))
    env["PYTHONPATH"] = os.pathsep.join([str(inject), env["PYTHONPATH"]])
    run_dir = tmp_path / "run"
    out = genlab("train", "preset=smoke", f"out={run_dir}", env=env)  # checkpoints at steps 2 and 4
    line = assert_one_clear_line(out, expected, "checkpoint of step 4", "step_00000002.pt is intact",
                                 f"resume={run_dir}")
    assert "step_00000002.pt" in line
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["trainer"]["step"] == 2
    assert not list((run_dir / "checkpoints").glob(".*")), "no partial file is left behind"
    resumed = genlab("train", f"resume={run_dir}")  # once the disk is fine again, the run continues
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["trainer"]["step"] == 4


def test_a_read_only_folder_is_one_error_and_loses_nothing(tmp_path, monkeypatch):
    from lab_utils.commands.cli import error_message
    from lab_utils.harness import checkpoint
    from lab_utils.harness.trainer import CheckpointWriteError

    real_save, calls = checkpoint.atomic_save, []

    def read_only_after_first(state, path):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        real_save(state, path)

    monkeypatch.setattr(checkpoint, "atomic_save", read_only_after_first)
    with pytest.raises(CheckpointWriteError) as caught:
        train_smoke(tmp_path / "run")
    message = error_message(caught.value)
    assert "\n" not in message and "Read-only file system" in message and "step_00000002.pt is intact" in message
    monkeypatch.undo()
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["trainer"]["step"] == 2
    disk = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/metrics.jsonl")  # any other write that fails
    assert error_message(disk) == "No space left on device (/x/metrics.jsonl); free some space and run the command again"


def test_sample_options_prompts_and_unknown_words(tmp_path, runs):
    out = genlab("sample", f"run={runs['vae']}", "temperature=0.5", "n=2", "prompt=[a red circle,a zebra square]",
                 f"out={tmp_path / 'grid'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"wrote {tmp_path / 'grid.png'} " in out.stdout and (tmp_path / "grid.png").is_file()
    assert "'a red circle', 'a zebra square'" in out.stdout  # two prompts, not the text "['a', 'b']"
    assert "does not know the word(s) zebra" in out.stderr and "genlab data data=shapes" in out.stderr


def test_vae_temperature_reaches_the_sampler(runs):
    """`temperature=` on the command line is passed to VAELab.sample and changes the images."""
    from lab_utils.commands.sample import SAMPLE_KEYS, option_overrides
    from lab_utils.core.config import compose
    from lab_utils.harness.checkpoint import load_lab
    from labs.vae.lab import VAESampleOptions

    cfg = compose(option_overrides([f"run={runs['vae']}", "temperature=0.5"]), config_name="sample", check=False)
    lab = load_lab(runs["vae"]).lab
    options = lab.sample_options({key: value for key, value in cfg.items() if key not in SAMPLE_KEYS})
    assert options == VAESampleOptions(temperature=0.5)
    cold = lab.sample(["a red circle"] * 4, torch.Generator().manual_seed(0), options)
    default = lab.sample(["a red circle"] * 4, torch.Generator().manual_seed(0))
    assert not torch.equal(cold, default)


def test_sampling_in_batches_draws_the_same_images_for_the_same_seed(runs):
    from lab_utils.commands.sample import draw
    from lab_utils.harness.checkpoint import load_lab

    lab = load_lab(runs["vae"]).lab
    prompts = ["a red circle", "a blue square"] * 3
    a = draw(lab.sample, prompts, torch.Generator().manual_seed(0), 4, None)  # batches of 4 + 2
    b = draw(lab.sample, prompts, torch.Generator().manual_seed(0), 4, None)
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, draw(lab.sample, prompts, torch.Generator().manual_seed(1), 4, None))


def test_output_names(tmp_path):
    from lab_utils.commands.arguments import UserError, output_path

    (tmp_path / "folder").mkdir()
    assert output_path(str(tmp_path / "grid"), "samples.png") == tmp_path / "grid.png"
    assert output_path(str(tmp_path / "folder"), "samples.png") == tmp_path / "folder" / "samples.png"
    assert output_path(str(tmp_path / "a.PDF"), "samples.png") == tmp_path / "a.PDF"
    with pytest.raises(UserError, match=".xyz"):
        output_path(str(tmp_path / "grid.xyz"), "samples.png")


def test_damaged_shapes_cache_is_rebuilt_with_a_warning(tmp_path):
    from lab_utils.core.data import build_dataset

    cfg = {"name": "shapes", "num_train": 64, "num_test": 16, "cache_dir": str(tmp_path)}
    first = build_dataset(cfg, "test")
    path = first.cache_path
    for damage in (b"", path.read_bytes()[:100]):  # zero bytes, truncated
        path.write_bytes(damage)
        with pytest.warns(UserWarning, match="damaged.*rebuilding"):
            again = build_dataset(cfg, "test")
        assert torch.equal(again.pixels, first.pixels) and not again.loaded_from_cache
        assert build_dataset(cfg, "test").loaded_from_cache  # rewritten whole


def test_penalties_are_computed_in_fp32_under_autocast():
    """fp16/bf16 autocast must not reach the gradient penalty's inner gradient (it would underflow)."""
    from labs.gan import gradient_penalty, r1_penalty

    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 1)
    seen = []

    def critic(x):
        scores = linear(x.flatten(1)).squeeze(1)
        seen.append(scores.dtype)
        return scores

    real, fake = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(real.flatten(1)).dtype == torch.bfloat16  # autocast is on here ...
        gp = gradient_penalty(critic, real, fake)
        r1 = r1_penalty(critic, real)
    assert seen == [torch.float32, torch.float32]  # ... but not inside the penalties
    reference = gradient_penalty(critic, real, fake, eps=gp.eps)
    assert torch.allclose(gp.penalty, reference.penalty) and r1.dtype == torch.float32


def test_datasets_are_built_in_turns_one_process_per_node_at_a_time(monkeypatch):
    """Rank 0 first (it downloads / writes the cache), then one process per other node, then the rest."""
    from lab_utils.harness import distributed
    from lab_utils.harness.distributed import DistInfo

    turns_taken = {}
    for rank in range(4):  # 2 nodes x 2 processes: each process runs the same function
        clock = {"turn": 0}
        monkeypatch.setattr(distributed, "barrier", lambda clock=clock: clock.update(turn=clock["turn"] + 1))
        info = DistInfo(rank=rank, local_rank=rank % 2, world_size=4)
        distributed.in_turn(lambda rank=rank, clock=clock: turns_taken.setdefault(rank, clock["turn"]), info)
        assert clock["turn"] == 3  # every process meets the others at all three barriers
    assert turns_taken == {0: 0, 2: 1, 1: 2, 3: 2}


def test_torch_requirement_has_the_gradient_scaler_the_trainer_uses():
    import tomllib

    from conftest import REPO

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in deps if d.startswith("torch>="))
    minimum = tuple(int(x) for x in torch_pin.split(">=")[1].split(",")[0].split()[0].split(".")[:2])
    assert minimum >= (2, 3), "torch.amp.GradScaler('cuda') needs torch >= 2.3"
