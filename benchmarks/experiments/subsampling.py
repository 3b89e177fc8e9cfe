"""Does a model trained on 4:2:0 JPEGs help, or harm, JPEGs of other chroma subsampling?

    dist-dejpeg train --config configs/debug.yaml            # the quick start's model, runs/debug
    python benchmarks/experiments/subsampling.py runs/debug  # ~35 s on 2 cores

Training degrades crops with libjpeg's 4:2:0 (and rebuilds it from nvJPEG's 4:4:4 on the GPU), as most encoders
write; some editors and cameras write 4:2:2 or 4:4:4. On the sample set's held-out photos, whole (chelsea, coffee,
coins halved), each JPEG-compressed with libjpeg at each quality and subsampling and restored as `restore` does
(the quality read from the file's tables), it prints as markdown the mean RGB PSNR gain over the JPEG and the
smallest of the three: of the raw model, and with the guard.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image

from dist_dejpeg.data.shards import SAMPLE_VAL, sample_photo
from dist_dejpeg.jpeg.formats import SUBSAMPLING
from dist_dejpeg.metrics.fullref import psnr
from dist_dejpeg.restore.restorer import Restorer

QUALITIES = (10, 20, 30, 40, 60, 80, 90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="generator file, run or checkpoint folder")
    args = parser.parse_args()
    restorers = {"raw": Restorer(args.model, guard=False, device="cpu"),
                 "guarded": Restorer(args.model, guard=True, device="cpu")}
    photos = {name: sample_photo(name) for name in SAMPLE_VAL}
    print(f"{args.model}; held-out photos {', '.join(photos)}; RGB PSNR gain over the JPEG, mean (min)\n")
    print("| q | " + " | ".join(f"{s} {kind}" for s in SUBSAMPLING for kind in restorers) + " |")
    print("|---|" + "---|" * (len(SUBSAMPLING) * len(restorers)))
    for q in QUALITIES:
        cells = []
        for code in SUBSAMPLING.values():
            gains: dict[str, list[float]] = {kind: [] for kind in restorers}
            for clean in photos.values():
                buf = io.BytesIO()
                Image.fromarray(clean).save(buf, "JPEG", quality=q, subsampling=code)
                base = psnr(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), clean)
                for kind, restorer in restorers.items():
                    restored = restorer.restore(Image.open(io.BytesIO(buf.getvalue())))
                    gains[kind].append(psnr(np.asarray(restored.convert("RGB")), clean) - base)
            cells += [f"{np.mean(g):+.3f} ({min(g):+.2f})" for g in gains.values()]
        print(f"| {q} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
