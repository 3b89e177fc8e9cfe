"""The tiling processes of `prepare` (folder and div2k), and evaluate's metrics processes: how many, and each item's
result handed back in the items' order, so that a pool writes the same shards (and tables) as one process does."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

Item, Result = TypeVar("Item"), TypeVar("Result")
# Default --workers (0) of each prepare: div2k's processes write their own tile tars; prepare folder's hand each photo
# to one writer, which takes ~0.5 s to write a 12 MP photo's raw tiles (--step 128: 150 MB) on a 2-core VM, about as
# long as a process takes to decode it, so many more processes there would mostly hold more photos in memory
MAX_DEFAULT_WORKERS = {"div2k": 16, "folder": 8}


class WorkerLost(BrokenProcessPool):
    """A pool process (prepare's tiling, evaluate's metrics) ended abruptly; the message names the items in progress
    and what to do."""


def pool_size(workers: int, cap: int) -> int:
    """``workers``, or for 0 one process per core this process may use (its CPU affinity: a SLURM job's or
    taskset's share, where os.cpu_count() counts the whole node), at most ``cap``."""
    if workers:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, cap))


def leave_ctrl_c_to_the_parent() -> None:
    """Pool initializer: Ctrl-C signals the terminal's whole process group; the parent stops the pool (its photos
    in progress finish, the queued ones are dropped) instead of each worker printing its own traceback, or dying
    idle and breaking the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_worker(setup: Callable[[], None] | None) -> None:
    leave_ctrl_c_to_the_parent()
    if setup is not None:
        setup()


def map_in_order(work: Callable[[Item], Result], items: Iterable[Item], workers: int,
                 names: Callable[[Item], str] = str, role: str = "tiling",
                 outcome: str = "nothing was published", start: str | None = None,
                 setup: Callable[[], None] | None = None) -> Iterator[Result]:
    """``work(item)`` for each item, in the items' order: in this process for ``workers`` <= 1, else in a pool of
    ``workers`` processes holding at most 2 x ``workers`` items (and their results) at a time. A worker killed
    (out of memory, a signal) is a WorkerLost naming the items in flight (``names``), the processes' ``role``
    and the ``outcome`` for the caller's output, not a hang; however the caller stops (an error, Ctrl-C, closing
    this generator), the pool is shut down before this returns. (Also evaluate's metrics processes.) ``start``:
    multiprocessing's start method ("spawn" where this process has run OpenMP code: a forked child that runs
    OpenMP again, libsvm's BRISQUE, waits forever on the parent's thread team); None: the platform's default.
    ``setup``: run in each process before its first item (a module-level function)."""
    if workers <= 1:
        yield from map(work, items)
        return
    items = iter(items)
    pool = ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(setup,),
                               mp_context=multiprocessing.get_context(start) if start else None)

    def submit(item):
        # a task that cannot be pickled (a lambda or local function as the work or an item's loader) fails in the
        # pool's feeder thread, which could leave Python 3.11's shutdown waiting forever: said here, before it goes
        try:
            pickle.dumps((work, item))
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise TypeError(f"{names(item)}: its work cannot be sent to a {role} process ({err}); use functions "
                            f"defined at a module's top level, or workers=1") from None
        try:
            return item, pool.submit(work, item)
        except BrokenProcessPool:  # (a worker died after the last result was read, before this item went out)
            raise lost([item]) from None

    def lost(held: list) -> WorkerLost:
        return WorkerLost(f"a {role} process ended abruptly (killed: out of memory?) while these were in progress: "
                          f"{', '.join(names(i) for i in held + [i for i, _ in flight])}; {outcome}. Run again with "
                          f"fewer --workers (now {workers}), or --workers 1 to work in this process")

    flight: deque = deque()
    try:
        for item in itertools.islice(items, 2 * workers):
            flight.append(submit(item))
        while flight:
            item, future = flight.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                raise lost([item]) from None
            for follower in itertools.islice(items, 1):  # keep the pool busy while the caller writes this result
                flight.append(submit(follower))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
