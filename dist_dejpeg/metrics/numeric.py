"""evaluate's quality metrics of an image but LPIPS, torch-free: each metric's ``measure`` function in
metrics/registry.py (full-reference ones from ``fullref``, no-reference ones from ``noref``). What evaluate's metrics
processes import (evaluation/pairs.py): a process that starts without torch starts in about a second and holds a
fraction of the memory."""

from __future__ import annotations

import numpy as np

from dist_dejpeg.metrics.fullref import cropped
from dist_dejpeg.metrics.registry import BY_NAME, QUALITY, function

ALWAYS_MEASURED = "psnr"  # measured whatever ``skip`` says (as it always was: evaluate's summary line prints it)


def numeric_metrics(imgs, ref, *, y_only: bool = False, crop_border: int = 0,
                    skip: tuple[str, ...] | set[str] | frozenset | dict = (),
                    undefined: dict | None = None) -> list[dict[str, float | None]]:
    """The quality metrics (the registry's QUALITY) of each of ``imgs`` (restored or JPEG) against ``ref`` (clean),
    in the registry's order, LPIPS (``on_device``) None (metrics/whole_image.py adds it): full-reference ones (psnr,
    psnr_b, ssim; on Y when ``y_only``), and no-reference ones (brisque, niqe: on the image alone, on the RGB image
    as their reference implementations take it).
    ``crop_border`` applies to all. Names in ``skip`` (e.g. metrics found unavailable) are None. BRISQUE/NIQE
    raise MetricUnavailable when their package or parameter file is missing; where one is undefined for an image
    (NIQE below two 96 x 96 blocks) it is None, and with ``undefined`` given, counted there as
    ``{name: {"reason", "count"}}``."""
    b = cropped(np.asarray(ref), crop_border)
    metrics = [BY_NAME[name] for name in QUALITY]
    measured = {m.name: function(m.measure, m.name) for m in metrics
                if not m.on_device and (m.name not in skip or m.name == ALWAYS_MEASURED)}
    results = []
    for img in imgs:
        a = cropped(np.asarray(img), crop_border)
        out: dict[str, float | None] = {m.name: None for m in metrics}
        for m in metrics:
            if m.needs_reference and m.name in measured:
                out[m.name] = measured[m.name](a, b, y_only=y_only)
        # the same pixels as an image before (a passed-through JPEG and its "restored" copy): its no-reference
        # values, not a second computation ~1e-11 off (noref.one_openmp_thread), shown as a gain in the report
        same = next((o for p, o in zip(imgs, results) if np.shape(p) == np.shape(img) and np.array_equal(p, img)), {})
        for name in (m.name for m in metrics if not m.needs_reference and m.name in measured):
            if same.get(name) is not None:
                out[name] = same[name]
                continue
            try:
                out[name] = float(measured[name](a))
            except ValueError as err:
                if undefined is None:
                    raise
                undefined.setdefault(name, {"reason": str(err), "count": 0})["count"] += 1
        results.append(out)
    return results
