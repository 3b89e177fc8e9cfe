"""Training-step throughput (images/s per device) of each NoGAN update, on the training config.

    python benchmarks/bench_train_step.py --config configs/debug.yaml [--real-data] [key=value ...]
    accelerate launch benchmarks/bench_train_step.py --config configs/div2k.yaml

Builds the real Trainer (same models, optimizers, precision, DDP wrapping), feeds it synthetic batches by
default (so the number is the model's, not the loader's; --real-data uses the configured shards), burns in,
synchronizes the device before reading the clock, and writes benchmarks/results/train_step.json plus a
Markdown table naming the machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import machine_name, write_results
from dist_dejpeg.config import load_config
from dist_dejpeg.train.steps import critic_step, generator_step
from dist_dejpeg.train.trainer import Trainer

RESULTS = Path(__file__).parent / "results"


class Synthetic:
    """Endless random batches already on the device (the batch contract, nothing else)."""

    def __init__(self, batch_size: int, crop: int, device: torch.device):
        self.batch = {"clean": torch.rand(batch_size, 3, crop, crop, device=device)}
        self.batch["jpeg"] = (self.batch["clean"] + 0.05 * torch.randn_like(self.batch["clean"])).clamp(0, 1)
        self.batch["quality"] = torch.full((batch_size,), 20, dtype=torch.int64, device=device)

    def __iter__(self):
        while True:
            yield self.batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--real-data", action="store_true", help="use the configured shards, not synthetic batches")
    parser.add_argument("--out", default=str(RESULTS / "train_step"), help="results path without extension")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    cfg = load_config(args.config, list(args.overrides) + ["train.progress=false"])
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu")
    loader = None if args.real_data else Synthetic(cfg.data.batch_size, cfg.data.crop, device)
    t = Trainer(cfg, train_loader=loader, val_set={} if loader is not None else None)
    acc, batches = t.accelerator, iter(t.loader)
    gen_phase = next(p for p in cfg.train.phases.values() if p.kind == "gen")
    images = cfg.data.batch_size * cfg.train.grad_accum
    common = dict(grad_accum=cfg.train.grad_accum, adversarial=cfg.loss.adversarial)

    def gen():
        generator_step(acc, t.generator, t.g_opt, batches, w_pixel=gen_phase.w_pixel, w_lpips=gen_phase.w_lpips,
                       lpips=t.lpips, grad_accum=cfg.train.grad_accum)

    rows = {"gen step (L1 + LPIPS)": gen}
    if t.critic is not None:
        rows["critic step"] = lambda: critic_step(acc, t.critic, t.c_opt, batches, generator_raw=t.gen_raw, **common)
        rows["gan generator step (+ adversarial)"] = lambda: generator_step(
            acc, t.generator, t.g_opt, batches, w_pixel=1.0, w_lpips=gen_phase.w_lpips, w_adv=1.0, lpips=t.lpips,
            critic_raw=t.critic_raw, **common)
    results = {}
    for name, fn in rows.items():
        seconds = timed(fn, args.warmup, args.steps, acc.device)
        results[name] = {"images_per_s_per_device": images * args.steps / seconds,
                         "ms_per_step": 1000 * seconds / args.steps}
    if acc.is_main_process:
        report = {"machine": machine_name(), "processes": acc.num_processes, "torch": torch.__version__,
                  "config": args.config, "overrides": args.overrides, "data": "real" if args.real_data else "synthetic",
                  "batch_size": cfg.data.batch_size, "crop": cfg.data.crop, "encoder": cfg.model.encoder,
                  "mixed_precision": cfg.train.mixed_precision, "results": results}
        note = (f"{args.config} {' '.join(args.overrides)}; batch {cfg.data.batch_size} x {cfg.data.crop} px, "
                f"{cfg.model.encoder}, precision {cfg.train.mixed_precision}, {report['data']} data, "
                f"{acc.num_processes} process(es), torch {torch.__version__}")
        write_results(args.out, report, "Train-step throughput", note, ["update", "images/s per device", "ms/step"],
                      [[k, f"{v['images_per_s_per_device']:.1f}", f"{v['ms_per_step']:.1f}"] for k, v in results.items()])


if __name__ == "__main__":
    main()
