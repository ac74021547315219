"""The CLIP lab: the symmetric contrastive loss against a hand computation, the clipped temperature, unit
embeddings, zero-shot classification and retrieval on hand-made cases with known answers, and a smoke run through
the harness and `genlab eval`."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn

from conftest import data_info
from lab_utils.core.config import compose
from lab_utils.core.schema import ConfigError
from labs.clip import (
    ClipConfig, ClipLab, attribute_prompts, contrastive_loss, measure_embedding, retrieval_recall, same_caption,
    zero_shot_predictions,
)
from labs.text_encoder import TextEncoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


def tiny_lab() -> ClipLab:
    torch.manual_seed(0)
    cfg = ClipConfig(embed_dim=8, width=8, channel_mults=[1, 2], groups=4, text=TextEncoderConfig(dim=16, depth=1, heads=2))
    return ClipLab(cfg, data_info(size=16))


# ------------------------------------------------------------------------------------ the loss
def test_the_loss_is_the_hand_computed_symmetric_cross_entropy():
    """n = 2: I = (e1, e2), T = (e1, (0.6, 0.8)), exp(t) = 2, so the logits are 2 I T^T = [[2, 1.2], [0, 1.6]]; each
    row's CE is log(1 + e^{-(margin)}) with the margin of its true entry over the other one."""
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    out = contrastive_loss(images, texts, torch.tensor(2.0))
    image_to_text = (math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.6))) / 2  # rows [2, 1.2], [0, 1.6]
    text_to_image = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.4))) / 2  # columns [2, 0], [1.2, 1.6]
    assert out.image_to_text.item() == pytest.approx(image_to_text, rel=1e-6)
    assert out.text_to_image.item() == pytest.approx(text_to_image, rel=1e-6)
    assert out.loss.item() == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-6)
    # symmetric: images and texts swapped, the two directions swap and the loss is the same
    swapped = contrastive_loss(texts, images, torch.tensor(2.0))
    assert swapped.image_to_text.item() == pytest.approx(text_to_image, rel=1e-6)
    assert swapped.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    # positives = the identity is the paper's loss; two captions of the same string share each row's target
    assert contrastive_loss(images, texts, torch.tensor(2.0), torch.eye(2, dtype=torch.bool)).loss.item() == \
        pytest.approx(out.loss.item(), rel=1e-6)
    both = contrastive_loss(images, texts, torch.tensor(2.0), torch.ones(2, 2, dtype=torch.bool))
    rows = torch.tensor([[2.0, 1.2], [0.0, 1.6]])
    expected = (-(rows.log_softmax(1).mean(1).mean()) - rows.T.log_softmax(1).mean(1).mean()) / 2
    assert both.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_same_caption_positives_are_the_papers_loss_when_equal_strings_embed_equally():
    """Two items with the same caption string have the same text embedding (a deterministic text encoder): their
    logit columns are equal, so spreading each row's target over them gives exactly the paper's loss."""
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(4, 3, generator=generator), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(3, 3, generator=generator), dim=1)[[0, 1, 0, 2]]  # 0 == 2
    positives = same_caption(["a red circle", "a blue square", "a red circle", "a green circle"])
    scale = torch.tensor(5.0)
    multi, paper = contrastive_loss(images, texts, scale, positives), contrastive_loss(images, texts, scale)
    assert multi.loss.item() == pytest.approx(paper.loss.item(), rel=1e-6)
    assert multi.text_to_image.item() == pytest.approx(paper.text_to_image.item(), rel=1e-6)
    unequal = texts.clone()
    unequal[2] = texts[3]  # the same strings embedded apart (text dropout, say): the targets now differ
    assert contrastive_loss(images, unequal, scale, positives).loss.item() != pytest.approx(
        contrastive_loss(images, unequal, scale).loss.item(), rel=1e-3)


def test_same_caption_reads_the_strings_only():
    positives = same_caption(["a red circle", "a blue square", "a red circle"])
    assert positives.tolist() == [[True, False, True], [False, True, False], [True, False, True]]


def test_the_temperature_starts_at_1_over_0_07_and_is_clipped_at_100():
    lab = tiny_lab()
    assert lab.clip.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        lab.clip.log_scale.fill_(10.0)  # exp(10) ~ 22026
    assert lab.clip.logit_scale().item() == pytest.approx(100.0, rel=1e-5)
    lab.clip.clip_temperature()  # what training_step does after each update
    assert lab.clip.log_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)
    with pytest.raises(ValueError, match="init_temperature"):
        ClipConfig(init_temperature=0.001)  # exp(t) would start at 1000 > 100


def test_embeddings_are_unit_vectors_in_one_space():
    lab = tiny_lab()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    image_embeddings = lab.embed_images(images)
    text_embeddings = lab.embed_texts(["a red circle", "a small blue square at the top left", ""])
    assert image_embeddings.shape == text_embeddings.shape == (3, 8)
    assert torch.allclose(image_embeddings.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text_embeddings.norm(dim=1), torch.ones(3), atol=1e-5)


# ------------------------------------------------------------------------------------ what it learnt
class FourItems:
    """A hand-made test split: red/green x circle/square, item i's image holds the number i."""

    attributes = {"colour": ["red", "green"], "shape": ["circle", "square"]}
    labels = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    held_out_mask = torch.tensor([False, False, False, True])

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.full((1, 2, 2), float(index))}

    def describe(self, labels, template=None) -> str:
        colour, shape = (names[int(v)] for v, names in zip(labels, self.attributes.values()))
        return f"a {colour} {shape}"


class ShapeBlind(nn.Module):
    """Sees colours and nothing of shapes: every image embeds as 'a circle' of its colour; texts embed their words."""

    words = ["red", "green", "circle", "square"]

    def embed_images(self, images):
        index = images[:, 0, 0, 0].long()  # (n,) which item
        colour = FourItems.labels[index, 0]
        vectors = torch.zeros(len(images), 4)
        vectors[torch.arange(len(images)), colour] = 1.0
        vectors[:, 2] = 1.0  # always "circle"
        return nn.functional.normalize(vectors, dim=1)

    def embed_texts(self, captions):
        vectors = torch.tensor([[float(word in caption.split()) for word in self.words] for caption in captions])
        return nn.functional.normalize(vectors, dim=1)


def test_zero_shot_and_retrieval_on_a_hand_made_case():
    dataset = FourItems()
    assert attribute_prompts(dataset, [1, 0], 0) == ["a red circle", "a green circle"]  # colour replaced
    assert attribute_prompts(dataset, [1, 0], 1) == ["a green circle", "a green square"]  # shape replaced
    assert zero_shot_predictions(torch.eye(2), torch.eye(2)[None].expand(2, 2, 2).flip(1)).tolist() == [1, 0]

    measured = measure_embedding(ShapeBlind(), dataset, num_items=4, seed=0, batch_size=3)
    figures = measured.figures
    assert figures["zero_shot"] == {"colour": 1.0, "shape": 0.5, "all": 0.5}  # circles right, squares wrong
    assert figures["chance"] == {"colour": 0.5, "shape": 0.5}
    # image -> text: a circle's own caption scores best (1 against 1/2); a square's is beaten by its colour's circle
    assert figures["retrieval"]["image_to_text"] == {"recall@1": 0.5, "recall@5": 1.0}
    assert figures["retrieval"]["text_to_image"]["recall@5"] == 1.0 and figures["retrieval"]["distinct_captions"] == 4
    assert figures["zero_shot_held_out"] == {"items": 1, "colour": 1.0, "shape": 0.0, "all": 0.0}  # the green square
    assert "zero-shot colour 1.000, shape 0.500" in measured.summary
    with pytest.raises(ValueError, match="the test split has 4 images"):
        measure_embedding(ShapeBlind(), dataset, num_items=5, seed=0, batch_size=3)


def test_retrieval_recall_counts_by_caption():
    """3 images, 2 distinct captions (images 0 and 2 share caption 0): scores chosen by hand."""
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    recall = retrieval_recall(images, texts, torch.tensor([0, 1, 0]), ks=(1, 2))
    # image 2 scores caption 1 (0.8) above its own (0.6): 2 of 3 at rank 1, all within 2 (only 2 captions)
    assert recall["image_to_text"] == {"recall@1": pytest.approx(2 / 3), "recall@2": 1.0}
    # caption 0's best image is image 0 (its own), caption 1's is image 1: both right at 1
    assert recall["text_to_image"] == {"recall@1": 1.0, "recall@2": 1.0}


# ------------------------------------------------------------------------------------ through the harness
def test_a_smoke_run_trains_and_genlab_eval_measures_it(tmp_path, monkeypatch, capsys):
    from lab_utils.commands.cli import main
    from lab_utils.harness.checkpoint import load_lab
    from lab_utils.harness.run import train

    run = tmp_path / "run"
    result = train(compose(["model=clip", "data=shapes", "preset=smoke", f"out={run}"]))
    assert result.step == 4 and (run / "checkpoints" / "last.pt").exists()
    assert not list(run.glob("samples/*.png"))  # not generative: no grids of blank images
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss/loss", "stats/logit_scale", "stats/image_to_text", "stats/text_to_image"} <= set(row)
    lab = load_lab(run).lab
    assert isinstance(lab, ClipLab) and not lab.generative
    with pytest.warns(UserWarning, match="not a generative model"):
        blank = lab.sample(["a red circle"])
    assert blank.shape == (1, 3, 32, 32) and bool((blank == -1).all())

    monkeypatch.setattr(sys, "argv", sys.argv[:])  # the CLI rewrites sys.argv for Hydra
    assert main(["eval", f"run={run}", "eval.num_samples=16", "eval.batch_size=8", "eval.device=cpu"]) in (0, None)
    printed = capsys.readouterr().out
    assert "clip step 4 on shapes: zero-shot shape" in printed and "retrieval among 16 items" in printed
    saved = json.loads((run / "eval.json").read_text())
    assert set(saved["zero_shot"]) == {"shape", "colour", "size", "position", "all"} and saved["step"] == 4
    assert set(saved["retrieval"]["image_to_text"]) == {"recall@1", "recall@5"}


def test_bad_clip_settings_are_refused_at_composition():
    with pytest.raises(ConfigError, match="positives must be 'index' or 'caption'"):
        compose(["model=clip", "preset=smoke", "model.positives=labels"])
    with pytest.raises(ConfigError, match="pool must be"):
        compose(["model=clip", "preset=smoke", "model.pool=max"])
