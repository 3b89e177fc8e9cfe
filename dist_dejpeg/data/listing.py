"""Which files a shard pattern (``data.train_glob``, ``data.val_glob``) names: ``list_shards``."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

from braceexpand import UnbalancedBracesError, braceexpand

log = logging.getLogger(__name__)

# beside the shards, and none: DALI's index files, scan records, the manifest (data.train_glob=train-* took them)
SIDECARS = (".idx", ".json")


def list_shards(root: str | Path, pattern: str) -> list[str]:
    """Shard files matching ``pattern`` (a glob, relative to ``root`` unless absolute: ``root`` itself is taken
    literally, so a folder named ``set[1]`` works; ``**`` any depth of folders; braces expanded, as webdataset's
    ``train-{000000..000099}.tar``; SIDECARS left out), sorted. A broken symbolic link it matches, and a file that
    two names match (a link: its samples would be read twice a pass), are warned of by name (once a process).
    Matching nothing is an error that names the pattern."""
    absolute = os.path.isabs(pattern)
    full = pattern if absolute else os.path.join(str(root), pattern)
    try:
        patterns = list(braceexpand(pattern, escape=False))
    except UnbalancedBracesError:  # a lone brace: literal
        patterns = [pattern]
    matched = {p for one in patterns for p in glob.glob(one if absolute else os.path.join(
        glob.escape(str(root)), one), recursive=True) if not p.lower().endswith(SIDECARS)}
    found, files = [], {}
    for path in sorted(matched):
        if not os.path.isfile(path):
            if os.path.islink(path) and not os.path.exists(path):
                _warn_once(f"{path} is a broken symbolic link (to {os.readlink(path)}): left out of the shards")
            continue
        found.append(path)
        stat = os.stat(path)
        if (same := files.setdefault((stat.st_dev, stat.st_ino), path)) != path:
            _warn_once(f"{path} and {same} are one file (a link): its samples are read twice a pass; match one name")
    if not found:
        raise FileNotFoundError(f"no shards match '{full}' (set data.root / data.train_glob / data.val_glob, "
                                f"or write shards with `dist-dejpeg prepare`)")
    return found


_SAID: set[str] = set()  # list_shards' warnings, said once per process (it lists a run's shards several times)


def _warn_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        log.warning("%s", message)
