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
    """Redraws one line on a terminal, prints one line per update otherwise (the trainer updates it
    at every ``metrics.jsonl`` row).

    Progress is a fraction of the budget (steps, images or seconds, whichever binds), so the ETA
    is right for step budgets and time budgets alike.
    """

    def __init__(self, enabled: bool = True, start: float = 0.0, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interactive = enabled and self.stream.isatty()
        self.start_fraction = start
        self.started = time.perf_counter()
        self.first_step: int | None = None

    def update(self, step: int, fraction: float, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        if self.first_step is None:
            self.first_step = step - 1
        rate = (step - self.first_step) / elapsed if elapsed > 0 else 0.0  # steps per second
        speed = (fraction - self.start_fraction) / elapsed if elapsed > 0 else 0.0  # budget per second
        eta = format_seconds((1.0 - fraction) / speed) if speed > 0 else "?"
        shown = " ".join(f"{k}={v:.4g}" for k, v in list(losses.items())[:4])
        line = f"step {step} [{100 * min(fraction, 1.0):5.1f}%] {shown} {rate:.2f} it/s ETA {eta}"
        if self.interactive:
            self.stream.write("\r" + line[:160].ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
