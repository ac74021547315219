"""The GAN exercises' checks (labs/gan/exercises.py, notebook 01): an answer written from scratch passes, each
known mistake gets its own message, an answer that calls the lab's reference fails saying so, a wrong answer gets
the hint's idea first and its detail on the next try, and a failed check hands the notebook the lab's version
with the student's signature. Also the power iteration the spectral-norm exercise is compared with, against
torch's spectral_norm."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import lab_utils.core.exercises.checks as checks
import labs.gan.exercises as gan_exercises
from lab_utils.core.exercises.cases import NOT_IMPLEMENTED, Hint, detached_copy
from lab_utils.core.exercises.checks import CheckResult
from lab_utils.core.exercises.difference import difference
from lab_utils.core.exercises.records import check_spec, judge, observe
from labs.gan import (
    ProjectionHead, bce_critic_loss, bce_generator_loss, critic_loss, gradient_penalty, hinge_critic_loss,
    hinge_generator_loss, interpolate, r1_penalty,
)
from labs.gan.exercises import (
    BCE_CRITIC_MISTAKES, GENERATOR_MISTAKES, GP_MISTAKES, HINGE_MISTAKES, R1_MISTAKES, SPECTRAL_MISTAKES,
    bce_critic_cases, check_bce_critic_loss, check_generator_loss, check_gradient_penalty, check_hinge_loss,
    check_projection_head, check_r1_penalty, check_spectral_norm, generator_cases, gradient_penalty_cases,
    hinge_cases, r1_cases, spectral_norm_cases,
)
from labs.gan.model import power_iteration

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "01_gan.ipynb"


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    """Checks print and return a result (no raise); each test starts with no failed tries counted."""
    monkeypatch.delenv("GENLAB_STRICT_CHECKS", raising=False)
    monkeypatch.setattr(checks, "_FAILURES", {})


def lines(capsys) -> list[str]:
    return capsys.readouterr().out.strip().splitlines()


# --------------------------------------------------------------------------- answers written from scratch
def bce_from_scratch(real_scores, fake_scores, label_smoothing=0.0):
    real_target = torch.full_like(real_scores, 1.0 - label_smoothing)
    return (F.binary_cross_entropy_with_logits(real_scores, real_target)
            + F.binary_cross_entropy_with_logits(fake_scores, torch.zeros_like(fake_scores)))


def generator_from_scratch(fake_scores):
    return -F.logsigmoid(fake_scores).mean()  # -mean log sigma(s), stable for s = -50


def hinge_from_scratch(real_scores, fake_scores):
    return (torch.clamp(1 - real_scores, min=0).mean() + torch.clamp(1 + fake_scores, min=0).mean(),
            -fake_scores.mean())


def input_gradient(critic, x, create_graph=True):
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x).sum(), x, create_graph=create_graph)
    return grad


def mix(real, fake, eps):
    eps = eps.reshape(-1, *([1] * (real.dim() - 1)))
    return fake + eps * (real - fake)


def gp_from_scratch(critic, real, fake, eps):
    grad = input_gradient(critic, mix(real, fake, eps))
    return ((grad.reshape(len(grad), -1).norm(dim=1) - 1) ** 2).mean()


def r1_from_scratch(critic, real, gamma):
    grad = input_gradient(critic, real)
    return 0.5 * gamma * (grad.reshape(len(grad), -1) ** 2).sum(dim=1).mean()


def power_iteration_from_scratch(W, u, n_iterations):
    for _ in range(n_iterations):
        v = W.T @ u
        v = v / torch.linalg.vector_norm(v)
        u = W @ v
        u = u / torch.linalg.vector_norm(u)
    return torch.dot(u, W @ v), u


class HeadFromScratch(nn.Module):
    def __init__(self, feature_dim, cond_dim):
        super().__init__()
        self.psi = nn.Linear(feature_dim, 1)
        self.embed = nn.Linear(cond_dim, feature_dim, bias=False)

    def forward(self, features, y):
        return self.psi(features)[:, 0] + torch.einsum("bf,bf->b", self.embed(y), features)


CHECKS = {  # exercise id -> (check, an answer from scratch, the check's first case)
    "bce_critic_loss": (check_bce_critic_loss, bce_from_scratch, bce_critic_cases()[0]),
    "generator_loss": (check_generator_loss, generator_from_scratch, generator_cases()[0]),
    "hinge_loss": (check_hinge_loss, hinge_from_scratch, hinge_cases()[0]),
    "gradient_penalty": (check_gradient_penalty, gp_from_scratch, gradient_penalty_cases()[0]),
    "r1_penalty": (check_r1_penalty, r1_from_scratch, r1_cases()[0]),
    "projection_head": (check_projection_head, HeadFromScratch, None),
    "spectral_norm": (check_spectral_norm, power_iteration_from_scratch, spectral_norm_cases()[0]),
}


@pytest.mark.parametrize("exercise", sorted(CHECKS))
def test_an_answer_written_from_scratch_passes_and_is_picked(exercise, capsys):
    check, answer, _ = CHECKS[exercise]
    result = check(answer)
    assert isinstance(result, CheckResult) and result and check.exercise == exercise
    (line,) = lines(capsys)
    assert line.startswith("✅") and "passed" in line
    assert result.pick(answer) is answer  # the notebook goes on with the student's version


def test_the_notebook_gives_points_to_exactly_these_exercises():
    meta = nbformat.read(NOTEBOOK, as_version=4).metadata["genlab"]
    assert meta["notebook"] == "01_gan" and meta["grade_in_smoke_mode"] is True
    assert sorted(meta["exercises"]) == sorted(CHECKS)
    assert all(points in (1, 2) for points in meta["exercises"].values())


def test_the_grader_judges_what_the_sandbox_observed_as_the_notebook_check_does(capsys):
    """The two halves of a graded check (observe the answer, judge it against the reference computed apart) give the
    notebook's verdict, on the notebook's inputs and on inputs drawn for a grading run."""
    for draw in (0, 12345):
        for check, answer, _ in CHECKS.values():
            (observation,) = observe(check, answer, draw)
            assert judge(check_spec(check, draw), observation) [0], check.exercise
        wrong = lambda real, fake: (real.mean(), fake.mean())  # noqa: E731
        (observation,) = observe(check_hinge_loss, wrong, draw)
        passed, detail = judge(check_spec(check_hinge_loss, draw), observation)
        assert not passed and "case 1/" in detail
    capsys.readouterr()


def test_a_grading_run_draws_new_inputs():
    first, second = check_spec(check_hinge_loss, 0), check_spec(check_hinge_loss, 7)
    assert not torch.equal(first.cases[0].args[0], second.cases[0].args[0])
    assert torch.equal(check_spec(check_hinge_loss, 7).cases[0].args[0], second.cases[0].args[0])  # the draw decides


# --------------------------------------------------------------------------- known mistakes, from scratch
def _hinge(real, fake, critic=None, generator=None):
    return (hinge_from_scratch(real, fake)[0] if critic is None else critic,
            -fake.mean() if generator is None else generator)


def _gp_with(penalty):
    def answer(critic, real, fake, eps):
        return penalty(input_gradient(critic, mix(real, fake, eps)).flatten(1))
    return answer


def _r1_with(penalty):
    def answer(critic, real, gamma):
        return penalty(input_gradient(critic, real).flatten(1), gamma)
    return answer


def _power(v_update=lambda W, u: W.T @ u, normalise=True, n=None, out=lambda sigma, u, v: (sigma, u)):
    def answer(W, u, n_iterations):
        for _ in range(n_iterations if n is None else n):
            v = v_update(W, u)
            v = v / v.norm() if normalise else v
            u = W @ v
            u = u / u.norm() if normalise else u
        return out(u @ W @ v, u, v)
    return answer


def _bce(real, real_target, fake, fake_target):
    return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, real_target))
            + F.binary_cross_entropy_with_logits(fake, torch.full_like(fake, fake_target)))


MISTAKES = [  # (check, the check's list of known mistakes, which one, a wrong answer written from scratch)
    (check_bce_critic_loss, BCE_CRITIC_MISTAKES, 0, lambda r, f, label_smoothing=0.0:
        _bce(r, 1 - label_smoothing, f, label_smoothing)),
    (check_bce_critic_loss, BCE_CRITIC_MISTAKES, 1, lambda r, f, label_smoothing=0.0: _bce(r, 1.0, f, 0.0)),
    (check_bce_critic_loss, BCE_CRITIC_MISTAKES, 2, lambda r, f, label_smoothing=0.0:
        _bce(f, 1 - label_smoothing, r, 0.0)),
    (check_bce_critic_loss, BCE_CRITIC_MISTAKES, 3, lambda r, f, label_smoothing=0.0:
        _bce(r, label_smoothing, f, 0.0)),
    (check_generator_loss, GENERATOR_MISTAKES, 0, lambda f: F.logsigmoid(-f).mean()),
    (check_generator_loss, GENERATOR_MISTAKES, 1, lambda f: F.logsigmoid(f).mean()),
    (check_generator_loss, GENERATOR_MISTAKES, 2, lambda f: F.softplus(f).mean()),
    (check_hinge_loss, HINGE_MISTAKES, 0, lambda r, f: _hinge(r, f, critic=(1 - r).mean() + (1 + f).mean())),
    (check_hinge_loss, HINGE_MISTAKES, 1, lambda r, f: _hinge(r, f, critic=F.relu(1 + r).mean()
                                                              + F.relu(1 - f).mean())),
    (check_hinge_loss, HINGE_MISTAKES, 2, lambda r, f: _hinge(r, f, critic=F.relu(1 - r.mean())
                                                              + F.relu(1 + f.mean()))),
    (check_hinge_loss, HINGE_MISTAKES, 3, lambda r, f: _hinge(r, f, critic=F.relu(1 - r).sum() + F.relu(1 + f).sum())),
    (check_hinge_loss, HINGE_MISTAKES, 4, lambda r, f: _hinge(r, f, generator=F.relu(1 - f).mean())),
    (check_hinge_loss, HINGE_MISTAKES, 5, lambda r, f: _hinge(r, f, generator=f.mean())),
    (check_gradient_penalty, GP_MISTAKES, 0, _gp_with(lambda g: (g.norm() - 1) ** 2)),
    (check_gradient_penalty, GP_MISTAKES, 1, _gp_with(lambda g: ((g.pow(2).sum(1) - 1) ** 2).mean())),
    (check_gradient_penalty, GP_MISTAKES, 2, _gp_with(lambda g: ((g.norm(dim=1) - 1).clamp(min=0) ** 2).mean())),
    (check_gradient_penalty, GP_MISTAKES, 3, lambda critic, real, fake, eps: gp_from_scratch(critic, real, real, eps)),
    (check_gradient_penalty, GP_MISTAKES, 4, lambda critic, real, fake, eps: gp_from_scratch(critic, fake, real, eps)),
    (check_r1_penalty, R1_MISTAKES, 0, _r1_with(lambda g, gamma: gamma * g.pow(2).sum(1).mean())),
    (check_r1_penalty, R1_MISTAKES, 1, _r1_with(lambda g, gamma: 0.5 * g.pow(2).sum(1).mean())),
    (check_r1_penalty, R1_MISTAKES, 2, _r1_with(lambda g, gamma: gamma / 2 * g.norm(dim=1).mean())),
    (check_r1_penalty, R1_MISTAKES, 3, _r1_with(lambda g, gamma: gamma / 2 * g.pow(2).sum())),
    (check_r1_penalty, R1_MISTAKES, 4, _r1_with(lambda g, gamma: gamma / 2 * ((g.norm(dim=1) - 1) ** 2).mean())),
    (check_spectral_norm, SPECTRAL_MISTAKES, 0, _power(v_update=lambda W, u: W @ u)),
    (check_spectral_norm, SPECTRAL_MISTAKES, 1, _power(normalise=False)),
    (check_spectral_norm, SPECTRAL_MISTAKES, 2, _power(out=lambda sigma, u, v: (sigma ** 2, u))),
    (check_spectral_norm, SPECTRAL_MISTAKES, 3, _power(n=1)),
    (check_spectral_norm, SPECTRAL_MISTAKES, 4, _power(out=lambda sigma, u, v: (sigma, v))),
]


def test_every_known_mistake_has_a_test():
    covered = {(id(mistakes), index) for _, mistakes, index, _ in MISTAKES}
    for mistakes in (BCE_CRITIC_MISTAKES, GENERATOR_MISTAKES, HINGE_MISTAKES, GP_MISTAKES, R1_MISTAKES,
                     SPECTRAL_MISTAKES):
        assert {(id(mistakes), index) for index in range(len(mistakes))} <= covered


@pytest.mark.parametrize("check, mistakes, index, answer", MISTAKES,
                         ids=[f"{check.exercise}-{index}" for check, _, index, _ in MISTAKES])
def test_each_known_mistake_gets_its_message(check, mistakes, index, answer, capsys):
    assert not check(answer)
    (line,) = lines(capsys)
    assert line.startswith("❌") and mistakes[index][1] in line, line


def test_a_penalty_without_create_graph_cannot_train_the_critic(capsys):
    def no_graph(critic, real, fake, eps):
        grad = input_gradient(critic, mix(real, fake, eps), create_graph=False)
        return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()

    def r1_no_graph(critic, real, gamma):
        return gamma / 2 * input_gradient(critic, real, create_graph=False).flatten(1).pow(2).sum(1).mean()

    assert not check_gradient_penalty(no_graph)
    assert not check_r1_penalty(r1_no_graph)
    for line in lines(capsys):
        assert line.startswith("❌") and "create_graph=True" in line, line


def test_a_projection_head_with_other_names_is_told_the_names(capsys):
    class Renamed(HeadFromScratch):
        def __init__(self, feature_dim, cond_dim):
            super().__init__(feature_dim, cond_dim)
            self.V = self.embed
            del self.embed

    assert not check_projection_head(Renamed)
    (line,) = lines(capsys)
    assert "parameter names differ" in line and "embed.weight" in line


# --------------------------------------------------------------------------- calling the lab's reference fails
class SubclassedHead(ProjectionHead):
    pass


class WrappedHead(HeadFromScratch):
    """The right parameters, and a forward that hands them to the lab's layer."""

    def forward(self, features, y):
        inner = ProjectionHead(self.psi.in_features, self.embed.in_features)
        inner.load_state_dict(self.state_dict())
        return inner(features, y)


def _torch_spectral_norm(W, u, n_iterations):
    torch_spectral_norm(nn.Linear(W.shape[1], W.shape[0], bias=False), n_power_iterations=n_iterations)
    return torch.linalg.matrix_norm(W, ord=2), u


CALLS_THE_REFERENCE = [
    (check_bce_critic_loss, lambda r, f, label_smoothing=0.0: bce_critic_loss(r, f, label_smoothing),
     "bce_critic_loss"),
    (check_bce_critic_loss, lambda r, f, label_smoothing=0.0: critic_loss("bce", r, f, label_smoothing),
     "bce_critic_loss"),
    (check_generator_loss, lambda f: bce_generator_loss(f), "bce_generator_loss"),
    (check_hinge_loss, lambda r, f: (hinge_critic_loss(r, f), -f.mean()), "hinge_critic_loss"),
    (check_hinge_loss, lambda r, f: (critic_loss("hinge", r, f), -f.mean()), "hinge_critic_loss"),
    (check_hinge_loss, lambda r, f: hinge_from_scratch(r, f)[:1] + (hinge_generator_loss(f),), "hinge_generator_loss"),
    (check_gradient_penalty, lambda c, r, f, e: gradient_penalty(c, r, f, e).penalty, "gradient_penalty"),
    (check_gradient_penalty, lambda c, r, f, e: ((input_gradient(c, interpolate(r, f, e)).flatten(1).norm(dim=1) - 1)
                                                 ** 2).mean(), "interpolate"),
    (check_r1_penalty, lambda c, r, gamma: gamma / 2 * r1_penalty(c, r), "r1_penalty"),
    (check_projection_head, SubclassedHead, "ProjectionHead"),
    (check_projection_head, WrappedHead, "ProjectionHead"),
    (check_spectral_norm, lambda W, u, n: tuple(power_iteration(W, u, n)), "power_iteration"),
    (check_spectral_norm, _torch_spectral_norm, "spectral_norm"),
]


@pytest.mark.parametrize("check, answer, name", CALLS_THE_REFERENCE,
                         ids=[f"{check.exercise}-{name}-{i}" for i, (check, _, name) in enumerate(CALLS_THE_REFERENCE)])
def test_an_answer_that_calls_the_lab_fails_saying_so(check, answer, name, capsys):
    assert not check(answer)
    (line,) = lines(capsys)
    assert "calls the lab's" in line and f"`{name}`" in line and "hint:" not in line, line
    # and the reference works again afterwards
    assert float(bce_critic_loss(torch.zeros(2), torch.zeros(2))) > 0
    assert power_iteration(torch.eye(2), torch.ones(2)).sigma.item() == pytest.approx(1.0)


def test_torch_spectral_norm_works_again_after_the_check(capsys):
    check_spectral_norm(_torch_spectral_norm)
    capsys.readouterr()
    layer = torch_spectral_norm(nn.Linear(4, 3))
    layer(torch.randn(2, 4))  # the power method runs in a training-mode forward pass


# --------------------------------------------------------------------------- hints, in two steps
WRONG = {  # answers that match no known mistake
    "bce_critic_loss": lambda r, f, label_smoothing=0.0: r.mean() - f.mean(),
    "generator_loss": lambda f: f.pow(2).mean(),
    "hinge_loss": lambda r, f: (r.mean(), f.mean()),
    "gradient_penalty": lambda c, r, f, e: c(r).pow(2).mean(),
    "r1_penalty": lambda c, r, gamma: gamma * c(r).pow(2).mean(),
    "projection_head": type("PsiOnly", (HeadFromScratch,), {"forward": lambda self, x, y: self.psi(x)[:, 0]}),
    "spectral_norm": lambda W, u, n: (W.sum(), u),
}
HINTS = {
    "bce_critic_loss": gan_exercises.BCE_CRITIC_HINT, "generator_loss": gan_exercises.GENERATOR_HINT,
    "hinge_loss": gan_exercises.HINGE_HINT, "gradient_penalty": gan_exercises.GP_HINT,
    "r1_penalty": gan_exercises.R1_HINT, "projection_head": gan_exercises.PROJECTION_HINT,
    "spectral_norm": gan_exercises.SPECTRAL_HINT,
}


@pytest.mark.parametrize("exercise", sorted(CHECKS))
def test_the_first_failure_shows_the_idea_and_the_second_the_detail(exercise, capsys):
    check, hint = CHECKS[exercise][0], HINTS[exercise]
    assert isinstance(hint, Hint) and hint.idea and hint.detail and hint.idea != hint.detail
    assert not check(WRONG[exercise])
    assert not check(WRONG[exercise])
    first, second = lines(capsys)
    assert first.endswith("hint: " + hint.idea), first
    assert second.endswith("hint: " + hint.detail), second


@pytest.mark.parametrize("exercise", sorted(HINTS))
def test_hints_are_words_not_a_line_to_paste(exercise):
    for text in (HINTS[exercise].idea, HINTS[exercise].detail):
        assert not re.search(r"\w = |\breturn \w+\s*[(\[.]|\.mean\(|\.sum\(|\.norm\(|\*\*|\[0\]", text), text


# --------------------------------------------------------------------------- unwritten: the lab's version goes on
@pytest.mark.parametrize("exercise", sorted(CHECKS))
def test_an_unwritten_answer_fails_cleanly_and_the_lab_takes_over(exercise, capsys):
    check, answer, case = CHECKS[exercise]

    def unwritten(*args, **kwargs):
        raise NotImplementedError("exercise: write this")

    result = check(unwritten)
    assert not result
    assert lines(capsys) == [f"❌ {result.name}: {NOT_IMPLEMENTED}"]
    fallback = result.pick(unwritten)
    (note,) = lines(capsys)
    assert fallback is not unwritten and "uses the lab's version" in note
    if case is None:  # a layer: the lab's class
        assert fallback is ProjectionHead
        return
    got = fallback(*detached_copy(case.args), **case.kwargs)  # called as the student's function would be
    expected = answer(*detached_copy(case.args), **case.kwargs)
    assert difference(got, expected, atol=1e-5, rtol=1e-4) is None


# --------------------------------------------------------------------------- the reference of the spectral norm
def test_power_iteration_by_hand_and_converged():
    # W = diag(3, 1), u0 = (1, 1): v = (3, 1)/sqrt(10), u = (9, 1)/sqrt(82), sigma = u^T W v = sqrt(8.2)
    estimate = power_iteration(torch.diag(torch.tensor([3.0, 1.0])), torch.tensor([1.0, 1.0]), 1)
    assert estimate.sigma.item() == pytest.approx(8.2 ** 0.5, rel=1e-6)
    assert torch.allclose(estimate.u, torch.tensor([9.0, 1.0]) / 82 ** 0.5)
    torch.manual_seed(0)
    W = torch.randn(7, 5, dtype=torch.float64)
    sigma_max = torch.linalg.svdvals(W)[0]
    estimates = [power_iteration(W, torch.ones(7, dtype=torch.float64), n).sigma for n in (1, 3, 10, 200)]
    assert all(s <= sigma_max + 1e-12 for s in estimates)  # u^T W v <= sigma_max for unit u, v
    assert estimates[-1].item() == pytest.approx(sigma_max.item(), rel=1e-10)
    conv = torch.randn(8, 3, 4, 4, dtype=torch.float64)  # a conv weight is read as (out, in*k*k)
    assert power_iteration(conv, torch.ones(8, dtype=torch.float64), 300).sigma.item() == pytest.approx(
        torch.linalg.svdvals(conv.flatten(1))[0].item(), rel=1e-8)
    with pytest.raises(ValueError, match="n_iterations"):
        power_iteration(W, torch.ones(7), 0)


def test_power_iteration_is_torch_spectral_norms_power_iteration():
    """Started from the same u (torch keeps v = W^T u / |W^T u| beside it), torch's spectral_norm takes u
    through the same sequence; the normalised weight W / sigma of the layer follows."""
    torch.manual_seed(0)
    W, u0 = torch.randn(6, 4), torch.randn(6)
    for n in (1, 3, 10):
        layer = torch_spectral_norm(nn.Linear(4, 6, bias=False), n_power_iterations=n)
        with torch.no_grad():
            layer.parametrizations.weight.original.copy_(W)
        parametrization = layer.parametrizations.weight[0]
        parametrization._u.copy_(F.normalize(u0, dim=0))
        parametrization._v.copy_(F.normalize(W.T @ u0, dim=0))
        normalised = layer.weight  # one training-mode forward of the parametrization: n power iterations
        estimate = power_iteration(W, u0, n)
        assert torch.allclose(estimate.u, parametrization._u, atol=1e-6)
        torch_sigma = (W / normalised)[0, 0]  # torch's sigma: u^T W v with its v one half-step further,
        assert torch_sigma.item() == pytest.approx((W.T @ estimate.u).norm().item(), rel=1e-5)  # = |W^T u|
