"""Images larger than a tile, restored window by window and blended without seams.

An image larger than ``tile`` is cut into ``tile`` x ``tile`` windows that overlap by ``overlap`` pixels (the
last window in each direction is moved back to end at the border, so every window is full size). Each
window's output is weighted by a ramp that rises linearly across the overlap from the window's inner edges
(never to zero, and flat at the image border) and the weighted outputs are averaged, so no seam is visible
where two windows meet. The generator's receptive field is large (a MobileNet encoder plus one
self-attention block), so a tiled result is close to, not identical with, the whole-image one;
tests/test_infer.py bounds the difference on a real photo. Windows are multiples of 32 (the encoder's stride),
so no window is padded inside the model.
"""

from __future__ import annotations

from typing import Callable

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: stride ``tile - overlap``, the last window ending at the border."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1-D blending weights: linear from 1/(overlap+1) up to 1 across the overlap at inner edges, flat at the
    image border (``at_start`` / ``at_end``)."""
    w = torch.ones(length)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        if not at_start:
            w[:overlap] = ramp
        if not at_end:
            w[length - overlap:] = torch.minimum(w[length - overlap:], ramp.flip(0))
    return w


def restore_tiled(forward: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, tile: int, overlap: int,
                  batch_size: int) -> torch.Tensor:
    """One 3 x H x W image restored by ``forward`` (N x 3 x h x w -> the same shape) on ``tile``-sized windows,
    ``batch_size`` windows per call, blended on the image's device."""
    _, h, w = image.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    out = torch.zeros(3, h, w, device=image.device)
    weight = torch.zeros(1, h, w, device=image.device)
    windows = [(y, x0) for y in ys for x0 in xs]
    ramps = {}
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        restored = forward(torch.stack([image[:, y:y + th, x0:x0 + tw] for y, x0 in chunk]))
        for (y, x0), r in zip(chunk, restored):
            key = (y == 0, y + th == h, x0 == 0, x0 + tw == w)
            if key not in ramps:
                wy = blend_ramp(th, overlap, key[0], key[1])
                wx = blend_ramp(tw, overlap, key[2], key[3])
                ramps[key] = (wy[:, None] * wx[None, :])[None].to(image.device)
            out[:, y:y + th, x0:x0 + tw] += r * ramps[key]
            weight[:, y:y + th, x0:x0 + tw] += ramps[key]
    return out / weight
