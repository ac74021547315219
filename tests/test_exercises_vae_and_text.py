"""The graded checks of notebooks 02 (VAE) and 04 (text conditioning) cannot be fooled.

For each check: an answer written from scratch (the reference's formula, not the lab's function) passes; each
known mistake, written from scratch too, gets its own message; an answer that calls the lab's function (or the
torch function that would be the answer in one call) fails with "calls the lab's"; the first wrong try shows the
hint's idea and the second its detail; and ``.pick`` hands on the student's function when it passed and the lab's
when it did not. Every check runs in well under a second.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lab_utils.core.exercises.checks as checks
import labs.diffusion.exercises as diffusion_exercises
import labs.vae.exercises as vae_exercises
from lab_utils.core.exercises.cases import Hint
from labs.diffusion import CrossAttention, attention, classifier_free_guidance
from labs.diffusion.exercises import check_attention_weights, check_cross_attention, check_guidance
from labs.vae import gaussian_kl, gaussian_nll, kl_divergence, negative_elbo, reparameterize
from labs.vae.exercises import check_beta_elbo_loss, check_gaussian_nll, check_kl_divergence, check_reparameterize

pytestmark = pytest.mark.usefixtures("one_thread")

LOG_2PI = math.log(2 * math.pi)
CALLS_THE_LAB = "calls the lab's"


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """No strict mode, and a fresh count of wrong tries (which hint a check shows) for every test."""
    monkeypatch.delenv("GENLAB_STRICT_CHECKS", raising=False)
    monkeypatch.setattr(checks, "_FAILURES", {})


def run(check, answer, capsys):
    """The check's result and the one line it printed."""
    result = check(answer)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("✅", "❌"))]
    assert len(lines) == 1, lines
    return result, lines[0]


def hint_of(check, module, monkeypatch) -> Hint:
    """The Hint the check hands to check_function / check_module (caught on its way there)."""
    seen, reals = {}, {name: getattr(module, name) for name in ("check_function", "check_module")
                        if hasattr(module, name)}
    for name, real in reals.items():
        def spy(*args, _real=real, **kwargs):
            seen["hint"] = kwargs["hint"]
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    check(lambda *args, **kwargs: (_ for _ in ()).throw(NotImplementedError()))
    for name, real in reals.items():
        monkeypatch.setattr(module, name, real)
    assert isinstance(seen["hint"], Hint)
    return seen["hint"]


# ------------------------------------------------------------------------------------------- answers from scratch
def reparameterize_scratch(mu, logvar, eps):
    return mu + torch.exp(0.5 * logvar) * eps


def kl_scratch(mu, logvar):
    return 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(dim=1)


def nll_scratch(x0, mean, log_sigma):
    per_pixel = (x0 - mean) ** 2 / (2 * torch.exp(2 * log_sigma)) + log_sigma + 0.5 * LOG_2PI
    return per_pixel.flatten(1).sum(dim=1)


def loss_scratch(x0, mean, mu, logvar, log_sigma, beta):
    return nll_scratch(x0, mean, log_sigma) + beta * kl_scratch(mu, logvar)


def weights_scratch(q, k, mask):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


def guidance_scratch(eps_uncond, eps_cond, w):
    return eps_uncond + w * (eps_cond - eps_uncond)


class CrossAttentionScratch(nn.Module):
    """The layer of exercise 2, written out; ``weights`` is the attention-weights function it uses (None: SDPA)."""

    weights = staticmethod(weights_scratch)

    def __init__(self, channels, cond_dim, heads, groups):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(cond_dim, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def attend(self, q, k, v, mask):
        return self.weights(q, k, mask) @ v

    def forward(self, x, context):
        B, C, H, W = x.shape
        L, hs = context.tokens.size(1), C // self.heads
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q = self.to_q(h).view(B, H * W, self.heads, hs).transpose(1, 2)  # (B, nh, HW, hs)
        k, v = self.to_kv(context.tokens).split(C, dim=-1)  # 2 x (B, L, C)
        k = k.view(B, L, self.heads, hs).transpose(1, 2)  # (B, nh, L, hs)
        v = v.view(B, L, self.heads, hs).transpose(1, 2)
        y = self.attend(q, k, v, context.mask[:, None, None, :])  # (B, nh, HW, hs)
        return x + self.proj(y.transpose(1, 2).reshape(B, H * W, C)).transpose(1, 2).view(B, C, H, W)


class CrossAttentionSDPA(CrossAttentionScratch):
    def attend(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CrossAttentionNoResidual(CrossAttentionScratch):
    def forward(self, x, context):
        return super().forward(x, context) - x


CHECKS = [  # (check, module it lives in, exercise id, an answer from scratch, the lab's function it may not call)
    (check_reparameterize, vae_exercises, "reparameterize", reparameterize_scratch,
     lambda mu, logvar, eps: reparameterize(mu, logvar, eps)),
    (check_kl_divergence, vae_exercises, "kl_divergence", kl_scratch, lambda mu, logvar: kl_divergence(mu, logvar)),
    (check_gaussian_nll, vae_exercises, "gaussian_nll", nll_scratch, lambda x0, mean, ls: gaussian_nll(x0, mean, ls)),
    (check_beta_elbo_loss, vae_exercises, "beta_elbo_loss", loss_scratch,
     lambda x0, mean, mu, logvar, ls, beta: negative_elbo(nll_scratch(x0, mean, ls), kl_scratch(mu, logvar),
                                                          beta).loss),
    (check_attention_weights, diffusion_exercises, "attention_weights", weights_scratch,
     lambda q, k, mask: attention(q, k, k, mask, return_weights=True)[1]),
    (check_cross_attention, diffusion_exercises, "cross_attention", CrossAttentionScratch,
     type("Inherits", (CrossAttention,), {})),
    (check_guidance, diffusion_exercises, "guidance", guidance_scratch,
     lambda u, c, w: classifier_free_guidance(u, c, w)),
]
IDS = [entry[2] for entry in CHECKS]


@pytest.mark.parametrize("check, module, exercise, scratch, calls_lab", CHECKS, ids=IDS)
def test_an_answer_from_scratch_passes_and_is_what_pick_hands_on(check, module, exercise, scratch, calls_lab,
                                                                 capsys):
    assert check.exercise == exercise
    result, line = run(check, scratch, capsys)
    assert result and line.startswith("✅"), line
    assert result.pick(scratch) is scratch


@pytest.mark.parametrize("check, module, exercise, scratch, calls_lab", CHECKS, ids=IDS)
def test_an_answer_that_calls_the_lab_fails_and_pick_hands_on_the_lab(check, module, exercise, scratch, calls_lab,
                                                                      capsys):
    result, line = run(check, calls_lab, capsys)
    assert not result and CALLS_THE_LAB in line, line
    assert "hint" not in line  # the message says what to do; no hint is spent on it
    fallback = result.pick(calls_lab)
    assert fallback is not calls_lab and "uses the lab's version" in capsys.readouterr().out
    again, line = run(check, fallback, capsys)  # the lab's version handed on is no answer either
    assert not again and CALLS_THE_LAB in line, line


@pytest.mark.parametrize("check, module, exercise, scratch, calls_lab", CHECKS, ids=IDS)
def test_the_first_wrong_try_shows_the_idea_and_the_second_the_detail(check, module, exercise, scratch, calls_lab,
                                                                      capsys, monkeypatch):
    hint = hint_of(check, module, monkeypatch)
    assert hint.idea and hint.detail and hint.idea != hint.detail
    capsys.readouterr()
    wrong = {  # wrong in a way no known mistake describes
        "reparameterize": lambda mu, logvar, eps: mu + torch.exp(0.5 * logvar) * eps * 1.5,
        "kl_divergence": lambda mu, logvar: kl_scratch(mu, logvar) + 1.0,
        "gaussian_nll": lambda x0, mean, ls: nll_scratch(x0, mean, ls) * 1.5,
        "beta_elbo_loss": lambda x0, mean, mu, logvar, ls, beta: loss_scratch(x0, mean, mu, logvar, ls, beta) + 1.0,
        "attention_weights": lambda q, k, mask: weights_scratch(q, k, mask) * 0.5,
        "cross_attention": CrossAttentionNoResidual,
        "guidance": lambda u, c, w: u + 0.5 * w * (c - u),
    }[exercise]
    first, line = run(check, wrong, capsys)
    assert not first and line.endswith(f"hint: {hint.idea}"), line
    second, line = run(check, wrong, capsys)
    assert not second and line.endswith(f"hint: {hint.detail}"), line


@pytest.mark.parametrize("check, module, exercise, scratch, calls_lab", CHECKS, ids=IDS)
def test_hints_teach_the_idea_in_words_not_code(check, module, exercise, scratch, calls_lab, monkeypatch):
    hint = hint_of(check, module, monkeypatch)
    for text in (hint.idea, hint.detail):
        code = [token for token in ("torch.", "masked_fill", ".split(", ".softmax(", "**", " @ ", "exp(", "sqrt(",
                                    ".transpose(", ".sum(", "mu +", "x0 -") if token in text]
        assert not code, f"{exercise}: the hint reads like code ({code}): {text}"


@pytest.mark.parametrize("check, module, exercise, scratch, calls_lab", CHECKS, ids=IDS)
def test_an_unwritten_answer_is_not_implemented_and_pick_hands_on_the_lab(check, module, exercise, scratch,
                                                                          calls_lab, capsys):
    def unwritten(*args, **kwargs):
        raise NotImplementedError("exercise: write your solution here")

    result, line = run(check, unwritten, capsys)
    assert not result and "not implemented yet" in line
    fallback = result.pick(unwritten)
    assert fallback is not unwritten and callable(fallback)


# ------------------------------------------------------------------------------------------- known mistakes, VAE
def known(check, answer, message, capsys):
    result, line = run(check, answer, capsys)
    assert not result and f"hint: {message}" in line, line


@pytest.mark.parametrize("answer, message", [
    (lambda mu, logvar, eps: mu + logvar * eps, "logvar is the log of the variance, not the standard deviation"),
    (lambda mu, logvar, eps: mu + torch.exp(logvar) * eps, "that scales the noise by the variance"),
    (lambda mu, logvar, eps: mu + torch.exp(0.25 * logvar) * eps, "that is the fourth root of the variance"),
], ids=["std_is_logvar", "std_is_variance", "std_without_half"])
def test_reparameterize_known_mistakes(answer, message, capsys):
    known(check_reparameterize, answer, message, capsys)


def test_reparameterize_needs_gradients(capsys):
    result, line = run(check_reparameterize, lambda mu, logvar, eps: reparameterize_scratch(mu, logvar, eps).detach(),
                       capsys)
    assert not result and "z carries no gradient" in line, line


@pytest.mark.parametrize("answer, message", [
    (lambda mu, logvar: -kl_scratch(mu, logvar), "the sign: a KL divergence is >= 0"),
    (lambda mu, logvar: 0.5 * (mu**2 + logvar.exp() - 1 - logvar).mean(dim=1), "sum over the latent dimensions"),
    (lambda mu, logvar: 0.5 * (mu**2 + logvar.exp() - logvar).sum(dim=1), "the '1 +' inside the sum is missing"),
    (lambda mu, logvar: 0.5 * (mu**2 + logvar - 1 - logvar).sum(dim=1), "the variance sigma^2 is the exponential"),
], ids=["wrong_sign", "mean_over_latents", "no_one", "logvar_as_variance"])
def test_kl_known_mistakes(answer, message, capsys):
    known(check_kl_divergence, answer, message, capsys)


@pytest.mark.parametrize("answer, name", [
    (lambda mu, logvar: gaussian_kl(mu, logvar, torch.zeros_like(mu), torch.zeros_like(mu)), "gaussian_kl"),
    (lambda mu, logvar: torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)).sum(dim=1),
     "torch.distributions.kl_divergence"),
], ids=["gaussian_kl", "torch_kl"])
def test_kl_may_not_come_from_the_lab_or_torch(answer, name, capsys):
    result, line = run(check_kl_divergence, answer, capsys)
    assert not result and CALLS_THE_LAB in line and f"`{name}`" in line, line


def test_kl_from_an_alias_of_torchs_kl_is_caught(capsys):
    from torch.distributions.kl import kl_divergence as torch_kl

    def answer(mu, logvar):
        q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
        return torch_kl(q, torch.distributions.Normal(0.0, 1.0)).sum(dim=1)

    result, line = run(check_kl_divergence, answer, capsys)
    assert not result and CALLS_THE_LAB in line, line
    assert torch_kl(torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(0.0, 1.0)) == 0  # restored


@pytest.mark.parametrize("answer, message", [
    (lambda x0, mean, ls: ((x0 - mean) ** 2 / (2 * torch.exp(2 * ls))).flatten(1).sum(1),
     "the normalising constant log sigma + 0.5 log(2 pi) per pixel is missing"),
    (lambda x0, mean, ls: ((x0 - mean) ** 2 / (2 * torch.exp(2 * ls)) + ls).flatten(1).sum(1),
     "the 0.5 * log(2 pi) per pixel is missing"),
    (lambda x0, mean, ls: nll_scratch(x0, mean, ls) / x0[0].numel(), "sum over the pixels, do not average"),
    (lambda x0, mean, ls: ((x0 - mean) ** 2).flatten(1).sum(1), "that is the squared error"),
], ids=["no_constant", "no_two_pi", "mean_over_pixels", "mse_only"])
def test_gaussian_nll_known_mistakes(answer, message, capsys):
    known(check_gaussian_nll, answer, message, capsys)


@pytest.mark.parametrize("answer, name", [
    (lambda x0, mean, ls: -torch.distributions.Normal(mean, ls.exp()).log_prob(x0).flatten(1).sum(1),
     "Normal.log_prob"),
    (lambda x0, mean, ls: F.gaussian_nll_loss(mean, x0, torch.exp(2 * ls).expand_as(x0), full=True,
                                              reduction="none").flatten(1).sum(1), "gaussian_nll_loss"),
], ids=["normal_log_prob", "gaussian_nll_loss"])
def test_gaussian_nll_may_not_come_from_torch(answer, name, capsys):
    result, line = run(check_gaussian_nll, answer, capsys)
    assert not result and CALLS_THE_LAB in line and name in line, line


@pytest.mark.parametrize("answer, message", [
    (lambda x0, mean, mu, logvar, ls, beta: beta * nll_scratch(x0, mean, ls) + kl_scratch(mu, logvar),
     "beta multiplies the KL term"),
    (lambda x0, mean, mu, logvar, ls, beta: loss_scratch(x0, mean, mu, logvar, ls, beta).mean(),
     "return one value per image"),
    (lambda x0, mean, mu, logvar, ls, beta: nll_scratch(x0, mean, ls) - beta * kl_scratch(mu, logvar),
     "the loss is the NEGATIVE ELBO"),
], ids=["beta_on_reconstruction", "batch_mean", "plus_kl"])
def test_beta_elbo_loss_known_mistakes(answer, message, capsys):
    known(check_beta_elbo_loss, answer, message, capsys)


def test_the_loss_may_combine_the_labs_terms_handed_on_by_pick(capsys):
    """A student whose KL and likelihood have not passed yet combines the lab's versions: the loss still passes."""
    unwritten = lambda *args: (_ for _ in ()).throw(NotImplementedError())  # noqa: E731
    kl_fn = check_kl_divergence(unwritten).pick(unwritten)
    nll_fn = check_gaussian_nll(unwritten).pick(unwritten)
    assert kl_fn is kl_divergence and nll_fn is gaussian_nll
    capsys.readouterr()
    result, line = run(check_beta_elbo_loss, lambda x0, mean, mu, logvar, ls, beta: nll_fn(x0, mean, ls)
                       + beta * kl_fn(mu, logvar), capsys)
    assert result, line


# ------------------------------------------------------------------------------------------- known mistakes, 04
def scores(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))


@pytest.mark.parametrize("answer, message", [
    (lambda q, k, mask: (q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf")).softmax(-1),
     "divide the scores by sqrt(d_k)"),
    (lambda q, k, mask: scores(q, k).softmax(-1), "padding keys must get weight 0"),
    (lambda q, k, mask: scores(q, k).masked_fill(~mask, float("-inf")).softmax(-2), "the softmax runs over the keys"),
    (lambda q, k, mask: scores(q, k).masked_fill(~mask, 0.0).softmax(-1), "a score of 0 still gets weight"),
], ids=["no_scale", "no_mask", "softmax_over_queries", "masked_with_zero"])
def test_attention_weights_known_mistakes(answer, message, capsys):
    known(check_attention_weights, answer, message, capsys)


def test_attention_weights_may_not_come_from_sdpa(capsys):
    def identity_values(q, k, mask):  # softmax(...) @ I is the weights themselves
        eye = torch.eye(k.size(-2)).expand(*k.shape[:2], -1, -1).contiguous()
        return F.scaled_dot_product_attention(q, k, eye, attn_mask=mask)

    sdpa = F.scaled_dot_product_attention
    result, line = run(check_attention_weights, identity_values, capsys)
    assert not result and CALLS_THE_LAB in line and "scaled_dot_product_attention" in line, line
    assert F.scaled_dot_product_attention is sdpa  # restored after the check


def test_cross_attention_may_use_sdpa_or_the_labs_weights_but_not_the_labs_layer(capsys):
    """The exercise is the layer: F.scaled_dot_product_attention and the attention weights handed on by .pick
    (the lab's, while the student's have not passed) are fine; a layer that wraps the lab's is not."""
    result, line = run(check_cross_attention, CrossAttentionSDPA, capsys)
    assert result, line

    unwritten = lambda *args: (_ for _ in ()).throw(NotImplementedError())  # noqa: E731
    labs_weights = check_attention_weights(unwritten).pick(unwritten)
    capsys.readouterr()
    with_labs_weights = type("WithLabsWeights", (CrossAttentionScratch,), {"weights": staticmethod(labs_weights)})
    result, line = run(check_cross_attention, with_labs_weights, capsys)
    assert result, line

    class Wraps(nn.Module):
        def __init__(self, channels, cond_dim, heads, groups):
            super().__init__()
            self.heads = heads
            layer = CrossAttention(channels, cond_dim, heads, groups)
            self.norm, self.to_q, self.to_kv, self.proj = layer.norm, layer.to_q, layer.to_kv, layer.proj
            self.inner = [layer]  # not a submodule: the parameter names stay the exercise's

        def forward(self, x, context):
            return self.inner[0](x, context)

    result, line = run(check_cross_attention, Wraps, capsys)
    assert not result and CALLS_THE_LAB in line and "`CrossAttention`" in line, line


def test_cross_attention_names_its_submodules(capsys):
    renamed = type("Renamed", (CrossAttentionScratch,), {})
    original_init = CrossAttentionScratch.__init__

    def init(self, channels, cond_dim, heads, groups):
        original_init(self, channels, cond_dim, heads, groups)
        self.out = self.proj
        del self.proj

    renamed.__init__ = init
    result, line = run(check_cross_attention, renamed, capsys)
    assert not result and "parameter names differ" in line, line


@pytest.mark.parametrize("answer, message", [
    (lambda u, c, w: (1 + w) * c - w * u, "that is Ho & Salimans' convention"),
    (lambda u, c, w: c + w * (u - c), "uncond and cond are swapped"),
], ids=["ho_salimans", "swapped"])
def test_guidance_known_mistakes(answer, message, capsys):
    known(check_guidance, answer, message, capsys)
