"""Every config composes and validates; bad values fail with messages that name the key."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import tomllib

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from lab_utils.core.config import compose
from lab_utils.core.schema import ConfigError

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
    from lab_utils.core.schema import check_section

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


def test_the_commands_list_no_familys_sampling_option():
    """conf/sample.yaml and eval.sample_options list no family's option (their one home is each family's
    SampleOptions): `genlab sample steps=3` and `genlab eval eval.sample_options.steps=3` pass any name on, and the
    loaded lab accepts or refuses it, so a new option is one edit."""
    from dataclasses import fields

    from lab_utils.commands.arguments import eval_option_overrides
    from lab_utils.commands.sample import SAMPLE_KEYS, option_overrides
    from lab_utils.core import registry

    offered = set()
    for target in registry.BUILTIN_LABS:
        offered |= {f.name for f in fields(registry.lab_class(target).SampleOptions)}
    sample = compose(["run=x"], config_name="sample", check=False)
    assert set(sample) == set(SAMPLE_KEYS) and not offered & set(SAMPLE_KEYS)
    assert offered == {"sampler", "steps", "guidance", "eta", "temperature", "candidates"}
    assert compose(option_overrides(["run=x", "steps=3"]), config_name="sample", check=False).steps == 3
    assert dict(compose(["run=x"], config_name="eval", check=False).eval.sample_options) == {}
    given = eval_option_overrides(["run=x", "eval.sample_options.steps=3", "eval.sample_options.any_new_one=0.5",
                                   "eval.num_samples=8"])
    assert given[1:3] == ["++eval.sample_options.steps=3", "++eval.sample_options.any_new_one=0.5"]
    assert dict(compose(given, config_name="eval").eval.sample_options) == {"steps": 3, "any_new_one": 0.5}


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
    resolved = lab.sample_options({"steps": None})  # unset: left to the model
    assert resolved == lab.sampling_defaults() == lab.config.sampling
    assert (resolved.sampler, resolved.steps, resolved.guidance, resolved.eta) == tuple(
        cfg.model.sampling[key] for key in ("sampler", "steps", "guidance", "eta"))
    assert cfg.model.sampling.steps == {"smoke": 4, "cpu": 25, "gpu": 50}[preset]
    # the latent DDPM samples with the pixel DDPM's sampler, steps and guidance on every preset, from its own one
    # home; eta is each one's own (the pixel DDPM's cpu preset measured eta 1 against speckle)
    ldm_cfg = compose(["model=ldm", "data=shapes", f"preset={preset}"])
    with torch.device("meta"):
        ldm = build_lab(ldm_cfg, DataInfo("shapes", 3, 32, {"colour": ["red"]}, ["[PAD]", "[UNK]", "[CLS]", "a", "red"]))
    latent = ldm.sample_options({})
    assert (latent.sampler, latent.steps, latent.guidance) == (resolved.sampler, resolved.steps, resolved.guidance)
    assert resolved.eta == (1.0 if preset == "cpu" else 0.0) and latent.eta == 0.0


# ------------------------------------------------------------------------------------ model defaults: one home
def schema_of(model: str) -> type:
    from lab_utils.core import registry

    target = OmegaConf.load(CONF / "model" / f"{model}.yaml")._target_
    return registry.lab_class(target).Config


@pytest.mark.parametrize("model", MODELS)
def test_a_family_file_names_its_schema_and_sets_no_default(model):
    """conf/model/<name>.yaml says which family it is and extends its Config dataclass, the one home of every
    default (STYLE 19): a value written here again would drift from the dataclass's."""
    from lab_utils.core import registry
    from lab_utils.core.config import MODEL_SCHEMAS

    raw = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{model}.yaml"))
    extra = sorted(set(raw) - {"defaults", "_target_", "name"})
    assert not extra, f"conf/model/{model}.yaml sets {extra}: their home is {schema_of(model).__qualname__}"
    assert raw["defaults"] == [f"/{MODEL_SCHEMAS}/{model}@_here_", "_self_"]
    assert registry.BUILTIN_LABS[raw["_target_"]] == raw["name"] == model
    schema = OmegaConf.structured(schema_of(model))
    assert (schema._target_, schema.name) == (raw["_target_"], raw["name"])


def test_every_built_in_family_has_a_file_and_a_stored_schema():
    from hydra.core.config_store import ConfigStore

    from lab_utils.core import registry
    from lab_utils.core.config import MODEL_SCHEMAS, register_model_schema

    for family in [*MODELS, "nope"]:  # a name that is no family stores nothing
        register_model_schema(family)
    stored = {name.removesuffix(".yaml") for name in ConfigStore.instance().list(MODEL_SCHEMAS)}
    assert set(registry.BUILTIN_LABS.values()) == set(MODELS) == stored


def test_the_family_composed_is_the_one_named():
    from lab_utils.core.config import model_family

    assert model_family("train") == "ddpm"  # conf/train.yaml's default
    assert model_family("train", ["model=vae", "data=shapes", "model=flow"]) == "flow"  # the last one wins
    assert model_family("bench", ["model=dcgan"]) == "dcgan"
    assert model_family("sample", ["model=vae"]) is None  # conf/sample.yaml composes no model group


def test_a_bad_family_is_refused_before_torch_is_imported():
    """`genlab train model=nope` is one line without importing torch (seconds): only the family composed is stored."""
    code = ("import sys\nfrom lab_utils.commands.cli import main\n"
            "rc = main(['train', 'model=nope'])\nprint(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["1", "False"], out.stdout + out.stderr
    assert "model" in out.stderr and "nope" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("model,preset", list(itertools.product(MODELS, PRESETS)))
def test_composing_a_family_gives_its_dataclass_plus_the_presets_changes(model, preset):
    """`model=<name> preset=<p>` is exactly the dataclass's defaults with conf/preset_model/<name>_<p>.yaml on top."""
    expected = OmegaConf.structured(schema_of(model))
    changes = CONF / "preset_model" / f"{model}_{preset}.yaml"
    if changes.exists():
        expected = OmegaConf.merge(expected, OmegaConf.load(changes).get("model") or {})
    cfg = compose([f"model={model}", f"preset={preset}", "data=shapes"])
    assert OmegaConf.to_container(cfg.model) == OmegaConf.to_container(expected)
    # what reads a model value before validation (compare, first stages, the evaluator cache) sees the same values
    raw = compose([f"model={model}", f"preset={preset}", "data=shapes"], check=False)
    assert OmegaConf.to_container(raw.model) == OmegaConf.to_container(expected)


def test_a_model_value_is_overridden_on_the_command_line_and_typos_are_refused():
    assert compose(["model=ddpm", "preset=smoke", "model.lr=0.01", "model.unet.base_channels=8"]).model.lr == 0.01
    assert compose(["model=ldm", "preset=smoke", "model.diffusion.text_lr=0.001"]).model.diffusion.text_lr == 0.001
    with pytest.raises(Exception, match="lrr"):
        compose(["model=ddpm", "preset=smoke", "model.lrr=0.01"])
    with pytest.raises(ConfigError, match="prior must be one of"):
        compose(["model=vae", "preset=smoke", "model.prior=wrong"])


def test_a_saved_config_means_what_it_meant_when_saved():
    """A checkpoint saved before an option existed lacks its key; it means the behaviour before the option (the
    schema's SAVED_WITHOUT), not today's default, so it loads unchanged. Keys it has are its own."""
    from labs.diffusion import DDPMConfig, UNetConfig
    from labs.vae import VAEConfig

    from lab_utils.core.config import saved_model_config

    assert VAEConfig().prior == "learned" and VAEConfig.SAVED_WITHOUT == {"prior": "standard"}
    assert saved_model_config({"_target_": "labs.vae.VAELab", "name": "vae"})["prior"] == "standard"
    assert saved_model_config({"_target_": "labs.vae.VAELab", "prior": "learned"})["prior"] == "learned"
    assert DDPMConfig().unet.coord_channels is True and UNetConfig().coord_channels is False
    old = saved_model_config({"_target_": "labs.diffusion.DiffusionLab", "unet": {"base_channels": 8}})
    assert old["unet"] == {"base_channels": 8, "coord_channels": False}
    ldm = saved_model_config({"_target_": "labs.latent_diffusion.LatentDiffusionLab", "diffusion": {"unet": {}}})
    assert ldm["diffusion"]["unet"] == {"coord_channels": False}  # the nested DDPM's own SAVED_WITHOUT
    unknown = {"_target_": "probe_evil.Lab", "unet": {}}
    assert saved_model_config(dict(unknown)) == unknown  # left for the registry to refuse


def test_a_checkpoint_saved_before_the_vae_prior_option_still_loads(tmp_path):
    """Runs saved before `prior` existed had N(0, I) and no prior weights: today's default (learned) would not fit."""
    import torch

    from conftest import data_info
    from lab_utils.core.registry import build_lab
    from lab_utils.harness.checkpoint import FORMAT, FORMAT_VERSION, load_lab

    cfg = compose(["model=vae", "preset=smoke", "model.prior=standard", "out=x"])
    info = data_info()
    lab = build_lab(cfg, info)
    config = OmegaConf.to_container(cfg, resolve=True)
    del config["model"]["prior"]  # as a run saved before the option
    path = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "config": config, "data_info": info.to_dict(),
                "model": lab.state_dict(), "trainer": {"step": 1}}, path)
    loaded = load_lab(path)
    assert loaded.lab.config.prior == "standard" and not hasattr(loaded.lab, "prior")
