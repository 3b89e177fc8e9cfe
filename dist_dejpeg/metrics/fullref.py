"""Full-reference metrics on whole images: PSNR (RGB or Y), PSNR-B, SSIM, and the colour metrics (PSNR of the
JFIF Y/Cb/Cr planes, the mean signed shift of each RGB channel). Images are uint8 H x W x 3 RGB (or H x W
grayscale) numpy arrays on the 0-255 scale. :func:`ssim_map` is the one SSIM: validation runs it on torch
batches (``metrics/sums.py``), the ``evaluate`` command on these arrays.

Where each number comes from, and why (measured on this project's 2-core CPU machine, numpy 2.4.6, scipy 1.17):

* PSNR (numpy float64) and SSIM (float64; numpy on the CPU, the same code takes torch CUDA tensors; its blur is
  scipy's correlate1d on numpy arrays, shifted multiply-adds on tensors: the same filter).
  torchmetrics' SSIM was tried first and differed from scikit-image's structural_similarity(
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False) by 1.3e-3 on a q10 JPEG (it averages
  over the whole image with reflect padding, where scikit-image leaves the 5-pixel border out); the code
  here agrees with scikit-image to < 1e-6 (tested), PSNR to 1e-9 dB.
* PSNR-B: written here (a dozen lines of numpy), by default as KAIR/SwinIR's calculate_psnrb computes it (the BEF's
  normaliser included); FBCNN's own utils_image.calculate_psnrb as ``convention="fbcnn"``. Tested against
  transcriptions of both, on a worked example computed by hand and on its known properties.
* Memory: every metric here is a sum of per-pixel (SSIM: per-window) terms, so each is summed over bands of
  BAND_ROWS rows, converted to float64 a band at a time. Whole-image float64 copies (8 bytes per value, several
  alive at once) peaked at +0.8 GB (PSNR), +1.2 GB (colour metrics) and +1.3 GB (SSIM) on one 12 MP photo;
  in bands each stays under +0.1 GB, with the same values (each term is computed as before; only the order of
  the final sum differs, ~1e-15 relative; uint8 PSNR and PSNR-B sums are integers, exact either way).
"""

from __future__ import annotations

import math

import numpy as np

from dist_dejpeg.jpeg.formats import JFIF_YCBCR

SSIM_MIN_SIDE = 11  # its Gaussian window's size ('valid' filtering)
# PSNR-B as the implementations behind published tables compute it (psnr_b says how they differ): KAIR's (SwinIR,
# BasicSR-like; the default) and FBCNN's own
PSNRB_CONVENTIONS = {"kair": "KAIR/SwinIR calculate_psnrb: per-channel mean, BEF over H*(W//8-1) boundary pairs",
                     "fbcnn": "FBCNN calculate_psnrb: RGB MSE + BEF of the rounded Y, over H*(W/8-1) pairs"}
BAND_ROWS = 256  # rows summed at a time: a 4000-px-wide float64 RGB band is 25 MB, a 12 MP image 288 MB
# SSIM's Gaussian window: 11 taps, sigma 1.5, as Python floats so that one code serves numpy and torch
_WINDOW = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)
_WINDOW = [float(v) for v in _WINDOW / _WINDOW.sum()]


def _image(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"expected an H x W x 3 RGB or H x W grayscale image, got shape {a.shape}")
    return a


def cropped(a: np.ndarray, crop_border: int) -> np.ndarray:
    """``a`` without ``crop_border`` pixels on each side (the usual border crop of the published tables)."""
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border == 0:
        return a
    if min(a.shape[:2]) <= 2 * crop_border:
        raise ValueError(f"crop_border={crop_border} leaves nothing of a {a.shape[0]}x{a.shape[1]} image")
    return a[crop_border:-crop_border, crop_border:-crop_border]


def rgb_to_y(rgb) -> np.ndarray:
    """ITU-R BT.601 luma with MATLAB's rgb2ycbcr coefficients, on 0-255 RGB (uint8 or float in 0..255):
    Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, in [16, 235], float64, NOT rounded to uint8 as MATLAB's
    rgb2ycbcr of a uint8 image and KAIR/FBCNN's rgb2ycbcr are (BasicSR/SwinIR's to_y_channel convention: their
    PSNR-Y is 0.01-0.03 dB apart from this one's)."""
    a = np.asarray(rgb, dtype=np.float64)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"rgb_to_y expects H x W x 3, got shape {a.shape}")
    return 16.0 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255.0


def _pair(img, ref, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    """Both images checked and cropped, in their own dtype: :func:`_rows` converts them a band at a time."""
    a, b = _image(img), _image(ref)
    if a.shape != b.shape:
        raise ValueError(f"image and reference differ in shape: {a.shape} vs {b.shape}")
    return cropped(a, crop_border), cropped(b, crop_border)


def row_bands(h: int, rows: int, extra: int = 0):
    """(start, stop) of consecutive ``rows``-row bands covering rows 0..h-1, each stop moved ``extra`` rows on
    (not past h): the rows that a band's terms also read (SSIM's window: 10, a vertical difference: 1). The
    banded metrics' one loop (here, metrics/noref.py, LPIPS in metrics/whole_image.py)."""
    for start in range(0, h, rows):
        yield start, min(start + rows + extra, h)


def _rows(a: np.ndarray, start: int, stop: int, y_only: bool) -> np.ndarray:
    """Rows start..stop-1 of ``a`` in float64, H x W x C (C = 1 for grayscale or ``y_only``'s Y of colour)."""
    band = a[start:stop]
    if y_only and band.ndim == 3:
        band = rgb_to_y(band)
    band = band.astype(np.float64, copy=False)
    return band[..., None] if band.ndim == 2 else band


def _psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def psnr(img, ref, *, y_only: bool = False, crop_border: int = 0) -> float:
    """PSNR in dB of ``img`` against ``ref`` (0-255 scale, data range 255). RGB: one MSE over all three
    channels; ``y_only``: on BT.601 Y (:func:`rgb_to_y`, float, not rounded, like BasicSR's
    test_y_channel). ``crop_border`` pixels are dropped on each side. Identical images give ``math.inf``."""
    a, b = _pair(img, ref, crop_border)
    squares = sum(float(np.sum((_rows(a, i, j, y_only) - _rows(b, i, j, y_only)) ** 2))
                  for i, j in row_bands(len(a), BAND_ROWS))
    values = a.shape[0] * a.shape[1] * (1 if y_only or a.ndim == 2 else 3)
    return _psnr_from_mse(squares / values)


def colour_metrics(img, ref, *, crop_border: int = 0) -> dict[str, float | None]:
    """Where the error sits and whether the colours moved: PSNR on the JFIF Y, Cb and Cr planes (JPEG's own
    colour space, where its 4:2:0 subsampling acts; 0-255, not rounded) and the mean signed shift of each RGB
    channel in levels (a colour cast: restored brighter in R and B and darker in G reads +, -, +). The same
    quantities as validation's (:func:`dist_dejpeg.metrics.sums.per_image`), on whole uint8 images. Against a
    grayscale reference the chroma PSNRs are None (its chroma error is rounding noise, ~150 dB, that would
    swamp any mean)."""
    a, b = _pair(img, ref, crop_border)
    if a.ndim != 3:
        raise ValueError("colour metrics need an H x W x 3 image")
    m = np.asarray(JFIF_YCBCR)
    squares, sums = np.zeros(3), np.zeros(3)
    for i, j in row_bands(len(a), BAND_ROWS):
        diff = _rows(a, i, j, False) - _rows(b, i, j, False)
        planes = diff @ m.T  # linear: the YCbCr difference is the transformed RGB difference
        squares += [float(np.sum(planes[..., c] ** 2)) for c in range(3)]
        sums += [float(np.sum(diff[..., c])) for c in range(3)]
    n = a.shape[0] * a.shape[1]
    out = {f"psnr_{p}": _psnr_from_mse(squares[i] / n) for i, p in enumerate(("y", "cb", "cr"))}
    if np.array_equal(b[..., 0], b[..., 1]) and np.array_equal(b[..., 1], b[..., 2]):
        out["psnr_cb"] = out["psnr_cr"] = None  # a grayscale reference has no chroma to get right
    out.update({f"shift_{c}": float(sums[i] / n) for i, c in enumerate("rgb")})
    return out


def ssim_map(x, y, data_range: float = 255.0):
    """The SSIM map of ``x`` against ``y`` over their last two axes, numpy arrays or torch tensors alike (the
    same code runs on CUDA tensors and on batches N x C x H x W): Gaussian window 11 x 11, sigma 1.5, K1 0.01,
    K2 0.03, population covariances, only the positions where the whole window fits (H - 10 x W - 10)."""

    def blur(t):  # separable 'valid' Gaussian filtering: 11 shifted multiply-adds per axis
        h, w = t.shape[-2:]
        t = sum(_WINDOW[k] * t[..., :, k:w - 10 + k] for k in range(11))
        return sum(_WINDOW[k] * t[..., k:h - 10 + k, :] for k in range(11))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    blur = _blur_numpy if isinstance(x, np.ndarray) else blur  # evaluate's path: the same filter in C
    mx, my, xx, yy, xy = blur(x), blur(y), blur(x * x), blur(y * y), blur(x * y)
    vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def _blur_numpy(t: np.ndarray) -> np.ndarray:
    """:func:`ssim_map`'s 'valid' Gaussian blur of a numpy array, one scipy correlate1d pass per axis (C, one pass
    over memory each) in place of 22 numpy multiply-adds, which were most of SSIM's time: 7.7 -> 3.3 s on a
    12 MP photo, one thread (benchmarks/experiments/metric_memory.py). The sums run in another order: SSIM
    differs by <= 6e-16 relative on the skimage photos (tested)."""
    from scipy.ndimage import correlate1d

    t = correlate1d(t, _WINDOW, axis=-1)[..., 5:-5]
    return correlate1d(t, _WINDOW, axis=-2)[..., 5:-5, :]


def ssim(img, ref, *, y_only: bool = False, crop_border: int = 0) -> float:
    """SSIM (Wang et al. 2004) of :func:`ssim_map`, data range 255, averaged over the positions where the
    whole window fits (the 5-pixel border left out, as scikit-image does). RGB: the mean over channels,
    computed channel by channel over bands of map rows (each band reads the 10 rows below it too, as the
    window does: every map value is the one of the whole image; +107 MB at the peak for 12 MP). On the CPU numpy
    and scipy are used:
    torch's float64 elementwise ops ran ~20x slower than numpy's on this 2-core machine under load (its
    thread pool), and float64 conv2d ~1 s for 192x192."""
    a, b = _pair(img, ref, crop_border)
    h, w = a.shape[:2]
    if min(h, w) < SSIM_MIN_SIDE:
        raise ValueError(f"SSIM needs at least {SSIM_MIN_SIDE}x{SSIM_MIN_SIDE} pixels, got {h}x{w}")
    edge, channels = SSIM_MIN_SIDE - 1, 1 if y_only or a.ndim == 2 else 3
    sums = np.zeros(channels)
    for i, j in row_bands(h - edge, BAND_ROWS):  # map rows i..j-1 from image rows i..j+edge-1
        for c in range(channels):  # a channel at a time: a contiguous float64 copy, a third of the RGB band's memory
            x, y = (_rows(v if channels == 1 else v[..., c], i, j + edge, y_only)[..., 0] for v in (a, b))
            sums[c] += float(ssim_map(x, y).sum())
    return float(np.mean(sums / ((h - edge) * (w - edge))))


def blocking_effect_factor(x: np.ndarray, block: int = 8, convention: str = "kair") -> float:
    """BEF of Yim & Bovik 2011 on one channel: eta * (D_B - D_Bc), eta = log2(B) / log2(min(H, W)) when
    D_B > D_Bc, else 0. D_B: the sum of squared differences of horizontally and vertically adjacent pixel
    pairs that straddle an 8x8 block boundary (columns/rows 7|8, 15|16, ...) over N_B; D_Bc: the same over
    all other adjacent pairs, over the other pairs' count less the difference. N_B as the implementations that
    published tables used count it (:data:`PSNRB_CONVENTIONS`): H (W // 8 - 1) + W (H // 8 - 1) (KAIR) or
    H (W / 8 - 1) + W (H / 8 - 1) (FBCNN); both are the boundary pairs' count where H and W are multiples of 8,
    and one boundary short of it (KAIR) or fractional (FBCNN) elsewhere: a 481x321 image's PSNR-B differed
    by 0.065 dB from KAIR's with the exact count."""
    x = np.asarray(x)
    sums = np.zeros(2)
    for i, j in row_bands(len(x), BAND_ROWS, extra=1):
        sums += _boundary_sums(_rows(x, i, j, False)[..., 0], i, block)
    return _bef(sums, x.shape, block, convention)


def _boundary_sums(band: np.ndarray, start: int, block: int) -> np.ndarray:
    """(sum over block-boundary pairs, sum over the other pairs) of squared adjacent differences in ``band``, the
    image's rows start.. (horizontal pairs on all but a band's extra last row, which only closes its vertical
    pairs; the last band has none)."""
    h, w = band.shape
    dh = np.diff(band[:BAND_ROWS], axis=1) ** 2  # pair (col j, col j+1) -> index j
    dv = np.diff(band, axis=0) ** 2  # pair (row start+i, start+i+1) -> index i
    bh = (np.arange(w - 1) + 1) % block == 0
    bv = (start + np.arange(h - 1) + 1) % block == 0
    return np.array([dh[:, bh].sum() + dv[bv, :].sum(), dh[:, ~bh].sum() + dv[~bv, :].sum()])


def _bef(sums: np.ndarray, shape: tuple[int, ...], block: int, convention: str = "kair") -> float:
    """BEF from :func:`_boundary_sums` summed over an H x W channel's bands, N_B counted by ``convention``."""
    h, w = shape[:2]
    if convention not in PSNRB_CONVENTIONS:
        raise ValueError(f"PSNR-B convention must be one of {', '.join(PSNRB_CONVENTIONS)}, got {convention!r}")
    n_hb, n_vb = (h * (w // block - 1), w * (h // block - 1)) if convention == "kair" else \
        (h * (w / block - 1), w * (h / block - 1))
    n_b, n_bc = n_hb + n_vb, h * (w - 1) - n_hb + w * (h - 1) - n_vb
    if n_b <= 0 or n_bc <= 0:
        return 0.0
    d_b, d_bc = sums[0] / n_b, sums[1] / n_bc
    if d_b <= d_bc:
        return 0.0
    return float(math.log2(block) / math.log2(min(h, w)) * (d_b - d_bc))


def psnr_b(img, ref, *, y_only: bool = False, crop_border: int = 0, convention: str = "kair") -> float:
    """PSNR-B (Yim & Bovik 2011) in dB: 10 log10(255^2 / (MSE + BEF)), the blocking effect factor BEF
    measured on the TESTED image ``img`` over its 8x8 block boundaries (see :func:`blocking_effect_factor`).

    ``convention`` (:data:`PSNRB_CONVENTIONS`): "kair", KAIR/SwinIR/BasicSR-style calculate_psnrb (the
    default): a colour image's PSNR-B computed per channel (each with its own MSE and BEF) and the three
    averaged, N_B = H (W // 8 - 1) + W (H // 8 - 1). "fbcnn", FBCNN's own utils_image.calculate_psnrb (its
    main_test_fbcnn_color.py): one MSE over the three RGB channels plus the BEF of the TESTED image's Y rounded
    to uint8, N_B = H (W / 8 - 1) + W (H / 8 - 1); the two differ by up to ~0.7 dB on a colour q10 JPEG, and
    also on a grayscale image whose sides are not multiples of 8: PSNR-B values compare only within one
    convention. ``y_only`` or a grayscale image: the one channel (Y: float, :func:`rgb_to_y`), where the two
    differ only in N_B. ``crop_border`` shifts the 8x8 grid unless it is a multiple of 8 (the block grid is
    that of the cropped image, as in KAIR). On one channel PSNR-B <= PSNR (equal when the block-boundary
    differences are no larger than the others); the per-channel mean of "kair" can exceed the RGB PSNR of the
    pooled MSE (a mean of per-channel PSNRs is >= that PSNR). Identical images give ``math.inf``."""
    a, b = _pair(img, ref, crop_border)
    channels = 1 if y_only or a.ndim == 2 else 3
    fbcnn_rgb = convention == "fbcnn" and channels == 3  # (a convention not known: _bef says so)
    squares, boundary = np.zeros(channels), np.zeros((channels, 2))
    for i, j in row_bands(len(a), BAND_ROWS, extra=1):
        x, y = _rows(a, i, j, y_only), _rows(b, i, j, y_only)
        squares += ((x[:BAND_ROWS] - y[:BAND_ROWS]) ** 2).sum(axis=(0, 1))  # (its extra row is the next band's)
        if fbcnn_rgb:  # the rounded Y's BEF, held in the first channel's place
            boundary[0] += _boundary_sums(np.round(rgb_to_y(x)), i, 8)
        else:
            boundary += [_boundary_sums(x[..., c], i, 8) for c in range(channels)]
    n = a.shape[0] * a.shape[1]
    if fbcnn_rgb:
        return _psnr_from_mse(squares.sum() / (3 * n) + _bef(boundary[0], a.shape, 8, convention))
    return float(np.mean([_psnr_from_mse(squares[c] / n + _bef(boundary[c], a.shape, 8, convention))
                          for c in range(channels)]))
