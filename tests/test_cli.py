"""The `genlab` command as a user runs it (subprocesses), including from an installed wheel.

The command lines of :data:`COMMAND_LINES` run once per module, each a process of its own (``python -m
lab_utils.commands.cli ...``) forked from one that imported torch and the CLI once (tests/forked_cli.py); their tests
then assert on their results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env
from forked_cli import run_genlab_many

GENLAB = [sys.executable, "-m", "lab_utils.commands.cli"]


def genlab(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    return subprocess.run([*GENLAB, *args], cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


# name -> (arguments, whether it runs in its own folder); "{folder}" is that folder (else the suite's working folder)
COMMAND_LINES = {
    "train-help": (["train", "--help"], False),
    "cfg-job": (["train", "preset=smoke", "trainer.steps=3", "--cfg", "job"], False),
    "data-grid": (["data", "data=shapes", "data.subset=40", "n=16", "out={folder}/grid.png"], True),
    "missing-data": (["data", "data=fashion_mnist", "data.root={folder}", "data.system_dirs=[]"], True),
    "bad-config-value": (["train", "preset=smoke", "trainer.steps=0"], False),
    "missing-run": (["sample", "run={folder}/nothing"], True),
    "sweep": (["-m", "sample", "pretrained=vae", "prompt=a red circle, small", "seed=0,1", "n=1,1000",
               "out=grid.png"], True),
}


@pytest.fixture(scope="module")
def command_lines(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """name -> (its result, its folder)."""
    folders = {name: tmp_path_factory.mktemp(name) for name in COMMAND_LINES}
    invocations = [([arg.replace("{folder}", str(folders[name])) for arg in args],
                    folders[name] if own_folder else Path(os.getcwd()))
                   for name, (args, own_folder) in COMMAND_LINES.items()]
    results = run_genlab_many(GENLAB, invocations, tmp_path_factory.mktemp("command_lines"), subprocess_env())
    return {name: (result, folders[name]) for name, result in zip(COMMAND_LINES, results)}


def test_usage_lists_commands():
    out = genlab("--help")
    assert out.returncode == 0
    for command in ("train", "sample", "data", "notebooks"):
        assert command in out.stdout
    bad = genlab("frobnicate")
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr


def test_train_help_lists_groups_and_choices(command_lines):
    out, _ = command_lines["train-help"]
    assert out.returncode == 0, out.stderr
    for word in ("model", "data", "preset", "ddpm", "shapes", "fashion_mnist", "smoke", "cpu", "gpu"):
        assert word in out.stdout


def test_cfg_job_prints_resolved_config(command_lines):
    out, _ = command_lines["cfg-job"]
    assert out.returncode == 0, out.stderr
    assert "steps: 3" in out.stdout and "name: ddpm" in out.stdout


def test_data_command_writes_grid_and_prints_facts(command_lines):
    out, tmp_path = command_lines["data-grid"]
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert "40 images of 3x32x32" in out.stdout
    assert "colour" in out.stdout and "caption vocabulary" in out.stdout


def test_missing_data_fails_with_one_clear_message(command_lines):
    out, _ = command_lines["missing-data"]
    assert out.returncode == 1
    assert "genlab: error:" in out.stderr and "Traceback" not in out.stderr
    assert "download=true" in out.stderr and "apt-get install dataset-fashion-mnist" in out.stderr


def test_bad_config_value_fails_clearly(command_lines):
    out, _ = command_lines["bad-config-value"]
    assert out.returncode == 1
    assert "steps must be positive" in out.stderr and "Traceback" not in out.stderr


def test_sample_from_missing_run_fails_clearly(command_lines):
    out, _ = command_lines["missing-run"]
    assert out.returncode == 1 and "no such run directory" in out.stderr


def test_the_dispatch_and_its_commands_load_without_torch():
    """cli.py dispatches to a module per command (sample.py, data.py, ...); importing them, and reading a sampling
    option off the command line, loads no torch (seconds): bad settings are refused before it is needed."""
    code = ("import sys; from lab_utils.commands import cli, data, sample; "
            "assert sample.option_overrides(['steps=3', 'n=2', '+x=1', 'eval.k=1']) == "
            "['++steps=3', 'n=2', '+x=1', 'eval.k=1']; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


@pytest.mark.slow
def test_installed_wheel_finds_its_configs(tmp_path):
    """`pip install .` (not editable) ships conf/ inside the wheel: genlab works from any folder."""
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(wheel_dir.glob("genlab-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = subprocess_env(PYTHONPATH=str(site))  # the wheel's copy, not the source tree
    where = subprocess.run([sys.executable, "-c", "import lab_utils, genlab_conf; print(lab_utils.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert str(site) in where.stdout, where.stderr
    out = genlab("data", "data=shapes", "data.subset=16", "n=8", "out=grid.png", cwd=elsewhere, env=env)
    assert out.returncode == 0, out.stderr
    assert (elsewhere / "grid.png").is_file()
    # the model zoo travels inside the wheel: every shipped file, listed and loadable from the installed copy
    from lab_utils.harness.zoo import entries

    listed = genlab("pretrained", cwd=elsewhere, env=env)
    assert listed.returncode == 0, listed.stderr
    for name, entry in entries().items():
        assert name in listed.stdout
        assert (site / entry.path.relative_to(REPO)).is_file(), f"{entry.path.name} is not in the wheel"
    assert (site / "lab_utils" / "commands" / "serve" / "static" / "index.html").is_file()


# ------------------------------------------------------------------------------------ the command speaks Hydra
HYDRA_COMMANDS = ["train", "sample", "data", "eval", "compare", "bench", "pretrained", "serve"]


def test_version_names_the_package_and_torch(capsys):
    from importlib import metadata

    from lab_utils.commands import cli

    assert cli.main(["--version"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"genlab {metadata.version('genlab')} (torch {metadata.version('torch')}, Python 3.")


@pytest.mark.parametrize("command", HYDRA_COMMANDS)
def test_each_command_has_its_own_help_page(command, capsys):
    """What the command does (its config's header), every setting of its own with its default and comment, and the
    flags it takes: not Hydra's generic page of internal groups."""
    from omegaconf import OmegaConf

    from lab_utils.commands import cli
    from lab_utils.commands.usage import WIRING_KEYS

    assert cli.main([command, "--help"]) == 0
    page = capsys.readouterr().out
    config_name = cli.COMMANDS[command][0]
    own = OmegaConf.load(REPO / "conf" / f"{config_name}.yaml")
    assert page.startswith(f"genlab {command} [key=value ...]\n\n# Primary config of `genlab {command}`")
    for key in own:
        if key not in WIRING_KEYS:
            assert f"\n{key}:" in page, key
    assert "powered by Hydra" not in page and "hydra/job_logging" not in page
    assert "-m, --multirun" in page and "--cfg job" in page


def test_help_shows_the_settings_the_chosen_group_brings(capsys):
    from lab_utils.commands import cli

    assert cli.main(["train", "model=vae", "--help"]) == 0
    page = capsys.readouterr().out
    families = ", ".join(sorted(path.stem for path in (REPO / "conf" / "model").glob("*.yaml")))
    assert f"model: {families}" in page and "(model=vae data=shapes preset=cpu" in page
    assert "kl_warmup_steps:" in page and "trainer:" in page and "batch_size:" in page
    assert cli.main(["train", "model=nope", "--help"]) == 1
    assert "unknown model=nope" in capsys.readouterr().err


@pytest.mark.parametrize("line, expected", [
    ("genlab sa", "sample"), ("genlab ", "compare"), ("genlab train mod", "model="),
    ("genlab train model=", "model=flow"), ("genlab eval eval.num", "eval.num_samples="),
])
def test_bash_completion_answers_commands_keys_and_choices(line, expected, capsys, monkeypatch):
    from lab_utils.commands import cli

    monkeypatch.setenv("COMP_LINE", line)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert cli.main(["-sc", "query=bash"]) == 0
    assert expected in capsys.readouterr().out.split()


def test_bash_completion_script_completes_genlab(capsys, monkeypatch):
    from lab_utils.commands import cli

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert cli.main(["--shell-completion", "install=bash"]) == 0
    script = capsys.readouterr().out
    assert "hydra_bash_completion" in script and script.rstrip().endswith("-F hydra_bash_completion genlab")


def test_a_prompt_is_free_text_as_written():
    """One of the shapes caption templates has a comma: Hydra would read it as a list or a sweep. Quotes,
    backslashes and ${...} reach the model as typed; a list of prompts is Hydra's list. (Through the real command:
    the sweep test below.)"""
    from hydra import compose, initialize_config_module

    from lab_utils.commands.arguments import free_text_overrides

    texts = ["a red circle, small", "it's a red circle, small", "back\\slash", "tail\\", "${oc.env:HOME}", "a'\\'b"]
    with initialize_config_module(config_module="genlab_conf", version_base="1.3"):
        for text in texts:
            cfg = compose(config_name="sample", overrides=free_text_overrides([f"prompt={text}"]))
            assert cfg.prompt == text
        cfg = compose(config_name="sample", overrides=free_text_overrides(["prompt=[a,b c]"]))
        assert list(cfg.prompt) == ["a", "b c"]


def test_sweep_jobs_write_their_own_outputs_and_survive_an_error(command_lines):
    """genlab -m: a job per value; each job's output has its number (never shared), nothing of Hydra's is left in
    the working folder, and a job's user error is its line while the other jobs run (exit 1 at the end). The prompt
    with a comma is one prompt, not a sweep."""
    out, tmp_path = command_lines["sweep"]
    assert out.returncode == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grid-0.png", "grid-2.png"]
    assert (tmp_path / "grid-0.png").read_bytes() != (tmp_path / "grid-2.png").read_bytes()  # seeds 0 and 1
    assert out.stdout.count("for each of 'a red circle, small'") == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("genlab: error:")]
    assert len(errors) == 2 and errors[0].startswith("genlab: error: job #1 (pretrained=vae prompt='a red circle, "
                                                     "small' seed=0 n=1000")
    assert "more than the 256 images" in errors[0] and "Traceback" not in out.stderr
    assert "2 job(s) of the sweep failed (#1, #3)" in out.stderr


def test_each_job_of_a_sweep_gets_its_own_out(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from lab_utils.commands.cli import job_output

    monkeypatch.chdir(tmp_path)
    (tmp_path / "grids").mkdir()
    cases = [("train", "runs/sweep", "runs/sweep/3"), ("compare", "runs/c", "runs/c/3"),
             ("sample", "grid.png", "grid-3.png"), ("sample", "grids", "grids/samples-3.png"),
             ("data", "d.jpg", "d-3.jpg"), ("eval", None, "eval-3.json"), ("eval", "e.json", "e-3.json")]
    for command, out, expected in cases:
        cfg = OmegaConf.create({"out": out})
        job_output(cfg, command, 3)
        assert cfg.out == expected, (command, out)
    dated = OmegaConf.create({"out": "runs/${now:%H-%M-%S-%f}"})  # one sweep, one dated folder
    job_output(dated, "train", 0)
    later = OmegaConf.create({"out": "runs/${now:%H-%M-%S-%f}"})
    job_output(later, "train", 1)
    assert Path(dated.out).parent == Path(later.out).parent


def test_serve_and_pretrained_refuse_a_sweep(capsys):
    from lab_utils.commands import cli

    for command in ("serve", "pretrained"):
        assert cli.main(["-m", command, "seed=0,1"]) == 1
        assert f"genlab {command} does not run as a -m sweep" in capsys.readouterr().err


def test_argparse_commands_take_key_value_as_every_command():
    import argparse

    from lab_utils.commands.arguments import UserError, key_value_arguments

    parser = argparse.ArgumentParser(prog="genlab grade")
    parser.add_argument("target")
    parser.add_argument("--out")
    parser.add_argument("--time-limit", type=float)
    parser.add_argument("--full", action="store_true")
    args = key_value_arguments(["subs/", "out=g", "time_limit=60", "full=true", "--out", "h"], parser)
    assert args == ["subs/", "--out", "g", "--time-limit", "60", "--full", "--out", "h"]
    assert key_value_arguments(["full=false"], parser) == []
    with pytest.raises(UserError, match="unknown setting outt= for genlab grade; its settings are out=, time_limit="):
        key_value_arguments(["outt=g"], parser)
