"""Peak memory of each of `dist-dejpeg evaluate`'s metrics on one camera-sized photo, each in a fresh process.

A 4000 x 3000 photo (four skimage.data photos tiled and upscaled, light noise for texture at pixel scale) and its
libjpeg q20 round trip; each metric runs alone in a child process, which reports the rise of its peak resident
memory over its start (VmHWM from /proc, reset at the start: ru_maxrss keeps the forking parent's peak across
exec), the tracemalloc peak (numpy's allocations; torch's are not seen), its seconds and its value. LPIPS is
AlexNet with random weights (the pretrained ones cannot be assumed here; memory and time are the same, the value
is not LPIPS); its rows "lpips x2" and "lpips pair" measure two images against the photo, one call each and both
in one call, as evaluate measures a JPEG and its restored image (the value: their sum). Linux only. ``--threads 2``: numpy's and torch's thread counts (evaluate runs with torch's default,
the machine's cores).

    python benchmarks/experiments/metric_memory.py [--size 4000x3000] [--threads 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import tracemalloc

import numpy as np

METRICS = ("psnr", "psnr_y", "psnr_b", "ssim", "colour", "brisque", "niqe", "lpips", "lpips x2", "lpips pair")


def photo_pair(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(clean, its q20 JPEG), both height x width x 3 uint8."""
    from PIL import Image
    from skimage import data

    from dist_dejpeg.data.images import jpeg_roundtrip

    canvas = np.zeros((height, width, 3), np.uint8)
    for i, photo in enumerate((data.astronaut(), data.coffee(), data.chelsea(), data.rocket())):
        r, c = divmod(i, 2)
        rows, cols = slice(r * height // 2, (r + 1) * height // 2), slice(c * width // 2, (c + 1) * width // 2)
        size = (cols.stop - cols.start, rows.stop - rows.start)
        canvas[rows, cols] = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC))
    noise = np.random.default_rng(0).integers(-3, 4, canvas.shape)
    clean = np.clip(canvas.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return clean, jpeg_roundtrip(clean, 20)


def _proc_mb(key: str) -> float:
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def child(name: str, height: int, width: int, threads: int = 1) -> dict:
    """One metric measured in this process (the photo pair made before the start is taken)."""
    import torch

    from dist_dejpeg.data.images import jpeg_roundtrip
    from dist_dejpeg.metrics import fullref, noref, whole_image
    from dist_dejpeg.models.lpips import LPIPS

    torch.set_num_threads(threads)
    clean, jpeg = photo_pair(height, width)
    calls = {"psnr": lambda: fullref.psnr(jpeg, clean), "psnr_y": lambda: fullref.psnr(jpeg, clean, y_only=True),
             "psnr_b": lambda: fullref.psnr_b(jpeg, clean), "ssim": lambda: fullref.ssim(jpeg, clean),
             "colour": lambda: fullref.colour_metrics(jpeg, clean), "brisque": lambda: noref.brisque(jpeg),
             "niqe": lambda: noref.niqe(jpeg)}
    if name.startswith("lpips"):
        torch.manual_seed(0)  # the same random backbone in every run: values comparable before and after a change
        model = LPIPS(net="alex", pretrained=False).eval()
        # evaluate measures a JPEG and its restored image (here a q40 JPEG stands in) against the clean photo:
        # "lpips x2" one call each, "lpips pair" both in one call (the clean photo's features made once)
        other = jpeg_roundtrip(clean, 40)
        calls["lpips"] = lambda: whole_image.lpips_value(model, jpeg, clean)
        calls["lpips x2"] = lambda: sum(whole_image.lpips_value(model, img, clean) for img in (jpeg, other))
        calls["lpips pair"] = lambda: sum(whole_image.lpips_values(model, clean, [jpeg, other]))
    elif name in ("brisque", "niqe"):  # their model files loaded before the start (a 288 px image)
        getattr(noref, name)(np.ascontiguousarray(np.tile(jpeg[:96, :96], (3, 3, 1))))
    with open("/proc/self/clear_refs", "w") as f:  # the peak so far (making the photo) is not the metric's
        f.write("5")
    start = _proc_mb("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    value = calls[name]()
    seconds = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return {"metric": name, "rise_mb": _proc_mb("VmHWM") - start, "tracemalloc_mb": traced, "seconds": seconds,
            "value": value}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the photo")
    p.add_argument("--out", default="benchmarks/results", help="folder for metric_memory.md / .json")
    p.add_argument("--threads", type=int, default=1, help="numpy's and torch's threads in each child")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.child:
        print(json.dumps(child(args.child, height, width, args.threads), default=float))
        return
    from dist_dejpeg.bench.common import machine_name_without_torch
    from dist_dejpeg import source_commit

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    for name in METRICS:
        run = subprocess.run([sys.executable, __file__, "--size", args.size, "--threads", str(args.threads),
                              "--child", name], capture_output=True, text=True, env=env)
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        if run.returncode or not lines:
            raise SystemExit(f"{name} failed:\n{run.stderr[-2000:]}")
        rows.append(json.loads(lines[-1]))
        print(f"{name:10s} +{rows[-1]['rise_mb']:6.0f} MB (tracemalloc {rows[-1]['tracemalloc_mb']:6.0f} MB) "
              f"{rows[-1]['seconds']:5.1f} s", flush=True)
    machine, when = machine_name_without_torch(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    threads = "one thread" if args.threads == 1 else f"{args.threads} threads"
    table = [f"# evaluate's metrics: peak memory on one {width} x {height} photo", "",
             f"{machine}; commit {source_commit() or '?'}; {when}; {threads}; each metric in a fresh process "
             "(`python benchmarks/experiments/metric_memory.py`).", "",
             "| metric | peak resident rise | tracemalloc peak | seconds |", "|---|---|---|---|"]
    table += [f"| {r['metric']} | +{r['rise_mb']:.0f} MB | {r['tracemalloc_mb']:.0f} MB | {r['seconds']:.1f} |"
              for r in rows]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "metric_memory.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    with open(os.path.join(args.out, "metric_memory.json"), "w") as f:
        json.dump({"machine": machine, "date": when, "threads": args.threads, "size": [width, height], "rows": rows},
                  f, indent=2, default=float)


if __name__ == "__main__":
    main()
