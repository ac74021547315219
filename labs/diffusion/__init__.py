"""The diffusion lab: a small text-conditioned DDPM with DDPM/DDIM samplers and classifier-free guidance.

    scheduler.py  the noise schedule, forward process and reverse updates (no network, no parameters)
    unet.py       the UNet eps_theta(x_t, t, c) with self- and cross-attention
    sampling.py   the one sampling loop (sample_levels: any list of levels, any step rule; the flow lab's too),
                  the scheduler's DDPM and DDIM steps over it (sample_loop), and classifier-free guidance
    lab.py        DiffusionSampleOptions (sampler, steps, guidance, eta: the config's `sampling`, what `sample`
                  takes), DDPMConfig, diffusion_loss (Ho et al. eq. 14), DiffusionLab (training step, sampling)

    genlab train model=ddpm data=shapes preset=cpu
    genlab sample run=<dir> prompt="a red circle" sampler=ddim steps=50 guidance=3 n=16
"""

from .lab import DDPMConfig, DiffusionLab, DiffusionSampleOptions, diffusion_loss
from .sampling import (
    SAMPLER_STEPS, SAMPLERS, SamplerOutput, classifier_free_guidance, ddim_sample, ddpm_sample, sample_levels,
    sample_loop, start_noise,
)
from .scheduler import NoiseScheduler, SchedulerConfig, SchedulerStep, cosine_betas, linear_betas
from .unet import (
    CrossAttention, ResBlock, SelfAttention, UNet, UNetConfig, attention, coordinate_grid, patchify, timestep_embedding,
    unpatchify,
)

__all__ = [
    "SAMPLERS",
    "SAMPLER_STEPS",
    "CrossAttention",
    "DDPMConfig",
    "DiffusionLab",
    "DiffusionSampleOptions",
    "NoiseScheduler",
    "ResBlock",
    "SamplerOutput",
    "SchedulerConfig",
    "SchedulerStep",
    "SelfAttention",
    "UNet",
    "UNetConfig",
    "coordinate_grid",
    "attention",
    "classifier_free_guidance",
    "cosine_betas",
    "ddim_sample",
    "ddpm_sample",
    "diffusion_loss",
    "linear_betas",
    "patchify",
    "sample_levels",
    "sample_loop",
    "start_noise",
    "timestep_embedding",
    "unpatchify",
]
