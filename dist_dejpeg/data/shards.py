"""Lossless sub-images in WebDataset shards: writing (atomic), the manifest, and the bundled sample set.

    dist-dejpeg prepare samples --out data/samples

Layout (shared with the DIV2K shards):
    <out>/train-000000.tar, train-000001.tar, ...   samples {"__key__": "<stem>_s<idx>", "<format>": bytes}
    <out>/train-000000.idx, ...                      DALI index files (when DALI is installed)
    <out>/train-000000.scan.json, ...                the DALI loader's check of each sample (data/verify.py)
    <out>/val-000000.tar, ...
    <out>/manifest.json                              counts, shards, tile settings, format, sources

Keys hold no dots (webdataset splits a key from its extension at the first dot). Tiles are extracted once
here, BasicSR-style, so a loader decodes a small tile per training crop instead of a whole photograph.
Formats (all lossless): "raw" (default: uncompressed uint8 tiles, no decode at all; the fastest for every
loader in benchmarks/results/data.md, at about 1.8x PNG's disk size), "png", "jp2" (reversible JPEG 2000).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import re
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import webdataset as wds

from dist_dejpeg.data.images import BadImage, decode_rgb8, encode_tile, halve
from dist_dejpeg.data.index import write_indexes
from dist_dejpeg.data.verify import scan_path
from dist_dejpeg.jpeg.formats import IMAGE_SUFFIXES, JPEG_SOURCE_ACTIONS
from dist_dejpeg.jpeg.quality import estimate_from_pixels
from dist_dejpeg.run.files import atomic_write_bytes, temp_path

log = logging.getLogger(__name__)

SHARD_NAME = "{split}-{index:06d}.tar"
MANIFEST = "manifest.json"

# Real photographs inside scikit-image's wheel (lossless PNG only: a JPEG source would carry artefacts
# into the "clean" target). Validation photographs are never used for training. Every lossless colour photo
# the wheel ships is here: astronaut, both views of the motorcycle stereo pair (one scene: both train) and
# the stained slide (ihc) train; the cat (chelsea) and the coffee cup, whose warm browns and reds no training
# photo has, validate. Left out: color.png (a synthetic colour wheel), logo and horse (graphics), the
# chessboards and phantom (synthetic); rocket/retina/hubble are JPEGs.
# Three PNGs of the wheel were JPEGs once: their 8x8 DCT coefficients cluster at libjpeg's steps of q74 (ihc), q85
# (coins) and q89 (page) (jpeg.quality.estimate_from_pixels). As targets they teach JPEG artefacts, and as references
# they make high qualities unmeasurable: a q92 JPEG of coins is 50 dB from it (its q85 grid again), so any
# correction measures as harm (RESULTS.md, "The samples' three JPEGs"). ihc and coins are used halved (2x2 area mean,
# which erases the old block grid: the estimate then finds no compression); page, halved, is smaller than a tile.
HALVED = "_halved"  # a source name ending so is that photo halved (sample_photo)
SAMPLE_TRAIN = ("astronaut", "motorcycle_left", "motorcycle_right", "ihc" + HALVED, "camera", "brick", "grass",
                "gravel", "moon")
SAMPLE_VAL = ("chelsea", "coffee", "coins" + HALVED)
SAMPLE_DATASET = "samples (scikit-image bundled photographs)"
# What prepare does with a source whose pixels show a JPEG's 8x8 quantization (a JPEG file, or a PNG saved from one):
# "halve" (the default) uses it at half size, whose 2x2 area mean erases the grid, and at a quarter below q30
# (benchmarks/experiments/halved_jpeg.py: a halved JPEG is as close to the halved original as a JPEG of it at q86
# from q30, q93 from q50; from q10 and q20 halving once leaves q35 / q77, twice q83 / q96); "keep" uses it as it is
# (its artefacts become clean targets); "skip" rejects it.
HALVE_TWICE_BELOW = 30


def write_shard(path: Path, samples: Iterable[tuple[str, bytes]], ext: str = "png") -> int:
    """Write (key, image bytes) pairs as one tar, atomically (temp file + rename). Returns the count."""
    tmp = temp_path(path)
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


class ShardSink:
    """Streams (key, bytes) samples into ``<split>-NNNNNN.tar`` shards of ``shard_size`` samples, through a
    shuffle buffer of ``buffer`` samples (readers shuffle only within a small buffer, so mix here)."""

    def __init__(self, out: Path, split: str, shard_size: int, buffer: int = 0, seed: int = 0, ext: str = "png"):
        self.out, self.split, self.shard_size, self.ext = out, split, shard_size, ext
        self.buffer_size = max(buffer, shard_size)
        self.rng = random.Random(f"{seed}-{split}")
        self.shuffle = buffer > 0
        self.pending: list[tuple[str, bytes]] = []
        self.shards: list[str] = []
        self.samples = 0

    def add(self, key: str, data: bytes) -> None:
        self.pending.append((key, data))
        if len(self.pending) >= self.buffer_size:
            self._write(self.shard_size)

    def _write(self, count: int) -> None:
        if self.shuffle:
            self.rng.shuffle(self.pending)
        chunk, self.pending = self.pending[:count], self.pending[count:]
        path = self.out / SHARD_NAME.format(split=self.split, index=len(self.shards))
        self.samples += write_shard(path, chunk, self.ext)
        self.shards.append(path.name)

    def close(self) -> dict:
        while self.pending:
            self._write(self.shard_size)
        return {"samples": self.samples, "shards": self.shards}


def write_dataset(out: str | Path, sources: list[tuple[str, str, Callable[[], np.ndarray]]], *, dataset: str,
                  tile: int, train_step: int, shard_size: int, seed: int = 0, fmt: str = "raw",
                  jpeg: str = "halve") -> dict:
    """Tile each source (name, split, load) into lossless tiles of ``fmt`` and write the train/val shards
    and the manifest. Sources that do not decode, or are smaller than a tile, are listed under "rejected"; sources
    whose pixels show a JPEG's quantization (jpeg.quality.estimate_from_pixels: a JPEG file, or a PNG saved from
    one) under "jpeg_sources" with the quality found, and used as ``jpeg`` (one of JPEG_SOURCE_ACTIONS) says."""
    if jpeg not in JPEG_SOURCE_ACTIONS:
        raise ValueError(f"jpeg must be one of {', '.join(JPEG_SOURCE_ACTIONS)}, got {jpeg!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sinks = {"train": ShardSink(out, "train", shard_size, buffer=shard_size * 16, seed=seed, ext=fmt),
             "val": ShardSink(out, "val", shard_size, ext=fmt)}
    manifest_sources, rejected, jpeg_sources = {}, [], {}
    for name, split, load in sources:
        try:
            rgb = load()
        except BadImage as err:
            rejected.append({"source": name, "reason": f"undecodable: {err}"})
            continue
        if (found := estimate_from_pixels(rgb).quality) is not None:  # ~0.05 s: a 1024 px window at most
            jpeg_sources[name] = found
            if jpeg == "skip":
                rejected.append({"source": name, "reason": f"JPEG compression in its pixels (q{found}): "
                                                           f"--jpeg-sources halve or keep would use it"})
                continue
            times = (2 if found < HALVE_TWICE_BELOW else 1) if jpeg == "halve" else 0
            for _ in range(times):
                rgb = halve(rgb)
        halved = " after halving its JPEG grid away" if found is not None and jpeg == "halve" else ""
        if min(rgb.shape[:2]) < tile:
            rejected.append({"source": name, "reason": f"smaller than the {tile} px tile{halved} "
                                                       f"({rgb.shape[1]}x{rgb.shape[0]})"})
            continue
        manifest_sources[name] = {"split": split, "height": rgb.shape[0], "width": rgb.shape[1],
                                  "sha256": hashlib.sha256(rgb.tobytes()).hexdigest()} | (
                                      {"halved": times} if halved else {})
        step = train_step if split == "train" else tile
        for i, t in enumerate(tiles(rgb, tile, step)):
            sinks[split].add(f"{sample_key(name)}_s{i:03d}", encode_tile(np.ascontiguousarray(t), fmt))
    splits = {split: sink.close() for split, sink in sinks.items()}
    finish_split_files(out, splits)
    manifest = {"dataset": dataset, "format": fmt, "tile": tile, "train_step": train_step, "val_step": tile,
                "shard_size": shard_size, "splits": splits, "sources": manifest_sources, "rejected": rejected,
                "jpeg_sources": jpeg_sources, "jpeg_action": jpeg}
    if jpeg_sources:
        shown = ", ".join(f"{n} (q{q})" for n, q in list(jpeg_sources.items())[:5]) + (
            ", ..." if len(jpeg_sources) > 5 else "")
        log.warning("%d of %d photos carry JPEG compression in their pixels: %s; %s (--jpeg-sources %s; the others: "
                    "%s). Lossless originals are better (manifest.json: jpeg_sources)", len(jpeg_sources),
                    len(sources), shown, JPEG_SOURCE_ACTIONS[jpeg], jpeg,
                    " or ".join(a for a in JPEG_SOURCE_ACTIONS if a != jpeg))
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    log.info("wrote %d train / %d val tiles to %s (%d sources rejected)", splits["train"]["samples"],
             splits["val"]["samples"], out, len(rejected))
    return manifest


def finish_split_files(out: Path, splits: dict) -> None:
    """Remove shards (and index files) an earlier prepare with other settings left behind, and write DALI
    index files for the current shards when DALI is installed."""
    for split, info in splits.items():
        remove_shards(out, split, keep=set(info["shards"]))
        write_indexes([out / name for name in info["shards"]])


def remove_shards(out: Path, split: str, keep: set[str] = frozenset()) -> None:
    """Delete ``<split>-*.tar`` shards (with their index files) in ``out`` whose names are not in ``keep``."""
    for shard in out.glob(f"{split}-*.tar"):
        if shard.name not in keep:
            shard.unlink()
            shard.with_suffix(".idx").unlink(missing_ok=True)
            scan_path(shard).unlink(missing_ok=True)


def sample_key(name: str) -> str:
    """A webdataset-safe key stem: no dots (they separate key and extension), no path separators."""
    return re.sub(r"[^A-Za-z0-9-]+", "", Path(name).stem) or "img"


def sample_photo(name: str) -> np.ndarray:
    """A PNG from scikit-image's data folder, read from the installed wheel (never fetched); ``name`` + HALVED: that
    photo halved by a 2x2 area mean (rounded to uint8)."""
    import skimage.data

    if name.endswith(HALVED):
        return halve(sample_photo(name[: -len(HALVED)]))
    path = Path(skimage.data.__file__).parent / f"{name}.png"
    return decode_rgb8(path.read_bytes())


def prepare_samples(out: str | Path, tile: int = 128, train_step: int = 64, shard_size: int = 64,
                    seed: int = 0, fmt: str = "raw") -> dict:
    """Write train/val shards of lossless tiles of scikit-image's bundled photographs (no download)."""
    sources = [(name, split, partial(sample_photo, name))
               for split, names in (("train", SAMPLE_TRAIN), ("val", SAMPLE_VAL)) for name in names]
    return write_dataset(out, sources, dataset=SAMPLE_DATASET, tile=tile,
                         train_step=train_step, shard_size=shard_size, seed=seed, fmt=fmt)


def samples_stale(root: str | Path) -> bool:
    """True when ``root`` holds sample shards written from another photo list than this version's."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("dataset") != SAMPLE_DATASET:
        return False
    have = set(manifest.get("sources", {})) | {r.get("source") for r in manifest.get("rejected", [])}
    return have != set(SAMPLE_TRAIN) | set(SAMPLE_VAL)




def prepare_folder(src: str | Path, out: str | Path, tile: int = 256, train_step: int = 128, shard_size: int = 256,
                   val_fraction: float = 0.1, seed: int = 0, fmt: str = "raw", jpeg: str = "halve") -> dict:
    """Shards from a folder of your own images (searched recursively). Validation images are whole
    photographs held out before tiling (never tiles of a training photograph). Prefer lossless sources: a JPEG
    source would put its own artefacts into the "clean" target; ``jpeg`` (JPEG_SOURCE_ACTIONS) says what is done with
    those whose pixels show it (by default they are used halved)."""
    src = Path(src)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {src}")
    order = list(files)
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1) if len(order) > 1 and val_fraction > 0 else 0
    val = set(order[:n_val])
    used: dict[str, int] = {}
    sources = []
    for path in order:
        stem = sample_key(path.name)
        used[stem] = used.get(stem, 0) + 1
        name = stem if used[stem] == 1 else f"{stem}-{used[stem]}"
        sources.append((name, "val" if path in val else "train", partial(lambda p: decode_rgb8(p.read_bytes()), path)))
    write = partial(write_dataset, out, dataset=f"folder {src}", tile=tile, train_step=train_step,
                    shard_size=shard_size, seed=seed, fmt=fmt, jpeg=jpeg)
    manifest = write(sources)
    usable = list(manifest["sources"])  # accepted photos, in the shuffled order
    splits = manifest["splits"]
    if n_val and usable and (splits["val"]["samples"] == 0 or splits["train"]["samples"] == 0):
        # rejected photos (too small, undecodable) emptied a split: split the usable ones again, holding out
        # one or more whenever there are two; a single usable photo trains (prepare then says: no validation)
        chosen = set(usable[:min(n_val, len(usable) - 1)])
        log.warning("prepare folder: rejected photos left the %s split empty; validation photos now: %s",
                    "val" if splits["val"]["samples"] == 0 else "train", ", ".join(sorted(chosen)) or "none")
        manifest = write([(name, "val" if name in chosen else "train", load) for name, _, load in sources])
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
    """The manifest of a shard folder (format, tile size, counts), or None for shards made elsewhere."""
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def shard_keys(path: str) -> list[str]:
    """Sample keys of one shard, in order (for tests and tooling)."""
    keys = []
    for sample in wds.tariterators.tarfile_samples([{"url": path}]):
        keys.append(sample["__key__"])
    return keys
