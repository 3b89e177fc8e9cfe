"""evaluate's metrics of an image but LPIPS, torch-free: full-reference from ``fullref``, no-reference from
``noref``. What evaluate's metrics processes import (evaluation/pairs.py): a process that starts without torch
starts in about a second and holds a fraction of the memory."""

from __future__ import annotations

import numpy as np

from dist_dejpeg.metrics.fullref import cropped, psnr, psnr_b, ssim
from dist_dejpeg.metrics.noref import brisque, niqe
from dist_dejpeg.metrics.registry import NO_REFERENCE


def numeric_metrics(imgs, ref, *, y_only: bool = False, crop_border: int = 0,
                    skip: tuple[str, ...] | set[str] | frozenset | dict = (),
                    undefined: dict | None = None) -> list[dict[str, float | None]]:
    """The six metrics of each of ``imgs`` (restored or JPEG) against ``ref`` (clean), in the registry's order,
    LPIPS None (metrics/whole_image.py adds it): psnr, psnr_b, ssim (on Y when ``y_only``), brisque and niqe
    (no-reference, on the image alone, on the RGB image as their reference implementations take it).
    ``crop_border`` applies to all. Names in ``skip`` (e.g. metrics found unavailable) are None. BRISQUE/NIQE
    raise MetricUnavailable when their package or parameter file is missing; where one is undefined for an image
    (NIQE below two 96 x 96 blocks) it is None, and with ``undefined`` given, counted there as
    ``{name: {"reason", "count"}}``."""
    b = cropped(np.asarray(ref), crop_border)
    no_reference = {"brisque": brisque, "niqe": niqe}
    results = []
    for img in imgs:
        a = cropped(np.asarray(img), crop_border)
        out = {
            "psnr": psnr(a, b, y_only=y_only),
            "psnr_b": None if "psnr_b" in skip else psnr_b(a, b, y_only=y_only),
            "ssim": None if "ssim" in skip else ssim(a, b, y_only=y_only),
            "lpips": None,
        }
        # the same pixels as an image before (a passed-through JPEG and its "restored" copy): its no-reference
        # values, not a second computation ~1e-11 off (noref.one_openmp_thread), shown as a gain in the report
        same = next((o for p, o in zip(imgs, results) if np.shape(p) == np.shape(img) and np.array_equal(p, img)), {})
        for name in NO_REFERENCE:
            out[name] = None
            if name in skip:
                continue
            if same.get(name) is not None:
                out[name] = same[name]
                continue
            try:
                out[name] = float(no_reference[name](a))
            except ValueError as err:
                if undefined is None:
                    raise
                undefined.setdefault(name, {"reason": str(err), "count": 0})["count"] += 1
        results.append(out)
    return results
