"""Train on fixed global batches, split over however many processes run this script; used by
test_distributed.py to compare a 2-process DDP run with a 1-process run of the same global batch, and by
test_deepspeed.py to compare a 2-process DeepSpeed run with a 2-process DDP run.

    python tests/ddp_runner.py CONFIG GLOBAL_BATCH                     # one process, the whole batch
    accelerate launch --multi_gpu --num_processes 2 tests/ddp_runner.py CONFIG GLOBAL_BATCH

The batches are served by a loader with a position (state_dict), so a run resumed from a checkpoint
(train.auto_resume) continues with the batch after the checkpoint's. With the config's
train.deepspeed_stage > 0 the launch must not set ACCELERATE_USE_CPU (it turns DeepSpeed off). At the end
the main process also writes the critic's weights to <run_dir>/critic.safetensors (unwrapped), to compare
runs whose checkpoints differ in format.
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
        quality = 10 + 20 * (torch.arange(global_batch) % 4)  # per sample: each FiLM path gets used
        out.append({"jpeg": jpeg[mine], "clean": clean[mine], "quality": quality[mine]})
    return out


class FixedLoader:
    """Serves a list of batches once, remembering how many it has handed out (checkpointed by the trainer)."""

    def __init__(self, batches: list[dict]):
        self.batches, self.pos = batches, 0

    def __iter__(self):
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def run(config_path: str, global_batch: int) -> dict:
    import os

    from dist_dejpeg.config import load_config
    from dist_dejpeg.train import trainer as trainer_mod

    cfg = load_config(config_path)
    if cfg.train.deepspeed_stage:
        # DeepSpeed's communication backend JIT-compiles its shared-memory all-reduce extension with g++ on
        # first use (about a minute on a fresh machine). Gloo does the collectives on CPU, so mark the op
        # unavailable; build_shm_op() then skips it. Must happen before the Accelerator is created.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # no PartialState before the Trainer here: it would fix the process group (and its backend) first
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    else:
        from accelerate import PartialState

        state = PartialState(cpu=True)
        rank, world = state.process_index, state.num_processes
    steps = sum(cfg.train.phases[name].steps for name in cfg.train.order)
    batches = fixed_batches(steps * cfg.train.grad_accum, global_batch, cfg.data.crop, rank, world)
    original_finish = trainer_mod.finish_run  # (train/final.py's, as the trainer calls it)

    def finish(self):
        results = original_finish(self)
        if self.ema.enabled:  # every rank's own EMA: the tests check that the ranks' agree
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in self.ema.state_dict().items()},
                      str(self.run_dir / f"ema_rank{self.accelerator.process_index}.safetensors"))
        if self.critic is not None and self.accelerator.is_main_process:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in self.critic_raw.state_dict().items()},
                      str(self.run_dir / "critic.safetensors"))
        return results

    trainer_mod.finish_run = finish
    try:
        return trainer_mod.train(cfg, train_loader=FixedLoader(batches))
    finally:
        trainer_mod.finish_run = original_finish


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))


# -- used by the tests (importable: tests/ is on sys.path under pytest) ---------------------------------------
# 4 images per rank: with 2, the deepest batch norms (1x1 spatial at 32 px crops) estimate a variance from two
# numbers, and float noise in the parameters became running-variance differences outside the tolerance
GLOBAL_BATCH = 8
OVERRIDES = ("model.sync_bn=true", "critic.dropout=0", "data.batch_size=4", "data.val_max_images=7",
             "data.val_batch_size=2", "train.phases.gen.steps=3", "train.phases.critic.steps=2",
             "train.phases.gan.steps=3", "train.phases.gan.critic_iters=1", "train.phases.gan.gen_iters=1",
             "train.phases.gan.val_every=1", "train.ckpt_every=6", "train.keep_last=10",
             # the quality-conditioned decoder (FiLM) under DDP and ZeRO; no hidden qualities: the masks would be
             # drawn per rank, and the runs compared must see the same inputs
             "model.quality_conditioning=true", "model.quality_blind_prob=0")
# checkpoints at global steps 3 and 5 (phase ends), 6 (mid-gan), 8 (end)


def write_config(folder, shards, name: str, *extra: str):
    """The shared test config (tests/test_trainer.py's tiny one plus OVERRIDES) as a YAML file; the run
    folder is folder/name."""
    from dist_dejpeg.config import to_yaml
    from test_trainer import tiny

    path = folder / f"{name}.yaml"
    path.write_text(to_yaml(tiny(folder / name, shards, *OVERRIDES, *extra)))
    return path


def launch_two(config, deepspeed: bool = False) -> None:
    """This script under `accelerate launch` with two CPU processes (gloo), the project's launcher config."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if deepspeed:
        env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes (gloo) on a GPU machine as well
    else:
        # --multi_gpu without a GPU starts two processes only with it (`--cpu --num_processes 2` starts one)
        env["ACCELERATE_USE_CPU"] = "1"
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(root / "launch" / "accelerate" / "cpu_multi.yaml"), str(Path(__file__)),
                           str(config), str(GLOBAL_BATCH)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "`broadcast_buffers` is deprecated" not in done.stderr  # (torch 2.14 said it once per rank and model)
