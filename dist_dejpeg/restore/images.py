"""Image files in and out of restoration: ``load_image`` refuses what cannot be restored with a reason,
``save_image`` writes losslessly and atomically. Torch-free.

EXIF orientation is applied; grayscale, palette, RGBA/LA (alpha kept and written back unchanged), CMYK and
YCbCr JPEGs are read; grayscale input gives grayscale output. 16-bit images are refused (a JPEG is 8-bit: a
16-bit file never was one), as are images over ``max_pixels`` (checked from the header, before decoding:
decompression bombs).
"""

from __future__ import annotations

import contextlib
import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dist_dejpeg.run.files import atomic_write_bytes

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP; PIL's own limit (89.5 MP) only warns below twice its value


class InputImageError(ValueError):
    """An input file that cannot be restored (not an image, truncated, 16-bit, too large, ...)."""


@dataclass
class LoadedImage:
    rgb: np.ndarray  # H x W x 3 uint8, EXIF orientation applied
    alpha: np.ndarray | None  # H x W uint8, or None
    grayscale: bool  # the file was single-channel: write single-channel
    mode: str  # the file's PIL mode
    format: str  # the file's format (JPEG, PNG, ...)
    image: Image.Image | None = None  # the opened file (for its JPEG quantization tables)


def _png_bit_depth(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(33)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">B", head[24:25])[0]


@contextlib.contextmanager
def _pixel_limit(max_pixels: int):
    """PIL's own decompression-bomb limit raised to ``max_pixels`` while one file is opened (we check first)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(max_pixels, saved or 0)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def split_image(img: Image.Image, source: str = "image") -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(H x W x 3 uint8 RGB, H x W uint8 alpha or None, single-channel?) of a decoded PIL image, EXIF
    orientation applied. 16-bit and float images are an InputImageError."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        raise InputImageError(f"{source}: a 16-bit (or float) image, mode {img.mode}: JPEG is 8-bit, so this "
                              f"never was a JPEG; convert it to 8 bits first if it holds a decoded JPEG")
    img = ImageOps.exif_transpose(img)
    alpha = None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.ascontiguousarray(np.asarray(rgba)[..., 3])
        rgb = np.asarray(rgba.convert("RGB"))
    else:
        rgb = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(rgb), alpha, img.mode in ("L", "LA", "1")


def join_image(rgb: np.ndarray, alpha: np.ndarray | None = None, grayscale: bool = False) -> Image.Image:
    """The inverse of split_image: grayscale back to L (the mean of the restored channels), alpha put back."""
    if grayscale:
        gray = np.rint(rgb.astype(np.float32).mean(axis=2)).astype(np.uint8)
        return Image.fromarray(gray, "L") if alpha is None else Image.fromarray(np.dstack([gray, alpha]), "LA")
    return Image.fromarray(rgb, "RGB") if alpha is None else Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read ``path`` for restoration; every refusal is an InputImageError that says why."""
    path = Path(path)
    try:
        with _pixel_limit(max_pixels):
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
            raise InputImageError(f"{path}: {w} x {h} = {w * h / 1e6:.1f} megapixels is over the limit of "
                                  f"{max_pixels / 1e6:.1f} (a decompression bomb?); raise it with --max-pixels")
        if img.format == "PNG" and _png_bit_depth(path) == 16:
            raise InputImageError(f"{path}: a 16-bit PNG: JPEG is 8-bit, so this file never was a JPEG; convert "
                                  f"it to 8 bits first if it holds a decoded JPEG")
        mode, fmt = img.mode, img.format or path.suffix.lstrip(".").upper()
        try:
            with _pixel_limit(max_pixels):
                img.load()
        except Exception as err:  # noqa: BLE001 - truncated or corrupt data
            raise InputImageError(f"{path}: cannot decode ({type(err).__name__}: {err})") from None
        rgb, alpha, grayscale = split_image(img, str(path))
        return LoadedImage(rgb=rgb, alpha=alpha, grayscale=grayscale, mode=mode, format=fmt,
                           image=img if fmt == "JPEG" else None)


def save_image(rgb: np.ndarray, path: str | Path, *, alpha: np.ndarray | None = None, grayscale: bool = False) -> None:
    """Write losslessly (PNG unless ``path`` says otherwise), atomically: encoded first, then a temporary file
    renamed into place (run.files.atomic_write_bytes)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InputImageError(f"{path}: unknown output format '{path.suffix}'")
    buf = io.BytesIO()
    join_image(rgb, alpha, grayscale).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    atomic_write_bytes(path, buf.getvalue())
