"""The contract between a model family and the model-agnostic harness.

A family (``labs/<family>/``) subclasses :class:`Lab`. The trainer only ever calls the
methods defined here, so a GAN with two optimisers and several critic steps, a VAE and a
diffusion model all train through the same loop without special cases:

- ``configure_optimizers()`` returns *named* optimisers (``{"model": ...}`` or
  ``{"generator": ..., "critic": ...}``);
- ``training_step(batch, ctx)`` does one step of the family's algorithm. It calls
  ``ctx.optimize(name, loss_fn)`` once per parameter update, where ``loss_fn()`` computes the
  loss (the trainer runs it under its precision and, with several processes, inside
  DistributedDataParallel's forward; backward, gradient clipping, optimiser and LR-schedule
  step are the trainer's job), and ``ctx.next_batch()`` when it needs fresh data for another
  update (critic steps). It returns named scalar losses for logging;
- ``ema_modules()`` names the submodules whose exponential moving average is kept and used
  for sampling;
- ``sample(prompts, generator=..., options=...)`` returns images in [-1, 1]; ``options`` is an instance of the
  family's ``SampleOptions`` dataclass, the one home of its sampling options (see :class:`SampleOptions`).

A lab is rebuilt from a checkpoint alone: ``Lab(<its Config>, DataInfo)`` where both come from
the checkpoint (see ``lab_utils.harness.checkpoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import torch
from torch import nn

from lab_utils.core.schema import as_dataclass


@dataclass
class DataInfo:
    """What a model needs to know about its dataset, saved with every checkpoint.

    Plain Python types only, so it survives ``torch.load(weights_only=True)``.
    """

    name: str  # dataset name, e.g. "shapes"
    channels: int  # C of the (C, H, W) images
    image_size: int  # H == W
    attributes: dict[str, list[str]]  # attribute -> value names, e.g. {"colour": ["red", ...]}
    vocab: list[str]  # the tokenizer's vocabulary, special tokens first
    prompts: list[str] = field(default_factory=list)  # fixed prompts for sample grids

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "DataInfo":
        return cls(**state)


@dataclass
class Measurement:
    """What a lab that is not generative measures of itself on real test images (:meth:`Lab.measure`): a joint
    embedding's zero-shot accuracy and retrieval recall, say. ``genlab eval`` writes ``figures`` into eval.json and
    prints ``summary``."""

    figures: dict[str, Any]  # plain JSON types (numbers, strings, lists, dicts)
    summary: str  # one line for the terminal


# on_step(step, steps, estimate): after sampling step `step` of `steps`, the current estimate of the images
# (not the progress bar: that is lab_utils.harness.progress)
SamplingCallback = Callable[[int, int, torch.Tensor], None]


def option(default: Any = MISSING, *, help: str, min: float | None = None, max: float | None = None,
           choices: Sequence[str] | None = None) -> Any:
    """A field of a :class:`SampleOptions` dataclass that says all a command needs to know of the option: its
    ``default`` (where the dataclass holds it), one line of ``help``, and the values it takes: ``choices`` for a
    string, ``min`` and ``max`` for a number (None: no bound of its own; ``genlab serve`` then caps it with the
    ``serve.limits`` entry of its name, or refuses to start)."""
    metadata = {"help": help, "min": min, "max": max, "choices": None if choices is None else tuple(choices)}
    return field(default=default, metadata=metadata)


@dataclass
class SampleOptions:
    """The options ``Lab.sample`` takes besides the prompts and the generator; a family subclasses it with one
    :func:`option` field per option (its default, help, bounds or choices).

    This dataclass is the one home of a family's sampling options. The defaults are its fields' (the DDPM's and the
    flow's ``model.sampling`` section *is* one of these) or the model config's (the VAE's ``model.temperature``,
    read by ``Lab.sampling_defaults``), so the training grids, ``genlab sample``, ``genlab eval`` and
    ``genlab compare`` draw alike unless told otherwise. ``Lab.sample_options`` is the one parser of user-given
    names; building an instance checks every value against its field (``__post_init__``), and ``genlab serve``
    builds its request model, its bounds and ``GET /models`` from the fields. A new option is one field here (and
    the code that uses it): no command lists the names."""

    def __post_init__(self) -> None:
        for item in fields(self):
            setattr(self, item.name, checked_option(type(self), item, getattr(self, item.name)))


def option_kind(options: type, item: dataclasses.Field) -> type:
    """The type of a :class:`SampleOptions` field (int, float or str), from its annotation; a field not declared
    with :func:`option`, or of another type, is a TypeError naming it."""
    where = f"{options.__module__}.{options.__qualname__}.{item.name}"
    if "help" not in item.metadata:
        raise TypeError(f"the sampling option {where} is not declared with lab_utils.core.lab.option(...), so its "
                        "bounds are unknown")
    kind = _annotations(options)[item.name]
    if kind not in (int, float, str) or (kind is str) != (item.metadata["choices"] is not None):
        raise TypeError(f"the sampling option {where} must be an int or a float (with min/max) or a str with "
                        f"choices, got {kind}")
    return kind


@functools.cache
def _annotations(options: type) -> dict[str, Any]:
    return typing.get_type_hints(options)  # the dataclass's annotations, evaluated once per class


def checked_option(options: type, item: dataclasses.Field, value: Any) -> Any:
    """``value`` for the field ``item`` of ``options`` (an int field takes 3.0 as 3, a float field 3 as 3.0), or a
    ValueError naming the option and what it takes."""
    kind, meta, name = option_kind(options, item), item.metadata, item.name
    if kind is str:
        if value not in meta["choices"]:
            raise ValueError(f"sampling.{name} must be one of {list(meta['choices'])}, got {value!r}")
        return value
    low, high = meta["min"], meta["max"]
    what = ("an integer" if kind is int else "a finite number") + (
        f" in [{low:g}, {high:g}]" if low is not None and high is not None else
        f" >= {low:g}" if low is not None else f" <= {high:g}" if high is not None else "")
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or (kind is int and not float(value).is_integer()):
        raise ValueError(f"sampling.{name} must be {what}, got {value!r}")
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"sampling.{name} must be {what}, got {value!r}")
    return value


class StepContext(Protocol):
    """What the trainer hands to ``Lab.training_step`` (implemented in ``lab_utils.harness.trainer``)."""

    step: int  # number of completed training steps before this one
    device: torch.device

    def optimize(self, name: str, loss: Callable[[], Any]) -> Any:
        """Compute ``loss()`` (a 0-dim tensor, or a dict holding it under ``"loss"``), backward it,
        clip, step optimiser ``name`` and its LR schedule. Returns what ``loss()`` returned.
        """

    def next_batch(self) -> dict[str, Any]:
        """Another batch from the same data stream (already on ``device``)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context ``optimize`` runs loss functions in (for work outside them)."""


class Lab(nn.Module):
    """Base class of every model family. Subclasses set ``Config`` and implement the methods."""

    Config: ClassVar[type]  # the dataclass schema of ``cfg.model``
    SampleOptions: ClassVar[type[SampleOptions]] = SampleOptions  # what ``sample`` takes (no option by default)
    # DistributedDataParallel must look for parameters a loss did not use (a GAN's critic update leaves
    # the generator out). A family whose every update uses every parameter sets False: cheaper.
    ddp_find_unused_parameters: ClassVar[bool] = True
    # False: not a generative model (the evaluator, CLIP); its "samples" are blank images, and ``genlab eval`` reports
    # what :meth:`measure` returns instead of scoring samples
    generative: ClassVar[bool] = True

    def __init__(self, config: Any, data_info: DataInfo):
        super().__init__()
        # The typed config: ``build_lab`` hands over the ``Config`` instance it validated (used as is); a dict
        # or DictConfig (notebooks, tests) is checked and typed here, once.
        self.config = as_dataclass(type(self).Config, config)
        self.data_info = data_info

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """One step of the family's algorithm on ``batch`` (``image``, ``caption``): ``ctx.optimize(name, loss_fn)``
        once per parameter update (the context runs ``loss_fn`` under the run's precision and DDP, then
        backward, clipping, the optimiser and the harness's learning-rate schedule). Returns named scalars
        (tensors, kept on the device) for the logs:

        - a name without ``/`` is a loss: it is logged as ``loss/<name>``, shown in the progress line and the
          checkpoint summary, and checked by ``trainer.nan_check``;
        - a name with ``/`` (``critic/w_distance``, ``stats/kl_per_dim``) is logged as given: a statistic,
          not a loss;
        - the trainer adds ``grad_norm/<optimiser>`` from the context's clipping.
        """
        raise NotImplementedError

    def stages(self) -> dict[str, int]:
        """A family trained in stages within one run (the ldm: its autoencoder, then its DDPM): each stage before
        the last, by the step it ends at. ``genlab compare`` reports their time; ``genlab bench`` times the last."""
        return {}

    def ema_modules(self) -> list[str]:
        """Names of submodules (``self.<name>``) whose EMA weights are used for sampling."""
        return []

    def initial_modules(self) -> dict[str, str]:
        """Submodules a new run takes from another model before its first step, ``{dotted name: source}``, where a
        source is a run folder, a checkpoint or a shipped model's name: the harness copies in the source's submodule
        of the same last name (its EMA weights when it has them), e.g. CLIP's ``clip.text_encoder`` into a
        diffusion model's ``text_encoder``. A resumed run has them in its checkpoint already. None by default."""
        return {}

    def batches_per_step(self) -> int:
        """Batches one ``training_step`` draws (the one it is given and each ``ctx.next_batch()``): what a budget
        of training images (``trainer.max_images``, the images steps draw) is worth in steps."""
        return 1

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None,
               options: SampleOptions | None = None, **given: Any) -> torch.Tensor:
        """Images for ``prompts``, shape (len(prompts), C, H, W), values in [-1, 1]. ``options``: an instance of
        ``SampleOptions`` (None: the model's defaults); options given by keyword (``steps=10``) are parsed onto it by
        :meth:`sample_options`, so ``lab.sample(prompts, generator, steps=10)`` works too."""
        raise NotImplementedError

    def sample_with_progress(self, prompts: list[str], generator: torch.Generator | None = None,
                             on_step: SamplingCallback | None = None, every: int = 1,
                             options: SampleOptions | None = None, **given: Any) -> torch.Tensor:
        """Like :meth:`sample`, calling ``on_step(step, steps, estimate)`` along the way, where ``estimate`` is
        the current guess of the final images, (N, C, H, W) in [-1, 1]: every ``every`` steps and after the
        last one. A family that draws in one pass (GAN, VAE) reports that pass as its only step; a diffusion
        family reports its x0 estimates. ``on_step`` may raise to stop the sampling (a timeout, a client gone)."""
        images = self.sample(prompts, generator, options=options, **given)
        if on_step is not None:
            on_step(1, 1, images)
        return images

    def sampling_defaults(self) -> SampleOptions:
        """The options ``sample`` uses when given none, from their one home: the ``SampleOptions`` fields' own
        defaults here; a family whose defaults live in its model config overrides it (the DDPM returns its
        ``config.sampling``, the VAE builds one from ``config.temperature``)."""
        return self.SampleOptions()

    def sample_options(self, given: Mapping[str, Any] | None = None,
                       options: SampleOptions | None = None) -> SampleOptions:
        """The one parser of user-given option names (``genlab sample steps=10``, ``eval.sample_options``, a request
        to ``genlab serve``, ``trainer.sample_options``, keywords of ``sample``): ``options`` (None: the model's
        :meth:`sampling_defaults`) with each value of ``given`` that is set (None = left as it is), checked by the
        dataclass. A name this family does not take is a ValueError that lists the ones it does; a value out of
        its field's bounds is a ValueError naming it."""
        names = [item.name for item in fields(self.SampleOptions)]
        given = {str(key): value for key, value in dict(given or {}).items() if value is not None}
        unknown = [key for key in given if key not in names]
        if unknown:
            raise ValueError(f"{type(self).__name__}.sample does not take option(s) {unknown}; it takes "
                             f"{', '.join(names) if names else 'no options'}")
        options = self.sampling_defaults() if options is None else options
        if not isinstance(options, self.SampleOptions):
            raise TypeError(f"{type(self).__name__}.sample takes options=<{self.SampleOptions.__name__}> (from "
                            f"lab.sample_options({{...}})) or keywords, got {type(options).__name__}")
        return dataclasses.replace(options, **given) if given else options

    def measure(self, test_set: Any, num_items: int, seed: int, batch_size: int) -> Measurement | None:
        """What a lab that is not generative learnt, measured on ``num_items`` real items of ``test_set`` (a
        ``CaptionedDataset``: images, captions, labels) chosen with ``seed``: a joint embedding's zero-shot
        classification and retrieval. None (the default): nothing of its own; a generative lab is measured by its
        samples (``genlab eval``), the evaluator by its test accuracy."""
        return None

    def compile_blocker(self) -> str | None:
        """Why ``torch.compile`` cannot train this lab as configured (None: it can)."""
        return None

    def compile_modules(self) -> list[str]:
        """The submodules ``trainer.compile`` compiles (default: every child with parameters). A lab leaves out one
        that torch.compile cannot train, e.g. a network its loss differentiates twice; it stays eager."""
        return [name for name, child in self.named_children() if any(True for _ in child.parameters())]

    def benchmark_samplers(self) -> dict[str, dict[str, Any]]:
        """The sampling settings ``genlab bench`` times: ``{name: keyword options for sample()}``."""
        return {"default": {}}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def adam(params: Any, *, decoupled: bool = True, **options: Any) -> torch.optim.Optimizer:
    """AdamW (``decoupled``) or Adam in its fastest implementation for the parameters' device.

    ``fused=True`` runs the whole update as one kernel per parameter group (CUDA, and CPU since
    torch 2.4): measured on 2 CPU cores for the 1.5M-parameter UNet of ``preset=cpu``, 7.7 ms per
    step against 38 ms for the default per-tensor loop and 33 ms for ``foreach``. Where torch has no
    fused kernel for the device, ``foreach`` (multi-tensor ops) is the fallback. The mathematics is
    the same in all three (torch's own tests hold them to each other)."""
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    params = list(params)
    try:
        return kind(params, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
        return kind(params, foreach=True, **options)
