"""Image bytes in, 8-bit RGB arrays out; the libjpeg (PIL) JPEG round trip. Shared by every CPU data path."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps

from dist_dejpeg.jpeg.formats import SHARD_EXTS, TILE_FORMATS, bit_depth, rgb_image
from dist_dejpeg.jpeg.pil_limit import own_limit, pixel_limit


class BadImage(ValueError):
    """Bytes that do not decode to an image. ``kind`` starts the reason prepare records for it."""

    kind = "undecodable"


class TooManyPixels(BadImage):
    """An image over the pixel limit decode_rgb8 was given (checked from its header, before decoding)."""

    kind = "too large"


def webp_is_lossy(data: bytes) -> bool:
    """Whether WebP bytes hold a lossy (VP8) image, from its RIFF chunks: a lossless one (VP8L) cannot be told from
    its pixels, a lossy one has no JPEG grid for jpeg.quality to find. An animation's frames (ANMF) are looked into."""
    def lossy(start: int, end: int) -> bool:
        while start + 8 <= end:
            fourcc, size = data[start:start + 4], int.from_bytes(data[start + 4:start + 8], "little")
            if fourcc == b"VP8 " or (fourcc == b"ANMF" and lossy(start + 24, min(end, start + 8 + size))):
                return True
            start += 8 + size + (size & 1)
        return False

    return data[:4] == b"RIFF" and data[8:12] == b"WEBP" and lossy(12, len(data))


def is_avif(data: bytes) -> bool:
    """Whether bytes hold an AVIF (an ISO-BMFF file whose ftyp box names the avif or avis brand): AV1 frames,
    lossy all but always, with no JPEG grid for jpeg.quality to find."""
    if data[4:8] != b"ftyp":
        return False
    box = data[8:min(int.from_bytes(data[:4], "big"), 256)]  # major brand, minor version, compatible brands
    return any(box[i:i + 4] in (b"avif", b"avis") for i in range(0, len(box) - 3, 4) if i != 4)


def is_jpeg_xl(data: bytes) -> bool:
    """Whether bytes hold a JPEG XL image (a bare codestream or the ISO-BMFF container)."""
    return data[:2] == b"\xff\x0a" or data[:12] == b"\0\0\0\x0cJXL \r\n\x87\n"


def has_alpha(img: Image.Image) -> bool:
    """Whether ``img`` carries transparency that to_rgb8 composites on white (from its header: mode, tRNS)."""
    return img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)


def translucent(data: bytes) -> bool:
    """Whether the image in ``data`` has a pixel that is not fully opaque: to_rgb8 composites it on white, a
    decoder that drops the alpha channel (DALI's) reads other colours there. An opaque alpha channel reads the
    same either way. Decodes only an image whose header has alpha; False for one that does not open."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return has_alpha(img) and img.convert("RGBA").getchannel("A").getextrema()[0] < 255
    except Exception:  # noqa: BLE001 - a bad image is decode_rgb8's to report
        return False


def to_rgb8(img: Image.Image, bits: int = 8) -> np.ndarray:
    """Any PIL image (grayscale, RGBA, palette, 16-bit, CMYK, ...) as an H x W x 3 uint8 array, its colours read
    as restore reads them (jpeg.formats.rgb_image). ``bits``: per sample, as its file stores them (bit_depth, read
    before it was loaded): a 9-16-bit PGM or PNG PIL opens as mode I holds 0..65535 however dark it is; 8 (not
    known) and deeper, the values' maximum tells (over 255: 16-bit)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or 8 < bits <= 16 or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if has_alpha(img):
        # Composite on white: a transparent area has no "true" colour, white is the common convention.
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(base, rgba).convert("RGB"))
    return np.asarray(rgb_image(img, img.info.get("icc_profile")))  # CMYK through its profile, as restore reads it


def decode_rgb8(data: bytes, max_pixels: int | None = None, upright: bool = False) -> np.ndarray:
    """Decode image bytes fully (truncated files are errors, not grey padding) to H x W x 3 uint8. ``max_pixels``:
    refuse larger images (TooManyPixels, from the header; without it, those over PIL's own decompression-bomb
    limit, Image.MAX_IMAGE_PIXELS as its user set it).
    ``upright``: apply the EXIF orientation (a camera's portrait photo is stored sideways; tiles have an up)."""
    try:
        # PIL's limit lifted (jpeg/pil_limit.py: one lock for every thread that changes it), the size checked here
        with pixel_limit(None):
            img = Image.open(io.BytesIO(data))
            limit = max_pixels if max_pixels is not None else own_limit()
            if limit is not None and img.width * img.height > limit:
                said = "--max-pixels" if max_pixels is not None else "PIL's decompression-bomb limit"
                raise TooManyPixels(f"{img.width} x {img.height} = {img.width * img.height / 1e6:.1f} MP, over "
                                    f"the {limit / 1e6:g} MP limit ({said})")
            bits = bit_depth(img)  # (from its header: read before it is loaded)
            img.load()
            if upright:
                img = ImageOps.exif_transpose(img)
        return to_rgb8(img, bits)
    except TooManyPixels:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
        # (PIL names the buffer it read: "<_io.BytesIO object at 0x...>", nothing a reader can use)
        raise BadImage(re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(err).__name__}: {err}")) from None


def jpeg_roundtrip(rgb: np.ndarray, quality: int, subsampling: int = -1) -> np.ndarray:
    """Encode with libjpeg at ``quality`` and decode again. ``subsampling``: PIL's code (-1: its default,
    4:2:0 chroma subsampling; 0: 4:4:4)."""
    return jpeg_decode(jpeg_encode(rgb, quality, subsampling))


def jpeg_encode(rgb: np.ndarray, quality: int, subsampling: int = -1) -> bytes:
    """The JPEG file libjpeg writes of ``rgb`` (H x W x 3 or H x W uint8) at ``quality`` (``subsampling``: as
    jpeg_roundtrip's)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality), subsampling=subsampling)
    return buf.getvalue()


def jpeg_decode(data: bytes) -> np.ndarray:
    """A JPEG file's bytes decoded to H x W x 3 uint8 RGB."""
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def halve(image: np.ndarray) -> np.ndarray:
    """An 8-bit image (H x W or H x W x C) at half its size by the mean of each 2x2 block, rounded: it erases an
    earlier JPEG's 8x8 grid (the pixel quality estimate then finds none). An odd last row or column is dropped."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    a = image[:h, :w].astype(np.float32)  # sums of four uint8 values: exact
    return np.rint((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4).astype(np.uint8)


def encode_png(rgb: np.ndarray, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_tile(rgb: np.ndarray, fmt: str) -> bytes:
    """A tile as bytes of a lossless format: png, raw (uncompressed uint8) or jp2 (reversible JPEG 2000)."""
    if fmt == "png":
        return encode_png(rgb)
    if fmt == "raw":
        if rgb.shape[0] != rgb.shape[1] or rgb.dtype != np.uint8 or rgb.shape[2] != 3:
            raise ValueError(f"raw tiles are square H x W x 3 uint8, got {rgb.shape} {rgb.dtype}")
        return np.ascontiguousarray(rgb).tobytes()
    if fmt == "jp2":
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG2000", irreversible=False, no_jp2=False)  # 5/3 wavelet: lossless
        return buf.getvalue()
    raise ValueError(f"unknown tile format {fmt!r} (one of {TILE_FORMATS})")


def decode_component(ext: str, data: bytes) -> np.ndarray:
    """A sample component as H x W x 3 uint8, whatever its extension; as stored (an EXIF orientation tag is not
    applied: prepare's tiles are upright and untagged, and both loaders read a shard's tiles this way)."""
    if ext != "raw":
        return decode_rgb8(data)
    side = int(round((len(data) / 3) ** 0.5))
    if side * side * 3 != len(data) or side == 0:
        raise BadImage(f"raw tile of {len(data)} bytes is not a square 8-bit RGB tile")
    return np.frombuffer(data, dtype=np.uint8).reshape(side, side, 3).copy()


def image_bytes(sample: dict) -> tuple[str, bytes] | None:
    """The (extension, bytes) of the first image component of a webdataset sample, or None."""
    for ext in SHARD_EXTS:
        if ext in sample and isinstance(sample[ext], (bytes, bytearray)):
            return ext, bytes(sample[ext])
    return None


def center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return rgb[top:top + size, left:left + size]
