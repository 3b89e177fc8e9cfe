"""Images larger than a tile, restored window by window and blended without seams, in bounded memory.

An image larger than ``tile`` is cut into ``tile`` x ``tile`` windows that overlap by ``overlap`` pixels (the
last window in each direction is moved back to end at the border, so every window is full size). Each
window's output is weighted by a ramp that rises linearly across the overlap from the window's inner edges
(never to zero, and flat at the image border) and the weighted outputs are averaged, so no seam is visible
where two windows meet. The generator's receptive field is large (a MobileNet encoder plus one
self-attention block), so a tiled result is close to, not identical with, the whole-image one;
tests/test_infer.py bounds the difference on a real photo. Windows are multiples of 32 (the encoder's stride),
so no window is padded inside the model.

Shapes: every window of an image has one shape (``tile`` x ``tile``, or the image's side where it is smaller), and
they go through the model ``batch_size`` at a time. With ``full_batches`` the last, partial batch is filled up
(its extra windows zeroed, their outputs dropped), so every call of an image with several windows has the
shape ``batch_size`` x 3 x ``tile`` x ``tile`` whatever the image's size: one captured CUDA graph (or one
compiled shape) serves every image at least a tile in each direction (restore/restorer.py turns it on for
CUDA; on the CPU the filled slots would be wasted work). An image of one window goes alone, as itself.
The windows' outputs are independent of each other, so batching changes no result (tests/test_tiling_batched.py).

Memory: windows go through the model in row-major order, so the rows above the current row of windows are
final. The weighted sums are kept for one band of ``tile`` rows only (not for the whole image) and each
finished band is handed to ``write``; the windows are copied (and converted from uint8) into one batch buffer
that is reused. A 12 MP photo thus needs its uint8 input and output plus a few tens of MB, not several float
copies of itself: the page faults of per-window allocations were a third of the CPU time (issue 22). The band
moves down in place (no new buffer per row of windows) and each window's output is weighted in place.

One implementation for both backends: the algorithm uses only what numpy arrays and torch tensors share
(slicing, in-place arithmetic, item assignment, broadcasting); the few buffers it makes come from an
``Arrays`` (``NUMPY``, the default, for onnxruntime; restore/restorer.py makes one for torch tensors on a
device). This module imports no torch, so ``restore --model model.onnx`` never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Arrays:
    """Where restore_tiled's buffers come from: ``zeros(shape)`` (float32 zeros, for the band), ``batch(shape)``
    (float32, contents undefined: the windows are copied into it), ``weights(array)`` (a float32 numpy array
    of blending weights in the backend's kind), ``copy(x)`` (a new array with ``x``'s values)."""
    zeros: Callable[[tuple[int, ...]], Any]
    batch: Callable[[tuple[int, ...]], Any]
    weights: Callable[[np.ndarray], Any]
    copy: Callable[[Any], Any]


NUMPY = Arrays(zeros=lambda shape: np.zeros(shape, np.float32), batch=lambda shape: np.empty(shape, np.float32),
               weights=lambda array: array, copy=np.copy)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: stride ``tile - overlap``, the last window ending at the border."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """1-D blending weights (float32): linear from 1/(overlap+1) up to 1 across the overlap at inner edges,
    flat at the image border (``at_start`` / ``at_end``)."""
    w = np.ones(length, np.float32)
    if overlap > 0:
        ramp = np.arange(1, overlap + 1, dtype=np.float32) / np.float32(overlap + 1)
        if not at_start:
            w[:overlap] = ramp
        if not at_end:
            w[length - overlap:] = np.minimum(w[length - overlap:], ramp[::-1])
    return w


def _into(window, out):
    """``window`` (3 x h x w or N x 3 x h x w, uint8 0..255 or float 0..1) copied into ``out`` as float 0..1."""
    out[...] = window
    if str(window.dtype).endswith("uint8"):  # numpy's "uint8" and torch's "torch.uint8"
        out /= 255
    return out


def restore_tiled(forward: Callable[[Any], Any], image, tile: int, overlap: int, batch_size: int,
                  write: Callable[[int, int, Any], None], arrays: Arrays = NUMPY, full_batches: bool = False) -> None:
    """Restore one 3 x H x W image (uint8 0..255, e.g. a view of an H x W x 3 array, or float 0..1; a numpy
    array or a torch tensor, as ``arrays`` makes them) with ``forward`` (N x 3 x h x w float32 -> the same
    shape, which this function may change) on ``tile``-sized windows (0: the whole image in one pass),
    ``batch_size`` windows per call (``full_batches``: always ``batch_size``, the last batch filled up, where
    the image has several windows). Finished rows are handed over top to bottom as ``write(y0, y1, rows)``,
    ``rows`` 3 x (y1 - y0) x W float32 (the caller may change it)."""
    _, h, w = image.shape
    th, tw = (min(tile, h), min(tile, w)) if tile else (h, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    windows = [(y, x) for y in ys for x in xs]
    if len(windows) == 1:
        write(0, h, forward(_into(image[None], arrays.batch((1, 3, th, tw))))[0])
        return
    buf = arrays.batch((batch_size if full_batches else min(batch_size, len(windows)), 3, th, tw))
    acc = arrays.zeros((3, th, w))  # weighted sums of image rows top .. top + th
    weight = arrays.zeros((1, th, w))
    top, ramps = 0, {}
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        batch = buf if full_batches else buf[:len(chunk)]
        for j, (y, x0) in enumerate(chunk):
            _into(image[:, y:y + th, x0:x0 + tw], batch[j])
        batch[len(chunk):] = 0  # the filled-up slots of a last batch: defined values, outputs dropped by zip
        restored = forward(batch)
        for (y, x0), r in zip(chunk, restored):
            if y != top:  # a new row of windows: the rows above it are final; move the band down in place
                done, keep = y - top, th - (y - top)
                write(top, y, acc[:, :done] / weight[:, :done])
                for band in (acc, weight):  # a copy first: the rows moved and their new place may overlap
                    band[:, :keep] = arrays.copy(band[:, done:]) if keep > done else band[:, done:]
                    band[:, keep:] = 0
                top = y
            key = (y == 0, y + th == h, x0 == 0, x0 + tw == w)
            if key not in ramps:
                wy = blend_ramp(th, overlap, key[0], key[1])
                wx = blend_ramp(tw, overlap, key[2], key[3])
                ramps[key] = arrays.weights((wy[:, None] * wx[None, :])[None])
            r *= ramps[key]
            acc[:, y - top:y - top + th, x0:x0 + tw] += r
            weight[:, y - top:y - top + th, x0:x0 + tw] += ramps[key]
    write(top, h, acc[:, :h - top] / weight[:, :h - top])
