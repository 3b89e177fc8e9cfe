"""Restored JPEGs made consistent with their files (jpeg/consistency.py): what putting each DCT coefficient back
inside its quantization cell does to photos and to graphics, and what narrower cells would do.

    dist-dejpeg train --config configs/debug.yaml            # the quick start's model, runs/debug
    python benchmarks/experiments/consistency.py runs/debug  # ~1 min on 2 cores (--more: 10 more images, ~3 min)

Images: the sample set's held-out photos (chelsea, coffee, coins halved) and graphics the photo-trained model was
never shown (skimage's colorwheel, checkerboard, horse silhouette; a synthetic sky gradient), each compressed by
libjpeg (4:2:0) at each quality. Prints as markdown the RGB PSNR gain over the JPEG: the model's own image (guard
off), it conformed to cells of half-width 0.5 (the file's own cells) and narrower (0.35, 0.2: pulled towards the
JPEG's values), and what `restore` writes (the guard on: passed through, 0, or conformed at the width the model's
final validation chose for that quality; a file from before 2026-12-07: 0.5).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

import dist_dejpeg.jpeg.consistency as consistency
from dist_dejpeg.jpeg.consistency import HALF_WIDTHS
from dist_dejpeg.data.images import halve
from dist_dejpeg.data.shards import HALVED, SAMPLE_VAL, sample_photo
from dist_dejpeg.metrics.fullref import psnr
from dist_dejpeg.restore import open_restorer

QUALITIES = (10, 30, 50, 80, 90)


def graphics() -> dict[str, np.ndarray]:
    board = skimage.data.checkerboard()
    horse = np.where(skimage.data.horse(), 255, 0).astype(np.uint8)
    yy, xx = np.mgrid[0:256, 0:384]
    sky = np.stack([90 + 60 * yy / 256, 140 + 60 * yy / 256, 230 - 10 * xx / 384], axis=-1)
    return {"colorwheel": skimage.data.colorwheel()[..., :3], "checkerboard": np.stack([board] * 3, axis=-1),
            "horse": np.stack([horse] * 3, axis=-1), "sky": np.rint(sky).astype(np.uint8)}


# --more: skimage's other bundled images (first 512 x 512, grayscale ones as three equal channels): photos (the
# first four) and scans and drawings. The page scan was a q89 JPEG (data/shards.py): used whole, a new JPEG's grid
# lies on its old one, and removing the old blocking measured as harm (q90 -1.95 dB; cut by 1 px: +0.60; halved,
# as the samples use such photos: +0.43), so it is halved.
MORE_PHOTOS = ("rocket", "hubble_deep_field", "retina", "microaneurysms")
MORE_OTHERS = ("page" + HALVED, "text", "clock", "shepp_logan_phantom", "logo", "cell")


def more_images() -> dict[str, np.ndarray]:
    out = {}
    for name in MORE_PHOTOS + MORE_OTHERS:
        a = getattr(skimage.data, name.removesuffix(HALVED))()
        a = np.stack([a] * 3, axis=-1) if a.ndim == 2 else a[..., :3]
        a = halve(a) if name.endswith(HALVED) else a
        if a.dtype != np.uint8:  # (float phantoms: stretched to 0..255)
            a = np.rint(255 * (a - a.min()) / (a.max() - a.min())).astype(np.uint8)
        out[name] = np.ascontiguousarray(a[:512, :512])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="generator file, run or checkpoint folder, or ONNX export")
    parser.add_argument("--more", action="store_true", help="also skimage's other photos, scans and drawings")
    args = parser.parse_args()
    restorer = open_restorer(args.model, device="cpu", guard=False)
    guarded = open_restorer(args.model, device="cpu")
    images = {name: sample_photo(name) for name in SAMPLE_VAL} | graphics() | (more_images() if args.more else {})
    kinds = {name: "photos" if name in SAMPLE_VAL or name in MORE_PHOTOS else "graphics and scans" for name in images}
    widths = " | ".join(f"conformed, half-width {h}" for h in HALF_WIDTHS)
    print(f"{args.model}; RGB PSNR gain over the JPEG (dB): the model and the conformed columns with the guard off\n")
    print(f"| image | q | JPEG PSNR | model's image | {widths} | `restore` writes |")
    print("|---|---|---|---|---|" + "---|" * len(HALF_WIDTHS))
    means: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, clean in images.items():
            kind = kinds[name]
            for q in QUALITIES:
                path = Path(tmp) / f"{name}_q{q}.jpg"
                Image.fromarray(clean).save(path, quality=q)
                jpeg = np.asarray(Image.open(path).convert("RGB"))
                base = psnr(jpeg, clean)
                restored = restorer.restore_array(jpeg, q)
                cells = consistency.read_cells(path)
                gains = [psnr(restored, clean) - base]
                for half in HALF_WIDTHS:
                    gains.append(psnr(consistency.conform(restored, cells, half_width=half), clean) - base)
                written = guarded.restore_array(jpeg, q, conformed=True)
                decision = guarded.last_decision
                if not decision.passthrough:
                    written = consistency.conform(written, cells, half_width=decision.half_width)
                gains.append(psnr(written, clean) - base)
                for column, gain in enumerate(gains):
                    means.setdefault(f"{kind} {column}", []).append(gain)
                print(f"| {name} | {q} | {base:.2f} | " + " | ".join(f"{g:+.2f}" for g in gains) + " |", flush=True)
    for kind in ("photos", "graphics and scans"):
        cells = [f"{np.mean(means[f'{kind} {c}']):+.2f} (min {min(means[f'{kind} {c}']):+.2f})"
                 for c in range(2 + len(HALF_WIDTHS))]
        print(f"| **{kind}, mean** | | | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
