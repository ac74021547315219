"""The ``genlab`` command. Each subcommand is a Hydra app over the configs in ``conf/``.

    genlab train  model=ddpm data=shapes preset=cpu [key=value ...]
    genlab sample run=<run dir or checkpoint> prompt="a red circle" n=16 seed=0 out=grid.png
    genlab data   data=shapes n=64 out=grid.png
    genlab eval   run=<run dir> eval.num_samples=1000
    genlab compare data=shapes preset=cpu models=[dcgan,vae,ddpm]
    genlab bench  model=ddpm data=shapes preset=cpu [trainer.device=cuda]
    genlab pretrained [action=build]
    genlab serve  [host=127.0.0.1] [port=8000] [models=[dcgan,vae,ddpm,ldm]] [runs=<folder>]
    genlab notebooks  [--out notebooks/student]
    genlab grade  <student notebook or folder> [--out grades]

Several processes: ``torchrun --nproc_per_node=N -m genlab train ...`` (see lab_utils.harness.distributed).

This module is the dispatch and what every command shares: the one-line report of a bad input (exit status 1),
the checks of ``key=value`` overrides before Hydra runs, and the optional extras. Each command is written in a
module of its own (``train``: ``lab_utils.harness.run``; the others in ``lab_utils.commands``: ``sample``, ``data``,
``evaluation``, ``compare``, ``bench``, ``pretrained``, ``serve``, ``notebooks``, ``grading``); torch and whatever
needs it are imported only once a command runs, so a bad input is refused in a fraction of a second.

``genlab <subcommand> --help`` lists the config groups and their choices; ``--cfg job`` prints
the composed config without running.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from lab_utils.commands.arguments import UserError, eval_option_overrides
from lab_utils.commands.data import data_command_main
from lab_utils.commands.sample import option_overrides, sample_command_main
from lab_utils.core.config import CONFIG_MODULE, model_family, parse_overrides, register_model_schema, validate
from lab_utils.core.schema import ConfigError

log = logging.getLogger("genlab")

USAGE = """usage: genlab <command> [key=value ...]

commands:
  train      train a model family:     genlab train model=ddpm data=shapes preset=cpu
  sample     images from a checkpoint: genlab sample run=runs/shapes/ddpm/<date> prompt="a red circle" n=16
  data       look at a dataset:        genlab data data=shapes n=64 out=grid.png
  eval       metrics of a run:         genlab eval run=runs/shapes/ddpm/<date> eval.num_samples=1000
  compare    every family, same budget: genlab compare data=shapes preset=cpu models=[dcgan,vae,ddpm]
  bench      speed and speed switches: genlab bench model=ddpm data=shapes preset=cpu
  pretrained the shipped models:       genlab pretrained   (then genlab sample pretrained=ddpm prompt=...)
  serve      a web page and JSON API:  genlab serve [port=8000] [models=[dcgan,ddpm]]
  notebooks  write the student versions of the notebooks (solutions removed)
  grade      run students' notebooks, score each exercise: genlab grade submissions/ --out grades

`genlab <command> --help` lists the config groups and options; `--cfg job` prints the config.
Several processes or GPUs: torchrun --nproc_per_node=N -m genlab train ...
"""

def _user_errors() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import MissingMandatoryValue

    from lab_utils.harness.checkpoint import CheckpointError
    from lab_utils.harness.trainer import CheckpointWriteError, TrainingDiverged

    return (UserError, ConfigError, CheckpointError, CheckpointWriteError, TrainingDiverged, MissingMandatoryValue,
            OSError, ValueError)


# What to pass for a mandatory value a command was run without.
MANDATORY_HINTS = {"run": "run=<a run folder, or a checkpoint file in its checkpoints/>"}


def error_message(err: BaseException) -> str:
    """One line that says what was wrong and how to fix it."""
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
        return f"`{key}` is required: pass {MANDATORY_HINTS.get(str(key), f'{key}=<value>')}"
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.strerror:
        where = f" ({err.filename})" if err.filename else ""
        hint = {errno.ENOSPC: "free some space and run the command again",
                errno.EROFS: "the folder is on a read-only file system: choose a writable folder",
                errno.EACCES: "choose a folder you may write to, or fix its permissions"}.get(err.errno, "")
        return f"{err.strerror}{where}" + (f"; {hint}" if hint else "")
    text = " ".join(str(err).split())  # one line, whatever the message's layout
    return text or type(err).__name__


def _report(fn: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Turn expected errors into a one-line message and exit status 1 (HYDRA_FULL_ERROR=1 shows tracebacks)."""

    def wrapped(cfg: DictConfig) -> None:
        try:
            _refuse_unknown_settings(cfg)
            fn(cfg)
        except _user_errors() as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"genlab: error: {error_message(err)}", file=sys.stderr)
            raise SystemExit(1) from None

    wrapped.__name__ = fn.__name__
    return wrapped


def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def _refuse_unknown_settings(cfg: DictConfig) -> None:
    """``+name=value`` for a top-level name the command does not have would be silently ignored: refuse it.
    (Nested additions, such as ``+eval.sample_options.k=v``, go to a section whose schema checks them.)"""
    added = [o.key_or_group for o in parse_overrides(_command_line_overrides()) if o.is_add()]
    unknown = [key for key in added if "." not in key and key != "hydra"]
    if unknown:
        known = [key for key in cfg if key not in unknown]
        raise UserError(f"unknown setting(s) {', '.join(unknown)} for this command; its settings are "
                        f"{', '.join(known)} (set one as key=value, without +)")


# ------------------------------------------------------------------------------------ train
@_report
def train_command(cfg: DictConfig) -> None:
    from lab_utils.harness.distributed import env_info
    from lab_utils.harness.run import train
    from lab_utils.harness.run_folder import resume_point

    resume = None
    if cfg.get("resume"):
        cfg, resume = resume_point(cfg.resume, _command_line_overrides())  # the checkpoint, read once
    result = train(validate(cfg), resume=resume)
    if not env_info().is_main:
        return  # under torchrun, rank 0 reports
    print(f"run: {result.run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"trained {result.step} steps, {result.images_seen} images in {result.train_seconds:.1f} s "
          f"({result.images_per_second:.1f} images/s)")


# ------------------------------------------------------------------------------------ sample, data
@_report
def sample_command(cfg: DictConfig) -> None:
    sample_command_main(cfg)


@_report
def data_command(cfg: DictConfig) -> None:
    data_command_main(cfg)


# ------------------------------------------------------------------------------------ eval
@_report
def eval_command(cfg: DictConfig) -> None:
    from lab_utils.commands.evaluation import eval_command_main

    eval_command_main(cfg)


# ------------------------------------------------------------------------------------ compare
@_report
def compare_command(cfg: DictConfig) -> None:
    from lab_utils.commands.compare import compare

    compare(cfg)


# ------------------------------------------------------------------------------------ bench
@_report
def bench_command(cfg: DictConfig) -> None:
    from lab_utils.commands.bench import bench_command_main

    bench_command_main(cfg)


# ------------------------------------------------------------------------------------ pretrained, serve
@_report
def pretrained_command(cfg: DictConfig) -> None:
    from lab_utils.commands.pretrained import pretrained_command_main

    pretrained_command_main(cfg)


@_report
def serve_command(cfg: DictConfig) -> None:
    from lab_utils.commands.serve import serve_command_main

    serve_command_main(cfg)


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
    "pretrained": ("pretrained", pretrained_command),
    "serve": ("serve", serve_command),
}


def notebooks_command(args: list[str]) -> int:
    import argparse

    from lab_utils.commands.notebooks import make_release, make_student_versions, write_outputs

    parser = argparse.ArgumentParser(prog="genlab notebooks", description="write the student versions of the "
                                     "notebooks (and a release folder), or store the solutions' outputs")
    parser.add_argument("--src", default="notebooks", help="folder of solution notebooks (default: notebooks)")
    parser.add_argument("--out", default="notebooks/student", help="output folder (default: notebooks/student)")
    parser.add_argument("--release", default=None, help="also write a folder to hand out (student notebooks and "
                                                         "START_HERE.md, no solutions), e.g. build/release")
    parser.add_argument("--outputs", action="store_true", help="instead, run every solution notebook in full and "
                                                               "store its outputs in the file (minutes each)")
    options = parser.parse_args(args)
    if not Path(options.src).is_dir():
        print(f"genlab: error: no notebook folder {options.src!r}; run this from the repository root or pass --src",
              file=sys.stderr)
        return 1
    if options.outputs:
        failed = 0
        for path, seconds, error in write_outputs(sorted(Path(options.src).glob("*.ipynb"))):
            if error:
                failed += 1
                print(f"{path}: failed after {seconds / 60:.1f} min, left as it was: {error}")
            else:
                print(f"{path}: ran in {seconds / 60:.1f} min (2 cores: ~{seconds:.0f} s), outputs stored", flush=True)
        return 1 if failed else 0
    for path in make_student_versions(options.src, options.out):
        print(f"wrote {path}")
    if options.release:
        make_release(options.src, options.release)
        print(f"wrote {options.release}/ (student notebooks and START_HERE.md; hand it out as it is)")
    return 0


# The commands that need an optional extra of the package, and the modules (import names) that show the extra is
# installed: checked before the command's module is imported, so a missing extra is one line, not a traceback.
# (tests/test_packaging.py checks each module against the extra's list in pyproject.toml.)
EXTRA_MODULES = {"instructor": ("nbformat", "nbclient", "IPython", "ipykernel")}
COMMAND_EXTRAS = {"notebooks": "instructor", "grade": "instructor"}


def missing_extra(command: str) -> str | None:
    """One line naming the extra ``genlab <command>`` needs when one of its modules is not installed (None: all are,
    or the command needs none)."""
    extra = COMMAND_EXTRAS.get(command)
    if extra is None:
        return None
    missing = [name for name in EXTRA_MODULES[extra] if not _installed(name)]
    if not missing:
        return None
    return (f"`genlab {command}` needs the {extra} extra ({', '.join(missing)} not installed): "
            f"pip install \"genlab[{extra}]\" (in a clone of the repository: pip install -e \".[{extra}]\")")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # already imported, without a spec (as __main__ is): it is there
        return True


def composition_error(err: BaseException, command: str) -> str:
    """One line for a config Hydra could not compose (an unknown group choice, key or value)."""
    from hydra.errors import MissingConfigException

    text = str(err)
    found = re.search(r"Could not find '([\w/]+)/([^']*)'", text)
    if isinstance(err, MissingConfigException) and found and err.options:
        return f"unknown {found.group(1)}={found.group(2)}; choose one of {', '.join(err.options)}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("To append",
                                                                                                 "See https"))]
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return " ".join(lines) + f" (`genlab {command} --cfg job` prints every setting)"


def precheck(config_name: str, command: str, args: list[str]) -> str | None:
    """Compose the config once before Hydra's app runs: a bad override becomes one line (None: it composes).
    Hydra's own report would print its config search path, or advise a ``+`` that only moves the error."""
    from hydra import compose, initialize_config_module

    overrides = [arg for arg in args if not arg.startswith("hydra.")]
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except Exception as err:  # noqa: BLE001 (every composition failure is the user's input)
        return composition_error(err, command)
    return None


# Where each command writes: `out` for all of them (a folder, or for sample and data an image file).
# Hydra's own output folder (``hydra.run.dir``) is not used by any of them.
OUTPUT_KEYS = {"train": "out=<folder>", "compare": "out=<folder>", "bench": "out=<folder>",
               "sample": "out=<file.png or folder>", "data": "out=<file.png>",
               "eval": "out=<file.json> (default: eval.json in the run folder)",
               "pretrained": "models=[...] (it writes labs/<family>/pretrained/ and trains into runs=<folder>)",
               "serve": "nothing (it writes no files)"}
HYDRA_OUTPUT_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.output_subdir")
RENAMED_KEYS = ("run_dir", "out_dir")  # the output keys of train and compare/bench before they became `out`


def output_key_problem(command: str, args: list[str]) -> str | None:
    """``hydra.run.dir=X`` would be silently ignored, and ``run_dir=``/``out_dir=`` are the old names of
    ``out=``: name the key that is used."""
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in HYDRA_OUTPUT_KEYS:
            return (f"`{key}` is not used by genlab {command} (it writes no Hydra output folder); "
                    f"to choose where it writes, pass {OUTPUT_KEYS[command]}")
        if key in RENAMED_KEYS:
            return f"`{key}` is now called `out`: pass {OUTPUT_KEYS[command]}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    problem = missing_extra(command)
    if problem is not None:
        print(f"genlab: error: {problem}", file=sys.stderr)
        return 1
    if command == "notebooks":
        return notebooks_command(rest)
    if command == "grade":
        from lab_utils.commands.grading import grade_command

        return grade_command(rest)
    if command not in COMMANDS:
        print(f"genlab: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    config_name, task = COMMANDS[command]
    problem = output_key_problem(command, rest)
    if problem is not None:
        print(f"genlab: error: {problem}", file=sys.stderr)
        return 1
    if command == "sample":
        rest = option_overrides(rest)  # steps=10: a family's sampling option, which conf/sample.yaml does not list
    if command == "eval":
        rest = eval_option_overrides(rest)  # eval.sample_options.steps=50: the same, for the loaded model to check
    # conf/model/<family>.yaml extends the family's schema (its Config dataclass): store the one composed
    register_model_schema(model_family(config_name, [arg for arg in rest if not arg.startswith("-")]))
    if not any(arg.startswith("-") for arg in rest):  # --help, --cfg job, -m: Hydra's own flags
        problem = precheck(config_name, command, rest)
        if problem is not None:
            print(f"genlab: error: {problem}", file=sys.stderr)
            return 1
    sys.argv = [f"genlab {command}", *rest]  # Hydra parses sys.argv
    _hydra_app(config_name, task)()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
