"""Checkpoints: atomic writes, safe loads, and rebuilding a lab from a checkpoint alone.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` accepts (tensors, numbers,
strings, lists, dicts): the resolved config, the ``DataInfo`` (vocabulary included), the model,
EMA, optimiser and LR-schedule states, the trainer's counters and the RNG state. Because the
config travels with the weights, ``load_lab(path)`` rebuilds the model with nothing else; a model key added
since the checkpoint was saved means what its absence meant then (``lab_utils.core.config.saved_model_config``).

A checkpoint is data from outside: it can name only a registered lab (``lab_utils.core.registry``), and
it cannot choose where genlab writes (``data.download`` and ``data.cache_dir`` are reset to this
machine's defaults when it is read; see ``lab_utils.core.data.base.WRITE_LOCATIONS``).
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lab_utils.core.config import saved_model_config
from lab_utils.core.data.base import without_write_locations
from lab_utils.core.lab import DataInfo, Lab
from lab_utils.core.registry import build_lab

FORMAT = "genlab-checkpoint"
FORMAT_VERSION = 1
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to another model."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a run directory, its ``checkpoints/`` folder, or a file path."""
    path = Path(path).expanduser()
    candidates = [path] if path.suffix == ".pt" else [path / "checkpoints" / "last.pt", path / "last.pt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"no such run directory or checkpoint: {path}")
    raise CheckpointError(
        f"{path} holds no checkpoint (looked for {', '.join(str(c) for c in candidates)}); "
        "a run writes checkpoints/last.pt every trainer.checkpoint_every steps and at the end"
    )


def atomic_save(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the old file or the new one, never a partial file. A write that fails (a
    full disk) raises the ``OSError`` that failed it, with ``path`` named: torch's zip writer reports a failure of
    the file's ``write`` as a ``RuntimeError`` ("unexpected pos ...") raised while handling that ``OSError``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            try:
                torch.save(state, handle)
            except RuntimeError as err:
                cause = err.__context__
                if not isinstance(cause, OSError):
                    raise
                raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_link(source: Path, target: Path) -> None:
    """Make ``target`` the same file as ``source`` (hard link; copy where links are unsupported)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        import shutil

        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], run_dir: Path, step: int, keep: int) -> Path:
    """Write ``checkpoints/step_<N>.pt`` and point ``last.pt`` at it; keep the newest ``keep``."""
    folder = checkpoint_dir(run_dir)
    path = folder / f"step_{step:08d}.pt"
    atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, path)
    atomic_link(path, folder / "last.pt")
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The ``step_*.pt`` files of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if STEP_FILE.match(p.name)]
    return sorted(files, key=lambda p: int(STEP_FILE.match(p.name).group(1)))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and sanity-check a checkpoint (``weights_only=True``: no code runs on load)."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's weights-only unpickler refused it; its message ends on advice to retry with weights_only=False
        named = re.search(r"GLOBAL ([\w.]+)", str(err), flags=re.IGNORECASE)
        if named is None:
            raise CheckpointError(_unreadable(path, err)) from None
        raise CheckpointError(
            f"{path} holds Python objects that genlab refuses to load because loading them could run code (it "
            f"names {named.group(1)}; a genlab checkpoint holds only tensors, numbers, strings, lists and dicts): "
            "it was not written by genlab, or it was altered"
        ) from None
    except Exception as err:  # truncated zip, garbage bytes, an empty file, ...
        raise CheckpointError(_unreadable(path, err)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not a genlab checkpoint (no '{FORMAT}' marker)")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer genlab (format {state['format_version']} > {FORMAT_VERSION}); upgrade genlab"
        )
    config = state.get("config")
    if isinstance(config, dict) and isinstance(config.get("data"), dict):  # where to write is not a file's choice
        config["data"] = without_write_locations(config["data"])
    if isinstance(config, dict) and isinstance(config.get("model"), dict):  # keys added since it was saved
        config["model"] = saved_model_config(config["model"])
    return state


def first_line(err: BaseException | str, limit: int = 200) -> str:
    """The first line of an exception's message or of a text ("" for an empty text, the type name for an
    exception with an empty message)."""
    text = str(err).strip()
    if not text:
        return "" if isinstance(err, str) else type(err).__name__
    return text.splitlines()[0][:limit]


def _unreadable(path: Path, err: BaseException) -> str:
    others = [p.name for p in list_checkpoints(path.parent.parent) if p != path] if path.parent.name == "checkpoints" else []
    hint = f" Older checkpoints in the same folder: {', '.join(others)}." if others else ""
    size = path.stat().st_size if path.exists() else 0
    detail = first_line(str(err).split("WeightsUnpickler error:")[-1])  # torch's own preamble comes before it
    what = "an empty file" if size == 0 else f"{type(err).__name__}: {detail or type(err).__name__}"
    return f"{path} is not a readable checkpoint ({what}). It may be corrupt or truncated, or not written by genlab.{hint}"


@dataclass
class LoadedLab:
    lab: Lab
    cfg: DictConfig  # the run's resolved config
    state: dict[str, Any]  # the raw checkpoint
    path: Path


def load_state_into(lab: Lab, weights: dict[str, torch.Tensor], path: Path, model_name: str) -> None:
    try:
        lab.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"the weights in {path} do not fit the {model_name!r} model built from its config "
            f"(was it written by another model or an edited config?): {first_line(err, 300)}"
        ) from None


def load_lab(
    path: str | Path,
    device: str | torch.device = "cpu",
    ema: bool = True,
    expect_model: str | None = None,
) -> LoadedLab:
    """Rebuild a lab from a checkpoint alone, with its EMA weights when ``ema`` and available."""
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    cfg = OmegaConf.create(state["config"])
    name = cfg.model.get("name", "?")
    if expect_model is not None and name != expect_model:
        raise CheckpointError(f"{path} belongs to model {name!r}, not {expect_model!r}")
    lab = build_lab(cfg, DataInfo.from_dict(state["data_info"]))
    load_state_into(lab, state["model"], path, name)
    if ema and state.get("ema"):
        from lab_utils.harness.ema import EMA

        EMA.copy_weights(state["ema"], lab)
    lab.to(device).eval()
    return LoadedLab(lab=lab, cfg=cfg, state=state, path=path)


def initialize_modules(lab: Lab, source: str | Path, modules: list[str]) -> Path:
    """Load the weights of the submodules ``lab.<name>`` for each name in ``modules`` from the checkpoint at
    ``source`` (a run folder or checkpoint; read with ``weights_only``), strictly: every tensor of each submodule,
    of the same shape. The rest of ``lab`` is left as it is. Returns the checkpoint's path."""
    path = resolve_checkpoint(source)
    weights = load_checkpoint(path)["model"]
    for name in modules:
        module = getattr(lab, name, None)
        if not isinstance(module, torch.nn.Module):
            raise CheckpointError(f"trainer.init_modules: {type(lab).__name__} has no submodule {name!r}")
        prefix = name + "."
        part = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
        if not part:
            raise CheckpointError(f"{path} holds no weights of {name!r} (trainer.init_modules)")
        try:
            module.load_state_dict(part)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: its {name!r} does not fit this model's: {first_line(err, 300)}") from None
    return path
