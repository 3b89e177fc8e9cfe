"""What a runtime needs to know about the model files without importing torch: the exported ONNX model's names
and format version, and the errors for a model that cannot be opened. ``restore --model model.onnx`` runs on
onnxruntime alone (restore/onnx_backend.py), so these live here, not in onnx_export.py or generator_file.py
(which import torch and re-export them under their old names).
"""

from __future__ import annotations

ONNX_FORMAT = "dist_dejpeg.onnx.v1"
INSTALL_HINT = "pip install -e '.[onnx]'"  # as the README installs extras
INPUT, OUTPUT, QUALITY = "degraded", "restored", "quality"
MIN_SIZE = 32  # the exported range's lower end: from 32 on, torch.export proves the reflect pad valid


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
