"""Train once, then cache: a run that commands need again and again (the evaluator of a dataset, a family's first
stage) is trained through the harness the first time, into a folder named by its key, and reused while nothing
that determines it changed. Any change retrains; there is no version to bump by hand.

    child_config      a child run's config: composed from group choices and overrides, with the parent's values
                      (its data, a budget) merged over it, then validated; a composed config is never mutated
    run_key           what a cached run is keyed by: its resolved config (data but not where it lives, model,
                      trainer but not how it reports or where it runs, seed) and the source of its labs
    lab_source_files  the labs' source a lab is built from: its module, the packages above it and every module
                      of its top package they import (a lab's exercises are not among them)
    train_cached      train a config into its folder by way of a temporary one, renamed when complete

The zoo records the same key for each shipped model (``lab_utils.harness.zoo``): the shipped evaluator stands in
for a trained one only while its key is the one its settings give now.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from lab_utils.core.config import compose, validate
from lab_utils.core.data.base import LOCATION_KEYS
from lab_utils.core.registry import lab_class
from lab_utils.core.schema import to_container
from lab_utils.harness.run import train
from lab_utils.harness.trainer import TrainResult

# Trainer settings that say how a run reports, where it runs or how its batches reach the device: not in the key.
UNKEYED_TRAINER = ("device", "progress", "num_workers", "data_on_device", "tensorboard", "log_every")


def child_config(choices: Sequence[str], values: Mapping[str, Any] | None = None) -> DictConfig:
    """The validated config of a run derived from another: ``compose(choices)`` (``model=...``, ``data=...``,
    ``preset=...`` and any ``key=value`` overrides), with ``values`` merged over it (a nested dict of the parent's
    values: its data section, a budget, a path), into a new config; nothing composed is changed in place."""
    composed = compose(list(choices), check=False)
    OmegaConf.set_struct(composed, False)  # a value may fill a key the YAML leaves to the schema
    return validate(OmegaConf.merge(composed, dict(values or {})))


def run_key(cfg: DictConfig) -> str:
    """sha256 (16 hex digits) of what determines a trained run: the validated ``cfg``'s data (not where it lives),
    model, trainer (not :data:`UNKEYED_TRAINER`) and seed, and the digest of its labs' source
    (:func:`lab_source_digest`)."""
    data = {k: v for k, v in to_container(cfg.data).items() if k not in LOCATION_KEYS}
    trainer = {k: v for k, v in to_container(cfg.trainer).items() if k not in UNKEYED_TRAINER}
    payload = {"data": data, "model": to_container(cfg.model), "trainer": trainer, "seed": cfg.seed,
               "source": lab_source_digest(cfg.model._target_)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def lab_source_digest(target: str) -> str:
    """sha256 of :func:`lab_source_files` (names relative to the top package, line ends as ``\\n``)."""
    files = lab_source_files(target)
    root = files[0].parent
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return digest.hexdigest()[:16]


def lab_source_files(target: str) -> list[Path]:
    """The files of the lab ``target``'s top package (``labs``) that building it runs: the module of its class,
    every package above it (Python runs each ``__init__.py`` on the way) and every module of the top package they
    import, followed to the end, by reading their imports (at any level of a file), not by running them. The lab
    is looked up in the registry first, so only a lab genlab knows is read. The top package's file comes first."""
    module = lab_class(target).__module__
    top = module.partition(".")[0]
    top_file = Path(sys.modules[top].__file__)
    if top_file.name != "__init__.py":  # a lab in a module of its own
        return [top_file]
    root, found, todo = top_file.parent, {}, [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        if name in found or parts[0] != top:
            continue
        package_file = root.joinpath(*parts[1:], "__init__.py")
        path = package_file if package_file.is_file() else root.joinpath(*parts[1:]).with_suffix(".py")
        if not path.is_file():  # a name imported from a module, not a module
            todo.append(name.rpartition(".")[0])
            continue
        found[name] = path
        todo.append(name.rpartition(".")[0])  # the package above runs first
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    above = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(above + ([node.module] if node.module else []))
                todo += [f"{base}.{alias.name}" for alias in node.names]
    return sorted(found.values(), key=lambda path: (path != top_file, path))


def train_cached(cfg: DictConfig, folder: Path, finish: Callable[[Path, TrainResult], Any] | None = None) -> Path:
    """Train ``cfg`` into ``folder``: into a temporary folder beside it, then ``finish(temporary, result)`` (the
    evaluator measures its test accuracy there), then an atomic rename. A crash never leaves a half-trained run
    under the final name, so a folder there is complete; two processes training the same run at once both end
    with a complete one. The caller's RNG state is left as it was (``train`` seeds the global RNG)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with torch.random.fork_rng(devices=_cuda_devices(cfg.trainer.device)):
            result = train(OmegaConf.merge(cfg, {"out": str(tmp)}))
        if finish is not None:
            finish(tmp, result)
        try:
            os.replace(tmp, folder)  # atomic; fails if another process got there first
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _cuda_devices(device: Any) -> list[int]:
    """The CUDA devices whose RNG ``fork_rng`` must save (none on CPU)."""
    name = str(device)
    if not torch.cuda.is_available() or not (name.startswith("cuda") or name == "auto"):
        return []
    return [torch.device(name).index or 0] if name.startswith("cuda") else [torch.cuda.current_device()]
