"""PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, a process-wide global that ``Image.open`` and a
GIF's frames read) held raised while a file is opened and decoded, by any number of threads at once. Torch-free.

Every decode that changes the limit goes through ``pixel_limit``: one lock, one count of who is inside. A second
helper saving and restoring the global on its own (prepare's decode_rgb8 did, beside restore's thread pool)
could put back a value saved while another thread had it raised: that thread's limit defeated, and the limit
left off (or raised) for good once both had left."""

from __future__ import annotations

import contextlib
import threading
import warnings

from PIL import Image


@contextlib.contextmanager
def pixel_limit(max_pixels: int | None):
    """PIL's own decompression-bomb limit raised to ``max_pixels`` (None: lifted) while one file is opened (the
    caller checks the size first, from the header), its warnings above that limit and on a camera's malformed EXIF
    silenced. Threads may nest it: the first to enter saves PIL's limit and adds the two filters; while any is
    inside the limit is the highest any asks for (lifted if one asks for None), never below the one saved; the
    last to leave puts the limit back and removes the filters (filters others added meanwhile stay).
    warnings.catch_warnings, entered and left in another order by two threads, put back the other's filters,
    leaking them for good."""
    global _saved
    with _LIMIT:
        if not _inside:
            before = warnings.filters[:]
            # (PIL's warning above its limit: the size is checked, and said, by the caller; a camera's malformed
            # EXIF, "Corrupt EXIF data": restore's output_metadata drops what it cannot read)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            added = [warnings.filters[0]]
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
            added.append(warnings.filters[0])
            _saved = (Image.MAX_IMAGE_PIXELS, [f for f in added if f not in before])  # (one there before stays)
        _inside.append(max_pixels)
        _set()
    try:
        yield
    finally:
        with _LIMIT:
            _inside.remove(max_pixels)
            if _inside:
                _set()
            else:
                Image.MAX_IMAGE_PIXELS = _saved[0]
                for entry in _saved[1]:
                    if entry in warnings.filters:
                        warnings.filters.remove(entry)
                warnings.simplefilter("default", _Never)  # (any change tells the warning caches the filters moved)
                warnings.filters.remove(("default", None, _Never, None, 0))


def own_limit() -> int | None:
    """PIL's limit as its user set it (None: none), whatever pixel_limit holds it at meanwhile."""
    with _LIMIT:
        return _saved[0] if _inside else Image.MAX_IMAGE_PIXELS


def _set() -> None:
    """PIL's limit while pixel_limit is held (under _LIMIT): the highest asked for, None if any asks for none."""
    asked = [*_inside, _saved[0]]
    Image.MAX_IMAGE_PIXELS = None if None in asked else max(asked)


class _Never(Warning):
    """A warning never raised: its filter, added and removed, marks the filters as changed."""


_LIMIT = threading.Lock()
_inside: list[int | None] = []  # the limits of the pixel_limit calls now open
_saved: tuple[int | None, list] = (None, [])  # what the first of them found: PIL's limit, the filters it added
