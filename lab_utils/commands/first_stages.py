"""A family's first training stage (the ldm's autoencoder), trained once per settings, cached like the evaluator
and taken by the runs that ``genlab compare`` trains (``compare.first_stages``); as Stable Diffusion's autoencoder
is trained once and shared by every diffusion model trained on its latents."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lab_utils.core.config import compose
from lab_utils.harness.run_folder import run_finished, settings_key

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


def lab_code_digest(target: str) -> str:
    """sha256 of the source of the lab's package and of the labs it composes: a cached stage trained by other
    code is not reused. The lab is looked up in the registry first, so only a lab genlab knows is imported."""
    import hashlib
    import importlib

    from lab_utils import COMPOSITE_LABS
    from lab_utils.core.registry import lab_class

    package = ".".join(lab_class(target).__module__.split(".")[:2])  # labs.<family>
    digest = hashlib.sha256()
    for name in (package, *COMPOSITE_LABS.get(package, ())):
        folder = Path(importlib.import_module(name).__file__).parent
        for path in sorted(folder.glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def train_first_stage(cfg: DictConfig, model: str) -> Optional[dict[str, Any]]:
    """The family's cached first stage (``compare.first_stages``), trained now if no comparison with the same
    settings trained it before (None: the family has none). Returns its checkpoint, steps and seconds."""
    import shutil

    from lab_utils.core.config import validate
    from lab_utils.core.data.base import cache_root
    from lab_utils.harness.checkpoint import load_checkpoint
    from lab_utils.harness.run import train

    spec = cfg.compare.first_stages.get(model)
    if spec is None:
        return None
    stage = compose([f"model={model}", f"data={cfg.data.name}", f"preset={cfg.preset_name}", f"seed={cfg.seed}",
                     *spec.train], check=False)
    OmegaConf.set_struct(stage, False)
    stage.data = cfg.data
    stage.trainer.progress = cfg.get("progress", True)
    key = settings_key(stage, lab_code_digest(stage.model._target_))  # other code trains it again
    folder = cache_root("first_stages") / f"{cfg.data.name}-{model}-{key}"
    stage.out = str(folder)
    started = time.perf_counter()
    state = load_checkpoint(folder) if (folder / "checkpoints" / "last.pt").exists() else None
    reused = state is not None and run_finished(state)
    if not reused:
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted one: start again (it is short)
        log.info("%s: training its first stage (%s) once into %s", model, ", ".join(spec.modules), folder)
        train(validate(stage))
        state = load_checkpoint(folder)
    counters = state["trainer"]
    return {"checkpoint": str(folder / "checkpoints" / "last.pt"), "modules": list(spec.modules),
            "steps": counters["step"], "seconds": counters["train_seconds"], "reused": reused,
            "wall_seconds": time.perf_counter() - started}
