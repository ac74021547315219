"""The `genlab` command as a user runs it (subprocesses), including from an installed wheel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env

GENLAB = [sys.executable, "-m", "lab_utils.commands.cli"]


def genlab(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    return subprocess.run([*GENLAB, *args], cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_usage_lists_commands():
    out = genlab("--help")
    assert out.returncode == 0
    for command in ("train", "sample", "data", "notebooks"):
        assert command in out.stdout
    bad = genlab("frobnicate")
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr


def test_train_help_lists_groups_and_choices():
    out = genlab("train", "--help")
    assert out.returncode == 0, out.stderr
    for word in ("model", "data", "preset", "ddpm", "shapes", "fashion_mnist", "smoke", "cpu", "gpu"):
        assert word in out.stdout


def test_cfg_job_prints_resolved_config():
    out = genlab("train", "preset=smoke", "trainer.steps=3", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "steps: 3" in out.stdout and "name: ddpm" in out.stdout


def test_data_command_writes_grid_and_prints_facts(tmp_path):
    out = genlab("data", "data=shapes", "data.subset=40", "n=16", f"out={tmp_path / 'grid.png'}")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert "40 images of 3x32x32" in out.stdout
    assert "colour" in out.stdout and "caption vocabulary" in out.stdout


def test_missing_data_fails_with_one_clear_message(tmp_path):
    out = genlab("data", "data=fashion_mnist", f"data.root={tmp_path}", "data.system_dirs=[]")
    assert out.returncode == 1
    assert "genlab: error:" in out.stderr and "Traceback" not in out.stderr
    assert "download=true" in out.stderr and "apt-get install dataset-fashion-mnist" in out.stderr


def test_bad_config_value_fails_clearly():
    out = genlab("train", "preset=smoke", "trainer.steps=0")
    assert out.returncode == 1
    assert "steps must be positive" in out.stderr and "Traceback" not in out.stderr


def test_sample_from_missing_run_fails_clearly(tmp_path):
    out = genlab("sample", f"run={tmp_path / 'nothing'}")
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
