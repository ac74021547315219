"""A family's first training stage (the ldm's autoencoder), trained once per settings, cached like the evaluator
(``lab_utils.harness.cached_run``) and taken by the runs that ``genlab compare`` trains (``compare.first_stages``);
as Stable Diffusion's autoencoder is trained once and shared by every diffusion model trained on its latents."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig

from lab_utils.core.cache_folder import cache_folder
from lab_utils.harness.cached_run import child_config, run_key, train_cached
from lab_utils.harness.checkpoint import load_checkpoint

log = logging.getLogger("genlab.compare")


@dataclass
class FirstStage:
    """A family's first training stage, trained once per settings (cached like the evaluator) and taken by its
    compared runs: the way Stable Diffusion's autoencoder is trained once and shared by every diffusion model."""

    modules: list[str] = field(default_factory=list)  # the submodules the first stage trains (lab.<name>)
    train: list[str] = field(default_factory=list)  # overrides that make a run of the family train only them
    then: list[str] = field(default_factory=list)  # overrides of the compared run, which starts from them

    def __post_init__(self) -> None:
        if not self.modules:
            raise ValueError("compare.first_stages.<model>.modules must name the submodules the first stage trains")


def train_first_stage(cfg: DictConfig, model: str) -> Optional[dict[str, Any]]:
    """The family's cached first stage (``compare.first_stages``), trained now if no comparison with the same
    settings trained it before (None: the family has none). Returns its checkpoint, steps and seconds.

    Cached by ``lab_utils.harness.cached_run`` under ``$GENLAB_CACHE/first_stages/<data>-<model>-<key>``: the
    family's preset and ``train`` overrides with the comparison's data and seed, keyed by ``run_key`` (so a
    change to the settings or to the family's source trains it again)."""
    spec = cfg.compare.first_stages.get(model)
    if spec is None:
        return None
    stage = child_config([f"model={model}", f"data={cfg.data.name}", f"preset={cfg.preset_name}", f"seed={cfg.seed}",
                          *spec.train], {"data": cfg.data, "trainer": {"progress": cfg.get("progress", True)}})
    folder = cache_folder("first_stages") / f"{cfg.data.name}-{model}-{run_key(stage)}"
    started = time.perf_counter()
    reused = folder.is_dir()  # complete: train_cached renames a folder there only once it is
    if not reused:
        log.info("%s: training its first stage (%s) once into %s", model, ", ".join(spec.modules), folder)
        train_cached(stage, folder)
    counters = load_checkpoint(folder)["trainer"]
    return {"checkpoint": str(folder / "checkpoints" / "last.pt"), "modules": list(spec.modules),
            "steps": counters["step"], "seconds": counters["train_seconds"], "reused": reused,
            "wall_seconds": time.perf_counter() - started}
