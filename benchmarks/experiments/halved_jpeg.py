"""How clean a JPEG photo is once halved: what `prepare folder --jpeg-sources halve` (the default) rests on.

    python benchmarks/experiments/halved_jpeg.py     # from the repository root, ~20 s on 2 cores

For lossless colour photos (scikit-image's: astronaut, chelsea, coffee and the motorcycle pair), each JPEG-
compressed with libjpeg (Pillow, 4:2:0) at q and then halved by a 2x2 area mean (dist_dejpeg.data.images.halve),
it prints as markdown: the RGB PSNR of the JPEG against the original, of the halved JPEG against the halved
original, the libjpeg quality q' whose JPEG of the halved original is as close to it (what the halved JPEG is
"worth" as a clean target; 100: closer than a q99 JPEG), the same for the JPEG halved twice, and whether the
pixel estimate still finds a JPEG grid in the halved image.
"""

from __future__ import annotations

import io
import statistics

import numpy as np
from PIL import Image
from skimage import data

from dist_dejpeg.data.images import halve
from dist_dejpeg.jpeg.quality import estimate_from_pixels
from dist_dejpeg.metrics.fullref import psnr

PHOTOS = ("astronaut", "chelsea", "coffee", "stereo_motorcycle")
QUALITIES = (10, 20, 30, 50, 75, 90)
LADDER = tuple(range(5, 100))


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def photos() -> dict[str, np.ndarray]:
    out = {}
    for name in PHOTOS:
        image = getattr(data, name)()
        if name == "stereo_motorcycle":
            out["motorcycle_left"], out["motorcycle_right"] = image[0], image[1]
        else:
            out[name] = image
    return out


def main() -> None:
    rows = {q: {"full": [], "half": [], "worth": [], "worth2": [], "grid": 0} for q in QUALITIES}
    for name, rgb in photos().items():
        clean_half, clean_quarter = halve(rgb), halve(halve(rgb))
        ladder = {q: psnr(jpeg(clean_half, q), clean_half) for q in LADDER}
        ladder2 = {q: psnr(jpeg(clean_quarter, q), clean_quarter) for q in LADDER}
        for q in QUALITIES:
            compressed = jpeg(rgb, q)
            half = halve(compressed)
            row = rows[q]
            row["full"].append(psnr(compressed, rgb))
            row["half"].append(psnr(half, clean_half))
            # the lowest quality whose JPEG of the halved original is at least as close as the halved JPEG
            row["worth"].append(next((k for k in LADDER if ladder[k] >= row["half"][-1]), 100))
            quarter = psnr(halve(half), clean_quarter)
            row["worth2"].append(next((k for k in LADDER if ladder2[k] >= quarter), 100))
            row["grid"] += estimate_from_pixels(half).quality is not None
    n = len(photos())
    print(f"{n} lossless colour photos ({', '.join(photos())}); means over the photos, q' as median (min-max)\n")
    print("| JPEG q | PSNR vs original | halved, vs the halved original | worth q' (a JPEG of the halved original "
          "as close) | halved twice: worth q' | grid found after halving |")
    print("|---|---|---|---|---|---|")
    for q, row in rows.items():
        worth, worth2 = row["worth"], row["worth2"]
        print(f"| {q} | {statistics.mean(row['full']):.1f} dB | {statistics.mean(row['half']):.1f} dB | "
              f"{statistics.median(worth):.0f} ({min(worth)}-{max(worth)}) | "
              f"{statistics.median(worth2):.0f} ({min(worth2)}-{max(worth2)}) | {row['grid']} of {n} |")


if __name__ == "__main__":
    main()
