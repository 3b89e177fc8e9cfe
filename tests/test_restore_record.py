"""restore's per-file record (restore-record.jsonl beside the outputs), what Ctrl-C prints, the XMP's pixel sizes after
a quarter turn, and --strip-gps."""

from __future__ import annotations

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


def _lines(path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_folder_restore_records_each_file_as_it_finishes_and_a_rerun_appends(tmp_path, restorer):
    """An archivist restoring a folder overnight gets one JSON line per file: what was done, into which output (a
    renamed one too: a.jpg -> a.jpg.png), at what quality and why; a rerun appends to the same file."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(_photo(40, 48)).save(src / "a.jpg", quality=20)
    Image.fromarray(_photo(40, 48)).save(src / "a.png")
    (src / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    record = out / "restore-record.jsonl"
    results = restore_files(restorer, [str(src)], out, progress=False, record=record)
    lines = _lines(record)
    assert [(line["source"], line["status"]) for line in lines] == [
        (str(src / "a.jpg"), "restored"), (str(src / "a.png"), "restored"), (str(src / "bad.jpg"), "failed")]
    assert lines[0]["output"] == str(out / "a.jpg.png") and lines[0]["quality"] == 20
    assert lines[0]["quality_from"] == "file tables" and lines[0]["reason"] == "identity"
    assert lines[0]["source_bytes"] == (src / "a.jpg").stat().st_size and lines[0]["time"][:2] == "20"
    assert lines[2]["error"] == results[2].error and lines[2]["output"] is None
    restorer.passthrough = True
    (out / "a.png.png").unlink()
    restore_files(restorer, [str(src)], out, progress=False, record=record, skip_existing=True)
    assert [line["status"] for line in _lines(record)[3:]] == ["skipped", "passed through", "failed"]
    assert not any(r.source.endswith(".jsonl") for r in restore_files(restorer, [str(out)], tmp_path / "again",
                                                                         progress=False))  # never an input


def test_each_record_line_says_the_tiling_device_and_precision_the_pixels_depend_on(tmp_path, restorer):
    """Another tile or overlap gives other pixels (group norm and keep_mean act per tile): a line that did not say
    which could not be reproduced. A real Restorer's settings, as the command and restore_files record them."""
    from test_infer import _model

    from dist_dejpeg.restore import Restorer
    from dist_dejpeg.restore.record import restorer_settings

    real = Restorer(_model(), device="cpu", tile=128, overlap=32, guard=False)
    import torch

    assert restorer_settings(real) == {"tile": 128, "overlap": 32, "batch_size": 1, "threads": torch.get_num_threads(),
                                       "device": "cpu", "precision": "fp32"}
    restorer.tile, restorer.overlap, restorer.bf16 = 256, 48, True
    Image.fromarray(_photo(40, 48)).save(tmp_path / "a.jpg", quality=20)
    restore_files(restorer, [str(tmp_path / "a.jpg")], tmp_path / "out", progress=False, record=tmp_path / "r.jsonl")
    (line,) = _lines(tmp_path / "r.jsonl")
    assert {k: line[k] for k in ("tile", "overlap", "device", "precision")} == {
        "tile": 256, "overlap": 48, "device": "cpu", "precision": "bf16"}


@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_hands_back_the_results_so_far_and_records_the_rest_as_not_begun(tmp_path, restorer, monkeypatch,
                                                                                workers):
    """Ctrl-C in restore_files raised a bare KeyboardInterrupt: what was done was lost. It raises
    RestoreInterrupted (still a KeyboardInterrupt) with every result: those written (threads finish theirs) as
    restored, the rest not begun; the record says the same."""
    from dist_dejpeg.restore.record import RestoreInterrupted

    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        Image.fromarray(_photo(40, 48)).save(src / f"p{i}.jpg", quality=20)
    real, calls = restorer.restore_array, []

    def ctrl_c_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(restorer, "restore_array", ctrl_c_at_the_third)
    record = tmp_path / "record.jsonl"
    with pytest.raises(KeyboardInterrupt) as caught:
        restore_files(restorer, [str(src)], tmp_path / "out", progress=False, record=record, workers=workers)
    assert isinstance(caught.value, RestoreInterrupted)
    results = caught.value.results
    assert [r.output is not None for r in results] == [True, True, False, False, False]
    assert all(r.stopped and r.error == "not restored: interrupted" for r in results[2:])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0.png", "p1.png"]
    assert [line["status"] for line in _lines(record)] == ["restored"] * 2 + ["not begun"] * 3


def test_a_record_that_cannot_be_written_is_counted_and_the_restore_goes_on(tmp_path, restorer, monkeypatch,
                                                                           caplog):
    """A full disk under the record: each line lost is counted, the warning said once (not once per file of a
    folder of thousands), the restore goes on; a Record given no settings still writes their keys (null), so
    every line of a record has the same keys."""
    import errno

    import dist_dejpeg.restore.record as record_module
    from dist_dejpeg.restore.record import SETTINGS, Record

    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.fromarray(_photo(40, 48)).save(src / f"p{i}.jpg", quality=20)
    real_write, writes = record_module.os.write, []

    def full_twice(fd, data):
        writes.append(data)
        if len(writes) in (2, 3):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(record_module.os, "write", full_twice)
    record = Record(tmp_path / "record.jsonl", "model.safetensors")
    with caplog.at_level("WARNING"):
        results = restore_files(restorer, [str(src)], tmp_path / "out", progress=False, record=record)
    assert all(r.output for r in results) and record.failed == 2
    assert caplog.text.count("could not write the restore record") == 1, caplog.text
    lines = _lines(tmp_path / "record.jsonl")  # the line after the failed one starts on a fresh line
    assert [line["source"] for line in lines] == [str(src / "p0.jpg"), str(src / "p3.jpg")]
    assert lines[0]["model"] == "model.safetensors" and {key: lines[0][key] for key in SETTINGS} == dict.fromkeys(
        SETTINGS)


def test_a_file_left_alone_is_recorded_so_and_ctrl_c_does_not_call_it_interrupted():
    """A file whose output a run before this one wrote (restore's ``earlier``) is "left alone", whatever else its
    result says, and Ctrl-C does not mark it stopped: the record would say "not begun" of a file already done.
    A result with neither an output nor an error is "not begun" too."""
    from types import SimpleNamespace

    from dist_dejpeg.restore.record import Record, RestoreInterrupted, status

    def result(**kw):
        return SimpleNamespace(**{**dict(earlier=False, skipped=False, stopped=False, error=None, output="o.png",
                                         passthrough=False), **kw})

    assert status(result(earlier=True)) == "left alone" and status(result(output=None)) == "not begun"
    earlier = result(earlier=True, output=None)
    RestoreInterrupted([earlier], Record(None))
    assert earlier.error is None and not earlier.stopped and status(earlier) == "left alone"


GPS_XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
           b'exif:GPSLatitude="52,22.5N" xmp:Rating="5"><exif:GPSLongitude>4,53.0E</exif:GPSLongitude>'
           b'<exif:GPSVersionID>2.3.0.0</exif:GPSVersionID></rdf:Description></rdf:RDF></x:xmpmeta>')


def _located(path) -> None:
    exif = Image.Exif()
    exif[0x010F], exif[GPS_IFD] = "Canon", GPS
    Image.fromarray(_photo(40, 48)).save(path, quality=30, exif=exif, xmp=GPS_XMP)


@pytest.mark.parametrize("fmt", ["png", "tiff", "webp", "jpg"])
def test_strip_gps_leaves_the_location_out_of_every_format(tmp_path, restorer, fmt):
    """A museum publishing restored photos must not give the place they were taken: --strip-gps writes no EXIF
    GPS and no XMP exif:GPS*, the rest of the metadata kept; without it the location is kept."""
    _located(tmp_path / "a.jpg")
    (result,) = restore_files(restorer, [str(tmp_path / "a.jpg")], tmp_path / "out", fmt=fmt, progress=False,
                              strip_gps=True)
    out = Image.open(result.output)
    assert result.error is None and out.getexif()[0x010F] == "Canon" and not out.getexif().get_ifd(GPS_IFD)
    assert b"GPS" not in _xmp_of(result.output) and b'xmp:Rating="5"' in _xmp_of(result.output)
    (kept,) = restore_files(restorer, [str(tmp_path / "a.jpg")], tmp_path / "kept", fmt=fmt, progress=False)
    assert Image.open(kept.output).getexif().get_ifd(GPS_IFD) == GPS and b"GPSLongitude" in _xmp_of(kept.output)


def test_strip_gps_keeps_a_passed_through_jpeg_its_inputs_data(tmp_path, restorer):
    """A JPEG passed through as a JPEG is the input file; with --strip-gps it is the input's data (every byte from
    its first scan on) without the GPS, marked as restore's, so a rerun replaces it; the API's writer strips too."""
    from dist_dejpeg.jpeg.formats import written_by_restore
    from dist_dejpeg.restore import save_restored

    src = tmp_path / "a.jpg"
    _located(src)
    restorer.passthrough = True
    for _ in range(2):  # (the second: the first's output replaced, not refused as a photo of the user's)
        (result,) = restore_files(restorer, [str(src)], tmp_path / "out", fmt="same", progress=False, strip_gps=True)
        assert result.error is None and result.passthrough, result.error
    data, given = (tmp_path / "out" / "a.jpg").read_bytes(), src.read_bytes()
    assert data[data.index(b"\xff\xda"):] == given[given.index(b"\xff\xda"):] and data != given
    out = Image.open(tmp_path / "out" / "a.jpg")
    assert not out.getexif().get_ifd(GPS_IFD) and out.getexif()[0x010F] == "Canon" and written_by_restore(out.filename)
    assert b"GPS" not in _xmp_of(out.filename) and b'xmp:Rating="5"' in _xmp_of(out.filename)
    # its mark names its photo: another photo of the name is refused it, not given it as its own (was "older")
    from dist_dejpeg.restore.inputs import ownership

    other = tmp_path / "b" / "a.jpg"
    other.parent.mkdir()
    Image.new("RGB", (16, 16), "red").save(other)
    assert ownership(tmp_path / "out" / "a.jpg", src)[0] == "same"
    assert ownership(tmp_path / "out" / "a.jpg", other) == ("other", "a.jpg")
    image = Image.open(src)
    image.load()
    save_restored(image, tmp_path / "api.png", strip_gps=True)
    assert not Image.open(tmp_path / "api.png").getexif().get_ifd(GPS_IFD) and b"GPS" not in _xmp_of(
        tmp_path / "api.png")


def test_the_command_says_a_stripped_pass_through_is_passed_through_not_re_encoded(tmp_path, monkeypatch, capsys):
    import dist_dejpeg.restore.restorer as restorer_module
    from dist_dejpeg.cli import main

    class Fake(Identity):
        passthrough = True

        def __init__(self, model, **kwargs):
            pass

    monkeypatch.setattr(restorer_module, "Restorer", Fake)
    _located(tmp_path / "a.jpg")
    assert main(["restore", str(tmp_path / "a.jpg"), "-o", str(tmp_path / "out"), "--format", "same", "--strip-gps",
                 "--model", "m", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "passed 1 through unchanged" in out and "re-encoded" not in out, out
    assert not Image.open(tmp_path / "out" / "a.jpg").getexif().get_ifd(GPS_IFD)
    assert [line["status"] for line in _lines(tmp_path / "out" / "restore-record.jsonl")] == ["passed through"]


def test_a_new_output_folder_holding_only_the_record_is_removed(tmp_path, monkeypatch, capsys):
    """A folder the command made for the outputs and left without one (every image failed) is removed again, as
    before the record: its record of the failures went with it (they are printed), not a folder of one .jsonl."""
    import dist_dejpeg.restore.restorer as restorer_module
    from dist_dejpeg.cli import main

    class Fake(Identity):
        def __init__(self, model, **kwargs):
            pass

    monkeypatch.setattr(restorer_module, "Restorer", Fake)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    assert main(["restore", str(tmp_path / "broken.jpg"), "-o", str(tmp_path / "new"), "--model", "m", "--quiet"]) == 1
    assert "failed: " in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_file_name_that_is_no_utf8_is_recorded(tmp_path):
    """A name that is no UTF-8 (an old camera's Latin-1 café.jpg), which Python holds as surrogates: the record's
    write raised UnicodeEncodeError, which no side-write handler caught, and stopped the restore."""
    import os

    from dist_dejpeg.restore.inputs import RestoreResult
    from dist_dejpeg.restore.record import Record

    source = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.jpg")
    record = Record(tmp_path / "record.jsonl", "m")
    record.add(RestoreResult(source=source, error="not an image"))
    assert record.failed == 0 and _lines(tmp_path / "record.jsonl")[0]["source"] == source


def test_format_same_passes_a_png_named_jpg_through_as_its_file_and_the_record_tells_a_reencode(tmp_path):
    """A lossless PNG named .jpg, passed through: under --format same it was encoded as a q95 JPEG (up to 20 levels
    off) and recorded "passed through"; now its file is written as it is. Under --format jpg it is re-encoded with
    loss, as asked, and the record says "re-encoded"; a restored one under same says it was written as its name says."""
    from dist_dejpeg.restore.record import status

    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "png_named.jpg"
    Image.fromarray(_photo()).save(source, format="PNG")
    passing = Identity()
    passing.passthrough = True
    [same] = restore_files(passing, [str(source)], tmp_path / "same", fmt="same", progress=False)
    assert same.error is None and same.passthrough
    assert (tmp_path / "same" / "png_named.jpg").read_bytes() == source.read_bytes()
    assert status(same) == "passed through"
    [jpg] = restore_files(passing, [str(source)], tmp_path / "jpg", fmt="jpg", progress=False)
    assert jpg.passthrough and jpg.reencoded and Image.open(jpg.output).format == "JPEG"
    assert status(jpg) == "re-encoded"
    [restored] = restore_files(Identity(), [str(source)], tmp_path / "r", fmt="same", progress=False)
    assert not restored.passthrough and "written as JPEG, as its name says: the file is a PNG" in restored.note
