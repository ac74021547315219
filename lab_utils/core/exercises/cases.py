"""What a check runs: its inputs (:class:`Case`), its hints (:class:`Hint`), and one call of a function on them.

The notebook's check (:mod:`~lab_utils.core.exercises.checks`) and the grader's judge
(:mod:`~lab_utils.core.exercises.records`) run the reference the same way, so both use what is here:
:func:`run_case` calls a function on its own copy of a case's inputs (so a function that works in place cannot
corrupt the reference) under the case's seed (so functions that sample noise can be checked too, while the
notebook's own random stream is left alone); :func:`known_mistake` recognises a known wrong answer;
:func:`load_reference_weights` gives a student's layer the reference layer's weights.

**Hints in two steps.** A :class:`Hint` has the idea (shown after the first wrong try) and a fuller
hint (shown from the second on); a recognised mistake gets its own message at once.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lab_utils.core.exercises.difference import difference, is_namedtuple

__all__ = ["NOT_IMPLEMENTED", "Case", "Hint", "detached_copy", "known_mistake", "load_reference_weights",
           "run_case"]

NOT_IMPLEMENTED = "not implemented yet — fill in the cell above and run this check again"


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


@dataclass(frozen=True)
class Hint:
    """What a failed check suggests: ``idea`` after the first wrong try (what to think about, not the code),
    ``detail`` from the second on (a fuller hint; empty: the idea again)."""

    idea: str
    detail: str = ""

    def for_attempt(self, failures: int) -> str:
        return self.idea if failures <= 1 or not self.detail else self.detail


def detached_copy(obj: Any) -> Any:
    """A deep copy in which tensors are detached clones (keeping ``requires_grad`` on float leaves)."""
    if isinstance(obj, torch.Tensor):
        out = obj.detach().clone()
        if obj.requires_grad and (out.is_floating_point() or out.is_complex()):
            out.requires_grad_(True)
        return out
    if isinstance(obj, nn.Module):
        return copy.deepcopy(obj)
    if is_namedtuple(obj):
        return type(obj)(*(detached_copy(item) for item in obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: detached_copy(getattr(obj, f.name))
                                          for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached_copy(item) for item in obj)
    if isinstance(obj, dict):
        return type(obj)((key, detached_copy(value)) for key, value in obj.items())
    try:
        return copy.deepcopy(obj)
    except Exception:  # noqa: BLE001 - uncopyable objects (generators...) are shared
        return obj


def run_case(fn: Callable, case: Case, seed: int | None) -> Any:
    """``fn(*args, **kwargs)`` on copies of the case's inputs, under a fixed seed if given."""
    args, kwargs = detached_copy(tuple(case.args)), detached_copy(dict(case.kwargs))
    if seed is None:
        return fn(*args, **kwargs)
    with torch.random.fork_rng(devices=[]):  # the notebook's own random stream is left untouched
        torch.manual_seed(seed)
        return fn(*args, **kwargs)


def known_mistake(got: Any, case: Case, known_mistakes: Sequence[tuple[Callable, str]], seed: int | None,
                  atol: float, rtol: float) -> str | None:
    """The message of the first known mistake whose output matches the student's, if any."""
    for mistaken_fn, message in known_mistakes:
        try:
            if difference(got, run_case(mistaken_fn, case, seed), atol=atol, rtol=rtol) is None:
                return message
        except Exception:  # noqa: BLE001 - a mistake model that does not apply to this case
            continue
    return None


def load_reference_weights(student: nn.Module, reference: nn.Module) -> str | None:
    """Load the reference layer's weights into the student's; what differed in their names or shapes, if anything."""
    ref_state, stu_state = reference.state_dict(), student.state_dict()
    missing = [key for key in ref_state if key not in stu_state]
    extra = [key for key in stu_state if key not in ref_state]
    if missing or extra:
        return f"parameter names differ — missing {missing}, unexpected {extra}"
    for key, value in ref_state.items():
        if tuple(stu_state[key].shape) != tuple(value.shape):
            return f"parameter `{key}`: shape {tuple(stu_state[key].shape)}, expected {tuple(value.shape)}"
    student.load_state_dict(ref_state)
    return None
