"""The Fashion-MNIST evaluator: its own preset file (conf/preset_model/evaluator_cpu_fashion_mnist.yaml), chosen by
the evaluator cache for that dataset only, and shipped weights-only as ``evaluator-fashion_mnist`` so that no machine
trains it before ``genlab eval`` or ``genlab compare`` on ``data=fashion_mnist`` can measure.

The key and command checks need no data; the reading of real test images skips where the Debian package
(dataset-fashion-mnist) is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from lab_utils.commands.evaluation.cache import (dataset_preset_override, evaluator_command, evaluator_config,
                                                 get_evaluator, measure_accuracy)
from lab_utils.core.config import compose
from lab_utils.harness import zoo
from lab_utils.harness.cached_run import child_config, run_key

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
MANIFEST = REPO / "labs" / "evaluator" / "pretrained" / "manifest.json"


def test_only_fashion_mnist_has_its_own_evaluator_preset():
    """The dataset's own file replaces evaluator_<preset>.yaml; shapes composes exactly as before (same key)."""
    assert dataset_preset_override("fashion_mnist", "cpu") == ["preset_model=evaluator_cpu_fashion_mnist"]
    assert dataset_preset_override("shapes", "cpu") == []
    assert dataset_preset_override("fashion_mnist", "gpu") == []  # the gpu preset already serves it
    shapes = evaluator_config({"name": "shapes"}, preset="cpu")
    plain = child_config(["model=evaluator", "data=shapes", "preset=cpu"], {"data": {"name": "shapes", "held_out": []},
                                                                            "trainer": {"device": "cpu"}})
    assert run_key(shapes) == run_key(plain)
    assert evaluator_command({"name": "shapes"}) == ["model=evaluator", "data=shapes", "preset=cpu",
                                                     "data.held_out=[]"]
    fashion = evaluator_config({"name": "fashion_mnist"}, preset="cpu")
    assert fashion.trainer.lr_decay_steps == fashion.trainer.steps == 2400 and fashion.model.random_shift == 0
    # an override naming preset_model wins (the dataset's file is not added beside it)
    asked = evaluator_config({"name": "fashion_mnist"}, ["preset_model=evaluator_cpu"], preset="cpu")
    assert asked.trainer.steps == compose(["model=evaluator", "preset=cpu"]).trainer.steps


def test_the_shipped_fashion_evaluator_is_keyed_as_its_command_trains_it_now():
    entry = json.loads(MANIFEST.read_text())["models"]["evaluator-fashion_mnist"]
    assert entry["family"] == "evaluator" and entry["dataset"] == "fashion_mnist" and entry["dtype"] == "float32"
    assert entry["command"] == evaluator_command({"name": "fashion_mnist"}) == [
        "model=evaluator", "data=fashion_mnist", "preset=cpu", "preset_model=evaluator_cpu_fashion_mnist"]
    key = run_key(evaluator_config({"name": "fashion_mnist"}, preset="cpu"))
    assert entry["key"] == key, (
        f"labs/evaluator/pretrained/manifest.json keys the shipped Fashion-MNIST evaluator {entry['key']}, but its "
        f"settings and the source of labs/evaluator give {key} now, so `genlab eval` would train a new one. If the "
        "change alters what training computes, rebuild it (`genlab pretrained action=build models=[evaluator] "
        f"dataset=fashion_mnist`); if not (a comment, a docstring), set the manifest's key to {key}")
    assert zoo.shipped_instrument("evaluator", "fashion_mnist", key).name == "evaluator-fashion_mnist"
    assert entry["test_images"] == 10000 and entry["test_accuracy"]["class"] >= 0.92
    # the file holds what the command trains: its model and trainer settings, and as many steps
    loaded, command = zoo.load("evaluator-fashion_mnist"), compose(entry["command"])
    assert OmegaConf.to_container(loaded.cfg.model) == OmegaConf.to_container(command.model)
    assert loaded.state["trainer"]["step"] == entry["steps"] == command.trainer.steps


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_genlab_eval_finds_the_shipped_fashion_evaluator_and_it_reads_real_clothes():
    """What `genlab eval` gets for data=fashion_mnist in an empty cache: the zoo's file (nothing trained), and it reads
    the class of real test images right. 1000 images: the manifest's >= 0.92 on all 10,000 leaves >= 0.89 here more
    than three standard errors (sqrt(0.08 x 0.92 / 1000) = 0.009) below, on every machine."""
    from lab_utils.core.data import build_dataset

    data = compose(["data=fashion_mnist"]).data
    evaluator = get_evaluator(data, train_if_missing=False)  # the session's empty cache: only the zoo can answer
    assert evaluator.info["file"].startswith("evaluator-fashion_mnist") and evaluator.num_features == 128
    test = build_dataset({**data, "subset": 1000}, "test")
    assert measure_accuracy(evaluator, test)["class"] >= 0.89
