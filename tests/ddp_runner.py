"""Train on fixed global batches, split over however many processes run this script; used by
test_distributed.py to compare a 2-process DDP run with a 1-process run of the same global batch.

    python tests/ddp_runner.py CONFIG GLOBAL_BATCH                     # one process, the whole batch
    accelerate launch --multi_gpu --num_processes 2 tests/ddp_runner.py CONFIG GLOBAL_BATCH
"""

from __future__ import annotations

import sys

import torch


def fixed_batches(n_batches: int, global_batch: int, crop: int, rank: int, world: int) -> list[dict]:
    """The same global batches whatever the world size; rank r gets the r-th contiguous slice of each."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not split over {world} processes")
    g = torch.Generator().manual_seed(1234)
    per = global_batch // world
    out = []
    for _ in range(n_batches):
        clean = torch.rand(global_batch, 3, crop // 8, crop // 8, generator=g)
        clean = torch.nn.functional.interpolate(clean, size=(crop, crop), mode="bilinear")  # smooth images
        jpeg = (clean + 0.05 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
        mine = slice(rank * per, (rank + 1) * per)
        out.append({"jpeg": jpeg[mine], "clean": clean[mine], "quality": torch.full((per,), 10)})
    return out


def run(config_path: str, global_batch: int) -> dict:
    from accelerate import PartialState

    from dist_dejpeg.config import load_config
    from dist_dejpeg.train.trainer import train

    cfg = load_config(config_path)
    state = PartialState(cpu=True)
    steps = sum(cfg.train.phases[name].steps for name in cfg.train.order)
    batches = fixed_batches(steps * cfg.train.grad_accum, global_batch, cfg.data.crop, state.process_index,
                            state.num_processes)
    return train(cfg, train_loader=batches)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
