"""DeepSpeed ZeRO-2 for both models (Accelerate's multi-model DeepSpeed, one plugin per model), two CPU
processes: all three NoGAN phases through the project's Trainer end with the same parameters as plain DDP on
the same per-rank batches, and a checkpoint saved mid-run under DeepSpeed resumes to the same end.

DDP and DeepSpeed here are both 2-process runs over the same per-rank data, so batch-norm statistics are
per rank in both (no sync_bn needed for the comparison)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_dejpeg.config import ConfigError, load_config, to_yaml
from dist_dejpeg.train import checkpoint as ckpt

from test_trainer import tiny

pytest.importorskip("deepspeed")

ROOT = Path(__file__).parents[1]
# 4 images per rank: with 2, the deepest batch norms (1x1 spatial at 32 px crops) estimate a variance from two
# numbers, and the float noise in the parameters (all within 4e-5 of DDP's) became running-variance differences
# of up to 2.5e-3, outside the tolerance; with 4, every tensor is within 4% of it (measured on the 2-core machine)
GLOBAL_BATCH = 8
OVER = ("critic.dropout=0", "data.batch_size=4", "data.val_max_images=4", "data.val_batch_size=2",
        "train.phases.gen.steps=3", "train.phases.critic.steps=2", "train.phases.gan.steps=3",
        "train.phases.gan.critic_iters=1", "train.phases.gan.gen_iters=1",
        "train.ckpt_every=6", "train.keep_last=10")  # checkpoints at 3, 5 (phase ends), 6 (mid-gan), 8


def launch_two(config: Path, deepspeed: bool) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if deepspeed:
        env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes (gloo) on a GPU machine as well
    else:
        env["ACCELERATE_USE_CPU"] = "1"  # --multi_gpu without a GPU starts two processes only with it
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(ROOT / "tests" / "ddp_runner.py"), str(config), str(GLOBAL_BATCH)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return time.perf_counter() - t0


def weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(run_dir / f"{name}.safetensors")) for name in ("generator", "critic")}


def write_config(tmp_path: Path, shards: Path, name: str, *extra: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(to_yaml(tiny(tmp_path / name, shards, *OVER, *extra)))
    return path


@pytest.mark.slow
def test_zero2_two_processes_match_ddp_and_resume(tmp_path, sample_shards):
    ds = write_config(tmp_path, sample_shards, "ds", "train.deepspeed_stage=2")
    ddp = write_config(tmp_path, sample_shards, "ddp")
    launch_two(ds, deepspeed=True)
    launch_two(ddp, deepspeed=False)

    # (a) the DeepSpeed run finishes all three phases and writes its results
    metrics = json.loads((tmp_path / "ds" / "metrics.json").read_text())
    assert metrics["meta"]["global_step"] == 8
    assert (tmp_path / "ds" / "generator.safetensors").is_file()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "ds")] == [f"step-{s:08d}" for s in (3, 5, 6, 8)]

    # (b) the same parameters as DDP, within the float tolerance of test_distributed.py (Adam turns
    # summation-order noise in near-zero gradients into a fraction of one lr-sized step)
    a, b = weights(tmp_path / "ds"), weights(tmp_path / "ddp")
    for model in a:
        assert a[model].keys() == b[model].keys()
        for key in a[model]:
            torch.testing.assert_close(a[model][key], b[model][key], rtol=1e-3, atol=1e-4,
                                       msg=lambda m: f"{model} {key}: {m}")

    # (c) the checkpoint saved mid-gan (global step 6) by DeepSpeed resumes (train.auto_resume) in a new launch
    # to exactly the uninterrupted run's end
    resumed = write_config(tmp_path, sample_shards, "resumed", "train.deepspeed_stage=2")
    shutil.copytree(tmp_path / "ds" / "checkpoints" / f"step-{6:08d}",
                    tmp_path / "resumed" / "checkpoints" / f"step-{6:08d}")
    launch_two(resumed, deepspeed=True)
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["meta"]["global_step"] == 8
    c = weights(tmp_path / "resumed")
    for model in a:
        diff = [k for k in a[model] if not torch.equal(a[model][k], c[model][k])]
        assert not diff, f"{model}: {diff[:5]}"


def test_deepspeed_stage_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="ZeRO-3.*raw module"):
        load_config(None, ["train.deepspeed_stage=3"])
    with pytest.raises(ConfigError, match="train.deepspeed_stage"):
        load_config(None, ["train.deepspeed_stage=4"])
    with pytest.raises(ConfigError, match="bf16"):
        load_config(None, ["train.deepspeed_stage=2", "train.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="train.phases.gen.max_grad_norm.*train.phases.gan.max_grad_norm"):
        load_config(None, ["train.deepspeed_stage=2", "train.phases.gen.max_grad_norm=1.0"])
    cfg = load_config(None, ["train.deepspeed_stage=1"] + [f"train.phases.{n}.max_grad_norm=2.0"
                                                            for n in ("gen", "critic", "gan")])
    assert cfg.train.deepspeed_stage == 1
    # plain DDP keeps per-phase clipping
    load_config(None, ["train.phases.gen.max_grad_norm=1.0"])
