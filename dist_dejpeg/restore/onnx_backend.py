"""An exported generator (``dist-dejpeg export``) run on onnxruntime, without torch: the same tiling, blending,
batching and do-no-harm guard as the PyTorch Restorer (restore/base.py, restore/tiling.py), on numpy arrays.

    dist-dejpeg restore --model dejpeg.onnx photos/ -o restored/    # imports neither torch nor timm

    from dist_dejpeg.restore import open_restorer
    restorer = open_restorer("dejpeg.onnx")             # an OnnxRestorer (Restorer("dejpeg.onnx") gives one too)
    clean = restorer.restore_array(rgb, quality=20)    # H x W x 3 uint8 -> the same

Why: ``import torch, timm`` alone takes ~5 s and ~650 MB on a 2-core CPU, longer than restoring a 512 px photo;
``import onnxruntime`` takes 0.2 s. Why through the tiles and not a whole image at a time: the generator's
receptive field is large, so a tiled restore differs from a whole-image one by up to ~13 levels at the tile
seams; on the same tiles with the same blend, onnxruntime and PyTorch agree to a level or so
(tests/test_onnx.py). The guard reads the validated gains the export wrote into the file's metadata
(``val_psnr_gain``). Needs onnxruntime only (``pip install -e '.[onnx]'``); the CUDA provider is used when the
device is "cuda" (or "auto") and this onnxruntime has it.

Session options: intra-op threads = the cores this process may use, sequential execution (one convolution
after another, each over all cores; the graph has no parallel branches worth a second pool), every graph
optimization, onnxruntime's memory arena and pattern planning (all windows of an image have one shape, so the
buffers of the first call are reused by the next).
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from dist_dejpeg.models.names import (INPUT, ONNX_FORMAT, OUTPUT, QUALITY, TRAIN_SHARDS, TRAIN_SOURCES,
                                      ModelFileError, OnnxUnavailable, file_gains, file_train_shards,
                                      file_train_sources, require_onnx)
from dist_dejpeg.restore.base import ImageRestorer, check_tiling
from dist_dejpeg.restore.images import InputImageError

# The export's self-attention holds its whole score matrix (L x L floats, L = the positions at its stride; PyTorch
# runs a blocked kernel instead): a whole 1024 x 1024 image peaked at 2.5 GB, a 2040 x 1356 one ran a 24 GB machine
# out of memory. A window whose matrix would exceed this is refused with the largest tile (or batch) that fits
# (512 px at stride 8: 64 MB). The stride is where the export's attention sits (its metadata ``attention_at``).
MAX_SCORES_BYTES = 1 << 30


def is_onnx(model) -> bool:
    """``model`` names an exported ONNX file (a path ending in .onnx), which OnnxRestorer runs."""
    return isinstance(model, (str, os.PathLike)) and str(model).lower().endswith(".onnx")


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def providers(device: str) -> list:
    """onnxruntime providers for ``device`` ("cpu", "cuda[:N]" or "auto"): CUDA first when asked for (or "auto")
    and this onnxruntime has it; a "cuda" device without it is a ModelFileError saying so."""
    import onnxruntime as ort

    device = str(device)
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", device):
        raise ValueError(f"device must be cpu, cuda[:N] or auto for an ONNX model, got {device!r}")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device.startswith("cuda") and not has_cuda:
        raise ModelFileError(f"--device {device}: this onnxruntime has no CUDA provider (install onnxruntime-gpu, "
                             f"or restore on the CPU)")
    if device.startswith("cuda") or (device == "auto" and has_cuda):
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


MAX_STRIDE = 64  # the largest stride an export's metadata may say (its encoder's deepest: 32)


def onnx_info(path, meta: dict[str, str], session) -> dict:
    """What ``load_model`` tells about a generator, read from the export's metadata: source, format, encoder,
    encoder_init, global_step, lpips, val_psnr_gain and val_psnr_gain_low ({quality: dB}), model (the config
    dict), provider, pad_to."""
    def parsed(key, default):
        try:
            return json.loads(meta[key])
        except (KeyError, ValueError):
            return default

    model = parsed("model", {})
    step = parsed("global_step", None)
    pad_to = _stride(path, "pad_to", meta.get("pad_to") or "32", minimum=1)
    return {"source": str(path), "format": "onnx", "exported_from": meta.get("source", ""),
            "global_step": step if isinstance(step, int) else None, "lpips": meta.get("lpips", ""),
            "code": meta.get("code", ""),
            **file_gains(meta, str(path)), TRAIN_SHARDS: file_train_shards(meta, str(path)),
            TRAIN_SOURCES: file_train_sources(meta, str(path)),
            "encoder": meta.get("encoder", model.get("encoder", "")),
            "encoder_init": meta.get("encoder_init") or ("ImageNet" if model.get("pretrained") else "random init"),
            "model": model, "provider": session.get_providers()[0], "pad_to": pad_to,
            "attention_at": attention_at(meta, model, pad_to, path)}


def _stride(path, key: str, raw, minimum: int = 0) -> int:
    """The metadata ``key``'s stride: a power of two up to MAX_STRIDE (0 where ``minimum`` is 0: none); any other
    value a ModelFileError naming the file and key (pad_to 100000 would pad each window to 100000 px: 112 GiB)."""
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        value = raw
    if value is None and not minimum:
        return 0
    if type(value) is not int or not minimum <= value <= MAX_STRIDE or value & (value - 1):
        raise ModelFileError(f"{path}: its metadata's {key} is {raw!r}, not a power of two from {minimum} to "
                             f"{MAX_STRIDE} as an export writes (a damaged or hand-made file?)")
    return value


def attention_at(meta: dict[str, str], model: dict, pad_to: int, path="the ONNX file") -> int:
    """The stride the export's self-attention runs at (0: none): its metadata ``attention_at``. An export from
    before it has the config's ``attention_stride`` only, which the U-Net takes to the nearest of its encoder's
    skip strides: those are taken as 2, 4, ... below ``pad_to`` (the encoder's largest stride; an encoder whose
    first stage is at 4 is taken as finer than it is, which over-estimates the matrix: refuses more, never less)."""
    if "attention_at" in meta:
        return _stride(path, "attention_at", meta["attention_at"])
    if not model.get("self_attention", True):
        return 0
    asked = max(int(model.get("attention_stride", 8)), 1)
    skips = [1 << i for i in range(1, max(pad_to.bit_length() - 1, 2))]
    return min(skips, key=lambda s: abs(math.log2(s) - math.log2(asked)))


def score_bytes(n: int, h: int, w: int, stride: int) -> int:
    """Bytes of the float32 score matrix a batch of ``n`` h x w windows holds in the export's attention at ``stride``
    (L x L per window, L: its positions at that stride)."""
    return n * (-(-h // stride) * -(-w // stride)) ** 2 * 4


def _size(nbytes: int) -> str:
    return f"{nbytes / 2 ** 30:.1f} GB" if nbytes >= 2 ** 30 / 10 else f"{nbytes / 2 ** 20:.0f} MB"


def largest_tile(stride: int, batch: int) -> int | None:
    """The largest tile (a multiple of 32, at least 64: check_tiling's) whose ``batch`` windows fit
    MAX_SCORES_BYTES at ``stride``; None where not even a 64 px one does."""
    tile = None
    for t in range(64, 16385, 32):
        if score_bytes(batch, t, t, stride) > MAX_SCORES_BYTES:
            break
        tile = t
    return tile


def open_session(path, device: str = "cpu", threads: int | None = None):
    """(onnxruntime session, info as :func:`onnx_info`) for the export at ``path``. A file that is missing, not
    ONNX or not a dist_dejpeg export, or an onnxruntime that is not installed, is a ModelFileError saying which
    (and, for onnxruntime, how to install it)."""
    try:
        require_onnx(("onnxruntime",), "restoring with an ONNX model")
    except OnnxUnavailable as err:
        raise ModelFileError(str(err)) from None
    if not os.path.isfile(path):  # said as a missing generator file is, not in onnxruntime's words
        raise ModelFileError(f"{path}: no such file")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cores()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: not a warning per unused initializer
    chosen = providers(device)
    try:
        session = ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for missing or bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(f"{path}: onnxruntime cannot load it ({first})") from None
    if str(device).startswith("cuda") and "CUDAExecutionProvider" not in session.get_providers():
        # onnxruntime-gpu whose CUDA provider failed to start (its CUDA or cuDNN libraries, no such GPU) falls back
        # to the CPU on its own: a restore asked to run on CUDA would run there, minutes per photo, saying "cpu"
        raise ModelFileError(f"--device {device}: onnxruntime could not start its CUDA provider (its CUDA and cuDNN "
                             f"libraries missing or of another version, or no such GPU); restore with "
                             f"--device cpu")
    meta = dict(session.get_modelmeta().custom_metadata_map)
    names = {i.name for i in session.get_inputs()}
    if meta.get("format") != ONNX_FORMAT or INPUT not in names:
        raise ModelFileError(f"{path}: not a dist_dejpeg export (format {meta.get('format')!r}, inputs "
                             f"{sorted(names)}); write one with dist-dejpeg export")
    return session, onnx_info(path, meta, session)


class OnnxRestorer(ImageRestorer):
    """An exported generator on onnxruntime with the Restorer's surface: restore_array, restore (PIL images,
    arrays and tensors), restore_tensor (through numpy on the host), decide, last_decision, info, gains, guard, tile, overlap, batch_size, conditioned, and ``device``
    ("cpu (onnxruntime)"). ``batch_size`` None: 1 on the CPU (as PyTorch's; bench infer), 4 on CUDA;
    ``precision``: the export is float32 ("auto" or "fp32"; "bf16" is for PyTorch models); ``cuda_graphs``:
    Restorer's, None or False here; ``threads``: intra-op threads (None: the cores this process may use)."""

    def __init__(self, model, *, device: str = "auto", tile: int = 512, overlap: int = 64,
                 batch_size: int | None = None, precision: str = "auto", guard: bool = True,
                 cuda_graphs: bool | None = None, threads: int | None = None):
        if precision not in ("auto", "fp32"):
            raise ValueError(f"an ONNX model runs in float32: precision must be auto or fp32, got {precision!r} "
                             f"(bf16 is for PyTorch models)")
        if cuda_graphs not in (None, False):  # (Restorer's keyword: Restorer("x.onnx", ...) gives one of these)
            raise ValueError(f"cuda_graphs={cuda_graphs!r}: CUDA graphs are PyTorch's; an ONNX model runs on "
                             f"onnxruntime (leave it None)")
        check_tiling(tile, overlap, 1 if batch_size is None else batch_size)  # (before the session: 0 is no 1)
        self.session, info = open_session(model, device, threads)
        self.conditioned = QUALITY in {i.name for i in self.session.get_inputs()}
        self.pad_to = info["pad_to"]
        model_cfg = info["model"] or {}
        self.keep_mean = bool(model_cfg.get("keep_mean", False))
        self.attention_stride = info["attention_at"]  # where the attention sits (0: none), not the config's ask
        cuda = info["provider"] == "CUDAExecutionProvider"
        self.device = f"{'cuda' if cuda else 'cpu'} (onnxruntime)"
        batch_size = (4 if cuda else 1) if batch_size is None else batch_size
        self.setup(info, tile=tile, overlap=overlap, batch_size=batch_size, guard=guard)

    def forward(self, batch: np.ndarray, quality: int | None = None) -> np.ndarray:
        """N x 3 x h x w float32 in [0, 1] -> the same, restored. The graph pads to its stride with reflect, as
        Generator.correction does wherever the pad is below the size (the graph matches it there, under 32 px too);
        where it is not (a side of a few pixels) the generator replicates, so the batch is padded so here (edge)
        and cropped back; a keep_mean model then centred its correction over the padding too: it is centred again
        over the image (exact where no restored value was clipped to 0 or 1, which the shift is measured
        without)."""
        h, w = batch.shape[-2:]
        if self.attention_stride and score_bytes(len(batch), h, w, self.attention_stride) > MAX_SCORES_BYTES:
            raise InputImageError(self.too_large(len(batch), h, w))  # (an input restore cannot take)
        x = batch
        ph, pw = (-h) % self.pad_to, (-w) % self.pad_to
        if ph >= h or pw >= w:
            x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")
        feeds = {INPUT: np.ascontiguousarray(x, dtype=np.float32)}
        if self.conditioned:
            feeds[QUALITY] = np.full(x.shape[0], float(quality or 0), np.float32)
        (out,) = self.session.run([OUTPUT], feeds)
        out = out[..., :h, :w]
        if self.keep_mean and x is not batch:
            inside = (out > 0) & (out < 1)
            shift = np.where(inside, out - batch, 0).sum((-2, -1), keepdims=True) / np.maximum(
                inside.sum((-2, -1), keepdims=True), 1)
            out = np.clip(out - shift, 0.0, 1.0)
        return out

    def too_large(self, n: int, h: int, w: int) -> str:
        """What to do about a batch of ``n`` h x w windows whose score matrix exceeds MAX_SCORES_BYTES: the largest
        batch size or tile that fits (computed, at this stride and batch), or the PyTorch model where none does;
        named as the caller gives them (cli_options: --tile N, else the API's tile=N)."""
        stride = self.attention_stride
        what = f"{n} windows of {w} x {h}" if n > 1 else f"a {w} x {h} window"
        said = (f"{what} is too large for the ONNX model: its self-attention (at stride {stride}) would hold a "
                f"{_size(score_bytes(n, h, w, stride))} score matrix, over its {_size(MAX_SCORES_BYTES)} limit; ")
        cli = getattr(self, "cli_options", False)

        def options(**given) -> str:
            return (" " if cli else ", ").join(f"--{k.replace('_', '-')} {v}" if cli else f"{k}={v}"
                                               for k, v in given.items())

        batch = getattr(self, "batch_size", 1) or 1
        tile, overlap = largest_tile(stride, batch), getattr(self, "overlap", 0)
        if n > 1 and score_bytes(1, h, w, stride) <= MAX_SCORES_BYTES:
            fits = MAX_SCORES_BYTES // score_bytes(1, h, w, stride)
            return said + f"restore with {options(batch_size=fits)}" + (f" (or {options(tile=tile)})" if tile else "")
        more = {}
        if tile is None and batch > 1:
            tile, more = largest_tile(stride, 1), {"batch_size": 1}
        if tile is None:
            return said + (f"no tile size fits (a 64 px tile: {_size(score_bytes(1, 64, 64, stride))}): "
                           f"restore with the PyTorch model (its generator.safetensors or run folder), whose "
                           f"attention runs a blocked kernel")
        more = ({"overlap": tile // 4} if overlap >= tile // 2 else {}) | more
        return said + f"restore in tiles of at most {tile} px ({options(tile=tile, **more)})"
