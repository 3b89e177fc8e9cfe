"""Image files and formats, each set defined once (tests/test_layout.py fails if a second copy appears):
what a folder search picks up, which suffixes are lossy, what a shard sample may hold, and the JFIF colour
transform; the one rule by which prepare and restore read a photo's colours (rgb_image). Torch-free."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import struct
from collections import Counter
from pathlib import Path

# Photos a folder search picks up (prepare folder, restore, evaluate): what Pillow decodes.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".webp", ".tif", ".tiff", ".bmp",
                            ".ppm", ".pgm", ".pnm", ".gif", ".jp2"})
# EXIF Software of every file restore writes (restore/images.py: save_image), after the input's own as an image
# editor adds itself ("Adobe Photoshop Lightroom Classic 13.0; dist-dejpeg restore"; outputs from before: the mark
# alone): a search of restore's output folder leaves those files alone (restore/inputs.py), prepare folder refuses
# them as clean targets (a model's output, not a photo)
SOFTWARE_TAG = 0x0131
RESTORE_SOFTWARE = "dist-dejpeg restore"
SOFTWARE_KEPT = 200  # characters of the input's Software kept before the mark: a name (a longer value is junk)
# and beside it, in a private IFD0 tag, the source it was restored from (source_identity): an output folder's file of
# another photo is never replaced, nor skipped as done, as this one's (restore/inputs.py)
SOURCE_TAG = 0xEDE1


def software_text(value) -> str:
    """An EXIF Software value as text: bytes decoded, cut at its first NUL (cameras pad the field with them, and a
    reader stops there: a mark after one is unseen), spaces stripped."""
    text = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value or "")
    return text.split("\0", 1)[0].strip()


def restore_software(value) -> str:
    """The EXIF Software restore writes over an input's ``value``: its name, then restore's mark (once)."""
    name = software_text(value)
    if by_restore(name) or not name:
        return name or RESTORE_SOFTWARE
    return f"{name[:SOFTWARE_KEPT]}; {RESTORE_SOFTWARE}"


def by_restore(software) -> bool:
    """Whether an EXIF Software value carries restore's mark (restore_software's, or the mark alone)."""
    text = software_text(software)
    return text.startswith(RESTORE_SOFTWARE) or text.endswith(f"; {RESTORE_SOFTWARE}")


def written_by_restore(image: str | os.PathLike | bytes) -> bool:
    """Whether the image file (a path, or its bytes) was written by restore: its EXIF Software says so."""
    return restore_mark(image)[0]


def restore_mark(image: str | os.PathLike | bytes) -> tuple[bool, dict[str, str] | None]:
    """(whether restore wrote the image file, a path or its bytes: written_by_restore; the source it wrote it from,
    source_identity's fields, or None: no output of restore, or one an older version wrote without them)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
            if img.format == "PNG" and "exif" not in img.info:  # (getexif would decode the pixels to look for an
                return False, None  # eXIf chunk after them: a folder search decoded every PNG; restore writes it
            exif = img.getexif()  # before them)
            if not by_restore(exif.get(SOFTWARE_TAG, "")):
                return False, None
            return True, parse_source(exif.get(SOURCE_TAG))
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError ... for a file it cannot read
        return False, None


def source_identity(path: str | os.PathLike) -> str:
    """What restore writes into an output (EXIF SOURCE_TAG) of the input file ``path``: the SHA-256 of its bytes
    (the photo), a hash of its resolved path (which file: a re-scan keeps it, another folder's photo of the same name
    has its own; the path itself is not written, an output being shared), and its name (said in messages)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    where = hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:16]
    return f"sha256:{digest.hexdigest()} path:{where} name:{shown(Path(path).name)}"


def parse_source(value) -> dict[str, str] | None:
    """source_identity's fields (sha256, path, name) from an EXIF value, or None where it holds none."""
    text = software_text(value)
    fields = dict(part.split(":", 1) for part in text.split(" ", 2) if ":" in part)
    return fields if {"sha256", "path", "name"} <= set(fields) else None


def hidden(name: str) -> bool:
    """A hidden file or folder, which a folder search skips as a shell glob does: macOS's AppleDouble ``._IMG.jpg``
    (not an image), ``.thumbnails`` and ``.@__thumb`` copies (they repeat the photos)."""
    return name.startswith(".")


def shown(path: str | Path) -> str:
    """A path as people read it: the bytes of a name that is not UTF-8 (b"caf\\xe9.png", which Python holds as a lone
    surrogate, "caf\\udce9.png": what the manifest records) as \\xe9, readable where a terminal showed nothing."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def walk_files(folder) -> list[Path]:
    """The files under ``folder``: symlinked sub-folders followed (each real folder once: a link loop ends), broken
    links kept (their readers say what is missing: a photo moved away is not left out unsaid), hidden files and
    folders skipped (a hidden one named by itself is used)."""
    found, seen = [], set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not hidden(d))
        found += [p for p in (Path(top, n) for n in names if not hidden(n))
                  if p.is_file() or (p.is_symlink() and not p.exists())]
    return found


def images_in(folder) -> list[Path]:
    """The image files walk_files finds below ``folder`` (IMAGE_SUFFIXES, in any case), sorted: what restore and
    evaluate take from a folder, as prepare folder does."""
    return sorted(p for p in walk_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES)


# Photo formats a folder may hold beside IMAGE_SUFFIXES, which its search leaves out (no JPEGs: HEIC and AVIF hold
# another codec's artefacts, RAW none; PIL reads few of them): counted and named, never left out without a word
OTHER_PHOTO_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf",
                                  ".rw2", ".raf", ".pef", ".srw", ".psd", ".exr"})


def others_in(folder) -> list[Path]:
    """The files walk_files finds below ``folder`` in OTHER_PHOTO_SUFFIXES (in any case), sorted: the photos
    images_in leaves out, to be named."""
    return sorted(p for p in walk_files(folder) if p.suffix.lower() in OTHER_PHOTO_SUFFIXES)


def suffix_counts(files) -> str:
    """How many of ``files`` have each suffix, in lower case ("2 .heic, 1 .cr2")."""
    counts = Counter(Path(p).suffix.lower() for p in files)
    return ", ".join(f"{n} {suffix}" for suffix, n in sorted(counts.items()))


JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})
# Not usable as a reference: compressed already (webp may be lossless; it cannot be told cheaply; .mpo: a camera's
# multi-picture file, JPEGs).
LOSSY_SUFFIXES = JPEG_SUFFIXES | {".webp", ".mpo"}
# The largest photo restore (--max-pixels' default) and prepare take: 100 MP; PIL's own decompression-bomb limit
# (89.5 MP) warns above its value and refuses above twice it, so both check the header size against this instead.
DEFAULT_MAX_PIXELS = 100_000_000
# The size an image file (or tar or zip member) is checked against before it is read whole: 8 bytes a pixel of the
# pixel limit (a 100 MP 16-bit RGBA TIFF stored uncompressed: 800 MB) with room for its metadata, 1 GiB at least.
# Over it, what costs a few KB on disk but that much memory read is refused, named: a sparse file or a zip member
# more than ZIP_RATIO times the bytes it stores (a zip bomb; photos do not compress so), a tar's sparse member; real
# bytes (a layered TIFF of a few GB) are read, up to HARD_FACTOR times it.
BYTES_PER_PIXEL = 8
MAX_FILE_BYTES = 1 << 30
HARD_FACTOR = 8
ZIP_RATIO = 20


def file_limit(max_pixels: int | None = None) -> int:
    """The size an image file of at most ``max_pixels`` (restore's --max-pixels) is checked against."""
    return max(MAX_FILE_BYTES, BYTES_PER_PIXEL * (max_pixels or 0) * 5 // 4)  # (a quarter more: its metadata)


def too_big(size: int, limit: int | None = None, sparse: bool = False, on_disk: int | None = None) -> str | None:
    """Why a file (or archive member) of ``size`` bytes is not read (None: it is): over ``limit`` (file_limit())
    and ``sparse`` (a tar's sparse member) or ``on_disk`` bytes stored (a file's blocks, a zip member's compressed
    size) far fewer than it holds, or over HARD_FACTOR times ``limit`` whatever it is."""
    limit = limit or file_limit()
    if sparse:
        return f"a sparse tar member of {size} bytes (holes of zeros, not an image): not read"
    hint = "; restore and prepare's --max-pixels raise the limit"
    if size > limit and on_disk is not None and on_disk * ZIP_RATIO < size:
        return (f"{size / 2**30:.3g} GiB from {on_disk / 2**20:.3g} MiB stored (a sparse file or a decompression "
                f"bomb): not read")
    if size > HARD_FACTOR * limit:
        return (f"{size / 2**30:.3g} GiB, over the {HARD_FACTOR * limit / 2**30:.3g} GiB an image file is read with: "
                f"not read{hint}")
    return None


def checked_size(path: str | os.PathLike, limit: int | None = None) -> str | None:
    """too_big's reason for the file at ``path`` (its size and blocks from stat; OSError where it cannot be)."""
    st = os.stat(path)
    blocks = getattr(st, "st_blocks", None)  # (none on Windows)
    return too_big(st.st_size, limit, on_disk=None if blocks is None else blocks * 512)

# What restore writes: name -> (suffix, Pillow format, Pillow save options). png: lossless, the default; jpg:
# quality 95 with full-resolution chroma (4:4:4) and optimized Huffman tables; webp: lossless; tiff: lossless,
# deflate-compressed with a predictor. A quality (`restore --output-quality Q`) makes jpg and webp write at Q (webp lossy).
OUTPUT_FORMATS = {
    "png": (".png", "PNG", {}),
    "jpg": (".jpg", "JPEG", {"quality": 95, "subsampling": 0, "optimize": True}),
    "webp": (".webp", "WEBP", {"lossless": True}),
    # tag 317 = 2: horizontal differencing before deflate (photos: about a quarter smaller)
    "tiff": (".tiff", "TIFF", {"compression": "tiff_adobe_deflate", "tiffinfo": {317: 2}}),
}
SAME_FORMAT = "same"  # each input written in its own format where restore can write it (see output_format)
# `--format same`: the input suffixes written in their own format (under their own suffix); any other: png
SAME_FORMAT_OF = {**{s: "jpg" for s in JPEG_SUFFIXES}, ".mpo": "jpg", ".png": "png", ".webp": "webp"}
SAME_SUFFIX_OF = {".mpo": ".jpg"}  # a camera's MPO restored as its first picture: a JPEG, named as one
# The Pillow format each output suffix is written in (a `same` output keeps its input's suffix: .jpeg, .JPG)
OUTPUT_SUFFIXES = {**{s: "JPEG" for s in JPEG_SUFFIXES}, **{v[0]: v[1] for v in OUTPUT_FORMATS.values()},
                   ".tif": "TIFF"}
# Pillow formats that can hold an alpha channel
ALPHA_FORMATS = frozenset({"PNG", "WEBP", "TIFF"})


def output_format(fmt: str, source_suffix: str) -> tuple[str, str]:
    """(format name, output suffix) of an input with ``source_suffix`` written as ``fmt`` (an OUTPUT_FORMATS
    name, or SAME_FORMAT: a JPEG, PNG or WebP input keeps its format and its own suffix, a camera's MPO is a .jpg,
    any other is png)."""
    if fmt == SAME_FORMAT:
        same = SAME_FORMAT_OF.get(source_suffix.lower())
        if not same:
            return "png", OUTPUT_FORMATS["png"][0]
        return same, SAME_SUFFIX_OF.get(source_suffix.lower(), source_suffix)
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {', '.join([*OUTPUT_FORMATS, SAME_FORMAT])}, got {fmt!r}")
    return fmt, OUTPUT_FORMATS[fmt][0]


def save_options(suffix: str, quality: int | None = None) -> tuple[str, dict]:
    """(Pillow format, save options) for an output file with ``suffix``; ``quality``: jpg and webp written at
    that quality (webp then lossy) instead of their defaults."""
    pil = OUTPUT_SUFFIXES.get(suffix.lower())
    if pil is None:
        raise ValueError(f"unknown output suffix {suffix!r}: one of {', '.join(sorted(OUTPUT_SUFFIXES))}")
    options = dict(next(v[2] for v in OUTPUT_FORMATS.values() if v[1] == pil))
    if quality is not None and pil in ("JPEG", "WEBP"):
        options.update(quality=int(quality))
        if pil == "WEBP":
            options["lossless"] = False
    return pil, options

# Extensions a shard sample may carry its image under, in order of preference. "raw" is an uncompressed
# square H x W x 3 uint8 tile (no decode at all; the side follows from the byte count).
SHARD_EXTS = ("png", "raw", "jp2", "webp", "tif", "tiff", "ppm", "bmp", "jpg", "jpeg")
# Lossless formats a shard can be written in (`prepare --format`).
TILE_FORMATS = ("png", "raw", "jp2")


def icc_space(icc: bytes | None) -> str | None:
    """The colour space an ICC profile describes ("RGB", "GRAY", "CMYK", ...), from its header."""
    if not icc or len(icc) < 128 or icc[36:40] != b"acsp":
        return None
    return icc[16:20].decode("ascii", "replace").strip()


@functools.cache
def srgb_profile():
    """LittleCMS's built-in sRGB profile, built once (its header carries the creation time)."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def cmyk_to_srgb(icc: bytes | None):
    """A LittleCMS transform from the embedded CMYK profile to sRGB (perceptual), or None: no profile, another
    colour space, one LittleCMS cannot use, or a Pillow built without LittleCMS (then PIL's naive conversion)."""
    if icc_space(icc) != "CMYK":
        return None
    try:
        from PIL import ImageCms

        return ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), srgb_profile(), "CMYK", "RGB")
    except Exception:  # noqa: BLE001 - ImportError without LittleCMS, PyCMSError for a broken profile
        return None


def rgb_image(img, icc: bytes | None = None):
    """An opaque PIL image as RGB by the one rule prepare's tiles and restore's inputs share: RGB keeps its own
    values whatever its profile (Adobe RGB, Display P3: a JPEG of it holds its artefacts in those values, and sRGB
    would clip the wider gamut; restore writes the profile back), CMYK goes to sRGB through its embedded profile
    ``icc`` (LittleCMS), without one and any other mode (grayscale, palette, Lab, YCbCr) as PIL converts it."""
    transform = cmyk_to_srgb(icc) if img.mode == "CMYK" else None
    return transform.apply(img) if transform is not None else img.convert("RGB")


def bit_depth(img, path: str | os.PathLike | None = None) -> int:
    """Bits per sample as the PIL image ``img``'s file stores them, from its header (TIFF, PPM/PGM, PNG; 8 for any
    other format), read before it is loaded (``path``: the file's; None: an image opened from bytes). PIL opens a
    16-bit RGB PNG, TIFF or PPM as 8-bit RGB."""
    if img.format == "TIFF":
        bits = img.tag_v2.get(258, 8)
        return max(bits) if isinstance(bits, tuple) else int(bits)
    if img.format == "PPM":  # a 16-bit P6 (dcraw -4, RAW converters) opens as RGB: its tile names the maxval
        maxval = next((t.args[1] for t in img.tile if isinstance(t.args, tuple) and len(t.args) > 1
                       and isinstance(t.args[1], int)), 255)  # (a PGM of maxval 65535: a raw tile, "I;16B")
        return 16 if any(";16" in str(t.args) for t in img.tile) else max(8, int(maxval).bit_length())
    if img.format != "PNG":
        return 8
    head = b""
    if path is not None:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            head = f.read(33)
    # opened from bytes, or the file gone since: its tile names the raw mode ("RGB;16B") until it is loaded
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return 16 if any(";16" in str(t.args) for t in img.tile) else 8
    return struct.unpack(">B", head[24:25])[0]


def is_animation(img, fmt: str | None = None) -> bool:
    """An animated GIF, PNG or WebP (``fmt``: its format, if PIL's is not set): one image is written of one, one
    trained on. A camera's MPO (its photo first) and a TIFF's preview pages are not (TIFF pages: tiff_pages)."""
    return (fmt or img.format) in ("GIF", "PNG", "WEBP") and bool(getattr(img, "is_animated", False))


def tiff_pages(img) -> int:
    """How many full images a TIFF (an open PIL image) holds: its pages, less the reduced-resolution ones
    (NewSubfileType bit 0: previews of the first); left on the first page."""
    pages = 1
    for page in range(1, getattr(img, "n_frames", 1)):
        img.seek(page)
        pages += not img.tag_v2.get(254, 0) & 1
    img.seek(0)
    return pages


# chroma subsampling -> Pillow's code for it (evaluate/report --subsampling; 4:2:0 is libjpeg's default)
SUBSAMPLING = {"4:2:0": 2, "4:2:2": 1, "4:4:4": 0}
# what prepare folder does with a photo whose pixels show JPEG compression (--jpeg-sources; data/shards.py), as its
# warning says it
JPEG_SOURCE_ACTIONS = {"halve": "used at half size (a quarter below q30), where a 2x2 area mean erases the 8x8 grid",
                       "keep": "kept as they are: their artefacts become the clean targets the model learns to produce",
                       "skip": "left out"}
# Encoded (not raw) shard extensions: DALI's webdataset reader takes them as one ';'-joined component.
ENCODED_SHARD_EXTS = tuple(e for e in SHARD_EXTS if e != "raw")
LOSSY_SHARD_EXTS = frozenset(s.lstrip(".") for s in LOSSY_SUFFIXES) & frozenset(SHARD_EXTS)

# JFIF (JPEG's own) full-range RGB -> YCbCr, rows Y, Cb, Cr, without the +128 chroma offset: the GPU JPEG
# path's 4:2:0 rebuild, the chroma-weighted pixel loss and validation's per-plane PSNR all use it
JFIF_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
