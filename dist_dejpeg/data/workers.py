"""The DataLoader's worker processes: they leave stopping to the main process, and the main process always stops
them, however its batch iterator ends (an error, the end of the data, an error at exit)."""

from __future__ import annotations

import atexit
import weakref
from typing import Iterator

from dist_dejpeg.data.verify import TooFewSamples, TooManyBadSamples

_LIVE: weakref.WeakSet = weakref.WeakSet()  # DataLoader iterators whose worker processes may still run


@atexit.register  # registered after multiprocessing's exit handler, so it runs before it
def _shut_down_live_workers() -> None:
    """An error that escapes with a batch iterator alive in its traceback (a local of the failing frame) leaves its
    workers running at exit; multiprocessing's exit handler would terminate them with SIGTERM, which they ignore
    (ignore_stop_signals), and then wait for them for ever."""
    for batches in list(_LIVE):
        getattr(batches, "_shutdown_workers", lambda: None)()


def stop_cleanly(batches: Iterator[dict]) -> Iterator[dict]:
    """``batches`` (a DataLoader's iterator), its workers shut down when it stops, however it stops (they ignore
    SIGTERM, below: left running, they would block multiprocessing's exit handler for ever), and a worker's
    TooManyBadSamples or TooFewSamples raised again with the worker's own message (the DataLoader rebuilds it
    around the worker's traceback)."""
    _LIVE.add(batches)
    try:
        yield from batches
    except (TooManyBadSamples, TooFewSamples) as err:
        kind, message = type(err), str(err).rsplit(f"{type(err).__name__}: ", 1)[-1].strip()
    else:
        return
    finally:
        getattr(batches, "_shutdown_workers", lambda: None)()  # what the iterator's __del__ calls
    raise kind(message)


def ignore_stop_signals(worker_id: int) -> None:
    """SLURM signals every process of a job step, and Ctrl-C the terminal's whole process group: a worker killed
    by SIGTERM or SIGINT would fail the main process's next batch before it can checkpoint. Workers leave stopping
    to the main process (they exit with it)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
