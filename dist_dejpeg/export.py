"""The trained generator as one safetensors file that carries its own model config (no pickle).

    from dist_dejpeg.export import load_generator
    generator = load_generator("runs/debug/generator.safetensors")   # eval mode, CPU
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_dejpeg.config import ModelConfig
from dist_dejpeg.models.unet import Generator, build_generator

FORMAT = "dist_dejpeg.generator.v1"


def save_generator(generator: Generator, model_cfg: ModelConfig, path: str | Path, extra: dict | None = None) -> None:
    """Atomic write of the weights plus ``model_cfg`` (and ``extra`` strings) as safetensors metadata."""
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in generator.state_dict().items()}
    meta = {"format": FORMAT, "model": json.dumps(dataclasses.asdict(model_cfg))}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_metadata(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a dist_dejpeg generator file (format {meta.get('format')!r})")
    fields = json.loads(meta["model"])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in fields.items() if k in known})
    # The file holds every weight: build with a random-init encoder instead of fetching ImageNet weights.
    model_cfg = dataclasses.replace(model_cfg, pretrained=False, encoder_weights="")
    generator = build_generator(model_cfg)
    generator.load_state_dict(load_file(str(path), device="cpu"))
    return generator.to(device).eval()
