"""``train``: one training run, from the config to the last checkpoint.

It opens the run folder (new, or resumed: :mod:`lab_utils.harness.run_folder`), builds the dataset, the lab and
the :class:`~lab_utils.harness.trainer.Trainer`, restores the checkpoint into them, writes ``config.yaml``,
``run.json`` (who started it, how, with which code: :func:`~lab_utils.harness.run_folder.record_start`) and
``train.log`` (the log handler is removed again when the run ends) and fits. Nothing is written into the run folder
before the data, the model and the checkpoint all loaded.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from lab_utils.core.config import TrainerConfig
from lab_utils.core.data import build_dataset
from lab_utils.core.lab import DataInfo
from lab_utils.core.registry import build_lab
from lab_utils.core.schema import typed_section
from lab_utils.harness import distributed
from lab_utils.harness.checkpoint import initialize_modules
from lab_utils.harness.devices import pick_device, speed_setup
from lab_utils.harness.run_folder import Resume, RunFolderError, RunLock, continue_metrics, open_run, record_start
from lab_utils.harness.trainer import Callback, Trainer, TrainResult
from lab_utils.harness.zoo import take_module

log = logging.getLogger("genlab.train")


def train(cfg: DictConfig, resume: str | Path | Resume | None = None, callbacks: tuple[Callback, ...] = ()) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` into ``cfg.out``, or continue from the checkpoint at ``resume``.

    ``cfg`` must be a validated config (``lab_utils.core.config.validate``). When resuming it is the run's
    saved config with the caller's overrides applied (``run_folder.resume_point``), and ``resume`` is a run
    folder or a checkpoint in one, or the ``Resume`` that ``resume_point`` returned (its checkpoint is not read
    again); the run continues in ``cfg.out``, which is either that run folder
    or a new folder (a checkpoint outside any run folder continues only into a new one). Rank 0 holds the
    run folder's lock for the whole training (``lab_utils.harness.run_folder``). Under torchrun every process
    calls this; they join one process group for the run and leave it at the end.

    The trainer section is typed here, once (:func:`trainer_settings`), and the Trainer reads only that.
    """
    settings = trainer_settings(cfg)
    dist_info, owns_group = distributed.setup(settings.device, settings.dist_backend)
    clean = False
    try:
        with RunLock(cfg.out) if dist_info.is_main else contextlib.nullcontext():
            result = _train(cfg, settings, resume, callbacks, dist_info)
        clean = True
        return result
    finally:
        if owns_group:
            distributed.teardown(clean)


def trainer_settings(cfg: DictConfig) -> TrainerConfig:
    """``cfg.trainer`` as the :class:`~lab_utils.core.config.TrainerConfig` a Trainer takes, checked by the schema;
    a config saved before a field existed gets the field's default here."""
    return typed_section(cfg.trainer, TrainerConfig, "trainer")


def _train(cfg: DictConfig, settings: TrainerConfig, resume: str | Path | Resume | None,
           callbacks: tuple[Callback, ...], dist_info: distributed.DistInfo) -> TrainResult:
    torch.manual_seed(cfg.seed)
    device = pick_device(settings.device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    if not dist_info.is_main:
        logging.getLogger("genlab").setLevel(logging.WARNING)  # one process reports
    opened = open_run(cfg, resume) if dist_info.is_main else None
    # The others take rank 0's run directory (its ${now:...} is the one) and checkpoint: no shared disk needed.
    run_dir, point = distributed.broadcast_object(opened)
    source, state = (point.source, point.state) if point else (None, None)
    # The dataset: rank 0 first (it writes the cache or downloads), then one process per node, then the rest.
    train_set = distributed.in_turn(lambda: build_dataset(cfg.data, "train"), dist_info)
    data_info = DataInfo.from_dict(state["data_info"]) if state else train_set.data_info()
    lab = build_lab(cfg, data_info)
    taken_from: list[str] = []  # what the new run took from other runs, for train.log
    if state is None and settings.init_from:  # a new run that starts from another run's submodules
        taken = initialize_modules(lab, settings.init_from, settings.init_modules)
        taken_from.append(f"took {', '.join(settings.init_modules)} from {taken}")
    if state is None:  # submodules the model takes from another one (a frozen CLIP text encoder)
        for name, model in lab.initial_modules().items():
            taken_from.append(f"took {name} from {take_module(lab, name, model)}")
    lab = speed_setup(lab.to(device), cfg, device)
    if dist_info.rank > 0:
        torch.manual_seed(cfg.seed + dist_info.rank)  # its own noise; the weights come from rank 0 (DDP)
    trainer = Trainer(cfg, settings, run_dir, lab, train_set, data_info, device, callbacks, dist_info)
    if state is not None:
        trainer.load_state_dict(state, source.checkpoint)
        trainer.last_checkpoint = source.checkpoint if source.run_dir == run_dir else None
        if trainer.budget_used() >= 1.0:  # every process decides the same: the state is the same
            raise RunFolderError(
                f"the run at {source.checkpoint} is already at step {trainer.step} ({trainer.images_seen} images, "
                f"{trainer.train_seconds:.0f} s), which meets its budget (trainer.steps={settings.steps}, "
                f"max_images={settings.max_images}, max_seconds={settings.max_seconds}); to train further, raise "
                f"it, e.g. trainer.steps={trainer.step + settings.steps}"
            )
    if dist_info.is_main:
        # Nothing is written into the run directory before the data, model and checkpoint all loaded.
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        record_start(run_dir, source.checkpoint if source else None, trainer.step, dist_info.world_size,
                     source.run_dir if source else None)
        continue_metrics(source.run_dir if source else None, run_dir, trainer.step)
    with file_log(run_dir / "train.log") if dist_info.is_main else contextlib.nullcontext():
        for line in taken_from:
            log.info("%s", line)
        if state is not None:
            log.info("resumed %s at step %d (%d process(es); the checkpoint was written by %d)%s", source.checkpoint,
                     trainer.step, dist_info.world_size, state["trainer"].get("world_size", 1),
                     "" if source.run_dir == run_dir else f", continuing in the new folder {run_dir}")
        n_params = sum(p.numel() for p in lab.parameters())
        log.info("training %s (%.2fM parameters) on %s (%d images) on %s%s into %s", cfg.model.name,
                 n_params / 1e6, cfg.data.name, len(train_set), device,
                 f" x {dist_info.world_size} processes" if dist_info.enabled else "", run_dir)
        try:
            result = trainer.fit()
        finally:
            trainer.release()
        log.info("done: step %d, %d images in %.1f s (%.1f images/s); checkpoint %s", result.step,
                 result.images_seen, result.train_seconds, result.images_per_second, result.checkpoint)
    return result


@contextlib.contextmanager
def file_log(path: Path) -> Iterator[None]:
    """Copy the ``genlab`` log into ``path`` while the block runs (the handler is removed afterwards, so a
    process that trains several runs, such as ``genlab compare``, writes each run's log into its own file)."""
    root = logging.getLogger("genlab")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
