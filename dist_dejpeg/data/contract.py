"""What both loaders (torch_loader and dali) share: the batch contract's move to the device, and how a training
sample draws its JPEG quality (uniform over data.quality_min..quality_max, or weighted towards heavy compression
by ``data.quality_power``; DALI draws the same distribution with ``fn.random.choice``).

    batch = {"jpeg": N x 3 x H x W float [0,1], "clean": same, "quality": N int64}   on the device
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """uint8 N x 3 x H x W -> float [0, 1] on ``device`` (the conversion runs there, after the copy)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = {}
    for key in ("jpeg", "clean"):
        out[key] = batch[key].to(device, non_blocking=True).float().div_(255).contiguous(memory_format=fmt)
    quality = torch.as_tensor(batch["quality"], dtype=torch.int64)
    if device.type == "cuda" and quality.device.type == "cpu" and not quality.is_pinned():
        # from pageable memory the copy blocks the host until the GPU has run everything queued before it (the
        # last step). The DataLoader pins its batches and the degrade-ahead thread hands its qualities over on
        # the GPU; a pinned copy here allocates page-locked memory, which may wait too (seen on an H100)
        quality = quality.pin_memory()
    out["quality"] = quality.to(device, non_blocking=True)
    return out


def quality_weights(qmin: int, qmax: int, power: float) -> tuple[np.ndarray, np.ndarray]:
    """The training qualities qmin..qmax and their probabilities, P(q) proportional to q ** -power
    (``data.quality_power``: more heavy compression as it grows)."""
    values = np.arange(qmin, qmax + 1)
    weights = values.astype(np.float64) ** -power
    return values, weights / weights.sum()


def draw_quality(rng: np.random.Generator, qmin: int, qmax: int, power: float, size: int | None = None):
    """Training JPEG qualities in qmin..qmax (one, or an array of ``size``): uniform with ``power`` 0, drawn
    exactly as before quality_power existed (so resumes and earlier results hold), else by quality_weights."""
    if power == 0:
        return rng.integers(qmin, qmax + 1, size=size)
    values, p = quality_weights(qmin, qmax, power)
    return rng.choice(values, size=size, p=p)
