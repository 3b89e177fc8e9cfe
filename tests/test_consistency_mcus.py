"""conform's later rounds re-project only the MCUs that still clip (jpeg/consistency.py: _round_of_mcus): an MCU's
projection onto the cells needs no other MCU (its blocks of every plane, its chroma samples the box average of its
own pixels), so the selective rounds must give what a whole-image loop gives where each MCU stops on its own."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

import dist_dejpeg.jpeg.consistency as consistency
from dist_dejpeg.jpeg.consistency import CLIP_TOLERANCE, ROUNDS, conform, read_cells


def _case(subsampling: int, gray: bool = False) -> tuple[np.ndarray, object]:
    """A 107 x 138 photo crop (a cut MCU row and column) with saturated patches inside and on the cut edges, its
    q30 JPEG's cells and a restoration of it: the decode plus noise."""
    photo = skimage.data.chelsea()[100:207, 150:288].copy()
    photo[40:60, 30:70] = 255
    photo[-9:, -20:] = 0
    photo[70:90, -12:] = 255
    photo = np.repeat(photo.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2) if gray else photo
    buf = io.BytesIO()
    Image.fromarray(photo[..., 0] if gray else photo).save(buf, "JPEG", quality=30, subsampling=subsampling)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(float)
    noise = np.random.default_rng(subsampling).normal(0, 6, decoded.shape)
    return np.clip(np.rint(decoded + noise), 0, 255).astype(np.uint8), read_cells(buf.getvalue())


def _whole_image_rounds(rgb: np.ndarray, cells, rounds: int, half_width: float = 0.5):
    """The reference: every round projects the whole image (no stripes, no MCU selection) and keeps the result
    only on the MCUs that still clipped; the image (uint8, 3 channels) and how much each MCU clipped per round."""
    gray = len(cells.planes) == 1
    part = rgb.astype(np.float32)
    part = part.mean(axis=2) if gray else part
    mh, mw = cells.block_rows, cells.block_cols
    h, w = part.shape[:2]
    active, clips = np.ones((-(-h // mh), -(-w // mw)), bool), []
    for _ in range(rounds):
        inside = consistency._conform_pixels(part, cells, 0, half_width)
        clipped = np.clip(inside, 0, 255)
        keep = active.repeat(mh, axis=0).repeat(mw, axis=1)[:h, :w]
        part = np.where(keep if gray else keep[..., None], clipped, part)
        moved = np.abs(inside - clipped)
        moved = np.pad(moved if gray else moved.max(axis=2), ((0, -h % mh), (0, -w % mw)))
        clips.append(np.where(active, moved.reshape(active.shape[0], mh, active.shape[1], mw).max(axis=(1, 3)), 0))
        active &= clips[-1] > CLIP_TOLERANCE
    out = np.clip(np.rint(part), 0, 255).astype(np.uint8)
    return (np.repeat(out[..., None], 3, axis=2) if gray else out), clips


@pytest.mark.parametrize("subsampling, gray, half_width", [(2, False, 0.5), (0, False, 0.2), (1, False, 0.35),
                                                            (0, True, 0.5)])
def test_the_selective_rounds_give_the_whole_image_loops_outcome(subsampling, gray, half_width):
    """4:2:0 (16 x 16 MCUs), 4:4:4, 4:2:2 and grayscale; the cut MCUs of the bottom and right edges clip too."""
    wrong, cells = _case(subsampling, gray)
    reference, clips = _whole_image_rounds(wrong, cells, ROUNDS, half_width)
    again = clips[0] > CLIP_TOLERANCE
    assert 0 < again.sum() < again.size / 3 and again[-1].any() and again[:, -1].any()  # (a few, edges too)
    diff = np.abs(conform(wrong, cells, half_width=half_width).astype(np.int16) - reference)
    assert diff.max() <= 1 and diff.mean() < 1e-3, (half_width, diff.max(), diff.mean())


@pytest.mark.parametrize("subsampling", [2, 0])
def test_every_mcu_that_still_clips_is_projected_again_and_no_other(subsampling):
    """A second round changes each MCU that clipped by over 2 levels in the first (the cut edge ones included) and
    leaves every MCU that needed no clipping as the first round left it."""
    wrong, cells = _case(subsampling)
    _, clips = _whole_image_rounds(wrong, cells, 1)
    mh, mw = cells.block_rows, cells.block_cols
    moved = np.abs(conform(wrong, cells, rounds=2).astype(np.int16) - conform(wrong, cells, rounds=1)).max(axis=2)
    h, w = moved.shape
    moved = np.pad(moved, ((0, -h % mh), (0, -w % mw))).reshape(-(-h // mh), mh, -(-w // mw), mw).max(axis=(1, 3))
    clipping = clips[0] > 2
    assert clipping[-1].any() and clipping[:, -1].any() and clipping[:-1, :-1].any()
    assert (moved[clipping] > 0).all(), np.argwhere(clipping & (moved == 0))
    assert not moved[clips[0] <= CLIP_TOLERANCE].any(), np.argwhere((clips[0] <= CLIP_TOLERANCE) & (moved > 0))
