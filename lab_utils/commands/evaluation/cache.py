"""The evaluator cache: one trained evaluator per dataset and settings, trained through the harness.

    get_evaluator       the frozen evaluator for a data config: loaded from the cache, or trained
                        once (``genlab train``'s own loop, ``model=evaluator``) and cached
    evaluator_config    the evaluator's training config, a child of the run's data (``child_config``)
    evaluator_from_run  the evaluator of a plain ``genlab train model=evaluator`` run

A dataset whose evaluator needs other settings than the preset's (Fashion-MNIST: a longer, decayed schedule with
flips) has its own preset file, ``conf/preset_model/evaluator_<preset>_<data>.yaml``, chosen in place of
``evaluator_<preset>.yaml`` (:func:`dataset_preset_override`); a dataset without one (shapes) composes as before.

The cache is ``lab_utils.harness.cached_run``'s: keyed by ``run_key`` (data but not where it lives, model
config, trainer settings, seed and the source of ``labs/evaluator``), so any change retrains. Layout:
``$GENLAB_CACHE/evaluators/<data.name>-<key>/`` (default ``~/.cache/genlab``) is a normal run directory
(``config.yaml``, ``checkpoints/``, ``metrics.jsonl``, ``train.log``) plus ``evaluator.json`` (key, test
accuracy per attribute, config). An evaluator is trained in ``.<data.name>-<key>.tmp<pid>/`` beside it and renamed
when complete; one that a killed process left is removed by the next ``get_evaluator``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from importlib.resources import files
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from lab_utils.core.cache_folder import cache_folder
from lab_utils.core.config import CONFIG_MODULE, validate
from lab_utils.core.schema import ConfigError
from lab_utils.harness.cached_run import child_config, run_key, train_cached
from lab_utils.harness.run_folder import remove_stale_temporaries
from lab_utils.harness.zoo import shipped_instrument
from labs.evaluator import Evaluator, EvaluatorLab, predict_from_logits, real_images

log = logging.getLogger("genlab.eval")


# ------------------------------------------------------------------------------------ accuracy
@torch.no_grad()
def measure_accuracy(evaluator: Evaluator, dataset: Any, batch_size: int = 500) -> dict[str, Any]:
    """Accuracy per attribute, all-attributes-correct, and the same on held-out combinations."""
    images = real_images(dataset, range(len(dataset)))  # (N, C, H, W) uint8
    predicted = predict_from_logits(evaluator.embed(images, batch_size).logits)  # (N, A)
    correct = predicted == dataset.labels  # (N, A)
    result: dict[str, Any] = {name: correct[:, a].float().mean().item() for a, name in enumerate(evaluator.attributes)}
    result["all"] = correct.all(dim=1).float().mean().item()
    mask = dataset.held_out_mask
    if mask.any():
        held = correct[mask]
        result["held_out"] = {**{name: held[:, a].float().mean().item() for a, name in enumerate(evaluator.attributes)},
                              "all": held.all(dim=1).float().mean().item(), "n": int(mask.sum())}
    return result


# ------------------------------------------------------------------------------------ cache
def evaluator_data_config(data_cfg: Any) -> dict[str, Any]:
    """The data config an evaluator is trained on: the run's, with no combination held out.

    The evaluator is the measuring instrument, so it sees every attribute combination (like
    Inception saw every ImageNet class); the generative model is still the one that never saw
    ``held_out`` combinations, and its alignment on them is what the held-out figures measure.
    """
    data = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)
    from lab_utils.core.data import dataset_class

    if "held_out" in {f.name for f in fields(dataset_class(data.get("name")).Config)}:  # shapes, even if not given
        data["held_out"] = []
    return data


def dataset_preset_override(data_name: Any, preset: str) -> list[str]:
    """``["preset_model=evaluator_<preset>_<data>"]`` where ``conf/preset_model/`` has that file (the dataset's own
    evaluator settings at this budget, in place of ``evaluator_<preset>.yaml``), else ``[]``: the preset as it is."""
    name = f"evaluator_{preset}_{data_name}"
    return [f"preset_model={name}"] if (files(CONFIG_MODULE) / "preset_model" / f"{name}.yaml").is_file() else []


def evaluator_command(data_cfg: Any, preset: str = "cpu") -> list[str]:
    """The ``genlab train`` arguments that train the evaluator ``get_evaluator`` uses for ``data_cfg`` at ``preset``
    (the zoo's manifest records them): the dataset's own preset file if it has one, every combination seen."""
    data = evaluator_data_config(data_cfg)
    name = data.get("name")
    return ["model=evaluator", f"data={name}", f"preset={preset}", *dataset_preset_override(name, preset),
            *(["data.held_out=[]"] if "held_out" in data else [])]


def evaluator_config(data_cfg: Any, overrides: Sequence[str] = (), preset: str = "cpu",
                     device: str = "cpu") -> DictConfig:
    """The validated training config of the evaluator for ``data_cfg`` (what ``genlab train model=evaluator`` runs):
    the preset's (the dataset's own preset file where it has one: :func:`dataset_preset_override`), with
    ``overrides``, then the run's data values (they win over the preset's) and ``device`` (unless an override names
    ``trainer.device``)."""
    data = evaluator_data_config(data_cfg)
    user = {item.partition("=")[0].lstrip("+") for item in overrides}
    trainer = {} if "trainer.device" in user else {"trainer": {"device": str(device)}}
    own = [] if "preset_model" in user else dataset_preset_override(data.get("name"), preset)
    return child_config(["model=evaluator", f"data={data.get('name')}", f"preset={preset}", *own, *overrides],
                        {"data": data, **trainer})


def get_evaluator(
    data_cfg: Any,
    evaluator_overrides: Sequence[str] = (),
    preset: str = "cpu",
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    train_if_missing: bool = True,
) -> Evaluator:
    """The frozen evaluator for a dataset, trained through the harness the first time and cached.

    Cache: ``<cache_dir or $GENLAB_CACHE/evaluators>/<data.name>-<key>/``, a normal run directory
    (``config.yaml``, ``checkpoints/``, ``metrics.jsonl``) plus ``evaluator.json`` (key, test
    accuracy per attribute, config). The key (``lab_utils.harness.cached_run.run_key``) changes with the
    data, the evaluator's model config, the preset's trainer settings and the source of ``labs/evaluator``.
    """
    from lab_utils.harness.devices import pick_device

    device = pick_device(str(device)) if not isinstance(device, torch.device) else device
    cfg = evaluator_config(data_cfg, evaluator_overrides, preset, str(device))
    key = run_key(cfg)
    root = Path(cache_dir).expanduser() if cache_dir else cache_folder("evaluators")
    remove_stale_temporaries(root)  # what a killed evaluator training left (.<data>-<key>.tmp<pid>/)
    folder = root / f"{cfg.data.name}-{key}"
    shipped = shipped_instrument("evaluator", cfg.data.name, key)
    if not (folder / "evaluator.json").is_file() and shipped is not None:  # the zoo's: trained with these settings
        return evaluator_from_pretrained(shipped.name, device)
    if not (folder / "evaluator.json").is_file():
        if folder.exists():
            raise FileExistsError(f"{folder} exists but holds no evaluator.json (an interrupted copy?); delete it "
                                  "and the evaluator will be trained again")
        if not train_if_missing:
            raise FileNotFoundError(
                f"no trained evaluator for data={cfg.data.name} (key {key}) in {root}; run an evaluation with "
                f"training allowed, or train one: genlab train model=evaluator data={cfg.data.name} preset={preset}")
        train_evaluator(cfg, folder, key)
    evaluator = load_evaluator(folder, device=device)
    overall = evaluator.test_accuracy.get("all")
    if overall is not None and overall < 0.9:
        log.warning("the %s evaluator reads only %.1f%% of the test images fully right (%s); metrics that rely on it "
                    "are rough. Train it longer: eval.evaluator_preset=gpu "
                    "(or eval.evaluator_overrides=[trainer.steps=...])",
                    cfg.data.name, 100 * overall, folder)
    return evaluator


def evaluator_from_pretrained(name: str, device: str | torch.device = "cpu") -> Evaluator:
    """The evaluator the zoo ships as ``name`` (``lab_utils.harness.zoo``; its manifest holds the key and accuracy)."""
    from lab_utils.harness.zoo import find, load

    loaded, entry = load(name, device), find(name)
    if not isinstance(loaded.lab, EvaluatorLab):
        raise ConfigError(f"pretrained model {name!r} is a {type(loaded.lab).__name__}, not an evaluator")
    return Evaluator.from_lab(loaded.lab, key=str(entry.info.get("key", "")),
                              test_accuracy=entry.info.get("test_accuracy"),
                              info={**entry.info, "path": str(entry.path)})


def train_evaluator(cfg: DictConfig, folder: Path, key: str) -> Path:
    """Train the evaluator into ``folder`` (``train_cached``: by way of a temporary folder, renamed when complete),
    measuring its test accuracy into ``evaluator.json`` before the rename."""
    log.info("training the %s evaluator (key %s, preset %s, %d steps): this happens once per dataset and config",
             cfg.data.name, key, cfg.get("preset_name"), cfg.trainer.steps)
    return train_cached(cfg, folder, lambda tmp, result: write_evaluator_json(tmp, key, cfg, result.train_seconds))


def write_evaluator_json(run_dir: Path, key: str, cfg: DictConfig, train_seconds: float | None = None) -> dict:
    """Measure the test accuracy of the evaluator trained in ``run_dir`` and write ``evaluator.json`` atomically."""
    from lab_utils.core.data import build_dataset

    evaluator = load_evaluator(run_dir, device="cpu", require_json=False)
    test = build_dataset(cfg.data, "test")
    accuracy = measure_accuracy(evaluator, test)
    info = {"key": key, "data": cfg.data.name, "test_accuracy": accuracy, "test_images": len(test),
            "train_seconds": train_seconds, "config": OmegaConf.to_container(cfg, resolve=True)}
    path = run_dir / "evaluator.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # a write that fails (a full disk) leaves no partial file
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    shown = ", ".join(f"{k} {v:.2%}" for k, v in accuracy.items() if isinstance(v, float))
    log.info("evaluator test accuracy (%d images): %s", len(test), shown)
    return info


def load_evaluator(run_dir: str | Path, device: str | torch.device = "cpu", require_json: bool = True) -> Evaluator:
    """The frozen evaluator of an evaluator run directory (its EMA weights), with ``evaluator.json`` if present.

    A plain ``genlab train model=evaluator`` run works too: ``write_evaluator_json`` adds the accuracy.
    """
    from lab_utils.harness.checkpoint import load_lab

    run_dir = Path(run_dir).expanduser()
    info_path = run_dir / "evaluator.json"
    if require_json and not info_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no evaluator.json (not a finished evaluator)")
    loaded = load_lab(run_dir, device=device, ema=True, expect_model="evaluator")
    if not isinstance(loaded.lab, EvaluatorLab):
        raise ConfigError(f"{run_dir} holds a {type(loaded.lab).__name__}, not an EvaluatorLab")
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return Evaluator.from_lab(loaded.lab, key=info.get("key", ""), test_accuracy=info.get("test_accuracy"),
                              info={k: v for k, v in info.items() if k != "config"} | {"path": str(run_dir)})


def evaluator_from_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Evaluator:
    """The evaluator of a plain ``genlab train model=evaluator`` run; its test accuracy is measured
    (and ``evaluator.json`` written) the first time."""
    from lab_utils.harness.checkpoint import load_checkpoint

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "evaluator.json").is_file():
        cfg = OmegaConf.create(load_checkpoint(run_dir)["config"])
        if cfg.model.get("name") != "evaluator":
            raise ConfigError(f"eval.evaluator_run={run_dir} is a {cfg.model.get('name')!r} run, not an evaluator")
        cfg = validate(cfg)  # a config saved before a field existed gets its default (the key counts it)
        write_evaluator_json(run_dir, run_key(cfg), cfg)
        if cfg.data.get("held_out"):
            log.warning("the evaluator %s was trained without the held-out combinations %s, so its reading of them "
                        "is unreliable; train it with data.held_out=[] (get_evaluator does)", run_dir,
                        list(cfg.data.held_out))
    return load_evaluator(run_dir, device=device)

