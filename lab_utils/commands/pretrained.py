"""``genlab pretrained``: list the model zoo, or rebuild it (``make pretrained``).

    genlab pretrained                                  # the shipped models and their figures
    genlab pretrained action=build                     # train every family with its cpu preset, then export
    genlab pretrained action=export models=[ddpm]      # export runs already trained under runs/pretrained/
    genlab pretrained action=build models=[evaluator]  # re-export the dataset's evaluator
    genlab pretrained action=build models=[clip]       # train (or take from the cache) and ship its CLIP scorer

Building a model is exactly ``genlab train model=<family> data=<dataset> preset=<preset> seed=<seed>`` into
``<runs>/<family>`` (a finished run there is reused), then an export: the run's EMA weights go into
``labs/<family>/pretrained/<family>.<sha256[:12]>.safetensors`` (``lab_utils.harness.zoo``), stored in float16 when
that changes no ``genlab eval`` figure measurably (the evaluation is run on both and the differences recorded), and
the manifest entry is rewritten with the command, the run's key (``lab_utils.harness.cached_run.run_key``: its
settings and its labs' source), the code's git version, the sha256 and the figures of the file as shipped.

Only what was asked is written: the models named, and the dataset's evaluator when ``models`` names it or when
none ships with the key its settings give now (``evaluator=true``, the default), and its CLIP scorer (``clip``, named like the families,
``lab_utils.commands.evaluation.clip_scorer``) only when ``models`` names it. Weights and manifest change as one
step (:func:`publish`): the weights go under a new name of their own content, the manifest that names them replaces
the old one, then the old file goes; a kill at any point leaves a zoo that loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lab_utils.core.cache_folder import cache_folder
from lab_utils.core.config import compose, validate
from lab_utils.core.schema import ConfigError
from lab_utils.core.schema import typed_section
from lab_utils.harness.cached_run import run_key
from lab_utils.harness.checkpoint import load_lab, resolve_checkpoint
from lab_utils.harness.run_folder import code_version, run_finished
from lab_utils.harness.zoo import (MANIFEST, entries, family_packages, load_file_lab, read_manifest,
                                   save_pretrained, sha256_of, shipped_instrument, zoo_folder)

log = logging.getLogger("genlab")

# float16 is kept only if it moves no figure more than this (same seed, same prompts: only rounding differs)
FP16_TOLERANCE = {"alignment": 0.01, "fid": 0.05}


@dataclass
class ZooConfig:
    """``conf/pretrained.yaml``."""

    action: str = "list"  # list | build | export
    # families to build or export; evaluator and clip: the dataset's measuring instruments (shipped as
    # evaluator-<dataset> and clip)
    models: list[str] = field(default_factory=lambda: ["dcgan", "vae", "ddpm", "ldm", "flow"])
    dataset: str = "shapes"
    preset: str = "cpu"
    seed: int = 0
    runs: str = "runs/pretrained"  # build trains into <runs>/<model>; export reads it
    eval_samples: int = 500
    dtype: str = "auto"  # auto (float16 if it changes no figure) | float16 | float32
    # ship the dataset's evaluator too when none ships with its current key (genlab eval needs no training on a new
    # machine); models=[evaluator] re-exports it
    evaluator: bool = True

    def __post_init__(self) -> None:
        if self.action not in ("list", "build", "export"):
            raise ValueError(f"action must be list, build or export, got {self.action!r}")
        known = family_packages(measuring=True)
        unknown = [m for m in self.models if m not in known]
        if unknown:
            raise ValueError(f"models {unknown} are not families of genlab; choose from {sorted(known)}")
        if self.dtype not in ("auto", "float16", "float32"):
            raise ValueError(f"dtype must be auto, float16 or float32, got {self.dtype!r}")
        if self.eval_samples < 10:
            raise ValueError(f"eval_samples must be at least 10, got {self.eval_samples}")


def train_command(options: ZooConfig, model: str) -> list[str]:
    """The ``genlab train`` arguments that train the zoo's ``model`` (the manifest records them)."""
    return [f"model={model}", f"data={options.dataset}", f"preset={options.preset}", f"seed={options.seed}"]


# ------------------------------------------------------------------------------------ list
def listing() -> str:
    """The zoo as a table: name, family, dataset, size, dtype, figures, and how it was trained."""
    shipped = entries()
    if not shipped:
        return "no pretrained models are installed (`make pretrained` builds them)"
    lines = ["| name | family | dataset | parameters | file | all four seen | held out | FID (floor) | trained with |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in shipped.values():
        if not entry.generative:
            continue
        info, figures = entry.info, entry.info.get("eval", {})
        lines.append(
            f"| {entry.name} | {entry.family} | {entry.dataset} | {info.get('parameters', 0) / 1e6:.2f}M "
            f"| {info.get('bytes', 0) / 2**20:.1f} MiB {info.get('dtype', '?')} | {_fmt(figures.get('alignment_seen'))} "
            f"| {_fmt(figures.get('alignment_held_out'))} | {_fmt(figures.get('fid'))} ({_fmt(figures.get('fid_real'))}) "
            f"| `genlab train {' '.join(info.get('command', []))}` |")
    for entry in shipped.values():
        if entry.family == "evaluator":
            accuracy = entry.info.get("test_accuracy", {}).get("all")
            lines.append(f"\n{entry.name}: the evaluator `genlab eval` measures {entry.dataset} with (test accuracy, "
                         f"every attribute right: {_fmt(accuracy)}; key {entry.info.get('key')})")
        elif entry.family == "clip":
            zero_shot = (entry.info.get("figures") or {}).get("zero_shot", {})
            real = (entry.info.get("prompt_match_real") or {}).get("real_held_out", {})
            lines.append(f"\n{entry.name}: the CLIP model `genlab eval` reads the CLIP score and R-precision with "
                         f"(zero-shot on real test images, every attribute right: {_fmt(zero_shot.get('all'))}; real "
                         f"test images' CLIP score {_fmt(real.get('clip_score'))}, R-precision "
                         f"{_fmt(real.get('r_precision'))}; key {entry.info.get('key')})")
    lines.append("")
    lines.append("Use one: genlab sample pretrained=<name> prompt=\"a red circle\"; genlab eval pretrained=<name>; "
                 "genlab serve")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


# ------------------------------------------------------------------------------------ build and export
def train_run(options: ZooConfig, model: str) -> Path:
    """Train ``model`` into ``<runs>/<model>`` with its preset (a finished run there is kept as it is)."""
    from lab_utils.harness.checkpoint import CheckpointError, load_checkpoint
    from lab_utils.harness.run import train

    out = Path(options.runs) / model
    try:
        state = load_checkpoint(out)
        if run_finished(state) and state["config"]["model"]["name"] == model:
            log.info("%s: reusing the finished run in %s", model, out)
            return out
    except CheckpointError:
        pass
    cfg = compose([*train_command(options, model), f"out={out}", "trainer.progress=false"])
    log.info("%s: genlab train %s", model, " ".join(train_command(options, model)))
    train(cfg, resume=out if (out / "checkpoints" / "last.pt").is_file() else None)
    return out


def eval_figures(lab, cfg: DictConfig, evaluator, options: ZooConfig, device: torch.device) -> dict[str, Any]:
    """The ``genlab eval`` figures the manifest keeps (the model's default sampling options)."""
    from lab_utils.commands.evaluation import evaluate_lab

    result = evaluate_lab(lab, cfg.data, evaluator, options.eval_samples, seed=0, device=device,
                          model_name=cfg.model.name)
    generated, real = result.generated, result.real_held_out
    return {"num_samples": options.eval_samples, "fid": generated["fid"], "fid_real": real["fid"],
            "kid": generated["kid_mean"], "precision": generated["precision"], "recall": generated["recall"],
            "alignment_all": generated["alignment"]["all"],
            "alignment_seen": generated["alignment"]["seen"]["all"],
            "alignment_held_out": generated["alignment"]["held_out"]["all"],
            "per_attribute_seen": generated["alignment"]["seen"]["per_attribute"],
            "seconds_per_image": result.sampling_seconds_per_image,
            "sample_options": asdict(lab.sampling_defaults())}


def export(options: ZooConfig, model: str, run_dir: Path, version: str | None = None) -> dict[str, Any]:
    """Write ``run_dir``'s sampling weights into the zoo and its manifest entry (:func:`publish`); returns the entry.
    ``version``: the code's git version, read before the command wrote anything (:func:`code_version`)."""
    from lab_utils.commands.evaluation import get_evaluator
    from lab_utils.harness.devices import pick_device

    device = pick_device("cpu")
    loaded = load_lab(run_dir, device=device, ema=True)
    if loaded.cfg.model.name != model:
        raise ConfigError(f"{run_dir} holds a {loaded.cfg.model.name} run, not {model}")
    config = OmegaConf.to_container(loaded.cfg, resolve=True)
    trainer, step = loaded.state["trainer"], int(loaded.state["trainer"]["step"])
    evaluator = get_evaluator(loaded.cfg.data, device=device)
    folder = zoo_folder(family_packages()[model])
    reference = eval_figures(loaded.lab, loaded.cfg, evaluator, options, device)  # the run's own fp32 weights

    dtypes = {"auto": [torch.float16, torch.float32], "float16": [torch.float16], "float32": [torch.float32]}
    chosen, figures, fp16_check = None, None, None
    scratch = folder / f".{model}.candidate.safetensors"
    for dtype in dtypes[options.dtype]:
        save_pretrained(loaded.lab, config, trainer, scratch, dtype)
        candidate = eval_figures(load_file_lab(scratch, device).lab, loaded.cfg, evaluator, options, device)
        if dtype == torch.float16:
            fp16_check = {"alignment_all": candidate["alignment_all"] - reference["alignment_all"],
                          "fid": candidate["fid"] - reference["fid"]}
            keeps = (abs(fp16_check["alignment_all"]) <= FP16_TOLERANCE["alignment"]
                     and abs(fp16_check["fid"]) <= FP16_TOLERANCE["fid"])
            if options.dtype == "auto" and not keeps:
                log.info("%s: float16 moves the figures by %s: keeping float32", model, fp16_check)
                continue
        chosen, figures = dtype, candidate
        break
    entry = {
        "family": model, "dataset": loaded.cfg.data.name,
        "command": train_command(options, model), "steps": step,
        "key": run_key(validate(loaded.cfg)),  # its settings and its labs' source, as the caches key a run
        "code_version": version, "built": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "parameters": sum(p.numel() for p in loaded.lab.parameters()),
        "dtype": str(chosen).replace("torch.", ""),
        "eval": figures, "eval_fp32_weights": {k: reference[k] for k in ("fid", "alignment_all")},
        "fp16_minus_fp32": fp16_check, "fp16_tolerance": FP16_TOLERANCE,
    }
    # the training curves go beside it, for the notebooks that load the model instead of training it
    entry = publish(folder, model, scratch, entry, training_log=Path(run_dir) / "metrics.jsonl")
    log.info("%s: wrote %s (%.1f MiB, %s)", model, folder / entry["file"], entry["bytes"] / 2**20, entry["dtype"])
    return entry


def evaluator_command(options: ZooConfig) -> list[str]:
    """The ``genlab train`` arguments of the dataset's evaluator (the one ``genlab eval`` uses by default: the
    dataset's own preset file where it has one, ``data.held_out=[]`` where the data holds combinations out)."""
    from lab_utils.commands.evaluation.cache import evaluator_command as command

    return command({"name": options.dataset}, options.preset)


def evaluator_missing(options: ZooConfig) -> bool:
    """Whether no shipped evaluator of the dataset has the key its settings give now (a new machine would train one
    before ``genlab eval`` could measure)."""
    from lab_utils.commands.evaluation.cache import evaluator_config

    return shipped_instrument("evaluator", options.dataset,
                              run_key(evaluator_config({"name": options.dataset}, preset=options.preset))) is None


def export_evaluator(options: ZooConfig, version: str | None = None) -> dict[str, Any]:
    """Ship the dataset's evaluator (the one ``genlab eval`` uses by default: ``evaluator_preset=cpu``), float32
    (it is the measuring instrument: every figure reads its features), so a fresh machine measures at once."""
    from lab_utils.commands.evaluation.cache import evaluator_config, train_evaluator

    cfg = evaluator_config({"name": options.dataset}, preset=options.preset)
    key = run_key(cfg)
    source = cache_folder("evaluators") / f"{cfg.data.name}-{key}"
    if not (source / "evaluator.json").is_file():
        train_evaluator(cfg, source, key)
    info = json.loads((source / "evaluator.json").read_text())
    loaded = load_lab(source, ema=True, expect_model="evaluator")
    name = f"evaluator-{options.dataset}"
    entry = publish_instrument(loaded, name, options, key, evaluator_command(options), version,
                               {"train_seconds": info.get("train_seconds"), "test_accuracy": info["test_accuracy"],
                                "test_images": info.get("test_images")})
    log.info("%s: wrote %s (key %s, test accuracy %.3f)", name,
             zoo_folder(family_packages(measuring=True)["evaluator"]) / entry["file"], key,
             info["test_accuracy"]["all"])
    return entry


def publish_instrument(loaded: Any, name: str, options: ZooConfig, key: str, command: list[str], version: str | None,
                       figures: dict[str, Any], training_log: Path | None = None) -> dict[str, Any]:
    """Ship a measuring model (the evaluator, the CLIP scorer) in float32 with the manifest entry both have (its
    family, dataset, key, command, steps, code version, size) and its own ``figures``; what :func:`publish` returns."""
    family = loaded.cfg.model.name
    folder = zoo_folder(family_packages(measuring=True)[family])
    scratch = save_pretrained(loaded.lab, OmegaConf.to_container(loaded.cfg, resolve=True), loaded.state["trainer"],
                              folder / f".{name}.candidate.safetensors")
    entry = {"family": family, "dataset": options.dataset, "key": key, "command": command,
             "steps": int(loaded.state["trainer"]["step"]), "code_version": version, "built": time.strftime("%Y-%m-%d"),
             "torch": torch.__version__, "parameters": sum(p.numel() for p in loaded.lab.parameters()),
             "dtype": "float32", **figures}
    return publish(folder, name, scratch, entry, training_log=training_log)


def clip_command(options: ZooConfig) -> list[str]:
    """The ``genlab train`` arguments of the dataset's CLIP scorer (the one ``genlab eval`` uses by default)."""
    return ["model=clip", f"data={options.dataset}", f"preset={options.preset}", "data.held_out=[]"]


def export_clip(options: ZooConfig, version: str | None = None) -> dict[str, Any]:
    """Ship the dataset's CLIP scorer (the one ``genlab eval`` reads the CLIP score and R-precision with when its
    preset is ``cpu``), float32 (a measuring instrument), trained through the cache as ``genlab eval`` would train
    it, with its figures: what it reads right on the test split (``clip.json``: zero-shot per attribute, retrieval
    recall) and the real test images' CLIP score and R-precision as ``genlab eval`` reads them (``eval_samples``
    images, seed 0: the ceiling every family's figure is read against)."""
    from lab_utils.commands.evaluation.clip_scorer import clip_cache_root, clip_scorer_config, train_clip_scorer
    from labs.clip.score import ClipScorer
    from lab_utils.commands.evaluation.evaluate import real_prompt_match

    cfg = clip_scorer_config({"name": options.dataset}, preset=options.preset)
    key = run_key(cfg)
    source = clip_cache_root() / f"{cfg.data.name}-{key}"
    if not (source / "clip.json").is_file():
        train_clip_scorer(cfg, source, key)
    info = json.loads((source / "clip.json").read_text())
    loaded = load_lab(source, ema=True, expect_model="clip")  # once: the scorer and the shipped weights
    scorer = ClipScorer(loaded.lab, key=key)
    ceiling = real_prompt_match(scorer, compose([f"data={options.dataset}"]).data, options.eval_samples)
    name = "clip"  # named like the families (`pretrained=clip`, `model.text_from=clip`), trained on `dataset`
    entry = publish_instrument(loaded, name, options, key, clip_command(options), version,
                               {"train_seconds": info.get("train_seconds"), "figures": info["figures"],
                                "prompt_match_real": ceiling}, training_log=source / "metrics.jsonl")
    log.info("%s: wrote %s (key %s): %s", name, zoo_folder(family_packages(measuring=True)["clip"]) / entry["file"], key,
             info.get("summary"))
    return entry


# ------------------------------------------------------------------------------------ one atomic step
def publish(folder: Path, name: str, weights: Path, entry: dict[str, Any],
            training_log: Path | None = None) -> dict[str, Any]:
    """Ship the file ``weights`` as the zoo model ``name``, described by ``entry``, in one atomic step: a loader reads
    the old manifest and the old file, or the new manifest and the new file, never a manifest that names other bytes.

    (1) the weights take a new name of their own content, ``<name>.<sha256[:12]>.safetensors``, beside the file the
        manifest names now, which stays as it is (and so does ``training_log``'s copy, ``<name>.<sha>.metrics.jsonl``);
    (2) the manifest that names them replaces the old one (:func:`write_manifest`: written beside it, renamed over
        it): the commit;
    (3) the files of ``name`` the manifest no longer names go: the old ones, and any that a killed build left.

    Returns ``entry`` with ``file``, ``bytes``, ``sha256`` (and ``training_log``) filled in."""
    digest = sha256_of(weights)
    path = folder / f"{name}.{digest[:12]}.safetensors"
    entry = {**entry, "file": path.name, "bytes": weights.stat().st_size, "sha256": digest}
    if training_log is not None:
        log_file = path.with_name(f"{name}.{digest[:12]}.metrics.jsonl")
        tmp = log_file.with_name(f".{log_file.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(training_log.read_bytes())
            tmp.chmod(0o644)  # package data: readable by everyone who installs it
            os.replace(tmp, log_file)
        finally:
            tmp.unlink(missing_ok=True)
        entry["training_log"] = log_file.name
    os.replace(weights, path)  # a name no manifest names yet (or the same bytes under the same name)
    manifest = read_manifest(folder)
    manifest[name] = entry
    write_manifest(folder, manifest)  # the commit point
    named = {str(info.get(key)) for info in manifest.values() for key in ("file", "training_log")}
    own = re.compile(rf"^\.?{re.escape(name)}(\.[0-9a-f]{{12}})?\.(safetensors|metrics\.jsonl|candidate\.safetensors)$")
    for stale in folder.iterdir():
        if own.match(stale.name) and stale.name not in named:
            stale.unlink(missing_ok=True)
    return entry


def write_manifest(folder: Path, models: dict[str, dict[str, Any]]) -> None:
    """Replace ``folder``'s manifest atomically (a temporary file renamed over it: readers see the old or the new)."""
    from lab_utils.commands.evaluation.evaluate import write_json

    write_json({"about": "genlab's pretrained models of this family; `genlab pretrained` lists them, "
                         "`make pretrained` rebuilds them (lab_utils/commands/pretrained.py)", "models": models},
               folder / MANIFEST)
    (folder / MANIFEST).chmod(0o644)  # package data: readable by everyone who installs it


def pretrained_command_main(cfg: DictConfig) -> None:
    options = typed_section(cfg, ZooConfig, "pretrained")
    if options.action == "list":
        print(listing())
        return
    version = code_version()  # before this command writes anything into the source tree
    models = [m for m in options.models if m not in ("evaluator", "clip")]
    if "evaluator" in options.models or (options.evaluator and evaluator_missing(options)):
        entry = export_evaluator(options, version)  # first: the models' figures are read with it
        print(f"evaluator-{options.dataset}: test accuracy (every attribute) {entry['test_accuracy']['all']:.3f}")
    if "clip" in options.models:
        entry = export_clip(options, version)
        real = entry["prompt_match_real"]["real_held_out"]
        print(f"clip ({options.dataset}): zero-shot (every attribute) {entry['figures']['zero_shot']['all']:.3f}; real "
              f"test images: CLIP score {real['clip_score']:.3f}, R-precision {real['r_precision']:.3f} among "
              f"{entry['prompt_match_real']['distractors']} + 1")
    for model in models:
        if options.action == "build":
            run_dir = train_run(options, model)
        else:
            run_dir = Path(options.runs) / model
            resolve_checkpoint(run_dir)  # a clear error if it was never trained
        entry = export(options, model, run_dir, version)
        figures = entry["eval"]
        print(f"{model}: {entry['file']} ({entry['bytes'] / 2**20:.1f} MiB {entry['dtype']}), all four seen "
              f"{figures['alignment_seen']:.2f}, held out {figures['alignment_held_out']:.2f}, FID {figures['fid']:.2f}")
    print(listing())

