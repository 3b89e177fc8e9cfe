"""The JPEG quality a file was written at, read from its quantization tables.

libjpeg (and everything built on it: Pillow, OpenCV, ImageMagick, most cameras' "quality" settings in
software) writes the two example tables of the JPEG standard (ITU-T T.81, Annex K) scaled by the quality q:

    scale = 5000 / q  (q < 50)   or   200 - 2 q  (q >= 50)
    entry = clamp((base * scale + 50) // 100, 1, 255)        (baseline: 8-bit entries)

so a file's tables give q back exactly when an encoder used them. Neighbouring qualities can give identical
tables (q = 99 and 100 differ only in a few entries; very low qualities clamp to 255): then the estimate is
the middle of the matching range and ``candidates`` names the range. Other encoders (camera firmware,
Photoshop, mozjpeg's tuned tables) scale other tables: the estimate is the q whose libjpeg tables are
nearest (mean absolute difference of the log table entries, luma and chroma together) and ``error`` says
how near; over ``MAX_LOG_ERROR`` nothing matches well and the quality is reported unknown.

    from dist_dejpeg.jpeg.quality import estimate_quality
    est = estimate_quality("photo.jpg")     # or a PIL image read from a JPEG
    est.quality, est.exact, est.error, est.reason
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance), row-major (natural) order, as Pillow
# exposes them in ``Image.quantization``.
BASE_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
             14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
             49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
BASE_CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
               47, 66, 99, 99, 99, 99, 99, 99, *([99] * 32))

# A mean log-ratio of 0.15 is about 16 % per entry: further than that, the file's tables are not a libjpeg
# quality scale at all, and a quality read from them would mislead a quality-conditioned model.
MAX_LOG_ERROR = 0.15


@dataclass
class QualityEstimate:
    quality: int | None  # the libjpeg quality (1..100), None when unknown
    exact: bool = False  # the file's tables are libjpeg's at that quality, entry for entry
    error: float = 0.0  # mean absolute log-ratio of the table entries to libjpeg's at ``quality``
    candidates: tuple[int, int] | None = None  # the range of qualities whose tables match equally well
    reason: str = ""  # how it was found, or why it is unknown

    def describe(self) -> str:
        if self.quality is None:
            return f"quality unknown ({self.reason})"
        how = "exact" if self.exact else f"nearest libjpeg match, error {self.error:.3f}"
        rng = f", tables equal for q {self.candidates[0]}-{self.candidates[1]}" if (
            self.candidates and self.candidates[0] != self.candidates[1]) else ""
        return f"q{self.quality} from the file's tables ({how}{rng})"


def libjpeg_table(base: tuple[int, ...], quality: int) -> np.ndarray:
    """libjpeg's jpeg_quality_scaling + jpeg_add_quant_table with force_baseline."""
    q = min(max(int(quality), 1), 100)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    return np.clip((np.asarray(base, dtype=np.int64) * scale + 50) // 100, 1, 255)


@lru_cache(maxsize=1)
def _all_tables() -> tuple[np.ndarray, np.ndarray]:
    luma = np.stack([libjpeg_table(BASE_LUMA, q) for q in range(1, 101)])
    chroma = np.stack([libjpeg_table(BASE_CHROMA, q) for q in range(1, 101)])
    return luma, chroma


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
    luma, chroma = _all_tables()
    refs = [luma, chroma][:len(own)]
    exact = np.all([(ref == t[None]).all(axis=1) for ref, t in zip(refs, own)], axis=0)
    if exact.any():
        qs = np.flatnonzero(exact) + 1
        mid = int(qs[(len(qs) - 1) // 2])
        return QualityEstimate(mid, exact=True, error=0.0, candidates=(int(qs[0]), int(qs[-1])),
                               reason="libjpeg's standard tables")
    err = np.mean([np.abs(np.log(ref) - np.log(t[None])).mean(axis=1) for ref, t in zip(refs, own)], axis=0)
    best = float(err.min())
    qs = np.flatnonzero(err <= best + 1e-12) + 1
    mid = int(qs[(len(qs) - 1) // 2])
    if best > MAX_LOG_ERROR:
        return QualityEstimate(None, error=best, reason=f"the file's tables match no libjpeg quality (nearest "
                                                        f"q{mid}, error {best:.3f} > {MAX_LOG_ERROR})")
    return QualityEstimate(mid, exact=False, error=best, candidates=(int(qs[0]), int(qs[-1])),
                           reason="nearest libjpeg tables (another encoder's)")


def estimate_quality(image) -> QualityEstimate:
    """The quality of a JPEG: ``image`` is a path or a PIL image opened from a file. Anything that is not a
    JPEG (PNG, WebP, an array) has no tables: quality unknown, with the reason."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as img:
                return estimate_quality(img)
        except OSError as err:
            return QualityEstimate(None, reason=f"cannot read {image}: {err}")
    fmt = getattr(image, "format", None)
    if fmt not in ("JPEG", "MPO"):
        return QualityEstimate(None, reason=f"not a JPEG ({fmt or 'decoded pixels'}): no quantization tables")
    return estimate_from_tables(getattr(image, "quantization", None) or {})
