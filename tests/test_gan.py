"""The GAN lab: known values of the losses and penalties, spectral norm, the conditioning of both
networks, a seeded 2-D GAN that covers several modes, and an end-to-end train -> sample run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import data_info
from lab_utils.core.config import compose
from lab_utils.core.schema import ConfigError
from labs.gan import (
    Critic, CriticConfig, DCGANConfig, GANLab, GeneratorConfig, ProjectionHead, SelfAttention2d, ToyConfig,
    bce_critic_loss, bce_generator_loss, gradient_penalty, hinge_critic_loss, interpolate, matching_loss,
    maybe_spectral_norm, mode_coverage, r1_penalty, smoothed_targets, train_toy, wasserstein_critic_loss,
)
from labs.text_encoder import TextEncoderConfig


def tiny_config(**changes) -> DCGANConfig:
    cfg = DCGANConfig(
        generator=GeneratorConfig(z_dim=8, cond_dim=16, channels=[32, 16], groups=4, attention_resolution=8),
        critic=CriticConfig(channels=[16, 32], attention_resolution=8),
        text=TextEncoderConfig(dim=16, depth=1, heads=2, max_length=24),
        n_critic=2,
    )
    for key, value in changes.items():
        setattr(cfg, key, value)
    cfg.__post_init__()
    return cfg


def tiny_lab(seed: int = 0, **changes) -> GANLab:
    torch.manual_seed(seed)
    return GANLab(tiny_config(**changes), data_info())


class Linear(nn.Module):
    """D(x) = w . vec(x) + b, whose input gradient is w everywhere."""

    def __init__(self, w: list[float]):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.b = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return x.flatten(1) @ self.w + self.b


# ------------------------------------------------------------------------------ penalties
def test_gradient_penalty_of_a_linear_critic_is_hand_computed():
    torch.manual_seed(0)
    real, fake = torch.randn(5, 2), torch.randn(5, 2)
    gp = gradient_penalty(Linear([3.0, 4.0]), real, fake)
    assert gp.penalty.item() == pytest.approx((5.0 - 1.0) ** 2)  # (|w| - 1)^2 with |w| = 5
    assert torch.allclose(gp.grad_norm, torch.full((5,), 5.0))
    gp = gradient_penalty(Linear([0.6, 0.8]), real, fake)  # |w| = 1: the penalty vanishes
    assert gp.penalty.item() == pytest.approx(0.0, abs=1e-12)
    # images: a linear critic over the flattened pixels, |w| = 2
    w = torch.full((3 * 2 * 2,), 2.0 / math.sqrt(12))
    gp = gradient_penalty(Linear(w.tolist()), torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2))
    assert gp.penalty.item() == pytest.approx(1.0, rel=1e-5)


def test_gradient_penalty_trains_the_critic_and_r1_is_hand_computed():
    critic = Linear([3.0, 4.0])
    gp = gradient_penalty(critic, torch.randn(4, 2), torch.randn(4, 2))
    (grad_w,) = torch.autograd.grad(gp.penalty, critic.w)  # needs create_graph=True inside
    w = critic.w.detach()
    assert torch.allclose(grad_w, 2 * (w.norm() - 1) * w / w.norm())  # d/dw (|w| - 1)^2
    assert r1_penalty(critic, torch.randn(7, 2)).item() == pytest.approx(25.0)  # |w|^2


def test_interpolates_lie_between_real_and_fake():
    torch.manual_seed(0)
    real, fake = torch.randn(64, 3, 4, 4), torch.randn(64, 3, 4, 4)
    gp = gradient_penalty(Linear([1.0] * 48), real, fake)
    eps = gp.eps
    assert eps.shape == (64,) and (eps >= 0).all() and (eps <= 1).all() and eps.std() > 0.1  # one eps per sample
    # x_hat - fake = eps (real - fake): on the segment, the same eps for every pixel of a sample
    expected = fake + eps.view(-1, 1, 1, 1) * (real - fake)
    assert torch.allclose(gp.interpolates, expected, atol=1e-6)
    low, high = torch.minimum(real, fake), torch.maximum(real, fake)
    assert ((gp.interpolates >= low - 1e-6) & (gp.interpolates <= high + 1e-6)).all()
    assert torch.equal(interpolate(real, fake, torch.ones(64)), real)
    assert torch.equal(interpolate(real, fake, torch.zeros(64)), fake)


def test_spectral_norm_brings_the_largest_singular_value_to_one():
    torch.manual_seed(0)
    for layer in (nn.Linear(20, 30), nn.Conv2d(8, 16, 4, stride=2, padding=1)):
        with torch.no_grad():
            layer.weight.mul_(10.0)
        before = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2).item()
        layer = maybe_spectral_norm(layer, True)
        x = torch.randn(2, 20) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 8, 8)
        for _ in range(30):  # one power iteration per training-mode forward pass
            layer(x)
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2).item()
        assert before > 5 and sigma == pytest.approx(1.0, abs=1e-2)
    critic = Critic(CriticConfig(channels=[8, 16], spectral_norm=True, attention_resolution=8), 3, 16, 4)
    layers = [m for m in critic.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(hasattr(m, "parametrizations") for m in layers)


# ------------------------------------------------------------------------------ losses
def test_one_sided_label_smoothing_changes_only_the_real_target():
    scores = torch.randn(6)
    assert torch.equal(smoothed_targets(scores, real=True, label_smoothing=0.1), torch.full((6,), 0.9))
    assert torch.equal(smoothed_targets(scores, real=False, label_smoothing=0.1), torch.zeros(6))
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    s = 0.2
    log_d = F.logsigmoid
    by_hand = (-((1 - s) * log_d(real) + s * log_d(-real)).mean()  # BCE(real, 1 - s); log(1 - sigma(r)) = logsig(-r)
               - log_d(-fake).mean())  # BCE(fake, 0)
    assert bce_critic_loss(real, fake, s).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert bce_critic_loss(real, fake, s).item() != pytest.approx(bce_critic_loss(real, fake, 0.0).item())
    with pytest.raises(ValueError, match="label_smoothing"):
        tiny_config(loss="wgan_gp", label_smoothing=0.1)


def test_loss_values_and_the_non_saturating_gradient():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0])
    assert wasserstein_critic_loss(real, fake).item() == pytest.approx(-1.0 - 2.0)  # E[D(fake)] - E[D(real)]
    assert hinge_critic_loss(real, fake).item() == pytest.approx((0 + 0) / 2 + (0 + 1) / 2)
    # the matching term: log 2 when the prompts are not told apart, ~0 once the right one wins, bounded below
    assert matching_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))
    assert matching_loss(torch.full((3,), 10.0), torch.full((3,), -10.0)).item() < 1e-8
    # where the discriminator wins, D(G(z)) = sigmoid(-6) ~ 0: log(1 - D) saturates, -log D does not
    score = torch.tensor([-6.0], requires_grad=True)
    (saturating,) = torch.autograd.grad(bce_generator_loss(score, non_saturating=False), score)
    (non_saturating,) = torch.autograd.grad(bce_generator_loss(score, non_saturating=True), score)
    assert abs(saturating.item()) < 0.01 < 0.99 < abs(non_saturating.item())


# ------------------------------------------------------------------------------ networks
def test_critic_has_no_batchnorm_under_wgan_gp():
    cfg = compose(["model=dcgan", "data=shapes", "preset=smoke"])
    assert cfg.model.loss == "wgan_gp"
    lab = GANLab(cfg.model, data_info(size=32))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in lab.modules())
    with pytest.raises(ConfigError, match="BatchNorm"):
        compose(["model=dcgan", "data=shapes", "preset=smoke", "model.critic.norm=batch"])
    bce = tiny_lab(loss="bce", critic=CriticConfig(channels=[16, 32], norm="batch", attention_resolution=None))
    assert any(isinstance(m, nn.BatchNorm2d) for m in bce.critic.modules())  # the check above is not vacuous


def test_projection_head_and_self_attention():
    torch.manual_seed(0)
    head = ProjectionHead(6, 3)
    phi, y = torch.randn(4, 6), torch.randn(4, 3)
    expected = phi @ head.psi.weight[0] + head.psi.bias + ((y @ head.embed.weight.T) * phi).sum(1)  # eq. 3
    assert torch.allclose(head(phi, y), expected, atol=1e-6)
    attention = SelfAttention2d(16)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(attention(x), x)  # gamma = 0: starts as the identity
    with torch.no_grad():
        attention.gamma.fill_(1.0)
    changed = x.clone()
    changed[:, :, 3, 3] += 1.0
    assert not torch.allclose(attention(changed)[:, :, 0, 0], attention(x)[:, :, 0, 0])  # sees far pixels


def test_generator_output_depends_on_the_prompt_and_sampling_is_seeded():
    lab = tiny_lab().eval()
    z = torch.randn(2, 8)
    a = lab.generate(["a red circle", "a red circle"], z)
    b = lab.generate(["a large blue square at the top left", "a red circle"], z)
    assert a.shape == (2, 3, 16, 16) and a.abs().max() <= 1
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)
    x = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(lab.critic(x, lab.encode_prompts(["a red circle"] * 2)),
                              lab.critic(x, lab.encode_prompts(["a green square"] * 2)))  # the critic reads the prompt
    state = torch.get_rng_state()
    first = lab.sample(["a red circle", ""], torch.Generator().manual_seed(3))  # "" works too
    second = lab.sample(["a red circle", ""], torch.Generator().manual_seed(3))
    other = lab.sample(["a red circle", ""], torch.Generator().manual_seed(4))
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone


def test_candidates_keep_the_draw_the_critic_scores_highest():
    lab = tiny_lab().eval()
    prompts = ["a red circle", "a blue square", "a large green triangle"]
    picked = lab.sample(prompts, torch.Generator().manual_seed(5), candidates=4)
    generator = torch.Generator().manual_seed(5)  # the same four noise draws, one batch after the other
    with torch.no_grad():
        text = lab.encode_prompts(prompts)
        draws = torch.stack([lab.generator(lab.noise(3, generator), text) for _ in range(4)])  # (4, 3, C, H, W)
        scores = torch.stack([lab.critic(draw, text) for draw in draws])  # (4, 3)
    expected = draws[scores.argmax(dim=0), torch.arange(3)]
    assert torch.allclose(picked, expected, atol=1e-6)
    assert torch.equal(lab.sample(prompts, torch.Generator().manual_seed(5)), draws[0])  # 1 candidate: G(z, c)
    assert lab.nfe(candidates=4) == 4 and lab.nfe() == 1
    with pytest.raises(ValueError, match="candidates"):
        lab.sample(prompts, torch.Generator().manual_seed(5), candidates=0)


def test_matching_aware_critic_counts_wrong_prompts_as_fakes():
    lab = tiny_lab(loss="hinge", mismatch_weight=0.25)  # hinge: no penalty, so the loss is known exactly
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    captions = ["a red circle", "a blue square", "a large green triangle", "a small red square at the top"]
    torch.manual_seed(1)
    out = lab.critic_objective(x, captions)
    torch.manual_seed(1)
    with torch.no_grad():
        text = lab.encode_prompts(captions)
        fake = lab.generator(lab.noise(4), text)
        real_s, fake_s, wrong_s = lab.critic(x, text), lab.critic(fake, text), lab.critic(x, text.roll(1, 0))
    expected = hinge_critic_loss(real_s, fake_s) + 0.25 * F.softplus(wrong_s - real_s).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["mismatch_score"].item() == pytest.approx(wrong_s.mean().item(), rel=1e-5)


class RecordingContext:
    """A StepContext that records which parameters got gradients at each update."""

    def __init__(self, lab, batch):
        self.lab, self.batch, self.step, self.device = lab, batch, 0, torch.device("cpu")
        self.optimizers = lab.configure_optimizers()
        self.calls: list[tuple[str, set[str]]] = []

    def optimize(self, name, loss_fn):
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        for p in self.lab.parameters():
            p.grad = None
        output = loss_fn()  # the lab passes a function (the trainer runs it inside DDP's forward)
        (output["loss"] if isinstance(output, dict) else output).backward()
        names = {n for n, p in self.lab.named_parameters() if p.grad is not None}
        self.calls.append((name, names))
        optimizer.step()
        return output

    def next_batch(self):
        return self.batch

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


@pytest.mark.parametrize("changes", [
    {},
    {"loss": "hinge", "critic": CriticConfig(channels=[16, 32], spectral_norm=True, attention_resolution=8)},
    {"loss": "bce", "label_smoothing": 0.1, "r1_gamma": 1.0, "mismatch_weight": 0.0},
], ids=["wgan_gp", "hinge+sn", "bce+smoothing+r1+no-mismatch"])
def test_training_step_updates_each_player_with_all_its_parameters(changes):
    lab = tiny_lab(**changes).train()
    torch.manual_seed(0)
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "caption": ["a red circle", "a blue square", "a", ""]}
    ctx = RecordingContext(lab, batch)
    out = lab.training_step(batch, ctx)
    assert [name for name, _ in ctx.calls] == ["critic", "critic", "generator"]
    critic_params = {n for n, _ in lab.named_parameters() if n.startswith(("critic.", "text_encoder."))}
    generator_params = {n for n, _ in lab.named_parameters() if n.startswith("generator.")}
    for name, got in ctx.calls:
        expected = critic_params if name == "critic" else generator_params
        assert expected <= got, f"{name} update: no gradient for {sorted(expected - got)[:5]}"  # DDP needs all
        other = generator_params if name == "critic" else {n for n in critic_params if n.startswith("text_encoder.")}
        assert not got & other  # the critic does not train G; G does not train the text encoder
    assert {"critic", "generator", "stats/wasserstein"} <= set(out)
    assert ("stats/gradient_penalty" in out) == (lab.config.loss == "wgan_gp")
    assert ("stats/mismatch_score" in out) == (lab.config.mismatch_weight > 0)
    assert all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("n_critic", [1, 3])
def test_an_image_budget_counts_every_batch_the_critic_is_shown(n_critic):
    """``batches_per_step`` (what ``genlab compare`` converts an image budget into steps with) is the number of
    batches a training step draws: the one it is given and one more per further critic update."""
    lab = tiny_lab(n_critic=n_critic).train()
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "caption": ["a red circle", "a blue square", "a", ""]}
    ctx = RecordingContext(lab, batch)
    drawn = []
    ctx.next_batch = lambda: drawn.append(1) or batch
    lab.training_step(batch, ctx)
    assert lab.batches_per_step() == 1 + len(drawn) == n_critic


# ------------------------------------------------------------------------------ the 2-D toy
def test_toy_gan_covers_several_modes_of_a_gaussian_mixture():
    # 4 Gaussians (std 0.1) on a circle of radius 2: WGAN-GP covers all of them in 150 steps (a few seconds)
    cfg = ToyConfig(loss="wgan_gp", modes=4, std=0.1, steps=150, batch_size=64, n_critic=5, lr_generator=1e-3,
                    lr_critic=1e-3, seed=0, snapshot_every=150)
    run = train_toy(cfg)
    coverage = mode_coverage(run.snapshots[150], run.centres, cfg.std)
    assert coverage.covered >= 3, coverage  # more than one mode: not collapsed
    assert coverage.high_quality > 0.15, coverage  # an untrained generator puts ~0 samples near a mode
    assert run.history["gradient_penalty"] and len(run.history["critic"]) == 150


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_presets_compose_and_build(preset):
    cfg = compose(["model=dcgan", "data=shapes", f"preset={preset}"])
    assert cfg.model.name == "dcgan" and cfg.model._target_ == "labs.gan.GANLab"
    lab = GANLab(cfg.model, data_info(size=32))
    total = lab.num_parameters()["total"]
    assert total < {"smoke": 100_000, "cpu": 4_000_000, "gpu": 40_000_000}[preset]
    if preset != "smoke":
        assert cfg.trainer.grad_clip is None  # see the preset files: clipping would fight the penalty


@pytest.mark.parametrize("override, message", [
    ("model.loss=lsgan", "loss"),
    ("model.n_critic=0", "n_critic"),
    ("model.generator.norm=batch", "generator.norm"),
    ("model.critic.channels=[]", "critic.channels"),
    ("model.betas_critic=[0.5]", "betas_critic"),
])
def test_bad_config_values_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        compose(["model=dcgan", "data=shapes", "preset=smoke", override])
    with pytest.raises(ValueError, match="attention_resolution"):
        GANLab(tiny_config(generator=GeneratorConfig(channels=[32, 16], groups=4, attention_resolution=5)),
               data_info())


# ------------------------------------------------------------------------------ end to end
def test_train_checkpoint_then_sample_reproduces_pixels(tmp_path, monkeypatch):
    import sys

    from lab_utils.commands.cli import main
    from lab_utils.harness.checkpoint import load_lab
    from lab_utils.harness.run import train

    run = tmp_path / "run"
    result = train(compose(["model=dcgan", "data=shapes", "preset=smoke", f"out={run}"]))
    assert result.step == 4 and (run / "checkpoints" / "last.pt").exists()
    assert sorted(p.name for p in (run / "samples").iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss/critic", "loss/generator", "stats/gradient_penalty", "stats/wasserstein",
                "grad_norm/critic", "grad_norm/generator"):
        assert all(math.isfinite(row[key]) for row in rows if "loss/critic" in row), key
    assert result.images_seen == 4 * 2 * 8  # n_critic real batches of 8 per step

    loaded = load_lab(run, device="cpu")
    images = [loaded.lab.sample(["a red circle"] * 3, torch.Generator().manual_seed(0)) for _ in range(2)]
    assert torch.equal(images[0], images[1])

    monkeypatch.setattr(sys, "argv", sys.argv[:])  # the CLI rewrites sys.argv for Hydra
    outs = []
    for seed, name in ((3, "a.png"), (3, "b.png"), (4, "c.png")):
        main(["sample", f"run={run}", "prompt=a large green square", "n=4", f"seed={seed}", "device=cpu",
              f"out={tmp_path / name}"])
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]


# ------------------------------------------------------------------------------ exercise checks
def test_exercise_checks_pass_the_reference_and_name_the_usual_mistakes(capsys, monkeypatch):
    from labs.gan.exercises import (
        check_bce_critic_loss, check_generator_loss, check_gradient_penalty, check_projection_head,
    )

    monkeypatch.delenv("GENLAB_STRICT_CHECKS", raising=False)
    # the reference itself is refused (an answer must not call it); answers from scratch: tests/test_exercises_gan.py
    assert not check_bce_critic_loss(bce_critic_loss)
    assert not check_gradient_penalty(lambda critic, real, fake, eps: gradient_penalty(critic, real, fake, eps).penalty)
    assert not check_projection_head(ProjectionHead)
    assert capsys.readouterr().out.count("calls the lab's") == 3

    def two_sided(real, fake, label_smoothing=0.0):
        return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, 1 - label_smoothing))
                + F.binary_cross_entropy_with_logits(fake, torch.full_like(fake, label_smoothing)))

    def no_create_graph(critic, real, fake, eps):
        x_hat = (eps.view(-1, *[1] * (real.dim() - 1)) * (real - fake) + fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat)
        return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()

    def whole_batch_norm(critic, real, fake, eps):
        x_hat = (eps.view(-1, *[1] * (real.dim() - 1)) * (real - fake) + fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
        return (grad.norm() - 1) ** 2

    for check, wrong, words in [
        (check_bce_critic_loss, two_sided, "two-sided"),
        (check_generator_loss, lambda s: bce_generator_loss(s, non_saturating=False), "saturating"),
        (check_gradient_penalty, no_create_graph, "create_graph"),
        (check_gradient_penalty, whole_batch_norm, "per sample"),
    ]:
        assert not check(wrong)
        line = capsys.readouterr().out
        assert line.startswith("❌") and words in line, line


def test_the_text_encoder_learns_with_the_critic_at_its_own_rate():
    lab = tiny_lab(lr_critic=1e-3, text_lr=1e-4)
    optimizers = lab.configure_optimizers()
    rates = {id(p): group["lr"] for group in optimizers["critic"].param_groups for p in group["params"]}
    assert all(rates[id(p)] == 1e-4 for p in lab.text_encoder.parameters())
    assert all(rates[id(p)] == 1e-3 for p in lab.critic.parameters())
    generator_params = {id(p) for group in optimizers["generator"].param_groups for p in group["params"]}
    assert generator_params == {id(p) for p in lab.generator.parameters()}  # G never trains the text encoder
    default = tiny_lab(lr_critic=1e-3).configure_optimizers()["critic"]
    assert {group["lr"] for group in default.param_groups} == {1e-3}


@pytest.mark.parametrize("penalty", [{"loss": "wgan_gp"}, {"loss": "bce", "gp_weight": 0.0, "r1_gamma": 2.0}],
                         ids=["gradient_penalty", "r1"])
def test_lazy_penalty_is_k_times_the_penalty_on_one_critic_update_in_k(penalty):
    # penalty_every=k: critic updates 0, k, 2k, ... carry k x the penalty, the others none; with the same
    # weights, batch and RNG the loss of a penalised update is the plain loss plus k times the eager penalty
    key = "gradient_penalty" if penalty["loss"] == "wgan_gp" else "r1"
    lab, eager = tiny_lab(penalty_every=3, **penalty), tiny_lab(**penalty)
    eager.load_state_dict(lab.state_dict())
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    captions = ["a red circle", "a blue square", "a", ""]

    def loss(model, weight):
        torch.manual_seed(1)
        return model.critic_objective(x, captions, weight)

    with_penalty, without = loss(lab, 3.0), loss(lab, 0.0)
    full = loss(eager, 1.0)
    weight = lab.config.gp_weight if key == "gradient_penalty" else lab.config.r1_gamma / 2
    assert torch.allclose(without["loss"] + weight * full[key], full["loss"], atol=1e-5)
    assert torch.allclose(without["loss"] + 3 * weight * full[key], with_penalty["loss"], atol=1e-5)
    assert without[key] == with_penalty[key]  # a skipped update logs the last measured penalty

    calls: list[float] = []
    original = lab.critic_objective
    lab.critic_objective = lambda x, c, w=1.0: calls.append(w) or original(x, c, w)
    batch = {"image": x, "caption": captions}
    ctx = RecordingContext(lab, batch)
    for step in range(3):  # n_critic = 2: critic updates 0..5
        ctx.step = step
        lab.training_step(batch, ctx)
    assert calls == [3.0, 0.0, 0.0, 3.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="penalty_every"):
        tiny_config(penalty_every=0)
