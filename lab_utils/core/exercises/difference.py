"""The structural comparison of an output with the expected one: :func:`difference` says where they first differ.

A check compares what the student's code returned with what the reference returned, and the student reads the
first difference in one line: which field (``output.logvar``, ``output['b']``, ``output[1]``), then what differs:

- tensors: the shape, the dtype's kind (bool / integer / floating / complex), then the values: exact for bool and
  integer tensors (how many entries differ, the first one), ``allclose`` for the others (a NaN or inf the expected
  output does not have, else the largest error, its index and the tolerance);
- numbers: ``isclose`` (exact for integers and bools; a 0-dim tensor where a number is expected is fine);
- tuples and lists item by item, dicts key by key, dataclasses and NamedTuples field by field, by name (a plain
  tuple in the right order stands for a NamedTuple);
- anything else with ``==``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["difference", "is_namedtuple", "type_name"]


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


def is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _fields(obj: Any) -> list[str] | None:
    """Field names of a dataclass instance or a NamedTuple, else None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [f.name for f in dataclasses.fields(obj)]
    if is_namedtuple(obj):
        return list(obj._fields)
    return None


def type_name(obj: Any) -> str:
    """What ``obj`` is, for a message: "a torch.float32 tensor of shape (2, 3)", "None", "an int"."""
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {_shape(obj)}"
    if obj is None:
        return "None"
    kind = type(obj).__name__
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def _tensor_difference(got: torch.Tensor, expected: torch.Tensor, where: str, atol: float,
                       rtol: float) -> str | None:
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


def difference(got: Any, expected: Any, where: str = "output", *, atol: float = 1e-5,
               rtol: float = 1e-4) -> str | None:
    """The first difference between ``got`` and ``expected``, recursively, as one line for the student (``where``
    names the value: "output", then "output.mu", "output[1]" ...); ``None`` when they match.

    Tensors: shape, dtype kind (bool / integer / floating / complex) and ``allclose``;
    numbers: ``isclose``; tuples and lists item by item; dicts key by key; dataclasses and
    NamedTuples field by field (by name); anything else with ``==``.
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{where}: got {type_name(got)}, expected {type_name(expected)}"
        return _tensor_difference(got, expected, where, atol, rtol)

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
        if isinstance(got, tuple) and not is_namedtuple(got) and is_namedtuple(expected):
            if len(got) != len(names):
                return f"{where}: got a tuple of {len(got)} items, expected {len(names)} ({', '.join(names)})"
            got = type(expected)(*got)  # a plain tuple in the right order is fine
        for name in names:
            if not hasattr(got, name):
                return f"{where}: got {type_name(got)} without the field `{name}` (expected {type(expected).__name__})"
            message = difference(getattr(got, name), getattr(expected, name), f"{where}.{name}", atol=atol, rtol=rtol)
            if message:
                return message
        return None

    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping):
            return f"{where}: got {type_name(got)}, expected a dict with keys {sorted(map(str, expected))}"
        missing = [key for key in expected if key not in got]
        extra = [key for key in got if key not in expected]
        if missing or extra:
            return f"{where}: keys differ — missing {missing}, unexpected {extra}"
        for key in expected:
            message = difference(got[key], expected[key], f"{where}[{key!r}]", atol=atol, rtol=rtol)
            if message:
                return message
        return None

    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)):
            return f"{where}: got {type_name(got)}, expected a {type(expected).__name__} of {len(expected)} items"
        if len(got) != len(expected):
            return f"{where}: got {len(got)} items, expected {len(expected)}"
        for index, (g, e) in enumerate(zip(got, expected)):
            message = difference(g, e, f"{where}[{index}]", atol=atol, rtol=rtol)
            if message:
                return message
        return None

    try:
        equal = bool(got == expected)
    except Exception:  # noqa: BLE001 - objects whose == is not a bool
        equal = got is expected
    return None if equal else f"{where}: got {got!r}, expected {expected!r}"
