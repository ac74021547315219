"""The graded exercises of notebook 07 (the joint embedding, CLIP).

For every check: an answer written from scratch passes; each known mistake, written as a student would write it,
gets its own message; an answer that calls the lab's code it is compared with fails with "calls the lab's"; a
wrong answer sees the hint's idea first and its detail on the second try; an unwritten answer fails with
"not implemented yet" and ``pick`` hands the notebook a working fallback with the student's signature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import nbformat
import pytest
import torch
import torch.nn.functional as F

import labs.clip.exercises as clip_exercises
import lab_utils.core.exercises.checks as checks
from lab_utils.core.exercises.cases import Hint
from labs.clip import contrastive_loss, retrieval_recall, zero_shot_predictions

NOTEBOOK = "07_joint_embedding"


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    """Checks print and return a result (no raise); the two-step hints start from the first try in every test."""
    monkeypatch.delenv("GENLAB_STRICT_CHECKS", raising=False)
    monkeypatch.setattr(checks, "_FAILURES", {})


# --------------------------------------------------------------------------- answers written from scratch
def clip_loss(image_embeddings, text_embeddings, logit_scale):
    logits = image_embeddings @ text_embeddings.T * logit_scale  # (n, n)
    log_rows, log_columns = logits.log_softmax(dim=1), logits.log_softmax(dim=0)
    return -(log_rows.diagonal().mean() + log_columns.diagonal().mean()) / 2  # CE written out, both ways


def zero_shot_predict(image_embeddings, class_embeddings):
    return torch.einsum("nd,kd->nk", image_embeddings, class_embeddings).max(dim=1).indices


def recall_at_k(similarity, k):
    best_captions = similarity.topk(k, dim=1).indices  # (N, k) per image
    best_images = similarity.topk(k, dim=0).indices  # (k, N) per caption
    own = torch.arange(len(similarity))
    return ((best_captions == own[:, None]).any(dim=1).float().mean().item(),
            (best_images == own[None, :]).any(dim=0).float().mean().item())


# --------------------------------------------------------------------------- the usual mistakes, as written
def loss_images_only(image_embeddings, text_embeddings, logit_scale):
    logits = logit_scale * image_embeddings @ text_embeddings.T
    return F.cross_entropy(logits, torch.arange(len(logits)))


def loss_texts_only(image_embeddings, text_embeddings, logit_scale):
    logits = logit_scale * text_embeddings @ image_embeddings.T  # the transposed logits, taken as the only rows
    return F.cross_entropy(logits, torch.arange(len(logits)))


def loss_summed(image_embeddings, text_embeddings, logit_scale):
    return 2 * clip_loss(image_embeddings, text_embeddings, logit_scale)


def loss_without_scale(image_embeddings, text_embeddings, logit_scale):
    return clip_loss(image_embeddings, text_embeddings, 1.0)


def loss_divided_by_scale(image_embeddings, text_embeddings, logit_scale):
    logits = image_embeddings @ text_embeddings.T / logit_scale
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def loss_scale_exponentiated(image_embeddings, text_embeddings, logit_scale):
    return clip_loss(image_embeddings, text_embeddings, torch.exp(logit_scale))


def loss_summed_over_batch(image_embeddings, text_embeddings, logit_scale):
    logits = logit_scale * image_embeddings @ text_embeddings.T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels, reduction="sum") + F.cross_entropy(logits.T, labels, reduction="sum")) / 2


def predict_lowest(image_embeddings, class_embeddings):
    return (image_embeddings @ class_embeddings.T).min(dim=1).indices


def predict_farthest(image_embeddings, class_embeddings):  # for unit vectors, the lowest cosine
    return ((image_embeddings[:, None] - class_embeddings[None]) ** 2).sum(-1).argmax(dim=1)


def predict_best_image_per_class(image_embeddings, class_embeddings):
    return (image_embeddings @ class_embeddings.T).argmax(dim=0)


def recall_swapped(similarity, k):
    image_to_text, text_to_image = recall_at_k(similarity, k)
    return text_to_image, image_to_text


def recall_rows_twice(similarity, k):
    image_to_text, _ = recall_at_k(similarity, k)
    return image_to_text, image_to_text


def recall_within_k_plus_one(similarity, k):
    return recall_at_k(similarity, k + 1)


def recall_exactly_kth(similarity, k):
    own = torch.arange(len(similarity))
    kth_caption = similarity.topk(k, dim=1).indices[:, -1]
    kth_image = similarity.topk(k, dim=0).indices[-1]
    return (kth_caption == own).float().mean().item(), (kth_image == own).float().mean().item()


# --------------------------------------------------------------------------- answers that call the lab's code
def loss_by_the_lab(image_embeddings, text_embeddings, logit_scale):
    return contrastive_loss(image_embeddings, text_embeddings, logit_scale).loss


def loss_by_the_lab_object(image_embeddings, text_embeddings, logit_scale):
    from labs.clip import ClipLab

    class Stub:  # ClipLab.loss on an object whose forward hands back the given embeddings
        config = type("Config", (), {"positives": "index"})()

        def __call__(self, images, captions):
            return type("Out", (), {"image_embeddings": image_embeddings, "text_embeddings": text_embeddings,
                                    "logit_scale": logit_scale})()

    return ClipLab.loss(Stub(), torch.zeros(len(image_embeddings), 1), [""] * len(image_embeddings)).loss


def predict_by_the_lab(image_embeddings, class_embeddings):
    return zero_shot_predictions(image_embeddings, class_embeddings.expand(len(image_embeddings), -1, -1))


def recall_by_the_lab(similarity, k):
    recall = retrieval_recall(similarity, torch.eye(len(similarity), dtype=similarity.dtype),
                              torch.arange(len(similarity)), ks=(k,))
    return recall["image_to_text"][f"recall@{k}"], recall["text_to_image"][f"recall@{k}"]


# --------------------------------------------------------------------------- wrong in no known way
def off(fn: Callable) -> Callable:
    """``fn``'s answer, a little wrong (a loss scaled, a prediction shifted, recalls moved)."""

    def wrong(*args):
        out = fn(*args)
        if isinstance(out, tuple):
            return tuple(value * 0.5 + 0.25 for value in out)
        return (out + 1) % args[1].shape[0] if out.dtype == torch.long else out * 1.1

    return wrong


# --------------------------------------------------------------------------- inputs for the fallbacks
def fallback_args(exercise: str) -> tuple:
    """Inputs like the notebook's (unit embeddings, a similarity matrix of a trained model), on which a fallback is
    compared with the answer written from scratch."""
    gen = torch.Generator().manual_seed(5)
    images = F.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    texts = F.normalize(images + 0.5 * torch.randn(16, 8, generator=gen), dim=-1)
    return {
        "clip_loss": lambda: (images, texts, torch.tensor(20.0)),
        "zero_shot_predict": lambda: (images, texts[:5]),
        "recall_at_k": lambda: (images @ texts.T, 3),
    }[exercise]()


@dataclass
class Exercise:
    check: Callable
    answer: Callable
    mistakes: list[tuple[Callable, str]] = field(default_factory=list)
    by_the_lab: list[Callable] = field(default_factory=list)


EXERCISES = {
    "clip_loss": Exercise(clip_exercises.check_clip_loss, clip_loss,
                          [(loss_images_only, "add the captions' cross-entropy"),
                           (loss_texts_only, "add the images' cross-entropy"),
                           (loss_summed, "not their sum"), (loss_without_scale, "multiply the cosines by the logit"),
                           (loss_divided_by_scale, "*times* exp(t)"), (loss_scale_exponentiated, "exp(t) already"),
                           (loss_summed_over_batch, "a mean over the batch")],
                          [loss_by_the_lab, loss_by_the_lab_object]),
    "zero_shot_predict": Exercise(clip_exercises.check_zero_shot_predict, zero_shot_predict,
                                  [(predict_lowest, "*highest* cosine"), (predict_farthest, "smallest distance"),
                                   (predict_best_image_per_class, "over the classes")],
                                  [predict_by_the_lab]),
    "recall_at_k": Exercise(clip_exercises.check_recall_at_k, recall_at_k,
                            [(recall_swapped, "swapped"), (recall_rows_twice, "*columns*"),
                             (recall_within_k_plus_one, "not k or fewer"), (recall_exactly_kth, "*anywhere*")],
                            [recall_by_the_lab]),
}
MISTAKES = [(name, fn, message) for name, exercise in EXERCISES.items() for fn, message in exercise.mistakes]


def one_line(capsys) -> str:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_every_graded_check_is_in_the_notebook_with_points():
    from lab_utils.commands.notebooks import NOTEBOOK_FOLDER

    points = nbformat.read(NOTEBOOK_FOLDER / f"{NOTEBOOK}.ipynb", as_version=4).metadata["genlab"]["exercises"]
    assert set(points) == set(EXERCISES) and all(value in (1, 2) for value in points.values()), points
    for name, exercise in EXERCISES.items():
        assert exercise.check.exercise == name


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
    args = fallback_args(name)
    got = {"clip_loss": loss_by_the_lab, "zero_shot_predict": predict_by_the_lab,
           "recall_at_k": recall_by_the_lab}[name](*args)
    expected = EXERCISES[name].answer(*args)
    assert (got == pytest.approx(expected)) if isinstance(expected, tuple) else torch.allclose(got, expected)


@pytest.mark.parametrize("name", EXERCISES)
def test_the_hint_gives_the_idea_first_and_the_detail_on_the_second_try(name, capsys, monkeypatch):
    hints = []
    real = clip_exercises.check_function

    def recording(*args, **kwargs):
        hints.append(kwargs["hint"])
        return real(*args, **kwargs)

    monkeypatch.setattr(clip_exercises, "check_function", recording)
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
    got, expected = fallback(*args), EXERCISES[name].answer(*args)
    if isinstance(expected, tuple):
        assert got == pytest.approx(expected, rel=1e-6)
    else:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_the_checks_read_the_lab_at_its_own_figures():
    """The references are the lab's: a perfect embedding (each caption on its image) has recall 1 both ways and
    every image classified as its own prompt; a row of equal logits gives the symmetric loss log n."""
    eye = torch.eye(6)
    assert recall_by_the_lab(eye, 1) == (1.0, 1.0)
    assert torch.equal(predict_by_the_lab(eye, eye), torch.arange(6))
    same = F.normalize(torch.ones(6, 4), dim=-1)
    assert loss_by_the_lab(same, same, torch.tensor(14.0)).item() == pytest.approx(torch.log(torch.tensor(6.0)).item())
