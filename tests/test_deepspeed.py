"""DeepSpeed ZeRO-2 for both models (Accelerate's multi-model DeepSpeed, one plugin per model), two CPU
processes: all three NoGAN phases through the project's Trainer end with the same parameters as plain DDP on
the same per-rank batches, and a checkpoint saved mid-run under DeepSpeed resumes to the same end; with
channels_last and an inf batch, both ranks stop at once with every saved tensor finite.

The DDP run is the one test_distributed.py compares with one process (conftest's ddp_two_processes): the same
config (tests/ddp_runner.py), the same per-rank batches, synchronised batch norm in both."""

import json
import re
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
    # (a2) a checkpoint of a DeepSpeed run restores, exports and starts init_from as any other (before its end
    # there is no generator.safetensors): the generator's model.safetensors beside the engines' files
    from dist_dejpeg.models.generator_file import load_model

    generator, info = load_model(tmp_path / "ds" / "checkpoints" / f"step-{5:08d}")
    assert info["format"] == "checkpoint" and generator(torch.rand(1, 3, 64, 48)).shape == (1, 3, 64, 48)

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


def test_a_deepspeed_engine_runs_its_model_in_bf16_where_autocast_is_on_outside(monkeypatch):
    """DeepSpeed's engine forward (autocast_if_enabled) switches autocast off inside where its config has no
    torch_autocast section and autocast is on outside, as the steps' is on CUDA: the generator ran in fp32 there.
    Its forward autocasts itself (zero.autocast_forward): bf16 inside, fp32 out, as DDP's prepared model. The CPU
    answers torch.is_autocast_enabled() False (it asks about CUDA): CUDA's answer emulated here."""
    import deepspeed.runtime.torch_autocast as ds_autocast

    from dist_dejpeg.train.zero import autocast_forward

    class Engine:  # the project's DeepSpeed config: no torch_autocast section
        def torch_autocast_enabled(self):
            return False

    def inner_dtype(model):
        seen = []
        handle = model[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        real = torch.is_autocast_enabled
        monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: real(*a) if a else real("cpu"))
        monkeypatch.setattr(ds_autocast, "_WARNED_NESTED_AUTOCAST", True)  # (its warning asks the process group)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16), ds_autocast.autocast_if_enabled(Engine()):
                out = model(torch.randn(2, 3, 8, 8))
        finally:
            monkeypatch.undo()
            handle.remove()
        return seen[0], out.dtype

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    assert inner_dtype(model) == (torch.float32, torch.float32)  # the engine's autocast off: fp32 throughout
    autocast_forward(model, "cpu")
    assert inner_dtype(model) == (torch.bfloat16, torch.float32)
    copied = __import__("copy").deepcopy(model)  # bound to its module: a copy runs its own weights
    torch.nn.init.zeros_(copied[0].weight)
    torch.nn.init.zeros_(copied[0].bias)
    assert not copied(torch.randn(1, 3, 8, 8)).any()


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


def test_deepspeed_without_a_launcher_is_a_config_error(tmp_path, monkeypatch):
    """One process that no launcher started: Accelerate sets no process group up for DeepSpeed, and the
    Accelerator failed with a raw "Default process group has not been initialized" traceback."""
    from dist_dejpeg.train.build import build_accelerator

    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(None, ["train.deepspeed_stage=2", f"train.run_dir={tmp_path / 'run'}", "train.log_with=[]"])
    with pytest.raises(ConfigError, match="train.deepspeed_stage.*needs a launcher.*torchrun.*train.processes"):
        build_accelerator(cfg)


def test_unwrap_takes_the_model_from_under_ddp_itself_and_leaves_deepspeed_to_accelerate():
    """Accelerate's unwrap_model imports DeepSpeed wherever it is installed, to test for an engine: 2-3 s of every
    training process's start (every rank's) on a 2-core CPU, for runs without DeepSpeed. The trainer's unwrap takes
    the model from under DDP itself there; DeepSpeed's engines, FSDP and a model Accelerate compiled go to
    Accelerate."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from dist_dejpeg.train.build import unwrap

    model, asked = torch.nn.Linear(2, 2), []
    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU,
                          unwrap_model=lambda m: asked.append(m) or "accelerate's")
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        acc.distributed_type = kind
        assert unwrap(acc, model) is model and unwrap(acc, torch.nn.DataParallel(model)) is model
    assert asked == []
    compiled = torch.nn.Module()  # as torch.compile's OptimizedModule holds the model (Accelerate re-wraps it)
    compiled._orig_mod = model
    assert unwrap(acc, compiled) == "accelerate's"
    for kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        acc.distributed_type = kind
        assert unwrap(acc, model) == "accelerate's"
    assert len(asked) == 3

    class Reset:  # an Accelerator whose state was reset after its run (a finished trainer's models read again)
        unwrap_model = staticmethod(acc.unwrap_model)

        @property
        def distributed_type(self):
            raise AttributeError("`AcceleratorState` object has no attribute `distributed_type`")

    class Engine(torch.nn.Module):  # as DeepSpeed's engine: its class's module is deepspeed's
        __module__ = "deepspeed.runtime.engine"

    assert unwrap(Reset(), torch.nn.DataParallel(model)) is model and len(asked) == 3
    assert unwrap(Reset(), Engine()) == "accelerate's" and len(asked) == 4


# rank 0's sixth batch (the second micro-batch of the third update, grad_accum 2) gets an inf pixel
INF_RUNNER = """
import sys
import ddp_runner

fixed = ddp_runner.fixed_batches

def with_inf(n, global_batch, crop, rank, world):
    batches = fixed(n, global_batch, crop, rank, world)
    if rank == 0:
        batches[5]["jpeg"][0, 0, 0, 0] = float("inf")
    return batches

ddp_runner.fixed_batches = with_inf
ddp_runner.run(sys.argv[1], int(sys.argv[2]))
"""


def _deepspeed_files(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every floating tensor of the DeepSpeed engines' files (models and ZeRO partitions) under ``run_dir``."""
    found = {}

    def walk(value, name):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            found[name] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{name}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{name}.{i}")

    for path in sorted(run_dir.rglob("*.pt")):  # DeepSpeed pickles its loss scaler: not weights_only
        walk(torch.load(path, map_location="cpu", weights_only=False), str(path.relative_to(run_dir)))
    for path in sorted(run_dir.rglob("*.safetensors")):
        found.update({f"{path.relative_to(run_dir)}:{k}": v for k, v in load_file(str(path)).items()})
    return found


def test_zero2_channels_last_stops_on_an_inf_batch_with_the_last_good_state(tmp_path, sample_shards):
    """ZeRO-2 with model.channels_last (the debug and div2k recipes' setting: DeepSpeed's engine failed to start,
    "self.stride(-1) must be 1 to view Float as Byte") and grad_accum 2; an inf pixel in rank 0's second
    micro-batch of update 3 (through sync batch norm, rank 1's statistics too) stops both ranks at once with the
    project's message, the state after update 2 saved (its step saved again), and every tensor on disk finite."""
    import os
    import subprocess
    import sys

    runner = tmp_path / "inf_runner.py"
    runner.write_text(INF_RUNNER)
    config = write_config(tmp_path, sample_shards, "inf", "train.deepspeed_stage=2", "model.channels_last=true",
                          "train.order=[gen]", "train.phases.gen.steps=4", "train.grad_accum=2", "train.ckpt_every=1")
    tests = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(tests))
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(tests.parent / "launch" / "accelerate" / "cpu_multi.yaml"), str(runner), str(config),
                           "8"], cwd=tests.parent, env=env, capture_output=True, text=True, timeout=300)
    run = tmp_path / "inf"
    assert done.returncode != 0
    assert "self.stride(-1)" not in done.stderr, done.stderr[-3000:]
    assert re.search(r"training stopped: non-finite gen loss.*non-finite values in the batch's jpeg.*at step 2 "
                     r"\(global step 2\); the state before that step is saved in \S+step-00000002", done.stderr), \
        done.stderr[-3000:]
    assert done.stderr.count("TrainingStopped: training stopped") == 2  # rank 1 with it, not at a timeout
    assert "ERROR dist_dejpeg: training stopped" in (tmp_path / "inf" / "train.log").read_text()  # (rank 0's)
    assert "mismatch" not in done.stderr and "engine reference" not in done.stderr  # accelerate's false alarms
    assert [p.name for p in ckpt.list_checkpoints(run)] == [f"step-{s:08d}" for s in (1, 2)]
    assert json.loads((run / "progress.json").read_text())["status"] == "stopped"
    tensors = _deepspeed_files(run / "checkpoints")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    assert len(tensors) > 100 and not bad, bad[:5]
