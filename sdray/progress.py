"""Logging set-up and a progress reporter for long jobs (featurize, index, train, encode).

``configure_logging(level, quiet)`` gives every ``sdray.*`` / ``pipelines.*`` logger one stderr
handler (``--log-level`` / ``--quiet`` on the command line).

:class:`Progress` shows ``done/total``, the rate and the ETA: a bar redrawn in place when stderr
is a terminal, otherwise one plain line every ``every_s`` seconds (logs, CI, Ray workers), so
redirected output stays readable. Nothing is printed when the ``sdray`` logger was set above INFO.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

LOGGER_NAMES = ("sdray", "pipelines", "serve")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
T = TypeVar("T")


def configure_logging(level: str | int = "INFO", quiet: bool = False) -> None:
    """One stderr handler on the sdray loggers; ``quiet`` keeps only warnings and errors."""
    if quiet:
        level = logging.WARNING
    elif isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    for name in LOGGER_NAMES:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False


def _progress_allowed() -> bool:
    """Progress shows unless the ``sdray`` logger was set above INFO (``--quiet``, ``--log-level``)."""
    level = logging.getLogger("sdray").level
    return level == logging.NOTSET or level <= logging.INFO


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``'1:15'``; ``3725`` -> ``'1:02:05'``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts units of work and reports ``done/total``, rate and ETA.

    Args:
        desc: what is counted, e.g. ``"featurize"``.
        total: expected units (None: unknown, no ETA).
        unit: unit name for the rate (``"samples"`` -> ``12.3 samples/s``).
        every_s: seconds between plain lines when stderr is not a terminal.
        stream: where to write (default ``sys.stderr``).
        enabled: False silences it; default: on unless the ``sdray`` logger was set above INFO.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "items", every_s: float = 10.0,
                 stream: IO[str] | None = None, enabled: bool | None = None):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.stream = stream or sys.stderr
        self.enabled = _progress_allowed() if enabled is None else enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start
        self._closed = False
        self.postfix = ""

    def line(self) -> str:
        """``desc: done/total (pct%) rate unit/s, elapsed E, ETA T``."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.desc}: {self.done}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts.append(f"({100.0 * self.done / self.total:.0f}%)")
        parts.append(f"{rate:.1f}" if rate >= 1 else f"{rate:.3f}")
        parts[-1] += f" {self.unit}/s, elapsed {format_duration(elapsed)}"
        if self.total and rate > 0:
            parts[-1] += f", ETA {format_duration((self.total - self.done) / rate)}"
        if self.postfix:
            parts.append(f"| {self.postfix}")
        return " ".join(parts)

    def eta(self) -> str:
        """Remaining time at the current rate (``"?"`` before the first unit or without a total)."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        if not self.total or not self.done:
            return "?"
        return format_duration((self.total - self.done) * elapsed / self.done)

    def _bar(self, width: int = 24) -> str:
        frac = min(1.0, self.done / self.total) if self.total else 0.0
        filled = int(round(frac * width))
        return "[" + "#" * filled + "." * (width - filled) + "] " + self.line()

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        """Add ``n`` finished units; redraw (terminal) or print a line when ``every_s`` passed.

        ``postfix``: a short status shown after the counts (e.g. ``"loss 1.23"``).
        """
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if now - self._last >= 0.2 or (self.total and self.done >= self.total):
                self.stream.write("\r" + self._bar())
                self.stream.flush()
                self._last = now
        elif now - self._last >= self.every_s:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last = now

    def close(self) -> None:
        """Print the final line once."""
        if self._closed or not self.enabled:
            self._closed = True
            return
        self._closed = True
        self.stream.write(("\r" + self._bar() if self.tty else self.line()) + "\n")
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "items",
          enabled: bool | None = None, **kw) -> Iterator[T]:
    """Yield ``items`` while a :class:`Progress` counts them (one unit each)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, unit, enabled=enabled, **kw) as bar:
        for item in items:
            yield item
            bar.update(1)
