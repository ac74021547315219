"""Typed configuration: dataclass schemas for each config section, YAML in ``conf/`` for values.

Hydra composes the YAML (``conf/train.yaml`` + the ``data``, ``model``, ``preset`` groups);
:func:`validate` then merges every section with its schema so a typo or a bad value fails at
start-up with a message naming the key, instead of deep inside training:

- ``trainer`` -> :class:`TrainerConfig` (here);
- ``data``    -> the dataset class's ``Config`` (``lab_utils.core.data.DATASETS[cfg.data.name]``);
- ``model``   -> the lab class's ``Config`` (the class named by ``cfg.model._target_``, looked up in
  ``lab_utils.core.registry``: a name genlab does not know is refused, never imported).

A family's defaults have one home, its ``Config`` dataclass (STYLE 19): ``conf/model/<name>.yaml`` says only
which family it is and extends ``schema/model/<name>``, the dataclass itself, which
:func:`register_model_schema` stores in Hydra's ConfigStore before a config composing that family is composed
(so ``model.lr=...`` overrides a key the composed config has, and ``--cfg job`` prints every value);
``conf/preset_model/`` says what a preset changes and why.

Schemas check their own values in ``__post_init__`` (raising ``ValueError``).
Notebooks and tests get configs through :func:`compose`, never by hand.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Optional, get_type_hints

from omegaconf import DictConfig, OmegaConf

from lab_utils.core import registry
from lab_utils.core.schema import ConfigError, check_section

CONFIG_MODULE = "genlab_conf"  # `conf/` is installed as this package (see pyproject.toml)


@dataclass
class TrainerConfig:
    """Schema and defaults of ``cfg.trainer``; an instance is all the Trainer reads of the config (typed once per
    run, ``lab_utils.harness.run.trainer_settings``, where a config saved before a field existed gets its default)."""

    steps: int = 2000  # optimisation steps (a GAN step = n_critic critic updates + 1 generator update)
    # Optional budgets: training stops at whichever of steps / images / seconds comes first.
    max_images: Optional[int] = None  # images drawn from the data (all updates of a step count)
    max_seconds: Optional[float] = None  # seconds spent in training steps (sampling/checkpoints excluded)
    batch_size: int = 64
    # Several processes (torchrun): "global" = batch_size is the global batch, split over the processes
    # (the same run whatever their number); "per_process" = each process takes batch_size (the global
    # batch grows with the number of processes; scale the learning rate yourself).
    batch_scope: str = "global"
    device: str = "auto"  # auto = cuda, then mps, then cpu
    # Speed switches (CUDA unless said otherwise; presets pick sensible values, `genlab bench` measures them):
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + a gradient scaler per optimiser)
    tf32: bool = True  # TF32 matmuls/convolutions on Ampere and later
    channels_last: bool = False  # NHWC memory format for the networks and image batches (CPU too)
    compile: bool = False  # torch.compile each of the lab's networks (not with double backward, e.g. wgan_gp)
    # NaN/inf guard: "step" checks every loss at once (a host-device sync per update: exact step in the
    # error), "log" checks the logged averages (no sync inside the step: the GPU choice).
    nan_check: str = "step"
    dist_backend: str = "auto"  # several processes: auto = nccl on CUDA, gloo on CPU
    grad_clip: Optional[float] = 1.0  # max global grad norm per optimiser; null disables
    warmup_steps: int = 0  # linear LR warm-up from 0 over this many steps
    # start a new run with some of the lab's submodules taken from another run (e.g. the ldm's trained autoencoder):
    init_from: Optional[str] = None  # a run folder or checkpoint
    init_modules: list[str] = dataclasses.field(default_factory=list)  # names of submodules (``lab.<name>``) to take
    lr_decay_steps: Optional[int] = None  # cosine decay of the LR to 0 over this many steps (e.g. = steps); null: none
    ema_decay: float = 0.999  # 0 disables the EMA copy
    ema_start: int = 0  # steps before the EMA starts tracking (copies weights until then)
    ema_warmup: bool = False  # EMA decay d_t = min(ema_decay, (1 + t) / (10 + t)), t = averaging updates so far
                              # (TF ExponentialMovingAverage's num_updates); false: the constant ema_decay
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # how many step_*.pt files to keep beside last.pt
    log_every: int = 10  # metrics.jsonl rows (averaged over the interval)
    sample_every: int = 500  # sample grids (0 disables; a final grid is always written)
    sample_seed: int = 0  # the same seed at every grid so progress is comparable
    num_sample_prompts: int = 8
    samples_per_prompt: int = 4
    # the grids' sampling options, {} = the model's defaults (Lab.SampleOptions: one home, the model config)
    sample_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_workers: int = 0
    # Keep an in-memory dataset's uint8 images and labels on the device and cut each batch there (conversion to
    # [-1, 1] and flips too): no worker processes, no per-step copy. The same batches as the loader; a dataset
    # that cannot (not in memory, or over a quarter of the GPU's free memory) uses the loader, with a warning.
    data_on_device: bool = False
    tensorboard: bool = False
    progress: bool = True  # progress bar on stderr

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every",
                  "num_sample_prompts", "samples_per_prompt")
        _non_negative(self, "warmup_steps", "ema_start", "sample_every", "num_workers")
        for name, choices in (("precision", ("fp32", "bf16", "fp16")), ("batch_scope", ("global", "per_process")),
                              ("nan_check", ("step", "log")), ("dist_backend", ("auto", "gloo", "nccl"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"trainer.{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be in [0, 1), got {self.ema_decay}")
        if bool(self.init_from) != bool(self.init_modules):
            raise ValueError("trainer.init_from and trainer.init_modules go together: the run (or checkpoint) to take "
                             f"weights from and the submodules to take (got {self.init_from!r} and {list(self.init_modules)})")
        for name in ("max_images", "max_seconds", "lr_decay_steps"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"trainer.{name} must be positive or null, got {getattr(self, name)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"trainer.grad_clip must be positive or null, got {self.grad_clip}")
        if self.device not in ("auto", "cpu", "mps") and not self.device.startswith("cuda"):
            raise ValueError(f"trainer.device must be auto, cpu, mps or cuda[:N], got {self.device!r}")


def register_schemas() -> None:
    """Make ``trainer: default`` in ``conf/train.yaml`` the typed :class:`TrainerConfig`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="trainer", name="default", node=TrainerConfig)


register_schemas()

MODEL_SCHEMAS = "schema/model"  # ConfigStore group of the families' Config dataclasses (conf/model/*.yaml extend them)


def model_family(config_name: str, overrides: list[str] | None = None) -> str | None:
    """The family a composition of ``conf/<config_name>.yaml`` with ``overrides`` uses: the last ``model=<name>``
    override, else the one its defaults list names (None: it composes no ``model`` group)."""
    path = files(CONFIG_MODULE) / f"{config_name}.yaml"
    if not path.is_file():
        return None
    defaults = OmegaConf.load(str(path)).get("defaults") or []
    named = [entry.model for entry in defaults if isinstance(entry, DictConfig) and "model" in entry]
    if not named:
        return None
    for override in overrides or []:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "model":
            named.append(value)
    return str(named[-1])


@functools.cache  # once per family and process
def register_model_schema(family: str | None) -> None:
    """Store the ``Config`` dataclass of the built-in family ``family`` in Hydra's ConfigStore as
    ``schema/model/<family>``: the schema and every default of ``conf/model/<family>.yaml``, whose defaults list
    starts with it. A name that is not a built-in family stores nothing (composing it then fails with Hydra's
    list of the families, or finds a user's own ``conf/model`` file).

    Called before composing a config with a ``model`` group (:func:`compose`, the ``genlab`` command), not at
    import, and for the one family composed: it imports that lab, and so torch (~2 s), which a command refusing
    a bad input (``model=nope``) or one that only loads a checkpoint (``sample``, ``serve``, ``eval``) does not need."""
    families = {name: target for target, name in registry.BUILTIN_LABS.items()}
    if family not in families:
        return
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=MODEL_SCHEMAS, name=family, node=registry.lab_class(families[family]).Config)


def saved_model_config(model: dict[str, Any]) -> dict[str, Any]:
    """The ``model`` section of a checkpoint's config, with each key it predates set to what the key's absence
    meant when it was saved: the schema's ``SAVED_WITHOUT`` (e.g. ``VAEConfig.prior``: a run saved before the
    option had the standard prior, whatever the default is now), nested schemas included. A config saved since
    holds every key (the validated config is saved), so this changes only older ones. A lab genlab does not know
    is left as it is: building it refuses it."""
    try:
        schema = registry.lab_class(model.get("_target_"))
    except ConfigError:
        return model
    return _fill_absent(model, schema.Config)


def _fill_absent(section: dict[str, Any], schema: type) -> dict[str, Any]:
    """``section`` with ``schema.SAVED_WITHOUT``'s keys ("unet.coord_channels": a key of a nested section) that it
    lacks set, then the same in each nested schema's section."""
    for dotted, value in getattr(schema, "SAVED_WITHOUT", {}).items():
        *parents, key = dotted.split(".")
        node = section
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict) and key not in node:
            node[key] = value
    for name, hint in get_type_hints(schema).items():
        if dataclasses.is_dataclass(hint) and isinstance(section.get(name), dict):
            _fill_absent(section[name], hint)
    return section


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(obj, name)}")


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(obj, name)}")


def validate(cfg: DictConfig) -> DictConfig:
    """Type-check and range-check a composed training config; returns it with defaults filled."""
    # Imported here, not at the top, for speed only (no cycle: lab_utils.core.data imports lab_utils.core.schema, not
    # this module): lab_utils.core.data imports torch (~3 s), and the CLI composes and refuses configs without it.
    from lab_utils.core.data import dataset_class

    out = cfg.copy()
    OmegaConf.set_struct(out, False)
    if "trainer" in out:
        out.trainer = check_section(out.trainer, TrainerConfig, "trainer")
    if "data" in out:
        out.data = check_section(out.data, dataset_class(out.data.get("name")).Config, "data")
    if "model" in out:
        out.model = check_section(out.model, registry.lab_class(out.model.get("_target_")).Config, "model")
    if "seed" in out and not isinstance(out.seed, int):
        raise ConfigError(f"`seed` must be an integer, got {out.seed!r}")
    OmegaConf.set_struct(out, True)
    return out


def parse_overrides(overrides: list[str]) -> list:
    """Hydra's own parse of ``key=value`` command-line overrides (``+key``, ``~key``, lists, quoting)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def compose(overrides: list[str] | None = None, config_name: str = "train", check: bool = True) -> DictConfig:
    """Compose a config the way the ``genlab`` command does (for notebooks and tests).

    >>> cfg = compose(["model=ddpm", "data=shapes", "preset=smoke"])
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    register_model_schema(model_family(config_name, overrides))
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    return validate(cfg) if check else cfg
