"""Issue 21's restore-side faults, each run and its outcome asserted: restore keeps the ICC profile and EXIF
(orientation applied once), converts CMYK through its embedded profile; evaluate and report check their
outputs before any computation; a killed restore's temp files are removed by the next one; --skip-existing
skips only complete outputs and says so; written files are as readable as the umask allows; a flock error
that is not "busy" is not reported as another run."""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from dist_dejpeg.cli import main
from dist_dejpeg.config import ModelConfig
from dist_dejpeg.models.generator_file import save_generator
from dist_dejpeg.restore.files import OutputError, restore_files
from dist_dejpeg.restore.inputs import remove_stale_temps
from dist_dejpeg.restore.images import load_image, output_complete
from dist_dejpeg.run.lock import RunDirBusy, RunDirLockFailed, RunLock, filesystem

from test_evaluate import TINY, model_file  # noqa: F401 - the module-scoped tiny generator file

ORIENTATION, EXIF_IFD, GPS_IFD, XMP_TAG = 0x0112, 0x8769, 0x8825, 700
GPS = {1: "N", 2: (52.0, 22.0, 30.5), 3: "E", 4: (4.0, 53.0, 1.0), 6: 12.5}


class Identity:
    """A restorer whose output is its input: the metadata and orientation checks compare pixels exactly (the
    commands below run the real model)."""

    device, passthrough = "cpu", False
    guard, gains = False, {}  # (as a restorer opened with --no-guard)

    def restore_array(self, rgb: np.ndarray, quality: int | None = None, source: str = "given",
                      conformed: bool = False) -> np.ndarray:
        self.last_decision = SimpleNamespace(passthrough=self.passthrough, reason="identity", quality=quality,
                                             source=source)
        return rgb.copy()


@pytest.fixture
def restorer() -> Identity:
    return Identity()


def _photo(h: int = 72, w: int = 100) -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[30:30 + h, 140:140 + w])


def _camera_jpeg(rgb: np.ndarray, icc: bytes, orientation: int = 6, dpi=(300, 150)) -> bytes:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0132] = "Canon", "EOS 5D", "2024:05:06 07:08:09"
    exif[ORIENTATION] = orientation
    exif[EXIF_IFD] = {0x9003: "2024:05:06 07:08:09", 0xA002: rgb.shape[1], 0xA003: rgb.shape[0]}
    exif[GPS_IFD] = GPS
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=30, exif=exif, icc_profile=icc, dpi=dpi)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["png", "tiff", "webp", "jpg"])
def test_restore_keeps_icc_and_exif_with_orientation_applied_once(tmp_path, restorer, fmt):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgb = _photo()
    src = tmp_path / "in" / "camera.jpg"
    src.parent.mkdir()
    src.write_bytes(_camera_jpeg(rgb, icc))
    (result,) = restore_files(restorer, [str(src)], tmp_path / "out", fmt=fmt, progress=False)
    assert result.error is None, result.error
    out = Image.open(result.output)
    out.load()
    assert out.info.get("icc_profile") == icc
    exif = out.getexif()
    assert exif[0x010F] == "Canon" and exif[0x0110] == "EOS 5D" and exif[0x0132] == "2024:05:06 07:08:09"
    assert exif[ORIENTATION] == 1
    assert exif.get_ifd(GPS_IFD) == GPS
    sub = exif.get_ifd(EXIF_IFD)
    assert sub[0x9003] == "2024:05:06 07:08:09" and (sub[0xA002], sub[0xA003]) == (72, 100)  # the output's size
    if fmt != "webp":  # the scan's print size: 300 x 150 dpi, turned with the pixels (WebP has no field for it)
        assert np.allclose(out.info["dpi"], (150, 300), atol=0.05), out.info.get("dpi")
    # pixels turned once, clockwise as orientation 6 says; a viewer honouring the EXIF turns nothing more
    decoded = np.rot90(np.asarray(Image.open(src).convert("RGB")), -1)
    if fmt == "jpg":  # q95 4:4:4: near, not equal; turned the other way it would be far off
        assert np.abs(np.asarray(out.convert("RGB")).astype(int) - decoded).mean() < 2.0
    else:  # made consistent with the file's data: a few levels where the decoder's rounding, clipping or chroma
        diff = np.abs(np.asarray(out.convert("RGB")).astype(int) - decoded)  # upsampling left a cell (5 at the
        assert diff.mean() < 0.5 and diff.max() <= 6, (diff.mean(), diff.max())  # edge's cut blocks: 4 inside)
        assert diff[:-8, :-8].max() <= 4, diff[:-8, :-8].max()
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(out)), np.asarray(out))


def cmyk_profile(grid: int = 3, tint=(1.0, 0.85, 0.6)) -> bytes:
    """A CMYK -> Lab output profile (ICC v2, lut8 A2B0) that renders RGB = (1 - C)(1 - K), ... times ``tint``:
    a profile no naive conversion matches. No CMYK profile ships with the test environment."""
    from skimage.color import rgb2lab

    axis = np.linspace(0, 1, grid)
    c, m, y, k = np.meshgrid(axis, axis, axis, axis, indexing="ij")
    rgb = np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], -1) * np.array(tint)
    lab = rgb2lab(rgb.reshape(-1, 1, 3), illuminant="D50").reshape(-1, 3)
    clut = np.clip(np.rint(np.stack([lab[:, 0] * 2.55, lab[:, 1] + 128, lab[:, 2] + 128], -1)), 0, 255)
    ramp, white = bytes(range(256)), struct.pack(">iii", 63190, 65536, 54061)
    identity = b"".join(struct.pack(">i", v) for v in (65536, 0, 0, 0, 65536, 0, 0, 0, 65536))
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", 10) + b"test CMYK\0" + bytes(79)),
            (b"wtpt", b"XYZ " + bytes(4) + white), (b"cprt", b"text" + bytes(4) + b"none\0"),
            (b"A2B0", b"mft1" + bytes(4) + bytes([4, 3, grid, 0]) + identity + ramp * 4
             + clut.astype(np.uint8).tobytes() + ramp * 3)]
    return _icc(b"prtrCMYKLab ", tags, white)


def _icc(classes: bytes, tags: list[tuple[bytes, bytes]], white: bytes) -> bytes:
    """An ICC v2 profile: its header (device class, colour space and PCS: ``classes``) and its tag table."""
    table, data, start = b"", b"", 128 + 4 + 12 * len(tags)
    for sig, body in tags:
        data += bytes(-(start + len(data)) % 4)
        table += sig + struct.pack(">II", start + len(data), len(body))
        data += body
    body = struct.pack(">I", len(tags)) + table + data
    return (struct.pack(">I", 128 + len(body)) + b"lcms" + bytes([2, 0x10, 0, 0]) + classes + bytes(12)
            + b"acspAPPL" + bytes(24) + white + bytes(48) + body)


def test_cmyk_is_converted_through_its_embedded_profile(tmp_path, restorer):
    """CMYK with a profile: LittleCMS through that profile, the output tagged sRGB; without one: PIL's naive
    conversion, no profile; a profile that does not describe the output's colours is not carried."""
    icc = cmyk_profile()
    cmyk = Image.fromarray(_photo()).convert("CMYK")
    for name, kw in (("profiled.jpg", {"icc_profile": icc}), ("plain.jpg", {})):
        cmyk.save(tmp_path / name, format="JPEG", quality=40, **kw)
    rgb_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(_photo()[..., 0]).save(tmp_path / "gray_rgb_profile.jpg", quality=40, icc_profile=rgb_icc)

    profiled = load_image(tmp_path / "profiled.jpg")
    opened = Image.open(tmp_path / "profiled.jpg")
    srgb = ImageCms.createProfile("sRGB")
    expected = np.asarray(ImageCms.profileToProfile(opened, ImageCms.ImageCmsProfile(io.BytesIO(icc)), srgb,
                                                    outputMode="RGB"))
    naive = np.asarray(opened.convert("RGB")).astype(int)
    assert np.array_equal(profiled.rgb, expected)
    assert naive[..., 2].mean() - profiled.rgb[..., 2].mean() > 15  # the profile's warm tint, not naive
    assert np.array_equal(load_image(tmp_path / "plain.jpg").rgb, np.asarray(Image.open(tmp_path / "plain.jpg")
                                                                             .convert("RGB")))
    results = restore_files(restorer, [str(tmp_path / "*.jpg")], tmp_path / "out", progress=False)
    assert all(r.error is None for r in results), [r.error for r in results]
    out = {Path(r.output).name: Image.open(r.output) for r in results}
    tagged = ImageCms.ImageCmsProfile(io.BytesIO(out["profiled.png"].info["icc_profile"]))
    assert out["profiled.png"].mode == "RGB" and "sRGB" in ImageCms.getProfileDescription(tagged)
    assert "icc_profile" not in out["plain.png"].info
    assert out["gray_rgb_profile.png"].mode == "L" and "icc_profile" not in out["gray_rgb_profile.png"].info


def gray_profile(gamma: float = 2.2) -> bytes:
    """A monitor GRAY profile (ICC v2: a ``gamma`` kTRC), as a grayscale scan or export carries."""
    white = struct.pack(">iii", 63190, 65536, 54061)
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", 10) + b"test GRAY\0" + bytes(79)),
            (b"wtpt", b"XYZ " + bytes(4) + white), (b"cprt", b"text" + bytes(4) + b"none\0"),
            (b"kTRC", b"curv" + bytes(4) + struct.pack(">IH", 1, int(gamma * 256)))]
    return _icc(b"mntrGRAYXYZ ", tags, white)


class Predicting(Identity):
    """The identity, with the guard's prediction a real model's file gives: gain (dB, lower bound) and the
    validation's JPEG PSNR at the quality."""

    def __init__(self, gain: float, jpeg_psnr: float | None):
        self.gain, self.jpeg_psnr = gain, jpeg_psnr

    def restore_array(self, rgb, quality=None, source="given", conformed=False):  # smoother, as a restoration is
        from PIL import ImageFilter

        super().restore_array(rgb, quality, source)
        self.last_decision.gain, self.last_decision.jpeg_psnr = self.gain, self.jpeg_psnr
        return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(0.8)))


def test_a_lossy_output_whose_re_encoding_costs_more_than_restoring_gains_is_the_input(tmp_path):
    """--format same (or jpg) writes the restored image as a q95 JPEG: at q85-q90 that re-encoding added more
    error than restoring removed (-0.03 to -0.35 dB on 4 skimage photos). The input file is written instead,
    said as a pass-through; where restoring removes more (q20: +0.7 dB predicted), the restored image is."""
    photo = _photo(96, 128)
    for q in (20, 90):
        Image.fromarray(photo).save(tmp_path / f"q{q}.jpg", quality=q)
    cases = {"q90.jpg": (Predicting(0.1, 37.0), True), "q20.jpg": (Predicting(0.7, 29.4), False),
             # a file without the JPEG PSNR: what the input's tables cost the restored image, alone
             "q20.jpg ": (Predicting(0.7, None), False), "q90.jpg ": (Predicting(0.1, None), True),
             # a smooth photo's JPEG error is well under the validation's: its own bounds it
             "q90.jpg  ": (Predicting(0.1, 30.0), True)}
    for name, (restorer, written_as_input) in cases.items():
        name = name.strip()
        (result,) = restore_files(restorer, [str(tmp_path / name)], tmp_path / "out", fmt="same", progress=False)
        same = Path(result.output).read_bytes() == (tmp_path / name).read_bytes()
        assert same == written_as_input and result.passthrough == written_as_input, (name, result)
        if written_as_input:
            assert "re-encoding as JPEG would add more error than restoring removes" in result.note, result.note
    (result,) = restore_files(Predicting(0.1, 37.0), [str(tmp_path / "q90.jpg")], tmp_path / "png", progress=False)
    assert not result.passthrough  # a lossless output adds nothing: restored
    # a camera's MPO (a JPEG with its depth or preview image after it) is a JPEG to this check, and its copy
    Image.fromarray(photo).save(tmp_path / "phone.jpg", format="MPO", quality=90, save_all=True,
                                append_images=[Image.fromarray(photo[::2, ::2])])
    assert Image.open(tmp_path / "phone.jpg").format == "MPO"
    (result,) = restore_files(Predicting(0.1, 37.0), [str(tmp_path / "phone.jpg")], tmp_path / "mpo", fmt="same",
                              progress=False)
    assert result.passthrough and Path(result.output).read_bytes() == (tmp_path / "phone.jpg").read_bytes()
    assert "re-encoding as JPEG would" in result.note, result.note


class Towards(Predicting):
    """A restoration a share of the way from the input to the clean photo, with the guard's prediction ``gain``."""

    def __init__(self, clean: np.ndarray, share: float, gain: float, jpeg_psnr: float):
        super().__init__(gain, jpeg_psnr)
        self.clean, self.share = clean, share

    def restore_array(self, rgb, quality=None, source="given", conformed=False):
        Identity.restore_array(self, rgb, quality, source)
        self.last_decision.gain, self.last_decision.jpeg_psnr = self.gain, self.jpeg_psnr
        mixed = (1 - self.share) * rgb + self.share * self.clean.astype(np.float64)
        return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def test_a_double_compressed_jpeg_is_restored_as_its_earlier_compression(tmp_path, model_file):  # noqa: F811
    """A q20 photo re-saved at q90 (its pixels say q20): the file's cells are the re-save's, around the q20 decode,
    and the clean photo lies far outside them (held in them, a restored one kept about half of its gain): its
    restored image is not held in them, by restore nor the API. Written back as a JPEG (--format same), the q20
    compression's error is what restoring removes: it was judged by the q90 tables' small one and passed through
    (a restoration 30% of the way to the clean photo, +0.3 dB predicted)."""
    import skimage.data

    from dist_dejpeg.restore import Restorer

    clean = np.ascontiguousarray(skimage.data.coffee()[:256, :320])
    Image.fromarray(clean).save(tmp_path / "q20.jpg", quality=20)
    with Image.open(tmp_path / "q20.jpg") as first:
        first.convert("RGB").save(tmp_path / "double.jpg", quality=90)
    double = tmp_path / "double.jpg"
    towards = Towards(clean, 0.3, 0.3, 29.4)
    (result,) = restore_files(towards, [str(double)], tmp_path / "png", progress=False)
    assert result.quality_from.startswith("pixels (double compressed)") and abs(result.quality - 20) <= 2, result
    assert "compressed at a coarser quality before this file was saved" in result.note, result.note
    with Image.open(double) as jpeg:
        restored = towards.restore_array(np.asarray(jpeg.convert("RGB")))
    assert np.array_equal(np.asarray(Image.open(result.output).convert("RGB")), restored)  # as made, not conformed
    (result,) = restore_files(towards, [str(double)], tmp_path / "same", fmt="same", progress=False)
    assert not result.passthrough and Path(result.output).read_bytes() != double.read_bytes(), result
    # the same told as --input-quality 20 (the tables say q90): it was held in the cells and passed through again
    (result,) = restore_files(towards, [str(double)], tmp_path / "given", fmt="same", progress=False, quality=20)
    assert result.quality_from == "given" and not result.passthrough, result
    assert "compressed at a coarser quality before" in result.note, result.note
    (result,) = restore_files(towards, [str(double)], tmp_path / "as90", progress=False, quality=90)
    assert "compressed at a coarser quality" not in result.note, result.note  # q90 given: its own cells
    restorer = Restorer(model_file, device="cpu", guard=False)
    for quality in (None, 20):
        restorer.restore(double, quality)
        assert "compressed at a coarser quality before" in restorer.last_decision.reason, restorer.last_decision
    restorer.restore(tmp_path / "q20.jpg")  # a single compression: held in its file's cells
    assert "made consistent with its file" in restorer.last_decision.reason, restorer.last_decision


def test_a_pngs_text_chunks_go_into_a_png_output(tmp_path, restorer):
    """A PNG's Author, Copyright and Description (tEXt, and iTXt where Latin-1 cannot hold them) were dropped;
    kept in a PNG output, its XMP still carried as XMP."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Author", "Ann Lee")
    info.add_text("Copyright", "(c) 2024 Ann Lee, all rights reserved")
    info.add_text("Description", "Łódź at dusk")  # not Latin-1: an iTXt chunk
    xmp = XMP.replace(b' tiff:Orientation="6"', b"").decode()
    info.add_itxt("XML:com.adobe.xmp", xmp)
    Image.fromarray(_photo()).save(tmp_path / "scan.png", pnginfo=info)
    (result,) = restore_files(restorer, [str(tmp_path / "scan.png")], tmp_path / "out", progress=False)
    out = Image.open(result.output)
    assert {k: out.text[k] for k in ("Author", "Copyright", "Description")} == {
        "Author": "Ann Lee", "Copyright": "(c) 2024 Ann Lee, all rights reserved", "Description": "Łódź at dusk"}
    assert out.text["XML:com.adobe.xmp"] == xmp  # once, as the XMP


def test_a_gray_profile_stays_with_gray_pixels_only(tmp_path, restorer):
    """A grayscale JPEG's GRAY profile is kept where the output is grayscale (PNG, JPEG, TIFF); WebP has no gray
    pixels (PIL writes them as RGB), so its pixels are the gray ones through that profile, tagged sRGB."""
    icc = gray_profile()
    assert ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space.strip() == "GRAY"
    Image.fromarray(_photo()[..., 0]).save(tmp_path / "scan.jpg", quality=30, icc_profile=icc)
    outputs = {}
    for fmt in ("png", "webp", "jpg"):
        (result,) = restore_files(restorer, [str(tmp_path / "scan.jpg")], tmp_path / fmt, fmt=fmt, progress=False)
        assert result.error is None, result.error
        outputs[fmt] = Image.open(result.output)
    assert outputs["png"].mode == "L" and outputs["png"].info.get("icc_profile") == icc
    assert outputs["jpg"].info.get("icc_profile") == icc
    webp = ImageCms.ImageCmsProfile(io.BytesIO(outputs["webp"].info["icc_profile"]))
    assert outputs["webp"].mode == "RGB" and "sRGB" in ImageCms.getProfileDescription(webp)
    expected = ImageCms.profileToProfile(outputs["png"], ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                         ImageCms.createProfile("sRGB"), outputMode="RGB")
    assert np.abs(np.asarray(outputs["webp"], int) - np.asarray(expected, int)).max() <= 1


@pytest.mark.parametrize("gamma", [1.8, 2.2])
def test_a_gray_photo_written_as_webp_looks_as_it_did_colour_managed(tmp_path, gamma):
    """A WebP holds RGB: a grayscale image tagged Gray Gamma 1.8 used to be written as its gray values, untagged,
    so read as sRGB (12 levels darker on average, measured on the review's photos); now the same colours."""
    from dist_dejpeg.restore.images import save_image

    icc, srgb = gray_profile(gamma), ImageCms.createProfile("sRGB")
    gray = _photo()[..., 1]
    save_image(np.repeat(gray[..., None], 3, axis=2), tmp_path / "x.webp", grayscale=True, icc_profile=icc)
    save_image(np.repeat(gray[..., None], 3, axis=2), tmp_path / "a.webp", grayscale=True, icc_profile=icc,
               alpha=np.full(gray.shape, 200, np.uint8))

    def shown(img: Image.Image, profile) -> np.ndarray:  # as a colour-managed viewer shows it: in sRGB
        return np.asarray(ImageCms.profileToProfile(img, profile, srgb, outputMode="RGB"), int)

    want = shown(Image.fromarray(gray, "L"), ImageCms.ImageCmsProfile(io.BytesIO(icc)))
    for name in ("x.webp", "a.webp"):
        out = Image.open(tmp_path / name)
        assert out.mode == ("RGB" if name == "x.webp" else "RGBA") and "icc_profile" in out.info
        got = shown(out.convert("RGB"), ImageCms.ImageCmsProfile(io.BytesIO(out.info["icc_profile"])))
        assert np.abs(got - want).max() <= 1
    assert np.asarray(Image.open(tmp_path / "a.webp"))[..., 3].min() == 200  # the alpha kept


def test_a_gray_profile_littlecms_refuses_is_left_out_of_a_webp_with_a_warning(tmp_path, caplog):
    from dist_dejpeg.restore.images import save_image

    broken = gray_profile()[:-8]  # its last tag cut short: the header still says GRAY
    with caplog.at_level(logging.WARNING):
        save_image(np.full((8, 8, 3), 90, np.uint8), tmp_path / "x.webp", grayscale=True, icc_profile=broken)
    out = Image.open(tmp_path / "x.webp")
    assert "icc_profile" not in out.info and np.asarray(out.convert("L")).max() == 90
    assert f"{tmp_path / 'x.webp'}: written without its gray ICC profile" in caplog.text


def _iptc_segment(**records: bytes) -> bytes:
    """An APP13 payload as Photoshop writes one: an IPTC-NAA resource (8BIM 0x0404) of application records."""
    tags = {"caption": 120, "copyright": 116}
    iptc = b"".join(b"\x1c\x02" + bytes([tags[k]]) + struct.pack(">H", len(v)) + v for k, v in records.items())
    return (b"Photoshop 3.0\x00" + b"8BIM" + struct.pack(">HHI", 0x0404, 0, len(iptc)) + iptc
            + bytes(len(iptc) % 2))


def test_a_jpegs_comment_and_iptc_go_into_a_jpeg_output_and_its_comment_into_a_png(tmp_path, restorer):
    """Captions and copyright live in a JPEG's COM and APP13 (IPTC) segments: a JPEG output carries both (read
    back by Pillow's IPTC reader, the EXIF and profile beside them intact), a PNG the comment as its text."""
    from PIL import IptcImagePlugin

    from dist_dejpeg.restore.images import save_image

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    jpeg = _camera_jpeg(_photo(), icc)
    app13 = _iptc_segment(caption="Kinderdijk, zonsopgang".encode(), copyright="\u00a9 2024 J. Jansen".encode())
    at = jpeg.index(b"\xff\xdb")  # before the quantization tables, after Pillow's APPn segments
    src = tmp_path / "captioned.jpg"
    src.write_bytes(jpeg[:at] + b"\xff\xfe" + struct.pack(">H", 11) + b"a comment" + b"\xff\xed"
                    + struct.pack(">H", len(app13) + 2) + app13 + jpeg[at:])
    image = load_image(src)
    for name in ("out.jpg", "out.png"):
        save_image(image.rgb, tmp_path / name, icc_profile=image.icc_profile, exif=image.exif, xmp=image.xmp,
                   dpi=image.dpi, comment=image.comment, iptc=image.iptc)
        assert output_complete(tmp_path / name)
        out = Image.open(tmp_path / name)
        assert out.info.get("icc_profile") == icc and out.getexif()[0x010F] == "Canon"
        if name == "out.jpg":
            assert out.info["comment"] == b"a comment"
            assert IptcImagePlugin.getiptcinfo(out) == {(2, 120): "Kinderdijk, zonsopgang".encode(),
                                                        (2, 116): "\u00a9 2024 J. Jansen".encode()}
            assert [m for m, _ in out.applist].count("APP13") == 1
        else:
            assert out.info["Comment"] == "a comment"
    (result,) = restore_files(restorer, [str(src)], tmp_path / "cli", fmt="jpg", progress=False)  # the command too
    assert result.error is None, result.error
    out = Image.open(result.output)
    assert out.info["comment"] == b"a comment"
    assert IptcImagePlugin.getiptcinfo(out)[(2, 120)] == "Kinderdijk, zonsopgang".encode()
    mpo = io.BytesIO()  # a camera's MPO: its first image, the photo, is restored, with its comment
    Image.fromarray(_photo()).save(mpo, format="MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))],
                                   comment=b"3D shot")
    (src := tmp_path / "stereo.jpg").write_bytes(mpo.getvalue())
    assert load_image(src).format == "MPO" and load_image(src).comment == b"3D shot"


def test_an_output_folder_inside_the_input_folder_is_not_searched(tmp_path, restorer):
    """-o photos/restored, run again (--skip-existing after a stop): the earlier outputs are not inputs, so
    nothing is restored into restored/restored/ and no original fails as 'would overwrite an input'."""
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.jpg"):
        Image.fromarray(_photo()).save(src / name, quality=30)
    out = src / "restored"
    for run in range(2):
        for inputs in ([str(src)], [str(src / "**" / "*.jpg")]):
            results = restore_files(restorer, inputs, out, fmt="same", skip_existing=True, progress=False)
            assert sorted(Path(r.source).name for r in results if not r.earlier) == ["a.jpg", "b.jpg"]
            assert all(r.error is None for r in results), [r.error for r in results]
            # the outputs found below the output folder: restore's own, left alone and said so
            assert sorted(r.source for r in results if r.earlier) == ([] if run + inputs[0].count("*") == 0 else
                                                                      [str(out / "a.jpg"), str(out / "sub/b.jpg")])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["a.jpg", "sub", "sub/b.jpg"]
    # an original put into the output folder is not restored by the search, and says why (it was left silently)
    Image.fromarray(_photo()).save(out / "old.jpg", quality=30)
    (original,) = [r for r in restore_files(restorer, [str(src)], out, fmt="same", skip_existing=True,
                                            progress=False) if r.source == str(out / "old.jpg")]
    assert not original.output and "inside the output folder" in original.error and "name it by itself" in original.error
    (out / "old.jpg").unlink()
    # the output folder given as the input folder itself is searched (outputs told apart by --suffix); its
    # files that restore wrote are left alone (test_restoring_a_folder_into_itself_...)
    Image.fromarray(_photo()).save(out / "sub" / "c.jpg", quality=30)
    earlier, result = restore_files(restorer, [str(out / "sub")], out / "sub", suffix="x", progress=False)
    assert earlier.earlier and earlier.source == str(out / "sub" / "b.jpg") and not earlier.output
    assert result.error is None and result.output == str(out / "sub" / "c_x.png")
    # a folder inside the output folder (not the other way round) is searched as given, restore's outputs found
    # there left alone as anywhere (another run's -o: restore photos -o photos/restored, then -o photos/as_jpg
    # restored the first run's outputs again, each a layer worse)
    results = restore_files(restorer, [str(out / "sub")], out, suffix="y", progress=False)
    assert sorted((Path(r.source).name, r.earlier, r.output) for r in results) == [
        ("b.jpg", True, None), ("c.jpg", False, str(out / "c_y.png")), ("c_x.png", True, None)]
    (again,) = restore_files(restorer, [str(out / "sub" / "c_x.png")], out, suffix="y", progress=False)
    assert again.output == str(out / "c_x_y.png")  # named by itself: restored, whoever wrote it
    # inputs passed through byte for byte (the guard, or a re-encoding that would lose) carry no mark: their own
    # bytes tell them apart, so a second run says them left alone, not failed
    restorer.passthrough = True
    shutil.rmtree(out)  # (the photos' own tree again: a.jpg, sub/b.jpg)
    for _ in range(2):
        results = restore_files(restorer, [str(src)], out, fmt="same", skip_existing=True, progress=False)
        assert all(r.error is None for r in results), [r.error for r in results]
    assert sorted(r.source for r in results if r.earlier) == [str(out / "a.jpg"), str(out / "sub" / "b.jpg")]
    assert (out / "a.jpg").read_bytes() == (src / "a.jpg").read_bytes()


def test_a_photo_restore_did_not_write_is_never_replaced_by_an_output(tmp_path, restorer):
    """restore 'a/*.jpg' -o a replaced a/beach.png, another picture of the user's, with beach.jpg's restored image
    without a word: that file fails, saying why, the picture untouched; restore's own outputs (marked) and inputs
    passed through byte for byte are replaced by a second run as before."""
    folder = tmp_path / "a"
    folder.mkdir()
    Image.fromarray(_photo()).save(folder / "beach.jpg", quality=30)
    Image.fromarray(_photo()[::-1].copy()).save(folder / "beach.png")
    picture = (folder / "beach.png").read_bytes()
    for skip_existing in (False, True):  # (--skip-existing: not "skipped existing", beach.jpg never restored)
        (result,) = restore_files(restorer, [str(folder / "*.jpg")], folder, progress=False, skip_existing=skip_existing)
        assert result.output is None and not result.skipped and result.error.startswith(
            f"output {folder / 'beach.png'} exists and restore cannot tell it wrote it"), result.error
    assert (folder / "beach.png").read_bytes() == picture
    (result,) = restore_files(restorer, [str(folder / "beach.jpg")], folder / "beach.png", progress=False)
    assert result.output is None and "name another output file" in result.error
    for passthrough in (False, False, True, True):  # a marked output, then a byte copy, each replaced
        restorer.passthrough = passthrough
        (result,) = restore_files(restorer, [str(folder / "beach.jpg")], tmp_path / "out", fmt="same", progress=False)
        assert result.error is None and result.output == str(tmp_path / "out" / "beach.jpg"), result.error


def test_restoring_a_folder_into_itself_again_leaves_its_outputs_alone(tmp_path, restorer):
    """restore photos -o photos, run again after new photos came in: the first run's outputs (marked by restore,
    or passed through byte for byte under their output names) are not restored again as new photos (no
    a.png.png), while an original that merely shares an output's name is (c.jpg and c.png both photos)."""
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.jpg", "c.jpg", "c.png"):
        Image.fromarray(_photo()).save(src / name, **({"quality": 30} if name.endswith(".jpg") else {}))
    originals = ["a.jpg", "c.jpg", "c.png", "sub/b.jpg"]
    outputs = ["a.png", "c.jpg.png", "c.png.png", "sub/b.png"]
    files = lambda: sorted(p.relative_to(src).as_posix() for p in src.rglob("*.*"))  # noqa: E731
    results = restore_files(restorer, [str(src)], src, progress=False)
    assert sorted(Path(r.output).relative_to(src).as_posix() for r in results) == outputs
    Image.fromarray(_photo()).save(src / "d.jpg", quality=30)  # a new photo
    for run, inputs in enumerate(([str(src)], [str(src / "**" / "*")])):
        results = restore_files(restorer, inputs, src, progress=False)
        assert sorted(Path(r.source).relative_to(src).as_posix() for r in results if r.earlier) == sorted(
            outputs + ["d.png"] * run)
        assert all(r.error is None for r in results), [r.error for r in results]
        assert sorted(Path(r.output).relative_to(src).as_posix() for r in results if r.output) == [
            "a.png", "c.jpg.png", "c.png.png", "d.png", "sub/b.png"]
        assert files() == sorted(originals + outputs + ["d.jpg", "d.png"])
    # a file named by itself is an input whoever wrote it
    (result,) = restore_files(restorer, [str(src / "a.png")], tmp_path / "again", progress=False)
    assert result.output and not result.earlier
    # passed through byte for byte under its output name (--format same --suffix): an earlier output too
    restorer.passthrough = True
    for run in range(2):
        results = restore_files(restorer, [str(src / "sub")], src / "sub", fmt="same", suffix="r", progress=False)
        assert sorted((Path(r.source).name, r.earlier) for r in results) == sorted(
            [("b.png", True), ("b.jpg", False)] + ([("b_r.jpg", True)] if run else []))
    assert sorted(p.name for p in (src / "sub").iterdir()) == ["b.jpg", "b.png", "b_r.jpg"]
    assert (src / "sub" / "b_r.jpg").read_bytes() == (src / "sub" / "b.jpg").read_bytes()


def test_a_passed_through_image_is_written_as_the_input_file(tmp_path, restorer):
    """Passed through into its own format: the input file byte for byte (a JPEG never re-encoded at q95, its
    EXIF orientation left for viewers, as in the input); into another format: its pixels, orientation applied."""
    restorer.passthrough = True
    src = tmp_path / "camera.jpg"
    src.write_bytes(_camera_jpeg(_photo(), ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()))
    for fmt in ("same", "jpg", "png"):
        (result,) = restore_files(restorer, [str(src)], tmp_path / fmt, fmt=fmt, output_quality=80, progress=False)
        assert result.error is None and result.passthrough, result.error
        if fmt == "png":
            out = Image.open(result.output)
            assert out.getexif()[ORIENTATION] == 1
            assert np.array_equal(np.asarray(out), np.asarray(ImageOps.exif_transpose(Image.open(src))))
        else:
            assert Path(result.output).read_bytes() == src.read_bytes()
    restorer.passthrough = False
    (result,) = restore_files(restorer, [str(src)], tmp_path / "restored", fmt="same", progress=False)
    assert Path(result.output).read_bytes() != src.read_bytes()  # restored: encoded, orientation applied


XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
       b'tiff:Orientation="6" xmp:Rating="5"><dc:creator xmlns:dc="http://purl.org/dc/elements/1.1/">Ann Lee'
       b'</dc:creator></rdf:Description></rdf:RDF></x:xmpmeta>')


@pytest.mark.parametrize("fmt", ["png", "tiff", "webp", "jpg"])
def test_restore_keeps_xmp_with_its_orientation_removed(tmp_path, restorer, fmt):
    """A photographer's ratings, keywords and captions live in the XMP: kept in every output format, its
    tiff:Orientation removed as the EXIF's is applied (a viewer reading the XMP would turn the pixels again)."""
    src = tmp_path / "camera.jpg"
    jpeg = Image.open(io.BytesIO(_camera_jpeg(_photo(), b"", orientation=6)))
    jpeg.save(src, quality=30, exif=jpeg.info["exif"], xmp=XMP)
    (result,) = restore_files(restorer, [str(src)], tmp_path / "out", fmt=fmt, progress=False)
    assert result.error is None, result.error
    out = Image.open(result.output)
    xmp = out.info.get("xmp")
    xmp = xmp.encode() if isinstance(xmp, str) else xmp
    assert xmp == XMP.replace(b' tiff:Orientation="6"', b" "), xmp
    assert out.getexif()[ORIENTATION] == 1 and XMP_TAG not in out.getexif().get_ifd(EXIF_IFD)


def test_an_exif_or_xmp_over_64_kb_is_trimmed_for_a_jpeg_output_with_a_warning(tmp_path, restorer, caplog):
    """A PNG or TIFF may carry more metadata than a JPEG's 64 KB marker holds (a big maker note, a Photoshop
    block): written as JPEG, the largest values go with a warning naming them, the rest (camera, GPS) stays and
    the image is written; other formats keep everything."""
    exif = Image.Exif()
    exif[0x010F], exif[GPS_IFD] = "Canon", GPS
    exif[EXIF_IFD] = {0x927C: b"M" * 70_000, 0x9003: "2024:05:06 07:08:09"}  # MakerNote
    (tmp_path / "in").mkdir()
    Image.fromarray(_photo()).save(tmp_path / "in" / "maker.png", exif=exif)
    Image.fromarray(_photo()).save(tmp_path / "in" / "xmp.tif", tiffinfo={XMP_TAG: XMP + b" " * 70_000})
    with caplog.at_level(logging.WARNING):
        results = restore_files(restorer, [str(tmp_path / "in")], tmp_path / "jpg", fmt="jpg", progress=False)
    assert [r.error for r in results] == [None, None]
    out = Image.open(tmp_path / "jpg" / "maker.jpg").getexif()
    assert out[0x010F] == "Canon" and out.get_ifd(GPS_IFD) == GPS
    assert out.get_ifd(EXIF_IFD) == {0x9003: "2024:05:06 07:08:09"}
    assert "written without the EXIF's MakerNote" in caplog.text and "written without its XMP" in caplog.text
    assert "xmp" not in Image.open(tmp_path / "jpg" / "xmp.jpg").info
    (result,) = restore_files(restorer, [str(tmp_path / "in" / "maker.png")], tmp_path / "png", progress=False)
    assert len(Image.open(result.output).getexif().get_ifd(EXIF_IFD)[0x927C]) == 70_000


def test_the_inputs_software_is_kept_with_restores_mark_after_it(tmp_path, restorer):
    """EXIF Software "Adobe Photoshop Lightroom Classic 13.0" was replaced by restore's mark: kept, the mark after it
    (as an editor adds itself), which still tells restore's outputs apart; a camera's NUL-padded name is cut at its
    first NUL (a reader stops there: a mark after it is unseen), an output restored again is marked once, an output
    from before (the mark alone) is still restore's, and a JPEG's EXIF trimmed to 64 KB keeps the mark."""
    from dist_dejpeg.jpeg.formats import SOFTWARE_TAG, written_by_restore
    from dist_dejpeg.restore.images import save_image

    def software(path: Path) -> str:
        return Image.open(path).getexif().get(SOFTWARE_TAG)

    mark = "dist-dejpeg restore"
    for i, (given, written) in enumerate([("Adobe Photoshop Lightroom Classic 13.0", None), ("Ver.1.00\0\0\0", None),
                                          (f"GIMP 2.10; {mark}", f"GIMP 2.10; {mark}"), (None, mark)]):
        src = tmp_path / f"in{i}.jpg"
        exif = Image.Exif()
        if given is not None:
            exif[SOFTWARE_TAG] = given
        Image.fromarray(_photo(24, 32)).save(src, quality=30, exif=exif)
        (result,) = restore_files(restorer, [str(src)], tmp_path / "out", fmt="jpg", progress=False)
        expected = written or f"{given.split(chr(0))[0]}; {mark}"
        assert software(result.output) == expected and written_by_restore(result.output), (given, expected)
    old, exif = tmp_path / "old.png", Image.Exif()
    exif[SOFTWARE_TAG] = mark
    Image.fromarray(_photo(24, 32)).save(old, exif=exif)
    assert written_by_restore(old) and not written_by_restore(tmp_path / "in0.jpg")
    big = Image.Exif()  # (a name kept to 200 characters, the largest value left: not the one trimmed)
    big[SOFTWARE_TAG] = "L" * 1000
    for tag in range(0xC000, 0xC000 + 300):
        big[tag] = "y" * 219
    save_image(_photo(24, 32), tmp_path / "big.jpg", exif=big.tobytes())
    assert software(tmp_path / "big.jpg") == f"{'L' * 200}; {mark}"


def test_a_tiff_of_several_pages_is_refused_as_an_animation_is(tmp_path, restorer):
    """A multi-page TIFF (a scanned document, a stack) would lose all but its first page: refused with the
    reason; pages marked reduced-resolution (previews of the first) do not count."""
    pages = [Image.fromarray(_photo()), Image.fromarray(_photo()[::-1].copy())]
    pages[0].save(tmp_path / "scan.tif", save_all=True, append_images=pages[1:])
    pages[0].save(tmp_path / "preview.tif", save_all=True, append_images=pages[1:], tiffinfo={254: 1})
    preview, scan = restore_files(restorer, [str(tmp_path / "preview.tif"), str(tmp_path / "scan.tif")],
                                  tmp_path / "out", progress=False)
    assert scan.output is None and "a TIFF of 2 pages" in scan.error and "separate images" in scan.error
    assert preview.error is None and np.array_equal(np.asarray(Image.open(preview.output)), _photo())
    cut = tmp_path / "cut.tif"  # its later pages' directories cut off: a failure of that file, never a crash
    cut.write_bytes((tmp_path / "scan.tif").read_bytes()[:-30_000])
    with warnings.catch_warnings():  # PIL's "Corrupt EXIF data" is not printed beside the result
        warnings.simplefilter("error")
        (result,) = restore_files(restorer, [str(cut)], tmp_path / "out", progress=False)
    assert result.output is None and "cannot decode" in result.error, result.error


def _tiff_rgb16(rgb16: np.ndarray) -> bytes:
    """An uncompressed 16-bit RGB TIFF (as Lightroom or a scanner exports): PIL cannot write one."""
    (h, w, _), data = rgb16.shape, rgb16.astype("<u2").tobytes()
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, 8 + 2 + 10 * 12 + 4), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, 8 + 2 + 10 * 12 + 4 + 6), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(data)),
            (284, 3, 1, 1)]
    ifd = b"".join(struct.pack("<HHII" if kind == 4 or count > 1 else "<HHIHxx", tag, kind, count, value)
                   for tag, kind, count, value in tags)
    return b"II*\0" + struct.pack("<IH", 8, len(tags)) + ifd + struct.pack("<I3H", 0, 16, 16, 16) + data


def test_a_16_bit_tiff_is_refused_as_a_16_bit_png_is(tmp_path, restorer):
    """PIL opens a 16-bit RGB TIFF as 8-bit RGB without a word: it was restored (or passed through) as an 8-bit
    PNG, its low bits lost, where 16-bit images are documented as refused."""
    rgb16 = _photo().astype(np.uint16) * 257 + 3
    (tmp_path / "scan.tif").write_bytes(_tiff_rgb16(rgb16))
    assert Image.open(tmp_path / "scan.tif").mode == "RGB"  # what PIL makes of it
    (result,) = restore_files(restorer, [str(tmp_path / "scan.tif")], tmp_path / "out", progress=False)
    assert result.output is None and "a 16-bit TIFF: JPEG is 8-bit" in result.error, result.error
    assert not (tmp_path / "out" / "scan.png").exists()
    # a 16-bit P6 PPM (dcraw -4, a RAW converter's output): PIL opens it as 8-bit RGB too
    h, w, _ = rgb16.shape
    (tmp_path / "raw.ppm").write_bytes(f"P6\n{w} {h}\n65535\n".encode() + rgb16.astype(">u2").tobytes())
    (tmp_path / "raw8.ppm").write_bytes(f"P6\n{w} {h}\n255\n".encode() + _photo().tobytes())
    assert Image.open(tmp_path / "raw.ppm").mode == "RGB"
    raw, raw8 = restore_files(restorer, [str(tmp_path / "raw.ppm"), str(tmp_path / "raw8.ppm")], tmp_path / "out",
                              progress=False)
    assert raw.output is None and "a 16-bit PPM: JPEG is 8-bit" in raw.error, raw.error
    assert raw8.error is None, raw8.error

def _png_rgb16(rgb16: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (as a RAW converter exports): PIL cannot write one."""
    import zlib

    (h, w, _), rows = rgb16.shape, b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_the_api_refuses_a_16_bit_image_as_its_path_is_refused(tmp_path):
    """Restorer.restore(Image.open("rgb16.png")) gave an 8-bit image back without a word (PIL opens a 16-bit RGB
    PNG or TIFF as 8-bit RGB) where the file's path is refused: refused alike, opened from its path or its bytes."""
    from dist_dejpeg.restore.images import InputImageError
    from dist_dejpeg.restore.restorer import Restorer
    from test_infer import Pointwise

    api = Restorer(Pointwise(), tile=0, guard=False)
    rgb16 = _photo(24, 32).astype(np.uint16) * 257 + 3
    (tmp_path / "rgb16.png").write_bytes(_png_rgb16(rgb16))
    (tmp_path / "scan.tif").write_bytes(_tiff_rgb16(rgb16))
    for name, kind in (("rgb16.png", "PNG"), ("scan.tif", "TIFF")):
        path = tmp_path / name
        assert Image.open(path).mode == "RGB"  # what PIL makes of it
        said = f"a 16-bit {kind}: JPEG is 8-bit, so this file never was a JPEG"
        for image, source in ((str(path), str(path)), (Image.open(path), str(path)),
                              (Image.open(io.BytesIO(path.read_bytes())), "image")):
            with pytest.raises(InputImageError, match=re.escape(f"{source}: {said}")):
                api.restore(image)
    assert api.restore(Image.fromarray(_photo(24, 32))).mode == "RGB"  # 8-bit: restored


def test_a_quoted_glob_finds_a_cameras_upper_case_suffixes(tmp_path, restorer):
    """'photos/*.jpg' finds IMG_0001.JPG as the folder search does (cameras write upper case); a name without
    wildcards stays exact."""
    for name in ("IMG_0001.JPG", "b.jpg", "c.Jpg", "d.png"):
        Image.fromarray(_photo()).save(tmp_path / name, format="JPEG" if name != "d.png" else "PNG")
    results = restore_files(restorer, [str(tmp_path / "*.jpg")], tmp_path / "out", progress=False)
    assert sorted(Path(r.source).name for r in results if r.error is None) == ["IMG_0001.JPG", "b.jpg", "c.Jpg"]
    (missing,) = restore_files(restorer, [str(tmp_path / "img_0001.jpg")], tmp_path / "out", progress=False)
    assert missing.output is None and "no such file" in missing.error

# -- outputs checked first --------------------------------------------------------------------------------------
def test_evaluate_and_report_check_their_outputs_before_any_computation(tmp_path, model_file, monkeypatch, capsys):
    import dist_dejpeg.restore.restorer as restorer_module
    from dist_dejpeg.evaluation.evaluate import evaluate

    def no_work(*args, **kwargs):
        raise AssertionError("computation started before the output was checked")

    monkeypatch.setattr(restorer_module.Restorer, "__init__", no_work)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "folder.html").mkdir()
    images = ["--images", str(tmp_path / "no_images_here"), "--quiet", "--model", str(model_file)]
    cases = [(["evaluate", "-o", str(blocker / "eval")], "not writable"),
             (["report", "-o", str(blocker / "report.html")], "not writable"),
             (["report", "-o", str(tmp_path / "folder.html")], "is a folder")]
    # (-o without .html or .htm: a usage error, test_evaluate.test_report_page_not_named_html_is_a_usage_error)
    for argv, words in cases:
        assert main(argv + images) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "computation started" not in err, (argv, err)
    with pytest.raises(OutputError, match="not writable"):  # the Python API too: before reading any image
        evaluate(object(), [str(tmp_path / "no_images_here")], [10], blocker / "eval")


# -- a killed restore, --skip-existing ----------------------------------------------------------------------------
def _killed_writer(out: Path, name: str) -> int:
    """Run atomic_write_bytes in a child killed (SIGKILL) between writing its temp file and renaming it."""
    code = ("import os, signal\n"
            "from dist_dejpeg.run import files\n"
            "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"files.atomic_write_bytes({str(out / name)!r}, b'half an image')\n")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    assert child.wait(60) == -signal.SIGKILL
    return child.pid


def test_a_killed_restores_temp_files_are_removed_by_the_next_one(tmp_path, model_file, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for i in range(2):
        Image.fromarray(_photo(40, 48)).save(src / f"p{i}.jpg", quality=20)
    dead = _killed_writer(out, "p0.png")
    assert (out / f".p0.png.tmp{dead}").is_file()  # what the kill leaves
    old = out / f".p1.png.tmp{os.getpid()}"  # a live pid, but an hour old: a reused pid
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    young = out / f".p1.png.tmp{os.getppid()}"  # a live writer right now: left alone
    foreign = out / f".notes.png.tmp{dead}"  # not an output of this restore: left alone
    for path in (young, foreign):
        path.write_bytes(b"x")
    assert main(["restore", str(src), "-o", str(out), "--model", str(model_file), "--quiet"]) == 0
    left = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert left == sorted([young.name, foreign.name]), left
    assert output_complete(out / "p0.png") and output_complete(out / "p1.png")
    assert remove_stale_temps([out / "p1.png"], max_age_s=0) == [young]


def test_skip_existing_skips_only_complete_outputs_and_says_so(tmp_path, model_file, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(2):
        Image.fromarray(_photo(40, 48 + 8 * i)).save(src / f"p{i}.jpg", quality=20)
    run = ["restore", str(src), "-o", str(out), "--model", str(model_file), "--quiet", "--skip-existing"]
    assert main(run) == 0
    first, err = capsys.readouterr()
    assert "holds no validated gains" in err and "of a known JPEG quality is restored unchecked" in err  # (none held)
    assert "restored 2 image(s)" in first
    # under a megapixel, the time itself (as a rate it was mostly warm-up: "39753 ms per megapixel")
    assert re.search(r"on cpu in \d+\.\d s \(0\.00 megapixels\); 0 failed", first) and "per megapixel" not in first, first
    whole = (out / "p0.png").read_bytes()
    (out / "p0.png").write_bytes(whole[:len(whole) // 2])  # truncated: a copy cut short, a full disk ...
    kept = (out / "p1.png").stat()
    assert main(run) == 0
    text = capsys.readouterr().out
    assert "restored 1 image(s)" in text and "skipped 1 existing" in text and "restored: " not in text
    assert (out / "p0.png").read_bytes() == whole  # restored again, whole
    assert (out / "p1.png").stat().st_mtime_ns == kept.st_mtime_ns  # untouched
    assert main(run + ["--verbose"]) == 0  # all complete: no per-image line, even with --verbose
    text = capsys.readouterr().out
    assert "restored 0 image(s)" in text and "skipped 2 existing" in text and "restored: " not in text
    # what "complete" means: decodes to the end as its suffix's format; a PNG ends with IEND
    (out / "no_iend.png").write_bytes(whole[:-12])
    (out / "jpeg_bytes.png").write_bytes((src / "p0.jpg").read_bytes())
    assert output_complete(out / "p0.png")
    assert not any(output_complete(out / n) for n in ("no_iend.png", "jpeg_bytes.png", "missing.png"))


def test_skip_existing_skips_the_pass_through_copy_of_a_jpeg_with_data_after_its_end(tmp_path, restorer, caplog):
    """A phone's JPEG with a trailer after its EOI marker (motion-photo video) and a camera's MPO as .jpg, passed
    through: their outputs are the inputs byte for byte, and a second run skips them (it restored them again,
    warning "does not decode fully": the JPEG's tail and the MPO's format were checked as restore's own encodes)."""
    restorer.passthrough = True
    src = tmp_path / "in"
    src.mkdir()
    (src / "trail.jpg").write_bytes(_camera_jpeg(_photo(), b"") + b"JUNK")
    Image.fromarray(_photo()).save(src / "phone.mpo", format="MPO", save_all=True,
                                   append_images=[Image.fromarray(_photo(36, 50))])
    for run in range(2):
        results = restore_files(restorer, [str(src)], tmp_path / "out", fmt="same", skip_existing=True,
                                progress=False)
        assert [r.skipped for r in results] == [bool(run)] * 2, results
    assert "does not decode fully" not in caplog.text
    assert (tmp_path / "out" / "trail.jpg").read_bytes() == (src / "trail.jpg").read_bytes()
    assert (tmp_path / "out" / "phone.jpg").read_bytes() == (src / "phone.mpo").read_bytes()
    assert not output_complete(tmp_path / "out" / "trail.jpg")  # (without its input: restore's own encode's checks)
    (tmp_path / "out" / "trail.jpg").write_bytes((src / "trail.jpg").read_bytes()[:-600])  # cut short: a copy no more
    assert not output_complete(tmp_path / "out" / "trail.jpg", source=src / "trail.jpg")


def test_a_model_without_gains_is_said_to_pass_images_of_unknown_quality_through(tmp_path, model_file, capsys):
    """A checkpoint (no validated gains) as --model: a JPEG is restored unchecked, a PNG of unknown quality still
    passed through by the guard; the warning said "the guard cannot pass images through, every image is restored"."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_photo(40, 48)).save(src / "p.jpg", quality=20)
    Image.fromarray(_photo(40, 48)).save(src / "p.png")
    assert main(["restore", str(src), "-o", str(tmp_path / "out"), "--model", str(model_file), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "restored 1 image(s)" in out and "passed 1 through" in out, out
    assert "cannot pass images through" not in err and "of unknown quality are still passed through" in err, err


def test_a_pass_through_re_encoded_with_loss_is_not_said_to_be_unchanged(tmp_path, model_file, capsys):
    """A PNG of unknown quality, passed through by the guard, written as a q60 JPEG: said not restored but
    re-encoded (the summary said "passed 1 through unchanged"); into a lossless format its pixels are unchanged."""
    src = tmp_path / "a.png"
    Image.fromarray(_photo(40, 48)).save(src)
    run = ["restore", str(src), "--model", str(model_file)]
    assert main(run + ["-o", str(tmp_path / "jpg"), "--format", "jpg", "--output-quality", "60"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"not restored, re-encoded as JPEG q60: {src}: "), lines
    assert "; 1 not restored but re-encoded as JPEG q60; 0 failed" in lines[-1] and "unchanged" not in lines[-1]
    assert main(run + ["-o", str(tmp_path / "png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"passed through: {src}: ") and "passed 1 through unchanged; 0 failed" in lines[-1]


def test_the_summary_says_re_encoded_from_the_save_not_from_the_files_afterwards(tmp_path, capsys):
    """The summary compared each pass-through's output with its input after the run: an input removed (or
    replaced) since made a copy of it read as "re-encoded as JPEG q60". RestoreResult.reencoded, set by the save,
    says it."""
    import argparse

    from dist_dejpeg.restore.inputs import RestoreResult
    from dist_dejpeg.restore.summary import print_restore_summary

    (tmp_path / "a.jpg").write_bytes(b"the input itself")  # a copy whose input has gone since
    (tmp_path / "b.jpg").write_bytes(b"a png's pixels as a jpeg")
    results = [RestoreResult(str(tmp_path / "gone.jpg"), str(tmp_path / "a.jpg"), quality_from="unknown",
                             passthrough=True),
               RestoreResult(str(tmp_path / "b.png"), str(tmp_path / "b.jpg"), quality_from="unknown",
                             passthrough=True, reencoded=True)]
    args = argparse.Namespace(output_quality=60, quiet=False, verbose=False, out=str(tmp_path), skip_existing=False)
    print_restore_summary(results, args, "cpu")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"passed through: {tmp_path / 'gone.jpg'}: unknown", lines
    assert lines[1] == f"not restored, re-encoded as JPEG q60: {tmp_path / 'b.png'}: unknown", lines
    assert "passed 1 through unchanged; 1 not restored but re-encoded as JPEG q60; 0 failed" in lines[-1], lines


def test_a_folders_heic_raw_and_avif_files_are_counted_and_named_not_passed_over(tmp_path, model_file, capsys):
    """A phone's or camera's folder: its HEIC, RAW and AVIF files, which a folder search leaves out, are counted
    and named in one line (the summary said "restored 1 image(s) ... 0 failed" and nothing of them)."""
    src = tmp_path / "card"
    (src / "raw").mkdir(parents=True)
    Image.fromarray(_photo(40, 48)).save(src / "p.jpg", quality=20)
    for name in ("IMG_1.HEIC", "IMG_2.heic", "raw/IMG_3.CR2", "z.avif"):
        (src / name).write_bytes(b"\0\0\0\x18ftypheic")
    assert main(["restore", str(src), "-o", str(tmp_path / "out"), "--model", str(model_file), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "restored 1 image(s)" in out
    line = next(line for line in err.splitlines() if "left out" in line)
    assert line.startswith("note: left out 4 file(s) in formats restore does not read (1 .avif, 1 .cr2, 2 .heic: "
                           f"{src / 'IMG_1.HEIC'}, {src / 'IMG_2.heic'}, {src / 'raw' / 'IMG_3.CR2'}, ...): not JPEGs"), line


def test_ctrl_c_in_a_folder_leaves_whole_outputs_and_says_how_to_go_on(tmp_path, model_file, monkeypatch, capsys):
    """Ctrl-C while a folder is restored: the outputs already written are whole, no temp file is left, and the
    message says how to continue (it said only "restore: interrupted")."""
    import dist_dejpeg.restore.files as files

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_photo(40, 48)).save(src / f"p{i}.jpg", quality=20)
    real_load, loads = files.load_image, []

    def ctrl_c_at_the_third(path, *args, **kwargs):  # (the CPU restores one file after another: the third load is
        loads.append(path)  # after two outputs are written)
        if len(loads) == 3:
            raise KeyboardInterrupt
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(files, "load_image", ctrl_c_at_the_third)
    run = ["restore", str(src), "-o", str(out), "--model", str(model_file), "--quiet"]
    assert main(run) == 130
    said = capsys.readouterr()
    err = said.err
    assert "interrupted" in err and "every output written is whole" in err and "with --skip-existing" in err, err
    # what was done is said before the exit (it was lost), and recorded
    assert "restored 2 image(s)" in said.out and "0 failed; 1 not begun (interrupted)" in said.out, said.out
    assert sorted(p.name for p in out.iterdir()) == ["p0.png", "p1.png", "restore-record.jsonl"]  # no .tmp file
    assert [line.split('"status": ')[1].split(",")[0] for line in (out / "restore-record.jsonl").read_text(
    ).splitlines()] == ['"restored"', '"restored"', '"not begun"']
    assert all(output_complete(out / n) for n in ("p0.png", "p1.png"))
    monkeypatch.setattr(files, "load_image", real_load)
    assert main(run + ["--skip-existing"]) == 0
    assert "restored 1 image(s)" in capsys.readouterr().out and output_complete(out / "p2.png")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_full_disk_stops_a_folder_instead_of_restoring_each_image_to_fail(tmp_path, restorer, monkeypatch, workers):
    """Once an output finds the disk full, nothing more is begun (it restored all 10,000 photos of a folder, each
    failing its write): the images not begun say why; the written outputs are whole."""
    import dist_dejpeg.restore.files as files

    src = tmp_path / "in"
    src.mkdir()
    for i in range(8):
        Image.fromarray(_photo(40, 48)).save(src / f"p{i}.jpg", quality=20)
    real_save, saves, restores = files.save_image, [], []

    def full_from_the_second(restored, target, **kwargs):
        saves.append(target)
        if len(saves) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(restored, target, **kwargs)

    monkeypatch.setattr(files, "save_image", full_from_the_second)
    real_restore = restorer.restore_array
    monkeypatch.setattr(restorer, "restore_array", lambda *a, **k: restores.append(1) or real_restore(*a, **k))
    results = restore_files(restorer, [str(src)], tmp_path / "out", progress=False, workers=workers)
    stopped = [r for r in results if r.stopped]
    assert len(saves) <= 2 + workers and len(restores) <= 2 + workers  # (those in flight when the first failed)
    assert len(stopped) == 8 - len(restores) >= 8 - 2 - workers
    assert all(r.error.startswith("not restored: the disk is full (") and "No space left" in r.error for r in stopped)
    # the one output written whole: p0's, or p1's where its encode thread ran first (the first save succeeds)
    (written,) = (tmp_path / "out").iterdir()
    assert written.name in ("p0.png", "p1.png") and output_complete(written)


def test_the_restore_command_says_a_full_disk_once_and_how_to_go_on(tmp_path, model_file, monkeypatch, capsys):
    import dist_dejpeg.restore.files as files

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(4):
        Image.fromarray(_photo(40, 48)).save(src / f"p{i}.jpg", quality=20)
    real_save = files.save_image

    def full(restored, target, **kwargs):
        if target.name != "p0.png":
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_save(restored, target, **kwargs)

    monkeypatch.setattr(files, "save_image", full)
    one = ["restore", str(src / "p1.jpg"), "-o", str(tmp_path / "one"), "--model", str(model_file), "--quiet"]
    assert main(one) == 3  # (exit 1 was a bad image's: a full disk is 3, as prepare, evaluate, export say it)
    capsys.readouterr()
    run = ["restore", str(src), "-o", str(out), "--model", str(model_file), "--quiet"]
    assert main(run) == 3
    said = capsys.readouterr()
    assert said.err.count("failed: ") == 1 and said.err.count("stopped: the disk is full") == 1, said.err
    assert "2 image(s) not begun; free space, then run the same command with --skip-existing" in said.err
    assert said.out.strip().endswith("1 failed; 2 not begun (disk full)"), said.out
    monkeypatch.setattr(files, "save_image", real_save)  # space freed
    assert main(run + ["--skip-existing"]) == 0
    assert "restored 3 image(s)" in capsys.readouterr().out and len(list(out.glob("*.png"))) == 4


def test_the_restore_command_says_a_quota_as_a_quota(tmp_path, model_file, monkeypatch, capsys):
    """EDQUOT stopped a folder as "the disk is full": a quota is said as one (as training does), free space
    within it asked for."""
    import dist_dejpeg.restore.files as files

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_photo(40, 48)).save(src / f"p{i}.jpg", quality=20)

    def quota(restored, target, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(target))

    monkeypatch.setattr(files, "save_image", quota)
    assert main(["restore", str(src), "-o", str(out), "--model", str(model_file), "--quiet"]) == 3
    said = capsys.readouterr()
    assert f"stopped: quota exceeded (EDQUOT) on {out}; check `quota -s` / `lfs quota`: 2 image(s) not begun; " \
           f"free space within the quota, then" in said.err, said.err
    assert "disk is full" not in said.err and said.out.strip().endswith("2 not begun (quota exceeded)"), said.out


def test_a_folder_search_skips_hidden_files_and_folders_as_a_glob_does(tmp_path, restorer):
    """A photo folder from a Mac-formatted drive holds an AppleDouble ._IMG.jpg beside each photo (not an image:
    each one failed, exit 1), and a NAS's .thumbnails copies were restored too; evaluate read them alike. A folder
    search now skips what a shell glob skips; a hidden file named by itself is still used. Linked folders are
    searched, as prepare folder searches them (they were not)."""
    from dist_dejpeg.evaluation.references import _input_paths

    src = tmp_path / "drive"
    (src / "sub").mkdir(parents=True)
    (src / ".thumbnails").mkdir()
    for name in ("a.jpg", "sub/b.jpg", ".thumbnails/a.jpg", ".hidden.jpg"):
        Image.fromarray(_photo(40, 48)).save(src / name, quality=20)
    (src / "._a.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    album = tmp_path / "album"  # and, as prepare folder does, a linked folder followed once (a link loop ends)
    album.mkdir()
    Image.fromarray(_photo(40, 48)).save(album / "c.jpg", quality=20)
    (src / "linked").symlink_to(album)
    (src / "sub" / "up").symlink_to(src)
    results = restore_files(restorer, [str(src)], tmp_path / "out", progress=False)
    assert not [r.error for r in results if r.error]
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png")) == [
        "a.png", "linked/c.png", "sub/b.png"]
    globbed = restore_files(restorer, [f"{src}/*.jpg", f"{src}/sub/*.jpg"], tmp_path / "globbed", progress=False)
    assert sorted(Path(r.source).name for r in globbed) == ["a.jpg", "b.jpg"]  # (what glob itself skips)
    assert [p.relative_to(src).as_posix() for p in _input_paths([str(src)])] == ["a.jpg", "linked/c.jpg",
                                                                                  "sub/b.jpg"]
    named = restore_files(restorer, [str(src / ".thumbnails" / "a.jpg")], tmp_path / "named", progress=False)
    assert named[0].output and not named[0].error


def test_a_broken_link_in_a_folder_is_named_by_restore_and_skipped_by_evaluate(tmp_path, restorer):
    """A link whose photo was moved away: restore's failure names it; evaluate skips it with the reason (its read
    raised FileNotFoundError through the whole command)."""
    from dist_dejpeg.evaluation.references import read_references

    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(_photo(40, 48)).save(src / "a.png")
    (src / "gone.png").symlink_to(tmp_path / "moved.png")
    results = restore_files(restorer, [str(src)], tmp_path / "out", progress=False)
    failed = [(Path(r.source).name, r.error) for r in results if r.error]
    assert failed == [("gone.png", f"{src / 'gone.png'}: no such file")]
    refs, skipped = read_references([str(src)], False, 0)
    assert [r.source for r in refs] == [str(src / "a.png")]
    assert skipped == [f"{src / 'gone.png'}: cannot be read (No such file or directory)"]


def test_a_photo_given_as_the_model_is_named_as_such_and_no_empty_folder_is_left(tmp_path, capsys):
    """`--model photo.jpg` said "not a safetensors file (... header too large)", a missing .onnx onnxruntime's
    NO_SUCHFILE text; both left the output folder they had made behind, empty."""
    photo = tmp_path / "photo.jpg"
    Image.fromarray(_photo()).save(photo, quality=20)
    out = tmp_path / "new" / "out"
    assert main(["restore", str(photo), "-o", str(out), "--model", str(photo), "--quiet"]) == 2
    assert f"{photo}: a JPEG image, not a model: give a generator file" in capsys.readouterr().err
    assert main(["restore", str(photo), "-o", str(out), "--model", str(tmp_path / "gone.onnx"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'gone.onnx'}: no such file"
    assert main(["restore", str(tmp_path / "none.jpg"), "-o", str(out), "--model", str(photo), "--quiet"]) == 2
    assert not (tmp_path / "new").exists()  # made for the outputs, none written: removed again
    (tmp_path / "kept").mkdir()  # a folder the user made is theirs, empty or not
    assert main(["restore", str(photo), "-o", str(tmp_path / "kept"), "--model", str(photo), "--quiet"]) == 2
    assert (tmp_path / "kept").is_dir()


def test_per_image_lines_only_without_quiet_or_with_verbose(tmp_path, model_file, capsys):
    src = tmp_path / "p.png"  # never a JPEG: quality unknown, a per-image line without --quiet
    Image.fromarray(_photo(40, 48)).save(src)
    base = ["restore", str(src), "--model", str(model_file)]
    assert main(base + ["-o", str(tmp_path / "a"), "--quiet"]) == 0
    assert f"{src}:" not in capsys.readouterr().out
    assert main(base + ["-o", str(tmp_path / "b")]) == 0
    assert f"{src}: " in capsys.readouterr().out


def test_quiet_wins_over_verbose_and_the_summary_is_the_last_line(tmp_path, model_file, capsys):
    """--quiet's help says "no per-image lines": --verbose beside it printed them anyway; and the summary came
    before the per-image lines, where a user reading the last line missed it."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        Image.fromarray(_photo(40, 48 + 8 * i)).save(src / f"p{i}.png")
    base = ["restore", str(src), "--model", str(model_file), "--verbose"]
    assert main(base + ["-o", str(tmp_path / "a"), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("restored ") and "2 through" in out[0], out
    assert main(base + ["-o", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and all(str(src) in line for line in out[:2]) and out[-1].startswith("restored "), out


# -- file modes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_are_as_readable_as_the_umask_allows(tmp_path, model_file, restorer, umask, mode):
    """Every file restore, evaluate, report and the trainer's generator export write: 0666 & ~umask."""
    from dist_dejpeg.evaluation.evaluate import write_tables
    from dist_dejpeg.evaluation.report import write_report
    from dist_dejpeg.models.generator_file import load_generator

    src = tmp_path / "p.jpg"
    Image.fromarray(_photo()).save(src, quality=20)
    img = _photo(32, 32)
    record = {"image": "p", "quality": 10, "clean": img, "jpeg": img, "restored": img,
              "metrics": {"jpeg": {"psnr": 30.0}, "restored": {"psnr": 31.0}}}
    saved = os.umask(umask)
    try:
        save_generator(load_generator(model_file), ModelConfig(**TINY), tmp_path / "generator.safetensors")
        (result,) = restore_files(restorer, [str(src)], tmp_path / "out", progress=False)
        write_report([record], tmp_path / "report.html", title="t", meta={}, crop=16)
        write_tables({"meta": {"model": {}, "unavailable": {}, "undefined": {}, "channel": "RGB", "images": 1,
                               "skipped": [], "compression": "", "crop_border": 0, "device": "cpu", "tile": 0,
                               "overlap": 0, "restore_ms_per_megapixel": None, "backbones": ""},
                      "per_quality": {}, "per_image": []}, tmp_path / "tables")
    finally:
        os.umask(saved)
    written = [tmp_path / "generator.safetensors", Path(result.output), tmp_path / "report.html",
               tmp_path / "tables" / "metrics.json", tmp_path / "tables" / "metrics.md"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(mode) for p in written}


# -- the run folder's lock ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EBADF, errno.EOPNOTSUPP])
def test_lock_error_that_is_not_busy_names_the_filesystem(tmp_path, monkeypatch, code):
    import fcntl

    def refuse(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(RunDirLockFailed) as caught:
        RunLock(tmp_path).acquire()
    text = str(caught.value)
    assert isinstance(caught.value, RunDirBusy)  # stops every rank with exit 2 where a busy folder does
    assert errno.errorcode[code] in text and "train.run_dir" in text and "in use by another" not in text
    assert filesystem(tmp_path) in text and filesystem(tmp_path) != "unknown"


def test_lock_held_by_another_is_busy(tmp_path, monkeypatch):
    import fcntl

    def busy(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, os.strerror(errno.EWOULDBLOCK))

    monkeypatch.setattr(fcntl, "flock", busy)
    with pytest.raises(RunDirBusy, match="in use by another training run") as caught:
        RunLock(tmp_path).acquire()
    assert not isinstance(caught.value, RunDirLockFailed)


def test_lock_filesystem_is_read_from_the_mount_table(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\nserver:/export /mnt/my\\040share nfs4 rw 0 0\n")
    assert filesystem("/mnt/my share/runs/a", str(mounts)) == "nfs4 at /mnt/my share"
    assert filesystem("/home/x", str(mounts)) == "ext4 at /"
    assert filesystem("/x", str(tmp_path / "none")) == "unknown"


def test_files_of_one_name_from_two_folders_go_below_their_folders_names(tmp_path, restorer):
    """restore x y -o o (or x/a.jpg y/a.jpg): both a.jpg were to be o/a.jpg.png, the second failing as the first's
    output; now o/x/a.png and o/y/a.png, each folder's other files beside them (y/b.png)."""
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        Image.fromarray(_photo()).save(tmp_path / folder / "a.jpg", quality=30)
    Image.fromarray(_photo()).save(tmp_path / "y" / "b.jpg", quality=30)
    for inputs in ([tmp_path / "x", tmp_path / "y"], [tmp_path / "x" / "a.jpg", tmp_path / "y" / "a.jpg"]):
        out = tmp_path / f"o{len(inputs[0].parts)}"
        results = restore_files(restorer, [str(p) for p in inputs], out, progress=False)
        assert all(r.error is None for r in results), [r.error for r in results]
        assert sorted(Path(r.output).relative_to(out).as_posix() for r in results) == (
            ["x/a.png", "y/a.png", "y/b.png"] if inputs[0].is_dir() else ["x/a.png", "y/a.png"])  # (a folder's together)
    for year in ("2023", "2024"):  # folders of one name: as many of their last names as tell them apart
        (tmp_path / year / "photos").mkdir(parents=True)
        Image.fromarray(_photo()).save(tmp_path / year / "photos" / "a.jpg", quality=30)
    results = restore_files(restorer, [str(tmp_path / y / "photos") for y in ("2023", "2024")], tmp_path / "o",
                            progress=False)
    assert sorted(Path(r.output).relative_to(tmp_path / "o").as_posix() for r in results) == [
        "2023/photos/a.png", "2024/photos/a.png"], [r.error for r in results]


def test_a_search_reads_no_pngs_pixels_to_find_restores_mark(tmp_path, monkeypatch, restorer):
    """Pillow's getexif decodes a whole PNG without an eXIf chunk (looking for one after the pixels): a folder search
    decoded every PNG before restoring any (0.77 s for eight 12 MP ones). Restore writes its eXIf before the pixels,
    so its outputs are still told apart without a decode."""
    from PIL import PngImagePlugin

    from dist_dejpeg.jpeg.formats import written_by_restore

    Image.fromarray(_photo()).save(tmp_path / "photo.png")
    (out,) = restore_files(restorer, [str(tmp_path / "photo.png")], tmp_path / "out", progress=False)

    loads, real_load = [], PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loads.append(self) or real_load(self))
    assert not written_by_restore(tmp_path / "photo.png") and written_by_restore(out.output)
    assert not loads, "a PNG's pixels were decoded"
