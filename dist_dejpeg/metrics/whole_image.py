"""Every metric of one whole image, for the ``evaluate`` command: LPIPS on uint8 arrays, and
:func:`image_metrics`, evaluate's six (full-reference from ``fullref``, no-reference from ``noref``).

LPIPS is dist_dejpeg.models.lpips.LPIPS with torchvision's pretrained AlexNet, never a random backbone here.
"""

from __future__ import annotations

import numpy as np
import torch

from dist_dejpeg.metrics.fullref import cropped, psnr, psnr_b, row_bands, ssim
from dist_dejpeg.metrics.noref import brisque, niqe
from dist_dejpeg.metrics.registry import NO_REFERENCE
from dist_dejpeg.models.lpips import LPIPS


def load_lpips_metric(weights_file: str = "") -> tuple[LPIPS | None, str]:
    """LPIPS with torchvision's pretrained AlexNet backbone: ``(model, "")``, or ``(None, reason)`` when
    the backbone cannot be loaded (no file at ``weights_file``, nothing in the torch hub cache, no
    network). Never falls back to a random backbone: LPIPS is reported only when it is LPIPS."""
    from dist_dejpeg.models.weights import WeightsError

    try:
        return LPIPS(net="alex", pretrained=True, weights_file=weights_file, key="--lpips-weights"), ""
    except WeightsError as err:
        return None, str(err)


# LPIPS of a tall image is summed over bands of rows: one 12 MP photo in one pass peaked at +1.85 GB (both images'
# AlexNet activations, ~60 bytes a pixel each, and their float copies), the most of any metric. A band reads
# LPIPS_HALO rows above and below its own, so that every feature it keeps is the whole image's: relu5's row t
# sees image rows 16t - 66 .. 16t + 96 (conv1 11/4 pad 2, pool 3/2, conv2 5 pad 2, pool 3/2, conv3-5 3 pad 1), and
# bands start on multiples of relu3-5's stride, 16, so their feature rows line up with the whole image's.
LPIPS_BAND_ROWS = 768  # a band's own rows (12 MP: +0.6 GB peak; 25% more rows computed than in one pass)
LPIPS_HALO = 96


def _to_tensor01(img) -> torch.Tensor:
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB or H x W grayscale image, got shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 255.0


def lpips_value(model: LPIPS, img, ref) -> float:
    """LPIPS distance of ``img`` to ``ref`` (uint8 0-255, no gradients): in one pass up to LPIPS_BAND_ROWS rows,
    over bands of rows above (AlexNet; the same value to float32 rounding, ~1e-7 relative: see LPIPS_HALO)."""
    device = next(model.parameters()).device
    a, b = np.asarray(img), np.asarray(ref)
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"image and reference differ in shape: {a.shape} vs {b.shape}")
    with torch.inference_mode():
        if model.net_name != "alex" or a.shape[0] <= LPIPS_BAND_ROWS:
            return float(model(_to_tensor01(a).to(device), _to_tensor01(b).to(device))[0].item())
        return _banded_lpips(model, a, b, device)


def _banded_lpips(model: LPIPS, a: np.ndarray, b: np.ndarray, device) -> float:
    """LPIPS.forward's arithmetic (features, lpips' unit normalisation, linear heads, a mean per layer) with each
    layer's map summed over the bands' own rows: layer k's row i (stride 4, 8, 16, 16, 16) is a band's own when
    image row i * stride is."""
    import lpips

    inner, h = model.inner, a.shape[0]
    sums, rows, width = [0.0] * 5, [0] * 5, [0] * 5
    for start, stop in row_bands(h, LPIPS_BAND_ROWS):
        top, bottom = max(0, start - LPIPS_HALO), min(h, stop + LPIPS_HALO)
        x, y = (inner.net(inner.scaling_layer(_to_tensor01(v[top:bottom]).to(device) * 2 - 1)) for v in (a, b))
        for k, (fx, fy, stride) in enumerate(zip(x, y, (4, 8, 16, 16, 16))):
            first, last = -(-start // stride) - top // stride, -(-stop // stride) - top // stride
            if first >= fx.shape[-2]:  # none left in the last band: the deepest maps stop short of the image's end
                continue
            d = inner.lins[k]((lpips.normalize_tensor(fx[..., first:last, :].float())
                               - lpips.normalize_tensor(fy[..., first:last, :].float())) ** 2)
            sums[k] += float(d.double().sum())
            rows[k] += d.shape[-2]
            width[k] = d.shape[-1]
        del x, y
    return sum(s / (n * w) for s, n, w in zip(sums, rows, width))


def image_metrics(img, ref, *, y_only: bool = False, crop_border: int = 0, lpips: LPIPS | None = None,
                  skip: tuple[str, ...] | set[str] | dict = (),
                  undefined: dict | None = None) -> dict[str, float | None]:
    """All six metrics of ``img`` (restored or JPEG) against ``ref`` (clean), in the registry's order: psnr,
    psnr_b, ssim (on Y when ``y_only``), lpips (RGB; None when ``lpips`` is None), brisque and niqe
    (no-reference, on ``img`` alone, on the RGB image as their reference implementations take it).
    ``crop_border`` applies to all. Names in ``skip`` (e.g. metrics found unavailable) are None. BRISQUE/NIQE
    raise MetricUnavailable when their package or parameter file is missing; where one is undefined for this
    image (NIQE below two 96 x 96 blocks) it is None, and with ``undefined`` given, counted there as
    ``{name: {"reason", "count"}}``."""
    a, b = cropped(np.asarray(img), crop_border), cropped(np.asarray(ref), crop_border)
    out = {
        "psnr": psnr(a, b, y_only=y_only),
        "psnr_b": None if "psnr_b" in skip else psnr_b(a, b, y_only=y_only),
        "ssim": None if "ssim" in skip else ssim(a, b, y_only=y_only),
        "lpips": None if lpips is None or "lpips" in skip else lpips_value(lpips, a, b),
    }
    no_reference = {"brisque": brisque, "niqe": niqe}
    for name in NO_REFERENCE:
        out[name] = None
        if name in skip:
            continue
        try:
            out[name] = float(no_reference[name](a))
        except ValueError as err:
            if undefined is None:
                raise
            undefined.setdefault(name, {"reason": str(err), "count": 0})["count"] += 1
    return out
