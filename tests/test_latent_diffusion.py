"""The latent-diffusion lab: the autoencoder's shapes, KL and round trip on real images, the scale factor's
unit variance, the two training stages, a latent DDPM whose loss falls, and checkpoint -> identical samples."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import data_info
from lab_utils.core.config import compose
from lab_utils.core.metrics import psnr
from labs.diffusion import DDPMConfig, SchedulerConfig, UNetConfig
from labs.diffusion.sampling import sample_loop
from labs.diffusion.scheduler import NoiseScheduler
from labs.latent_diffusion import AutoencoderConfig, KLAutoencoder, LatentDiffusionLab, LatentPosterior, LDMConfig
from labs.text_encoder import TextEncoderConfig
from labs.vae import kl_divergence


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


def tiny_config(**changes) -> LDMConfig:
    diffusion = DDPMConfig(
        scheduler=SchedulerConfig(num_train_timesteps=50, prediction_type="v", clip_x0=False),
        unet=UNetConfig(base_channels=8, channel_mults=[1, 2], self_attention_levels=[1], cross_attention_levels=[1],
                        heads=2, groups=4, emb_mult=2),
        text=TextEncoderConfig(dim=16, depth=1, heads=2, max_length=24), lr=2e-3,
    )
    cfg = LDMConfig(autoencoder=AutoencoderConfig(channels=[8, 16], groups=4, patch_size=1), autoencoder_steps=3, scale_batches=2,
                    diffusion=diffusion)
    for key, value in changes.items():
        setattr(cfg, key, value)
    LDMConfig.__post_init__(cfg)
    return cfg


def shapes_images(n: int, split: str = "train", start: int = 0) -> tuple[torch.Tensor, list[str]]:
    from lab_utils.core.data import build_dataset

    dataset = build_dataset(compose(["data=shapes"]).data, split)
    items = [dataset[i] for i in range(start, start + n)]
    return torch.stack([item["image"] for item in items]), [item["caption"] for item in items]


class Context:
    """The StepContext a lab sees, without the trainer: plain AdamW steps, batches from a list."""

    def __init__(self, lab: LatentDiffusionLab, batches: list[dict]):
        self.lab, self.batches, self.step, self.device = lab, iter(batches), 0, torch.device("cpu")
        self.optimizers = lab.configure_optimizers()
        self.stepped: list[str] = []

    def optimize(self, name, loss):
        out = loss()
        value = out["loss"] if isinstance(out, dict) else out
        self.optimizers[name].zero_grad()
        value.backward()
        self.optimizers[name].step()
        self.stepped.append(name)
        return out

    def next_batch(self):
        return next(self.batches)

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------------------ the autoencoder
def test_encode_decode_shapes_and_factor():
    for cfg in (AutoencoderConfig(channels=[8, 16, 16], groups=4, z_channels=4, patch_size=1),
                AutoencoderConfig(channels=[8, 16], groups=4, z_channels=4, patch_size=2)):  # f = 4 both ways
        ae = KLAutoencoder(cfg, channels=3)
        posterior = ae.encode(torch.randn(2, 3, 32, 32))
        assert cfg.factor == 4 and cfg.latent_size(32) == 8
        assert posterior.mu.shape == posterior.logvar.shape == (2, 4, 8, 8)
        assert ae.decode(posterior.mu).shape == (2, 3, 32, 32)
        with pytest.raises(ValueError, match="not a multiple of the autoencoder's factor 4"):
            cfg.latent_size(30)
    with pytest.raises(ValueError, match="divisible by autoencoder.groups"):
        AutoencoderConfig(channels=[8, 12], groups=8)


def test_latent_kl_is_the_closed_form_summed_over_the_latent():
    mu, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    kl = LatentPosterior(mu, logvar).kl()
    by_hand = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(dim=(1, 2, 3))
    assert torch.allclose(kl, by_hand, atol=1e-5) and torch.allclose(kl, kl_divergence(mu.flatten(1), logvar.flatten(1)))
    assert torch.equal(LatentPosterior(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)).kl(), torch.zeros(1))
    z = LatentPosterior(mu, torch.full_like(logvar, -60.0)).sample(torch.Generator().manual_seed(0))
    assert torch.allclose(z, mu)  # sigma -> 0: the sample is the mean


def test_the_loss_weighs_the_kl_per_pixel():
    torch.manual_seed(0)
    ae = KLAutoencoder(AutoencoderConfig(channels=[8, 16], groups=4, patch_size=1), channels=3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    plain = ae.loss(x, kl_weight=0.0)
    torch.manual_seed(1)
    weighted = ae.loss(x, kl_weight=0.5)
    assert torch.allclose(plain.loss, plain.mse) and torch.allclose(weighted.mse, plain.mse)
    assert torch.allclose(weighted.loss, plain.mse + 0.5 * weighted.kl / (3 * 16 * 16), atol=1e-6)
    assert float(psnr(torch.tensor(0.01))) == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.01)).item())


def test_the_autoencoder_round_trips_real_images():
    """60 steps on shapes: test reconstructions are far closer than at the start and than the mean image."""
    torch.manual_seed(0)
    ae = KLAutoencoder(AutoencoderConfig(), channels=3)  # LDMConfig's shape: 2x2 patches, [16, 32]
    train, _ = shapes_images(512)
    test, _ = shapes_images(64, "test")
    optimizer = torch.optim.AdamW(ae.parameters(), lr=2e-3, betas=(0.5, 0.9))

    def test_mse() -> float:
        with torch.no_grad():
            return float((ae.decode(ae.encode(test).mu) - test).pow(2).mean())

    before = test_mse()
    for step in range(60):
        batch = train[(step * 32) % 512:][:32]
        loss = ae.loss(batch, kl_weight=1e-6).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = test_mse()
    mean_image = float((test - train.mean(dim=0)).pow(2).mean())
    assert after < 0.25 * before and after < 0.5 * mean_image, (before, after, mean_image)


# ------------------------------------------------------------------------------ the lab
def test_the_scale_factor_gives_unit_variance_on_the_training_set():
    torch.manual_seed(0)
    lab = LatentDiffusionLab(tiny_config(), data_info(size=16))
    images, _ = shapes_images(256)
    images = torch.nn.functional.interpolate(images, size=16, mode="area")
    s, m = lab.measure_scale_factor([images[:64], images[64:128]])
    with torch.no_grad():  # the latents the DDPM trains on: posterior samples z ~ q(z | x), with other noise
        measured = torch.cat([lab.autoencoder.encode(x).sample() for x in (images[:64], images[64:128])])
        held = lab.autoencoder.encode(images[128:]).sample()
    # on the measured batches and on other training images
    assert float((s * (measured - m)).std()) == pytest.approx(1.0, abs=0.02)
    assert float((s * (measured - m)).mean()) == pytest.approx(0.0, abs=0.02)
    assert float((s * (held - m)).std()) == pytest.approx(1.0, abs=0.1)
    assert float((s * (held - m)).mean()) == pytest.approx(0.0, abs=0.1)
    lab.scale_factor.fill_(s)
    lab.shift_factor.fill_(m)
    latents = lab.to_latents(images[:8])
    assert latents.shape == (8, 4, 8, 8)
    assert torch.allclose(latents, s * (lab.autoencoder.encode(images[:8]).mu - m), atol=1e-5)
    assert torch.allclose(lab.decode_latents(latents),
                          lab.autoencoder.decode(latents / s + m).clamp(-1, 1), atol=1e-5)  # D(s (z - m) / s + m)


def test_two_stages_then_the_latent_ddpm_learns_with_the_autoencoder_frozen():
    torch.manual_seed(0)
    lab = LatentDiffusionLab(tiny_config(autoencoder_steps=40, scale_batches=2), data_info(size=16))
    images, captions = shapes_images(64)
    images = torch.nn.functional.interpolate(images, size=16, mode="area")
    batches = [{"image": images[i:i + 16], "caption": captions[i:i + 16]} for i in range(0, 64, 16)] * 40
    ctx = Context(lab, batches)
    names = []
    for step in range(40):
        ctx.step = step
        names.append(set(lab.training_step(ctx.next_batch(), ctx)))
    assert ctx.stepped == ["autoencoder"] * 40 and all("autoencoder" in n and "stats/ae_psnr" in n for n in names)
    assert float(lab.scale_factor) == 0.0  # not measured yet
    frozen = {k: v.clone() for k, v in lab.autoencoder.state_dict().items()}
    losses = []
    for step in range(40, 120):
        ctx.step = step
        out = lab.training_step(ctx.next_batch(), ctx)
        losses.append(float(out["diffusion"]))
    assert ctx.stepped[40:] == ["diffusion"] * 80
    assert float(lab.scale_factor) > 0 and float(out["stats/scale_factor"]) == float(lab.scale_factor)
    assert all(torch.equal(frozen[k], v) for k, v in lab.autoencoder.state_dict().items())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses


def test_latents_are_not_clamped_like_pixels():
    scheduler = NoiseScheduler(SchedulerConfig(num_train_timesteps=10, clip_x0=False))
    out = sample_loop(lambda x, t: torch.zeros_like(x), scheduler, (4, 2, 3, 3), 5, torch.Generator().manual_seed(0))
    assert out.images.abs().max() > 1.0  # eps = 0 keeps the starting noise, which exceeds 1 somewhere
    clipped = NoiseScheduler(SchedulerConfig(num_train_timesteps=10, clip_x0=True))
    assert sample_loop(lambda x, t: torch.zeros_like(x), clipped, (4, 2, 3, 3), 5,
                       torch.Generator().manual_seed(0)).images.abs().max() <= 1.0


def test_sampling_is_the_latent_ddpm_decoded():
    torch.manual_seed(0)
    lab = LatentDiffusionLab(tiny_config(), data_info(size=16)).eval()
    lab.scale_factor.fill_(0.7)
    prompts = ["a red circle", "a small blue square at the top left"]
    latents = lab.diffusion.generate(prompts, torch.Generator().manual_seed(3), steps=4).images
    images = lab.sample(prompts, torch.Generator().manual_seed(3), steps=4)
    assert images.shape == (2, 3, 16, 16) and torch.allclose(images, lab.autoencoder.decode(latents / 0.7).clamp(-1, 1))
    trajectory = lab.sample_trajectory(prompts, torch.Generator().manual_seed(3), steps=4)
    assert len(trajectory.pred_x0) == 4 and trajectory.pred_x0[-1].shape == (2, 3, 16, 16)
    assert torch.allclose(trajectory.images, images) and lab.nfe(steps=4, guidance=3.0) == 8
    assert set(lab.num_parameters()) == {"autoencoder", "unet", "text_encoder", "total"}


def test_train_checkpoint_then_sample_identically(tmp_path):
    from lab_utils.harness.checkpoint import load_lab
    from lab_utils.harness.run import train

    run = tmp_path / "run"
    cfg = compose(["model=ldm", "data=shapes", "preset=smoke", f"out={run}", "trainer.steps=5"])
    result = train(cfg)
    assert result.step == 5
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "loss/autoencoder" in rows[0] and "loss/diffusion" in rows[-1] and "stats/scale_factor" in rows[-1]
    loaded = load_lab(run, device="cpu")
    s = float(loaded.lab.scale_factor)
    assert s > 0 and s == pytest.approx(rows[-1]["stats/scale_factor"])
    images = [loaded.lab.sample(["a red circle"] * 2, torch.Generator().manual_seed(0)) for _ in range(2)]
    assert torch.equal(images[0], images[1]) and images[0].shape == (2, 3, 32, 32)
    again = load_lab(run, device="cpu").lab.sample(["a red circle"] * 2, torch.Generator().manual_seed(0))
    assert torch.equal(images[0], again)
    x, captions = shapes_images(4, "test")
    recon = loaded.lab.reconstruct(x, captions)
    assert recon.shape == x.shape and recon.abs().max() <= 1.0


def test_a_new_run_can_take_submodules_from_another(tmp_path):
    """trainer.init_from / init_modules: the named submodules come from the other run, strictly; the rest does not."""
    from lab_utils.core.config import TrainerConfig
    from lab_utils.harness.checkpoint import CheckpointError, initialize_modules, load_checkpoint, load_lab
    from lab_utils.harness.run import train

    source = tmp_path / "source"
    train(compose(["model=ldm", "data=shapes", "preset=smoke", f"out={source}", "trainer.steps=3"]))
    taken = tmp_path / "taken"
    train(compose(["model=ldm", "data=shapes", "preset=smoke", f"out={taken}", "trainer.steps=2", "seed=5",
                   "model.autoencoder_steps=0", f"trainer.init_from={source}", "trainer.init_modules=[autoencoder]"]))
    a, b = load_checkpoint(source)["model"], load_checkpoint(taken)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("autoencoder."))  # frozen in stage 2: unchanged
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("diffusion.unet."))  # its own DDPM
    lab = load_lab(taken).lab
    with pytest.raises(CheckpointError, match="has no submodule 'nothing'"):
        initialize_modules(lab, source, ["nothing"])
    other = load_lab(source).lab
    other.autoencoder = KLAutoencoder(AutoencoderConfig(channels=[8, 16], groups=4), channels=3)
    with pytest.raises(CheckpointError, match="does not fit"):
        initialize_modules(other, source, ["autoencoder"])
    with pytest.raises(ValueError, match="go together"):
        TrainerConfig(init_from=str(source))
