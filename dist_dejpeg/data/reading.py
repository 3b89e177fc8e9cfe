"""How the torch loader reads training shards: whole shards through webdataset, or every n-th sample of a few.

With fewer shards than loader slots (ranks x workers) the slots share the shards sample by sample (torch_loader).
Streamed, each slot would read every byte of every shard to keep 1/n of it: n times the I/O (8 GPUs x 8 workers on
a 5-shard folder read each byte 64 times; on one CPU, 16 slots over 2 shards spent 60% of a worker's time reading
tiles it threw away). ``dealt_samples`` reads each shard's tar headers once per process and then only the members
of the samples its slot keeps.

What each process learns of a shard (its index, whether it reads to its end) is kept while the shard's size and
mtime stay, so a shard is not scanned again every epoch, and a shard rewritten during a run is scanned afresh.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tarfile
from typing import Callable, Iterator

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from dist_dejpeg.data.verify import tar_stops_early, unread_tail
from dist_dejpeg.jpeg.formats import too_big

log = logging.getLogger(__name__)

_META = re.compile(r"__[^/]*__($|/)")  # members webdataset skips
_STOPS: dict[str, tuple] = {}  # shard -> (stamp, tar_stops_early's reason)
_INDEX: dict[str, tuple] = {}  # shard -> (stamp, samples, reason)

Samples = list[tuple[str, list[tuple[str, int, int]]]]  # (key, [(extension, data offset, size)]) in tar order
EMPTY = "no samples in it"  # shard_samples' reason for a tar that reads to its end and holds no sample (``empty``)


def _stamp(shard: str) -> tuple[int, int]:
    stat = os.stat(shard)
    return stat.st_size, stat.st_mtime_ns


def _unreadable(err: OSError) -> str:
    return f"{type(err).__name__}: {err.strerror or err}"


def stops_early(shard: str) -> str | None:
    """verify.tar_stops_early, once per version of the shard in this process; a shard that cannot be opened
    (deleted, its storage gone) says why instead of raising."""
    try:
        stamp = _stamp(shard)
        hit = _STOPS.get(shard)
        if hit is None or hit[0] != stamp:
            hit = _STOPS[shard] = (stamp, tar_stops_early(shard))
        return hit[1]
    except OSError as err:
        return _unreadable(err)


def shard_index(shard: str) -> tuple[Samples, str | None]:
    """The shard's samples as webdataset groups its members (key and extension by its rule, extensions in lower
    case), and why the tar cannot be read to its end (or None); headers only, once per version of the shard."""
    stamp = _stamp(shard)
    hit = _INDEX.get(shard)
    if hit is not None and hit[0] == stamp:
        return hit[1], hit[2]
    samples: Samples = []
    broken = None
    with open(shard, "rb", buffering=0) as f:  # unbuffered: a header costs 512 bytes, not a buffer's 8 KiB
        try:
            with tarfile.open(fileobj=f) as tar:
                for member in tar:
                    if not member.isreg() or _META.match(member.name):
                        continue
                    if why := too_big(member.size, sparse=member.issparse()):  # (read whole: many GB of memory)
                        broken = f"{member.name}: {why}"
                        break
                    if member.offset_data + member.size > stamp[0]:
                        broken = "truncated"
                        break
                    key, ext = base_plus_ext(member.name)
                    if key is None:
                        continue
                    if not samples or samples[-1][0] != key:
                        samples.append((key, []))
                    samples[-1][1].append((ext.lower(), member.offset_data, member.size))
                else:
                    broken = unread_tail(f, tar.offset)
        except tarfile.TarError as err:
            broken = f"{type(err).__name__}: {err}"
    _INDEX[shard] = (stamp, samples, broken)
    return samples, broken


def shard_samples(shards: list[str], report: Callable[[str, str], None], empty: bool = False) -> Iterator[dict]:
    """The samples of ``shards``, in order; ``report(shard, reason)`` once for a shard not read to its end: a cut-off
    or corrupt tar (webdataset raises for it, twice: for the member, then for the file; its other samples are
    read), one whose corrupt header tarfile takes for its end (stops_early, checked after it), or one gone;
    ``empty``: also for one read to its end that held no sample (reason EMPTY)."""
    for shard in shards:
        if (early := stops_early(shard)) and early.endswith(": not read"):  # a member webdataset would read whole
            yield from dealt_samples([shard], 1, 0, report)  # (sparse, or over MAX_FILE_BYTES): the samples before
            continue  # it read from the index, and the shard reported
        errors: list[Exception] = []

        def handler(err: Exception) -> bool:
            errors.append(err)
            return True

        count = 0
        for sample in wds.tariterators.tarfile_samples([{"url": shard}], handler=handler):
            if sample:
                count += 1
                yield sample
        # (webdataset's message ends " @ <the file object>": the shard is named already)
        reason = (f"{type(errors[0]).__name__}: {str(errors[0]).split(' @ ')[0][:200]}" if errors
                  else stops_early(shard))
        if reason or (empty and not count):
            report(shard, reason or EMPTY)


def dealt_samples(shards: list[str], every: int, slot: int, report: Callable[[str, str], None]) -> Iterator[dict]:
    """Sample i of ``shards`` (counted over them in order) where i % every == slot, as shard_samples would give it;
    only its members are read. ``report`` as in shard_samples."""
    start = 0
    for shard in shards:
        try:
            samples, broken = shard_index(shard)
            mine = samples[(slot - start) % every::every]
            start += len(samples)
            with open(shard, "rb") as f:
                for key, parts in mine:
                    sample = {"__key__": key, "__url__": shard}
                    for ext, offset, size in parts:
                        f.seek(offset)
                        sample.setdefault(ext, f.read(size))
                    yield sample
        except OSError as err:
            broken = _unreadable(err)
        if broken:
            report(shard, broken)


def shard_keys(path: str) -> list[str]:
    """Sample keys of one shard, in order (for tests and tooling)."""
    keys = []
    for sample in wds.tariterators.tarfile_samples([{"url": path}]):
        keys.append(sample["__key__"])
    return keys


def legacy_shard_list_digest(shards: list[str]) -> str:
    """The digest loader states held before 2026-12-07 (names and sizes): a run saved then resumes exactly."""
    digest = hashlib.sha256()
    for shard in sorted(shards):
        try:
            size = os.path.getsize(shard)
        except OSError:  # (gone: see shard_list_digest)
            size = -1
        digest.update(f"{os.path.basename(shard)}\0{size}\n".encode())
    return digest.hexdigest()[:16]


def shard_list_digest(shards: list[str]) -> str:
    """The shards' names, sizes and first samples (models.names.shard_fingerprint), not their folder (a copy
    elsewhere resumes exactly): which samples each stream position holds depends on them, so a resume checks them.
    Sizes alone did not tell a set prepared again (another --seed, other photos of as many tiles: raw tiles all
    have one size) from the one the run trained on."""
    from dist_dejpeg.models.names import shard_fingerprint

    digest = hashlib.sha256()
    for shard in sorted(shards):
        try:
            fingerprint = shard_fingerprint(shard)
        except OSError as err:  # gone since it was listed: its samples are skipped and counted, as one gone mid-run
            fingerprint = "unreadable"
            log.warning("training shard %s cannot be read (%s): its samples are skipped as bad data", shard,
                        _unreadable(err))
        digest.update(f"{os.path.basename(shard)}\0{fingerprint}\n".encode())
    return digest.hexdigest()[:16]
