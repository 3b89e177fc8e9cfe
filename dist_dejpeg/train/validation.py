"""Validation on fixed crops at fixed JPEG qualities: metrics of the JPEG input and of the restored output (rounded
to 8 bits, as restore writes it), and the RGB PSNR gain with a lower bound on its mean that restore's guard trusts
(restore/guard.py); at the end of a run, the same gain of the restored crops made consistent with their JPEG files
(conformed_gains), by which restore judges a JPEG whose coefficients it reads."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.utils import make_grid

from dist_dejpeg.data.contract import to_device
from dist_dejpeg.jpeg.consistency import HALF_WIDTHS
from dist_dejpeg.models.lpips import LPIPS
from dist_dejpeg.metrics.sums import MetricSums, per_image, psnr_per_image

ValSet = dict  # {quality: (jpeg uint8 N x 3 x H x W, clean uint8 N x 3 x H x W)} of this rank's share

# The guard restores a quality only where the mean gain is surely above zero: the mean minus this many standard
# errors of the per-crop gains (one-sided ~98% under a normal approximation). The mean alone was not enough: a
# model whose 41 crops gained +0.07 dB on average at q90 (11 of them lost) lost 0.13 dB on the whole photos;
# its bound, -0.06 dB, passes q90 through (benchmarks/RESULTS.md, "The guard's lower bound").
GAIN_BOUND_SE = 2.0
GRID_CROPS = 4  # the image grid's rows: the first crops of the lowest validation quality


def gain_summary(stats: torch.Tensor) -> dict[str, float]:
    """{psnr: mean gain, psnr_low: its lower bound, count} from [sum, sum of squares, count] of per-image gains;
    with fewer than two images the spread is unknown, and so is the bound (NaN: restore's guard then never trusts
    the gain, as the README promises: not surely positive)."""
    total, squares, count = stats.tolist()
    if count == 0:
        return {"psnr": float("nan"), "psnr_low": float("nan"), "count": 0}
    mean = total / count
    if count < 2:
        return {"psnr": mean, "psnr_low": float("nan"), "count": int(count)}
    var = max(squares - count * mean * mean, 0.0) / (count - 1)
    return {"psnr": mean, "psnr_low": mean - GAIN_BOUND_SE * (var / count) ** 0.5, "count": int(count)}


def as_written(restored: torch.Tensor) -> torch.Tensor:
    """The generator's float output rounded to the 8-bit levels restore and evaluate write (restore/base.py). The
    unrounded output's PSNR is not what users get: it overstated a debug-recipe model's gain by 0.003 dB at q10 and
    0.02-0.03 dB at q80-q90, where the gain is smallest and restore's guard decides."""
    return restored.float().clamp(0, 1).mul(255).round().div(255)


def _restored_batches(accelerator, generator, val_set: ValSet, batch_size: int, cudagraphs: bool):
    """(the quality's index, the quality, the crops' slice, the batch on the device, the generator's output) for
    each batch of the validation set, the generator in eval mode meanwhile (its mode put back after)."""
    was_training = generator.training
    generator.eval()
    try:
        for i, (quality, (jpeg_u8, clean_u8)) in enumerate(val_set.items()):
            for start in range(0, jpeg_u8.shape[0], batch_size):
                part = slice(start, start + batch_size)
                batch = to_device({"jpeg": jpeg_u8[part], "clean": clean_u8[part],
                                   "quality": [quality] * len(jpeg_u8[part])}, accelerator.device)
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with accelerator.autocast():
                    restored = generator(batch["jpeg"], batch["quality"])
                yield i, quality, part, batch, restored
    finally:
        generator.train(was_training)


def feed(accelerator, generator, val_set: ValSet, batch_size: int, consumers, cudagraphs: bool = False) -> None:
    """One forward of the generator over the validation set, each batch handed to every consumer's ``add(i,
    quality, part, batch, restored)``: what several measurements of the same weights share (the final validation:
    the metrics, the conformed gains, the image grid). An error on one rank is raised on every one where a consumer
    asks (``together``: no collective of its own meanwhile), as conformed_gains' host-side work does."""
    def run():
        with torch.no_grad():
            for item in _restored_batches(accelerator, generator, val_set, batch_size, cudagraphs):
                for consumer in consumers:
                    consumer.add(*item)

    if any(getattr(c, "together", False) for c in consumers):
        from dist_dejpeg.train.collective import all_ranks_or_raise

        all_ranks_or_raise(accelerator, run)
    else:
        run()


class ValidationSums:
    """validate's consumer: the JPEG's and the restored crops' metrics, the per-crop gains' sums."""

    def __init__(self, accelerator, val_set: ValSet, lpips: LPIPS):
        self.qualities, self.lpips, self.device_type = list(val_set), lpips, accelerator.device.type
        # every quality's sums in one collective: jpeg and restored metrics, and [sum, sum of squares, count] of
        # the per-crop gains
        self.sums = MetricSums(tuple(f"q{q}/{k}" for q in self.qualities for k in ("jpeg", "restored")),
                               accelerator.device, extra=(len(self.qualities), 3))

    def add(self, i: int, quality: int, part: slice, batch: dict, restored: torch.Tensor) -> None:
        # the metrics in fp32, outside autocast: SSIM's variances under bf16 lose everything (a q10
        # JPEG measured SSIM 0.09 instead of ~0.7 on an H100)
        with torch.autocast(self.device_type, enabled=False):
            before = per_image(batch["jpeg"], batch["clean"], self.lpips)
            after = per_image(as_written(restored), batch["clean"], self.lpips)
            self.sums.add(f"q{quality}/jpeg", before)
            self.sums.add(f"q{quality}/restored", after)
            d = (after["psnr"] - before["psnr"]).double()  # inf - inf (a perfect crop): left out
            d = d[torch.isfinite(d)]
            self.sums.extra[i] += torch.stack([d.sum(), d.pow(2).sum(), d.new_tensor(float(d.numel()))])

    def results(self, accelerator) -> dict:
        """Collective: validate's results, over all ranks."""
        means, gains = self.sums.compute(accelerator)
        return {f"q{q}": {"jpeg": means[f"q{q}/jpeg"], "restored": means[f"q{q}/restored"],
                          "gain": gain_summary(gains[i])} for i, q in enumerate(self.qualities)}


def validate(accelerator, generator, val_set: ValSet, lpips: LPIPS, batch_size: int, cudagraphs: bool = False,
             also: tuple = ()) -> dict:
    """Returns {"q10": {"jpeg": {psnr, ssim, lpips, ...}, "restored": {...}, "gain": gain_summary's}, ...},
    reduced over all ranks.
    ``generator`` is the unwrapped module; it is put in eval mode and returned to its previous mode.
    ``cudagraphs``: the models were compiled with CUDA graphs (each forward starts a new replay).
    ``also``: more consumers of the same forward (:func:`feed`; the final validation's)."""
    sums = ValidationSums(accelerator, val_set, lpips)
    feed(accelerator, generator, val_set, batch_size, (sums, *also), cudagraphs)
    return sums.results(accelerator)


class ConformedSums:
    """conformed_gains' consumer (:func:`feed`): this rank's [sum, sum of squares, count] of the consistent crops'
    gains, per quality and half-width: each batch conformed on the device at every width (models/consistency.py),
    the files' cells read on the host. Collective to build (whether jpeglib is missing on any rank) and to read."""

    together = True

    def __init__(self, accelerator, val_set: ValSet):
        from dist_dejpeg.data.images import jpeg_encode
        from dist_dejpeg.jpeg.consistency import cells_of

        self.val_set = val_set
        self.stats = torch.zeros(len(val_set), len(HALF_WIDTHS), 3, dtype=torch.float64)
        missing = torch.tensor([float(cells_of(jpeg_encode(np.zeros((8, 8, 3), np.uint8), 50))[0] is None)])
        if accelerator.num_processes > 1:
            missing = accelerator.reduce(missing.to(accelerator.device), reduction="sum").cpu()
        self.missing = bool(missing.item())

    def add(self, i: int, quality: int, part: slice, batch: dict, restored: torch.Tensor) -> None:
        from dist_dejpeg.data.images import jpeg_encode
        from dist_dejpeg.jpeg.consistency import cells_of
        from dist_dejpeg.models.consistency import conform_batch

        if self.missing:
            return
        jpeg_u8, clean_u8 = (crops[part] for crops in self.val_set[quality])
        cells = [cells_of(jpeg_encode(clean, quality))[0] for clean in clean_u8.permute(0, 2, 3, 1).numpy()]
        keep = [k for k, c in enumerate(cells) if c is not None]
        if not keep:
            return
        device = restored.device
        clean = clean_u8[keep].to(device).float()
        before = _psnr_255(jpeg_u8[keep].to(device), clean)
        out = as_written(restored[keep]).mul(255)
        for j, half in enumerate(HALF_WIDTHS):
            gain = (_psnr_255(conform_batch(out, [cells[k] for k in keep], half).float(), clean) - before).double()
            gain = gain[torch.isfinite(gain)]  # (a crop the JPEG keeps exactly: left out, as validate leaves it)
            self.stats[i, j] += torch.stack([gain.sum(), gain.pow(2).sum(), gain.new_tensor(float(gain.numel()))]).cpu()

    def results(self, accelerator) -> dict[int, dict[float, dict[str, float]]] | None:
        """Collective: conformed_gains' answer."""
        if self.missing:
            return None
        stats = self.stats
        if accelerator.num_processes > 1:
            stats = accelerator.reduce(stats.to(accelerator.device), reduction="sum").cpu()
        return {q: {half: gain_summary(stats[i, j]) for j, half in enumerate(HALF_WIDTHS)}
                for i, q in enumerate(self.val_set)}


def conformed_gains(accelerator, generator, val_set: ValSet, batch_size: int, cudagraphs: bool = False
                    ) -> dict[int, dict[float, dict[str, float]]] | None:
    """The RGB PSNR gain (gain_summary's) at each quality of the validation crops restored and then made
    consistent with their JPEG files, as restore makes a JPEG's (jpeg/consistency.py), for each cell half-width
    HALF_WIDTHS names: {quality: {half-width: summary}}, reduced over all ranks (each must call it; an error on one
    is raised on every one); None where jpeglib is missing on any rank. A crop's file is libjpeg's of its clean
    pixels at that quality, as the validation set's JPEGs are (data/torch_loader.py: load_val_set). The final
    validation has it from its own forward (:class:`ConformedSums` in validate's ``also``)."""
    sums = ConformedSums(accelerator, val_set)
    if not sums.missing:
        feed(accelerator, generator, val_set, batch_size, (sums,), cudagraphs)
    return sums.results(accelerator)


def _psnr_255(images: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Each image's RGB PSNR (one MSE over its channels, 0..255; per_image's formula), in float64."""
    return psnr_per_image(images.double(), clean.double(), data_range=255.0)


def average_bn_stats(accelerator, models: dict) -> None:
    """Average batch-norm running statistics over ranks before they are used (validation, a frozen generator
    in the critic phase, export), so every rank evaluates the same model. Averaging is linear, like the
    running-average updates, so when it happens does not change the averaged result."""
    if accelerator.num_processes > 1:
        from timm.utils import distribute_bn

        for model in models.values():
            distribute_bn(model, accelerator.num_processes, reduce=True)


def mean_restored(results: dict, metric: str) -> float:
    """The restored crops' ``metric`` (lpips, psnr) averaged over the validation qualities: the gan phase's stop rule
    and best-generator choice (train.phases.<gan>.select_on)."""
    values = [r["restored"][metric] for r in results.values()]
    return sum(values) / len(values)


@torch.no_grad()
def image_grid(accelerator, generator, val_set: ValSet, count: int = GRID_CROPS,
               cudagraphs: bool = False) -> torch.Tensor | None:
    """Rows of JPEG | restored | clean for the first ``count`` crops of the lowest validation quality."""
    if not val_set or val_set[min(val_set)][0].shape[0] == 0:
        return None
    grid = GridCrops(val_set, count)
    feed(accelerator, generator, {grid.quality: tuple(c[:count] for c in val_set[grid.quality])}, count, (grid,),
         cudagraphs)
    return grid.grid()


class GridCrops:
    """image_grid's consumer (:func:`feed`): the first ``count`` crops of the lowest quality, kept on the host."""

    def __init__(self, val_set: ValSet, count: int = GRID_CROPS):
        self.quality, self.count, self.rows = (min(val_set) if val_set else None), count, []

    def add(self, i: int, quality: int, part: slice, batch: dict, restored: torch.Tensor) -> None:
        left = self.count - sum(len(r) for r in self.rows)
        if quality == self.quality and left > 0:  # (copies: a CUDA graph's output is overwritten by its next replay)
            self.rows.append(torch.stack([batch["jpeg"][:left].float(), restored[:left].float(),
                                          batch["clean"][:left].float()], dim=1).clamp(0, 1).cpu())

    def grid(self) -> torch.Tensor | None:
        if not self.rows:
            return None
        return make_grid(torch.cat(self.rows).flatten(0, 1), nrow=3, padding=2)
