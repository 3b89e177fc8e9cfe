"""DALI index files next to the shards: ``train-000000.tar`` -> ``train-000000.idx``, written by DALI's ``wds2idx``.

    write_indexes(shards)    # prepare: an index for every shard lacking a current one (no-op without DALI)
    check_indexes(shards)    # the DALI loader: all present and current -> their paths; else None

Imports without DALI: ``wds2idx`` (it ships with DALI) is imported only when an index is written. Where the set is
missing, partial or older than its tars, the DALI loader writes index files from its own scan of the shards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from dist_dejpeg.run.files import temp_path

log = logging.getLogger(__name__)


def index_path(shard: str | Path) -> Path:
    return Path(shard).with_suffix(".idx")


def write_index(shard: str | Path) -> Path:
    """DALI index file for one shard (``wds2idx``), written atomically next to it."""
    shard = Path(shard)
    final = index_path(shard)
    tmp = temp_path(final)
    from wds2idx import IndexCreator  # ships with DALI

    creator = IndexCreator(str(shard), str(tmp), verbose=False)
    try:
        creator.create_index()
    finally:
        creator.close()
    os.replace(tmp, final)
    return final


def write_indexes(shards: list[str | Path]) -> int:
    """Index files for every shard that lacks a current one (no-op without DALI). Returns how many."""
    if importlib.util.find_spec("wds2idx") is None:  # DALI is not installed
        return 0
    count = 0
    for shard in shards:
        idx = index_path(shard)
        if not idx.is_file() or idx.stat().st_mtime < Path(shard).stat().st_mtime:
            write_index(shard)
            count += 1
    return count


def check_indexes(shards: list[str], say: bool = True) -> list[str] | None:
    """Index files for ``shards``: all present and newer than their tar -> their paths; else None, with a warning
    naming a file, and the DALI loader writes its own from its scan of the shards (a copy made with ``cp -r``
    gives the files new times in copy order, so a correct index can look older than its tar). ``say``: this
    process warns (rank 0 of the ranks that each check the same shards)."""
    idx = [index_path(s) for s in shards]
    present = [p.is_file() for p in idx]
    if not any(present):
        log.info("no DALI index files next to the shards (e.g. %s): the loader writes them from its scan "
                 "(`dist-dejpeg prepare` writes them when DALI is installed)", idx[0])
        return None
    for shard, path, ok in zip(shards, idx, present):
        older = ok and path.stat().st_mtime < Path(shard).stat().st_mtime
        why = "missing" if not ok else "older than its tar" if older else ""
        if why:
            (log.warning if say else log.debug)("DALI index file %s is %s: the loader uses index files written from "
                                                "its own scan of the shards (`dist-dejpeg prepare` rewrites them)",
                                                path, why)
            return None
    return [str(p) for p in idx]
