"""`dist-dejpeg prepare folder`: shards from a folder of your own images (searched recursively).

Each file gets a unique sample-key name (sanitised stem; a repeat gets -2, -3 ..., never a name another file has);
unreadable files and byte-identical copies (a duplicate, a symlink to a file also present) are listed under the
manifest's "rejected" before the split, so one photo never lands in both train and val. Validation images are whole
photographs held out before tiling, each by its name (split_key) and the seed (held_out_rank: a folder that grows keeps
every photo's split). Everything is written into a staging folder and published at the end
(shards.write_dataset): a run that fails or is interrupted leaves --out as it was.
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

from dist_dejpeg.data.images import BadImage, decode_rgb8, is_avif, is_jpeg_xl, webp_is_lossy
from dist_dejpeg.run.pool import MAX_DEFAULT_WORKERS, pool_size
from dist_dejpeg.data.shards import (PrepareError, check_settings, publish, require_training_tiles, sample_key, staged,
                                     tile_sources)
from dist_dejpeg.jpeg.formats import (DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, OTHER_PHOTO_SUFFIXES, hidden, is_animation,
                                       suffix_counts, tiff_pages, walk_files, written_by_restore)

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


def read_source(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS, lossy_webp: bool = False) -> np.ndarray:
    """A source file decoded to H x W x 3 uint8, upright (EXIF orientation applied); a read error is Unreadable, bad
    data BadImage, a photo over ``max_pixels`` TooManyPixels, a lossy WebP or an AVIF LossyWebP or LossyAVIF unless
    ``lossy_webp``, a JPEG XL that Pillow cannot decode JpegXL."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise Unreadable(f"{type(err).__name__}: {err.strerror or err}") from None
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
        return decode_rgb8(data, max_pixels, upright=True)
    except BadImage as err:
        if is_jpeg_xl(data) and type(err) is BadImage:
            raise JpegXL(f"convert to PNG first (this Pillow cannot decode it: {err})") from None
        raise


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
                                                                    f"{os.readlink(path)}, which does not exist)"})
            continue
        try:
            digest = file_sha256(path)
        except OSError as err:
            rejected.append({"source": name, "path": rel, "reason": f"{Unreadable.kind}: {type(err).__name__}: "
                                                                    f"{err.strerror or err}"})
            continue
        if digest in first:
            rejected.append({"source": name, "path": rel, "reason": f"duplicate of {first[digest]}"})
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


def held_out(names: list[str], key: dict[str, str], rank: dict[str, float], fraction: float) -> set[str]:
    """The photos of ``names`` (in rank order) held out for validation, in whole groups of one split key (a photo's
    stem: never one in each split): those ranked below ``fraction``, else the lowest-ranked group, and never every
    group (at least one trains); none where all share one key."""
    group_rank = {key[n]: rank[n] for n in names}  # (in rank order; one rank a key)
    groups = list(group_rank)
    held = [g for g in groups if group_rank[g] < fraction] or groups[:1]
    held = set(held[:len(groups) - 1])
    return {n for n in names if key[n] in held}


def held_out_rank(name: str, seed: int) -> float:
    """A photo's place in [0, 1) by its name and the seed alone: it is held out for validation below --val-fraction.
    A folder that grows keeps every photo's split (a shuffle of the whole list moved photos the model trained on
    into validation, whose numbers then flattered it); the fewest a split takes: one photo of two."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "big") / 2**64


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
    order = sorted(found, key=lambda source: (rank[source[1]], key[source[1]]))
    holds_out = val_fraction > 0 and len(set(key.values())) > 1  # (in whole groups of one key: held_out)
    val = held_out([name for _, name, _ in order], key, rank, val_fraction) if holds_out else set()
    sources = [(name, "val" if name in val else "train", partial(read_source, path, max_pixels, jpeg == "keep"))
               for path, name, _ in order]
    paths = {name: rel for _, name, rel in found}
    with staged(out) as staging:
        write = partial(tile_sources, staging, dataset=f"folder {src}", tile=tile, train_step=train_step,
                        shard_size=shard_size, seed=seed, fmt=fmt, jpeg=jpeg, paths=paths, rejected=rejected,
                        workers=min(pool_size(workers, MAX_DEFAULT_WORKERS["folder"]), len(sources)))
        manifest = write(sources)
        usable = list(manifest["sources"])  # accepted photos, in the shuffled order
        splits = manifest["splits"]
        if holds_out and usable and (splits["val"]["samples"] == 0 or splits["train"]["samples"] == 0):
            # rejected photos (too small, undecodable) emptied a split: split the usable ones again, holding out
            # one or more whenever there are two; a single usable photo trains (prepare then says: no validation)
            chosen = held_out(sorted(usable, key=lambda n: (rank[n], key[n])), key, rank, val_fraction)
            log.warning("prepare folder: rejected photos left the %s split empty; validation photos now: %s",
                        "val" if splits["val"]["samples"] == 0 else "train", ", ".join(sorted(chosen)) or "none")
            manifest = write([(name, "val" if name in chosen else "train", load) for name, _, load in sources])
        require_training_tiles(manifest)
        n_train, n_held = manifest["splits"]["train"]["samples"], manifest["splits"]["val"]["samples"]
        if n_held > n_train:  # whole photos are held out: a few large ones can take most of the tiles
            log.warning("prepare folder: the validation photos hold %d of the %d tiles (photos of unequal size): "
                        "another --seed holds out other photos", n_held, n_held + n_train)
        publish(staging, out, manifest)
    return manifest
