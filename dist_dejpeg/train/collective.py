"""What every rank must decide together, so that trouble on one rank never leaves the others waiting.

    self.monitor = all_ranks_or_raise(acc, Monitor, acc, cfg, run_dir, config)   # trackers start on rank 0 only
    with all_ranks_or_raise(acc):                                                 # the same, as a block
        if acc.is_main_process:
            write_files()
    checks = PacedChecks(HostChecks(acc, signals, sync_every), cfg.train.preempt_budget_s)

Failing together. Work that can fail on some ranks only (the trackers start on rank 0; the run folder's lock,
the checkpoint's rename and pruning, ``metrics.json`` and the generator file are rank 0's; a checkpoint file
may be unreadable for one rank) runs inside :func:`all_ranks_or_raise`, which ends with ONE small collective on
every rank, error or not: each rank's error (or None) is gathered, and when any rank failed, every rank raises
the error of the lowest failing rank within seconds: the failing rank its own (with its traceback), the others
a copy of the same type and message (or :class:`RankFailed` when it does not pickle), noted with the rank it
came from. Without it the other ranks would go on to their next collective and wait there for
``train.dist_timeout_s`` (900 s), and under SLURM's one launcher per node nothing would end them sooner.
The helper adds one collective at each place it is used, so every rank must enter it at the same place (it
must not sit under ``if acc.is_main_process``; put that test inside), and ``fn`` must not fail on one rank
before a collective the others then wait in (put such collectives after it, or the helper around each part).

Pacing the stop-signal check (:class:`PacedChecks`). On CUDA the host reads the stop signal and the non-finite
count every ``train.sync_every`` steps (steps.HostChecks), so a stop takes up to that many steps plus the save.
With slow steps (large batches, grad_accum, a slow node) 25 steps and a save can outlast SLURM's warning
(``--signal=B:USR1@120``) and the run is killed without its checkpoint. So the interval adapts: after each read
the rank-maximum of the measured step time and of the time spent between a read and the next step (a save,
a validation: what a stop waits for) bound it by :func:`check_interval`,
``interval * step_s + overhead_s <= train.preempt_budget_s`` (default 90 s of SLURM's 120), capped at
``train.sync_every``. The measurements are all-reduced (max) so every rank keeps the same interval (a read is a
collective). Chosen over reading the signal every step: that needs a collective every step, and on CUDA a host
read of its result (a device sync) or a second, host-side (gloo) process group, which is slow across nodes and
fails to start on some clusters. The bound only binds when steps are slow, where an extra host read costs
nothing next to the step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
import time
from collections import deque
from typing import Callable, TypeVar

import torch
from accelerate.utils import broadcast_object_list, gather_object

log = logging.getLogger("dist_dejpeg")

T = TypeVar("T")


class RankFailed(RuntimeError):
    """Another rank failed with an error that could not be sent whole; the message names it and its rank."""


class _Together(contextlib.ContextDecorator):
    def __init__(self, accelerator):
        self.acc = accelerator

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if self.acc.num_processes == 1:
            return False
        if err is not None and not isinstance(err, Exception):
            return False  # KeyboardInterrupt, SystemExit: the process ends, the launcher ends the others
        errors = gather_object([_portable(err, self.acc.process_index) if err is not None else None])
        if err is not None:
            return False  # this rank raises its own error
        for rank, sent in enumerate(errors):
            if sent is not None:
                if hasattr(sent, "add_note"):  # Python 3.11+
                    sent.add_note(f"(raised on rank {rank}; rank {self.acc.process_index} stops with it)")
                sent.copied_from_rank = rank  # (the CLI says an error once: where it was raised)
                raise sent from None
        return False


def all_ranks_or_raise(accelerator, fn: Callable[..., T] | None = None, *args, **kwargs):
    """``fn(*args, **kwargs)`` on every rank, then one collective; when it raised on any rank, every rank raises
    that error (module docstring). Without ``fn``: a context manager doing the same for its block."""
    if fn is None:
        return _Together(accelerator)
    with _Together(accelerator):
        return fn(*args, **kwargs)


def warn_on_main(main: bool) -> Callable[..., None]:
    """``log.warning`` on the main process, ``log.debug`` on the others: for a warning every rank would say alike
    (a config change on resume, a sum over ranks), so that N ranks show it once, not N times without a rank marker
    (train.log, rank 0's, has it once either way). ``warn_on_main(acc.is_main_process)("...", args)``."""
    return log.warning if main else log.debug


def on_main(accelerator, fn: Callable[[], T]) -> T:
    """``fn()`` on the main process only, its (picklable) result on every rank; when it raises, every rank raises
    its error (as :func:`all_ranks_or_raise`). For decisions one process makes for all (which checkpoint to
    resume, moving folders aside)."""
    result: list = [None]
    with _Together(accelerator):
        if accelerator.is_main_process:
            result[0] = fn()
    if accelerator.num_processes > 1:
        broadcast_object_list(result)
    return result[0]


def _portable(err: BaseException, rank: int) -> BaseException:
    """``err`` as the other ranks can rebuild it (same type and message), or a RankFailed naming it."""
    try:
        copy = pickle.loads(pickle.dumps(err))
        if type(copy) is type(err) and str(copy) == str(err):
            return copy
    except Exception:  # noqa: BLE001 - an exception whose arguments do not pickle
        pass
    return RankFailed(f"rank {rank} failed: {type(err).__name__}: {err}")


# -- pacing the stop-signal check ---------------------------------------------------------------------------
def check_interval(step_s: float, overhead_s: float, budget_s: float, limit: int) -> int:
    """Steps between host reads of the stop flag: the most (up to ``limit``, train.sync_every) for which
    ``steps * step_s + overhead_s <= budget_s``, at least 1. ``step_s`` 0 (not measured yet): ``limit``."""
    if step_s <= 0:
        return limit
    return max(1, min(limit, math.floor((budget_s - overhead_s) / step_s)))


class PacedChecks:
    """A steps.HostChecks whose interval (``sync_every``) follows :func:`check_interval` of the measured times
    (module docstring): the median step time of the last 5 read windows, and the upper median of the last 3
    pauses longer than two steps (a save, a validation) from the end of a read to the end of the next step's
    host work (on the CPU that includes the whole step: conservative by one step). Medians, so that a one-off
    (a compilation) does not set the interval for the rest of the run. Only with deferred checks
    (``sync_every`` > 1); with 1 the flags are read after every step already."""

    def __init__(self, checks, budget_s: float):
        self.checks, self.budget_s = checks, budget_s
        self.limit = checks.sync_every  # train.sync_every as the device allows (build.py)
        self.flags = checks.flags
        self.step_times: deque = deque(maxlen=5)
        self.pauses: deque = deque(maxlen=3)
        self.read_at: float | None = None  # when the last read ended
        self.resumed_at: float | None = None  # when the first step after it ended
        self.told: int | None = None  # the interval last logged
        self.warned = False

    @property
    def sync_every(self) -> int:
        return self.checks.sync_every

    @property
    def due(self) -> bool:
        return self.checks.due

    def stepped(self, global_step: int) -> None:
        if self.checks.unchecked == 0:
            self.resumed_at = time.perf_counter()
        self.checks.stepped(global_step)

    def read(self, global_step: int) -> bool:
        steps = self.checks.unchecked
        stop = self.checks.read(global_step)  # synchronises the device: the steps before it are done
        if self.limit > 1:
            self._pace(steps, time.perf_counter())
        self.read_at = time.perf_counter()
        return stop

    def _pace(self, steps: int, now: float) -> None:
        step_s = (now - self.resumed_at) / (steps - 1) if steps > 1 and self.resumed_at is not None else 0.0
        pause = self.resumed_at - self.read_at if self.resumed_at is not None and self.read_at is not None else 0.0
        acc = self.checks.accelerator
        if acc.num_processes > 1:  # the same numbers on every rank: the interval decides when the next collective is
            both = torch.tensor([step_s, pause], dtype=torch.float64, device=acc.device)
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
            step_s, pause = both.tolist()
        if step_s > 0:
            self.step_times.append(step_s)
        step = sorted(self.step_times)[len(self.step_times) // 2] if self.step_times else 0.0
        if step > 0 and pause > 2 * step:
            self.pauses.append(pause)
        overhead = sorted(self.pauses)[len(self.pauses) // 2] if self.pauses else 0.0
        self.checks.sync_every = interval = check_interval(step, overhead, self.budget_s, self.limit)
        if overhead >= self.budget_s and not self.warned:
            self.warned = True
            warn_on_main(acc.is_main_process)("a checkpoint (or validation) took %.0f s, more than train.preempt_budget_s=%g: after SLURM's "
                        "stop signal the run may be killed before its checkpoint is written; give sbatch's "
                        "--signal more lead time (and raise train.preempt_budget_s with it)", overhead, self.budget_s)
        if step > 0 and interval != self.told:
            log.log(logging.INFO if self.told is None else logging.DEBUG,
                    "stop signal read every %d steps (train.sync_every %d; a step takes %.3g s, a save or validation "
                    "%.3g s; train.preempt_budget_s %g)", interval, self.limit, step, overhead, self.budget_s)
            self.told = interval
