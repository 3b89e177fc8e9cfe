"""DIV2K high-resolution images -> lossless sub-image shards (train and val), idempotent and resumable.

    dist-dejpeg prepare div2k --root data/div2k_src --out data/div2k [--download] [--workers 8]

Inputs per split: ``<root>/DIV2K_train_HR.zip`` / ``DIV2K_valid_HR.zip`` (the official archives) or their
extracted folders ``<root>/DIV2K_train_HR/*.png``. ``--download`` fetches missing archives from the
official address (resumable, checksum-verified).

Two stages, each restartable:
1. *tiles*: a process pool decodes every source image once, cuts fixed-size tiles (default 480 px every
   240 px, as BasicSR's extract_subimages) and writes them, losslessly, into one staging tar per image plus
   a small JSON that marks it finished. A rerun skips finished images; an undecodable or too-small source
   is recorded as rejected.
2. *shards*: the tile list is shuffled with a fixed seed (readers shuffle only within a buffer) and packed
   into ``train-NNNNNN.tar`` / ``val-NNNNNN.tar`` (temp file + rename). A rerun with the same plan skips
   shards that exist. ``manifest.json`` is written last; the staging folder is removed after it unless
   ``keep_staging``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from dist_dejpeg.data.download import DownloadError, download, sha256_file
from dist_dejpeg.data.folder import unique_names
from dist_dejpeg.data.images import BadImage, TooManyPixels, decode_rgb8, encode_tile
from dist_dejpeg.run.pool import MAX_DEFAULT_WORKERS, map_in_order, pool_size
from dist_dejpeg.data.shards import (MANIFEST, SHARD_NAME, PrepareError, check_settings, finish_split_files, remove_shards,
                                     remove_stale_temps, require_training_tiles, sample_key, tiles, write_shard)
from dist_dejpeg.jpeg.formats import DEFAULT_MAX_PIXELS, checked_size, too_big
from dist_dejpeg.run.files import atomic_write_bytes
from dist_dejpeg.run.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    url: str
    sha256: str | None
    size: int | None


# Sizes and SHA-256 as recorded by TensorFlow Datasets (url_checksums/div2k.txt).
OFFICIAL = {
    "train": RemoteFile("https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip",
                        "9d0b9c463f6e35b6c62cc6a930ee2224f670b34c1df841a57670f9acf0f6c335", 3530603713),
    "val": RemoteFile("https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_valid_HR.zip",
                      "20dd31fd84d777bc1cf5d6b7654a3f569c0aec74458ae094122ad1d0489900fc", 448993893),
}
ARCHIVE = {"train": "DIV2K_train_HR", "val": "DIV2K_valid_HR"}


@dataclass(frozen=True)
class Source:
    """One source image: a file, or a member of a zip archive."""

    name: str  # sample-key stem, e.g. "0001"
    split: str
    path: str  # file path, or the zip's path
    member: str = ""  # zip member name ("" for a plain file)

    def read(self) -> bytes:
        """The file's bytes; TooManyPixels, unread, where the file or member is over file_limit() (--root's archives
        are not checked against the official checksums: a zip bomb of a few MB may hold GBs)."""
        if not self.member:
            if why := checked_size(self.path):
                raise TooManyPixels(why)
            return Path(self.path).read_bytes()
        with zipfile.ZipFile(self.path) as archive:
            info = archive.getinfo(self.member)  # (a member yields no more than it says)
            if why := too_big(info.file_size, on_disk=info.compress_size):
                raise TooManyPixels(why)
            return archive.read(self.member)


def find_sources(root: Path, split: str) -> tuple[list[Source], dict]:
    """Sources of one split from the archive or its extracted folder; also the archive's identity."""
    base = ARCHIVE[split]
    zip_path, folder = root / f"{base}.zip", root / base
    if folder.is_dir():  # names unique (folder.unique_names): two files of one name in sub-folders keep both
        files = sorted(p for p in folder.rglob("*.png") if p.is_file())  # (regular files: a FIFO or /dev/zero hangs)
        names = unique_names([sample_key(p.name) for p in files])
        return ([Source(n, split, str(p)) for n, p in zip(names, files)],
                {"folder": str(folder), "files": len(files)})
    if zip_path.is_file():
        try:
            with zipfile.ZipFile(zip_path) as archive:
                members = sorted(n for n in archive.namelist() if n.lower().endswith(".png") and not n.endswith("/"))
        except zipfile.BadZipFile:  # a copy or download cut short: its table of contents (at the end) is missing
            raise PrepareError(f"DIV2K {split}: {zip_path} is not a whole zip archive ({zip_path.stat().st_size} "
                               f"bytes; the official one has {OFFICIAL[split].size}): copy it again, or delete it "
                               f"and pass --download") from None
        names = unique_names([sample_key(m.rsplit("/", 1)[-1]) for m in members])
        return ([Source(n, split, str(zip_path), m) for n, m in zip(names, members)],
                {"archive": zip_path.name, "size": zip_path.stat().st_size, "sha256": sha256_file(zip_path)})
    raise FileNotFoundError(f"DIV2K {split}: neither {zip_path} nor {folder} exists (pass --download to fetch "
                            f"{OFFICIAL[split].url})")


def _tile_one(source: Source, staging: Path, tile: int, step: int, fmt: str, flush: bool = True) -> dict:
    """Process-pool worker: decode one source once, write its tiles to ``<staging>/<name>.tar`` (``flush``:
    shards.tile_positions'; validation's tiles do not overlap)."""
    done = staging / f"{source.name}.json"
    if done.is_file():
        return json.loads(done.read_text())
    record = {"name": source.name, "source": source.member or source.path}
    try:
        data = source.read()
    except TooManyPixels as err:  # (a zip bomb's member, a sparse file: never read)
        record["rejected"] = f"{err.kind}: {err}"
        return record
    except MemoryError:
        record["rejected"] = "too large: not enough memory to read it"
        return record
    except (OSError, zipfile.BadZipFile, zlib.error) as err:  # permissions, I/O, a damaged zip member: this source
        # is rejected, not the whole run
        record["rejected"] = f"unreadable: {type(err).__name__}: {getattr(err, 'strerror', None) or err}"
        return record  # not marked finished: a rerun tries again
    record["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        rgb = decode_rgb8(data, DEFAULT_MAX_PIXELS)
    except BadImage as err:
        record["rejected"] = f"{err.kind}: {err}"
    else:  # (its pixels' hash too: evaluate tells a converted copy of a training photo by it)
        pixels = hashlib.sha256(rgb.tobytes()).hexdigest()  # (as tile_sources hashes a folder's photos)
        record.update(height=int(rgb.shape[0]), width=int(rgb.shape[1]), pixels_sha256=pixels)
        if min(rgb.shape[:2]) < tile:
            record["rejected"] = f"smaller than the {tile} px tile ({rgb.shape[1]}x{rgb.shape[0]})"
        else:
            items = [(f"{source.name}_s{i:03d}", encode_tile(t.copy(), fmt))
                     for i, t in enumerate(tiles(rgb, tile, step, flush))]
            write_shard(staging / f"{source.name}.tar", items, fmt)
            record["tiles"] = len(items)
    atomic_write_bytes(done, json.dumps(record).encode())  # last: marks the image finished
    return record


def _tar_index(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tar:
        return {m.name.rsplit(".", 1)[0]: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def _pack(out: Path, split: str, staging: Path, plan: list[list[str]], fmt: str) -> list[str]:
    """Write the planned shards; skip any that already exist from an earlier run of the same plan."""
    for leftover in out.glob(f".{split}-*.tar.tmp*"):  # an interrupted earlier write
        leftover.unlink()
    indexes: dict[str, dict] = {}

    def read(key: str) -> bytes:
        stem = key.rsplit("_s", 1)[0]
        if stem not in indexes:
            indexes[stem] = _tar_index(staging / f"{stem}.tar")
        offset, size = indexes[stem][key]
        with open(staging / f"{stem}.tar", "rb") as f:
            f.seek(offset)
            return f.read(size)

    names = []
    for index, keys in enumerate(Progress.over(plan, f"{split} shards", "shard")):
        path = out / SHARD_NAME.format(split=split, index=index)
        names.append(path.name)
        if not path.is_file():
            write_shard(path, ((k, read(k)) for k in keys), fmt)
    return names


def split_step_for(split: str, step: int, tile: int) -> int:
    return step if split == "train" else tile  # validation tiles do not overlap


def prepare_div2k(root: str | Path, out: str | Path, *, download_missing: bool = False, tile: int = 480,
                  step: int = 240, shard_size: int = 256, workers: int = 0, seed: int = 0,
                  keep_staging: bool = False, remote: dict[str, RemoteFile] | None = None,
                  progress: bool = True, fmt: str = "raw") -> dict:
    """Build DIV2K train/val shards and the manifest in ``out``; see the module docstring."""
    check_settings(tile, step, shard_size)
    root, out = Path(root), Path(out)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file, not a folder")
    remote = remote or OFFICIAL
    settings = {"tile": tile, "train_step": step, "val_step": tile, "shard_size": shard_size, "seed": seed,
                "format": fmt}
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("settings") == settings and all((out / s).is_file() for sp in old["splits"].values()
                                                   for s in sp["shards"]):
            log.info("%s is already prepared with these settings", out)
            return old
    inputs = {}  # both splits' archives there and readable before --out changes: a failed download loses nothing
    for split in ("train", "val"):
        if download_missing and not (root / ARCHIVE[split]).is_dir():
            info = remote[split]
            try:
                download(info.url, root / f"{ARCHIVE[split]}.zip", info.sha256, info.size, progress=progress)
            except DownloadError as err:  # offline clusters: say how to bring the archive in by hand
                raise DownloadError(f"{err}. Without internet access here, fetch {info.url} elsewhere and put "
                                    f"{ARCHIVE[split]}.zip (or its extracted folder) into {root}") from None
        inputs[split] = find_sources(root, split)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # before any shard changes: no manifest describes other shards
    workers = pool_size(workers, MAX_DEFAULT_WORKERS["div2k"])
    manifest = {"dataset": "DIV2K HR", "settings": settings, **settings, "splits": {},
                "sources": {}, "inputs": {}, "rejected": []}
    for split in ("train", "val"):
        sources, identity = inputs[split]
        manifest["inputs"][split] = identity
        split_step = split_step_for(split, step, tile)
        # (validation's tiles since 2026-12-07 without the flush ones: an older staging of them is not reused)
        staging = out / ".staging" / f"{split}-{tile}-{split_step}-{fmt}{'' if split == 'train' else '-apart'}"
        staging.mkdir(parents=True, exist_ok=True)
        cut = partial(_tile_one, staging=staging, tile=tile, step=split_step, fmt=fmt, flush=split == "train")
        records = list(Progress.over(map_in_order(cut, sources, workers, names=lambda source: source.member or
                                                  source.path), f"{split} tiles", "img", len(sources), progress))
        keys = []
        for record in records:
            if "rejected" in record:
                manifest["rejected"].append({"source": record["source"], "split": split, "reason": record["rejected"]})
                continue
            manifest["sources"][record["name"]] = {"split": split, "height": record["height"],
                                                   "width": record["width"], "sha256": record["sha256"],
                                                   "tiles": record["tiles"]} | (
                {"pixels_sha256": record["pixels_sha256"]} if "pixels_sha256" in record else {})
            keys += [f"{record['name']}_s{i:03d}" for i in range(record["tiles"])]
        if split == "train":
            random.Random(f"{seed}-div2k-train").shuffle(keys)
        # the tiles' size and step too: --tile 472 after an interrupted --tile 480 (at step 240 the same tiles per
        # image, the same keys) kept the 480 px shards beside new 472 px ones
        plan = {"format": fmt, "tile": tile, "step": split_step, "flush": split == "train",
                "shards": [keys[i:i + shard_size] for i in range(0, len(keys), shard_size)]}
        plan_path = out / ".staging" / f"plan-{split}.json"
        if not plan_path.is_file() or json.loads(plan_path.read_text()) != plan:
            remove_shards(out, split)  # shards of another plan: rebuild them all
            atomic_write_bytes(plan_path, json.dumps(plan).encode())
        names = _pack(out, split, staging, plan["shards"], fmt)
        manifest["splits"][split] = {"samples": len(keys), "shards": names,
                                     "bytes": {n: (out / n).stat().st_size for n in names}}
        finish_split_files(out, {split: manifest["splits"][split]})
    require_training_tiles(manifest)  # a PrepareError (no manifest written) when every image was rejected
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
    remove_stale_temps(out)
    if not keep_staging:
        shutil.rmtree(out / ".staging", ignore_errors=True)
    rejected = len(manifest["rejected"])
    log.info("DIV2K: %d train / %d val tiles in %s (%d source%s rejected)", manifest["splits"]["train"]["samples"],
             manifest["splits"]["val"]["samples"], out, rejected, "" if rejected == 1 else "s")
    return manifest
