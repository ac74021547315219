"""A full disk, simulated for the tests: files opened for writing under one folder, from the ``after + 1``-th such file
on, take ``space`` bytes (0 by default) and then no more: a write that does not fit writes what fits, and the next one
fails with ENOSPC, as on a disk that fills up (``open`` itself succeeds and creates the file). Everything else reads
and writes as usual.

In the test's own process: ``monkeypatch.setattr(builtins, "open", opener(folder))`` (and ``io.open``: pathlib's
``write_text`` goes through it). In a ``genlab`` subprocess: a ``sitecustomize.py`` that calls :func:`install` with the
folder from the environment (:func:`sitecustomize_source`).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from typing import Any, Callable

ENV = "GENLAB_TEST_FULL_DISK"  # the folder whose files take no bytes (in a subprocess)


class FullDiskFile(io.FileIO):
    """A file on a disk with ``space`` bytes left: writes take what fits, then fail with ENOSPC."""

    def __init__(self, *args: Any, space: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.space = space

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        if not len(data):
            return 0
        if self.space <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = super().write(data[: self.space])
        self.space -= written
        return written


def opener(folder: str | os.PathLike, after: int = 0, space: int = 0, real_open: Callable = io.open) -> Callable:
    """An ``open`` for which the files under ``folder`` sit on a full disk (``space`` bytes left for each), from the
    ``after + 1``-th one opened for writing on (the first ``after`` are written as usual)."""
    root = os.path.realpath(folder) + os.sep
    seen = [0]

    def open_(file: Any, mode: str = "r", buffering: int = -1, encoding: str | None = None, errors: str | None = None,
              newline: str | None = None, closefd: bool = True, opener: Callable | None = None) -> Any:
        writes = any(flag in mode for flag in "wax+")
        if not (writes and isinstance(file, (str, bytes, os.PathLike))
                and os.path.realpath(os.fsdecode(file)).startswith(root)):
            return real_open(file, mode, buffering, encoding, errors, newline, closefd, opener)
        seen[0] += 1
        if seen[0] <= after:
            return real_open(file, mode, buffering, encoding, errors, newline, closefd, opener)
        raw = FullDiskFile(file, mode.replace("b", "").replace("t", ""), closefd=closefd, opener=opener, space=space)
        if buffering == 0:
            return raw
        buffered = io.BufferedRandom(raw) if "+" in mode else io.BufferedWriter(raw)
        if "b" in mode:
            return buffered
        return io.TextIOWrapper(buffered, encoding=encoding, errors=errors, newline=newline,
                                line_buffering=buffering == 1)

    return open_


def install(folder: str, after: int = 0) -> None:
    """Make this process's ``open`` that of :func:`opener` (for a subprocess: there is nothing to undo)."""
    builtins.open = io.open = opener(folder, after)


def sitecustomize_source() -> str:
    """A ``sitecustomize.py`` that installs the full disk of the folder named by ``$GENLAB_TEST_FULL_DISK``."""
    return f"import os\nif os.environ.get({ENV!r}):\n    import full_disk\n    full_disk.install(os.environ[{ENV!r}])\n"
