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
- ``sample(prompts, generator=..., **options)`` returns images in [-1, 1].

A lab is rebuilt from a checkpoint alone: ``Lab(<its Config>, DataInfo)`` where both come from
the checkpoint (see ``lab_utils.harness.checkpoint``).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping, Protocol

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


# progress(step, steps, estimate): after sampling step `step` of `steps`, the current estimate of the images
Progress = Callable[[int, int, torch.Tensor], None]


@dataclass
class SampleOptions:
    """The options ``Lab.sample`` takes besides the prompts and the generator; a family subclasses it.

    Each field defaults to None, which means the model's configured default: the default itself has one
    home, the model's config (``model.sampling`` of the DDPM, ``model.temperature`` of the VAE), so the
    training grids, ``genlab sample``, ``genlab eval`` and ``genlab compare`` draw alike unless told
    otherwise. The commands read the option names from here (``Lab.sample_options``), never a list of
    their own."""


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
    SampleOptions: ClassVar[type[SampleOptions]] = SampleOptions  # what ``sample`` takes (none by default)
    # DistributedDataParallel must look for parameters a loss did not use (a GAN's critic update leaves
    # the generator out). A family whose every update uses every parameter sets False: cheaper.
    ddp_find_unused_parameters: ClassVar[bool] = True

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

    def batches_per_step(self) -> int:
        """Batches one ``training_step`` draws (the one it is given and each ``ctx.next_batch()``): what a budget
        of training images (``trainer.max_images``, the images steps draw) is worth in steps."""
        return 1

    @torch.no_grad()
    def sample(
        self, prompts: list[str], generator: torch.Generator | None = None, **options: Any
    ) -> torch.Tensor:
        """Images for ``prompts``, shape (len(prompts), C, H, W), values in [-1, 1]."""
        raise NotImplementedError

    def sample_with_progress(self, prompts: list[str], generator: torch.Generator | None = None,
                             progress: Progress | None = None, every: int = 1, **options: Any) -> torch.Tensor:
        """Like :meth:`sample`, calling ``progress(step, steps, estimate)`` along the way, where ``estimate`` is
        the current guess of the final images, (N, C, H, W) in [-1, 1]: every ``every`` steps and after the
        last one. A family that draws in one pass (GAN, VAE) reports that pass as its only step; a diffusion
        family reports its x0 estimates. ``progress`` may raise to stop the sampling (a timeout, a client gone)."""
        images = self.sample(prompts, generator, **options)
        if progress is not None:
            progress(1, 1, images)
        return images

    def sampling_defaults(self) -> dict[str, Any]:
        """The values the ``SampleOptions`` fields take when left out (the model's config: their one home)."""
        return {}

    @classmethod
    def sample_options(cls, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The options of ``options`` that are set (None = the model's default), as keyword arguments for
        ``sample``. A name this family does not take is a ValueError that lists the ones it does."""
        names = [f.name for f in fields(cls.SampleOptions)]
        given = {str(key): value for key, value in dict(options or {}).items() if value is not None}
        unknown = [key for key in given if key not in names]
        if unknown:
            raise ValueError(f"{cls.__name__}.sample does not take option(s) {unknown}; it takes "
                             f"{', '.join(names) if names else 'no options'}")
        chosen = asdict(cls.SampleOptions(**given))
        return {key: value for key, value in chosen.items() if value is not None}

    def compile_blocker(self) -> str | None:
        """Why ``torch.compile`` cannot train this lab as configured (None: it can)."""
        return None

    def compile_modules(self) -> list[str]:
        """The submodules ``trainer.compile`` compiles (default: every child with parameters). A lab leaves out one
        that torch.compile cannot train, e.g. a network its loss differentiates twice; it stays eager."""
        return [name for name, child in self.named_children() if any(True for _ in child.parameters())]

    def benchmark_samplers(self) -> dict[str, dict[str, Any]]:
        """The sampling settings ``genlab bench`` times: ``{name: options for sample()}``."""
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
