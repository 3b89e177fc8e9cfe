"""A JPEG whose entropy-coded data is not whole (what libjpeg only warns of, filling the rest with zero
coefficients: flat grey) is refused by load_image with a reason, before any model runs (jpeg/integrity.py); valid
JPEGs of every kind restore takes are not."""

import io
import struct

import jpeglib
import numpy as np
import pytest
from PIL import Image
from skimage import data

from dist_dejpeg.jpeg.integrity import coding_problem, parse, structure_problem
from dist_dejpeg.restore.images import InputImageError, load_image


def _jpeg(rgb, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, "JPEG", **options)
    return buf.getvalue()


def _cut_with_eoi(d: bytes, fraction: float) -> bytes:
    """A download cut short and an EOI marker appended (libjpeg: "premature end of data segment", then zeros)."""
    s = d.find(b"\xff\xda")
    return d[:s + int((len(d) - s) * fraction)] + b"\xff\xd9"


@pytest.mark.parametrize("source", ["path", "bytes"])
def test_a_download_cut_short_with_an_eoi_is_refused(tmp_path, source):
    d = _cut_with_eoi(_jpeg(data.astronaut(), quality=30), 0.4)
    path = tmp_path / "cut_eoi.jpg"
    path.write_bytes(d)
    with pytest.raises(InputImageError, match=r"corrupt or incomplete JPEG data: scan 1's data ends early"):
        load_image(path if source == "path" else d)
    with pytest.raises(InputImageError, match="corrupt or incomplete JPEG data"):  # no coefficients kept: the same
        load_image(path if source == "path" else d, cells=False)


def test_a_cut_near_the_end_is_refused_too():
    """Also in an extended-sequential file (SOF1, Huffman-coded as a baseline one is), checked as a baseline (SOF0)
    one: left unchecked, a cut-short SOF1 download would be restored with its lost part grey, and no word said."""
    d = _cut_with_eoi(_jpeg(data.coffee(), quality=80), 0.97)
    assert "ends early" in coding_problem(d, _coefficients(d))
    sof1 = _jpeg(data.coffee(), quality=80).replace(b"\xff\xc0", b"\xff\xc1", 1)
    cut = _cut_with_eoi(sof1, 0.97)
    assert parse(cut)[0].marker == 0xC1 and "ends early" in coding_problem(cut, _coefficients(cut))
    with pytest.raises(InputImageError, match="corrupt or incomplete JPEG data: scan 1's data ends early"):
        load_image(_cut_with_eoi(sof1, 0.5))


def test_bit_rot_inside_a_restart_interval_and_restart_markers_out_of_sequence():
    d = _jpeg(data.astronaut(), quality=30, restart_marker_rows=8)
    s = d.find(b"\xff\xda")
    at = s + (len(d) - s) // 2
    rot = d[:at] + bytes(300) + d[at + 300:]  # (no marker in those 300 bytes: checked)
    assert not any(0xD0 <= d[k + 1] <= 0xD7 for k in range(at - 1, at + 300) if d[k] == 0xFF)  # (no RST hit)
    with pytest.raises(InputImageError, match="corrupt or incomplete JPEG data: scan 1's data ends early"):
        load_image(rot)
    d = _jpeg(data.astronaut(), quality=30, restart_marker_rows=2)
    r2, r3 = d.find(b"\xff\xd2", s), d.find(b"\xff\xd3", s)
    swapped = d[:r2] + b"\xff\xd3" + d[r2 + 2:r3] + b"\xff\xd2" + d[r3 + 2:]
    assert "out of sequence (RST3 where RST2 belongs" in structure_problem(swapped)
    one_lost = d[:r2] + d[r3:]  # an interval gone with its marker: RST1 then RST3
    assert "out of sequence" in structure_problem(one_lost)


def test_a_tiny_file_whose_header_says_81_megapixels_is_refused_before_decoding():
    d = bytearray(_jpeg(data.astronaut()[:240, :320], quality=25))
    i = d.find(b"\xff\xc0")
    d[i + 5:i + 9] = struct.pack(">HH", 9000, 9000)
    assert "needs at least 237445 bytes of coded data" in structure_problem(bytes(d))
    with pytest.raises(InputImageError, match=r"header's 9000 x 9000 needs at least"):
        load_image(bytes(d))  # (decoded, 81 MP of grey; restored, over 13 minutes)


def _coefficients(d: bytes) -> list[np.ndarray]:
    from dist_dejpeg.jpeg.consistency import read_cells
    return [p.coefficients for p in read_cells(d).planes]


def _valid_files(tmp):
    photo = data.astronaut()[::3, ::3]  # 171 x 171: MCUs cut by the edges
    black, grey = data.astronaut().copy(), data.astronaut().copy()
    black[300:], grey[300:] = 0, 128  # a mid-grey region is all-zero coefficients, as libjpeg's fill is
    yield "black bottom", _jpeg(black, quality=50)
    yield "grey bottom", _jpeg(grey, quality=50, subsampling=0)
    yield "camera gray", _jpeg(data.camera()[::2, ::2], quality=90)
    for ss in (0, 1, 2):
        for q in (5, 75, 100):
            for options in ({}, {"optimize": True}, {"progressive": True}, {"restart_marker_blocks": 3},
                            {"restart_marker_rows": 1}):
                yield f"q{q} ss{ss} {options}", _jpeg(photo, quality=q, subsampling=ss, **options)
    jpeglib.version.set("9e")
    for k, flags in enumerate((["+ARITH_CODE"], ["+PROGRESSIVE_MODE"])):
        jpeglib.from_spatial(np.ascontiguousarray(photo)).write_spatial(str(tmp / f"{k}.jpg"), qt=40, flags=flags)
        yield f"jpeglib {flags}", (tmp / f"{k}.jpg").read_bytes()


def test_valid_jpegs_of_every_kind_are_not_refused(tmp_path):
    for name, d in _valid_files(tmp_path):
        assert parse(d)[0].ended, name
        assert structure_problem(d) == "", name
        assert coding_problem(d, _coefficients(d)) == "", name
    loaded = load_image(_jpeg(data.chelsea(), quality=40, restart_marker_blocks=2))
    assert loaded.cells is not None


@pytest.mark.parametrize("size", [9000, 12000, 60000])
def test_a_giant_header_gets_the_limit_and_the_hint_not_pils_error(size):
    """(Over twice PIL's limit, PIL raised its own DecompressionBombError while opening: "not an image PIL can
    read", its limit, no --max-pixels.)"""
    d = bytearray(_jpeg(data.astronaut()[:240, :320], quality=25))
    i = d.find(b"\xff\xc0")
    d[i + 5:i + 9] = struct.pack(">HH", size, size)
    with pytest.raises(InputImageError, match=r"megapixels is over the limit of 50 megapixels \(50000000 pixels: "
                                              r"a decompression bomb\?\); raise it with --max-pixels") as err:
        load_image(bytes(d), max_pixels=50_000_000)
    assert f"{size} x {size} = " * (size < 60000) + f"{size * size // 10**6} megapixels" in str(err.value)


def test_an_empty_file_is_said_to_be_empty(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    for source in (tmp_path / "zero.jpg", b""):
        with pytest.raises(InputImageError, match=r": empty file \(0 bytes\)$"):
            load_image(source)


def test_evaluate_skips_a_corrupt_jpeg_reference_with_the_reason(tmp_path):
    from dist_dejpeg.evaluation.references import read_references

    (tmp_path / "cut_eoi.jpg").write_bytes(_cut_with_eoi(_jpeg(data.astronaut(), quality=90), 0.5))
    (tmp_path / "whole.jpg").write_bytes(_jpeg(data.astronaut(), quality=90))
    refs, skipped = read_references([str(tmp_path)], allow_lossy=True)
    assert [ref.name for ref in refs] == ["whole"]
    assert len(skipped) == 1 and "cut_eoi.jpg: corrupt or incomplete JPEG data: scan 1's data ends early" in skipped[0]


def test_padding_after_the_last_block_is_not_refused_but_skipped_bytes_within_an_interval_are():
    d = _jpeg(data.coffee()[:192, :320], quality=60, restart_marker_rows=2)  # (whole MCUs: no dummy blocks)
    end = d.rindex(b"\xff\xd9")
    padded = d[:end] + bytes(40) + d[end:]  # (libjpeg: "40 extraneous bytes before marker 0xd9", the photo whole)
    assert structure_problem(padded) == "" and coding_problem(padded, _coefficients(d)) == ""
    r1 = d.find(b"\xff\xd1", d.find(b"\xff\xda"))
    skipped = d[:r1] + bytes(40) + d[r1:]  # (the second interval's coefficients as they were: its bytes grew)
    assert "restart interval 2 of" in coding_problem(skipped, _coefficients(d))


@pytest.mark.parametrize("quality,subsampling", [(10, 2), (60, 0), (95, 1)])
def test_the_bits_counted_from_the_coefficients_are_the_bits_the_file_holds(quality, subsampling):
    """The count is exact, not a bound: per restart interval the blocks' codes (from the decoded coefficients and the
    file's Huffman tables) fill the interval's bytes but for the byte padding (< 8 bits); under- or over-counting
    (a run, a ZRL, an EOB, a DC prediction miscounted) would refuse whole photos or pass cut ones."""
    from dist_dejpeg.jpeg.consistency import read_cells
    from dist_dejpeg.jpeg.integrity import _scan_bits, parse

    buf = io.BytesIO()  # (4:2:0 edges cut through MCUs: dummy blocks, counted apart; 4:4:4 and 4:2:2 have none here)
    Image.fromarray(data.astronaut()[:136, :200]).save(buf, "JPEG", quality=quality, subsampling=subsampling,
                                                       restart_marker_rows=2)
    raw = buf.getvalue()
    frame, _ = parse(raw)
    scan, tables = frame.scans[0], frame.scan_tables[0]
    need, dummies = _scan_bits(frame, scan, tables, [p.coefficients for p in read_cells(raw).planes])
    held = np.array([bits for bits, _ in scan.segments])
    assert len(held) > 2 and (need <= held).all()
    assert (held - need < 8 + 32 * dummies).all(), (held - need, dummies)


def _decodes_as(d: bytes, original: bytes) -> bool:
    return np.array_equal(np.asarray(Image.open(io.BytesIO(d))), np.asarray(Image.open(io.BytesIO(original))))


def test_fill_bytes_before_markers_and_an_rst_after_the_last_interval_are_not_refused():
    """T.81 B.1.1.2: any number of 0xFF may precede a marker; some encoders write an RST after the scan's last
    MCU, which libjpeg ignores. Both decode pixel-identical; they were refused as skipped data, too many markers."""
    photo = data.astronaut()[::8, ::8]  # 64 x 64
    d = _jpeg(photo, quality=90, subsampling=0, restart_marker_blocks=4)  # (64 MCUs: 16 intervals)
    s = d.find(b"\xff\xda")
    filled = d[:s] + b"".join(
        d[s:][k:k + 1] if d[s + k] != 0xFF or not 0xD0 <= d[s + k + 1] <= 0xD7 else b"\xff\xff\xff"
        for k in range(len(d) - s))
    assert len(filled) == len(d) + 2 * 15 and _decodes_as(filled, d)
    assert structure_problem(filled) == "" and coding_problem(filled, _coefficients(d)) == ""
    assert [rst for _, rst in parse(filled)[0].scans[0].segments] == [-1] + [k % 8 for k in range(15)]
    load_image(filled)
    d = _jpeg(photo, quality=90, subsampling=2, restart_marker_blocks=4)
    extra = d[:-2] + b"\xff\xd3" + d[-2:]
    assert _decodes_as(extra, d)
    assert structure_problem(extra) == "" and coding_problem(extra, _coefficients(d)) == ""
    load_image(extra)
    big = d[:-2] + b"\xff" * 2_000_000 + d[-2:]  # (fill bytes before EOI, skipped as a run, not byte by byte)
    assert structure_problem(big) == "" and parse(big)[0].ended


def _lossless_jpeg(gray: np.ndarray, rows_per_interval: int) -> bytes:
    """A lossless (SOF3) grayscale JPEG, predictor 1 (left), a restart every ``rows_per_interval`` rows (its
    interval counts samples: width x rows); every difference category coded in 5 bits."""
    h, w = gray.shape
    bits = []
    for y in range(h):
        for x in range(w):
            first_row = y % rows_per_interval == 0
            pred = (128 if x == 0 and first_row else int(gray[y - 1, 0]) if x == 0 else int(gray[y, x - 1]))
            diff = int(gray[y, x]) - pred
            size = abs(diff).bit_length()
            bits.append(format(size, "05b") + (format(diff if diff >= 0 else diff + (1 << size) - 1, f"0{size}b")
                                               if size else ""))
    out, interval = [], w * rows_per_interval
    for k in range(0, len(bits), interval):
        chunk = "".join(bits[k:k + interval])
        chunk += "1" * (-len(chunk) % 8)
        body = bytes(int(chunk[i:i + 8], 2) for i in range(0, len(chunk), 8)).replace(b"\xff", b"\xff\x00")
        out.append(body + (bytes([0xFF, 0xD0 + (k // interval) % 8]) if k + interval < len(bits) else b""))
    seg = lambda m, body: bytes([0xFF, m]) + struct.pack(">H", len(body) + 2) + body  # noqa: E731
    return (b"\xff\xd8" + seg(0xC3, struct.pack(">BHHB", 8, h, w, 1) + b"\x01\x11\x00")
            + seg(0xC4, b"\x00" + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17)))
            + seg(0xDD, struct.pack(">H", interval)) + seg(0xDA, b"\x01\x01\x00\x01\x00\x00") + b"".join(out)
            + b"\xff\xd9")


def test_a_lossless_jpeg_with_restart_intervals_is_not_refused():
    """A lossless restart interval counts samples, not 8x8 blocks' MCUs: 64 x 64, a restart every 4 rows, 15
    markers, where 64 blocks in intervals of 256 'need 0'."""
    gray = data.camera()[::8, ::8]
    d = _lossless_jpeg(gray, 4)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(d))), gray)  # (libjpeg-turbo 3 decodes SOF3)
    assert parse(d)[0].marker == 0xC3 and len(parse(d)[0].scans[0].segments) == 16
    assert structure_problem(d) == ""
    assert "out of sequence" in structure_problem(d.replace(b"\xff\xd2", b"\xff\xd5", 1))


def test_load_image_parses_once_and_reads_the_coefficients_at_most_once(tmp_path, monkeypatch):
    """(Each check parsed the file; the coefficients were read again wherever cells were None: a second read of a
    CMYK JPEG's that fails again, a progressive JPEG's that no check uses, a path's bytes through a temp file.)"""
    import dist_dejpeg.jpeg.consistency as consistency
    import dist_dejpeg.jpeg.integrity as integrity
    import dist_dejpeg.restore.images as images

    reads, parses = [], []
    read, parsing = consistency.read_cells, integrity.parse
    monkeypatch.setattr(consistency, "read_cells", lambda source: reads.append(source) or read(source))
    for module in (integrity, images):
        monkeypatch.setattr(module, "parse", lambda d: parses.append(1) or parsing(d), raising=False)
    photo = data.astronaut()[::4, ::4]
    cmyk, progressive, plain = tmp_path / "cmyk.jpg", tmp_path / "progressive.jpg", tmp_path / "plain.jpg"
    Image.fromarray(photo).convert("CMYK").save(cmyk, quality=80)
    progressive.write_bytes(_jpeg(photo, quality=80, progressive=True))
    plain.write_bytes(_jpeg(photo, quality=80))
    for path, cells, want in ((cmyk, True, [cmyk]), (progressive, False, []), (plain, False, [plain]),
                              (plain, True, [plain])):
        reads.clear(), parses.clear()
        loaded = load_image(path, cells=cells)
        assert [str(r) for r in reads] == [str(w) for w in want] and len(parses) == 1, (path.name, cells, reads)
        assert (loaded.cells is not None) == (cells and path == plain)


def test_fill_bytes_before_a_stuffed_byte_count_as_one_data_byte():
    """libjpeg reads 0xFF 0xFF 0x00 in scan data as one data byte 0xFF (fill bytes skipped): counted as two, an
    interval with a few of them held "bytes its blocks do not use" and a file that decodes pixel-identical was
    refused as damaged."""
    photo = data.astronaut()[::4, ::4]  # 128 x 128
    d = _jpeg(photo, quality=95, subsampling=0, restart_marker_blocks=8)
    s = d.find(b"\xff\xda")
    last_rst = max(d.rfind(bytes([0xFF, 0xD0 + k])) for k in range(8))
    stuffed = [k for k in range(s, last_rst) if d[k:k + 2] == b"\xff\x00"]  # (in intervals a marker ends)
    assert len(stuffed) >= 2
    filled = bytearray(d)
    for k in reversed(stuffed):  # fill bytes before each stuffed byte
        filled[k:k + 1] = b"\xff\xff\xff"
    filled = bytes(filled)
    assert _decodes_as(filled, d)
    assert structure_problem(filled) == "" and coding_problem(filled, _coefficients(d)) == ""
    load_image(filled)


def _scans_kept(d: bytes, count: int) -> bytes:
    """A progressive JPEG's first ``count`` scans and an EOI (a download cut between scans, the EOI appended)."""
    at = -1
    for _ in range(count + 1):
        at = d.find(b"\xff\xda", at + 1)
    return d[:at] + b"\xff\xd9"


@pytest.mark.parametrize("subsampling", [0, 2])
def test_a_progressive_jpeg_cut_between_scans_or_within_one_is_refused(subsampling):
    """libjpeg decodes a progressive JPEG whose later scans are missing without a word: the coefficients never
    sent are zero, the bits never refined coarse (blurred, blocky). It was restored as if whole."""
    photo = data.astronaut()[::4, ::4]
    d = _jpeg(photo, quality=90, subsampling=subsampling, progressive=True)
    scans = len(parse(d)[0].scans)
    assert scans >= 6 and structure_problem(d) == ""
    for kept in (1, scans // 2, scans - 1):
        cut = _scans_kept(d, kept)
        assert not _decodes_as(cut, d)  # (it decodes, to something else)
        assert "progressive JPEG whose scans end early" in structure_problem(cut), kept
        with pytest.raises(InputImageError, match="scans end early"):
            load_image(cut)
    mid_scan = _cut_with_eoi(_scans_kept(d, scans // 2 + 1), 0.9)  # (cut inside a scan: the ones after missing)
    assert "scans end early" in structure_problem(mid_scan)
