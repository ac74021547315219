"""Which Lab classes genlab may build: its own families, and the labs a user registers explicitly.

A config names its lab by ``model._target_`` ("labs.diffusion.DiffusionLab"), and a checkpoint
carries that config. Importing whatever module a file names would run that module's code (a
run folder shipped with ``evil.py`` and a checkpoint saying ``_target_: evil.Lab`` would run
``evil.py`` on ``genlab sample``), so a name is looked up here *before* anything is imported,
and only names registered here are ever imported:

- genlab's own labs (:data:`BUILTIN_LABS`);
- a user's lab registered by the user's own code, ``register_lab(MyLab)`` (a notebook, a script,
  a test), or by the user's own environment for the ``genlab`` command:
  ``GENLAB_LABS=mypkg.mylab.MyLab,other.Lab genlab train model=...``.

Nothing in a config or a checkpoint can register a lab.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from lab_utils.core.schema import ConfigError, typed_section

if TYPE_CHECKING:  # annotations only: lab_utils.core.lab imports torch, and the CLI reads configs before it needs it
    from omegaconf import DictConfig

    from lab_utils.core.lab import DataInfo, Lab

BUILTIN_LABS: dict[str, str] = {  # model._target_ -> the family it is (model.name in conf/model/)
    "labs.diffusion.DiffusionLab": "ddpm",
    "labs.gan.GANLab": "dcgan",
    "labs.vae.VAELab": "vae",
    "labs.latent_diffusion.LatentDiffusionLab": "ldm",
    "labs.flow.FlowLab": "flow",
    "labs.evaluator.EvaluatorLab": "evaluator",
    "labs.clip.ClipLab": "clip",
}
# The families that are not generative (they draw no images): the evaluator (the measuring instrument of genlab eval)
# and CLIP (a joint embedding, which genlab eval measures by zero-shot classification and retrieval). They are left out
# of the zoo's, compare's and serve's lists of families.
MEASURING_FAMILIES: tuple[str, ...] = ("evaluator", "clip")
# Names genlab's own labs had before they moved: a checkpoint saved then still loads (as the new class).
MOVED_LABS: dict[str, str] = {"lab_utils.evaluation.EvaluatorLab": "labs.evaluator.EvaluatorLab"}
ENV_VAR = "GENLAB_LABS"  # comma-separated module.Class names of the user's own labs

_registered: dict[str, type | None] = {}  # target -> class (None: by name, imported on first use)


class UnknownLab(ConfigError):
    """A config or checkpoint names a lab class genlab does not know (and so will not import)."""


def target_of(cls: type) -> str:
    """The ``model._target_`` string that names ``cls``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_lab(lab: type | str) -> str:
    """Allow ``lab`` (a Lab subclass, or its "module.Class" name) to be built from configs and checkpoints.

    Call it from your own code before training or loading a lab of your own; returns its target name.
    """
    if isinstance(lab, str):
        _check_name(lab)
        _registered.setdefault(lab, None)  # imported on first use
        return lab
    if not _is_lab(lab):
        raise TypeError(f"register_lab expects a subclass of lab_utils.core.lab.Lab, got {lab!r}")
    target = target_of(lab)
    _registered[target] = lab
    return target


def environment_labs() -> list[str]:
    """The names the user listed in ``$GENLAB_LABS``."""
    return [name.strip() for name in os.environ.get(ENV_VAR, "").split(",") if name.strip()]


def known_labs() -> list[str]:
    """Every target that may be built: genlab's own, then the registered ones."""
    return [*BUILTIN_LABS, *(t for t in _registered if t not in BUILTIN_LABS),
            *(t for t in environment_labs() if t not in BUILTIN_LABS and t not in _registered)]


def lab_class(target: Any) -> type:
    """The Lab class registered as ``target``; :class:`UnknownLab` (nothing imported) for any other name."""
    if not isinstance(target, str) or not target:
        raise UnknownLab("`model._target_` is missing: a model config must name its Lab class, one of "
                         f"{', '.join(BUILTIN_LABS)}")
    target = MOVED_LABS.get(target, target)
    if target not in known_labs():
        raise UnknownLab(
            f"`model._target_={target}` is not a lab genlab knows, so it is not imported (a config or checkpoint "
            f"cannot make genlab run code); genlab's labs are {', '.join(BUILTIN_LABS)}. For a lab of your own, "
            f"register it in your code (lab_utils.core.registry.register_lab) or set {ENV_VAR}={target}"
        )
    cls = _registered.get(target)
    if cls is None:
        cls = _import(target)
    if not _is_lab(cls):
        raise UnknownLab(f"`model._target_={target}` is not a subclass of lab_utils.core.lab.Lab")
    return cls


def _is_lab(cls: Any) -> bool:
    # Imported here, not at the top: lab_utils.core.lab imports torch (seconds), and the CLI reads configs (and
    # refuses bad ones) before it needs torch. lab_utils.core.lab does not import this module: no cycle.
    from lab_utils.core.lab import Lab

    return isinstance(cls, type) and issubclass(cls, Lab)


def _check_name(target: str) -> None:
    module, _, name = target.rpartition(".")
    if not module or not all(part.isidentifier() for part in target.split(".")):
        raise UnknownLab(f"{target!r} is not a module.Class name")


def _import(target: str) -> type:
    _check_name(target)
    module_name, _, name = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, name)
    except (ImportError, AttributeError) as err:
        raise UnknownLab(f"`model._target_={target}` cannot be imported: {err}") from None


def build_lab(cfg: "DictConfig", data_info: "DataInfo") -> "Lab":
    """Instantiate the lab named by ``cfg.model._target_`` with its typed config (``cfg.model`` checked once, here)."""
    cls = lab_class(cfg.model.get("_target_"))
    return cls(typed_section(cfg.model, cls.Config, "model"), data_info)  # the lab takes the instance as is
