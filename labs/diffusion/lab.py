r"""The diffusion family: config, training objective and sampling pipeline.

Training (Ho et al. 2020, Algorithm 1, with the text conditioning of Ho & Salimans 2022):

$L_\text{simple} = \mathbb E_{x_0, c, t, \epsilon}\,\lVert \epsilon - \epsilon_\theta(\sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\epsilon,\ t,\ c)\rVert^2$
(Ho et al. eq. 14), where the caption $c$ is replaced by the empty prompt with probability
``p_uncond`` so that one network learns both $\epsilon_\theta(x_t, c)$ and $\epsilon_\theta(x_t, \varnothing)$.
With ``prediction_type = v`` the target is $v$ instead, and ``min_snr_gamma`` weights each
sample by $\min(\mathrm{SNR}_t, \gamma)/\mathrm{SNR}_t$ (eps) or $\min(\mathrm{SNR}_t, \gamma)/(\mathrm{SNR}_t + 1)$ (v),
Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting", eq. 8-9.

Sampling (``DiffusionLab.generate``) encodes the prompts once, then runs a DDPM or DDIM
loop (``sampling.py``) whose ``denoise`` evaluates the UNet on the conditional and the
unconditional batch together and combines them with classifier-free guidance. Its options
(sampler, steps, guidance, eta) are one dataclass, ``DiffusionSampleOptions``: the model
config's ``sampling`` section and what ``sample`` takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F

from lab_utils.core.lab import DataInfo, Lab, SampleOptions, SamplingCallback, StepContext, adam, option
from labs.text_encoder import TextEncoder, TextEncoderConfig, TextEncoding, Tokenizer, encode_prompts

from .sampling import SAMPLERS, SamplerOutput, classifier_free_guidance, sample_loop
from .scheduler import NoiseScheduler, SchedulerConfig, SchedulerStep
from .unet import UNet, UNetConfig


@dataclass
class DiffusionSampleOptions(SampleOptions):
    """How ``DiffusionLab.sample`` draws: the model config's ``sampling`` section (its defaults, overridden by a
    preset) and what ``sample`` takes (``genlab sample sampler=... steps=... guidance=... eta=...``). Each field's
    help and bounds are what the commands check and ``genlab serve`` offers."""

    sampler: str = option("ddim", choices=sorted(SAMPLERS), help="ddpm (ancestral, Ho et al.) | ddim (Song et al.)")
    # DDIM at 50 steps ~ DDPM at 1000 (Song et al. table 1)
    steps: int = option(50, min=1, help="noise levels visited (<= scheduler.num_train_timesteps); NFE = steps, "
                                        "x2 with guidance")
    guidance: float = option(3.0, min=0.0, help="classifier-free guidance scale w (diffusers' guidance_scale); "
                                                "1 = no guidance")
    # eta in [0, 1] interpolates DDIM and DDPM (Song et al. eq. 16); above 1 the step's variance would exceed
    # 1 - alpha_bar_s
    eta: float = option(0.0, min=0.0, max=1.0, help="DDIM stochasticity: 0 = deterministic, 1 = DDPM-like")


@dataclass
class DDPMConfig:
    """Schema and defaults of ``model=ddpm`` (the one home of its values; ``conf/model/ddpm.yaml`` only names it):
    Ho et al.'s textbook setup (eps target, plain MSE) at a middle size. The presets
    (``conf/preset_model/ddpm_{smoke,cpu,gpu}.yaml``) change the size, the target and the loss weighting."""

    _target_: str = "labs.diffusion.DiffusionLab"
    name: str = "ddpm"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # the UNet of UNetConfig, with x, y input channels (CoordConv): how else would "at the top left" be learnt?
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(coord_channels=True))
    # captions have < 12 words from a ~40-word vocabulary: a small encoder suffices
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(dim=64, depth=2, heads=4))
    sampling: DiffusionSampleOptions = field(default_factory=DiffusionSampleOptions)  # defaults of sample()
    # probability of replacing a caption by "" during training (Ho & Salimans sec. 3.2; they use 0.1-0.2)
    p_uncond: float = 0.1
    # 5.0 = min-SNR loss weighting (Hang et al. 2023; preset=cpu/gpu use it); null = plain MSE
    min_snr_gamma: Optional[float] = None
    # The training noise levels: uniform over t (Ho et al.), or log SNR ~ N(log_snr_mean, log_snr_std^2) mapped to the
    # nearest level (EDM's log-normal sigma is log SNR ~ N(2.4, 2.4^2); rectified flow's logit-normal t (SD3) is
    # log SNR ~ N(0, 2^2) on its own path). See conf/preset_model/ddpm_cpu.yaml for what it buys.
    timestep_sampling: str = "uniform"  # uniform | log_snr_normal
    # Weight each sample so that x0 errors cost what rectified flow's velocity loss makes them cost, (1 + sqrt(SNR))^2
    # (Kingma & Gao 2023's view: an objective is a noise-level density times a weighting); false: the target's MSE.
    flow_weighting: bool = False
    log_snr_mean: float = 0.0
    log_snr_std: float = 2.0
    lr: float = 1e-3  # AdamW learning rate; small UNets tolerate 1e-3 with warm-up and grad clipping
    text_lr: Optional[float] = None  # the text encoder's own learning rate; null = lr (see configure_optimizers)
    # A CLIP run folder, checkpoint or shipped model (`clip`) whose text encoder this model conditions on, frozen, as
    # Stable Diffusion conditions on CLIP's (README, "Joint embedding (CLIP)"); its model.text must be this one's.
    # null: the text encoder is learnt with the rest, from scratch
    text_from: Optional[str] = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    # What a key meant in a config saved before it existed (lab_utils.core.config.saved_model_config fills it in):
    # runs saved before the option had no coordinate channels, so their checkpoints load unchanged.
    SAVED_WITHOUT: ClassVar[dict[str, Any]] = {"unet.coord_channels": False}

    def __post_init__(self) -> None:
        if self.scheduler.num_train_timesteps < self.sampling.steps:
            raise ValueError(f"sampling.steps={self.sampling.steps} exceeds "
                             f"scheduler.num_train_timesteps={self.scheduler.num_train_timesteps}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive or null, got {self.min_snr_gamma}")
        if self.timestep_sampling not in ("uniform", "log_snr_normal"):
            raise ValueError(f"timestep_sampling must be 'uniform' or 'log_snr_normal', got {self.timestep_sampling!r}")
        if not math.isfinite(self.log_snr_mean) or not (self.log_snr_std > 0 and math.isfinite(self.log_snr_std)):
            raise ValueError(f"log_snr_mean must be finite and log_snr_std positive, got {self.log_snr_mean}, "
                             f"{self.log_snr_std}")
        if self.flow_weighting and self.min_snr_gamma is not None:
            raise ValueError("flow_weighting and min_snr_gamma are two loss weightings: set one (the other to false/null)")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.text_lr is not None and self.text_lr <= 0:
            raise ValueError(f"text_lr must be positive or null (= lr), got {self.text_lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


def diffusion_loss(eps_model: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], scheduler: NoiseScheduler,
                   x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond: Any,
                   min_snr_gamma: Optional[float] = None, flow_weighting: bool = False) -> torch.Tensor:
    r"""The simple loss (Ho et al. eq. 14) for given noise levels and noise, a 0-dim float32 tensor:

    $\frac1B\sum_b \frac1P\lVert \epsilon_b - \epsilon_\theta(\sqrt{\bar\alpha_{t_b}}x_{0,b}
    + \sqrt{1-\bar\alpha_{t_b}}\epsilon_b,\ t_b,\ c_b)\rVert^2$ (the target is $v$ with ``prediction_type = v``),
    each sample weighted by min-SNR (Hang et al. eq. 8-9) if ``min_snr_gamma`` is set.

    x0, eps: (B, C, H, W); t: (B,) long; ``eps_model(xt, t, cond)`` is the network (``DiffusionLab`` itself takes
    the prompts as ``cond``). Draws nothing at random: ``DiffusionLab.loss`` samples t, eps and the dropout."""
    xt = scheduler.add_noise(x0, eps, t)  # x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    target = scheduler.target(x0, eps, t)  # eps or v
    prediction = eps_model(xt, t, cond)  # eps_theta(x_t, t, c)
    mse = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if min_snr_gamma is not None:
        # min(SNR_t, gamma) in x0 terms, divided by the weight the target's MSE already gives x0 errors
        mse = mse * scheduler.snr(t).clamp(max=min_snr_gamma) / scheduler.x0_weight(t)
    if flow_weighting:  # (1 + sqrt(SNR))^2 in x0 terms: rectified flow's |v - (eps - x0)|^2 = |x0_hat - x0|^2 / t^2
        mse = mse * (1 + scheduler.snr(t).sqrt()) ** 2 / scheduler.x0_weight(t)
    return mse.mean()


class DiffusionLab(Lab):
    """A text-conditioned DDPM: a text encoder, a UNet and a noise scheduler."""

    Config = DDPMConfig
    SampleOptions = DiffusionSampleOptions
    ddp_find_unused_parameters = False  # every update uses every parameter

    def __init__(self, config: DDPMConfig | Any, data_info: DataInfo):
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
        self.scheduler = NoiseScheduler(config.scheduler)  # no parameters: not an nn.Module
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

    def forward(self, xt: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The network's prediction (eps or v) for a batch of noisy images and their prompts."""
        return self.unet(xt, t, self.encode_prompts(prompts))

    def loss(self, x0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """The simple loss (Ho et al. eq. 14) with condition dropout and optional min-SNR weights.

        Uses the global RNG (t, eps, dropout), which the trainer seeds and checkpoints."""
        B = x0.shape[0]
        # condition dropout: c <- "" with probability p_uncond
        drop = torch.rand(B).lt(self.config.p_uncond).tolist()
        prompts = ["" if dropped else caption for caption, dropped in zip(captions, drop)]
        if self.config.timestep_sampling == "uniform":
            t = torch.randint(0, self.scheduler.num_train_timesteps, (B,), device=x0.device)  # t ~ U{0..T-1}
        else:  # log SNR ~ N(m, s^2), then the level with that SNR
            log_snr = self.config.log_snr_mean + self.config.log_snr_std * torch.randn(B, device=x0.device)
            t = self.scheduler.level_of_log_snr(log_snr)
        eps = torch.randn_like(x0)  # eps ~ N(0, I)
        return diffusion_loss(self, self.scheduler, x0, t, eps, prompts, self.config.min_snr_gamma,
                              self.config.flow_weighting)

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        # Minimise || eps - eps_theta(x_t, t, c) ||^2 over the UNet and the text encoder together
        loss = ctx.optimize("model", lambda: self.loss(batch["image"], list(batch["caption"])))
        return {"loss": loss.detach()}

    def benchmark_samplers(self) -> dict[str, dict[str, Any]]:
        """DDIM at 50 steps against DDPM at its full T (both with the configured guidance)."""
        T = self.scheduler.num_train_timesteps
        return {"ddim-50": {"sampler": "ddim", "steps": 50}, f"ddpm-{T}": {"sampler": "ddpm", "steps": T}}

    # ------------------------------------------------------------------ sampling
    def sampling_defaults(self) -> DiffusionSampleOptions:
        return self.config.sampling

    def nfe(self, options: DiffusionSampleOptions | None = None, **given: Any) -> int:
        """Network evaluations per image: ``steps``, twice that with guidance (w not 0 or 1)."""
        options = self.sample_options(given, options)
        return options.steps * (1 if options.guidance in (0.0, 1.0) else 2)

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator | None = None,
                 options: DiffusionSampleOptions | None = None, *, return_intermediates: bool = False,
                 on_step: SamplingCallback | None = None, every: int = 1, **given: Any) -> SamplerOutput:
        """The pipeline: encode the prompts, then loop the sampler with classifier-free guidance.

        ``options`` (None: the config's ``sampling``), with any option given by keyword on top (``steps=10``).
        Randomness comes from ``generator`` only (a fresh, randomly seeded one if None). ``on_step(i, steps, x0)``,
        if given, sees the x0 estimate every ``every`` steps and after the last (``Lab.sample_with_progress``)."""
        options = self.sample_options(given, options)
        if options.steps > self.scheduler.num_train_timesteps:
            raise ValueError(f"steps={options.steps} exceeds num_train_timesteps={self.scheduler.num_train_timesteps}")
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
                return self.unet(xt, t, context)  # (N, C, H, W)
            both = self.unet(torch.cat([xt, xt]), torch.cat([t, t]), context)  # (2N, C, H, W)
            out_cond, out_uncond = both.chunk(2)  # 2 x (N, C, H, W)
            return classifier_free_guidance(out_uncond, out_cond, w)

        def report(i: int, step: SchedulerStep) -> None:
            if i % every == 0 or i == options.steps:
                on_step(i, options.steps, step.pred_x0)

        return sample_loop(denoise, self.scheduler, (N, *self.image_shape), options.steps, generator, self.device,
                           sampler=options.sampler, eta=options.eta, return_intermediates=return_intermediates,
                           nfe_per_step=1 if w in (0.0, 1.0) else 2, callback=report if on_step else None)

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None,
               options: DiffusionSampleOptions | None = None, **given: Any) -> torch.Tensor:
        """Images for ``prompts``, (N, C, H, W) in [-1, 1]; ``options`` None: the config's ``sampling``."""
        return self.generate(prompts, generator, options, **given).images.clamp(-1, 1)

    @torch.no_grad()
    def sample_with_progress(self, prompts: list[str], generator: torch.Generator | None = None,
                             on_step: SamplingCallback | None = None, every: int = 1,
                             options: DiffusionSampleOptions | None = None, **given: Any) -> torch.Tensor:
        """:meth:`sample`, reporting the x0 estimate (clamped to [-1, 1]) every ``every`` steps: the same images."""
        def report(i: int, steps: int, x0: torch.Tensor) -> None:
            on_step(i, steps, x0.clamp(-1, 1))

        return self.generate(prompts, generator, options, on_step=report if on_step else None, every=every,
                             **given).images.clamp(-1, 1)

    def sample_trajectory(self, prompts: list[str], generator: torch.Generator | None = None,
                          options: DiffusionSampleOptions | None = None, **given: Any) -> SamplerOutput:
        """Like :meth:`sample`, keeping x_t and the predicted x0 after every step (for the notebook strips)."""
        return self.generate(prompts, generator, options, return_intermediates=True, **given)

    @torch.no_grad()
    def attention_maps(self, xt: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Cross-attention weights of every cross-attention layer for one forward pass.

        Returns {layer name: (B, heads, H, W, L)}: for each word of the prompt, where it is looked at."""
        layers = self.unet.cross_attention_modules()
        for layer in layers.values():
            layer.store_attention = True
        try:
            self(xt, t, prompts)
            maps = {}
            for name, layer in layers.items():
                weights = layer.attention_weights  # (B, nh, HW, L)
                side = int(round(weights.shape[2] ** 0.5))
                maps[name] = weights.unflatten(2, (side, weights.shape[2] // side))  # (B, nh, H, W, L)
        finally:
            for layer in layers.values():
                layer.store_attention = False
                layer.attention_weights = None
        return maps

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts of the UNet, the text encoder and the total."""
        unet = sum(p.numel() for p in self.unet.parameters())
        text = sum(p.numel() for p in self.text_encoder.parameters())
        return {"unet": unet, "text_encoder": text, "total": unet + text}
