"""Writing a file so that a crash leaves the old one or the new one, never half of either; reading one that
may be missing or half-written without raising. Torch-free: every layer uses it."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to a hidden temp file beside ``path``, fsync it, then rename it into place. ``mode``:
    the file's permission bits (None: as the umask makes them)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill leaves no temp file behind
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data, **kwargs) -> None:
    atomic_write_text(path, json.dumps(data, **{"indent": 2, **kwargs}))


def read_json(path: str | Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or half-written (never raises)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (where the platform has directory descriptors)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
