"""Checks for the diffusion exercises (notebooks 03 and 04).

Every reference is the lab's own code (``labs.diffusion``), so an exercise checks the student
against exactly what the trained model uses:

- notebook 03: :func:`check_add_noise`, :func:`check_ddpm_loss` (the lab's ``diffusion_loss``),
  :func:`check_training_step` (one optimiser step on it, run on a toy model), :func:`check_ddpm_step`,
  :func:`check_ddim_step`;
- notebook 04: :func:`check_attention_weights`, :func:`check_cross_attention`, :func:`check_guidance`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from labs.diffusion import (
    CrossAttention, DiffusionLab, NoiseScheduler, SchedulerConfig, attention, classifier_free_guidance, diffusion_loss,
)
from labs.text_encoder import TextEncoding

from lab_utils.core.exercises.cases import Case, Hint
from lab_utils.core.exercises.checks import CheckResult, check_function, check_module
from lab_utils.core.exercises.records import case_seed, graded, seeded_module


def _scheduler(schedule: str = "linear", T: int = 1000) -> NoiseScheduler:
    """A scheduler without x0 clipping, so the exercises' plain formulas are exact."""
    return NoiseScheduler(SchedulerConfig(num_train_timesteps=T, beta_schedule=schedule, clip_x0=False))


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


# ---------------------------------------------------------------------------------- add_noise
@graded("add_noise")
def check_add_noise(add_noise: Callable) -> CheckResult:
    r"""``add_noise(x0, eps, t, alpha_bar) -> xt``: $x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\epsilon$.

    x0, eps: (B, C, H, W); t: (B,) long; alpha_bar: (T,) the schedule's cumulative products.
    Compared with ``NoiseScheduler.add_noise``, which may not be called."""
    gen = torch.Generator().manual_seed(case_seed(0))
    cases = []
    for schedule, t in (("linear", [0, 10, 500, 999]), ("cosine", [999, 3, 250, 700]), ("linear", [42, 42, 42, 42])):
        scheduler = _scheduler(schedule)
        x0 = _randn(gen, 4, 3, 8, 8).clamp(-1, 1)
        cases.append(Case((x0, _randn(gen, 4, 3, 8, 8), torch.tensor(t), scheduler.alpha_bar.float()),
                          label=f"{schedule} schedule, t = {t}"))

    def reference(x0, eps, t, alpha_bar):
        return _with_alpha_bar(alpha_bar).add_noise(x0, eps, t)

    def no_sqrt(x0, eps, t, alpha_bar):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        return a * x0 + (1 - a) * eps

    def alpha_not_bar(x0, eps, t, alpha_bar):
        return reference(x0, eps, t, alpha_bar / torch.cat([torch.ones(1), alpha_bar[:-1]]))

    return check_function(
        add_noise, reference, cases, name="add_noise", atol=1e-5,
        hint=Hint("every image in the batch has its own noise level: look up its alpha_bar_t, make it broadcast "
                  "over that image's channels and pixels, and remember that alpha_bar_t and 1 - alpha_bar_t are "
                  "the *variances* of the signal and the noise parts",
                  "alpha_bar indexed by t has shape (B,): give it three trailing dimensions of size 1 so that it "
                  "multiplies a (B, C, H, W) tensor image by image; x0 is scaled by the square root of alpha_bar_t, "
                  "eps by the square root of what is left, and the two parts are added"),
        forbid=(reference, (NoiseScheduler, "add_noise")),
        known_mistakes=[(no_sqrt, "the mean and the std need square roots: the *variances* are "
                                  "alpha_bar_t and 1 - alpha_bar_t"),
                        (alpha_not_bar, "use the cumulative product alpha_bar_t, not the single-step alpha_t")])


def _with_alpha_bar(alpha_bar: torch.Tensor) -> NoiseScheduler:
    """A scheduler whose alpha_bar is the given (T,) tensor (for checking functions that take alpha_bar)."""
    scheduler = _scheduler(T=len(alpha_bar))
    scheduler.alpha_bar = alpha_bar.double()
    return scheduler


# ---------------------------------------------------------------------------------- DDPM step
@graded("ddpm_step")
def check_ddpm_step(ddpm_step: Callable) -> CheckResult:
    r"""``ddpm_step(xt, eps, t, betas, alpha_bar, z) -> x_{t-1}`` (Ho et al. eq. 11, Algorithm 2):

    $x_{t-1} = \frac{1}{\sqrt{\alpha_t}}\big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\epsilon\big) + \sigma_t z$,
    $\sigma_t^2 = \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t$, and no noise at t = 0.
    t: an int; betas, alpha_bar: (T,) float64; z: standard normal noise like xt."""
    gen = torch.Generator().manual_seed(case_seed(1))
    cases = []
    for schedule, t in (("linear", 999), ("linear", 500), ("cosine", 250), ("cosine", 1), ("linear", 0)):
        scheduler = _scheduler(schedule)
        cases.append(Case((_randn(gen, 2, 3, 8, 8), _randn(gen, 2, 3, 8, 8), t, scheduler.betas,
                           scheduler.alpha_bar, _randn(gen, 2, 3, 8, 8)), label=f"{schedule} schedule, t = {t}"))

    def reference(xt, eps, t, betas, alpha_bar, z):
        scheduler = _scheduler(T=len(betas))
        scheduler.betas, scheduler.alpha_bar = betas, alpha_bar
        scheduler.alpha_bar_prev = torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar[:-1]])
        mean, variance = scheduler.posterior_mean_variance(scheduler.x0_from_eps(xt, eps, t), xt, t)
        return mean if t == 0 else mean + variance.sqrt() * z

    def noise_at_zero(xt, eps, t, betas, alpha_bar, z):
        if t > 0:
            return reference(xt, eps, t, betas, alpha_bar, z)
        return reference(xt, eps, t, betas, alpha_bar, z) + (betas[0] ** 0.5).item() * z

    def large_variance(xt, eps, t, betas, alpha_bar, z):
        out = reference(xt, eps, t, betas, alpha_bar, torch.zeros_like(z))
        return out if t == 0 else out + betas[t].sqrt().item() * z

    return check_function(
        ddpm_step, reference, cases, name="ddpm_step", atol=1e-4,
        hint=Hint("the step has two parts: a mean, which takes away the share of the predicted noise that step t "
                  "added and undoes that step's shrinking of the signal (eq. 11), and fresh noise z scaled by the "
                  "posterior's standard deviation sigma_t, left out on the last step (t = 0)",
                  "alpha_t = 1 - beta_t is the single step, alpha_bar_t the product up to t; in the mean, eps is "
                  "weighted by beta_t over the noise's standard deviation at t, and the difference is divided by "
                  "the square root of alpha_t; sigma_t^2 is beta_t times the ratio of the noise variances "
                  "1 - alpha_bar at t - 1 and at t, with alpha_bar before the first level equal to 1"),
        forbid=(reference, (NoiseScheduler, "ddpm_step"), (NoiseScheduler, "posterior_mean_variance"),
                (NoiseScheduler, "x0_from_eps"), (NoiseScheduler, "pred_x0")),
        known_mistakes=[(noise_at_zero, "the last step (t = 0) adds no noise: return the mean"),
                        (large_variance, "this exercise uses sigma_t^2 = beta_tilde_t (the posterior variance), "
                                         "not beta_t")])


# ---------------------------------------------------------------------------------- DDIM step
@graded("ddim_step")
def check_ddim_step(ddim_step: Callable) -> CheckResult:
    r"""``ddim_step(xt, eps, t, prev_t, alpha_bar) -> x_{prev_t}``, deterministic DDIM (eta = 0), Song et al. eq. 12:

    $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\epsilon)/\sqrt{\bar\alpha_t}$,
    $x_{s} = \sqrt{\bar\alpha_s}\hat x_0 + \sqrt{1-\bar\alpha_s}\,\epsilon$, with $\bar\alpha_{-1} = 1$ (prev_t = -1)."""
    gen = torch.Generator().manual_seed(case_seed(2))
    cases = []
    for schedule, t, prev_t in (("linear", 999, 979), ("cosine", 999, 499), ("cosine", 500, 480),
                                ("linear", 20, 0), ("linear", 20, -1)):
        scheduler = _scheduler(schedule)
        cases.append(Case((_randn(gen, 2, 3, 8, 8), _randn(gen, 2, 3, 8, 8), t, prev_t, scheduler.alpha_bar),
                          label=f"{schedule} schedule, t = {t} -> {prev_t}"))

    def reference(xt, eps, t, prev_t, alpha_bar):
        return _with_alpha_bar(alpha_bar).ddim_step(eps, t, xt, prev_t, eta=0.0).prev_sample

    def prev_minus_one_wrong(xt, eps, t, prev_t, alpha_bar):
        return reference(xt, eps, t, max(prev_t, 0), alpha_bar)

    def python_negative_index(xt, eps, t, prev_t, alpha_bar):
        return reference(xt, eps, t, prev_t % len(alpha_bar), alpha_bar)

    return check_function(
        ddim_step, reference, cases, name="ddim_step", atol=1e-4,
        hint=Hint("DDIM goes through the clean image: first recover the x0 that x_t and the predicted noise imply "
                  "(the forward process run backwards), then noise that x0 to the earlier level prev_t with the same "
                  "eps, as the forward process would",
                  "solve x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps for x0; the new sample mixes that "
                  "estimate and eps with the square roots of alpha_bar at prev_t and of 1 minus it; prev_t = -1 is "
                  "the clean image, where alpha_bar is 1 (not an entry of the table)"),
        forbid=(reference, (NoiseScheduler, "ddim_step"), (NoiseScheduler, "x0_from_eps"),
                (NoiseScheduler, "pred_x0")),
        known_mistakes=[(prev_minus_one_wrong, "prev_t = -1 means 'no noise left': alpha_bar_prev = 1, "
                                               "not alpha_bar[0]"),
                        (python_negative_index, "alpha_bar[-1] is Python's *last* entry (pure noise); prev_t = -1 "
                                                "means 'no noise left', alpha_bar_prev = 1")])


# ---------------------------------------------------------------------------------- the training loss
class _ToyEpsModel(nn.Module):
    r"""A stand-in for $\epsilon_\theta(x_t, t, c)$, small enough for a check, whose output depends on all three: a
    3x3 convolution of x_t plus, per channel, a learnt vector for t and a linear map of the condition c (B, D)."""

    def __init__(self, channels: int = 3, T: int = 1000, cond_dim: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.time = nn.Embedding(T, channels)
        self.cond = nn.Linear(cond_dim, channels)

    def forward(self, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.conv(xt) + (self.time(t) + self.cond(cond))[:, :, None, None]  # (B, C, H, W)


def _toy_eps_model(seed: int) -> _ToyEpsModel:
    """A toy eps_theta with weights drawn from ``seed`` (the caller's random stream is left alone)."""
    return seeded_module(_ToyEpsModel, seed)


@graded("ddpm_loss")
def check_ddpm_loss(ddpm_loss: Callable) -> CheckResult:
    r"""``ddpm_loss(eps_model, x0, t, eps, alpha_bar, cond) -> loss``: Ho et al.'s simple loss (eq. 14) for given
    noise levels and noise, $x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\epsilon$ and the mean over every
    element of $(\epsilon - \epsilon_\theta(x_t, t, c))^2$: a 0-dim tensor that gradients flow through.

    x0, eps: (B, C, H, W); t: (B,) long; alpha_bar: (T,) float32; ``eps_model(xt, t, cond)`` the network.
    Compared with the lab's ``diffusion_loss`` (eps target, no weighting), which may not be called."""
    gen = torch.Generator().manual_seed(case_seed(6))
    cases = []
    for seed, (schedule, t) in enumerate((("cosine", [0, 10, 500, 999]), ("linear", [999, 3, 250, 700]),
                                          ("cosine", [42, 42]))):
        B = len(t)
        cases.append(Case((_toy_eps_model(seed), _randn(gen, B, 3, 8, 8).clamp(-1, 1), torch.tensor(t),
                           _randn(gen, B, 3, 8, 8), _scheduler(schedule).alpha_bar.float(), _randn(gen, B, 4)),
                          label=f"{schedule} schedule, t = {t}"))

    def reference(eps_model, x0, t, eps, alpha_bar, cond):
        return diffusion_loss(eps_model, _with_alpha_bar(alpha_bar), x0, t, eps, cond)

    def noised(x0, t, eps, alpha_bar):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def no_sqrt(eps_model, x0, t, eps, alpha_bar, cond):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        return (eps - eps_model(a * x0 + (1 - a) * eps, t, cond)).pow(2).mean()

    def x0_target(eps_model, x0, t, eps, alpha_bar, cond):
        return (x0 - eps_model(noised(x0, t, eps, alpha_bar), t, cond)).pow(2).mean()

    def clean_input(eps_model, x0, t, eps, alpha_bar, cond):
        return (eps - eps_model(x0, t, cond)).pow(2).mean()

    def summed(eps_model, x0, t, eps, alpha_bar, cond):
        return (eps - eps_model(noised(x0, t, eps, alpha_bar), t, cond)).pow(2).sum(dim=(1, 2, 3)).mean()

    def absolute(eps_model, x0, t, eps, alpha_bar, cond):
        return (eps - eps_model(noised(x0, t, eps, alpha_bar), t, cond)).abs().mean()

    return check_function(
        ddpm_loss, reference, cases, name="ddpm_loss", atol=1e-5,
        hint=Hint("three steps: noise x0 to level t with the given eps (exercise 1's forward process), ask the "
                  "network which noise it sees in that noisy image, and score its answer by the squared error "
                  "against the noise that was really added, averaged",
                  "x_t comes from x0, eps and alpha_bar_t (one level per image, broadcast over its pixels); the "
                  "network is called as eps_model(x_t, t, cond); the loss is the mean over every element (batch, "
                  "channels, pixels) of the squared difference between eps and that prediction: one number, kept "
                  "as a tensor so that the training step can backpropagate through it"),
        forbid=(reference, diffusion_loss, (DiffusionLab, "loss")),
        known_mistakes=[(no_sqrt, "x_t as in exercise 1: alpha_bar_t and 1 - alpha_bar_t are variances, so x0 and "
                                  "eps are scaled by their square roots"),
                        (x0_target, "the network is trained to predict the noise eps that was added, not the clean "
                                    "image x0"),
                        (clean_input, "the network must see the noisy x_t (what it is given while sampling), not "
                                      "the clean x0"),
                        (summed, "average over every element, pixels too (a plain mean, as F.mse_loss does), not a "
                                 "sum per image"),
                        (absolute, "the error is squared (Ho et al.'s L_simple), not its absolute value")])


# ---------------------------------------------------------------------------------- one training step
def reference_training_step(eps_model: nn.Module, optimizer: torch.optim.Optimizer, x0: torch.Tensor,
                            t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, cond) -> torch.Tensor:
    """One update on the simple loss: clear the gradients, the loss (``diffusion_loss``), backward, the optimiser's
    step; returns the loss (detached). What the harness's ``ctx.optimize`` does, without clipping or precision."""
    optimizer.zero_grad()
    loss = diffusion_loss(eps_model, _with_alpha_bar(alpha_bar), x0, t, eps, cond)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _two_steps(step: Callable) -> Callable:
    """``step`` run twice on a fresh toy model and its SGD optimiser (built under the check's seed, so the student's
    and the reference's start from the same weights): what it returned and the parameters after each step."""

    def run(x0, t, eps, alpha_bar, cond, lr):
        model = _ToyEpsModel()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        out = {}
        for i in range(len(t)):  # step i + 1 on its own noise levels and noise
            loss = step(model, optimizer, x0, t[i], eps[i], alpha_bar, cond)
            value = loss.detach() if isinstance(loss, torch.Tensor) else loss
            out[f"loss returned by step {i + 1}"] = None if value is None else float(value)  # None: "got None"
            out[f"parameters after step {i + 1}"] = {name: p.detach().clone() for name, p in model.named_parameters()}
        return out

    return run


@graded("training_step")
def check_training_step(training_step: Callable) -> CheckResult:
    r"""``training_step(eps_model, optimizer, x0, t, eps, alpha_bar, cond) -> loss``: one update of ``eps_model``'s
    parameters on the simple loss (your ``ddpm_loss``) for the given t and eps; returns the loss.

    Run twice on a toy model with SGD (momentum 0.9) from the same weights as :func:`reference_training_step`:
    the returned losses and the parameters after each step must match."""
    gen = torch.Generator().manual_seed(case_seed(7))
    cases = []
    for schedule, B, lr in (("cosine", 4, 0.1), ("linear", 2, 0.03)):
        alpha_bar = _scheduler(schedule).alpha_bar.float()
        t = torch.randint(0, len(alpha_bar), (2, B), generator=gen)  # the two steps' noise levels
        cases.append(Case((_randn(gen, B, 3, 8, 8).clamp(-1, 1), t, _randn(gen, 2, B, 3, 8, 8), alpha_bar,
                           _randn(gen, B, 4), lr), label=f"{schedule} schedule, batch of {B}, lr = {lr}"))

    def no_zero_grad(eps_model, optimizer, x0, t, eps, alpha_bar, cond):
        loss = diffusion_loss(eps_model, _with_alpha_bar(alpha_bar), x0, t, eps, cond)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def no_update(eps_model, optimizer, x0, t, eps, alpha_bar, cond):
        return diffusion_loss(eps_model, _with_alpha_bar(alpha_bar), x0, t, eps, cond).detach()

    return check_function(
        _two_steps(training_step), _two_steps(reference_training_step), cases, name="training_step", atol=1e-5,
        hint=Hint("one update of gradient descent: forget the previous step's gradients, compute this batch's loss "
                  "with your ddpm_loss, let autograd fill in the gradients, let the optimiser move the parameters, "
                  "and return the loss (for the log)",
                  "the optimiser has one method that clears the gradients of the parameters it holds and another "
                  "that applies the update; the loss tensor has the method that runs backpropagation; call them in "
                  "the order clear, loss, backpropagate, update, and return the loss detached (or as a number)"),
        forbid=(reference_training_step,), fallback=reference_training_step,
        known_mistakes=[(_two_steps(no_zero_grad), "the gradients of step 1 were still there in step 2: PyTorch adds "
                                                   "new gradients to the old ones, so clear them before each "
                                                   "backward (the optimiser's zero_grad)"),
                        (_two_steps(no_update), "the parameters did not move: after the backward pass the optimiser "
                                                "has to take its step")])


# ---------------------------------------------------------------------------------- guidance
@graded("guidance")
def check_guidance(guidance_fn: Callable) -> CheckResult:
    r"""``guidance_fn(eps_uncond, eps_cond, w) -> eps``: $\epsilon_\varnothing + w(\epsilon_c - \epsilon_\varnothing)$.

    Compared with the lab's ``classifier_free_guidance``, which may not be called (and is what ``.pick`` hands on)."""
    gen = torch.Generator().manual_seed(case_seed(3))
    cases = [Case((_randn(gen, 2, 3, 4, 4), _randn(gen, 2, 3, 4, 4), w), label=f"w = {w}")
             for w in (1.0, 0.0, 3.0, 7.5)]

    def ho_salimans(eps_uncond, eps_cond, w):
        return (1 + w) * eps_cond - w * eps_uncond

    def swapped(eps_uncond, eps_cond, w):
        return eps_cond + w * (eps_uncond - eps_cond)

    return check_function(
        guidance_fn, classifier_free_guidance, cases, name="classifier_free_guidance",
        hint=Hint("start from the unconditional prediction and move w times as far as the prompt moves it; check "
                  "the two ends: w = 0 must give the unconditional prediction, w = 1 exactly the conditional one",
                  "the direction the prompt pushes is the conditional prediction minus the unconditional one; scale "
                  "that difference by w and add it to the unconditional prediction (the lab uses diffusers' "
                  "guidance_scale, not Ho & Salimans' 1 + w form)"),
        known_mistakes=[(ho_salimans, "that is Ho & Salimans' convention (1 + w) cond - w uncond; the lab uses "
                                      "diffusers' guidance_scale, where w = 1 means 'no guidance'"),
                        (swapped, "uncond and cond are swapped: guidance moves *away* from the unconditional "
                                  "prediction")])


# ---------------------------------------------------------------------------------- attention
@graded("attention_weights")
def check_attention_weights(weights_fn: Callable) -> CheckResult:
    r"""``weights_fn(q, k, mask) -> softmax(q k^T / sqrt(d_k))`` with masked keys at weight 0.

    q: (B, nh, Tq, d), k: (B, nh, Tk, d), mask: (B, 1, 1, Tk) bool, True = real token. The lab's ``attention`` may
    not be called, nor ``F.scaled_dot_product_attention`` (with the identity as values it returns the weights)."""
    gen = torch.Generator().manual_seed(case_seed(4))
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])[:, None, None, :]
    cases = [
        Case((_randn(gen, 2, 2, 6, 8), _randn(gen, 2, 2, 5, 8), mask), label="padded prompt in the batch"),
        Case((3 * _randn(gen, 2, 4, 16, 4), 3 * _randn(gen, 2, 4, 5, 4), mask), label="16 image positions, 4 heads"),
    ]

    def reference(q, k, mask):
        return attention(q, k, torch.zeros_like(k), mask, return_weights=True)[1]

    def no_scale(q, k, mask):
        return reference(q * q.size(-1) ** 0.5, k, mask)

    def no_mask(q, k, mask):
        return reference(q, k, None)

    def scores(q, k):
        return q @ k.transpose(-2, -1) / q.size(-1) ** 0.5  # (B, nh, Tq, Tk)

    def softmax_over_queries(q, k, mask):
        return scores(q, k).masked_fill(~mask, float("-inf")).softmax(dim=-2)

    def masked_with_zero(q, k, mask):
        return scores(q, k).masked_fill(~mask, 0.0).softmax(dim=-1)

    return check_function(
        weights_fn, reference, cases, name="attention_weights",
        hint=Hint("each query scores every key by their dot product, scaled down by the square root of the head "
                  "dimension; padding keys must end with a weight of exactly 0; a softmax over the keys turns each "
                  "query's scores into weights that sum to 1",
                  "the scores are (B, nh, Tq, Tk): q times k with k's last two dimensions swapped, divided by the "
                  "square root of d; where the mask is False the score has to become minus infinity *before* the "
                  "softmax, which runs over the last dimension (the keys)"),
        forbid=(attention, (torch.nn.functional, "scaled_dot_product_attention")),
        known_mistakes=[(no_scale, "divide the scores by sqrt(d_k) before the softmax"),
                        (no_mask, "padding keys must get weight 0: fill their scores with -inf before the softmax"),
                        (softmax_over_queries, "the softmax runs over the keys (the last dimension): each query's "
                                               "weights sum to 1, not each key's"),
                        (masked_with_zero, "a score of 0 still gets weight after the softmax: padding keys need "
                                           "minus infinity")])


def _reference_cross_attention(channels: int, cond_dim: int, heads: int, groups: int) -> nn.Module:
    """The lab's CrossAttention with its zero-initialised output projection made random (else it is the identity)."""
    layer = CrossAttention(channels, cond_dim, heads, groups)
    nn.init.normal_(layer.proj.weight, std=channels**-0.5)
    nn.init.normal_(layer.norm.weight, mean=1.0, std=0.1)
    return layer


@graded("cross_attention")
def check_cross_attention(cross_attention_cls: Callable[..., nn.Module]) -> CheckResult:
    """A ``CrossAttention(channels, cond_dim, heads, groups)`` layer with submodules ``norm``
    (GroupNorm), ``to_q`` (Linear C->C), ``to_kv`` (Linear D->2C), ``proj`` (Linear C->C), whose
    ``forward(x, context)`` returns ``x + proj(attention)`` for x (B, C, H, W) and a TextEncoding ``context``.

    The lab's ``CrossAttention`` may not run (its forward raises: a layer that inherits or wraps it fails). The
    attention inside may be the student's ``attention_weights`` (or the lab's, through ``.pick``) or
    ``F.scaled_dot_product_attention``: the exercise is the layer around it."""
    gen = torch.Generator().manual_seed(case_seed(5))
    B, C, D, L = 2, 16, 12, 5
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])

    def context() -> TextEncoding:
        tokens = _randn(gen, B, L, D)
        return TextEncoding(tokens=tokens, mask=mask, pooled=tokens.mean(1))

    cases = [Case((_randn(gen, B, C, 4, 4), context()), label="4x4 image, a padded prompt"),
             Case((_randn(gen, B, C, 8, 6), context()), label="8x6 image")]
    return check_module(
        cross_attention_cls, _reference_cross_attention, Case((C, D, 4, 4)), cases, name="CrossAttention",
        atol=1e-4,
        hint=Hint("queries come from the normalised image features, one per pixel; keys and values from the text "
                  "tokens; split the channels into heads, attend with the token mask so [PAD] gets no weight, merge "
                  "the heads, project, and add the result to the input x (a residual)",
                  "flatten the normalised x to (B, HW, C); to_kv gives the keys and then the values along its last "
                  "dimension (two halves of C each); q, k and v go to (B, heads, T, C / heads); the (B, L) mask "
                  "needs singleton dimensions for the heads and the queries; afterwards go back to (B, HW, C), apply "
                  "proj, and reshape to (B, C, H, W) before adding x"),
        forbid=(CrossAttention, _reference_cross_attention))
