r"""The flow lab: the flow-matching loss against the closed-form optimum of a Gaussian, Euler and Heun on exact
velocity fields (a point mass, a Gaussian: orders 1 and 2), the one sampling loop against the DDPM/DDIM loop of
before, guidance, the training times, the config's checks, and a smoke run through train, sample, eval, bench,
compare and serve.

The Gaussian's velocity field. With $x_0 \sim \mathcal N(\mu, s^2 I)$, $\epsilon \sim \mathcal N(0, I)$ and
$x_t = (1 - t) x_0 + t \epsilon$, the pair $(v, x_t)$ with $v = \epsilon - x_0$ is jointly Gaussian, per
coordinate: $\mathbb E x_t = (1 - t)\mu$, $\operatorname{Var} x_t = \sigma_t^2 = (1 - t)^2 s^2 + t^2$,
$\mathbb E v = -\mu$, $\operatorname{Var} v = 1 + s^2$, $\operatorname{Cov}(v, x_t) = t - (1 - t) s^2$. So

$v^*(x_t, t) = \mathbb E[v \mid x_t] = -\mu + \frac{t - (1 - t) s^2}{\sigma_t^2}\,(x_t - (1 - t)\mu)$,

and the loss of $v^*$ at time $t$ is the conditional variance
$1 + s^2 - \frac{(t - (1 - t) s^2)^2}{\sigma_t^2} = \frac{s^2}{\sigma_t^2}$ (expand: the numerator is
$(1 + s^2)\sigma_t^2 - (t - (1 - t)s^2)^2 = s^2$). Any other field $v^* + \delta$ costs
$\mathbb E\lVert\delta\rVert^2$ more. The ODE $dx/dt = v^*$ maps quantiles to quantiles:
$x_t = (1 - t)\mu + \sigma_t z$, so from $x_1$ it ends at $x_0 = \mu + s\,x_1$.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict

import pytest
import torch

from conftest import data_info
from lab_utils.core.config import compose
from lab_utils.core.schema import ConfigError
from labs.diffusion import (
    NoiseScheduler, SchedulerConfig, UNetConfig, classifier_free_guidance, ddim_sample, ddpm_sample, sample_levels,
    sample_loop,
)
from labs.flow import (
    FlowConfig, FlowLab, FlowSampleOptions, add_noise, euler_step, evaluations, flow_matching_loss, heun_step,
    sample_times, shift_time, time_grid,
)
from labs.text_encoder import TextEncoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)

MU, S = 0.3, 0.5  # the toy data distribution N(mu, s^2 I)


def gaussian_field(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v*(x_t, t) = E[eps - x0 | x_t] for x0 ~ N(MU, S^2 I) (the module docstring derives it)."""
    t = t.to(xt.dtype).view(-1, *([1] * (xt.dim() - 1)))  # (B, 1, 1, 1)
    var = (1 - t) ** 2 * S**2 + t**2  # sigma_t^2
    return -MU + (t - (1 - t) * S**2) / var * (xt - (1 - t) * MU)


def tiny_config(**changes) -> FlowConfig:
    cfg = FlowConfig(
        unet=UNetConfig(base_channels=16, channel_mults=[1, 2], self_attention_levels=[1],
                        cross_attention_levels=[0, 1], heads=2, groups=4, emb_mult=2),
        text=TextEncoderConfig(dim=16, depth=1, heads=2, max_length=24),
    )
    for key, value in changes.items():
        setattr(cfg, key, value)
    FlowConfig.__post_init__(cfg)
    return cfg


def tiny_lab(seed: int = 0, **changes) -> FlowLab:
    """A tiny FlowLab whose zero-initialised output layers get small weights (so it does not predict 0)."""
    torch.manual_seed(seed)
    lab = FlowLab(tiny_config(**changes), data_info())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lab.parameters():
            if param.abs().sum() == 0:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return lab.eval()


# ------------------------------------------------------------------------------ the loss
def test_the_loss_of_the_exact_field_is_its_closed_form_minimum():
    """Loss of v* = mean_b s^2 / sigma_{t_b}^2. Tolerance: the loss averages N = 32768 squared Gaussian errors, each
    of variance c <= 1 here, so its relative standard error is about sqrt(2 / N) ~ 0.8%; 4% is 5 of them."""
    generator = torch.Generator().manual_seed(0)
    B = 512
    x0 = MU + S * torch.randn(B, 1, 8, 8, generator=generator)  # x0 ~ N(mu, s^2 I)
    eps = torch.randn(B, 1, 8, 8, generator=generator)
    t = torch.linspace(0.02, 0.98, B)  # the whole path, one time per sample
    exact = flow_matching_loss(lambda xt, tt, cond: gaussian_field(xt, tt), x0, t, eps, None).item()
    minimum = (S**2 / ((1 - t) ** 2 * S**2 + t**2)).mean().item()  # E_t[s^2 / sigma_t^2]
    assert exact == pytest.approx(minimum, rel=0.04)
    # v* + delta costs E||delta||^2 = 0.04 more, up to a cross term of standard error ~ 2 * 0.2 * sqrt(1 / N) ~ 0.002
    shifted = flow_matching_loss(lambda xt, tt, cond: gaussian_field(xt, tt) + 0.2, x0, t, eps, None).item()
    assert shifted > exact and shifted - exact == pytest.approx(0.04, abs=0.01)
    scaled = flow_matching_loss(lambda xt, tt, cond: 1.2 * gaussian_field(xt, tt), x0, t, eps, None).item()
    assert scaled > exact
    # the target is eps - x0 along x_t = (1 - t) x0 + t eps: a model told x0 and eps has zero loss
    oracle = flow_matching_loss(lambda xt, tt, cond: eps - x0, x0, t, eps, None).item()
    assert oracle == 0.0
    assert torch.allclose(add_noise(x0, eps, t), (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)


def test_the_model_sees_time_scaled_to_the_ddpm_range():
    lab = tiny_lab()
    seen = []
    original = lab.unet.forward
    lab.unet.forward = lambda xt, t, context: seen.append(t) or original(xt, t, context)
    x0 = torch.zeros(2, 3, 16, 16)
    t = torch.tensor([0.25, 0.5])
    flow_matching_loss(lab, x0, t, torch.ones_like(x0), ["a red circle", ""])
    assert torch.equal(seen[0], 1000.0 * t) and seen[0].dtype == torch.float32


# ------------------------------------------------------------------------------ the samplers
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_euler_and_heun_land_on_a_point_mass(steps, shift):
    """For a point mass at x0 the field is v = (x_t - x0) / t, a straight line: any step count lands on x0."""
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x1 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def field(xt, t):
        return (xt - x0) / t.to(xt.dtype).view(-1, 1, 1, 1)

    for step in (euler_step, heun_step):
        out = sample_levels(field, time_grid(steps, shift), x1, step, torch.Generator(), clip_range=None)
        assert torch.allclose(out.images, x0, atol=1e-6), step.__name__
        assert out.nfe == (steps if step is euler_step else 2 * steps - 1)


def test_heun_is_second_order_and_euler_first_on_a_gaussian():
    """Integrating the Gaussian's exact field from x1 should end at mu + s x1: Euler's error halves when the steps
    double (order 1), Heun's quarters (order 2) and is far smaller at the same step count."""
    x1 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = MU + S * x1

    def error(step, steps):
        out = sample_levels(gaussian_field, time_grid(steps), x1, step, torch.Generator(), clip_range=None)
        return (out.images - exact).abs().max().item()

    euler, heun = [error(euler_step, 16), error(euler_step, 32)], [error(heun_step, 16), error(heun_step, 32)]
    assert 1.7 < euler[0] / euler[1] < 2.3, euler
    assert 3.4 < heun[0] / heun[1] < 4.6, heun
    assert heun[0] < euler[0] / 5 and heun[0] < euler[1] / 5  # also at about the same evaluations (31 vs 32)


def test_time_grid_and_shift():
    assert time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = time_grid(4, 3.0)  # t' = 3 t / (1 + 2 t): more of the path near the noise
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and shifted[2] == pytest.approx(0.75)
    assert all(a > b for a, b in zip(shifted, shifted[1:]))
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_time(t, 1.0), t)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        time_grid(0)


def test_training_times_are_logit_normal_then_shifted():
    """logit(t) ~ N(m, s^2); the shift adds ln(alpha) to logit(t) (t' / (1 - t') = alpha t / (1 - t)). With 20000
    draws the standard error of the mean is s / 141 and of the std ~ s / 200: tolerances of 5 of them."""
    def logits(**options):
        t = sample_times(20000, generator=torch.Generator().manual_seed(0), **options).double()
        return torch.log(t / (1 - t))

    plain = logits(distribution="logit_normal", logit_mean=0.5, logit_std=0.8)
    assert plain.mean().item() == pytest.approx(0.5, abs=0.03) and plain.std().item() == pytest.approx(0.8, abs=0.02)
    shifted = logits(distribution="logit_normal", logit_mean=0.5, logit_std=0.8, shift=3.0)
    assert torch.allclose(shifted, plain + math.log(3.0), atol=1e-4)
    uniform = sample_times(20000, "uniform", generator=torch.Generator().manual_seed(0))
    assert 0 <= uniform.min() and uniform.max() < 1 and uniform.mean().item() == pytest.approx(0.5, abs=0.011)
    with pytest.raises(ValueError, match="logit_normal"):
        sample_times(4, "beta")


# ------------------------------------------------------------------------------ the one loop, unchanged for the DDPM
def old_sample_loop(denoise, scheduler, shape, steps, generator, sampler, eta=0.0):
    """`sample_loop` as it was written before the loop was shared with the flow (a copy, kept for the parity test)."""
    timesteps = scheduler.inference_timesteps(steps)
    levels = timesteps.tolist() + [-1]
    xt = torch.randn(shape, generator=generator, device=generator.device)
    intermediates, pred_x0s = [xt], []
    for t, prev_t in zip(levels[:-1], levels[1:]):
        model_output = denoise(xt, torch.full((shape[0],), t, dtype=torch.long))
        if sampler == "ddpm":
            step = scheduler.ddpm_step(model_output, t, xt, prev_t, generator=generator)
        else:
            step = scheduler.ddim_step(model_output, t, xt, prev_t, eta=eta, generator=generator)
        xt = step.prev_sample
        intermediates.append(xt)
        pred_x0s.append(step.pred_x0)
    clip = scheduler.cfg.clip_range
    return (xt.clamp(-clip, clip) if scheduler.cfg.clip_x0 else xt), timesteps, intermediates, pred_x0s


@pytest.mark.parametrize("sampler, eta, clip", [("ddpm", 0.0, True), ("ddim", 0.0, True), ("ddim", 0.5, True),
                                                ("ddim", 0.0, False)])
def test_the_shared_loop_gives_the_ddpm_and_ddim_images_of_before(sampler, eta, clip):
    scheduler = NoiseScheduler(SchedulerConfig(num_train_timesteps=40, prediction_type="v", clip_x0=clip))
    weight = torch.linspace(-0.5, 0.5, 3).view(1, 3, 1, 1)

    def denoise(xt, t):  # an analytic "network" that depends on x_t and t
        assert t.dtype == torch.long
        return torch.tanh(xt * weight) * (t.float().view(-1, 1, 1, 1) + 1) / 40

    images, timesteps, intermediates, pred_x0s = old_sample_loop(denoise, scheduler, (2, 3, 4, 4), 7,
                                                                 torch.Generator().manual_seed(5), sampler, eta)
    calls = []
    out = sample_loop(denoise, scheduler, (2, 3, 4, 4), 7, torch.Generator().manual_seed(5), sampler=sampler,
                      eta=eta, return_intermediates=True, nfe_per_step=2, callback=lambda i, step: calls.append(i))
    assert torch.equal(out.images, images) and torch.equal(out.timesteps, timesteps)
    assert all(torch.equal(a, b) for a, b in zip(out.intermediates, intermediates)) and len(out.intermediates) == 8
    assert all(torch.equal(a, b) for a, b in zip(out.pred_x0, pred_x0s)) and len(out.pred_x0) == 7
    assert out.nfe == 14 and calls == list(range(1, 8))
    named = (ddpm_sample if sampler == "ddpm" else ddim_sample)(denoise, scheduler, (2, 3, 4, 4), 7,
                                                                torch.Generator().manual_seed(5),
                                                                **({"eta": eta} if sampler == "ddim" else {}))
    assert torch.equal(named.images, images)


# ------------------------------------------------------------------------------ the lab's sampling
def test_guidance_one_is_the_conditional_velocity_and_nfe():
    lab = tiny_lab()
    prompts = ["a red circle", "a blue square"]
    u, c = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.allclose(classifier_free_guidance(u, c, 1.0), c)
    assert torch.equal(classifier_free_guidance(u, c, 0.0), u)
    context = lab.encode_prompts(prompts)
    for sampler, step in (("euler", euler_step), ("heun", heun_step)):
        guided = lab.generate(prompts, torch.Generator().manual_seed(0), sampler=sampler, steps=4, guidance=1.0)
        with torch.no_grad():
            x1 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
            manual = sample_levels(lambda xt, t: lab.unet(xt, 1000 * t, context), time_grid(4), x1, step,
                                   torch.Generator())
        assert torch.allclose(guided.images, manual.images, atol=1e-6)
        assert guided.nfe == manual.nfe == lab.nfe(sampler=sampler, steps=4, guidance=1.0) == evaluations(sampler, 4)
    # w != 1 batches the conditional and unconditional passes: the same as two separate passes
    w, uncond = 2.5, lab.encode_prompts(["", ""])
    with torch.no_grad():
        x1 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        manual = sample_levels(lambda xt, t: classifier_free_guidance(lab.unet(xt, 1000 * t, uncond),
                                                                      lab.unet(xt, 1000 * t, context), w),
                               time_grid(4), x1, heun_step, torch.Generator())
    guided = lab.generate(prompts, torch.Generator().manual_seed(0), sampler="heun", steps=4, guidance=w)
    assert torch.allclose(guided.images, manual.images, atol=2e-3)  # batch-size-dependent rounding, over the steps
    assert guided.nfe == 14 == lab.nfe(sampler="heun", steps=4, guidance=w)  # (2 x 4 - 1) evaluations, x2 with guidance


def test_sampling_is_seeded_clamped_and_reports_x0_estimates():
    lab = tiny_lab(sampling=FlowSampleOptions(sampler="heun", steps=6, guidance=2.0))
    state = torch.get_rng_state()
    a = lab.sample(["a red circle"] * 2, torch.Generator().manual_seed(0))
    b = lab.sample(["a red circle"] * 2, torch.Generator().manual_seed(0))
    c = lab.sample(["a red circle"] * 2, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.min() >= -1 and a.max() <= 1
    reports = []
    same = lab.sample_with_progress(["a red circle"] * 2, torch.Generator().manual_seed(0), every=4,
                                    on_step=lambda i, n, x0: reports.append((i, n, x0)))
    assert torch.equal(same, a) and [(i, n) for i, n, _ in reports] == [(4, 6), (6, 6)]
    assert all(x0.abs().max() <= 1 for _, _, x0 in reports)
    out = lab.sample_trajectory(["a red circle"], torch.Generator().manual_seed(0), steps=3)
    assert len(out.intermediates) == 4 and len(out.pred_x0) == 3 and out.nfe == (2 * 3 - 1) * 2
    assert torch.allclose(out.intermediates[-1].clamp(-1, 1), out.images)
    assert out.timesteps.tolist() == [1.0, pytest.approx(2 / 3), pytest.approx(1 / 3)]
    # the x0 estimate is x_t - t v: at the last step (t_prev = 0, plain Euler) it is the final sample itself
    assert torch.allclose(out.pred_x0[-1], out.intermediates[-1], atol=1e-6)
    assert lab.nfe() == (2 * 6 - 1) * 2 and lab.sampling_defaults() == FlowSampleOptions("heun", 6, 2.0)
    assert lab.benchmark_samplers() == {"euler-25": {"sampler": "euler", "steps": 25},
                                        "heun-13": {"sampler": "heun", "steps": 13}}
    assert lab.sample_options({"sampler": "euler", "steps": None}) == FlowSampleOptions("euler", 6, 2.0)
    with pytest.raises(ValueError, match="does not take option"):
        lab.sample_options({"eta": 0.5})
    with pytest.raises(ValueError, match="sampling.sampler must be one of"):
        lab.sample(["a red circle"], sampler="ddim")


# ------------------------------------------------------------------------------ training
def test_tiny_model_learns_one_batch():
    from test_diffusion import FakeContext, overfit_batch

    torch.manual_seed(0)
    lab = FlowLab(tiny_config(lr=3e-3, p_uncond=0.0), data_info()).train()
    ctx = FakeContext(lab.configure_optimizers()["model"])
    batch = overfit_batch()

    def eval_loss() -> float:  # the same t and eps every time, so losses are comparable
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(123)
            return sum(lab.loss(batch["image"], batch["caption"]).item() for _ in range(4)) / 4

    before = eval_loss()
    for _ in range(60):
        losses = lab.training_step(batch, ctx)
    assert set(losses) == {"loss"} and ctx.step == 60
    assert eval_loss() < before / 2
    groups = FlowLab(tiny_config(text_lr=1e-4), data_info()).configure_optimizers()["model"].param_groups
    assert [group["lr"] for group in groups] == [1e-3, 1e-4]


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_presets_compose_and_build(preset):
    from lab_utils.core.registry import build_lab

    cfg = compose(["model=flow", "data=shapes", f"preset={preset}"])
    assert cfg.model.name == "flow" and cfg.model._target_ == "labs.flow.FlowLab"
    assert dict(cfg.trainer.sample_options) == {}  # the grids sample with the model's own defaults
    with torch.device("meta"):
        lab = build_lab(cfg, data_info(size=32))
    assert isinstance(lab, FlowLab) and asdict(lab.sampling_defaults()) == dict(cfg.model.sampling)
    if preset == "smoke":
        assert lab.num_parameters()["total"] < 100_000


@pytest.mark.parametrize("override, message", [
    ("model.sampling.sampler=rk4", "sampling.sampler must be one of ['euler', 'heun']"),
    ("model.sampling.sampler=ddim", "sampling.sampler must be one of"),
    ("model.sampling.steps=0", "sampling.steps must be an integer >= 1"),
    ("model.sampling.guidance=nan", "sampling.guidance must be a finite number"),
    ("model.sampling.guidance=inf", "sampling.guidance must be a finite number"),
    ("model.sampling.guidance=-1", "sampling.guidance must be a finite number >= 0"),
    ("model.time_sampling=beta", "time_sampling must be one of"),
    ("model.logit_std=0", "logit_std must be a finite positive number"),
    ("model.logit_mean=nan", "logit_mean must be a finite number"),
    ("model.time_shift=0", "time_shift must be a finite positive number"),
    ("model.time_shift=inf", "time_shift must be a finite positive number"),
    ("model.time_scale=-1", "time_scale must be a finite positive number"),
    ("model.p_uncond=1.5", "p_uncond"),
    ("model.lr=0", "lr must be positive"),
    ("model.betas=[0.9]", "betas must be two numbers"),
    ("model.unet.base_channels=30", "divisible"),
])
def test_bad_config_values_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        compose(["model=flow", "data=shapes", "preset=smoke", override])
    assert "\n" not in str(caught.value)  # one line


# ------------------------------------------------------------------------------ end to end: every command
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from lab_utils.harness.run import train

    run = tmp_path_factory.mktemp("flow") / "run"
    result = train(compose(["model=flow", "data=shapes", "preset=smoke", f"out={run}", "trainer.progress=false"]))
    assert result.step == 4
    return run


def test_train_then_genlab_sample_reproduces_pixels(smoke_run, tmp_path, monkeypatch):
    from lab_utils.commands.cli import main
    from lab_utils.harness.checkpoint import load_lab

    assert (smoke_run / "checkpoints" / "last.pt").exists() and any((smoke_run / "samples").iterdir())
    rows = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["loss/loss"]) for row in rows if "loss/loss" in row)
    monkeypatch.setattr(sys, "argv", sys.argv[:])  # the CLI rewrites sys.argv for Hydra
    outs = []
    for seed, name in ((3, "a.png"), (3, "b.png"), (4, "c.png")):
        main(["sample", f"run={smoke_run}", "prompt=a large green square at the bottom right", "n=2", f"seed={seed}",
              "sampler=heun", "steps=10", "guidance=3", "device=cpu", f"out={tmp_path / name}"])
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    lab = load_lab(smoke_run, device="cpu").lab
    images = [lab.sample(["a red circle"] * 2, torch.Generator().manual_seed(0), sampler="euler", steps=5)
              for _ in range(2)]
    assert torch.equal(images[0], images[1]) and images[0].shape == (2, 3, 32, 32)


def test_eval_bench_and_compare_take_the_flow(smoke_run, tmp_path):
    from lab_utils.commands.bench import bench
    from lab_utils.commands.compare import compare
    from lab_utils.commands.evaluation.evaluate import eval_command_main

    # the smoke evaluator, trained once in this session's private cache (conftest) and shared by eval and compare
    cfg = compose([f"run={smoke_run}", "eval.num_samples=8", "eval.batch_size=8", "eval.evaluator_preset=smoke",
                   "eval.kid_subsets=3", "eval.device=cpu", "eval.progress=false",
                   "+eval.sample_options.sampler=heun", "+eval.sample_options.steps=3", f"out={tmp_path / 'eval.json'}"],
                  config_name="eval", check=False)
    eval_command_main(cfg)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["sample_options"] == {"sampler": "heun", "steps": 3} and saved["nfe_per_sample"] == (2 * 3 - 1) * 2
    assert saved["model"] == "flow" and math.isfinite(saved["generated"]["fid"])

    result = bench(compose(["model=flow", "data=shapes", "preset=smoke", "bench.steps=2", "bench.warmup_steps=1",
                            "bench.sample_batch=2", "bench.variants=[preset]"], config_name="bench", check=False))
    samplers = {row["sampler"]: row for row in result["sampling"]}
    assert set(samplers) == {"euler-25", "heun-13"}
    assert samplers["euler-25"]["nfe_per_image"] == samplers["heun-13"]["nfe_per_image"] == 50  # w = 3: x2

    out = tmp_path / "compare"
    results = compare(compose(["data=shapes", "preset=smoke", f"out={out}", "progress=false", "models=[flow]"],
                              config_name="compare", check=False))
    (row,) = results["rows"]
    assert row["model"] == "flow" and row["nfe_per_sample"] == 8 and row["steps"] == row["budget_steps"]
    assert "| flow |" in (out / "results.md").read_text()


def test_serve_offers_the_flow_samplers_and_refuses_others(smoke_run):
    from fastapi.testclient import TestClient

    from lab_utils.harness.checkpoint import load_lab

    from lab_utils.commands.serve import Limits, ServeConfig, ServedModel, create_app

    models = {"flow": ServedModel("flow", "runs", load_lab(smoke_run, device="cpu", ema=True))}
    app = create_app(ServeConfig(models=["flow"], limits=Limits(n=4, steps=20)), models)
    with TestClient(app) as client:
        (listed,) = client.get("/models").json()["models"]
        assert listed["family"] == "flow" and listed["live_preview"]
        sampler = listed["options"]["sampler"]
        assert sampler.pop("help") == FlowSampleOptions.__dataclass_fields__["sampler"].metadata["help"]  # the tooltip
        assert sampler == {"type": "string", "choices": ["euler", "heun"], "default": "euler"}
        assert set(listed["options"]) == {"sampler", "steps", "guidance"}
        body = {"prompt": "a red circle", "model": "flow", "n": 2, "seed": 1, "sampler": "heun", "steps": 3}
        response = client.post("/generate-image", json={**body, "format": "json"})
        assert response.status_code == 200, response.text
        assert response.json()["options"] == {"sampler": "heun", "steps": 3, "guidance": 3.0}
        for sampler, words in (("ddim", "takes sampler 'euler' or 'heun'"), ("rk4", "Input should be")):
            refused = client.post("/generate-image", json={**body, "sampler": sampler})
            assert refused.status_code == 422 and refused.json()["field"] == "sampler", refused.text
            assert words in refused.json()["detail"]
        refused = client.post("/generate-image", json={**body, "eta": 0.5})
        assert refused.status_code == 422 and "takes no option eta" in refused.json()["detail"]


def test_flow_is_registered_as_a_family():
    from lab_utils import COMPOSITE_LABS
    from lab_utils.commands.pretrained import ZooConfig
    from lab_utils.core import registry
    from lab_utils.harness.zoo import family_packages

    assert registry.BUILTIN_LABS["labs.flow.FlowLab"] == "flow" and registry.lab_class("labs.flow.FlowLab") is FlowLab
    assert family_packages()["flow"] == "labs.flow" and COMPOSITE_LABS["labs.flow"] == ("labs.diffusion",)
    assert ZooConfig(models=["flow"]).models == ["flow"]  # may be built once it is trained
    # shipped, and in the default lists of compare (make demo), the zoo and the server
    assert "flow" in compose([], config_name="compare", check=False).models
    assert "flow" in ZooConfig().models and "flow" in compose([], config_name="serve", check=False).models
