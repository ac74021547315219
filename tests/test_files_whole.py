"""Files are written whole or not at all: a full disk (simulated by tests/full_disk.py) or a kill leaves what was saved
before as it was and no partial or temporary file behind, and a command that meets a full disk ends with one line
``genlab: error: ...`` and exit status 1."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

import full_disk
from conftest import GENLAB, subprocess_env
from tiny_lab import tiny_config

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fill_disk(monkeypatch, folder: Path, after: int = 0, space: int = 0) -> None:
    """This process's files under ``folder`` sit on a full disk (``space`` bytes left) from the ``after + 1``-th one
    opened for writing on."""
    fake = full_disk.opener(folder, after, space)
    monkeypatch.setattr(builtins, "open", fake)
    monkeypatch.setattr(io, "open", fake)


def test_a_full_disk_at_a_later_checkpoint_stops_with_one_line(tmp_path, monkeypatch):
    """torch's zip writer turns the OSError of a failed write into a RuntimeError ("unexpected pos"): the checkpoint
    writer gives the OSError back, so training stops with CheckpointWriteError, the first checkpoint intact."""
    from lab_utils.commands.cli import error_message
    from lab_utils.harness.run import train
    from lab_utils.harness.trainer import CheckpointWriteError

    run_dir = tmp_path / "run"
    # checkpoints every 2 steps: step 2's fits, step 4's fills the disk in the middle of the weights
    fill_disk(monkeypatch, run_dir / "checkpoints", after=1, space=20_000)
    with pytest.raises(CheckpointWriteError) as caught, torch.random.fork_rng():
        train(tiny_config(run_dir))
    monkeypatch.undo()
    message = error_message(caught.value)
    assert "\n" not in message and NO_SPACE in message and "step_00000002.pt is intact" in message, message
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["trainer"]["step"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt", "step_00000002.pt"]


def test_sample_on_a_full_disk_is_one_line_and_keeps_the_old_image(tmp_path):
    """Through the real entry point: the image there before is left as it was, and no 0-byte image or temporary
    file is left beside it."""
    inject, full = tmp_path / "inject", tmp_path / "full"
    inject.mkdir()
    full.mkdir()
    (inject / "sitecustomize.py").write_text(full_disk.sitecustomize_source())
    (full / "grid.png").write_bytes(b"an image saved before")
    before = snapshot(full)
    env = subprocess_env(**{full_disk.ENV: str(full)})
    env["PYTHONPATH"] = os.pathsep.join([str(inject), env["PYTHONPATH"]])
    out = subprocess.run([*GENLAB, "sample", "pretrained=vae", "n=1", f"out={full / 'grid.png'}"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, (out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("genlab: error:")]
    assert len(errors) == 1 and NO_SPACE in errors[0] and "grid.png" in errors[0], out.stderr
    assert snapshot(full) == before


def test_eval_json_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """`genlab eval` writes its figures with write_json (the whole command takes 13 s: its writer is tested here)."""
    from lab_utils.commands.cli import error_message
    from lab_utils.commands.evaluation.evaluate import write_json

    (tmp_path / "eval.json").write_text('{"fid": 1.0}\n')
    fill_disk(monkeypatch, tmp_path)
    with pytest.raises(OSError) as caught:
        write_json({"fid": 2.0}, tmp_path / "eval.json")
    monkeypatch.undo()
    assert error_message(caught.value) == (f"{NO_SPACE} ({tmp_path / 'eval.json'}); free some space and run the "
                                           "command again")
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
    assert json.loads((tmp_path / "eval.json").read_text()) == {"fid": 1.0}


def test_the_shapes_cache_on_a_full_disk_is_skipped_without_a_partial_file(tmp_path, monkeypatch):
    """torch.save to a path reports a full disk as a RuntimeError ("PytorchStreamWriter failed writing file")."""
    from lab_utils.core.data import build_dataset

    def save_on_a_full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 the first bytes")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    with pytest.warns(UserWarning, match="could not write the shapes cache"):
        test = build_dataset({"name": "shapes", "num_train": 64, "num_test": 16, "cache_dir": str(tmp_path)}, "test")
    assert len(test) == 16 and test.cache_path is None
    assert list(tmp_path.iterdir()) == []


def test_a_killed_evaluator_training_leaves_nothing_for_good(tmp_path):
    """train_cached trains into .<data>-<key>.tmp<pid>/: the next get_evaluator removes those whose process is gone
    (and keeps one whose process runs, or whose run lock a process on another host holds)."""
    from lab_utils.commands.evaluation import get_evaluator

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f".shapes-0123456789abcdef.tmp{dead.pid}"
    (killed / "checkpoints").mkdir(parents=True)
    (killed / "checkpoints" / "step_00000002.pt").write_bytes(b"half an evaluator")
    running = tmp_path / f".shapes-0123456789abcdef.tmp{os.getpid()}"
    running.mkdir()
    elsewhere = tmp_path / f".shapes-fedcba9876543210.tmp{dead.pid}"  # the pid of a process on another host
    elsewhere.mkdir()
    with FileLock(str(elsewhere / ".lock"), timeout=0):  # ... which trains into it, holding its run lock
        with pytest.raises(FileNotFoundError, match="no trained evaluator"):
            get_evaluator({"name": "shapes", "num_train": 64, "num_test": 16}, cache_dir=tmp_path,
                          train_if_missing=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, elsewhere.name])
