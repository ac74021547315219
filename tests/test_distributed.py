"""Data-parallel training with torchrun on CPU (gloo, two processes).

Each test launches real processes with ``python -m torch.distributed.run`` (what ``torchrun`` is)
and checks the numbers, not only that it ran: a 2-process run with the batch split in two follows
the 1-process loss trajectory, and its checkpoint continues in a single process exactly as an
uninterrupted single-process run would. Every run must also exit cleanly (no abort at shutdown).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import subprocess_env

TESTS = Path(__file__).parent
TINY = TESTS / "tiny_lab.py"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def launch(nproc: int, *args: str, module: bool = False, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc`` (or plain python for nproc=0) of the tiny lab or ``-m genlab``."""
    env = subprocess_env(OMP_NUM_THREADS="1")  # two processes on two cores; tests/ on PYTHONPATH
    target = ["-m", "genlab", *args] if module else [str(TINY), *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = launcher + target if nproc else [sys.executable, *target]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert "terminate called" not in result.stderr  # the shutdown abort the harness avoids
    return result


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: {k: v for k, v in row.items() if k.startswith(("loss/", "grad_norm/"))} for row in rows}


def assert_same_trajectory(a: dict, b: dict, steps) -> None:
    for step in steps:
        assert a[step].keys() == b[step].keys()
        for key in a[step]:
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-6), (step, key)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


COMMON = ["--no-noise", "trainer.progress=false", "trainer.log_every=1", "trainer.batch_size=8",
          "trainer.sample_every=0"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The uninterrupted single-process run both trajectory tests follow: 12 steps of 8 images. The learning rate's
    schedule has steps of its own (trainer.warmup_steps, trainer.lr_decay_steps), not trainer.steps, so its first
    steps are those of a shorter run."""
    run_dir = tmp_path_factory.mktemp("distributed") / "one"
    launch(0, str(run_dir), *COMMON, "trainer.steps=12", "trainer.checkpoint_every=3")
    return run_dir


def test_two_processes_follow_the_single_process_trajectory_and_resume_in_one(tmp_path, single):
    # The tiny two-player lab: 2 critic updates (each on a fresh batch) + 1 generator update per step, an
    # SGD and an Adam optimiser, gradient clipping. With noise=False its losses depend on the batch alone.
    launch(2, str(tmp_path / "two"), *COMMON, "trainer.steps=6", "trainer.checkpoint_every=3")
    two, one = losses(tmp_path / "two"), losses(single)
    # batch_scope=global: 2 processes x 4 images = 1 process x 8 images, the same images in each step.
    assert sorted(two) == list(range(1, 7))
    assert_same_trajectory(two, one, range(1, 7))
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["images_seen"] == 6 * 2 * 8  # 2 critic batches per step, counted over both processes
    state = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=False)
    assert state["trainer"]["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    # The 2-process checkpoint continues in a single process, exactly where the 1-process run was.
    launch(0, str(tmp_path / "two"), "--resume", *COMMON, "trainer.steps=12")
    resumed = losses(tmp_path / "two")
    assert sorted(resumed) == list(range(1, 13))
    assert_same_trajectory(resumed, one, range(7, 13))
    for name, value in final_weights(single).items():
        torch.testing.assert_close(final_weights(tmp_path / "two")[name], value, rtol=1e-4, atol=1e-5)


def test_a_single_process_checkpoint_resumes_in_two_processes(tmp_path, single):
    launch(0, str(tmp_path / "run"), *COMMON, "trainer.steps=4", "trainer.checkpoint_every=2")
    launch(2, str(tmp_path / "run"), "--resume", *COMMON, "trainer.steps=8")
    assert_same_trajectory(losses(tmp_path / "run"), losses(single), range(1, 9))


@pytest.mark.parametrize("model,extra", [
    ("dcgan", ["model.loss=wgan_gp", "model.n_critic=2"]),  # two optimisers, critic steps, double backward
    ("ddpm", []),  # attention, the text encoder, every parameter used (find_unused_parameters=False)
])
def test_every_family_trains_with_torchrun_and_rank_zero_writes(tmp_path, model, extra):
    run_dir = tmp_path / model
    result = launch(2, "train", f"model={model}", "data=shapes", "preset=smoke", f"out={run_dir}",
                    "trainer.progress=false", "trainer.steps=3", "trainer.log_every=1", "trainer.sample_every=0",
                    *extra, module=True)
    assert result.stdout.count("checkpoint:") == 1  # rank 0 reports, once
    assert "x 2 processes" in (run_dir / "train.log").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]  # one log, not one per process
    assert all(torch.isfinite(torch.tensor(v)) for row in rows for k, v in row.items() if k.startswith("loss/"))
    if model == "dcgan":
        assert rows[-1]["stats/gradient_penalty"] > 0
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert state["trainer"]["step"] == 3 and state["ema"]  # rank 0 kept the EMA
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_000003.png"]  # the final grid


def test_global_batch_that_does_not_split_is_a_clear_error(tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TINY),
               str(tmp_path / "run"), "trainer.batch_size=7", "trainer.progress=false"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "trainer.batch_size=7 (the global batch) does not split over 2 processes" in result.stderr


def test_a_nan_on_one_process_stops_every_process_together(tmp_path):
    """nan_check=step: rank 1 alone sees a NaN loss; both ranks stop with the message (none waits in an
    all-reduce for the other, none is killed by the launcher before it could say why)."""
    env = subprocess_env(OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TINY),
               str(tmp_path / "run"), *COMMON, "trainer.nan_check=step", "model.explode_at=3", "model.explode_rank=1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rank 1 stopped: loss for 'generator' became nan at step 3" in output, output[-3000:]
    assert "rank 0 stopped: a loss on another process became nan at step 3" in output, output[-3000:]
