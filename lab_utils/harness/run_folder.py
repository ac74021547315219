"""Run folders: what a resume may point at and how it continues, one training per folder, leftovers of a kill.

A run folder is what ``genlab train`` writes: ``config.yaml``, ``checkpoints/`` (``step_<N>.pt``,
``last.pt``), ``metrics.jsonl``, ``train.log``, ``samples/``. Three rules keep it whole:

- **What resumes.** ``resume=`` takes a run folder or a checkpoint inside one
  (``<run>/checkpoints/*.pt``), and the run continues in that folder. A checkpoint anywhere else
  has no run folder of its own (taking its parent's parent would overwrite whatever
  ``config.yaml`` and ``metrics.jsonl`` live there), so it resumes only into an explicit new
  ``out=`` (:func:`resume_source`).
- **One writer.** A training holds ``<run>/.lock`` (created with ``O_EXCL``: exactly one process
  wins) with its pid, host and start time; a second training into the same folder is refused
  with the owner named. A lock left by a process that no longer runs on this host (kill -9, a
  crash) is recognised, reported and taken over (:class:`RunLock`).
- **No leftovers.** A kill during a checkpoint write leaves ``checkpoints/.step_*.pt.<pid>.tmp``;
  the next training of the folder removes them, once it holds the lock
  (:func:`remove_temporaries`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lab_utils.core.config import parse_overrides
from lab_utils.core.data.base import LOCATION_KEYS
from lab_utils.core.schema import ConfigError
from lab_utils.harness.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint

log = logging.getLogger("genlab.train")

LOCK_NAME = ".lock"
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
RUN_FILES = frozenset({"config.yaml", "metrics.jsonl", "train.log", "samples", "checkpoints", "tensorboard",
                       "eval.json", "evaluator.json", LOCK_NAME})


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
def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunLock:
    """``<run_dir>/.lock`` held for the lifetime of one training (a context manager).

    ``acquire`` creates the folder if needed (and ``release`` removes it again if it created it
    and it is still empty, so a refused start leaves nothing behind).
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False
        self.created_folder = False

    def owner(self) -> dict[str, Any] | None:
        """What the lock file says (None if it cannot be read: being written, or damaged)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, owner: dict[str, Any] | None) -> str | None:
        """Why the existing lock is stale (its process is gone), or None if it may still be held."""
        if owner is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return "it disappeared"
            # An unreadable lock older than a few seconds was left by a process killed while writing it.
            return "it is empty or damaged" if age > 10 else None
        if owner.get("host") == socket.gethostname() and not _process_alive(int(owner.get("pid", -1))):
            return f"its process {owner.get('pid')} on {owner.get('host')} no longer runs"
        return None

    def acquire(self) -> "RunLock":
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            self.created_folder = True
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                why = self._stale(owner)
                if why is None:
                    who = (f"pid {owner.get('pid')} on host {owner.get('host')}, since {owner.get('started')}"
                           if owner else "a process that is starting")
                    raise RunFolderError(
                        f"{self.run_dir} is in use by another training ({who}); wait for it to finish or choose "
                        f"another run_dir (if that process is gone for good, delete {self.path})"
                    ) from None
                log.warning("taking over the stale lock %s (%s)", self.path, why)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise RunFolderError(f"could not take the lock {self.path}: other processes keep creating it")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
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
    """Delete the partial files of atomic writes a killed run left in ``checkpoints/`` (hold the lock first)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.glob(TEMPORARY_PATTERN):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.warning("removed %d partial file(s) a killed run left in %s: %s", len(removed), folder,
                    ", ".join(p.name for p in removed))
    return removed


def run_finished(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's run spent its budget (the trainer's own stopping rule)."""
    counters, trainer = state["trainer"], state["config"]["trainer"]
    return (counters["step"] >= trainer["steps"]
            or (trainer.get("max_images") is not None and counters["images_seen"] >= trainer["max_images"])
            or (trainer.get("max_seconds") is not None and counters["train_seconds"] >= trainer["max_seconds"]))
