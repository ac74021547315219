"""What a run folder records and who may write it: ``run.json`` (each start: command line, Hydra overrides, versions,
the code's git version, host, time), TensorBoard's events (scalars, the sample grids and the config, without the
steps a killed run logged past its checkpoint), and the run lock (the operating system's: free when its process ends,
held while it runs, whatever host or pid the owner file names)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from lab_utils.harness.run import train
from lab_utils.harness.run_folder import RUN_FILES, RunFolderError, RunLock, code_version
from tiny_lab import tiny_config

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """The tiny lab trained to step 8 (checkpoints at 2, 4, 6, 8; grids at 4 and 8), then resumed from its step-6
    checkpoint as after a kill that came after step 8 was logged (steps 7 and 8 are trained and logged again),
    with Hydra's runtime config as `genlab train ... seed=3 dataset=shapes` leaves it (the overrides to record)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from lab_utils.core.config import CONFIG_MODULE

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = tiny_config(run_dir)
    cfg.trainer.tensorboard = HAS_TENSORBOARD
    cfg.trainer.keep_checkpoints = 4
    with torch.random.fork_rng():
        train(cfg)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        typed = compose(config_name="pretrained", overrides=OVERRIDES, return_hydra_config=True)
    HydraConfig.instance().set_config(typed)
    try:
        with torch.random.fork_rng():
            train(cfg, resume=run_dir / "checkpoints" / "step_00000006.pt")
    finally:
        HydraConfig.instance().cfg = None
    return run_dir


OVERRIDES = ["seed=3", "dataset=shapes"]


def test_a_run_records_each_start_in_run_json(resumed_run):
    assert "run.json" in RUN_FILES
    record = json.loads((resumed_run / "run.json").read_text())
    first, again = record["starts"]
    assert first["resumed_from"] is None and first["step"] == 0 and first["overrides"] is None  # not a command
    assert again["resumed_from"] == str(resumed_run / "checkpoints" / "step_00000006.pt") and again["step"] == 6
    assert again["overrides"] == OVERRIDES
    for start in (first, again):
        assert start["command"] == shlex.join(sys.orig_argv)  # the command line as the interpreter got it
        assert start["host"] == socket.gethostname() and start["pid"] == os.getpid()
        assert time.strptime(start["started"], "%Y-%m-%d %H:%M:%S %z")
        versions = start["versions"]
        assert versions["torch"] == torch.__version__ and versions["python"] == sys.version.split()[0]
        assert versions["code"] == code_version()  # the one home of the code's version (the zoo's manifests too)
        assert versions["genlab"] is None or versions["genlab"][0].isdigit()


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'genlab[dev]')")
def test_tensorboard_gets_scalars_grids_and_config_and_a_resume_drops_the_killed_tail(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(resumed_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                              "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss/critic")] == list(range(1, 9))
    # the grids of steps 4 and 8, once each: the killed run's grid of step 8 was purged (purge_step = 7), the
    # resumed run drew it again
    grids = events.Images("samples")
    assert [e.step for e in grids] == [4, 8]
    assert (grids[0].width, grids[0].height) == (2 * 32 + 2, 2 * 32 + 2)  # tiles: 2 prompts (rows) x 2 seeds
    configs = events.Tensors("config/text_summary")  # the config as text, at the start and at the resume
    assert [e.step for e in configs] == [0, 6]
    text = configs[-1].tensor_proto.string_val[0].decode()
    assert "name: tiny" in text and f"out: {resumed_run}" in text


def test_code_version_names_the_commit_and_ignores_the_zoos_weights(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org",
                               *args], check=True, capture_output=True, text=True)
        return done.stdout.strip()

    code, weights = tmp_path / "lab_utils" / "x.py", tmp_path / "labs" / "vae" / "pretrained" / "vae.safetensors"
    code.parent.mkdir()
    code.write_text("a = 1\n")
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "the code and a shipped model")
    head = git("rev-parse", "--short=12", "HEAD")
    assert code_version(tmp_path) == f"git {head}"
    weights.write_bytes(b"the weights a build just wrote")  # `genlab pretrained action=build` rewrote them
    (weights.parent / "manifest.json").write_text("{}")
    assert code_version(tmp_path) == f"git {head}"
    code.write_text("a = 2\n")
    assert code_version(tmp_path) == f"git {head}-dirty"
    assert code_version(tmp_path / "lab_utils") is None  # not the top of a clone: an installed genlab


# ------------------------------------------------------------------------------------ the lock
HOLDER = """
import json, sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1] + "/.lock")
lock.acquire()
owner = {"pid": %d, "host": "another-host", "started": "2026-12-01 10:00:00"}
with open(sys.argv[1] + "/.lock.json", "w") as handle:
    json.dump(owner, handle)
print("held", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def no_signals():
    """The lock never asks a process whether it runs with os.kill (on Windows, os.kill ends the process)."""
    def kill(pid, sig):
        raise AssertionError(f"os.kill({pid}, {sig}) called")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "kill", kill)
        yield


def test_a_lock_held_on_another_host_refuses_until_its_process_ends(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("a run's config\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER % 4242, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError) as refused, no_signals():
            RunLock(run_dir).acquire()
        message = str(refused.value)
        for expected in ("in use by another training", "pid 4242 on host another-host", "since 2026-12-01 10:00:00",
                         str(run_dir / ".lock"), "out=<folder>"):
            assert expected in message, message
        assert "run_dir" not in message
    finally:
        holder.kill()  # as kill -9: no release, the owner file stays
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="genlab.train"), no_signals(), RunLock(run_dir):  # the OS released it
        assert "stale lock" in caplog.text and "process 4242 on another-host" in caplog.text
        assert json.loads((run_dir / ".lock.json").read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]  # released: both files gone


def test_a_lock_file_no_process_holds_is_free_whatever_pid_it_names(tmp_path, caplog):
    """A lock file of a genlab before filelock naming a pid that runs (a reused pid, here this very process) but
    holding no lock: taken over, not refused."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-12-01 10:00:00"}
    (run_dir / ".lock").write_text(json.dumps(owner))
    with caplog.at_level(logging.WARNING, logger="genlab.train"), no_signals():
        lock = RunLock(run_dir).acquire()
    assert f"process {os.getpid()}" in caplog.text and "stale lock" in caplog.text
    with pytest.raises(RunFolderError, match="in use by another training"):  # held now, even within one process
        RunLock(run_dir).acquire()
    lock.release()
    assert list(run_dir.iterdir()) == []
    RunLock(run_dir).acquire().release()  # free again
