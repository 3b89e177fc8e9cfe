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
# The largest photo restore (--max-pixels' default) and prepare take: 100 MP; PIL's own decompression-bomb limit
# (89.5 MP) warns above its value and refuses above twice it, so both check the header size against this instead.
DEFAULT_MAX_PIXELS = 100_000_000

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
SAME_FORMAT_OF = {**{s: "jpg" for s in JPEG_SUFFIXES}, ".png": "png", ".webp": "webp"}
# The Pillow format each output suffix is written in (a `same` output keeps its input's suffix: .jpeg, .JPG)
OUTPUT_SUFFIXES = {**{s: "JPEG" for s in JPEG_SUFFIXES}, **{v[0]: v[1] for v in OUTPUT_FORMATS.values()},
                   ".tif": "TIFF"}
# Pillow formats that can hold an alpha channel
ALPHA_FORMATS = frozenset({"PNG", "WEBP", "TIFF"})


def output_format(fmt: str, source_suffix: str) -> tuple[str, str]:
    """(format name, output suffix) of an input with ``source_suffix`` written as ``fmt`` (an OUTPUT_FORMATS
    name, or SAME_FORMAT: a JPEG, PNG or WebP input keeps its format and its own suffix, any other is png)."""
    if fmt == SAME_FORMAT:
        same = SAME_FORMAT_OF.get(source_suffix.lower())
        return (same, source_suffix) if same else ("png", OUTPUT_FORMATS["png"][0])
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
