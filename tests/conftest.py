"""Shared fixtures: a small set of sample shards (written once per session), a tar writer for odd shards,
and the ``gpu`` marker turning into a skip on machines without CUDA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two pytest-xdist workers on a 2-core machine: one thread each (and in the processes they start), or
    # OpenMP's spinning threads oversubscribe the cores and small runs slow down many times over
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tests that start several processes: they rendezvous on accelerate's fixed port (29500) or submit jobs to the
# one local SLURM, and test_distributed/test_deepspeed share one session-scoped 2-process run, so under
# pytest-xdist they all run on one worker, one after another (the scheduler below).
# (test_slurm.py's tests of the scripts with stand-ins for srun start no rank and submit nothing: only the three
# that submit to the cluster are in the group, ~30 s less on its one worker)
PROCESS_GROUP = ("tests/test_distributed.py", "tests/test_deepspeed.py", "tests/test_slurm.py::test_two_node_job",
                 "tests/test_slurm.py::test_usr1_checkpoints", "tests/test_slurm.py::test_a_dead_rank_ends",
                 "tests/test_faults_ranks.py", "tests/test_bench.py::test_bench_scaling_launches_one_and_two_processes")

# Tests that share an expensive module-scoped fixture: one scope per file, so that one worker builds it once
# (test_onnx's export takes ~25 s, test_gpu_check's wheel folder ~20 s: per worker, each was paid twice).
SHARED_FIXTURE_FILES = ("tests/test_onnx.py", "tests/test_gpu_check.py")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: ignored where xdist is not installed
def pytest_xdist_make_scheduler(config, log):
    """xdist's load-by-scope scheduling with one scope per test, except PROCESS_GROUP's tests (one scope) and
    SHARED_FIXTURE_FILES' (one per file).
    (xdist's own ``--dist loadgroup`` marks groups by renaming node ids, which pytest 9.2 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ProcessTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(PROCESS_GROUP):
                return "processes"
            return nodeid.split("::")[0] if nodeid.startswith(SHARED_FIXTURE_FILES) else nodeid

    return ProcessTestsTogether(config, log)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    """train-*.tar, val-*.tar and manifest.json of 96 px tiles (non-overlapping), 16 samples per shard."""
    from dist_dejpeg.data.shards import prepare_samples

    out = tmp_path_factory.mktemp("sample_shards")
    prepare_samples(out, tile=96, train_step=96, shard_size=16)
    return out


def _write_tar(path, samples) -> Path:
    """Write a webdataset tar from [(key, {ext: bytes}), ...]; returns the path."""
    import webdataset as wds

    path = Path(path)
    with wds.TarWriter(str(path)) as sink:
        for key, components in samples:
            sink.write({"__key__": key, **components})
    return path


@pytest.fixture
def write_tar():
    """``write_tar(path, [(key, {ext: bytes}), ...])`` -> path, for building small (possibly bad) shards."""
    return _write_tar


@pytest.fixture(scope="session")
def ddp_two_processes(tmp_path_factory, sample_shards) -> tuple[Path, Path]:
    """One 2-process DDP (gloo) run of tests/ddp_runner.py's shared config, compared with a 1-process run by
    test_distributed.py and with a DeepSpeed run by test_deepspeed.py. Returns (folder, run folder)."""
    from ddp_runner import launch_two, write_config

    folder = tmp_path_factory.mktemp("two_processes")
    launch_two(write_config(folder, sample_shards, "ddp"))
    return folder, folder / "ddp"


@pytest.fixture
def resume_with(tmp_path):
    """``resume_with(model)``: a checkpoint folder of a run trained with ``model`` (a ModelConfig; its config.yaml),
    and a function that checks resuming it with another model config (train/resume.py's check_resume_config: one
    process, no batch flag), returning what that returns or raising its ConfigError."""
    import dataclasses

    import yaml

    from dist_dejpeg.config import Config, to_dict
    from dist_dejpeg.train.resume import check_resume_config

    def trained_with(model):
        checkpoint = tmp_path / "step-00000004"
        checkpoint.mkdir()
        trained = Config(model=model)
        (checkpoint / "config.yaml").write_text(yaml.safe_dump(to_dict(trained)))
        state = {"phase_names": list(trained.train.order)}
        return lambda other: check_resume_config(dataclasses.replace(trained, model=other), checkpoint, state, 1, False)

    return trained_with
