"""The DALI pipeline, CPU-only (device_id=None) here and on CI; GPU checks carry the `gpu` marker.

Same shards as the torch loader: the batch contract, determinism, rank sharding, the libjpeg peer check,
index files, and a training run with data.backend=dali."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

dali = pytest.importorskip("dist_dejpeg.data.dali")
if not dali.HAVE_DALI:  # pragma: no cover - CI installs DALI with the test extra
    pytest.skip("NVIDIA DALI is not installed (pip install -e '.[test]' installs it)", allow_module_level=True)

from dist_dejpeg.data.dali import DaliLoader  # noqa: E402
from dist_dejpeg.data.images import jpeg_roundtrip  # noqa: E402
from dist_dejpeg.data.index import check_indexes, index_path, write_index  # noqa: E402
from dist_dejpeg.data.reading import shard_keys  # noqa: E402
from dist_dejpeg.data.shards import list_shards  # noqa: E402

TILE = 96  # conftest's sample_shards tile size


def train_shards(root: Path) -> list[str]:
    return list_shards(root, "train-*.tar")


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append({k: v.clone() for k, v in batch.items()})
        if len(out) == n:
            return out
    return out


def one_epoch(loader: DaliLoader) -> list[np.ndarray]:
    """Every clean crop (H x W x 3 uint8, as the pipeline emits it) of one pass of the loader's reader
    shard (batch size 1, so nothing is dropped)."""
    return [out["clean"][0].numpy() for (out,) in loader._build(endless=False)]


def u8(x: torch.Tensor) -> np.ndarray:
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_batch_contract(sample_shards):
    batch = take(DaliLoader(train_shards(sample_shards), 64, (10, 40), 4, num_threads=1), 1)[0]
    assert set(batch) == {"jpeg", "clean", "quality"}
    for key in ("jpeg", "clean"):
        assert batch[key].shape == (4, 3, 64, 64) and batch[key].dtype == torch.float32
        assert 0.0 <= batch[key].min() and batch[key].max() <= 1.0
    assert batch["quality"].dtype == torch.int64 and batch["quality"].shape == (4,)
    assert ((10 <= batch["quality"]) & (batch["quality"] <= 40)).all()
    assert not torch.equal(batch["jpeg"], batch["clean"])


def test_fixed_seed_is_deterministic(sample_shards):
    def batches(seed):
        return take(DaliLoader(train_shards(sample_shards), 32, (10, 40), 4, seed=seed, num_threads=2), 3)

    a, b, c = batches(0), batches(0), batches(1)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not all(torch.equal(x["clean"], z["clean"]) for x, z in zip(a, c))


def test_resume_is_deterministic_and_does_not_replay(sample_shards):
    """What the DALI loader guarantees on resume (the torch loader resumes sample-exactly): restarting from a
    saved state gives the same batches every time, and does not replay the batches already consumed."""
    def loader():
        return DaliLoader(train_shards(sample_shards), 32, (10, 40), 4, seed=3, num_threads=1)

    uninterrupted = take(loader(), 3)
    state = {"consumed": 3, "backend": "dali"}  # what a checkpoint after 3 batches holds
    resumed = []
    for _ in range(2):
        again = loader()
        again.load_state_dict(state)
        resumed.append(take(again, 2))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(*resumed) for k in x), "resume must be deterministic"
    assert not any(torch.equal(r["clean"], u["clean"]) for r in resumed[0] for u in uninterrupted), \
        "a resume must not replay the batches already consumed"
    assert again.state_dict()["consumed"] == 3 + 2


def test_two_ranks_see_disjoint_samples_that_cover_the_set(sample_shards):
    """Each rank's epoch: its own samples, as many batches as the other rank (DDP steps in lockstep), together the
    whole set but the remainder of an uneven split (total % ranks samples)."""
    shards = train_shards(sample_shards)
    total = sum(len(shard_keys(s)) for s in shards)
    seen, counts = [], []
    for rank in (0, 1):
        loader = DaliLoader(shards, TILE, (50, 50), 1, rank=rank, world=2, augment=False, num_threads=1)
        epoch = one_epoch(loader)
        counts.append(len(epoch))
        seen.append({hashlib.sha1(t.tobytes()).hexdigest() for t in epoch})
    assert not seen[0] & seen[1]
    assert counts == [total // 2] * 2 and [len(s) for s in seen] == counts, (counts, total)
    assert len(seen[0]) + len(seen[1]) == total - total % 2


@pytest.mark.parametrize("quality", [10, 50])
def test_cpu_distortion_matches_libjpeg(sample_shards, quality):
    loader = DaliLoader(train_shards(sample_shards)[:1], TILE, (quality, quality), 4, augment=False, num_threads=1)
    batch = take(loader, 1)[0]
    for jpeg, clean in zip(batch["jpeg"], batch["clean"]):
        assert np.array_equal(u8(jpeg), jpeg_roundtrip(u8(clean), quality))


def test_degradation_weakens_as_quality_rises(sample_shards):
    psnrs = []
    for q in (10, 20, 40, 80):
        batch = take(DaliLoader(train_shards(sample_shards)[:1], TILE, (q, q), 8, augment=False, num_threads=1), 1)[0]
        mse = (batch["jpeg"] - batch["clean"]).pow(2).mean().item()
        psnrs.append(10 * np.log10(1 / mse))
    assert psnrs == sorted(psnrs) and psnrs[-1] - psnrs[0] > 5


def test_rotate90_is_np_rot90():
    """The pipeline's turn is exact: a DALI-rotated image equals np.rot90 of it with k = angle / 90, pixel for
    pixel, for every angle drawn (non-square content inside the square, so a wrong direction shows)."""
    from nvidia.dali import fn, pipeline_def

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(16)]

    @pipeline_def(batch_size=16, num_threads=1, device_id=None, seed=5)
    def turn():
        source = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        angle = fn.random.choice([0.0, 90.0, 180.0, 270.0])
        return dali.rotate90(source, angle), angle

    pipe = turn()
    pipe.build()
    turned, angles = pipe.run()
    ks = [int(float(np.array(angles[i])) // 90) for i in range(16)]
    assert set(ks) == {0, 1, 2, 3}
    for i, k in enumerate(ks):
        assert np.array_equal(np.array(turned[i]), np.rot90(images[i], k)), (i, k)


def test_rot90_turns_the_crop_before_degrading_it(sample_shards):
    """data.rot90 in the pipeline: each clean crop is a 90-degree turn of the crop the same seed gives without
    it, all four turns occur, and the JPEG input is the turned crop degraded (libjpeg's pixels)."""
    def batches(**knobs):
        return take(DaliLoader(train_shards(sample_shards), 32, (10, 40), 8, seed=2, num_threads=1, **knobs), 3)

    seen = set()
    for plain, turned in zip(batches(), batches(rot90=True)):
        for clean, rotated, jpeg, q in zip(plain["clean"], turned["clean"], turned["jpeg"], turned["quality"]):
            seen.add(next(k for k in range(4) if np.array_equal(u8(rotated), np.rot90(u8(clean), k))))
            assert np.array_equal(u8(jpeg), jpeg_roundtrip(u8(rotated), int(q)))
    assert seen == {0, 1, 2, 3}


def test_channel_shuffle_reorders_the_crop_before_degrading_it(sample_shards):
    """data.channel_shuffle 1 in the pipeline: each clean crop is the crop the same seed gives without it with its
    RGB planes in one of the 6 orders, several orders occur, and the JPEG input is the reordered crop degraded."""
    import itertools

    orders = list(itertools.permutations(range(3)))

    def batches(**knobs):
        return take(DaliLoader(train_shards(sample_shards), 32, (10, 40), 8, seed=2, num_threads=1, **knobs), 4)

    seen = set()
    for plain, shuffled in zip(batches(), batches(channel_shuffle=1.0)):
        for clean, reordered, jpeg, q in zip(plain["clean"], shuffled["clean"], shuffled["jpeg"], shuffled["quality"]):
            a, b = u8(clean), u8(reordered)
            order = next(o for o in orders if np.array_equal(b, a[:, :, list(o)]))
            if not (np.array_equal(a[:, :, 0], a[:, :, 1]) and np.array_equal(a[:, :, 1], a[:, :, 2])):
                seen.add(order)  # (a gray crop looks the same in every order)
            assert np.array_equal(u8(jpeg), jpeg_roundtrip(b, int(q)))
    assert len(seen) >= 3, seen


def test_quality_power_draws_more_heavy_compression(sample_shards):
    """data.quality_power 2 in the pipeline: 512 qualities in 10..40 with a mean near the torch loader's expected
    ~18.0 (far below uniform's 25); at 0 (the default) the batches are those of a loader built without it."""
    from dist_dejpeg.data.contract import quality_weights

    values, p = quality_weights(10, 40, 2.0)
    loader = DaliLoader(train_shards(sample_shards), 32, (10, 40), 32, seed=4, num_threads=2, quality_power=2.0)
    qualities = torch.cat([b["quality"] for b in take(loader, 16)]).numpy()
    assert len(qualities) == 512 and 10 <= qualities.min() and qualities.max() <= 40
    assert abs(qualities.mean() - float((values * p).sum())) < 1.5 and qualities.mean() < 21
    assert np.bincount(qualities).argmax() == 10

    def two(**knobs):
        return take(DaliLoader(train_shards(sample_shards), 32, (10, 40), 4, seed=4, num_threads=1, **knobs), 2)

    for a, b in zip(two(), two(quality_power=0.0, rot90=False, channel_shuffle=0.0)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_knobs_reach_the_dali_loader(sample_shards):
    from dist_dejpeg.config import load_config
    from dist_dejpeg.data import build_train_loader

    cfg = load_config(None, [f"data.root={sample_shards}", "data.backend=dali", "data.dali_threads=1", "data.crop=64",
                             "data.quality_power=1.5", "data.rot90=true"])
    loader = build_train_loader(cfg, 0, 1, torch.device("cpu"))
    assert isinstance(loader, DaliLoader) and (loader.quality_power, loader.rot90) == (1.5, True)


def test_index_files_written_at_prepare_and_checked(tmp_path, caplog):
    from dist_dejpeg.data.shards import prepare_samples

    prepare_samples(tmp_path, tile=64, train_step=64, shard_size=64)
    shards = train_shards(tmp_path)
    assert check_indexes(shards) == [str(index_path(s)) for s in shards]
    batch = take(DaliLoader(shards, 32, (10, 40), 2, num_threads=1), 1)[0]
    assert batch["jpeg"].shape == (2, 3, 32, 32)
    # an index older than its tar (as `cp -r` leaves a copy, in copy order) or a partial set: named in a warning,
    # and the loader reads through index files written from its own scan (it refused to start)
    old = time.time() - 3600
    os.utime(index_path(shards[0]), (old, old))
    with caplog.at_level(logging.WARNING):
        loader = DaliLoader(shards, 32, (10, 40), 2, num_threads=1)
    assert f"{index_path(shards[0])} is older than its tar" in caplog.text
    assert loader.index_paths and not set(loader.index_paths) & {str(index_path(s)) for s in shards}
    assert take(loader, 1)[0]["jpeg"].shape == (2, 3, 32, 32)
    write_index(shards[0])
    index_path(shards[1]).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert take(DaliLoader(shards, 32, (10, 40), 2, num_threads=1), 1)[0]["jpeg"].shape == (2, 3, 32, 32)
    assert f"{index_path(shards[1])} is missing" in caplog.text


def test_sample_without_image_is_skipped(tmp_path, write_tar):
    good = []
    for i in range(5):
        buf = io.BytesIO()
        Image.fromarray(np.full((48, 48, 3), 40 * i, np.uint8)).save(buf, "PNG")
        good.append((f"img{i}", {"png": buf.getvalue()}))
    path = tmp_path / "train-000000.tar"
    write_tar(path, good[:2] + [("notes", {"txt": b"no image here"})] + good[2:])
    seen = one_epoch(DaliLoader([str(path)], 32, (50, 50), 1, augment=False, num_threads=1))
    assert len(seen) == 5


def test_training_runs_with_the_dali_backend(tmp_path, sample_shards):
    """The debug recipe, shortened, with data.backend=dali on the CPU."""
    import json

    from accelerate.state import AcceleratorState, GradientState

    from dist_dejpeg.cli import main

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    config = Path(__file__).parents[1] / "configs" / "debug.yaml"
    rc = main(["train", "--config", str(config), "data.backend=dali", f"data.root={sample_shards}",
               f"train.run_dir={tmp_path / 'run'}", "train.progress=false", "data.dali_threads=1",
               "model.encoder=mobilenetv3_small_050", "model.decoder_width=16", "data.val_max_images=4",
               "train.phases.gen.steps=3", "train.phases.critic.steps=2", "train.phases.gan.steps=2",
               "train.phases.gan.val_every=1", "train.processes=1"])
    assert rc == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["meta"]["global_step"] == 7
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/loader_0.json")).read_text())
    assert state["backend"] == "dali" and state["consumed"] > 0


# -- GPU ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_pipeline_contract_on_cuda(sample_shards):
    batch = take(DaliLoader(train_shards(sample_shards), 64, (10, 40), 8, device=torch.device("cuda")), 1)[0]
    assert batch["jpeg"].is_cuda and batch["jpeg"].shape == (8, 3, 64, 64) and batch["quality"].is_cuda


@pytest.mark.gpu
@pytest.mark.parametrize("quality", [10, 20, 40, 80])
def test_gpu_distortion_within_half_a_db_of_libjpeg(sample_shards, quality):
    loader = DaliLoader(train_shards(sample_shards)[:2], TILE, (quality, quality), 16, augment=False,
                        device=torch.device("cuda"))
    batch = take(loader, 1)[0]
    ours, peer = [], []
    for jpeg, clean in zip(batch["jpeg"].cpu(), batch["clean"].cpu()):
        ref = jpeg_roundtrip(u8(clean), quality).astype(np.float64) / 255
        target = clean.permute(1, 2, 0).numpy().astype(np.float64)
        ours.append(np.mean((jpeg.permute(1, 2, 0).numpy() - target) ** 2))
        peer.append(np.mean((ref - target) ** 2))
    gap = 10 * np.log10(np.mean(peer) / np.mean(ours))
    assert abs(gap) < 0.5, f"DALI GPU vs libjpeg at q{quality}: {gap:+.3f} dB"


@pytest.mark.parametrize("fmt", ["png", "raw", "jp2"])
def test_every_shard_format_reads_back_losslessly_in_both_backends(tmp_path, fmt):
    """The manifest's format is all a loader needs; DALI and the torch path see the same pixels."""
    from dist_dejpeg.data.images import decode_component, image_bytes
    from dist_dejpeg.data.shards import prepare_samples
    from dist_dejpeg.data.torch_loader import load_val_set

    manifest = prepare_samples(tmp_path, tile=64, train_step=64, shard_size=64, fmt=fmt)
    assert manifest["format"] == fmt
    val = list_shards(tmp_path, "val-*.tar")
    import webdataset as wds

    tiles = [decode_component(*image_bytes(s)) for s in wds.tariterators.tarfile_samples([{"url": v} for v in val]) if s]
    loader = DaliLoader(val, 64, (50, 50), 1, augment=False, num_threads=1)
    from_dali = sorted(t.tobytes() for t in one_epoch(loader))
    assert from_dali == sorted(t.tobytes() for t in tiles)
    sets, _ = load_val_set(val, 64, [50])
    from_torch = sorted(c.permute(1, 2, 0).numpy().tobytes() for c in sets[50][1])
    assert from_torch == from_dali


def test_truncated_tar_is_an_error_naming_the_file(tmp_path):
    from dist_dejpeg.data.shards import prepare_samples

    prepare_samples(tmp_path, tile=64, train_step=64, shard_size=64)
    shards = train_shards(tmp_path)
    data = Path(shards[0]).read_bytes()
    Path(shards[0]).write_bytes(data[: len(data) // 2])
    for s in shards:
        index_path(s).unlink()
    with pytest.raises(RuntimeError, match=Path(shards[0]).name):
        take(DaliLoader(shards, 32, (10, 40), 4, num_threads=1), 1)


def test_raw_shards_without_their_manifest_are_read(tmp_path):
    """Raw training shards copied without manifest.json (``cp data/x/train-*.tar /scratch``): every tile was a bad
    sample ("no image component DALI reads (has ['raw'])") and the run stopped; the torch loader read them. The
    tile side now comes from the shards; a PNG shard among raw ones is named as the other kind."""
    from dist_dejpeg.data.shards import prepare_samples

    prepare_samples(tmp_path / "raw", tile=64, train_step=64, shard_size=64, fmt="raw")
    prepare_samples(tmp_path / "png", tile=64, train_step=64, shard_size=64, fmt="png")
    (tmp_path / "raw" / "manifest.json").unlink()
    shards = train_shards(tmp_path / "raw")
    loader = DaliLoader(shards, 32, (10, 40), 2, num_threads=1, max_bad_samples=0)
    assert loader.raw_tile == 64 and take(loader, 1)[0]["clean"].shape == (2, 3, 32, 32)
    source, png = train_shards(tmp_path / "png")[0], str(tmp_path / "raw" / "train-000099.tar")
    os.replace(index_path(source), index_path(png))
    os.replace(source, png)  # after its index: the index must not be older than the tar
    mixed = DaliLoader(shards + [png], 32, (10, 40), 2, num_threads=1, max_bad_samples=-1)
    assert mixed.skipped()["no_image"] == len(shard_keys(png))


def test_a_shuffle_buffer_of_zero_does_not_crash_the_process(sample_shards):
    """data.shuffle_buffer=0 (the torch loader: no shuffling) became DALI's initial_fill 0: a segfault at the first
    batch, no message. Run in a child process, so that a crash fails this test only."""
    import subprocess
    import sys

    script = ("from dist_dejpeg.data.dali import DaliLoader\n"
              "from dist_dejpeg.data.shards import list_shards\n"
              f"loader = DaliLoader(list_shards({str(sample_shards)!r}, 'train-*.tar'), 32, (10, 40), 2, "
              "num_threads=1, initial_fill=0)\n"
              "print(tuple(next(iter(loader))['clean'].shape))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "(2, 3, 32, 32)" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_raw_shards_under_a_stale_manifest_are_read(tmp_path):
    """A manifest.json saying PNG tiles of another size (the shards rewritten as raw 64 px tiles since): DALI reads
    the tiles as the shards hold them; by the manifest every one was a bad sample and the run stopped."""
    import json

    from dist_dejpeg.data.shards import prepare_samples

    prepare_samples(tmp_path, tile=64, train_step=64, shard_size=64, fmt="raw")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, format="png", tile=128)))
    loader = DaliLoader(train_shards(tmp_path), 32, (10, 40), 2, num_threads=1, max_bad_samples=0)
    assert loader.raw_tile == 64 and take(loader, 1)[0]["clean"].shape == (2, 3, 32, 32)
