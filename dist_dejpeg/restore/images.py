"""Image files in and out of restoration: ``load_image`` refuses what cannot be restored with a reason,
``save_image`` writes atomically in the format its suffix names (jpeg/formats.py: OUTPUT_FORMATS). Torch-free.

EXIF orientation is applied; grayscale, palette, RGBA/LA (alpha kept and written back unchanged), CMYK and
YCbCr JPEGs are read; grayscale input gives grayscale output. 16-bit images are refused (a JPEG is 8-bit: a
16-bit file never was one), as are images over ``max_pixels`` (checked from the header, before decoding:
decompression bombs), animations (GIF, APNG, WebP: one image is written, so the other frames would be lost)
and TIFFs of several pages (reduced-resolution pages, previews, do not count); a camera's MPO keeps its first
image, the photo. A JPEG whose coded data is not whole (libjpeg only warns, and decodes the rest grey) is refused:
jpeg/integrity.py. An empty file is said to be one.

Metadata (restore/metadata.py): the input's ICC profile, EXIF and XMP, a JPEG's comment and IPTC, the dpi.
"""

from __future__ import annotations

import filecmp
import io
import logging
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from dist_dejpeg.jpeg.consistency import JpegCells, NotConsistent, cells_of, conform, is_decode_of
from dist_dejpeg.jpeg.integrity import file_problem, parse, structure_problem
from dist_dejpeg.jpeg.pil_limit import pixel_limit
from dist_dejpeg.jpeg.formats import (ALPHA_FORMATS, DEFAULT_MAX_PIXELS, bit_depth, checked_size, file_limit,
                                       icc_space, is_animation, rgb_image, save_options, tiff_pages)
from dist_dejpeg.restore.metadata import (JPEG_MARKER_MAX, ORIENTATION, XMP_HEADER, fit_exif, jpeg_notes, marked,
                                          output_dpi, output_metadata, output_xmp, png_text, tiff_with_exif,
                                          webp_gray, with_app13)
from dist_dejpeg.run.files import atomic_write_bytes

log = logging.getLogger(__name__)

GRAY_MODES = ("L", "LA", "1")  # single-channel inputs: written back single-channel


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
    text: dict[str, str] = field(default_factory=dict)  # a PNG's text chunks, for a PNG output (png_text)
    cells: JpegCells | None = None  # a JPEG's quantization cells (file_cells): its restored image is made consistent
    cells_note: str = ""  # a JPEG's: why it has none


def check_depth(img: Image.Image, source: str, path: str | Path | None = None) -> None:
    """An InputImageError where the file ``img`` was opened from (``path``, else its own) stores over 8 bits a
    sample: PIL opens a 16-bit RGB PNG, TIFF or PPM as 8-bit RGB, silently (load_image's check, and the API's)."""
    if (bits := bit_depth(img, path or getattr(img, "filename", "") or None)) > 8:
        raise InputImageError(f"{source}: a {bits}-bit {img.format}: JPEG is 8-bit, so this file never was a JPEG; "
                              f"convert it to 8 bits first if it holds a decoded JPEG")


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


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> H x W uint8: the mean of the channels (a grayscale input restored as RGB goes back)."""
    return np.rint(rgb.astype(np.float32).mean(axis=2)).astype(np.uint8)


def join_image(rgb: np.ndarray, alpha: np.ndarray | None = None, grayscale: bool = False) -> Image.Image:
    """The inverse of split_image: grayscale back to L (the mean of the restored channels), alpha put back."""
    if grayscale:
        gray = to_gray(rgb)
        return Image.fromarray(gray, "L") if alpha is None else Image.fromarray(np.dstack([gray, alpha]), "LA")
    return Image.fromarray(rgb, "RGB") if alpha is None else Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def load_image(path: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, cells: bool = True,
               raise_with: str = "--max-pixels") -> LoadedImage:
    """Read ``path`` (or an image file's bytes: an upload, named "image") for restoration; every refusal is an
    InputImageError that says why. ``cells``: read a JPEG's quantization cells too (False: its restored image is
    kept as the model makes it; a sequential JPEG's coefficients still read, for jpeg.integrity's check). A file
    over file_limit(max_pixels) bytes is refused unread, and memory running out while one loads is its failure.
    ``raise_with``: what a refusal as too large says raises the limit (the command's option; the API's argument)."""
    try:
        return _load_image(path, max_pixels, cells, raise_with)
    except MemoryError:  # (the memory it took is freed: the other files are restored)
        named = "image" if isinstance(path, (bytes, bytearray, memoryview)) else path
        raise InputImageError(f"{named}: not enough memory to load it") from None


def _load_image(path: str | Path | bytes, max_pixels: int, cells: bool, raise_with: str) -> LoadedImage:
    data = bytes(path) if isinstance(path, (bytes, bytearray, memoryview)) else None
    path = Path(path) if data is None else "image"
    try:
        with pixel_limit(max_pixels):
            img = Image.open(path if data is None else io.BytesIO(data))
    except FileNotFoundError:
        raise InputImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputImageError(f"{path}: a folder, not an image") from None
    except Image.DecompressionBombError as err:  # (over twice PIL's limit, itself at least max_pixels: ours said)
        said = re.search(r"\((\d+) pixels\)", str(err))  # (Pillow's message: the size is in no attribute)
        raise InputImageError(too_large(path, int(said[1]) if said else 2 * max_pixels, max_pixels,
                                        raise_with=raise_with)) from None
    except Exception as err:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError, SyntaxError ...
        if (len(data) if data is not None else os.path.getsize(path)) == 0:
            raise InputImageError(f"{path}: empty file (0 bytes)") from None
        said = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))  # (bytes: PIL names its buffer)
        raise InputImageError(f"{path}: not an image PIL can read ({type(err).__name__}: {said})") from None
    with img:
        if data is None and (why := checked_size(path, file_limit(max_pixels))):  # (a sparse file of many GB)
            raise InputImageError(f"{path}: {why}")
        w, h = img.size
        if w * h > max_pixels:
            raise InputImageError(too_large(path, w * h, max_pixels, f"{w} x {h} = ", raise_with))
        check_depth(img, str(path), None if data is not None else path)
        mode, fmt = img.mode, img.format or ("" if data is not None else path.suffix.lstrip(".").upper())
        if is_animation(img, fmt):
            raise InputImageError(f"{path}: an animated {fmt} ({img.n_frames} frames): restore writes one image, so "
                                  f"all but the first frame would be lost; save the frames as separate images")
        jpeg = fmt in ("JPEG", "MPO") and (data or path.read_bytes())  # (what libjpeg only warns of: integrity.py)
        if (frame := jpeg and parse(jpeg)[0]) and (why := structure_problem(jpeg, frame)):  # (parsed once: both)
            raise InputImageError(f"{path}: {why}")
        try:
            with pixel_limit(max_pixels):
                pages = tiff_pages(img) if fmt == "TIFF" else 1
                img.load()
        except Exception as err:  # noqa: BLE001 - truncated or corrupt data
            raise decode_error(path, err) from None
        if pages > 1:
            raise InputImageError(f"{path}: a TIFF of {pages} pages: restore writes one image, so all but the first "
                                  f"page would be lost; save the pages as separate images")
        icc, exif = output_metadata(img, img.mode in GRAY_MODES)  # before split_image turns the pixels
        rgb, alpha, grayscale = split_image(img, str(path))
        comment, iptc = jpeg_notes(img)
        wanted, (cells, why) = cells, file_cells(img, data or path) if cells else (None, "")  # (failed: not again)
        if frame and (cells or not wanted) and (bad := file_problem(jpeg, cells, frame, data or path)):
            raise InputImageError(f"{path}: {bad}")
        return LoadedImage(rgb=rgb, alpha=alpha, grayscale=grayscale, mode=mode, format=fmt, image=img,
                           icc_profile=icc, exif=exif, xmp=output_xmp(img), dpi=output_dpi(img), comment=comment,
                           iptc=iptc, text=png_text(img), cells=cells, cells_note=why)


def too_large(path: str | Path, pixels: int, limit: int, size: str = "", raise_with: str = "--max-pixels") -> str:
    many = f"{pixels / 1e6:.{3 if pixels < 1e9 else 5}g}"  # (3600 megapixels, not 3.6e+03)
    return (f"{path}: {size}{many} megapixels is over the limit of {limit / 1e6:.3g} megapixels ({limit} pixels: a "
            f"decompression bomb?); raise it with {raise_with} (in pixels)")


def decode_error(source: str | Path, err: Exception) -> InputImageError:
    """What ``source``'s pixels that PIL cannot decode (``err``: truncated or corrupt data) are refused with."""
    cut = ("; the file is cut short (an interrupted copy or download?): copy it again from its source"
           if "truncated" in str(err) else "")
    return InputImageError(f"{source}: cannot decode ({type(err).__name__}: {err}){cut}")


def file_cells(img: Image.Image | None, path: str | Path | bytes | None = None, rgb: np.ndarray | None = None
               ) -> tuple[JpegCells | None, str]:
    """The quantization cells of the JPEG (or camera MPO) file ``img`` was opened from (``path``: its path or
    bytes, else its own filename, else the bytes of the file object it still holds: held_bytes) and "", or None and
    why a restored image of it cannot be made consistent with it ("": no JPEG).
    ``rgb``: its pixels as they are now (an image opened elsewhere: the API's), which must still be the file's
    first image, decoded (jpeg.consistency.is_decode_of: not edited, turned or another frame since)."""
    if img is None or img.format not in ("JPEG", "MPO"):
        return None, ""
    why = "not made consistent with its JPEG data: "
    if not (source := path or getattr(img, "filename", "") or held_bytes(img)):
        return None, why + BYTES_GONE
    if rgb is not None and img.tell():
        return None, why + f"frame {img.tell()}, not the file's first image"
    cells, unmade = cells_of(source)
    if cells is not None and (cells.width, cells.height) != img.size:  # (judged then as a PNG's pixels are)
        return None, why + (f"the image is {img.size[0]} x {img.size[1]}, the file {cells.width} x {cells.height} "
                            f"(changed or turned since it was opened?)")
    if cells is not None and rgb is not None and not is_decode_of(rgb, cells, img.getexif().get(ORIENTATION, 1)):
        return None, why + "its pixels are no longer the file's (edited or turned since it was opened?)"
    return cells, unmade


def cells_for(cells: JpegCells | None, note: str, earlier: bool) -> tuple[JpegCells | None, str]:
    """A JPEG file's ``cells`` and ``note`` (file_cells'), none where the image is restored as an ``earlier``,
    coarser compression than its file's (jpeg.quality.earlier_compression: a q20 photo re-saved at q90). The file's
    cells are then the re-save's, narrow ones around the first decode, and the clean photo lies far outside them:
    held in them, a restored q20-then-q90 photo kept about half of its gain (+0.22-0.31 dB instead of +0.54-0.74 on
    three skimage photos)."""
    if cells is None or not earlier:
        return cells, note
    return None, ("not made consistent with its JPEG data: compressed at a coarser quality before this file was "
                  "saved, whose cells are the re-save's, around that earlier decode")


# why an image opened from a file object (a BytesIO: an upload) has no file data to be made consistent with
BYTES_GONE = ("its file's bytes are gone (Pillow lets go of a file object once the image loads): give restore "
              "the bytes or the path, or the image before it is loaded")


def held_bytes(img: Image.Image) -> bytes | None:
    """The JPEG bytes of an image opened from a file object (BytesIO: an upload, a download) that Pillow still
    holds (until the image is loaded), or None."""
    fp = getattr(img, "fp", None)
    try:
        at = fp.tell()
        fp.seek(0)
        data = fp.read()
        fp.seek(at)
    except (AttributeError, OSError, ValueError):  # (no file object, or one closed or not seekable)
        return None
    return data if isinstance(data, bytes) and data[:2] == b"\xff\xd8" else None


def made_consistent(restored: np.ndarray, cells: JpegCells, img: Image.Image, half_width: float | None,
                    conform_with: Callable = conform) -> tuple[np.ndarray, str]:
    """``restored`` (H x W x 3 uint8, as displayed) made consistent with the JPEG ``img`` (its file's ``cells``:
    each DCT coefficient the model moved out of its quantization cell put back at the cell's edge; jpeg/consistency.py)
    and "", or ``restored`` itself and why not (the file's size is not the image's). ``conform_with``: conform's
    arguments, its result (a restorer's own: ImageRestorer.conform)."""
    try:
        orientation, half = img.getexif().get(ORIENTATION, 1), 0.5 if half_width is None else half_width
        return conform_with(restored, cells, orientation, half), ""
    except NotConsistent as err:
        return restored, f"not made consistent with its JPEG data: {err}"


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # a PNG's last chunk
JPEG_END = b"\xff\xd9"  # a JPEG's EOI marker (what restore writes ends with it)


def output_complete(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, source: str | Path | None = None
                    ) -> bool:
    """Whether ``path`` holds a whole image in the format its suffix names: the header opens, the pixels decode
    to the end (a truncated file raises), a PNG ends with its IEND chunk, a JPEG with its EOI marker, a WebP is
    as long as its RIFF header says, and PIL gives no warning (a TIFF whose directory is cut short only warns;
    at worst a complete file is restored again). A full decode costs little next to a restore and its encode
    (seen on one CPU core, 12 MP: PNG 24 ms per megapixel, WebP 39, TIFF 4), and only it sees every byte.
    An output byte for byte its input ``source`` (a pass-through: a phone's JPEG with data after its EOI marker, a
    camera's MPO as .jpg) needs only to decode: the tail and format checks are for restore's own encodes."""
    path = Path(path)
    try:
        copy = source is not None and filecmp.cmp(source, path, shallow=False)  # (sizes first: one stat each)
        with warnings.catch_warnings(), pixel_limit(max_pixels):
            warnings.simplefilter("error")
            with Image.open(path) as img:
                if copy:
                    img.load()
                    return True
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
               iptc: tuple[bytes, ...] = (), text: dict[str, str] | None = None, encode_only: bool = False,
               source: str | None = None) -> bytes:
    """Write in the format ``path``'s suffix names, with its OUTPUT_FORMATS options (``quality``: jpg and webp at that
    quality), atomically: encoded first, then a temporary file renamed into place (run.files.atomic_write_bytes);
    the file's bytes are returned (``encode_only``: returned, not written). ``icc_profile``, ``exif`` and ``xmp``
    (LoadedImage's) are embedded when given; in a JPEG, within its 64 KB per marker (see the module docstring). An
    alpha channel for a format that cannot hold one (JPEG) is an InputImageError, never dropped silently. ``dpi``:
    the pixel density written (a WebP has no field for it). ``comment`` and ``iptc`` (a JPEG input's, jpeg_notes): a
    JPEG gets both, a PNG the comment as its "Comment" text; WebP and TIFF neither. ``text``: a PNG input's text
    chunks, for a PNG. Every output's EXIF Software names restore (``marked``; a search of the output folder leaves
    such files alone: restore/inputs.py), and ``source`` (source_identity of its input) what it was restored from."""
    path = Path(path)
    try:
        fmt, options = save_options(path.suffix, quality)
    except ValueError as err:
        raise InputImageError(f"{path}: {err}") from None
    if alpha is not None and fmt not in ALPHA_FORMATS:
        raise InputImageError(f"{path}: the image has an alpha channel (transparency), which {fmt} cannot hold; "
                              f"write it as png, webp or tiff (--format, or --format same)")
    exif = marked(exif, source)
    if fmt == "JPEG" and len(exif) > JPEG_MARKER_MAX:
        exif = fit_exif(exif, path)
    if fmt == "JPEG" and xmp and len(XMP_HEADER) + len(xmp) > JPEG_MARKER_MAX:
        log.warning("%s: written without its XMP: %d KB, over the 64 KB a JPEG holds", path, len(xmp) // 1024)
        xmp = None
    if fmt == "TIFF" and (exif or xmp):
        options = tiff_with_exif(options, exif, xmp)
    elif exif:
        options["exif"] = exif
    if fmt == "PNG" and (xmp or comment or text):
        options["pnginfo"] = PngInfo()
        for key, value in (text or {}).items():  # a PNG input's own (tEXt where Latin-1 holds it, else iTXt)
            options["pnginfo"].add_text(key, value)
        if xmp:
            options["pnginfo"].add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"))
        if comment:  # PNG's own keyword; tEXt where Latin-1 holds it, else iTXt
            options["pnginfo"].add_text("Comment", comment.decode("utf-8", "replace"))
    elif xmp and fmt != "TIFF":
        options["xmp"] = xmp
    if comment and fmt == "JPEG":
        options["comment"] = comment
    image = join_image(rgb, alpha, grayscale)
    if icc_profile and fmt == "WEBP" and icc_space(icc_profile) == "GRAY":  # WebP has no gray pixels: sRGB ones
        image, icc_profile = webp_gray(image, icc_profile, path) if image.mode in GRAY_MODES else (image, None)
    if icc_profile:
        options["icc_profile"] = icc_profile
    if dpi:
        options["dpi"] = dpi
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    data = with_app13(buf.getvalue(), iptc) if iptc and fmt == "JPEG" else buf.getvalue()
    if not encode_only:
        atomic_write_bytes(path, data)
    return data
