"""Progress bars (lab_utils.harness.progress on tqdm.auto): a few plain lines in a log, one redrawn line on a terminal, nothing
when switched off; the trainer's bar reaches its total whatever the budget. No assertion depends on timing: where
the log's interval matters it is set to never or always."""

from __future__ import annotations

import io
import re

import pytest

import lab_utils.harness.progress as progress
from lab_utils.harness.progress import TrainingProgress, progress_bar
from lab_utils.harness.run import train
from tiny_lab import tiny_config


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def never(monkeypatch):
    """No interval ever passes in a log: only the lines a bar writes when it starts and when it ends."""
    monkeypatch.setattr(progress, "LOG_INTERVAL", 1e9)


def test_a_log_gets_a_line_when_a_bar_starts_and_one_when_it_ends(never):
    log = io.StringIO()
    with progress_bar(1000, "sample ddpm", unit="img", stream=log) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert lines[0].startswith("sample ddpm: 0/1000 img (0%)")
    assert lines[1].startswith("sample ddpm: 1000/1000 img (100%)")


def test_the_interval_is_what_bounds_a_log(monkeypatch):
    """With no interval every update is a line (what the old progress line wrote per log row); the interval thins them."""
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    log = io.StringIO()
    with progress_bar(5, "features", unit="set", stream=log) as bar:
        for _ in range(5):
            bar.update()
    lines = log.getvalue().splitlines()
    assert len(lines) in (6, 7)  # the start, one per update, the end (left out when it repeats the last)
    assert [int(re.match(r"features: (\d)/5", line).group(1)) for line in lines[:6]] == [0, 1, 2, 3, 4, 5]


def test_bars_started_inside_one_another_write_whole_lines_to_a_log(never):
    log = io.StringIO()
    with progress_bar(2, "outer", stream=log) as outer:
        with progress_bar(3, "inner", stream=log) as inner:
            inner.update(3)
        outer.update(2)
    assert [line.split(":")[0] for line in log.getvalue().splitlines()] == ["outer", "inner", "inner", "outer"]
    assert "\x1b" not in log.getvalue()  # no cursor movement


def test_a_terminal_gets_one_line_redrawn_in_place():
    tty = Terminal()
    with progress_bar(4, "eval vae: sample", unit="img", stream=tty, mininterval=0) as bar:
        for _ in range(4):
            bar.update()
    text = tty.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") >= 5  # redrawn, then left in place
    assert "eval vae: sample: 100%" in text.rsplit("\r", 1)[-1] and "4/4" in text.rsplit("\r", 1)[-1]


def test_a_bar_switched_off_prints_nothing():
    for stream in (io.StringIO(), Terminal()):
        with progress_bar(10, "x", stream=stream, enabled=False) as bar:
            bar.update(10)
        training = TrainingProgress(enabled=False, stream=stream)
        training.update(1, 1.0, {"loss": 1.0})
        training.close()
        assert stream.getvalue() == ""


@pytest.mark.parametrize("fractions", [[0.25, 0.5, 0.75, 1.0],  # a step budget: exactly 1 at the end
                                       [0.3, 0.62, 0.97, 1.04],  # a time budget: the last step passes it
                                       [0.1, 0.2 + 0.1, 0.7, 1.0]])  # floats that do not add up to 1 exactly
def test_the_training_bar_reaches_its_total_whatever_the_budget(fractions, never):
    log = io.StringIO()
    bar = TrainingProgress(desc="train vae", stream=log)
    for step, fraction in enumerate(fractions, start=1):
        bar.update(step, fraction, {"recon": 0.1234567, "kl": 3.0, "a": 1.0, "b": 2.0, "hidden": 5.0})
    bar.close()
    assert bar.bar.n == bar.bar.total == 1.0  # a Jupyter widget turns red when a closed bar is short of its total
    last = log.getvalue().splitlines()[-1]
    assert last.startswith("train vae: 100.0%") and f"step {len(fractions)}," in last
    assert "recon=0.1235" in last and "kl=3" in last and "hidden" not in last  # four losses at most


def test_a_resumed_run_starts_its_bar_where_the_budget_stood(never):
    log = io.StringIO()
    bar = TrainingProgress(start=0.5, desc="train vae", stream=log)
    assert log.getvalue().startswith("train vae:  50.0%")
    bar.update(11, 0.75, {})
    bar.close()
    assert bar.bar.n == 0.75 and log.getvalue().splitlines()[-1].startswith("train vae:  75.0%")


def bar_lines(text: str, desc: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(desc + ":")]


def test_the_trainer_writes_a_bounded_number_of_lines_to_a_log(tmp_path, capsys, never):
    """40 log rows: the old progress line wrote 40 lines outside a terminal; the bar writes its first and last."""
    cfg = tiny_config(tmp_path / "on")
    cfg.trainer.steps, cfg.trainer.log_every, cfg.trainer.progress = 40, 1, True
    cfg.trainer.checkpoint_every, cfg.trainer.sample_every = 40, 0
    train(cfg)
    lines = bar_lines(capsys.readouterr().err, "train tiny")
    assert len(lines) == 2, lines
    assert lines[0].startswith("train tiny:   0.0%") and lines[1].startswith("train tiny: 100.0%")
    assert "step 40," in lines[1] and "critic=" in lines[1] and "generator=" in lines[1]

    cfg = tiny_config(tmp_path / "off")
    cfg.trainer.steps, cfg.trainer.progress = 4, False
    train(cfg)
    assert "train tiny" not in capsys.readouterr().err
