"""Train once, then cache (lab_utils/harness/cached_run.py): the one key scheme, the one way to derive a child
config, the one way to train into a cache folder, and the shipped evaluator keyed by the same scheme."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from lab_utils.core.config import compose
from lab_utils.core.registry import register_lab
from lab_utils.harness.cached_run import child_config, lab_source_digest, lab_source_files, run_key, train_cached
from tiny_lab import tiny_config

VAE = ["model=vae", "data=shapes", "preset=smoke"]


def test_the_key_follows_what_determines_a_run_and_nothing_else():
    key = run_key(compose(VAE))
    assert len(key) == 16 and key == run_key(compose(VAE))  # the same settings: the same key, every time
    # how a run reports, where it runs, how batches reach the device, where the data lives: the same run
    for same in ("trainer.device=cpu", "trainer.progress=false", "trainer.log_every=3", "trainer.num_workers=2",
                 "trainer.data_on_device=true", "trainer.tensorboard=true", "data.root=/elsewhere",
                 "data.cache_dir=/elsewhere", f"out={REPO / 'runs' / 'x'}"):
        assert run_key(compose([*VAE, same])) == key, same
    # what it learns from, what it is and how it is trained: another run
    for other in ("trainer.steps=7", "trainer.ema_warmup=true", "model.lr=0.01", "data.seed=1", "data.subset=16",
                  "seed=1"):
        assert run_key(compose([*VAE, other])) != key, other
    assert run_key(compose(["model=ddpm", "data=shapes", "preset=smoke"])) != key


def test_a_labs_source_is_the_files_that_building_it_runs():
    labs = REPO / "labs"
    evaluator = lab_source_files("labs.evaluator.EvaluatorLab")
    assert evaluator == [labs / "__init__.py", labs / "evaluator" / "__init__.py", labs / "evaluator" / "lab.py"]
    ldm = lab_source_files("labs.latent_diffusion.LatentDiffusionLab")
    assert ldm[0] == labs / "__init__.py"
    for part in ("latent_diffusion/autoencoder.py", "diffusion/unet.py", "vae/model.py", "text_encoder/model.py"):
        assert labs / part in ldm, part  # the labs it composes, and the shared text encoder they use
    assert not any(path.name == "exercises.py" for path in ldm)  # a notebook's checks do not train it
    assert labs / "gan" / "lab.py" not in ldm


def test_a_change_to_the_source_a_lab_is_built_from_changes_its_key(tmp_path, monkeypatch):
    package = tmp_path / "keyedlabs" / "family"
    package.mkdir(parents=True)
    (tmp_path / "keyedlabs" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from .lab import KeyedLab\n")
    (package / "lab.py").write_text("from tiny_lab import TinyLab\n\nfrom . import helper\n\n\n"
                                    "class KeyedLab(TinyLab):\n    pass\n")
    (package / "helper.py").write_text("WIDTH = 1\n")
    (package / "exercises.py").write_text("CHECKS = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from keyedlabs.family import KeyedLab

    target = register_lab(KeyedLab)
    assert [p.relative_to(tmp_path).as_posix() for p in lab_source_files(target)] == [
        "keyedlabs/__init__.py", "keyedlabs/family/__init__.py", "keyedlabs/family/helper.py",
        "keyedlabs/family/lab.py"]
    before = lab_source_digest(target)
    (package / "exercises.py").write_text("CHECKS = 2\n")  # imported by nothing the lab runs
    assert lab_source_digest(target) == before
    (package / "lab.py").write_bytes((package / "lab.py").read_bytes().replace(b"\n", b"\r\n"))
    assert lab_source_digest(target) == before  # a Windows checkout is the same source
    (package / "helper.py").write_text("WIDTH = 2\n")  # imported by the lab's module
    assert lab_source_digest(target) != before
    for name in [name for name in sys.modules if name.startswith("keyedlabs")]:
        monkeypatch.delitem(sys.modules, name)


def test_a_child_config_is_composed_with_the_parents_values_merged_over_it():
    parent = compose(["model=ddpm", "data=shapes", "preset=smoke", "data.subset=24", "data.seed=3"])
    before = OmegaConf.to_container(parent)
    child = child_config([*VAE, "trainer.steps=5"], {"data": parent.data, "trainer": {"max_images": 100},
                                                     "out": "somewhere"})
    assert child.model.name == "vae" and child.trainer.steps == 5 and child.trainer.max_images == 100
    assert child.data.subset == 24 and child.data.seed == 3 and child.out == "somewhere"
    assert child.trainer.ema_warmup is False  # validated: the schema's defaults filled
    child.data.subset = 8
    assert OmegaConf.to_container(parent) == before  # the parent is never touched
    with pytest.raises(Exception, match="not_a_key"):  # validated: a typo is refused
        child_config(VAE, {"trainer": {"not_a_key": 1}})


def test_a_cached_run_appears_under_its_name_only_when_complete(tmp_path):
    cfg = tiny_config(tmp_path / "unused")
    seen = []
    rng = torch.get_rng_state()
    folder = train_cached(cfg, tmp_path / "cache" / "tiny-key", lambda tmp, result: seen.append((tmp, result.step)))
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's randomness is left alone
    assert (folder / "checkpoints" / "last.pt").is_file() and (folder / "config.yaml").is_file()
    assert seen[0][0].name.startswith(".tiny-key.tmp") and seen[0][1] == cfg.trainer.steps  # finished before the rename
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny-key"]
    assert not (tmp_path / "unused").exists()

    def broken(tmp, result):
        raise RuntimeError("measuring failed")

    with pytest.raises(RuntimeError, match="measuring failed"):
        train_cached(cfg, tmp_path / "cache" / "other-key", broken)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny-key"]  # nothing half-done left behind


def test_the_shipped_evaluator_is_keyed_as_its_command_trains_it_now():
    from lab_utils.commands.evaluation.cache import evaluator_config

    shipped = json.loads((REPO / "labs" / "evaluator" / "pretrained" / "manifest.json").read_text())
    entry = shipped["models"]["evaluator-shapes"]
    overrides = [item for item in entry["command"] if not item.startswith(("model=", "data=", "preset="))]
    assert overrides == ["data.held_out=[]"]  # what evaluator_config sets itself
    key = run_key(evaluator_config({"name": "shapes"}, preset="cpu"))
    assert entry["key"] == key, (
        f"labs/evaluator/pretrained/manifest.json keys the shipped evaluator {entry['key']}, but its settings and the "
        f"source of labs/evaluator give {key} now, so `genlab eval` would train a new one. If the change alters what "
        "training computes, rebuild it (`make pretrained`); if not (a comment, a docstring), set the manifest's key "
        f"to {key}")
