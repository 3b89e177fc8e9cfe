"""What of an input image's metadata its restored output keeps, and how each output format holds it. Torch-free.

Metadata: the input's ICC profile, EXIF (camera, dates, GPS, ...) and XMP (ratings, keywords, captions, edits) go
into the output (PNG iCCP + eXIf + iTXt, JPEG APP2 + APP1, TIFF tags, WebP ICCP/EXIF/XMP chunks). A JPEG holds at
most 64 KB of each of EXIF and XMP (one marker segment): a larger EXIF loses its largest values (a maker note, a
Photoshop block) until it fits, a larger XMP is left out, each with a warning; the image is still written. A TIFF is
written deflate-compressed, except where the EXIF has sub-IFDs (the Exif and GPS ones: dates, exposure, location),
which Pillow's compressed-TIFF writer (libtiff) cannot write: that TIFF is written uncompressed, so that nothing is
lost. The EXIF orientation is applied to the pixels once, so the written EXIF says Orientation 1 (and the Exif IFD's
pixel dimensions are the output's), and the XMP's tiff:Orientation is removed (as PIL's exif_transpose does), its
pixel sizes swapped by a quarter turn; the thumbnail (IFD1) is not carried. A JPEG's comment (COM) and its APP13
segments (IPTC captions, credits, copyright in Photoshop resource blocks, carried whole) go into a JPEG output; a
PNG gets the comment as its "Comment" text and no IPTC; WebP and TIFF outputs neither. A PNG's text chunks (Author,
Copyright, Description, ...) go into a PNG output. The pixel density (dpi: JFIF, pHYs, TIFF resolution) is carried
too, x and y swapped by a quarter turn. Colours are read by the rule prepare's tiles share (jpeg.formats.rgb_image):
RGB keeps its own values and its profile (Adobe RGB, Display P3: restored where its JPEG artefacts are, no gamut
clipped); a profile is carried only where it describes the output's colours: RGB for RGB output, GRAY for grayscale.
A WebP has no gray pixels (PIL writes them as RGB): a grayscale output with a GRAY profile is converted to sRGB
through that profile for it and carries LittleCMS's sRGB profile (webp_gray).
A CMYK input with an embedded profile is converted to sRGB through that profile (LittleCMS via PIL.ImageCms,
perceptual intent) and the output carries the sRGB profile LittleCMS builds; a CMYK input without one is converted
as PIL does (naively) and carries no profile.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

from PIL import ExifTags, Image

from dist_dejpeg.jpeg.formats import SOFTWARE_TAG, SOURCE_TAG, cmyk_to_srgb, icc_space, restore_software, srgb_profile

log = logging.getLogger("dist_dejpeg.restore.images")

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
# the XMP's pixel sizes (attributes or elements): renamed X <-> Y, Width <-> Length where a quarter turn is applied
XMP_SIZES = re.compile(rb"(?<=exif:Pixel)[XY](?=Dimension\b)|(?<=tiff:Image)(?:Width|Length)\b")
SWAPPED = {b"X": b"Y", b"Y": b"X", b"Width": b"Length", b"Length": b"Width"}
JPEG_MARKER_MAX = 65533  # the data one JPEG marker segment holds: all of a JPEG's EXIF (APP1), or its XMP
XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"  # what a JPEG's XMP segment starts with
GPS_IFD = 0x8825  # the EXIF's GPS sub-IFD: the location (--strip-gps)
# the XMP's location (--strip-gps): exif:GPS* properties, as attributes or elements
XMP_GPS = re.compile(rb'\s(?:exif|exifEX):GPS\w+="[^"]*"|<((?:exif|exifEX):GPS\w+)\b[^>]*?(?:/>|>.*?</\1>)', re.S)


def webp_gray(img: Image.Image, icc: bytes, path) -> tuple[Image.Image, bytes | None]:
    """A grayscale (L, LA) image tagged with the GRAY profile ``icc``, for a WebP (which holds RGB, and an RGB
    image's GRAY profile cannot be colour-managed): its pixels through that profile to sRGB (LittleCMS), with
    LittleCMS's sRGB profile. Where LittleCMS cannot (absent, a profile it refuses): the gray values as they are,
    untagged (a colour-managed viewer then reads them as sRGB), with a warning naming the file ``path``."""
    try:
        from PIL import ImageCms

        rgb = ImageCms.profileToProfile(img.convert("L"), ImageCms.ImageCmsProfile(io.BytesIO(icc)), srgb_profile(),
                                        outputMode="RGB")
    except Exception as err:  # noqa: BLE001 - ImportError without LittleCMS, PyCMSError for a broken profile
        log.warning("%s: written without its gray ICC profile, which LittleCMS cannot convert to sRGB for a WebP "
                    "(%s): a colour-managed viewer shows its tones as sRGB ones", path, err)
        return img, None
    if img.mode == "LA":
        rgb.putalpha(img.getchannel("A"))
    return rgb, srgb_profile().tobytes()


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
    the EXIF orientation turns the pixels (applied once, as PIL's exif_transpose removes it), and where that is a
    quarter turn its exif:PixelX/YDimension and tiff:ImageWidth/Length swapped (as the EXIF's are: output_metadata)."""
    xmp = img.info.get("xmp")
    if not xmp:
        return None
    xmp = xmp.encode() if isinstance(xmp, str) else bytes(xmp)
    try:
        orientation = img.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: nothing is turned
        orientation = 1
    if orientation in (5, 6, 7, 8):
        xmp = XMP_SIZES.sub(lambda m: SWAPPED[m.group()], xmp)
    return XMP_ORIENTATION.sub(b"", xmp) if orientation in TURNED else xmp


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


def marked(exif: bytes | None, source: str | None = None) -> bytes:
    """``exif`` (or none) with its Software naming restore after the input's own, as an image editor adds itself
    in what it writes (jpeg.formats.restore_software), and ``source`` (source_identity; None: none, an earlier
    restore's left out) in SOURCE_TAG."""
    tags = Image.Exif()
    if exif:
        tags.load(exif)
    tags[SOFTWARE_TAG] = restore_software(tags.get(SOFTWARE_TAG))
    tags.pop(SOURCE_TAG, None)
    if source:
        tags[SOURCE_TAG] = source
    return tags.tobytes()


def fit_exif(exif: bytes, path: Path) -> bytes | None:
    """``exif`` within one JPEG marker segment: its largest values (of IFD0 and the Exif IFD: a maker note, a
    Photoshop block; not the Software, restore's mark) left out, largest first, until it fits, with a warning naming
    them; None where none is left."""
    tags = Image.Exif()
    tags.load(exif)
    ifds = (tags, tags.get_ifd(EXIF_IFD)) if EXIF_IFD in tags else (tags,)
    dropped = []
    while len(exif) > JPEG_MARKER_MAX:
        sizes = [(len(value), ifd, tag) for ifd in ifds for tag, value in ifd.items()
                 if isinstance(value, (bytes, str)) and not (ifd is tags and tag == SOFTWARE_TAG)]  # (the mark stays)
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


def tiff_with_exif(options: dict, exif: bytes | None, xmp: bytes | None) -> dict:
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


def png_text(img: Image.Image) -> dict[str, str]:
    """A PNG's text chunks (tEXt, zTXt, iTXt: Author, Copyright, Description, ...) for a PNG output; its XMP is
    carried as the output's XMP (output_xmp), ImageMagick's raw profiles (its copies of the EXIF and ICC) not."""
    if img.format != "PNG":
        return {}
    text = getattr(img, "text", None) or {}
    return {str(k): str(v) for k, v in text.items() if k != "XML:com.adobe.xmp" and not k.startswith("Raw profile")}


def without_gps(exif: bytes | None, xmp: bytes | None) -> tuple[bytes | None, bytes | None]:
    """``exif`` without its GPS sub-IFD and ``xmp`` without its exif:GPS* properties (--strip-gps: a museum's
    outputs name no place)."""
    if exif:
        tags = Image.Exif()
        tags.load(exif)
        if GPS_IFD in tags:
            del tags[GPS_IFD]
            exif = tags.tobytes()
    return exif, XMP_GPS.sub(b"", xmp) if xmp else xmp


def jpeg_without_gps(data: bytes, source: str | None = None) -> bytes | None:
    """The JPEG file ``data`` with the GPS of its EXIF and XMP segments removed and nothing else changed (a
    pass-through stays the input's pixels, bit for bit), its EXIF marked as restore's (``marked``: an output, not a
    photo of the user's; ``source``: the photo it came from, source_identity); None where it holds no GPS (the
    file itself will do) or is no JPEG Pillow would write."""
    out, at, changed, exif_seen = [], 2, False, False
    while data[:2] == b"\xff\xd8" and at + 4 <= len(data) and data[at] == 0xFF and 0xE0 <= data[at + 1] <= 0xFE:
        end = at + 2 + int.from_bytes(data[at + 2:at + 4], "big")
        marker, segment = data[at + 1], data[at + 4:end]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00") and not exif_seen:
            exif_seen, stripped = True, without_gps(segment, None)[0]
            changed, segment = changed or stripped != segment, marked(stripped, source)
        elif marker == 0xE1 and segment.startswith(XMP_HEADER):
            stripped = XMP_HEADER + without_gps(None, segment[len(XMP_HEADER):])[1]
            changed, segment = changed or stripped != segment, stripped
        out.append(bytes([0xFF, marker]) + (len(segment) + 2).to_bytes(2, "big") + segment)
        at = end
    if not changed:
        return None
    new = marked(None, source)
    mark = [] if exif_seen else [b"\xff\xe1" + (len(new) + 2).to_bytes(2, "big") + new]
    return b"\xff\xd8" + b"".join(mark + out) + data[at:]
