"""The do-no-harm guard: restore an image, or pass it through unchanged, from its JPEG quality and the gains
the model's final validation measured (kept in the generator file and in an ONNX export's metadata). Torch-free:
the PyTorch Restorer and the onnxruntime one (restore/onnx_backend.py) decide alike.

    decision = decide(gains, quality=20, source="file tables")   # Decision(20, "file tables", False, "...")

An image whose quality is above the validated range is passed through, and so is one between two validated
qualities unless validation measured a gain at both (between a gain and a loss the harm can start anywhere:
the gain is not interpolated across zero), or one at a validated quality without a gain (NaN included); so
is one of unknown quality (no gain can be predicted for it) unless the guard is off, which restores it blind.
A quality read from another encoder's tables (Photoshop, cameras, mozjpeg: their IJG-equivalent) may be a few
qualities low (jpeg.quality.IJG_EQUIVALENT_ERROR): validation must show a gain up to that much higher, too.

A gain counts where its lower bound (``lows``: the mean over the validation crops minus two standard errors,
train/validation.py) is above zero, not its mean alone: a mean of +0.07 dB over crops of which a quarter lost
was -0.13 dB on the whole photos. Files from before the bound (no ``lows``) are judged by the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_dejpeg.jpeg.formats import JFIF_YCBCR
from dist_dejpeg.jpeg.quality import (BASE_CHROMA, BASE_LUMA, IJG_EQUIVALENT, IJG_EQUIVALENT_ERROR, dct_rows,
                                      libjpeg_table)


# a model whose every validated gain is below this (or NaN) did not train too little: it got worse than the JPEG
# (a run at an lr 1000x the recipe's: 5 dB PSNR); one that learned little sits near 0 (residual output: identity)
COLLAPSED = -1.0


@dataclass
class Decision:
    """What restoring one image does: its quality (None: unknown) and where it came from, and whether the
    image is passed through unchanged (``passthrough``) with the reason."""
    quality: int | None
    source: str  # "given", or estimate_quality's source ("file tables", "pixels", ...), or "unknown"
    passthrough: bool = False
    reason: str = ""
    gain: float | None = None  # restored: the gain validation predicts (its lower bound, dB); None: unchecked
    jpeg_psnr: float | None = None  # restored: the validation's JPEG PSNR there (None: the file holds none)
    half_width: float | None = None  # restored: the cell half-width it is made consistent with its JPEG at (None: not)


def predicted_gain(gains: dict[int, float], quality: int) -> float | None:
    """The validated RGB PSNR gain at ``quality``: linear between the validated qualities, the lowest one's
    below them, None above the highest (not validated)."""
    if not gains or quality > max(gains):
        return None
    around = _neighbours(gains, quality)
    return float(np.interp(quality, around, [gains[q] for q in around]))


def one_quality(quality) -> int:
    """``quality`` as an int in 1..100: an int, a whole float or a one-value array or tensor; a ValueError for
    anything else (a bool, 30.7, a string, one quality per image: a call restores its images at one quality)."""
    try:  # .item(): numpy 2 no longer makes a float of a one-value array of one dimension or more
        item = getattr(quality, "item", lambda: quality)()  # (a bool's item, numpy's or torch's, is a bool)
        # float() parses text: "20" (an unconverted argv or config value) would pass, "q20" not; neither is a number
        value = None if isinstance(item, (bool, str, bytes, bytearray)) else float(item)
    except (TypeError, ValueError, RuntimeError):  # (torch: RuntimeError for a tensor of several values)
        value = None
    if value is None or not value.is_integer() or not 1 <= value <= 100:
        raise ValueError(f"quality must be one JPEG quality, a whole number in 1..100 (or None: unknown) for all "
                         f"the images of a call, got {quality!r}")
    return int(value)


def decide(gains: dict[int, float], quality: int | None, source: str = "given", guard: bool = True,
           lows: dict[int, float] | None = None, jpeg_psnr: dict[int, float] | None = None,
           quality_hint: str = "quality=Q") -> Decision:
    """Restore or pass through an image of ``quality`` (None: unknown), found as ``source`` says, with a model
    whose validation measured ``gains`` ({quality: dB}; empty: restored unchecked) with lower bounds ``lows``
    (the same keys; None or a missing key: the gain itself); ``guard`` False: always restore. ``jpeg_psnr``: the
    validation's JPEG PSNR per quality, given back at this quality (interpolated) with a restoring decision.
    ``quality_hint``: how the caller tells a quality, in an unknown quality's reason (the API's ``quality=Q``;
    ``restore``'s command line gives ``--input-quality Q``)."""
    if quality is None:
        source = "unknown" if source in ("given", "") else source
        if guard:
            # (the file's own reason, beside it, says why: no JPEG compression in its pixels, no pixels to read)
            return Decision(None, source, True, f"quality unknown: passed through; give {quality_hint} to restore "
                                                f"it as quality Q")
        return Decision(None, source, reason="quality unknown: restored blind (guard off), no gain could "
                                             "be predicted")
    quality = one_quality(quality)
    if not guard:
        return Decision(quality, source)
    if not gains:
        return Decision(quality, source, reason="the model file holds no validated gains: restored unchecked")
    # another encoder's tables read as an IJG quality: the truth may be up to IJG_EQUIVALENT_ERROR higher
    upto = min(100, quality + IJG_EQUIVALENT_ERROR) if source == IJG_EQUIVALENT else quality
    said = f"q{quality}" if upto == quality else f"q{quality} (IJG-equivalent, so up to q{upto})"
    gain = predicted_gain(gains, quality)
    if gain is None or predicted_gain(gains, upto) is None:
        return Decision(quality, source, True, f"{said} is above the validated qualities "
                                               f"(up to q{max(gains)}): passed through unchanged")
    low = lower_bounds(gains, lows)
    around = sorted(set(_neighbours(gains, quality)) | set(_neighbours(gains, upto)))
    losing = [q for q in around if not low[q] > 0]  # NaN (a run that diverged) is harm too
    if losing:
        measured = ", ".join(_measured(gains[q], low[q], q) for q in losing)
        return Decision(quality, source, True, f"validation measured {measured}: {said} passed through unchanged")
    sure = min(predicted_gain(low, quality), predicted_gain(low, upto))
    psnr = None  # (at the higher quality where uncertain: the smaller JPEG error, towards writing the input)
    if jpeg_psnr:
        qs = sorted(jpeg_psnr)
        psnr = float(np.interp(upto, qs, [jpeg_psnr[q] for q in qs]))
    at = (f"q{quality}" if quality >= min(gains) else  # (below the range: the lowest's gain, which it is not)
          f"q{min(gains)}, the lowest validated quality (q{quality}, below it, was not measured)")
    return Decision(quality, source, reason=f"validation predicts {gain:+.2f} dB at {at}"
                    + (f" ({predicted_gain(gains, upto):+.2f} dB at q{upto})" if upto != quality else ""), gain=sure,
                    jpeg_psnr=psnr if psnr is None or np.isfinite(psnr) else None)


def exact_blocks(image, quality: int, channels_first: bool = False, scale: float = 1.0) -> str:
    """Why restoring ``image`` (a JPEG's decoded pixels at ``quality``: H x W x 3, 3 x H x W where
    ``channels_first``, or H x W; a numpy array or a torch tensor, uint8, or float times ``scale`` in levels: 255 for
    0..1) has nothing to gain, or "": every
    8 x 8 block on one grid is a single colour (``block_colours``: DC coefficients only, no ringing) and most
    changes between two neighbouring blocks are edges, larger in some YCbCr plane than ``hidden_step`` (what the
    file's quantization could hide of a smooth ramp), not blocking (random 16 px colour charts: under 0.5 % of
    their steps within it; a sky gradient's: all). Such a JPEG reproduced its blocks exactly or
    nearly (grid-aligned graphics, checkerboards, charts: 45-51 dB at q20-q40, lossless at q80) and the
    photo-trained model smoothed their edges (an 8 px checkerboard: -8.4 dB at q20, -8.7 at q40). A gradient's
    block-flat JPEG (a sky at 4:4:4, q5-q55) steps within the limits: blocking, restored. No photo of skimage's
    JPEG'd at q1-q100 (4:2:0 and 4:4:4) nor a graphic the model gains on was judged so (benchmarks/RESULTS.md)."""
    colours = block_colours(image, channels_first)
    if colours is None:
        return ""
    colours *= scale
    planes = colours @ np.array(JFIF_YCBCR).T if colours.shape[-1] == 3 else colours
    changes = blocking = 0
    for axis, frequency in ((0, 8), (1, 1)):  # (vertical steps: the table's first vertical frequency)
        steps = np.abs(np.diff(planes, axis=axis))
        limits = [hidden_step(base, quality, frequency) for base in (BASE_LUMA, BASE_CHROMA, BASE_CHROMA)]
        changed = (steps > 0).any(-1)
        changes += int(changed.sum())
        blocking += int((changed & (steps <= np.array(limits[:planes.shape[-1]])).all(-1)).sum())
    if 2 * blocking >= max(changes, 1) and changes:
        return ""
    return (f"every 8x8 block is one colour, edges between them ({blocking} of {changes} steps within what "
            f"q{quality} hides of a ramp): a JPEG that reproduced its blocks, nothing to restore: passed through "
            f"unchanged")


def hidden_step(base, quality: int, frequency: int) -> float:
    """The largest step between two neighbouring blocks' levels a JPEG at ``quality`` (libjpeg's ``base`` table)
    could show where the image was a smooth ramp across them: the ramp's first coefficient (``frequency``, the
    table's index: 1 across, 8 down) quantized to zero in both blocks, plus the two DC roundings."""
    table = libjpeg_table(base, quality)
    per_slope = np.sqrt(8) * abs(dct_rows()[1] @ (np.arange(8) - 3.5))  # a unit ramp's coefficient (18.2)
    return float(8 * table[frequency] / 2 / per_slope + table[0] / 8)


def block_colours(image, channels_first: bool = False, block: int = 8, band: int = 256) -> np.ndarray | None:
    """Each block's colour (rows x columns of blocks x channels, float64 on the host) where every ``block`` x
    ``block`` block of ``image`` on one grid is one colour, else None: its pixels change only between blocks, every
    horizontal change at columns of one residue mod ``block`` and every vertical one at rows of one (whatever the
    grid's offset: an EXIF orientation moves it). Read in bands of ``band`` rows, the first first: a photo fails
    there. An image smaller than a block either way is None (no grid to find)."""
    rows, cols = (1, 2) if channels_first else (0, 1)
    height, width = image.shape[rows], image.shape[cols]
    if height < block or width < block:
        return None
    found: dict[int, set] = {rows: set(), cols: set()}
    for y0 in range(0, height - 1, band):
        index = [slice(None)] * image.ndim
        index[rows] = slice(y0, y0 + band + 1)  # (one row more: the change across the seam)
        part = image[tuple(index)]
        for axis, start in ((cols, 0), (rows, y0)):
            changed = _changes(part, axis)  # one flag per boundary along axis
            for r in range(block):  # (a slice with a step: numpy's and torch's alike)
                if r not in found[axis] and bool(changed[(r - start) % block::block].any()):
                    found[axis].add(r)
            if len(found[axis]) > 1:
                return None
    corners = image
    for axis, n in ((rows, height), (cols, width)):  # a block starts after each change, and at the edge
        first = (min(found[axis], default=block - 1) + 1) % block
        index = [slice(None)] * image.ndim
        index[axis] = sorted({0, *range(first, n, block)})  # (a list: numpy's and torch's indexing alike)
        corners = corners[tuple(index)]
    corners = np.asarray(corners.cpu() if hasattr(corners, "cpu") else corners, np.float64)
    corners = corners.transpose(1, 2, 0) if channels_first else corners
    return corners if corners.ndim == 3 else corners[..., None]


def _changes(part, axis: int):
    """Per boundary along ``axis``, whether ``part`` changes across it anywhere (exact: no arithmetic)."""
    a, b = [slice(None)] * part.ndim, [slice(None)] * part.ndim
    a[axis], b[axis] = slice(1, None), slice(None, -1)
    changed = part[tuple(a)] != part[tuple(b)]
    for other in sorted(set(range(part.ndim)) - {axis}, reverse=True):
        changed = changed.any(other)
    return changed


def guard_summary(gains: dict[int, float], lows: dict[int, float] | None = None) -> str:
    """One line on what restore's guard does with a model whose final validation measured ``gains`` (and
    ``lows``), for the end of training: the JPEG qualities it restores and why it passes the others through."""
    if not gains:
        return ("restore: the model holds no validated gains; it restores every image of a known JPEG quality "
                "unchecked (those of unknown quality are passed through)")
    acting = [q for q in range(1, 101) if not decide(gains, q, lows=lows).passthrough]
    low = lower_bounds(gains, lows)
    losing = [q for q in sorted(gains) if not low[q] > 0]
    why = ", ".join(f"q{q} NaN" if gains[q] != gains[q] else f"q{q} {gains[q]:+.2f} dB"
                    + (f" (lower bound {low[q]:+.2f})" if gains[q] > 0 else "")
                    for q in losing[:4]) + (", ..." if len(losing) > 4 else "")
    if not acting:
        finite = [g for g in gains.values() if np.isfinite(g)]
        unbounded = lows is not None and all(not np.isfinite(low[q]) for q in gains if np.isfinite(gains[q]))
        advice = ("no lower bound could be measured (validation had one crop per quality: no spread), which no "
                  "training fixes: prepare more or larger validation photos, or restore with --no-guard"
                  if finite and unbounded else
                  "train longer, or restore with --no-guard" if finite and max(finite) > COLLAPSED else
                  "the model harms every validated quality: training went wrong, not short (a learning rate too "
                  "high? see train.log); train again")
        return (f"restore: validation found no sure gain ({why}), so restore passes every image through "
                f"unchanged: {advice}")
    above = f"above q{max(gains)}: not validated" if max(gains) < 100 else ""
    reasons = "; ".join(r for r in (f"validation: {why}" if losing else "", above) if r)
    return f"restore: restores JPEGs of {_ranges(acting)} and passes the others through unchanged ({reasons})"


def _ranges(qualities: list[int]) -> str:
    """'q1-q20, q41-q60' from sorted qualities."""
    runs = []
    for q in qualities:
        if runs and q == runs[-1][1] + 1:
            runs[-1][1] = q
        else:
            runs.append([q, q])
    return ", ".join(f"q{a}" if a == b else f"q{a}-q{b}" for a, b in runs)


def lower_bounds(gains: dict[int, float], lows: dict[int, float] | None) -> dict[int, float]:
    """Each validated quality's lower bound: ``lows``' where given, else the gain itself (a file without bounds)."""
    return {q: (lows or {}).get(q, gains[q]) for q in gains}


def _measured(gain: float, low: float, quality: int) -> str:
    if gain != gain:
        return f"no finite gain (NaN) at q{quality}"
    if gain > 0:
        return f"{gain:+.2f} dB at q{quality}, not surely a gain (lower bound {low:+.2f} dB)"
    return f"{gain:+.2f} dB at q{quality}"


def _neighbours(gains: dict[int, float], quality: int) -> list[int]:
    """The validated qualities the prediction at ``quality`` rests on: itself, or the two around it (the
    lowest one below the range)."""
    qs = sorted(gains)
    if quality in gains or quality <= qs[0]:
        return [quality if quality in gains else qs[0]]
    above = next(q for q in qs if q > quality)
    return [max(q for q in qs if q < quality), above]
