"""The JPEG quality read back from a file's quantization tables (dist_dejpeg.jpeg.quality)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dist_dejpeg.jpeg.quality import BASE_LUMA, estimate_quality, libjpeg_table

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def pil_jpeg(arr: np.ndarray, **kw) -> Image.Image:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    buf.seek(0)
    return Image.open(buf)


def check(est, q):
    assert est.quality is not None and est.exact, est
    lo, hi = est.candidates
    assert lo <= q <= hi, (q, est)  # q itself is among the qualities whose tables are these
    if lo == hi:
        assert est.quality == q


@pytest.mark.parametrize("subsampling", [0, 2], ids=["444", "420"])
def test_pil_every_quality(subsampling):
    ambiguous = 0
    for q in range(2, 101):
        est = estimate_quality(pil_jpeg(RGB, quality=q, subsampling=subsampling))
        check(est, q)
        ambiguous += est.candidates[0] != est.candidates[1]
    assert ambiguous < 10  # only the clamped ends share tables


def test_pil_grayscale_every_tenth_quality():
    for q in range(2, 101, 7):
        img = pil_jpeg(RGB[..., 0], quality=q)
        assert img.mode == "L" and len(img.quantization) == 1
        check(estimate_quality(img), q)


def test_opencv_written_files(tmp_path):
    cv2 = pytest.importorskip("cv2")
    for q in (2, 5, 10, 17, 30, 50, 64, 75, 90, 95, 100):
        for name, arr, flags in (("c", RGB, []), ("g", RGB[..., 0], []),
                                 ("s", RGB, [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])):
            path = tmp_path / f"{name}{q}.jpg"
            assert cv2.imwrite(str(path), arr, [cv2.IMWRITE_JPEG_QUALITY, q, *flags])
            check(estimate_quality(path), q)


def test_other_encoders_tables_nearest_or_unknown():
    # tables 8 % off libjpeg's q=60: the nearest match, not exact, with its error
    luma = np.clip(np.rint(libjpeg_table(BASE_LUMA, 60) * 1.08), 1, 255).astype(int).tolist()
    est = estimate_quality(pil_jpeg(RGB[..., 0], qtables=[luma]))
    assert est.quality is not None and not est.exact and abs(est.quality - 60) <= 5 and 0 < est.error < 0.15
    assert "nearest" in est.describe()
    # a flat table is no libjpeg quality: unknown, and says why
    est = estimate_quality(pil_jpeg(RGB[..., 0], qtables=[[40] * 64]))
    assert est.quality is None and "match no libjpeg quality" in est.reason


def test_non_jpeg_is_unknown(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(RGB).save(path)
    est = estimate_quality(path)
    assert est.quality is None and "not a JPEG (PNG)" in est.reason
    assert "quality unknown" in est.describe()
