"""The ``genlab`` command. Each subcommand is a Hydra app over the configs in ``conf/``.

    genlab train  model=ddpm data=shapes preset=cpu [key=value ...]
    genlab sample run=<run dir or checkpoint> prompt="a red circle" n=16 seed=0 out=grid.png
    genlab data   data=shapes n=64 out=grid.png
    genlab eval   run=<run dir> eval.num_samples=1000
    genlab compare data=shapes preset=cpu models=[dcgan,vae,ddpm]
    genlab bench  model=ddpm data=shapes preset=cpu [trainer.device=cuda]
    genlab notebooks  [--out notebooks/student]

Several processes: ``torchrun --nproc_per_node=N -m genlab train ...`` (see lab_utils.distributed).

``genlab <subcommand> --help`` lists the config groups and their choices; ``--cfg job`` prints
the composed config without running.
"""

from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path
from typing import Callable

import yaml
from omegaconf import DictConfig, OmegaConf

from lab_utils.config import CONFIG_MODULE, ConfigError, validate

log = logging.getLogger("genlab")

USAGE = """usage: genlab <command> [key=value ...]

commands:
  train      train a model family:     genlab train model=ddpm data=shapes preset=cpu
  sample     images from a checkpoint: genlab sample run=runs/shapes/ddpm/<date> prompt="a red circle" n=16
  data       look at a dataset:        genlab data data=shapes n=64 out=grid.png
  eval       metrics of a run:         genlab eval run=runs/shapes/ddpm/<date> eval.num_samples=1000
  compare    every family, same budget: genlab compare data=shapes preset=cpu models=[dcgan,vae,ddpm]
  bench      speed and speed switches: genlab bench model=ddpm data=shapes preset=cpu
  notebooks  write the student versions of the notebooks (solutions removed)

`genlab <command> --help` lists the config groups and options; `--cfg job` prints the config.
Several processes or GPUs: torchrun --nproc_per_node=N -m genlab train ...
"""

GROUP_KEYS = ("model", "data", "preset")  # group choices a resumed run cannot change


class UserError(Exception):
    """An error caused by the user's input, reported as one clear message (no traceback)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from lab_utils.checkpoint import CheckpointError
    from lab_utils.trainer import TrainingDiverged

    return (UserError, ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError, FileExistsError,
            ValueError)


def _report(fn: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Turn expected errors into a one-line message and exit status 1 (HYDRA_FULL_ERROR=1 shows tracebacks)."""

    def wrapped(cfg: DictConfig) -> None:
        import os

        try:
            fn(cfg)
        except _user_errors() as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"genlab: error: {err}", file=sys.stderr)
            raise SystemExit(1) from None

    wrapped.__name__ = fn.__name__
    return wrapped


# ------------------------------------------------------------------------------------ train
def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def resume_config(run: str, overrides: list[str], composed: DictConfig) -> DictConfig:
    """The saved config of the run at ``run`` with the command line's ``key=value`` overrides applied."""
    from lab_utils.checkpoint import load_checkpoint

    saved = OmegaConf.create(load_checkpoint(run)["config"])
    for item in overrides:
        key, _, value = item.lstrip("+").partition("=")
        if key == "resume":
            continue
        if key in GROUP_KEYS:
            was = saved.get("preset_name") if key == "preset" else saved[key].get("name")
            if value != was:
                raise UserError(f"the run at {run} was trained with {key}={was}; it cannot resume as {key}={value}")
            continue
        OmegaConf.update(saved, key, yaml.safe_load(value) if value else None, force_add=False)
    saved.resume = str(run)
    return saved


@_report
def train_command(cfg: DictConfig) -> None:
    from lab_utils.distributed import env_info
    from lab_utils.trainer import train

    if cfg.get("resume"):
        cfg = resume_config(cfg.resume, _command_line_overrides(), cfg)
    cfg = validate(cfg)
    result = train(cfg, resume=cfg.get("resume"))
    if not env_info().is_main:
        return  # under torchrun, rank 0 reports
    print(f"run: {result.run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"trained {result.step} steps, {result.images_seen} images in {result.train_seconds:.1f} s "
          f"({result.images_per_second:.1f} images/s)")


# ------------------------------------------------------------------------------------ sample
SAMPLE_OPTIONS = ("sampler", "steps", "guidance", "eta")


@_report
def sample_command(cfg: DictConfig) -> None:
    import torch

    from lab_utils.checkpoint import load_lab
    from lab_utils.plotting import save_grid
    from lab_utils.trainer import pick_device

    if cfg.n <= 0:
        raise UserError(f"n must be positive, got {cfg.n}")
    device = pick_device(cfg.device)
    loaded = load_lab(cfg.run, device=device, ema=cfg.ema)
    lab = loaded.lab
    options = {key: cfg[key] for key in SAMPLE_OPTIONS if cfg.get(key) is not None}
    method = {"sample": "sample", "reconstruct": "reconstruct", "interpolate": "interpolate"}.get(cfg.mode)
    if method is None or not hasattr(lab, method):
        modes = [m for m in ("sample", "reconstruct", "interpolate") if hasattr(lab, m)]
        raise UserError(f"mode={cfg.mode} is not available for model {loaded.cfg.model.name}; choose one of {modes}")
    fn = getattr(lab, method)
    accepted = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        unknown = [key for key in options if key not in accepted]
        if unknown:
            raise UserError(f"model {loaded.cfg.model.name} does not take option(s) {unknown}; "
                            f"it takes {[k for k in accepted if k not in ('prompts', 'generator')]}")
    title = f"{loaded.cfg.model.name} step {loaded.state['trainer']['step']}"
    if method == "reconstruct":
        images, captions = _reconstructions(loaded, fn, cfg.n, cfg.seed, device)
        path = save_grid(images, cfg.out, captions=captions, ncols=min(8, cfg.n), title=f"{title}: reconstructions")
        print(f"wrote {path} ({cfg.n} test images, each above its reconstruction)")
        return
    prompts = [str(cfg.prompt)] * cfg.n
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with torch.no_grad():
        images = fn(prompts, generator=generator, **options)
    shown = ", ".join(f"{k}={v}" for k, v in options.items())
    path = save_grid(images, cfg.out, captions=prompts if cfg.n <= 64 else None, ncols=min(8, cfg.n),
                     title=title + (f" ({shown})" if shown else "") + (f": {method}" if method != "sample" else ""))
    print(f"wrote {path} ({cfg.n} images for {cfg.prompt!r}, seed {cfg.seed})")


def _reconstructions(loaded, reconstruct, n: int, seed: int, device) -> tuple["torch.Tensor", list[str]]:
    """``n`` seeded test images of the run's dataset and their reconstructions, in alternating rows of 8."""
    import torch

    from lab_utils.data import build_dataset

    dataset = build_dataset(loaded.cfg.data, "test")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    items = [dataset[int(i)] for i in order]
    originals = torch.stack([item["image"] for item in items]).to(device)
    captions = [item["caption"] for item in items]
    with torch.no_grad():
        recons = reconstruct(originals, captions).to(device)
    images, labels = [], []
    for start in range(0, len(items), 8):  # a row of originals, then the row of their reconstructions
        stop = start + 8
        images += [originals[start:stop], recons[start:stop]]
        labels += captions[start:stop] + ["reconstruction"] * len(recons[start:stop])
    return torch.cat(images), labels


# ------------------------------------------------------------------------------------ data
@_report
def data_command(cfg: DictConfig) -> None:
    import torch

    from lab_utils.data import build_dataset
    from lab_utils.plotting import save_grid

    cfg = validate(cfg)
    dataset = build_dataset(cfg.data, cfg.split)
    info = dataset.data_info()
    n = min(cfg.n, len(dataset))
    if n <= 0:
        raise UserError(f"n must be positive, got {cfg.n}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))[:n]
    items = [dataset[int(i)] for i in order]
    images = torch.stack([item["image"] for item in items])
    captions = [item["caption"] for item in items]
    path = save_grid(images, cfg.out, captions=captions, ncols=8, title=f"{cfg.data.name} ({cfg.split})")
    print(f"dataset: {cfg.data.name} ({cfg.split} split): {len(dataset)} images of {info.channels}x"
          f"{info.image_size}x{info.image_size}")
    for attribute, values in info.attributes.items():
        print(f"  {attribute} ({len(values)}): {', '.join(values)}")
    print(f"caption vocabulary: {len(info.vocab)} tokens (incl. special tokens)")
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------ eval
@_report
def eval_command(cfg: DictConfig) -> None:
    from lab_utils.evaluation import eval_command_main

    eval_command_main(cfg)


# ------------------------------------------------------------------------------------ compare
@_report
def compare_command(cfg: DictConfig) -> None:
    from lab_utils.compare import compare

    compare(cfg)


# ------------------------------------------------------------------------------------ bench
@_report
def bench_command(cfg: DictConfig) -> None:
    from lab_utils.bench import bench_command_main

    bench_command_main(cfg)


# ------------------------------------------------------------------------------------ entry
def _hydra_app(config_name: str, task: Callable[[DictConfig], None]) -> Callable[[], None]:
    import hydra

    return hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=config_name, version_base="1.3")(task)


COMMANDS = {
    "train": ("train", train_command),
    "sample": ("sample", sample_command),
    "data": ("dataview", data_command),
    "eval": ("eval", eval_command),
    "compare": ("compare", compare_command),
    "bench": ("bench", bench_command),
}


def notebooks_command(args: list[str]) -> int:
    import argparse

    from lab_utils.notebooks import make_student_versions

    parser = argparse.ArgumentParser(prog="genlab notebooks", description="write the student versions of the notebooks")
    parser.add_argument("--src", default="notebooks", help="folder of solution notebooks (default: notebooks)")
    parser.add_argument("--out", default="notebooks/student", help="output folder (default: notebooks/student)")
    options = parser.parse_args(args)
    if not Path(options.src).is_dir():
        print(f"genlab: error: no notebook folder {options.src!r}; run this from the repository root or pass --src",
              file=sys.stderr)
        return 1
    for path in make_student_versions(options.src, options.out):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "notebooks":
        return notebooks_command(rest)
    if command not in COMMANDS:
        print(f"genlab: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    config_name, task = COMMANDS[command]
    sys.argv = [f"genlab {command}", *rest]  # Hydra parses sys.argv
    _hydra_app(config_name, task)()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
