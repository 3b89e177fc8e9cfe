"""Bad training samples: their reasons, the limit on them, and the check that lets DALI skip them.

    scan = scan_shards(shards, threads=4)          # every sample of every shard, verified once (cached)
    usable = dali_usable(scan, crop, raw_tile)     # bad ones counted and left out of DALI's index files

DALI cannot skip a sample it fails to decode: its operators work on whole batches and have no way to ask the
reader for a replacement, so one truncated PNG or one tile smaller than the crop ends the pipeline ("Critical
error in pipeline"; DALI's maintainers in NVIDIA/DALI issues 3913 and 1435). So the DALI loader checks the
shards before its first batch, the way the torch loader checks each sample as it reads it: every sample is
decoded once (PIL; a raw tile is only measured), and the bad ones are left out of the index files DALI reads,
so the reader never yields them. The result of a shard's check is cached beside it (``<shard>.scan.json``,
keyed by the shard's size and mtime), so a shard is decoded once, not at every start; where the folder is
read-only the check runs at every start. Every rank checks every shard, so every rank sees the same samples
and the same count, and all of them stop together when the count is over ``data.max_bad_samples``.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dist_dejpeg.data.images import BadImage, decode_component, translucent
from dist_dejpeg.jpeg.formats import SHARD_EXTS, too_big
from dist_dejpeg.run.files import atomic_write_json, read_json

log = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt", "too_small", "no_image", "bad_tar")
SCAN_VERSION = 3  # 2: a corrupt header before the end of a shard is found (verify.unread_tail); 3: "translucent"
EXAMPLES = 5  # reasons quoted in a message
KINDS = ("encoded", "raw")  # what DALI reads of a data set, by whether its tiles are raw (dali_usable)


class TooManyBadSamples(RuntimeError):
    """More bad training samples than ``data.max_bad_samples``. One message argument only: a DataLoader
    worker's exception is rebuilt from its message in the main process."""


class UnreadableShard(RuntimeError):
    """A shard DALI cannot read (cut short, or a corrupt tar header that hides its other members): a data error
    the command says in one line (exit 2), with what to do. One message argument only, as TooManyBadSamples."""


def unreadable(shard: str, why: str, said: str = "") -> UnreadableShard:
    return UnreadableShard(f"DALI could not read the shards: {shard} is unreadable ({why}){said}. Copy it again or "
                           f"`dist-dejpeg prepare` again, or leave it out (data.train_glob); data.backend=torch skips "
                           f"the samples it cannot read")


class TooFewSamples(RuntimeError):
    """A loader slot (a rank's worker) that got no training sample in a pass: fewer samples than slots, or every
    one skipped. One message argument only, as TooManyBadSamples."""


def too_many(total: int, counts: dict[str, int], examples: list[str], limit: int, scope: str) -> TooManyBadSamples:
    shown = "; ".join(examples[:EXAMPLES])
    return TooManyBadSamples(
        f"{total} bad training samples {scope}, more than data.max_bad_samples={limit} (skipped so far, by "
        f"reason: {counts}). For example: {shown}. Fix or remove them (shards written by `dist-dejpeg prepare` hold none), "
        f"or raise data.max_bad_samples (-1: no limit)")


def over_limit(total: int, limit: int | None) -> bool:
    return limit is not None and limit >= 0 and total > limit


def scan_path(shard: str | Path) -> Path:
    """Where a shard's check is cached: ``train-000000.tar`` -> ``train-000000.scan.json``."""
    return Path(shard).with_suffix(".scan.json")


def split_name(name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member: split at the first dot of the file name (wds2idx's rule)."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def unread_tail(f, end: int) -> str | None:
    """Why the bytes of tar file ``f`` after ``end`` (where Python's tarfile stopped reading members) are not the
    archive's zero padding, or None. tarfile, and so webdataset, takes a corrupt header after the first member for
    the end of the archive: the samples after it would be lost without a word."""
    f.seek(end)
    while chunk := f.read(1 << 16):
        if chunk.strip(b"\0"):
            return f"corrupt tar header at byte {end}: the members after it are unreadable"
    return None


def tar_stops_early(shard: str | Path) -> str | None:
    """Why ``shard`` cannot be read to its end (truncated, corrupt), or None; reads its headers only."""
    with open(shard, "rb") as f:
        try:
            with tarfile.open(fileobj=f) as tar:
                members = tar.getmembers()
                for member in members:  # (what a reader would take whole into memory: a tar bomb)
                    if member.isreg() and (why := too_big(member.size, sparse=member.issparse())):
                        return f"{member.name}: {why}"
                last = members[-1:]
                if last and last[0].offset_data + last[0].size > os.fstat(f.fileno()).st_size:
                    return "truncated"
                return unread_tail(f, tar.offset)
        except (tarfile.TarError, OSError) as err:
            return f"{type(err).__name__}: {err}"


def scan_shard(shard: str | Path) -> dict:
    """Every sample of one shard: its components (ext, data offset, size, member name), the extension of the
    image it would be read from (SHARD_EXTS order, as the torch loader picks it), that image's shorter side,
    and the error that stops it decoding. ``broken``: the tar's structure is cut off or corrupt."""
    shard = Path(shard)
    file_size = shard.stat().st_size
    samples: list[dict] = []
    broken = None
    with open(shard, "rb") as f:
        try:
            with tarfile.open(fileobj=f) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    if why := too_big(member.size, sparse=member.issparse()):
                        broken = f"{member.name}: {why}"
                        break
                    if member.offset_data + member.size > file_size:
                        broken = "truncated"
                        break
                    key, ext = split_name(member.name)
                    if not key or key.endswith("/"):
                        continue
                    if not samples or samples[-1]["key"] != key:
                        samples.append({"key": key, "components": []})
                    samples[-1]["components"].append([ext, member.offset_data, member.size, member.name])
                else:
                    broken = unread_tail(f, tar.offset)
        except (tarfile.TarError, OSError) as err:
            broken = f"{type(err).__name__}: {err}"
        for sample in samples:
            _check_sample(f, sample)
    return {"samples": samples, "broken": broken}


def _check_sample(f, sample: dict) -> None:
    found = {c[0]: c for c in sample["components"]}
    ext = next((e for e in SHARD_EXTS if e in found), None)
    sample.update(image=ext, side=0, error=None)
    if ext is None:
        return
    _, offset, size, _ = found[ext]
    if ext == "raw":  # no decode: the side follows from the byte count
        side = int(round((size / 3) ** 0.5))
        if side == 0 or side * side * 3 != size:
            sample["error"] = f"raw tile of {size} bytes is not a square 8-bit RGB tile"
        sample["side"] = side
        return
    f.seek(offset)
    data = f.read(size)
    try:
        rgb = decode_component(ext, data)
    except BadImage as err:
        sample["error"] = str(err)
        return
    sample["side"] = int(min(rgb.shape[:2]))
    if translucent(data):  # DALI's decode would drop the alpha the torch loader composites on white
        sample["translucent"] = True


def scan_shards(shards: list[str], threads: int = 1) -> dict[str, dict]:
    """``scan_shard`` of every shard, each from its cache when the shard's size and mtime still match."""

    def one(shard: str) -> dict:
        stat = os.stat(shard)
        stamp = {"version": SCAN_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        cached = read_json(scan_path(shard))
        if cached and all(cached.get(k) == v for k, v in stamp.items()):
            return cached
        log.info("checking every sample of %s once (DALI cannot skip a bad one)", shard)
        scan = dict(stamp, **scan_shard(shard))
        try:
            atomic_write_json(scan_path(shard), scan, indent=None)
        except OSError as err:  # a read-only data folder: check again at the next start
            log.info("could not cache the check of %s (%s)", shard, err)
        return scan

    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes without holding the GIL
        return dict(zip(shards, pool.map(one, shards)))


@dataclass
class Usable:
    """What DALI may read: per shard the samples that decode and are big enough; the rest counted."""

    samples: dict[str, list[dict]]
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    examples: list[str] = field(default_factory=list)
    broken: tuple[str, str] | None = None  # (shard, reason): a tar DALI cannot read at all

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    @property
    def good(self) -> int:
        return sum(len(s) for s in self.samples.values())

    def count(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(message)


def raw_side(scans: dict[str, dict]) -> int:
    """The side of the raw tiles most of the scanned samples are, or 0 when most hold encoded images."""
    kinds = Counter(s["side"] if s["image"] == "raw" else 0 for scan in scans.values() for s in scan["samples"]
                    if s["image"] and not s["error"])
    return kinds.most_common(1)[0][0] if kinds else 0


def dali_usable(scans: dict[str, dict], crop: int, raw_tile: int = 0) -> Usable:
    """Sort the scanned samples into those DALI can read (its reader takes "raw" when ``raw_tile``, else the
    encoded extensions) and the bad ones, counted by reason as the torch loader counts them."""
    usable = Usable({})
    for shard, scan in scans.items():
        if scan.get("broken") and usable.broken is None:
            usable.broken = (shard, scan["broken"])
        keep = usable.samples[shard] = []
        for sample in scan["samples"]:
            where = f"{sample['key']} in {shard}"
            image = sample["image"]
            if image is None or (image == "raw") != bool(raw_tile):
                usable.count("no_image", f"{where}: no image component DALI reads (has "
                                         f"{sorted(c[0] for c in sample['components'])}" + (
                                             f"; DALI reads one kind per data set, here {KINDS[bool(raw_tile)]} "
                                             f"tiles: data.backend=torch reads both)" if image else ")"))
            elif sample.get("translucent"):
                usable.count("no_image", f"{where}: has transparent pixels, which DALI's decode would read as other "
                                         f"colours than the torch loader and validation (they composite them on "
                                         f"white): data.backend=torch reads it")
            elif sample["error"]:
                usable.count("corrupt", f"{where}: {sample['error']}")
            elif raw_tile and sample["side"] != raw_tile:
                usable.count("corrupt", f"{where}: a {sample['side']} px raw tile among {raw_tile} px ones")
            elif sample["side"] < crop:
                usable.count("too_small", f"{where}: {sample['side']} px is smaller than the {crop} px crop")
            else:
                keep.append(sample)
    return usable


def write_index(path: Path, samples: list[dict]) -> None:
    """A DALI index file (wds2idx's v1.2 format) that lists only ``samples``: the reader skips the rest."""
    lines = [f"v1.2 {len(samples)}"]
    lines += [" ".join(" ".join(str(v) for v in c) for c in s["components"]) for s in samples]
    path.write_text("\n".join(lines) + "\n")


DOMINANT_SHARE = 0.25  # of the training tiles, from one photo of several: said (a panorama among snapshots)


def dominant_sources(manifest: dict) -> str:
    """What prepare says of training photos that give more than DOMINANT_SHARE of the training tiles each, where
    there are four or more ("": none): the model would mostly see them (an 8000 x 600 panorama gave 60%)."""
    train = {n: s["tiles"] for n, s in manifest.get("sources", {}).items()
             if s.get("split") == "train" and isinstance(s.get("tiles"), int)}
    total = sum(train.values())
    big = sorted((n for n, t in train.items() if t > DOMINANT_SHARE * total), key=lambda n: -train[n])
    if len(train) < 4 or not big:
        return ""
    shown = ", ".join(f"{n} {train[n]} ({100 * train[n] / total:.0f}%)" for n in big)
    return (f"{shown} of the {total} training tiles come from {'one photo' if len(big) == 1 else 'these photos'}: "
            f"the model would mostly see {'it' if len(big) == 1 else 'them'}; crop or leave out, or add photos")
