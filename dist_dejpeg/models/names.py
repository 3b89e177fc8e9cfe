"""What a runtime needs to know about the model files without importing torch: the exported ONNX model's names
and format version, and the errors for a model that cannot be opened. ``restore --model model.onnx`` runs on
onnxruntime alone (restore/onnx_backend.py), so these live here, not in onnx_export.py or generator_file.py
(which import torch and re-export them under their old names).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import PurePath

ONNX_FORMAT = "dist_dejpeg.onnx.v1"
INSTALL_HINT = "pip install -e '.[onnx]'"  # as the README installs extras
INPUT, OUTPUT, QUALITY = "degraded", "restored", "quality"
MIN_SIZE = 32  # the exported range's lower end: from 32 on, torch.export proves the reflect pad valid


# the generator file's (and the export's) metadata keys of the validated RGB PSNR gain per quality and its lower bound
GAIN_KEYS = ("val_psnr_gain", "val_psnr_gain_low")
# the final validation's mean JPEG PSNR per quality: the JPEG error restoring starts from, which a lossy re-encoding
# of the output must stay well under (restore/reencode.py: reencoding_outweighs)
JPEG_PSNR = "val_jpeg_psnr"
# the same gain and bound of the restored image made consistent with its JPEG file (jpeg/consistency.py), as restore
# writes a JPEG's, with the cell half-width per quality that measured best: restore's guard and restore itself use
# these for a JPEG whose coefficients it reads (files written before 2026-12-07 lack them: the gains above, cells 0.5)
CONFORMED_KEYS = ("val_psnr_gain_conformed", "val_psnr_gain_conformed_low", "cell_half_width")


HALF_WIDTH_MAX = 0.5  # a cell half-width (quantization steps) is in (0, 0.5]: 0.5 is the file's own cell, wider
# ones leave it (jpeg/consistency.py: conform)


def read_gains(value, key: str = "") -> dict[int, float]:
    """{quality: value} from a model file's table ``key``: its JSON text, or the dict it was read into; {} for None
    (the key absent: files from before it) or an empty table (a checkpoint's export: nothing validated). Anything
    else that is not a table of qualities 1..100 is a ModelFileError naming the key and the text: a gain or its
    bound finite or NaN (a quality validation could not measure; the guard takes it as harm), the JPEG's PSNR any
    number (inf: crops it kept exactly), a cell half-width (CONFORMED_KEYS[2]) finite in (0, 0.5]. A malformed
    table is not taken as missing: the guard would restore every image unchecked."""
    text = value
    try:
        value = json.loads(value) if isinstance(value, (str, bytes)) else value
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise TypeError(f"a JSON {type(value).__name__}, not an object")
        table = {_quality(q): _number(g) for q, g in value.items()}
    except (ValueError, TypeError, AttributeError, OverflowError) as err:
        raise _malformed(key, text, err) from None
    for q, v in table.items():
        if key == CONFORMED_KEYS[2] and not (math.isfinite(v) and 0 < v <= HALF_WIDTH_MAX):
            raise _malformed(key, text, f"q{q}'s cell half-width {v} is not in (0, {HALF_WIDTH_MAX}]")
        if key in (*GAIN_KEYS, *CONFORMED_KEYS[:2]) and math.isinf(v):
            raise _malformed(key, text, f"q{q}'s gain {v} is not finite (nor NaN: not measured)")
    return table


def table_json(table: dict) -> str:
    """A gain table as the metadata holds it: strict JSON (a JavaScript, Go or Rust reader of an export's
    metadata refuses Python's bare NaN and Infinity), a value that is not finite written as the string "NaN",
    "Infinity" or "-Infinity" (read_gains reads them back: a diverged validation's NaN, the JPEG's inf PSNR)."""
    return json.dumps({str(k): v if not isinstance(v, float) or math.isfinite(v) else
                       "NaN" if v != v else "Infinity" if v > 0 else "-Infinity" for k, v in table.items()},
                      allow_nan=False)


def _quality(q) -> int:
    if isinstance(q, bool) or not re.fullmatch(r"\s*\d+\s*", str(q)) or not 1 <= int(q) <= 100:
        raise ValueError(f"{str(q)[:20]!r} is not a JPEG quality (a whole number in 1..100)")
    return int(q)


def _number(g) -> float:
    if isinstance(g, bool) or not isinstance(g, (int, float, str)):
        raise TypeError(f"{str(g)[:20]!r} is not a number")
    return float(g)


def _malformed(key: str, text, why) -> ModelFileError:
    shown = text.decode(errors="replace") if isinstance(text, bytes) else text if isinstance(text, str) else \
        json.dumps(text, default=str)
    return ModelFileError(f"metadata {key or 'table'!r} is not a table of values per JPEG quality: "
                          f"{shown[:80]!r} ({why})")


def file_gains(meta: dict, source: str = "") -> dict[str, dict[int, float]]:
    """The gain tables of a model file's metadata, each {} where it is missing (files written before the guard, or
    a checkpoint's export): the guard then says the file holds no validated gains. A malformed one is a
    ModelFileError (read_gains), prefixed with ``source``."""
    tables = {}
    for key in (*GAIN_KEYS, JPEG_PSNR, *CONFORMED_KEYS):
        try:
            tables[key] = read_gains(meta.get(key), key)
        except ModelFileError as err:
            raise ModelFileError(f"{source}: {err}" if source else str(err)) from None
    return tables


# the generator file's (and the export's) metadata key of the shards the model trained on: {shard_keys: fingerprint}
# (files written before 2027-01 key every shard by its file name; same-named shards of two folders then merged)
TRAIN_SHARDS = "train_shards"


def shard_keys(paths, root) -> dict[str, str]:
    """{path: how the record of a run's shards names it}: its file name, as every older record and validation
    fingerprint named it (so those still match, whatever folder under ``data.root`` or scratch copy the shards lie
    in); only where two of ``paths`` share a file name are those named by their path relative to ``data.root``, with
    '/', so that ``partA/train-000000.tar`` and ``partB/train-000000.tar`` stay two (the path as given where it lies
    outside the root)."""
    paths = [str(p) for p in paths]
    names = Counter(os.path.basename(p) for p in paths)
    keys = {}
    for p in paths:
        rel = os.path.relpath(p, root)
        keys[p] = os.path.basename(p) if names[os.path.basename(p)] == 1 else PurePath(
            p if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel).as_posix()
    return keys


def shard_fingerprint(path) -> str:
    """A shard file's size and the SHA-256 of its first 64 KiB (its first sample's header and pixels): the same for a
    copy, different for another set's shard of the same name (tar files are padded to 10 KiB records, so equal sizes
    alone are common); cheap enough for the thousands of shards a large set has."""
    import hashlib

    with open(path, "rb") as f:
        head = f.read(1 << 16)
        size = f.seek(0, 2)
    return f"{size}:{hashlib.sha256(head).hexdigest()[:16]}"


def file_train_shards(meta: dict, source: str = "") -> dict[str, str]:
    """{:func:`shard_keys` (a file name; a path in data.root where two share it): :func:`shard_fingerprint`} of the
    shards a model file says it trained on; {} where it does
    not say (files written before it did, exports of those, or files written by hand); a malformed table is a
    ModelFileError prefixed with ``source``."""
    return _names(meta, TRAIN_SHARDS, source)


# and of the photos its training shards were cut from: {SHA-256 prefix: the photo's name}, the hash the data manifest
# records of each (its decoded pixels; a DIV2K image's file bytes), so that evaluate tells a photo it trained on
# (the same pixels in a PNG, TIFF or WebP of any name) from one it never saw
TRAIN_SOURCES = "train_sources"
DIGEST_CHARS = 16  # of the hex SHA-256: 64 bits, ~16 KB of metadata for DIV2K's 800 photos


def file_train_sources(meta: dict, source: str = "") -> dict[str, str]:
    """{SHA-256 prefix: photo name} of the photos a model file says it trained on (TRAIN_SOURCES); {} where it does
    not say; a malformed one is a ModelFileError."""
    return _names(meta, TRAIN_SOURCES, source)


def _names(meta: dict, key: str, source: str) -> dict[str, str]:
    """A model file's table ``key`` of names ({} where absent); a malformed one is a ModelFileError prefixed with
    ``source``, not taken as missing: evaluate would call the photos the model trained on unseen."""
    text = meta.get(key)
    try:
        value = json.loads(text) if isinstance(text, (str, bytes)) and text else text or {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise TypeError("not a JSON object of strings")
        return {str(k): v for k, v in value.items()}
    except (ValueError, TypeError) as err:
        shown = text if isinstance(text, str) else json.dumps(text, default=str)
        raise ModelFileError(f"{source + ': ' if source else ''}metadata {key!r} is not a table of names: "
                             f"{shown[:80]!r} ({err})") from None


OWN_HUB = "hf-hub:timm/"  # timm's own models on the Hugging Face hub: a model file's encoder may name them
TRUST_ENCODER = "DIST_DEJPEG_TRUST_ENCODER"  # =1: a model file's encoder may name any hub repository


# the generator file's metadata key of what timm resolved a source-prefixed encoder name (hf-hub:..., local-dir:...) to
# at save: {"architecture": a timm built-in, "pretrained_cfg": the config that built it (its mean/std, input size)
# less where weights are, "model_args": the source config's model arguments}, by which the file loads
# with neither the folder nor the hub (older files lack it: the name is resolved at load)
ENCODER_RESOLVED = "encoder_resolved"


def file_encoder_resolved(meta: dict, source: str = "") -> dict | None:
    """The :data:`ENCODER_RESOLVED` record of a generator file's metadata; None where it has none. A malformed one is
    a ModelFileError, not taken as missing."""
    text = meta.get(ENCODER_RESOLVED)
    if text is None:
        return None
    try:
        record = json.loads(text)
        if not isinstance(record, dict) or not isinstance(record.get("architecture"), str) or not all(
                isinstance(record.get(k), dict) for k in ("pretrained_cfg", "model_args")):
            raise TypeError("not a JSON object of an architecture name, a pretrained_cfg and model_args")
    except (ValueError, TypeError) as err:
        raise ModelFileError(f"{source + ': ' if source else ''}metadata {ENCODER_RESOLVED!r} is not a resolved "
                             f"encoder: {str(text)[:80]!r} ({err})") from None
    return record


def trusted_encoder(name: str) -> bool:
    """Whether a model file's encoder may be built as it names it: one timm builds itself, timm's own hub models,
    a local folder (local-dir:), or any where the user set TRUST_ENCODER=1 (another hf-hub: repository is fetched
    from a repository a stranger's file chose: a request it can track). A file's ENCODER_RESOLVED record without
    model_args is built from that, not as the name says, and needs none of this."""
    import os

    return not name.startswith("hf-hub:") or name.startswith(OWN_HUB) or os.environ.get(TRUST_ENCODER) == "1"


class ModelFileError(ValueError):
    """A model path that does not hold a generator this installation can build."""


class OnnxUnavailable(ImportError):
    """onnx, onnxruntime or onnxscript (the dynamo exporter's translator) is not installed."""


def require_onnx(names: tuple[str, ...] = ("onnx", "onnxruntime", "onnxscript"), what: str = "ONNX export") -> None:
    """OnnxUnavailable naming the first of ``names`` that is not installed and how to install it."""
    for name in names:
        try:
            __import__(name)
        except ImportError as err:
            raise OnnxUnavailable(f"{what} needs {', '.join(names[:-1]) + ' and ' if len(names) > 1 else ''}"
                                  f"{names[-1]} ({name} is not installed: {err}); {INSTALL_HINT}") from None
