"""The notebook switches (lab_utils/core/switches.py): each reads its environment variable, and nothing else."""

from __future__ import annotations

import pytest

from lab_utils.core.exercises.checks import ExerciseFailed, check_value
from lab_utils.core.switches import pretrained_mode, smoke_mode, strict_mode


def test_smoke_mode(monkeypatch):
    for value, expected in [("1", True), ("true", True), ("YES", True), ("0", False), ("", False), ("no", False)]:
        monkeypatch.setenv("GENLAB_SMOKE", value)
        assert smoke_mode() is expected
    monkeypatch.delenv("GENLAB_SMOKE")
    assert smoke_mode() is False


def test_strict_mode_reads_its_variable_and_makes_a_failed_check_raise(monkeypatch, capsys):
    for value, expected in [("1", True), (" on ", True), ("0", False), ("", False)]:
        monkeypatch.setenv("GENLAB_STRICT_CHECKS", value)
        assert strict_mode() is expected
    assert not check_value(0.4, 0.5, name="kl")  # lenient: prints and returns False
    monkeypatch.setenv("GENLAB_STRICT_CHECKS", "1")
    with pytest.raises(ExerciseFailed, match="kl: output: got 0.4, expected 0.5"):
        check_value(0.4, 0.5, name="kl")
    assert capsys.readouterr().out.count("❌ kl") == 2


def test_the_switches_are_independent(monkeypatch):
    """Smoke mode alone neither loads the shipped models nor makes checks strict."""
    monkeypatch.setenv("GENLAB_SMOKE", "1")
    monkeypatch.delenv("GENLAB_PRETRAINED", raising=False)
    monkeypatch.delenv("GENLAB_STRICT_CHECKS", raising=False)
    assert smoke_mode() and not strict_mode() and not pretrained_mode(default=True)
