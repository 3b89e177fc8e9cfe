"""What every restorer shares, whatever runs the model (PyTorch: restore/restorer.py; onnxruntime:
restore/onnx_backend.py): the tiling options, the do-no-harm guard (restore/guard.py), uint8 arrays and PIL
images in and out, and the check that a broken model never returns non-finite pixels. Torch-free.

A backend gives ``arrays`` (restore/tiling.py's Arrays for its kind of array), ``chw(hwc)`` (a 3 x H x W view of an
H x W x 3 numpy array in that kind), ``forward(batch, quality)`` and ``inference()`` (the context a restore runs
in); the rest is here, once. A backend whose arrays live elsewhere (a GPU) overrides ``restore_rgb`` to move
the pixels there and back; ``full_batches`` asks tiling for batches of one shape (restore/tiling.py).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import threading
import warnings
from typing import Any, Callable

import numpy as np
from PIL import Image

from dist_dejpeg.jpeg.consistency import JpegCells, conform
from dist_dejpeg.jpeg.formats import DEFAULT_MAX_PIXELS, is_animation
from dist_dejpeg.jpeg.quality import PIXELS, earlier_compression, estimate_quality
from dist_dejpeg.models.names import CONFORMED_KEYS, GAIN_KEYS, JPEG_PSNR, read_gains
from dist_dejpeg.restore.guard import Decision, decide, exact_blocks
from dist_dejpeg.restore.images import (BYTES_GONE, InputImageError, cells_for, check_depth, decode_error, file_cells,
                                        held_bytes, join_image, load_image, made_consistent, split_image, to_gray)
from dist_dejpeg.restore.metadata import jpeg_notes, output_dpi, output_metadata, output_xmp
from dist_dejpeg.restore.tiling import NUMPY, Arrays, restore_tiled


def check_tiling(tile: int, overlap: int, batch_size: int = 1) -> None:
    """A ValueError for a tile the model cannot take, an overlap the blend cannot use or a batch of no tiles."""
    for name, value in (("tile", tile), ("overlap", overlap), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be a whole number{' of pixels' * (name != 'batch_size')}, got {value!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 tile, got {batch_size}")
    if tile and (tile % 32 or tile < 64):
        raise ValueError(f"tile must be 0 (whole image) or a multiple of 32 of at least 64, got {tile}")
    if tile and not 0 <= overlap < tile // 2:
        raise ValueError(f"overlap must be in [0, tile/2), got {overlap} for tile {tile} (e.g. {tile // 4})")


def tensor_batch(image) -> tuple[Any, bool]:
    """restore_tensor's input checked and made N x 3 x H x W, on its own device and in its own dtype: (batch,
    squeeze). No whole float32 copy of it: tiling converts each window as it cuts it (uint8: / 255) and each
    restored band is written straight into an output of the input's dtype (a 12 MP batch's float32 copies, in
    and out, were 144 MB each). An InputImageError (a ValueError) for another dtype or shape, a NaN or an infinity,
    or float pixels far outside 0..1 (0..255 given as floats): one read of the device for a float tensor."""
    import torch  # the caller's own: it holds a tensor

    if not isinstance(image, torch.Tensor):
        raise TypeError(f"restore_tensor takes a torch tensor, not {type(image).__name__}")
    x = image.detach()
    x = x.unsqueeze(0) if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[1] != 3 or not (x.shape[2] and x.shape[3]):
        raise InputImageError(f"expected 3 x H x W or N x 3 x H x W (not empty), got {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return x, image.dim() == 3
    if not image.dtype.is_floating_point:
        raise InputImageError(f"expected uint8 (0..255) or float (0..1) pixels, got {image.dtype}")
    if x.numel():  # (in the input's dtype: float16's and bfloat16's values are exact in float32, so are these)
        bad, lo, hi = torch.stack([(~torch.isfinite(x)).any().float(), x.amin().float(), x.amax().float()]).tolist()
        if bad:
            raise InputImageError("the input holds NaN or infinite pixels")
        if lo < -0.5 or hi > 1.5:
            raise InputImageError(f"float pixels are 0..1, these span {lo:g}..{hi:g} (0..255 values? divide them by "
                             f"255, or give uint8)")
    return x, image.dim() == 3


def file_bytes(fp) -> bytes:
    """The bytes of a binary file object (an upload), from its start where it can seek, as Image.open reads it."""
    if isinstance(fp, io.TextIOBase):
        raise TypeError("restore takes a file object opened in binary mode (open(path, 'rb')), not in text mode")
    if inspect.iscoroutinefunction(getattr(fp, "read", None)):
        raise TypeError("restore reads a file object's bytes, not an async one's: give it the bytes (await "
                        "upload.read()) or its file (upload.file)")
    with contextlib.suppress(AttributeError, OSError, ValueError):  # (a pipe, a socket: read from where it is)
        fp.seek(0)
    data = fp.read()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"restore takes a binary file object (open(path, 'rb')), not one that reads "
                        f"{type(data).__name__}")
    return bytes(data)


class ImageRestorer:
    """A model ready to restore images, tile by tile (``tile`` 0: whole images), ``batch_size`` tiles per call,
    guarded by the gains its validation measured (``info["val_psnr_gain"]`` and their lower bounds
    ``info["val_psnr_gain_low"]``; ``guard`` False: restore all). Threads may share one: their images take turns
    at the model (its buffers, pinned memory and CUDA graphs, are the restorer's), and each thread's
    ``last_decision`` is its own calls'.
    Subclasses set ``device`` and ``conditioned`` and give ``forward`` (and ``arrays``, ``chw``, ``inference``
    where their arrays are not numpy's)."""

    arrays: Arrays = NUMPY
    device: Any = "cpu"
    conditioned: bool = False
    full_batches: bool = False  # every batch batch_size windows (one shape for a captured graph): restore_tiled
    quality_hint: str = "quality=Q"  # how an unknown quality's reason says to give one (the CLI: --input-quality Q)
    cli_options: bool = False  # a refusal names settings as the API's keywords (tile=N); the CLI's as --tile N

    def setup(self, info: dict, *, tile: int, overlap: int, batch_size: int, guard: bool) -> None:
        check_tiling(tile, overlap, batch_size)
        if not isinstance(guard, (bool, np.bool_)):  # guard="no" would be true: the guard on, silently
            raise ValueError(f"guard must be True or False, got {guard!r}")
        self.info = info
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size
        self.guard = bool(guard)
        self.consistent = True  # a restored JPEG made consistent with its file (jpeg/consistency.py); False: not
        self.gains, self.lows = (read_gains(info.get(key), key) for key in GAIN_KEYS)
        self.jpeg_psnr = read_gains(info.get(JPEG_PSNR), JPEG_PSNR)  # (files from before it: {})
        # a JPEG made consistent with its file: its own gains and cell half-widths (files from before them: {})
        self.conformed, self.conformed_lows, self.half_widths = (read_gains(info.get(k), k) for k in CONFORMED_KEYS)
        self.lock = threading.Lock()  # one image through the model at a time: a backend's buffers are shared
        self.decisions = threading.local()

    @property
    def last_decision(self) -> Decision | None:
        """The guard's Decision for the last image this thread restored (None before one): its quality, where
        that came from, and whether it was passed through and why. Each thread sees its own calls'."""
        return getattr(self.decisions, "last", None)

    @last_decision.setter
    def last_decision(self, decision: Decision) -> None:
        self.decisions.last = decision

    # -- what a backend gives -------------------------------------------------------------------------------
    def forward(self, batch, quality: int | None):
        """N x 3 x h x w float32 in [0, 1] -> the same shape, restored (told ``quality`` if conditioned)."""
        raise NotImplementedError

    def chw(self, hwc: np.ndarray):
        """A 3 x H x W view of the H x W x 3 numpy array ``hwc``, in the kind of array ``forward`` takes."""
        return hwc.transpose(2, 0, 1)

    def inference(self):
        return contextlib.nullcontext()

    @staticmethod
    def finite(rows):
        """Whether ``rows`` are all finite: a bool here; Restorer's is a device flag, read once per image."""
        return bool(np.isfinite(rows).all())

    @staticmethod
    def all_finite(flags: list) -> bool:
        """One image's ``finite`` flags, read."""
        return all(flags)

    @staticmethod
    def to_uint8(rows, out) -> None:
        """``rows`` (float 0..1, may be changed) rounded into ``out`` (uint8)."""
        rows *= 255
        out[...] = np.clip(np.rint(rows, out=rows), 0, 255, out=rows)

    # -- the guard ------------------------------------------------------------------------------------------
    def decide(self, quality: int | None, source: str = "given", conformed: bool = False) -> Decision:
        """Restore or pass through an image of ``quality`` (None: unknown), found as ``source`` says. ``conformed``:
        the restored image will be made consistent with its JPEG file (jpeg/consistency.py), so the gains validation
        measured of that judge it where the model file holds them, and the Decision names the cell half-width."""
        if not (conformed and self.conformed):
            decision = decide(self.gains, quality, source, self.guard, self.lows, self.jpeg_psnr,
                              self.quality_hint)
            if not conformed:
                return decision
            decision.half_width = 0.5  # (a file from before the conformed gains: the file's own cells)
        else:
            decision = decide(self.conformed, quality, source, self.guard, self.conformed_lows, self.jpeg_psnr,
                              self.quality_hint)
            widths = self.half_widths or {0: 0.5}  # (a file with the gains but no widths: the file's own cells)
            q = decision.quality  # (unknown: blind, no width validated for it: the file's own cells)
            decision.half_width = 0.5 if q is None else widths[min(widths, key=lambda v: abs(v - q))]
        if not decision.passthrough:
            said = f"made consistent with its file (cells of half-width {decision.half_width:g})"
            decision.reason = f"{decision.reason}; {said}" if decision.reason else said
        return decision

    def exact(self, decision: Decision, image, channels_first: bool = False, scale: float = 1.0) -> Decision:
        """``decision``, or a pass-through where the guard is on and ``image`` is a JPEG that reproduced its blocks
        (guard.exact_blocks: grid-aligned graphics, which the model's smoothing harmed)."""
        if decision.passthrough or not self.guard or decision.quality is None:
            return decision
        why = exact_blocks(image, decision.quality, channels_first, scale)
        return Decision(decision.quality, decision.source, True, why) if why else decision

    def broken(self, decision: Decision, count: int, of: int) -> None:
        self.last_decision = Decision(decision.quality, decision.source, True,
                                      f"the model restored {count} of {of} image(s) to non-finite values (a "
                                      f"broken model file?): passed through unchanged")

    # -- restoring ------------------------------------------------------------------------------------------
    def restore_tiled(self, image, quality: int | None, write: Callable[[int, int, Any], None]) -> bool:
        """One 3 x H x W image (uint8 or float 0..1, in ``arrays``' kind) restored, its rows handed to ``write``
        as tiling.restore_tiled does; False when a restored value was NaN or infinite (a broken model): the
        callers then pass the image through. Each band's check is ``finite``'s: a host bool stops the writing at
        the first non-finite band; a device flag (on a GPU, a read per band would make the host wait between
        bands) is read once, at the end, and every band is written."""
        flags = []

        def checked(y0: int, y1: int, rows) -> None:
            flags.append(self.finite(rows))  # before write, which may change rows in place
            if not any(flag is False for flag in flags):
                write(y0, y1, rows)

        with self.inference():  # torch: the blending too (the model's outputs are weighted in place)
            restore_tiled(lambda batch: self.forward(batch, quality), image, self.tile, self.overlap,
                          self.batch_size, checked, self.arrays, self.full_batches)
        return self.all_finite(flags)

    def restore_rgb(self, rgb: np.ndarray, quality: int | None) -> np.ndarray | None:
        """H x W x 3 uint8 restored into a new H x W x 3 uint8 array; None where a restored value was NaN or
        infinite (a broken model). Each window is converted to float as it is copied into the batch and each
        finished band straight into the output: no float copy of the whole image."""
        out = np.empty(rgb.shape, np.uint8)
        out_chw = self.chw(out)

        def write(y0: int, y1: int, rows) -> None:
            self.to_uint8(rows, out_chw[:, y0:y1])

        return out if self.restore_tiled(self.chw(rgb), quality, write) else None

    def conform(self, rgb: np.ndarray, cells: JpegCells, orientation: int = 1, half_width: float = 0.5
                ) -> np.ndarray:
        """``rgb`` (H x W x 3 uint8, as displayed) made consistent with its JPEG file's ``cells``
        (jpeg.consistency.conform, on the host, in stripes); Restorer does it on its GPU. Called from restore's
        encode threads."""
        return conform(rgb, cells, orientation, half_width)

    def restore_array(self, rgb: np.ndarray, quality: int | None = None, source: str = "given",
                      conformed: bool = False) -> np.ndarray:
        """H x W x 3 (or H x W grayscale) uint8 -> the same shape, uint8 (the input itself, copied, where the
        image is passed through). ``source``: where ``quality`` came from, kept in ``last_decision``. ``conformed``:
        the caller makes the output consistent with the image's JPEG file (decide), at ``last_decision.half_width``."""
        if not isinstance(rgb, np.ndarray):
            raise TypeError(f"restore_array takes a numpy array, not {type(rgb).__name__}")
        if rgb.dtype != np.uint8:
            raise InputImageError(f"expected uint8 pixels, got {rgb.dtype} (use restore_tensor for float images)")
        gray = rgb.ndim == 2
        rgb3 = np.repeat(rgb[..., None], 3, axis=2) if gray else rgb
        if rgb3.ndim != 3 or rgb3.shape[2] != 3 or not rgb3.size:
            raise InputImageError(f"expected H x W x 3 or H x W (not empty), got {rgb.shape}")
        decision = self.last_decision = self.exact(self.decide(quality, source, conformed), rgb3)
        if decision.passthrough:
            return rgb.copy()
        with self.lock:
            out = self.restore_rgb(rgb3, decision.quality)
        if out is None:
            self.broken(decision, 1, 1)
            return rgb.copy()
        if gray:
            return to_gray(out)
        return out

    def restore_tensor(self, image, quality: int | None = None, source: str = "given"):
        """3 x H x W (or N x 3 x H x W) torch tensor, float 0..1 or uint8 0..255 -> the same shape and dtype,
        restored, on the input's device (``tensor_batch`` checks it). ``quality``: the images' JPEG quality
        (None: unknown); passed through unchanged where ``decide`` says so. A restored image with a NaN or an
        infinity (a broken model) is never returned: that image is passed through, and ``last_decision`` says so.
        A uint8, float16 or bfloat16 batch goes through as restore_array's image does: no whole float32 copy of
        it, in or out (the same pixels as its float32 copy's, cast back)."""
        x, squeeze = tensor_batch(image)
        decision = self.last_decision = self.decide(quality, source)
        if decision.passthrough:
            return image.detach().clone()
        images, originals, out, finish = self.tensor_io(x)
        rounded = str(out.dtype).endswith("uint8")  # a uint8 batch: each finished band rounded straight into it
        broken, exact = 0, []
        with self.lock:
            for i, im in enumerate(images):
                kept = self.exact(decision, im, channels_first=True, scale=1 if rounded else 255)
                if kept.passthrough:  # (this image's blocks reproduced: kept, the others restored)
                    out[i][...] = originals[i]
                    exact.append(kept)
                    continue
                def write(y0, y1, rows, dst=out[i]):
                    if rounded:
                        self.to_uint8(rows, dst[:, y0:y1])
                    else:
                        dst[:, y0:y1] = rows

                if not self.restore_tiled(im, decision.quality, write):
                    out[i][...] = originals[i]  # (on out's device: the input's, not the restorer's)
                    broken += 1
        if exact and len(exact) == len(out):
            self.last_decision = exact[0]
        elif exact:
            decision.reason += f"; {len(exact)} of {len(out)} image(s) passed through unchanged: {exact[0].reason}"
        if broken:
            self.broken(decision, broken, len(out))
        out = finish(out)
        return out[0] if squeeze else out

    def tensor_io(self, x):
        """restore_tensor's images in ``arrays``' kind, the same images where the output is (for those passed
        through), its output batch (in ``x``'s dtype: each band is cast as it is written), and what makes that a
        tensor of ``x``'s dtype on ``x``'s device: here numpy on the host (Restorer keeps a GPU tensor on the GPU)."""
        import torch

        dtype = x.dtype
        if dtype == torch.bfloat16:  # numpy has no bfloat16: a whole float32 copy on this (onnxruntime's) path
            x = x.float()
        batch = x.cpu().numpy()
        return batch, batch, np.empty_like(batch), lambda out: torch.from_numpy(out).to(x.device, dtype)

    def restore(self, image, quality: int | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        """A PIL image (any mode; alpha kept, grayscale stays grayscale) or an image file's path, bytes or binary file
        object (an upload: a PIL image back; refused as ``restore`` refuses it: images.load_image), a uint8 numpy array
        (restore_array) or a torch tensor (restore_tensor), restored, in the same kind. ``quality`` None: a PIL image's
        quality is estimated (jpeg.quality.estimate_quality: a JPEG's tables, else its pixels) and its source kept in
        ``last_decision``; an array's is unknown. A PIL image comes back with the input's ICC profile, EXIF, dpi, XMP
        and a JPEG's comment in ``.info`` ("icc_profile", "exif", "dpi", "xmp", "comment"; orientation applied, as
        restore/images.py writes them), so ``out.save(path, **out.info)`` keeps them (Pillow writes ``xmp=`` into JPEG
        and WebP files, ``comment=`` into JPEG; restore/images.save_image into PNG and TIFF too, and a JPEG's IPTC:
        jpeg_notes). A JPEG opened from its file is made consistent with the file's data, as ``restore`` makes it
        (images.made_consistent); an array's or tensor's is not (jpeg.consistency.conform does it, given the file), nor
        a PIL image's loaded from a file object, whose bytes Pillow let go of (a warning: give the bytes).
        ``max_pixels``: a path's, bytes' or file object's limit (restore --max-pixels; checked from its header, before
        decoding: decompression bombs); a PIL image's is Pillow's, as it opened it.
        An input that cannot be restored (not an image, cut short, animated, 16-bit, too large, an array or tensor of
        another dtype or shape, ...) raises images.InputImageError (a ValueError; dist_dejpeg.restore exports it), its
        message saying why: a service's HTTP 400. A TypeError: not a kind of input restore takes (the caller's code)."""
        read = None  # a file's cells, read as it was loaded
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
            raise ValueError(f"max_pixels must be a whole number of pixels, at least 1, got {max_pixels!r}")
        if hasattr(image, "read"):  # a binary file object (an upload): its bytes, restored as its file
            image = file_bytes(image)
        if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
            loaded = load_image(image, max_pixels, self.consistent, "restore(..., max_pixels=N)")
            image, read = loaded.image, (loaded.cells, loaded.cells_note)  # its quality: from its file, as Image.open's
        if isinstance(image, np.ndarray):
            return self.restore_array(image, quality)
        if type(image).__module__.startswith("torch"):
            return self.restore_tensor(image, quality)
        if isinstance(image, Image.Image):
            if is_animation(image):  # as load_image refuses the file
                raise InputImageError(f"an animated {image.format} ({image.n_frames} frames): restore writes one "
                                      f"image, so all but the current frame would be lost; restore the frames one by "
                                      f"one (image.seek(i), then image.copy())")
            if not read:  # (a path's file: checked as it was loaded)
                check_depth(image, getattr(image, "filename", "") or "image")
            held = None if read or getattr(image, "filename", "") else held_bytes(image)  # (gone once it loads)
            try:  # (an image opened lazily decodes here: its truncated or corrupt data refused as its file's)
                image.load()
            except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError ...
                raise decode_error(getattr(image, "filename", "") or "image", err) from None
            rgb, alpha, grayscale = split_image(image)
            source = "given"
            if quality is None:
                est = estimate_quality(image, rgb)
                quality, source = est.quality, est.source or "unknown"
            # a JPEG opened from its file, still its pixels: made consistent with the file's data
            earlier = earlier_compression(quality, source, image)
            found = (read or file_cells(image, held, rgb=rgb)) if self.consistent else (None, "")
            if found[1].endswith(BYTES_GONE):  # (judged then by the model's own gains: a loss, said)
                warnings.warn(f"a JPEG image {found[1]}", stacklevel=2)
            cells, unmade = cells_for(*found, earlier)
            restored = self.restore_array(rgb, quality, source, conformed=cells is not None)
            decision = self.last_decision
            if not decision.passthrough:
                if cells is not None:
                    restored, unmade = made_consistent(restored, cells, image, getattr(decision, "half_width", None),
                                                       self.conform)
                elif self.consistent and image.format is None and source.startswith(PIXELS):  # converted, copied
                    unmade = ("not made consistent with a JPEG file: a converted or copied image has none (give "
                              "restore the path, or the image Image.open returns)")
                decision.reason += f"; {unmade}" if unmade else ""
            restored = join_image(restored, alpha, grayscale)
            icc, exif = output_metadata(image, grayscale)
            restored.info.update({k: v for k, v in (("icc_profile", icc), ("exif", exif), ("dpi", output_dpi(image)),
                                                    ("xmp", output_xmp(image)), ("comment", jpeg_notes(image)[0]))
                                  if v})
            return restored
        raise TypeError(f"restore takes a PIL image, an image file's path, bytes or binary file object, a uint8 numpy "
                        f"array or a torch tensor, not {type(image).__name__}")
