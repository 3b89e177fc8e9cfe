"""Whether a JPEG file's entropy-coded data is whole: what libjpeg only warns of ("Corrupt JPEG data: premature end
of data segment", "N extraneous bytes before marker"), filling what is missing with zero coefficients (flat grey
128), and Pillow and jpeglib keep to themselves (Pillow silences libjpeg's messages; jpeglib lets them go to
stderr, with no file name). Torch-free; from the file's bytes (and, for a sequential Huffman JPEG, the coefficients
libjpeg decoded from them).

``structure_problem`` (before decoding, from the markers alone): a Huffman JPEG's scans hold at least one bit per
8x8 block of every plane (each block's DC code), so a 7.8 KB file whose header says 9000 x 9000 is refused before
81 megapixels are decoded to grey; restart markers must run RST0..RST7 in turn, as many as the scan's MCUs and the
restart interval imply.

``coding_problem`` (after jpeglib read the coefficients): in a sequential Huffman scan the bits each block takes
follow from its coefficients and the file's own Huffman tables, so the data the decoded coefficients need is
counted, per restart interval, and set against the bits the file holds for it. More than the file holds: the
decoder ran out (a download cut short with an EOI appended, a lost interval), and filled the rest with zeros. A
genuinely flat grey region is not refused: its blocks' codes are there. Many more bits than needed in an interval
a restart marker ends: data the decoder skipped (bit rot within it); padding after a scan's last block is harmless.
Progressive and arithmetic-coded scans are checked by their structure only: a progressive JPEG's scans must
bring every coefficient to full precision (a cut between scans with an EOI appended decodes blurred, silently). A file with no EOI after its last scan
is left to the decoder (Pillow's "image file is truncated").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

CORRUPT = "corrupt or incomplete JPEG data"
# the natural (row-major) index of each zigzag position
ZIGZAG = np.array([0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
                   13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52,
                   45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63])
SLACK_BITS = 8  # a restart interval's data is padded to whole bytes: up to 7 bits more than its codes


@dataclass
class Scan:
    components: list[int]  # indices into the frame's components
    tables: list[tuple[int, int]]  # (DC table, AC table) of each
    spectral: tuple[int, int, int, int]  # Ss, Se, Ah, Al
    interval: int  # the restart interval in force (MCUs; 0: none)
    segments: list[tuple[int, int]] = field(default_factory=list)  # (bits held, RST marker number or -1) each


@dataclass
class Frame:
    marker: int = 0  # the SOF marker's second byte
    height: int = 0
    width: int = 0
    sampling: list[tuple[int, int]] = field(default_factory=list)  # (h, v) of each component
    scans: list[Scan] = field(default_factory=list)
    ended: bool = False  # an EOI after the last scan
    scan_tables: list[dict] = field(default_factory=list)  # the code lengths each scan was coded with

    @property
    def huffman(self) -> bool:
        return self.marker not in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)

    @property
    def dct(self) -> bool:
        """Not lossless (SOF3, 7, 11, 15): a lossless restart interval counts samples, not 8x8 blocks' MCUs."""
        return self.marker not in (0xC3, 0xC7, 0xCB, 0xCF)

    @property
    def sequential(self) -> bool:
        return self.marker in (0xC0, 0xC1)

    @property
    def progressive(self) -> bool:
        return self.marker in (0xC2, 0xCA)

    def blocks(self, i: int) -> tuple[int, int]:
        """(block rows, block columns) of component ``i`` (no MCU padding)."""
        hmax, vmax = max(s[0] for s in self.sampling), max(s[1] for s in self.sampling)
        h, v = self.sampling[i]
        return math.ceil(math.ceil(self.height * v / vmax) / 8), math.ceil(math.ceil(self.width * h / hmax) / 8)

    def mcus(self, scan: Scan) -> int:
        if len(scan.components) == 1:
            rows, cols = self.blocks(scan.components[0])
            return rows * cols
        hmax, vmax = max(s[0] for s in self.sampling), max(s[1] for s in self.sampling)
        return math.ceil(self.width / (8 * hmax)) * math.ceil(self.height / (8 * vmax))


def parse(data: bytes) -> tuple[Frame | None, dict[tuple[int, int], np.ndarray]]:
    """The frame and scans of a JPEG file's first image, and its Huffman tables' code lengths by (class, id) as
    they stand at the end ((class, id) -> 256 lengths, 0: no code). None where it is no JPEG this can read."""
    if data[:2] != b"\xff\xd8":
        return None, {}
    frame, tables, ids, interval, pos, n = Frame(), {}, [], 0, 2, len(data)
    scan_tables: list[dict] = []
    while pos + 2 <= n:
        if data[pos] != 0xFF:
            return frame if frame.marker else None, tables
        marker = data[pos + 1]
        if marker == 0xFF:
            pos = _FILL.match(data, pos).end() - 1  # (fill bytes before a marker: T.81 B.1.1.2)
            continue
        if marker == 0xD9:
            frame.ended = bool(frame.scans)
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if pos + 4 > n:
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        body, pos = data[pos + 4:pos + 2 + length], pos + 2 + length
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if frame.marker:  # a second frame (an MPO's next image follows the first's EOI): not reached
                break
            frame.marker, frame.height, frame.width = marker, *(int.from_bytes(body[k:k + 2], "big") for k in (1, 3))
            count = body[5] if len(body) > 5 else 0
            ids = [body[6 + 3 * k] for k in range(count)]
            frame.sampling = [(body[7 + 3 * k] >> 4, body[7 + 3 * k] & 15) for k in range(count)]
            if not count or min(min(s) for s in frame.sampling) == 0 or not frame.width or not frame.height:
                return None, tables
        elif marker == 0xC4:
            k = 0
            while k + 17 <= len(body):
                counts, lengths = body[k + 1:k + 17], np.zeros(256, np.int64)
                values, at = body[k + 17:k + 17 + sum(counts)], 0
                for size, many in enumerate(counts, 1):
                    lengths[list(values[at:at + many])] = size
                    at += many
                tables[(body[k] >> 4, body[k] & 15)] = lengths
                k += 17 + sum(counts)
        elif marker == 0xDD and len(body) >= 2:
            interval = int.from_bytes(body[:2], "big")
        elif marker == 0xDA:
            if not frame.marker or not body or len(body) < 1 + 2 * body[0] + 3:
                return None, tables
            count = body[0]
            try:
                comps = [ids.index(body[1 + 2 * k]) for k in range(count)]
            except ValueError:
                return None, tables
            sel = [(body[2 + 2 * k] >> 4, body[2 + 2 * k] & 15) for k in range(count)]
            ss, se, a = body[1 + 2 * count], body[2 + 2 * count], body[3 + 2 * count]
            scan = Scan(comps, sel, (ss, se, a >> 4, a & 15), interval)
            scan_tables.append({key: tables.get(key) for c in sel for key in ((0, c[0]), (1, c[1]))})
            pos = _entropy(data, pos, scan)
            frame.scans.append(scan)
    frame.scan_tables = scan_tables  # (a later DHT may replace a table: each scan's are kept)
    return (frame if frame.marker else None), tables


def _entropy(data: bytes, pos: int, scan: Scan) -> int:
    """Split the entropy-coded data from ``pos`` at its RST markers into ``scan.segments``; where it ends (the
    first of the fill bytes 0xFF before its marker, which belong to no interval: T.81 B.1.1.2). Empty segments
    after the last interval (an RST marker after the scan's last MCU, which some encoders write and libjpeg
    ignores) are left out."""
    start, n, rst = pos, len(data), -1
    while True:
        at = data.find(b"\xff", pos)
        if at < 0 or at + 1 >= n:
            scan.segments.append((_bits(data[start:n]), rst))
            break
        nxt = data[at + 1]
        if nxt == 0x00:
            pos = at + 2
            continue
        if nxt == 0xFF:  # (a run of fill bytes: skipped at once, not byte by byte)
            end = _FILL.match(data, at).end()
            if end >= n or data[end] == 0x00:  # (FF..FF 00: a stuffed byte after fill bytes, data)
                pos = end + 1
                continue
            nxt = data[end]
            marker_at = end - 1
        else:
            marker_at = at
        scan.segments.append((_bits(data[start:at]), rst))
        if 0xD0 <= nxt <= 0xD7:
            rst, start, pos = nxt - 0xD0, marker_at + 2, marker_at + 2
            continue
        at = marker_at
        break
    while len(scan.segments) > 1 and scan.segments[-1][0] == 0:  # (a trailing RST: no interval; each holds a bit)
        scan.segments.pop()
    return at if at >= 0 and at + 1 < n else n


_FILL = re.compile(b"\xff+")  # a run of 0xFF bytes


def _bits(chunk: bytes) -> int:
    """The data bits in ``chunk``: a stuffed 0xFF 0x00 is one byte, as is 0xFF...0xFF 0x00 (fill bytes before the
    stuffing: libjpeg skips them, T.81 B.1.1.2)."""
    stuffed = 8 * (len(chunk) - chunk.count(b"\xff\x00"))
    if b"\xff\xff" not in chunk:
        return stuffed
    return 8 * (len(chunk) - sum(len(run) - 1 for run in _STUFFED.findall(chunk)))


_STUFFED = re.compile(b"\xff+\x00")  # a stuffed 0xFF data byte, fill bytes before it


def structure_problem(data: bytes, frame: Frame | None = None) -> str:
    """Why a JPEG file's data cannot be whole, from its markers alone ("" where nothing says so). ``frame``: its
    parse, made already (else parsed here)."""
    frame = frame or parse(data)[0]
    if frame is None or not frame.scans or not frame.ended:
        return ""
    if frame.huffman and frame.dct:
        need = sum(r * c for r, c in (frame.blocks(i) for i in range(len(frame.sampling))))
        held = sum(bits for scan in frame.scans for bits, _ in scan.segments)
        if held < need:
            return (f"{CORRUPT}: the header's {frame.width} x {frame.height} needs at least {need // 8} bytes of "
                    f"coded data (a bit per 8x8 block), the file holds {held // 8}")
    if frame.progressive and (short := _unrefined(frame)):
        return short
    for number, scan in enumerate(frame.scans, 1):
        if not frame.dct:  # (a lossless restart interval counts samples: only the markers' order is checked)
            scan = Scan(scan.components, scan.tables, scan.spectral, 0, scan.segments)
        markers = [rst for _, rst in scan.segments[1:]]
        wrong = [k for k, rst in enumerate(markers) if rst != k % 8]
        if wrong:
            return (f"{CORRUPT}: scan {number}'s restart markers are out of sequence (RST{markers[wrong[0]]} where "
                    f"RST{wrong[0] % 8} belongs, after interval {wrong[0] + 1})")
        if scan.interval:
            want = math.ceil(frame.mcus(scan) / scan.interval) - 1
            if len(markers) != want:
                return (f"{CORRUPT}: scan {number} has {len(markers)} restart markers, its "
                        f"{frame.mcus(scan)} MCUs in intervals of {scan.interval} need {want}")
    return ""


def _unrefined(frame: Frame) -> str:
    """Where a progressive JPEG's scans stop before each coefficient of each component is coded to full precision
    ("" where none): a download cut between scans (or within one) with an EOI appended decodes without a word from
    libjpeg, blurred or blocky (the bands never sent are zero, the bits never refined are coarse). Encoders code
    every coefficient (libjpeg's and mozjpeg's scan scripts end at Al = 0 for all 64); a cut within the last scan
    only, its last refinement bit, is not seen here."""
    precision = np.full((len(frame.sampling), 64), -1)  # the point transform Al each coefficient is at (-1: none)
    for scan in frame.scans:
        ss, se, _, al = scan.spectral
        for comp in scan.components:
            precision[comp, ss:se + 1] = al
    if not (precision != 0).any():
        return ""
    comp = int(np.flatnonzero((precision != 0).any(axis=1))[0])
    never = int((precision[comp] < 0).sum())
    what = (f"{never} of its 64 coefficients never sent" if never else
            f"coefficients left {int(precision[comp].max())} bit(s) short of full precision")
    return (f"{CORRUPT}: a progressive JPEG whose scans end early (component {comp + 1} has {what}: a download "
            f"cut short, decoded blurred or blocky)")


def coding_problem(data: bytes, coefficients: list[np.ndarray], frame: Frame | None = None) -> str:
    """Why the coefficients libjpeg decoded from a sequential Huffman JPEG (``coefficients``: each component's,
    blocks down x blocks across x 8 x 8, jpeglib's) are not what its data holds ("" where they are, or where it
    cannot tell: progressive, arithmetic, a file it cannot parse). ``frame``: its parse, made already."""
    frame = frame or parse(data)[0]
    if frame is None or not frame.sequential or len(coefficients) != len(frame.sampling):
        return ""
    for number, (scan, tables) in enumerate(zip(frame.scans, frame.scan_tables), 1):
        if scan.spectral != (0, 63, 0, 0) or any(t is None for t in tables.values()):
            return ""
        need, dummies = _scan_bits(frame, scan, tables, coefficients)
        held = np.array([bits for bits, _ in scan.segments], np.int64)
        if len(held) != len(need):
            return ""  # (structure_problem's to say)
        short = np.flatnonzero(need > held)
        if len(short):
            k = short[0]
            return (f"{CORRUPT}: scan {number}'s data ends early (restart interval {k + 1} of {len(held)} holds "
                    f"{held[k]} bits, its blocks need {need[k]}: the rest was filled with zeros, flat grey)"
                    if len(held) > 1 else
                    f"{CORRUPT}: scan {number}'s data ends early (it holds {held[0] // 8} bytes, its blocks need "
                    f"{-(-need[0] // 8)}: the rest was filled with zeros, flat grey)")
        # (the scan's last interval may end in padding before its marker, the image whole: libjpeg's "extraneous
        # bytes before marker 0xd9" on an intact photo; a restart's skipped bytes lose the interval's blocks)
        extra = np.flatnonzero((held - need >= SLACK_BITS + 32 * dummies)[:-1])
        if len(extra):
            k = extra[0]
            return (f"{CORRUPT}: scan {number}'s restart interval {k + 1} of {len(held)} holds "
                    f"{(held[k] - need[k]) // 8} bytes its blocks do not use (damaged data)")
    return ""


def _scan_bits(frame: Frame, scan: Scan, tables: dict, coefficients: list[np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray]:
    """The bits each restart interval of a sequential Huffman ``scan`` needs for the coefficients (the MCU
    padding's dummy blocks left out: a lower bound), and how many dummy blocks each interval has."""
    mcus = frame.mcus(scan)
    interval = scan.interval or mcus
    count = math.ceil(mcus / interval)
    need, dummies = np.zeros(count, np.int64), np.zeros(count, np.int64)
    single = len(scan.components) == 1
    mcu_cols = (frame.blocks(scan.components[0])[1] if single else
                math.ceil(frame.width / (8 * max(s[0] for s in frame.sampling))))
    for comp, (dc, ac) in zip(scan.components, scan.tables):
        coef = np.asarray(coefficients[comp])
        rows, cols = frame.blocks(comp)
        h, v = (1, 1) if single else frame.sampling[comp]
        coef = coef[:rows, :cols]
        if coef.shape[:2] != (rows, cols):
            return np.full(count, -1), dummies  # (not this file's coefficients)
        # each block's MCU (row-major) and order within the scan
        r, c = np.mgrid[:rows, :cols]
        mcu = (r // v) * mcu_cols + (c // h)
        order = np.lexsort(((c % h).ravel(), (r % v).ravel(), mcu.ravel()))  # (the MCU first)
        flat = coef.reshape(-1, 64)
        which = (mcu.ravel()[order]) // interval
        bits = _ac_bits(flat, tables[(1, ac)])[order] + _dc_bits(flat[order, 0], which, tables[(0, dc)])
        need += np.bincount(which, bits, minlength=count).astype(np.int64)[:count]
        if not single:  # (an MCU holds h x v blocks of the component; those past its edge are the encoder's)
            slots = np.bincount(np.arange(mcus) // interval, minlength=count)[:count] * h * v
            dummies += slots - np.bincount(which, minlength=count)[:count]
    return need, dummies


def _dc_bits(dc: np.ndarray, interval: np.ndarray, dc_len: np.ndarray) -> np.ndarray:
    """Bits each block's DC takes (``dc``: in scan order): its difference from the block before in the same
    restart interval (a restart resets the prediction to 0), by the table's code lengths."""
    dc = dc.astype(np.int32)
    prev = np.concatenate([[0], dc[:-1]])
    prev[np.concatenate([[True], interval[1:] != interval[:-1]])] = 0
    size = _size(dc - prev)
    return dc_len[size] + size


def _ac_bits(flat: np.ndarray, ac_len: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Bits each block's AC coefficients take (``flat``: blocks x 64, natural order): a code and the value's bits
    for each non-zero one after its run of zeros (a ZRL code per 16 zeros), an EOB where the block ends in zeros.
    Over the non-zero coefficients alone (most are zero: 3.2-5.2x faster than over all 63 positions on a 12 MP
    photo's luma at q10-q90, 1.6x at q100; the same counts), a chunk of blocks at a time (memory)."""
    out = np.empty(len(flat), np.int64)
    ac_len = ac_len.astype(np.int64)
    for k in range(0, len(flat), chunk):
        ac = np.take(flat[k:k + chunk], ZIGZAG[1:], axis=1)  # (zigzag order)
        at = np.flatnonzero(ac)  # (row-major: each block's non-zero positions in zigzag order)
        block, pos, size = at // 63, at % 63, _size(ac.ravel()[at])
        first = np.ones(len(at), bool)
        first[1:] = block[1:] != block[:-1]
        run = pos - np.where(first, -1, np.concatenate([[-1], pos[:-1]])) - 1  # (zeros since the last non-zero)
        code = ac_len[(run & 15) * 16 + size] + size + (run >> 4) * ac_len[0xF0]
        last = np.full(len(ac), -1)
        ends = np.ones(len(at), bool)
        ends[:-1] = first[1:]  # (a block's last non-zero: the next one starts another block)
        last[block[ends]] = pos[ends]
        out[k:k + chunk] = np.bincount(block, code, minlength=len(ac)) + np.where(last < 62, ac_len[0x00], 0)
    return out


# JPEG's magnitude category of each |value| up to 2^15: its bit length
_SIZES = np.concatenate([[0], np.floor(np.log2(np.arange(1, 1 << 15))).astype(np.int32) + 1]).astype(np.int32)


def _size(values: np.ndarray) -> np.ndarray:
    """JPEG's magnitude category: the bits of |value| (0 for 0)."""
    return _SIZES[np.minimum(np.abs(values.astype(np.int32)), (1 << 15) - 1)]


def file_problem(data: bytes, cells=None, frame: Frame | None = None, source=None) -> str:
    """coding_problem of a JPEG file's bytes: its coefficients ``cells``' (jpeg.consistency.JpegCells, read already)
    or else read here from ``source`` (its path, else ``data``), only where the check can tell (a sequential Huffman
    scan: not for a progressive or arithmetic JPEG); "" where they cannot be read (a CMYK JPEG, jpeglib missing).
    ``frame``: its parse, made already. Reading the coefficients is most of the cost (a 12 MP photo's in ~0.1 s on a
    2-core CPU VM), paid even where they are not otherwise wanted: without it a download cut short with an EOI
    appended decodes to flat grey and is restored as if whole."""
    from dist_dejpeg.jpeg.consistency import NotConsistent, read_cells
    frame = frame or parse(data)[0]
    if frame is None or not frame.sequential:
        return ""
    if cells is None:
        try:
            cells = read_cells(data if source is None else source)
        except NotConsistent:
            return ""
    return coding_problem(data, [plane.coefficients for plane in cells.planes], frame)
