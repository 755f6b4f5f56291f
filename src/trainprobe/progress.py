"""A dependency-free progress line for long CLI work (stderr; quiet when not a TTY)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress(total, "training") as bar: bar.update(i, "loss 0.3")``.

    On a terminal it redraws one line; elsewhere (CI logs) it prints a line at
    every 10% so logs stay short.
    """

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._start = time.monotonic()
        self._last_decile = -1

    def update(self, done: int, note: str = "") -> None:
        frac = min(max(done / self.total, 0.0), 1.0)
        elapsed = time.monotonic() - self._start
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        bar = "#" * int(frac * 24)
        line = (
            f"{self.label} [{bar:<24}] {done}/{self.total} {elapsed:5.1f}s"
            f"{f' eta {eta:4.0f}s' if frac < 1 and eta == eta else ''} {note}"
        )
        if self.tty:
            self.stream.write("\r" + line[:99].ljust(99))
            self.stream.flush()
        elif int(frac * 10) > self._last_decile:
            self._last_decile = int(frac * 10)
            self.stream.write(line + "\n")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
