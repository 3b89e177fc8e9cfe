"""Every metric of one whole image, for the ``evaluate`` command: LPIPS on uint8 arrays, and
:func:`image_metrics`, evaluate's six (full-reference from ``fullref``, no-reference from ``noref``).

LPIPS is dist_dejpeg.models.lpips.LPIPS with torchvision's pretrained AlexNet, never a random backbone here.
"""

from __future__ import annotations

import numpy as np
import torch

from dist_dejpeg.metrics.fullref import cropped, psnr, psnr_b, ssim
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
