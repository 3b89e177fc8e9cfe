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
through unchanged (``guard``, on by default; restore/guard.py): restoration never returns what it predicts to be worse than
its input. An image whose quality is unknown (jpeg.quality found no JPEG compression in its tables or its
pixels) is passed through too, as no gain can be predicted for it; ``guard=False`` restores it blind.
``last_decision.source`` says where the quality came from ("given", "file tables", "pixels", ...).

What every restorer shares (the guard, arrays and PIL images in and out, the finite check) is restore/base.py;
this module adds the PyTorch model, float tensors and torch's arrays for the tiling. ``Restorer("model.onnx")``
gives restore/onnx_backend.py's OnnxRestorer (onnxruntime, no torch needed: ``restore.open_restorer`` opens
either without importing torch for an ONNX file).

Speed (CPU, issue 22): a generator loaded from a file is made ready for inference once (spectral norms
computed into plain weights, channels_last); windows are batched into one reused buffer and blended band by
band (restore/tiling.py), so a uint8 image never exists as a whole-image float copy.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from dist_dejpeg.models.generator_file import load_model, ready_for_inference
from dist_dejpeg.restore.base import ImageRestorer
from dist_dejpeg.restore.guard import Decision, predicted_gain  # noqa: F401 - their old home
from dist_dejpeg.restore.onnx_backend import OnnxRestorer, is_onnx
from dist_dejpeg.restore.tiling import Arrays


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def torch_arrays(device: torch.device, memory_format: torch.memory_format = torch.contiguous_format) -> Arrays:
    """restore_tiled's buffers as float32 tensors on ``device`` (the batch in ``memory_format``)."""
    return Arrays(zeros=lambda shape: torch.zeros(shape, device=device),
                  batch=lambda shape: torch.empty(shape, device=device, memory_format=memory_format),
                  weights=lambda array: torch.from_numpy(array).to(device), copy=torch.clone)


class Restorer(ImageRestorer):
    """A generator ready to restore images. ``model``: a path (generator file, run or checkpoint folder, or an
    exported ``.onnx`` file: then an OnnxRestorer, on onnxruntime) or a Generator module. ``tile``/``overlap`` in
    pixels (``tile`` 0: whole images, no tiling); ``batch_size``: tiles per forward pass (None: 1 on the CPU, where
    larger batches were slower and peaked higher (12 MP, 2 cores: 11.9 s and 1.13 GB at 1, 15.6 s and 1.55 GB at
    4: tensors over glibc's 32 MB mmap ceiling are page-faulted in afresh at every call), 4 on a GPU);
    ``precision``: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32" or "bf16"; ``guard``: pass through
    images where the model's validation predicts no gain, and images of unknown quality."""

    def __new__(cls, model=None, **kwargs):
        if is_onnx(model):  # one ONNX runtime path: the torch-free one
            return OnnxRestorer(model, **kwargs)
        return super().__new__(cls)

    def __init__(self, model, *, device: str | torch.device = "auto", tile: int = 512, overlap: int = 64,
                 batch_size: int | None = None, precision: str = "auto", guard: bool = True):
        self.device = _device(device)
        self.memory_format = torch.contiguous_format
        if isinstance(model, (str, Path)):
            generator, info = load_model(model, self.device)
            # ours alone (a module the caller gives is left as it is): weights fixed, channels_last
            self.generator, self.memory_format = ready_for_inference(generator), torch.channels_last
        else:
            self.generator, info = model.to(self.device).eval(), {"source": type(model).__name__}
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        if batch_size is None:
            batch_size = 1 if self.device.type == "cpu" else 4
        self.setup(info, tile=tile, overlap=overlap, batch_size=batch_size, guard=guard)
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.conditioned = bool(getattr(self.generator, "conditioned", False))
        self.arrays = torch_arrays(self.device, self.memory_format)

    # -- what ImageRestorer asks of a backend ----------------------------------------------------------------
    def forward(self, batch: torch.Tensor, quality: int | None = None) -> torch.Tensor:
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            if not self.conditioned:  # any module that maps images to images
                return self.generator(batch).float()
            q = torch.full((batch.shape[0],), float(quality or 0), device=batch.device)
            return self.generator(batch, q).float()

    def chw(self, hwc: np.ndarray) -> torch.Tensor:
        # arrays from PIL are read-only, which torch.from_numpy warns about: those are copied (as uint8)
        return torch.from_numpy(hwc if hwc.flags.writeable else hwc.copy()).permute(2, 0, 1)

    def inference(self):
        return torch.inference_mode()  # no version counters: the outputs are weighted and written in place

    @staticmethod
    def all_finite(rows: torch.Tensor) -> bool:
        return bool(torch.isfinite(rows).all())

    @staticmethod
    def to_uint8(rows: torch.Tensor, out: torch.Tensor) -> None:
        out[...] = rows.mul_(255).round_().clamp_(0, 255).to(device=out.device, dtype=torch.uint8)

    # -- tensors ---------------------------------------------------------------------------------------------
    def restore_tensor(self, image: torch.Tensor, quality: int | None = None, source: str = "given") -> torch.Tensor:
        """3 x H x W (or N x 3 x H x W) float in [0, 1] -> the same shape, restored, on the CPU. ``quality``: the
        images' JPEG quality (None: unknown); passed through unchanged where ``decide`` says so. A restored
        image with a NaN or an infinity (a broken model) is never returned: that image is passed through, and
        ``last_decision`` says so."""
        squeeze = image.dim() == 3
        x = image.unsqueeze(0) if squeeze else image
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected 3 x H x W or N x 3 x H x W, got {tuple(image.shape)}")
        decision = self.last_decision = self.decide(quality, source)
        x = x.detach().float().cpu()
        if decision.passthrough:
            x = x.clone()
            return x[0] if squeeze else x
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        broken = 0
        for im, dst in zip(x, out):
            def write(y0, y1, rows, dst=dst):
                dst[:, y0:y1] = rows

            if not self.restore_tiled(im, decision.quality, write):
                dst.copy_(im)
                broken += 1
        if broken:
            self.broken(decision, broken, len(out))
        return out[0] if squeeze else out

    def restore(self, image, quality: int | None = None):
        """ImageRestorer.restore (PIL images, uint8 arrays), and a float tensor through restore_tensor."""
        if isinstance(image, torch.Tensor):
            return self.restore_tensor(image, quality)
        return super().restore(image, quality)
