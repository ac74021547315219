"""Exercise checks: compare a student's function (or layer) with the reference on fixed inputs.

A notebook exercise is a code cell in which the student writes a function, followed by a
cell that checks it::

    def attention(q, k, v, mask=None):
        # BEGIN SOLUTION
        ...
        # END SOLUTION

    check_attention(attention)   # -> "✅ attention: passed (5 cases)" or "❌ attention: ..."

The checks run the student's code and the reference on the same :class:`Case` inputs (each
on its own copy, so a function that works in place cannot corrupt the reference), with the
same random seed (so functions that sample noise can be checked too), compare the results
recursively and print **one line**: a pass, or what differed (which case, which field, the
shapes, the largest error) and a hint. A stub that still raises ``NotImplementedError``
gets "not implemented yet". The check returns ``True``/``False``.

**Graded where the student's code cannot decide.** A topic check is declared with :func:`graded`
(``@graded("attention")``). In a student's Jupyter it runs as above and prints its line: that is feedback, and
nothing it prints or returns is a grade. ``genlab grade`` (``lab_utils.commands.grading``) runs the same checks in two
halves: inside a sandbox, on inputs drawn for that run (:func:`case_seed`), a check only *observes* what the
student's code returns (``_MODE`` "observe", :class:`Observation`); the grader, in its own process, takes the
check's :class:`CheckSpec` (reference, cases, tolerances, hints: :func:`check_spec`) and :func:`judge` compares the
observed outputs with the reference outputs it computes itself. While the student's code runs, the reference it is
compared with (and whatever ``forbid=`` names) is replaced by a function that raises, so an answer that just calls
the reference fails with a message that says so (the grader's sandbox adds a guard that catches it under any name).

**Hints in two steps.** A :class:`Hint` has the idea (shown after the first wrong try) and a fuller
hint (shown from the second on); a recognised mistake gets its own message at once.

**The student's version, or the reference.** A check returns a :class:`CheckResult` (true when it
passed); ``result.pick(student_fn)`` is the student's function when it passed and otherwise the lab's
reference (with a note), so the rest of the notebook runs either way without importing the reference.

With ``GENLAB_STRICT_CHECKS=1`` a failed check raises :class:`ExerciseFailed` after
printing, so running the *solution* notebooks in the test suite fails when a solution (or a
reference it is compared with) is broken. ``GENLAB_SMOKE=1`` asks notebooks for tiny,
fast settings (:func:`smoke_mode`).

This module knows no lab. The topic-specific checks (``check_attention`` ...) live next to what they
check, as content of that lab: ``labs/<family>/exercises.py`` (``labs.text_encoder.exercises``,
``labs.gan.exercises`` ...) and ``labs/evaluator/exercises.py`` for the metrics; they are thin
wrappers that fix the cases and hints.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import numbers
import os
import threading
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "Case",
    "CheckResult",
    "ExerciseFailed",
    "Hint",
    "CheckSpec",
    "Observation",
    "case_seed",
    "check_function",
    "check_module",
    "check_spec",
    "check_value",
    "compare",
    "graded",
    "judge",
    "observe",
    "seeded_module",
    "smoke_mode",
    "strict_mode",
]

_TRUTHY = {"1", "true", "yes", "on"}
NOT_IMPLEMENTED = "not implemented yet — fill in the cell above and run this check again"
REFERENCE_CALLED = "genlab: the reference was called: "  # the message of the stand-in that raises


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
    """True when ``GENLAB_STRICT_CHECKS`` is 1/true/yes: a failed check raises :class:`ExerciseFailed`."""
    return _env_flag("GENLAB_STRICT_CHECKS")


class ExerciseFailed(AssertionError):
    """Raised by a failed check in strict mode (``GENLAB_STRICT_CHECKS=1``)."""


@dataclass
class Case:
    """One set of inputs: the function is called as ``fn(*args, **kwargs)``.

    ``label`` says what the case exercises ("with a key-padding mask"); it appears in messages.
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    label: str = ""

    def describe(self, index: int, total: int) -> str:
        return f"case {index + 1}/{total}" + (f" ({self.label})" if self.label else "")


# --------------------------------------------------------------------------- comparison


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "integer"


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _fields(obj: Any) -> list[str] | None:
    """Field names of a dataclass instance or a NamedTuple, else None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [f.name for f in dataclasses.fields(obj)]
    if _is_namedtuple(obj):
        return list(obj._fields)
    return None


def _type_name(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {_shape(obj)}"
    if obj is None:
        return "None"
    kind = type(obj).__name__
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def _compare_tensors(got: torch.Tensor, expected: torch.Tensor, where: str, atol: float, rtol: float) -> str | None:
    if _shape(got) != _shape(expected):
        return f"{where}: shape mismatch — got {_shape(got)}, expected {_shape(expected)}"
    if _kind(got.dtype) != _kind(expected.dtype):
        return f"{where}: dtype — got {got.dtype}, expected a {_kind(expected.dtype)} tensor like {expected.dtype}"
    got = got.detach().cpu()
    expected = expected.detach().cpu()
    if got.numel() == 0:
        return None
    if _kind(expected.dtype) in ("bool", "integer"):
        differ = got != expected  # exact
        if differ.any():
            first = tuple(int(i) for i in differ.nonzero()[0])
            return (f"{where}: {int(differ.sum())} of {got.numel()} entries differ "
                    f"(first at index {first}: got {got[first].item()}, expected {expected[first].item()})")
        return None
    got_c = got.to(torch.complex128 if got.is_complex() else torch.float64)
    exp_c = expected.to(got_c.dtype)
    bad_nan = torch.isnan(got_c) & ~torch.isnan(exp_c)
    if bad_nan.any():
        first = tuple(int(i) for i in bad_nan.nonzero()[0])
        return f"{where}: contains NaN at {int(bad_nan.sum())} of {got.numel()} positions (first at index {first})"
    bad_inf = torch.isinf(got_c) & ~torch.isinf(exp_c)
    if bad_inf.any():
        first = tuple(int(i) for i in bad_inf.nonzero()[0])
        return f"{where}: contains inf at {int(bad_inf.sum())} of {got.numel()} positions (first at index {first})"
    if torch.allclose(got_c, exp_c, atol=atol, rtol=rtol, equal_nan=True):
        return None
    error = (got_c - exp_c).abs().nan_to_num(nan=0.0, posinf=math.inf)
    flat = int(error.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), error.shape))
    g, e = got_c[index].item(), exp_c[index].item()
    return (f"{where}: values differ — max abs error {error.max().item():.3g} at index {index} "
            f"(got {g:.6g}, expected {e:.6g}; tolerance atol={atol:g}, rtol={rtol:g})")


def compare(got: Any, expected: Any, where: str = "output", *, atol: float = 1e-5, rtol: float = 1e-4) -> str | None:
    """Recursively compare ``got`` with ``expected``; ``None`` if they match, else what differed.

    Tensors: shape, dtype kind (bool / integer / floating / complex) and ``allclose``;
    numbers: ``isclose``; tuples and lists item by item; dicts key by key; dataclasses and
    NamedTuples field by field (by name); anything else with ``==``.
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{where}: got {_type_name(got)}, expected {_type_name(expected)}"
        return _compare_tensors(got, expected, where, atol, rtol)

    if isinstance(expected, numbers.Number) and not isinstance(expected, torch.Tensor):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()  # a 0-dim tensor where a number is expected is fine
        exact = isinstance(expected, (bool, numbers.Integral)) or isinstance(got, bool)
        if exact or not isinstance(got, numbers.Real) or not isinstance(expected, numbers.Real):
            return None if got == expected else f"{where}: got {got!r}, expected {expected!r}"
        got, expected = float(got), float(expected)
        if math.isnan(expected) and math.isnan(got):
            return None
        if not math.isclose(got, expected, rel_tol=rtol, abs_tol=atol):
            return f"{where}: got {got:.6g}, expected {expected:.6g} (abs error {abs(got - expected):.3g})"
        return None

    names = _fields(expected)
    if names is not None:
        if isinstance(got, tuple) and not _is_namedtuple(got) and _is_namedtuple(expected):
            if len(got) != len(names):
                return f"{where}: got a tuple of {len(got)} items, expected {len(names)} ({', '.join(names)})"
            got = type(expected)(*got)  # a plain tuple in the right order is fine
        for name in names:
            if not hasattr(got, name):
                return f"{where}: got {_type_name(got)} without the field `{name}` (expected {type(expected).__name__})"
            message = compare(getattr(got, name), getattr(expected, name), f"{where}.{name}", atol=atol, rtol=rtol)
            if message:
                return message
        return None

    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping):
            return f"{where}: got {_type_name(got)}, expected a dict with keys {sorted(map(str, expected))}"
        missing = [key for key in expected if key not in got]
        extra = [key for key in got if key not in expected]
        if missing or extra:
            return f"{where}: keys differ — missing {missing}, unexpected {extra}"
        for key in expected:
            message = compare(got[key], expected[key], f"{where}[{key!r}]", atol=atol, rtol=rtol)
            if message:
                return message
        return None

    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)):
            return f"{where}: got {_type_name(got)}, expected a {type(expected).__name__} of {len(expected)} items"
        if len(got) != len(expected):
            return f"{where}: got {len(got)} items, expected {len(expected)}"
        for index, (g, e) in enumerate(zip(got, expected)):
            message = compare(g, e, f"{where}[{index}]", atol=atol, rtol=rtol)
            if message:
                return message
        return None

    try:
        equal = bool(got == expected)
    except Exception:  # noqa: BLE001 - objects whose == is not a bool
        equal = got is expected
    return None if equal else f"{where}: got {got!r}, expected {expected!r}"



# --------------------------------------------------------------------------- hints, results, records


@dataclass(frozen=True)
class Hint:
    """What a failed check suggests: ``idea`` after the first wrong try (what to think about, not the code),
    ``detail`` from the second on (a fuller hint; empty: the idea again)."""

    idea: str
    detail: str = ""

    def for_attempt(self, failures: int) -> str:
        return self.idea if failures <= 1 or not self.detail else self.detail


_FAILURES: dict[str, int] = {}  # failed tries per check name in this process (which hint to show)


def _hint_text(name: str, hint: Hint | str) -> str:
    _FAILURES[name] = _FAILURES.get(name, 0) + 1
    return hint.for_attempt(_FAILURES[name]) if isinstance(hint, Hint) else hint


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


_GRADED: list[str] = []  # the graded checks running now (innermost last)
_ANSWERS: dict[str, Any] = {}  # exercise -> what the notebook last gave its check (the grader observes that)
_SEQUENCE = [0]
# --------------------------------------------------------------------------- grading: spec, observation, judgement

_MODE_LOCK = threading.RLock()  # check_spec and observe switch the mode of the whole process: one at a time
_MODE = ["feedback"]  # "feedback" (a notebook), "spec" (the grader learns a check), "observe" (the grader's sandbox)
_DRAW = [0]  # 0: the notebook's fixed inputs; else the grading run's draw (case_seed)
_OBSERVED: list["Observation"] = []  # what checks observed in "observe" mode (read by the grader's sandbox)


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
        mode, previous = _MODE[0], _DRAW[0]
        _MODE[0], _DRAW[0] = "spec", draw
        try:
            check(_unwritten)
        except _SpecCaptured as captured:
            return captured.spec
        finally:
            _MODE[0], _DRAW[0] = mode, previous
    raise TypeError(f"{getattr(check, '__name__', check)!r} is not a graded check (it never compared anything)")


def observe(check: Callable[..., Any], answer: Any, draw: int = 0) -> list[Observation]:
    """What a :func:`graded` check observes of ``answer`` on the inputs of ``draw``, without judging it (the half of a
    check that runs in the grader's sandbox; :func:`judge` is the other half)."""
    with _MODE_LOCK:
        mode, previous = _MODE[0], _DRAW[0]
        _MODE[0], _DRAW[0] = "observe", draw
        start = len(_OBSERVED)
        try:
            check(answer)
        finally:
            _MODE[0], _DRAW[0] = mode, previous
        observed = _OBSERVED[start:]
        del _OBSERVED[start:]
    return observed


def _spec(kind: str, name: str, reference: Any, cases: Sequence[Case], init: Case | None, atol: float, rtol: float,
          seed: int | None, hint: Hint | str, known_mistakes: Sequence[tuple[Callable, str]], forbid: tuple) -> None:
    exercise = _GRADED[-1] if _GRADED else name
    raise _SpecCaptured(CheckSpec(exercise, name, kind, reference, list(cases), init, atol, rtol, seed, hint,
                                  tuple(known_mistakes), tuple(forbid)))


def _observe_function(student_fn: Callable, cases: Sequence[Case], seed: int | None) -> None:
    """"observe" mode: the student's outputs on every case (the reference is not run: the grader runs it)."""
    observation = Observation(_GRADED[-1] if _GRADED else "")
    _OBSERVED.append(observation)
    if not callable(student_fn):
        observation.error = f"expected a function, got {_type_name(student_fn)}"
        return
    for index, case in enumerate(cases):
        try:
            observation.outputs.append(_call(student_fn, case, seed))
        except NotImplementedError:
            observation.not_implemented = True
            return
        except Exception as err:  # noqa: BLE001 - any student error is an observation
            message, called = _student_error(err, case.describe(index, len(cases)))
            observation.error = message
            if called:
                observation.reference_called = message
            return


def _observe_module(student_cls: Callable[..., nn.Module], reference_cls: Callable[..., nn.Module], init: Case,
                    cases: Sequence[Case], seed: int | None) -> None:
    """"observe" mode for a layer: build it, give it the reference's weights, its outputs on every case."""
    observation = Observation(_GRADED[-1] if _GRADED else "")
    _OBSERVED.append(observation)
    try:
        student = _call(student_cls, init, seed)
    except NotImplementedError:
        observation.not_implemented = True
        return
    except Exception as err:  # noqa: BLE001
        observation.error = f"building the layer raised {type(err).__name__}: {err}"
        return
    if not isinstance(student, nn.Module):
        observation.error = f"expected an nn.Module, got {_type_name(student)}"
        return
    problem = _load_reference_weights(student.eval(), _call(reference_cls, init, seed).eval())
    if problem:
        observation.error = problem
        return
    for index, case in enumerate(cases):
        try:
            with torch.no_grad():
                observation.outputs.append(_call(student, case, seed))
        except NotImplementedError:
            observation.not_implemented = True
            return
        except Exception as err:  # noqa: BLE001
            observation.error, called = _student_error(err, case.describe(index, len(cases)))
            if called:
                observation.reference_called = observation.error
            return


def _load_reference_weights(student: nn.Module, reference: nn.Module) -> str | None:
    """Load the reference layer's weights into the student's; what differed in their names or shapes, if anything."""
    ref_state, stu_state = reference.state_dict(), student.state_dict()
    missing = [key for key in ref_state if key not in stu_state]
    extra = [key for key in stu_state if key not in ref_state]
    if missing or extra:
        return f"parameter names differ — missing {missing}, unexpected {extra}"
    for key, value in ref_state.items():
        if _shape(stu_state[key]) != _shape(value):
            return f"parameter `{key}`: shape {_shape(stu_state[key])}, expected {_shape(value)}"
    student.load_state_dict(ref_state)
    return None


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
        reference = _call(spec.reference, spec.init, spec.seed).eval()
    for index, case in enumerate(spec.cases):
        where = case.describe(index, total)
        if index >= len(observation.outputs):
            if observation.not_implemented:
                return False, NOT_IMPLEMENTED
            if observation.error:
                return False, observation.error + (f" — hint: {hint}" if hint else "")
            return False, f"{where}: no output (the check did not finish)"
        with torch.no_grad() if spec.kind == "module" else contextlib.nullcontext():
            expected = _call(reference, case, spec.seed)
        got = observation.outputs[index]
        message = compare(got, expected, atol=spec.atol, rtol=spec.rtol)
        if message:
            specific = _diagnose(got, case, spec.known_mistakes, spec.seed, spec.atol, spec.rtol)
            text = specific or hint
            return False, f"{where}: {message}" + (f" — hint: {text}" if text else "")
    if observation.not_implemented or observation.error:
        return False, observation.error or NOT_IMPLEMENTED
    return True, f"passed ({total} case{'s' if total != 1 else ''})"


def graded(exercise: str) -> Callable[[Callable[..., CheckResult]], Callable[..., CheckResult]]:
    """Declare a topic check as the graded check of ``exercise`` (the id the notebook's metadata gives points
    to): while it runs, the result it reports is written to the grading record."""

    def decorate(check: Callable[..., CheckResult]) -> Callable[..., CheckResult]:
        @functools.wraps(check)
        def run(*args: Any, **kwargs: Any) -> CheckResult:
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


# --------------------------------------------------------------------------- the reference may not be called


def _raising_code(name: str, free_vars: int) -> types.CodeType:
    """The code of ``def name(*args, **kwargs): raise RuntimeError(...)`` with ``free_vars`` closure cells
    (a function's code can be swapped only for one with as many), using builtins only: it runs with the
    swapped function's globals."""
    cells = [f"cell{i}" for i in range(free_vars)]
    lines = ["def outer():"] + [f"    {cell} = None" for cell in cells] + [
        "    def inner(*args, **kwargs):",
        f"        ({', '.join(cells)},)" if cells else "        pass",
        f"        raise RuntimeError({(REFERENCE_CALLED + name)!r})",
        "    return inner"]
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(lines), "<genlab reference stand-in>", "exec"), namespace)  # noqa: S102 - our own text
    return namespace["outer"]().__code__.replace(co_name=name)


def _describe(target: Any) -> str:
    if isinstance(target, tuple):
        owner, attribute = target
        return f"{getattr(owner, '__name__', type(owner).__name__)}.{attribute}"
    return getattr(target, "__qualname__", getattr(target, "__name__", repr(target)))


@contextlib.contextmanager
def forbidden(targets: Sequence[Any]) -> Iterator[None]:
    """Within the block, each target raises ``RuntimeError(REFERENCE_CALLED + name)`` when called, however the
    caller reached it: a Python function (its code is swapped, so every alias is caught), an ``nn.Module``
    class (its ``forward``), or an ``(owner, attribute)`` pair (the attribute is replaced, e.g. a torch built-in)."""
    restore: list[Callable[[], None]] = []
    try:
        for target in targets:
            name = _describe(target)
            if isinstance(target, tuple):
                owner, attribute = target
                original = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)

                def stand_in(*args: Any, _name: str = name, **kwargs: Any) -> Any:
                    raise RuntimeError(REFERENCE_CALLED + _name)

                setattr(owner, attribute, stand_in)
                restore.append(functools.partial(setattr, owner, attribute, original))
            elif isinstance(target, type) and issubclass(target, nn.Module):
                original = target.__dict__["forward"]
                target.forward = types.FunctionType(_raising_code(name, 0), {"__builtins__": __builtins__})
                restore.append(functools.partial(setattr, target, "forward", original))
            elif isinstance(target, types.FunctionType):
                code = target.__code__
                target.__code__ = _raising_code(name, len(code.co_freevars))
                restore.append(functools.partial(setattr, target, "__code__", code))
            else:
                raise TypeError(f"cannot forbid {target!r}: give a function, an nn.Module class or (owner, name)")
        yield
    finally:
        for undo in reversed(restore):
            undo()


def _called_reference(err: BaseException) -> str | None:
    """The name of the forbidden reference whose stand-in raised ``err`` (or a cause of it), if any."""
    seen = 0
    while err is not None and seen < 10:
        text = str(err)
        if REFERENCE_CALLED in text:
            return text.split(REFERENCE_CALLED, 1)[1].split()[0].strip("'\"")
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def _reference_message(name: str) -> str:
    return (f"your code calls the lab's `{name}`, the very thing this exercise asks you to write: "
            f"write it from the operations themselves")


# --------------------------------------------------------------------------- running


def _copy(obj: Any) -> Any:
    """A deep copy in which tensors are detached clones (keeping ``requires_grad`` on float leaves)."""
    if isinstance(obj, torch.Tensor):
        out = obj.detach().clone()
        if obj.requires_grad and (out.is_floating_point() or out.is_complex()):
            out.requires_grad_(True)
        return out
    if isinstance(obj, nn.Module):
        return copy.deepcopy(obj)
    if _is_namedtuple(obj):
        return type(obj)(*(_copy(item) for item in obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _copy(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                          if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(item) for item in obj)
    if isinstance(obj, dict):
        return type(obj)((key, _copy(value)) for key, value in obj.items())
    try:
        return copy.deepcopy(obj)
    except Exception:  # noqa: BLE001 - uncopyable objects (generators...) are shared
        return obj


def _call(fn: Callable, case: Case, seed: int | None) -> Any:
    """``fn(*args, **kwargs)`` on copies of the case's inputs, under a fixed seed if given."""
    args, kwargs = _copy(tuple(case.args)), _copy(dict(case.kwargs))
    if seed is None:
        return fn(*args, **kwargs)
    with torch.random.fork_rng(devices=[]):  # the notebook's own random stream is left untouched
        torch.manual_seed(seed)
        return fn(*args, **kwargs)


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
        return _call(fn, case, seed)


def _student_error(err: Exception, where: str) -> tuple[str, bool]:
    """What to print for an exception from the student's code, and whether it was a call of the reference."""
    called = _called_reference(err)
    if called is not None:
        return f"{where}: {_reference_message(called)}", True
    return f"{where} raised {type(err).__name__}: {err}", False


def _diagnose(got: Any, case: Case, known_mistakes: Sequence[tuple[Callable, str]], seed: int | None,
              atol: float, rtol: float) -> str | None:
    """The message of the first known mistake whose output matches the student's, if any."""
    for mistaken_fn, message in known_mistakes:
        try:
            if compare(got, _call(mistaken_fn, case, seed), atol=atol, rtol=rtol) is None:
                return message
        except Exception:  # noqa: BLE001 - a mistake model that does not apply to this case
            continue
    return None


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
    if _MODE[0] == "spec":
        _spec("function", name, reference_fn, cases, None, atol, rtol, seed, hint, known_mistakes, forbid)
    if _MODE[0] == "observe":
        _observe_function(student_fn, cases, seed)
        return CheckResult(name, False, "observed", fallback)
    if not callable(student_fn):
        return _report(name, False, f"expected a function, got {_type_name(student_fn)}", hint, fallback)
    if not cases:
        raise ValueError(f"check {name!r} has no cases")
    total = len(cases)
    for index, case in enumerate(cases):
        expected = _call(reference_fn, case, seed)  # a failure here is a bug in the lab, not the student's
        where = case.describe(index, total)
        try:
            got = _run_student(student_fn, case, seed, forbid)
        except NotImplementedError:
            return _report(name, False, NOT_IMPLEMENTED, fallback=fallback)
        except Exception as err:  # noqa: BLE001 - any student error becomes a message
            message, called = _student_error(err, where)
            return _report(name, False, message, "" if called else hint, fallback)
        message = compare(got, expected, atol=atol, rtol=rtol)
        if message:
            specific = _diagnose(got, case, known_mistakes, seed, atol, rtol)
            return _report(name, False, f"{where}: {message}", specific or hint, fallback)
    return _report(name, True, f"passed ({total} case{'s' if total != 1 else ''})", fallback=fallback)


def check_value(got: Any, expected: Any, *, name: str, hint: Hint | str = "", atol: float = 1e-5,
                rtol: float = 1e-4) -> CheckResult:
    """Check a value the student computed (a number, a tensor, a tuple ...) against the expected one."""
    message = compare(got, expected, atol=atol, rtol=rtol)
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
    if _MODE[0] == "spec":
        _spec("module", name, reference_cls, cases, init, atol, rtol, seed, hint, (), forbid)
    if _MODE[0] == "observe":
        _observe_module(student_cls, reference_cls, init, cases, seed)
        return CheckResult(name, False, "observed", reference_cls)

    def build(cls: Callable[..., nn.Module]) -> nn.Module:
        return _call(cls, init, seed)

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
        return fail(f"expected an nn.Module, got {_type_name(student)}")
    student.eval()

    problem = _load_reference_weights(student, reference)
    if problem:
        return fail(problem)

    total = len(cases)
    if not cases:
        raise ValueError(f"check {name!r} has no cases")
    for index, case in enumerate(cases):
        where = case.describe(index, total)
        with torch.no_grad():
            expected = _call(reference, case, seed)
            try:
                got = _run_student(student, case, seed, forbid)
            except NotImplementedError:
                return fail(NOT_IMPLEMENTED, with_hint=False)
            except Exception as err:  # noqa: BLE001
                message, called = _student_error(err, where)
                return fail(message, with_hint=not called)
        message = compare(got, expected, atol=atol, rtol=rtol)
        if message:
            return fail(f"{where}: {message}")
    return _report(name, True, f"passed ({total} case{'s' if total != 1 else ''})", fallback=reference_cls)
