"""A tiny two-player lab used to test the harness (no GAN/VAE/diffusion code involved).

It has two optimisers and several "critic" updates per step, each on a fresh batch from
``ctx.next_batch()``, so it exercises exactly the interface a GAN needs. It draws noise from the
global RNG, so exact resumption also checks that the RNG state is restored; with ``noise=False`` its
losses depend on the batch alone, which lets a test compare runs with different numbers of processes.

``ContrastLab`` is the tiny lab with one more sampling option, ``contrast``: a field of its ``SampleOptions``
and the line of ``sample`` that uses it, nothing else (``tests/test_sample_options.py`` shows that `genlab sample`,
`genlab serve` and its request model offer and check it without an edit of their own).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lab_utils.core.lab import DataInfo, Lab, SampleOptions, option
from lab_utils.core.registry import register_lab


@dataclass
class TinyConfig:
    _target_: str = "tiny_lab.TinyLab"
    name: str = "tiny"
    lr: float = 1e-2
    n_critic: int = 2
    z_dim: int = 4
    explode_at: Optional[int] = None  # the loss becomes NaN at this step (1-based): NaN-guard test
    explode_rank: Optional[int] = None  # ... on this process only (None: on every process)
    sleep: float = 0.0  # seconds per step, so a test can kill the process mid-run
    noise: bool = True  # false: z is read off the images, so the loss is a function of the batch alone


def tiny_overrides(run_dir, **model) -> list[str]:
    """Config overrides that train the tiny lab on a small `shapes` subset."""
    base = [
        "preset=smoke", "data=shapes", "data.subset=64", "data.num_test=16", f"out={run_dir}",
        "trainer.steps=8", "trainer.batch_size=8", "trainer.checkpoint_every=2", "trainer.log_every=1",
        "trainer.sample_every=4", "trainer.keep_checkpoints=2",
    ]
    return base + [f"model.{key}={value}" for key, value in model.items()]


def tiny_config(run_dir, **model):
    """A validated training config for the tiny lab (the model section replaced by TinyConfig)."""
    from omegaconf import OmegaConf

    from lab_utils.core.config import compose, validate

    cfg = compose(tiny_overrides(run_dir), check=False)
    OmegaConf.set_struct(cfg, False)
    cfg.model = OmegaConf.merge(OmegaConf.structured(TinyConfig), model)
    return validate(cfg)


@dataclass
class TinySampleOptions(SampleOptions):
    scale: float = option(1.0, min=0.0, max=10.0, help="the noise's scale")


class TinyLab(Lab):
    Config = TinyConfig
    SampleOptions = TinySampleOptions

    def __init__(self, cfg, data_info: DataInfo):
        super().__init__(cfg, data_info)
        pixels = data_info.channels * data_info.image_size**2
        self.index = {word: i for i, word in enumerate(data_info.vocab)}
        self.words = nn.EmbeddingBag(len(data_info.vocab), 8)  # caption -> mean word vector
        self.generator = nn.Linear(8 + self.config.z_dim, pixels)
        self.critic = nn.Linear(pixels, 1)

    def configure_optimizers(self):
        return {
            "generator": torch.optim.Adam(list(self.generator.parameters()) + list(self.words.parameters()),
                                          lr=self.config.lr),
            "critic": torch.optim.SGD(self.critic.parameters(), lr=self.config.lr),
        }

    def ema_modules(self):
        return ["generator", "words"]

    def _cond(self, captions: list[str]) -> torch.Tensor:
        ids = [torch.tensor([self.index.get(w, 1) for w in c.lower().split()] or [2]) for c in captions]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return self.words(torch.cat(ids).to(self.device), offsets.to(self.device))  # (B, 8)

    def _noise(self, real: torch.Tensor) -> torch.Tensor:
        if self.config.noise:
            return torch.randn(len(real), self.config.z_dim, device=self.device)  # global RNG
        return real[:, : self.config.z_dim]  # (B, z_dim): a function of the batch

    def _generate(self, captions: list[str], z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.generator(torch.cat([self._cond(captions), z], dim=1)))  # (B, pixels)

    def training_step(self, batch, ctx):
        for i in range(self.config.n_critic):
            data = batch if i == 0 else ctx.next_batch()
            real = data["image"].flatten(1)
            z = self._noise(real)
            fake = self._generate(data["caption"], z).detach()
            critic_loss = ctx.optimize("critic", lambda: self.critic(fake).mean() - self.critic(real).mean()
                                       + self.critic.weight.pow(2).sum())
        real = batch["image"].flatten(1)
        z = self._noise(real)
        explode = (self.config.explode_at is not None and ctx.step + 1 >= self.config.explode_at
                   and self.config.explode_rank in (None, int(os.environ.get("RANK", 0))))

        def generator_loss_fn() -> torch.Tensor:
            fake = self._generate(batch["caption"], z)
            loss = F.mse_loss(fake, real) - 0.01 * self.critic(fake).mean()
            return loss * float("nan") if explode else loss

        generator_loss = ctx.optimize("generator", generator_loss_fn)
        if self.config.sleep:
            time.sleep(self.config.sleep)
        return {"critic": critic_loss.detach(), "generator": generator_loss.detach()}

    @torch.no_grad()
    def sample(self, prompts, generator=None, options: TinySampleOptions | None = None, **given):
        options = self.sample_options(given, options)
        z = torch.randn(len(prompts), self.config.z_dim, generator=generator, device=self.device)
        images = self._generate(list(prompts), options.scale * z)
        size = self.data_info.image_size
        return images.view(len(prompts), self.data_info.channels, size, size)


@dataclass
class ContrastSampleOptions(TinySampleOptions):
    contrast: float = option(1.0, min=0.0, max=2.0, help="scales the images about grey (1 = as drawn)")


class ContrastLab(TinyLab):
    """The tiny lab with one more sampling option (the field above and the line below that uses it)."""

    SampleOptions = ContrastSampleOptions

    @torch.no_grad()
    def sample(self, prompts, generator=None, options: ContrastSampleOptions | None = None, **given):
        options = self.sample_options(given, options)
        return super().sample(prompts, generator, options) * options.contrast


register_lab(TinyLab)  # a user's own lab: registered by the code that uses it, never by a checkpoint
register_lab(ContrastLab)  # a checkpoint names it as model._target_=tiny_lab.ContrastLab


if __name__ == "__main__":  # python tests/tiny_lab.py <run_dir> [--resume] [--sleep S] [--no-noise] [key=value ...]
    import argparse

    import yaml
    from omegaconf import OmegaConf

    import tiny_lab  # the importable module, not __main__, so its TinyConfig is the one validate() sees
    from lab_utils.harness.run import train
    from lab_utils.harness.trainer import TrainingDiverged

    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--no-noise", action="store_true", help="losses depend on the batch alone")
    parser.add_argument("overrides", nargs="*", help="trainer.key=value ...")
    args = parser.parse_intermixed_args()
    config = tiny_lab.tiny_config(args.run_dir, sleep=args.sleep, noise=not args.no_noise)
    for item in args.overrides:
        key, _, value = item.partition("=")
        OmegaConf.update(config, key, yaml.safe_load(value))
    try:
        result = train(config, resume=args.run_dir if args.resume else None)
    except TrainingDiverged as err:
        print(f"rank {os.environ.get('RANK', 0)} stopped: {err}", flush=True)
        raise SystemExit(3) from None
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"finished step {result.step}")
