"""DeepSpeed ZeRO-2 for both models (Accelerate's multi-model DeepSpeed, one plugin per model), two CPU
processes: all three NoGAN phases through the project's Trainer end with the same parameters as plain DDP on
the same per-rank batches, and a checkpoint saved mid-run under DeepSpeed resumes to the same end.

The DDP run is the one test_distributed.py compares with one process (conftest's ddp_two_processes): the same
config (tests/ddp_runner.py), the same per-rank batches, synchronised batch norm in both."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_dejpeg.config import ConfigError, load_config
from dist_dejpeg.train import checkpoint as ckpt

from ddp_runner import launch_two, write_config

pytest.importorskip("deepspeed")


def weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(run_dir / f"{name}.safetensors")) for name in ("generator", "critic")}


@pytest.mark.slow
def test_zero2_two_processes_match_ddp_and_resume(tmp_path, sample_shards, ddp_two_processes):
    ds = write_config(tmp_path, sample_shards, "ds", "train.deepspeed_stage=2")
    launch_two(ds, deepspeed=True)

    # (a) the DeepSpeed run finishes all three phases and writes its results
    metrics = json.loads((tmp_path / "ds" / "metrics.json").read_text())
    assert metrics["meta"]["global_step"] == 8
    assert (tmp_path / "ds" / "generator.safetensors").is_file()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "ds")] == [f"step-{s:08d}" for s in (3, 5, 6, 8)]

    # (b) the same parameters as DDP, within the float tolerance of test_distributed.py (Adam turns
    # summation-order noise in near-zero gradients into a fraction of one lr-sized step)
    a, b = weights(tmp_path / "ds"), weights(ddp_two_processes[1])
    for model in a:
        assert a[model].keys() == b[model].keys()
        for key in a[model]:
            torch.testing.assert_close(a[model][key], b[model][key], rtol=1e-3, atol=1e-4,
                                       msg=lambda m: f"{model} {key}: {m}")

    # (b2) every rank kept the generator's EMA, and the ranks' EMAs are the same, under ZeRO-2 as under DDP
    for run in (tmp_path / "ds", ddp_two_processes[1]):
        r0, r1 = (load_file(str(run / f"ema_rank{r}.safetensors")) for r in (0, 1))
        assert r0.keys() == r1.keys() and r0["num_updates"].item() == 1  # the gan phase's own average: 1 of its 3 steps
        assert all(torch.equal(r0[k], r1[k]) for k in r0), f"{run.name}: the ranks' EMAs differ"

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
