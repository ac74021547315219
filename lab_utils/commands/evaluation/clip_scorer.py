"""The CLIP scorer of a dataset: the joint embedding (``labs/clip``) that reads the CLIP score and R-precision of
generated images against their prompts, found the way the evaluator is (``cache.py``):

    get_clip_scorer       the frozen scorer for a data config: the zoo's (``clip`` for shapes, while its key is the one
                          its settings give now), the cache's, or trained once (``genlab train``'s own loop,
                          ``model=clip``) and cached
    clip_scorer_config    its training config, a child of the run's data (every attribute combination: the
                          instrument sees them all, as the evaluator does)
    clip_scorer_from_run  the scorer of a plain ``genlab train model=clip`` run (``eval.clip_run=<dir>``)

The cache is ``lab_utils.harness.cached_run``'s: ``$GENLAB_CACHE/clip/<data.name>-<key>/`` (or ``<eval.cache_dir>/
clip/``), a normal run directory plus ``clip.json`` (key, what it learnt on the test split: zero-shot accuracy per
attribute and retrieval recall, ``ClipLab.measure``; its config). Its preset is the evaluator's unless
``eval.clip_preset`` says otherwise: ``cpu`` (~5 minutes on 2 cores; shipped for ``shapes``), ``smoke`` in tests.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from lab_utils.commands.evaluation.cache import evaluator_data_config
from lab_utils.core.cache_folder import cache_folder
from lab_utils.core.config import validate
from lab_utils.core.data import build_dataset
from lab_utils.core.plotting import write_file
from lab_utils.core.schema import ConfigError
from lab_utils.harness.cached_run import child_config, run_key, train_cached
from lab_utils.harness.checkpoint import load_checkpoint, load_lab
from lab_utils.harness.devices import pick_device
from lab_utils.harness.run_folder import remove_stale_temporaries
from lab_utils.harness.zoo import find, load, shipped_instrument
from labs.clip import ClipLab
from labs.clip.score import ClipScorer

log = logging.getLogger("genlab.eval")

CACHE = "clip"  # $GENLAB_CACHE/clip, or <eval.cache_dir>/clip
MEASURE_ITEMS = 1000  # test items of clip.json's zero-shot and retrieval figures (at most the split)


def clip_scorer_config(data_cfg: Any, overrides: Sequence[str] = (), preset: str = "cpu",
                       device: str = "cpu") -> DictConfig:
    """The validated training config of the CLIP scorer for ``data_cfg`` (what ``genlab train model=clip`` runs):
    the preset's, with ``overrides``, then the run's data with no combination held out (the measuring instrument
    sees every combination, as the evaluator does: ``evaluator_data_config``) and ``device``."""
    data = evaluator_data_config(data_cfg)
    user = {item.partition("=")[0].lstrip("+") for item in overrides}
    trainer = {} if "trainer.device" in user else {"trainer": {"device": str(device)}}
    return child_config(["model=clip", f"data={data.get('name')}", f"preset={preset}", *overrides],
                        {"data": data, **trainer})


def clip_cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where cached CLIP scorers live: ``<cache_dir>/clip`` or ``$GENLAB_CACHE/clip``."""
    return Path(cache_dir).expanduser() / CACHE if cache_dir else cache_folder(CACHE)


def get_clip_scorer(data_cfg: Any, overrides: Sequence[str] = (), preset: str = "cpu",
                    cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
                    train_if_missing: bool = True) -> ClipScorer:
    """The frozen CLIP scorer for a dataset: the zoo's when one ships with the key these settings give now, else the
    cache's, else trained through the harness once and cached (``train_if_missing=False``: FileNotFoundError)."""
    device = pick_device(str(device)) if not isinstance(device, torch.device) else device
    cfg = clip_scorer_config(data_cfg, overrides, preset, str(device))
    key = run_key(cfg)
    root = clip_cache_root(cache_dir)
    remove_stale_temporaries(root)  # what a killed training left (.<data>-<key>.tmp<pid>/)
    folder = root / f"{cfg.data.name}-{key}"
    shipped = shipped_instrument("clip", cfg.data.name, key)
    if not (folder / "clip.json").is_file() and shipped is not None:
        return clip_scorer_from_pretrained(shipped.name, device)
    if not (folder / "clip.json").is_file():
        if folder.exists():
            raise FileExistsError(f"{folder} exists but holds no clip.json (an interrupted copy?); delete it and the "
                                  "CLIP scorer will be trained again")
        if not train_if_missing:
            raise FileNotFoundError(
                f"no trained CLIP scorer for data={cfg.data.name} (key {key}) in {root} or the zoo; run an evaluation "
                f"with training allowed, or train one: genlab train model=clip data={cfg.data.name} preset={preset}")
        train_clip_scorer(cfg, folder, key)
    return load_clip_scorer(folder, device)


def clip_scorer_from_pretrained(name: str, device: str | torch.device = "cpu") -> ClipScorer:
    """The CLIP scorer the zoo ships as ``name`` (its manifest holds the key and figures)."""
    loaded, entry = load(name, device), find(name)
    if not isinstance(loaded.lab, ClipLab):
        raise ConfigError(f"pretrained model {name!r} is a {type(loaded.lab).__name__}, not a CLIP model")
    return ClipScorer(loaded.lab, key=str(entry.info.get("key", "")),
                      info={"name": name, "path": str(entry.path), "figures": entry.info.get("figures"),
                            "prompt_match_real": entry.info.get("prompt_match_real")})


def train_clip_scorer(cfg: DictConfig, folder: Path, key: str) -> Path:
    """Train the scorer into ``folder`` (``train_cached``: by way of a temporary folder, renamed when complete),
    measuring it on the test split into ``clip.json`` before the rename."""
    log.info("training the %s CLIP scorer (key %s, preset %s, %d steps): this happens once per dataset and config",
             cfg.data.name, key, cfg.get("preset_name"), cfg.trainer.steps)
    return train_cached(cfg, folder, lambda tmp, result: write_clip_json(tmp, key, cfg, result.train_seconds))


def write_clip_json(run_dir: Path, key: str, cfg: DictConfig, train_seconds: float | None = None) -> dict:
    """Measure the CLIP model trained in ``run_dir`` on the test split (``ClipLab.measure``: zero-shot accuracy per
    attribute, retrieval recall) and write ``clip.json`` atomically."""
    loaded = load_lab(run_dir, device="cpu", ema=True, expect_model="clip")
    test = build_dataset(cfg.data, "test")
    measured = loaded.lab.measure(test, min(MEASURE_ITEMS, len(test)), seed=0, batch_size=250)
    info = {"key": key, "data": cfg.data.name, "figures": measured.figures, "summary": measured.summary,
            "train_seconds": train_seconds, "config": OmegaConf.to_container(cfg, resolve=True)}
    write_file(run_dir / "clip.json", (json.dumps(info, indent=2) + "\n").encode())  # atomic: whole or none
    log.info("CLIP scorer on the test split: %s", measured.summary)
    return info


def load_clip_scorer(run_dir: str | Path, device: str | torch.device = "cpu",
                     require_json: bool = True) -> ClipScorer:
    """The frozen scorer of a CLIP run directory (its EMA weights), with ``clip.json`` if present."""
    run_dir = Path(run_dir).expanduser()
    info_path = run_dir / "clip.json"
    if require_json and not info_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no clip.json (not a finished CLIP scorer)")
    loaded = load_lab(run_dir, device=device, ema=True, expect_model="clip")
    if not isinstance(loaded.lab, ClipLab):
        raise ConfigError(f"{run_dir} holds a {type(loaded.lab).__name__}, not a ClipLab")
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return ClipScorer(loaded.lab, key=info.get("key", ""),
                      info={k: v for k, v in info.items() if k != "config"} | {"path": str(run_dir)})


def clip_scorer_from_run(run_dir: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
    """The scorer of a plain ``genlab train model=clip`` run (``eval.clip_run``); its test figures are measured (and
    ``clip.json`` written) the first time."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "clip.json").is_file():
        cfg = OmegaConf.create(load_checkpoint(run_dir)["config"])
        if cfg.model.get("name") != "clip":
            raise ConfigError(f"eval.clip_run={run_dir} is a {cfg.model.get('name')!r} run, not a CLIP model")
        cfg = validate(cfg)
        write_clip_json(run_dir, run_key(cfg), cfg)
    return load_clip_scorer(run_dir, device=device)


def find_clip_scorer(data_cfg: Any, device: str | torch.device = "cpu") -> ClipScorer | None:
    """The scorer of ``data_cfg`` that needs no training (the zoo's or the cache's, at the ``cpu`` preset), or None:
    ``genlab serve`` scores what it draws with it, and does not train one at start."""
    try:
        return get_clip_scorer(data_cfg, preset="cpu", device=device, train_if_missing=False)
    except FileNotFoundError as err:
        log.warning("no CLIP scorer for data=%s, so its images are served without a CLIP score (%s)",
                    getattr(data_cfg, "name", None) or dict(data_cfg).get("name"), err)
        return None


def scorer_description(scorer: ClipScorer) -> dict[str, Any]:
    """What ``eval.json`` and ``results.json`` record of the scorer: its key, where it came from and what it reads
    right on the real test images (zero-shot per attribute)."""
    figures = scorer.info.get("figures") or {}
    return {"key": scorer.key, "name": scorer.info.get("name"), "path": scorer.info.get("path"),
            "zero_shot": figures.get("zero_shot"), "embed_dim": scorer.lab.config.embed_dim}
