"""Whether a server a run needs answers, asked once with a short timeout before a library's own retries (minutes
of them for MLflow's client, ~45 s for huggingface_hub, none at all for torch.hub's download): an MLflow tracking
server (train/trackers.py), the hosts of pretrained weights (models/weights.py, train/launch.py); and a download that
stops sending after the host answered. Torch-free."""

from __future__ import annotations

import contextlib
import socket
from urllib.parse import urlsplit

DOWNLOAD_PROBE_S = 5  # a weights host that does not answer in this long cannot serve a download: said at once
# A download that receives nothing for this long has stalled (a proxy that accepts and never sends the body, a
# firewall dropping packets mid-transfer): torch.hub's urllib read has no timeout and waited forever, on every rank,
# before the first step. A healthy link never pauses a minute between reads (huggingface_hub gives up a read after
# 10 s and retries); a slow one still gets through, since each read that brings bytes starts the wait again.
DOWNLOAD_STALL_S = 60


def unreachable(url: str, timeout: float) -> str | None:
    """Why nothing at ``url`` answers one HEAD request within ``timeout`` s; None where something does: any HTTP
    status, or a TLS error (the library may be told to trust other certificates). Through the proxy that the
    environment names, as requests and httpx go."""
    import ssl
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as err:
        return None if isinstance(err.reason, ssl.SSLError) else str(err.reason)
    except ssl.SSLError:
        return None
    except (OSError, ValueError) as err:  # a timeout, a connection closed without an answer, a malformed URL
        return str(err) or type(err).__name__


def no_download_from(url: str) -> str | None:
    """Why ``url``'s host cannot serve a download now, in words ("huggingface.co does not answer (...)"); None: it
    answers."""
    why = unreachable(url, DOWNLOAD_PROBE_S)
    return f"{urlsplit(url).hostname} does not answer ({why})" if why else None


@contextlib.contextmanager
def stall_timeout():
    """Sockets opened inside wait at most :data:`DOWNLOAD_STALL_S` for each connect and read (the libraries that
    open them without a timeout, torch.hub's urllib, get Python's default); the default before is restored after.
    (Process-wide while it lasts: another thread's socket opened meanwhile gets the same limit, a minute of silence.)"""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_STALL_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def stalled_download(url: str, err: BaseException, seconds: float | None = None) -> str | None:
    """How a download from ``url`` that failed with ``err`` is said where it stalled ("the download stalled: <host> sent
    nothing for 60 s"; ``seconds``: the read timeout it ran under, :data:`DOWNLOAD_STALL_S` unless said); None where
    ``err`` is not a timeout."""
    if not _timed_out(err):
        return None
    return (f"the download stalled: {urlsplit(url).hostname or url} sent nothing for "
            f"{DOWNLOAD_STALL_S if seconds is None else seconds:g} s")


def _timed_out(err: BaseException | None) -> bool:
    """Whether ``err`` is, or was raised from, a socket timeout (urllib wraps one in URLError, httpx in ReadTimeout:
    the builtin TimeoutError is still in the chain)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError):
            return True
        err = err.__cause__ or err.__context__
    return False
