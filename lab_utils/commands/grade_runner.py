"""What ``genlab grade`` runs inside its sandbox: a student's notebook, then each graded check's observation.

    python -m lab_utils.commands.grade_runner <work folder>      # stdin: the run's draw, written by the grader

The grader (``lab_utils.commands.grading``) writes ``plan.json`` in the work folder (the notebook's code cells and, per
exercise, the instructor's check: its module, its name and the name of the student's answer it is given) and the
run's draw on this process's stdin. Nothing here decides a grade: the grader reads what this writes as data.

Phase 1 runs the student's cells in order in one IPython shell (their own check cells print feedback, as in
Jupyter). Phase 2 reads the draw (if a cell read it first, there is none left: the grader scores nothing) and, for
each exercise, forks a child that puts a guard in place *before* any check code runs, then observes the student's
answer on the inputs of that draw:

- a profile hook writes a line to the grader for every call of the exercise's reference and of what its check
  forbids, under any name: Python functions by their code (a copy of the code object, a module reloaded or the
  source re-executed has equal code), torch built-ins by identity and by operator name (``torch.ops.aten...``);
- an audit hook (which cannot be removed) refuses, in the child, new processes and threads, ctypes, the garbage
  collector's object lists, replacing a function's code, and another profile hook; and always refuses another
  audit hook and the object lists.

Everything the guard needs is captured before the first student cell runs: the code below keeps it in local
variables and default arguments, which a cell cannot rebind.
"""

from __future__ import annotations

import _thread
import functools
import importlib
import json
import os
import select
import signal
import sys
import types
from pathlib import Path
from typing import Any

import torch

from lab_utils.core.exercises import records

MAX_OUTPUT_BYTES = 256 * 2**20  # what one observation may send back
VIOLATION = b"\nV "  # a line the guard writes for each forbidden call (the grader counts them)


# --------------------------------------------------------------------------- encoding outputs as data
def encode(value: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    """``value`` as JSON, with its tensors stored by key in ``tensors`` (for safetensors): no pickle crosses."""
    if depth > 20:
        return {"t": "other", "repr": "(nested too deeply)"}
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"t": "tensor", "k": key}
    if value is None or isinstance(value, (bool, int, str)):
        return {"t": "value", "v": value if not isinstance(value, str) else value[:1000]}
    if isinstance(value, float):
        return {"t": "float", "v": repr(value)}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {"t": "fields", "type": type(value).__name__, "named": True,
                "fields": {name: encode(getattr(value, name), tensors, depth + 1) for name in value._fields}}
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        return {"t": "fields", "type": type(value).__name__, "named": False,
                "fields": {name: encode(getattr(value, name), tensors, depth + 1)
                           for name in value.__dataclass_fields__}}
    if isinstance(value, (list, tuple)):
        return {"t": type(value).__name__, "items": [encode(item, tensors, depth + 1) for item in value[:10000]]}
    if isinstance(value, dict):
        return {"t": "dict", "items": [[encode(key, tensors, depth + 1), encode(item, tensors, depth + 1)]
                                       for key, item in list(value.items())[:10000]]}
    return {"t": "other", "repr": repr(value)[:200]}


class Opaque:
    """An output that was neither a tensor, a number nor a container: equal to nothing, shown as it was."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = None  # type: ignore[assignment]


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode` (in the grader, on data): unknown shapes become :class:`Opaque`."""
    import collections

    kind = tree.get("t") if isinstance(tree, dict) else None
    if kind == "tensor":
        return tensors.get(str(tree.get("k")), Opaque("(a missing tensor)"))
    if kind == "value":
        value = tree.get("v")
        return value if value is None or isinstance(value, (bool, int, str)) else Opaque(repr(value))
    if kind == "float":
        try:
            return float(tree.get("v"))
        except (TypeError, ValueError):
            return Opaque(str(tree.get("v"))[:100])
    if kind in ("list", "tuple"):
        items = [decode(item, tensors) for item in tree.get("items", [])]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        out = {}
        for pair in tree.get("items", []):
            if isinstance(pair, list) and len(pair) == 2:
                key = decode(pair[0], tensors)
                out[key if isinstance(key, (str, int, bool, float, type(None))) else repr(key)] = decode(pair[1],
                                                                                                          tensors)
        return out
    if kind == "fields" and isinstance(tree.get("fields"), dict):
        names = [name for name in tree["fields"] if isinstance(name, str) and name.isidentifier()]
        values = [decode(tree["fields"][name], tensors) for name in names]
        if tree.get("named"):
            try:
                return collections.namedtuple(str(tree.get("type", "Output"))[:50], names)(*values)
            except ValueError:
                pass
        return types.SimpleNamespace(**dict(zip(names, values)))
    return Opaque(str(tree.get("repr", "?"))[:200] if isinstance(tree, dict) else "?")


def encode_observations(observations: list[records.Observation]) -> bytes:
    """One child's observations: a length-prefixed JSON document, then a safetensors file of its tensors."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    document = [{"exercise": item.exercise, "outputs": [encode(output, tensors) for output in item.outputs],
                 "error": item.error, "not_implemented": item.not_implemented,
                 "reference_called": item.reference_called} for item in observations]
    text = json.dumps(document).encode()
    blob = save(tensors) if tensors else b""
    return len(text).to_bytes(8, "little") + text + blob


def decode_observations(data: bytes) -> list[records.Observation]:
    """The grader's reading of :func:`encode_observations` (data only: JSON and safetensors); ValueError if garbled."""
    from safetensors.torch import load

    if len(data) < 8:
        raise ValueError("no observation")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("a truncated observation")
    document = json.loads(data[8:8 + size])
    blob = data[8 + size:]
    tensors = load(blob) if blob else {}
    if not isinstance(document, list):
        raise ValueError("not a list of observations")
    out = []
    for entry in document:
        if not isinstance(entry, dict):
            raise ValueError("not an observation")
        out.append(records.Observation(
            str(entry.get("exercise", "")), [decode(item, tensors) for item in entry.get("outputs", [])],
            None if entry.get("error") is None else str(entry["error"])[:2000], entry.get("not_implemented") is True,
            None if entry.get("reference_called") is None else str(entry["reference_called"])[:2000]))
    return out


# --------------------------------------------------------------------------- what a check forbids
def forbidden_sets(spec: records.CheckSpec) -> tuple[frozenset, frozenset, frozenset]:
    """(code objects, built-in functions, operator names) the guard reports for ``spec``: its reference and what its
    check forbids. A module check's reference builds the layer the student's gets its weights from: only the
    ``forward`` of the classes it names is forbidden."""
    codes, builtins, names = set(), set(), set()
    targets = list(spec.forbid) + ([spec.reference] if spec.kind == "function" else [])
    index = 0
    while index < min(len(targets), 1000):
        target, index = targets[index], index + 1
        if isinstance(target, tuple):
            owner, attribute = target
            target = owner.__dict__.get(attribute) if isinstance(owner, type) else getattr(owner, attribute, None)
        if isinstance(target, type):
            target = getattr(target, "forward", None)
        elif spec.kind == "module" and isinstance(target, types.FunctionType):
            continue  # a builder of the reference layer (the observer calls it for the weights): its forward counts
        if isinstance(target, types.FunctionType) and target.__closure__:
            # a wrapper the check also puts around the student's answer (its code is theirs too): forbid what it wraps
            targets += [cell.cell_contents for cell in target.__closure__
                        if isinstance(getattr(cell, "cell_contents", None), (types.FunctionType, type))]
        elif isinstance(target, types.FunctionType):
            codes.add(target.__code__)
        elif isinstance(target, types.BuiltinFunctionType):
            builtins.add(target)
            names.add(target.__name__)
    return frozenset(codes), frozenset(builtins), frozenset(names)


def _op_codes() -> frozenset:
    """The code of ``torch.ops``' Python ``__call__``s (an operator called through ``torch.ops.aten.<name>``)."""
    from torch import _ops

    found = set()
    for cls_name in ("OpOverloadPacket", "OpOverload"):
        call = getattr(getattr(_ops, cls_name, None), "__call__", None)
        if isinstance(call, types.FunctionType):
            found.add(call.__code__)
    return frozenset(found)


def _profile(guard, frame, event, arg):
    """The child's profile hook: writes a violation line for a forbidden call (never raises: a profile hook that
    raises is removed). ``guard`` = (codes, builtins, names, op codes, fd, write, str, getattr)."""
    codes, builtins, names, op_codes, fd, write, text, attribute = guard
    if event == "call":
        code = frame.f_code
        if code in codes:
            write(fd, b"\nV " + text(code.co_name).encode() + b"\n")
        elif code in op_codes:
            owner = frame.f_locals.get("self")
            label = text(attribute(owner, "_name", "") or attribute(owner, "__name__", ""))
            for name in names:
                if name in label:
                    write(fd, b"\nV " + name.encode() + b"\n")
    elif event == "c_call" and (arg in builtins or (attribute(arg, "__name__", "") in names
                                                      and text(attribute(arg, "__module__", "")).startswith("torch"))):
        write(fd, b"\nV " + text(attribute(arg, "__name__", "?")).encode() + b"\n")


CHILD_REFUSED = ("os.fork", "os.forkpty", "os.posix_spawn", "os.system", "os.exec", "os.spawn", "subprocess.Popen",
                 "os.kill", "os.killpg", "sys.settrace", "sys.setprofile")
ALWAYS_REFUSED = ("sys.addaudithook", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                  "sys._current_frames")
REFUSED_ATTRIBUTES = ("__code__", "__defaults__", "__kwdefaults__", "__closure__")


def _make_audit(start_pid: int, state: list, protected: tuple, getpid=os.getpid, write=os.write,
                startswith=str.startswith, child_refused=CHILD_REFUSED, always_refused=ALWAYS_REFUSED,
                attributes=REFUSED_ATTRIBUTES, error=PermissionError):
    """The audit hook. ``state`` (reachable only through the hook, which Python cannot list) holds the violation
    fd of a child and whether its one profile hook was installed."""

    def audit(event, args):
        if event in always_refused or (state[2] and event == "sys._getframe" and getpid() == start_pid):
            raise error(f"genlab grade: {event} is not allowed while grading")
        if event == "genlab.child":
            state[0], state[1] = args[0], True  # the violation fd; one sys.setprofile to come
            return
        if event == "genlab.phase2":
            state[2] = True
            return
        if event == "object.__setattr__" and len(args) > 1 and any(args[0] is item for item in protected):
            raise error("genlab grade: the grader's own functions cannot be changed")
        if event == "object.__setattr__" and len(args) > 1 and args[1] in attributes and state[0] is not None:
            write(state[0], b"\nV (a function's code was replaced)\n")
            raise error("genlab grade: replacing a function's code is not allowed while grading")
        if getpid() == start_pid:
            return
        if event == "sys.setprofile" and state[1]:
            state[1] = False
            return
        if event in child_refused or startswith(event, "ctypes.") or startswith(event, "_thread"):
            if state[0] is not None:
                write(state[0], b"\nV (" + event.encode() + b" while grading)\n")
            raise error(f"genlab grade: {event} is not allowed while a check runs")

    return audit


# --------------------------------------------------------------------------- the runner
def main(folder: str) -> int:
    work = Path(folder)
    plan = json.loads((work / "plan.json").read_text(encoding="utf-8"))
    from IPython.core.interactiveshell import InteractiveShell

    checks = []
    for entry in plan["checks"]:
        check = getattr(importlib.import_module(entry["module"]), entry["check"])
        spec = records.check_spec(check)
        checks.append((entry["exercise"], check, entry["argument"], forbidden_sets(spec)))
    op_codes = _op_codes()
    spawners = frozenset({_thread.start_new_thread, os.fork, os.system, os.execv, os.execve})  # no helpers in a check
    # Everything phase 2 calls, captured before any student code runs (a cell cannot rebind a running frame's locals).
    fork, pipe, read, write, close, waitpid, exit_now = os.fork, os.pipe, os.read, os.write, os.close, os.waitpid, \
        os._exit
    open_file, dup, dup2, setprofile, audit_event, partial = os.open, os.dup, os.dup2, sys.setprofile, sys.audit, \
        functools.partial
    set_threads, set_signal, set_timer, observe, encode_all = torch.set_num_threads, signal.signal, \
        signal.setitimer, records.observe, encode_observations
    wait_readable = select.select
    draw_fd = dup(0)  # the draw, read in phase 2 only
    null = open_file(os.devnull, os.O_RDONLY)
    dup2(null, 0)
    state: list = [None, False, False]
    sys.addaudithook(_make_audit(os.getpid(), state, (_profile,)))

    # Phase 1: the student's notebook, cell by cell.
    shell = InteractiveShell.instance()
    shell.enable_gui = lambda gui=None: None  # `%matplotlib inline` without a front end: figures are not shown
    problems = []
    for index, source in plan["cells"]:
        result = shell.run_cell(source, store_history=False)
        error = result.error_in_exec or result.error_before_exec
        if error is not None:
            problems.append(f"cell {index} raised {type(error).__name__}: {error}"[:300])
    (work / "cells.json").write_text(json.dumps(problems), encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()

    # Phase 2: no student code runs in this process from here on.
    audit_event("genlab.phase2")
    for number in (signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
        set_signal(number, signal.SIG_DFL)
    for timer in (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF):
        set_timer(timer, 0)
    data = read(draw_fd, 64)
    if not data.strip().isdigit():
        write(open_file(str(work / "channel"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), b"read before phase 2")
        exit_now(3)
    draw = int(data.strip())
    namespace = shell.user_ns
    for index, (exercise, check, argument, (codes, builtins, names)) in enumerate(checks):
        out_r, out_w = pipe()
        bad_r, bad_w = pipe()
        pid = fork()
        if pid == 0:  # the child: guard first, then the check
            close(out_r)
            close(bad_r)
            set_threads(1)
            audit_event("genlab.child", bad_w)
            setprofile(partial(_profile, (codes, builtins | spawners, names, op_codes, bad_w, write, str, getattr)))
            try:
                answer = records._ANSWERS.get(exercise, namespace.get(argument))
                if answer is None:
                    observed = [records.Observation(exercise, error=f"`{argument}` is not defined: write it in its "
                                                                     f"cell and run the notebook to the end")]
                else:
                    observed = observe(check, answer, draw)
                payload = encode_all(observed)
            except BaseException as err:  # noqa: BLE001 - the check itself failed: report it
                payload = encode_all([records.Observation(exercise, error=f"the check raised {type(err).__name__}: "
                                                                            f"{err}"[:500])])
            view = memoryview(payload)
            while view:
                view = view[write(out_w, view[:65536]):]
            exit_now(0)
        close(out_w)
        close(bad_w)
        targets = {out_r: [open_file(str(work / f"obs-{index}.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                           MAX_OUTPUT_BYTES],
                   bad_r: [open_file(str(work / f"bad-{index}.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                           2**20]}
        while targets:  # both pipes at once: a child blocked on one full pipe would never close the other
            for source in wait_readable(list(targets), [], [])[0]:
                chunk = read(source, 65536)
                target = targets[source]
                if not chunk:
                    close(target[0])
                    close(source)
                    del targets[source]
                    continue
                target[1] -= len(chunk)
                if target[1] >= 0:
                    write(target[0], chunk)
        waitpid(pid, 0)
    exit_now(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
