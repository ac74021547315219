r"""Latent diffusion (Rombach et al. 2022): the text-to-image pipeline of Stable Diffusion, at lab size.

    prompt --text encoder--> vectors --+
                                       v
    z_T ~ N(0, I) (4x8x8) --DDPM/DDIM steps of a UNet, classifier-free guidance--> z_0 --decoder D--> image (3x32x32)

One run trains both stages, in turn, through the unchanged harness:

1. **The autoencoder** (``autoencoder.py``), for ``autoencoder_steps`` updates of its own optimiser:
   reconstruction error plus a small KL weight.
2. **The scale factor.** At the first step of stage 2 the frozen encoder maps ``scale_batches`` training
   batches to latents $z \sim q(z \mid x)$, and $s = 1 / \operatorname{std}(z)$ is kept in the checkpoint
   (the ``scale_factor`` of Rombach et al. sec. 4.3.2 and appendix G), with their mean $m$ (the
   ``shift_factor`` that Stable Diffusion 3's autoencoder adds): the diffusion model sees $s (z - m)$, of
   zero mean and unit variance, so its noise schedule means what it means for images in [-1, 1]. (A small
   KL weight keeps the latents *near* N(0, I), not at it: here their mean drifts to ~0.4 within 300 steps.)
3. **The latent DDPM**, for the rest of the budget: the diffusion lab's ``DiffusionLab`` (its scheduler,
   UNet with self- and cross-attention, text encoder, loss and samplers, classifier-free guidance) over
   latents instead of pixels: ``DiffusionLab(config.diffusion, DataInfo(channels=4, image_size=8, ...))``.

Sampling runs the diffusion lab's sampler in latent space and decodes once: $x = D(z_0 / s + m)$.

This is a composite lab: it imports the two labs it composes, ``labs.diffusion`` (the whole latent
DDPM) and ``labs.vae`` (the autoencoder's building blocks: residual blocks, resampling, the
reparameterisation and the KL), besides the shared ``labs.text_encoder``. No other lab imports another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lab_utils.core.lab import DataInfo, Lab, SamplingCallback, StepContext, adam
from lab_utils.core.metrics import psnr
from labs.diffusion import DDPMConfig, DiffusionLab, SamplerOutput, SchedulerConfig, UNetConfig
from labs.diffusion.lab import DiffusionSampleOptions

from .autoencoder import AutoencoderConfig, KLAutoencoder


def latent_ddpm() -> DDPMConfig:
    """The latent DDPM's defaults: the pixel DDPM's schema (``labs.diffusion.DDPMConfig``) sized for 8x8 latents."""
    return DDPMConfig(
        scheduler=SchedulerConfig(
            prediction_type="v",
            clip_x0=False,  # latents are not bounded like pixels: no clipping of the x0 estimate
        ),
        unet=UNetConfig(
            # 32 channels at 8 and 4 latent pixels (0.36M): a step costs ~1/4 of the pixel DDPM's, which runs 32-64
            # channels at 16, 8 and 4 px
            base_channels=32,
            channel_mults=[1, 1],
            self_attention_levels=[],  # the middle block (4 px) always has self-attention
            cross_attention_levels=[1],  # at 4 px (and the middle); at 8 px too cost 35% more time per step
            coord_channels=True,
            # the prompt's "where" map at the 4 px bottleneck, as the pixel DDPM's cpu preset
            text_map_channels=16,
            text_map_size=4,
        ),
        sampling=DiffusionSampleOptions(steps=25),
        # min-SNR-5 (Hang et al. 2023): v-errors weighted by min(SNR, 5) / (SNR + 1). Measured on shapes, 2 cores: the
        # latent DDPM from a cached 800-step autoencoder (as in `make demo`), batch 64, `genlab eval` of 500 samples
        # (all four attributes, seen prompts; DDIM-25, w = 3; one run each):
        #                                   step 600  800   1000
        #   plain MSE (min_snr_gamma null)       0.59  0.76  0.86   (shape 0.85 at 1000: the last attribute)
        #   min-SNR-5                            0.40  0.72  0.92   (shape 0.94; position 0.51 at 600, 0.98 at 1000)
        #   min-SNR-5, snr_shift 1.5 / 2         0.69 / 0.80  0.81 / 0.83  0.91 / 0.87
        #   plain, lr 4e-3                       0.73  0.82  0.86
        #   min-SNR-5, text_lr 3e-4              -     0.37  0.77   (shape 0.99 but position 0.78: the pooled prompt
        #                                                            collapses, as preset_model/ddpm_cpu.yaml explains)
        #   min-SNR-5, lr cosine-decayed to 0 over 1000 steps: 0.69 at 1000 (position 0.80)
        # Down-weighting the low-noise steps (SNR > 5) frees the small UNet for the middle of the schedule, where a
        # shape's outline is decided in latent space; position (decided at high noise) comes a little later.
        min_snr_gamma=5.0,
        lr=2e-3,
        text_lr=1e-4,  # the text encoder collapses at the UNet's rate (see preset_model/ddpm_cpu.yaml)
    )


@dataclass
class LDMConfig:
    """Schema and defaults of ``model=ldm`` (the one home of its values; ``conf/model/ldm.yaml`` only names it):
    latent diffusion (Rombach et al. 2022), the pipeline of Stable Diffusion at lab size: a KL autoencoder
    (32x32x3 -> 4x8x8) trained first, then a text-conditioned DDPM over its scaled latents (``latent_ddpm``),
    decoded once. One run trains both stages in turn. The presets (``conf/preset_model/ldm_{smoke,cpu,gpu}.yaml``)
    change the size and the budget."""

    _target_: str = "labs.latent_diffusion.LatentDiffusionLab"
    name: str = "ldm"
    # measured on shapes, 2 cores (README): 300 steps PSNR 26.9 dB, 600 steps 29.6 dB
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    # stage 1: updates of the autoencoder; the rest of trainer.steps (or of the compare budget) trains the latent DDPM
    autoencoder_steps: int = 400
    autoencoder_lr: float = 2e-3  # AdamW
    # lambda_KL on the summed KL (Rombach et al.'s KL-f8 uses 1e-6): keeps the latents near N(0, I) without blurring
    kl_weight: float = 1e-6
    scale_batches: int = 8  # training batches whose latents measure the scale factor s = 1 / std(z)
    diffusion: DDPMConfig = field(default_factory=latent_ddpm)  # the latent DDPM (labs.diffusion's schema)
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # the autoencoder's AdamW betas (Rombach et al.)
    scale_factor: Optional[float] = None  # a fixed s (and m = 0) instead of the measured ones (None: measure them)

    def __post_init__(self) -> None:
        if self.autoencoder_steps < 0:
            raise ValueError(f"autoencoder_steps must be >= 0, got {self.autoencoder_steps}")
        if self.autoencoder_lr <= 0 or self.kl_weight < 0:
            raise ValueError("autoencoder_lr must be positive and kl_weight >= 0")
        if self.scale_batches < 1:
            raise ValueError(f"scale_batches must be >= 1, got {self.scale_batches}")
        if self.scale_factor is not None and self.scale_factor <= 0:
            raise ValueError(f"scale_factor must be positive or null (measured), got {self.scale_factor}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")


class LatentDiffusionLab(Lab):
    """A KL autoencoder and a text-conditioned DDPM over its latents."""

    Config = LDMConfig
    SampleOptions = DiffusionSampleOptions  # the latent DDPM's sampler, steps, guidance, eta

    def __init__(self, config: LDMConfig | Any, data_info: DataInfo):
        super().__init__(config, data_info)
        config = self.config
        self.autoencoder = KLAutoencoder(config.autoencoder, data_info.channels)
        side = config.autoencoder.latent_size(data_info.image_size)
        self.latent_info = dataclasses.replace(data_info, channels=config.autoencoder.z_channels, image_size=side)
        self.diffusion = DiffusionLab(config.diffusion, self.latent_info)
        # s and m; s = 0 until measured at the start of stage 2 (buffers: saved in every checkpoint)
        self.register_buffer("scale_factor", torch.zeros(()))
        self.register_buffer("shift_factor", torch.zeros(()))
        self.image_shape = (data_info.channels, data_info.image_size, data_info.image_size)
        self.latent_shape = (config.autoencoder.z_channels, side, side)

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        cfg = self.config
        return {"autoencoder": adam(self.autoencoder.parameters(), lr=cfg.autoencoder_lr, betas=tuple(cfg.betas)),
                "diffusion": self.diffusion.configure_optimizers()["model"]}

    def stages(self) -> dict[str, int]:
        """The training stages before the last one, by the step each ends at (``genlab compare`` reports their time)."""
        return {"autoencoder": self.config.autoencoder_steps}

    def initial_modules(self) -> dict[str, str]:
        return {f"diffusion.{name}": source for name, source in self.diffusion.initial_modules().items()}

    def ema_modules(self) -> list[str]:
        return ["diffusion"]  # the autoencoder is frozen after stage 1: its own weights are the final ones

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.config
        if ctx.step < cfg.autoencoder_steps:  # stage 1
            def autoencoder_loss() -> dict[str, torch.Tensor]:
                out = self.autoencoder.loss(batch["image"], cfg.kl_weight)
                return {"loss": out.loss, "stats/ae_mse": out.mse, "stats/ae_kl": out.kl}

            out = ctx.optimize("autoencoder", autoencoder_loss)
            return {"autoencoder": out["loss"].detach(), "stats/ae_mse": out["stats/ae_mse"],
                    "stats/ae_psnr": psnr(out["stats/ae_mse"]).to(out["loss"].device), "stats/ae_kl": out["stats/ae_kl"]}
        if ctx.step == cfg.autoencoder_steps:  # the first step of stage 2 (a resumed run has s in its checkpoint)
            images = [batch["image"]] + [ctx.next_batch()["image"] for _ in range(cfg.scale_batches - 1)]
            scale, shift = self.measure_scale_factor(images)
            self.scale_factor.fill_(scale if cfg.scale_factor is None else cfg.scale_factor)
            self.shift_factor.fill_(shift if cfg.scale_factor is None else 0.0)
        with torch.no_grad(), ctx.autocast():
            z = self.autoencoder.encode(batch["image"]).sample().float()  # z ~ q(z | x): (B, 4, 8, 8)
        z0 = (z - self.shift_factor) * self.scale_factor  # s (z - m): zero mean, unit variance
        loss = ctx.optimize("diffusion", lambda: self.diffusion.loss(z0, list(batch["caption"])))
        return {"diffusion": loss.detach(), "stats/scale_factor": self.scale_factor.detach().clone(),
                "stats/shift_factor": self.shift_factor.detach().clone()}

    @torch.no_grad()
    def measure_scale_factor(self, images: list[torch.Tensor]) -> tuple[float, float]:
        r"""$(s, m) = (1 / \operatorname{std}(z), \operatorname{mean}(z))$ over the latents $z \sim q(z \mid x)$ of every
        image in ``images`` (a list of (B, C, H, W) batches): $s (z - m)$ then has zero mean and unit variance on them."""
        z = torch.cat([self.autoencoder.encode(x.to(self.device)).sample().float().flatten() for x in images])
        return float(1.0 / z.std()), float(z.mean())

    # ------------------------------------------------------------------ the two stages' maps
    def _scale(self) -> torch.Tensor:
        """s, or 1 before it is measured (grids drawn during stage 1), without a host-device sync."""
        return torch.where(self.scale_factor > 0, self.scale_factor, torch.ones_like(self.scale_factor))

    @torch.no_grad()
    def to_latents(self, images: torch.Tensor, generator: torch.Generator | None = None,
                   sample: bool = False) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> scaled latents s (z - m) (N, 4, 8, 8): z = mu, or z ~ q(z | x) if ``sample``."""
        posterior = self.autoencoder.encode(images.to(self.device))
        z = posterior.sample(generator) if sample else posterior.mu
        return (z.float() - self.shift_factor) * self._scale()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents s (z - m) (N, 4, 8, 8) -> images D(z) (N, C, H, W), clamped to [-1, 1]."""
        z = latents.to(self.device) / self._scale() + self.shift_factor
        return self.autoencoder.decode(z).float().clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """D(mu(x)): the autoencoder's reconstruction, the ceiling of what the latent DDPM can draw. The captions are
        not used (the first stage is unconditional); taken so ``genlab sample mode=reconstruct`` works for every family."""
        if not isinstance(images, torch.Tensor) or images.shape[1:] != torch.Size(self.image_shape):
            raise ValueError(f"images must be a (N, {', '.join(map(str, self.image_shape))}) tensor")
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        return self.decode_latents(self.to_latents(images))

    # ------------------------------------------------------------------ sampling
    def sampling_defaults(self) -> DiffusionSampleOptions:
        return self.config.diffusion.sampling  # the latent DDPM's

    def nfe(self, options: DiffusionSampleOptions | None = None, **given: Any) -> int:
        return self.diffusion.nfe(self.sample_options(given, options))

    def benchmark_samplers(self) -> dict[str, dict[str, Any]]:
        return self.diffusion.benchmark_samplers()

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator | None = None,
                 options: DiffusionSampleOptions | None = None, *, return_intermediates: bool = False,
                 on_step: SamplingCallback | None = None, every: int = 1, **given: Any) -> SamplerOutput:
        """The pipeline: the latent DDPM's sampler (text encoder, guidance) in latent space, then the decoder.
        The intermediates and x0 estimates, if kept or reported to ``on_step``, are decoded too (images)."""
        def report(i: int, total: int, z0: torch.Tensor) -> None:
            on_step(i, total, self.decode_latents(z0))  # D(z0 estimate): one decoder pass per report

        out = self.diffusion.generate(prompts, generator, self.sample_options(given, options),
                                      return_intermediates=return_intermediates,
                                      on_step=report if on_step else None, every=every)
        decode = self.decode_latents
        return dataclasses.replace(out, images=decode(out.images),
                                   intermediates=[decode(z).cpu() for z in out.intermediates],
                                   pred_x0=[decode(z).cpu() for z in out.pred_x0])

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None,
               options: DiffusionSampleOptions | None = None, **given: Any) -> torch.Tensor:
        """Images for ``prompts``, (N, C, H, W) in [-1, 1]; ``options`` None: ``diffusion.sampling``."""
        return self.generate(prompts, generator, options, **given).images

    @torch.no_grad()
    def sample_with_progress(self, prompts: list[str], generator: torch.Generator | None = None,
                             on_step: SamplingCallback | None = None, every: int = 1,
                             options: DiffusionSampleOptions | None = None, **given: Any) -> torch.Tensor:
        """:meth:`sample`, reporting the decoded x0 estimate every ``every`` steps: the same images."""
        return self.generate(prompts, generator, options, on_step=on_step, every=every, **given).images

    def sample_trajectory(self, prompts: list[str], generator: torch.Generator | None = None,
                          options: DiffusionSampleOptions | None = None, **given: Any) -> SamplerOutput:
        """Like :meth:`sample`, keeping every step's decoded x_t and x0 estimate (notebook strips, live previews)."""
        return self.generate(prompts, generator, options, return_intermediates=True, **given)

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts of the autoencoder, the latent UNet, the text encoder and the total."""
        counts = {"autoencoder": sum(p.numel() for p in self.autoencoder.parameters()),
                  **{k: v for k, v in self.diffusion.num_parameters().items() if k != "total"}}
        return {**counts, "total": sum(counts.values())}
