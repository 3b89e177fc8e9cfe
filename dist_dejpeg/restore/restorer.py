"""Restoring images of any size with a trained generator: tiles with overlap, blended smoothly, in batches.

    from dist_dejpeg import Restorer
    restorer = Restorer("runs/debug")                  # generator.safetensors, a run or a checkpoint folder
    clean = restorer.restore(Image.open("photo.jpg"))  # PIL in, PIL out (numpy uint8 in, numpy uint8 out)

Tiling and blending: restore/tiling.py. Files in and out (EXIF, alpha, grayscale, 16-bit and size checks):
restore/images.py. Folders and globs into an output folder: restore/files.py.

Quality and doing no harm: a JPEG's quality is read from its quantization tables (dist_dejpeg.jpeg.quality)
unless given; a quality-conditioned generator gets it (a blind one does not need it). The generator file
keeps the RGB PSNR gain its final validation measured at each quality; an image whose quality is above the
validated range, or where the gain interpolated between validated qualities is not positive, is passed
through unchanged (``guard``, on by default): restoration never returns what it predicts to be worse than
its input. An image of unknown quality (PNG input, tables that match no libjpeg quality) is restored blind,
and the result says that no prediction was possible.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dist_dejpeg.jpeg.quality import estimate_quality
from dist_dejpeg.models.generator_file import load_model
from dist_dejpeg.restore.images import join_image, split_image
from dist_dejpeg.restore.tiling import restore_tiled


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
        if not gain > 0:  # NaN (a run that diverged) is harm too: `nan <= 0` is False
            what = f"predicts {gain:+.2f} dB" if gain == gain else "measured no finite gain (NaN)"
            return Decision(quality, source, True, f"validation {what} at q{quality}: passed through unchanged")
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
        """N x 3 x H x W as ``decision`` says: passed through (a CPU float copy) or restored. A restored image
        with a NaN or an infinity (a broken model) is never returned: that image is passed through, and
        ``last_decision`` says so."""
        if decision.passthrough:
            return x.detach().float().cpu().clone()
        out = torch.stack([self._restore_one(im, decision.quality) for im in x])
        broken = ~torch.isfinite(out).flatten(1).all(dim=1)
        if broken.any():
            out[broken] = x.detach().float().cpu()[broken]
            self.last_decision = Decision(decision.quality, decision.source, True,
                                          f"the model restored {int(broken.sum())} of {len(out)} image(s) to "
                                          f"non-finite values (a broken model file?): passed through unchanged")
        return out

    def _restore_one(self, x: torch.Tensor, quality: int | None = None) -> torch.Tensor:
        """One 3 x H x W image: moved to the device once, cut, restored and blended there, returned on the CPU."""
        _, h, w = x.shape
        x = x.to(self.device, non_blocking=True)
        if not self.tile or (h <= self.tile and w <= self.tile):
            return self._forward(x[None], quality)[0].cpu()
        return restore_tiled(lambda batch: self._forward(batch, quality), x, self.tile, self.overlap,
                             self.batch_size).cpu()

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
        # np.array copies: arrays from PIL are read-only
        x = torch.from_numpy(np.array(rgb3, dtype=np.float32)).permute(2, 0, 1).div_(255)
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
