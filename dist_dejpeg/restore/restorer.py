"""Restoring images of any size with a trained generator: tiles with overlap, blended smoothly, in batches.

    from dist_dejpeg import Restorer
    restorer = Restorer("runs/debug")                  # generator.safetensors, a run or a checkpoint folder
    clean = restorer.restore(Image.open("photo.jpg"))  # PIL in, PIL out (numpy uint8 in, numpy uint8 out)

Tiling and blending: restore/tiling.py. Files in and out (EXIF, alpha, grayscale, 16-bit and size checks):
restore/images.py. Folders and globs into an output folder: restore/files.py.

Quality and doing no harm: a JPEG's quality is read from its quantization tables (dist_dejpeg.jpeg.quality)
unless given; a quality-conditioned generator gets it (a blind one does not need it). The generator file keeps
the RGB PSNR gain its final validation measured at each quality and its lower bound (mean - 2 SE); an image
whose quality is above the validated range, or where that lower bound is not above zero at a neighbouring
validated quality (below or above it; for another encoder's tables, read as an IJG-equivalent quality, at those
of the quality 9 higher too), is passed through unchanged (``guard``, on by default; restore/guard.py):
restoration never returns what it predicts to be worse than its input. An image whose quality is unknown
(jpeg.quality found no JPEG compression in its tables or its pixels) is passed through too, as no gain can be
predicted for it; ``guard=False`` restores it blind.
``last_decision.source`` says where the quality came from ("given", "file tables", "pixels", ...).

What every restorer shares (the guard, arrays and PIL images in and out, the finite check) is restore/base.py;
this module adds the PyTorch model, float tensors and torch's arrays for the tiling. ``Restorer("model.onnx")``
gives restore/onnx_backend.py's OnnxRestorer (onnxruntime, no torch needed: ``restore.open_restorer`` opens
either without importing torch for an ONNX file).

Speed (CPU, issue 22): a generator loaded from a file is made ready for inference once (spectral norms
computed into plain weights, channels_last); windows are batched into one reused buffer and blended band by
band (restore/tiling.py), so a uint8 image never exists as a whole-image float copy.

Speed (CUDA, issue 24): the uint8 image goes up once, through a pinned host buffer with a non-blocking copy;
windows are cut, converted, batched (channels_last) and blended on the GPU, and the uint8 output comes back the
same way, one copy. Batches always hold ``batch_size`` windows of ``tile`` px (tiling's ``full_batches``), so one
shape serves every image of at least a tile each way, and the generator's forward for a shape seen twice is
captured as a CUDA graph (``cuda_graphs``) and replayed: one launch instead of a thousand kernel launches from
Python, which bound the eager forward on an H200. A capture that fails (a module that syncs with the host) turns
graphs off for that Restorer, with a warning, and the forward runs eagerly, the calling thread back on the stream
it was on. At most ``MAX_GRAPHS`` shapes keep a graph (each holds its activations' memory); only full batches of
tiles are captured (tile 0, a whole image at once, would keep a 12 MP forward's memory per photo size). Each
Restorer captures on a stream of its own device (torch's shared capture stream belongs to the device of the first
capture in the process: a Restorer on cuda:1 would record an empty graph), one capture at a time in the process
(CAPTURING).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from dist_dejpeg.models.consistency import conform_image
from dist_dejpeg.models.generator_file import load_model, ready_for_inference
from dist_dejpeg.restore.base import ImageRestorer
from dist_dejpeg.restore.guard import Decision, predicted_gain  # noqa: F401 - their old home
from dist_dejpeg.restore.onnx_backend import OnnxRestorer, is_onnx
from dist_dejpeg.restore.tiling import Arrays

log = logging.getLogger(__name__)

MAX_GRAPHS = 4  # captured forward shapes kept per Restorer (the oldest goes first)
CAPTURING = threading.Lock()  # torch captures one graph at a time per process (Restorers in several threads)


def _device(device: str | torch.device) -> torch.device:
    """``device`` ("auto": CUDA where there is one), checked: a ValueError for a device this machine lacks."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):  # (torch's message lists every device type it knows of)
        raise ValueError(f"device {device!r}: not a device name; use cpu, cuda, cuda:N or auto") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ValueError(f"device {device}: this machine has {count or 'no'} CUDA device{'s' * (count != 1)} "
                         f"(torch {torch.__version__}); use cpu or auto")
    if device.type == "cuda" and device.index is None:  # the current one, now: streams and graphs name an index
        device = torch.device("cuda", torch.cuda.current_device())
    accelerator = getattr(torch, "accelerator", None)  # (torch 2.6 on) the one this torch build can use, if any
    if device.type not in ("cpu", "cuda") and not (accelerator and accelerator.is_available()
                                                   and accelerator.current_accelerator().type == device.type):
        # (else torch's own RuntimeError, AssertionError or ModuleNotFoundError at the first tensor; meta has no data)
        raise ValueError(f"device {device}: not a device this machine's torch {torch.__version__} can run on; "
                         f"use cpu, cuda or auto")
    return device


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX-512 BF16 or AMX tiles), as torch reads its flags; True where
    torch cannot say (nothing is warned of)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [check for check in checks if check is not None]
    return not checks or any(check() for check in checks)


def torch_arrays(device: torch.device, memory_format: torch.memory_format = torch.contiguous_format) -> Arrays:
    """restore_tiled's buffers as float32 tensors on ``device`` (the batch in ``memory_format``)."""
    return Arrays(zeros=lambda shape: torch.zeros(shape, device=device),
                  batch=lambda shape: torch.empty(shape, device=device, memory_format=memory_format),
                  weights=lambda array: torch.from_numpy(array).to(device), copy=torch.clone)


class Restorer(ImageRestorer):
    """A generator ready to restore images. ``model``: a path (generator file, run or checkpoint folder, or an
    exported ``.onnx`` file: then an OnnxRestorer, on onnxruntime) or a Generator module (moved to ``device`` and
    put in eval mode in place, not copied: give a Restorer on another device, or a module still training, a copy,
    ``copy.deepcopy(module)``). ``device``: "auto"
    (CUDA where there is one, else the CPU), "cpu", "cuda", "cuda:1" or a torch.device; a ValueError for one this
    machine lacks. ``tile``/``overlap`` in
    pixels (``tile`` 0: whole images, no tiling): the output depends on them, as the generator's group norm and
    keep_mean act per tile (a barely trained model, tile 128 overlap 32 against the whole image: 36% of pixels
    moved, by up to 4 levels); a fixed tile and overlap (and device and precision) give the same pixels, bit for bit,
    at the same ``batch_size`` and thread count on the same machine, and at another batch size or thread count all
    but a few, those a level off (oneDNN picks its kernels by them: float rounding, then the rounding to 8 bits; 0-2
    of a 240 x 200 photo's 144,000 values on a 2-core CPU), so record them with outputs you compare; ``batch_size``:
    tiles per forward pass (None: 1 on the CPU, where
    larger batches were slower and peaked higher (12 MP, 2 cores: 11.9 s and 1.13 GB at 1, 15.6 s and 1.55 GB at
    4: tensors over glibc's 32 MB mmap ceiling are page-faulted in afresh at every call), 8 on a GPU, every
    batch full there); ``precision``: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32" or "bf16";
    ``guard``: pass through images where the model's validation predicts no gain, and images of unknown
    quality; ``cuda_graphs``: replay the forward as a captured CUDA graph (None: on CUDA).

    ``restore(image, quality)`` takes a PIL image, a numpy array or a torch tensor and returns the same kind (an
    image file's path, bytes or binary file object: a PIL image); ``last_decision`` says what the guard did with the
    last one; ``info`` is the model file's metadata."""

    def __new__(cls, model=None, **kwargs):
        if is_onnx(model):  # one ONNX runtime path: the torch-free one
            return OnnxRestorer(model, **kwargs)
        return super().__new__(cls)

    def __init__(self, model, *, device: str | torch.device = "auto", tile: int = 512, overlap: int = 64,
                 batch_size: int | None = None, precision: str = "auto", guard: bool = True,
                 cuda_graphs: bool | None = None):
        self.device = _device(device)
        cuda = self.device.type == "cuda"
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        if not isinstance(model, (str, Path, torch.nn.Module)):
            raise TypeError(f"model: a path (generator file, run or checkpoint folder, .onnx export) or a torch "
                            f"module, not {type(model).__name__}")
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        if cuda_graphs and not cuda:
            raise ValueError(f"cuda_graphs needs a CUDA device, not {self.device}")
        if isinstance(model, (str, Path)):
            generator, info = load_model(model, self.device)
            # ours alone (a module the caller gives is left as it is): weights fixed, channels_last
            self.generator, self.memory_format = ready_for_inference(generator), torch.channels_last
        else:
            self.generator, info = model.to(self.device).eval(), {"source": type(model).__name__}
        if batch_size is None:
            batch_size = 8 if cuda else 1
        self.setup(info, tile=tile, overlap=overlap, batch_size=batch_size, guard=guard)
        self.bf16 = precision == "bf16" or (precision == "auto" and cuda)
        if self.bf16 and self.device.type == "cpu" and not cpu_computes_bf16():
            log.warning("bf16 on this CPU (no AVX-512 BF16 or AMX) is emulated: several times slower than fp32 "
                        "(10x on a 2-core EPYC); fp32 is the default on a CPU (--precision auto)")
        self.conditioned = bool(getattr(self.generator, "conditioned", False))
        self.arrays = torch_arrays(self.device, self.memory_format)
        self.full_batches = cuda
        self.cuda_graphs = cuda if cuda_graphs is None else cuda_graphs
        self.graphs: dict[tuple, tuple] = {}  # (shape, strides) -> (input, quality, graph, output), oldest first
        self.capture_stream = None  # the stream graphs are captured on, on self.device (made at the first capture)
        self.seen: set[tuple] = set()  # the shapes run once (eagerly)
        self.pinned: dict[str, torch.Tensor] = {}  # "in"/"out" -> pinned uint8 host buffer, grown as needed

    # help() and IDEs read a class's signature from __new__, whose **kwargs would hide __init__'s arguments
    __new__.__signature__ = inspect.signature(__init__)

    # -- what ImageRestorer asks of a backend ----------------------------------------------------------------
    def forward(self, batch: torch.Tensor, quality: int | None = None) -> torch.Tensor:
        if self.cuda_graphs and (out := self.replay(batch, quality)) is not None:
            return out
        q = torch.full((batch.shape[0],), float(quality or 0), device=batch.device) if self.conditioned else None
        return self.run(batch, q)

    def run(self, batch: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        """The generator's output (float32) for ``batch`` and the qualities ``q`` (a conditioned one's). The
        autocast keeps no cache of cast weights: each is used once per forward, and a captured graph needs none."""
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False) if self.bf16
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            return (self.generator(batch, q) if self.conditioned else self.generator(batch)).float()

    def replay(self, batch: torch.Tensor, quality: int | None) -> torch.Tensor | None:
        """``forward`` through the CUDA graph of ``batch``'s shape, captured at the shape's second call (full
        batches of tiles only); None at its first (run it eagerly), for a whole image (tile 0) or one window alone
        (an image within one tile: evaluate's photos of many sizes would each be captured, then evicted), or
        where capture failed. The output is the graph's own tensor, valid until
        the next call."""
        key = (tuple(batch.shape), batch.stride())
        entry = self.graphs.get(key)
        if entry is None and key in self.seen and self.tile and batch.shape[0] == self.batch_size:
            entry = self.capture(batch, key)
        if entry is None:
            self.seen.add(key)
            return None
        static_in, static_q, graph, static_out = entry
        static_in.copy_(batch)
        static_q.fill_(float(quality or 0))
        graph.replay()
        return static_out

    def capture(self, batch: torch.Tensor, key: tuple) -> tuple | None:
        """The forward for ``batch``'s shape (``key``) captured as a CUDA graph (after a warm-up on a side stream, as
        torch.cuda.graphs asks): (input, quality, graph, output); None, and graphs off, where capture fails."""
        static_in, static_q = batch.clone(), torch.zeros(batch.shape[0], device=batch.device)
        graph = torch.cuda.CUDAGraph()
        main = torch.cuda.current_stream(self.device)
        try:
            # the graph's device (cuda:1), not the current one; the outer stream context puts this thread back on
            # ``main`` even where the capture's own exit fails before restoring it (torch.cuda.graph's __exit__)
            with CAPTURING, torch.cuda.device(self.device), torch.cuda.stream(main):
                if self.capture_stream is None:
                    self.capture_stream = torch.cuda.Stream(self.device)
                side = torch.cuda.Stream(self.device)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    self.run(static_in, static_q)
                main.wait_stream(side)
                # thread_local: CUDA calls of other threads (an application's) do not break this capture
                with torch.cuda.graph(graph, stream=self.capture_stream, capture_error_mode="thread_local"):
                    static_out = self.run(static_in, static_q)
        except RuntimeError as err:
            log.warning("restore: capturing the generator as a CUDA graph failed (%s): running it eagerly",
                        str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            self.cuda_graphs = False
            return None
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        self.graphs[key] = entry = (static_in, static_q, graph, static_out)
        return entry

    def chw(self, hwc: np.ndarray) -> torch.Tensor:
        # arrays from PIL are read-only, which torch.from_numpy warns about, and a reversed view (BGR from
        # OpenCV: [..., ::-1]) has negative strides, which it refuses: those are copied (as uint8)
        usable = hwc.flags.writeable and min(hwc.strides) >= 0
        return torch.from_numpy(hwc if usable else hwc.copy()).permute(2, 0, 1)

    def inference(self):
        return torch.inference_mode()  # no version counters: the outputs are weighted and written in place

    @staticmethod
    def finite(rows: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(rows).all()  # a device flag: no wait for the GPU at each band

    @staticmethod
    def all_finite(flags: list) -> bool:
        return bool(torch.stack(flags).all()) if flags else True

    @staticmethod
    def to_uint8(rows: torch.Tensor, out: torch.Tensor) -> None:
        out[...] = rows.mul_(255).round_().clamp_(0, 255).to(device=out.device, dtype=torch.uint8)

    def restore_rgb(self, rgb: np.ndarray, quality: int | None) -> np.ndarray | None:
        """ImageRestorer.restore_rgb; on CUDA the uint8 pixels go up and the output comes down whole, each
        through a pinned host buffer with a non-blocking copy, and the image is cut, blended and converted on
        the GPU."""
        if self.device.type != "cuda":
            return super().restore_rgb(rgb, quality)
        # the buffers are free: the previous call waited for its last copy (same stream) before it returned
        staged = self.host_buffer("in", rgb.shape)
        np.copyto(staged.numpy(), rgb)
        image = staged.to(self.device, non_blocking=True)
        out = torch.empty(rgb.shape, dtype=torch.uint8, device=self.device)
        out_chw = out.permute(2, 0, 1)

        def write(y0: int, y1: int, rows: torch.Tensor) -> None:
            self.to_uint8(rows, out_chw[:, y0:y1])

        if not self.restore_tiled(image.permute(2, 0, 1), quality, write):
            return None
        back = self.host_buffer("out", rgb.shape)
        back.copy_(out, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return back.numpy().copy()  # the pinned buffer is the next call's

    def conform(self, rgb: np.ndarray, cells, orientation: int = 1, half_width: float = 0.5) -> np.ndarray:
        """ImageRestorer.conform; on CUDA on the GPU (models/consistency.py), not on a CPU core at ~0.7 s a round
        per 12 MP photo (a saturated graphic: up to ROUNDS of them) that would pace restore's encode threads (bench
        infer's GPU rows time both). One at a time, and never while a graph is being captured (an allocation in
        another thread would break the capture)."""
        if self.device.type != "cuda":
            return super().conform(rgb, cells, orientation, half_width)
        with CAPTURING, torch.cuda.device(self.device):
            return conform_image(rgb, cells, orientation, half_width, self.device)

    def host_buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A pinned uint8 host tensor of ``shape``: the start of the buffer ``name``, grown when too small."""
        size = int(np.prod(shape))
        buf = self.pinned.get(name)
        if buf is None or buf.numel() < size:
            buf = self.pinned[name] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return buf[:size].view(shape)

    # -- tensors ---------------------------------------------------------------------------------------------
    def tensor_io(self, x: torch.Tensor):
        """restore_tensor's images each moved to the restorer's device as the loop reaches it (one upload per
        image, a no-op where it is there already: a GPU tensor never visits the host), the output on ``x``'s, in
        its dtype (float16: each band cast as it is written, no float32 copy of the batch)."""
        images = (im.to(self.device, non_blocking=True) for im in x)
        return images, x, torch.empty_like(x, memory_format=torch.contiguous_format), lambda out: out
