"""`evaluate` with its metrics in processes beside the restoring one (--workers), against one process.

Photo-like references (four skimage.data photos tiled and upscaled with light noise, like metric_memory.py's),
the debug recipe's generator with random weights (a bench generator: its output differs from its input) and a
random AlexNet file in torchvision's layout for LPIPS (the pretrained one cannot be assumed here: time and memory
are the same, the values are not LPIPS). Each setting runs `evaluate()` in turn, ``--rounds`` times alternating,
the median of each; the tables of every run must agree to 1e-9 relative (the pool changes where the metrics run,
not what they are; libsvm's parallel sums in BRISQUE round differently at ~1e-13 with another thread team).

    python benchmarks/experiments/evaluate_workers.py [--photos 4] [--size 2040x1356] [--workers 1 2] [--rounds 2]
        [--instant]   (a restorer that returns its input, as fast as a GPU's in effect, and no LPIPS)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_inputs(folder: Path, photos: int, width: int, height: int) -> tuple[Path, Path, Path]:
    """(photo folder, generator file, AlexNet file) in ``folder``."""
    from PIL import Image
    from skimage import data

    from dist_dejpeg.bench.infer import save_bench_generator, save_stand_in_alexnet
    from dist_dejpeg.config import load_config

    rng = np.random.default_rng(0)
    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    (folder / "photos").mkdir()
    for i in range(photos):
        canvas = np.zeros((height, width, 3), np.uint8)
        for j in range(4):
            r, c = divmod(j, 2)
            rows, cols = slice(r * height // 2, (r + 1) * height // 2), slice(c * width // 2, (c + 1) * width // 2)
            photo = sources[(i + j) % 4]
            size = (cols.stop - cols.start, rows.stop - rows.start)
            canvas[rows, cols] = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC))
        noisy = np.clip(canvas.astype(np.int16) + rng.integers(-3, 4, canvas.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / "photos" / f"photo{i}.png")
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"), [])
    generator = save_bench_generator(cfg.model, folder / "generator.safetensors")
    save_stand_in_alexnet(folder / "alexnet.pth")
    return folder / "photos", generator, folder / "alexnet.pth"


class InstantRestorer:
    """``--instant``: a restorer that returns its input at once, standing in for a GPU's (milliseconds per image),
    and no LPIPS: what is left is the metrics processes' work, the part of an evaluation on a GPU machine that the
    pool spreads over its cores."""

    info, device, tile, overlap, conditioned, guard = {}, "instant (stand-in)", 0, 0, False, False

    class last_decision:  # noqa: N801 - as Restorer.last_decision reads
        passthrough = False

    def restore_array(self, img, quality, source=""):
        return np.array(img)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=4)
    p.add_argument("--size", default="2040x1356", help="WIDTHxHEIGHT of each photo")
    p.add_argument("--qualities", type=int, nargs="+", default=[10, 20, 30, 40])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results", help="folder for evaluate_workers.md / .json")
    p.add_argument("--instant", action="store_true", help="a stand-in restorer that returns its input (a GPU's "
                   "restore, in effect) and no LPIPS: the metrics processes' share alone")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))

    from dist_dejpeg import source_commit
    from dist_dejpeg.bench.common import machine_name_without_torch
    from dist_dejpeg.evaluation.evaluate import evaluate
    from dist_dejpeg.restore.restorer import Restorer

    seconds: dict[int, list[float]] = {w: [] for w in args.workers}
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        photos, generator, alexnet = make_inputs(Path(tmp), args.photos, width, height)
        restorer = InstantRestorer() if args.instant else Restorer(str(generator))
        lpips = "" if args.instant else str(alexnet)  # ("": unavailable offline)
        for r in range(args.rounds):
            for w in args.workers:
                start = time.perf_counter()
                result = evaluate(restorer, [str(photos)], args.qualities, None, lpips_weights=lpips,
                                  progress=False, workers=w, only=("psnr", "psnr_b", "ssim", "brisque", "niqe")
                                  if args.instant else None)
                seconds[w].append(time.perf_counter() - start)
                tables[(r, w)] = [(row["image"], row["quality"], kind, m, v) for row in result["per_image"]
                                  for kind in ("jpeg", "restored") for m, v in sorted(row[kind].items())]
                print(f"round {r + 1}, workers {w}: {seconds[w][-1]:.1f} s", flush=True)
    first = next(iter(tables.values()))
    for key, table in tables.items():
        for a, b in zip(first, table):
            if a[:4] != b[:4] or (a[4] != b[4] and not (a[4] is not None and b[4] is not None
                                                         and abs(a[4] - b[4]) <= 1e-9 * abs(a[4]))):
                raise SystemExit(f"round {key[0] + 1}, workers {key[1]}: {b} differs from the first run's {a}")
    machine, when = machine_name_without_torch(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    base = statistics.median(seconds[args.workers[0]])
    lines = [f"# evaluate --workers: {args.photos} photos of {width} x {height}, qualities "
             f"{' '.join(map(str, args.qualities))}" + (", instant stand-in restorer, no LPIPS" if args.instant else ""),
             "",
             f"{machine}; commit {source_commit() or '?'}; {when}; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}; "
             f"{args.rounds} rounds alternating, the median; the same tables in every run (1e-9) "
             "(`python benchmarks/experiments/evaluate_workers.py`).", "",
             "| workers | seconds (median) | each round | x the first row |", "|---|---|---|---|"]
    for w in args.workers:
        med = statistics.median(seconds[w])
        lines.append(f"| {w} | {med:.1f} | {' / '.join(f'{s:.1f}' for s in seconds[w])} | {base / med:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    name = "evaluate_workers-instant" if args.instant else "evaluate_workers"
    Path(args.out, f"{name}.md").write_text(text)
    Path(args.out, f"{name}.json").write_text(json.dumps(
        {"machine": machine, "date": when, "photos": args.photos, "size": [width, height], "instant": args.instant,
         "qualities": args.qualities, "seconds": {str(w): s for w, s in seconds.items()}}, indent=2))


if __name__ == "__main__":
    main()
