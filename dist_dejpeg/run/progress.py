"""Progress of a long command (restore, evaluate, report, prepare, a download) on stderr. Torch-free.

    with Progress(len(files), "restore", "image", enabled=not quiet) as bar:
        for ...: bar.update()
    for item in Progress.over(items, "train tiles", "img", total=len(items)): ...

Where stderr is a terminal: a tqdm bar. Elsewhere (a log file, a pipe, a SLURM job's output) no bar, whose redraws
(carriage returns) would join into one long line there, but a plain log line at each tenth of the work, with the
time so far and an estimate of the rest, as training's log lines replace its bar (train/monitor.py)."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

from dist_dejpeg.run.text import duration

log = logging.getLogger("dist_dejpeg")

PLAIN_LINES = 10  # without a terminal: a line at each tenth of the work (none at its end: the command says that)
T = TypeVar("T")


def on_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """A progress bar (``update``, ``close``, ``n``; a context manager) as the module docstring says;
    ``enabled=False`` (--quiet): neither bar nor lines. ``tqdm_kwargs`` go to the bar (``initial``, ``unit_scale``)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True, **tqdm_kwargs):
        self.total, self.desc, self.unit, self.scaled = total, desc, unit, bool(tqdm_kwargs.get("unit_scale"))
        self.n = self.first = int(tqdm_kwargs.get("initial") or 0)
        terminal = enabled and on_terminal()
        self.bar = tqdm(total=total, desc=desc, unit=unit, **tqdm_kwargs) if terminal else None
        self.step = math.ceil(((total or 0) - self.n) / PLAIN_LINES) if enabled and not terminal else 0
        self.next_at, self.start = self.n + self.step, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.step > 0 and self.next_at <= self.n < self.total:
            done, elapsed = self.n - self.first, time.monotonic() - self.start
            left = elapsed / done * (self.total - self.n) if done else None
            log.info("%s: %s/%s (%d%%), %s so far, about %s left", self.desc, self._amount(self.n),
                     self._amount(self.total), 100 * self.n // self.total, duration(elapsed), duration(left))
            self.next_at = (self.n // self.step + 1) * self.step

    def _amount(self, n: int) -> str:
        return tqdm.format_sizeof(n, self.unit) if self.scaled else str(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def over(cls, items: Iterable[T], desc: str, unit: str = "it", total: int | None = None,
             enabled: bool = True) -> Iterator[T]:
        """``items``, counted on a Progress as they are taken (``total``: len(items) where not given)."""
        with cls(len(items) if total is None else total, desc, unit, enabled) as bar:  # type: ignore[arg-type]
            for item in items:
                yield item
                bar.update()
