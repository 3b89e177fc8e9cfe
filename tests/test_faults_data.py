"""Fault 5 of issue 21: one bad sample must not end a run, and many must.

A shard with a truncated PNG and a 16 px tile among good tiles: the DALI loader (CPU) leaves both out and
counts them (DALI cannot skip a sample it fails to decode, so its loader checks every sample before the first
batch: data/verify.py); the torch loader skips and counts them as it meets them; over data.max_bad_samples
both stop with the count and the reasons."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from dist_dejpeg.config import load_config
from dist_dejpeg.data import build_train_loader
from dist_dejpeg.data.dali import HAVE_DALI
from dist_dejpeg.data.torch_loader import SKIP_REASONS, ShardStream, TorchLoader
from dist_dejpeg.data.verify import TooManyBadSamples, scan_path

requires_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install -e '.[test]')")

CPU = torch.device("cpu")
CROP = 32
N_GOOD = 6


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def good_tiles() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(N_GOOD)]


@pytest.fixture
def bad_shard(tmp_path, write_tar):
    """A shard of six good 48 px PNG tiles, a truncated PNG and a 16 px tile (2 bad samples)."""
    tiles = good_tiles()
    full = png(tiles[0])
    samples = [(f"good{i}", {"png": png(t)}) for i, t in enumerate(tiles)]
    bad = [("truncated0", {"png": full[: len(full) // 2]}),
           ("small0", {"png": png(np.full((16, 16, 3), 90, np.uint8))})]
    return str(write_tar(tmp_path / "train-000000.tar", samples[:2] + bad[:1] + samples[2:4] + bad[1:] + samples[4:]))


def digest(rgb: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).hexdigest()


def dali_epoch(loader) -> list[np.ndarray]:
    """Every crop of one pass of a DaliLoader (batch size 1, centred crops: ``augment=False``)."""
    return [out["clean"][0].numpy() for (out,) in loader._build(endless=False)]


# -- DALI ---------------------------------------------------------------------------------------------------
@requires_dali
def test_dali_leaves_out_and_counts_a_truncated_png_and_a_small_tile(bad_shard, monkeypatch):
    from dist_dejpeg.data import verify
    from dist_dejpeg.data.dali import DaliLoader

    loader = DaliLoader([bad_shard], CROP, (50, 50), 1, augment=False, num_threads=1, max_bad_samples=2)
    assert loader.skipped() == {"corrupt": 1, "too_small": 1, "no_image": 0, "bad_tar": 0}
    crops = dali_epoch(loader)  # "Critical error in pipeline" before the check
    top = (48 - CROP) // 2
    assert sorted(digest(c) for c in crops) == sorted(digest(t[top:top + CROP, top:top + CROP]) for t in good_tiles())
    batches = [b for _, b in zip(range(4), DaliLoader([bad_shard], CROP, (10, 40), 4, num_threads=1))]
    assert all(b["clean"].shape == (4, 3, CROP, CROP) for b in batches)  # training batches, epoch after epoch
    # the check is cached beside the shard: a second start decodes nothing
    assert scan_path(bad_shard).is_file()
    monkeypatch.setattr(verify, "scan_shard", lambda shard: pytest.fail("scanned again"))
    assert DaliLoader([bad_shard], CROP, (50, 50), 1, num_threads=1, rank=1, world=2).skipped() == \
        dict.fromkeys(SKIP_REASONS, 0)  # counted on rank 0 only: the trainer sums over ranks


@requires_dali
def test_dali_raw_tiles_of_another_size_are_left_out(tmp_path, write_tar):
    """Raw tiles are reshaped to the data set's side without a decode: a 16 px or a cut-off tile is left out."""
    from dist_dejpeg.data.dali import DaliLoader

    tiles = good_tiles()
    samples = [(f"good{i}", {"raw": t.tobytes()}) for i, t in enumerate(tiles)]
    bad = [("small0", {"raw": np.zeros((16, 16, 3), np.uint8).tobytes()}), ("cut0", {"raw": tiles[0].tobytes()[:100]})]
    shard = str(write_tar(tmp_path / "train-000000.tar", bad[:1] + samples + bad[1:]))
    loader = DaliLoader([shard], CROP, (50, 50), 1, augment=False, num_threads=1, raw_tile=48)
    assert loader.skipped() == {"corrupt": 2, "too_small": 0, "no_image": 0, "bad_tar": 0}
    assert len(dali_epoch(loader)) == N_GOOD


@requires_dali
def test_dali_over_the_limit_stops_with_the_count_and_the_samples(bad_shard):
    from dist_dejpeg.data.dali import DaliLoader

    with pytest.raises(TooManyBadSamples, match=r"2 bad training samples .*max_bad_samples=1.*'corrupt': 1, "
                                                r"'too_small': 1.*truncated0.*small0"):
        DaliLoader([bad_shard], CROP, (50, 50), 1, num_threads=1, max_bad_samples=1)


# -- torch --------------------------------------------------------------------------------------------------
def torch_loader(shard: str, num_workers: int, limit: int | None, epochs: int = 1) -> TorchLoader:
    stream = ShardStream([shard], CROP, (10, 40), num_workers=num_workers, shuffle_buffer=4, epochs=epochs,
                         max_bad_samples=limit)
    return TorchLoader(stream, 2, num_workers, CPU)


def test_torch_loader_skips_and_counts_them_within_the_limit(bad_shard):
    # three epochs meet each bad sample three times: the limit is per pass, so 2 bad samples pass a limit of 2
    loader = torch_loader(bad_shard, 0, limit=2, epochs=3)
    assert sum(b["clean"].shape[0] for b in loader) == 3 * N_GOOD
    assert loader.skipped() == {"corrupt": 3, "too_small": 3, "no_image": 0, "bad_tar": 0}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_torch_loader_over_the_limit_stops_with_the_count_and_the_samples(bad_shard, num_workers):
    # two workers read every other sample: each quotes the one it met; the count is over both
    with pytest.raises(TooManyBadSamples, match=r"^2 bad training samples met in epoch 0 .*max_bad_samples=1"
                                                r".*'corrupt': 1, 'too_small': 1.*(truncated0|small0)"):
        list(torch_loader(bad_shard, num_workers, limit=1))


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=requires_dali)])
def test_the_config_key_sets_the_limit_of_either_backend(bad_shard, backend):
    from pathlib import Path

    cfg = load_config(None, [f"data.root={Path(bad_shard).parent}", f"data.backend={backend}", f"data.crop={CROP}", "critic.n_blocks=2",
                             "data.batch_size=2", "data.num_workers=0", "data.dali_threads=1",
                             "data.shuffle_buffer=4", "data.max_bad_samples=1"])
    with pytest.raises(TooManyBadSamples, match="max_bad_samples=1"):
        for _, _ in zip(range(N_GOOD // 2 + 1), build_train_loader(cfg, 0, 1, CPU)):  # into the second pass
            pass
    cfg.data.max_bad_samples = -1  # no limit: skipped and counted
    loader = build_train_loader(cfg, 0, 1, CPU)
    batches = [b for _, b in zip(range(N_GOOD // 2 + 1), loader)]  # into the second pass: both met
    assert all(b["clean"].shape == (2, 3, CROP, CROP) for b in batches)
    assert loader.skipped()["corrupt"] >= 1 and loader.skipped()["too_small"] >= 1


def test_prepare_removes_the_checks_of_shards_it_removes(tmp_path, bad_shard):
    from pathlib import Path

    from dist_dejpeg.data.shards import remove_shards
    from dist_dejpeg.data.verify import scan_shards

    scan_shards([bad_shard])
    assert scan_path(bad_shard).is_file()
    added = Path(bad_shard).with_name("train-extra-000000.tar")  # a shard someone put beside them: not prepare's
    added.write_bytes(Path(bad_shard).read_bytes())
    remove_shards(Path(bad_shard).parent, "train")
    assert not Path(bad_shard).exists() and not scan_path(bad_shard).exists() and added.is_file()


def test_a_process_stopped_by_bad_samples_exits_instead_of_waiting_for_its_workers(bad_shard):
    """DataLoader workers ignore SIGTERM (SLURM signals every process): left running after the error, they
    would block multiprocessing's exit handler for ever."""
    import subprocess
    import sys

    script = ("import torch\n"
              "from dist_dejpeg.data.torch_loader import ShardStream, TorchLoader\n"
              f"stream = ShardStream([{bad_shard!r}], {CROP}, (10, 40), num_workers=2, max_bad_samples=1)\n"
              "for batch in TorchLoader(stream, 2, 2, torch.device('cpu')):\n"
              "    pass\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "TooManyBadSamples: 2 bad training samples" in done.stderr, done.stderr[-2000:]


def test_train_over_the_limit_exits_2_with_one_line(bad_shard, write_tar, tmp_path, capsys):
    """Through the command: the stop is an error line and exit 2 (bad input), not a traceback."""
    from test_trainer import tiny

    from dist_dejpeg.cli import main
    from dist_dejpeg.config import to_yaml

    write_tar(tmp_path / "val-000000.tar", [(f"val{i}", {"png": png(t)}) for i, t in enumerate(good_tiles()[:2])])
    cfg = tiny(tmp_path / "run", tmp_path, "data.max_bad_samples=1", "data.shuffle_buffer=0",
               "data.auto_prepare=none")
    path = tmp_path / "bad.yaml"
    path.write_text(to_yaml(cfg))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "2 bad training samples" in err and "Traceback" not in err


def test_fewer_training_tiles_than_loader_workers_exits_2_with_one_line(write_tar, tmp_path, capsys):
    """Shards without a manifest (made elsewhere) holding 1 training tile for 2 loader workers: the worker's error
    comes back as one line and exit 2, not a RuntimeError wrapped around the worker's traceback (exit 1)."""
    from test_trainer import tiny

    from dist_dejpeg.cli import main
    from dist_dejpeg.config import to_yaml

    tiles = good_tiles()
    write_tar(tmp_path / "train-000000.tar", [("only", {"png": png(tiles[0])})])
    write_tar(tmp_path / "val-000000.tar", [(f"val{i}", {"png": png(t)}) for i, t in enumerate(tiles[1:3])])
    cfg = tiny(tmp_path / "run", tmp_path, "data.num_workers=2", "data.shuffle_buffer=0", "data.auto_prepare=none")
    path = tmp_path / "few.yaml"
    path.write_text(to_yaml(cfg))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: data slot 1 of 2 got no samples in epoch 0" in err and "Traceback" not in err, err[-2000:]


def test_a_process_whose_own_code_fails_mid_epoch_exits_instead_of_waiting_for_its_workers(bad_shard):
    """An error in the consumer (a training step's CUDA OOM, a bug) that escapes with the batch iterator alive in
    its traceback: multiprocessing's exit handler terminates the workers with SIGTERM, which they ignore, and then
    waits for them for ever (a SLURM job idle until its time limit) unless the loader shuts them down first."""
    import subprocess
    import sys

    script = ("import torch\n"
              "from dist_dejpeg.data.torch_loader import ShardStream, TorchLoader\n"
              f"stream = ShardStream([{bad_shard!r}], {CROP}, (10, 40), num_workers=2, max_bad_samples=-1)\n"
              "def fit(loader):\n"
              "    batches = iter(loader)  # a local of the failing frame, kept alive by the traceback\n"
              "    next(batches)\n"
              "    raise KeyError('a bug in the training step')\n"
              "fit(TorchLoader(stream, 2, 2, torch.device('cpu')))\n")
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as err:
        raise AssertionError("the process did not exit within 60 s after its error") from err
    assert done.returncode == 1 and "KeyError: 'a bug in the training step'" in done.stderr, done.stderr[-2000:]


@requires_dali
def test_dali_names_a_shard_whose_corrupt_header_hides_its_other_members(tmp_path, write_tar):
    """Without index files DALI parses the tar itself and fails on the corrupt header with "Current pipeline object
    is no longer valid", and Python's tarfile saw nothing wrong: the check of every sample now names the shard."""
    from test_data import _tar_with_a_corrupt_header

    from dist_dejpeg.data.dali import DaliLoader

    path, _ = _tar_with_a_corrupt_header(write_tar, tmp_path)
    with pytest.raises(RuntimeError, match=rf"{path} is unreadable \(corrupt tar header at byte \d+"):
        DaliLoader([str(path)], CROP, (50, 50), 1, num_threads=1)


@requires_dali
def test_training_on_a_shard_dali_cannot_read_exits_2_with_what_to_do(tmp_path, write_tar, capsys):
    """Through the command (data.backend=dali, which auto picks where DALI is installed): a 32-line traceback and
    exit 1; now one line naming the shard and what to do, exit 2, as any bad input."""
    from test_data import _tar_with_a_corrupt_header
    from test_trainer import tiny

    from dist_dejpeg.cli import main
    from dist_dejpeg.config import to_yaml

    path, _ = _tar_with_a_corrupt_header(write_tar, tmp_path)
    path.rename(tmp_path / "train-000000.tar")
    write_tar(tmp_path / "val-000000.tar", [(f"val{i}", {"png": png(t)}) for i, t in enumerate(good_tiles()[:2])])
    config = tmp_path / "dali.yaml"
    config.write_text(to_yaml(tiny(tmp_path / "run", tmp_path, "data.backend=dali", "data.auto_prepare=none")))
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train-000000.tar is unreadable (corrupt tar header" in err and "Traceback" not in err, err
    assert "Copy it again or `dist-dejpeg prepare` again" in err and "data.backend=torch" in err, err


@pytest.mark.parametrize("change", ["rewritten", "added"])
def test_a_manifest_older_than_its_shards_does_not_judge_them(tmp_path, change):
    """prepare's manifest.json says 3 tiles of 16 px; the shards were then rewritten or added to by hand and hold
    enough 64 px tiles: the start of a run does not refuse them by the stale counts (the loader judges them). A
    copy of the folder (new modification times) is still described by its manifest."""
    import json
    import shutil

    from dist_dejpeg.data.shards import prepare_samples
    from dist_dejpeg.config import ConfigError
    from dist_dejpeg.train.data_checks import check_train_tiles

    prepare_samples(tmp_path, tile=64, train_step=64, shard_size=64)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["tile"], manifest["splits"]["train"]["samples"] = 16, 3
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(None, [f"data.root={tmp_path}", "data.backend=torch", "data.num_workers=4", "data.crop=32", "critic.n_blocks=2"])
    with pytest.raises(ConfigError, match="are 16 px"):  # as long as it describes them, it is trusted
        check_train_tiles(cfg, 1)
    copy = shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-copy", copy_function=shutil.copy)
    with pytest.raises(ConfigError, match="are 16 px"):
        check_train_tiles(load_config(None, [f"data.root={copy}", "data.num_workers=4", "data.crop=32", "critic.n_blocks=2"]), 1)
    shard = tmp_path / "train-000000.tar"
    if change == "rewritten":  # (here: two more empty tar records; by hand: other tiles)
        shard.write_bytes(shard.read_bytes() + bytes(2 * 10240))
    else:
        (tmp_path / "train-000099.tar").write_bytes(shard.read_bytes())
    check_train_tiles(cfg, 1)


def test_a_shard_cut_short_or_gone_since_prepare_is_warned_of_by_name(tmp_path, caplog):
    """A copy interrupted after prepare, or a deleted shard: the start said only, at INFO, that the manifest no
    longer described the shards (advising to refresh it), and the loader counted a cut tar's hundreds of lost
    samples as one bad sample. Now a warning names each shard and what prepare wrote."""
    import logging

    from dist_dejpeg.data.shards import prepare_samples
    from dist_dejpeg.train.data_checks import check_train_tiles

    prepare_samples(tmp_path, tile=64, train_step=64, shard_size=64)
    shards = sorted(tmp_path.glob("train-*.tar"))
    assert len(shards) >= 2
    whole = shards[0].stat().st_size
    shards[0].write_bytes(shards[0].read_bytes()[:whole // 3])
    shards[1].unlink()
    cfg = load_config(None, [f"data.root={tmp_path}", "data.backend=torch", "data.crop=32", "critic.n_blocks=2"])
    with caplog.at_level(logging.INFO):
        check_train_tiles(cfg, 1)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"gone: {shards[1].name}" in warned[0], warned
    assert f"other size: {shards[0].name} ({whole // 3} bytes, prepare wrote {whole})" in warned[0], warned
    caplog.clear()  # a manifest cut short by a copy: said, the shards not judged by it (it was a JSONDecodeError)
    (tmp_path / "manifest.json").write_text('{"tile": 6')
    with caplog.at_level(logging.INFO):
        check_train_tiles(cfg, 1)
    assert any("manifest.json does not read" in r.getMessage() for r in caplog.records), caplog.records


# -- one bad shard among many, whole shards to each slot --------------------------------------------------------
def nine_shards(folder, write_tar, bad: str | None) -> list[str]:
    """Nine shards of two 48 px tiles, the last one ``bad``: "empty" (a valid tar of no sample), "zero" (0 bytes)
    or "small" (tiles under the crop); as many as the nine slots below, so each slot reads whole shards."""
    tiles = good_tiles()
    paths = [str(write_tar(folder / f"train-{i:06d}.tar", [(f"s{i}_{j}", {"png": png(tiles[(i + j) % N_GOOD])})
                                                            for j in range(2)])) for i in range(8)]
    last = folder / "train-000008.tar"
    if bad == "zero":
        last.write_bytes(b"")
    elif bad is not None:
        small = png(np.full((16, 16, 3), 9, np.uint8))
        write_tar(last, [] if bad == "empty" else [("tiny0", {"png": small}), ("tiny1", {"png": small})])
    return paths + [str(last)]


@pytest.mark.parametrize("bad", ["empty", "zero", "small"])
def test_a_slot_dealt_only_a_bad_shard_goes_on_with_the_next_epoch(tmp_path, write_tar, bad, caplog):
    """9 shards, 9 slots (a 64-GPU run's slots each get one or two whole shards a pass): the epochs in which a
    slot's only shard is bad are counted as bad data and skipped, where they stopped the run ("got no samples")."""
    shards = nine_shards(tmp_path, write_tar, bad)
    per_slot, bad_tar = [], 0
    for slot in range(9):
        stream = ShardStream(shards, CROP, (10, 90), rank=slot, world=9, epochs=3, shuffle_buffer=0,
                             max_bad_samples=2)
        epochs = [int(s["_epoch"]) for s in stream]
        per_slot.append(len(epochs))
        bad_tar += int(stream.skipped[0, SKIP_REASONS.index("bad_tar")])
        assert epochs == sorted(epochs)
    assert sum(per_slot) == 3 * 16  # each good sample once a pass, and no slot stopped
    assert bad_tar == (3 if bad != "small" else 0)  # the empty tar met once a pass, as an unreadable one is
    assert "got no usable sample in epoch" in caplog.text and "train-000008.tar" in caplog.text


def test_every_shard_bad_still_stops_once_a_slot_was_dealt_them_all(tmp_path, write_tar):
    """Skipping a slot's empty epochs ends: when its epochs in a row without a sample have dealt it every shard."""
    from dist_dejpeg.data.verify import TooFewSamples

    shards = [str(write_tar(tmp_path / f"train-{i:06d}.tar", [])) for i in range(3)]
    stream = ShardStream(shards, CROP, (10, 90), rank=1, world=3, shuffle_buffer=0)
    with pytest.raises(TooFewSamples, match=r"slot 1 of 3 got no samples in epoch \d+ \(nor from any other shard"
                                            r".*no samples in .*an empty tar"):
        next(iter(stream))


def test_a_slot_resumes_exactly_after_an_epoch_it_skipped(tmp_path, write_tar):
    """The skipped epochs depend only on the seed and the shards: a slot resumed from a saved position gives the
    samples the uninterrupted stream gives."""
    shards = nine_shards(tmp_path, write_tar, "zero")
    slot = next(s for s in range(9) if ShardStream(shards, CROP, (10, 90))._dealt(0, s, 9) == [shards[-1]])
    run = [(int(s["_epoch"]), int(s["_next"]), digest(s["clean"].numpy()))
           for s in ShardStream(shards, CROP, (10, 90), rank=slot, world=9, epochs=4, shuffle_buffer=0)]
    assert run[0][0] > 0  # epoch 0 skipped
    resumed = ShardStream(shards, CROP, (10, 90), rank=slot, world=9, epochs=4, shuffle_buffer=0)
    resumed.start = {0: run[1][:2]}
    assert [(int(s["_epoch"]), int(s["_next"]), digest(s["clean"].numpy())) for s in resumed] == run[2:]


def test_dali_leaves_out_an_empty_tar_whose_index_file_is_current(tmp_path, write_tar, monkeypatch):
    """An empty (valid) tar among shards whose index files are all present and current: no bad sample, so the
    index files were used as they are, the empty one included, which DALI refuses. It is left out, as a shard
    whose samples are all bad is. (The loader is built without DALI: no pipeline is run.)"""
    import os

    from dist_dejpeg.data import dali

    monkeypatch.setattr(dali, "HAVE_DALI", True)
    tiles = good_tiles()
    shards = [str(write_tar(tmp_path / "train-000000.tar", [(f"g{i}", {"png": png(t)}) for i, t in enumerate(tiles)])),
              str(write_tar(tmp_path / "train-000001.tar", []))]
    for shard in shards:
        idx = tmp_path / (os.path.basename(shard)[:-4] + ".idx")
        idx.write_text("v1.2 0\n")
        os.utime(idx, ns=(os.stat(shard).st_mtime_ns + 10**9,) * 2)
    loader = dali.DaliLoader(shards, CROP, (10, 90), 2)
    assert loader.shards == shards[:1] and len(loader.index_paths) == 1


def test_a_slot_says_its_skipped_epochs_no_more_often_than_its_bad_samples(tmp_path, write_tar, caplog):
    """A long run on a small set meets the bad shard every few passes: the warnings stop where _count's do."""
    shards = nine_shards(tmp_path, write_tar, "zero")[-2:]
    stream = ShardStream(shards, CROP, (10, 90), rank=1, world=2, epochs=80, shuffle_buffer=0)
    assert len(list(stream)) > 0 and int(stream.skipped[0].sum()) > 30
    assert 0 < caplog.text.count("got no usable sample") <= 20


def test_a_val_crop_larger_than_the_tiles_is_refused_from_the_manifest_as_the_dry_run_checks(tmp_path):
    """`train --dry-run data.val_crop=256` on 128 px tiles said nothing; the start then found no validation tile
    and refused. The manifest's tile is checked against data.val_crop as against data.crop (the dry run's check)."""
    from dist_dejpeg.config import ConfigError
    from dist_dejpeg.data.shards import prepare_samples
    from dist_dejpeg.train.data_checks import check_train_tiles

    prepare_samples(tmp_path, tile=64, train_step=64, shard_size=64)
    over = [f"data.root={tmp_path}", "data.backend=torch", "data.crop=32", "critic.n_blocks=2"]
    with pytest.raises(ConfigError, match=r"config key 'data.val_crop': 96 px, but the tiles in .* are 64 px"):
        check_train_tiles(load_config(None, [*over, "data.val_crop=96"]), None)
    check_train_tiles(load_config(None, [*over, "data.val_crop=64"]), None)
    check_train_tiles(load_config(None, [*over, "data.val_crop=96", "data.val_glob=other-*.tar"]), None)
