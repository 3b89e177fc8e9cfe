"""A restored image made consistent with the JPEG file it came from. The file holds, for each 8x8 block of
each plane (Y, and Cb and Cr at the file's chroma sampling), DCT coefficients quantized by its tables: the
clean photo's coefficients lay within half a quantization step of each stored one (its cell). ``conform``
moves each coefficient of the restored image that left its cell back to the cell's edge, the rest untouched:
the nearest image, in the JPEG's own (YCbCr, DCT) space, that the file could have come from. The cells are a
convex set that holds the clean photo, so this never moves the restored image away from it in that space (up
to the encoder's rounding and the blocks the image's edge cuts), whatever the model did. The 8-bit range is
another such set: where the cells' image needs clipping (the decoder clipped), the two projections alternate
(ROUNDS) towards an image inside both, no longer the nearest one. Narrower cells (a ``half_width`` under 0.5
steps) pull the coefficients further, towards the stored values; they may leave the clean photo out, so a run's
final validation measures which width restores best at each quality (train/validation.py: conformed_gains).
Measured in RGB: benchmarks/RESULTS.md ("Consistent with the file").
Torch-free: the onnxruntime restorer and a PyTorch one on the CPU use it; models/consistency.py is the same
projection in torch (a GPU Restorer's, the final validation's batches).

    cells = read_cells("photo.jpg")            # JpegCells, or a NotConsistent error saying why not
    restored = conform(restored, cells)        # H x W x 3 uint8 -> the same, orientation as displayed

The coefficients are read by jpeglib (libjpeg's own coefficient reader). The file's chroma planes are box
averages of the full-resolution ones (libjpeg's encoder), so a chroma cell's correction is spread evenly over
the pixels each sample covers: with averaging's rows orthogonal and of equal weight, that is the projection.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dist_dejpeg.jpeg.formats import JFIF_YCBCR
from dist_dejpeg.jpeg.quality import dct_rows

log = logging.getLogger(__name__)


JPEGLIB_MISSING = ("jpeglib is not installed (pip install jpeglib): restored JPEGs are not made consistent with their "
                   "files' data")


class NotConsistent(ValueError):
    """A file whose coefficients cannot constrain the restored image (not a baseline or progressive JPEG of YCbCr
    or grayscale, unreadable, jpeglib missing, ...): the restored image is kept as the model made it."""


# a block's 64 pixels (row-major) -> its 64 coefficients (row-major: vertical frequency, then horizontal), as
# libjpeg orders them; orthonormal, so the inverse is the transpose
_BLOCK_DCT = np.kron(dct_rows(), dct_rows()).astype(np.float32)
_TO_YCC = np.array(JFIF_YCBCR, np.float32)
_TO_RGB = np.linalg.inv(np.array(JFIF_YCBCR, np.float64)).astype(np.float32)
# the cell half-widths (in quantization steps) a run's final validation measures restoring with: 0.5 is the file's
# own cell; narrower ones pull the restored coefficients towards the JPEG's (train/validation.py: conformed_gains)
HALF_WIDTHS = (0.5, 0.35, 0.2)
# The cells and the 8-bit range [0, 255] are both convex sets that hold the clean photo: conform alternates the
# projections onto them (POCS) until the image the cells give needs no clipping by more than CLIP_TOLERANCE levels,
# at most ROUNDS times. One round (the projection onto the cells, then clipped) was the first version: where the
# decoder clipped (saturated graphics, highlights) clipping takes the image out of its cells again, and more rounds
# gained up to +3.4 dB there (horse q90, 8 rounds), +0.006 dB on photos (benchmarks/RESULTS.md, "Alternating"). Only
# the MCUs still clipped go round again (each on its own: an MCU's projection needs no other; a photo's few, most of
# a saturated graphic's; whole block rows went round before: a 12 MP photo's q30 ~4.8 images' worth).
ROUNDS = 8  # (16 gained +0.09 dB more on graphics, at twice the time: a round of a 12 MP image is ~0.7 s of a core)
CLIP_TOLERANCE = 0.5
_STRIPE_BLOCKS = 8  # block rows (of the tallest-sampled plane) per stripe of conform: its float copies
# PIL's transposes for the EXIF orientations (ImageOps.exif_transpose's), and the inverse of each
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
_UNDO = {**_ORIENT, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
DECODE_TOLERANCE = (16.0, 48)  # is_decode_of: an 8x8 block's mean move and a pixel's, in levels
LIBJPEG = "turbo210"  # the libjpeg jpeglib reads with: libjpeg-turbo, as Pillow's wheels decode
_READ = threading.Lock()  # jpeglib's reader: one file at a time (its library state is process-wide)


@dataclass(frozen=True)
class Plane:
    """One of a JPEG's planes: its quantized coefficients (blocks down, blocks across, 8, 8), its quantization
    table (8 x 8, the coefficients' order) and how many full-resolution rows and columns each sample covers."""
    coefficients: np.ndarray
    table: np.ndarray
    factor: tuple[int, int]


@dataclass(frozen=True)
class JpegCells:
    """The quantization cells of a JPEG file: its size as stored (before any EXIF orientation) and its planes,
    Y (, Cb, Cr)."""
    height: int
    width: int
    planes: tuple[Plane, ...]

    @property
    def block_rows(self) -> int:
        """Full-resolution rows in one block row of every plane (8 x the tallest sampling: 16 at 4:2:0)."""
        return 8 * max(p.factor[0] for p in self.planes)

    @property
    def block_cols(self) -> int:
        """Full-resolution columns in one MCU: 8 x the widest sampling (16 at 4:2:0 and 4:2:2)."""
        return 8 * max(p.factor[1] for p in self.planes)

    def check_size(self, height: int, width: int) -> None:
        """A NotConsistent error where an image of ``height`` x ``width`` (as the file stores it) is not the file's
        size: conformed to the wrong blocks, it would be ruined."""
        if (height, width) != (self.height, self.width):
            raise NotConsistent(f"the image is {width} x {height} as the file stores it, the file {self.width} x "
                                f"{self.height}")


def read_cells(source: str | os.PathLike | bytes) -> JpegCells:
    """The quantization cells of a JPEG file (``source``: its path, or its bytes); a NotConsistent error where
    there are none to use."""
    try:
        import jpeglib
    except ImportError:
        raise NotConsistent(JPEGLIB_MISSING) from None
    if not isinstance(source, (bytes, bytearray, memoryview)) and os.fsencode(source) != str(source).encode(
            "utf-8", "replace"):  # a name that is no UTF-8 (b'caf\xe9.jpg'), which jpeglib cannot open: its bytes
        try:
            with open(source, "rb") as f:
                source = f.read()
        except OSError as err:
            raise NotConsistent(f"its JPEG coefficients cannot be read ({type(err).__name__}: {err})") from None
    if isinstance(source, (bytes, bytearray, memoryview)):  # jpeglib reads files only
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "image.jpg")
                with open(path, "wb") as f:
                    f.write(source)
                return read_cells(path)
        except OSError as err:  # (a full disk: the image is kept as the model made it)
            raise NotConsistent(f"its bytes cannot be written for jpeglib ({err})") from None
    try:
        with _READ:
            jpeglib.version.set(LIBJPEG)  # (6b, its default, refuses arithmetic coding, which Pillow reads)
            jpeg = jpeglib.read_dct(str(source))
            space = getattr(jpeg.jpeg_color_space, "name", str(jpeg.jpeg_color_space))
            if space not in ("JCS_YCbCr", "JCS_GRAYSCALE"):
                raise NotConsistent(f"a {space.removeprefix('JCS_')} JPEG: only YCbCr and grayscale JPEGs are "
                                    f"made consistent with their data")
            coefficients = [jpeg.Y] + ([jpeg.Cb, jpeg.Cr] if space == "JCS_YCbCr" else [])
            tables, numbers = np.asarray(jpeg.qt, np.float32), list(jpeg.quant_tbl_no)
            factors, height, width = np.asarray(jpeg.samp_factor), int(jpeg.height), int(jpeg.width)
    except NotConsistent:
        raise
    except Exception as err:  # noqa: BLE001 - jpeglib raises OSError, ValueError, ... for what libjpeg refuses
        raise NotConsistent(f"its JPEG coefficients cannot be read ({type(err).__name__}: {err})") from None
    v_max, h_max = factors[: len(coefficients)].max(axis=0)
    planes = []
    for i, coef in enumerate(coefficients):
        v, h = factors[i]
        if v_max % v or h_max % h:
            raise NotConsistent(f"chroma sampling {factors.tolist()} is not a whole ratio")
        planes.append(Plane(np.asarray(coef), tables[numbers[i]], (int(v_max // v), int(h_max // h))))
    return JpegCells(height, width, tuple(planes))


def cells_of(source: str | os.PathLike | bytes) -> tuple[JpegCells | None, str]:
    """The cells of the JPEG file ``source`` (its path or bytes) and "", or None and why a restored image of it
    cannot be made consistent with it (jpeglib missing: warned of once in a process)."""
    try:
        return read_cells(source), ""
    except NotConsistent as err:
        if str(err) == JPEGLIB_MISSING and not _warned:
            _warned.append(log.warning("%s", err))
        return None, f"not made consistent with its JPEG data: {err}"


def conform_to_file(rgb: np.ndarray, source: str | os.PathLike | bytes, orientation: int = 1,
                    half_width: float = 0.5) -> tuple[np.ndarray, str]:
    """``rgb`` conformed to the cells of the JPEG file ``source`` and "", or ``rgb`` itself and why not (cells_of)."""
    cells, why = cells_of(source)
    return (rgb, why) if cells is None else (conform(rgb, cells, orientation, half_width), "")


_warned: list = []  # jpeglib's absence, once said


def jpeglib_missing() -> str:
    """JPEGLIB_MISSING where jpeglib cannot be imported (a command says it before its progress bar; not warned of
    again), else ""."""
    try:
        import jpeglib  # noqa: F401
    except ImportError:
        _warned.append(True)
        return JPEGLIB_MISSING
    return ""


def conform(rgb: np.ndarray, cells: JpegCells, orientation: int = 1, half_width: float = 0.5,
            rounds: int | None = None) -> np.ndarray:
    """``rgb`` (H x W x 3 uint8, the image as displayed: EXIF ``orientation`` applied) with every DCT coefficient
    that lies outside its quantization cell moved to the cell's edge, then clipped to 0..255, the two alternated
    on each MCU while it needs clipping (``rounds`` at most, None: ROUNDS), as a new array; a grayscale JPEG's one plane
    is the mean of the channels (what restore writes for it), the three channels equal after. ``half_width``: the
    cells' half-width in quantization steps (0.5: the file's own; less: narrower, about the stored values). A block
    the image's edge cuts is projected as the encoder padded it (its edge pixels repeated), the padding's change
    folded onto the pixels it repeats: it may stay a little outside its cells (its few rows' 8-bit rounding,
    repeated). A NotConsistent error where the image's size is not the file's."""
    stored = np.asarray(Image.fromarray(rgb).transpose(_UNDO[orientation])) if orientation in _UNDO else rgb
    cells.check_size(*stored.shape[:2])
    out = np.empty_like(stored)
    gray = len(cells.planes) == 1
    mcu = cells.block_rows
    for y0 in range(0, stored.shape[0], mcu * _STRIPE_BLOCKS):  # a stripe at a time: small float copies (memory)
        part = stored[y0:y0 + mcu * _STRIPE_BLOCKS].astype(np.float32)
        part = part.mean(axis=2) if gray else part
        todo = None  # the MCUs a round projects: all, then those that still needed clipping
        for _ in range(ROUNDS if rounds is None else rounds):  # (an MCU's alternation needs no other's)
            if todo is None:
                inside = _conform_pixels(part, cells, y0, half_width)
                part[:] = np.clip(inside, 0, 255)
                todo = _mcus_over(np.abs(inside - part), cells)
            else:
                todo = _round_of_mcus(part, cells, y0, half_width, todo)
            if not todo.any():
                break
        out[y0:y0 + len(part)] = _to_uint8(part)[..., None] if gray else _to_uint8(part)
    return np.asarray(Image.fromarray(out).transpose(_ORIENT[orientation])) if orientation in _ORIENT else out


def is_decode_of(rgb: np.ndarray, cells: JpegCells, orientation: int = 1) -> bool:
    """Whether ``rgb`` (as displayed) is the file's own decoded image: one round of conform (the cells, then the
    clip; more rounds move a clipped graphic's decode on, over 60 levels at q10) moves no pixel by more than
    DECODE_TOLERANCE[1] levels and no 8x8 block by more than DECODE_TOLERANCE[0] on average (a decoder's rounding,
    clipping and chroma upsampling: at most 33 and 7 on photos and graphics, q5-q100, any subsampling, by a review's
    870 decodes; 26 before the blocks the edge cuts were folded); an image edited since (a retouched spot, pasted
    text), another frame, or turned otherwise is not. An edit of a few levels passes: it is then pulled towards the
    file, by at most its quantization cells."""
    try:
        moved = np.abs(conform(rgb, cells, orientation, rounds=1).astype(np.int16) - rgb)
    except NotConsistent:
        return False
    if moved.size and moved.max() > DECODE_TOLERANCE[1]:
        return False
    moved = moved.mean(axis=2)
    h, w = moved.shape[0] // 8 * 8, moved.shape[1] // 8 * 8
    return bool(not h or not w or moved[:h, :w].reshape(h // 8, 8, w // 8, 8).mean(axis=(1, 3)).max()
                <= DECODE_TOLERANCE[0])


def _conform_pixels(part: np.ndarray, cells: JpegCells, y0: int, half_width: float) -> np.ndarray:
    """Rows ``y0``.. (whole block rows, float; H x W x 3 RGB, or H x W for a grayscale file's one plane) projected
    onto the cells, not clipped."""
    if len(cells.planes) == 1:
        return _conform_rows(part, cells.planes[0], y0, 128.0, half_width)
    ycc = part @ _TO_YCC.T
    for c, plane in enumerate(cells.planes):
        ycc[..., c] = _conform_rows(ycc[..., c], plane, y0, 128.0 if c == 0 else 0.0, half_width)
    return ycc @ _TO_RGB.T


def _mcus_over(moved: np.ndarray, cells: JpegCells) -> np.ndarray:
    """Which MCUs (blocks down x across; the edge's cut ones too) of rows ``moved`` (how far the clip moved each
    pixel: h x w (x 3)) were clipped by more than CLIP_TOLERANCE."""
    mh, mw = cells.block_rows, cells.block_cols
    moved = moved.max(axis=2) if moved.ndim == 3 else moved
    h, w = moved.shape
    moved = np.pad(moved, ((0, -h % mh), (0, -w % mw)))
    return moved.reshape(-(-h // mh), mh, -(-w // mw), mw).max(axis=(1, 3)) > CLIP_TOLERANCE


def _round_of_mcus(part: np.ndarray, cells: JpegCells, y0: int, half_width: float, todo: np.ndarray) -> np.ndarray:
    """One more round of the alternation on the MCUs of rows ``y0``.. (``part``, in place) that ``todo`` marks; which
    of them still clip. An MCU holds whole blocks of every plane and its chroma samples average its own pixels only
    (the encoder's box; the decoder's fancy upsampling is no part of the cells), so its projection needs no other
    MCU: whole ones go as one row of MCUs side by side with their coefficients, those the edge cuts (padded as the
    encoder padded them) as runs in place."""
    mh, mw = cells.block_rows, cells.block_cols
    h, w = part.shape[:2]
    rf, cf = h // mh, w // mw  # the MCUs the edge does not cut
    again = np.zeros_like(todo)
    rs, cs = np.nonzero(todo[:rf, :cf])
    if len(rs):
        grid = part[:rf * mh, :cf * mw].reshape((rf, mh, cf, mw) + part.shape[2:])  # (a view: splits axes only)
        tiles = grid[rs, :, cs]  # N x mh x mw (x 3)
        row = np.moveaxis(tiles, 0, 1).reshape((mh, len(rs) * mw) + part.shape[2:])
        planes = []
        for plane in cells.planes:
            (fy, fx), (by, bx) = plane.factor, (mh // (8 * plane.factor[0]), mw // (8 * plane.factor[1]))
            r0 = y0 // (8 * fy)
            coef = plane.coefficients[r0:r0 + rf * by, :cf * bx].reshape(rf, by, cf, bx, 8, 8)[rs, :, cs]
            planes.append(Plane(np.moveaxis(coef, 0, 1).reshape(by, len(rs) * bx, 8, 8), plane.table, (fy, fx)))
        inside = _conform_pixels(row, JpegCells(mh, len(rs) * mw, tuple(planes)), 0, half_width)
        clipped = np.clip(inside, 0, 255)
        grid[rs, :, cs] = np.moveaxis(clipped.reshape((mh, len(rs), mw) + part.shape[2:]), 1, 0)
        again[rs, cs] = _mcus_over(np.abs(inside - clipped), JpegCells(mh, len(rs) * mw, tuple(planes)))[0]
    cut = todo.copy()
    cut[:rf, :cf] = False
    for r, c0, c1 in _runs(cut):  # the edge's MCUs: the blocks from c0 (to the plane's end at the right edge)
        a, b, x0, x1 = r * mh, min(h, (r + 1) * mh), c0 * mw, min(w, c1 * mw)
        planes = tuple(Plane(p.coefficients[:, c0 * mw // (8 * p.factor[1]):None if x1 == w else c1 * mw // (
            8 * p.factor[1])], p.table, p.factor) for p in cells.planes)
        inside = _conform_pixels(part[a:b, x0:x1], JpegCells(b - a, x1 - x0, planes), y0 + a, half_width)
        part[a:b, x0:x1] = np.clip(inside, 0, 255)
        again[r, c0:c1] = _mcus_over(np.abs(inside - part[a:b, x0:x1]), cells)[0]
    return again


def _runs(marked: np.ndarray) -> list[tuple[int, int, int]]:
    """The runs of adjacent marked MCUs along each row of ``marked``: (row, first, past the last)."""
    runs: list[tuple[int, int, int]] = []
    for r, c in zip(*np.nonzero(marked)):
        if runs and runs[-1][0] == r and runs[-1][2] == c:
            runs[-1] = (r, runs[-1][1], c + 1)
        else:
            runs.append((int(r), int(c), int(c) + 1))
    return runs


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _conform_rows(values: np.ndarray, plane: Plane, y0: int, level: float, half_width: float) -> np.ndarray:
    """Full-resolution rows ``y0``.. of one plane (float32, whole block rows of it but at the image's bottom)
    conformed to ``plane``'s cells; ``level``: what the encoder subtracts before its DCT (128 for Y, 0 for chroma
    held without its +128)."""
    fy, fx = plane.factor
    h, w = values.shape
    r0 = y0 // (8 * fy)
    r1 = min(plane.coefficients.shape[0], r0 + -(-h // (8 * fy)))
    cols = plane.coefficients.shape[1]
    # the encoder's samples: the rows padded by their edge pixels to whole blocks, then area-averaged
    padded = np.pad(values, ((0, (r1 - r0) * 8 * fy - h), (0, cols * 8 * fx - w)), mode="edge")
    samples = padded.reshape((r1 - r0) * 8, fy, cols * 8, fx).mean(axis=(1, 3))
    coef = (samples.reshape(r1 - r0, 8, cols, 8).transpose(0, 2, 1, 3).reshape(-1, 64) - level) @ _BLOCK_DCT.T
    q = plane.table.reshape(64)
    stored = plane.coefficients[r0:r1].reshape(-1, 64).astype(np.float32) * q
    moved = np.clip(coef, stored - q * half_width, stored + q * half_width) - coef
    delta = (moved @ _BLOCK_DCT).reshape(r1 - r0, cols, 8, 8).transpose(0, 2, 1, 3).reshape((r1 - r0) * 8, cols * 8)
    if fy > 1 or fx > 1:  # each sample's change spread over the pixels it averages
        delta = np.repeat(np.repeat(delta, fy, axis=0), fx, axis=1)
    # the padding's change folded onto the edge pixels it repeats: each gets the mean change of its copies (the
    # nearest edge-padded image; cutting the padding's off left the cut blocks up to 3.7 steps outside at q90)
    if delta.shape[0] > h:
        delta[h - 1] = delta[h - 1:].mean(axis=0)
    if delta.shape[1] > w:
        delta[:, w - 1] = delta[:, w - 1:].mean(axis=1)
    return values + delta[:h, :w]
