"""Progress bars on tqdm's ``auto`` bars: a widget in Jupyter, a bar in a terminal, a plain line now and then in a log.

    progress_bar      a bar over a known count (images sampled, images embedded), for evaluation and sampling
    TrainingProgress  the trainer's: the fraction of the budget spent, the step, named losses, it/s and the ETA

Where a bar draws is decided when it starts:

    Jupyter    (tqdm.auto picked its notebook bar: a kernel with ipywidgets) a widget that updates in place
    terminal   (stderr is a tty) tqdm's bar on stderr, redrawn at most 10 times a second
    anywhere   else (a log file, CI, pytest's capture) one plain line when the bar starts, at most one every
               ``LOG_INTERVAL`` seconds while it runs, and one when it ends: a heartbeat in a long run's log,
               two lines for a short one, never a line per update

The switches: ``trainer.progress`` (the training bar), ``genlab eval eval.progress=false`` and
``genlab compare progress=false`` (every bar of the command, the training of an evaluator included).
"""

from __future__ import annotations

import io
import os
import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as plain_tqdm

LOG_INTERVAL = 30.0  # seconds between two lines of a bar written to a log (not a terminal, not Jupyter)

# a log line: no bar characters, the count, the share, the times (elapsed<remaining) and the rate
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
# the trainer's bar counts a fraction of its budget (steps, images or seconds, whichever binds): the share, not n/total
TRAINING_BAR_FORMAT = "{desc}: {percentage:5.1f}%|{bar}| [{elapsed}<{remaining}{postfix}]"
TRAINING_LOG_FORMAT = "{desc}: {percentage:5.1f}% [{elapsed}<{remaining}{postfix}]"


def in_notebook() -> bool:
    """Whether tqdm.auto draws widgets here (a Jupyter kernel with ipywidgets installed)."""
    return any(cls.__module__ == "tqdm.notebook" for cls in auto_tqdm.__mro__)


class LogLines:
    """A stream for a log: each of tqdm's redraws (``"\\r" + status``) becomes one line of its own, and a line the
    same as the one before (tqdm's final redraw at ``close``) is left out."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        for part in text.split("\r"):
            line = part.strip()
            if line and line != self.last:
                self.stream.write(line + "\n")
                self.last = line

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: float, desc: str, unit: str = "it", enabled: bool = True, stream: TextIO | None = None,
                 **options: Any) -> plain_tqdm:
    """A tqdm bar for ``total`` units of work, drawn where it belongs (see the module docstring): call
    ``update(n)`` as work is done and ``close()`` at the end (or use it as a context manager). ``enabled=False``:
    a bar that prints nothing. ``stream``: where a terminal bar or a log's lines go (default: ``sys.stderr`` at
    the time of the call). ``options``: more tqdm arguments; ``bar_format`` for a terminal and Jupyter,
    ``log_format`` for a log."""
    log_format = options.pop("log_format", LOG_FORMAT)
    if not enabled:
        return plain_tqdm(total=total, desc=desc, unit=unit, disable=True)
    stream = stream if stream is not None else sys.stderr
    if in_notebook() and stream is sys.stderr:
        return auto_tqdm(total=total, desc=desc, unit=unit, **options)
    if _isatty(stream):
        # follow the terminal's width; a terminal that reports no size (a pty without one: 0 x 0) gets 100 x 24, or
        # tqdm would draw in 0 columns and hide the bar below row -1
        fit = {"dynamic_ncols": True} if min(_size(stream)) > 0 else {"ncols": 100, "nrows": 24}
        return auto_tqdm(total=total, desc=desc, unit=unit, file=stream, **fit, **options)
    options.pop("bar_format", None)
    # miniters=0: every update may print, mininterval decides (tqdm's adaptive miniters would skip the final ones)
    options.setdefault("miniters", 0)
    options["position"] = 0  # a log has no cursor to move: a bar started inside another writes its lines after them
    return plain_tqdm(total=total, desc=desc, unit=unit, file=LogLines(stream), bar_format=log_format,
                      mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, ascii=True, **options)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _size(stream: TextIO) -> tuple[int, int]:
    """The terminal's (columns, lines), (0, 0) if it cannot say."""
    try:
        return tuple(os.get_terminal_size(stream.fileno()))
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):  # not a file, or no terminal behind it
        return 0, 0


class TrainingProgress:
    """The trainer's progress: the fraction of the budget spent (steps, images or seconds, whichever binds), so the
    bar and its ETA are right for step, image and time budgets alike; beside it the step, the steps per second and
    up to four named losses. The trainer updates it at every ``metrics.jsonl`` row; the bar reaches its total when
    the budget is spent. A resumed run starts the bar where the budget stood (``start``), and the ETA counts only
    this session's progress."""

    def __init__(self, enabled: bool = True, start: float = 0.0, desc: str = "train", stream: TextIO | None = None):
        self.bar = progress_bar(1.0, desc, unit="budget", enabled=enabled, stream=stream, initial=min(start, 1.0),
                                bar_format=TRAINING_BAR_FORMAT, log_format=TRAINING_LOG_FORMAT, smoothing=0,
                                miniters=0)  # any update may draw: the increments are fractions, not counts
        self.started = time.perf_counter()
        self.first_step: int | None = None

    def update(self, step: int, fraction: float, losses: dict[str, float]) -> None:
        if self.bar.disable:
            return
        if self.first_step is None:
            self.first_step = step - 1
        elapsed = time.perf_counter() - self.started
        rate = (step - self.first_step) / elapsed if elapsed > 0 else 0.0  # steps per second
        shown = " ".join(f"{name}={value:.4g}" for name, value in list(losses.items())[:4])
        self.bar.set_postfix_str(f"step {step}, {rate:.2f} it/s" + (f", {shown}" if shown else ""), refresh=False)
        self.bar.n = min(fraction, 1.0)  # set, not added: exactly 1.0 at the end (a widget shows short of it in red)
        self.bar.update(0)  # draws if LOG_INTERVAL (a log) or a tenth of a second (a terminal) has passed

    def close(self) -> None:
        self.bar.close()
