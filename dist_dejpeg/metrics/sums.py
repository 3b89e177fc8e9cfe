"""Validation's metrics over batches, reduced across ranks: PSNR, SSIM, LPIPS, and the colour metrics
(PSNR of the JFIF Y/Cb/Cr planes, the mean signed shift of each RGB channel), the registry's VALIDATED.

Per-image values are summed locally and the sums and counts all-reduced once per call, so every
validation image counts exactly once whatever the number of ranks (validation sets are split by rank
without padding).
"""

from __future__ import annotations

import torch

from dist_dejpeg.jpeg.formats import JFIF_YCBCR
from dist_dejpeg.metrics.fullref import ssim_map
from dist_dejpeg.metrics.registry import VALIDATED, functions
from dist_dejpeg.models.lpips import LPIPS

_YCBCR = torch.tensor(JFIF_YCBCR)  # applied to differences, where the chroma offset cancels


def per_image(image: torch.Tensor, clean: torch.Tensor, lpips: LPIPS) -> dict[str, torch.Tensor]:
    """N-vectors of each of the registry's VALIDATED metrics of ``image`` against ``clean`` (both [0, 1], cast to
    float32), by each metric's ``validate`` function (metrics/registry.py), in the registry's order: PSNR (dB), SSIM
    and LPIPS; PSNR of the Y, Cb and Cr planes and the signed colour shifts (:func:`colour_values`)."""
    image, clean = image.float().clamp(0, 1), clean.float()
    out = {}
    for fn, names in functions(VALIDATED, "validate").items():
        values = fn(image, clean, lpips)
        out.update(values if isinstance(values, dict) else {names[0]: values})
    return out


def psnr_values(image: torch.Tensor, clean: torch.Tensor, lpips=None) -> torch.Tensor:
    """Validation's PSNR (dB): :func:`psnr_per_image` of [0, 1] images."""
    return psnr_per_image(image, clean, data_range=1.0)


def ssim_values(image: torch.Tensor, clean: torch.Tensor, lpips=None) -> torch.Tensor:
    """Validation's SSIM: evaluate's (:func:`dist_dejpeg.metrics.fullref.ssim_map`, the 5-pixel border left out),
    in float32."""
    return ssim_map(image, clean, data_range=1.0).mean(dim=(1, 2, 3))


def lpips_distances(image: torch.Tensor, clean: torch.Tensor, lpips: LPIPS) -> torch.Tensor:
    """Validation's LPIPS: the run's LPIPS network."""
    return lpips(image, clean)


def colour_values(image: torch.Tensor, clean: torch.Tensor, lpips=None) -> dict[str, torch.Tensor]:
    """PSNR of the Y, Cb and Cr planes (JFIF YCbCr, where JPEG's chroma subsampling acts); and the mean signed
    colour shift of each RGB channel in 0-255 levels (a cast shows as a consistent sign). Chroma PSNR of a
    grayscale crop is NaN (it has no chroma; MetricSums leaves it out of the mean)."""
    out = {}
    diff = torch.einsum("ij,njhw->nihw", _YCBCR.to(image.device), image - clean)
    mse = diff.pow(2).mean(dim=(2, 3))  # 0 (a crop kept exactly): inf, left out of the mean as the RGB PSNR's
    gray = (clean[:, 0] == clean[:, 1]).all(dim=(1, 2)) & (clean[:, 1] == clean[:, 2]).all(dim=(1, 2))
    for i, name in enumerate(("y", "cb", "cr")):
        psnr = -10 * torch.log10(mse[:, i])
        out[f"psnr_{name}"] = psnr if name == "y" else psnr.masked_fill(gray, float("nan"))
    shift = (image - clean).mean(dim=(2, 3)) * 255
    for i, name in enumerate("rgb"):
        out[f"shift_{name}"] = shift[:, i]
    return out


def psnr_per_image(image: torch.Tensor, clean: torch.Tensor, data_range: float) -> torch.Tensor:
    """Each image's PSNR (one MSE over its channels and pixels), in ``image``'s dtype: torchmetrics'
    peak_signal_noise_ratio(reduction="none", dim=(1, 2, 3)), the same operations (tests/test_metrics.py checks it
    equal). Not imported from it: torchmetrics' package import (transformers and scipy.signal for its text and
    audio metrics) was 2.5-4.5 s of every validating rank's start on a 2-core CPU."""
    diff = image - clean
    sse = torch.sum(diff * diff, dim=(1, 2, 3))
    psnr_base_e = 2 * torch.log(torch.tensor(float(data_range))) - torch.log(sse / clean[0].numel())
    return psnr_base_e * (10 / torch.log(torch.tensor(10.0)))


class MetricSums:
    """Running per-(group, metric) sums and counts on one rank, and ``extra`` running sums of the caller's
    (float64, any shape); ``compute`` all-reduces both in one collective and returns the means.
    Non-finite values (chroma PSNR of a grayscale crop, which has no chroma) are left out of their mean."""

    def __init__(self, groups: tuple[str, ...], device: torch.device, extra: tuple[int, ...] = (0,)):
        self.groups = groups
        self.sums = torch.zeros(2, len(groups), len(VALIDATED), dtype=torch.float64, device=device)  # sum, count
        self.extra = torch.zeros(extra, dtype=torch.float64, device=device)

    def add(self, group: str, values: dict[str, torch.Tensor]) -> None:
        g = self.groups.index(group)
        for m, name in enumerate(VALIDATED):
            if name not in values:
                raise KeyError(f"validation measured no {name!r}: its validate function in "
                               "dist_dejpeg/metrics/registry.py must return it")
            v = values[name].double()
            finite = torch.isfinite(v)
            self.sums[0, g, m] += torch.where(finite, v, 0.0).sum()
            self.sums[1, g, m] += finite.sum()

    def compute(self, accelerator=None) -> tuple[dict[str, dict[str, float]], torch.Tensor]:
        """({group: {metric: mean over all ranks}}, ``extra`` summed over all ranks)."""
        packed = torch.cat([self.sums.flatten(), self.extra.flatten()])
        if accelerator is not None and accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        sums = packed[:self.sums.numel()].view_as(self.sums)
        means = (sums[0] / sums[1]).tolist()  # 0/0: nan, where a metric had no finite value
        return ({g: {name: means[i][m] for m, name in enumerate(VALIDATED)} for i, g in enumerate(self.groups)},
                packed[self.sums.numel():].view_as(self.extra))
