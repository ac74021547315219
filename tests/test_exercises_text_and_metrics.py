"""The graded checks of notebooks 00 (text encoder) and 05 (metrics): right answers written from scratch pass, each
known mistake is named, an answer that calls the lab's code fails, hints come in two steps, and a graded check
writes a signed record."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

import lab_utils.core.exercises.checks as checks
from lab_utils.commands.evaluation import (
    Passthrough, frechet_distance, inception_score, kid_unbiased, knn_radii, manifold_coverage, polynomial_kernel,
    precision_recall,
)
from lab_utils.core.exercises.records import check_spec, judge, observe
from labs.evaluator.exercises import (
    FRECHET_HINT, INCEPTION_SCORE_HINT, KID_HINT, PRECISION_RECALL_HINT, check_frechet_distance,
    check_inception_score, check_kid, check_precision_recall, inception_score_cases, lab_inception_score,
    lab_precision_recall, precision_recall_cases,
)
from labs.text_encoder import MultiHeadSelfAttention, TextEncoder, TextEncoderConfig, scaled_dot_product_attention
from labs.text_encoder.exercises import (
    ATTENTION_HINT, MULTI_HEAD_HINT, PADDED_BATCH_HINT, check_attention, check_multi_head_attention,
    check_padded_batch, lab_padded_batch, padded_batch_cases,
)


pytestmark = pytest.mark.filterwarnings("ignore:Metric .* will save all extracted features")  # torchmetrics' note


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """Lenient checks and a fresh count of failed tries (which hint is shown)."""
    monkeypatch.delenv("GENLAB_STRICT_CHECKS", raising=False)
    monkeypatch.setattr(checks, "_FAILURES", {})


def line_of(capsys) -> str:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, f"a check prints exactly one line, got {lines}"
    return lines[0]


# --------------------------------------------------------------------------- answers written from scratch


def padded_from_scratch(tokenizer, prompts, *, length=None, left=False, mask_of=None):
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    length = length or max(len(ids) for ids in encoded)
    rows = []
    for ids in encoded:
        padding = [tokenizer.PAD_ID] * (length - len(ids))
        rows.append(padding + ids if left else ids + padding)
    ids = torch.tensor(rows)
    return ids, (mask_of(ids, tokenizer.PAD_ID) if mask_of else ids != tokenizer.PAD_ID)


def attention_from_scratch(q, k, v, mask=None, *, scale=None, softmax_dim=-1, use_mask=True, invert=False):
    scores = q @ k.transpose(-2, -1) / (math.sqrt(q.size(-1)) if scale is None else scale)  # (..., Tq, Tk)
    if mask is not None and use_mask:
        scores = scores.masked_fill(mask if invert else ~mask, float("-inf"))
    return scores.softmax(dim=softmax_dim) @ v


class MultiHeadFromScratch(nn.Module):
    use_mask = True

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        key_mask = mask[:, None, None, :] if mask is not None and self.use_mask else None  # (B, 1, 1, T)
        y = attention_from_scratch(q, k, v, key_mask)  # (B, h, T, C/h)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def sqrtm_psd(matrix):
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_from_scratch(mu1, sigma1, mu2, sigma2, *, mean="squared", twice=True, trace="product"):
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    mean_term = (mu1 - mu2).square().sum() if mean == "squared" else (mu1 - mu2).norm()
    if trace == "product":
        root = sqrtm_psd(sigma1)
        trace_sqrt = torch.linalg.eigvalsh(root @ sigma2 @ root).clamp(min=0).sqrt().sum()
    elif trace == "sqrt of trace":
        trace_sqrt = (sigma1 @ sigma2).trace().sqrt()
    else:  # separate roots
        trace_sqrt = (sqrtm_psd(sigma1) @ sqrtm_psd(sigma2)).trace()
    return float(mean_term + sigma1.trace() + sigma2.trace() - (2 if twice else 1) * trace_sqrt)


def kid_from_scratch(f1, f2, *, unbiased=True, scaled=True, cross=2.0):
    x, y = torch.as_tensor(f1, dtype=torch.float64), torch.as_tensor(f2, dtype=torch.float64)
    d = x.shape[1] if scaled else 1

    def within(a):
        kernel = (a @ a.T / d + 1) ** 3
        if not unbiased:
            return kernel.mean()
        return (kernel.sum() - kernel.trace()) / (len(a) * (len(a) - 1))

    return float(within(x) + within(y) - cross * ((x @ y.T / d + 1) ** 3).mean())


def is_from_scratch(probs, *, exp=True, direction="forward", marginal="mean", exp_first=False):
    p = torch.as_tensor(probs, dtype=torch.float64)
    q = p.mean(0, keepdim=True) if marginal == "mean" else torch.full_like(p, 1 / p.shape[1])
    q = q.expand_as(p)
    a, b = (p, q) if direction == "forward" else (q, p)
    kl = (a * (a.log() - b.log())).sum(1)  # (N,)
    if exp_first:
        return float(kl.exp().mean())
    return float(kl.mean().exp() if exp else kl.mean())


def pr_from_scratch(real, fake, k=3, *, swap=False, nth=None, own_radii=False):
    nth = k + 1 if nth is None else nth
    r_real = torch.cdist(real, real).kthvalue(nth, dim=1).values
    r_fake = torch.cdist(fake, fake).kthvalue(nth, dim=1).values
    if own_radii:
        precision = (torch.cdist(fake, real) <= r_fake[:, None]).any(1).double().mean()
        recall = (torch.cdist(real, fake) <= r_real[:, None]).any(1).double().mean()
    else:
        precision = (torch.cdist(fake, real) <= r_real[None, :]).any(1).double().mean()
        recall = (torch.cdist(real, fake) <= r_fake[None, :]).any(1).double().mean()
    return (float(recall), float(precision)) if swap else (float(precision), float(recall))


RIGHT = [
    (check_padded_batch, padded_from_scratch, "padded_batch", 4),
    (check_attention, attention_from_scratch, "attention", 6),
    (check_multi_head_attention, MultiHeadFromScratch, "multi_head_attention", 3),
    (check_frechet_distance, frechet_from_scratch, "frechet_distance", 3),
    (check_kid, kid_from_scratch, "kid_unbiased", 2),
    (check_inception_score, is_from_scratch, "inception_score", 4),
    (check_precision_recall, pr_from_scratch, "precision_recall", 4),
]


@pytest.mark.parametrize("check, answer, name, cases", RIGHT, ids=[row[2] for row in RIGHT])
def test_an_answer_written_from_scratch_passes(check, answer, name, cases, capsys):
    result = check(answer)
    assert result and result.pick(answer) is answer
    assert line_of(capsys) == f"✅ {name}: passed ({cases} cases)"


class IgnoresTheMask(MultiHeadFromScratch):
    use_mask = False


MISTAKES = [
    (check_padded_batch, lambda t, p: padded_from_scratch(t, p, mask_of=lambda ids, pad: ids == pad),
     "the mask inverted"),
    (check_padded_batch, lambda t, p: padded_from_scratch(t, p, mask_of=lambda ids, pad: torch.ones_like(ids) > 0),
     "the mask True everywhere"),
    (check_padded_batch, lambda t, p: padded_from_scratch(t, p, length=t.max_length), "padded to the tokenizer's"),
    (check_padded_batch, lambda t, p: padded_from_scratch(t, p, left=True), "padding at the start"),
    (check_attention, lambda q, k, v, mask=None: attention_from_scratch(q, k, v, mask, scale=1.0), "*without* the"),
    (check_attention, lambda q, k, v, mask=None: attention_from_scratch(q, k, v, mask, scale=q.size(-1)),
     "divided by d_k"),
    (check_attention, lambda q, k, v, mask=None: attention_from_scratch(q, k, v, mask, use_mask=False),
     "ignores the mask"),
    (check_attention, lambda q, k, v, mask=None: attention_from_scratch(q, k, v, mask, invert=True),
     "the mask inverted"),
    (check_attention, lambda q, k, v, mask=None: attention_from_scratch(q, k, v, mask, softmax_dim=-2),
     "a softmax over the queries"),
    (check_frechet_distance, lambda *stats: frechet_from_scratch(*stats, mean="norm"), "not its square"),
    (check_frechet_distance, lambda *stats: frechet_from_scratch(*stats, twice=False), "subtracted once"),
    (check_frechet_distance, lambda *stats: frechet_from_scratch(*stats, trace="sqrt of trace"),
     "the square root of the trace"),
    (check_frechet_distance, lambda *stats: frechet_from_scratch(*stats, trace="separate"), "commute"),
    (check_kid, lambda a, b: kid_from_scratch(a, b, unbiased=False), "the biased estimate"),
    (check_kid, lambda a, b: kid_from_scratch(a, b, scaled=False), "without the 1/d"),
    (check_kid, lambda a, b: kid_from_scratch(a, b, cross=1.0), "cross-set term subtracted once"),
    (check_inception_score, lambda p: is_from_scratch(p, exp=False), "the mean KL divergence itself"),
    (check_inception_score, lambda p: is_from_scratch(p, direction="reversed"), "the wrong way round"),
    (check_inception_score, lambda p: is_from_scratch(p, marginal="uniform"), "to the uniform distribution"),
    (check_inception_score, lambda p: is_from_scratch(p, exp_first=True), "the mean of the exponentials"),
    (check_precision_recall, lambda r, f, k=3: pr_from_scratch(r, f, k, swap=True), "swapped"),
    (check_precision_recall, lambda r, f, k=3: pr_from_scratch(r, f, k, nth=k), "count the point itself"),
    (check_precision_recall, lambda r, f, k=3: pr_from_scratch(r, f, k, own_radii=True), "balls around the queries"),
]


@pytest.mark.parametrize("check, answer, message", MISTAKES, ids=[row[2] for row in MISTAKES])
def test_a_known_mistake_is_named(check, answer, message, capsys):
    assert not check(answer)
    line = line_of(capsys)
    assert line.startswith("❌") and "— hint: it matches" in line and message in line, line


def _subclass_of_the_lab_layer():
    class Layer(MultiHeadSelfAttention):
        pass

    return Layer


class ForwardOfTheLabLayer(MultiHeadFromScratch):
    def forward(self, x, mask=None):
        return MultiHeadSelfAttention.forward(self, x, mask)


def _torchmetrics_is(probs):
    metric = InceptionScore(feature=Passthrough(probs.shape[1]), splits=1)
    metric.update(probs.log())
    return float(metric.compute()[0])


def _torchmetrics_kid(f1, f2):
    metric = KernelInceptionDistance(feature=Passthrough(f1.shape[1]), subsets=1, subset_size=min(len(f1), len(f2)))
    metric.update(f1, real=True)
    metric.update(f2, real=False)
    return float(metric.compute()[0])


def _kid_from_the_lab_kernel(f1, f2):
    x, y = f1.double(), f2.double()
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    m, n = len(x), len(y)
    return float((k_xx.sum() - k_xx.trace()) / (m * (m - 1)) + (k_yy.sum() - k_yy.trace()) / (n * (n - 1))
                 - 2 * polynomial_kernel(x, y).mean())


def _pr_from_the_lab_pieces(real, fake, k=3):
    precision = manifold_coverage(fake, real, knn_radii(real, k)).double().mean()
    recall = manifold_coverage(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


CALLS_THE_LAB = [
    (check_padded_batch, lambda tokenizer, prompts: tokenizer(prompts), "Tokenizer.__call__"),
    (check_padded_batch, lab_padded_batch, "lab_padded_batch"),
    (check_attention, scaled_dot_product_attention, "scaled_dot_product_attention"),
    (check_attention, lambda q, k, v, mask=None: F.scaled_dot_product_attention(q, k, v, mask),
     "torch.nn.functional.scaled_dot_product_attention"),
    (check_multi_head_attention, _subclass_of_the_lab_layer(), "MultiHeadSelfAttention"),
    (check_multi_head_attention, ForwardOfTheLabLayer, "MultiHeadSelfAttention"),
    (check_frechet_distance, lambda *stats: frechet_distance(*stats), "frechet_distance"),
    (check_kid, lambda a, b: kid_unbiased(a, b), "kid_unbiased"),
    (check_kid, _kid_from_the_lab_kernel, "polynomial_kernel"),
    (check_kid, _torchmetrics_kid, "KernelInceptionDistance.compute"),
    (check_inception_score, lambda p: inception_score(p.log(), splits=1)[0], "inception_score"),
    (check_inception_score, _torchmetrics_is, "InceptionScore.compute"),
    (check_precision_recall, lambda r, f, k=3: tuple(vars(precision_recall(r, f, k)).values()), "precision_recall"),
    (check_precision_recall, _pr_from_the_lab_pieces, "knn_radii"),
]


@pytest.mark.parametrize("check, answer, called", CALLS_THE_LAB, ids=[row[2] for row in CALLS_THE_LAB])
def test_an_answer_that_calls_the_labs_code_fails(check, answer, called, capsys):
    result = check(answer)
    assert not result
    line = line_of(capsys)
    assert "calls the lab's" in line and f"`{called}`" in line and "hint:" not in line, line
    assert result.pick(answer) is result.fallback, "the notebook goes on with the lab's version"


def _zeros_layer():
    class Zeros(MultiHeadFromScratch):
        def forward(self, x, mask=None):
            return torch.zeros_like(x)

    return Zeros


WRONG = [  # wrong in a way no known mistake describes: the generic hint
    (check_padded_batch, lambda t, p: padded_from_scratch(t, p)[0], PADDED_BATCH_HINT),
    (check_attention, lambda q, k, v, mask=None: torch.zeros(*q.shape[:-1], v.shape[-1]), ATTENTION_HINT),
    (check_multi_head_attention, _zeros_layer(), MULTI_HEAD_HINT),
    (check_frechet_distance, lambda *stats: -1.0, FRECHET_HINT),
    (check_kid, lambda a, b: 3.0, KID_HINT),
    (check_inception_score, lambda p: 0.5, INCEPTION_SCORE_HINT),
    (check_precision_recall, lambda r, f, k=3: (0.25, 0.75), PRECISION_RECALL_HINT),
]


@pytest.mark.parametrize("check, answer, hint", WRONG, ids=[row[0].exercise for row in WRONG])
def test_the_first_failure_shows_the_idea_and_the_second_the_detail(check, answer, hint, capsys):
    assert hint.idea and hint.detail and hint.idea != hint.detail
    assert not check(answer)
    assert line_of(capsys).endswith(f"— hint: {hint.idea}")
    assert not check(answer)
    assert line_of(capsys).endswith(f"— hint: {hint.detail}")


def test_an_unwritten_answer_is_not_implemented_and_falls_back_to_the_labs(capsys):
    def unwritten(*args, **kwargs):
        raise NotImplementedError("exercise: write your solution here")

    for check, *_ in RIGHT:
        result = check(unwritten)
        assert not result and result.fallback is not None and result.pick(unwritten) is result.fallback
        out = capsys.readouterr().out
        assert "not implemented yet" in out and "uses the lab's version" in out


def test_the_judged_observation_matches_the_notebook_verdict(capsys):
    for draw in (0, 99):
        for check, answer, passes in ((check_padded_batch, padded_from_scratch, True),
                                      (check_precision_recall,
                                       lambda r, f, k=3: pr_from_scratch(r, f, k, swap=True), False),
                                      (check_inception_score, is_from_scratch, True)):
            (observation,) = observe(check, answer, draw)
            passed, detail = judge(check_spec(check, draw), observation)
            assert passed is passes, detail
            if not passes:
                assert "case 1/4" in detail
    capsys.readouterr()


def test_the_padding_helper_of_the_check_is_forbidden_too(capsys):
    from labs.text_encoder import exercises as text_exercises

    assert not check_padded_batch(lambda tokenizer, prompts: text_exercises._pad(tokenizer, prompts))
    assert "calls the lab's" in capsys.readouterr().out


# --------------------------------------------------------------------------- the cases and the lab's references


def test_the_padded_batch_reference_is_the_tokenizers_own_batch():
    for case in padded_batch_cases():
        tokenizer, prompts = case.args
        ids, mask = lab_padded_batch(tokenizer, prompts)
        assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
        assert ids.shape == (len(prompts), max(len(tokenizer.encode(p)) for p in prompts))
        assert torch.equal(mask, ids != tokenizer.PAD_ID) and mask[:, 0].all(), "[CLS] is always real"
    assert any(not mask.all() for mask in (lab_padded_batch(*case.args).mask for case in padded_batch_cases()))


def test_the_multi_head_check_uses_the_encoders_own_layer():
    """The layer the check compares with is the one inside the text encoder (parity on a real encoder block)."""
    encoder = TextEncoder(TextEncoderConfig(dim=16, heads=4, depth=1, max_length=8), vocab_size=20).eval()
    layer = MultiHeadFromScratch(16, 4).eval()
    layer.load_state_dict(encoder.blocks[0].attn.state_dict())
    x = torch.randn(2, 6, 16)
    mask = torch.arange(6)[None, :] < torch.tensor([[4], [6]])  # (2, 6)
    with torch.no_grad():
        assert torch.allclose(layer(x, mask), encoder.blocks[0].attn(x, mask), atol=1e-6)


def test_the_inception_score_reference_on_known_cases():
    k = 5
    confident = (40.0 * F.one_hot(torch.arange(k).repeat(6), k)).double().softmax(dim=1)  # sure and balanced
    assert lab_inception_score(confident) == pytest.approx(k, rel=1e-6)
    same = torch.full((12, k), 1.0 / k, dtype=torch.float64)
    assert lab_inception_score(same) == pytest.approx(1.0, abs=1e-9)
    scores = [lab_inception_score(*case.args) for case in inception_score_cases()]
    assert all(1.0 - 1e-9 <= score <= case.args[0].shape[1] for score, case in zip(scores, inception_score_cases()))


def test_the_precision_recall_reference_on_known_cases():
    cases = {case.label: lab_precision_recall(*case.args, **case.kwargs) for case in precision_recall_cases()}
    assert cases["real 0, 1, ..., 9 and fake 0.5 and 20, k = 1: (0.5, 1.0)"] == (0.5, 1.0)
    assert cases["the same points twice: (1.0, 1.0)"] == (1.0, 1.0)
    precision, recall = cases["a narrower fake set inside the real one, k = 3"]
    assert precision > recall, "a narrow model is precise but does not cover the data"


def test_the_checks_are_fast():
    import time

    for check, answer, *_ in RIGHT:
        check(answer)  # warm up (first imports)
        start = time.perf_counter()
        check(answer)
        assert time.perf_counter() - start < 0.5, check.exercise
