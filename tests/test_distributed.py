"""Two CPU processes (gloo) under `accelerate launch`: all phases run, and validation metrics are reduced
over ranks with every image counted once (the JPEG-input metrics do not depend on the model, so they must
equal a one-process run's)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def tiny_overrides(run_dir: Path, shards: Path) -> list[str]:
    return [f"train.run_dir={run_dir}", f"data.root={shards}", "data.backend=torch", "data.crop=32", "data.batch_size=2",
            "data.num_workers=0", "data.val_crop=32", "data.val_max_images=7", "model.encoder=mobilenetv3_small_050",
            "model.pretrained=false", "model.decoder_width=16", "critic.width=8", "critic.n_blocks=2",
            "loss.lpips_pretrained=false", "train.mixed_precision=no", "train.progress=false", "train.val_every=0",
            "train.phases.gen.steps=2", "train.phases.critic.steps=2", "train.phases.gan.steps=2",
            "train.phases.gan.val_every=1"]


def run(cmd: list[str], env: dict) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_reduce_validation_without_double_counting(tmp_path, sample_shards):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    # `--cpu --num_processes 2` would start one process; --multi_gpu with ACCELERATE_USE_CPU starts two (gloo)
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dist_dejpeg.cli",
         "train", *tiny_overrides(tmp_path / "two", sample_shards)], env)
    run([sys.executable, "-m", "dist_dejpeg.cli", "train", *tiny_overrides(tmp_path / "one", sample_shards)], env)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two["meta"]["val_images_per_quality"] == one["meta"]["val_images_per_quality"] == 7
    assert two["meta"]["global_step"] == 6
    for q in ("q10", "q20", "q40"):
        for metric in ("psnr", "ssim"):
            assert two[q]["jpeg"][metric] == pytest.approx(one[q]["jpeg"][metric], rel=1e-9, abs=1e-9)
