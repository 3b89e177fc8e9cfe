"""Inference latency of the generator's forward on whole images: 512 px and a DIV2K-sized 2K image, fp32 and
bf16 autocast, on the CPU and (when present) the GPU.

    dist-dejpeg bench infer --config configs/div2k.yaml

Until the tiled ``restore`` lands ("Use the trained model"), this times the generator's forward alone
(eval mode, no_grad, the config's channels_last), which is what restoring a whole image costs apart from
decoding and encoding the files. Reported per image and per megapixel.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from dist_dejpeg.bench.common import measure, write_results
from dist_dejpeg.config import load_config

SIZES = {"512 x 512": (512, 512), "2040 x 1356 (DIV2K 2K)": (1356, 2040)}


def _devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])


def run(config: str, overrides: list[str], out_dir: str | Path, *, repeats: int = 3, name: str = "infer",
        sizes: dict | None = None) -> dict:
    from dist_dejpeg.models.unet import build_generator

    cfg = load_config(config, list(overrides))
    sizes = sizes or SIZES
    model_cpu = build_generator(cfg.model).eval()
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    results, table = {}, []
    for device in _devices():
        model = copy.deepcopy(model_cpu).to(device, memory_format=fmt)
        for precision in ("fp32", "bf16"):
            for label, (h, w) in sizes.items():
                image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device, memory_format=fmt)

                def forward():
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                         enabled=precision == "bf16"):
                        return model(image)

                cpu = device.type == "cpu"
                timing = measure(forward, warmup=1 if cpu else 3, steps=1 if cpu else 10,
                                 repeats=repeats, device=device)
                megapixels = h * w / 1e6
                key = f"{device.type} {precision} {label}"
                results[key] = dict(timing.as_dict(), ms_per_megapixel=timing.as_dict()["ms_per_call"] / megapixels)
                table.append([device.type, precision, label, f"{results[key]['ms_per_call']:.1f}",
                              f"{results[key]['ms_per_megapixel']:.1f}", f"{100 * timing.spread:.0f}%"])
                print(f"bench infer: {key}: {results[key]['ms_per_call']:.1f} ms", flush=True)
    report = {"config": config, "overrides": list(overrides), "encoder": cfg.model.encoder,
              "decoder_width": cfg.model.decoder_width, "channels_last": cfg.model.channels_last,
              "what": "generator forward, whole image, batch 1, eval + no_grad", "results": results}
    note = (f"`{config}` {' '.join(overrides)}: {cfg.model.encoder}, decoder width {cfg.model.decoder_width}, "
            f"channels_last {cfg.model.channels_last}. The generator's forward on a whole image (batch 1, eval, "
            f"no_grad); file decoding/encoding and tiling are not included. Median of {repeats} repeats.")
    write_results(out_dir, name, report, "Inference latency", note,
                  ["device", "precision", "image", "ms per image", "ms per megapixel", "spread"], table)
    return report
