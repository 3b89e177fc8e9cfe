"""Data-pipeline throughput: degraded/clean crops per second, every loader on the same shards and cores.

    pip install -e '.[test,bench]'
    python benchmarks/bench_data.py                       # bundled sample photos, tiled for 256 px crops
    python benchmarks/bench_data.py --root data/div2k     # prepared DIV2K shards

Rows (256 px crops, batch 32, random JPEG quality 10-50, the same number of threads/workers each):
- torch loader: dist_dejpeg's webdataset + PIL DataLoader path
- BasicSR-style peer: a folder of PNG sub-images, cv2 read + random crop + cv2 JPEG round trip + float
  conversion (BasicSR's img2tensor) in DataLoader workers (how BasicSR-derived trainers feed JPEG restoration)
Every row delivers float32 batches in [0, 1] (the batch contract), so each pays for the conversion.
- DALI CPU: dist_dejpeg's DALI pipeline with device_id=None
- DALI GPU: the same pipeline on a CUDA device (mixed decode, GPU crop and distortion), when present
- torch loader + nvJPEG: workers read and crop, the batch is JPEG-degraded on the GPU (no DALI), when present
- libjpeg ceiling: encode + decode of in-memory 256 px crops alone, in as many processes (the most any
  CPU pipeline can reach when the ground truth costs nothing to decode)
Results: benchmarks/results/data.json and data.md (with the machine's name). Ratios are computed from
rows measured in this one run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from common import machine_name, write_results
from dist_dejpeg.data.shards import list_shards, prepare_samples, read_manifest
from dist_dejpeg.data.torch_loader import ShardStream, TorchLoader

RESULTS = Path(__file__).parent / "results"
PEER = "BasicSR-style peer (cv2 in workers) [png files]"
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
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        batch = next(it)
    _ = batch["jpeg"].sum().item()  # the last batch is really there (and on the device)
    if device.type == "cuda":
        torch.cuda.synchronize()
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


def extract_pngs(shards: list[str], folder: Path) -> list[str]:
    files = []
    for sample in wds.tariterators.tarfile_samples([{"url": s} for s in shards]):
        if sample and "png" in sample:
            path = folder / f"{sample['__key__']}.png"
            path.write_bytes(sample["png"])
            files.append(str(path))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="prepared shards (default: sample photos tiled at 288 px into a temp dir)")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=["png", "raw", "jp2"], help="shard formats to compare")
    parser.add_argument("--out", default=str(RESULTS / "data"))
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    cpu, t = torch.device("cpu"), args.threads
    roots = {}
    if args.root:
        roots[read_manifest(args.root)["format"]] = Path(args.root)
    else:
        for fmt in args.formats:
            roots[fmt] = tmp / fmt
            prepare_samples(roots[fmt], tile=args.crop + 32, train_step=64, shard_size=32, fmt=fmt)
    try:
        from dist_dejpeg.data.dali import HAVE_DALI, DaliLoader
    except ImportError:
        HAVE_DALI = False
    rows = {}
    for fmt, root in roots.items():
        shards = list_shards(root, "train-*.tar")
        stream = ShardStream(shards, args.crop, QUALITY, num_workers=t, shuffle_buffer=64)
        rows[f"torch loader (webdataset + PIL) [{fmt}]"] = rate(TorchLoader(stream, args.batch, t, cpu), args.batch,
                                                               args.batches, args.warmup, cpu)
        if torch.cuda.is_available():
            from dist_dejpeg.data.gpu_jpeg import jpeg_roundtrip_cuda

            gpu = torch.device("cuda", 0)
            stream = ShardStream(shards, args.crop, QUALITY, num_workers=t, shuffle_buffer=64)
            rows[f"torch loader + nvJPEG on GPU [{fmt}]"] = rate(
                TorchLoader(stream, args.batch, t, gpu, degrade_batch=jpeg_roundtrip_cuda), args.batch, args.batches,
                args.warmup, gpu)
        if fmt == "png":
            folder = tmp / "pngs"
            folder.mkdir(exist_ok=True)
            peer = DataLoader(BasicSRStyle(extract_pngs(shards, folder), args.crop), batch_size=args.batch,
                              shuffle=True, num_workers=t, drop_last=True, persistent_workers=True)
            rows[PEER] = rate(forever(peer), args.batch, args.batches, args.warmup, cpu)
        if HAVE_DALI:
            dali = dict(num_threads=t)
            rows[f"DALI CPU [{fmt}]"] = rate(DaliLoader(shards, args.crop, QUALITY, args.batch, **dali), args.batch,
                                            args.batches, args.warmup, cpu)
            if torch.cuda.is_available():
                gpu = torch.device("cuda", 0)
                rows[f"DALI GPU [{fmt}]"] = rate(DaliLoader(shards, args.crop, QUALITY, args.batch, device=gpu, **dali),
                                                args.batch, args.batches * 5, args.warmup, gpu)
    crops = [np.random.default_rng(i).integers(0, 256, (args.crop, args.crop, 3), dtype=np.uint8) for i in range(4)]
    with mp.get_context("spawn").Pool(t) as pool:
        rows["libjpeg encode+decode only (ceiling)"] = sum(pool.map(_jpeg_worker, [(crops, 5.0)] * t))

    peer_rate = rows.get(PEER, float("nan"))
    report = {"machine": machine_name(), "threads": t, "crop": args.crop, "batch": args.batch,
              "formats": list(roots), "shards": {k: str(v) for k, v in roots.items()},
              "crops_per_s": rows, "ratio_to_peer": {k: v / peer_rate for k, v in rows.items()}}
    note = (f"{args.crop} px crops, batch {args.batch}, JPEG q {QUALITY[0]}-{QUALITY[1]}, {t} threads/workers each; "
            f"[format] is the shard format of lossless {args.crop + 32} px tiles (the peer reads PNG files). "
            f"Ratios from this one run.")
    write_results(args.out, report, "Data pipeline throughput", note, ["loader", "crops/s", "x BasicSR-style peer"],
                  [[k, f"{v:.0f}", f"{v / peer_rate:.2f}"] for k, v in rows.items()])


if __name__ == "__main__":
    main()
