"""The JPEG quality read back from a file's quantization tables and from its pixels (dist_dejpeg.jpeg.quality)."""

from __future__ import annotations

import importlib.util
import io
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from dist_dejpeg.jpeg.quality import (
    BASE_LUMA,
    DOUBLE,
    NO_JPEG,
    PIXELS,
    estimate_from_pixels,
    estimate_quality,
    libjpeg_table,
)

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


def test_other_encoders_tables_get_an_ijg_equivalent_quality():
    # tables 8 % off libjpeg's q=60: the nearest match, not exact, with its error
    luma = np.clip(np.rint(libjpeg_table(BASE_LUMA, 60) * 1.08), 1, 255).astype(int).tolist()
    est = estimate_quality(pil_jpeg(RGB[..., 0], qtables=[luma]))
    assert est.quality is not None and not est.exact and abs(est.quality - 60) <= 5 and 0 < est.error < 0.15
    assert est.source == "file tables (IJG-equivalent)" and "IJG-equivalent" in est.describe()
    # flat tables are no libjpeg quality, yet finer ones read higher: every JPEG gets a quality
    flat = [estimate_quality(pil_jpeg(RGB[..., 0], qtables=[[v] * 64])).quality for v in (40, 16, 4)]
    assert None not in flat and flat[0] < flat[1] < flat[2], flat


def test_non_jpeg_without_jpeg_blocks_is_unknown(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(RGB).save(path)
    est = estimate_quality(path)
    assert est.quality is None and "not a JPEG (PNG)" in est.reason and NO_JPEG in est.reason
    assert "quality unknown" in est.describe() and est.source == ""


@cache
def photo(name: str) -> np.ndarray:
    """A real photo from scikit-image's package data (read with PIL: no skimage import)."""
    folder = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    return np.asarray(Image.open(folder / f"{name}.png").convert("RGB"))


def decoded(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_presets_and_camera_tables_get_a_high_quality_not_unknown():
    # Photoshop's tables (Pillow's presets): the "maximum" was unknown and restored blind (-1.49 dB)
    got = {}
    for name in ("low", "medium", "high", "maximum", "web_high", "web_maximum"):
        img = pil_jpeg(photo("chelsea"), quality=name)
        est = estimate_quality(img, decoded(img))
        assert est.source == "file tables (IJG-equivalent)" and est.table_quality == est.quality, (name, est)
        got[name] = est.quality
    assert got["maximum"] >= 90 and got["web_maximum"] >= 95 and got["high"] >= 85, got
    assert got["low"] < got["medium"] < got["high"] < got["maximum"], got


def test_double_compressed_reads_the_first_quality():
    first = decoded(pil_jpeg(photo("chelsea"), quality=20))
    img = pil_jpeg(first, quality=90)
    est = estimate_quality(img, decoded(img))
    assert est.source == DOUBLE and abs(est.quality - 20) <= 2 and est.table_quality == 90, est
    assert "q90" in est.reason and f"q{est.quality}" in est.reason and "double" in est.describe()


def test_single_compressions_are_never_flagged_double():
    # flagging one would restore a good photo as q20: the costly error
    for name in ("chelsea", "coffee"):
        for kw in ({"quality": 5}, {"quality": 13}, {"quality": 50}, {"quality": 90}, {"quality": 95},
                   {"quality": 95, "subsampling": 0}, {"quality": 100}, {"quality": "medium"}):
            img = pil_jpeg(photo(name), **kw)
            est = estimate_quality(img, decoded(img))
            assert est.source.startswith("file tables") and est.quality == est.table_quality, (name, kw, est)


def test_png_of_a_jpeg_reads_its_quality_from_the_pixels(tmp_path):
    for q, arr in ((20, photo("coffee")), (50, photo("chelsea")[..., 1])):  # colour and grey
        Image.fromarray(decoded(pil_jpeg(arr, quality=q)).copy()).save(tmp_path / "x.png")
        est = estimate_quality(tmp_path / "x.png")
        assert est.source == PIXELS and abs(est.quality - q) <= 2, (q, est)


def test_a_clean_smooth_gradient_is_no_jpeg_and_small_pngs_of_jpegs_still_are(tmp_path):
    """A rendered gradient's blocks all hold the same few DCT values, which some quality's steps fit by chance:
    a clean sky PNG read q82 and restore changed it. A 128 px PNG of a q10 JPEG (few values: coarse steps) is
    still read."""
    yy, xx = np.mgrid[0:256, 0:384] / 256.0
    rng = np.random.default_rng(0)
    for sky in (np.stack([90 + 60 * yy, 140 + 60 * yy, 230 - 10 * xx], -1),
                np.stack([20 + 200 * yy, 40 + 0 * yy, 230 - 0 * xx], -1),
                np.stack([30 + 80 * yy + 60 * xx, 60 + 40 * xx, 200 - 90 * yy], -1)):
        for noise in (0, 0.5):
            rgb = np.clip(np.rint(sky + rng.normal(0, noise, sky.shape)), 0, 255).astype(np.uint8)
            Image.fromarray(rgb).save(tmp_path / "sky.png")
            est = estimate_quality(tmp_path / "sky.png")
            assert est.quality is None and "smooth gradient" in est.reason, est
    for q, name in ((10, "chelsea"), (30, "coffee")):
        crop = np.ascontiguousarray(photo(name)[100:228, 100:228])
        Image.fromarray(decoded(pil_jpeg(crop, quality=q)).copy()).save(tmp_path / "x.png")
        est = estimate_quality(tmp_path / "x.png")
        assert est.source == PIXELS and abs(est.quality - q) <= 2, (q, est)


def test_never_compressed_photo_is_unknown_with_the_reason():
    est = estimate_from_pixels(photo("coffee"))
    assert est.quality is None and est.reason == NO_JPEG and est.source == ""
    img = Image.fromarray(photo("chelsea"))
    img.format = "PNG"  # as opened from a PNG file
    est = estimate_quality(img, photo("chelsea"))
    assert est.quality is None and NO_JPEG in est.reason and "not a JPEG (PNG)" in est.reason


def test_rotated_double_compressed_photo_of_odd_size():
    # EXIF orientation 6 turns the file by 90 degrees: with a height that is not a multiple of 8 the block grid
    # of the displayed pixels moves, and coefficient (u, v) was quantized by table entry (v, u)
    first = decoded(pil_jpeg(photo("coffee")[:397, :597], quality=20))
    exif = Image.Exif()
    exif[0x0112] = 6
    img = pil_jpeg(first, quality=90, exif=exif.tobytes())
    shown = decoded(ImageOps.exif_transpose(img))
    assert shown.shape[:2] == (597, 397)
    est = estimate_quality(img, shown)
    assert est.source == DOUBLE and abs(est.quality - 20) <= 2 and est.table_quality == 90, est


def test_cjpeg_default_tables_below_q24_are_read_exactly(tmp_path):
    """cjpeg writes without force_baseline by default: below about q24 its table entries go past 255 (16-bit
    tables, IJG's jpeg_add_quant_table clamps at 32767). Such a file is libjpeg's quality exactly, not an
    IJG-equivalent of another encoder (which the guard treats as up to six qualities low)."""
    jpeglib = pytest.importorskip("jpeglib")
    from dist_dejpeg.jpeg.quality import BASE_CHROMA

    photo = np.ascontiguousarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for q in (5, 10, 20):
        tables = np.stack([np.clip((np.asarray(base) * (5000 // q) + 50) // 100, 1, 32767).reshape(8, 8)
                           for base in (BASE_LUMA, BASE_CHROMA)]).astype(np.uint16)
        assert tables.max() > 255  # (the premise: not baseline)
        path = tmp_path / f"q{q}.jpg"
        jpeglib.from_spatial(photo).write_spatial(str(path), qt=tables)
        est = estimate_quality(path)
        check(est, q)
        assert est.source == "file tables", est


def test_an_ijg_equivalent_quality_is_at_most_its_stated_error_below_the_libjpeg_quality_of_equal_psnr():
    """Pillow's "low" and "medium" Photoshop tables read q76 and q82; on skimage's coins (halved: once a JPEG)
    they give the PSNR of libjpeg's q85 and q89: the guard's margin (IJG_EQUIVALENT_ERROR) covers that (it was 6)."""
    from PIL import JpegPresets
    from skimage import data

    from dist_dejpeg.data.images import halve
    from dist_dejpeg.jpeg.quality import IJG_EQUIVALENT, IJG_EQUIVALENT_ERROR, estimate_from_tables

    coins = halve(data.coins())

    def psnr(q=None, qtables=None):
        decoded = np.asarray(pil_jpeg(coins, **({"quality": q} if q else {"qtables": qtables})), np.float64)
        return 10 * np.log10(255 ** 2 / np.mean((decoded - coins) ** 2))

    ladder = {q: psnr(q) for q in range(60, 101)}
    for preset in ("low", "medium"):
        tables = JpegPresets.presets[preset]["quantization"]
        est = estimate_from_tables(tables)
        equal = min(ladder, key=lambda q: abs(ladder[q] - psnr(qtables=tables[:1])))
        assert est.source == IJG_EQUIVALENT and 0 < equal - est.quality <= IJG_EQUIVALENT_ERROR, (preset, est, equal)
