"""The reference photos evaluate and report measure against: lossless files, folders (searched recursively) and
WebDataset shards, each read once, lossy ones refused (a JPEG, a PNG whose pixels hold a JPEG's grid, what restore
wrote) unless allowed, and named so that two files of one name in two folders stay apart. Each is decoded to be
checked, then again when it is measured (Reference.read): memory holds one photo at a time, where keeping every
decoded photo until the first was measured took 36 MB per 12 MP photo (~1.8 GB for 50 camera photos)."""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import tarfile
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from dist_dejpeg.jpeg.integrity import file_problem, parse, structure_problem
from dist_dejpeg.data.images import BadImage, decode_component, decode_rgb8
from dist_dejpeg.jpeg.formats import (LOSSY_SHARD_EXTS, LOSSY_SUFFIXES, SHARD_EXTS, checked_size, images_in, too_big,
                                      written_by_restore)
from dist_dejpeg.jpeg.quality import estimate_from_pixels
from dist_dejpeg.models.names import DIGEST_CHARS, shard_fingerprint
from dist_dejpeg.run.text import visible

log = logging.getLogger(__name__)


class EvaluateError(ValueError):
    """Inputs evaluate cannot use (no images, lossy references, ...)."""


class Reference(NamedTuple):
    """A checked reference photo; its pixels are decoded by :meth:`read`, when it is measured."""

    name: str  # in the tables: the file's stem, with the folders that tell it from another of that stem
    source: str  # where it came from, as given (a path, or "shard.tar:key")
    path: Path  # the file, or the shard that holds it
    member: tarfile.TarInfo | None = None  # the sample's image in that shard
    digests: tuple[str, ...] = ()  # SHA-256 prefixes of its file's bytes and of its pixels (seen_in_training)

    def read(self) -> np.ndarray:
        """The photo, H x W x 3 uint8 (BadImage, OSError: the file changed or went since it was checked)."""
        if self.member is None:
            return decode_rgb8(_read_file(self.path))
        if why := too_big(self.member.size, sparse=self.member.issparse()):
            raise BadImage(why)
        with tarfile.open(self.path) as tar:
            return decode_component(self.member.name.partition(".")[2].lower(), tar.extractfile(self.member).read())


def read_references(images: list[str], allow_lossy: bool = False,
                    max_images: int = 0, problem=None) -> tuple[list[Reference], list[str]]:
    """A Reference for each image (each decoded to be checked, not kept): files, folders (recursive), WebDataset
    shards (.tar files, or a folder of them); a file named twice (itself and in a folder, or by two paths) is read
    once. ``problem(rgb)``: why an image cannot be used (skipped, not counted for ``max_images``), or None. Returns
    the images and the files skipped with their reasons."""
    refs, skipped, lossy = [], [], []
    paths = _input_paths(images)
    for path in paths:
        try:
            _check(path, refs, skipped, lossy, allow_lossy, problem)
        except (tarfile.TarError, EOFError, OSError) as err:  # a shard cut short (half-copied) or not a tar at all
            kept = sum(ref[2] == path for ref in refs)
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(":")  # (tarfile's: 5 lines)
            skipped.append(f"{path}: a WebDataset tar cut short after {kept} image(s) ({detail}): the rest skipped"
                           if kept else f"{path}: not a readable WebDataset tar ({detail})")
        if max_images and len(refs) >= max_images:
            refs = refs[:max_images]
            break
    if lossy:
        shown = visible(", ".join(lossy[:3])) + (f" and {len(lossy) - 3} more" if len(lossy) > 3 else "")
        msg = (f"{len(lossy)} lossy reference image(s) ({shown}): a JPEG ground truth already holds compression "
               f"artifacts, so the metrics would reward reproducing them; use lossless photos (PNG, TIFF, ...) "
               f"or pass --allow-lossy-reference")
        if not refs:
            raise EvaluateError(msg)
        skipped += [f"{name}: lossy reference (--allow-lossy-reference to use it)" for name in lossy]
        log.warning("%s; evaluated on the other %d image(s) without them", msg, len(refs))
    if not refs:
        raise EvaluateError(f"none of the {len(paths)} file(s) could be measured: " + "; ".join(skipped[:3]))
    names = _names([ref[0] for ref in refs])
    return [Reference(name, *ref[1:]) for name, ref in zip(names, refs)], skipped


def _check(path: Path, refs: list, skipped: list, lossy: list, allow_lossy: bool, problem) -> None:
    """read_references' check of one file or shard: each usable image appended to ``refs``, the others to
    ``skipped`` or ``lossy`` with their reasons. A shard that is no tar, or ends early, raises tarfile's errors."""
    shard = path.suffix.lower() == ".tar"
    for key, ext, member, data in _shard_images(path) if shard else [("", path.suffix.lower(), None, b"")]:
        label, named = (f"{path.name}:{key}", f"{path.name}:{key}.{ext}") if shard else (str(path), str(path))
        if ext in (LOSSY_SHARD_EXTS if shard else LOSSY_SUFFIXES) and not allow_lossy:
            lossy.append(named)
            continue
        try:
            if isinstance(data, BadImage):  # (a shard's member too big, or sparse: not read)
                raise data
            data = data if shard else _read_file(path)
            jpeg = data[:2] == b"\xff\xd8"  # (coded data not whole, which libjpeg decodes grey: jpeg/integrity.py)
            frame = parse(data)[0] if jpeg else None  # (parsed once, for both checks)
            if frame is not None and (why := structure_problem(data, frame)):
                raise BadImage(why)
            rgb = decode_component(ext, data) if shard else decode_rgb8(data)
            if frame is not None and (why := file_problem(data, frame=frame, source=None if shard else path)):
                raise BadImage(why)
        except BadImage as err:
            skipped.append(f"{label}: {err}")
            continue
        except MemoryError:  # (this image's failure, not the run's: the memory it took is freed)
            skipped.append(f"{label}: not enough memory to read and decode it")
            continue
        except OSError as err:  # (a broken link in a folder searched, a file without read permission)
            skipped.append(f"{label}: cannot be read ({err.strerror or err})")
            continue
        if not allow_lossy and (grid := "written by restore" if written_by_restore(data) else _jpeg_grid(rgb)):
            lossy.append(f"{named} ({grid})")
            continue
        if problem is not None and (why := problem(rgb)):
            skipped.append(f"{label}: {why}")
            continue
        pixels = (np.ascontiguousarray(rgb), *_upright(data, shard))  # (the hashes the data manifest holds)
        digests = tuple(hashlib.sha256(b).hexdigest()[:DIGEST_CHARS] for b in (data, *pixels))
        refs.append((path / key, label, path, member, digests))  # a file's key is "": path / "" is the path


def _upright(data: bytes, shard: bool) -> list[np.ndarray]:
    """A file's pixels turned upright by its EXIF orientation, as prepare folder tiles (and hashes) a photo; none
    where it has no turn to apply (a shard's tiles are upright already)."""
    from PIL import Image

    # (only a file that can hold EXIF is opened for it: a PNG without an eXIf chunk is decoded whole by getexif)
    if shard or not (b"Exif" in data[:1 << 16] or b"eXIf" in data or data[:4] in (b"II*\x00", b"MM\x00*")):
        return []
    try:
        with Image.open(io.BytesIO(data)) as img:
            turned = img.getexif().get(0x0112, 1) not in (0, 1)
        return [decode_rgb8(data, upright=True)] if turned else []
    except (OSError, BadImage, ValueError):
        return []


def seen_in_training(images: list[str], refs: list[Reference], train_shards: dict[str, str],
                     train_sources: dict[str, str] | None = None) -> dict:
    """The references the model trained on: read from its training shards (files of the name and fingerprint its
    generator file records), or the very photos those were cut from (``train_sources``: the same pixels, or a
    DIV2K image's file bytes, whatever the file's name): gains measured on them overstate what photos it never saw
    get. {"images": how many, "shards": their names in the record (file names; paths in data.root where two share one), "photos": the photos'
    names in training}, or {} where none is (or the model file does not say what it trained on)."""
    if not train_shards and not train_sources:
        return {}
    by_name: dict[str, list[tuple[str, str]]] = {}  # file name: (record key, fingerprint): names.shard_keys
    for key, fingerprint in (train_shards or {}).items():  # (or, in older files, file names)
        by_name.setdefault(PurePosixPath(key).name, []).append((key, fingerprint))
    found = {}  # input shard: the record's key of that file (a copy: the same name and fingerprint)
    for p in _input_paths(images):
        if p.suffix.lower() == ".tar" and p.name in by_name:
            fingerprint = shard_fingerprint(p)
            if key := next((k for k, f in by_name[p.name] if f == fingerprint), None):
                found[p] = key
    seen = sorted(set(found.values()))
    in_shards = [r.member is not None and r.path in found for r in refs]
    photos = {r.name: train_sources[d] for r, shard in zip(refs, in_shards) if not shard
              for d in r.digests if d in (train_sources or {})}
    count = sum(in_shards) + len(photos)
    return {"images": count, "shards": seen, "photos": sorted(set(photos.values()))} if count else {}


def _input_paths(images: list[str]) -> list[Path]:
    """The files ``images`` names (files, folders searched recursively, else their shards, globs), each once."""
    from dist_dejpeg.restore.inputs import glob_files

    paths: list[Path] = []
    for item in images:
        p = Path(item)
        if p.is_dir():
            files = images_in(p)
            paths += files or sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".tar")
        elif p.is_file():
            paths.append(p)
        elif not glob.has_magic(item):  # a misspelt name said as such, not as an empty folder or glob
            raise EvaluateError(f"no such file or folder: {item}")
        else:
            paths += glob_files(item)  # ('*.png' finds a camera's IMG_0001.PNG too, as a folder search does)
    if not paths:
        raise EvaluateError(f"no images or shards found in {' '.join(images)}")
    unique: dict[Path, Path] = {}
    for path in paths:  # a file named twice is read once, where first named
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _names(paths: list[Path]) -> list[str]:
    """Each image's name: its stem; where several share one, with as many of their last folders as tell them
    apart (one/astro, two/astro), else with their suffixes (astro.png, astro.tif); else numbered."""
    names = [p.stem for p in paths]
    for stem in {n for n in names if names.count(n) > 1}:
        group = [i for i, n in enumerate(names) if n == stem]
        longest = max(len(paths[i].parts) for i in group)
        for k, suffix in [(k, s) for s in (False, True) for k in range(1, longest + 1)]:
            labels = ["/".join((paths[i] if suffix else paths[i].with_suffix("")).parts[-k:]) for i in group]
            if len(set(labels)) == len(labels):
                break
        for i, label in zip(group, labels):
            names[i] = label
    if len(set(names)) != len(names):  # one path's label is another's stem: told apart by position
        names = [f"{n}-{i}" for i, n in enumerate(names)]
    return names


def _jpeg_grid(rgb: np.ndarray) -> str:
    """'' for a reference without a JPEG's quantization in its pixels; else what was found. A PNG saved from a JPEG
    is a lossy reference too: scikit-image's coins.png (a q85 JPEG once) made every gain at q >= 85 a loss, since a
    JPEG near q85 nearly reproduces it (benchmarks/RESULTS.md, "The samples' three JPEGs")."""
    found = estimate_from_pixels(rgb).quality
    return "" if found is None else f"a JPEG's q{found} grid in its pixels"


def _shard_images(path: Path):
    """(key, ext, member, bytes) of every sample's image in a WebDataset tar (the first image extension per key)."""
    seen = set()
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if ext.lower() in SHARD_EXTS and key not in seen:
                seen.add(key)
                why = too_big(member.size, sparse=member.issparse())  # (checked before a byte is read)
                yield Path(key).name, ext.lower(), member, BadImage(why) if why else tar.extractfile(member).read()


def _read_file(path: Path) -> bytes:
    """A reference file's bytes; BadImage for one too big to be a photo (a sparse file of many GB)."""
    if why := checked_size(path):
        raise BadImage(why)
    return path.read_bytes()
