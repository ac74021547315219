"""The VAE lab: known values of the ELBO terms, the reparameterisation trick, the networks'
conditioning, a tiny model that learns, seeded sampling, and an end-to-end train -> load -> sample run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import data_info
from lab_utils.core.config import compose, saved_model_config
from lab_utils.core.schema import ConfigError
from labs.text_encoder import TextEncoderConfig
from labs.vae import (
    ConvNetConfig, Decoder, Encoder, VAEConfig, VAELab, bernoulli_nll, bits_per_dim, discretized_gaussian_nll,
    gaussian_kl, gaussian_nll, kl_divergence, kl_weight, negative_elbo, reparameterize, slerp,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)

def tiny_config(**changes) -> VAEConfig:
    cfg = VAEConfig(latent_dim=8, net=ConvNetConfig(channels=[16, 32], groups=4, hidden_dim=64),
                    text=TextEncoderConfig(dim=16, depth=1, heads=2, max_length=24), kl_warmup_steps=0,
                    prior="learned")  # VAEConfig's default prior
    for key, value in changes.items():
        setattr(cfg, key, value)
    VAEConfig.__post_init__(cfg)
    return cfg


def tiny_lab(seed: int = 0, channels: int = 3, size: int = 16, **changes) -> VAELab:
    torch.manual_seed(seed)
    return VAELab(tiny_config(**changes), data_info(channels, size)).eval()


class FakeContext:
    """The StepContext protocol, enough for training_step: one optimiser, no clipping."""

    def __init__(self, lab: VAELab, step: int = 0):
        self.optimizer = lab.configure_optimizers()["model"]
        self.step, self.device = step, torch.device("cpu")

    def optimize(self, name: str, loss_fn):
        self.optimizer.zero_grad()
        output = loss_fn()  # the lab passes a function (the trainer runs it inside DDP's forward)
        (output["loss"] if isinstance(output, dict) else output).backward()
        self.optimizer.step()
        return output

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


# ------------------------------------------------------------------------------ ELBO terms
def test_kl_is_zero_exactly_at_the_prior_and_positive_elsewhere():
    zeros = torch.zeros(3, 5)
    assert torch.equal(kl_divergence(zeros, zeros), torch.zeros(3))
    mu = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    # hand-computed: 0.5 * mu^2 = 0.125; 0.5 * (e - 1 - 1) = 0.3591
    assert torch.allclose(kl_divergence(mu, logvar), torch.tensor([0.125, 0.5 * (math.e - 2)]))


def test_closed_form_kl_matches_a_monte_carlo_estimate():
    gen = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    n = 100_000
    z = reparameterize(mu[:, None].expand(4, n, 6), logvar[:, None].expand(4, n, 6), generator=gen)  # (4, n, 6)
    q = torch.distributions.Normal(mu[:, None], torch.exp(0.5 * logvar)[:, None])
    p = torch.distributions.Normal(0.0, 1.0)
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(1)  # E_q[log q(z) - log p(z)]
    assert torch.allclose(kl_divergence(mu, logvar), monte_carlo, rtol=0.02, atol=0.05)
    assert torch.allclose(kl_divergence(mu, logvar), torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, torch.exp(0.5 * logvar)), p).sum(1), atol=1e-5)


def test_kl_to_a_learned_prior_matches_torch_and_reduces_to_the_standard_one():
    gen = torch.Generator().manual_seed(2)
    mu, logvar, prior_mu, prior_logvar = (torch.randn(5, 4, generator=gen) for _ in range(4))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mu, torch.exp(0.5 * logvar)),
                                                 torch.distributions.Normal(prior_mu, torch.exp(0.5 * prior_logvar)))
    assert torch.allclose(gaussian_kl(mu, logvar, prior_mu, prior_logvar), expected.sum(1), atol=1e-5)
    zeros = torch.zeros_like(mu)
    assert torch.allclose(gaussian_kl(mu, logvar, zeros, zeros), kl_divergence(mu, logvar), atol=1e-6)
    assert torch.equal(gaussian_kl(prior_mu, prior_logvar, prior_mu, prior_logvar), torch.zeros(5))


def test_the_learned_prior_starts_as_the_standard_normal_and_sampling_draws_from_it():
    lab = tiny_lab()
    prompts = ["a red circle", "a blue square at the top left", ""]
    start = lab.prior_of(lab.encode_prompts(prompts), 3)
    assert torch.equal(start.mu, torch.zeros(3, 8)) and torch.equal(start.logvar, torch.zeros(3, 8))
    with torch.no_grad():  # a prior whose mean is 2 and whose std is 0.5 everywhere
        lab.prior.net[-1].bias.copy_(torch.cat([torch.full((8,), 2.0), torch.full((8,), math.log(0.25))]))
    eps = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    images = lab.sample(prompts, torch.Generator().manual_seed(4), temperature=0.5)
    assert torch.allclose(images, lab.decode(2.0 + 0.5 * 0.5 * eps, prompts), atol=1e-6)
    # the ELBO's KL is taken against p(z | c): a posterior equal to the prior costs nothing
    x0 = torch.rand(3, 3, 16, 16) * 2 - 1
    out = lab(x0, prompts)
    prior = lab.prior_of(out.c, 3)
    assert torch.allclose(lab.elbo_terms(x0, prompts, generator=torch.Generator().manual_seed(0)).kl,
                          gaussian_kl(out.mu, out.logvar, prior.mu, prior.logvar), atol=1e-5)
    assert "prior" in lab.ema_modules()
    plain = tiny_lab(prior="standard")
    assert not hasattr(plain, "prior") and "prior" not in plain.ema_modules()
    # checkpoints saved before the option load unchanged: a config without `prior` means the standard prior
    assert VAEConfig().prior == "learned" and saved_model_config({"_target_": "labs.vae.VAELab"})["prior"] == "standard"


def test_reparameterised_sample_has_the_right_moments_and_gradients():
    mu = torch.tensor([[1.0, -2.0, 0.0]], requires_grad=True)
    logvar = torch.tensor([[0.0, math.log(4.0), math.log(0.01)]], requires_grad=True)
    z = reparameterize(mu.expand(200_000, 3), logvar.expand(200_000, 3), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(z.mean(0), mu.detach()[0], atol=0.02)
    assert torch.allclose(z.var(0), torch.tensor([1.0, 4.0, 0.01]), rtol=0.02)
    z.pow(2).mean(0).sum().backward()  # d/dmu E[z^2] = 2 mu; d/dlogvar E[z^2] = sigma^2
    assert torch.allclose(mu.grad, 2 * mu.detach(), atol=0.03)
    assert torch.allclose(logvar.grad, torch.tensor([[1.0, 4.0, 0.01]]), rtol=0.03, atol=1e-3)
    eps = torch.randn(2, 3)  # given eps: exactly mu + sigma * eps
    assert torch.allclose(reparameterize(mu.detach(), logvar.detach(), eps),
                          mu.detach() + torch.exp(0.5 * logvar.detach()) * eps)


def test_likelihoods_against_reference_formulas():
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randint(1, 255, (2, 3, 4, 4), generator=gen).float() / 127.5 - 1  # 8-bit pixels, no edge bins
    mean = x0 + 0.1 * torch.randn(x0.shape, generator=gen)
    log_sigma = torch.tensor(math.log(0.2))
    reference = -torch.distributions.Normal(mean, 0.2).log_prob(x0).flatten(1).sum(1)
    assert torch.allclose(gaussian_nll(x0, mean, log_sigma), reference, rtol=1e-5)
    # a density on [-1, 1] x the bin width 2/255 ~ the bin's probability when sigma >> bin
    dims = x0[0].numel()
    assert torch.allclose(discretized_gaussian_nll(x0, mean, log_sigma),
                          gaussian_nll(x0, mean, log_sigma) + dims * math.log(127.5), rtol=1e-3)
    logits = torch.randn(x0.shape, generator=gen)
    assert torch.allclose(bernoulli_nll(x0, logits), F.binary_cross_entropy_with_logits(
        logits, (x0 + 1) / 2, reduction="none").flatten(1).sum(1))
    nats = torch.tensor(1000.0)
    assert bits_per_dim(nats, dims, "discretized_gaussian") == pytest.approx(1000 / (dims * math.log(2)))
    assert bits_per_dim(nats, dims, "gaussian") == pytest.approx((1000 + dims * math.log(127.5)) / (dims * math.log(2)))


def test_discretized_gaussian_is_a_probability_over_the_256_levels():
    levels = torch.linspace(-1, 1, 256).view(256, 1, 1, 1)  # every 8-bit value of one pixel
    for mean, sigma in ((0.3, 0.05), (-0.99, 0.01), (0.0, 2.0), (5.0, 0.01)):
        nll = discretized_gaussian_nll(levels, torch.full_like(levels, mean), torch.tensor(math.log(sigma)))
        assert torch.exp(-nll.double()).sum().item() == pytest.approx(1.0, abs=1e-6)
    far = torch.tensor([[[[-0.9]]]], requires_grad=True)  # a bin 90 sigmas away: finite, with a gradient
    discretized_gaussian_nll(torch.tensor([[[[0.9]]]]), far, torch.tensor(math.log(0.02))).sum().backward()
    assert torch.isfinite(far.grad).all() and far.grad.item() < 0


def test_negative_elbo_and_kl_warmup():
    terms = negative_elbo(torch.tensor([10.0, 20.0]), torch.tensor([1.0, 3.0]), beta=0.5)
    assert torch.equal(terms.loss, torch.tensor([10.5, 21.5])) and torch.equal(terms.elbo, torch.tensor([-11.0, -23.0]))
    assert [kl_weight(t, 2.0, 100) for t in (0, 50, 100, 500)] == [0.0, 1.0, 2.0, 2.0]
    assert kl_weight(0, 2.0, 0) == 2.0


# ------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("channels, size, levels", [(3, 16, [16, 32]), (1, 32, [8, 16, 16]), (3, 64, [8])])
def test_encoder_decoder_shapes(channels, size, levels):
    cfg = ConvNetConfig(channels=levels, groups=4, hidden_dim=32)
    encoder, decoder = Encoder(cfg, channels, size, 5, cond_dim=7), Decoder(cfg, channels, size, 5, cond_dim=7)
    x0, c = torch.randn(2, channels, size, size), torch.randn(2, 7)
    mu, logvar = encoder(x0, c)
    assert mu.shape == logvar.shape == (2, 5)
    assert decoder(mu, c).shape == (2, channels, size, size)


def test_decoder_depends_on_the_prompt_only_when_conditional():
    z = torch.randn(2, 8)
    lab = tiny_lab()
    with torch.no_grad():
        red, blue = lab.decode(z, ["a red circle"] * 2), lab.decode(z, ["a blue square"] * 2)
        assert (red - blue).abs().max() > 1e-3
        x0 = torch.randn(2, 3, 16, 16)
        assert not torch.allclose(lab.encoder(x0, lab.encode_prompts(["a red circle"] * 2)).mu,
                                  lab.encoder(x0, lab.encode_prompts(["a blue square"] * 2)).mu)
    plain = tiny_lab(conditional=False)
    assert not hasattr(plain, "text_encoder") and plain.ema_modules() == ["encoder", "decoder"]
    with torch.no_grad():
        assert torch.equal(plain.decode(z, ["a red circle"] * 2), plain.decode(z, ["a blue square"] * 2))


def test_sampling_is_seeded_and_leaves_global_rng_alone():
    lab = tiny_lab()
    prompts = ["a red circle", "a small blue square at the top left", ""]
    state = torch.get_rng_state()
    first = lab.sample(prompts, torch.Generator().manual_seed(3))
    again = lab.sample(prompts, torch.Generator().manual_seed(3))
    other = lab.sample(prompts, torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (3, 3, 16, 16) and first.min() >= -1 and first.max() <= 1
    cold = lab.sample(prompts, torch.Generator().manual_seed(3), temperature=0.0)  # z = 0 for every prompt
    assert torch.allclose(cold, lab.decode(torch.zeros(3, 8), prompts))


@pytest.mark.parametrize("path", ["slerp", "linear"])
def test_interpolation_starts_and_ends_at_the_two_prior_draws(path):
    lab = tiny_lab()
    ends = lab.sample(["a red circle"] * 2, torch.Generator().manual_seed(5))  # decodes the same z0, z1
    images = lab.interpolate(["a red circle"] * 6, torch.Generator().manual_seed(5), interpolation=path)
    assert images.shape == (6, 3, 16, 16)
    assert torch.allclose(images[0], ends[0], atol=1e-5) and torch.allclose(images[-1], ends[1], atol=1e-5)
    z0, z1 = torch.randn(1, 16), torch.randn(1, 16)
    z1 = z1 * z0.norm() / z1.norm()  # two points on one sphere
    midway = slerp(z0, z1, torch.tensor([0.0, 0.5, 1.0]))[0]  # (3, Z)
    assert torch.allclose(midway[0], z0[0], atol=1e-5) and torch.allclose(midway[2], z1[0], atol=1e-5)
    angle = torch.acos(F.cosine_similarity(z0, z1))
    assert torch.allclose(F.cosine_similarity(midway[1:2], z0), torch.cos(angle / 2), atol=1e-5)  # halfway round
    assert midway[1].norm().item() == pytest.approx(z0.norm().item(), rel=1e-5)  # ... and on the sphere


# ------------------------------------------------------------------------------ learning
def test_loss_decreases_on_a_fixed_batch_and_logs_its_terms():
    lab = tiny_lab(likelihood="discretized_gaussian", sigma="learned").train()
    torch.manual_seed(0)
    batch = {"image": torch.rand(8, 3, 16, 16).round() * 2 - 1, "caption": ["a red circle", "a blue square"] * 4}
    ctx = FakeContext(lab)
    logged = [lab.training_step(batch, ctx) for _ in range(40)]
    assert logged[-1]["loss"] < 0.7 * logged[0]["loss"]
    assert {"loss", "stats/recon_nats", "stats/kl_nats", "stats/elbo_nats", "stats/bits_per_dim", "stats/beta",
            "stats/sigma"} <= set(logged[-1])
    last = logged[-1]
    assert last["stats/elbo_nats"].item() == pytest.approx(-(last["stats/recon_nats"] + last["stats/kl_nats"]).item())
    assert last["stats/beta"].item() == 1.0 and lab.log_sigma.grad is not None  # the learned sigma trains


def test_trained_tiny_model_reconstructs_its_inputs():
    """Eight distinct block images: each reconstruction is closer to its own input than to any other."""
    gen = torch.Generator().manual_seed(0)
    images = -torch.ones(8, 3, 16, 16)
    for i in range(8):  # a coloured 6x6 square, each at its own place and colour
        top, left = (i // 4) * 8 + 1, (i % 4) * 4
        images[i, :, top:top + 6, left:left + 5] = torch.rand(3, 1, 1, generator=gen) * 2 - 1
    lab = tiny_lab(conditional=False, sigma="fixed", sigma_init=0.1).train()
    ctx = FakeContext(lab)
    batch = {"image": images, "caption": [""] * 8}
    for _ in range(150):
        lab.training_step(batch, ctx)
    recon = lab.eval().reconstruct(images, [""] * 8)
    distances = torch.cdist(recon.flatten(1), images.flatten(1))  # (8, 8): reconstruction i vs input j
    assert torch.equal(distances.argmin(dim=1), torch.arange(8))
    assert distances.diagonal().mean() < 0.5 * distances.mean()


def test_autoencoder_mode_is_deterministic():
    lab = tiny_lab(sample_posterior=False, beta=0.0)
    x0 = torch.randn(2, 3, 16, 16)
    out = [lab(x0, ["a red circle"] * 2) for _ in range(2)]
    assert torch.equal(out[0].z, out[0].mu) and torch.equal(out[0].recon, out[1].recon)


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_presets_compose_and_build(preset):
    cfg = compose(["model=vae", "data=shapes", f"preset={preset}"])
    assert cfg.model.name == "vae" and cfg.model._target_ == "labs.vae.VAELab"
    lab = VAELab(cfg.model, data_info(size=32))
    total = lab.num_parameters()["total"]
    assert {"smoke": total < 150_000, "cpu": 300_000 < total < 2_500_000, "gpu": total > 2_000_000}[preset]


@pytest.mark.parametrize("override, message", [
    ("model.likelihood=laplace", "likelihood"),
    ("model.sigma=optimal", "sigma"),
    ("model.sigma_min=0.5", "sigma_min"),
    ("model.beta=-1", "beta"),
    ("model.p_uncond=1.0", "p_uncond"),
    ("model.interpolation=cubic", "interpolation"),
    ("model.net.channels=[10,16]", "divisible"),
])
def test_bad_config_values_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        compose(["model=vae", "data=shapes", "preset=smoke", override])


def test_image_size_must_fit_the_number_of_levels():
    with pytest.raises(ValueError, match="multiple of"):
        VAELab(tiny_config(net=ConvNetConfig(channels=[8, 8, 8], groups=4)), data_info(size=20))


# ------------------------------------------------------------------------------ end to end
def test_train_checkpoint_then_sample_reconstruct_and_interpolate(tmp_path, monkeypatch):
    import sys

    from lab_utils.commands.cli import main
    from lab_utils.core.data import build_dataset
    from lab_utils.harness.checkpoint import load_lab
    from lab_utils.harness.run import train

    run = tmp_path / "run"
    cfg = compose(["model=vae", "data=shapes", "preset=smoke", f"out={run}"])
    result = train(cfg)
    assert result.step == 4 and (run / "checkpoints" / "last.pt").exists()
    last_row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss/loss", "stats/recon_nats", "stats/kl_nats", "stats/elbo_nats", "stats/bits_per_dim"} <= set(last_row)
    assert sorted(p.name for p in (run / "samples").iterdir())  # training grids were written

    loaded = load_lab(run, device="cpu")
    lab = loaded.lab
    images = [lab.sample(["a red circle"] * 3, torch.Generator().manual_seed(0)) for _ in range(2)]
    assert torch.equal(images[0], images[1]) and images[0].shape == (3, 3, 32, 32)

    test_set = build_dataset(cfg.data, "test")
    x0 = torch.stack([test_set[i]["image"] for i in range(4)])
    recon = lab.reconstruct(x0, [test_set.caption(i) for i in range(4)])
    assert recon.shape == x0.shape and recon.min() >= -1 and recon.max() <= 1
    assert (recon - x0).pow(2).mean() < 1.0  # even after 4 steps, closer than an unrelated image (MSE ~ 1)
    assert lab.interpolate(["a red circle"] * 5, torch.Generator().manual_seed(0)).shape == (5, 3, 32, 32)

    monkeypatch.setattr(sys, "argv", sys.argv[:])  # the CLI rewrites sys.argv for Hydra
    outs = []
    for seed, name in ((3, "a.png"), (3, "b.png"), (4, "c.png")):
        main(["sample", f"run={run}", "prompt=a large green square", "n=4", f"seed={seed}", "device=cpu",
              f"out={tmp_path / name}"])
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
