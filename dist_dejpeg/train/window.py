"""The log window: what the training loop logs every ``train.log_every`` steps, gathered step by step.

    batches = TimedBatches(iter(loader))          # adds up the time spent waiting for batches
    window = LogWindow(accelerator, images_per_step, batches)
    window.add(losses)                            # after each optimizer step (device tensors, no host sync)
    with window.paused():                         # validation, checkpoints: not training time
        ...
    scalars, seconds_per_step = window.read(lr)   # the means over steps and ranks, images/s, data wait
    window.reset()                                # after logging them: the next window starts now
"""

from __future__ import annotations

import contextlib
import time

import torch


class TimedBatches:
    """Wraps the batch iterator and adds up the wall time spent waiting in ``next``."""

    def __init__(self, batches):
        self.batches, self.waited = batches, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited += time.perf_counter() - start


class LogWindow:
    """The steps since the last log: losses summed on the device (read once per window, not per step), the
    images trained and the training time (wall time less :meth:`paused` blocks: a window holding a validation
    would show a fraction of the real images/s and data wait), and the batches' waiting time when they are
    :class:`TimedBatches`. The seconds per step (for ETAs) are the phase's wall time over its steps in this
    session, validations and checkpoints spread over every step."""

    def __init__(self, accelerator, images_per_step: int, batches=None):
        self.accelerator, self.images_per_step, self.batches = accelerator, images_per_step, batches
        self.reset()
        self.created, self.total_steps = self.start, 0

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # steps that logged each key (a gan phase: gen/* at gen turns only)
        self.steps = 0
        self.start = time.perf_counter()
        self.excluded = 0.0
        self.waited = getattr(self.batches, "waited", 0.0)

    @contextlib.contextmanager
    def paused(self):
        """A block whose time is not training time (validation, image grids, checkpoints). On CUDA the steps
        queued before it are waited for first: their GPU time is training time (an image grid at a step with no
        host check would otherwise leave it out, and images/s would read high)."""
        device = getattr(self.accelerator, "device", None)
        if getattr(device, "type", None) == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def add(self, losses: dict) -> None:
        """One optimizer step's detached losses."""
        self.steps += 1
        self.total_steps += 1
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def read(self, lr: float, critic_lr: float | None = None) -> tuple[dict, float]:
        """``train/<loss>`` means over the window's steps that logged it (a gan phase's gen/* over its gen turns)
        and all ranks (every rank has the same keys and counts: same phase, same turns; so every rank must call
        this), ``train/images_per_s`` (global), ``train/data_wait_frac`` (this rank's share of training time spent
        waiting for batches), ``train/lr`` (the generator's in a gan phase, whose critic's, ``critic_lr``, is
        ``train/critic_lr``); and the seconds per step."""
        acc = self.accelerator
        keys = sorted(self.sums)
        scalars = {}
        if keys:
            means = torch.stack([self.sums[k].float() / self.counts[k] for k in keys])
            means = acc.reduce(means, reduction="mean") if acc.num_processes > 1 else means
            scalars = {f"train/{k}": v for k, v in zip(keys, means.tolist())}
        now = time.perf_counter()
        elapsed = max(now - self.start - self.excluded, 1e-9)
        scalars["train/images_per_s"] = self.steps * self.images_per_step / elapsed
        if hasattr(self.batches, "waited"):
            scalars["train/data_wait_frac"] = (self.batches.waited - self.waited) / elapsed
        scalars["train/lr"] = lr
        if critic_lr is not None:
            scalars["train/critic_lr"] = critic_lr
        return scalars, (now - self.created) / max(self.total_steps, 1)


def sum_over_ranks(accelerator, counts: dict) -> dict[str, int]:
    """Integer counts (e.g. skipped samples per reason) summed over all ranks; every rank must call this."""
    if not counts or accelerator.num_processes == 1:
        return {k: int(v) for k, v in counts.items()}
    packed = torch.tensor([float(v) for v in counts.values()], dtype=torch.float64, device=accelerator.device)
    return {k: int(v) for k, v in zip(counts, accelerator.reduce(packed, reduction="sum").tolist())}
