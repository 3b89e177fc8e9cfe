"""Data-pipeline throughput: degraded/clean crops per second, every loader on the same shards and cores.

    pip install -e '.[bench]'
    dist-dejpeg bench data                       # bundled sample photos, 288 px and DIV2K-sized 480 px tiles
    dist-dejpeg bench data --root data/div2k     # prepared DIV2K shards

Rows (256 px crops, batch 32, random JPEG quality 10-50, the same number of threads/workers each), for each
tile size and shard format:
- torch loader: dist_dejpeg's webdataset + PIL DataLoader path
- BasicSR-style peer: a folder of PNG sub-images, cv2 read + random crop + cv2 JPEG round trip + float
  conversion (BasicSR's img2tensor) in DataLoader workers (how BasicSR-derived trainers feed JPEG restoration)
Every row delivers float32 batches in [0, 1] (the batch contract), so each pays for the conversion.
- DALI CPU: dist_dejpeg's DALI pipeline with device_id=None
- DALI GPU: the same pipeline on a CUDA device (mixed decode, GPU crop and distortion), when present
- torch loader + nvJPEG: workers read and crop, the batch is JPEG-degraded on the GPU (no DALI), when present
- libjpeg ceiling: encode + decode of in-memory 256 px crops of the sample photos alone, in as many processes (the
  most any CPU pipeline can reach when the ground truth costs nothing to decode)
Results: data.json and data.md in the results folder (with the machine's name). Ratios are computed from
rows measured in this one run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from dist_dejpeg.bench.common import add_common_arguments, sync, write_results
from dist_dejpeg.data.shards import SAMPLE_TRAIN, list_shards, prepare_samples, read_manifest, sample_photo
from dist_dejpeg.data.torch_loader import ShardStream, TorchLoader
from dist_dejpeg.jpeg.formats import TILE_FORMATS

PEER = "BasicSR-style peer (cv2 in workers)"
QUALITY = (10, 50)


class BasicSRStyle(Dataset):
    """Map-style dataset over PNG files, cv2 everywhere (the peer)."""

    def __init__(self, files: list[str], crop: int):
        self.files, self.crop = files, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        import cv2

        rng = np.random.default_rng()
        img = cv2.imread(self.files[index], cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        top, left = rng.integers(0, h - self.crop + 1), rng.integers(0, w - self.crop + 1)
        clean = np.ascontiguousarray(img[top:top + self.crop, left:left + self.crop])
        quality = int(rng.integers(QUALITY[0], QUALITY[1] + 1))
        _, enc = cv2.imencode(".jpg", clean, [cv2.IMWRITE_JPEG_QUALITY, quality])
        jpeg = cv2.imdecode(enc, cv2.IMREAD_COLOR)
        # BasicSR's img2tensor: BGR -> RGB, HWC -> CHW, float32 in [0, 1], in the worker
        to_t = lambda a: torch.from_numpy(a[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0)  # noqa: E731
        return {"jpeg": to_t(jpeg), "clean": to_t(clean), "quality": quality}


def forever(loader):
    while True:
        yield from loader


def rate(batches, batch_size: int, n: int, warmup: int, device: torch.device) -> float:
    """Crops per second over ``n`` batches after ``warmup``; the last batch is read back, so it is really there."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        batch = next(it)
    _ = batch["jpeg"].sum().item()
    sync(device)
    return batch_size * n / (time.perf_counter() - start)


def _jpeg_worker(args):
    from dist_dejpeg.data.images import jpeg_roundtrip

    crops, seconds = args
    done, start = 0, time.perf_counter()
    rng = np.random.default_rng(0)
    while time.perf_counter() - start < seconds:
        jpeg_roundtrip(crops[done % len(crops)], int(rng.integers(QUALITY[0], QUALITY[1] + 1)))
        done += 1
    return done / (time.perf_counter() - start)


def photo_crops(crop: int) -> list[np.ndarray]:
    """The ceiling's input: a centre ``crop`` of each sample training photo (one smaller than ``crop`` enlarged
    first); random noise JPEG-codes slower than photos, and loaders of photos beat its "ceiling"."""
    from PIL import Image

    crops = []
    for name in SAMPLE_TRAIN:
        photo = sample_photo(name)
        if (short := min(photo.shape[:2])) < crop:
            h, w = (round(n * crop / short) for n in photo.shape[:2])
            photo = np.asarray(Image.fromarray(photo).resize((max(w, crop), max(h, crop)), Image.BICUBIC))
        top, left = (photo.shape[0] - crop) // 2, (photo.shape[1] - crop) // 2
        crops.append(np.ascontiguousarray(photo[top:top + crop, left:left + crop]))
    return crops


def extract_pngs(shards: list[str], folder: Path) -> list[str]:
    files = []
    for sample in wds.tariterators.tarfile_samples([{"url": s} for s in shards]):
        if sample and "png" in sample:
            path = folder / f"{sample['__key__']}.png"
            path.write_bytes(sample["png"])
            files.append(str(path))
    return files


def _loader_rows(tag: str, root: Path, crop: int, batch: int, threads: int, batches: int, warmup: int,
                 tmp: Path) -> dict[str, float]:
    """Every loader over one prepared shard folder (``tag``: tile size and format)."""
    cpu = torch.device("cpu")
    fmt = (read_manifest(root) or {}).get("format")
    shards = list_shards(root, "train-*.tar")
    stream = lambda: ShardStream(shards, crop, QUALITY, num_workers=threads, shuffle_buffer=64)  # noqa: E731
    rows = {f"torch loader (webdataset + PIL) [{tag}]": rate(TorchLoader(stream(), batch, threads, cpu), batch,
                                                             batches, warmup, cpu)}
    if torch.cuda.is_available():
        from dist_dejpeg.data.gpu_jpeg import jpeg_roundtrip_cuda

        gpu = torch.device("cuda", 0)
        for label, pack in (("", True), (", images as a list", False)):
            rows[f"torch loader + nvJPEG on GPU{label} [{tag}]"] = rate(
                TorchLoader(stream(), batch, threads, gpu, degrade_batch=partial(jpeg_roundtrip_cuda, pack=pack)),
                batch, batches, warmup, gpu)
    if fmt == "png":
        folder = tmp / f"pngs-{tag.replace(' ', '-')}"
        folder.mkdir(exist_ok=True)
        peer = DataLoader(BasicSRStyle(extract_pngs(shards, folder), crop), batch_size=batch, shuffle=True,
                          num_workers=threads, drop_last=True, persistent_workers=True)
        rows[f"{PEER} [{tag} files]"] = rate(forever(peer), batch, batches, warmup, cpu)
    if _have_dali():
        from dist_dejpeg.data.dali import DaliLoader

        rows[f"DALI CPU [{tag}]"] = rate(DaliLoader(shards, crop, QUALITY, batch, num_threads=threads), batch,
                                         batches, warmup, cpu)
        if torch.cuda.is_available():
            gpu = torch.device("cuda", 0)
            rows[f"DALI GPU [{tag}]"] = rate(DaliLoader(shards, crop, QUALITY, batch, device=gpu, num_threads=threads),
                                             batch, batches * 5, warmup, gpu)
    return rows


def _have_dali() -> bool:
    try:
        from dist_dejpeg.data.dali import HAVE_DALI
    except ImportError:
        return False
    return HAVE_DALI


def not_measured() -> dict[str, str]:
    """The loaders this machine cannot run, each with the reason: rows in the table that say so, not rows that
    vanish (a CPU machine's table read as if DALI on the GPU had not been tried)."""
    dali = "" if _have_dali() else "NVIDIA DALI is not installed (pip install -e '.[dali]')"
    gpu = "" if torch.cuda.is_available() else "no CUDA device"
    rows = {"torch loader + nvJPEG on GPU": gpu, "DALI CPU": dali, "DALI GPU": gpu or dali}
    return {label: f"not measured: {why}" for label, why in rows.items() if why}


def run(out_dir: str | Path, *, root: str | None = None, crop: int = 256, batch: int = 32,
        threads: int | None = None, batches: int = 20, warmup: int = 3, formats=("png", "raw", "jp2"),
        tiles=(288, 480), name: str = "data") -> dict:
    """Prepare the sample photos as shards of each tile size and format (or take ``root``), time every loader
    on each, and the libjpeg ceiling; write ``name``.json/.md into ``out_dir``."""
    threads = threads or os.cpu_count()
    if not root and min(tiles) < crop:
        raise ValueError(f"bench data: {crop} px crops need tiles of at least {crop} px, got {min(tiles)} "
                         f"(--tiles/--crop)")
    roots: dict[str, Path] = {}
    if root:
        list_shards(root, "train-*.tar")  # none there: an error now, not after the other rows
        m = read_manifest(root) or {}  # (shards made elsewhere have none)
        roots[f"{m.get('tile', '?')} px {m.get('format', '?')}"] = Path(root)
    rows: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        for tile in () if root else tiles:
            # the small tiles in every format; DIV2K-sized ones in the formats worth their decode cost
            for fmt in formats if tile == min(tiles) else [f for f in formats if f != "jp2"]:
                roots[f"{tile} px {fmt}"] = tmp / f"{tile}-{fmt}"
                prepare_samples(roots[f"{tile} px {fmt}"], tile=tile, train_step=64, shard_size=32, fmt=fmt)
        for tag, folder in roots.items():
            print(f"bench data: {tag} ...", flush=True)
            rows.update(_loader_rows(tag, folder, crop, batch, threads, batches, warmup, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    crops = photo_crops(crop)
    with mp.get_context("spawn").Pool(threads) as pool:
        rows["libjpeg encode+decode only (ceiling)"] = sum(pool.map(_jpeg_worker, [(crops, 5.0)] * threads))

    # each row is compared with the peer on the same tile size; the ceiling row with the smallest tiles' peer
    peer = {int(re.search(r"\[(\d+) px", k).group(1)): v for k, v in rows.items() if k.startswith(PEER)}
    tile_of = lambda k: int(m.group(1)) if (m := re.search(r"\[(\d+) px", k)) else min(peer, default=0)  # noqa: E731
    # no peer row for those tiles (--formats without png, say): no ratio (null in the json, an empty cell)
    ratio = {k: v / peer[tile_of(k)] if tile_of(k) in peer else None for k, v in rows.items()}
    missing = not_measured()
    report = {"threads": threads, "crop": crop, "batch": batch, "shards": list(roots) if not root else [root],
              "crops_per_s": rows, "ratio_to_peer_same_tiles": ratio, "not_measured": missing}
    note = (f"{crop} px crops, batch {batch}, JPEG q {QUALITY[0]}-{QUALITY[1]}, {threads} threads/workers each; "
            f"[tag] is the lossless tile size and shard format (the peer reads PNG files of the same tiles; the "
            f"ceiling row, libjpeg alone on centre crops of the sample photos, is compared with the smallest "
            f"tiles' peer). Ratios from this one run.")
    write_results(out_dir, name, report, "Data pipeline throughput", note,
                  ["loader", "crops/s", "x BasicSR-style peer (same tiles)"],
                  [[k, f"{v:.0f}", "" if ratio[k] is None else f"{ratio[k]:.2f}"] for k, v in rows.items()]
                  + [[k, why, ""] for k, why in missing.items()])
    return report


def add_options(parser: argparse.ArgumentParser) -> None:
    """bench data's own flags (bench all takes them too)."""
    parser.add_argument("--root", help="prepared shards instead of the sample photos")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per loader")
    parser.add_argument("--threads", type=int, default=0, help="threads/workers per loader (0: all cores)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[288, 480], help="tile sizes of the sample shards")
    parser.add_argument("--crop", type=int, default=256, help="crop size (at most the smallest tile)")
    parser.add_argument("--formats", nargs="+", choices=list(TILE_FORMATS), default=list(TILE_FORMATS),
                        help="shard formats of the sample shards (png: also the BasicSR-style peer's files)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "data", config=False)  # no model: the loaders' settings are the flags
    add_options(parser)


def run_from_args(args: argparse.Namespace, name: str = "data") -> dict:
    """run() with add_options' flags."""
    return run(Path(args.results), root=args.root, crop=args.crop, batches=args.batches, threads=args.threads or None,
               tiles=tuple(args.tiles), formats=tuple(args.formats), name=name)


def main(args: argparse.Namespace) -> int:
    run_from_args(args, args.name)
    return 0
