"""The ``genlab`` command. Each subcommand is a Hydra app over the configs in ``conf/``.

    genlab train  model=ddpm data=shapes preset=cpu [key=value ...]
    genlab sample run=<run dir or checkpoint> prompt="a red circle" n=16 seed=0 out=grid.png
    genlab data   data=shapes n=64 out=grid.png
    genlab eval   run=<run dir> eval.num_samples=1000
    genlab compare data=shapes preset=cpu models=[dcgan,vae,ddpm]
    genlab bench  model=ddpm data=shapes preset=cpu [trainer.device=cuda]
    genlab pretrained [action=build]
    genlab serve  [host=127.0.0.1] [port=8000] [models=[dcgan,vae,ddpm,ldm]] [runs=<folder>]
    genlab notebooks  [out=notebooks/student]
    genlab grade  <student notebook or folder> [out=grades]

Several processes: ``torchrun --nproc_per_node=N -m genlab train ...`` (see lab_utils.harness.distributed).

This module is the dispatch and what every command shares: the one-line report of a bad input (exit status 1),
the checks of ``key=value`` overrides before Hydra runs, and the optional extras. Each command is written in a
module of its own (``train``: ``lab_utils.harness.run``; the others in ``lab_utils.commands``: ``sample``, ``data``,
``evaluation``, ``compare``, ``bench``, ``pretrained``, ``serve``, ``notebooks``, ``grading``); torch and whatever
needs it are imported only once a command runs, so a bad input is refused in a fraction of a second.

``genlab <subcommand> --help`` is the command's own page (``lab_utils.commands.usage``: its settings with their
defaults, its groups' choices, an example); ``--cfg job`` prints the composed config without running; ``-m`` runs a
sweep whose jobs each write their own output (:func:`job_output`); ``genlab --version``; ``genlab
--shell-completion install=bash`` prints the bash completion script (:func:`shell_completion`)."""

from __future__ import annotations

import datetime
import errno
import importlib.util
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from lab_utils.commands.arguments import (UserError, eval_option_overrides, free_text_overrides,
                                          key_value_arguments)
from lab_utils.commands.data import data_command_main
from lab_utils.commands.sample import option_overrides, sample_command_main
from lab_utils.commands.usage import help_page, version_line
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
  grade      run students' notebooks, score each exercise: genlab grade submissions/ out=grades

`genlab <command> --help`: its settings, defaults and an example; `--cfg job` prints the config;
`genlab <command> -m a=1,2`: a sweep; `genlab --version`; `genlab --shell-completion install=bash`.
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


def _report(command: str) -> Callable[[Callable[[DictConfig], None]], Callable[[DictConfig], None]]:
    """Turn expected errors of ``genlab <command>`` into a one-line message and exit status 1 (HYDRA_FULL_ERROR=1
    shows tracebacks). In a ``-m`` sweep, each job writes its own output (:func:`job_output`) and a job's error is
    its line, naming the job, and the sweep goes on (the command exits 1 at its end)."""

    def decorate(fn: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
        def wrapped(cfg: DictConfig) -> None:
            job = _sweep_job()
            try:
                _refuse_unknown_settings(cfg)
                if job is not None:
                    job_output(cfg, command, job[0])
                fn(cfg)
            except _user_errors() as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                if job is None:
                    print(f"genlab: error: {error_message(err)}", file=sys.stderr)
                    raise SystemExit(1) from None
                print(f"genlab: error: job #{job[0]} ({job[1]}): {error_message(err)}", file=sys.stderr, flush=True)
                FAILED_JOBS.append(job[0])

        wrapped.__name__ = fn.__name__
        return wrapped

    return decorate


# ------------------------------------------------------------------------------------ -m sweeps
FAILED_JOBS: list[int] = []  # the jobs of this process's sweep that ended in a user error
SWEEP_STARTED = datetime.datetime.now()  # ${now:...} in a sweep's out= is this time for every job
SWEEP_REFUSED = {"serve": "it starts one server, which serves every model at once (models=[...])",
                 "pretrained": "it writes the one shipped zoo (models=[...] builds several)"}
# Commands whose out= is a file (the others: a folder), and the file a folder given as out= receives.
FILE_OUTPUTS = {"sample": "samples.png", "data": "data_grid.png", "eval": "eval.json"}


def _sweep_job() -> tuple[int, str] | None:
    """(number, overrides) of this job in a ``-m`` sweep; None outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return int(hydra_cfg.job.num), " ".join(hydra_cfg.overrides.task)


def job_output(cfg: DictConfig, command: str, num: int) -> None:
    """Give job ``num`` of a sweep its own ``out``: a folder gets the job's number as a subfolder
    (``runs/sweep/0``, ``runs/sweep/1``, as Hydra's ``multirun/<date>/<num>``), a file the number before its suffix
    (``grid-0.png``; eval without out=: ``eval-0.json`` here). ``${now:...}`` is the sweep's start for every job,
    so the jobs of one sweep share its dated folder."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("now", SWEEP_STARTED.strftime, replace=True)
    out = cfg.get("out")
    if command not in FILE_OUTPUTS:
        cfg.out = str(Path(str(out)) / str(num))
        return
    path = Path(str(out)) if out else Path(FILE_OUTPUTS[command])
    if path.is_dir():
        path = path / FILE_OUTPUTS[command]
    cfg.out = str(path.with_name(f"{path.stem}-{num}{path.suffix}"))


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
@_report("train")
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
@_report("sample")
def sample_command(cfg: DictConfig) -> None:
    sample_command_main(cfg)


@_report("data")
def data_command(cfg: DictConfig) -> None:
    data_command_main(cfg)


# ------------------------------------------------------------------------------------ eval
@_report("eval")
def eval_command(cfg: DictConfig) -> None:
    from lab_utils.commands.evaluation import eval_command_main

    eval_command_main(cfg)


# ------------------------------------------------------------------------------------ compare
@_report("compare")
def compare_command(cfg: DictConfig) -> None:
    from lab_utils.commands.compare import compare

    compare(cfg)


# ------------------------------------------------------------------------------------ bench
@_report("bench")
def bench_command(cfg: DictConfig) -> None:
    from lab_utils.commands.bench import bench_command_main

    bench_command_main(cfg)


# ------------------------------------------------------------------------------------ pretrained, serve
@_report("pretrained")
def pretrained_command(cfg: DictConfig) -> None:
    from lab_utils.commands.pretrained import pretrained_command_main

    pretrained_command_main(cfg)


@_report("serve")
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
    parser.add_argument("--src", default="notebooks", help="src=: folder of solution notebooks (default: notebooks)")
    parser.add_argument("--out", default="notebooks/student", help="out=: output folder (default: notebooks/student)")
    parser.add_argument("--release", default=None, help="release=: also write a folder to hand out (student "
                                                         "notebooks and START_HERE.md, no solutions), e.g. build/release")
    parser.add_argument("--outputs", action="store_true", help="outputs=true: instead, run every solution notebook "
                                                               "in full and store its outputs in the file (minutes each)")
    options = parser.parse_args(key_value_arguments(args, parser))
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


def precheck(config_name: str, command: str, args: list[str], sweep: bool = False) -> str | None:
    """Compose the config once before Hydra's app runs: a bad override becomes one line (None: it composes).
    Hydra's own report would print its config search path, or advise a ``+`` that only moves the error. In a sweep
    (``sweep``), each job's overrides are composed, so that a bad key stops the sweep before its first job."""
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [arg for arg in args if not arg.startswith("hydra.")]
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            jobs = [overrides]
            if sweep:
                parsed = OverridesParser.create().parse_overrides(overrides)
                jobs = [[f"{o.get_key_element()}={value}" if o.is_sweep_override() else o.input_line
                         for o, value in zip(parsed, values)]
                        for values in _sweep_values(parsed)]
            for job in jobs:
                compose(config_name=config_name, overrides=job)
    except Exception as err:  # noqa: BLE001 (every composition failure is the user's input)
        return composition_error(err, command)
    return None


def _sweep_values(parsed: list) -> list[list[str | None]]:
    """One row per job of a sweep: the value of each sweep override (None for the others), the first of each
    sweep beside the others' first (enough to find a bad key or group choice before any job runs)."""
    rows = []
    width = max([len(list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override()] or [1])
    for k in range(width):
        row = []
        for o in parsed:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [None]
            row.append(values[min(k, len(values) - 1)])
        rows.append(row)
    return rows

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


def shell_completion(args: list[str]) -> int:
    """``genlab --shell-completion install=bash`` prints Hydra's bash script for ``genlab``; the script then calls
    ``genlab -sc query=bash`` with the line being typed in ``COMP_LINE``: the command names are answered here, a
    command's keys, groups and choices by that command's Hydra app (the line given to it without the command)."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    command = "train"  # any Hydra app prints the install script
    if any(arg.startswith("query=") for arg in args):
        if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
            print(" ".join([*COMMANDS, "notebooks", "grade", "--help", "--version"]))
            return 0
        command = words[1]
        if command not in COMMANDS:
            return 0  # grade and notebooks take --flags: bash falls back to file names
        os.environ["COMP_LINE"] = "genlab " + line.split(command, 1)[1].lstrip()
        register_model_schema(model_family(COMMANDS[command][0], words[2:]))
    sys.argv = ["genlab", "--shell-completion", *args]  # Hydra's script completes the program named by argv[0]
    _hydra_app(COMMANDS[command][0], COMMANDS[command][1])()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(version_line())
        return 0
    if argv[0] in ("-sc", "--shell-completion"):
        return shell_completion(argv[1:])
    if argv[0] in ("-m", "--multirun") and len(argv) > 1:  # genlab -m sample ... as genlab sample -m ...
        argv = [argv[1], argv[0], *argv[2:]]
    command, rest = argv[0], argv[1:]
    problem = missing_extra(command)
    if problem is not None:
        print(f"genlab: error: {problem}", file=sys.stderr)
        return 1
    try:
        if command == "notebooks":
            return notebooks_command(rest)
        if command == "grade":
            from lab_utils.commands.grading import grade_command

            return grade_command(rest)
    except UserError as err:
        print(f"genlab: error: {err}", file=sys.stderr)
        return 1
    if command not in COMMANDS:
        print(f"genlab: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    config_name, task = COMMANDS[command]
    problem = output_key_problem(command, rest)
    if problem is not None:
        print(f"genlab: error: {problem}", file=sys.stderr)
        return 1
    if command == "sample":
        rest = option_overrides(free_text_overrides(rest))  # steps=10: a family's option, which sample.yaml lacks
    if command == "eval":
        rest = eval_option_overrides(rest)  # eval.sample_options.steps=50: the same, for the loaded model to check
    overrides = [arg for arg in rest if arg not in ("-m", "--multirun")]
    sweep = len(overrides) < len(rest)
    if sweep and command in SWEEP_REFUSED:
        print(f"genlab: error: genlab {command} does not run as a -m sweep: {SWEEP_REFUSED[command]}", file=sys.stderr)
        return 1
    # conf/model/<family>.yaml extends the family's schema (its Config dataclass): store the one composed (each one
    # of a sweep, model=ddpm,flow)
    family = model_family(config_name, [arg for arg in overrides if not arg.startswith("-")])
    for name in [*(family or "").split(","), model_family(config_name)] if sweep else [family]:
        register_model_schema(name)  # a sweep's config is also composed without its sweeps: the default family
    if any(arg in ("-h", "--help") for arg in rest):
        overrides = [arg for arg in overrides if arg not in ("-h", "--help")]
        problem = precheck(config_name, command, overrides)
        if problem is not None:
            print(f"genlab: error: {problem}", file=sys.stderr)
            return 1
        print(help_page(command, config_name, overrides))
        return 0
    if not any(arg.startswith("-") for arg in overrides):  # --cfg job, --hydra-help: Hydra's own flags
        problem = precheck(config_name, command, overrides, sweep=sweep)
        if problem is not None:
            print(f"genlab: error: {problem}", file=sys.stderr)
            return 1
    sys.argv = [f"genlab {command}", *rest]  # Hydra parses sys.argv
    if not sweep:
        _hydra_app(config_name, task)()
        return 0
    # A sweep: Hydra's launcher writes multirun.yaml and a folder per job into hydra.sweep.dir, which no genlab
    # command uses (each job writes its own out=): a temporary folder, removed at the end, not the user's folder.
    with tempfile.TemporaryDirectory(prefix="genlab-sweep-") as sweep_dir:
        sys.argv += [f"hydra.sweep.dir={sweep_dir}"]
        _hydra_app(config_name, task)()
    if FAILED_JOBS:
        print(f"genlab: {len(FAILED_JOBS)} job(s) of the sweep failed (#{', #'.join(map(str, FAILED_JOBS))}); the "
              "others wrote their outputs", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
