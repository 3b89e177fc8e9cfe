"""Lossless sub-images in WebDataset shards: writing (atomic), the manifest, and the bundled sample set.

    dist-dejpeg prepare samples --out data/samples

Layout (shared with the DIV2K shards):
    <out>/train-000000.tar, train-000001.tar, ...   samples {"__key__": "<stem>_s<idx>", "png": bytes}
    <out>/val-000000.tar, ...
    <out>/manifest.json                              counts, shards, tile settings, format, sources

Keys hold no dots (webdataset splits a key from its extension at the first dot). Tiles are extracted once
here, BasicSR-style, so a loader decodes a small tile per training crop instead of a whole photograph.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from dist_dejpeg.data.images import decode_rgb8, encode_png

log = logging.getLogger(__name__)

SHARD_NAME = "{split}-{index:06d}.tar"
MANIFEST = "manifest.json"

# Real photographs inside scikit-image's wheel (lossless PNG only: a JPEG source would carry artefacts
# into the "clean" target). Validation photographs are never used for training.
SAMPLE_TRAIN = ("astronaut", "motorcycle_left", "ihc", "camera", "brick", "grass", "gravel", "moon", "page")
SAMPLE_VAL = ("chelsea", "coffee", "coins")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path: Path, samples: Iterable[tuple[str, bytes]], ext: str = "png") -> int:
    """Write (key, image bytes) pairs as one tar, atomically (temp file + rename). Returns the count."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    count = 0
    with open(tmp, "wb") as f:
        with wds.TarWriter(f) as sink:
            for key, data in samples:
                if "." in key:
                    raise ValueError(f"sample key {key!r} contains a dot; webdataset would split it")
                sink.write({"__key__": key, ext: data})
                count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return count


def tile_positions(length: int, tile: int, step: int) -> list[int]:
    """Start offsets covering ``length`` with ``tile``-sized windows every ``step`` px, last one flush
    with the edge (BasicSR's extract_subimages rule)."""
    if length < tile:
        return []
    pos = list(range(0, length - tile + 1, step))
    if pos[-1] != length - tile:
        pos.append(length - tile)
    return pos


def tiles(rgb: np.ndarray, tile: int, step: int) -> Iterator[np.ndarray]:
    h, w = rgb.shape[:2]
    for top in tile_positions(h, tile, step):
        for left in tile_positions(w, tile, step):
            yield rgb[top:top + tile, left:left + tile]


@dataclass
class SplitResult:
    shards: list[str] = field(default_factory=list)
    samples: int = 0


def write_split(out: Path, split: str, items: list[tuple[str, bytes]], shard_size: int) -> SplitResult:
    result = SplitResult()
    for index, start in enumerate(range(0, len(items), shard_size)):
        path = out / SHARD_NAME.format(split=split, index=index)
        result.samples += write_shard(path, items[start:start + shard_size])
        result.shards.append(path.name)
    return result


def _sample_photo(name: str) -> np.ndarray:
    """A PNG from scikit-image's data folder, read from the installed wheel (never fetched)."""
    import skimage.data

    path = Path(skimage.data.__file__).parent / f"{name}.png"
    return decode_rgb8(path.read_bytes())


def prepare_samples(out: str | Path, tile: int = 128, train_step: int = 64, shard_size: int = 64,
                    seed: int = 0) -> dict:
    """Write train/val shards of lossless tiles of scikit-image's bundled photographs (no download)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources, train, val = {}, [], []
    for split, names, step in (("train", SAMPLE_TRAIN, train_step), ("val", SAMPLE_VAL, tile)):
        for name in names:
            rgb = _sample_photo(name)
            sources[name] = {"split": split, "height": rgb.shape[0], "width": rgb.shape[1],
                             "sha256": hashlib.sha256(rgb.tobytes()).hexdigest()}
            stem = name.replace("_", "")
            for i, t in enumerate(tiles(rgb, tile, step)):
                (train if split == "train" else val).append((f"{stem}_s{i:03d}", encode_png(np.ascontiguousarray(t))))
    # Shuffle at prepare time: readers shuffle only within a buffer.
    random.Random(seed).shuffle(train)
    results = {"train": write_split(out, "train", train, shard_size),
               "val": write_split(out, "val", val, shard_size)}
    manifest = {
        "dataset": "samples (scikit-image bundled photographs)",
        "format": "png",
        "tile": tile,
        "train_step": train_step,
        "val_step": tile,
        "shard_size": shard_size,
        "splits": {k: {"samples": r.samples, "shards": r.shards} for k, r in results.items()},
        "sources": sources,
        "rejected": [],
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    log.info("wrote %d train / %d val tiles to %s", results["train"].samples, results["val"].samples, out)
    return manifest


def list_shards(root: str | Path, pattern: str) -> list[str]:
    """Shard files matching ``pattern`` (a glob, relative to ``root`` unless absolute), sorted.
    Matching nothing is an error that names the pattern."""
    full = pattern if os.path.isabs(pattern) else os.path.join(str(root), pattern)
    found = sorted(p for p in glob.glob(full) if os.path.isfile(p))
    if not found:
        raise FileNotFoundError(f"no shards match '{full}' (set data.root / data.train_glob / data.val_glob, "
                                f"or write shards with `dist-dejpeg prepare`)")
    return found


def read_manifest(root: str | Path) -> dict | None:
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def shard_keys(path: str) -> list[str]:
    """Sample keys of one shard, in order (for tests and tooling)."""
    keys = []
    for sample in wds.tariterators.tarfile_samples([{"url": path}]):
        keys.append(sample["__key__"])
    return keys
