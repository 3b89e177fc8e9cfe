"""Restoring a JPEG into a JPEG again (`restore --format same`, `jpg`): does the q95 re-encoding cost more than
restoring gains, and does the guard's check (restore/reencode.py: reencoding_outweighs) write the input file there?

    dist-dejpeg train --config configs/debug.yaml          # the quick start's model, runs/debug
    python benchmarks/experiments/reencode.py runs/debug   # ~1 min on 2 cores

On the sample set's held-out photos, whole (chelsea, coffee, coins halved), each compressed by libjpeg (4:2:0)
at each quality, it prints as markdown the RGB PSNR gain over the JPEG, mean (min) of the three: restored as PNG,
restored and always written as restore's q95 4:4:4 JPEG (before the check), and what `restore --format same`
writes now, with how many of the three it wrote as the input file.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dist_dejpeg.data.shards import SAMPLE_VAL, sample_photo
from dist_dejpeg.jpeg.formats import save_options
from dist_dejpeg.metrics.fullref import psnr
from dist_dejpeg.restore import open_restorer
from dist_dejpeg.restore.files import restore_files

QUALITIES = (10, 20, 30, 40, 60, 80, 85, 90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="generator file, run or checkpoint folder, or ONNX export")
    args = parser.parse_args()
    restorer = open_restorer(args.model, device="cpu")
    photos = {name: sample_photo(name) for name in SAMPLE_VAL}
    print(f"{args.model}; held-out photos {', '.join(photos)}; RGB PSNR gain over the JPEG, mean (min)\n")
    print("| q | restored, PNG | restored, q95 JPEG always | `--format same` now | written as the input |")
    print("|---|---|---|---|---|")
    q95 = save_options(".jpg", None)[1]
    with tempfile.TemporaryDirectory() as tmp:
        for q in QUALITIES:
            gains: dict[str, list[float]] = {"png": [], "always": [], "same": []}
            kept = 0
            for name, clean in photos.items():
                src = Path(tmp) / f"{name}_q{q}.jpg"
                Image.fromarray(clean).save(src, quality=q)
                base = psnr(np.asarray(Image.open(src).convert("RGB")), clean)
                (png,) = restore_files(restorer, [str(src)], Path(tmp) / "png", progress=False)
                restored = np.asarray(Image.open(png.output).convert("RGB"))
                buf = io.BytesIO()
                Image.fromarray(restored).save(buf, "JPEG", **q95)
                always = np.asarray(Image.open(buf).convert("RGB"))
                (same,) = restore_files(restorer, [str(src)], Path(tmp) / "same", fmt="same", progress=False)
                kept += Path(same.output).read_bytes() == src.read_bytes()
                for kind, image in (("png", restored), ("always", always),
                                    ("same", np.asarray(Image.open(same.output).convert("RGB")))):
                    gains[kind].append(psnr(image, clean) - base)
            cells = [f"{np.mean(g):+.3f} ({min(g):+.2f})" for g in gains.values()]
            print(f"| {q} | " + " | ".join(cells) + f" | {kept} of {len(photos)} |", flush=True)


if __name__ == "__main__":
    main()
