"""The JPEG quality an image was compressed at: from a file's quantization tables, and from the pixels.

Tables. libjpeg (and everything built on it: Pillow, OpenCV, ImageMagick) writes the two example tables of the
JPEG standard (ITU-T T.81, Annex K) scaled by the quality q:

    scale = 5000 / q  (q < 50)   or   200 - 2 q  (q >= 50)
    entry = clamp((base * scale + 50) // 100, 1, 255)        (baseline: 8-bit entries)

so a file's tables give q back exactly when an encoder used them (source "file tables"; when neighbouring
qualities give identical tables the estimate is the middle of the range, ``candidates`` names it). Cameras,
Photoshop (Pillow's presets), mozjpeg write other tables: their IJG-equivalent quality (source "file tables
(IJG-equivalent)") is the libjpeg q whose luminance table is nearest in weighted least squares of the log
entries, clamping included: the scale of the file's table against K.1, as ImageMagick's ``identify`` reads it,
mapped back through libjpeg's formula, weighted to the low frequencies that carry most of the quantization
noise a restorer sees; ``error`` says how far the table is from libjpeg's shape.

Pixels. A decoded JPEG keeps the mark of its quantization: the 8x8 DCT coefficients of its luma, on the block
grid, sit at multiples of the steps it was quantized with (plus about +-1 of rounding noise). For each libjpeg
quality the clustering of the 9 lowest AC coefficients at its steps is scored: the mean of cos(2 pi c / step)
over the coefficients that step would not zero. Multiples of a step are multiples of its divisors too, so finer
qualities fit about as well as the true one and coarser ones do not: the estimate is the coarsest quality
within FIT_SLACK of the best fit. This finds
- double compression: a JPEG whose tables say high quality but whose pixels were quantized at least MIN_RATIO
  times as coarsely before (saved at q20, re-saved at q90): ``quality`` is then the first compression's (the
  one a restorer must undo), source "pixels (double compressed)", ``table_quality`` the tables'. A single
  compression must never be flagged (a q95 photo restored as q20 would be harmed): its larger values also fit
  a step about twice its own, so the values the file left at one step must fit the earlier step too
  (MIN_CONSISTENT); 0 of 2,880 single compressions (q5-100, 4:2:0 and 4:4:4, 15 photos and textures) and no
  Photoshop preset was flagged;
- the quality of a JPEG a PNG/WebP/TIFF once was (source "pixels"), or None: "no JPEG compression found in the
  pixels" (never compressed, resized since, or above about q90, where rounding hides the steps; or a smooth
  gradient, whose blocks hold values of one sign that a quality's steps may fit by chance: MIN_SIGN_BALANCE).
The grid is searched (the phases where neighbouring pixels differ most, best 2 per axis): an EXIF rotation of a
size that is not a multiple of 8, or a crop between two compressions, moves it; a rotation by 90 degrees also
transposes the table, so both orientations are scored. The cost is bounded: a centred window of at most
WINDOW pixels a side, about 0.04-0.09 s for a 12 MP photo on one core.

    from dist_dejpeg.jpeg.quality import estimate_quality
    est = estimate_quality("photo.jpg")        # or a PIL image, with its decoded pixels: (img, rgb)
    est.quality, est.source, est.table_quality, est.describe()
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from dist_dejpeg.jpeg.formats import JFIF_YCBCR

# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance), row-major (natural) order, as Pillow
# exposes them in ``Image.quantization``.
BASE_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
             14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
             49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
BASE_CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
               47, 66, 99, 99, 99, 99, 99, 99, *([99] * 32))

_FREQ = np.add.outer(np.arange(8), np.arange(8)).reshape(64)  # u + v of each natural-order entry
# Weight of each luma entry in the IJG-equivalent fit (least squares of the log entries): the low frequencies
# hold most coefficients that survive quantization. 1 / sqrt(1 + u + v) came nearest the libjpeg quality of
# equal luma PSNR over Photoshop, mozjpeg-style and flat tables on 10 photos (mean error 1.9, worst 9 above;
# benchmarks/experiments/quality_estimate.py); plain 1 / (1 + u + v) read Photoshop's "low" as q51, not ~q77.
TABLE_WEIGHTS = 1.0 / np.sqrt(1.0 + _FREQ)

WINDOW = 1024  # pixels a side of the centred window the pixel statistics read (bounded cost at any size)
AC_POSITIONS = np.flatnonzero((_FREQ >= 1) & (_FREQ <= 3))  # the 9 low-frequency AC coefficients scored
_TURNED = (AC_POSITIONS % 8) * 8 + AC_POSITIONS // 8  # the entry (v, u) of each scored (u, v)
MIN_COEFFICIENTS = 200  # fewer scored coefficients than this tells nothing
MIN_FIT = 0.5  # score (mean cosine) a quality's steps need to count as the pixels' quantization
# ... by coefficients of both signs: a smooth gradient's blocks all hold the same few values, of one sign at each
# position, which some quality's steps fit by chance (a clean rendered sky read q82, and restore changed it). The
# share of the scored coefficients in the rarer sign at their position: gradients (clean, or with noise up to 1
# level, and PNGs of their JPEGs) 0.00-0.02; PNGs of JPEGs of 8 photos, whole and 128 px crops, q5-q90: 0.41-0.49.
MIN_SIGN_BALANCE = 0.2
SMOOTH = "the coefficients that fit hold one sign, as a smooth gradient's do"
FIT_SLACK = 0.03  # a coarser quality within this of the best fit is preferred (the divisor rule)
MIN_RATIO = 1.8  # a first compression counts only with steps this many times the file's at every position
# ... and only when this share of the coefficients the file left nonzero sit on its steps: a single compression
# at q13 also fits q6's steps (twice as coarse) in its larger values, but not in its many values at 1 step.
# Measured: single compressions 0.06-0.15, double 0.73-1.0 (benchmarks/experiments/quality_estimate.py).
MIN_CONSISTENT = 0.6
PIXELS, DOUBLE = "pixels", "pixels (double compressed)"
IJG_EQUIVALENT = "file tables (IJG-equivalent)"
# how far an IJG-equivalent quality may be below the libjpeg quality of the same luma PSNR: worst 9 over 10 photos
# (Pillow's "low" preset, read q76, is q85 on coins; "medium", q82, q89: benchmarks/RESULTS.md, quality_estimate.py;
# this said 6, against its own table's ranges); the guard asks for a gain up to that much higher (restore/guard.py)
IJG_EQUIVALENT_ERROR = 9
NO_JPEG = "no JPEG compression found in the pixels"


@dataclass
class QualityEstimate:
    quality: int | None  # the libjpeg quality (1..100) to restore as, None when unknown
    exact: bool = False  # the file's tables are libjpeg's at that quality, entry for entry
    error: float = 0.0  # mean absolute log-ratio of the table entries to libjpeg's at the tables' quality
    candidates: tuple[int, int] | None = None  # the range of qualities whose tables (or steps) fit equally
    reason: str = ""  # how it was found, or why it is unknown
    source: str = ""  # "file tables", "file tables (IJG-equivalent)", PIXELS, DOUBLE; "" when unknown
    table_quality: int | None = None  # what the file's tables alone say (None: no tables)

    def describe(self) -> str:
        if self.quality is None:
            return f"quality unknown ({self.reason})"
        rng = f", q {self.candidates[0]}-{self.candidates[1]} fit equally" if (
            self.candidates and self.candidates[0] != self.candidates[1]) else ""
        if self.source == DOUBLE:
            return f"q{self.quality}: double compressed ({self.reason}{rng})"
        if self.source == PIXELS:
            return f"q{self.quality} from the pixels ({self.reason}{rng})"
        how = "exact" if self.exact else f"IJG-equivalent, table error {self.error:.3f}"
        return f"q{self.quality} from the file's tables ({how}{rng})"


def libjpeg_table(base: tuple[int, ...], quality: int, baseline: bool = True) -> np.ndarray:
    """libjpeg's jpeg_quality_scaling + jpeg_add_quant_table, with force_baseline (entries up to 255: Pillow's,
    most programs') or without it (up to 32767: cjpeg's default, coarser than baseline's below about q24)."""
    q = min(max(int(quality), 1), 100)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    return np.clip((np.asarray(base, dtype=np.int64) * scale + 50) // 100, 1, 255 if baseline else 32767)


@lru_cache(maxsize=2)
def _all_tables(baseline: bool = True) -> tuple[np.ndarray, np.ndarray]:
    luma = np.stack([libjpeg_table(BASE_LUMA, q, baseline) for q in range(1, 101)])
    chroma = np.stack([libjpeg_table(BASE_CHROMA, q, baseline) for q in range(1, 101)])
    return luma, chroma


def _middle(qs: np.ndarray) -> tuple[int, tuple[int, int]]:
    return int(qs[(len(qs) - 1) // 2]), (int(qs[0]), int(qs[-1]))


def estimate_from_tables(tables: dict[int, list[int]] | list) -> QualityEstimate:
    """``tables``: Pillow's ``Image.quantization`` (table id -> 64 entries, natural order). Table 0 is luma,
    table 1 (when present; grayscale JPEGs have none) chroma; further tables are ignored."""
    if isinstance(tables, (list, tuple)):
        tables = dict(enumerate(tables))
    if not tables or 0 not in tables:
        return QualityEstimate(None, reason="the file holds no luminance quantization table")
    try:
        own = [np.asarray(tables[k], dtype=np.float64).reshape(64) for k in (0, 1) if k in tables]
    except ValueError:
        return QualityEstimate(None, reason="a quantization table without 64 entries")
    if any((t < 1).any() for t in own):
        return QualityEstimate(None, reason="a quantization table with zero entries")
    exact = np.zeros(100, dtype=bool)
    for baseline in (True, False):
        refs = _all_tables(baseline)[:len(own)]
        exact |= np.all([(ref == t[None]).all(axis=1) for ref, t in zip(refs, own)], axis=0)
    luma, chroma = _all_tables()
    refs = [luma, chroma][:len(own)]
    if exact.any():
        q, rng = _middle(np.flatnonzero(exact) + 1)
        return QualityEstimate(q, exact=True, candidates=rng, reason="libjpeg's standard tables",
                               source="file tables", table_quality=q)
    fit = (np.log(luma) - np.log(own[0])[None]) ** 2 @ TABLE_WEIGHTS
    q, rng = _middle(np.flatnonzero(fit <= fit.min() + 1e-9) + 1)
    error = float(np.mean([np.abs(np.log(ref[q - 1]) - np.log(t)).mean() for ref, t in zip(refs, own)]))
    return QualityEstimate(q, error=error, candidates=rng, source=IJG_EQUIVALENT, table_quality=q,
                           reason=f"another encoder's tables, IJG-equivalent q{q} (table error {error:.3f})")


# ---- pixels -------------------------------------------------------------------------------------------------

def dct_rows() -> np.ndarray:
    """The 8-point DCT-II as an 8 x 8 matrix, rows the frequencies."""
    n = np.arange(8)
    d = np.cos((2 * n[None] + 1) * n[:, None] * np.pi / 16) * np.sqrt(2 / 8)
    d[0] /= np.sqrt(2)
    return d  # orthonormal: JPEG's FDCT of (pixel - 128) in the units its quantization steps divide


@lru_cache(maxsize=1)
def _basis() -> np.ndarray:
    d = dct_rows()
    return np.stack([np.outer(d[p // 8], d[p % 8]).reshape(64) for p in AC_POSITIONS], axis=1).astype(np.float32)


def _luma_window(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(JFIF luma, clipped-pixel mask) of the centred window of at most WINDOW + 8 pixels a side. A pixel at 0
    or 255 in any channel may have been clipped by the decoder: its block's coefficients are not the file's."""
    h, w = rgb.shape[:2]
    side_h, side_w = min(h, WINDOW + 8), min(w, WINDOW + 8)
    top, left = (h - side_h) // 2, (w - side_w) // 2
    win = rgb[top:top + side_h, left:left + side_w]
    if win.ndim == 2:
        return win.astype(np.float32), (win == 0) | (win == 255)
    r, g, b = (win[..., c] for c in range(3))
    clipped = (np.minimum(np.minimum(r, g), b) == 0) | (np.maximum(np.maximum(r, g), b) == 255)
    wr, wg, wb = (np.float32(w) for w in JFIF_YCBCR[0])
    return wr * r.astype(np.float32) + wg * g.astype(np.float32) + wb * b.astype(np.float32), clipped


def _grid_offsets(luma: np.ndarray) -> list[tuple[int, int]]:
    """Likely (row, column) phases of the 8x8 grid in ``luma``, best first: block edges are where neighbouring
    pixels differ most on average (JPEG quantizes each block alone); differences are capped at 10 so that the
    photo's own edges do not outvote them. The best was right for every axis at q <= 75 on 8 photos, for 94-97%
    at q85-90, 66% at q95; the runner-up phases of each axis are worth a try."""
    ranked = []
    for axis in (0, 1):
        step = np.minimum(np.abs(np.diff(luma, axis=axis)), 10).mean(axis=1 - axis)  # [i]: edge i | i + 1
        ranked.append(np.argsort([-step[(k - 1) % 8::8].mean() for k in range(8)], kind="stable")[:2].tolist())
    (r0, r1), (c0, c1) = ranked
    return [(r0, c0), (r0, c1), (r1, c0), (r1, c1)]


def _coefficients(luma: np.ndarray, clipped: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    """N x P low-frequency AC coefficients of the unclipped 8x8 blocks at ``offset`` (whole blocks only)."""
    top, left = offset
    h, w = min((luma.shape[0] - top) // 8 * 8, WINDOW), min((luma.shape[1] - left) // 8 * 8, WINDOW)
    if h < 8 or w < 8:
        return np.zeros((0, len(AC_POSITIONS)), np.float32)

    def blocks(a):
        return a[top:top + h, left:left + w].reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 64)

    keep = ~blocks(clipped).any(axis=1)
    return (blocks(luma)[keep] - 128) @ _basis()


@lru_cache(maxsize=1)
def _candidate_steps() -> np.ndarray:
    """2 x 99 x P: libjpeg's luma steps of q = 1..99 at the scored positions, as written (0) and transposed (1):
    an image turned by 90 degrees (EXIF orientation 5-8) has coefficient (u, v) quantized by entry (v, u)."""
    luma = _all_tables()[0][:99]
    return np.stack([luma[:, AC_POSITIONS], luma[:, _TURNED]])


def _fits(coefs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, count), each 2 orientations x 99 qualities: the mean of cos(2 pi c / step) over the coefficients c
    with |c| >= step / 2 (those the step would not zero), positions pooled, and how many there were."""
    steps = _candidate_steps()
    score, count = np.zeros(steps.shape), np.zeros(steps.shape)
    for p in range(coefs.shape[1]):
        hist = np.bincount(np.rint(np.abs(coefs[:, p]) * 4).astype(np.int64))  # quarter-unit bins
        nz = np.flatnonzero(hist)
        values, counts = nz / 4, hist[nz].astype(np.float64)
        uniq, index = np.unique(steps[:, :, p], return_inverse=True)
        use = values[None] >= uniq[:, None] / 2
        cos = (np.cos(2 * np.pi * values[None] / uniq[:, None]) * use) @ counts
        score[:, :, p], count[:, :, p] = cos[index].reshape(2, 99), (use @ counts)[index].reshape(2, 99)
    n = count.sum(axis=2)
    return score.sum(axis=2) / np.maximum(n, 1), n


def estimate_from_pixels(rgb: np.ndarray, table=None) -> QualityEstimate:
    """The quality of the JPEG compression the pixels show (``rgb``: H x W x 3 or H x W uint8). ``table``: the
    file's own luminance table (64 entries, natural order) when the pixels come from a JPEG: then only a
    compression at least MIN_RATIO times coarser than it counts (an earlier one), reported as DOUBLE."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 3 and rgb.shape[2] == 1:
        rgb = rgb[..., 0]
    if rgb.ndim not in (2, 3) or min(rgb.shape[:2]) < 16:
        return QualityEstimate(None, reason=f"{NO_JPEG} (too few 8x8 blocks to tell)")
    luma, clipped = _luma_window(rgb)
    offsets = _grid_offsets(luma)
    for offset in offsets:
        est = _estimate_at(_coefficients(luma, clipped, offset), table)
        if est.quality is not None or SMOOTH in est.reason:
            break
    return est


def _estimate_at(coefs: np.ndarray, table) -> QualityEstimate:
    if coefs.size < MIN_COEFFICIENTS:
        return QualityEstimate(None, reason=f"{NO_JPEG} (too few 8x8 blocks to tell)")
    score, count = _fits(coefs)
    steps = _candidate_steps()
    ok = count >= MIN_COEFFICIENTS
    if table is not None:
        own = np.asarray(table, dtype=np.float64).reshape(64)[AC_POSITIONS]
        ok &= (steps[0] / own[None] >= MIN_RATIO).all(axis=1)[None]  # the same ratios either way round
    if not ok.any() or score[ok].max() < MIN_FIT:
        return QualityEstimate(None, reason=NO_JPEG)
    turn = int(np.argmax(np.where(ok, score, -2).max(axis=1)))
    best = score[turn][ok[turn]].max()
    first = int(np.flatnonzero(ok[turn] & (score[turn] >= best - FIT_SLACK))[0])
    q, rng = _middle(np.flatnonzero((steps[turn] == steps[turn, first][None]).all(axis=1)) + 1)
    if _sign_balance(coefs, steps[turn, q - 1]) < MIN_SIGN_BALANCE:  # (no other grid is tried: the image's doing)
        return QualityEstimate(None, reason=f"{NO_JPEG} ({SMOOTH})")
    if table is not None:
        own = np.asarray(table, dtype=np.float64).reshape(64)[_TURNED if turn else AC_POSITIONS]
        if _consistent(coefs, steps[turn, q - 1], own) < MIN_CONSISTENT:
            return QualityEstimate(None, reason=NO_JPEG)
    return QualityEstimate(q, candidates=rng, source=PIXELS if table is None else DOUBLE,
                           reason=f"8x8 DCT coefficients cluster at q{q}'s steps (fit {score[turn, q - 1]:.2f})")


def _sign_balance(coefs: np.ndarray, step: np.ndarray) -> float:
    """The share of the coefficients ``step`` would not zero that have the rarer sign at their position."""
    use = np.abs(coefs) >= step / 2
    positive, negative = ((coefs > 0) & use).sum(axis=0), ((coefs < 0) & use).sum(axis=0)
    return float(np.minimum(positive, negative).sum() / max(use.sum(), 1))


def _consistent(coefs: np.ndarray, step: np.ndarray, own: np.ndarray) -> float:
    """The share of the coefficients the file's own steps ``own`` left nonzero (beyond their rounding noise)
    that lie within that noise of a nonzero multiple of the earlier ``step``. Where the file's own steps do not
    show on this grid (a crop by other than a multiple of 8 between the two compressions moved it) its
    quantization noise is spread over the coefficients: the tolerance is then a whole step, not half of one."""
    mag = np.abs(coefs)
    use = mag >= own / 2
    aligned = (np.cos(2 * np.pi * mag / own) * use).sum() >= MIN_FIT * max(use.sum(), 1)
    tol = (own / 2 if aligned else own) + 1
    nonzero = mag > tol
    near = np.abs(mag - np.maximum(np.rint(mag / step), 1) * step) <= tol
    return float((near & nonzero).sum() / max(nonzero.sum(), 1))


def _pixels_of(image) -> np.ndarray | None:
    """The decoded pixels of a path or PIL image (luma only for a JPEG file: exact, no colour conversion)."""
    from PIL import Image

    try:
        if isinstance(image, (str, Path)):
            with Image.open(image) as img:
                if img.format == "JPEG":
                    img.draft("L", None)  # libjpeg skips the colour conversion: the decoded luma itself
                return np.asarray(img.convert("L") if img.mode == "L" else img.convert("RGB"))
        return np.asarray(image.convert("RGB"))
    except (OSError, ValueError):
        return None


def earlier_compression(quality: int | None, source: str, image) -> bool:
    """Whether the JPEG ``image`` (a PIL image opened from its file) is restored as an earlier, coarser compression
    than its own tables': its pixels showed one (``source`` DOUBLE), or the ``quality`` given for it
    (--input-quality: ``source`` "given") has luma steps at least MIN_RATIO times the file's at every low-frequency
    AC position, as a first compression counts in estimate_from_pixels."""
    if source == DOUBLE:
        return True
    tables = getattr(image, "quantization", None) or {}
    if source != "given" or quality is None or getattr(image, "format", None) not in ("JPEG", "MPO") or 0 not in tables:
        return False
    try:
        given = libjpeg_table(BASE_LUMA, int(quality))[AC_POSITIONS]
    except (TypeError, ValueError):  # (not a quality: the guard's own check says so)
        return False
    own = np.asarray(tables[0], dtype=np.float64).reshape(64)[AC_POSITIONS]
    return bool((given / own >= MIN_RATIO).all())


def estimate_quality(image, rgb: np.ndarray | None = None) -> QualityEstimate:
    """The quality to restore ``image`` as: a path, a PIL image opened from a file, or None; ``rgb``: its
    decoded pixels (H x W x 3 or H x W uint8, EXIF orientation applied or not) when the caller has them, else
    decoded from ``image``. A JPEG's tables give the quality unless its pixels show an earlier, coarser
    compression; anything else gets the quality its pixels show, or None with the reason."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as img:
                return estimate_quality(img, rgb if rgb is not None else _pixels_of(image))
        except OSError as err:
            return QualityEstimate(None, reason=f"cannot read {image}: {err}")
    fmt = getattr(image, "format", None)
    if rgb is None and image is not None:
        rgb = _pixels_of(image)
    if fmt not in ("JPEG", "MPO"):
        if rgb is None:
            return QualityEstimate(None, reason=f"not a JPEG ({fmt or 'no image'}) and no pixels to read")
        est = estimate_from_pixels(rgb)
        if est.quality is None and fmt:
            est.reason = f"not a JPEG ({fmt}) and {est.reason}"
        return est
    tables = estimate_from_tables(getattr(image, "quantization", None) or {})
    if tables.quality is None or rgb is None or image.mode not in ("RGB", "L"):
        return tables  # no tables, or not YCbCr/gray (CMYK): the pixels' luma is not the file's
    first = estimate_from_pixels(rgb, table=image.quantization[0])
    if first.quality is None or first.quality >= tables.quality:
        return tables
    first.table_quality, first.error = tables.quality, tables.error
    first.reason = (f"the tables say q{tables.quality} but the pixels were quantized at about q{first.quality} "
                    f"before: {first.reason}")
    return first
