"""LPIPS of whole images on uint8 arrays (:func:`lpips_values`: what ``evaluate`` adds, evaluation/measure.py,
to the torch-free ``numeric`` metrics its pairs.measure_pair computes), and :func:`image_metrics`: numeric's and
LPIPS in one call, per image (the quality metrics evaluate reports, metrics/registry.py; the command itself does not
call it: tests and scripts do).

LPIPS is dist_dejpeg.models.lpips.LPIPS with torchvision's pretrained AlexNet, never a random backbone here.
"""

from __future__ import annotations

import numpy as np
import torch

from dist_dejpeg.metrics.fullref import cropped, row_bands
from dist_dejpeg.metrics.numeric import numeric_metrics
from dist_dejpeg.models.lpips import LPIPS


def load_lpips_metric(weights_file: str = "") -> tuple[LPIPS | None, str]:
    """LPIPS with torchvision's pretrained AlexNet backbone: ``(model, "")``, or ``(None, reason)`` when
    the backbone cannot be found (nothing in the torch hub cache, no network). A ``weights_file`` given that is
    missing or not the backbone raises WeightsError: the file asked for, not a metric quietly left out. Never
    falls back to a random backbone: LPIPS is reported only when it is LPIPS."""
    from dist_dejpeg.models.weights import WeightsError

    try:
        return LPIPS(net="alex", pretrained=True, weights_file=weights_file, key="--lpips-weights"), ""
    except WeightsError as err:
        if weights_file:
            raise
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
    a = np.ascontiguousarray(a) if a.flags.writeable else a.copy()  # (torch warns of a read-only array: a JPEG's)
    return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255.0


def lpips_value(model: LPIPS, img, ref) -> float:
    """LPIPS distance of ``img`` to ``ref`` (uint8 0-255, no gradients): :func:`lpips_values` of one image."""
    return lpips_values(model, ref, [img])[0]


def lpips_values(model: LPIPS, ref, imgs) -> list[float]:
    """LPIPS distance of each of ``imgs`` to ``ref`` (uint8 0-255, no gradients), the reference's features computed
    once for all of them (evaluate measures the JPEG and its restored image together: 3 backbone passes, not 4).
    AlexNet over bands of rows above LPIPS_BAND_ROWS (see LPIPS_HALO), otherwise in one pass: the arithmetic of
    LPIPS.forward (features, lpips' unit normalisation, linear heads, a mean per layer), each layer's map summed
    over the bands' own rows (layer k's row i, stride 4, 8, 16, 16, 16, is a band's own when image row i * stride
    is); the same value as forward's to float32 rounding (~1e-7 relative)."""
    import lpips

    device = next(model.parameters()).device
    b, arrays = np.asarray(ref), [np.asarray(img) for img in imgs]
    for a in arrays:
        if a.shape[:2] != b.shape[:2]:
            raise ValueError(f"image and reference differ in shape: {a.shape} vs {b.shape}")
    model.check_size(b.shape[:2])
    inner, h = model.inner, b.shape[0]
    banded = model.net_name == "alex" and h > LPIPS_BAND_ROWS
    sums, rows, width = np.zeros((len(arrays), len(inner.lins))), [0] * len(inner.lins), [0] * len(inner.lins)
    with torch.inference_mode():
        for start, stop in row_bands(h, LPIPS_BAND_ROWS) if banded else [(0, h)]:
            top, bottom = (max(0, start - LPIPS_HALO), min(h, stop + LPIPS_HALO)) if banded else (0, h)
            own = []  # per layer, the feature rows that are this band's own
            for k, stride in enumerate((4, 8, 16, 16, 16) if banded else [1] * len(inner.lins)):
                first, last = (-(-start // stride) - top // stride, -(-stop // stride) - top // stride) if banded \
                    else (0, None)
                own.append(slice(first, last))

            def units(v: np.ndarray) -> list[torch.Tensor | None]:
                feats = inner.net(inner.scaling_layer(_to_tensor01(v[top:bottom]).to(device) * 2 - 1))
                # (a layer with none of its rows left in the last band: the deepest maps stop short of the end)
                return [lpips.normalize_tensor(f[..., r, :].float()) if r.start < f.shape[-2] else None
                        for f, r in zip(feats, own)]

            ref_units = units(b)
            for i, a in enumerate(arrays):
                for k, (ua, ub) in enumerate(zip(units(a), ref_units)):
                    if ub is None:
                        continue
                    d = inner.lins[k]((ua - ub) ** 2)
                    sums[i, k] += float(d.cpu().double().sum())  # (on the host: MPS has no float64)
                    if i == 0:
                        rows[k] += d.shape[-2]
                        width[k] = d.shape[-1]
            del ref_units
    return [float(sum(s / (n * w) for s, n, w in zip(row, rows, width))) for row in sums]


def image_metrics(img, ref, **options) -> dict[str, float | None]:
    """All the quality metrics of ``img`` against ``ref``: :func:`images_metrics` of one image."""
    return images_metrics([img], ref, **options)[0]


def images_metrics(imgs, ref, *, y_only: bool = False, crop_border: int = 0, lpips: LPIPS | None = None,
                   skip: tuple[str, ...] | set[str] | dict = (),
                   undefined: dict | None = None) -> list[dict[str, float | None]]:
    """All the quality metrics (metrics/registry.py QUALITY) of each of ``imgs`` (restored or JPEG) against ``ref``
    (clean): metrics/numeric.py's, and LPIPS (RGB, the reference's features computed once for all the images; None
    when ``lpips`` is None or "lpips" is in ``skip``). The arguments as numeric_metrics takes them."""
    out = numeric_metrics(imgs, ref, y_only=y_only, crop_border=crop_border, skip=skip, undefined=undefined)
    if lpips is not None and "lpips" not in skip:
        b = cropped(np.asarray(ref), crop_border)
        for values, distance in zip(out, lpips_values(lpips, b, [cropped(np.asarray(i), crop_border) for i in imgs])):
            values["lpips"] = distance
    return out
