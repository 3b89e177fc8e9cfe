"""The trained generator as an ONNX model (dynamic batch, height and width), checked in onnxruntime.

    dist-dejpeg export --model runs/debug --onnx dejpeg.onnx [--opset 20] [--check-image photo.png]

    from dist_dejpeg.models.onnx_export import export_model, export_onnx
    result, info = export_model("runs/debug", "dejpeg.onnx")   # from a generator file, a run or checkpoint folder
    generator, info = load_model("runs/debug")  # (dist_dejpeg.models.generator_file) or your own, with its info
    result = export_onnx(generator, "dejpeg.onnx", model_cfg=info["model"], source=info["source"], info=info)
    result["max_abs_diff"]   # {"1x3x200x152": 1.2e-07, "2x3x96x160": 1.8e-07, ...}: onnxruntime vs PyTorch

The ONNX model: input ``degraded`` (float32 RGB N x 3 x H x W in [0, 1]; tiles of <= 512 px), output ``restored`` (same shape, in
[0, 1]); dims named batch, height, width. A quality-conditioned generator has a second input ``quality``
(float32 N: each image's JPEG quality 1..100, 0 for unknown). The metadata holds the model config and the
validated RGB PSNR gain per quality (``val_psnr_gain``) and its lower bound (``val_psnr_gain_low``), from which a
runtime can pass through images of a quality the model does not improve, as ``restore`` does. H and W above 16:
the graph pads with reflect, which needs the pad (up to 31) below the size; PyTorch replicates instead for such
tiny images, onnxruntime rejects them ("Pad reflect: post-pad exceeds maximum allowed"). Needs
``pip install -e '.[onnx]'``.

What the guard needs is in the file's metadata_props, each a string: ``val_psnr_gain``, ``val_psnr_gain_low``,
``val_jpeg_psnr``, ``val_psnr_gain_conformed`` and ``val_psnr_gain_conformed_low`` (strict JSON ``{quality: dB}``, a
value that is not finite as "NaN"/"Infinity") and
``cell_half_width`` (JSON ``{quality: half-width}``), ``conditioned`` ("true"/"false"), ``encoder``, ``encoder_init``,
``global_step``, ``lpips``, ``pad_to``, ``attention_at`` (JSON: the stride the self-attention sits at, the skip
stride nearest the config's ``attention_stride``; null without one), ``model`` (the config as JSON), ``source``,
``train_shards`` (JSON ``{shard file name (its path in data.root where two share one): size and hash of its start}``: what evaluate calls seen in training) and,
exported from a checkpoint, ``train_shards_from`` (the folder they were read from, or "none: ..." and why);
:func:`read_onnx_metadata` reads them back. ``dist-dejpeg restore --model dejpeg.onnx`` runs the file on
onnxruntime with the same tiling, blending and guard as the PyTorch model (restore/onnx_backend.py, without importing
torch): a tiled restore is what matches, not one forward pass over the whole image.

How: torch.onnx's dynamo exporter (``torch.export``): the TorchScript exporter traces the generator's
pad-to-a-multiple-of-32 amounts as constants, so its graph only fits the example size. ``Generator.correction``
branches on the padding (``if ph or pw``), which torch.export would settle once for the example's size; the
exported module therefore pads to the multiple of 32 itself (reflect, what ``correction`` does for H, W >= 32)
and crops back, so that the generator inside always sees padded sizes and its own branch is the same for
every size. Same values as ``Generator.forward`` (``correction`` of a padded input pads nothing and its crop is
the outer one). Spectral norm is folded into plain weights first (eval-mode spectral norm divides by
sigma from the stored u/v vectors: the same weight at every call). Each export is checked in onnxruntime at
three sizes against the PyTorch generator before the file is written (atomically).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from dist_dejpeg.models.generator_file import TRAIN_SHARDS_FROM, ModelFileError, load_model, non_finite
# the names and errors a runtime needs without torch (re-exported here under their old home)
from dist_dejpeg.models.names import (CONFORMED_KEYS, INPUT, JPEG_PSNR, MIN_SIZE, ONNX_FORMAT, OUTPUT, QUALITY,  # noqa: F401
                                      TRAIN_SHARDS, TRAIN_SOURCES, OnnxUnavailable, file_gains, require_onnx,
                                      table_json)
from dist_dejpeg.run.files import atomic_write_bytes, prove_writable

# (batch, height, width) of the onnxruntime check: one size not a multiple of 32, a batch of 2, and one under the
# exported range that restore's ONNX backend gives the graph as it is (its reflect pad fits: restore/onnx_backend.py)
CHECK_SIZES = ((1, 200, 152), (2, 96, 160), (1, 20, 27))
# float32 on [0, 1]: 1e-4 is 1/39 of an 8-bit step (1/255); the two runtimes differ only in summation order
TOLERANCE = 1e-4


class CheckImageError(ValueError):
    """``--check-image`` names a file that is not an image Pillow reads."""


class OnnxCheckError(RuntimeError):
    """onnxruntime's output differs from PyTorch's by more than the tolerance (the file is not written)."""


def fold_spectral_norm(generator: nn.Module) -> nn.Module:
    """An eval-mode copy of ``generator`` whose spectral-norm weights are plain parameters (same values as
    eval-mode spectral norm: weight / sigma from the stored u, v). ``generator`` itself is left as it was.

    Not ``parametrize.remove_parametrizations`` on the copy: a deep copy shares the original's injected
    ``Parametrized*`` class, and removing the parametrization deletes the property from that shared class
    (the original would lose its ``weight``)."""
    folded = copy.deepcopy(generator).eval()
    with torch.no_grad():
        for module in list(folded.modules()):
            if parametrize.is_parametrized(module):
                values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
                del module._modules["parametrizations"]
                module.__class__ = module.__class__.__bases__[0]  # the class parametrize subclassed
                for name, value in values.items():
                    module.register_parameter(name, nn.Parameter(value, requires_grad=False))
            for key, hook in list(module._forward_pre_hooks.items()):  # torch.nn.utils.spectral_norm (old API)
                if type(hook).__name__ == "SpectralNorm":
                    torch.nn.utils.remove_spectral_norm(module, hook.name)
    return folded


class PaddedGenerator(nn.Module):
    """What gets exported: pad to the generator's largest stride (reflect), run it, crop back (the generator's own
    padding is a branch on the input's size, which an export with dynamic sizes cannot hold). The correction is
    cropped before keep_mean centres it, as the generator does: its mean over the padding would shift the colours."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator
        self.pad_to = generator.pad_to

    def forward(self, degraded: torch.Tensor, quality: torch.Tensor | None = None) -> torch.Tensor:
        h, w = degraded.shape[-2:]
        padded = F.pad(degraded, (0, (-w) % self.pad_to, 0, (-h) % self.pad_to), mode="reflect")
        return (degraded + self.generator.correction(padded, quality, size=(h, w))).clamp(0.0, 1.0)


def load_check_image(check_image=None) -> np.ndarray:
    """H x W x 3 uint8: a path (any format Pillow reads), an array, or None (skimage's astronaut photo)."""
    if check_image is None:
        import skimage.data

        return np.ascontiguousarray(skimage.data.astronaut()[..., :3])
    if isinstance(check_image, np.ndarray):
        image = check_image
    else:
        from PIL import Image

        with Image.open(check_image) as img:
            image = np.asarray(img.convert("RGB"))
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def check_batch(image: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """n float32 crops (N x 3 x h x w in [0, 1]) at different offsets; a small image is tiled up first."""
    if image.shape[0] < h + 8 * n or image.shape[1] < w + 8 * n:
        reps = (-(-(h + 8 * n) // image.shape[0]), -(-(w + 8 * n) // image.shape[1]), 1)
        image = np.tile(image, reps)
    tops = np.linspace(0, image.shape[0] - h, n).astype(int) if n > 1 else [(image.shape[0] - h) // 2]
    lefts = np.linspace(0, image.shape[1] - w, n).astype(int) if n > 1 else [(image.shape[1] - w) // 2]
    crops = [image[t:t + h, l:l + w] for t, l in zip(tops, lefts)]
    return (np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / 255.0).copy()


def _cfg_dict(model_cfg) -> dict:
    if model_cfg is None:
        return {}
    return dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(model_cfg)


def export_onnx(generator: nn.Module, path: str | Path, *, opset: int | None = None, check_image=None,
                model_cfg=None, source: str = "", check_sizes=CHECK_SIZES, tolerance: float = TOLERANCE,
                log=print, val_psnr_gain: dict | None = None, info: dict | None = None) -> dict:
    """Export ``generator`` to ``path`` (atomically, after the onnxruntime check passed).

    ``model_cfg`` (a ModelConfig or its dict), ``source``, ``val_psnr_gain`` (None: info's) and, from ``info``
    (load_model's), the other gain tables, encoder_init, global_step and lpips go into the ONNX metadata_props with
    the format version, the encoder, ``conditioned`` and ``pad_to`` (see the module docstring). Returns ``{"path", "opset",
    "max_abs_diff": {"NxCxHxW": float}, "tolerance", "export_s", "bytes", "metadata"}``; raises OnnxUnavailable, or
    OnnxCheckError when a difference exceeds ``tolerance``."""
    # the guard's tables checked before the export's minutes, and written back as read (a malformed one refused)
    given = {} if val_psnr_gain is None else {"val_psnr_gain": val_psnr_gain}  # (else info's)
    tables = file_gains({**(info or {}), **given}, str(source or path))
    if not any(tables.values()):  # (a checkpoint's model, or an API caller that left out info)
        why = ("none given: pass load_model's info=" if info is None and val_psnr_gain is None else
               "the model has none: a checkpoint, or a run not yet finished")
        print(f"warning: {path}: the export holds no validated gains ({why}); restore with it restores every image "
              f"of a known quality unchecked", file=sys.stderr)
    require_onnx()
    import onnx
    import onnxruntime as ort

    from dist_dejpeg import __version__ as version

    path = Path(path)
    reference = copy.deepcopy(generator).to("cpu").eval()
    exported = PaddedGenerator(fold_spectral_norm(reference)).eval()
    for module in exported.modules():  # out-of-place activations (same values; the check below compares):
        if getattr(module, "inplace", None) is True:  # the exporter decomposes in-place ones into ATen prims,
            module.inplace = False  # ~35 % of its decomposition time (2-core CPU: export 32 -> 27 s)
    cfg = _cfg_dict(model_cfg)
    image = load_check_image(check_image)
    batches = {f"{n}x3x{h}x{w}": check_batch(image, n, h, w) for n, h, w in check_sizes}

    # the example: 2 x 3 x 64 x 96 (batch 2 and sizes != 1 and != each other, so nothing specializes to it)
    example = torch.from_numpy(check_batch(image, 2, 64, 96))
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    dims = {0: batch_dim, 2: torch.export.Dim("height", min=MIN_SIZE, max=16384),
            3: torch.export.Dim("width", min=MIN_SIZE, max=16384)}
    conditioned = bool(getattr(reference, "conditioned", False))
    args, names, shapes = (example,), [INPUT], {INPUT: dims}
    if conditioned:
        args, names = (example, torch.tensor([20.0, 0.0])), [INPUT, QUALITY]
        shapes = {INPUT: dims, QUALITY: {0: batch_dim}}
    start = time.perf_counter()
    with warnings.catch_warnings():  # the batch Dim shared by both inputs, which is what it is meant to do
        warnings.filterwarnings("ignore", r".*The axis name: \w+ will not be used, since it shares the same shape "
                                r"constraints with another axis", UserWarning)
        program = torch.onnx.export(exported, args, None, dynamo=True, input_names=names, output_names=[OUTPUT],
                                    dynamic_shapes=shapes, opset_version=opset, external_data=False,
                                    optimize=True, verbose=False)
    export_s = time.perf_counter() - start
    proto = program.model_proto
    for value in [*proto.graph.input, *proto.graph.output]:  # name the output's dims like the input's
        if value.name == QUALITY:
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
            continue
        for i, name in ((0, "batch"), (2, "height"), (3, "width")):
            dim = value.type.tensor_type.shape.dim[i]
            if dim.dim_value:
                raise OnnxCheckError(f"the exported {value.name} has a fixed {name} ({dim.dim_value}), "
                                     f"not a dynamic one")
            dim.dim_param = name
    meta = {"format": ONNX_FORMAT, "encoder": str(cfg.get("encoder", "")), "model": json.dumps(cfg),
            "source": str(source), "dist_dejpeg": version, "torch": torch.__version__,
            "input": f"{INPUT}: float32 N x 3 x H x W in [0, 1], RGB, H and W > 16 (tiles of <= 512 px: the "
                     f"attention's memory grows with (H x W)^2)",
            "output": f"{OUTPUT}: float32 N x 3 x H x W in [0, 1]",
            **{key: table_json(table) for key, table in tables.items()},
            "conditioned": json.dumps(conditioned), "pad_to": str(exported.pad_to),
            # the stride the attention sits at (null: none), not the config's ask: onnx_backend's memory guard
            "attention_at": json.dumps(getattr(reference, "attention_at", None)),
            "encoder_init": str((info or {}).get("encoder_init") or ("ImageNet" if cfg.get("pretrained") else
                                                                     "random init")),
            "global_step": json.dumps((info or {}).get("global_step")), "lpips": str((info or {}).get("lpips") or ""),
            "code": str((info or {}).get("code") or ""),  # the code that trained it (report: "trained by")
            TRAIN_SHARDS: json.dumps((info or {}).get(TRAIN_SHARDS) or {}),
            TRAIN_SOURCES: json.dumps((info or {}).get(TRAIN_SOURCES) or {})}
    if (info or {}).get(TRAIN_SHARDS_FROM):
        meta[TRAIN_SHARDS_FROM] = str(info[TRAIN_SHARDS_FROM])
    if conditioned:
        meta["input"] += f"; {QUALITY}: float32 N, JPEG quality 1..100 (0: unknown)"
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    data = proto.SerializeToString()
    try:  # (an opset the installed onnxscript cannot convert to is written anyway, invalid)
        onnx.checker.check_model(proto)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnx's ValidationError, onnxruntime's own types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OnnxCheckError(f"the exported graph (opset {program_opset(proto)}) is not one onnx {onnx.__version__} "
                             f"and onnxruntime {ort.__version__} accept ({first}); {path} not written") from None
    diffs = {}
    for label, batch in batches.items():
        feeds = {INPUT: batch}
        quality = None
        if conditioned:  # a known and an unknown quality in each checked batch (one image: known)
            feeds[QUALITY] = np.array([(10.0 + 30 * i) if i % 2 == 0 else 0.0 for i in range(len(batch))], np.float32)
            quality = torch.from_numpy(feeds[QUALITY])
        with torch.no_grad():
            expected = reference(torch.from_numpy(batch), quality).numpy()
        (got,) = session.run([OUTPUT], feeds)
        if got.shape != expected.shape:
            raise OnnxCheckError(f"{label}: onnxruntime returned shape {got.shape}, PyTorch {expected.shape}")
        diffs[label] = float(np.abs(got - expected).max())
        log(f"onnxruntime vs PyTorch, {label}: max abs difference {diffs[label]:.3g}")
    bad = {k: v for k, v in diffs.items() if not v <= tolerance}
    if bad:
        raise OnnxCheckError(f"onnxruntime differs from PyTorch by more than {tolerance:g}: {bad} "
                             f"({path} not written)")

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return {"path": str(path), "opset": program_opset(proto), "max_abs_diff": diffs, "tolerance": tolerance,
            "export_s": round(export_s, 1), "bytes": len(data), "metadata": meta}


def program_opset(proto) -> int | None:
    """The default (ai.onnx) opset of an ONNX model proto."""
    return {o.domain or "ai.onnx": o.version for o in proto.opset_import}.get("ai.onnx")


def read_onnx_metadata(path: str | Path) -> dict:
    """The export's metadata_props as strings (JSON for val_psnr_gain, model, conditioned, global_step)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


MIN_OPSET = 18  # torch.onnx's dynamo exporter writes no older opset (asked for one, it warns and writes 18)


def newest_opset() -> int | None:
    """The newest opset the exporter writes: what onnxscript's version converter (torch.onnx converts its graph
    with it) and onnx know; asked for a newer one, it wrote an invalid graph after a minute. None: not installed."""
    try:
        import onnx
        from onnxscript.version_converter import _version_converter
    except ImportError:
        return None
    return min(onnx.defs.onnx_opset_version(), getattr(_version_converter, "SUPPORTED_MAX_ONNX_OPSET", 1 << 30))


def export_target_problem(model: str | Path, onnx_path: str | Path, opset: int | None) -> str | None:
    """What would make :func:`export_model` fail after its minute of exporting and checking, said before: an
    ONNX file as the model, a folder, a name without .onnx or an unwritable place as the output, an opset the
    exporter cannot write.
    Creates the output's parent folder."""
    out = Path(onnx_path)
    if str(model).lower().endswith(".onnx"):
        return f"--model {model} is an ONNX export already; give the generator file or run folder it came from"
    if out.is_dir():
        return f"--onnx {out} is a folder; give a file name, e.g. {out / 'dejpeg.onnx'}"
    if out.suffix.lower() != ".onnx":  # restore, evaluate and report run a --model as ONNX by its suffix
        return f"--onnx {out}: give the file the .onnx suffix ({out.with_name(out.name + '.onnx')}): restore runs a " \
               f"model file as ONNX by it"
    if opset is not None and opset < MIN_OPSET:
        return f"--opset {opset}: the exporter (torch.onnx, dynamo) writes opset {MIN_OPSET} or newer"
    newest = newest_opset() if opset is not None else None
    if newest is not None and opset > newest:
        return f"--opset {opset}: the installed exporter (torch.onnx with onnxscript) writes opsets {MIN_OPSET} to " \
               f"{newest}"
    try:
        prove_writable(out.parent)
    except OSError as err:
        return f"--onnx {out}: cannot write to {out.parent} ({type(err).__name__}: {err.strerror or err})"
    return None


def export_model(model: str | Path, onnx_path: str | Path, *, opset: int | None = None, check_image=None,
                 log=print) -> tuple[dict, dict]:
    """Export the generator at ``model`` (a generator file, a run or a checkpoint folder) to ``onnx_path``, its
    config, source and validated gains in the metadata. Returns (export_onnx's result, load_model's info); raises
    ModelFileError (also for NaN or infinite weights), OnnxUnavailable (checked before the model is built), FileNotFoundError or CheckImageError
    (``check_image``: missing, not an image) or OnnxCheckError."""
    require_onnx()
    if check_image is not None and not isinstance(check_image, np.ndarray):  # read first: said before the export
        if not Path(check_image).is_file():
            raise FileNotFoundError(f"--check-image {check_image}: no such file")
        try:
            check_image = load_check_image(check_image)
        except (OSError, ValueError) as err:  # (PIL's UnidentifiedImageError is an OSError)
            raise CheckImageError(f"--check-image {check_image}: not an image that Pillow reads ({err})") from err
    generator, info = load_model(model)
    if bad := non_finite(generator.state_dict()):  # (was a minute of exporting, then "onnxruntime differs": NaN)
        raise ModelFileError(f"{info['source']}: a broken model, not exported: {bad}")
    result = export_onnx(generator, onnx_path, opset=opset, check_image=check_image, model_cfg=info["model"],
                         source=info["source"], log=log, val_psnr_gain=info.get("val_psnr_gain"), info=info)
    return result, info
