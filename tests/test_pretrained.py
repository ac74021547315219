"""The model zoo: every shipped file matches its manifest, loads with the current code, samples the same for a
seed, and still follows prompts (read by the shipped evaluator); a file that was altered, or that names code,
is refused; `genlab pretrained` and `pretrained=` work like `run=`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GENLAB, REPO, data_info, subprocess_env
from lab_utils.core.config import compose
from lab_utils.harness import zoo
from lab_utils.harness.checkpoint import CheckpointError
from lab_utils.harness.zoo import PretrainedEntry, load, load_file_lab, save_pretrained, sha256_of

GENERATIVE = [name for name, entry in zoo.entries().items() if entry.generative]
PROMPTS = 32  # test prompts per model for the alignment check (the manifest's figures use 500)


def genlab(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*GENLAB, *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def test_the_zoo_ships_every_family_and_the_evaluator():
    families = {entry.family for entry in zoo.entries().values()}
    assert families == {"dcgan", "vae", "ddpm", "ldm", "flow", "evaluator", "clip"}
    for entry in zoo.entries().values():
        assert entry.path.is_file() and entry.path.stat().st_size == entry.info["bytes"]
        assert entry.path.stat().st_size < 8 * 2**20, f"{entry.name} is larger than a few MB"
        assert sha256_of(entry.path) == entry.sha256, f"{entry.name} does not match its manifest"


@pytest.mark.parametrize("name", GENERATIVE)
def test_the_recorded_command_reproduces_the_shipped_config(name):
    """The manifest's `genlab train` arguments compose exactly the model and trainer the file was trained with.

    Compared as the lab's typed config: a field added to the schema after the file was built takes its default there,
    which must be what the command composes (a new option that changed the shipped model's behaviour would fail)."""
    from dataclasses import asdict

    from lab_utils.core.schema import as_dataclass

    entry = zoo.entries()[name]
    loaded = load(name)
    command = compose(entry.info["command"])
    schema = type(loaded.lab).Config
    assert asdict(as_dataclass(schema, loaded.cfg.model)) == asdict(as_dataclass(schema, command.model))
    for key in ("steps", "batch_size", "lr_warmup_steps", "ema_decay", "ema_start"):
        if key in command.trainer:
            assert loaded.cfg.trainer[key] == command.trainer[key], key
    assert loaded.state["trainer"]["step"] == entry.info["steps"] == command.trainer.steps


@pytest.fixture(scope="module")
def evaluator():
    from lab_utils.commands.evaluation import get_evaluator

    return get_evaluator(compose(["model=ddpm", "data=shapes"]).data)  # the shipped one: no training here


@pytest.mark.slow
@pytest.mark.parametrize("name", GENERATIVE)
def test_every_shipped_model_samples_the_same_and_follows_prompts(name, evaluator):
    from lab_utils.core.data import build_dataset
    from labs.evaluator import predict_from_logits, quantize

    entry, loaded = zoo.entries()[name], load(name)
    lab = loaded.lab
    test = build_dataset(loaded.cfg.data, "test")
    labels = test.labels[:PROMPTS]
    prompts = [test.describe(row, template=0) for row in labels]
    first = lab.sample(prompts, generator=torch.Generator().manual_seed(0))
    assert first.shape == (PROMPTS, 3, 32, 32) and first.min() >= -1 and first.max() <= 1
    assert first.std() > 0.1, "grey squares"
    torch.testing.assert_close(lab.sample(prompts, generator=torch.Generator().manual_seed(0)), first)  # same seed
    predicted = predict_from_logits(evaluator.embed(quantize(first)).logits)
    all_four = (predicted == labels).all(dim=1).float().mean().item()
    shipped = entry.info["eval"]["alignment_all"]
    assert all_four >= min(shipped - 0.2, 0.9) and all_four >= 0.4, (name, all_four, shipped)


def test_an_altered_file_is_refused(tmp_path, monkeypatch):
    entry = zoo.entries()["vae"]
    copy = tmp_path / entry.path.name
    shutil.copyfile(entry.path, copy)
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF  # one byte of the weights
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(zoo, "entries", lambda: {"vae": PretrainedEntry("vae", "vae", "shapes", copy, entry.info)})
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        load("vae")
    copy.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load("vae")


def test_a_file_cannot_name_code(tmp_path):
    """The header's config names a lab by its registered name only: an unknown module is not even imported."""
    from lab_utils.core.schema import ConfigError

    entry = zoo.entries()["vae"]
    tensors = load_file(str(entry.path))
    header = zoo.read_pretrained(entry.path)[1]
    config = json.loads(header["config"])
    config["model"]["_target_"] = "genlab_evil_module.Lab"
    evil = tmp_path / "evil.safetensors"
    save_file(tensors, str(evil), metadata={**header, "config": json.dumps(config)})
    with pytest.raises(ConfigError, match="is not a lab genlab knows, so it is not imported"):
        load_file_lab(evil)
    assert "genlab_evil_module" not in sys.modules  # refused by name, before any import
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))  # a safetensors file that is not genlab's
    with pytest.raises(CheckpointError, match="not a genlab pretrained model"):
        load_file_lab(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_file_lab(garbage)


def test_names_only(tmp_path):
    with pytest.raises(CheckpointError, match="no pretrained model"):
        load(str(zoo.entries()["vae"].path))  # a path is not a name
    with pytest.raises(CheckpointError, match="no pretrained model '../vae'"):
        load("../vae")


def test_save_and_load_round_trip(tmp_path):
    """float32 round-trips exactly; float16 stores parameters only in half precision (buffers stay as they are)."""
    from labs.vae import VAELab

    cfg = compose(["model=vae", "data=shapes", "preset=smoke"])
    info = data_info(size=32)
    torch.manual_seed(0)
    lab = VAELab(cfg.model, info)
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    exact = load_file_lab(save_pretrained(lab, config, {"step": 7, "images_seen": 70}, tmp_path / "a.safetensors")).lab
    for (name, a), b in zip(lab.state_dict().items(), exact.state_dict().values()):
        assert torch.equal(a, b), name
    half = save_pretrained(lab, config, {"step": 7}, tmp_path / "b.safetensors", dtype=torch.float16)
    stored = load_file(str(half))
    params = dict(lab.named_parameters())
    assert all(stored[name].dtype == torch.float16 for name in params)
    loaded = load_file_lab(half)
    assert loaded.state["trainer"]["step"] == 7
    for name, tensor in loaded.lab.named_parameters():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, params[name].detach().half().float(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ the commands
def test_genlab_pretrained_lists_the_zoo():
    out = genlab("pretrained")
    assert out.returncode == 0, out.stderr
    for name in zoo.entries():
        assert name in out.stdout
    assert "genlab train model=ddpm data=shapes preset=cpu seed=0" in out.stdout


@pytest.mark.slow
def test_sample_pretrained_tiles_are_the_labs_pixels(tmp_path):
    """`genlab sample pretrained=vae layout=tiles` writes the very pixels of lab.sample for the seed."""
    from PIL import Image

    from lab_utils.core.plotting import tiles

    out = genlab("sample", "pretrained=vae", "prompt=a small green square at the bottom", "n=3", "seed=4",
                 "layout=tiles", f"out={tmp_path / 'x.png'}")
    assert out.returncode == 0, out.stderr
    written = np.asarray(Image.open(tmp_path / "x.png").convert("RGB"))
    lab = load("vae").lab
    expected = tiles(lab.sample(["a small green square at the bottom"] * 3, generator=torch.Generator().manual_seed(4)),
                     ncols=3)
    assert written.shape == (32, 3 * 32 + 2 * 2, 3)
    np.testing.assert_array_equal(written, expected)


def test_the_notebook_switch(monkeypatch):
    from lab_utils.core.switches import pretrained_mode

    for name in ("GENLAB_PRETRAINED", "GENLAB_SMOKE"):
        monkeypatch.delenv(name, raising=False)
    assert pretrained_mode(default=True) and not pretrained_mode(default=False)
    monkeypatch.setenv("GENLAB_PRETRAINED", "0")
    assert not pretrained_mode(default=True)
    monkeypatch.setenv("GENLAB_PRETRAINED", "1")
    assert pretrained_mode(default=False)
    monkeypatch.delenv("GENLAB_PRETRAINED")
    monkeypatch.setenv("GENLAB_SMOKE", "1")
    assert not pretrained_mode(default=True)  # smoke mode trains its tiny models unless told otherwise


def test_each_training_notebook_has_the_switch_with_its_documented_default():
    from test_notebooks import LOADS_BY_DEFAULT, TRAINS_BY_DEFAULT

    for name in [*LOADS_BY_DEFAULT, *TRAINS_BY_DEFAULT]:
        source = (REPO / "notebooks" / f"{name}.ipynb").read_text()
        default = "True" if name in LOADS_BY_DEFAULT else "False"
        assert f"pretrained_mode(default={default})" in source, name
        assert "zoo.load(" in source, name


# ------------------------------------------------------------------------------------ building the zoo
@pytest.fixture
def temporary_zoo(tmp_path, monkeypatch):
    """Copies of the vae's and the evaluator's zoo folders that the zoo reads and a build writes instead of
    labs/*/pretrained/ (the other families ship nothing here)."""
    from lab_utils.commands import pretrained

    copies = {}
    for package in zoo.family_packages(measuring=True).values():
        copies[package] = tmp_path / "zoo" / package
        if package in ("labs.vae", "labs.evaluator"):
            shutil.copytree(zoo.zoo_folder(package), copies[package])
    monkeypatch.setattr(zoo, "zoo_folder", lambda package: copies[package])
    monkeypatch.setattr(pretrained, "zoo_folder", lambda package: copies[package])
    return copies


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    from lab_utils.harness.run import train

    run_dir = tmp_path_factory.mktemp("runs") / "vae"
    with torch.random.fork_rng():
        train(compose(["model=vae", "preset=smoke", "trainer.steps=1", "trainer.progress=false", f"out={run_dir}"]))
    return run_dir


class Killed(BaseException):
    """The process is killed here (nothing after this line runs)."""


def test_a_kill_between_weights_and_manifest_leaves_a_zoo_that_loads(temporary_zoo, vae_run, monkeypatch):
    """Weights and manifest change as one step: new weights under a new name, then the manifest (the commit),
    then the old file goes. A kill before the commit leaves the old model loading; the next export cleans up."""
    import lab_utils.commands.evaluation as evaluation
    from lab_utils.commands import pretrained

    figures = {"fid": 1.0, "alignment_all": 0.5, "alignment_seen": 0.5, "alignment_held_out": 0.5}
    monkeypatch.setattr(pretrained, "eval_figures", lambda *args: dict(figures))  # the file handling, not the figures
    monkeypatch.setattr(evaluation, "get_evaluator", lambda *args, **kwargs: None)
    options = pretrained.ZooConfig(action="export", models=["vae"], dtype="float32")
    folder, shipped = temporary_zoo["labs.vae"], zoo.find("vae")
    write_manifest = pretrained.write_manifest

    def killed_before_the_manifest(*args):
        raise Killed

    monkeypatch.setattr(pretrained, "write_manifest", killed_before_the_manifest)
    with pytest.raises(Killed):
        pretrained.export(options, "vae", vae_run, "git 0123456789ab")
    assert zoo.find("vae").sha256 == shipped.sha256
    assert sha256_of(load("vae").path) == shipped.sha256  # the manifest and the file it names agree

    monkeypatch.setattr(pretrained, "write_manifest", write_manifest)
    entry = pretrained.export(options, "vae", vae_run, "git 0123456789ab")
    assert entry["file"] == f"vae.{entry['sha256'][:12]}.safetensors" and entry["code_version"] == "git 0123456789ab"
    assert load("vae").state["trainer"]["step"] == 1 and zoo.find("vae").info == entry
    assert sorted(p.name for p in folder.iterdir()) == sorted([entry["file"], entry["training_log"], "manifest.json"])
    assert zoo.training_log("vae")[-1]["step"] == 1


@pytest.mark.parametrize("models, evaluator_shipped, exported", [
    (["vae"], True, ["vae"]),  # the shipped evaluator has the key its settings give now: left as it is
    (["vae"], False, ["evaluator", "vae"]),  # missing: shipped too, first (the figures are read with it)
    (["evaluator"], True, ["evaluator"]),  # asked for
])
def test_a_build_exports_only_what_was_asked(temporary_zoo, vae_run, monkeypatch, models, evaluator_shipped,
                                             exported):
    from lab_utils.commands import pretrained
    from lab_utils.harness.run_folder import code_version

    if not evaluator_shipped:
        (temporary_zoo["labs.evaluator"] / "manifest.json").unlink()
    done = []
    entry = {"file": "x", "bytes": 0, "dtype": "float32", "test_accuracy": {"all": 1.0},
             "eval": {"alignment_seen": 1.0, "alignment_held_out": 1.0, "fid": 1.0}}
    monkeypatch.setattr(pretrained, "export_evaluator", lambda options, version: done.append(("evaluator", version))
                        or entry)
    monkeypatch.setattr(pretrained, "export", lambda options, model, run_dir, version: done.append((model, version))
                        or entry)
    cfg = compose(["action=export", f"models=[{','.join(models)}]", f"runs={vae_run.parent}"],
                  config_name="pretrained", check=False)
    pretrained.pretrained_command_main(cfg)
    assert done == [(name, code_version()) for name in exported]
