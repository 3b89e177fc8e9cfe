"""Shared fixtures: a small set of sample shards (written once per session), a tar writer for odd shards,
and the ``gpu`` marker turning into a skip on machines without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
