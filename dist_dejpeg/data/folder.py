"""`dist-dejpeg prepare folder`: shards from a folder of your own images (searched recursively).

Each file gets a unique sample-key name (sanitised stem; a repeat gets -2, -3 ..., never a name another file has);
unreadable files and byte-identical copies (a duplicate, a symlink to a file also present) are listed under the
manifest's "rejected" before the split, so one photo never lands in both train and val. Validation images are whole
photographs held out before tiling, each by its name (split_key) and the seed (held_out_rank); prepared again into the
same --out, a photo keeps the split its manifest.json gave it (earlier_splits, by its pixels or its path: a folder that
grows or shrinks never moves a photo that trained into validation). Everything is written into a staging folder and
published at the end (shards.write_dataset): a run that fails or is interrupted leaves --out as it was.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import unicodedata
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from dist_dejpeg.data.images import BadImage, TooManyPixels, decode_rgb8, is_avif, is_jpeg_xl, webp_is_lossy
from dist_dejpeg.data.jpeg_sources import JpegFile, jpeg_file_quality
from dist_dejpeg.run.pool import MAX_DEFAULT_WORKERS, pool_size
from dist_dejpeg.data.shards import (MANIFEST, PrepareError, check_settings, publish, read_manifest,
                                     require_training_tiles, sample_key, staged, tile_sources)
from dist_dejpeg.jpeg.formats import (DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, OTHER_PHOTO_SUFFIXES, checked_size,
                                       file_limit, hidden, is_animation, shown, suffix_counts, tiff_pages,
                                       walk_files, written_by_restore)

log = logging.getLogger(__name__)
# Photo formats taken as sources beside IMAGE_SUFFIXES, each rejected with its own reason where it cannot be used
# (read_source): AVIF as lossy, a JPEG XL this Pillow cannot decode as such
NAMED_SOURCE_SUFFIXES = frozenset({".avif", ".jxl"}) - IMAGE_SUFFIXES
SOURCE_SUFFIXES = IMAGE_SUFFIXES | NAMED_SOURCE_SUFFIXES
# Photo formats a folder may hold that PIL does not decode (or not losslessly): counted and named, not passed over
UNREAD_PHOTO_SUFFIXES = OTHER_PHOTO_SUFFIXES - SOURCE_SUFFIXES


class Unreadable(BadImage):
    """A source file that cannot be read (permissions, I/O error)."""

    kind = "unreadable"


class LossyWebP(BadImage):
    """A lossy WebP source: its codec leaves no JPEG grid for the pixel check to find, so its file says it."""

    kind = "lossy WebP"


class LossyAVIF(BadImage):
    """An AVIF source: AV1 compression (lossless AVIF is rare and cannot be told cheaply), no JPEG grid to find."""

    kind = "lossy AVIF"


class Restored(BadImage):
    """A file dist-dejpeg restore wrote (its EXIF Software says so): a model's output, no clean target."""

    kind = "restored by dist-dejpeg"


class SeveralImages(BadImage):
    """An animation or a TIFF of several pages: prepare took its first image without a word; restore refuses it."""

    kind = "several images"


class JpegXL(BadImage):
    """A JPEG XL source that this Pillow cannot decode (it needs a plugin): named, not "undecodable"."""

    kind = "JPEG XL"


def read_source(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                lossy_webp: bool = False) -> np.ndarray | JpegFile:
    """A source file decoded to H x W x 3 uint8, upright (EXIF orientation applied), as a JpegFile where its file is a
    JPEG (or a TIFF of JPEG compression) whose tables give a quality (jpeg_sources.jpeg_file_quality); a read error is
    Unreadable, bad data BadImage, a photo over ``max_pixels`` TooManyPixels, a lossy WebP or an AVIF LossyWebP or
    LossyAVIF unless ``lossy_webp``, a JPEG XL that Pillow cannot decode JpegXL."""
    try:
        if why := checked_size(path, file_limit(max_pixels)):  # (a sparse file of many GB: not read)
            raise TooManyPixels(why)
        data = path.read_bytes()
    except OSError as err:
        raise Unreadable(f"{type(err).__name__}: {err.strerror or err}") from None
    except MemoryError:
        raise TooManyPixels("not enough memory to read it") from None
    keep = "(--jpeg-sources keep uses it as it is"
    if not lossy_webp and webp_is_lossy(data):
        raise LossyWebP(f"its compression artefacts would become clean targets {keep}; a lossless WebP is used)")
    if not lossy_webp and is_avif(data):
        raise LossyAVIF(f"its compression artefacts would become clean targets {keep})")
    if not lossy_webp and written_by_restore(data):
        raise Restored(f"a model's output as the clean target would teach the model its own faults; give the original "
                       f"photo {keep})")
    if several := several_images(data):
        raise SeveralImages(f"{several}: save each as a file of its own to train on it")
    try:
        rgb = decode_rgb8(data, max_pixels, upright=True)
    except BadImage as err:
        if is_jpeg_xl(data) and type(err) is BadImage:
            raise JpegXL(f"convert to PNG first (this Pillow cannot decode it: {err})") from None
        raise
    file = jpeg_file_quality(data)  # (its pixels may hide the grid: above about q90, 4:4:4, CMYK, a TIFF's RGB)
    return rgb if file is None else JpegFile(rgb, *file)


def several_images(data: bytes) -> str:
    """What more than one image a file holds ("an animated GIF (12 frames)", "a TIFF of 3 pages"), or ""."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if is_animation(img):
                return f"an animated {img.format} ({img.n_frames} frames)"
            pages = tiff_pages(img) if img.format == "TIFF" else 1
    except Exception:  # noqa: BLE001 - not an image PIL opens: decode_rgb8 says what is wrong with it
        return ""
    return f"a TIFF of {pages} pages" if pages > 1 else ""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def unique_names(stems: list[str]) -> list[str]:
    """``stems`` made unique: the first of each keeps its own, later copies get ``-2``, ``-3`` ... skipping every
    name that is taken, a real one included (x, x, x-2 -> x, x-3, x-2)."""
    taken = set(stems)
    names, seen = [], set()
    for stem in stems:
        name, n = stem, 2
        if stem in seen:
            while (name := f"{stem}-{n}") in taken:
                n += 1
            taken.add(name)
        seen.add(stem)
        names.append(name)
    return names


SHOWN_PHOTOS = 3  # a folder of photos given as data.root: the photos its error names


def first_photos(root: str | Path, limit: int = SHOWN_PHOTOS + 1) -> list[Path]:
    """Up to ``limit`` of the image files under ``root`` that prepare folder takes, the walk stopped once found: a
    folder of photos given where shards belong (data.root), told apart without reading a whole photo library."""
    found: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not hidden(d))
        found += [Path(folder, n) for n in sorted(names) if Path(n).suffix.lower() in SOURCE_SUFFIXES and not hidden(n)]
        if len(found) >= limit:
            break
    return found[:limit]


def photos_hint(root: str | Path, photos: list[Path]) -> str:
    """What to do with a folder of photos given as data.root (``photos``: first_photos'): prepare them first."""
    shown = ", ".join(str(p.relative_to(root)) for p in photos[:SHOWN_PHOTOS])
    more = ", ..." if len(photos) > SHOWN_PHOTOS else ""
    return (f"{root} holds photos ({shown}{more}), not shards: prepare them first, "
            f"`dist-dejpeg prepare folder {root} --out DIR`, then train with data.root=DIR")


def find_sources(src: Path) -> tuple[list[tuple[Path, str, str]], list[dict]]:
    """The image files under ``src`` as (path, unique name, path relative to src), in sorted order, less those that
    cannot be read or repeat an earlier file's bytes (the first by sorted path is kept): those are the rejected."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is a file, not a folder of images" if src.exists() else f"no such folder: {src}")
    every = walk_files(src)
    files = sorted(p for p in every if p.suffix.lower() in SOURCE_SUFFIXES)
    unread = suffix_counts(p for p in every if p.suffix.lower() in UNREAD_PHOTO_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(SOURCE_SUFFIXES))}) under {src}" + (
            f"; found {unread}, which prepare cannot read: convert them to PNG or TIFF" if unread else ""))
    if unread:
        log.warning("prepare folder: left out %s under %s (formats prepare cannot read: convert them to PNG or TIFF "
                    "to use them)", unread, src)
    names = unique_names([sample_key(p.name) for p in files])
    kept, rejected, first = [], [], {}
    for path, name in zip(files, names):
        rel = path.relative_to(src).as_posix()
        if not path.exists():
            rejected.append({"source": name, "path": rel, "reason": f"{Unreadable.kind}: a broken link (to "
                                                                    f"{shown(os.readlink(path))}, which does not exist)"})
            continue
        try:
            digest = file_sha256(path)
        except OSError as err:
            rejected.append({"source": name, "path": rel, "reason": f"{Unreadable.kind}: {type(err).__name__}: "
                                                                    f"{err.strerror or err}"})
            continue
        if digest in first:
            rejected.append({"source": name, "path": rel, "reason": f"duplicate of {shown(first[digest])}"})
            continue
        first[digest] = rel
        kept.append((path, name, rel))
    return kept, rejected


def split_key(path: Path) -> str:
    """What decides a photo's split (held_out_rank): its name as a sample key, the same for every photo of that stem
    (2019/IMG_0001.png and 2020/IMG_0001.png, IMG_1234.tif and its IMG_1234.jpg: one split together); a stem with
    other than printable ASCII kept by its own (sample_key would make 日本 and 東京 both "img"). The
    sample names those get (IMG0001-2, img-3) depend on the folder's other files, and were the key: a photo added
    later renamed one that trained, and moved it into validation."""
    stem = path.stem
    return sample_key(path.name) if re.fullmatch(r"[\x20-\x7e]*", stem) else unicodedata.normalize("NFC", stem)


def held_out(names: list[str], key: dict[str, str], rank: dict[str, float], fraction: float,
             kept: dict[str, str] | None = None) -> tuple[set[str], list[str]]:
    """The photos of ``names`` (in rank order) held out for validation, in whole groups of one split key (a photo's
    stem: never one in each split), and what the split could not do as asked (for the log). ``kept``: the split an
    earlier prepare into this --out gave a photo (earlier_splits): its group keeps it, "train" where any of its
    photos trained (a photo the model trained on never moves into validation). The other groups are held out by
    rank: those below ``fraction``, else the lowest-ranked new group (a first prepare: the lowest-ranked), never a
    kept training group (none, with a note, where every group trained before); never every group: the
    highest-ranked new one then trains, else a kept validation group (with a note). None where all share one key."""
    kept = kept or {}
    group_rank = {key[n]: rank[n] for n in names}  # (in rank order; one rank a key)
    groups, was = list(group_rank), {}
    for n in names:
        if n in kept:
            was[key[n]] = "train" if "train" in (kept[n], was.get(key[n])) else "val"
    new = [g for g in groups if g not in was]
    held = [g for g in groups if was.get(g, "val" if group_rank[g] < fraction else "train") == "val"]
    notes = []
    if not held and len(groups) > 1:
        held = new[:1]
        if not held:
            notes.append("no photo is held out for validation: every photo here trained in the earlier prepare into "
                         "--out, and none moves into validation (a photo the model trained on would flatter it); add "
                         "a new photo (then held out) or prepare into an empty --out for a fresh split")
    if len(held) == len(groups) > 0:
        drop = ([g for g in held if g in new] or held)[-1]
        held.remove(drop)
        if drop in was:
            notes.append(f"{', '.join(n for n in names if key[n] == drop)} validated before and now trains (at "
                         f"least one photo trains)")
    held_out_groups = set(held)  # (a list: one scan per photo, 3.8 s for 48,000 photos)
    return {n for n in names if key[n] in held_out_groups}, notes


SPLIT_SETTINGS = ("seed", "val_fraction")  # manifest.json's keys of a folder's split (earlier_splits compares them)


def earlier_splits(out: Path) -> dict[str, dict]:
    """The splits an earlier `prepare folder` into ``out`` gave its photos (its manifest.json's sources), by the
    sha256 of their pixels and by their path below the folder: {"pixels": {sha256: split}, "path": {path: split},
    "settings": its SPLIT_SETTINGS}; empty for a first prepare, or an --out of other shards."""
    try:
        manifest = read_manifest(out) if Path(out).is_dir() else None
    except (OSError, ValueError) as err:
        log.warning("prepare folder: cannot read the earlier %s in %s (%s): its photos' splits are not kept", MANIFEST,
                    out, err)
        manifest = None
    found: dict[str, dict] = {"pixels": {}, "path": {}, "settings": {}}
    if not isinstance(manifest, dict) or not str(manifest.get("dataset", "")).startswith("folder "):
        return found
    found["settings"] = {k: v for k in SPLIT_SETTINGS if isinstance(v := manifest.get(k), (int, float))
                         and not isinstance(v, bool)}  # (none in an older manifest)
    for info in (manifest.get("sources") or {}).values():
        if isinstance(info, dict) and info.get("split") in ("train", "val"):
            for field, by in (("sha256", "pixels"), ("path", "path")):
                if isinstance(info.get(field), str):
                    found[by][info[field]] = info["split"]
    return found


def kept_splits(earlier: dict[str, dict[str, str]], paths: dict[str, str], pixels: dict[str, str]) -> dict[str, str]:
    """The split each photo (name -> its path, and the sha256 of its pixels where known) keeps from ``earlier``
    (earlier_splits): by its pixels, else by its path (a photo edited since keeps its split too)."""
    kept = {}
    for name, path in paths.items():
        split = earlier["pixels"].get(pixels.get(name, "")) or earlier["path"].get(path)
        if split:
            kept[name] = split
    return kept


def held_out_rank(name: str, seed: int) -> float:
    """A photo's place in [0, 1) by its name and the seed alone: a new photo is held out for validation below
    --val-fraction, whatever else the folder holds (a shuffle of the whole list moved photos the model trained on
    into validation, whose numbers then flattered it; a photo prepared before keeps its split: earlier_splits)."""
    key = f"{seed}\0{name}".encode("utf-8", "surrogateescape")  # (a file name that is not UTF-8: its own bytes)
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


def prepare_folder(src: str | Path, out: str | Path, tile: int = 256, train_step: int = 128, shard_size: int = 256,
                   val_fraction: float = 0.1, seed: int = 0, fmt: str = "raw", jpeg: str = "halve",
                   max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int = 1) -> dict:
    """Shards from a folder of your own images (see the module docstring). Prefer lossless sources: a JPEG source
    would put its own artefacts into the "clean" target; ``jpeg`` (JPEG_SOURCE_ACTIONS) says what is done with those
    whose pixels show it (by default they are used halved). Photos over ``max_pixels`` are rejected. ``workers``
    processes decode and tile the photos (1: this process, where a test's patched reader reaches; 0: pool.pool_size's
    default, as the CLI's --workers), the shards coming out the same whatever their number."""
    check_settings(tile, train_step, shard_size)
    if not 0 <= val_fraction < 1:  # NaN too
        raise PrepareError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    src = Path(src)
    found, rejected = find_sources(src)
    key = {name: split_key(path) for path, name, _ in found}
    rank = {name: held_out_rank(key[name], seed) for name in key}
    order = [name for _, name, _ in sorted(found, key=lambda source: (rank[source[1]], key[source[1]]))]
    paths = {name: rel for _, name, rel in found}
    loads = {name: partial(read_source, path, max_pixels, jpeg == "keep") for path, name, _ in found}

    def split(names: list[str], kept: dict[str, str]) -> tuple[set[str], list[str]]:
        if val_fraction > 0 and len({key[n] for n in names}) > 1:  # (in whole groups of one key: held_out)
            return held_out(names, key, rank, val_fraction, kept)
        moved = [n for n in names if kept.get(n) == "val"]  # (validation to training: no photo trained before)
        return set(), [f"{', '.join(moved)} validated before and now train" + (
            " (--val-fraction 0)" if val_fraction == 0 else " (one photo name: one split)")] if moved else []

    with staged(out) as staging:
        earlier = earlier_splits(out)  # (read under the lock: another prepare into --out waits)
        val, notes = split(order, kept_splits(earlier, paths, {}))
        write = partial(tile_sources, staging, dataset=f"folder {src}", tile=tile, train_step=train_step,
                        shard_size=shard_size, seed=seed, fmt=fmt, jpeg=jpeg, paths=paths, rejected=rejected,
                        workers=min(pool_size(workers, MAX_DEFAULT_WORKERS["folder"]), len(order)))
        manifest = write([(name, "val" if name in val else "train", loads[name]) for name in order])
        usable = [name for name in order if name in manifest["sources"]]  # accepted photos, in rank order
        # split the usable photos again: rejected ones (too small, undecodable) may have emptied a split (one or more
        # held out whenever there are two; a single usable photo trains, and prepare says: no validation), and a
        # photo an earlier prepare knew by its pixels (renamed or moved since) keeps its split
        pixels = {n: manifest["sources"][n]["sha256"] for n in usable}
        kept = kept_splits(earlier, {n: paths[n] for n in usable}, pixels)
        chosen, notes = split(usable, kept)
        if chosen != val & set(usable):
            empty = [s for s in ("val", "train") if manifest["splits"][s]["samples"] == 0]
            log.warning("prepare folder: %s; validation photos now: %s", f"rejected photos left the {empty[0]} split "
                        f"empty" if empty else "photos prepared before under other names keep their split",
                        ", ".join(sorted(chosen)) or "none")
            manifest = write([(name, "val" if name in chosen else "train", loads[name]) for name in order])
        manifest |= {"seed": seed, "val_fraction": val_fraction}  # (SPLIT_SETTINGS: what split the new photos)
        if earlier["path"] or earlier["pixels"]:
            was = [manifest["sources"][n]["split"] for n in usable if n in kept]
            other = {k: v for k, v in earlier["settings"].items() if v != manifest[k]}
            if other and was:  # (the user asked for another split: say what it changes and what it does not)
                asked = ", ".join(f"--{k.replace('_', '-')} {manifest[k]:g}" for k in other)
                log.warning("prepare folder: %s, not as the earlier prepare into %s (%s): its %d photos here keep "
                            "their splits (%d train, %d val: a photo that trained never moves into validation); the "
                            "new settings split only the photos new to it (%d now); for a fresh split of every photo "
                            "by them, prepare into a new (empty) --out", asked, out, ", ".join(
                                f"--{k.replace('_', '-')} {v:g}" for k, v in other.items()), len(was),
                            was.count("train"), was.count("val"), len(usable) - len(was))
            log.info("prepare folder: %d of %d photos keep the split the earlier prepare into %s gave them (%d train, "
                     "%d val; %s: a photo that trained never moves into validation); %d new split by --seed %d "
                     "and --val-fraction %g (an empty --out splits all afresh)", len(was), len(usable), out,
                     was.count("train"), was.count("val"), MANIFEST, len(usable) - len(was), seed, val_fraction)
        for note in notes:
            log.warning("prepare folder: %s", note)
        require_training_tiles(manifest)
        n_train, n_held = manifest["splits"]["train"]["samples"], manifest["splits"]["val"]["samples"]
        if n_held == 1:  # (train/data_checks.py says it again when a run starts)
            log.warning("prepare folder: one validation tile: a model's gain per quality has no spread to bound it by, "
                        "so restore's guard will pass every image through; hold out more or larger photos "
                        "(--val-fraction, --seed) or prepare a smaller --tile")
        if n_held > n_train:  # whole photos are held out: a few large ones can take most of the tiles
            log.warning("prepare folder: the validation photos hold %d of the %d tiles (photos of unequal size): "
                        "another --seed holds out other photos", n_held, n_held + n_train)
        publish(staging, out, manifest)
    return manifest
