"""Restoring images of any size with a trained generator: tiles with overlap, blended smoothly, in batches.

    from dist_dejpeg import Restorer
    restorer = Restorer("runs/debug")                  # generator.safetensors, a run or a checkpoint folder
    clean = restorer.restore(Image.open("photo.jpg"))  # PIL in, PIL out (numpy uint8 in, numpy uint8 out)

Tiling: an image larger than ``tile`` is cut into ``tile`` x ``tile`` windows that overlap by ``overlap`` pixels
(the last window in each direction is moved back to end at the border, so every window is full size). Each
window's output is weighted by a ramp that rises linearly across the overlap from the window's inner edges
(never to zero, and flat at the image border) and the weighted outputs are averaged, so no seam is visible
where two windows meet. The generator's receptive field is large (a MobileNet encoder plus one
self-attention block), so a tiled result is close to, not identical with, the whole-image one;
tests/test_infer.py bounds the difference on a real photo. Windows are multiples of 32 (the encoder's stride),
so no window is padded inside the model.

Quality and doing no harm: a JPEG's quality is read from its quantization tables (dist_dejpeg.jpeg.quality)
unless given; a quality-conditioned generator gets it (a blind one does not need it). The generator file
keeps the RGB PSNR gain its final validation measured at each quality; an image whose quality is above the
validated range, or where the gain interpolated between validated qualities is not positive, is passed
through unchanged (``guard``, on by default): restoration never returns what it predicts to be worse than
its input. An image of unknown quality (PNG input, tables that match no libjpeg quality) is restored blind,
and the result says that no prediction was possible.

Files (``load_image`` / ``save_image``): EXIF orientation is applied; grayscale, palette, RGBA/LA (alpha kept
and written back unchanged), CMYK and YCbCr JPEGs are read; grayscale input gives grayscale output. 16-bit
images are refused (a JPEG is 8-bit: a 16-bit file never was one), as are images over ``max_pixels`` (checked
from the header, before decoding: decompression bombs).
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from dist_dejpeg.models.generator_file import load_model
from dist_dejpeg.jpeg.formats import IMAGE_SUFFIXES
from dist_dejpeg.jpeg.quality import estimate_quality

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP; PIL's own limit (89.5 MP) only warns below twice its value


class InputImageError(ValueError):
    """An input file that cannot be restored (not an image, truncated, 16-bit, too large, ...)."""


@dataclass
class LoadedImage:
    rgb: np.ndarray  # H x W x 3 uint8, EXIF orientation applied
    alpha: np.ndarray | None  # H x W uint8, or None
    grayscale: bool  # the file was single-channel: write single-channel
    mode: str  # the file's PIL mode
    format: str  # the file's format (JPEG, PNG, ...)
    image: Image.Image | None = None  # the opened file (for its JPEG quantization tables)


def _png_bit_depth(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(33)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">B", head[24:25])[0]


@contextlib.contextmanager
def _pixel_limit(max_pixels: int):
    """PIL's own decompression-bomb limit raised to ``max_pixels`` while one file is opened (we check first)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(max_pixels, saved or 0)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def split_image(img: Image.Image, source: str = "image") -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(H x W x 3 uint8 RGB, H x W uint8 alpha or None, single-channel?) of a decoded PIL image, EXIF
    orientation applied. 16-bit and float images are an InputImageError."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        raise InputImageError(f"{source}: a 16-bit (or float) image, mode {img.mode}: JPEG is 8-bit, so this "
                              f"never was a JPEG; convert it to 8 bits first if it holds a decoded JPEG")
    img = ImageOps.exif_transpose(img)
    alpha = None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.ascontiguousarray(np.asarray(rgba)[..., 3])
        rgb = np.asarray(rgba.convert("RGB"))
    else:
        rgb = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(rgb), alpha, img.mode in ("L", "LA", "1")


def join_image(rgb: np.ndarray, alpha: np.ndarray | None = None, grayscale: bool = False) -> Image.Image:
    """The inverse of split_image: grayscale back to L (the mean of the restored channels), alpha put back."""
    if grayscale:
        gray = np.rint(rgb.astype(np.float32).mean(axis=2)).astype(np.uint8)
        return Image.fromarray(gray, "L") if alpha is None else Image.fromarray(np.dstack([gray, alpha]), "LA")
    return Image.fromarray(rgb, "RGB") if alpha is None else Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read ``path`` for restoration; every refusal is an InputImageError that says why."""
    path = Path(path)
    try:
        with _pixel_limit(max_pixels):
            img = Image.open(path)
    except FileNotFoundError:
        raise InputImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputImageError(f"{path}: a folder, not an image") from None
    except Exception as err:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError, SyntaxError ...
        raise InputImageError(f"{path}: not an image PIL can read ({type(err).__name__}: {err})") from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise InputImageError(f"{path}: {w} x {h} = {w * h / 1e6:.1f} megapixels is over the limit of "
                                  f"{max_pixels / 1e6:.1f} (a decompression bomb?); raise it with --max-pixels")
        if img.format == "PNG" and _png_bit_depth(path) == 16:
            raise InputImageError(f"{path}: a 16-bit PNG: JPEG is 8-bit, so this file never was a JPEG; convert "
                                  f"it to 8 bits first if it holds a decoded JPEG")
        mode, fmt = img.mode, img.format or path.suffix.lstrip(".").upper()
        try:
            with _pixel_limit(max_pixels):
                img.load()
        except Exception as err:  # noqa: BLE001 - truncated or corrupt data
            raise InputImageError(f"{path}: cannot decode ({type(err).__name__}: {err})") from None
        rgb, alpha, grayscale = split_image(img, str(path))
        return LoadedImage(rgb=rgb, alpha=alpha, grayscale=grayscale, mode=mode, format=fmt,
                           image=img if fmt == "JPEG" else None)


def save_image(rgb: np.ndarray, path: str | Path, *, alpha: np.ndarray | None = None, grayscale: bool = False) -> None:
    """Write losslessly (PNG unless ``path`` says otherwise), atomically: a temporary file renamed into place."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InputImageError(f"{path}: unknown output format '{path.suffix}'")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        join_image(rgb, alpha, grayscale).save(tmp, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: stride ``tile - overlap``, the last window ending at the border."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1-D blending weights: linear from 1/(overlap+1) up to 1 across the overlap at inner edges, flat at the
    image border (``at_start`` / ``at_end``)."""
    w = torch.ones(length)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        if not at_start:
            w[:overlap] = ramp
        if not at_end:
            w[length - overlap:] = torch.minimum(w[length - overlap:], ramp.flip(0))
    return w


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Decision:
    """What restoring one image does: its quality (None: unknown) and where it came from, and whether the
    image is passed through unchanged (``passthrough``) with the reason."""
    quality: int | None
    source: str  # "given", "file tables", "unknown"
    passthrough: bool = False
    reason: str = ""


def predicted_gain(gains: dict[int, float], quality: int) -> float | None:
    """The validated RGB PSNR gain at ``quality``: linear between the validated qualities, the lowest one's
    below them, None above the highest (not validated)."""
    qs = sorted(gains)
    if not qs or quality > qs[-1]:
        return None
    if quality <= qs[0]:
        return gains[qs[0]]
    return float(np.interp(quality, qs, [gains[q] for q in qs]))


class Restorer:
    """A generator ready to restore images. ``model``: a path (generator file, run or checkpoint folder) or a
    Generator module. ``tile``/``overlap`` in pixels (``tile`` 0: whole images, no tiling); ``batch_size``:
    tiles per forward pass; ``precision``: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32" or "bf16";
    ``guard``: pass through images of a known quality where the model's validation predicts no gain."""

    def __init__(self, model, *, device: str | torch.device = "auto", tile: int = 512, overlap: int = 64,
                 batch_size: int = 4, precision: str = "auto", guard: bool = True):
        self.device = _device(device)
        if isinstance(model, (str, Path)):
            self.generator, self.info = load_model(model, self.device)
        else:
            self.generator, self.info = model.to(self.device).eval(), {"source": type(model).__name__}
        if tile and (tile % 32 or tile < 64):
            raise ValueError(f"tile must be 0 (whole image) or a multiple of 32 of at least 64, got {tile}")
        if tile and not 0 <= overlap < tile // 2:
            raise ValueError(f"overlap must be in [0, tile/2), got {overlap} for tile {tile}")
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.tile, self.overlap, self.batch_size = tile, overlap, max(1, batch_size)
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.guard = guard
        self.conditioned = bool(getattr(self.generator, "conditioned", False))
        self.gains = {int(q): float(g) for q, g in (self.info.get("val_psnr_gain") or {}).items()}
        self.last_decision: Decision | None = None

    def decide(self, quality: int | None, source: str = "given") -> Decision:
        """Restore or pass through an image of ``quality`` (None: unknown)."""
        if quality is None:
            return Decision(None, "unknown", reason="quality unknown: restored blind, no gain could be predicted")
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be in 1..100, got {quality}")
        quality = int(quality)
        if not self.guard:
            return Decision(quality, source)
        if not self.gains:
            return Decision(quality, source, reason="the model file holds no validated gains: restored unchecked")
        gain = predicted_gain(self.gains, quality)
        if gain is None:
            return Decision(quality, source, True, f"q{quality} is above the validated qualities "
                                                   f"(up to q{max(self.gains)}): passed through unchanged")
        if gain <= 0:
            return Decision(quality, source, True, f"validation predicts {gain:+.2f} dB at q{quality}: "
                                                   f"passed through unchanged")
        return Decision(quality, source, reason=f"validation predicts {gain:+.2f} dB at q{quality}")

    # -- tensors -----------------------------------------------------------------------------------------
    def _forward(self, batch: torch.Tensor, quality: int | None = None) -> torch.Tensor:
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            if not self.conditioned:  # any module that maps images to images
                return self.generator(batch).float()
            q = torch.full((batch.shape[0],), float(quality or 0), device=batch.device)
            return self.generator(batch, q).float()

    def restore_tensor(self, image: torch.Tensor, quality: int | None = None) -> torch.Tensor:
        """3 x H x W (or N x 3 x H x W) float in [0, 1] -> the same shape, restored, on the CPU. ``quality``: the
        images' JPEG quality (None: unknown); passed through unchanged where ``decide`` says so."""
        squeeze = image.dim() == 3
        x = image.unsqueeze(0) if squeeze else image
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected 3 x H x W or N x 3 x H x W, got {tuple(image.shape)}")
        decision = self.last_decision = self.decide(quality)
        out = self._restore_batch(x, decision)
        return out[0] if squeeze else out

    def _restore_batch(self, x: torch.Tensor, decision: Decision) -> torch.Tensor:
        """N x 3 x H x W as ``decision`` says: passed through (a CPU float copy) or restored."""
        if decision.passthrough:
            return x.detach().float().cpu().clone()
        return torch.stack([self._restore_one(im, decision.quality) for im in x])

    def _restore_one(self, x: torch.Tensor, quality: int | None = None) -> torch.Tensor:
        """One 3 x H x W image: moved to the device once, cut, restored and blended there, returned on the CPU."""
        _, h, w = x.shape
        tile = self.tile
        x = x.to(self.device, non_blocking=True)
        if not tile or (h <= tile and w <= tile):
            return self._forward(x[None], quality)[0].cpu()
        th, tw = min(tile, h), min(tile, w)
        ys, xs = tile_starts(h, th, self.overlap), tile_starts(w, tw, self.overlap)
        out = torch.zeros(3, h, w, device=self.device)
        weight = torch.zeros(1, h, w, device=self.device)
        windows = [(y, x0) for y in ys for x0 in xs]
        ramps = {}
        for i in range(0, len(windows), self.batch_size):
            chunk = windows[i:i + self.batch_size]
            restored = self._forward(torch.stack([x[:, y:y + th, x0:x0 + tw] for y, x0 in chunk]), quality)
            for (y, x0), r in zip(chunk, restored):
                key = (y == 0, y + th == h, x0 == 0, x0 + tw == w)
                if key not in ramps:
                    wy = _ramp(th, self.overlap, key[0], key[1])
                    wx = _ramp(tw, self.overlap, key[2], key[3])
                    ramps[key] = (wy[:, None] * wx[None, :])[None].to(self.device)
                out[:, y:y + th, x0:x0 + tw] += r * ramps[key]
                weight[:, y:y + th, x0:x0 + tw] += ramps[key]
        return (out / weight).cpu()

    # -- arrays and PIL images -----------------------------------------------------------------------------
    def restore_array(self, rgb: np.ndarray, quality: int | None = None) -> np.ndarray:
        """H x W x 3 (or H x W grayscale) uint8 -> the same shape, uint8 (the input itself, copied, where the
        image is passed through)."""
        if rgb.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels, got {rgb.dtype} (use restore_tensor for float images)")
        gray = rgb.ndim == 2
        rgb3 = np.repeat(rgb[..., None], 3, axis=2) if gray else rgb
        if rgb3.ndim != 3 or rgb3.shape[2] != 3:
            raise ValueError(f"expected H x W x 3 or H x W, got {rgb.shape}")
        decision = self.last_decision = self.decide(quality)
        if decision.passthrough:
            return rgb.copy()
        x = torch.from_numpy(np.array(rgb3, dtype=np.float32)).permute(2, 0, 1).div_(255)  # a copy: PIL arrays are read-only
        y = self._restore_batch(x[None], decision)[0]
        out = y.mul_(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        if gray:
            return np.rint(out.astype(np.float32).mean(axis=2)).astype(np.uint8)
        return out

    def restore(self, image, quality: int | None = None):
        """A PIL image (any mode; alpha kept, grayscale stays grayscale) or a uint8 numpy array, restored, in
        the same kind; a float tensor goes through restore_tensor. ``quality`` None: a PIL image opened from a
        JPEG has its quality read from its tables; otherwise unknown. ``last_decision`` says what was done."""
        if isinstance(image, torch.Tensor):
            return self.restore_tensor(image, quality)
        if isinstance(image, np.ndarray):
            return self.restore_array(image, quality)
        if isinstance(image, Image.Image):
            if quality is None:
                quality = estimate_quality(image).quality
            rgb, alpha, grayscale = split_image(image)
            return join_image(self.restore_array(rgb, quality), alpha, grayscale)
        raise TypeError(f"restore takes a PIL image, a uint8 numpy array or a float tensor, not {type(image).__name__}")


# -- many files --------------------------------------------------------------------------------------------
OUTPUT_FORMATS = ("png", "tiff", "webp")  # lossless only (webp written with lossless=True)


@dataclass
class RestoreResult:
    source: str
    output: str | None = None
    error: str | None = None
    seconds: float = 0.0
    megapixels: float = 0.0
    quality: int | None = None  # the JPEG quality used (None: unknown)
    quality_from: str = ""  # "given" (--quality), "file tables", or why it is unknown
    passthrough: bool = False  # written unchanged: no gain predicted at this quality
    note: str = ""  # the restore decision's reason


def collect_inputs(inputs: list[str]) -> tuple[list[tuple[Path, Path]], list[RestoreResult]]:
    """(file, output path relative to the output folder) for every image named by ``inputs`` (files, folders
    searched recursively for image suffixes, globs), in order, each once; and a failure for each input that
    names nothing."""
    import glob

    found, failures, seen = [], [], set()

    def add(path: Path, rel: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append((path, rel))

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                failures.append(RestoreResult(item, error=f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder"))
            for p in files:
                add(p, p.relative_to(path))
        elif path.is_file():
            add(path, Path(path.name))
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                failures.append(RestoreResult(item, error="no such file, and no file matches it as a glob"))
            for p in matches:
                add(p, Path(p.name))
    return found, failures


def check_output_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` and prove it is writable before any work is done; an InputImageError otherwise."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".dist_dejpeg_write_test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InputImageError(f"output folder {out} is not writable ({type(err).__name__}: {err.strerror or err})") from None
    return out


def restore_files(restorer: Restorer, inputs: list[str], out_dir: str | Path, *, fmt: str = "png",
                  max_pixels: int = DEFAULT_MAX_PIXELS, skip_existing: bool = False,
                  progress: bool = True, quality: int | None = None) -> list[RestoreResult]:
    """Restore every image ``inputs`` names into ``out_dir`` (same relative name, ``fmt`` suffix). Never stops
    at a bad file: each result carries its error. The output folder is checked before anything runs. Each
    image's quality is ``quality`` when given, else read from its JPEG tables, else unknown."""
    import time

    from tqdm import tqdm

    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    out = check_output_dir(out_dir)
    files, results = collect_inputs(inputs)
    sources = {p.resolve() for p, _ in files}
    claimed: dict[Path, Path] = {}
    for path, rel in tqdm(files, desc="restore", unit="image", disable=not progress):
        target = out / rel.with_suffix(f".{fmt}")
        result = RestoreResult(str(path))
        results.append(result)
        key = target.resolve()
        if key in sources:
            result.error = f"refusing to overwrite an input: the output would be {target}"
            continue
        if key in claimed:
            result.error = f"output {target} is also the output of {claimed[key]}: restore them into different folders"
            continue
        claimed[key] = path
        if skip_existing and target.exists():
            result.output = str(target)
            continue
        start = time.perf_counter()
        try:
            image = load_image(path, max_pixels)
            if quality is not None:
                result.quality, result.quality_from = int(quality), "given"
            else:
                est = estimate_quality(image.image) if image.image is not None else None
                result.quality = est.quality if est else None
                result.quality_from = ("file tables" if result.quality is not None
                                       else (est.reason if est else f"not a JPEG ({image.format})"))
            restored = restorer.restore_array(image.rgb, result.quality)
            decision = restorer.last_decision
            result.passthrough, result.note = decision.passthrough, decision.reason
            target.parent.mkdir(parents=True, exist_ok=True)
            save_image(restored, target, alpha=image.alpha, grayscale=image.grayscale)
        except (InputImageError, OSError, ValueError, RuntimeError) as err:
            result.error = str(err) if isinstance(err, InputImageError) else f"{type(err).__name__}: {err}"
            continue
        result.output = str(target)
        result.seconds = time.perf_counter() - start
        result.megapixels = image.rgb.shape[0] * image.rgb.shape[1] / 1e6
    return results
