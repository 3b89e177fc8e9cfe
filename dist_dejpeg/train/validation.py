"""Validation on fixed crops at fixed JPEG qualities: metrics of the JPEG input and of the restored output."""

from __future__ import annotations

import torch
from torchvision.utils import make_grid

from dist_dejpeg.data.contract import to_device
from dist_dejpeg.models.lpips import LPIPS
from dist_dejpeg.metrics.sums import MetricSums, per_image

ValSet = dict  # {quality: (jpeg uint8 N x 3 x H x W, clean uint8 N x 3 x H x W)} of this rank's share


@torch.no_grad()
def validate(accelerator, generator, val_set: ValSet, lpips: LPIPS, batch_size: int, cudagraphs: bool = False) -> dict:
    """Returns {"q10": {"jpeg": {psnr, ssim, lpips}, "restored": {...}}, ...}, reduced over all ranks.
    ``generator`` is the unwrapped module; it is put in eval mode and returned to its previous mode.
    ``cudagraphs``: the models were compiled with CUDA graphs (each forward starts a new replay)."""
    was_training = generator.training
    generator.eval()
    results = {}
    try:
        for quality, (jpeg_u8, clean_u8) in val_set.items():
            sums = MetricSums(("jpeg", "restored"), accelerator.device)
            for start in range(0, jpeg_u8.shape[0], batch_size):
                part = slice(start, start + batch_size)
                batch = to_device({"jpeg": jpeg_u8[part], "clean": clean_u8[part],
                                   "quality": [quality] * len(jpeg_u8[part])}, accelerator.device)
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with accelerator.autocast():
                    restored = generator(batch["jpeg"], batch["quality"])
                # the metrics in fp32, outside autocast: SSIM's variances under bf16 lose everything (a q10
                # JPEG measured SSIM 0.09 instead of ~0.7 on an H100)
                with torch.autocast(accelerator.device.type, enabled=False):
                    sums.add("jpeg", per_image(batch["jpeg"], batch["clean"], lpips))
                    sums.add("restored", per_image(restored.float(), batch["clean"], lpips))
            results[f"q{quality}"] = sums.compute(accelerator)
    finally:
        generator.train(was_training)
    return results


def average_bn_stats(accelerator, models: dict) -> None:
    """Average batch-norm running statistics over ranks before they are used (validation, a frozen generator
    in the critic phase, export), so every rank evaluates the same model. Averaging is linear, like the
    running-average updates, so when it happens does not change the averaged result."""
    if accelerator.num_processes > 1:
        from timm.utils import distribute_bn

        for model in models.values():
            distribute_bn(model, accelerator.num_processes, reduce=True)


def mean_restored_lpips(results: dict) -> float:
    """The stop rule's number: restored LPIPS averaged over the validation qualities."""
    values = [r["restored"]["lpips"] for r in results.values()]
    return sum(values) / len(values)


@torch.no_grad()
def image_grid(accelerator, generator, val_set: ValSet, count: int = 4,
               cudagraphs: bool = False) -> torch.Tensor | None:
    """Rows of JPEG | restored | clean for the first ``count`` crops of the lowest validation quality."""
    if not val_set:
        return None
    quality = min(val_set)
    jpeg_u8, clean_u8 = val_set[quality]
    if jpeg_u8.shape[0] == 0:
        return None
    batch = to_device({"jpeg": jpeg_u8[:count], "clean": clean_u8[:count],
                       "quality": [quality] * min(count, len(jpeg_u8))}, accelerator.device)
    was_training = generator.training
    generator.eval()
    try:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with accelerator.autocast():
            restored = generator(batch["jpeg"], batch["quality"]).float()
    finally:
        generator.train(was_training)
    rows = torch.stack([batch["jpeg"], restored, batch["clean"]], dim=1).flatten(0, 1)
    return make_grid(rows.clamp(0, 1).cpu(), nrow=3, padding=2)
