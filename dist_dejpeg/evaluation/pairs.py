"""What evaluate's metrics processes run, torch-free so that they start without torch (about a second each, and a
fraction of the memory): the metrics but LPIPS of one JPEG and its restored image (:func:`measure_pair`). Those
metrics are numpy and scipy code that holds the GIL (threads gave 1.05-1.2x), about 5 s a pair per 2K image on one
core: on a GPU machine, where the restore takes milliseconds, one process would leave its other cores idle for most
of an evaluation (``--workers``). LPIPS stays in the main process, on the restorer's device (measure.py)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from dist_dejpeg.metrics.numeric import numeric_metrics
from dist_dejpeg.metrics.registry import COLOUR, functions

# A pair in flight holds three images (clean, JPEG, restored: 108 MB at 12 MP) in the main process and again in the
# metrics process that measures it: more processes than this by default mostly hold more photos in memory
MAX_DEFAULT_WORKERS = 8
# metrics.json's meta "channel": what the full-reference metrics of a colour photo are measured on (a grayscale
# photo's: its one channel, whatever this says; meta "grayscale_images" counts those, :func:`channel_note`)
Y_CHANNEL = "Y (ITU-R BT.601 16-235, float, not rounded: the BasicSR/SwinIR convention)"
RGB_CHANNEL = "RGB"
# A metrics process takes 1-2 s to start; the metrics of one megapixel's pair take ~2 s on one core: an evaluation
# with less work than this (megapixels of the references x qualities) is measured in the main process
POOL_MIN_MEGAPIXELS = 4.0


@dataclass(frozen=True)
class Measure:
    """The metrics of images against their reference, less LPIPS (None) and the names in ``skip`` (None too)."""

    y_only: bool = False
    crop_border: int = 0
    skip: frozenset = frozenset()

    def __call__(self, imgs: list[np.ndarray], ref: np.ndarray, undefined: dict) -> list[dict[str, float | None]]:
        """Each image's values, the colour metrics included; those left out (NIQE on a small image) counted in
        ``undefined``. A ValueError where the images cannot be measured (below SSIM's 11x11 pixels, a border crop
        that leaves nothing). H x W images (a grayscale photo's one plane) are measured on that plane, ``y_only``
        or not (its Y would be 16 + 219/255 of it: +1.32 dB of PSNR); the colour metrics on it as three equal
        channels."""
        out = numeric_metrics(imgs, ref, y_only=self.y_only, crop_border=self.crop_border, skip=self.skip,
                              undefined=undefined)
        rgb = (lambda a: np.repeat(a[..., None], 3, axis=2)) if np.ndim(ref) == 2 else np.asarray
        colour = functions(COLOUR)  # the registry's colour metrics' measure functions (fullref.colour_metrics)
        for values, img in zip(out, imgs):
            for fn in colour:
                values.update(fn(rgb(img), rgb(ref), crop_border=self.crop_border))
        return out


@dataclass
class Pair:
    """A metrics process's work: the JPEG and the restored image of ``clean`` (as they are measured: H x W planes
    for a grayscale photo, which is measured on its one channel)."""

    measure: Measure
    jpeg: np.ndarray
    restored: np.ndarray
    clean: np.ndarray
    name: str = ""  # the photo and quality, for a lost process's message


def channel_note(meta: dict) -> str:
    """What an evaluation's full-reference metrics were measured on (metrics.json's meta), as metrics.md and the
    command's summary say it: "Y (...) for colour images; grayscale images on their single channel (2 of 4)"."""
    gray, total = meta.get("grayscale_images") or 0, meta.get("images")
    if not gray:
        return meta["channel"]
    return f"{meta['channel']} for colour images; grayscale images on their single channel ({gray} of {total})"


def one_thread() -> None:
    """A metrics process's start: one OpenMP thread. libsvm's BRISQUE runs a parallel loop: several processes with
    a team of one per core each oversubscribe the cores, and the team's size changes its sums' rounding (~1e-13)."""
    os.environ["OMP_NUM_THREADS"] = "1"  # read where an OpenMP runtime loads: libsvm's, after this
    if "torch" in sys.modules:  # (a process started by fork has it, and its OpenMP runtime, already)
        sys.modules["torch"].set_num_threads(1)


def measure_pair(pair: Pair) -> dict:
    """``{"values": [jpeg's, restored's], "undefined": {...}}``, or ``{"unmeasurable": why}``."""
    undefined: dict = {}
    try:
        values = pair.measure([pair.jpeg, pair.restored], pair.clean, undefined)
    except ValueError as err:
        return {"unmeasurable": str(err)}
    return {"values": values, "undefined": undefined}
