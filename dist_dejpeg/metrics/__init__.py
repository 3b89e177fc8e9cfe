"""Image metrics, one module per purpose:

    registry.py     the one table (name, label, direction, unit, decimals, needs a reference, what it
                    requires, the functions that measure it); every name list is derived from it. Torch-free.
    fullref.py      PSNR (RGB or Y), PSNR-B, SSIM (the one implementation, numpy or torch), colour metrics
    noref.py        BRISQUE and NIQE with their offline parameter files; MetricUnavailable
    numeric.py      the evaluate command's quality metrics but LPIPS, torch-free (what its metrics processes import)
    whole_image.py  LPIPS on uint8 arrays (lpips_values: evaluate's LPIPS, evaluation/measure.py), and
                    image_metrics: numeric's and LPIPS in one call, per image (for tests and scripts)
    sums.py         validation's per-image values on batches and their sums, reduced over ranks

Nothing is imported here, so that reading the registry loads neither torch nor numpy.
"""
