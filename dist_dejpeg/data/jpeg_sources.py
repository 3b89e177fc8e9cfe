"""Sources that were JPEGs, for prepare: what their pixels show (jpeg.quality.estimate_from_pixels: a JPEG file, or a
PNG saved from one) or, where the pixels hide the 8x8 grid (above about q90, 4:4:4, CMYK, a TIFF's RGB JPEG), what
their file says (a JPEG, or a TIFF of JPEG compression: the quality of its quantization tables); and what
--jpeg-sources (JPEG_SOURCE_ACTIONS) does with them, said once when the shards are published (warn_jpeg_sources).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dist_dejpeg.jpeg.formats import JPEG_SOURCE_ACTIONS, shown
from dist_dejpeg.jpeg.quality import estimate_from_pixels, estimate_from_tables

log = logging.getLogger(__name__)

# What prepare does with a JPEG source: "halve" (the default) uses it at half size, whose 2x2 area mean erases the grid,
# and at a quarter below q30 (benchmarks/experiments/halved_jpeg.py: a halved JPEG is as close to the halved original
# as a JPEG of it at q86 from q30, q93 from q50; from q10 and q20 halving once leaves q35 / q77, twice q83 / q96);
# "keep" uses it as it is (its artefacts become clean targets); "skip" rejects it.
HALVE_TWICE_BELOW = 30
# ... and "halve" uses one above q90 as it is, listed and warned of: a q92-98 JPEG (4:2:0) is 37-45 dB from its
# original (RGB PSNR, astronaut, coffee, chelsea), closer than the halved q50 JPEGs halve takes are to the halved
# original (35-38 dB); halving it would cost three quarters of its pixels for artefacts that faint. (The pixels show
# a grid to about q90: their check and the file's tables halve the same qualities.)
HALVE_UP_TO = 90
JPEG_START = b"\xff\xd8\xff"
TIFF_STARTS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # (BigTIFF too)
TIFF_JPEG = (6, 7)  # TIFF compression: JPEG of TIFF 6.0 (old-style), and JPEG
JPEG_FILE, TIFF_JPEG_FILE = "a JPEG file", "a TIFF of JPEG compression"


@dataclass(frozen=True)
class JpegFile:
    """A source's pixels and what its file says: ``kind`` (JPEG_FILE, TIFF_JPEG_FILE), of ``quality`` by its tables
    (folder.read_source's answer for such a file; any other source loads as its pixels alone)."""

    rgb: np.ndarray
    quality: int
    kind: str


def jpeg_file_quality(data: bytes) -> tuple[int, str] | None:
    """(quality, kind) of a JPEG container: a JPEG (or MPO) file's tables, a TIFF of JPEG compression's (its JPEGTables
    and its first strip or tile); None for any other file (a PNG costs a look at its first bytes), or tables that give
    no quality (jpeg.quality.estimate_from_tables)."""
    if not (data.startswith(JPEG_START) or data[:4] in TIFF_STARTS):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format in ("JPEG", "MPO"):
                tables, kind = getattr(img, "quantization", None), JPEG_FILE
            elif img.format == "TIFF" and img.tag_v2.get(259) in TIFF_JPEG:
                tables, kind = _tiff_jpeg_tables(img.tag_v2, data), TIFF_JPEG_FILE
            else:
                return None
    except Exception:  # noqa: BLE001 - not an image PIL opens: the decoder says what is wrong with it
        return None
    quality = estimate_from_tables(dict(tables or {})).quality
    return (quality, kind) if quality is not None else None


def _tiff_jpeg_tables(tags, data: bytes) -> dict:
    """The quantization tables of a TIFF's JPEG strips: its JPEGTables (tag 347, an abbreviated JPEG stream of the
    tables) put before its first strip or tile, which holds them itself where there is no JPEGTables."""
    offsets, counts = tags.get(273) or tags.get(324), tags.get(279) or tags.get(325)
    if not offsets or not counts:
        return {}
    first, tables = data[offsets[0]:offsets[0] + counts[0]], tags.get(347)
    if isinstance(tables, bytes) and tables.startswith(b"\xff\xd8") and first.startswith(b"\xff\xd8"):
        first = tables[:-2] + first[2:]  # (the tables' stream without its end, the strip's without its start)
    with Image.open(io.BytesIO(first)) as strip:
        return dict(getattr(strip, "quantization", None) or {})


def jpeg_treatment(rgb: np.ndarray, file: tuple[int, str] | None, action: str) -> dict:
    """What ``action`` (JPEG_SOURCE_ACTIONS) does with a source of pixels ``rgb`` whose file is ``file`` (jpeg_file's
    quality and kind, or None): {} for no JPEG; else "found", the quality its pixels show (~0.05 s: a 1024 px window at
    most), else its file's tables (then "jpeg_file", the kind), and "rejected" (skip) or "halved" (halve: 2 below
    HALVE_TWICE_BELOW, 1 up to HALVE_UP_TO; none above, where it is used as it is)."""
    found, kind = estimate_from_pixels(rgb).quality, None
    if found is None and file is not None:
        found, kind = file
    if found is None:
        return {}
    done = {"found": found} | ({"jpeg_file": kind} if kind else {})
    if action == "skip":
        where = (f"{kind} of q{found} (its quantization tables)" if kind else
                 f"JPEG compression in its pixels (q{found})")
        return done | {"rejected": f"{where}: --jpeg-sources halve or keep would use it"}
    if action == "halve" and found <= HALVE_UP_TO:
        done["halved"] = 2 if found < HALVE_TWICE_BELOW else 1
    return done


def warn_jpeg_sources(manifest: dict) -> None:
    """Say which sources carry JPEG compression and what was done with them (the manifest's jpeg_sources, jpeg_files,
    jpeg_action): once, when the shards are published (prepare folder may tile its sources twice)."""
    found, jpeg, files = manifest["jpeg_sources"], manifest["jpeg_action"], manifest.get("jpeg_files", {})
    sources = manifest["sources"]
    as_is = {n: q for n, q in found.items() if jpeg == "halve" and n in sources and "halved" not in sources[n]}
    acted = {n: q for n, q in found.items() if n not in as_is}
    total = len(sources) + len(manifest["rejected"])
    if acted:
        listed = ", ".join(f"{n} (q{q}{' by its tables' if n in files else ''})" for n, q in list(acted.items())[:5])
        log.warning("%d of %d photos carry JPEG compression in their pixels%s: %s; %s (--jpeg-sources %s; the others: "
                    "%s). Lossless originals are better (manifest.json: jpeg_sources)", len(acted), total,
                    " or their file's quantization tables" if set(files) & set(acted) else "",
                    listed + (", ..." if len(acted) > 5 else ""), JPEG_SOURCE_ACTIONS[jpeg], jpeg,
                    " or ".join(a for a in JPEG_SOURCE_ACTIONS if a != jpeg))
    if as_is:
        named = ", ".join(f"{shown(sources[n].get('path', n))} (q{q})" for n, q in list(as_is.items())[:5])
        log.warning("%d of %d photos are JPEGs above q%d, used at full size as they are (their artefacts are faint, "
                    "halving would cost three quarters of their pixels): %s%s. --jpeg-sources skip leaves them out; "
                    "lossless originals are better (manifest.json: jpeg_sources)", len(as_is), total, HALVE_UP_TO,
                    named, ", ..." if len(as_is) > 5 else "")
