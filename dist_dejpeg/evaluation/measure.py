"""evaluate's measuring in the main process: the metric set (:class:`MetricSet`: what is available, LPIPS on the
restorer's device) and the photos compressed and restored a pair at a time (:func:`restored_pairs`), each pair then
measured by pairs.measure_pair, in metrics processes (``--workers``) or here."""

from __future__ import annotations

import re
import time
from collections import deque

import numpy as np

from dist_dejpeg.config.schema import LPIPS_MIN_SIDE as LPIPS_SIDES
from dist_dejpeg.data.images import BadImage, jpeg_decode, jpeg_encode
from dist_dejpeg.evaluation.pairs import Measure, Pair
from dist_dejpeg.jpeg.consistency import cells_of, conform
from dist_dejpeg.evaluation.references import EvaluateError
from dist_dejpeg.metrics.fullref import SSIM_MIN_SIDE, cropped
from dist_dejpeg.metrics.noref import unavailable_reason
from dist_dejpeg.metrics.registry import NO_REFERENCE, QUALITY
from dist_dejpeg.metrics.whole_image import load_lpips_metric, lpips_values


class Unmeasurable(EvaluateError):
    """A reference the metrics cannot measure (too small for one, or nothing left after --crop-border)."""


class MetricSet:
    """evaluate's quality metrics (metrics/registry.py) with what is unavailable here and why (LPIPS without its
    AlexNet backbone, BRISQUE or NIQE without their package or parameter file): those are None in every row, with
    the reason."""

    LPIPS_MIN_SIDE = LPIPS_SIDES["alex"]  # (evaluate's LPIPS is AlexNet's)

    def __init__(self, lpips_weights: str = "", y_only: bool = False, crop_border: int = 0, device: str = "cpu",
                 only: tuple[str, ...] | None = None):
        self.y_only, self.crop_border = y_only, crop_border
        self.unavailable: dict[str, str] = {n: "not requested" for n in QUALITY if only and n not in only}
        self.lpips, reason = (None, "") if "lpips" in self.unavailable else load_lpips_metric(lpips_weights)
        # metric -> {"reason", "count": values left out, "images": of how many images}; see tally()
        self.undefined: dict[str, dict] = {}
        if self.lpips is None and "lpips" not in self.unavailable:
            self.unavailable["lpips"] = (f"{reason.splitlines()[0]} Give the AlexNet backbone with "
                                         f"--lpips-weights FILE (torchvision's alexnet-owt-7be5be79.pth).")
        elif self.lpips is not None:
            self.lpips = self.lpips.to(device)
        for name in NO_REFERENCE:
            reason = None if name in self.unavailable else unavailable_reason(name)
            if reason:
                self.unavailable[name] = reason

    def __call__(self, img: np.ndarray, ref: np.ndarray, undefined: dict) -> dict[str, float | None]:
        """The metrics of ``img`` against ``ref``, as evaluate measures a pair; values left out (NIQE on a small
        image) are counted in ``undefined`` (one image's, for :meth:`tally`). Unmeasurable: an image too small for
        a metric, or nothing left of it after the border crop."""
        if problem := self.size_problem(ref):
            raise Unmeasurable(problem)
        try:
            out = self.measure([img], ref, undefined)[0]
            out["lpips"] = self.lpips_values([img], ref)[0]
        except ValueError as err:  # SSIM below 11x11 pixels, a border crop that leaves nothing
            raise Unmeasurable(str(err)) from None
        return out

    @property
    def measure(self) -> Measure:
        """The metrics but LPIPS, as a metrics process measures them."""
        return Measure(self.y_only, self.crop_border, frozenset(self.unavailable))

    def lpips_values(self, imgs: list[np.ndarray], ref: np.ndarray) -> list[float | None]:
        """LPIPS of each image (None where unavailable), here, on the restorer's device; a ValueError where the
        images cannot be measured."""
        if self.lpips is None or "lpips" in self.unavailable:
            return [None] * len(imgs)
        crop = self.crop_border
        return lpips_values(self.lpips, cropped(ref, crop), [cropped(img, crop) for img in imgs])

    def size_problem(self, ref: np.ndarray) -> str | None:
        """Why a reference of this size cannot be measured (the border crop leaves nothing, below LPIPS's 31x31 or
        SSIM's 11x11 pixels), or None: known from its size alone, so it is skipped before it counts."""
        h, w = (n - 2 * self.crop_border for n in ref.shape[:2])
        if min(h, w) <= 0:
            return f"crop_border={self.crop_border} leaves nothing of a {ref.shape[0]}x{ref.shape[1]} image"
        if self.lpips is not None and min(h, w) < self.LPIPS_MIN_SIDE:
            return f"LPIPS needs at least {self.LPIPS_MIN_SIDE}x{self.LPIPS_MIN_SIDE} pixels, got {h}x{w}"
        if "ssim" not in self.unavailable and min(h, w) < SSIM_MIN_SIDE:
            return f"SSIM needs at least {SSIM_MIN_SIDE}x{SSIM_MIN_SIDE} pixels, got {h}x{w}"
        return None

    def tally(self, undefined: dict) -> None:
        """Add one measured image's values left out (``undefined`` as filled by the calls on it)."""
        for name, what in undefined.items():
            # one reason for every image: without the first one's size ("got 128x128" said of images of four sizes)
            reason = re.sub(r",? got \d+x\d+$", "", what["reason"])
            entry = self.undefined.setdefault(name, {"reason": reason, "count": 0, "images": 0})
            entry["count"] += what["count"]
            entry["images"] += 1


def image_channel(gray: bool, y_only: bool) -> str:
    """A per-image row's "channel": what its full-reference metrics were measured on."""
    return "gray" if gray else "Y" if y_only else "RGB"


def restored_pairs(refs, qualities, restorer, metric: MetricSet, blind: bool, subsampling, keep_images: bool,
                    pending: deque, timing: dict, skipped: list, bar):
    """Each reference photo compressed at each quality and restored, here, one photo decoded at a time (all held
    at once ran out of memory), LPIPS measured here too: the Pair for a metrics process, and what its row needs
    appended to ``pending``. A photo that cannot be read now is listed in ``skipped``."""
    for ref in refs:
        try:
            clean = ref.read()
        except (BadImage, OSError) as err:  # changed or gone since read_references checked it
            skipped.append(f"{ref.source}: {err}")
            bar.update(len(qualities))
            continue
        if problem := metric.size_problem(clean):  # (read_references checked it by the size it read)
            skipped.append(f"{ref.source}: {problem}")
            bar.update(len(qualities))
            continue
        # a grayscale photo is saved as a one-channel JPEG and restore writes it back grayscale (the mean of the
        # restored channels): it is measured so, not as the colour image the model returns
        gray = bool((clean[..., 0] == clean[..., 1]).all() and (clean[..., 1] == clean[..., 2]).all())
        for i, q in enumerate(qualities):
            data = jpeg_encode(clean[..., 0] if gray else clean, q, subsampling)
            jpeg = jpeg_decode(data)  # restore makes a restored JPEG consistent with its file's cells
            cells = cells_of(data)[0] if getattr(restorer, "consistent", True) else None
            conformed = cells is not None
            start = time.perf_counter()
            if blind:  # the raw blind model: with no quality, the guard would pass every image through
                guard, restorer.guard = restorer.guard, False
                try:
                    restored = restorer.restore_array(jpeg[..., 0] if gray else jpeg, None,
                                                      source="blind (evaluate --blind)", conformed=conformed)
                finally:
                    restorer.guard = guard
            else:
                restored = restorer.restore_array(jpeg[..., 0] if gray else jpeg, q, source="given",
                                                  conformed=conformed)
            if gray:
                restored = np.repeat(restored[..., None], 3, axis=2)
            decision = restorer.last_decision
            if conformed and not decision.passthrough:  # as restore makes a JPEG file's
                restored = getattr(restorer, "conform", conform)(  # (a GPU Restorer's: on its GPU)
                    restored, cells, 1, getattr(decision, "half_width", None) or 0.5)
            if not decision.passthrough:  # the restore rate: a passed-through image is neither time nor pixels of it
                timing["restore_seconds"] += time.perf_counter() - start
                timing["megapixels"] += clean.shape[0] * clean.shape[1] / 1e6
            try:  # both against the clean photo at once: its LPIPS features are computed once for the pair
                distances, lpips_error = metric.lpips_values([jpeg, restored], clean), None
            except ValueError as err:
                distances, lpips_error = [None, None], str(err)
            pending.append({"ref": ref, "last": i == len(qualities) - 1, "lpips": distances,
                            "lpips_error": lpips_error,
                            "row": {"image": ref.name, "quality": q, "height": clean.shape[0],
                                    "width": clean.shape[1], "channel": image_channel(gray, metric.y_only),
                                    "passthrough": restorer.last_decision.passthrough},
                            "images": {"clean": clean, "jpeg": jpeg, "restored": restored} if keep_images else {}})
            # a grayscale photo measured on its one plane: its Y (--y-only) is 16 + 219/255 of it, +1.32 dB of PSNR
            planes = (v[..., 0] if gray else v for v in (jpeg, restored, clean))
            yield Pair(metric.measure, *planes, name=f"{ref.name} q{q}")
