"""Full-reference image metrics over batches, reduced across ranks: PSNR, SSIM, LPIPS.

Per-image values are summed locally and the sums and counts all-reduced once per call, so every
validation image counts exactly once whatever the number of ranks (validation sets are split by rank
without padding). BRISQUE and NIQE (no-reference) are not here yet.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from dist_dejpeg.losses import LPIPS

METRICS = ("psnr", "ssim", "lpips")


def per_image(image: torch.Tensor, clean: torch.Tensor, lpips: LPIPS) -> dict[str, torch.Tensor]:
    """N-vectors of PSNR (dB), SSIM and LPIPS of ``image`` against ``clean`` (both [0, 1], float32)."""
    image, clean = image.float().clamp(0, 1), clean.float()
    return {
        "psnr": peak_signal_noise_ratio(image, clean, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(image, clean, data_range=1.0, reduction="none"),
        "lpips": lpips(image, clean),
    }


class MetricSums:
    """Running per-(group, metric) sums on one rank; ``compute`` all-reduces and returns means."""

    def __init__(self, groups: tuple[str, ...], device: torch.device):
        self.groups = groups
        self.sums = torch.zeros(len(groups), len(METRICS), dtype=torch.float64, device=device)
        self.count = torch.zeros(1, dtype=torch.float64, device=device)

    def add(self, group: str, values: dict[str, torch.Tensor]) -> None:
        g = self.groups.index(group)
        for m, name in enumerate(METRICS):
            self.sums[g, m] += values[name].double().sum()

    def add_count(self, n: int) -> None:
        self.count += n

    def compute(self, accelerator=None) -> dict[str, dict[str, float]]:
        packed = torch.cat([self.sums.flatten(), self.count])
        if accelerator is not None and accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        count = packed[-1].item()
        sums = packed[:-1].view(len(self.groups), len(METRICS))
        if count == 0:
            return {g: dict.fromkeys(METRICS, float("nan")) for g in self.groups}
        return {g: {name: sums[i, m].item() / count for m, name in enumerate(METRICS)}
                for i, g in enumerate(self.groups)}
