"""The graded exercises of notebooks 03 (diffusion, and rectified flow in its section 5) and 06 (latent diffusion).

For every check: an answer written from scratch passes; each known mistake, written as a student would write it,
gets its own message; an answer that calls the lab's code it is compared with fails with "calls the lab's"; a
wrong answer sees the hint's idea first and its detail on the second try; an unwritten answer fails with
"not implemented yet" and ``pick`` hands the notebook a working fallback with the student's signature.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import nbformat
import pytest
import torch
from torch import nn

import lab_utils.core.exercises.checks as checks
import labs.diffusion.exercises as diffusion_exercises
import labs.flow.exercises as flow_exercises
import labs.latent_diffusion.exercises as latent_exercises
from conftest import data_info
from lab_utils.core.exercises.cases import Hint
from labs.diffusion import DiffusionLab, NoiseScheduler, SchedulerConfig, diffusion_loss
from labs.flow import FlowLab, flow_matching_loss
from labs.flow import add_noise as flow_add_noise
from labs.flow import velocity as flow_velocity
from labs.latent_diffusion import AutoencoderConfig, KLAutoencoder, LatentDiffusionLab

NOTEBOOKS = {"03_diffusion": (diffusion_exercises, flow_exercises), "06_latent_diffusion": (latent_exercises,)}


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    """Checks print and return a result (no raise); the two-step hints start from the first try in every test."""
    monkeypatch.delenv("GENLAB_STRICT_CHECKS", raising=False)
    monkeypatch.setattr(checks, "_FAILURES", {})


# --------------------------------------------------------------------------- answers written from scratch
def add_noise(x0, eps, t, alpha_bar):
    a = alpha_bar[t][:, None, None, None]  # (B, 1, 1, 1)
    return torch.sqrt(a) * x0 + torch.sqrt(1 - a) * eps


def ddpm_step(xt, eps, t, betas, alpha_bar, z):
    beta, a = float(betas[t]), float(alpha_bar[t])
    a_prev = float(alpha_bar[t - 1]) if t > 0 else 1.0
    mean = (xt - beta / (1 - a) ** 0.5 * eps) / (1 - beta) ** 0.5
    return mean if t == 0 else mean + ((1 - a_prev) / (1 - a) * beta) ** 0.5 * z


def ddim_step(xt, eps, t, prev_t, alpha_bar):
    a = float(alpha_bar[t])
    a_prev = float(alpha_bar[prev_t]) if prev_t >= 0 else 1.0
    x0 = (xt - (1 - a) ** 0.5 * eps) / a**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def ddpm_loss(eps_model, x0, t, eps, alpha_bar, cond):
    prediction = eps_model(add_noise(x0, eps, t, alpha_bar), t, cond)
    return nn.functional.mse_loss(prediction, eps)


def training_step(eps_model, optimizer, x0, t, eps, alpha_bar, cond):
    optimizer.zero_grad()
    loss = ddpm_loss(eps_model, x0, t, eps, alpha_bar, cond)
    loss.backward()
    optimizer.step()
    return loss.item()


def flow_loss(v_model, x0, t, eps, cond):
    t4 = t[:, None, None, None]  # (B, 1, 1, 1)
    xt = x0 + t4 * (eps - x0)  # (1 - t) x0 + t eps, written another way
    return nn.functional.mse_loss(v_model(xt, t, cond), eps - x0)


def scale_and_shift(z):
    flat = z.flatten().double()
    return float(1 / flat.std()), float(flat.mean())


def encode_to_latents(autoencoder, images, s, m):
    with torch.no_grad():
        return s * (autoencoder.encode(images).mu - m)


def latent_ddim_step(zt, v, t, prev_t, alpha_bar):
    a = float(alpha_bar[t])
    a_prev = float(alpha_bar[prev_t]) if prev_t >= 0 else 1.0
    z0, eps = a**0.5 * zt - (1 - a) ** 0.5 * v, (1 - a) ** 0.5 * zt + a**0.5 * v
    return a_prev**0.5 * z0 + (1 - a_prev) ** 0.5 * eps


# --------------------------------------------------------------------------- the usual mistakes, as written
def noise_without_roots(x0, eps, t, alpha_bar):
    a = alpha_bar[t].view(-1, 1, 1, 1)
    return a * x0 + (1 - a) * eps


def noise_with_alpha_t(x0, eps, t, alpha_bar):
    alphas = alpha_bar / torch.cat([torch.ones(1), alpha_bar[:-1]])  # alpha_t = alpha_bar_t / alpha_bar_{t-1}
    return add_noise(x0, eps, t, alphas)


def ddpm_noise_at_zero(xt, eps, t, betas, alpha_bar, z):
    out = ddpm_step(xt, eps, t, betas, alpha_bar, z)
    return out + float(betas[0]) ** 0.5 * z if t == 0 else out


def ddpm_beta_variance(xt, eps, t, betas, alpha_bar, z):
    mean = ddpm_step(xt, eps, t, betas, alpha_bar, torch.zeros_like(z))
    return mean if t == 0 else mean + float(betas[t]) ** 0.5 * z


def ddim_clean_is_level_zero(xt, eps, t, prev_t, alpha_bar):
    return ddim_step(xt, eps, t, max(prev_t, 0), alpha_bar)


def ddim_python_index(xt, eps, t, prev_t, alpha_bar):
    a, a_prev = float(alpha_bar[t]), float(alpha_bar[prev_t])  # alpha_bar[-1]: the last entry
    x0 = (xt - (1 - a) ** 0.5 * eps) / a**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def loss_without_roots(eps_model, x0, t, eps, alpha_bar, cond):
    return (eps - eps_model(noise_without_roots(x0, eps, t, alpha_bar), t, cond)).pow(2).mean()


def loss_on_x0(eps_model, x0, t, eps, alpha_bar, cond):
    return nn.functional.mse_loss(eps_model(add_noise(x0, eps, t, alpha_bar), t, cond), x0)


def loss_on_clean_input(eps_model, x0, t, eps, alpha_bar, cond):
    return nn.functional.mse_loss(eps_model(x0, t, cond), eps)


def loss_summed_per_image(eps_model, x0, t, eps, alpha_bar, cond):
    error = (eps - eps_model(add_noise(x0, eps, t, alpha_bar), t, cond)) ** 2
    return error.flatten(1).sum(1).mean()


def loss_absolute(eps_model, x0, t, eps, alpha_bar, cond):
    return nn.functional.l1_loss(eps_model(add_noise(x0, eps, t, alpha_bar), t, cond), eps)


def step_without_zero_grad(eps_model, optimizer, x0, t, eps, alpha_bar, cond):
    loss = ddpm_loss(eps_model, x0, t, eps, alpha_bar, cond)
    loss.backward()
    optimizer.step()
    return loss.item()


def step_without_update(eps_model, optimizer, x0, t, eps, alpha_bar, cond):
    optimizer.zero_grad()
    loss = ddpm_loss(eps_model, x0, t, eps, alpha_bar, cond)
    loss.backward()
    return loss.item()


def flow_path_reversed(v_model, x0, t, eps, cond):
    t4 = t[:, None, None, None]
    return nn.functional.mse_loss(v_model(t4 * x0 + (1 - t4) * eps, t, cond), eps - x0)


def flow_velocity_backwards(v_model, x0, t, eps, cond):
    t4 = t[:, None, None, None]
    return nn.functional.mse_loss(v_model((1 - t4) * x0 + t4 * eps, t, cond), x0 - eps)


def flow_eps_target(v_model, x0, t, eps, cond):
    t4 = t[:, None, None, None]
    return nn.functional.mse_loss(v_model((1 - t4) * x0 + t4 * eps, t, cond), eps)


def flow_x0_target(v_model, x0, t, eps, cond):
    t4 = t[:, None, None, None]
    return nn.functional.mse_loss(v_model((1 - t4) * x0 + t4 * eps, t, cond), x0)


def flow_clean_input(v_model, x0, t, eps, cond):
    return nn.functional.mse_loss(v_model(x0, t, cond), eps - x0)


def flow_ddpm_weights(v_model, x0, t, eps, cond):
    t4 = t[:, None, None, None]
    return nn.functional.mse_loss(v_model(torch.sqrt(1 - t4) * x0 + torch.sqrt(t4) * eps, t, cond), eps - x0)


def flow_summed_per_image(v_model, x0, t, eps, cond):
    t4 = t[:, None, None, None]
    return ((v_model((1 - t4) * x0 + t4 * eps, t, cond) - (eps - x0)) ** 2).flatten(1).sum(1).mean()


def scale_per_channel(z):
    return float(1 / z.std(dim=(0, 2, 3)).mean()), float(z.mean())


def scale_is_std(z):
    return float(z.std()), float(z.mean())


def latents_without_shift(autoencoder, images, s, m):
    with torch.no_grad():
        return s * autoencoder.encode(images).mu


def latents_shifted_after_scaling(autoencoder, images, s, m):
    with torch.no_grad():
        return s * autoencoder.encode(images).mu - m


def latents_from_logvar(autoencoder, images, s, m):
    with torch.no_grad():
        return s * (autoencoder.encode(images).logvar - m)


def latent_step_as_eps(zt, v, t, prev_t, alpha_bar):
    return ddim_step(zt, v, t, prev_t, alpha_bar)


def latent_step_clipped(zt, v, t, prev_t, alpha_bar):
    a = float(alpha_bar[t])
    a_prev = float(alpha_bar[prev_t]) if prev_t >= 0 else 1.0
    z0 = (a**0.5 * zt - (1 - a) ** 0.5 * v).clamp(-1, 1)
    eps = (zt - a**0.5 * z0) / (1 - a) ** 0.5
    return a_prev**0.5 * z0 + (1 - a_prev) ** 0.5 * eps


# --------------------------------------------------------------------------- answers that call the lab's code
def table_scheduler(alpha_bar, **config) -> NoiseScheduler:
    scheduler = NoiseScheduler(SchedulerConfig(num_train_timesteps=len(alpha_bar), clip_x0=False, **config))
    scheduler.alpha_bar = alpha_bar.double()
    return scheduler


def add_noise_by_the_lab(x0, eps, t, alpha_bar):
    return table_scheduler(alpha_bar).add_noise(x0, eps, t)


def ddpm_step_by_the_lab(xt, eps, t, betas, alpha_bar, z):
    scheduler = table_scheduler(alpha_bar)
    mean, variance = scheduler.posterior_mean_variance(scheduler.x0_from_eps(xt, eps, t), xt, t)
    return mean if t == 0 else mean + variance.sqrt() * z


def ddim_step_by_the_lab(xt, eps, t, prev_t, alpha_bar):
    return table_scheduler(alpha_bar).ddim_step(eps, t, xt, prev_t).prev_sample


def loss_by_the_lab(eps_model, x0, t, eps, alpha_bar, cond):
    return diffusion_loss(eps_model, table_scheduler(alpha_bar), x0, t, eps, cond)


def step_by_the_lab(eps_model, optimizer, x0, t, eps, alpha_bar, cond):
    return diffusion_exercises.reference_training_step(eps_model, optimizer, x0, t, eps, alpha_bar, cond)


def flow_loss_by_the_lab(v_model, x0, t, eps, cond):
    return flow_matching_loss(v_model, x0, t, eps, cond)


def flow_loss_from_the_lab_path(v_model, x0, t, eps, cond):
    return nn.functional.mse_loss(v_model(flow_add_noise(x0, eps, t), t, cond), flow_velocity(x0, eps))


def flow_loss_by_the_lab_object(v_model, x0, t, eps, cond):
    return FlowLab.loss(v_model, x0, cond)


def scale_and_shift_by_the_lab(z):
    identity = types.SimpleNamespace(encode=lambda x: types.SimpleNamespace(sample=lambda: x))
    return LatentDiffusionLab.measure_scale_factor(types.SimpleNamespace(autoencoder=identity, device="cpu"), [z])


def latents_by_the_lab(autoencoder, images, s, m):
    lab = types.SimpleNamespace(autoencoder=autoencoder, device="cpu", shift_factor=torch.tensor(m),
                                _scale=lambda: torch.tensor(s))
    return LatentDiffusionLab.to_latents(lab, images)


def latent_step_by_the_lab(zt, v, t, prev_t, alpha_bar):
    return table_scheduler(alpha_bar, prediction_type="v").ddim_step(v, t, zt, prev_t).prev_sample


# --------------------------------------------------------------------------- wrong in no known way
def off(fn: Callable) -> Callable:
    """``fn``'s answer, a little wrong (tensors scaled, numbers shifted)."""

    def wrong(*args):
        out = fn(*args)
        if isinstance(out, tuple):
            return tuple(value * 1.5 for value in out)
        return out * 1.1 if isinstance(out, torch.Tensor) else out + 0.5

    return wrong


# --------------------------------------------------------------------------- inputs for the fallbacks
def toy_model() -> nn.Module:
    torch.manual_seed(3)
    return diffusion_exercises._ToyEpsModel(T=50)


def tables(T: int = 50, **config) -> tuple[torch.Tensor, torch.Tensor]:
    scheduler = NoiseScheduler(SchedulerConfig(num_train_timesteps=T, **config))
    return scheduler.betas, scheduler.alpha_bar


def tiny_autoencoder() -> KLAutoencoder:
    torch.manual_seed(4)
    return KLAutoencoder(AutoencoderConfig(channels=[8, 8], groups=4, z_channels=4), channels=3).eval()


def fallback_args(exercise: str) -> tuple:
    """Inputs like the notebooks' (a 50-level schedule, the smoke preset's), on which a fallback is compared with
    the answer written from scratch."""
    gen = torch.Generator().manual_seed(5)
    x, eps = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    betas, alpha_bar = tables()
    t = torch.tensor([3, 40])
    return {
        "add_noise": lambda: (x, eps, t, alpha_bar.float()),
        "ddpm_step": lambda: (x, eps, 30, betas, alpha_bar, torch.randn(2, 3, 8, 8, generator=gen)),
        "ddim_step": lambda: (x, eps, 30, 20, alpha_bar),
        "ddpm_loss": lambda: (toy_model(), x, t, eps, alpha_bar.float(), torch.randn(2, 4, generator=gen)),
        "training_step": lambda: (toy_model(), None, x, t, eps, alpha_bar.float(), torch.randn(2, 4, generator=gen)),
        "flow_matching_loss": lambda: (flow_exercises._ToyVelocityModel(), x, torch.tensor([0.1, 0.8]), eps,
                                       torch.randn(2, 4, generator=gen)),
        "scale_and_shift": lambda: (torch.randn(4, 4, 2, 2, generator=gen) * 0.3 + 0.2,),
        "encode_to_latents": lambda: (tiny_autoencoder(), x.clamp(-1, 1).repeat(1, 1, 2, 2), 1.3, 0.1),
        "latent_ddim_step": lambda: (x[:, :1].repeat(1, 4, 1, 1), eps[:, :1].repeat(1, 4, 1, 1), 30, 20,
                                     tables(prediction_type="v")[1]),
    }[exercise]()


@dataclass
class Exercise:
    check: Callable
    answer: Callable
    mistakes: list[tuple[Callable, str]] = field(default_factory=list)
    by_the_lab: list[Callable] = field(default_factory=list)


EXERCISES = {
    "add_noise": Exercise(diffusion_exercises.check_add_noise, add_noise,
                          [(noise_without_roots, "need square roots"), (noise_with_alpha_t, "cumulative product")],
                          [add_noise_by_the_lab]),
    "ddpm_loss": Exercise(diffusion_exercises.check_ddpm_loss, ddpm_loss,
                          [(loss_without_roots, "scaled by their square roots"), (loss_on_x0, "not the clean image"),
                           (loss_on_clean_input, "must see the noisy x_t"), (loss_summed_per_image, "not a sum"),
                           (loss_absolute, "not its absolute value")],
                          [loss_by_the_lab]),
    "training_step": Exercise(diffusion_exercises.check_training_step, training_step,
                              [(step_without_zero_grad, "zero_grad"), (step_without_update, "did not move")],
                              [step_by_the_lab]),
    "ddpm_step": Exercise(diffusion_exercises.check_ddpm_step, ddpm_step,
                          [(ddpm_noise_at_zero, "adds no noise"), (ddpm_beta_variance, "posterior variance")],
                          [ddpm_step_by_the_lab]),
    "ddim_step": Exercise(diffusion_exercises.check_ddim_step, ddim_step,
                          [(ddim_clean_is_level_zero, "not alpha_bar[0]"), (ddim_python_index, "*last* entry")],
                          [ddim_step_by_the_lab]),
    "flow_matching_loss": Exercise(flow_exercises.check_flow_matching_loss, flow_loss,
                                   [(flow_path_reversed, "t = 0 is the data"), (flow_velocity_backwards, "eps - x0"),
                                    (flow_eps_target, "not the noise eps"), (flow_x0_target, "not the clean image"),
                                    (flow_clean_input, "the point x_t on the path"),
                                    (flow_ddpm_weights, "no square roots"), (flow_summed_per_image, "not a sum")],
                                   [flow_loss_by_the_lab, flow_loss_from_the_lab_path, flow_loss_by_the_lab_object]),
    "scale_and_shift": Exercise(latent_exercises.check_scale_and_shift, scale_and_shift,
                                [(scale_per_channel, "not one per channel"), (scale_is_std, "1 / std, not std")],
                                [scale_and_shift_by_the_lab]),
    "encode_to_latents": Exercise(latent_exercises.check_encode_to_latents, encode_to_latents,
                                  [(latents_without_shift, "subtract the mean m before scaling"),
                                   (latents_shifted_after_scaling, "subtract m first"),
                                   (latents_from_logvar, "not its log-variance")],
                                  [latents_by_the_lab]),
    "latent_ddim_step": Exercise(latent_exercises.check_latent_ddim_step, latent_ddim_step,
                                 [(latent_step_as_eps, "network predicts v"), (latent_step_clipped, "do not clip")],
                                 [latent_step_by_the_lab]),
}
MISTAKES = [(name, fn, message) for name, exercise in EXERCISES.items() for fn, message in exercise.mistakes]


def one_line(capsys) -> str:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_every_graded_check_is_in_its_notebook_with_points():
    from lab_utils.commands.notebooks import NOTEBOOK_FOLDER

    for notebook, modules in NOTEBOOKS.items():
        points = nbformat.read(NOTEBOOK_FOLDER / f"{notebook}.ipynb", as_version=4).metadata["genlab"]["exercises"]
        ours = {name for name, exercise in EXERCISES.items()
                if exercise.check.__module__ in {module.__name__ for module in modules}}
        assert ours <= set(points) and all(points[name] in (1, 2) for name in ours), (notebook, points)
        for name in ours:
            assert EXERCISES[name].check.exercise == name


@pytest.mark.parametrize("name", EXERCISES)
def test_an_answer_written_from_scratch_passes(name, capsys):
    result = EXERCISES[name].check(EXERCISES[name].answer)
    line = one_line(capsys)
    assert result and line.startswith("✅"), line
    assert result.pick(EXERCISES[name].answer) is EXERCISES[name].answer


@pytest.mark.parametrize(("name", "mistake", "message"), MISTAKES, ids=[f"{n}-{f.__name__}" for n, f, _ in MISTAKES])
def test_each_known_mistake_gets_its_message(name, mistake, message, capsys):
    assert not EXERCISES[name].check(mistake)
    line = one_line(capsys)
    assert line.startswith("❌") and message in line, line


@pytest.mark.parametrize("name", EXERCISES)
def test_an_answer_that_calls_the_lab_fails(name, capsys):
    for cheat in EXERCISES[name].by_the_lab:
        assert not EXERCISES[name].check(cheat)
        line = one_line(capsys)
        assert "calls the lab's" in line, line
        assert "hint:" not in line  # the message says it all
    # the lab's code works again once the check is done
    betas, alpha_bar = tables()
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(add_noise_by_the_lab(x, x, torch.tensor([3]), alpha_bar.float()),
                               add_noise(x, x, torch.tensor([3]), alpha_bar.float()))


@pytest.mark.parametrize("name", EXERCISES)
def test_the_hint_gives_the_idea_first_and_the_detail_on_the_second_try(name, capsys, monkeypatch):
    module = importlib.import_module(EXERCISES[name].check.__module__)
    hints = []
    real = module.check_function

    def recording(*args, **kwargs):
        hints.append(kwargs["hint"])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "check_function", recording)
    wrong = off(EXERCISES[name].answer)
    assert not EXERCISES[name].check(wrong)
    first = one_line(capsys)
    assert not EXERCISES[name].check(wrong)
    second = one_line(capsys)
    hint = hints[-1]
    assert isinstance(hint, Hint) and hint.idea and hint.detail and hint.idea != hint.detail
    assert first.endswith("hint: " + hint.idea), first
    assert second.endswith("hint: " + hint.detail), second


@pytest.mark.parametrize("name", EXERCISES)
def test_an_unwritten_answer_fails_and_the_notebook_goes_on_with_the_lab_version(name, capsys):
    def unwritten(*args, **kwargs):
        raise NotImplementedError("exercise: write your solution here")

    result = EXERCISES[name].check(unwritten)
    line = one_line(capsys)
    assert not result and "not implemented yet" in line, line
    fallback = result.pick(unwritten)
    assert fallback is not unwritten and "uses the lab's version" in capsys.readouterr().out
    args = fallback_args(name)
    if name == "training_step":  # the fallback updates a model as the answer does
        models = [args[0], toy_model()]
        losses = [step(model, torch.optim.SGD(model.parameters(), lr=0.1), *args[2:])
                  for step, model in zip((fallback, training_step), models)]
        assert float(losses[0]) == pytest.approx(float(losses[1]), rel=1e-5)
        for got, expected in zip(*(model.parameters() for model in models)):
            torch.testing.assert_close(got, expected)
        return
    got, expected = fallback(*args), EXERCISES[name].answer(*args)
    if isinstance(expected, tuple):
        assert got == pytest.approx(expected, rel=1e-5)
    else:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_the_lab_loss_is_diffusion_loss_on_its_own_draws():
    """``DiffusionLab.loss`` draws the dropout, t and eps in that order and hands them to ``diffusion_loss``
    (the numbers training and the shipped weights depend on)."""
    from labs.diffusion import DDPMConfig, UNetConfig
    from labs.text_encoder import TextEncoderConfig

    for gamma, prediction in ((None, "eps"), (5.0, "v")):
        torch.manual_seed(0)
        config = DDPMConfig(scheduler=SchedulerConfig(num_train_timesteps=50, prediction_type=prediction),
                            unet=UNetConfig(base_channels=8, channel_mults=[1, 2], self_attention_levels=[1],
                                            cross_attention_levels=[1], heads=2, groups=4, emb_mult=2),
                            text=TextEncoderConfig(dim=16, depth=1, heads=2, max_length=24), min_snr_gamma=gamma,
                            p_uncond=0.5)
        lab = DiffusionLab(config, data_info())
        with torch.no_grad():
            for param in lab.parameters():  # the zero-initialised output would make every loss mean(eps^2)
                param.add_(0.05 * torch.randn_like(param))
        x0, captions = torch.rand(4, 3, 16, 16) * 2 - 1, ["a red circle", "a blue square"] * 2
        torch.manual_seed(1)
        loss = lab.loss(x0, captions)
        torch.manual_seed(1)
        drop = torch.rand(4).lt(config.p_uncond).tolist()
        prompts = ["" if dropped else caption for caption, dropped in zip(captions, drop)]
        t = torch.randint(0, 50, (4,))
        eps = torch.randn_like(x0)
        assert torch.equal(loss, diffusion_loss(lab, lab.scheduler, x0, t, eps, prompts, gamma))
        if prediction == "eps" and gamma is None:  # Ho et al. eq. 14, written out
            xt = lab.scheduler.add_noise(x0, eps, t)
            torch.testing.assert_close(loss, (eps - lab(xt, t, prompts)).pow(2).mean())
