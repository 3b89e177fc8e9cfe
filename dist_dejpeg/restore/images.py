"""Image files in and out of restoration: ``load_image`` refuses what cannot be restored with a reason,
``save_image`` writes atomically in the format its suffix names (jpeg/formats.py: OUTPUT_FORMATS). Torch-free.

EXIF orientation is applied; grayscale, palette, RGBA/LA (alpha kept and written back unchanged), CMYK and
YCbCr JPEGs are read; grayscale input gives grayscale output. 16-bit images are refused (a JPEG is 8-bit: a
16-bit file never was one), as are images over ``max_pixels`` (checked from the header, before decoding:
decompression bombs), animations (GIF, APNG, WebP: one image is written, so the other frames would be lost)
and TIFFs of several pages (reduced-resolution pages, previews, do not count); a camera's MPO keeps its first
image, the photo.

Metadata: the input's ICC profile, EXIF (camera, dates, GPS, ...) and XMP (ratings, keywords, captions, edits) go
into the output (PNG iCCP + eXIf + iTXt, JPEG APP2 + APP1, TIFF tags, WebP ICCP/EXIF/XMP chunks). A JPEG holds at
most 64 KB of each of EXIF and XMP (one marker segment): a larger EXIF loses its largest values (a maker note, a
Photoshop block) until it fits, a larger XMP is left out, each with a warning; the image is still written. A TIFF is
written deflate-compressed, except where the EXIF has sub-IFDs (the Exif and GPS ones: dates, exposure, location),
which Pillow's compressed-TIFF writer (libtiff) cannot write: that TIFF is written uncompressed, so that nothing is
lost. The EXIF orientation is applied to the pixels once, so the written EXIF says Orientation 1 (and the Exif IFD's
pixel dimensions are the output's), and the XMP's tiff:Orientation is removed (as PIL's exif_transpose does); the
thumbnail (IFD1) is not carried. A JPEG's comment (COM) and its APP13 segments (IPTC captions, credits, copyright
in Photoshop resource blocks, carried whole) go into a JPEG output; a PNG gets the comment as its "Comment" text and
no IPTC; WebP and TIFF outputs neither. The pixel density (dpi: JFIF, pHYs, TIFF resolution) is carried too, x and y
swapped by a quarter turn. Colours are read by the rule prepare's tiles share (jpeg.formats.rgb_image): RGB keeps its
own values and its profile (Adobe RGB, Display P3: restored where its JPEG artefacts are, no gamut clipped); a
profile is carried only where it describes the output's colours: RGB for RGB output, GRAY for grayscale. A CMYK
input with an embedded profile is converted to sRGB through that profile (LittleCMS via PIL.ImageCms, perceptual
intent) and the output carries the sRGB profile LittleCMS builds; a CMYK input without one is converted as PIL does
(naively) and carries no profile.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from dist_dejpeg.jpeg.formats import (ALPHA_FORMATS, DEFAULT_MAX_PIXELS, RESTORE_SOFTWARE, SOFTWARE_TAG, cmyk_to_srgb,
                                      icc_space, rgb_image, save_options, srgb_profile)
from dist_dejpeg.run.files import atomic_write_bytes

log = logging.getLogger(__name__)

GRAY_MODES = ("L", "LA", "1")  # single-channel inputs: written back single-channel
ORIENTATION = 0x0112  # EXIF tag
EXIF_IFD, PIXEL_X, PIXEL_Y = 0x8769, 0xA002, 0xA003  # the Exif sub-IFD and its pixel dimensions
X_RESOLUTION = 282  # TIFF tag: without it PIL reads a TIFF as 1 dpi, which the file never said
SUB_IFDS = (EXIF_IFD, 0x8825, 0xA005)  # pointers to the Exif, GPS and Interoperability sub-IFDs
# TIFF tags that describe how a file's pixels are stored, not the photo: a TIFF input's getexif() holds them,
# and written into another file they would describe the wrong pixels (in a TIFF output, corrupt it)
STORAGE_TAGS = frozenset({254, 255, 256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 284, 292, 293, 317, 320,
                          322, 323, 324, 325, 330, 338, 339, 347, 513, 514, 529, 530, 531, 532, 34675})
XMP_TAG = 700  # a TIFF's XMP, in its getexif(): carried as the output's XMP (output_xmp), not inside its EXIF
TURNED = (2, 3, 4, 5, 6, 7, 8)  # EXIF orientations exif_transpose applies to the pixels
XMP_ORIENTATION = re.compile(rb'tiff:Orientation="[0-9]"|<tiff:Orientation>[0-9]</tiff:Orientation>')
JPEG_MARKER_MAX = 65533  # the data one JPEG marker segment holds: all of a JPEG's EXIF (APP1), or its XMP
XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"  # what a JPEG's XMP segment starts with


class InputImageError(ValueError):
    """An input file that cannot be restored (not an image, truncated, 16-bit, too large, ...)."""


@dataclass
class LoadedImage:
    rgb: np.ndarray  # H x W x 3 uint8, EXIF orientation applied
    alpha: np.ndarray | None  # H x W uint8, or None
    grayscale: bool  # the file was single-channel: write single-channel
    mode: str  # the file's PIL mode
    format: str  # the file's format (JPEG, PNG, ...)
    image: Image.Image | None = None  # the opened file, any format (its JPEG tables, info; pixels in ``rgb``)
    icc_profile: bytes | None = None  # the profile to write with the output (see the module docstring)
    exif: bytes | None = None  # the EXIF to write with the output, Orientation reset to 1
    xmp: bytes | None = None  # the XMP packet to write with the output, its orientation removed (output_xmp)
    dpi: tuple[float, float] | None = None  # the pixel density to write with the output (output_dpi)
    comment: bytes | None = None  # a JPEG's comment (COM) to write with the output (jpeg_notes)
    iptc: tuple[bytes, ...] = ()  # a JPEG's APP13 segments (IPTC in Photoshop resource blocks): jpeg_notes


def _bit_depth(img: Image.Image, path: Path) -> int:
    """Bits per sample as the file stores them: PIL opens a 16-bit RGB PNG or TIFF as 8-bit RGB, silently."""
    if img.format == "TIFF":
        bits = img.tag_v2.get(258, 8)
        return max(bits) if isinstance(bits, tuple) else int(bits)
    if img.format == "PPM":  # a 16-bit P6 (dcraw -4, RAW converters) opens as RGB: its tile names the maxval
        maxval = next((t.args[1] for t in img.tile if isinstance(t.args, tuple) and len(t.args) > 1
                       and isinstance(t.args[1], int)), 255)
        return max(8, int(maxval).bit_length())
    if img.format != "PNG":
        return 8
    with open(path, "rb") as f:
        head = f.read(33)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return 8
    return struct.unpack(">B", head[24:25])[0]


@contextlib.contextmanager
def pixel_limit(max_pixels: int):
    """PIL's own decompression-bomb limit raised to ``max_pixels`` while one file is opened (we check first)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(max_pixels, saved or 0)
    try:
        with warnings.catch_warnings():  # (PIL's warning above its limit: the size is checked, and said, here)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def split_image(img: Image.Image, source: str = "image") -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(H x W x 3 uint8 RGB, H x W uint8 alpha or None, single-channel?) of a decoded PIL image, EXIF
    orientation applied, CMYK converted through its embedded profile where it has one. 16-bit and float images
    are an InputImageError."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        raise InputImageError(f"{source}: a 16-bit (or float) image, mode {img.mode}: JPEG is 8-bit, so this "
                              f"never was a JPEG; convert it to 8 bits first if it holds a decoded JPEG")
    icc = img.info.get("icc_profile")
    img = ImageOps.exif_transpose(img)
    alpha = None
    # alpha, premultiplied alpha, or a transparent colour (tRNS: a palette entry, a grey level or an RGB colour)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        alpha = np.ascontiguousarray(np.asarray(rgba)[..., 3])
        rgb = np.asarray(rgba.convert("RGB"))
    else:
        rgb = np.asarray(rgb_image(img, icc))
    return np.ascontiguousarray(rgb), alpha, img.mode in GRAY_MODES


def output_metadata(img: Image.Image, grayscale: bool) -> tuple[bytes | None, bytes | None]:
    """(ICC profile, EXIF bytes) for the restored output of ``img`` (the opened file, before orientation is
    applied): see the module docstring. Unreadable EXIF is dropped, never an error."""
    icc = img.info.get("icc_profile") or None
    space = icc_space(icc)
    if img.mode == "CMYK":
        icc = srgb_profile().tobytes() if cmyk_to_srgb(icc) is not None else None
    elif space != ("GRAY" if grayscale else "RGB"):
        icc = None
    try:
        found = img.getexif()  # PIL's cached object: copied through bytes, never changed in place
        if not found:
            return icc, None
        exif = Image.Exif()
        exif.load(found.tobytes())
        turned = exif.get(ORIENTATION, 1) in (5, 6, 7, 8)
        for tag in (STORAGE_TAGS | {XMP_TAG}) & set(exif):
            del exif[tag]
        if ORIENTATION in exif:
            exif[ORIENTATION] = 1  # applied to the pixels once
        sub = exif.get_ifd(EXIF_IFD) if EXIF_IFD in exif else {}  # get_ifd would add an empty one
        if PIXEL_X in sub or PIXEL_Y in sub:
            w, h = img.size
            sub[PIXEL_X], sub[PIXEL_Y] = (h, w) if turned else (w, h)
        return icc, exif.tobytes()
    except Exception:  # noqa: BLE001 - PIL raises many types for malformed EXIF
        return icc, None


def output_xmp(img: Image.Image) -> bytes | None:
    """The XMP packet of ``img`` (the opened file) for its output, or None: its tiff:Orientation removed where
    the EXIF orientation turns the pixels (applied once, as PIL's exif_transpose removes it)."""
    xmp = img.info.get("xmp")
    if not xmp:
        return None
    xmp = xmp.encode() if isinstance(xmp, str) else bytes(xmp)
    try:
        turned = img.getexif().get(ORIENTATION, 1) in TURNED
    except Exception:  # noqa: BLE001 - malformed EXIF: nothing is turned
        turned = False
    return XMP_ORIENTATION.sub(b"", xmp) if turned else xmp


def jpeg_notes(img: Image.Image) -> tuple[bytes | None, tuple[bytes, ...]]:
    """(comment, APP13 segments) of ``img`` (the opened file) where it is a JPEG (or a camera's MPO): its COM text
    (Pillow keeps the last of several) and its APP13 segments (Photoshop's resource blocks: the IPTC caption,
    credit, copyright)."""
    if img.format not in ("JPEG", "MPO"):
        return None, ()
    return img.info.get("comment") or None, tuple(data for marker, data in img.applist if marker == "APP13")


def with_app13(jpeg: bytes, segments: tuple[bytes, ...]) -> bytes:
    """The JPEG ``jpeg`` (as Pillow writes one: SOI, then its APPn segments) with the APP13 ``segments`` put after
    its APPn segments, where Photoshop and exiftool write them: Pillow has no save option for them."""
    at = 2
    while jpeg[at] == 0xFF and 0xE0 <= jpeg[at + 1] <= 0xEF:
        at += 2 + int.from_bytes(jpeg[at + 2:at + 4], "big")
    return jpeg[:at] + b"".join(b"\xff\xed" + (len(s) + 2).to_bytes(2, "big") + s for s in segments) + jpeg[at:]


def output_dpi(img: Image.Image) -> tuple[float, float] | None:
    """The pixel density (x, y dpi) of ``img`` (the opened file) for its output, swapped where the EXIF
    orientation turns the pixels a quarter; None where the file gives none."""
    dpi = img.info.get("dpi")
    if not dpi or min(dpi) <= 0 or (img.format == "TIFF" and X_RESOLUTION not in img.tag_v2):
        return None
    try:
        turned = img.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - malformed EXIF: output_metadata drops it too
        turned = False
    return (float(dpi[1]), float(dpi[0])) if turned else (float(dpi[0]), float(dpi[1]))


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> H x W uint8: the mean of the channels (a grayscale input restored as RGB goes back)."""
    return np.rint(rgb.astype(np.float32).mean(axis=2)).astype(np.uint8)


def join_image(rgb: np.ndarray, alpha: np.ndarray | None = None, grayscale: bool = False) -> Image.Image:
    """The inverse of split_image: grayscale back to L (the mean of the restored channels), alpha put back."""
    if grayscale:
        gray = to_gray(rgb)
        return Image.fromarray(gray, "L") if alpha is None else Image.fromarray(np.dstack([gray, alpha]), "LA")
    return Image.fromarray(rgb, "RGB") if alpha is None else Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read ``path`` for restoration; every refusal is an InputImageError that says why."""
    path = Path(path)
    try:
        with pixel_limit(max_pixels):
            img = Image.open(path)
    except FileNotFoundError:
        raise InputImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputImageError(f"{path}: a folder, not an image") from None
    except Exception as err:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError, SyntaxError ...
        raise InputImageError(f"{path}: not an image PIL can read ({type(err).__name__}: {err})") from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise InputImageError(f"{path}: {w} x {h} = {w * h / 1e6:.3g} megapixels is over the limit of "
                                  f"{max_pixels / 1e6:.3g} (a decompression bomb?); raise it with --max-pixels")
        if (bits := _bit_depth(img, path)) > 8:
            raise InputImageError(f"{path}: a {bits}-bit {img.format}: JPEG is 8-bit, so this file never was a JPEG; "
                                  f"convert it to 8 bits first if it holds a decoded JPEG")
        mode, fmt = img.mode, img.format or path.suffix.lstrip(".").upper()
        if fmt in ("GIF", "PNG", "WEBP") and getattr(img, "is_animated", False):
            raise InputImageError(f"{path}: an animated {fmt} ({img.n_frames} frames): restore writes one image, so "
                                  f"all but the first frame would be lost; save the frames as separate images")
        try:
            with pixel_limit(max_pixels):
                pages = _tiff_pages(img) if fmt == "TIFF" else 1
                img.load()
        except Exception as err:  # noqa: BLE001 - truncated or corrupt data
            raise InputImageError(f"{path}: cannot decode ({type(err).__name__}: {err})") from None
        if pages > 1:
            raise InputImageError(f"{path}: a TIFF of {pages} pages: restore writes one image, so all but the first "
                                  f"page would be lost; save the pages as separate images")
        icc, exif = output_metadata(img, img.mode in GRAY_MODES)  # before split_image turns the pixels
        rgb, alpha, grayscale = split_image(img, str(path))
        comment, iptc = jpeg_notes(img)
        return LoadedImage(rgb=rgb, alpha=alpha, grayscale=grayscale, mode=mode, format=fmt, image=img,
                           icc_profile=icc, exif=exif, xmp=output_xmp(img), dpi=output_dpi(img), comment=comment,
                           iptc=iptc)


def _tiff_pages(img: Image.Image) -> int:
    """How many full images a TIFF holds: its pages, less the reduced-resolution ones (NewSubfileType bit 0:
    previews of the first); left on the first page."""
    pages = 1
    for page in range(1, getattr(img, "n_frames", 1)):
        img.seek(page)
        pages += not img.tag_v2.get(254, 0) & 1
    img.seek(0)
    return pages


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # a PNG's last chunk
JPEG_END = b"\xff\xd9"  # a JPEG's EOI marker (what restore writes ends with it)


def output_complete(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Whether ``path`` holds a whole image in the format its suffix names: the header opens, the pixels decode
    to the end (a truncated file raises), a PNG ends with its IEND chunk, a JPEG with its EOI marker, a WebP is
    as long as its RIFF header says, and PIL gives no warning (a TIFF whose directory is cut short only warns;
    at worst a complete file is restored again). A full decode costs little next to a restore and its encode
    (seen on one CPU core, 12 MP: PNG 24 ms per megapixel, WebP 39, TIFF 4), and only it sees every byte."""
    path = Path(path)
    try:
        with warnings.catch_warnings(), pixel_limit(max_pixels):
            warnings.simplefilter("error")
            with Image.open(path) as img:
                if img.format != Image.registered_extensions().get(path.suffix.lower()):
                    return False
                with open(path, "rb") as f:
                    head = f.read(12)
                    f.seek(-len(PNG_END), os.SEEK_END)
                    tail, size = f.read(), f.tell()
                if ((img.format == "PNG" and tail != PNG_END) or (img.format == "JPEG" and tail[-2:] != JPEG_END)
                        or (img.format == "WEBP" and struct.unpack("<I", head[4:8])[0] + 8 != size)):
                    return False
                img.load()
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError ... for broken files
        return False
    return True


def save_image(rgb: np.ndarray, path: str | Path, *, alpha: np.ndarray | None = None, grayscale: bool = False,
               icc_profile: bytes | None = None, exif: bytes | None = None, quality: int | None = None,
               dpi: tuple[float, float] | None = None, xmp: bytes | None = None, comment: bytes | None = None,
               iptc: tuple[bytes, ...] = ()) -> None:
    """Write in the format ``path``'s suffix names, with its OUTPUT_FORMATS options (``quality``: jpg and webp
    at that quality), atomically: encoded first, then a temporary file renamed into place
    (run.files.atomic_write_bytes). ``icc_profile``, ``exif`` and ``xmp`` (LoadedImage's) are embedded when
    given; in a JPEG, within its 64 KB per marker (see the module docstring). An alpha channel for a format that
    cannot hold one (JPEG) is an InputImageError, never dropped silently. ``dpi``: the pixel density written (a
    WebP has no field for it). ``comment`` and ``iptc`` (a JPEG input's, jpeg_notes): a JPEG gets both, a PNG the
    comment as its "Comment" text; WebP and TIFF neither. Every output's EXIF Software names restore
    (``marked``; a search of the output folder leaves such files alone: restore/inputs.py)."""
    path = Path(path)
    try:
        fmt, options = save_options(path.suffix, quality)
    except ValueError as err:
        raise InputImageError(f"{path}: {err}") from None
    if alpha is not None and fmt not in ALPHA_FORMATS:
        raise InputImageError(f"{path}: the image has an alpha channel (transparency), which {fmt} cannot hold; "
                              f"write it as png, webp or tiff (--format, or --format same)")
    exif = marked(exif)
    if fmt == "JPEG" and len(exif) > JPEG_MARKER_MAX:
        exif = _fit_exif(exif, path)
    if fmt == "JPEG" and xmp and len(XMP_HEADER) + len(xmp) > JPEG_MARKER_MAX:
        log.warning("%s: written without its XMP: %d KB, over the 64 KB a JPEG holds", path, len(xmp) // 1024)
        xmp = None
    if fmt == "TIFF" and (exif or xmp):
        options = _tiff_with_exif(options, exif, xmp)
    elif exif:
        options["exif"] = exif
    if fmt == "PNG" and (xmp or comment):
        options["pnginfo"] = PngInfo()
        if xmp:
            options["pnginfo"].add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"))
        if comment:  # PNG's own keyword; tEXt where Latin-1 holds it, else iTXt
            options["pnginfo"].add_text("Comment", comment.decode("utf-8", "replace"))
    elif xmp and fmt != "TIFF":
        options["xmp"] = xmp
    if comment and fmt == "JPEG":
        options["comment"] = comment
    if icc_profile and fmt == "WEBP" and icc_space(icc_profile) == "GRAY":
        icc_profile = None  # WebP has no gray pixels (PIL writes them as RGB), and an RGB image's gray profile breaks
    if icc_profile:
        options["icc_profile"] = icc_profile
    if dpi:
        options["dpi"] = dpi
    buf = io.BytesIO()
    join_image(rgb, alpha, grayscale).save(buf, format=fmt, **options)
    atomic_write_bytes(path, with_app13(buf.getvalue(), iptc) if iptc and fmt == "JPEG" else buf.getvalue())


def marked(exif: bytes | None) -> bytes:
    """``exif`` (or none) with its Software naming restore, as an image editor names itself in what it writes."""
    tags = Image.Exif()
    if exif:
        tags.load(exif)
    tags[SOFTWARE_TAG] = RESTORE_SOFTWARE
    return tags.tobytes()


def _fit_exif(exif: bytes, path: Path) -> bytes | None:
    """``exif`` within one JPEG marker segment: its largest values (of IFD0 and the Exif IFD: a maker note, a
    Photoshop block) left out, largest first, until it fits, with a warning naming them; None where none is left."""
    tags = Image.Exif()
    tags.load(exif)
    ifds = (tags, tags.get_ifd(EXIF_IFD)) if EXIF_IFD in tags else (tags,)
    dropped = []
    while len(exif) > JPEG_MARKER_MAX:
        sizes = [(len(value), ifd, tag) for ifd in ifds for tag, value in ifd.items()
                 if isinstance(value, (bytes, str))]
        if not sizes:
            log.warning("%s: written without its EXIF: over the 64 KB a JPEG holds", path)
            return None
        _, ifd, tag = max(sizes, key=lambda size: size[0])
        del ifd[tag]
        dropped.append(ExifTags.TAGS.get(tag, f"tag {tag}"))
        exif = tags.tobytes()
    log.warning("%s: written without the EXIF's %s: the EXIF was over the 64 KB a JPEG holds", path,
                ", ".join(dropped))
    return exif


def _tiff_with_exif(options: dict, exif: bytes | None, xmp: bytes | None) -> dict:
    """TIFF save options carrying ``exif`` and ``xmp`` (tag 700): their tags beside the compressed format's own
    (``exif=`` is ignored once ``tiffinfo`` is given), or, where the EXIF has sub-IFDs that libtiff cannot write,
    uncompressed."""
    tags = Image.Exif()
    if exif:
        tags.load(exif)
    if xmp:
        tags[XMP_TAG] = xmp
    if any(tags.get_ifd(pointer) for pointer in SUB_IFDS if pointer in tags):
        return {"exif": tags.tobytes()}
    plain = {tag: value for tag, value in tags.items() if tag not in SUB_IFDS}  # pointers to empty sub-IFDs
    return {**options, "tiffinfo": {**plain, **options.get("tiffinfo", {})}}
