"""The CLIP score and R-precision (labs/clip/score.py): the math on hand-made embeddings, the distractors (hard
negatives first), what the shipped CLIP model reads of real images (their own captions far above shuffled ones,
R-precision near 1 against near chance), the same figures whatever the batch, the shipped model keyed as its command
trains it now, and the fields `genlab eval` writes and `genlab compare` tabulates."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lab_utils.core.config import compose
from labs.clip.score import ClipScorer, Distractors, distractor_prompts, prompt_cosines, r_precision_hits

pytestmark = pytest.mark.usefixtures("one_thread")  # small models (conftest.one_thread)


# ------------------------------------------------------------------------------------ the math
def test_cosines_and_r_precision_on_hand_made_embeddings():
    """Unit vectors chosen by hand: image 0 is its prompt exactly, image 1 is nearer a distractor, image 2 ties with
    one (a tie counts against the image: its prompt must rank strictly first)."""
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    own = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    distractors = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]],
                                [[0.0, 1.0], [-1.0, 0.0]],  # image 1: cos 0.8 with the first, 0.6 with its own
                                [[0.0, 1.0], [1.0, 0.0]]])  # image 2: its own prompt repeated among the distractors
    assert prompt_cosines(images, own).tolist() == pytest.approx([1.0, 0.6, 1.0])
    assert r_precision_hits(images, own, distractors).tolist() == [True, False, False]
    assert r_precision_hits(images, own, distractors[:, :0]).tolist() == [True, True, True]  # no distractor


class FashionLike:
    """One attribute of 10 values: the grid has 10 captions, so an item has 9 distractors (all hard negatives)."""

    attributes = {"class": [f"thing{k}" for k in range(10)]}

    def describe(self, labels, template=None) -> str:
        return f"a photo of a {self.attributes['class'][int(labels[0])]}"


def test_distractors_are_the_hard_negatives_then_random_other_captions():
    from lab_utils.core.data import build_dataset

    shapes = build_dataset({"name": "shapes", "subset": 8}, "test")
    labels = shapes.labels[:6]
    drawn = distractor_prompts(shapes, labels, 99, seed=3)
    assert drawn.hard == 2 + 7 + 1 + 8 and drawn.count == 99  # another shape, colour, size or position; then 81
    names = list(shapes.attributes.values())
    for row, prompts in zip(labels.tolist(), drawn.prompts):
        own = shapes.describe(row, 0)
        assert len(set(prompts)) == 99 and own not in prompts
        hard = prompts[:drawn.hard]
        changed = [shapes.describe(row[:a] + [k] + row[a + 1:], 0) for a in range(4) for k in range(len(names[a]))
                   if k != row[a]]
        assert sorted(hard) == sorted(changed)  # exactly the captions that differ in one attribute
    again = distractor_prompts(shapes, labels, 99, seed=3)
    assert again.prompts == drawn.prompts  # the same for the real and the generated set of one evaluation
    assert distractor_prompts(shapes, labels, 99, seed=4).prompts != drawn.prompts  # another seed, other randoms
    assert distractor_prompts(shapes, labels, 99, seed=4).prompts[0][:18] == drawn.prompts[0][:18]
    assert distractor_prompts(shapes, labels, 10, seed=3).count == 18  # never fewer than the hard negatives

    few = distractor_prompts(FashionLike(), torch.tensor([[0], [7]]), 99, seed=0)
    assert few.count == few.hard == 9 and "a photo of a thing7" not in few.prompts[1]  # chance 1/10


# ------------------------------------------------------------------------------------ the shipped scorer
@pytest.fixture(scope="module")
def shipped():
    from lab_utils.commands.evaluation.clip_scorer import clip_scorer_from_pretrained

    return clip_scorer_from_pretrained("clip")


@pytest.fixture(scope="module")
def real_set():
    """64 real test images of shapes, their canonical captions and labels."""
    from lab_utils.core.data import build_dataset
    from labs.evaluator import real_images

    test = build_dataset(compose(["data=shapes"]).data, "test")
    index = torch.arange(64)
    labels = test.labels[index]
    return test, real_images(test, index), [test.describe(row, 0) for row in labels], labels


def test_the_shipped_scorer_reads_real_images_with_their_own_captions_far_above_mismatched_ones(shipped, real_set):
    """Real images with their own captions: R-precision near 1 among 99 distractors (18 of them one attribute away);
    with other items' captions (each the next item's that differs): near chance, 1/100, and a CLIP score far lower."""
    from lab_utils.commands.evaluation.sets import prompt_match_metrics

    test, images, prompts, labels = real_set
    measured = prompt_match_metrics(shipped, test, labels, prompts, images, None, seed=0, batch_size=64,
                                    distractors=99)
    real, floor = measured["real_held_out"], measured["mismatched"]
    assert measured["distractors"] == 99 and measured["chance"] == pytest.approx(0.01)
    assert real["r_precision"] >= 0.9 and real["r_precision_hard"] >= 0.9, real  # the zoo's: 1.00 on 500
    assert floor["r_precision"] <= 0.05, floor  # chance 0.01 (the true caption may be among the distractors: lower)
    assert real["clip_score"] > floor["clip_score"] + 0.3, (real, floor)
    # pair by pair, not only on average: each image scores its own caption above a shuffled one
    own = shipped.cosines(images, prompts)
    shuffled = shipped.cosines(images, prompts[1:] + prompts[:1])
    assert (own > shuffled).float().mean() >= 0.95


def test_the_score_does_not_depend_on_the_batch(shipped, real_set):
    """Every layer of the scorer acts on one image or one caption alone (GroupNorm, masked attention), so a batch of
    64 and batches of 7 compute the same numbers up to float32 rounding: sums of ~10^3 products of O(1) terms per
    layer, a few layers deep, differ by ~10^-6 when the kernels block them differently. So: cosines within 1e-5, and
    a hit may differ only where the prompt's margin over the best distractor is within that rounding."""
    test, images, prompts, labels = real_set
    sets = distractor_prompts(test, labels, 99, seed=0)
    whole = shipped.prompt_match(images, prompts, sets, batch_size=64)
    pieces = shipped.prompt_match(images, prompts, sets, batch_size=7)
    torch.testing.assert_close(pieces.cosine, whole.cosine, atol=1e-5, rtol=0)
    differ = pieces.hit != whole.hit
    assert bool((whole.margin[differ].abs() < 1e-5).all())
    assert abs(pieces.summary()["clip_score"] - whole.summary()["clip_score"]) < 1e-5
    # float images in [-1, 1] are quantised as the PNG a client gets: the same score as their uint8 pixels
    torch.testing.assert_close(shipped.cosines(images.float() / 127.5 - 1, prompts), whole.cosine, atol=1e-6, rtol=0)


def test_the_shipped_scorer_is_keyed_as_its_command_trains_it_now():
    from lab_utils.commands.evaluation.clip_scorer import clip_scorer_config
    from lab_utils.harness import zoo
    from lab_utils.harness.cached_run import run_key

    entry = zoo.find("clip")
    assert entry.family == "clip" and entry.dataset == "shapes" and not entry.generative
    assert entry.info["command"] == ["model=clip", "data=shapes", "preset=cpu", "data.held_out=[]"]
    key = run_key(clip_scorer_config({"name": "shapes"}, preset="cpu"))
    assert entry.info["key"] == key, (
        f"labs/clip/pretrained/manifest.json keys the shipped CLIP model {entry.info['key']}, but its settings and the "
        f"source of labs/clip and labs/text_encoder give {key} now, so `genlab eval` would train a new one (~5 "
        "minutes). If the change alters what training computes, rebuild it (`genlab pretrained action=build "
        f"models=[clip]`); if not (a comment, a docstring), set the manifest's key to {key}")
    assert zoo.shipped_instrument("clip", "shapes", key) == entry
    assert entry.info["figures"]["zero_shot"]["all"] >= 0.95  # what it reads right on real test images


# ------------------------------------------------------------------------------------ genlab eval and compare
@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    from lab_utils.harness.run import train

    run_dir = tmp_path_factory.mktemp("runs") / "vae"
    with torch.random.fork_rng():
        train(compose(["model=vae", "preset=smoke", "trainer.steps=2", "trainer.progress=false", f"out={run_dir}"]))
    return run_dir


def test_genlab_eval_writes_the_clip_score_and_r_precision(vae_run, monkeypatch, capsys):
    """A smoke VAE evaluated with smoke measuring models (the CLIP scorer trained in seconds, or taken from the
    session's cache where another test trained it for the same data, as the evaluator): every set has its CLIP score
    and R-precision, the floor and chance are recorded, the line says so."""
    import os

    from lab_utils.commands.cli import main

    monkeypatch.setattr(sys, "argv", sys.argv[:])  # the CLI rewrites sys.argv for Hydra
    common = ["eval.num_samples=8", "eval.batch_size=8", "eval.kid_subsets=2", "eval.partial_samples=0",
              "eval.evaluator_preset=smoke", "eval.progress=false"]
    assert main(["eval", f"run={vae_run}", *common]) in (0, None)
    line = capsys.readouterr().out
    assert "CLIP score " in line and "R-precision " in line and "among 99 + 1" in line
    saved = json.loads((vae_run / "eval.json").read_text())
    for which in ("generated", "real_held_out"):
        figures = saved[which]
        assert {"clip_score", "clip_score_std", "r_precision", "r_precision_hard"} <= set(figures)
        assert -1 <= figures["clip_score"] <= 1 and 0 <= figures["r_precision"] <= 1
    clip = saved["clip"]
    assert clip["distractors"] == 99 and clip["hard_negatives"] == 18 and clip["chance"] == pytest.approx(0.01)
    assert set(clip["mismatched"]) == {"clip_score", "clip_score_std", "r_precision", "r_precision_hard"}
    scorer = clip["scorer"]
    cache = os.path.join(os.environ["GENLAB_CACHE"], "clip", f"shapes-{scorer['key']}")  # smoke-trained, cached
    assert scorer["path"] == cache and os.path.isfile(os.path.join(cache, "clip.json"))
    assert saved["eval_config"]["clip_preset"] is None  # followed eval.evaluator_preset

    from lab_utils.commands.evaluation.evaluate import EvalConfig, clip_scorer, summary_line

    assert clip_scorer(compose(["data=shapes"]).data, EvalConfig(clip_score=False), torch.device("cpu")) is None
    off = {**saved, "clip": None, "generated": {k: v for k, v in saved["generated"].items() if "clip" not in k}}
    assert "CLIP score" not in summary_line(off)  # eval.clip_score=false: nothing measured, nothing said


def test_results_md_has_the_clip_columns_and_the_ceiling_and_floor_rows():
    from lab_utils.commands.compare import markdown_table, prompt_match_table

    def row(model, clip_score, r_precision):
        metrics = {key: {"generated": 1.0, "real": 1.0} for key in ("fid", "kid_mean", "inception_score", "precision",
                                                                      "recall", "alignment_seen", "alignment_held_out")}
        metrics |= {"clip_score": {"generated": clip_score, "real": 0.9}, "r_precision": {"generated": r_precision,
                                                                                         "real": 1.0},
                    "r_precision_hard": {"generated": r_precision, "real": 1.0}}
        return {"model": model, "parameters": 10**6, "train_seconds": 90.0, "images_seen": 1000,
                "train_images_per_s": 11.0, "nfe_per_sample": 1, "sampling_seconds_per_image": 0.001,
                "metrics": metrics, "clip": {"distractors": 99, "hard_negatives": 18, "chance": 0.01,
                                             "chance_hard": 1 / 19, "scorer": {"key": "k"},
                                             "mismatched": {"clip_score": 0.01, "r_precision": 0.0,
                                                            "r_precision_hard": 0.0}}}

    rows = [row("vae", 0.85, 0.94), row("ddpm", 0.8, 0.7)]
    table = markdown_table(rows).splitlines()
    assert "| recall | CLIP score | R-precision | align seen |" in table[0]
    assert "| 0.85 (0.9) | 0.94 (1) |" in table[2]
    lines = prompt_match_table(rows).splitlines()
    assert lines[2:] == ["| vae | 0.85 | 0.94 | 0.94 |", "| ddpm | 0.8 | 0.7 | 0.7 |",
                         "| real test images, own captions (ceiling) | 0.9 | 1 | 1 |",
                         "| real test images, other items' captions (floor) | 0.01 | 0 | 0 |",
                         "| chance | - | 0.01 | 0.053 |"]
    assert prompt_match_table([{**rows[0], "clip": None}]) == ""  # an older results.json: no table


def test_a_scorer_reads_what_it_is_given(real_set):
    """ClipScorer on a tiny untrained CLIP: embeddings are unit rows, texts are embedded once each."""
    from conftest import data_info
    from labs.clip import ClipConfig, ClipLab
    from labs.text_encoder import TextEncoderConfig

    torch.manual_seed(0)
    lab = ClipLab(ClipConfig(embed_dim=8, width=8, channel_mults=[1, 2], groups=4,
                             text=TextEncoderConfig(dim=16, depth=1, heads=2)), data_info(size=32))
    scorer = ClipScorer(lab)
    _, images, prompts, _ = real_set
    embedded = scorer.embed_images(images[:5], batch_size=2)
    assert embedded.shape == (5, 8) and torch.allclose(embedded.norm(dim=1), torch.ones(5), atol=1e-5)
    texts = scorer.embed_texts(["a red circle", "a red circle", "a blue square"])
    assert list(texts) == ["a red circle", "a blue square"]
    assert not any(p.requires_grad for p in lab.parameters()) and not lab.training
    match = scorer.prompt_match(images[:2], prompts[:2], Distractors([[prompts[1]], [prompts[0]]], 1))
    assert match.cosine.shape == match.hit.shape == (2,)
