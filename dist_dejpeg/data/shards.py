"""Lossless sub-images in WebDataset shards: writing (atomic), the manifest, and the bundled sample set.

    dist-dejpeg prepare samples --out data/samples

Layout (shared with the DIV2K shards):
    <out>/train-000000.tar, train-000001.tar, ...   samples {"__key__": "<stem>_s<idx>", "<format>": bytes}
    <out>/train-000000.idx, ...                      DALI index files (when DALI is installed)
    <out>/train-000000.scan.json, ...                the DALI loader's check of each sample (data/verify.py)
    <out>/val-000000.tar, ...
    <out>/manifest.json                              counts, shards, tile settings, format, sources
    <out>/.prepare-staging/                          where a preparation writes until it publishes (STAGING)

Keys hold no dots (webdataset splits a key from its extension at the first dot). Tiles are extracted once
here, BasicSR-style, so a loader decodes a small tile per training crop instead of a whole photograph.
Formats (all lossless): "raw" (default: uncompressed uint8 tiles, no decode at all; the fastest for every
loader in benchmarks/results/data.md, at about 1.8x PNG's disk size), "png", "jp2" (reversible JPEG 2000).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import webdataset as wds

from dist_dejpeg.data.images import BadImage, decode_rgb8, encode_tile, halve
from dist_dejpeg.data.index import write_indexes
from dist_dejpeg.data.listing import list_shards  # noqa: F401 (where callers import it from)
from dist_dejpeg.run.lock import writing_into
from dist_dejpeg.run.pool import map_in_order
from dist_dejpeg.data.jpeg_sources import JpegFile, jpeg_treatment, warn_jpeg_sources
from dist_dejpeg.jpeg.formats import JPEG_SOURCE_ACTIONS
from dist_dejpeg.run.files import TEMP_NAME, atomic_write_bytes, fsync_dir, open_temp, temp_path

log = logging.getLogger(__name__)

SHARD_NAME = "{split}-{index:06d}.tar"
MANIFEST = "manifest.json"
# A shard's files: the tar, its DALI index (data/index.py) and its DALI scan (data/verify.py)
# prepare's own split files (SHARD_NAME's, their index and scan files); train-extra-000000.tar is another's
SPLIT_FILE = re.compile(r"^(?P<stem>(?P<split>train|val)-\d{6,})\.(tar|idx|scan\.json)$")
STAGING = ".prepare-staging"  # inside --out: prepare folder/samples write here, then publish (hidden from globs)

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


def write_shard(path: Path, samples: Iterable[tuple[str, bytes]], ext: str = "png") -> int:
    """Write (key, image bytes) pairs as one tar, atomically (temp file + rename). Returns the count."""
    tmp = temp_path(path)
    count = 0
    with open_temp(tmp) as f:  # a fixed member time: the same tiles give the same bytes (a pool's or one process's)
        with wds.TarWriter(f, mtime=0) as sink:
            for key, data in samples:
                if "." in key:
                    raise ValueError(f"sample key {key!r} contains a dot; webdataset would split it")
                sink.write({"__key__": key, ext: data})
                count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return count


def tile_positions(length: int, tile: int, step: int, flush: bool = True) -> list[int]:
    """Start offsets of ``tile``-sized windows every ``step`` px, the last one flush with the edge (BasicSR's
    extract_subimages rule); ``flush`` False: none added (validation tiles must not overlap: the strip is left)."""
    if tile < 1 or step < 1:
        raise ValueError(f"tile and step must be >= 1, got {tile} and {step}")
    if length < tile:
        return []
    pos = list(range(0, length - tile + 1, step))
    return pos + [length - tile] if flush and pos[-1] != length - tile else pos


def tiles(rgb: np.ndarray, tile: int, step: int, flush: bool = True) -> Iterator[np.ndarray]:
    h, w = rgb.shape[:2]
    for top in tile_positions(h, tile, step, flush):
        for left in tile_positions(w, tile, step, flush):
            yield rgb[top:top + tile, left:left + tile]


class ShardSink:
    """Streams (key, bytes) samples into ``<split>-NNNNNN.tar`` shards of ``shard_size`` samples, through a
    shuffle buffer of ``buffer`` samples (readers shuffle only within a small buffer, so mix here)."""

    def __init__(self, out: Path, split: str, shard_size: int, buffer: int = 0, seed: int = 0, ext: str = "png"):
        if shard_size < 1:  # a shard would never fill: one empty tar after another
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out, self.split, self.shard_size, self.ext = out, split, shard_size, ext
        self.buffer_size = max(buffer, shard_size)
        self.rng = random.Random(f"{seed}-{split}")
        self.shuffle = buffer > 0
        self.pending: list[tuple[str, bytes]] = []
        self.shards: list[str] = []
        self.samples = 0
        self.bytes: dict[str, int] = {}

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
        self.bytes[path.name] = path.stat().st_size

    def close(self) -> dict:
        """The split's manifest entry: its sample count, shard names and their sizes (by which a run tells whether
        the manifest still describes the shards beside it: train.data_checks)."""
        while self.pending:
            self._write(self.shard_size)
        return {"samples": self.samples, "shards": self.shards, "bytes": self.bytes}


class PrepareError(ValueError):
    """Settings prepare refuses, or a preparation that would write no training tile: nothing is published."""


def check_settings(tile: int, train_step: int, shard_size: int) -> None:
    """Refuse a tile, step or shard size below 1 before any work (a shard size below 1 never fills a shard)."""
    for what, value in (("tile", tile), ("train_step", train_step), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise PrepareError(f"{what} must be a whole number >= 1, got {value!r}")


def write_dataset(out: str | Path, sources: list[tuple[str, str, Callable[[], np.ndarray]]], *, dataset: str,
                  tile: int, train_step: int, shard_size: int, seed: int = 0, fmt: str = "raw",
                  jpeg: str = "halve", **more) -> dict:
    """Tile ``sources`` (tile_sources) into a staging folder inside ``out`` and publish them there (publish): a
    preparation that fails or is interrupted leaves ``out`` as it was. ``more``: tile_sources' keywords."""
    check_settings(tile, train_step, shard_size)
    with staged(out) as staging:
        manifest = tile_sources(staging, sources, dataset=dataset, tile=tile, train_step=train_step,
                                shard_size=shard_size, seed=seed, fmt=fmt, jpeg=jpeg, **more)
        require_training_tiles(manifest)
        publish(staging, out, manifest)
    return manifest


def tile_sources(staging: Path, sources: list[tuple[str, str, Callable[[], np.ndarray]]], *, dataset: str,
                 tile: int, train_step: int, shard_size: int, seed: int = 0, fmt: str = "raw", jpeg: str = "halve",
                 paths: dict[str, str] | None = None, rejected: list[dict] | None = None, workers: int = 1) -> dict:
    """Tile each source (name, split, load) into lossless tiles of ``fmt``, write the train/val shards (and DALI
    index files) into ``staging`` (emptied first) and return the manifest. Sources that do not load (BadImage: they
    do not decode, or are too large), are smaller than a tile or repeat an earlier source's pixels are listed under
    "rejected" (after ``rejected``, those found before); JPEG sources (data.jpeg_sources: their pixels show a JPEG's
    quantization, or their file is a JPEG) under "jpeg_sources" with the quality found (those only their file told of
    under "jpeg_files" too), used as ``jpeg`` (one of JPEG_SOURCE_ACTIONS) says. ``paths``: each name's file, recorded
    beside it. ``workers`` > 1: that many processes decode and tile the sources (decode_and_tile); this one writes
    the shards."""
    if jpeg not in JPEG_SOURCE_ACTIONS:
        raise ValueError(f"jpeg must be one of {', '.join(JPEG_SOURCE_ACTIONS)}, got {jpeg!r}")
    keys = [sample_key(name) for name, _, _ in sources]
    if len(set(keys)) != len(keys):
        raise ValueError(f"sources share a sample key: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    paths = paths or {}

    def where(name: str) -> dict:
        return {"path": paths[name]} if name in paths else {}

    for old in staging.iterdir():  # an earlier tiling of these sources (prepare folder splits again)
        old.unlink()
    sinks = {"train": ShardSink(staging, "train", shard_size, buffer=shard_size * 16, seed=seed, ext=fmt),
             "val": ShardSink(staging, "val", shard_size, ext=fmt)}
    manifest_sources, rejected, jpeg_sources, jpeg_files, pixels = {}, list(rejected or []), {}, {}, {}
    cut = partial(decode_and_tile, tile=tile, train_step=train_step, fmt=fmt, jpeg=jpeg)
    with contextlib.closing(map_in_order(cut, sources, workers, names=lambda source: source[0])) as done:
        for (name, split, _), key, source in zip(sources, keys, done):  # in the sources' order: the same shards
            jpeg_sources |= {name: source["found"]} if source.get("found") is not None else {}
            jpeg_files |= {name: source["jpeg_file"]} if "jpeg_file" in source else {}
            if source.get("sha256") in pixels:  # another file of the same pixels (a lossless copy in another format)
                source["rejected"] = f"duplicate of {pixels[source['sha256']]} (the same pixels)"
            if "rejected" in source:
                rejected.append({"source": name, **where(name), "reason": source["rejected"]})
                continue
            pixels[source["sha256"]] = paths.get(name, name)
            manifest_sources[name] = {"split": split, **where(name)} | {
                field: source[field] for field in ("height", "width", "sha256", "halved") if field in source}
            raw = source.get("rgb")  # raw tiles are cut here: decode_and_tile says why
            encoded = source["tiles"] if raw is None else (encode_tile(t, fmt) for t in tiles(raw, tile, source["step"],
                                                                                               split == "train"))
            count = 0
            for count, data in enumerate(encoded, 1):
                sinks[split].add(f"{key}_s{count - 1:03d}", data)
            manifest_sources[name]["tiles"] = count
    splits = {split: sink.close() for split, sink in sinks.items()}
    write_indexes([staging / name for info in splits.values() for name in info["shards"]])
    return {"dataset": dataset, "format": fmt, "tile": tile, "train_step": train_step, "val_step": tile,
            "shard_size": shard_size, "splits": splits, "sources": manifest_sources, "rejected": rejected,
            "jpeg_sources": jpeg_sources, "jpeg_files": jpeg_files, "jpeg_action": jpeg}


def decode_and_tile(source: tuple[str, str, Callable[[], np.ndarray]], *, tile: int, train_step: int, fmt: str,
                    jpeg: str) -> dict:
    """One source (name, split, load) decoded, checked and cut into tiles: a tiling process's work (map_in_order).
    ``load`` gives its pixels, or a JpegFile (a JPEG file's pixels with the quality of its tables)."""
    _, split, load = source
    try:
        rgb = load()
    except BadImage as err:
        return {"rejected": f"{err.kind}: {err}"}
    rgb, file = (rgb.rgb, (rgb.quality, rgb.kind)) if isinstance(rgb, JpegFile) else (rgb, None)
    if "rejected" in (done := jpeg_treatment(rgb, file, jpeg)):
        return done
    for _ in range(done.get("halved", 0)):
        rgb = halve(rgb)
    if min(rgb.shape[:2]) < tile:
        halved = " after halving its JPEG grid away" if "halved" in done else ""
        return done | {"rejected": f"smaller than the {tile} px tile{halved} ({rgb.shape[1]}x{rgb.shape[0]})"}
    done |= {"height": rgb.shape[0], "width": rgb.shape[1], "sha256": hashlib.sha256(rgb.tobytes()).hexdigest(),
             "step": train_step if split == "train" else tile}
    if fmt == "raw":  # raw tiles are slices of the photo: sent once, it costs a quarter of its overlapping tiles
        return done | {"rgb": rgb}  # (0.05 vs 0.22 s a 12 MP photo, --step 128, between processes on a 2-core VM)
    return done | {"tiles": [encode_tile(np.ascontiguousarray(t), fmt) for t in tiles(rgb, tile, done["step"],
                                                                                       split == "train")]}


def require_training_tiles(manifest: dict) -> None:
    """A PrepareError saying why when ``manifest`` counts no training tile (every image too small, or rejected)."""
    if manifest["splits"]["train"]["samples"]:
        return
    tile, rejected, usable = manifest["tile"], manifest["rejected"], len(manifest["sources"])
    kinds: dict[str, int] = {}
    for item in rejected:
        reason = item["reason"]
        kind = (f"smaller than the {tile} px tile" if reason.startswith("smaller than") else "duplicates"
                if reason.startswith("duplicate of") else re.split(r"[:(]", reason)[0].strip())
        kinds[kind] = kinds.get(kind, 0) + 1
    why = f"{len(rejected)} of {len(rejected) + usable} images rejected" + (
        f" ({', '.join(f'{n} {k}' for k, n in kinds.items())})" if kinds else "")
    if usable:
        why += f", the {usable} usable one(s) all held out for validation"
    hint = f"; lower --tile (now {tile} px) or add larger photos" if any(k.startswith("smaller") for k in kinds) else ""
    hint += "; raise --max-pixels for photos that large" if "too large" in kinds else ""
    shown = "; ".join(f"{item['source']}: {item['reason']}" for item in rejected[:3])  # (a run that fails lists
    examples = f" (e.g. {shown}{'; ...' if len(rejected) > 3 else ''})" if shown else ""  # no rejected line)
    raise PrepareError(f"no training tile was written: {why}{hint}{examples}")


@contextlib.contextmanager
def staged(out: str | Path) -> Iterator[Path]:
    """A fresh staging folder inside ``out`` (an interrupted run's is replaced) for a preparation to write into and
    publish from, one process at a time (run.lock.writing_into); when the block fails, it is removed again, with
    ``out`` and its parents where they were made."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file, not a folder")
    with writing_into(out):  # (one writer at a time; what it made is removed on a failure)
        staging = out / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def publish(staging: Path, out: str | Path, manifest: dict) -> None:
    """Replace ``out``'s shards with those in ``staging``: the old manifest goes first and the new one comes last, so
    no manifest ever describes other shards; then the staging folder and stale temp files go."""
    out = Path(out)
    (out / MANIFEST).unlink(missing_ok=True)
    for split in ("train", "val"):
        remove_shards(out, split)
    for path in sorted(staging.iterdir()):
        os.replace(path, out / path.name)
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    fsync_dir(out)
    staging.rmdir()
    remove_stale_temps(out)
    warn_jpeg_sources(manifest)  # once, here: prepare folder may tile its sources twice


def remove_stale_temps(out: Path) -> None:
    """Remove the temp files of shards, index files and manifests an interrupted writer left in ``out``."""
    for path in out.glob(".*.tmp*"):
        match = TEMP_NAME.match(path.name)
        if match and (match["name"] == MANIFEST or SPLIT_FILE.match(match["name"])) and path.is_file():
            path.unlink(missing_ok=True)


def finish_split_files(out: Path, splits: dict) -> None:
    """Remove shards (and index files) an earlier prepare with other settings left behind, and write DALI
    index files for the current shards when DALI is installed."""
    for split, info in splits.items():
        remove_shards(out, split, keep=set(info["shards"]))
        write_indexes([out / name for name in info["shards"]])


def remove_shards(out: Path, split: str, keep: set[str] = frozenset()) -> None:
    """Delete ``<split>-*.tar`` shards in ``out`` whose names are not in ``keep``, with their index and scan files
    (and those files where their shard is gone already)."""
    for path in out.glob(f"{split}-*"):
        match = SPLIT_FILE.match(path.name)
        if match and match["split"] == split and f"{match['stem']}.tar" not in keep:
            path.unlink(missing_ok=True)


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


def read_manifest(root: str | Path) -> dict | None:
    """The manifest of a shard folder (format, tile size, counts), or None for shards made elsewhere."""
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
