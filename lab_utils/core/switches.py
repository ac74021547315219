"""The notebook switches: how to run a notebook small, load the shipped models instead of training, or make a
failed exercise check stop the notebook.

Each switch reads one environment variable, so the same notebook runs as a lesson, in the test suite and in
``genlab grade`` without an edit:

    GENLAB_SMOKE=1           smoke_mode(): tiny datasets, models and step counts (the tests, the grader)
    GENLAB_PRETRAINED=1 / 0  pretrained_mode(default): load the shipped model (``lab_utils.harness.zoo``) / train it
    GENLAB_STRICT_CHECKS=1   strict_mode(): a failed check raises (the solution notebooks in the test suite)

A notebook's first cell reads them once::

    SMOKE = smoke_mode()  # GENLAB_SMOKE=1: tiny models, a few training steps (the test suite runs this)
    PRETRAINED = pretrained_mode(default=True)  # unset: this notebook loads the shipped model
"""

from __future__ import annotations

import os

__all__ = ["pretrained_mode", "smoke_mode", "strict_mode"]

_TRUTHY = {"1", "true", "yes", "on"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUTHY


def smoke_mode() -> bool:
    """True when ``GENLAB_SMOKE`` is 1/true/yes: notebooks use tiny datasets, models and step counts."""
    return _env_flag("GENLAB_SMOKE")


def pretrained_mode(default: bool) -> bool:
    """Whether a notebook loads the shipped model (``lab_utils.harness.zoo``) instead of training it:
    ``GENLAB_PRETRAINED=1`` loads, ``=0`` trains; unset, the notebook's own ``default`` (the choice that keeps it
    within 10 minutes on a laptop CPU). Smoke mode trains its tiny models unless ``GENLAB_PRETRAINED=1``."""
    value = os.environ.get("GENLAB_PRETRAINED", "").strip().lower()
    if value:
        return value in ("1", "true", "yes")
    return default and not smoke_mode()


def strict_mode() -> bool:
    """True when ``GENLAB_STRICT_CHECKS`` is 1/true/yes: a failed exercise check raises
    :class:`~lab_utils.core.exercises.checks.ExerciseFailed` after printing its line, so running the *solution*
    notebooks in the test suite fails when a solution (or a reference it is compared with) is broken."""
    return _env_flag("GENLAB_STRICT_CHECKS")
