"""The graded halves of a check: what a grading run draws, what the sandbox observes and how the grader judges it.

**Graded where the student's code cannot decide.** A topic check is declared with :func:`graded`
(``@graded("attention")``). In a student's Jupyter it runs as usual and prints its line: that is feedback, and
nothing it prints or returns is a grade. ``genlab grade`` (``lab_utils.commands.grading``) runs the same checks in
two halves: inside a sandbox, on inputs drawn for that run (:func:`case_seed`), a check only *observes* what the
student's code returns (mode "observe", :func:`observe`, an :class:`Observation`); the grader, in its own process,
takes the check's :class:`CheckSpec` (reference, cases, tolerances, hints: :func:`check_spec`) and :func:`judge`
compares the observed outputs with the reference outputs it computes itself.

A check learns which half it is in from :func:`mode`: "feedback" (a notebook), "spec" (the grader learns what the
check compares: :func:`capture_spec` stops it there) or "observe" (the sandbox: :func:`observe_function`,
:func:`observe_module`). :func:`check_spec` and :func:`observe` switch the mode of the whole process, one at a time.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import nn

from lab_utils.core.exercises.cases import (
    NOT_IMPLEMENTED, Case, Hint, known_mistake, load_reference_weights, run_case,
)
from lab_utils.core.exercises.difference import difference, type_name
from lab_utils.core.exercises.forbidden import student_error

__all__ = ["CheckSpec", "Observation", "capture_spec", "case_seed", "check_spec", "graded", "judge", "mode",
           "observe", "observe_function", "observe_module", "seeded_module"]

_MODE_LOCK = threading.RLock()  # check_spec and observe switch the mode of the whole process: one at a time
_MODE = ["feedback"]  # "feedback" (a notebook), "spec" (the grader learns a check), "observe" (the grader's sandbox)
_DRAW = [0]  # 0: the notebook's fixed inputs; else the grading run's draw (case_seed)
_OBSERVED: list["Observation"] = []  # what checks observed in "observe" mode (read by the grader's sandbox)
_GRADED: list[str] = []  # the graded checks running now (innermost last)
_ANSWERS: dict[str, Any] = {}  # exercise -> what the notebook last gave its check (the grader observes that)


def mode() -> str:
    """The half a check runs in: "feedback" (a notebook), "spec" (:func:`check_spec`) or "observe" (:func:`observe`)."""
    return _MODE[0]


def case_seed(base: int) -> int:
    """The seed of a check's inputs: ``base`` in a notebook (the same inputs every time, so hints are stable); in a
    grading run a seed mixed with that run's draw, so the inputs are new for every run and an answer cannot be a
    table of outputs recorded at home."""
    draw = _DRAW[0]
    return base if draw == 0 else (base * 1_000_003 + draw) % (2**62)


def seeded_module(factory: Callable[[], nn.Module], base: int) -> nn.Module:
    """``factory()`` (a check's toy network) built with the global RNG seeded by ``case_seed(base)``; the caller's
    random stream is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case_seed(base))
        return factory()


@dataclass
class CheckSpec:
    """What a graded check compares, without the student's code: what the grader needs to judge an observation."""

    exercise: str
    name: str
    kind: str  # "function" or "module"
    reference: Any
    cases: list[Case]
    init: Case | None
    atol: float
    rtol: float
    seed: int | None
    hint: Hint | str
    known_mistakes: Sequence[tuple[Callable, str]]
    forbid: tuple


@dataclass
class Observation:
    """What the student's code returned on a check's cases, in order, and what stopped it (if anything):
    ``not_implemented``, or ``error`` (its message) at case ``len(outputs)``."""

    exercise: str
    outputs: list = field(default_factory=list)
    error: str | None = None
    not_implemented: bool = False
    reference_called: str | None = None


class _SpecCaptured(Exception):
    def __init__(self, spec: CheckSpec):
        super().__init__(spec.name)
        self.spec = spec


def _unwritten(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError


def check_spec(check: Callable[..., Any], draw: int = 0) -> CheckSpec:
    """The :class:`CheckSpec` of a :func:`graded` check on the inputs of ``draw`` (0: the notebook's): the check is
    called with a stand-in answer and stops where it would run it."""
    with _MODE_LOCK:
        previous_mode, previous_draw = _MODE[0], _DRAW[0]
        _MODE[0], _DRAW[0] = "spec", draw
        try:
            check(_unwritten)
        except _SpecCaptured as captured:
            return captured.spec
        finally:
            _MODE[0], _DRAW[0] = previous_mode, previous_draw
    raise TypeError(f"{getattr(check, '__name__', check)!r} is not a graded check (it never compared anything)")


def observe(check: Callable[..., Any], answer: Any, draw: int = 0) -> list[Observation]:
    """What a :func:`graded` check observes of ``answer`` on the inputs of ``draw``, without judging it (the half of a
    check that runs in the grader's sandbox; :func:`judge` is the other half)."""
    with _MODE_LOCK:
        previous_mode, previous_draw = _MODE[0], _DRAW[0]
        _MODE[0], _DRAW[0] = "observe", draw
        start = len(_OBSERVED)
        try:
            check(answer)
        finally:
            _MODE[0], _DRAW[0] = previous_mode, previous_draw
        observed = _OBSERVED[start:]
        del _OBSERVED[start:]
    return observed


def capture_spec(kind: str, name: str, reference: Any, cases: Sequence[Case], init: Case | None, atol: float,
                 rtol: float, seed: int | None, hint: Hint | str, known_mistakes: Sequence[tuple[Callable, str]],
                 forbid: tuple) -> NoReturn:
    """"spec" mode: a check hands over what it compares and stops (:func:`check_spec` catches it)."""
    exercise = _GRADED[-1] if _GRADED else name
    raise _SpecCaptured(CheckSpec(exercise, name, kind, reference, list(cases), init, atol, rtol, seed, hint,
                                  tuple(known_mistakes), tuple(forbid)))


def observe_function(student_fn: Callable, cases: Sequence[Case], seed: int | None) -> None:
    """"observe" mode: the student's outputs on every case (the reference is not run: the grader runs it)."""
    observation = Observation(_GRADED[-1] if _GRADED else "")
    _OBSERVED.append(observation)
    if not callable(student_fn):
        observation.error = f"expected a function, got {type_name(student_fn)}"
        return
    for index, case in enumerate(cases):
        try:
            observation.outputs.append(run_case(student_fn, case, seed))
        except NotImplementedError:
            observation.not_implemented = True
            return
        except Exception as err:  # noqa: BLE001 - any student error is an observation
            message, called = student_error(err, case.describe(index, len(cases)))
            observation.error = message
            if called:
                observation.reference_called = message
            return


def observe_module(student_cls: Callable[..., nn.Module], reference_cls: Callable[..., nn.Module], init: Case,
                   cases: Sequence[Case], seed: int | None) -> None:
    """"observe" mode for a layer: build it, give it the reference's weights, its outputs on every case."""
    observation = Observation(_GRADED[-1] if _GRADED else "")
    _OBSERVED.append(observation)
    try:
        student = run_case(student_cls, init, seed)
    except NotImplementedError:
        observation.not_implemented = True
        return
    except Exception as err:  # noqa: BLE001
        observation.error = f"building the layer raised {type(err).__name__}: {err}"
        return
    if not isinstance(student, nn.Module):
        observation.error = f"expected an nn.Module, got {type_name(student)}"
        return
    problem = load_reference_weights(student.eval(), run_case(reference_cls, init, seed).eval())
    if problem:
        observation.error = problem
        return
    for index, case in enumerate(cases):
        try:
            with torch.no_grad():
                observation.outputs.append(run_case(student, case, seed))
        except NotImplementedError:
            observation.not_implemented = True
            return
        except Exception as err:  # noqa: BLE001
            observation.error, called = student_error(err, case.describe(index, len(cases)))
            if called:
                observation.reference_called = observation.error
            return


def judge(spec: CheckSpec, observation: Observation | None) -> tuple[bool, str]:
    """The grader's verdict on an observation: it runs the reference itself on the same cases and compares, case by
    case, as the check does in a notebook (with the same tolerances and known-mistake hints)."""
    if observation is None:
        return False, "its check did not run"
    if observation.reference_called:
        return False, observation.reference_called
    hint = spec.hint.for_attempt(2) if isinstance(spec.hint, Hint) else spec.hint
    total = len(spec.cases)
    reference = spec.reference
    if spec.kind == "module":
        reference = run_case(spec.reference, spec.init, spec.seed).eval()
    for index, case in enumerate(spec.cases):
        where = case.describe(index, total)
        if index >= len(observation.outputs):
            if observation.not_implemented:
                return False, NOT_IMPLEMENTED
            if observation.error:
                return False, observation.error + (f" — hint: {hint}" if hint else "")
            return False, f"{where}: no output (the check did not finish)"
        with torch.no_grad() if spec.kind == "module" else contextlib.nullcontext():
            expected = run_case(reference, case, spec.seed)
        got = observation.outputs[index]
        message = difference(got, expected, atol=spec.atol, rtol=spec.rtol)
        if message:
            specific = known_mistake(got, case, spec.known_mistakes, spec.seed, spec.atol, spec.rtol)
            text = specific or hint
            return False, f"{where}: {message}" + (f" — hint: {text}" if text else "")
    if observation.not_implemented or observation.error:
        return False, observation.error or NOT_IMPLEMENTED
    return True, f"passed ({total} case{'s' if total != 1 else ''})"


def graded(exercise: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a topic check as the graded check of ``exercise`` (the id the notebook's metadata gives points
    to): while it runs, its spec and observations carry that id, and in a notebook the answer it is given is kept
    (``_ANSWERS``) for the grader's sandbox to observe."""

    def decorate(check: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(check)
        def run(*args: Any, **kwargs: Any) -> Any:
            if _MODE[0] == "feedback" and args:
                _ANSWERS[exercise] = args[0]  # before `.pick` may rebind the student's name to the lab's version
            _GRADED.append(exercise)
            try:
                return check(*args, **kwargs)
            finally:
                _GRADED.pop()

        run.exercise = exercise  # type: ignore[attr-defined]
        return run

    return decorate
