"""How well dist_dejpeg.jpeg.quality reads the JPEG quality: from tables, from pixels, and double compression.

    python benchmarks/experiments/quality_estimate.py            # from the repository root, ~3 min on 2 cores
    python benchmarks/experiments/quality_estimate.py --quick    # 3 photos, fewer qualities

On real photos (scikit-image's; immunohistochemistry and coins were JPEGs once, so they are used halved
with area averaging, which erases the old grid) it measures, and prints as markdown:
(a) single libjpeg compressions (Pillow, 4:2:0) read from the pixels only, as a PNG of them would be;
(b) double compressions q1 -> q2 read from the JPEG (tables + pixels): detected, and the estimate's error
    (also with a crop between the two that moves the grid);
(c) Pillow's Photoshop presets and other tables: the IJG-equivalent quality from the tables against the
    libjpeg quality whose luma PSNR on the same photo is nearest (what "equivalent" should mean to a restorer);
(d) never-compressed photos (the originals, and halved ones): the quality must be None;
false positives: every single compression q 5..100 in 4:2:0 and 4:4:4 and every preset, read from the JPEG,
must never come out double compressed; and the time of one estimate on a 12 MP photo, one thread.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from PIL import Image, JpegPresets

from dist_dejpeg.data.images import halve
from dist_dejpeg.jpeg.quality import (
    BASE_CHROMA,
    BASE_LUMA,
    DOUBLE,
    estimate_from_pixels,
    estimate_quality,
    libjpeg_table,
)

# mozjpeg's default luma base (N. Robidoux's table, jcparam.c index 3) and ImageMagick-style flat tables
ROBIDOUX = (16, 16, 16, 18, 25, 37, 56, 85, 16, 17, 20, 27, 34, 40, 53, 75, 16, 20, 24, 31, 43, 62, 91, 135,
            18, 27, 31, 40, 53, 74, 106, 156, 25, 34, 43, 53, 69, 94, 131, 189, 37, 40, 62, 74, 94, 124, 169, 238,
            56, 53, 91, 106, 131, 169, 226, 311, 85, 75, 135, 156, 189, 238, 311, 418)


def photos(quick: bool) -> dict[str, np.ndarray]:
    from skimage import data

    out = {n: getattr(data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                                           "retina", "cat")}
    out["motorcycle"] = data.stereo_motorcycle()[0]
    out["immunohistochemistry/2"] = halve(data.immunohistochemistry())
    out["coins/2"] = np.repeat(halve(data.coins())[..., None], 3, axis=2)
    return dict(list(out.items())[:3]) if quick else out


def jpeg(arr: np.ndarray, **kw) -> Image.Image:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    buf.seek(0)
    img = Image.open(buf)
    img.load()
    return img


def rgb_of(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255 ** 2 / max(mse, 1e-10)))


def summary(rows: list[tuple[int, int | None]]) -> str:
    found = [(t, q) for t, q in rows if q is not None]
    err = [abs(t - q) for t, q in found]
    mean = f"{statistics.mean(err):.1f}" if err else "-"
    return f"{len(found)}/{len(rows)} | {mean} | {max(err) if err else '-'}"


def single(imgs, qualities) -> None:
    print("\n(a) single compressions read from the pixels only (libjpeg 4:2:0)\n")
    print("| q | found | mean abs error | max abs error | estimates |\n|---|---|---|---|---|")
    for q in qualities:
        rows = [(q, estimate_from_pixels(rgb_of(jpeg(a, quality=q))).quality) for a in imgs.values()]
        print(f"| {q} | {summary(rows)} | {' '.join(str(e) for _, e in rows)} |")


def double(imgs, pairs, crop: int = 0) -> None:
    how = f", cropped by {crop} px (top and left) in between: the grid moves" if crop else ""
    print(f"\n(b) double compressions q1 -> q2 read from the JPEG (tables + pixels){how}\n")
    print("| q1 -> q2 | detected | mean abs error of q1 | max abs error | estimates |\n|---|---|---|---|---|")
    for q1, q2 in pairs:
        rows = []
        for a in imgs.values():
            img = jpeg(rgb_of(jpeg(a, quality=q1))[crop:, crop:], quality=q2)
            est = estimate_quality(img, rgb_of(img))
            rows.append((q1, est.quality if est.source == DOUBLE else None))
        print(f"| {q1} -> {q2} | {summary(rows)} | {' '.join(str(e) for _, e in rows)} |")


def custom_tables() -> dict[str, dict]:
    out = {name: {"qtables": p["quantization"], "subsampling": p["subsampling"]}
           for name, p in JpegPresets.presets.items()}
    for q in (50, 75, 90):
        scale = 5000 // q if q < 50 else 200 - 2 * q
        luma = np.clip((np.array(ROBIDOUX) * scale + 50) // 100, 1, 255).tolist()
        out[f"mozjpeg-style q{q}"] = {"qtables": [luma, libjpeg_table(BASE_CHROMA, q).tolist()]}
    for v in (4, 16):
        out[f"flat {v}"] = {"qtables": [[v] * 64, [v] * 64]}
    off = np.clip(np.rint(libjpeg_table(BASE_LUMA, 60) * 1.08), 1, 255).astype(int).tolist()
    out["libjpeg q60 x 1.08"] = {"qtables": [off, libjpeg_table(BASE_CHROMA, 60).tolist()]}
    return out


def tables(imgs) -> None:
    print("\n(c) other encoders' tables: IJG-equivalent q from the tables vs the libjpeg q of nearest luma PSNR\n")
    print("| tables | estimate | source | PSNR-equivalent q (median, range over photos) | double flagged |")
    print("|---|---|---|---|---|")
    grays = {n: np.asarray(Image.fromarray(a).convert("L")) for n, a in imgs.items()}
    ladder = {n: np.array([psnr(g, np.asarray(jpeg(g, quality=q))) for q in range(1, 101)]) for n, g in grays.items()}
    for name, kw in custom_tables().items():
        est = estimate_quality(jpeg(next(iter(imgs.values())), **kw))
        equiv = [int(np.argmin(np.abs(ladder[n] - psnr(g, np.asarray(jpeg(g, qtables=kw["qtables"][:1]))))) + 1)
                 for n, g in grays.items()]
        flagged = sum(estimate_quality(img := jpeg(a, **kw), rgb_of(img)).source == DOUBLE for a in imgs.values())
        print(f"| {name} | {est.quality} | {est.source} | {int(np.median(equiv))} ({min(equiv)}-{max(equiv)}) | "
              f"{flagged}/{len(imgs)} |")


def never(imgs) -> None:
    from skimage import data

    print("\n(d) never-compressed photos: the quality read from the pixels (must be None)\n")
    print("| photo | original | halved |\n|---|---|---|")
    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "cat", "camera", "moon",
             "gravel", "grass", "brick", "immunohistochemistry", "coins")
    for n in names:
        a = getattr(data, n)()
        print(f"| {n} | {estimate_from_pixels(a).quality} | {estimate_from_pixels(halve(a)).quality} |")


def false_positives(imgs, step: int) -> None:
    from skimage import data

    flagged, total = [], 0
    textures = {n: getattr(data, n)() for n in ("gravel", "grass", "brick", "camera", "moon")}
    for name, a in {**imgs, **textures}.items():
        for q in range(5, 101, step):
            for sub in (0, 2):
                img = jpeg(a, quality=q, subsampling=sub)
                total += 1
                if estimate_quality(img, rgb_of(img)).source == DOUBLE:
                    flagged.append(f"{name} q{q} {'4:4:4' if sub == 0 else '4:2:0'}")
    print(f"\nfalse positives: {len(flagged)} of {total} single compressions (q 5..100 step {step}, 4:4:4 and "
          f"4:2:0; the photos and 5 grey textures) flagged double compressed {flagged}")


def timing() -> None:
    rng = np.random.default_rng(0)
    from skimage import data

    big = np.asarray(Image.fromarray(data.astronaut()).resize((4000, 3000), Image.BICUBIC))
    big = np.clip(big.astype(np.int16) + rng.integers(-3, 4, big.shape), 0, 255).astype(np.uint8)
    for label, arr in (("12 MP PNG-like (pixels only)", big),):
        estimate_from_pixels(arr)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            estimate_from_pixels(arr)
            times.append(time.perf_counter() - start)
        print(f"\ntime, {label}, 4000 x 3000, one thread: median {statistics.median(times):.3f} s "
              f"(min {min(times):.3f}) over 5")
    img = jpeg(big, quality=90)
    rgb = rgb_of(img)
    estimate_quality(img, rgb)
    start = time.perf_counter()
    est = estimate_quality(img, rgb)
    print(f"time, 12 MP q90 JPEG (tables + double-compression check): {time.perf_counter() - start:.3f} s "
          f"-> {est.describe()}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 photos, fewer qualities")
    args = p.parse_args(argv)
    imgs = photos(args.quick)
    print("photos:", ", ".join(f"{n} {a.shape[1]}x{a.shape[0]}" for n, a in imgs.items()))
    single(imgs, (5, 10, 20, 50, 90) if args.quick else (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98))
    double(imgs, [(q1, q2) for q1 in ((20,) if args.quick else (10, 20, 30, 50)) for q2 in (75, 90, 95)])
    double(imgs, [(q1, q2) for q1 in (20, 50) for q2 in (75, 90)], crop=3)
    tables(imgs)
    never(imgs)
    false_positives(imgs, 19 if args.quick else 1)
    timing()


if __name__ == "__main__":
    main()
