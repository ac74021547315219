"""A dependency-free progress line: step, named losses, it/s and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class Progress:
    """Redraws one line on a terminal; prints a line every ``every`` updates otherwise."""

    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, enabled: bool = True,
                 every: int = 50):
        self.total = total
        self.start_step = start
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interactive = enabled and self.stream.isatty()
        self.every = max(1, every)
        self.started = time.perf_counter()

    def update(self, step: int, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        if not self.interactive and step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{k}={v:.4g}" for k, v in list(losses.items())[:4])
        line = (f"step {step}/{self.total} [{100 * step / self.total:5.1f}%] {shown} "
                f"{rate:.2f} it/s ETA {format_seconds(eta) if rate > 0 else '?'}")
        if self.interactive:
            self.stream.write("\r" + line[:160].ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
