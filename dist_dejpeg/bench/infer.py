"""Restore latency: a 512 px and a DIV2K-sized 2K image, whole and tiled, fp32 and bf16 autocast, on the CPU and
(when present) the GPU, through the same Restorer that ``dist-dejpeg restore`` uses.

    dist-dejpeg bench infer --config configs/div2k.yaml

Each row times ``Restorer.restore_array`` on a uint8 image (conversion to and from float, tiling and blending
included; file decoding and PNG encoding not). Whole: one forward pass over the image. Tiled: 512 px tiles
overlapping by 64 px, 4 per batch (the restore command's defaults). Reported per image and per megapixel.
The model is the config's generator with random weights: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dist_dejpeg.bench.common import add_common_arguments, config_of, measure, write_results
from dist_dejpeg.config import load_config

SIZES = {"512 x 512": (512, 512), "2040 x 1356 (DIV2K 2K)": (1356, 2040)}
MODES = {"whole": dict(tile=0), "tiled 512/64": dict(tile=512, overlap=64, batch_size=4)}


def _devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])


def run(config: str, overrides: list[str], out_dir: str | Path, *, repeats: int = 3, name: str = "infer",
        sizes: dict | None = None, modes: dict | None = None) -> dict:
    from dist_dejpeg.restore.restorer import Restorer
    from dist_dejpeg.models.unet import build_generator

    cfg = load_config(config, list(overrides))
    sizes, modes = sizes or SIZES, modes or MODES
    generator = build_generator(cfg.model).eval()
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    results, table = {}, []
    rng = np.random.default_rng(0)
    for device in _devices():
        generator = generator.to(device, memory_format=fmt)
        cpu = device.type == "cpu"
        for precision in ("fp32", "bf16"):
            for mode, kwargs in modes.items():
                restorer = Restorer(generator, device=device, precision=precision, **kwargs)
                for label, (h, w) in sizes.items():
                    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                    timing = measure(lambda: restorer.restore_array(image), warmup=1 if cpu else 2,
                                     steps=1 if cpu else 5, repeats=repeats, device=device)
                    megapixels = h * w / 1e6
                    key = f"{device.type} {precision} {mode} {label}"
                    ms = timing.as_dict()["ms_per_call"]
                    results[key] = dict(timing.as_dict(), ms_per_megapixel=ms / megapixels)
                    table.append([device.type, precision, mode, label, f"{ms:.1f}", f"{ms / megapixels:.1f}",
                                  f"{100 * timing.spread:.0f}%"])
                    print(f"bench infer: {key}: {ms:.1f} ms", flush=True)
    report = {"config": config, "overrides": list(overrides), "encoder": cfg.model.encoder,
              "decoder_width": cfg.model.decoder_width, "channels_last": cfg.model.channels_last,
              "what": "Restorer.restore_array on a uint8 image, batch 1 image",
              "modes": {k: dict(v) for k, v in modes.items()},
              "results": results}
    note = (f"`{config}` {' '.join(overrides)}: {cfg.model.encoder}, decoder width {cfg.model.decoder_width}, "
            f"channels_last {cfg.model.channels_last}, random weights. `Restorer.restore_array` on a uint8 image "
            f"(float conversion, tiling, blending included; file decoding/encoding not). Whole: one pass; tiled: "
            f"512 px tiles overlapping 64 px, 4 per batch (restore's defaults). Median of {repeats} repeats.")
    write_results(out_dir, name, report, "Restore latency", note,
                  ["device", "precision", "mode", "image", "ms per image", "ms per megapixel", "spread"], table)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "infer")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")


def main(args: argparse.Namespace) -> int:
    config, overrides = config_of(args)
    run(config, overrides, Path(args.results), repeats=args.repeats, name=args.name)
    return 0
