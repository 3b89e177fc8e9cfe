"""Whether a server a run needs answers, asked once with a short timeout before a library's own retries (minutes
of them for MLflow's client, ~45 s for huggingface_hub, none at all for torch.hub's download): an MLflow tracking
server (train/trackers.py), the hosts of pretrained weights (models/weights.py, train/launch.py). Torch-free."""

from __future__ import annotations

from urllib.parse import urlsplit

DOWNLOAD_PROBE_S = 5  # a weights host that does not answer in this long cannot serve a download: said at once


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
