"""A progress bar for `vectorsync sync` and the demo: rows done of rows expected, rows per second
and time left, with chunks, tokens and cost, moving from the first provider request on.

On a terminal it is a rich progress bar redrawn in place (lines printed meanwhile go above it);
in a log file it is a plain line every ten seconds.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

PLAIN_EVERY_SECONDS = 10.0


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


@dataclass
class Reading:
    """Where a run is: rows done (seen: written, unchanged, skipped or failed) of rows expected,
    and what the provider did so far; `elapsed` counts from when the run started working."""

    rows: int
    expected: int | None
    chunks: int
    tokens: int
    cost_usd: float
    elapsed: float

    def rate(self) -> float:
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0

    def speed(self) -> str:
        """rows/s and time left once a page is written; chunks/s before (the first batches)."""
        if self.rows:
            rate = self.rate()
            left = (
                f", {duration((self.expected - self.rows) / rate)} left"
                if self.expected and rate > 0 and self.expected > self.rows else ""
            )
            return f"{rate:,.1f} rows/s{left}"
        if self.chunks:
            return f"{self.chunks / max(self.elapsed, 1e-9):,.1f} chunks/s, first page on its way"
        return "waiting for the first batch"

    def summary(self) -> str:
        """What the bar shows beside it (a terminal line is short)."""
        money = f", ${self.cost_usd:.4f}" if self.cost_usd else ""
        return f"{self.chunks:,} chunks{money}, {self.speed()}"

    def line(self) -> str:
        of = f"/{self.expected:,}" if self.expected else ""
        percent = f" ({100.0 * min(self.rows, self.expected) / self.expected:.0f}%)" if self.expected else ""
        money = f" (${self.cost_usd:.4f})" if self.cost_usd else ""
        return (f"  progress: {self.rows:,}{of} rows{percent}, {self.chunks:,} chunks, {self.tokens:,} tokens{money}, "
                f"{self.speed()} [{duration(self.elapsed)}]")


class ProgressDisplay:
    """Shows Readings: `update` as often as there is news, `print` for lines above the bar."""

    def __init__(self, description: str, file: TextIO | None = None) -> None:
        self.file = file or sys.stdout
        self.tty = self.file.isatty()
        self._last_plain = 0.0
        self._progress: Progress | None = None
        if self.tty:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=20),
                TextColumn("{task.completed:,.0f}/{task.fields[expected]} rows"),
                TextColumn("{task.fields[summary]}"),
                console=Console(file=self.file),
                transient=False,
            )
            self._task = self._progress.add_task(description, total=None, expected="?", summary="starting")
            self._progress.start()

    def update(self, reading: Reading, force: bool = False) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task, completed=reading.rows, total=reading.expected or None,
                expected=f"{reading.expected:,}" if reading.expected else "?", summary=reading.summary(),
            )
        elif force or time.monotonic() - self._last_plain >= PLAIN_EVERY_SECONDS:
            print(reading.line(), file=self.file, flush=True)
            self._last_plain = time.monotonic()

    def print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
