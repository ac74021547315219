r"""The flow family: config, flow-matching objective and sampling pipeline.

Training (Liu et al. 2022, "Flow Straight and Fast", eq. 1; Lipman et al. 2023, "Flow Matching", eq. 23;
Esser et al. 2024, Stable Diffusion 3's objective, eq. 2-3 with the logit-normal times of sec. 3.1):

$L = \mathbb E_{x_0, c, t, \epsilon}\,\lVert v_\theta\big((1 - t)\,x_0 + t\,\epsilon,\ t,\ c\big) - (\epsilon - x_0)\rVert^2$,

where the caption $c$ is replaced by the empty prompt with probability ``p_uncond`` (Ho & Salimans 2022),
so that one network learns both $v_\theta(x_t, c)$ and $v_\theta(x_t, \varnothing)$ for classifier-free guidance.
The network is the diffusion lab's UNet, with the text encoder shared by every lab; it sees the time as
``time_scale`` $\cdot\,t$, the DDPM's range of levels (0 ... 1000), so its sinusoidal embedding means the same.

Sampling (``FlowLab.generate``) encodes the prompts once, then integrates $dx/dt = v$ from $t = 1$ to $t = 0$
with Euler or Heun steps (``sampling.py``) inside the diffusion lab's one sampling loop, whose ``denoise``
evaluates the UNet on the conditional and the unconditional batch together and combines the velocities with
classifier-free guidance (linear in the prediction, so the same formula as for $\epsilon$).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from lab_utils.core.lab import DataInfo, Lab, SampleOptions, SamplingCallback, StepContext, adam, option
from labs.diffusion.sampling import SamplerOutput, classifier_free_guidance, sample_levels, start_noise
from labs.diffusion.scheduler import SchedulerStep
from labs.diffusion.unet import UNet, UNetConfig
from labs.text_encoder import TextEncoder, TextEncoderConfig, TextEncoding, Tokenizer, encode_prompts

from .path import add_noise, sample_times, time_grid, velocity
from .sampling import SAMPLER_STEPS, evaluations

TIME_DISTRIBUTIONS = ("logit_normal", "uniform")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class FlowSampleOptions(SampleOptions):
    """How ``FlowLab.sample`` draws: the model config's ``sampling`` section (its defaults, overridden by a preset)
    and what ``sample`` takes (``genlab sample sampler=... steps=... guidance=...``). Each field's help and bounds
    are what the commands check and ``genlab serve`` offers."""

    sampler: str = option("euler", choices=sorted(SAMPLER_STEPS),
                          help="euler (1 evaluation per step) | heun (2nd order, 2 per step but the last)")
    steps: int = option(25, min=1, help="ODE steps from t = 1 to t = 0; NFE = steps (Heun 2 steps - 1), x2 with "
                                        "guidance")
    guidance: float = option(3.0, min=0.0, help="classifier-free guidance scale w (diffusers' guidance_scale); "
                                                "1 = no guidance")


@dataclass
class FlowConfig:
    """Schema and defaults of ``model=flow`` (the one home of its values; ``conf/model/flow.yaml`` only names it):
    SD3's training times (logit-normal, m = 0, s = 1, no shift) at the DDPM's middle size. The presets
    (``conf/preset_model/flow_{smoke,cpu,gpu}.yaml``) change the size."""

    _target_: str = "labs.flow.FlowLab"
    name: str = "flow"
    # v_theta(x_t, t, c): the diffusion lab's UNet at the DDPM's size, with x, y input channels (CoordConv) as the DDPM
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(coord_channels=True))
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(dim=64, depth=2, heads=4))  # the DDPM's
    sampling: FlowSampleOptions = field(default_factory=FlowSampleOptions)  # defaults of sample()
    # probability of replacing a caption by "" during training (Ho & Salimans sec. 3.2; they use 0.1-0.2)
    p_uncond: float = 0.1
    time_sampling: str = "logit_normal"  # training times: logit_normal (SD3 sec. 3.1) | uniform (Liu et al.)
    logit_mean: float = 0.0  # m of t = sigmoid(n), n ~ N(m, s^2); SD3 uses 0
    logit_std: float = 1.0  # s of the same; SD3 uses 1
    # SD3's resolution shift t' = a t / (1 + (a - 1) t) of training times and sampling grid (a = 3 at 1024 px);
    # 1 = off, at 32 px
    time_shift: float = 1.0
    time_scale: float = 1000.0  # the UNet sees time_scale * t: the DDPM's 0 ... T range for its sinusoidal embedding
    lr: float = 1e-3  # AdamW learning rate, as the DDPM
    text_lr: Optional[float] = None  # the text encoder's own learning rate; null = lr (see configure_optimizers)
    # A CLIP run folder, checkpoint or shipped model (`clip`) whose text encoder this model conditions on, frozen, as
    # Stable Diffusion conditions on CLIP's (README, "Joint embedding (CLIP)"); its model.text must be this one's.
    # null: the text encoder is learnt with the rest, from scratch
    text_from: Optional[str] = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    weight_decay: float = 0.0  # AdamW decoupled weight decay

    def __post_init__(self) -> None:
        if not _finite(self.p_uncond) or not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if self.time_sampling not in TIME_DISTRIBUTIONS:
            raise ValueError(f"time_sampling must be one of {list(TIME_DISTRIBUTIONS)}, got {self.time_sampling!r}")
        if not _finite(self.logit_mean):
            raise ValueError(f"logit_mean must be a finite number, got {self.logit_mean}")
        if not _finite(self.logit_std) or self.logit_std <= 0:
            raise ValueError(f"logit_std must be a finite positive number, got {self.logit_std}")
        if not _finite(self.time_shift) or self.time_shift <= 0:
            raise ValueError(f"time_shift must be a finite positive number (1 = no shift), got {self.time_shift}")
        if not _finite(self.time_scale) or self.time_scale <= 0:
            raise ValueError(f"time_scale must be a finite positive number, got {self.time_scale}")
        if not _finite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.text_lr is not None and (not _finite(self.text_lr) or self.text_lr <= 0):
            raise ValueError(f"text_lr must be positive or null (= lr), got {self.text_lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


def flow_matching_loss(model: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], x0: torch.Tensor,
                       t: torch.Tensor, eps: torch.Tensor, cond: Any) -> torch.Tensor:
    r"""The flow-matching loss for given times and noise, a 0-dim float32 tensor (Lipman et al. eq. 23, Liu et al.
    eq. 1, Esser et al. eq. 2-3):

    $\frac1B\sum_b \frac1P\lVert v_\theta\big((1 - t_b)\,x_{0,b} + t_b\,\epsilon_b,\ t_b,\ c_b\big) - (\epsilon_b - x_{0,b})\rVert^2$.

    x0, eps: (B, C, H, W); t: (B,) float in [0, 1]; ``model(xt, t, cond)`` is the velocity network (``FlowLab``
    itself takes the prompts as ``cond``). Draws nothing at random: ``FlowLab.loss`` samples t, eps and the dropout."""
    xt = add_noise(x0, eps, t)  # x_t = (1 - t) x0 + t eps
    target = velocity(x0, eps)  # v = eps - x0
    prediction = model(xt, t, cond)  # v_theta(x_t, t, c)
    return F.mse_loss(prediction.float(), target.float())


class FlowLab(Lab):
    """A text-conditioned rectified flow: a text encoder and a UNet that predicts the velocity eps - x0."""

    Config = FlowConfig
    SampleOptions = FlowSampleOptions
    ddp_find_unused_parameters = False  # every update uses every parameter

    def __init__(self, config: FlowConfig | Any, data_info: DataInfo):
        super().__init__(config, data_info)
        config = self.config  # the typed config (Lab.__init__)
        if data_info.image_size % config.unet.patch_size:
            raise ValueError(f"unet.patch_size={config.unet.patch_size} does not divide the image size "
                             f"{data_info.image_size}; choose a divisor (1 = plain pixels)")
        self.tokenizer = Tokenizer(data_info.vocab, max_length=config.text.max_length)
        self.text_encoder = TextEncoder(config.text, self.tokenizer.vocab_size)
        if config.text_from:  # the harness loads its weights at the start of a run (initial_modules)
            self.text_encoder.freeze()
        self.unet = UNet(config.unet, data_info.channels, cond_dim=config.text.dim)
        self.image_shape = (data_info.channels, data_info.image_size, data_info.image_size)

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self.config.text_from:  # a frozen text encoder: the UNet alone learns
            groups = [{"params": list(self.unet.parameters())}]
        elif self.config.text_lr is None:  # one group, as runs saved before the option have
            groups = [{"params": list(self.parameters())}]
        else:
            groups = [{"params": list(self.unet.parameters())},
                      {"params": list(self.text_encoder.parameters()), "lr": self.config.text_lr}]
        return {"model": adam(groups, lr=self.config.lr, betas=tuple(self.config.betas),
                              weight_decay=self.config.weight_decay)}

    def initial_modules(self) -> dict[str, str]:
        return {"text_encoder": self.config.text_from} if self.config.text_from else {}

    def ema_modules(self) -> list[str]:
        return ["unet", "text_encoder"]

    def encode_prompts(self, prompts: list[str]) -> TextEncoding:
        """Tokenize and encode prompts; "" is the unconditional prompt."""
        return encode_prompts(self.tokenizer, self.text_encoder, list(prompts), device=self.device)

    def velocity(self, xt: torch.Tensor, t: torch.Tensor, context: TextEncoding) -> torch.Tensor:
        r"""$v_\theta(x_t, t, c)$ for encoded prompts: the UNet at time ``time_scale * t``. t: (B,) in [0, 1]."""
        return self.unet(xt, t * self.config.time_scale, context)

    def forward(self, xt: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The predicted velocity for a batch of noisy images, their times (B,) in [0, 1] and their prompts."""
        return self.velocity(xt, t, self.encode_prompts(prompts))

    def loss(self, x0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """The flow-matching loss with condition dropout and the configured time distribution.

        Uses the global RNG (t, eps, dropout), which the trainer seeds and checkpoints."""
        cfg = self.config
        B = x0.shape[0]
        # condition dropout: c <- "" with probability p_uncond
        drop = torch.rand(B).lt(cfg.p_uncond).tolist()
        prompts = ["" if dropped else caption for caption, dropped in zip(captions, drop)]
        t = sample_times(B, cfg.time_sampling, cfg.logit_mean, cfg.logit_std, cfg.time_shift, device=x0.device)
        eps = torch.randn_like(x0)  # eps ~ N(0, I)
        return flow_matching_loss(self, x0, t, eps, prompts)

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        # Minimise || v_theta(x_t, t, c) - (eps - x0) ||^2 over the UNet and the text encoder together
        loss = ctx.optimize("model", lambda: self.loss(batch["image"], list(batch["caption"])))
        return {"loss": loss.detach()}

    def benchmark_samplers(self) -> dict[str, dict[str, Any]]:
        """Euler at 25 steps against Heun at 13 (25 evaluations each, both with the configured guidance)."""
        return {"euler-25": {"sampler": "euler", "steps": 25}, "heun-13": {"sampler": "heun", "steps": 13}}

    # ------------------------------------------------------------------ sampling
    def sampling_defaults(self) -> FlowSampleOptions:
        return self.config.sampling

    def nfe(self, options: FlowSampleOptions | None = None, **given: Any) -> int:
        """Network evaluations per image: Euler ``steps``, Heun ``2 steps - 1``; twice that with guidance (w not 0
        or 1)."""
        options = self.sample_options(given, options)
        return evaluations(options.sampler, options.steps) * (1 if options.guidance in (0.0, 1.0) else 2)

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator | None = None,
                 options: FlowSampleOptions | None = None, *, return_intermediates: bool = False,
                 on_step: SamplingCallback | None = None, every: int = 1, **given: Any) -> SamplerOutput:
        """The pipeline: encode the prompts, then integrate dx/dt = v from t = 1 to 0 with classifier-free guidance.

        ``options`` (None: the config's ``sampling``), with any option given by keyword on top (``steps=10``).
        Randomness comes from ``generator`` only (x_1; a fresh, randomly seeded one if None). ``on_step(i, steps,
        x0)``, if given, sees the x0 estimate x_t - t v every ``every`` steps and after the last."""
        options = self.sample_options(given, options)
        if generator is None:
            generator = torch.Generator()
            generator.seed()  # seeds this generator only, not the global RNG
        prompts = list(prompts)
        N, w = len(prompts), options.guidance
        if w == 1.0:
            context = self.encode_prompts(prompts)  # conditional model only
        elif w == 0.0:
            context = self.encode_prompts([""] * N)  # unconditional model only
        else:
            context = self.encode_prompts(prompts + [""] * N)  # [c; empty]: (2N, L, D), one text-encoder pass

        def denoise(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if w in (0.0, 1.0):
                return self.velocity(xt, t, context)  # (N, C, H, W)
            both = self.velocity(torch.cat([xt, xt]), torch.cat([t, t]), context)  # (2N, C, H, W)
            v_cond, v_uncond = both.chunk(2)  # 2 x (N, C, H, W)
            return classifier_free_guidance(v_uncond, v_cond, w)

        def report(i: int, step: SchedulerStep) -> None:
            if i % every == 0 or i == options.steps:
                on_step(i, options.steps, step.pred_x0)

        x1 = start_noise((N, *self.image_shape), generator, self.device)  # x_1 ~ N(0, I)
        return sample_levels(denoise, time_grid(options.steps, self.config.time_shift), x1,
                             SAMPLER_STEPS[options.sampler], generator, nfe_per_call=1 if w in (0.0, 1.0) else 2,
                             clip_range=1.0, return_intermediates=return_intermediates,
                             callback=report if on_step else None)

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None,
               options: FlowSampleOptions | None = None, **given: Any) -> torch.Tensor:
        """Images for ``prompts``, (N, C, H, W) in [-1, 1]; ``options`` None: the config's ``sampling``."""
        return self.generate(prompts, generator, options, **given).images

    @torch.no_grad()
    def sample_with_progress(self, prompts: list[str], generator: torch.Generator | None = None,
                             on_step: SamplingCallback | None = None, every: int = 1,
                             options: FlowSampleOptions | None = None, **given: Any) -> torch.Tensor:
        """:meth:`sample`, reporting the x0 estimate (clamped to [-1, 1]) every ``every`` steps: the same images."""
        def report(i: int, steps: int, x0: torch.Tensor) -> None:
            on_step(i, steps, x0.clamp(-1, 1))

        return self.generate(prompts, generator, options, on_step=report if on_step else None, every=every,
                             **given).images

    def sample_trajectory(self, prompts: list[str], generator: torch.Generator | None = None,
                          options: FlowSampleOptions | None = None, **given: Any) -> SamplerOutput:
        """Like :meth:`sample`, keeping x_t and the x0 estimate after every step (for the notebook strips)."""
        return self.generate(prompts, generator, options, return_intermediates=True, **given)

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts of the UNet, the text encoder and the total."""
        unet = sum(p.numel() for p in self.unet.parameters())
        text = sum(p.numel() for p in self.text_encoder.parameters())
        return {"unet": unet, "text_encoder": text, "total": unet + text}
