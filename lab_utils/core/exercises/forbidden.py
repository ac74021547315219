"""The reference may not be called: while a student's code runs, what it is compared with raises.

An answer that just calls the lab's own ``scaled_dot_product_attention`` would pass its check without the student
writing anything. So while the student's code runs, :func:`forbidden` replaces the reference (and whatever a check
names in ``forbid=``) by a stand-in that raises ``RuntimeError(REFERENCE_CALLED + name)``, however the student
reached it: a Python function gets the stand-in's *code* (its code object is swapped, so every alias and every
``from ... import`` of it is caught), an ``nn.Module`` class gets a raising ``forward``, and an ``(owner,
attribute)`` pair (a torch built-in) is replaced on its owner. :func:`student_error` then turns the exception into
the message that names the reference. (The grader's sandbox adds a guard that catches a call under any name:
``lab_utils.commands.grade_runner``.)
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

__all__ = ["REFERENCE_CALLED", "forbidden", "student_error"]

REFERENCE_CALLED = "genlab: the reference was called: "  # the message of the stand-in that raises


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


def student_error(err: Exception, where: str) -> tuple[str, bool]:
    """What to print for an exception from the student's code, and whether it was a call of the reference."""
    called = _called_reference(err)
    if called is not None:
        return f"{where}: {_reference_message(called)}", True
    return f"{where} raised {type(err).__name__}: {err}", False
