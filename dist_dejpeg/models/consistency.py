"""jpeg/consistency.py's projection onto a JPEG file's quantization cells as torch operations, on any device and
for a batch: each DCT coefficient of the restored image that left its cell goes back to the cell's edge. The
numpy original runs on the host, one image at a time, in stripes (restore's encode threads and onnxruntime's
restorer, no torch needed); this one runs where the images already are: a GPU Restorer conforms its output on the
GPU (a round of a 12 MP photo takes ~0.7 s of a CPU core in numpy, against ~0.15 s for its restore on an H200;
a saturated graphic takes ROUNDS of them), and the final validation conforms a quality's crops as one batch at
every cell width (train/validation.py: conformed_gains).
Both give the same uint8 image up to a level of float rounding (tests/test_consistency.py).

    cells = read_cells("photo.jpg")
    fixed = conform_image(restored, cells, orientation, half_width, device)  # H x W x 3 uint8, as displayed
    fixed = conform_batch(restored, [cells_a, cells_b], 0.35)               # N x 3 x H x W, as stored
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dist_dejpeg.jpeg import consistency as host
from dist_dejpeg.jpeg.consistency import JpegCells
from dist_dejpeg.jpeg.formats import JFIF_YCBCR
from dist_dejpeg.jpeg.quality import dct_rows

_STRIPE_PIXELS = 1 << 20  # pixels per stripe of conform_image: its float copies stay near 150 MB, whatever the image
# the EXIF orientations as operations on the last two (row, column) dimensions: PIL's transposes (those of
# ImageOps.exif_transpose, which the displayed image went through) and the inverse of each
_ORIENT = {2: lambda x: x.flip(-1), 3: lambda x: x.flip((-2, -1)), 4: lambda x: x.flip(-2),
           5: lambda x: x.transpose(-2, -1), 6: lambda x: torch.rot90(x, -1, (-2, -1)),
           7: lambda x: x.transpose(-2, -1).flip((-2, -1)), 8: lambda x: torch.rot90(x, 1, (-2, -1))}
_UNDO = {**_ORIENT, 6: _ORIENT[8], 8: _ORIENT[6]}


@lru_cache(maxsize=8)
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 64 x 64 block DCT (jpeg/consistency.py's), RGB -> YCbCr and back, float32 on ``device``."""
    block = torch.from_numpy(np.kron(dct_rows(), dct_rows())).float()
    to_ycc = torch.tensor(JFIF_YCBCR, dtype=torch.float64)
    return block.to(device), to_ycc.float().to(device), torch.linalg.inv(to_ycc).float().to(device)


def conform_batch(images: torch.Tensor, cells: Sequence[JpegCells], half_width: float = 0.5) -> torch.Tensor:
    """``images`` (N x 3 x H x W, uint8 or float 0..255, as the files store them: no EXIF orientation) each
    conformed to its file's ``cells`` (all with the same planes' shapes and sampling, as libjpeg writes crops of one
    size), as a new uint8 batch on their device; a grayscale file's plane is the mean of the channels, the three
    equal after (jpeg.consistency.conform's rules). A NotConsistent error where a file's size is not its image's."""
    if images.ndim != 4 or images.shape[1] != 3 or len(cells) != images.shape[0]:
        raise ValueError(f"expected N x 3 x H x W images and N cells, got {tuple(images.shape)} and {len(cells)}")
    if not cells:
        return images.to(torch.uint8, copy=True)
    for c in cells:
        c.check_size(*images.shape[-2:])
    shapes = {tuple((p.coefficients.shape, p.factor) for p in c.planes) for c in cells}
    if len(shapes) > 1:
        raise ValueError(f"the cells of one batch must have the same planes, got {sorted(shapes)}")
    return _conform_rows(images.float(), cells, 0, half_width)


def conform_image(rgb: np.ndarray, cells: JpegCells, orientation: int = 1, half_width: float = 0.5,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """jpeg.consistency.conform on ``device``: ``rgb`` (H x W x 3 uint8, as displayed: EXIF ``orientation``
    applied) conformed to its file's ``cells`` as a new host array, in stripes of whole block rows (a 12 MP image's
    float copies stay near 150 MB)."""
    usable = rgb.flags.writeable and rgb.flags.c_contiguous  # (PIL's arrays are read-only: torch warns of them)
    image = torch.from_numpy(rgb if usable else rgb.copy()).to(device).permute(2, 0, 1)
    stored = _UNDO[orientation](image) if orientation in _UNDO else image
    cells.check_size(*stored.shape[1:])
    block_rows = cells.block_rows  # a stripe: whole block rows of every plane
    rows = max(1, _STRIPE_PIXELS // (block_rows * max(1, cells.width))) * block_rows
    out = torch.empty_like(stored)
    for y0 in range(0, cells.height, rows):
        out[:, y0:y0 + rows] = _conform_rows(stored[None, :, y0:y0 + rows].float(), [cells], y0, half_width)[0]
    out = _ORIENT[orientation](out) if orientation in _ORIENT else out
    return out.permute(1, 2, 0).contiguous().cpu().numpy()


def _conform_rows(rgb: torch.Tensor, cells: Sequence[JpegCells], y0: int, half_width: float) -> torch.Tensor:
    """Rows ``y0``.. (whole block rows of every plane, but at the image's bottom) of N float images conformed
    to their cells, rounded to uint8: the projections onto the cells and onto [0, 255] alternated as numpy's
    conform alternates them (jpeg.consistency.ROUNDS), an MCU at most until it needs no clipping (each round
    projects all rows of the images with such an MCU and keeps only such MCUs' results)."""
    gray = len(cells[0].planes) == 1
    part = (rgb.mean(dim=1) if gray else rgb).clone()  # N x h x w (a grayscale file's one plane) or N x 3 x h x w
    n, h, w = part.shape[0], part.shape[-2], part.shape[-1]
    mh, mw = cells[0].block_rows, cells[0].block_cols
    bounds = [_bounds(cells, c, y0, h, half_width, part.device) for c in range(len(cells[0].planes))]  # once
    active = torch.ones(n, -(-h // mh), -(-w // mw), dtype=torch.bool, device=part.device)  # the MCUs still clipped
    for _ in range(host.ROUNDS):
        todo = active.flatten(1).any(dim=1).nonzero().flatten()  # the images with such an MCU (a sync: fine out
        if not len(todo):  # of a graph)
            break
        todo = slice(None) if len(todo) == n else todo  # (all of them: views, not copies)
        inside = _project(part[todo], [(lo[todo], hi[todo], f, b) for lo, hi, f, b in bounds])
        clipped = inside.clamp(0, 255)
        over = (inside - clipped).abs()  # n (x 3) x h x w: each pixel's clip
        over = over if gray else over.amax(dim=1)
        over = F.pad(over, (0, active.shape[2] * mw - w, 0, active.shape[1] * mh - h))
        over = over.reshape(inside.shape[0], active.shape[1], mh, active.shape[2], mw).amax(dim=(2, 4))
        pixels = active[todo].repeat_interleave(mh, dim=1).repeat_interleave(mw, dim=2)[:, :h, :w]
        part[todo] = torch.where(pixels if gray else pixels[:, None], clipped, part[todo])
        active[todo] &= over > host.CLIP_TOLERANCE
    out = part.round().clamp(0, 255).to(torch.uint8)
    return out[:, None].expand(-1, 3, -1, -1).contiguous() if gray else out


def _bounds(cells: Sequence[JpegCells], c: int, y0: int, h: int, half_width: float, device: torch.device):
    """Plane ``c``'s cells for full-resolution rows ``y0``.. (``h`` of them) of N images: their lower and upper
    edges (N x blocks x 64, the blocks row-major) on ``device``, the plane's sampling factor and its blocks down and
    across."""
    fy, fx = cells[0].planes[c].factor
    r0 = y0 // (8 * fy)
    r1 = min(cells[0].planes[c].coefficients.shape[0], r0 + -(-h // (8 * fy)))
    q = torch.stack([torch.from_numpy(np.asarray(k.planes[c].table, np.float32).reshape(64)) for k in cells])
    stored = torch.stack([torch.from_numpy(np.ascontiguousarray(k.planes[c].coefficients[r0:r1])) for k in cells])
    q, stored = q.to(device)[:, None], stored.to(device).reshape(len(cells), -1, 64).float()
    stored = stored * q
    across = cells[0].planes[c].coefficients.shape[1]
    return stored - q * half_width, stored + q * half_width, (fy, fx), (r1 - r0, across)


def _project(part: torch.Tensor, bounds: list) -> torch.Tensor:
    """N float images' rows (N x 3 x h x w RGB, or N x h x w: a grayscale file's one plane) projected onto their
    cells (``bounds``: _bounds' of each plane), not clipped."""
    block, to_ycc, to_rgb = _constants(part.device)
    if part.ndim == 3:
        return _conform_plane(part, *bounds[0], 128.0, block)
    ycc = torch.einsum("ij,njhw->nihw", to_ycc, part)
    ycc = torch.stack([_conform_plane(ycc[:, c], *bounds[c], 128.0 if c == 0 else 0.0, block)
                       for c in range(len(bounds))], dim=1)
    return torch.einsum("ij,njhw->nihw", to_rgb, ycc)


def _conform_plane(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, factor: tuple[int, int],
                   blocks: tuple[int, int], level: float, block: torch.Tensor) -> torch.Tensor:
    """Full-resolution rows of one plane of N images (N x h x w float) with each block's coefficients clamped to
    [``lo``, ``hi``] (N x blocks x 64; ``blocks`` down and across); ``level``: what the encoder subtracts before its
    DCT (128 for Y, 0 for chroma)."""
    (fy, fx), (rows, cols) = factor, blocks
    n, h, w = values.shape
    # the encoder's samples: the rows padded by their edge pixels to whole blocks, then area-averaged
    padded = F.pad(values[:, None], (0, cols * 8 * fx - w, 0, rows * 8 * fy - h), mode="replicate")[:, 0]
    samples = padded.reshape(n, rows * 8, fy, cols * 8, fx).mean(dim=(2, 4))
    coef = (samples.reshape(n, rows, 8, cols, 8).permute(0, 1, 3, 2, 4).reshape(n, -1, 64) - level) @ block.T
    moved = torch.minimum(torch.maximum(coef, lo), hi) - coef
    delta = (moved @ block).reshape(n, rows, cols, 8, 8).permute(0, 1, 3, 2, 4).reshape(n, rows * 8, cols * 8)
    if fy > 1 or fx > 1:  # each sample's change spread over the pixels it averages
        delta = delta.repeat_interleave(fy, dim=1).repeat_interleave(fx, dim=2)
    if delta.shape[1] > h:  # the padding's change folded onto the edge pixels it repeats (as jpeg/consistency.py)
        delta[:, h - 1] = delta[:, h - 1:].mean(dim=1)
    if delta.shape[2] > w:
        delta[:, :, w - 1] = delta[:, :, w - 1:].mean(dim=2)
    return values + delta[:, :h, :w]
