"""restore's per-file record (restore.json lines beside the outputs), what Ctrl-C prints, the XMP's pixel sizes after
a quarter turn, and --strip-gps."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dist_dejpeg.restore.files import restore_files

from test_faults_restore import Identity, _photo  # noqa: F401

ORIENTATION, EXIF_IFD, GPS_IFD = 0x0112, 0x8769, 0x8825
GPS = {1: "N", 2: (52.0, 22.0, 30.5), 3: "E", 4: (4.0, 53.0, 1.0), 6: 12.5}


@pytest.fixture
def restorer() -> Identity:
    return Identity()


def _xmp_of(path) -> bytes:
    xmp = Image.open(path).info.get("xmp")
    return xmp.encode() if isinstance(xmp, str) else xmp


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_the_xmps_pixel_sizes_are_swapped_with_a_quarter_turn(tmp_path, restorer, fmt):
    """Orientation 6 applied to a 200 x 150 photo gives 150 x 200: the EXIF's PixelX/YDimension said so, the XMP's
    exif:PixelXDimension still said 200 (and tiff:ImageWidth/Length, as attributes or elements, likewise)."""
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:exif="http://ns.adobe.com/exif/1.0/" '
           b'tiff:Orientation="6" exif:PixelXDimension="200" exif:PixelYDimension="150">'
           b'<tiff:ImageWidth>200</tiff:ImageWidth><tiff:ImageLength>150</tiff:ImageLength>'
           b'</rdf:Description></rdf:RDF></x:xmpmeta>')
    exif = Image.Exif()
    exif[ORIENTATION], exif[EXIF_IFD] = 6, {0xA002: 200, 0xA003: 150}
    src = tmp_path / "rot.jpg"
    Image.fromarray(_photo(150, 200)).save(src, quality=30, exif=exif, xmp=xmp)
    (result,) = restore_files(restorer, [str(src)], tmp_path / "out", fmt=fmt, progress=False)
    assert result.error is None, result.error
    out = Image.open(result.output)
    assert out.size == (150, 200) and out.getexif().get_ifd(EXIF_IFD)[0xA002] == 150
    got = _xmp_of(result.output)
    assert b'exif:PixelXDimension="150"' in got and b'exif:PixelYDimension="200"' in got, got
    assert b"<tiff:ImageWidth>150</tiff:ImageWidth>" in got and b"<tiff:ImageLength>200</tiff:ImageLength>" in got
    assert b"Orientation" not in got
    flipped = tmp_path / "flip.jpg"  # a mirror (orientation 2) keeps the sizes
    exif[ORIENTATION] = 2
    Image.fromarray(_photo(150, 200)).save(flipped, quality=30, exif=exif, xmp=xmp)
    (result,) = restore_files(restorer, [str(flipped)], tmp_path / "out2", fmt=fmt, progress=False)
    assert b'exif:PixelXDimension="200"' in _xmp_of(result.output)
