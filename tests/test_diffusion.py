"""The diffusion lab: known values of the scheduler, samplers, guidance, the UNet's conditioning,
a tiny model that overfits, and an end-to-end train -> `genlab sample` run."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from conftest import data_info
from lab_utils.core.config import compose
from lab_utils.core.schema import ConfigError
from labs.diffusion import (
    CrossAttention, DDPMConfig, DiffusionLab, DiffusionSampleOptions, NoiseScheduler, SchedulerConfig, UNet, UNetConfig,
    attention,
    classifier_free_guidance, cosine_betas, ddim_sample, ddpm_sample, diffusion_loss, patchify, sample_loop,
    unpatchify,
)
from labs.text_encoder import TextEncoderConfig, TextEncoding

def tiny_config(**changes) -> DDPMConfig:
    cfg = DDPMConfig(
        scheduler=SchedulerConfig(num_train_timesteps=50),
        unet=UNetConfig(base_channels=16, channel_mults=[1, 2], self_attention_levels=[1],
                        cross_attention_levels=[0, 1], heads=2, groups=4, emb_mult=2),
        text=TextEncoderConfig(dim=16, depth=1, heads=2, max_length=24),
    )
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def randomize_zero_inits(module: torch.nn.Module, seed: int = 0) -> None:
    """Zero-initialised output layers make a fresh UNet ignore its inputs; give them small weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.abs().sum() == 0:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def tiny_lab(seed: int = 0, **changes) -> DiffusionLab:
    torch.manual_seed(seed)
    lab = DiffusionLab(tiny_config(**changes), data_info())
    randomize_zero_inits(lab, seed)
    return lab.eval()


def linear(T: int, start: float, end: float) -> NoiseScheduler:
    return NoiseScheduler(SchedulerConfig(num_train_timesteps=T, beta_schedule="linear", beta_start=start,
                                          beta_end=end))


# ------------------------------------------------------------------------------ scheduler
def test_linear_schedule_hand_computed_values():
    s = linear(3, 0.1, 0.3)  # betas 0.1, 0.2, 0.3
    assert torch.allclose(s.betas, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    # alpha_bar = 0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7
    assert torch.allclose(s.alpha_bar, torch.tensor([0.9, 0.72, 0.504], dtype=torch.float64))
    # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t, with alpha_bar_{-1} = 1
    expected = torch.tensor([0.0, 0.1 / 0.28 * 0.2, 0.28 / 0.496 * 0.3], dtype=torch.float64)
    assert torch.allclose(s.posterior_variance, expected)


def test_ho_schedule_alpha_bar_at_a_few_t():
    s = linear(1000, 1e-4, 0.02)
    for t in (0, 1, 10, 500, 999):
        betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(t + 1)]
        assert s.alpha_bar[t].item() == pytest.approx(math.prod(1 - b for b in betas), rel=1e-9)
    assert s.alpha_bar[-1].item() == pytest.approx(4.04e-5, rel=0.02)  # Ho et al.'s x_T is almost pure noise


def test_cosine_schedule_follows_its_closed_form():
    T, s_off = 1000, 0.008
    s = NoiseScheduler(SchedulerConfig(num_train_timesteps=T, beta_schedule="cosine", cosine_s=s_off))
    f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert s.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cosine_betas(T).max().item() == pytest.approx(0.999)  # clipped near t = T


def test_add_noise_matches_closed_form_statistics():
    s = linear(1000, 1e-4, 0.02)
    torch.manual_seed(0)
    x0 = torch.full((1, 1, 1, 1), 0.7).expand(200_000, 1, 1, 1)
    for t in (0, 250, 999):
        xt = s.add_noise(x0, torch.randn_like(x0), torch.full((len(x0),), t))
        alpha_bar = s.alpha_bar[t].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(alpha_bar) * 0.7, abs=5e-3)  # sqrt(alpha_bar) x0
        assert xt.var().item() == pytest.approx(1 - alpha_bar, rel=1e-2, abs=1e-4)  # (1 - alpha_bar) I


def test_eps_v_x0_conversions_invert_each_other():
    s = NoiseScheduler(SchedulerConfig())
    torch.manual_seed(0)
    x0, eps = torch.rand(6, 3, 4, 4) * 2 - 1, torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 10, 200, 500, 800, 990])
    xt = s.add_noise(x0, eps, t)
    v = s.velocity(x0, eps, t)
    assert torch.allclose(s.x0_from_eps(xt, eps, t), x0, atol=1e-3)
    assert torch.allclose(s.eps_from_x0(xt, x0, t), eps, atol=1e-3)
    assert torch.allclose(s.x0_from_v(xt, v, t), x0, atol=1e-5)
    assert torch.allclose(s.eps_from_v(xt, v, t), eps, atol=1e-5)
    # v^2 + ... : the (x0, eps) -> (xt, v) map is a rotation, so it preserves norms
    assert torch.allclose(xt**2 + v**2, x0**2 + eps**2, atol=1e-4)


def test_posterior_mean_is_ho_eq_11_for_the_true_x0():
    s = linear(100, 1e-4, 0.05)
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = 40
    xt = s.add_noise(x0, eps, t)
    mean, variance = s.posterior_mean_variance(x0, xt, t)
    beta, alpha, alpha_bar = s.betas[t].item(), s.alphas[t].item(), s.alpha_bar[t].item()
    eq_11 = (xt - beta / math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha)
    assert torch.allclose(mean, eq_11, atol=1e-5)
    assert variance.item() == pytest.approx(s.posterior_variance[t].item(), rel=1e-6)


def test_inference_timesteps():
    s = NoiseScheduler(SchedulerConfig(num_train_timesteps=1000))
    assert s.inference_timesteps(1000).tolist() == list(range(999, -1, -1))
    ts = s.inference_timesteps(50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and (ts[:-1] > ts[1:]).all()
    with pytest.raises(ValueError, match="steps must be in"):
        s.inference_timesteps(1001)


# ------------------------------------------------------------------------------ sampler steps
def test_ddim_step_eta0_is_deterministic_and_true_noise_recovers_x0():
    s = NoiseScheduler(SchedulerConfig(num_train_timesteps=1000))
    torch.manual_seed(0)
    x0, eps = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    t = 700
    xt = s.add_noise(x0, eps, t)
    a = s.ddim_step(eps, t, xt, prev_t=300, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = s.ddim_step(eps, t, xt, prev_t=300, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.prev_sample, b.prev_sample)  # no randomness at eta = 0
    assert torch.allclose(a.pred_x0, x0, atol=1e-4)
    # with the true eps, DDIM moves exactly along q: x_s = sqrt(alpha_bar_s) x0 + sqrt(1 - alpha_bar_s) eps
    assert torch.allclose(a.prev_sample, s.add_noise(x0, eps, 300), atol=1e-4)
    last = s.ddim_step(eps, t, xt, prev_t=-1, eta=0.0)
    assert torch.allclose(last.prev_sample, x0, atol=1e-4)


def test_ddim_eta1_equals_ddpm_ancestral_step():
    s = NoiseScheduler(SchedulerConfig(num_train_timesteps=1000, clip_x0=False))
    torch.manual_seed(0)
    xt, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for t, prev_t in ((500, 499), (500, 480)):
        ddpm = s.ddpm_step(eps, t, xt, prev_t, generator=torch.Generator().manual_seed(3))
        ddim = s.ddim_step(eps, t, xt, prev_t, eta=1.0, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(ddpm.prev_sample, ddim.prev_sample, atol=1e-5)


def test_ddpm_variance_choices():
    torch.manual_seed(0)
    xt, eps = torch.randn(20000, 1, 1, 1), torch.zeros(20000, 1, 1, 1)
    for variance_type in ("fixed_small", "fixed_large"):
        s = NoiseScheduler(SchedulerConfig(num_train_timesteps=100, beta_schedule="linear", beta_end=0.05,
                                           variance_type=variance_type, clip_x0=False))
        step = s.ddpm_step(eps, 50, xt, generator=torch.Generator().manual_seed(0))
        mean, _ = s.posterior_mean_variance(s.x0_from_eps(xt, eps, 50), xt, 50)
        expected = s.posterior_variance[50] if variance_type == "fixed_small" else s.betas[50]
        assert (step.prev_sample - mean).var().item() == pytest.approx(expected.item(), rel=0.05)
        last = s.ddpm_step(eps, 0, xt, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(last.prev_sample, s.x0_from_eps(xt, eps, 0), atol=1e-5)  # no noise at the end


def test_guidance_scale_conventions():
    uncond, cond = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    assert torch.allclose(classifier_free_guidance(uncond, cond, 1.0), cond, atol=1e-6)  # w = 1: conditional
    assert torch.equal(classifier_free_guidance(uncond, cond, 0.0), uncond)  # w = 0: unconditional
    # Ho & Salimans' w' = w - 1: (1 + w') cond - w' uncond
    assert torch.allclose(classifier_free_guidance(uncond, cond, 3.0), 3.0 * cond - 2.0 * uncond, atol=1e-6)


# ------------------------------------------------------------------------------ UNet
def test_attention_explicit_matches_fused_and_masks_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])[:, None, None, :]
    fused, _ = attention(q, k, v, mask)
    explicit, weights = attention(q, k, v, mask, return_weights=True)
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 5))
    assert weights[0, ..., 2].abs().max() == 0 and weights[1, ..., 1:].abs().max() == 0


def test_unet_output_depends_on_prompt_not_on_padding():
    lab = tiny_lab()
    torch.manual_seed(1)
    xt, t = torch.randn(1, 3, 16, 16), torch.tensor([30])
    with torch.no_grad():
        red, blue = lab(xt, t, ["a red circle"]), lab(xt, t, ["a blue circle"])
        assert (red - blue).abs().max() > 1e-3  # the prompt matters
        # the same prompt padded to the length of a longer one in its batch
        batch = lab(xt.expand(2, -1, -1, -1), t.expand(2), ["a red circle", "a small red circle at the top left"])
        assert torch.allclose(batch[0], red[0], atol=1e-5)
        ids, mask = lab.tokenizer(["a red circle"])
        pad = torch.zeros(1, 5, dtype=torch.long)
        encoding = lab.text_encoder(torch.cat([ids, pad], 1), torch.cat([mask, pad.bool()], 1))
        assert torch.allclose(lab.unet(xt, t, encoding), red, atol=1e-5)


def test_unet_odd_sizes_and_grayscale():
    unet = UNet(UNetConfig(base_channels=8, channel_mults=[1, 2, 2], self_attention_levels=[2],
                           cross_attention_levels=[1], heads=2, groups=4), image_channels=1, cond_dim=16)
    lab = tiny_lab()
    context = lab.text_encoder(*lab.tokenizer(["a", "a red circle"]))
    out = unet(torch.randn(2, 1, 28, 28), torch.tensor([0, 5]), context)
    assert out.shape == (2, 1, 28, 28)  # 28 -> 14 -> 7 and back


def test_attention_maps_cover_the_prompt_words():
    lab = tiny_lab()
    maps = lab.attention_maps(torch.randn(2, 3, 16, 16), torch.tensor([10, 10]), ["a red circle", "a red"])
    assert len(maps) == len(lab.unet.cross_attention_modules()) and all(
        isinstance(m, CrossAttention) for m in lab.unet.cross_attention_modules().values())
    weights = maps["down_blocks.0.0.cross_attn"]  # level 0: 16x16
    assert weights.shape == (2, 2, 16, 16, 4)  # (B, heads, H, W, L): [CLS] a red circle
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 16, 16), atol=1e-5)
    assert weights[1, ..., 3].abs().max() == 0  # "a red" is padded: no attention to [PAD]
    assert all(layer.attention_weights is None for layer in lab.unet.cross_attention_modules().values())


# ------------------------------------------------------------------------------ sampling
def test_sampling_is_seeded_and_leaves_global_rng_alone():
    lab = tiny_lab()
    state = torch.get_rng_state()
    a = lab.sample(["a red circle"] * 2, torch.Generator().manual_seed(0), sampler="ddim", steps=5)
    b = lab.sample(["a red circle"] * 2, torch.Generator().manual_seed(0), sampler="ddim", steps=5)
    c = lab.sample(["a red circle"] * 2, torch.Generator().manual_seed(1), sampler="ddim", steps=5)
    d = lab.sample(["a red circle"] * 2, torch.Generator().manual_seed(0), sampler="ddpm", steps=50)
    e = lab.sample(["a red circle"] * 2, torch.Generator().manual_seed(0), sampler="ddpm", steps=50)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and torch.equal(d, e) and not torch.equal(a, c)
    assert a.shape == (2, 3, 16, 16) and a.min() >= -1 and a.max() <= 1


def test_guidance_one_is_the_conditional_model_and_nfe():
    lab = tiny_lab()
    prompts = ["a red circle", "a blue square"]
    guided = lab.generate(prompts, torch.Generator().manual_seed(0), sampler="ddim", steps=4, guidance=1.0)
    context = lab.encode_prompts(prompts)
    manual = ddim_sample(lambda xt, t: lab.unet(xt, t, context), lab.scheduler, (2, 3, 16, 16), 4,
                         torch.Generator().manual_seed(0))
    assert torch.allclose(guided.images, manual.images, atol=1e-6)
    assert guided.nfe == 4 == lab.nfe(sampler="ddim", steps=4, guidance=1.0)
    # w != 1 batches the conditional and unconditional passes together; the same as two separate passes
    w = 2.5
    uncond = lab.encode_prompts(["", ""])

    def denoise(xt, t):
        return classifier_free_guidance(lab.unet(xt, t, uncond), lab.unet(xt, t, context), w)

    with torch.no_grad():
        manual = ddim_sample(denoise, lab.scheduler, (2, 3, 16, 16), 4, torch.Generator().manual_seed(0))
    guided = lab.generate(prompts, torch.Generator().manual_seed(0), sampler="ddim", steps=4, guidance=w)
    # batch-size-dependent float rounding (~1e-6 per pass) grows a little over the steps
    assert torch.allclose(guided.images, manual.images, atol=2e-3)
    assert guided.nfe == 8 == lab.nfe(sampler="ddim", steps=4, guidance=w)


def test_trajectory_and_config_defaults():
    lab = tiny_lab(sampling=DiffusionSampleOptions(sampler="ddpm", steps=40, guidance=2.0))
    out = lab.sample_trajectory(["a red circle"], torch.Generator().manual_seed(0), steps=10)
    assert len(out.intermediates) == 11 and len(out.pred_x0) == 10 and out.nfe == 20
    assert torch.allclose(out.intermediates[-1].clamp(-1, 1), out.images)
    assert lab.nfe() == 80  # config defaults: ddpm, 40 steps, guidance 2


# ------------------------------------------------------------------------------ training
class FakeContext:
    """The StepContext protocol without the trainer: plain backward and step."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer, self.step, self.device = optimizer, 0, torch.device("cpu")

    def optimize(self, name: str, loss_fn):
        self.optimizer.zero_grad()
        output = loss_fn()  # the lab passes a function (the trainer runs it inside DDP's forward)
        (output["loss"] if isinstance(output, dict) else output).backward()
        self.optimizer.step()
        self.step += 1
        return output

    def autocast(self):
        return contextlib.nullcontext()


def overfit_batch() -> dict:
    """Four 16x16 images of a coloured square on black."""
    images = -torch.ones(4, 3, 16, 16)
    colours = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], dtype=torch.float32)
    for i, (r, c) in enumerate([(2, 2), (8, 2), (2, 8), (8, 8)]):
        images[i, :, r:r + 6, c:c + 6] = colours[i][:, None, None]
    return {"image": images, "caption": ["a red square", "a green square", "a blue square", "a square"],
            "labels": torch.zeros(4, 1)}


def test_tiny_model_overfits_one_batch():
    # min-SNR weighting discounts the nearly clean levels, where eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)
    # amplifies any error in recalling x0 ~70x: there the plain loss of a tiny model plateaus near 0.1.
    torch.manual_seed(0)
    lab = DiffusionLab(tiny_config(lr=3e-3, p_uncond=0.0, min_snr_gamma=5.0), data_info()).train()
    ctx = FakeContext(lab.configure_optimizers()["model"])
    batch = overfit_batch()

    def eval_loss() -> float:  # the same t and eps every time, so losses are comparable
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(123)
            return sum(lab.loss(batch["image"], batch["caption"]).item() for _ in range(8)) / 8

    before = eval_loss()
    for _ in range(150):
        losses = lab.training_step(batch, ctx)
    after = eval_loss()
    assert set(losses) == {"loss"} and ctx.step == 150
    assert after < before / 10, (before, after)


def test_min_snr_weighting_lowers_the_weight_of_low_noise_levels():
    lab, plain = tiny_lab(min_snr_gamma=5.0), tiny_lab()
    x0 = overfit_batch()["image"].repeat(16, 1, 1, 1)  # 64 images: some t with SNR > 5 for sure
    losses = []
    for model in (lab, plain):
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(7)
            losses.append(model.loss(x0, ["a red square"] * 64).item())
    weighted, unweighted = losses
    assert 0.3 * unweighted < weighted < unweighted  # weights min(SNR_t, 5) / SNR_t <= 1


# ------------------------------------------------------------------------------ targets, levels, weights, patches
@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "edm"])
def test_every_prediction_type_gives_back_x0_from_its_own_target(prediction):
    scheduler = NoiseScheduler(SchedulerConfig(num_train_timesteps=100, prediction_type=prediction, sigma_data=0.3,
                                               clip_x0=False))
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=generator)
    t = torch.tensor([0, 30, 70, 95])  # x0 from eps at t = 99 (alpha_bar ~ 1e-5) would divide noise by ~0.003
    xt = scheduler.add_noise(x0, eps, t)
    torch.testing.assert_close(scheduler.pred_x0(scheduler.target(x0, eps, t), xt, t), x0, atol=1e-4, rtol=0)


def test_edm_preconditioning_with_unit_sigma_data_is_minus_v_and_its_target_has_unit_variance():
    edm = NoiseScheduler(SchedulerConfig(prediction_type="edm", sigma_data=1.0))
    v = NoiseScheduler(SchedulerConfig(prediction_type="v"))
    generator = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4096, generator=generator), torch.randn(2, 4096, generator=generator)
    t = torch.tensor([10, 900])
    torch.testing.assert_close(edm.target(x0, eps, t), -v.target(x0, eps, t), atol=1e-5, rtol=1e-5)
    # with data of std sigma_data (and mean 0), F* = (x0 - c_skip x_t) / c_out has unit variance at every level
    scaled = NoiseScheduler(SchedulerConfig(prediction_type="edm", sigma_data=0.3))
    for level in (5, 300, 600, 990):
        target = scaled.target(0.3 * x0, eps, torch.full((2,), level))
        assert abs(target.var().item() - 1.0) < 0.1, (level, target.var().item())


def test_a_drawn_log_snr_becomes_the_first_level_at_or_below_it():
    scheduler = NoiseScheduler(SchedulerConfig(num_train_timesteps=1000, snr_shift=2.0))
    table = scheduler.snr(torch.arange(1000)).double().log()  # decreasing
    draws = torch.tensor([50.0, table[0].item(), 3.0, 0.0, -2.5, table[999].item(), -50.0])
    levels = scheduler.level_of_log_snr(draws)
    assert levels[0] == 0 and levels[1] == 0 and levels[-1] == 999 and levels[-2] == 999
    for draw, level in zip(draws[2:5].tolist(), levels[2:5].tolist()):
        assert table[level] >= draw - 1e-4 > table[level + 1] - 1e-4 or level == 999, (draw, level)
    assert torch.all(levels[1:] >= levels[:-1])  # less SNR, more noise


def test_log_snr_normal_training_levels_follow_their_density():
    lab = DiffusionLab(tiny_config(timestep_sampling="log_snr_normal", log_snr_mean=1.0, log_snr_std=2.0,
                                   scheduler=SchedulerConfig(num_train_timesteps=1000)), data_info())
    seen = []

    class Recorder(torch.nn.Module):  # records the levels it is asked about
        def forward(self, xt, t, context):
            seen.append(t)
            return torch.zeros_like(xt)

    lab.unet = Recorder()
    torch.manual_seed(0)
    lab.loss(torch.zeros(4000, 3, 2, 2), [""] * 4000)
    log_snr = lab.scheduler.snr(seen[0]).log()
    assert abs(log_snr.median().item() - 1.0) < 0.15  # the draw's median, up to the levels' spacing and sampling
    assert abs((log_snr > 3.0).float().mean().item() - 0.159) < 0.03  # P(N(1, 2^2) > 3) = P(Z > 1)


def test_flow_weighting_weights_x0_errors_by_one_plus_root_snr_squared():
    scheduler = NoiseScheduler(SchedulerConfig(num_train_timesteps=100, prediction_type="v", clip_x0=False))
    generator = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 3, 4, 4, generator=generator) * 2 - 1
    wrong = x0 + 0.1 * torch.randn(3, 3, 4, 4, generator=generator)  # the "model" predicts v for another x0
    eps = torch.randn(3, 3, 4, 4, generator=generator)
    t = torch.tensor([5, 50, 90])

    def model(xt, levels, cond):
        return scheduler.target(wrong, scheduler.eps_from_x0(xt, wrong, levels), levels)

    snr = scheduler.snr(t)
    x0_mse = ((scheduler.pred_x0(model(scheduler.add_noise(x0, eps, t), t, None), scheduler.add_noise(x0, eps, t), t)
               - x0) ** 2).mean(dim=(1, 2, 3))
    expected = ((1 + snr.sqrt()) ** 2 * x0_mse).mean()
    torch.testing.assert_close(diffusion_loss(model, scheduler, x0, t, eps, None, flow_weighting=True), expected,
                               rtol=1e-4, atol=0)
    plain = diffusion_loss(model, scheduler, x0, t, eps, None)
    torch.testing.assert_close(plain, ((snr + 1) * x0_mse).mean(), rtol=1e-4, atol=0)  # v's own weight: SNR + 1


def test_patchify_is_a_lossless_reshuffle_of_each_patch_into_channels():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    patches = patchify(x, 4)
    assert patches.shape == (2, 48, 2, 2)
    # channel c p^2 + i p + j at patch position (a, b) holds pixel (4 a + i, 4 b + j) of channel c
    c, i, j, a, b = 2, 1, 3, 1, 0
    assert patches[1, c * 16 + i * 4 + j, a, b] == x[1, c, 4 * a + i, 4 * b + j]
    assert torch.equal(unpatchify(patches, 4), x) and torch.equal(patchify(x, 1), x)
    # the UNet at patch size 4 keeps the image's shape and runs its levels at 8 and 4 positions a side for 32 px
    net = UNet(UNetConfig(base_channels=16, channel_mults=[1, 1], self_attention_levels=[], cross_attention_levels=[1],
                          heads=2, groups=4, patch_size=4), image_channels=3, cond_dim=16)
    sizes = []
    net.conv_in.register_forward_hook(lambda module, inputs, out: sizes.append(tuple(out.shape[-2:])))
    context = TextEncoding(tokens=torch.zeros(2, 3, 16), mask=torch.ones(2, 3, dtype=torch.bool),
                           pooled=torch.zeros(2, 16))
    assert net(torch.zeros(2, 3, 32, 32), torch.tensor([1, 2]), context).shape == (2, 3, 32, 32)
    assert sizes == [(8, 8)]


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_presets_compose_and_build(preset):
    cfg = compose(["model=ddpm", "data=shapes", f"preset={preset}"])
    assert cfg.model.name == "ddpm" and cfg.model._target_ == "labs.diffusion.DiffusionLab"
    if preset == "smoke":
        lab = DiffusionLab(cfg.model, data_info(size=32))
        assert lab.num_parameters()["total"] < 100_000


@pytest.mark.parametrize("override, message", [
    ("model.scheduler.beta_schedule=quadratic", "beta_schedule"),
    ("model.scheduler.prediction_type=x1", "prediction_type"),
    ("model.scheduler.sigma_data=0", "sigma_data"),
    ("model.timestep_sampling=beta", "timestep_sampling"),
    ("model.log_snr_std=0", "log_snr_std"),
    ("model.log_snr_mean=nan", "log_snr_mean"),
    ("model.min_snr_gamma=5 model.flow_weighting=true", "flow_weighting"),
    ("model.sampling.sampler=euler", "sampling.sampler"),
    ("model.p_uncond=1.5", "p_uncond"),
    ("model.unet.self_attention_levels=[5]", "self_attention_levels"),
    ("model.unet.base_channels=30", "divisible"),
])
def test_bad_config_values_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        compose(["model=ddpm", "data=shapes", "preset=smoke", *override.split()])


# ------------------------------------------------------------------------------ end to end
def test_train_checkpoint_then_genlab_sample_reproduces_pixels(tmp_path, monkeypatch):
    import sys

    from lab_utils.commands.cli import main
    from lab_utils.harness.checkpoint import load_lab
    from lab_utils.harness.run import train

    run = tmp_path / "run"
    result = train(compose(["model=ddpm", "data=shapes", "preset=smoke", f"out={run}"]))
    assert result.step == 4 and (run / "checkpoints" / "last.pt").exists()
    assert sorted(p.name for p in (run / "samples").iterdir())  # training grids were written

    monkeypatch.setattr(sys, "argv", sys.argv[:])  # the CLI rewrites sys.argv for Hydra
    outs = []
    for seed, name in ((3, "a.png"), (3, "b.png"), (4, "c.png")):
        main(["sample", f"run={run}", "prompt=a large green square at the bottom right", "n=4", f"seed={seed}",
              "sampler=ddim", "steps=5", "guidance=3", "device=cpu", f"out={tmp_path / name}"])
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]

    loaded = load_lab(run, device="cpu")
    images = [loaded.lab.sample(["a red circle"] * 2, torch.Generator().manual_seed(0), sampler="ddpm", steps=50)
              for _ in range(2)]
    assert torch.equal(images[0], images[1])


# ------------------------------------------------------------------------------ notebook exercises
def test_exercise_checks_pass_the_reference_and_catch_known_mistakes(capsys):
    from labs.diffusion import exercises as ex

    def add_noise(x0, eps, t, alpha_bar):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def ddim_step(xt, eps, t, prev_t, alpha_bar):
        a, a_prev = alpha_bar[t].item(), (alpha_bar[prev_t].item() if prev_t >= 0 else 1.0)
        return a_prev**0.5 * (xt - (1 - a) ** 0.5 * eps) / a**0.5 + (1 - a_prev) ** 0.5 * eps

    def ddpm_step(xt, eps, t, betas, alpha_bar, z):
        beta, a, a_prev = betas[t].item(), alpha_bar[t].item(), (alpha_bar[t - 1].item() if t else 1.0)
        mean = (xt - beta / (1 - a) ** 0.5 * eps) / (1 - beta) ** 0.5
        return mean if t == 0 else mean + ((1 - a_prev) / (1 - a) * beta) ** 0.5 * z

    assert ex.check_add_noise(add_noise) and ex.check_ddim_step(ddim_step) and ex.check_ddpm_step(ddpm_step)
    assert ex.check_guidance(lambda u, c, w: u + w * (c - u))
    capsys.readouterr()
    # the lab's own code is refused as an answer (answers from scratch: tests/test_exercises_vae_and_text.py)
    assert not ex.check_guidance(classifier_free_guidance) and not ex.check_cross_attention(CrossAttention)
    assert not ex.check_attention_weights(lambda q, k, mask: attention(q, k, k, mask, return_weights=True)[1])
    assert capsys.readouterr().out.count("calls the lab's") == 3
    assert not ex.check_guidance(lambda u, c, w: (1 + w) * c - w * u)
    assert "Ho & Salimans" in capsys.readouterr().out
    assert not ex.check_ddim_step(lambda xt, eps, t, p, ab: ddim_step(xt, eps, t, p % len(ab), ab))
    assert "last" in capsys.readouterr().out


def test_coordinate_channels_hold_x_and_y_and_feed_the_first_convolution():
    from labs.diffusion import UNet, UNetConfig, coordinate_grid

    grid = coordinate_grid(torch.zeros(2, 3, 4, 5))  # (B, 2, H, W)
    assert grid.shape == (2, 2, 4, 5)
    assert torch.equal(grid[0, 0, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))  # x along a row
    torch.testing.assert_close(grid[0, 1, :, 0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))  # y down a column
    small = dict(base_channels=8, channel_mults=[1, 2], heads=2, groups=4, self_attention_levels=[1],
                 cross_attention_levels=[1])
    plain, coords = UNet(UNetConfig(**small), 3, 16), UNet(UNetConfig(**small, coord_channels=True), 3, 16)
    assert plain.conv_in.in_channels == 3 and coords.conv_in.in_channels == 5
    assert UNetConfig().coord_channels is False  # a plain UNet; DDPMConfig turns them on
    # checkpoints saved before the option load unchanged: a DDPM config without the key means none
    assert DDPMConfig().unet.coord_channels and DDPMConfig.SAVED_WITHOUT == {"unet.coord_channels": False}


def test_patches_fold_pixels_into_channels_and_unfold_them_exactly():
    from labs.diffusion import UNet, UNetConfig

    small = dict(base_channels=8, channel_mults=[1, 2], heads=2, groups=4, self_attention_levels=[1],
                 cross_attention_levels=[1], coord_channels=True)
    unet = UNet(UNetConfig(**small, patch_size=2), 3, 16)
    assert unet.conv_in.in_channels == 3 * 4 + 2 and unet.conv_out.out_channels == 3 * 4
    randomize_zero_inits(unet)
    context = tiny_lab().encode_prompts(["a red circle", "a blue square"])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    with torch.no_grad():
        out = unet(x, t, context)
        assert out.shape == (2, 3, 16, 16)
        # the output's pixel (y, x) is channel c * 4 + (y % 2) * 2 + (x % 2) of the last conv at (y // 2, x // 2)
        h = unet.conv_out.register_forward_hook(lambda m, i, o: setattr(m, "seen", o))
        unet(x, t, context)
        h.remove()
        folded = unet.conv_out.seen  # (2, 12, 8, 8)
        assert torch.equal(out[:, 1, 3, 4], folded[:, 1 * 4 + 1 * 2 + 0, 1, 2])
    with pytest.raises(ValueError, match="patch_size"):
        unet(torch.randn(1, 3, 15, 15), torch.tensor([1]), tiny_lab().encode_prompts(["a"]))
    with pytest.raises(ValueError, match="patch_size=3 does not divide"):
        DiffusionLab(tiny_config(unet=UNetConfig(**small, patch_size=3)), data_info())


def test_text_map_starts_as_no_change_and_then_writes_where_the_prompt_says():
    from labs.diffusion import UNet, UNetConfig

    small = dict(base_channels=8, channel_mults=[1, 2], heads=2, groups=4, self_attention_levels=[1],
                 cross_attention_levels=[1])
    torch.manual_seed(0)
    plain = UNet(UNetConfig(**small), 3, 16)
    torch.manual_seed(0)
    mapped = UNet(UNetConfig(**small, text_map_channels=4, text_map_size=4), 3, 16)
    missing, unexpected = mapped.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("text_map") for name in missing)
    randomize_zero_inits(plain)
    mapped.load_state_dict(plain.state_dict(), strict=False)
    context = tiny_lab().encode_prompts(["a red circle at the top left", "a red circle at the bottom right"])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 10])
    with torch.no_grad():
        assert torch.allclose(mapped(x, t, context), plain(x, t, context), atol=1e-6)  # zero-initialised: no change
        mapped.text_map_out.weight.normal_()
        changed = mapped(x, t, context) - plain(x, t, context)
    assert changed.abs().amax(dim=(1, 2, 3)).min() > 1e-4  # both prompts now write into the bottleneck
    with pytest.raises(ValueError, match="text_map_channels"):
        UNetConfig(**small, text_map_channels=-1)


def test_snr_shift_divides_the_snr_by_shift_squared_and_one_is_no_shift():
    plain = NoiseScheduler(SchedulerConfig())
    assert torch.equal(NoiseScheduler(SchedulerConfig(snr_shift=1.0)).alpha_bar, plain.alpha_bar)
    shifted = NoiseScheduler(SchedulerConfig(snr_shift=3.0))
    t = torch.arange(0, 900, 7)  # below the last few levels, where max_beta clips the betas
    torch.testing.assert_close(shifted.snr(t), plain.snr(t) / 9, rtol=1e-4, atol=0)
    assert (shifted.alpha_bar.diff() < 0).all() and shifted.alpha_bar[-1] < plain.alpha_bar[-1] + 1e-12
    with pytest.raises(ValueError, match="snr_shift"):
        SchedulerConfig(snr_shift=0.0)


def test_text_encoder_gets_its_own_learning_rate():
    lab = tiny_lab(lr=2e-3, text_lr=1e-4)
    (optimizer,) = lab.configure_optimizers().values()
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert all(rates[id(p)] == 1e-4 for p in lab.text_encoder.parameters())
    assert all(rates[id(p)] == 2e-3 for p in lab.unet.parameters())
    assert len(rates) == sum(1 for _ in lab.parameters())  # every parameter, once
    (same,) = tiny_lab(lr=2e-3).configure_optimizers().values()
    assert {group["lr"] for group in same.param_groups} == {2e-3}  # text_lr null: the one rate


def test_one_sampling_loop_matches_a_hand_written_ancestral_loop():
    """`sample_loop` with the DDPM step is Algorithm 2 written out: same noise draws, same images."""
    scheduler = NoiseScheduler(SchedulerConfig(num_train_timesteps=20))
    weight = torch.linspace(-0.5, 0.5, 3).view(1, 3, 1, 1)

    def denoise(xt, t):  # an analytic "network": eps prediction depending on x_t and t
        return torch.tanh(xt * weight) * (t.float().view(-1, 1, 1, 1) + 1) / 20

    out = sample_loop(denoise, scheduler, (2, 3, 4, 4), 5, torch.Generator().manual_seed(3), sampler="ddpm",
                      return_intermediates=True)
    generator = torch.Generator().manual_seed(3)
    xt = torch.randn((2, 3, 4, 4), generator=generator)  # x_T
    levels = scheduler.inference_timesteps(5).tolist() + [-1]
    for t, prev_t in zip(levels[:-1], levels[1:]):
        xt = scheduler.ddpm_step(denoise(xt, torch.full((2,), t)), t, xt, prev_t, generator=generator).prev_sample
    assert torch.equal(out.images, xt.clamp(-1, 1))
    assert len(out.intermediates) == 6 and out.timesteps.tolist() == levels[:-1]
    assert torch.equal(out.images, ddpm_sample(denoise, scheduler, (2, 3, 4, 4), 5,
                                               torch.Generator().manual_seed(3)).images)
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample_loop(denoise, scheduler, (2, 3, 4, 4), 5, torch.Generator(), sampler="euler")


def test_scheduler_indexes_its_tables_on_the_tensors_device():
    """With x0, eps and t on the meta device (no data, so any copy to the host fails), the training
    path and a sampling step still run: the tables are indexed on t's device, never through the CPU."""
    scheduler = NoiseScheduler(SchedulerConfig(num_train_timesteps=50, prediction_type="v"))
    x0 = torch.empty(4, 3, 8, 8, device="meta")
    t = torch.empty(4, dtype=torch.long, device="meta")
    assert scheduler.add_noise(x0, x0, t).device.type == "meta"
    assert scheduler.target(x0, x0, t).device.type == "meta"
    assert scheduler.snr(t).device.type == "meta" and scheduler.snr(t).dtype == torch.float32
    assert scheduler.pred_x0(x0, x0, t).device.type == "meta"
    # a sampling step at one level for the batch (an int t): coefficients are CPU scalars, no copy
    step = scheduler.ddim_step(x0, 10, x0, 5)
    assert step.prev_sample.device.type == "meta" and step.pred_x0.device.type == "meta"
    # and on the CPU the per-sample and the scalar paths give the same numbers
    x0 = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    per_sample = scheduler.add_noise(x0, -x0, torch.tensor([7, 7, 7]))
    assert torch.allclose(per_sample, scheduler.add_noise(x0, -x0, 7), atol=1e-7)
