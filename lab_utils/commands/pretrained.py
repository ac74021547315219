"""``genlab pretrained``: list the model zoo, or rebuild it (``make pretrained``).

    genlab pretrained                                  # the shipped models and their figures
    genlab pretrained action=build                     # train every family with its cpu preset, then export
    genlab pretrained action=export models=[ddpm]      # export runs already trained under runs/pretrained/

Building a model is exactly ``genlab train model=<family> data=<dataset> preset=<preset> seed=<seed>`` into
``<runs>/<family>`` (a finished run there is reused), then an export: the run's EMA weights go into
``labs/<family>/pretrained/<family>.safetensors`` (``lab_utils.harness.zoo``), stored in float16 when that
changes no ``genlab eval`` figure measurably (the evaluation is run on both and the differences recorded), and
the manifest entry is rewritten with the command, the run's key (``lab_utils.harness.cached_run.run_key``: its
settings and its labs' source), the sha256 and the figures of the file as shipped.
"""

from __future__ import annotations

import logging
import shutil
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
from lab_utils.harness.zoo import (MANIFEST, entries, family_packages, load_file_lab, read_manifest,
                                   save_pretrained, sha256_of, zoo_folder)

log = logging.getLogger("genlab")

# float16 is kept only if it moves no figure more than this (same seed, same prompts: only rounding differs)
FP16_TOLERANCE = {"alignment": 0.01, "fid": 0.05}


@dataclass
class ZooConfig:
    """``conf/pretrained.yaml``."""

    action: str = "list"  # list | build | export
    models: list[str] = field(default_factory=lambda: ["dcgan", "vae", "ddpm", "ldm", "flow"])
    dataset: str = "shapes"
    preset: str = "cpu"
    seed: int = 0
    runs: str = "runs/pretrained"  # build trains into <runs>/<model>; export reads it
    eval_samples: int = 500
    dtype: str = "auto"  # auto (float16 if it changes no figure) | float16 | float32
    evaluator: bool = True  # ship the dataset's evaluator too (genlab eval needs no training on a new machine)

    def __post_init__(self) -> None:
        if self.action not in ("list", "build", "export"):
            raise ValueError(f"action must be list, build or export, got {self.action!r}")
        unknown = [m for m in self.models if m not in family_packages()]
        if unknown:
            raise ValueError(f"models {unknown} are not families of genlab; choose from {sorted(family_packages())}")
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
        if entry.family == "evaluator":
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
            lines.append(f"\n{entry.name}: the evaluator `genlab eval` measures with (test accuracy, all four "
                         f"attributes right: {_fmt(accuracy)}; key {entry.info.get('key')})")
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
    from lab_utils.harness.run_folder import run_finished

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


def export(options: ZooConfig, model: str, run_dir: Path) -> dict[str, Any]:
    """Write ``run_dir``'s sampling weights into the zoo and its manifest entry; returns the entry."""
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
    path = folder / f"{model}.safetensors"
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
    scratch.replace(path)
    log_file = folder / f"{model}.metrics.jsonl"  # the training curves, for the notebooks that load the model
    shutil.copyfile(Path(run_dir) / "metrics.jsonl", log_file)
    log_file.chmod(0o644)
    entry = {
        "family": model, "dataset": loaded.cfg.data.name, "file": path.name,
        "command": train_command(options, model), "steps": step,
        "key": run_key(validate(loaded.cfg)),  # its settings and its labs' source, as the caches key a run
        "built": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "parameters": sum(p.numel() for p in loaded.lab.parameters()),
        "dtype": str(chosen).replace("torch.", ""), "bytes": path.stat().st_size, "sha256": sha256_of(path),
        "training_log": log_file.name,
        "eval": figures, "eval_fp32_weights": {k: reference[k] for k in ("fid", "alignment_all")},
        "fp16_minus_fp32": fp16_check, "fp16_tolerance": FP16_TOLERANCE,
    }
    manifest = read_manifest(folder)
    manifest[model] = entry
    write_manifest(folder, manifest)
    log.info("%s: wrote %s (%.1f MiB, %s)", model, path, entry["bytes"] / 2**20, entry["dtype"])
    return entry


def export_evaluator(options: ZooConfig) -> dict[str, Any]:
    """Ship the dataset's evaluator (the one ``genlab eval`` uses by default: ``evaluator_preset=cpu``), float32
    (it is the measuring instrument: every figure reads its features), so a fresh machine measures at once."""
    import json

    from lab_utils.commands.evaluation.cache import evaluator_config, train_evaluator

    cfg = evaluator_config({"name": options.dataset}, preset=options.preset)
    key = run_key(cfg)
    source = cache_folder("evaluators") / f"{cfg.data.name}-{key}"
    if not (source / "evaluator.json").is_file():
        train_evaluator(cfg, source, key)
    info = json.loads((source / "evaluator.json").read_text())
    loaded = load_lab(source, ema=True, expect_model="evaluator")
    name = f"evaluator-{options.dataset}"
    folder = zoo_folder(family_packages(evaluator=True)["evaluator"])
    path = save_pretrained(loaded.lab, OmegaConf.to_container(loaded.cfg, resolve=True), loaded.state["trainer"],
                           folder / f"{name}.safetensors")
    entry = {"family": "evaluator", "dataset": options.dataset, "file": path.name, "key": key,
             "command": ["model=evaluator", f"data={options.dataset}", f"preset={options.preset}", "data.held_out=[]"],
             "steps": int(loaded.state["trainer"]["step"]),
             "built": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
             "parameters": sum(p.numel() for p in loaded.lab.parameters()), "dtype": "float32",
             "bytes": path.stat().st_size, "sha256": sha256_of(path), "test_accuracy": info["test_accuracy"],
             "test_images": info.get("test_images")}
    manifest = read_manifest(folder)
    manifest[name] = entry
    write_manifest(folder, manifest)
    log.info("%s: wrote %s (key %s, test accuracy %.3f)", name, path, key, info["test_accuracy"]["all"])
    return entry


def write_manifest(folder: Path, models: dict[str, dict[str, Any]]) -> None:
    from lab_utils.commands.evaluation.evaluate import write_json

    write_json({"about": "genlab's pretrained models of this family; `genlab pretrained` lists them, "
                         "`make pretrained` rebuilds them (lab_utils/commands/pretrained.py)", "models": models},
               folder / MANIFEST)


def pretrained_command_main(cfg: DictConfig) -> None:
    options = typed_section(cfg, ZooConfig, "pretrained")
    if options.action == "list":
        print(listing())
        return
    if options.evaluator:
        entry = export_evaluator(options)
        print(f"evaluator-{options.dataset}: test accuracy (all four) {entry['test_accuracy']['all']:.3f}")
    for model in options.models:
        if options.action == "build":
            run_dir = train_run(options, model)
        else:
            run_dir = Path(options.runs) / model
            resolve_checkpoint(run_dir)  # a clear error if it was never trained
        entry = export(options, model, run_dir)
        figures = entry["eval"]
        print(f"{model}: {entry['file']} ({entry['bytes'] / 2**20:.1f} MiB {entry['dtype']}), all four seen "
              f"{figures['alignment_seen']:.2f}, held out {figures['alignment_held_out']:.2f}, FID {figures['fid']:.2f}")
    print(listing())

