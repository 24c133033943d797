"""A one-line progress bar for long loops: drawn on a terminal, silent otherwise.

    with Progress(len(data), "calibrate") as bar:
        for sample in data:
            ...
            bar.advance()
"""
from __future__ import annotations

import sys
import time

BAR_WIDTH = 30
REDRAW_SECONDS = 0.1


class Progress:
    def __init__(self, total: int | None, label: str, stream=None, enabled: bool | None = None):
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled if enabled is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self._start = time.perf_counter()
        self._last_draw = 0.0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if self.enabled and now - self._last_draw >= REDRAW_SECONDS:
            self._last_draw = now
            self._draw()

    def _draw(self) -> None:
        elapsed = time.perf_counter() - self._start
        if self.total:
            filled = int(BAR_WIDTH * min(self.done, self.total) / self.total)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            text = f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:.1f}s"
        else:
            text = f"{self.label} {self.done} {elapsed:.1f}s"
        self.stream.write("\r" + text)
        self.stream.flush()
