"""The checks a topic's exercise calls: run the student's code and the reference on the same cases, print one line.

:func:`check_function` (a function), :func:`check_module` (a layer class) and :func:`check_value` (a value the
student computed) print a pass, or what differed (which case, which field, the shapes, the largest error:
:func:`~lab_utils.core.exercises.difference.difference`) and a hint; a stub that still raises
``NotImplementedError`` gets "not implemented yet". While the student's code runs, the reference it is compared
with (and whatever ``forbid=`` names) raises (:func:`~lab_utils.core.exercises.forbidden.forbidden`), so an answer
that just calls the reference fails with a message that says so. In a grading run the same call only hands over
what it compares, or observes the student's outputs (:mod:`~lab_utils.core.exercises.records`).

**The student's version, or the reference.** A check returns a :class:`CheckResult` (true when it
passed); ``result.pick(student_fn)`` is the student's function when it passed and otherwise the lab's
reference (with a note), so the rest of the notebook runs either way without importing the reference.

With ``GENLAB_STRICT_CHECKS=1`` (:func:`~lab_utils.core.switches.strict_mode`) a failed check raises
:class:`ExerciseFailed` after printing, so running the *solution* notebooks in the test suite fails when a
solution (or a reference it is compared with) is broken.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lab_utils.core.exercises.cases import (
    NOT_IMPLEMENTED, Case, Hint, known_mistake, load_reference_weights, run_case,
)
from lab_utils.core.exercises.difference import difference, type_name
from lab_utils.core.exercises.forbidden import forbidden, student_error
from lab_utils.core.exercises.records import capture_spec, mode, observe_function, observe_module
from lab_utils.core.switches import strict_mode

__all__ = ["CheckResult", "ExerciseFailed", "check_function", "check_module", "check_value"]


class ExerciseFailed(AssertionError):
    """Raised by a failed check in strict mode (``GENLAB_STRICT_CHECKS=1``)."""


@dataclass
class CheckResult:
    """The outcome of one check: true when it passed. ``pick(student)`` is what the rest of the notebook
    should use: the student's code when it passed, else the lab's reference (``fallback``), with a note."""

    name: str
    passed: bool
    detail: str
    fallback: Any = None

    def __bool__(self) -> bool:
        return self.passed

    def pick(self, student: Any) -> Any:
        if self.passed or self.fallback is None:
            return student
        print(f"ℹ️ {self.name}: the rest of this notebook uses the lab's version until yours passes")
        return self.fallback


_FAILURES: dict[str, int] = {}  # failed tries per check name in this process (which hint to show)


def _hint_text(name: str, hint: Hint | str) -> str:
    _FAILURES[name] = _FAILURES.get(name, 0) + 1
    return hint.for_attempt(_FAILURES[name]) if isinstance(hint, Hint) else hint


def _report(name: str, ok: bool, detail: str, hint: Hint | str = "", fallback: Any = None) -> CheckResult:
    """Print the check's one line and in strict mode raise on a failure."""
    if ok:
        print(f"✅ {name}: {detail}")
        return CheckResult(name, True, detail, fallback)
    line = f"❌ {name}: {detail}"
    text = _hint_text(name, hint) if hint else ""
    if text:
        line += f" — hint: {text}"
    print(line)
    if strict_mode():
        raise ExerciseFailed(line)
    return CheckResult(name, False, detail, fallback)


def _run_student(fn: Callable, case: Case, seed: int | None, forbid: Sequence[Any]) -> Any:
    with forbidden(forbid):
        return run_case(fn, case, seed)


def check_function(
    student_fn: Callable,
    reference_fn: Callable,
    cases: Sequence[Case],
    *,
    name: str,
    hint: str = "",
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int | None = 0,
    known_mistakes: Sequence[tuple[Callable, str]] = (),
    forbid: Sequence[Any] | None = None,
    fallback: Any = None,
) -> CheckResult:
    """Check ``student_fn`` against ``reference_fn`` on every case; print one line; return the result.

    Both functions get their own copy of each case's inputs and the same ``torch`` seed
    (``seed=None`` leaves the random state alone). ``known_mistakes`` are ``(fn, message)``
    pairs: when the student's output matches ``fn``'s (say, attention without the
    $1/\\sqrt{d_k}$), ``message`` replaces the generic ``hint`` (a :class:`Hint` or a string).
    While the student's function runs, ``forbid`` (default: the reference itself) raises when called
    (:func:`forbidden`), so an answer that calls it fails. ``fallback`` (default: the reference) is what
    ``result.pick(student_fn)`` returns when the check failed.
    A failure raises :class:`ExerciseFailed` when ``GENLAB_STRICT_CHECKS=1``.
    """
    forbid = (reference_fn,) if forbid is None else tuple(forbid)
    fallback = reference_fn if fallback is None else fallback
    if mode() == "spec":
        capture_spec("function", name, reference_fn, cases, None, atol, rtol, seed, hint, known_mistakes, forbid)
    if mode() == "observe":
        observe_function(student_fn, cases, seed)
        return CheckResult(name, False, "observed", fallback)
    if not callable(student_fn):
        return _report(name, False, f"expected a function, got {type_name(student_fn)}", hint, fallback)
    if not cases:
        raise ValueError(f"check {name!r} has no cases")
    total = len(cases)
    for index, case in enumerate(cases):
        expected = run_case(reference_fn, case, seed)  # a failure here is a bug in the lab, not the student's
        where = case.describe(index, total)
        try:
            got = _run_student(student_fn, case, seed, forbid)
        except NotImplementedError:
            return _report(name, False, NOT_IMPLEMENTED, fallback=fallback)
        except Exception as err:  # noqa: BLE001 - any student error becomes a message
            message, called = student_error(err, where)
            return _report(name, False, message, "" if called else hint, fallback)
        message = difference(got, expected, atol=atol, rtol=rtol)
        if message:
            specific = known_mistake(got, case, known_mistakes, seed, atol, rtol)
            return _report(name, False, f"{where}: {message}", specific or hint, fallback)
    return _report(name, True, f"passed ({total} case{'s' if total != 1 else ''})", fallback=fallback)


def check_value(got: Any, expected: Any, *, name: str, hint: Hint | str = "", atol: float = 1e-5,
                rtol: float = 1e-4) -> CheckResult:
    """Check a value the student computed (a number, a tensor, a tuple ...) against the expected one."""
    message = difference(got, expected, atol=atol, rtol=rtol)
    if message:
        return _report(name, False, message, hint)
    return _report(name, True, "passed")


def check_module(
    student_cls: Callable[..., nn.Module],
    reference_cls: Callable[..., nn.Module],
    init: Case,
    cases: Sequence[Case],
    *,
    name: str,
    hint: Hint | str = "",
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int | None = 0,
    forbid: Sequence[Any] | None = None,
) -> CheckResult:
    """Check a student's layer class against the reference layer.

    Both are built with ``init`` (``cls(*init.args, **init.kwargs)``); the reference's
    weights are then loaded into the student's layer, so the student must use the same
    submodule/parameter names and shapes as the exercise asks (a mismatch is reported by
    name). Both run in ``eval()`` mode (no dropout) on every case, each on its own copy of
    the inputs and under the same seed; outputs are compared as in :func:`check_function`.
    While the student's layer runs, the reference class's ``forward`` (and ``forward``'s of ``forbid``)
    raises, so a subclass of the reference or a layer that wraps it fails.
    """
    forbid = (reference_cls,) if forbid is None else tuple(forbid)
    if mode() == "spec":
        capture_spec("module", name, reference_cls, cases, init, atol, rtol, seed, hint, (), forbid)
    if mode() == "observe":
        observe_module(student_cls, reference_cls, init, cases, seed)
        return CheckResult(name, False, "observed", reference_cls)

    def build(cls: Callable[..., nn.Module]) -> nn.Module:
        return run_case(cls, init, seed)

    def fail(detail: str, with_hint: bool = True) -> CheckResult:
        return _report(name, False, detail, hint if with_hint else "", reference_cls)

    reference = build(reference_cls).eval()
    try:
        student = build(student_cls)
    except NotImplementedError:
        return fail(NOT_IMPLEMENTED, with_hint=False)
    except Exception as err:  # noqa: BLE001
        return fail(f"building the layer raised {type(err).__name__}: {err}")
    if not isinstance(student, nn.Module):
        return fail(f"expected an nn.Module, got {type_name(student)}")
    student.eval()

    problem = load_reference_weights(student, reference)
    if problem:
        return fail(problem)

    total = len(cases)
    if not cases:
        raise ValueError(f"check {name!r} has no cases")
    for index, case in enumerate(cases):
        where = case.describe(index, total)
        with torch.no_grad():
            expected = run_case(reference, case, seed)
            try:
                got = _run_student(student, case, seed, forbid)
            except NotImplementedError:
                return fail(NOT_IMPLEMENTED, with_hint=False)
            except Exception as err:  # noqa: BLE001
                message, called = student_error(err, where)
                return fail(message, with_hint=not called)
        message = difference(got, expected, atol=atol, rtol=rtol)
        if message:
            return fail(f"{where}: {message}")
    return _report(name, True, f"passed ({total} case{'s' if total != 1 else ''})", fallback=reference_cls)
