"""Run folders: what a resume may point at and how it continues, one training per folder, leftovers of a kill.

A run folder is what ``genlab train`` writes: ``config.yaml``, ``run.json``, ``checkpoints/`` (``step_<N>.pt``,
``last.pt``), ``metrics.jsonl``, ``train.log``, ``samples/``. Four rules keep it whole:

- **What resumes.** ``resume=`` takes a run folder or a checkpoint inside one
  (``<run>/checkpoints/*.pt``), and the run continues in that folder. A checkpoint anywhere else
  has no run folder of its own (taking its parent's parent would overwrite whatever
  ``config.yaml`` and ``metrics.jsonl`` live there), so it resumes only into an explicit new
  ``out=`` (:func:`resume_source`).
- **One writer.** A training holds the operating system's lock on ``<run>/.lock`` (``filelock``), and
  ``.lock.json`` names its pid, host and start time; a second training into the same folder is
  refused with the owner named. The OS releases the lock when its process ends, however it ends
  (kill -9, a crash), on any host: the next training takes it and reports the stale owner (:class:`RunLock`).
- **No leftovers.** A kill during a checkpoint write leaves ``checkpoints/.step_*.pt.<pid>.tmp``;
  the next training of the folder removes them, once it holds the lock
  (:func:`remove_temporaries`); a cache's temporaries go once their process is gone
  (:func:`remove_stale_temporaries`).
- **Who ran it.** ``run.json`` records each start of the run (the first and every resume): the command
  line, its Hydra overrides, the versions of genlab, torch and Python, the code's git version, the host
  and the time (:func:`record_start`); ``config.yaml`` holds the resolved config of the latest.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from lab_utils.core.config import parse_overrides
from lab_utils.core.data.base import LOCATION_KEYS
from lab_utils.core.schema import ConfigError
from lab_utils.harness.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from lab_utils.harness.zoo import FOLDER as ZOO_FOLDER

log = logging.getLogger("genlab.train")

LOCK_NAME = ".lock"  # the OS lock (filelock)
OWNER_NAME = ".lock.json"  # who holds it: pid, host, start time, command
RECORD_NAME = "run.json"  # each start of the run: command line, overrides, versions, host, time
TEMPORARY_PATTERN = ".*.tmp"  # atomic writes in progress: .<name>.<pid>.tmp


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (resumed from outside, or in use by another training)."""


@dataclass(frozen=True)
class ResumeSource:
    checkpoint: Path  # the file training continues from
    run_dir: Path | None  # the run folder it belongs to (None: a checkpoint outside any run folder)


@dataclass(frozen=True)
class Resume:
    """Where a run continues from and that checkpoint, read once (by ``resume_point`` or ``open_run``)."""

    source: ResumeSource
    state: dict[str, Any]


def resume_source(path: str | Path) -> ResumeSource:
    """Where ``resume=path`` continues from: a run folder, its ``checkpoints/`` or a checkpoint in it.

    A checkpoint file outside a ``checkpoints/`` folder gives ``run_dir=None``: the caller must be
    told where to write (a new ``out=``), never guess.
    """
    path = Path(path).expanduser()
    checkpoint = resolve_checkpoint(path)
    if checkpoint.parent.name == "checkpoints":
        return ResumeSource(checkpoint, checkpoint.parent.parent)
    return ResumeSource(checkpoint, None)


# What genlab writes into a run folder (train, eval, the evaluator cache), and nothing else.
RUN_FILES = frozenset({"config.yaml", RECORD_NAME, "metrics.jsonl", "train.log", "samples", "checkpoints",
                       "tensorboard", "eval.json", "evaluator.json", LOCK_NAME, OWNER_NAME})


def foreign_files(run_dir: Path) -> list[str]:
    """The entries of ``run_dir`` a run does not write (a folder holding any is not a run folder)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES)


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds a run's checkpoints."""
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.suffix == ".pt" for p in folder.iterdir())


# ------------------------------------------------------------------------------------ resuming
GROUP_KEYS = ("model", "data", "preset")  # group choices a resumed run cannot change
RUN_KEYS = ("model", "data", "seed")  # sections that belong to a run: they cannot change on resume


def resume_point(run: str, overrides: list[str]) -> tuple[DictConfig, Resume]:
    """The saved config of the run at ``run`` with the command line's overrides applied, truthfully, and
    where it resumes from (the checkpoint, read here once: ``train`` takes it as is).

    - ``trainer.*`` values take effect: they are applied to the run's config (and so recorded in its
      ``config.yaml``);
    - ``out=<folder>`` continues the run in that new folder, leaving the original untouched (the only way
      to continue a checkpoint that lies outside a run folder);
    - ``model.*``, ``data.*``, ``seed`` and the ``model``/``data``/``preset`` groups are the run's own (its
      weights, optimiser state and data order belong to them): another value is refused, except for where the
      data lives (``data.root``, ``data.cache_dir``, ``data.download``, ``data.system_dirs``).
    """
    source = resume_source(run)
    state = load_checkpoint(source.checkpoint)
    saved = OmegaConf.create(state["config"])
    run_dir = source.run_dir
    for override in parse_overrides(overrides):
        key = override.key_or_group
        if key == "resume" or key.split(".")[0] == "hydra":
            continue
        value = override.value()
        if key in GROUP_KEYS:
            was = saved.get("preset_name") if key == "preset" else saved[key].get("name")
            if value != was:
                raise ConfigError(f"the run at {run} was trained with {key}={was}; it cannot resume as {key}={value}")
            continue
        if key == "out":
            run_dir = Path(str(value))
            continue
        if override.is_delete():
            raise ConfigError(f"~{key}: settings of a resumed run cannot be deleted; set a value instead")
        if key.split(".")[0] in RUN_KEYS and not (key.startswith("data.") and key[5:] in LOCATION_KEYS):
            was = OmegaConf.select(saved, key, default="<not set>")
            if isinstance(was, (DictConfig, ListConfig)):
                was = OmegaConf.to_container(was)
            if was != value:
                raise ConfigError(
                    f"{key}={value} cannot change when resuming (the run has {key}={was}): its weights, optimiser "
                    f"state and data order come from its checkpoint; start a new run to train with {key}={value}"
                )
            continue
        if key.split(".")[0] not in ("trainer", "data"):
            raise ConfigError(f"{key}={value}: only trainer.* settings, out and where the data lives can be given "
                            "when resuming")
        OmegaConf.update(saved, key, value, force_add=True)  # the trainer schema (validate) checks the key
    if run_dir is None:
        raise ConfigError(
            f"{source.checkpoint} is a checkpoint outside a run folder (a run keeps its checkpoints in "
            "<run>/checkpoints/), so there is no run to continue in place; to continue training from it, "
            "give a new folder to write into: out=<new folder>"
        )
    if "run_dir" in saved:  # a run saved before the output key became `out`
        saved.pop("run_dir")
    saved.out = str(run_dir)
    saved.resume = str(source.checkpoint)
    return saved, Resume(source, state)


def resume_config(run: str, overrides: list[str]) -> DictConfig:
    """The config part of :func:`resume_point`."""
    return resume_point(run, overrides)[0]


def open_run(cfg: DictConfig, resume: str | Path | Resume | None) -> tuple[Path, Resume | None]:
    """Rank 0, holding the lock: the run folder and where it resumes from (None: a new run). ``resume`` is a
    run folder or checkpoint, or a :class:`Resume` whose checkpoint was already read (not read again)."""
    run_dir = Path(cfg.out)
    remove_temporaries(run_dir)
    foreign = foreign_files(run_dir)
    if foreign:  # e.g. out=. in a project folder: its config.yaml would be overwritten
        shown = ", ".join(foreign[:5])
        raise RunFolderError(f"out={run_dir} holds files a run does not write ({shown}); a run writes config.yaml, "
                             "metrics.jsonl, train.log, checkpoints/ and samples/ there: choose a new or empty folder")
    if resume is None:
        if holds_run(run_dir):
            raise FileExistsError(
                f"{run_dir} already holds a run with checkpoints; continue it with `genlab train resume={run_dir}` "
                "or choose another out=<folder>"
            )
        return run_dir, None
    point = resume if isinstance(resume, Resume) else None
    source = point.source if point else resume_source(resume)
    if source.run_dir is None or source.run_dir.resolve() != run_dir.resolve():  # continued into a new folder
        if holds_run(run_dir):
            raise FileExistsError(f"out={run_dir} already holds a run; to continue {source.checkpoint} in a new "
                                  "folder, choose one that holds no checkpoints")
    state = point.state if point else load_checkpoint(source.checkpoint)
    saved = state["config"]
    if saved["model"]["name"] != cfg.model.name or saved["data"]["name"] != cfg.data.name:
        raise CheckpointError(
            f"{source.checkpoint} belongs to model={saved['model']['name']} data={saved['data']['name']}, "
            f"not model={cfg.model.name} data={cfg.data.name}"
        )
    return run_dir, Resume(source, state)


def metrics_up_to(path: Path, step: int) -> list[str]:
    """The rows of a ``metrics.jsonl`` logged at or before ``step`` (a killed run logs past its checkpoint)."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    return kept


def continue_metrics(source_run: Path | None, run_dir: Path, step: int) -> None:
    """``run_dir/metrics.jsonl`` holds the rows up to ``step``: no duplicates after a kill, and a run continued
    into a new folder starts with the history of the run it came from."""
    rows = metrics_up_to((source_run or run_dir) / "metrics.jsonl", step)
    if rows or (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in rows))


# ------------------------------------------------------------------------------------ the lock
def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine. POSIX asks with signal 0; on Windows ``os.kill`` would end
    the process (it calls TerminateProcess for any signal but Ctrl-C/Ctrl-Break), so the process is opened and
    its exit code read instead."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        import ctypes  # Windows only: the kernel32 calls below

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # ERROR_ACCESS_DENIED: it exists, owned by someone else
        try:
            code = ctypes.c_ulong()
            return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _same_file(before: os.stat_result | None, path: Path) -> bool:
    try:
        return before is not None and os.path.samestat(before, os.stat(path))
    except OSError:
        return False


class RunLock:
    """``<run_dir>/.lock`` held for the lifetime of one training (a context manager), and ``.lock.json`` beside it
    saying who holds it (pid, host, start time, command) for the message that refuses a second training.

    The lock is the operating system's (``filelock``: ``flock`` on POSIX, ``LockFileEx`` on Windows), so it is
    released when its process ends in any way (kill -9, a crash, a power cut of a network client), on every OS and
    for every host that shares the folder: nothing guesses from a pid whether it is still held. A ``.lock.json``
    found when the lock is free was left by a process that ended without releasing: it is reported and replaced.

    ``release`` deletes both files before it releases the lock; ``acquire`` checks that the file it locked is still
    the one named ``.lock`` (a process that opened it just before its holder deleted it would otherwise lock a file
    no one else can see) and tries again if not. ``acquire`` creates the folder if needed, and ``release`` removes it
    again if it created it and it is empty, so a refused start leaves nothing behind.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.owner_path = self.run_dir / OWNER_NAME
        self.held = False
        self.created_folder = False
        self._lock = FileLock(str(self.path), timeout=0)

    def owner(self) -> dict[str, Any] | None:
        """Who holds (or last held) the lock, as ``.lock.json`` says (a lock file written by a genlab before
        ``filelock`` held the same JSON itself); None if it cannot be read (being written, or damaged)."""
        return _read_owner(self.owner_path) or _read_owner(self.path)

    def acquire(self) -> "RunLock":
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            self.created_folder = True
        legacy = _read_owner(self.path)  # read first: filelock may truncate the lock file when it opens it
        for _ in range(3):
            self.path.touch()  # so that the file locked below can be compared with the one named .lock
            try:
                before = os.stat(self.path)
            except FileNotFoundError:  # its holder released it this instant
                continue
            try:
                self._lock.acquire()
            except Timeout:
                raise RunFolderError(self._in_use_message()) from None
            if _same_file(before, self.path):
                break
            self._lock.release()  # the file was deleted (and perhaps created again) while we locked it
        else:
            raise RunFolderError(f"could not take the lock {self.path}: other processes keep creating it")
        self.held = True
        left = _read_owner(self.owner_path) or legacy  # a holder deletes it before releasing: this one died
        if left is not None:
            log.warning("taking over the stale lock %s: its process %s on %s (since %s) ended without releasing it",
                        self.path, left.get("pid"), left.get("host"), left.get("started"))
        if legacy is not None and self.path.stat().st_size:  # the lock file is only a lock now
            os.truncate(self.path, 0)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": shlex.join(sys.argv)[:500]}
        self.owner_path.write_text(json.dumps(me) + "\n")
        return self

    def _in_use_message(self) -> str:
        owner, deadline = self.owner(), time.monotonic() + 2.0
        while owner is None and time.monotonic() < deadline:  # its holder is writing .lock.json this instant
            time.sleep(0.05)
            owner = self.owner()
        who = (f"pid {owner.get('pid')} on host {owner.get('host')}, since {owner.get('started')}" if owner
               else "a process that is starting")
        return (f"{self.run_dir} is in use by another training ({who}; it holds {self.path}); wait for it to "
                "finish or choose another out=<folder>")

    def release(self) -> None:
        if self.held:
            for path in (self.owner_path, self.path):
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # Windows: an open file cannot be deleted (filelock deletes it on release there)
                    pass
            self._lock.release()
            self.held = False
        if self.created_folder:
            try:
                self.run_dir.rmdir()  # only if still empty: a refused start leaves no trace
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete the partial files of atomic writes a killed run left: every one in ``checkpoints/`` (hold the lock
    first), and those in the run folder itself (``run.json``'s, ``eval.json``'s) whose process is gone."""
    folder = run_dir / "checkpoints"
    removed = [path for path in folder.glob(TEMPORARY_PATTERN) if path.is_file()] if folder.is_dir() else []
    removed += [path for path in run_dir.glob(TEMPORARY_PATTERN) if path.is_file() and _writer_gone(path)]
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        log.warning("removed %d partial file(s) a killed run left in %s: %s", len(removed), run_dir,
                    ", ".join(str(p.relative_to(run_dir)) for p in removed))
    return removed


TEMPORARY_PID = re.compile(r"^\..+\.(?:(\d+)\.tmp|tmp(\d+))$")  # .<name>.<pid>.tmp or .<name>.tmp<pid>


def _writer_gone(path: Path) -> bool:
    """Whether the process that named the temporary ``path`` after its pid no longer runs here (a name without a
    pid: False, it is kept)."""
    match = TEMPORARY_PID.match(path.name)
    return match is not None and not process_alive(int(match.group(1) or match.group(2)))


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what a killed process left in a cache ``folder`` (``lab_utils.harness.cached_run.train_cached`` trains
    into ``.<name>.tmp<pid>/`` and renames it when complete): temporaries whose process no longer runs on this host
    and whose run lock no one holds (a process on another host sharing the folder holds it while it trains)."""
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if not _writer_gone(path):
            continue
        if path.is_dir():
            lock = FileLock(str(path / LOCK_NAME), timeout=0)
            try:
                with lock:
                    pass
            except Timeout:  # trained by a process on another host
                continue
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.warning("removed %d temporary item(s) that killed processes left in %s: %s", len(removed), folder,
                    ", ".join(p.name for p in removed))
    return removed


# ------------------------------------------------------------------------------------ who ran it
def code_version(root: Path | None = None) -> str | None:
    """``git <commit>`` of the source tree genlab runs from (``root``: this package's repository), with ``-dirty``
    when a tracked file other than the zoo's shipped models differs from the commit (so a build that rewrites
    ``labs/*/pretrained/`` does not call its own code dirty); None where genlab does not run from a git clone (an
    installed wheel: its version says which code it is). ``run.json`` and the zoo's manifests record it."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # the clone's own .git, not that of a project an installed genlab lives in
        return None
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=30)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 f":(exclude,glob)labs/*/{ZOO_FOLDER}/**"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return None
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return f"git {head.stdout.strip()}" + ("-dirty" if dirty else "")


def versions() -> dict[str, str | None]:
    """genlab's, torch's and Python's versions and the code's git version (:func:`code_version`)."""
    try:
        genlab = version("genlab")
    except PackageNotFoundError:  # run from a source tree that was never installed
        genlab = None
    return {"genlab": genlab, "torch": torch.__version__, "python": platform.python_version(), "code": code_version()}


def hydra_overrides() -> list[str] | None:
    """The command line's Hydra overrides, when a ``genlab`` command runs this process (None otherwise: a notebook,
    a test, a script that calls ``train``)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def record_start(run_dir: Path, resumed_from: Path | None, step: int, world_size: int = 1,
                 source_run: Path | None = None) -> dict[str, Any]:
    """Append this start of the run to ``run_dir/run.json`` (atomically) and return its entry: when, where and by
    which command and code it was started, and from which checkpoint and step. A run continued into a new folder
    starts with the record of ``source_run``, the run it came from."""
    entry = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": shlex.join(sys.orig_argv),
             "overrides": hydra_overrides(), "resumed_from": str(resumed_from) if resumed_from else None,
             "step": step, "processes": world_size, "host": socket.gethostname(), "pid": os.getpid(),
             "versions": versions()}
    starts = _read_record(source_run or run_dir) if resumed_from is not None else []
    record = {"about": "each start of this run, the first and every resume (genlab train); config.yaml holds the "
                       "resolved config of the latest", "starts": [*starts, entry]}
    path = run_dir / RECORD_NAME
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return entry


def _read_record(run_dir: Path) -> list[dict[str, Any]]:
    """The starts ``run_dir/run.json`` lists ([] for a run without one, or a damaged one: a warning says so)."""
    path = run_dir / RECORD_NAME
    if not path.is_file():
        return []
    try:
        starts = json.loads(path.read_text())["starts"]
        if not isinstance(starts, list):
            raise TypeError(f"'starts' is a {type(starts).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s is damaged (%s); its earlier starts are not carried over", path, err)
        return []
    return starts


def run_finished(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's run spent its budget (the trainer's own stopping rule)."""
    counters, trainer = state["trainer"], state["config"]["trainer"]
    return (counters["step"] >= trainer["steps"]
            or (trainer.get("max_images") is not None and counters["images_seen"] >= trainer["max_images"])
            or (trainer.get("max_seconds") is not None and counters["train_seconds"] >= trainer["max_seconds"]))
