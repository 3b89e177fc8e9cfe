"""DALI index files next to the shards: ``train-000000.tar`` -> ``train-000000.idx``, written by DALI's ``wds2idx``.

    write_indexes(shards)    # prepare: an index for every shard lacking a current one (no-op without DALI)
    check_indexes(shards)    # the DALI loader: all present and current -> their paths; none -> None

Imports without DALI: ``wds2idx`` (it ships with DALI) is imported only when an index is written. Without
index files DALI scans every tar at start-up, which is slower but correct; a stale or partial set is an error.
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


def check_indexes(shards: list[str]) -> list[str] | None:
    """Index files for ``shards``: all present and newer than their tar -> their paths; none present ->
    None (DALI builds them in memory, slower start); a stale or partial set is an error naming a file."""
    idx = [index_path(s) for s in shards]
    present = [p.is_file() for p in idx]
    if not any(present):
        log.warning("no DALI index files next to the shards (e.g. %s): DALI will scan the tars at start-up; "
                    "`dist-dejpeg prepare` writes them when DALI is installed", idx[0])
        return None
    for shard, path, ok in zip(shards, idx, present):
        if not ok:
            raise FileNotFoundError(f"DALI index file missing: {path} (others exist; rerun prepare or delete all *.idx)")
        if path.stat().st_mtime < Path(shard).stat().st_mtime:
            raise RuntimeError(f"DALI index file is stale (older than its tar): {path}; rerun prepare or delete it")
    return [str(p) for p in idx]
