"""Every config composes and validates; bad values fail with messages that name the key."""

from __future__ import annotations

import itertools
import re
import tomllib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from lab_utils.core.config import ConfigError, compose

CONF = REPO / "conf"
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
PRESETS = sorted(p.stem for p in (CONF / "preset").glob("*.yaml"))


def test_groups_are_there():
    assert {"shapes", "fashion_mnist", "mnist", "cifar10"} <= set(DATA)
    assert {"smoke", "cpu", "gpu"} <= set(PRESETS)
    assert MODELS, "at least one model family"


@pytest.mark.parametrize("data,model,preset", list(itertools.product(DATA, MODELS, PRESETS)))
def test_every_combination_composes_and_validates(data, model, preset):
    cfg = compose([f"data={data}", f"model={model}", f"preset={preset}"])
    assert cfg.data.name == data and cfg.model.name == model and cfg.preset_name == preset
    assert cfg.trainer.steps > 0 and cfg.trainer.batch_size > 0
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_presets_order_their_budgets():
    steps = {p: compose([f"preset={p}"]).trainer.steps for p in ("smoke", "cpu", "gpu")}
    assert steps["smoke"] < steps["cpu"] < steps["gpu"]


def test_command_line_overrides_win_over_presets():
    cfg = compose(["preset=cpu", "trainer.steps=7", "trainer.batch_size=3"])
    assert (cfg.trainer.steps, cfg.trainer.batch_size) == (7, 3)


@pytest.mark.parametrize("name", ["sample", "dataview", "eval", "compare"])
def test_other_primary_configs_compose(name):
    cfg = compose(["run=somewhere"] if name in ("sample", "eval") else [], config_name=name, check=False)
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_a_valid_comparison_budget(preset):
    from lab_utils.commands.compare import CompareConfig
    from lab_utils.core.config import check_section

    cfg = compose([f"preset={preset}"], config_name="compare", check=False)
    budget = check_section(cfg.compare, CompareConfig, "compare")
    assert budget.max_seconds is not None or budget.max_images is not None


@pytest.mark.parametrize("override,message", [
    ("trainer.steps=0", "steps must be positive"),
    ("trainer.precision=fp8", "trainer.precision must be one of ['fp32', 'bf16', 'fp16'], got 'fp8'"),
    ("trainer.batch_scope=all", "trainer.batch_scope must be one of ['global', 'per_process']"),
    ("trainer.ema_decay=1.5", "ema_decay must be in"),
    ("trainer.device=tpu", "trainer.device must be"),
    ("data.image_size=3", "image_size"),
    ("data.held_out=[blu triangle]", "blu"),
    ("seed=abc", "seed"),
])
def test_bad_values_fail_with_clear_messages(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose(["preset=smoke", override])


@pytest.mark.parametrize("override,message", [
    ("trainer.batch_size=abc", "batch_size"),
    ("trainer.no_such_key=1", "no_such_key"),
    ("data=no_such_dataset", "no_such_dataset"),
])
def test_bad_keys_and_types_fail_at_composition(override, message):
    with pytest.raises(Exception, match=message):
        compose(["preset=smoke", override])


def test_unknown_model_target_is_a_config_error():
    cfg = compose(["preset=smoke"], check=False)
    OmegaConf.set_struct(cfg, False)
    cfg.model._target_ = "labs.nowhere.Lab"
    from lab_utils.core.config import validate

    with pytest.raises(ConfigError, match="not a lab genlab knows, so it is not imported"):
        validate(cfg)


def test_pyproject_lists_every_package():
    """The package list is written by hand (conf/ is mapped to genlab_conf): it must stay complete."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for top in ("labs", "lab_utils")
             for p in (REPO / top).rglob("__init__.py")}
    assert found <= listed, f"add to pyproject.toml: {sorted(found - listed)}"
    assert "genlab_conf" in listed


def test_the_commands_offer_exactly_the_families_sampling_options():
    """conf/sample.yaml and eval.sample_options list the union of every family's SampleOptions, all unset
    (None = the model's default), so nothing names an option that no family takes or hides one that one does."""
    from dataclasses import fields

    from lab_utils.commands.cli import SAMPLE_KEYS
    from lab_utils.core import registry

    offered = set()
    for target in registry.BUILTIN_LABS:
        offered |= {f.name for f in fields(registry.lab_class(target).SampleOptions)}
    sample = compose(["run=x"], config_name="sample", check=False)
    family_keys = {key for key in sample if key not in SAMPLE_KEYS}
    assert family_keys == offered == {"sampler", "steps", "guidance", "eta", "temperature"}
    assert all(sample[key] is None for key in family_keys)
    eval_options = compose(["run=x"], config_name="eval", check=False).eval.sample_options
    assert set(eval_options) == offered and all(value is None for value in eval_options.values())


@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_sampling_defaults_have_one_home(preset):
    """The grids pass no options of their own (so they, `genlab sample`, `eval` and `compare` all sample with
    the model's `sampling` section), and the DDPM's resolved options are exactly that section."""
    import torch

    from lab_utils.core.lab import DataInfo
    from lab_utils.core.registry import build_lab

    for model in ("dcgan", "vae", "ddpm", "ldm", "flow"):
        cfg = compose([f"model={model}", "data=shapes", f"preset={preset}"])
        assert dict(cfg.trainer.sample_options) == {}, (model, preset)
    cfg = compose(["model=ddpm", "data=shapes", f"preset={preset}"])
    info = DataInfo("shapes", 3, 32, {"colour": ["red"]}, ["[PAD]", "[UNK]", "[CLS]", "a", "red"])
    with torch.device("meta"):
        lab = build_lab(cfg, info)
    assert lab.sample_options({"steps": None}) == {}  # unset: left to the model
    resolved = lab._options(sampler=None, steps=None, guidance=None, eta=None)
    assert (resolved.sampler, resolved.steps, resolved.guidance, resolved.eta) == tuple(
        cfg.model.sampling[key] for key in ("sampler", "steps", "guidance", "eta"))
    assert cfg.model.sampling.steps == {"smoke": 4, "cpu": 25, "gpu": 50}[preset]
    # the latent DDPM samples with the same settings as the pixel DDPM on every preset, from its own one home
    ldm_cfg = compose(["model=ldm", "data=shapes", f"preset={preset}"])
    with torch.device("meta"):
        ldm = build_lab(ldm_cfg, DataInfo("shapes", 3, 32, {"colour": ["red"]}, ["[PAD]", "[UNK]", "[CLS]", "a", "red"]))
    latent = ldm.diffusion._options(sampler=None, steps=None, guidance=None, eta=None)
    assert (latent.sampler, latent.steps, latent.guidance, latent.eta) == (
        resolved.sampler, resolved.steps, resolved.guidance, resolved.eta)
