"""Image files and formats, each set defined once (tests/test_layout.py fails if a second copy appears):
what a folder search picks up, which suffixes are lossy, what a shard sample may hold, and the JFIF colour
transform. Torch-free."""

from __future__ import annotations

# Photos a folder search picks up (prepare folder, restore, evaluate): what Pillow decodes.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".tif", ".tiff", ".bmp", ".ppm",
                            ".pgm", ".pnm", ".gif", ".jp2"})
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})
# Not usable as a reference: compressed already (webp may be lossless; it cannot be told cheaply).
LOSSY_SUFFIXES = JPEG_SUFFIXES | {".webp"}

# What restore writes: lossless only (webp written with lossless=True).
OUTPUT_FORMATS = ("png", "tiff", "webp")

# Extensions a shard sample may carry its image under, in order of preference. "raw" is an uncompressed
# square H x W x 3 uint8 tile (no decode at all; the side follows from the byte count).
SHARD_EXTS = ("png", "raw", "jp2", "webp", "tif", "tiff", "ppm", "bmp", "jpg", "jpeg")
# Lossless formats a shard can be written in (`prepare --format`).
TILE_FORMATS = ("png", "raw", "jp2")
# Encoded (not raw) shard extensions: DALI's webdataset reader takes them as one ';'-joined component.
ENCODED_SHARD_EXTS = tuple(e for e in SHARD_EXTS if e != "raw")
LOSSY_SHARD_EXTS = frozenset(s.lstrip(".") for s in LOSSY_SUFFIXES) & frozenset(SHARD_EXTS)

# JFIF (JPEG's own) full-range RGB -> YCbCr, rows Y, Cb, Cr, without the +128 chroma offset: the GPU JPEG
# path's 4:2:0 rebuild, the chroma-weighted pixel loss and validation's per-plane PSNR all use it
JFIF_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
