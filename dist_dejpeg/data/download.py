"""Resumable, checksum-verified HTTP download with a progress bar (standard library + tqdm).

    download("https://.../DIV2K_valid_HR.zip", Path("data/DIV2K_valid_HR.zip"), sha256="20dd...", size=448993893)

Bytes go to ``<dest>.part``; a rerun asks the server for the rest (HTTP Range) and appends. The finished
file is verified (size, SHA-256) before it is renamed into place; a mismatch deletes the partial file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from pathlib import Path

from dist_dejpeg.run.progress import Progress

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str | None = None, size: int | None = None, progress: bool = True,
             timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``dest`` unless a verified copy is already there. Returns ``dest``."""
    dest = Path(dest)
    if dest.is_file():
        _verify(dest, sha256, size, delete=False)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have and size == have:  # the partial file is already complete
            response = None
        else:
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:  # no network, no name resolution, refused, timed out
        raise DownloadError(f"{url}: cannot connect ({getattr(err, 'reason', None) or err})") from None
    if response is not None:
        with response:
            resumed = have and response.status == 206
            if have and not resumed:
                log.info("%s: server ignored the range request; starting over", url)
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else size
            with open(part, "ab" if resumed else "wb") as f, Progress(
                    total, dest.name, "B", enabled=progress, initial=have, unit_scale=True) as bar:
                try:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        f.write(block)
                        bar.update(len(block))
                except (urllib.error.URLError, ConnectionError, TimeoutError) as err:  # the part file is kept
                    raise DownloadError(f"{url}: connection lost after {bar.n} bytes ({err}); rerun to resume") \
                        from None
                f.flush()
                os.fsync(f.fileno())
    _verify(part, sha256, size, delete=True)
    os.replace(part, dest)
    return dest


def _verify(path: Path, sha256: str | None, size: int | None, delete: bool) -> None:
    actual_size = path.stat().st_size
    problem = None
    if size is not None and actual_size != size:
        problem = f"size {actual_size} != expected {size}"
    elif sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.lower():
            problem = f"SHA-256 {actual} != expected {sha256}"
    if problem:
        if delete:
            path.unlink()
        raise DownloadError(f"{path}: {problem}" + ("; deleted, rerun to download again" if delete else
                                                      "; delete it (or replace it with a good copy) and rerun"))
