"""Shards on disk, the torch loader's batch contract, determinism, sharding across ranks/workers, exact
resume, and what happens with bad input."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import re
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dist_dejpeg.data import images, shards
from dist_dejpeg.data.images import decode_rgb8, encode_png, jpeg_roundtrip
from dist_dejpeg.data.reading import shard_keys
from dist_dejpeg.data.shards import list_shards
from dist_dejpeg.data.contract import quality_weights
from dist_dejpeg.data.torch_loader import SKIP_REASONS, ShardStream, TorchLoader, load_val_set

CPU = torch.device("cpu")
CROP = 32
QRANGE = (10, 40)


# -- helpers ---------------------------------------------------------------------------------------------
def manifest_of(root: Path) -> dict:
    return json.loads((Path(root) / "manifest.json").read_text())


def train_shards(root: Path) -> list[str]:
    return list_shards(root, "train-*.tar")


def all_keys(paths) -> list[str]:
    return [k for p in paths for k in shard_keys(p)]


def make_stream(root, seed=0, num_workers=0, rank=0, world=1, epochs=None, crop=CROP, buffer=32, **knobs):
    """The sample shards' training stream; ``knobs``: ShardStream's recipe options (quality_power, rot90,
    channel_shuffle)."""
    return ShardStream(train_shards(root), crop, QRANGE, seed=seed, rank=rank, world=world,
                       num_workers=num_workers, shuffle_buffer=buffer, epochs=epochs, **knobs)


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def count_samples(loader) -> int:
    return sum(int(b["jpeg"].shape[0]) for b in loader)


def batches_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("jpeg", "clean", "quality"))


@lru_cache(maxsize=None)
def source_photo(name: str) -> np.ndarray:
    return shards.sample_photo(name)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def random_png(rng: np.random.Generator, h: int, w: int) -> bytes:
    return encode_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse))


# -- shards written and read back -------------------------------------------------------------------------
def test_manifest_counts_match_tars(sample_shards):
    m = manifest_of(sample_shards)
    for split in ("train", "val"):
        on_disk = sorted(p.name for p in sample_shards.glob(f"{split}-*.tar"))
        assert m["splits"][split]["shards"] == on_disk
        keys = all_keys([str(sample_shards / name) for name in on_disk])
        assert m["splits"][split]["samples"] == len(keys) > 0
        assert len(set(keys)) == len(keys), f"duplicate keys in {split}"
        # shard_size is respected: every shard but the last is full
        sizes = [len(shard_keys(str(sample_shards / name))) for name in on_disk]
        assert all(s == m["shard_size"] == 16 for s in sizes[:-1]) and 0 < sizes[-1] <= 16
    assert m["tile"] == 96 and m["train_step"] == 96
    # no temp files left behind by the atomic writes
    assert not list(sample_shards.glob(".*tmp*"))


def test_keys_have_no_dots_and_follow_the_pattern(sample_shards):
    keys = all_keys(sorted(str(p) for p in sample_shards.glob("*.tar")))
    assert keys
    for key in keys:
        assert "." not in key
        assert re.fullmatch(r"[a-z0-9]+_s\d{3}", key), key


def test_tiles_decode_to_exact_source_pixels(sample_shards):
    """Lossless: every stored tile is exactly the corresponding region of its source photograph."""
    m = manifest_of(sample_shards)
    tile = m["tile"]
    by_stem = {name.replace("_", ""): (name, info["split"]) for name, info in m["sources"].items()}
    expected_tiles: dict[str, list[np.ndarray]] = {}
    checked = 0
    for split in ("train", "val"):
        step = m["train_step"] if split == "train" else m["val_step"]
        for path in list_shards(sample_shards, f"{split}-*.tar"):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    assert ext == m["format"]
                    rgb = images.decode_component(ext, tar.extractfile(member).read())
                    assert rgb.shape == (tile, tile, 3) and rgb.dtype == np.uint8
                    stem, idx = key.rsplit("_s", 1)
                    name, source_split = by_stem[stem]
                    assert source_split == split, f"{key} is in {split} shards but its photo is {source_split}"
                    if name not in expected_tiles:
                        photo = source_photo(name)
                        assert list(photo.shape[:2]) == [m["sources"][name]["height"], m["sources"][name]["width"]]
                        expected_tiles[name] = list(shards.tiles(photo, tile, step, split == "train"))
                    assert np.array_equal(rgb, expected_tiles[name][int(idx)]), key
                    checked += 1
    assert checked == m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"]
    # every tile of every source photo made it into the shards
    assert checked == sum(len(t) for t in expected_tiles.values())


def test_sample_photos_carry_no_jpeg_compression():
    """Ground truth stays lossless: no photo of the embedded data set shows a JPEG's 8x8 grid in its pixels. Three
    of scikit-image's PNGs were JPEGs once (the check finds them), so the samples use them halved, or not at all."""
    from dist_dejpeg.jpeg.quality import estimate_from_pixels

    found = {name: estimate_from_pixels(shards.sample_photo(name)).quality for name in ("ihc", "coins", "page")}
    assert found == {"ihc": 74, "coins": 85, "page": 89}, found
    for name in shards.SAMPLE_TRAIN + shards.SAMPLE_VAL:
        estimate = estimate_from_pixels(shards.sample_photo(name))
        assert estimate.quality is None, (name, estimate.reason)
    halved, whole = shards.sample_photo("coins" + shards.HALVED), shards.sample_photo("coins")
    assert halved.shape == (151, 192, 3) and halved.dtype == np.uint8
    assert halved[0, 0, 0] == round(whole[:2, :2, 0].astype(float).mean())


def test_train_and_val_sources_are_disjoint(sample_shards):
    sources = manifest_of(sample_shards)["sources"]
    train = {n for n, s in sources.items() if s["split"] == "train"}
    val = {n for n, s in sources.items() if s["split"] == "val"}
    assert train and val
    assert not train & val
    assert train == set(shards.SAMPLE_TRAIN) and val == set(shards.SAMPLE_VAL)
    train_stems = {k.rsplit("_s", 1)[0] for k in all_keys(train_shards(sample_shards))}
    val_stems = {k.rsplit("_s", 1)[0] for k in all_keys(list_shards(sample_shards, "val-*.tar"))}
    assert not train_stems & val_stems
    assert train_stems == {n.replace("_", "") for n in train}


def test_list_shards_no_match_names_pattern(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        list_shards(tmp_path, "nothing-here-*.tar")
    assert "nothing-here-*.tar" in str(info.value)


def test_list_shards_sorted_and_absolute_pattern(sample_shards):
    found = train_shards(sample_shards)
    assert found == sorted(found) and len(found) == len(manifest_of(sample_shards)["splits"]["train"]["shards"])
    assert list_shards("/nonexistent-root", str(sample_shards / "train-*.tar")) == found
    # a glob without the suffix (data.train_glob=train-*): the shards alone, not DALI's index files nor the scan
    # records beside them (each was a bad tar to the torch loader, and DALI failed on them)
    (sample_shards / "train-000000.scan.json").write_text("{}")
    try:
        assert list_shards(sample_shards, "train-*") == found and list_shards(sample_shards, "*") == sorted(
            found + list_shards(sample_shards, "val-*.tar"))
    finally:
        (sample_shards / "train-000000.scan.json").unlink()


def test_list_shards_double_star_reaches_any_depth(tmp_path):
    """``**`` in data.train_glob matched one folder level only (glob without recursive=True)."""
    for sub in ("", "a", "a/b", "a/b/c"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / "train-000000.tar").write_bytes(b"x")
    assert len(list_shards(tmp_path, "**/train-*.tar")) == 4


def test_list_shards_expands_braces(tmp_path):
    """webdataset's usual ``train-{000000..000002}.tar``: the shards it names, not "no shards match"."""
    for i in range(4):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"x")
    assert [Path(p).name for p in list_shards(tmp_path, "train-{000000..000002}.tar")] == [
        f"train-{i:06d}.tar" for i in range(3)]
    assert len(list_shards(tmp_path, "train-{000001,000003}.tar")) == 2
    with pytest.raises(FileNotFoundError, match="no shards match"):  # a lone brace: taken literally
        list_shards(tmp_path, "train-{0.tar")


def test_list_shards_names_a_broken_link_and_a_second_name_of_a_shard(tmp_path, caplog):
    """A broken symbolic link the glob matches was left out without a word, and a link to a shard already matched
    doubled its samples without one: both are warned of by name, once a process."""
    for i in range(2):
        (tmp_path / f"train-00000{i}.tar").write_bytes(b"x")
    os.symlink(tmp_path / "gone.tar", tmp_path / "train-000002.tar")
    os.symlink(tmp_path / "train-000000.tar", tmp_path / "train-000003.tar")
    for _ in range(2):
        assert len(list_shards(tmp_path, "train-*.tar")) == 3
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 2, said
    assert "train-000002.tar is a broken symbolic link" in said[0] and "gone.tar" in said[0]
    assert "train-000003.tar and " in said[1] and "train-000000.tar are one file" in said[1]

def test_validation_tiles_do_not_overlap(sample_shards):
    """README: "val: no overlap". Each validation photo is cut into whole, disjoint tiles (the strip past the last
    whole tile left out): a tile flush with the edge repeated most of its neighbour, counted twice in every
    validation mean and in the guard's lower bound, which takes the crops as independent."""
    m = manifest_of(sample_shards)
    tile = m["tile"]
    val = [info for info in m["sources"].values() if info["split"] == "val"]
    assert val and m["splits"]["val"]["samples"] == sum((v["height"] // tile) * (v["width"] // tile) for v in val)


def test_prepare_again_leaves_no_stale_shards(tmp_path):
    shards.prepare_samples(tmp_path, tile=96, train_step=96, shard_size=16)
    m = shards.prepare_samples(tmp_path, tile=96, train_step=96, shard_size=64)
    found = train_shards(tmp_path)
    assert [Path(p).name for p in found] == m["splits"]["train"]["shards"]
    assert len(all_keys(found)) == m["splits"]["train"]["samples"]


def test_auto_prepare_rewrites_samples_of_an_older_photo_list(tmp_path, monkeypatch):
    from dist_dejpeg.config import load_config
    from dist_dejpeg.data import ensure_samples

    cfg = load_config(None, [f"data.root={tmp_path}", "data.auto_prepare=samples"])
    monkeypatch.setattr(shards, "SAMPLE_TRAIN", ("astronaut",))
    monkeypatch.setattr(shards, "SAMPLE_VAL", ("coins",))
    shards.prepare_samples(tmp_path, tile=96, train_step=96, shard_size=16)
    (tmp_path / ".prepare.lock").unlink()
    assert not ensure_samples(cfg)  # same list: left alone, nothing written (a read-only copy works)
    assert not (tmp_path / ".prepare.lock").exists()
    monkeypatch.setattr(shards, "SAMPLE_TRAIN", ("astronaut", "camera"))
    assert shards.samples_stale(tmp_path)
    assert ensure_samples(cfg)
    assert set(manifest_of(tmp_path)["sources"]) == {"astronaut", "camera", "coins"}
    assert not shards.samples_stale(tmp_path)


def test_auto_prepare_never_writes_the_samples_among_photos_or_over_a_prepared_set(tmp_path):
    """data.root=~/photos with the debug recipe (data.auto_prepare=samples): the sample shards and a manifest were
    written among the user's photos and the run trained on the bundled samples, saying nothing. Such a folder, or
    one prepared under other shard names than data.train_glob, is now refused, and left as it was."""
    from PIL import Image
    from skimage import data

    from dist_dejpeg.config import ConfigError, load_config
    from dist_dejpeg.data import ensure_samples

    photos = tmp_path / "photos"
    (photos / "2024").mkdir(parents=True)
    Image.fromarray(data.astronaut()[:64, :64]).save(photos / "2024" / "beach.JPG")
    cfg = load_config(None, [f"data.root={photos}", "data.auto_prepare=samples"])
    with pytest.raises(ConfigError, match=r"data.root.*holds photos \(2024/beach.JPG\), not shards: prepare them "
                                          r"first, `dist-dejpeg prepare folder .*photos --out DIR`.*auto_prepare=none"):
        ensure_samples(cfg)
    assert sorted(p.name for p in photos.rglob("*")) == ["2024", "beach.JPG"]  # nothing written among them
    prepared = tmp_path / "prepared"
    shards.prepare_samples(prepared, tile=96, train_step=96, shard_size=16)
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["dataset"] = "folder /home/me/photos"
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    cfg = load_config(None, [f"data.root={prepared}", "data.auto_prepare=samples", "data.train_glob=mine-*.tar"])
    with pytest.raises(ConfigError, match=r"'mine-\*.tar' matches none of the shards prepared in .*folder /home/me"):
        ensure_samples(cfg)
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before
    assert ensure_samples(load_config(None, [f"data.root={tmp_path / 'new'}", "data.auto_prepare=samples"]))


def test_auto_prepare_never_writes_over_shards_made_elsewhere(tmp_path):
    """ensure_samples listed data.train_glob with Path.glob, which does not expand braces: the user's own
    train-{000000..000002}.tar were 'missing' and the sample shards written over them (merged-diff review). It now
    reads the pattern as the loaders do (list_shards), and refuses a folder whose train-/val- shards no sample
    manifest lists, leaving it as it was."""
    import io
    import tarfile

    from dist_dejpeg.config import ConfigError, load_config
    from dist_dejpeg.data import ensure_samples

    for i in range(3):
        with tarfile.open(tmp_path / f"train-{i:06d}.tar", "w") as tar:
            data = b"user data %d" % i
            info = tarfile.TarInfo(f"u{i}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for glob in ("train-{000000..000002}.tar", "train-{000000..000001}.tar"):
        assert not ensure_samples(load_config(None, [f"data.root={tmp_path}", "data.auto_prepare=samples",
                                                     f"data.train_glob={glob}"]))
    with pytest.raises(ConfigError, match=r"data.root.*holds shards the sample preparation did not write "
                                          r"\(train-000000.tar, train-000001.tar, train-000002.tar\)"):
        ensure_samples(load_config(None, [f"data.root={tmp_path}", "data.auto_prepare=samples",
                                          "data.train_glob=shard-*.tar"]))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_runs_starting_at_once_write_the_samples_once_and_all_train_on_them(tmp_path):
    """The runs of a SLURM array with auto_prepare=samples, started at once on a fresh checkout, all wrote into
    data/samples' one staging folder, removing each other's files: every one failed. Now one writes (under
    .prepare.lock), the others wait, find the shards and use them."""
    import subprocess
    import sys

    code = (  # small sample lists, each shard's write slowed: without the lock the writers overlap for sure
        "import sys, time, dist_dejpeg.data.shards as s\n"
        "s.SAMPLE_TRAIN, s.SAMPLE_VAL = ('astronaut', 'camera'), ('coins',)\n"
        "write = s.write_shard\n"
        "s.write_shard = lambda *a, **k: time.sleep(0.3) or write(*a, **k)\n"
        "from dist_dejpeg.config import load_config\n"
        "from dist_dejpeg.data import ensure_samples\n"
        "cfg = load_config(None, [f'data.root={sys.argv[1]}', 'data.auto_prepare=samples'])\n"
        "print('wrote' if ensure_samples(cfg) else 'found')\n")
    root = tmp_path / "data" / "samples"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    said = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), said
    assert sorted(out.strip() for out, _ in said) == ["found", "found", "wrote"], said
    m = manifest_of(root)
    assert len(all_keys(sorted(map(str, root.glob("train-*.tar"))))) == m["splits"]["train"]["samples"] > 0
    assert not (root / shards.STAGING).exists()


# -- loader contract --------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batch_contract(sample_shards, num_workers):
    batch_size = 4
    loader = TorchLoader(make_stream(sample_shards, num_workers=num_workers), batch_size, num_workers, CPU)
    batches = take(loader, 3)
    assert len(batches) == 3
    for batch in batches:
        assert set(batch) == {"jpeg", "clean", "quality"}
        for key in ("jpeg", "clean"):
            t = batch[key]
            assert t.dtype == torch.float32
            assert t.shape == (batch_size, 3, CROP, CROP)
            assert t.device.type == "cpu"
            assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
            assert float(t.max()) > 0.0  # not all black
        q = batch["quality"]
        assert q.dtype == torch.int64 and q.shape == (batch_size,)
        assert int(q.min()) >= QRANGE[0] and int(q.max()) <= QRANGE[1]
        assert not torch.equal(batch["jpeg"], batch["clean"])
        # the degraded image is close to, but not the same as, the clean one
        assert 0 < float((batch["jpeg"] - batch["clean"]).abs().mean()) < 0.25
    assert loader.consumed == 3
    assert loader.skipped() == dict.fromkeys(SKIP_REASONS, 0)


def test_clean_crop_is_a_crop_of_its_tile(sample_shards):
    """Each clean target is an unaltered (possibly mirrored left-right) window of the tile at its stream position, and
    the JPEG input is that window degraded at the reported quality."""
    stream = make_stream(sample_shards, epochs=1)
    raws = stream._epoch_raw(0, 0, 1, row=0)
    for sample, raw in itertools.islice(zip(stream, raws), 6):
        tile = images.decode_component(*images.image_bytes(raw))
        clean = sample["clean"].permute(1, 2, 0).numpy()
        assert clean.shape == (CROP, CROP, 3) and clean.dtype == np.uint8
        windows = np.lib.stride_tricks.sliding_window_view(tile, (CROP, CROP, 3))[:, :, 0]
        variants = [clean, clean[:, ::-1]]
        assert any((windows == v).all(axis=(-3, -2, -1)).any() for v in variants), raw["__key__"]
        jpeg = sample["jpeg"].permute(1, 2, 0).numpy()
        assert np.array_equal(jpeg, jpeg_roundtrip(clean, sample["quality"]))


def test_jpeg_strength_increases_with_quality():
    photo = source_photo("astronaut")[128:224, 160:256].copy()
    values = [psnr(photo, jpeg_roundtrip(photo, q)) for q in (10, 20, 40, 80)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[0] > 15 and values[-1] < 60  # degraded, but not garbage and not lossless


# -- determinism ------------------------------------------------------------------------------------------
def test_same_seed_same_batches_different_seed_differs(sample_shards):
    def run(seed):
        return take(TorchLoader(make_stream(sample_shards, seed=seed), 4, 0, CPU), 3)

    a, b, c = run(7), run(7), run(8)
    assert all(batches_equal(x, y) for x, y in zip(a, b))
    assert not all(batches_equal(x, y) for x, y in zip(a, c))


# -- splitting across ranks and workers -------------------------------------------------------------------
@pytest.mark.parametrize("n_slots", [1, 2, 4, 7, 20, 21, 24])
@pytest.mark.parametrize("epoch", [0, 1])
def test_slots_are_disjoint_and_cover_all(sample_shards, n_slots, epoch):
    paths = train_shards(sample_shards)
    expected = set(all_keys(paths))
    stream = make_stream(sample_shards)
    per_slot = []
    for slot in range(n_slots):
        keys = [raw["__key__"] for raw in stream._epoch_raw(epoch, slot, n_slots, row=0)]
        assert len(keys) == len(set(keys)), f"slot {slot} repeats a sample"
        per_slot.append(set(keys))
    assert all(per_slot), "every slot gets samples"
    assert sum(len(s) for s in per_slot) == len(expected), "slots overlap"
    assert set().union(*per_slot) == expected
    if n_slots > len(paths):  # sample-level dealing: sizes differ by at most one
        sizes = [len(s) for s in per_slot]
        assert max(sizes) - min(sizes) <= 1
    assert stream.skipped.sum() == 0


def _bytes_read() -> int:
    return int(re.search(r"rchar: (\d+)", Path("/proc/self/io").read_text())[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read with Linux's /proc/self/io")
def test_slots_sharing_few_shards_read_only_their_own_samples(sample_shards):
    """Fewer shards than slots: a slot keeps every n-th sample. It gets the samples (keys and bytes) a read of whole
    shards would give it, and reads about its share of the bytes, not every shard (n times the I/O)."""
    paths = train_shards(sample_shards)
    n_slots = 4 * len(paths)
    stream = make_stream(sample_shards, buffer=0)
    whole = [s for p in paths for s in wds.tariterators.tarfile_samples([{"url": p}]) if s]
    for slot in (0, 5):
        got = list(stream._epoch_raw(3, slot, n_slots, row=0))
        order = list(paths)
        random.Random("0-shards-3").shuffle(order)
        want = [s for i, s in enumerate(s for p in order for s in whole if s["__url__"] == p) if i % n_slots == slot]
        assert [(s["__key__"], s["raw"]) for s in got] == [(s["__key__"], s["raw"]) for s in want]
    before = _bytes_read()
    assert len(list(stream._epoch_raw(4, 1, n_slots, row=0))) >= 1
    total = sum(Path(p).stat().st_size for p in paths)
    assert _bytes_read() - before < total / 8, "a slot read far more than its share of the shards"


def test_a_shard_is_checked_for_a_corrupt_tail_once_until_it_changes(sample_shards, tmp_path, monkeypatch):
    """Whole shards: whether a shard reads to its end is checked once per version of it, not every epoch."""
    from dist_dejpeg.data import reading

    for p in train_shards(sample_shards)[:2]:
        (tmp_path / Path(p).name).write_bytes(Path(p).read_bytes())
    checked = []
    monkeypatch.setattr(reading, "tar_stops_early", lambda shard: checked.append(shard))
    stream = make_stream(tmp_path)
    for epoch in range(3):
        list(stream._epoch_raw(epoch, 0, 1, row=0))
    assert len(checked) == 2
    first = train_shards(tmp_path)[0]
    os.utime(first, ns=(0, Path(first).stat().st_mtime_ns + 10**9))  # rewritten: checked again
    list(stream._epoch_raw(3, 0, 1, row=0))
    assert checked[2:] == [first]


@pytest.mark.parametrize("n_slots,unread", [(1, 2), (4, 1)])
def test_shards_deleted_mid_run_are_skipped_and_named(sample_shards, tmp_path, n_slots, unread, caplog):
    """The shards removed while a slot reads one of them (a purged scratch folder): a warning naming each shard it
    could not read to its end, no traceback. (Whole shards: the one being read is checked after it; shared
    shards: it is read to its end, as Linux keeps a deleted file open.)"""
    for p in train_shards(sample_shards)[:2]:
        (tmp_path / Path(p).name).write_bytes(Path(p).read_bytes())
    stream = make_stream(tmp_path, buffer=0)
    list(stream._epoch_raw(0, 0, n_slots, row=0))  # a whole epoch read once: the slot knows the shards
    raw = stream._epoch_raw(1, 0, n_slots, row=0)
    reading = next(raw)["__url__"]
    for p in train_shards(tmp_path):
        os.remove(p)
    list(raw)
    assert stream.skipped[0, SKIP_REASONS.index("bad_tar")] == unread
    assert "No such file or directory" in caplog.text
    assert unread == 1 or f"unreadable tar data in {reading}" in caplog.text


def test_shards_all_gone_mid_run_is_said_so(sample_shards, tmp_path):
    """Every shard gone (the data folder unmounted): the error says they could not be read, not that there are
    fewer samples than slots."""
    from dist_dejpeg.data.verify import TooFewSamples

    (tmp_path / "train-000000.tar").write_bytes(Path(train_shards(sample_shards)[0]).read_bytes())
    stream = make_stream(tmp_path, buffer=0)
    samples = iter(stream)
    list(itertools.islice(samples, 16))  # epoch 0, read to its end
    os.remove(tmp_path / "train-000000.tar")
    with pytest.raises(TooFewSamples, match=r"got no samples in epoch 1: its shards could not be read \(e\.g\. "
                                            r"unreadable tar data in .*FileNotFoundError"):
        next(samples)


def test_shard_order_changes_between_epochs(sample_shards):
    stream = make_stream(sample_shards)
    e0 = [raw["__key__"] for raw in stream._epoch_raw(0, 0, 1, row=0)]
    e1 = [raw["__key__"] for raw in stream._epoch_raw(1, 0, 1, row=0)]
    assert sorted(e0) == sorted(e1)
    assert e0 != e1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_epoch_across_ranks_sums_to_train_set(sample_shards, num_workers):
    total = manifest_of(sample_shards)["splits"]["train"]["samples"]
    counts = []
    for rank in range(2):
        stream = make_stream(sample_shards, num_workers=num_workers, rank=rank, world=2, epochs=1)
        loader = TorchLoader(stream, 8, num_workers, CPU)
        counts.append(count_samples(loader))
        assert loader.skipped() == dict.fromkeys(SKIP_REASONS, 0)
    assert all(counts)
    assert sum(counts) == total


def test_one_epoch_sample_level_split_sums_to_train_set(sample_shards):
    """More ranks than shards: every rank reads all shards and keeps every n-th sample."""
    n_shards = len(train_shards(sample_shards))
    world = n_shards + 3
    total = manifest_of(sample_shards)["splits"]["train"]["samples"]
    counts = [sum(1 for _ in make_stream(sample_shards, rank=r, world=world, epochs=1)) for r in range(world)]
    assert all(counts)
    assert sum(counts) == total


def test_epochs_limit_stream_length(sample_shards):
    total = manifest_of(sample_shards)["splits"]["train"]["samples"]
    assert sum(1 for _ in make_stream(sample_shards, epochs=2)) == 2 * total


# -- exact resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers, knobs", [(0, {}), (2, {}),
                                                (2, {"quality_power": 1.0, "rot90": True, "channel_shuffle": 0.5})],
                         ids=["0-workers", "2-workers", "2-workers-knobs"])
def test_loader_resume_is_exact(sample_shards, num_workers, knobs):
    def new_loader():
        return TorchLoader(make_stream(sample_shards, seed=3, num_workers=num_workers, **knobs), 4, num_workers, CPU)

    uninterrupted = take(new_loader(), 8)

    first = new_loader()
    head = take(first, 5)
    assert all(batches_equal(x, y) for x, y in zip(head, uninterrupted[:5]))
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip (checkpoints)
    assert state["consumed"] == 5

    resumed = new_loader()
    resumed.load_state_dict(state)
    tail = take(resumed, 3)
    assert len(tail) == 3
    for i, (x, y) in enumerate(zip(tail, uninterrupted[5:8])):
        assert batches_equal(x, y), f"resumed batch {i} differs from uninterrupted batch {5 + i}"
    assert resumed.consumed == 8


def test_loader_resume_twice_is_exact(sample_shards):
    """Chained resumes (odd batch counts, so the worker rotation matters) still match an uninterrupted run."""
    def new_loader():
        return TorchLoader(make_stream(sample_shards, seed=5, num_workers=2), 4, 2, CPU)

    uninterrupted = take(new_loader(), 9)
    first = new_loader()
    take(first, 3)
    second = new_loader()
    second.load_state_dict(first.state_dict())
    got = take(second, 3)
    third = new_loader()
    third.load_state_dict(second.state_dict())
    got += take(third, 3)
    assert [batches_equal(x, y) for x, y in zip(got, uninterrupted[3:])] == [True] * 6


def test_resume_with_other_worker_count_restarts_at_a_fresh_epoch(sample_shards):
    """Another layout cannot resume the saved positions: the stream restarts, at the epoch after the newest saved
    (it restarted at epoch 0 and replayed the run's first batches, crops and qualities alike)."""
    first = TorchLoader(make_stream(sample_shards, seed=3), 4, 0, CPU)
    start = take(first, 2)
    take(first, 3)
    other = TorchLoader(make_stream(sample_shards, seed=3), 4, 0, CPU)
    state = first.state_dict()
    state["num_workers"] = 2  # pretend it was saved with another layout
    other.load_state_dict(state)
    assert other.consumed == 5 and other.positions == {0: (1, 0)}  # (5 batches of 4: still in epoch 0)
    again = take(other, 2)
    assert not any(batches_equal(x, y) for x, y in zip(again, start))


def test_a_state_of_2_ranks_loaded_into_1_restarts_after_their_newest_epoch(sample_shards, tmp_path):
    """A resume on another process count (train.resume_allow_batch_change) restarted the data stream at epoch 0:
    the same shuffles, crops, qualities as the run's start (2 -> 1 -> 2: the third session's first batches were the
    first's). Every rank now reads every rank's loader file of the checkpoint (checkpoint.loader_states) and starts
    at the epoch after the newest any saved, alike on every rank; a rank the checkpoint had none of too."""
    from dist_dejpeg.train.checkpoint import loader_states

    digest = make_stream(sample_shards).digest
    step = tmp_path / "step-00000040"
    step.mkdir()
    for rank, epoch in ((0, 3), (1, 2)):  # saved by 2 ranks, 0 workers: rank 0 in epoch 3
        saved = {"consumed": 40, "positions": {"0": [epoch, 5]}, "num_workers": 0, "world": 2, "rank": rank,
                 "shards": [len(train_shards(sample_shards)), digest]}
        (step / f"loader_{rank}.json").write_text(json.dumps(saved))
    assert loader_states(tmp_path, 0) is None  # (no loader files: nothing to load)
    assert [s["rank"] for s in loader_states(step, 1)["every_rank"]] == [0, 1] and loader_states(step, 1)["rank"] == 1
    fresh = take(TorchLoader(make_stream(sample_shards, seed=3), 4, 0, CPU), 1)[0]
    for world, rank in ((1, 0), (3, 0), (3, 2)):  # fewer ranks; more (rank 2: no file of its own)
        loader = TorchLoader(make_stream(sample_shards, seed=3, rank=rank, world=world), 4, 0, CPU)
        loader.load_state_dict(loader_states(step, rank))
        assert loader.positions == {0: (4, 0)} and loader.consumed == 40, (world, rank)
        batch = take(loader, 1)[0]
        assert loader.positions[0][0] == 4 and not batches_equal(batch, fresh), (world, rank)


def test_a_dali_resume_on_more_ranks_starts_no_reader_seed_already_used():
    """DALI's reader seed derives from the batches consumed: a rank the checkpoint had no loader file of (more
    processes now) started at 0 consumed, the seed the first session's rank of that number had used."""
    from dist_dejpeg.data.dali import DaliLoader

    loader = DaliLoader.__new__(DaliLoader)  # (its state alone: no DALI, no shards needed)
    loader.load_state_dict({"every_rank": [{"consumed": 12, "backend": "dali"}]})  # rank 1 of 2, saved by 1
    assert loader.consumed == 12


def test_a_loader_restart_on_resume_is_warned_by_rank_0_only(sample_shards, caplog):
    """Every rank finds the same change of layout (or of shards): rank 0 warns, the others log it at debug level
    (a 2-process resume showed the warning twice, 32 times on 4 x 8 GPUs)."""
    state = TorchLoader(make_stream(sample_shards, seed=3, world=2), 4, 0, CPU).state_dict()
    state["num_workers"] = 2  # saved with another layout
    for rank in (0, 1):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="dist_dejpeg"):
            TorchLoader(make_stream(sample_shards, seed=3, rank=rank, world=2), 4, 0, CPU).load_state_dict(state)
        levels = [r.levelno for r in caplog.records if "data loader state was saved with" in r.getMessage()]
        assert levels == [logging.WARNING if rank == 0 else logging.DEBUG], (rank, caplog.text)


def test_shards_prepared_again_are_told_from_the_ones_a_stream_position_was_saved_on(tmp_path):
    """Shards prepared again with another seed have the same names and sizes (raw tiles are all one size), other
    samples at every position: resuming the stream there replayed some and skipped others, unsaid."""
    from dist_dejpeg.data.torch_loader import shard_list_digest

    for seed in (0, 1):
        shards.prepare_samples(tmp_path / str(seed), tile=96, train_step=96, shard_size=16, seed=seed)
    a, b = (sorted(str(p) for p in (tmp_path / str(seed)).glob("train-*.tar")) for seed in (0, 1))
    assert [Path(p).name for p in a] == [Path(p).name for p in b]
    assert [os.path.getsize(p) for p in a] == [os.path.getsize(p) for p in b]
    assert shard_list_digest(a) != shard_list_digest(b)
    assert shard_list_digest(a) == shard_list_digest(sorted(str(p) for p in (tmp_path / "0").glob("train-*.tar")))
    # a loader state saved before the digest held the shards' first bytes (names and sizes) still resumes exactly
    from dist_dejpeg.data.torch_loader import legacy_shard_list_digest

    first = TorchLoader(make_stream(tmp_path / "0", seed=3), 4, 0, CPU)
    take(first, 2)
    state = first.state_dict()
    state["shards"][1] = legacy_shard_list_digest(a)
    again = TorchLoader(make_stream(tmp_path / "0", seed=3), 4, 0, CPU)
    again.load_state_dict(state)
    assert again.consumed == first.consumed > 0
    state["shards"][1] = "0" * 16
    other = TorchLoader(make_stream(tmp_path / "0", seed=3), 4, 0, CPU)
    other.load_state_dict(state)
    assert other.positions == {0: (1, 0)}  # another digest: the stream starts over (at a fresh epoch), said


# -- recipe knobs (data.quality_power, data.rot90) -----------------------------------------------------------
TILE = 96  # conftest's sample_shards tiles


def test_knobs_off_draw_exactly_as_before(sample_shards):
    """quality_power 0 and rot90 off: each sample is drawn from its RNG (seed, epoch, slot, position) exactly as
    before the knobs existed: top, then left, then the mirror (random() < 0.5), then the quality
    (rng.integers); the knobs draw after these, so a stream with them on crops and mirrors alike. The GPU path's
    grouped qualities are still rng.integers of the batch's RNG: checkpoints and earlier results hold."""
    from dist_dejpeg.data.gpu_jpeg import jpeg_roundtrip_cpu

    n = 12
    raws = list(itertools.islice(make_stream(sample_shards, seed=6)._epoch_raw(0, 0, 1, row=0), n))
    plain = list(itertools.islice(make_stream(sample_shards, seed=6), n))
    off = list(itertools.islice(make_stream(sample_shards, seed=6, quality_power=0.0, rot90=False,
                                            channel_shuffle=0.0), n))
    knobbed = list(itertools.islice(make_stream(sample_shards, seed=6, quality_power=2.0, rot90=True,
                                                channel_shuffle=1.0), n))
    values, p = quality_weights(*QRANGE, 2.0)

    def hwc(t):
        return t.permute(1, 2, 0).numpy()

    mirrors, corners, turned = set(), set(), 0
    for a, b, k in zip(plain, off, knobbed):
        pos = a["_next"] - 1
        assert b["_next"] - 1 == k["_next"] - 1 == pos
        tile = images.decode_component(*images.image_bytes(raws[pos]))
        h, w = tile.shape[:2]
        assert (h, w) == (TILE, TILE)  # square: swapped top and left draws would crop elsewhere, unnoticed by size
        rng = np.random.default_rng([6, 0, 0, pos])  # seed, epoch, slot, position
        top = int(rng.integers(0, h - CROP + 1))
        left = int(rng.integers(0, w - CROP + 1))
        mirror = bool(rng.random() < 0.5)
        state = rng.bit_generator.state  # the knobs' draws start here
        window = tile[top:top + CROP, left:left + CROP]
        if mirror:
            window = window[:, ::-1]
        quality = int(rng.integers(QRANGE[0], QRANGE[1] + 1))
        for s in (a, b):  # knobs left out, or set to off: the draw as before them
            assert np.array_equal(hwc(s["clean"]), window), (pos, top, left, mirror)
            assert s["quality"] == quality
            assert np.array_equal(hwc(s["jpeg"]), jpeg_roundtrip(np.ascontiguousarray(window), quality))
        # the knobs on: the same window and mirror, then quality by weight, the turn, the channel order
        rng.bit_generator.state = state
        k_quality = int(rng.choice(values, p=p))
        turns = int(rng.integers(4))
        assert rng.random() < 1.0
        order = rng.permutation(3)
        expected = np.rot90(window, turns)[:, :, order]
        assert np.array_equal(hwc(k["clean"]), expected), pos
        assert k["quality"] == k_quality
        assert np.array_equal(hwc(k["jpeg"]), jpeg_roundtrip(np.ascontiguousarray(expected), k_quality))
        mirrors.add(mirror)
        corners.add(top == left)
        turned += not np.array_equal(hwc(k["clean"]), window)
    assert mirrors == {True, False} and False in corners and turned > 0  # the draws above tell order and sense

    grouped = TorchLoader(make_stream(sample_shards, seed=6, quality_power=0.0), 4, 0, CPU,
                          degrade_batch=jpeg_roundtrip_cpu, quality_groups=2)
    for index, batch in enumerate(take(grouped, 3)):
        levels = np.random.default_rng([6, 0, index, 7]).integers(QRANGE[0], QRANGE[1] + 1, size=2)
        assert batch["quality"].tolist() == levels[[0, 1, 0, 1]].tolist()


@pytest.mark.parametrize("grouped", [False, True])
def test_quality_power_draws_more_heavy_compression(sample_shards, grouped):
    """quality_power 2 (P(q) ~ q^-2 over 10..40): ~500 qualities, all in the range, mean near the expected ~18.0
    and far below uniform's 25, the lowest qualities the most frequent; in the workers and in the GPU path's
    grouped draws."""
    from dist_dejpeg.data.gpu_jpeg import jpeg_roundtrip_cpu

    values, p = quality_weights(*QRANGE, 2.0)
    assert p.sum() == pytest.approx(1.0) and np.all(np.diff(p) < 0)
    expected = float((values * p).sum())
    assert 17.5 < expected < 18.5
    stream = make_stream(sample_shards, seed=1, quality_power=2.0)
    if grouped:
        loader = TorchLoader(stream, 8, 0, CPU, degrade_batch=jpeg_roundtrip_cpu, quality_groups=8)
        qualities = np.concatenate([b["quality"].numpy() for b in take(loader, 63)])
    else:
        qualities = np.array([s["quality"] for s in itertools.islice(stream, 500)])
    assert len(qualities) >= 500 and QRANGE[0] <= qualities.min() and qualities.max() <= QRANGE[1]
    assert abs(qualities.mean() - expected) < 1.5  # standard error ~0.35
    assert qualities.mean() < 21
    counts = np.bincount(qualities, minlength=QRANGE[1] + 1)
    low = QRANGE[0]  # q10-12 drawn more than q13-15 (expected 164 vs 100 of 500; q10 alone vs q11: 65 vs 54)
    assert counts[low:low + 3].sum() > counts[low + 3:low + 6].sum(), counts[low:low + 6]


def test_rot90_turns_the_crop_before_degrading_it(sample_shards):
    """rot90: every clean crop is a 90-degree turn (np.rot90, k = 0..3) of the crop the same stream gives without
    it (same crop, mirror and quality: the turn is drawn last), all four turns occur, and the JPEG input is the
    turned crop degraded (the 8x8 grid starts at the crop's corner)."""
    plain = itertools.islice(make_stream(sample_shards, seed=2), 32)
    turned = itertools.islice(make_stream(sample_shards, seed=2, rot90=True), 32)
    seen = set()
    for a, b in zip(plain, turned):
        assert a["quality"] == b["quality"]
        clean, rotated = a["clean"].permute(1, 2, 0).numpy(), b["clean"].permute(1, 2, 0).numpy()
        k = next(k for k in range(4) if np.array_equal(rotated, np.rot90(clean, k)))
        seen.add(k)
        assert np.array_equal(b["jpeg"].permute(1, 2, 0).numpy(), jpeg_roundtrip(rotated, b["quality"]))
    assert seen == {0, 1, 2, 3}


def test_channel_shuffle_reorders_the_crop_before_degrading_it(sample_shards):
    """channel_shuffle 1: every clean crop is the crop the same stream gives without it (same crop, mirror and
    quality: the order is drawn last) with its RGB planes in one of the 6 orders, all of them occur, and the JPEG
    input is the reordered crop degraded; with 0.5 about half the colour crops keep their order."""
    orders = list(itertools.permutations(range(3)))

    def order_of(plain, shuffled) -> tuple | None:  # None: a gray crop, where every order looks the same
        if np.array_equal(plain[:, :, 0], plain[:, :, 1]) and np.array_equal(plain[:, :, 1], plain[:, :, 2]):
            return None
        return next(o for o in orders if np.array_equal(shuffled, plain[:, :, list(o)]))

    def hwc(t):
        return t.permute(1, 2, 0).numpy()

    seen, kept = set(), []
    for share in (1.0, 0.5):
        plain = itertools.islice(make_stream(sample_shards, seed=5), 96)
        shuffled = itertools.islice(make_stream(sample_shards, seed=5, channel_shuffle=share), 96)
        for a, b in zip(plain, shuffled):
            assert a["quality"] == b["quality"]
            order = order_of(hwc(a["clean"]), hwc(b["clean"]))
            assert np.array_equal(hwc(b["jpeg"]), jpeg_roundtrip(hwc(b["clean"]), b["quality"]))
            if order is not None and share == 1.0:
                seen.add(order)
            elif order is not None:
                kept.append(order == (0, 1, 2))
    assert seen == set(orders)
    assert 0.45 < np.mean(kept) < 0.8, (len(kept), np.mean(kept))  # 1/2 + 1/2 x 1/6 = 0.58 keep their order


def test_config_knobs_reach_the_torch_loader(sample_shards):
    from dist_dejpeg.config import load_config
    from dist_dejpeg.data import build_train_loader

    cfg = load_config(None, [f"data.root={sample_shards}", "data.backend=torch", "data.num_workers=0", "data.crop=32", "critic.n_blocks=2",
                             "data.quality_power=1.5", "data.rot90=true", "data.channel_shuffle=0.25"])
    stream = build_train_loader(cfg, 0, 1, CPU).stream
    assert (stream.quality_power, stream.rot90, stream.channel_shuffle) == (1.5, True, 0.25)


# -- bad input --------------------------------------------------------------------------------------------
def _bad_shard(write_tar, path):
    rng = np.random.default_rng(0)
    good = [(f"good{i}", {"png": random_png(rng, 64, 64)}) for i in range(6)]
    full = random_png(rng, 64, 64)
    bad = [
        ("corrupt0", {"png": rng.bytes(600)}),
        ("truncated0", {"png": full[: len(full) // 2]}),
        ("textonly0", {"txt": b"no image here"}),
        ("small0", {"png": random_png(rng, 16, 16)}),
    ]
    write_tar(path, good[:3] + bad + good[3:])
    return len(good)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path, write_tar, num_workers):
    n_good = _bad_shard(write_tar, tmp_path / "bad-000000.tar")
    stream = ShardStream([str(tmp_path / "bad-000000.tar")], CROP, QRANGE, num_workers=num_workers,
                         shuffle_buffer=4, epochs=1)
    loader = TorchLoader(stream, 2, num_workers, CPU)
    batches = list(loader)
    assert sum(b["jpeg"].shape[0] for b in batches) == n_good
    for b in batches:
        assert b["clean"].shape[1:] == (3, CROP, CROP)
    assert loader.skipped() == {"corrupt": 2, "too_small": 1, "no_image": 1, "bad_tar": 0}


def test_load_val_set_skips_and_counts(tmp_path, write_tar):
    n_good = _bad_shard(write_tar, tmp_path / "val-000000.tar")
    sets, skipped = load_val_set([str(tmp_path / "val-000000.tar")], CROP, [10, 30])
    assert skipped == {"corrupt": 2, "too_small": 1, "no_image": 1, "bad_tar": 0}
    assert set(sets) == {10, 30}
    for q, (jpeg, clean) in sets.items():
        assert jpeg.shape == clean.shape == (n_good, 3, CROP, CROP)
        assert jpeg.dtype == clean.dtype == torch.uint8
        assert not torch.equal(jpeg, clean)
    assert torch.equal(sets[10][1], sets[30][1])  # same clean crops at every quality


def test_load_val_set_splits_ranks(sample_shards):
    val = list_shards(sample_shards, "val-*.tar")
    total = manifest_of(sample_shards)["splits"]["val"]["samples"]
    parts = [load_val_set(val, 64, [20], rank=r, world=2)[0][20][1] for r in range(2)]
    assert parts[0].shape[0] + parts[1].shape[0] == total
    assert abs(parts[0].shape[0] - parts[1].shape[0]) <= 1
    capped, _ = load_val_set(val, 64, [20], max_images=5)
    assert capped[20][0].shape == (5, 3, 64, 64)


def _gray16(value):
    return Image.fromarray(np.full((8, 10), value, dtype=np.uint16))


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.fromarray(np.full((8, 10), 77, np.uint8), "L"), (77, 77, 77)),
    (lambda: _gray16(65535), (255, 255, 255)),
    (lambda: _gray16(0), (0, 0, 0)),
    (lambda: _gray16(32896), (128, 128, 128)),  # 32896 * 255 / 65535 == 128
    (lambda: Image.fromarray(np.dstack([np.full((8, 10), 77, np.uint8), np.full((8, 10), 255, np.uint8)]), "LA"),
     (77, 77, 77)),
    (lambda: Image.fromarray(np.dstack([np.full((8, 10), 77, np.uint8), np.zeros((8, 10), np.uint8)]), "LA"),
     (255, 255, 255)),  # fully transparent: composited on white
    (lambda: Image.fromarray(np.dstack([np.full((8, 10, 3), (200, 10, 30), np.uint8),
                                        np.full((8, 10), 255, np.uint8)]), "RGBA"), (200, 10, 30)),
])
def test_decode_modes_to_rgb8(make, expected):
    img = make()
    data = png_bytes(img)
    assert Image.open(io.BytesIO(data)).mode == img.mode  # the PNG really carries that mode
    rgb = decode_rgb8(data)
    assert rgb.shape == (8, 10, 3) and rgb.dtype == np.uint8
    assert (rgb == np.array(expected, np.uint8)).all(), rgb[0, 0]


@pytest.mark.parametrize("maxval", [65535, 1023])
def test_a_dark_deep_pgm_keeps_its_depth(maxval):
    """A 16-bit PGM whose samples are all <= 255 (a dark frame) was read as 8-bit, up to 255x too bright: its depth
    was guessed from the pixels' maximum; the file's maxval says it (PIL scales maxval > 255 to 0..65535)."""
    x = np.random.default_rng(3).integers(0, 256, (8, 10)).astype(">u2")
    data = b"P5\n10 8\n%d\n" % maxval + x.tobytes()
    rgb = decode_rgb8(data)
    assert np.abs(rgb[..., 0] - np.rint(x * (255 / maxval))).max() <= 1  # (PIL's maxval scaling rounds first)
    assert (rgb[..., 0] == rgb[..., 2]).all() and abs(rgb.mean() - (x * (255 / maxval)).mean()) < 0.1


def test_decode_palette_png():
    idx = np.zeros((8, 10), np.uint8)
    idx[:, 5:] = 2
    img = Image.fromarray(idx, "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    data = png_bytes(img)
    assert Image.open(io.BytesIO(data)).mode == "P"
    rgb = decode_rgb8(data)
    assert rgb.shape == (8, 10, 3) and rgb.dtype == np.uint8
    assert (rgb[:, :5] == (255, 0, 0)).all() and (rgb[:, 5:] == (0, 0, 255)).all()


def test_decode_rgba_composites_transparent_on_white():
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., :3] = (200, 10, 30)
    rgba[4:, :, 3] = 255
    rgb = decode_rgb8(png_bytes(Image.fromarray(rgba, "RGBA")))
    assert (rgb[:4] == 255).all()
    assert (rgb[4:] == (200, 10, 30)).all()


def test_decode_rejects_garbage_and_truncation():
    rng = np.random.default_rng(1)
    with pytest.raises(images.BadImage) as garbage:
        decode_rgb8(rng.bytes(300))
    # the reason prepare's manifest and console record: no "<_io.BytesIO object at 0x...>" from PIL
    assert str(garbage.value) == "UnidentifiedImageError: cannot identify image file"
    full = random_png(rng, 32, 32)
    with pytest.raises(images.BadImage):
        decode_rgb8(full[: len(full) // 2])
    assert decode_rgb8(full).shape == (32, 32, 3)


def _truncated_tar(write_tar, tmp_path):
    rng = np.random.default_rng(2)
    full = write_tar(tmp_path / "full.tar", [(f"good{i}", {"png": random_png(rng, 64, 64)}) for i in range(6)])
    data = full.read_bytes()
    cut = len(data) // 2
    with tarfile.open(full) as tar:
        complete = {m.name.split(".")[0] for m in tar.getmembers() if m.offset_data + m.size <= cut}
    assert 0 < len(complete) < 6
    path = tmp_path / "cut-000000.tar"
    path.write_bytes(data[:cut])
    full.unlink()
    return path, complete


def test_truncated_tar_does_not_crash_stream(tmp_path, write_tar):
    path, complete = _truncated_tar(write_tar, tmp_path)
    rng = np.random.default_rng(3)
    other = write_tar(tmp_path / "other-000000.tar", [(f"other{i}", {"png": random_png(rng, 64, 64)}) for i in range(4)])

    stream = ShardStream([str(path)], CROP, QRANGE, shuffle_buffer=4, epochs=1)
    keys = {raw["__key__"] for raw in stream._epoch_raw(0, 0, 1, row=0)}
    assert complete <= keys
    assert int(stream.skipped[0, SKIP_REASONS.index("bad_tar")]) >= 1

    loader = TorchLoader(ShardStream([str(path)], CROP, QRANGE, shuffle_buffer=4, epochs=1), 2, 0, CPU)
    assert count_samples(loader) >= len(complete)
    skipped = loader.skipped()
    assert skipped["bad_tar"] + skipped["corrupt"] >= 1

    # a good shard next to the broken one is read in full
    both = TorchLoader(ShardStream([str(path), str(other)], CROP, QRANGE, shuffle_buffer=4, epochs=1), 2, 0, CPU)
    assert count_samples(both) >= len(complete) + 4
    assert both.skipped()["bad_tar"] + both.skipped()["corrupt"] >= 1


def test_load_val_set_survives_truncated_tar(tmp_path, write_tar):
    path, complete = _truncated_tar(write_tar, tmp_path)
    sets, skipped = load_val_set([str(path)], CROP, [20])
    assert sets[20][1].shape[0] >= len(complete)
    assert skipped["bad_tar"] + skipped["corrupt"] >= 1


# -- GPU --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_loader_moves_batches_to_cuda(sample_shards):
    loader = TorchLoader(make_stream(sample_shards), 2, 0, torch.device("cuda"), channels_last=True)
    batch = take(loader, 1)[0]
    for key in ("jpeg", "clean", "quality"):
        assert batch[key].device.type == "cuda"
    assert batch["jpeg"].dtype == torch.float32
    assert batch["jpeg"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
def test_to_device_queues_the_copy_without_waiting_for_the_gpu():
    """Handing a batch to the GPU must not block the host behind the kernels already queued (the previous
    step): that wait was booked as data wait. Crops and qualities pinned, as the DataLoader gives them (the
    degrade-ahead thread hands its qualities over on the GPU already)."""
    from dist_dejpeg.data.contract import to_device

    crops = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8).pin_memory()
    batch = {"jpeg": crops, "clean": crops, "quality": torch.tensor([10, 20]).pin_memory()}
    # once first, as in training: the first launch of each kernel loads its module, and with CUDA's lazy loading
    # that may wait for the device
    to_device(batch, torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead of the copy
    out = to_device(batch, torch.device("cuda"))
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_busy, "to_device waited for the GPU"
    assert out["quality"].tolist() == [10, 20]
    # CUDA divides by a scalar as a multiplication by its reciprocal: 1 ulp from the CPU's division (seen on an H200)
    torch.testing.assert_close(out["jpeg"].cpu(), crops.float() / 255)


# -- batch-level degradation (the torch backend's GPU path) --------------------------------------------------
def test_batch_degradation_plumbing_matches_worker_degradation(sample_shards):
    """With degrade_batch, workers send clean crops (no "jpeg" key) and the consumer degrades: degrade_batch is
    called once per batch with exactly that batch's clean crops (uint8) and qualities, and its output is the
    batch's JPEG input; with the libjpeg reference function the batches are identical to worker-side
    degradation."""
    from dist_dejpeg.data.gpu_jpeg import jpeg_roundtrip_cpu

    calls = []

    def spy(clean, quality):
        jpeg = jpeg_roundtrip_cpu(clean, quality)
        calls.append((clean.clone(), torch.as_tensor(quality).clone(), jpeg.clone()))
        return jpeg

    assert "jpeg" in next(iter(make_stream(sample_shards)))  # without degrade_batch the workers degrade
    workers = take(TorchLoader(make_stream(sample_shards), 4, 0, CPU), 3)
    loader = TorchLoader(make_stream(sample_shards), 4, 0, CPU, degrade_batch=spy)
    sent = list(itertools.islice(loader.stream, 4))
    assert all("jpeg" not in s for s in sent) and all("clean" in s for s in sent)
    batched = take(loader, 3)
    assert len(calls) == len(batched) == 3
    for a, b, (clean, quality, jpeg) in zip(workers, batched, calls):
        assert clean.dtype == torch.uint8 and clean.shape == (4, 3, CROP, CROP)
        assert torch.equal(clean.float() / 255, b["clean"]) and torch.equal(quality, b["quality"])
        assert torch.equal(jpeg.float() / 255, b["jpeg"])
        assert all(torch.equal(a[k], b[k]) for k in ("jpeg", "clean", "quality"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_grouped_qualities_run_ahead_and_exact_resume(sample_shards, num_workers):
    """The GPU path's batching (here with libjpeg in place of nvJPEG): at most K distinct qualities per batch,
    each in the range and spread over it; degrading ahead in a thread gives the same batches as inline, and a
    resume after batches taken while others were degraded ahead is exact."""
    from dist_dejpeg.data.gpu_jpeg import jpeg_roundtrip_cpu

    def new_loader(ahead):
        return TorchLoader(make_stream(sample_shards, seed=4, num_workers=num_workers), 6, num_workers, CPU,
                           degrade_batch=jpeg_roundtrip_cpu, quality_groups=2, run_ahead=ahead)

    inline = take(new_loader(0), 7)
    seen = set()
    for b in inline:
        qs = set(b["quality"].tolist())
        assert 1 <= len(qs) <= 2 and all(QRANGE[0] <= q <= QRANGE[1] for q in qs)
        seen |= qs
    assert len(seen) > 4  # the groups are drawn anew for every batch
    # the jpeg of each sample is the libjpeg round trip at the quality the batch reports for it
    b = inline[0]
    clean_u8 = (b["clean"] * 255).round().to(torch.uint8)
    assert torch.equal((b["jpeg"] * 255).round().to(torch.uint8), jpeg_roundtrip_cpu(clean_u8, b["quality"]))

    first = new_loader(3)
    head = take(first, 4)  # the thread has degraded batches beyond these
    assert all(batches_equal(x, y) for x, y in zip(head, inline[:4]))
    assert first.state_dict()["consumed"] == 4
    resumed = new_loader(3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = take(resumed, 3)
    assert [batches_equal(x, y) for x, y in zip(tail, inline[4:])] == [True] * 3


def _nvjpeg_loader(sample_shards, ahead: int, workers: int = 2):
    from dist_dejpeg.data.gpu_jpeg import jpeg_roundtrip_cuda

    return TorchLoader(make_stream(sample_shards, seed=2, num_workers=workers), 8, workers, torch.device("cuda"),
                       degrade_batch=jpeg_roundtrip_cuda, quality_groups=3, run_ahead=ahead)


@pytest.mark.gpu
@pytest.mark.parametrize("training_stream", ["default", "own"])
def test_nvjpeg_run_ahead_on_a_side_stream_matches_inline(sample_shards, training_stream):
    """Degraded ahead in a thread while the GPU is busy with queued work on the training's stream (the default
    stream, or a stream of its own as the trainer uses on CUDA), the batches equal those degraded inline on an
    idle GPU: torchvision's encoder reads and writes on streams of its own (see gpu_jpeg._nvjpeg_encode)."""
    inline = take(_nvjpeg_loader(sample_shards, 0), 12)
    stream = torch.cuda.Stream() if training_stream == "own" else torch.cuda.default_stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        batches = iter(_nvjpeg_loader(sample_shards, 2))
        ahead = []
        for _ in range(12):
            torch.cuda._sleep(20_000_000)  # ~10 ms of "training" queued before each batch is taken
            ahead.append(next(batches))
        torch.cuda.synchronize()
    for a, b in zip(inline, ahead):
        assert b["jpeg"].device.type == "cuda" and torch.equal(a["quality"], b["quality"])
        assert torch.equal(a["jpeg"], b["jpeg"]) and torch.equal(a["clean"], b["clean"])


@pytest.mark.gpu
def test_degrading_ahead_does_not_wait_for_a_training_on_its_own_stream(sample_shards):
    """The degrade-ahead thread's nvJPEG round trips wait for their own stream and stream 0 only: with the
    training's work queued on a stream of its own, batches keep coming while that work runs. (A device-wide
    sync there waited for every queued training step, and the trainer then waited for data.)"""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        batches = iter(_nvjpeg_loader(sample_shards, 2))
        next(batches)  # workers started, nvJPEG initialised
        torch.cuda.synchronize()
        torch.cuda._sleep(10_000_000_000)  # several seconds of GPU time queued on the training's stream
        got = [next(batches) for _ in range(4)]
        still_busy = not stream.query()
        torch.cuda.synchronize()
    assert still_busy, "the degrade-ahead thread waited for the training's stream"
    assert all(b["jpeg"].device.type == "cuda" for b in got)


def test_run_ahead_hands_a_worker_error_to_the_trainer(sample_shards):
    def broken(clean, quality):
        raise RuntimeError("nvjpeg exploded")

    loader = TorchLoader(make_stream(sample_shards), 4, 0, CPU, degrade_batch=broken, run_ahead=2)
    with pytest.raises(RuntimeError, match="nvjpeg exploded"):
        take(loader, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("quality", [10, 20, 40, 80])
def test_nvjpeg_degradation_within_half_a_db_of_libjpeg(sample_shards, quality):
    from dist_dejpeg.data.gpu_jpeg import jpeg_roundtrip_cpu, jpeg_roundtrip_cuda

    clean = take(TorchLoader(make_stream(sample_shards), 16, 0, torch.device("cpu")), 1)[0]["clean"]
    clean_u8 = (clean * 255).round().to(torch.uint8).cuda()
    q = torch.full((16,), quality, device="cuda")
    ours = jpeg_roundtrip_cuda(clean_u8, q).float().cpu()
    peer = jpeg_roundtrip_cpu(clean_u8.cpu(), q.cpu()).float()
    target = clean_u8.float().cpu()
    gap = 10 * np.log10(((peer - target) ** 2).mean().item() / ((ours - target) ** 2).mean().item())
    print(f"nvJPEG vs libjpeg at q{quality}: {gap:+.3f} dB (positive: nvJPEG closer to the clean image)")
    assert abs(gap) < 0.5, f"nvJPEG vs libjpeg at q{quality}: {gap:+.3f} dB"


def test_420_rebuilt_from_444_round_trips_matches_libjpeg(sample_shards):
    """The GPU path's 4:2:0 emulation, run with libjpeg's own 4:4:4 encoder in place of nvJPEG's: within
    0.1 dB of libjpeg's 4:2:0 at every quality (measured <= 0.03) and 40+ dB from its pixels (measured ~48),
    while plain 4:4:4 is 0.3 dB (q10) to 2 dB (q90) off."""
    from functools import partial

    from dist_dejpeg.data.gpu_jpeg import jpeg_roundtrip_cpu, libjpeg_coder, subsample_420

    # 32 crops: enough colour among them for 4:4:4 to beat 4:2:0 clearly (8 of today's samples were too grey)
    clean = take(TorchLoader(make_stream(sample_shards), 32, 0, torch.device("cpu")), 1)[0]["clean"]
    clean_u8 = (clean * 255).round().to(torch.uint8)

    def psnr(a, b):
        return 10 * np.log10(255.0 ** 2 / ((a.double() - b.double()) ** 2).mean().item())

    for quality in (10, 40, 90):
        q = torch.full((32,), quality)
        libjpeg = jpeg_roundtrip_cpu(clean_u8, q)
        rebuilt = subsample_420(clean_u8, q, partial(libjpeg_coder, subsampling=0))
        plain = jpeg_roundtrip_cpu(clean_u8, q, subsampling=0)
        gap = psnr(rebuilt, clean_u8) - psnr(libjpeg, clean_u8)
        assert abs(gap) < 0.1, (quality, gap)
        assert psnr(rebuilt, libjpeg) > 40, quality
        assert psnr(plain, clean_u8) - psnr(libjpeg, clean_u8) > abs(gap) + 0.1, quality


def test_packed_444_round_trips_equal_one_image_at_a_time(sample_shards, monkeypatch):
    """One round trip per quality on a canvas of the batch's tiles decodes every tile exactly as coding it alone
    (4:4:4 JPEG codes 8 x 8 blocks independently), for mixed tile sizes and when a group is split over several
    canvases; tiles off the 8-pixel grid are handed to the coder as they are. libjpeg's 4:4:4 stands in for
    nvJPEG."""
    from functools import partial

    from dist_dejpeg.data import gpu_jpeg

    calls = []
    alone_444 = partial(gpu_jpeg.libjpeg_coder, subsampling=0)

    def coder(images, quality):
        calls.append([tuple(image.shape) for image in images])
        return alone_444(images, quality)

    clean = take(TorchLoader(make_stream(sample_shards), 6, 0, CPU), 1)[0]["clean"]
    u8 = (clean * 255).round().to(torch.uint8)
    tiles = list(u8) + [u8[0, :, :32, :48], u8[1, :, 8:40, :16]]
    quality = [10, 50, 10, 10, 50, 90, 10, 50]
    alone = [alone_444([t], q)[0] for t, q in zip(tiles, quality)]
    packed = gpu_jpeg.roundtrip_by_quality(tiles, quality, coder)
    assert len(calls) == 3 and all(len(c) == 1 for c in calls)  # one canvas per quality
    assert all(torch.equal(a, b) for a, b in zip(alone, packed))
    assert not all(torch.equal(a, t) for a, t in zip(alone, tiles))  # the round trip did change them

    monkeypatch.setattr(gpu_jpeg, "_MAX_CANVAS", CROP * CROP * 2)  # at most two full tiles per canvas
    calls.clear()
    split = gpu_jpeg.roundtrip_by_quality(tiles, quality, coder)
    assert len(calls) > 3 and all(torch.equal(a, b) for a, b in zip(alone, split))

    odd = [u8[0, :, :30, :30], u8[1, :, :30, :30]]  # off the grid: as they are, not on a canvas
    calls.clear()
    assert all(torch.equal(a, alone_444([t], 20)[0])
               for a, t in zip(gpu_jpeg.roundtrip_by_quality(odd, [20, 20], coder), odd))
    assert calls == [[(3, 30, 30), (3, 30, 30)]]

    q = torch.tensor([10, 40, 10, 40, 90, 90])
    assert torch.equal(gpu_jpeg.subsample_420(u8, q, alone_444), gpu_jpeg.subsample_420(u8, q, alone_444, pack=False))


@pytest.mark.gpu
def test_nvjpeg_packed_matches_image_by_image(sample_shards):
    """nvJPEG on one canvas per quality gives the pixels of nvJPEG on the images as a list (printed: how many differ;
    the decoder may pick another backend for a large canvas, so +-1 level is allowed, no more)."""
    from dist_dejpeg.data.gpu_jpeg import jpeg_roundtrip_cuda

    clean = take(TorchLoader(make_stream(sample_shards), 16, 0, CPU), 1)[0]["clean"]
    u8 = (clean * 255).round().to(torch.uint8).cuda()
    q = torch.tensor([10, 20, 40, 80] * 4)
    packed, alone = jpeg_roundtrip_cuda(u8, q), jpeg_roundtrip_cuda(u8, q, pack=False)
    diff = (packed.int() - alone.int()).abs()
    print(f"packed vs image by image: {(diff > 0).float().mean().item():.2e} of values differ, max {diff.max().item()}")
    assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 0.01


@pytest.mark.gpu
def test_nvjpeg_encoder_settings_are_known():
    """What nvJPEG writes (printed for the GPU check): its subsampling decides whether the 4:2:0 emulation runs;
    its quantization tables must be libjpeg's at the same quality."""
    from PIL import Image
    from torchvision.io import encode_jpeg

    from dist_dejpeg.data.gpu_jpeg import nvjpeg_subsampling

    rgb = np.ascontiguousarray(Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)))
    image = torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1).contiguous()
    for quality in (20, 80):
        nv = Image.open(io.BytesIO(bytes(encode_jpeg(image.cuda(), quality=quality).cpu().numpy())))
        buf = io.BytesIO()
        Image.fromarray(np.asarray(rgb)).save(buf, format="JPEG", quality=quality)
        lj = Image.open(io.BytesIO(buf.getvalue()))
        print(f"q{quality}: nvJPEG subsampling code {nvjpeg_subsampling(torch.device('cuda'))} (0 = 4:4:4, 2 = 4:2:0)")
        assert {k: list(v) for k, v in nv.quantization.items()} == {k: list(v) for k, v in lj.quantization.items()}
    assert nvjpeg_subsampling(torch.device("cuda")) in (0, 2)


def test_stream_of_tiles_smaller_than_the_crop_fails_instead_of_spinning(sample_shards):
    """Every sample skipped (96 px tiles, 128 px crops): an error naming the reason, not an endless loop."""
    loader = TorchLoader(make_stream(sample_shards, crop=128), 2, 0, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"all \d+ samples of epoch 0 were skipped.*'too_small': \d+"):
        take(loader, 1)


def test_prepare_folder_always_holds_out_a_usable_photo(tmp_path):
    """Two usable photos and one too small for a tile: whichever photo the split holds out, a usable one
    ends in validation (the seeds cover the small one being held out first) and training keeps the other."""
    from dist_dejpeg.data.folder import prepare_folder

    import skimage.data

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(skimage.data.astronaut()[:160, :160]).save(src / "a.png")
    Image.fromarray(skimage.data.coffee()[:160, :160]).save(src / "b.png")
    Image.fromarray(skimage.data.chelsea()[:40, :40]).save(src / "small.png")
    for seed in range(6):
        manifest = prepare_folder(src, tmp_path / f"out{seed}", tile=64, train_step=64, shard_size=8, seed=seed,
                                  val_fraction=0.34)
        val = [n for n, info in manifest["sources"].items() if info["split"] == "val"]
        assert len(val) == 1 and manifest["splits"]["val"]["samples"] > 0, seed
        assert manifest["splits"]["train"]["samples"] > 0 and manifest["rejected"][0]["source"] == "small"


def test_a_growing_folder_keeps_every_photos_split(tmp_path):
    """Photos added to the folder (a new shoot) never move a photo the model trained on into validation (a shuffle
    of the whole list did, and validation then measured photos the model had learned); each photo's split is its
    own name's with the seed, the held-out share about --val-fraction, at least one photo of two."""
    from dist_dejpeg.data.folder import held_out_rank

    names = [f"IMG_{i:04d}" for i in range(400)]
    held = {n for n in names if held_out_rank(n, 0) < 0.1}
    assert 25 <= len(held) <= 55  # about 10 %
    grown = {n for n in names + [f"NEW_{i:04d}" for i in range(100)] if held_out_rank(n, 0) < 0.1}
    assert grown & set(names) == held  # the old photos' splits unchanged
    assert {n for n in names if held_out_rank(n, 1) < 0.1} != held  # another --seed holds out others
    import skimage.data

    from dist_dejpeg.data.folder import prepare_folder

    src, photo = tmp_path / "src", skimage.data.astronaut()
    src.mkdir()
    splits = []
    for i in range(12):  # prepared after each new photo
        Image.fromarray(np.ascontiguousarray(photo[i * 16:i * 16 + 96, i * 8:i * 8 + 96])).save(src / f"p{i:02d}.png")
        if i >= 1:
            m = prepare_folder(src, tmp_path / f"out{i}", tile=64, train_step=64, shard_size=8, val_fraction=0.3)
            splits.append({n: info["split"] for n, info in m["sources"].items()})
    for before, after in zip(splits, splits[1:]):  # a photo that trained never validates after the folder grew
        assert not [n for n, split in before.items() if split == "train" and after[n] == "val"], (before, after)
    # names a camera repeats across folders, or without ASCII letters: their sample names (IMG0001-2, img-3) are
    # given in path order, so a photo added in an earlier folder renamed the others, and their split followed the name
    src = tmp_path / "named"
    crops = iter(np.ascontiguousarray(photo[i * 16:i * 16 + 96, i * 8:i * 8 + 96]) for i in range(12))
    waves = [["2019/IMG_0001.png", "2020/IMG_0001.png", "日本.png", "東京.png", "a.png", "b.png"],
             ["2018/IMG_0001.png", "写真.png", "0.png"], ["2017/IMG_0001.png", "山.png", "c.png"]]
    by_path = []
    for i, wave in enumerate(waves):
        for rel in wave:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(next(crops)).save(src / rel)
        for seed in range(4):
            m = prepare_folder(src, tmp_path / f"named{i}-{seed}", tile=64, train_step=64, shard_size=8,
                               val_fraction=0.3, seed=seed)
            by_path.append((i, seed, {info["path"]: info["split"] for info in m["sources"].values()}))
            camera = {split for path, split in by_path[-1][2].items() if path.endswith("IMG_0001.png")}
            assert len(camera) == 1, by_path[-1]  # one photo's name, one split: never in both
    for i, seed, splits in by_path:
        if i:
            earlier = next(s for j, t, s in by_path if j == i - 1 and t == seed)
            moved = [path for path, split in earlier.items() if split == "train" and splits[path] == "val"]
            assert not moved, (seed, earlier, splits)  # (the one held out at least, of a few, may train later)
    # the one photo held out at least, or the last kept for training, is a whole group of one key too (a count of
    # photos cut a PNG and its TIFF apart: IMG_2.png held out, IMG_2.tif trained, with seed 0 at 0.1)
    pair = tmp_path / "pair"
    pair.mkdir()
    for i, name in enumerate(("IMG_2.png", "IMG_2.tif", "IMG_1.png")):  # (other pixels each: not duplicates)
        Image.fromarray(np.ascontiguousarray(photo[200 + i * 40:296 + i * 40, 200:296])).save(pair / name)
    for seed in range(6):
        for fraction in (0.1, 0.75):
            m = prepare_folder(pair, tmp_path / f"pair{seed}-{fraction}", tile=64, train_step=64, shard_size=8,
                               val_fraction=fraction, seed=seed)
            splits = {info["path"]: info["split"] for info in m["sources"].values()}
            assert splits["IMG_2.png"] == splits["IMG_2.tif"] and "train" in splits.values(), (seed, fraction, splits)


def test_prepare_folder_says_when_one_photo_gives_most_training_tiles(tmp_path, capsys):
    """An 8000 x 600 panorama among snapshots gave 60% of the training tiles without a word; each photo's tile count
    is in the manifest now, and a photo over a quarter of them (of four or more) is named."""
    import skimage.data

    from dist_dejpeg.cli import main

    src, photo = tmp_path / "src", skimage.data.astronaut()
    src.mkdir()
    for i in range(5):
        Image.fromarray(np.ascontiguousarray(photo[i * 20:i * 20 + 64, i * 20:i * 20 + 64])).save(src / f"s{i}.png")
    Image.fromarray(np.ascontiguousarray(np.tile(photo[:64], (1, 4, 1)))).save(src / "panorama.png")  # 64 x 2048
    assert main(["prepare", "folder", "--src", str(src), "--out", str(tmp_path / "out"), "--tile", "64",
                 "--step", "64", "--val-fraction", "0.01"]) == 0
    err = capsys.readouterr().err
    sources = json.loads((tmp_path / "out" / "manifest.json").read_text())["sources"]
    assert sources["panorama"]["tiles"] == 32 and all(sources[f"s{i}"]["tiles"] == 1 for i in range(5)
                                                       if sources[f"s{i}"]["split"] == "train")
    assert "warning: panorama 32 (" in err and "training tiles come from one photo" in err, err


def test_prepare_folder_says_when_no_validation_split_is_written(tmp_path, capsys):
    from dist_dejpeg.cli import main

    import skimage.data

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(skimage.data.astronaut()[:160, :160]).save(src / "a.png")
    Image.fromarray(skimage.data.chelsea()[:40, :40]).save(src / "small.png")
    for seed in range(3):  # whichever the shuffle holds out, the one usable photo trains
        out = tmp_path / f"out{seed}"
        assert main(["prepare", "folder", "--src", str(src), "--out", str(out), "--tile", "64", "--seed", str(seed)]) == 0
        err = capsys.readouterr().err
        assert "no validation tiles were written" in err and "Add another photo" in err
        assert shard_keys(list_shards(out, "train-*.tar")[0])
    # three usable photos, none held out by choice: that is what it says, not to add a photo
    Image.fromarray(skimage.data.coffee()[:160, :160]).save(src / "b.png")
    Image.fromarray(skimage.data.chelsea()[:160, :160]).save(src / "c.png")
    assert main(["prepare", "folder", "--src", str(src), "--out", str(tmp_path / "none"), "--tile", "64",
                 "--val-fraction", "0"]) == 0
    err = capsys.readouterr().err
    assert "--val-fraction 0 holds none out" in err and "Add another photo" not in err, err


def test_prepare_says_what_it_wrote_once_with_the_rejected_count(tmp_path, capsys, caplog):
    """prepare printed "wrote N tiles" and logged it again, there as "1 sources rejected"."""
    from dist_dejpeg.cli import main

    import skimage.data

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(skimage.data.astronaut()[:160, :160]).save(src / "a.png")
    Image.fromarray(skimage.data.coffee()[:160, :160]).save(src / "b.png")
    Image.fromarray(skimage.data.chelsea()[:40, :40]).save(src / "small.png")
    with caplog.at_level(logging.INFO):
        assert main(["prepare", "folder", "--src", str(src), "--out", str(tmp_path / "out"), "--tile", "64"]) == 0
    out = capsys.readouterr().out
    said = out.splitlines() + [r.getMessage() for r in caplog.records]
    assert [line for line in said if "wrote" in line] == [line for line in out.splitlines() if line.startswith("wrote")]
    assert len(out.splitlines()) == 1 and out.rstrip().endswith(f"to {tmp_path / 'out'}; 1 source rejected"), out


def _tiles_by_source(root: Path) -> dict[str, list[np.ndarray]]:
    """Every tile in a prepared folder's shards, by its source's key stem, in index order."""
    found: dict[str, dict[int, np.ndarray]] = {}
    for path in list_shards(root, "*.tar"):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                stem, idx = key.rsplit("_s", 1)
                found.setdefault(stem, {})[int(idx)] = images.decode_component(ext, tar.extractfile(member).read())
    return {stem: [t for _, t in sorted(d.items())] for stem, d in found.items()}


@pytest.mark.parametrize("action", ["halve", "keep", "skip"])
def test_prepare_folder_halves_keeps_or_skips_the_photos_that_carry_jpeg_compression(tmp_path, capsys, caplog,
                                                                                      action):
    """A JPEG file, and a PNG saved from a JPEG, are listed in the manifest's jpeg_sources with the quality their
    pixels show, and prepare says what it did with them. By default (halve) each is tiled at half size and its
    tiles show no JPEG grid; keep tiles it as it is (the grid is in the "clean" tiles); skip rejects it. A
    lossless photo is neither listed nor changed."""
    from dist_dejpeg.cli import main
    from dist_dejpeg.jpeg.quality import estimate_from_pixels

    import skimage.data

    src = tmp_path / "src"
    src.mkdir()
    photo = skimage.data.astronaut()[:256, :256]
    Image.fromarray(photo).save(src / "lossless.png")
    Image.fromarray(photo).save(src / "file.jpg", quality=60)
    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()[:256, :256]).save(buf, "JPEG", quality=80)
    Image.open(buf).save(src / "was_jpeg.png")
    Image.fromarray(skimage.data.chelsea()[:256, :256]).resize((512, 512)).save(src / "low.jpg", quality=20)
    args = ["prepare", "folder", "--src", str(src), "--out", str(tmp_path / "out"), "--tile", "128"]
    assert main(args + ([] if action == "halve" else ["--jpeg-sources", action])) == 0
    err = capsys.readouterr().err
    manifest = manifest_of(tmp_path / "out")
    assert manifest["jpeg_sources"] == {"file": 60, "wasjpeg": 80, "low": 20}, manifest["jpeg_sources"]
    assert manifest["jpeg_action"] == action
    said = [r.getMessage() for r in caplog.records if "carry JPEG compression" in r.getMessage()]
    # the log's warning, once (skip tiles twice, its first validation split being empty: it was said per tiling)
    assert len(said) == 1 and "carry JPEG compression" not in err, (said, err)
    assert said[-1].startswith("3 of 4 photos carry JPEG compression in their pixels") and "wasjpeg (q80)" in said[-1]
    err += said[-1]
    tiles = _tiles_by_source(tmp_path / "out")
    assert manifest["sources"]["lossless"]["height"] == 256 and "halved" not in manifest["sources"]["lossless"]
    assert estimate_from_pixels(tiles["lossless"][0]).quality is None
    if action == "skip":
        assert set(manifest["sources"]) == {"lossless"} and set(tiles) == {"lossless"}
        assert {r["source"] for r in manifest["rejected"]} == {"file", "wasjpeg", "low"}
        assert "rejected file.jpg: JPEG compression in its pixels (q60)" in err, err
        return
    assert set(manifest["sources"]) == {"lossless", "file", "wasjpeg", "low"}
    for name, size, times in (("file", 256, 1), ("wasjpeg", 256, 1), ("low", 512, 2)):  # twice below q30
        info = manifest["sources"][name]
        if action == "halve":
            size //= 2 ** times
        assert (info["height"], info["width"], info.get("halved", 0)) == (size, size, times if action == "halve"
                                                                           else 0), info
        found = [estimate_from_pixels(t).quality for t in tiles[name]]
        per_side = (size - 128) // (64 if info["split"] == "train" else 128) + 1
        assert len(found) == per_side ** 2, (name, info, len(found))
        if action == "halve":
            assert found == [None], f"{name}: a JPEG grid is left in its halved tile ({found})"
            assert "used at half size (a quarter below q30)" in err
        else:
            assert all(q is not None and abs(q - manifest["jpeg_sources"][name]) <= 2 for q in found), (name, found)
            assert "their artefacts become the clean targets" in err


def test_prepare_takes_its_folder_as_an_argument(tmp_path, capsys):
    """`prepare folder photos/` as `--src photos/` (and div2k's as --root); a second, different folder or one for the
    samples is a clear error (exit 2) before anything is written."""
    from dist_dejpeg.cli import main

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (160, 160, 3), np.uint8)).save(src / f"{i}.png")
    assert main(["prepare", "folder", str(src), "--out", str(tmp_path / "a"), "--tile", "128"]) == 0
    assert manifest_of(tmp_path / "a")["splits"]["train"]["samples"] > 0
    assert main(["prepare", "folder", str(src), "--src", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert f"takes one folder: {src} or --src {tmp_path}" in capsys.readouterr().err
    assert main(["prepare", "samples", str(src), "--out", str(tmp_path / "c")]) == 2
    assert "prepare samples takes no folder" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# -- prepare folder: names, duplicates, bad files, limits, settings, an interrupted run -----------------------
def _noise(path: Path, seed: int, size: int = 80) -> Path:
    """A lossless photo of random pixels (no JPEG grid), ``size`` px square, at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)).save(path, lossless=True)
    return path


def _folder_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_folder_sample_keys_are_unique_and_sources_keep_their_paths(tmp_path):
    """A suffix for a repeated name never takes a real file's name (x, x.webp, x-2; a/holiday, b/holiday,
    a/holiday-2): every key is unique, the manifest lists every file with its path below --src."""
    from dist_dejpeg.data.folder import prepare_folder, unique_names

    assert unique_names(["x", "x", "x-2", "x"]) == ["x", "x-3", "x-2", "x-4"]
    src = tmp_path / "src"
    files = ["x.png", "x.webp", "x-2.png", "a/holiday.png", "b/holiday.png", "a/holiday-2.png", "ünïcødé 日本.png"]
    for i, name in enumerate(files):
        _noise(src / name, i)
    if not Image.open(src / "x.webp").format == "WEBP":
        pytest.skip("Pillow without WebP")
    manifest = prepare_folder(src, tmp_path / "out", tile=32, train_step=32, shard_size=8, val_fraction=0.3)
    keys = all_keys(list_shards(tmp_path / "out", "*.tar"))
    assert len(keys) == len(set(keys)) == sum(manifest["splits"][s]["samples"] for s in ("train", "val"))
    assert sorted(info["path"] for info in manifest["sources"].values()) == sorted(files)
    assert {k.rsplit("_s", 1)[0] for k in keys} == set(manifest["sources"])
    assert manifest["sources"]["x-2"]["path"] == "x-2.png" and manifest["sources"]["ncd"]["path"] == files[-1]


def test_prepare_folder_drops_duplicates_before_the_split_and_rejects_unreadable_files(tmp_path, capsys):
    """A byte-identical copy and a symlink to a file also present are listed as duplicates of the first by path
    (and never reach train and val both); a file of the same pixels in another format too; an unreadable file
    (here a symlink to /proc/self/mem: EIO) and a broken link are rejected with their reasons, the rest prepared."""
    from dist_dejpeg.cli import main

    src = tmp_path / "src"
    first = _noise(src / "a.png", 0)
    (src / "b.png").write_bytes(first.read_bytes())
    (src / "link.png").symlink_to(first)
    Image.open(first).save(src / "same_pixels.bmp")
    _noise(src / "c.png", 1)
    _noise(src / "d.png", 2)
    (src / "moved.png").symlink_to(tmp_path / "gone.png")  # a link whose photo was moved away
    unreadable = Path("/proc/self/mem").exists()
    if unreadable:
        (src / "mem.png").symlink_to("/proc/self/mem")
    for seed in range(4):
        out = tmp_path / f"out{seed}"
        assert main(["prepare", "folder", str(src), "--out", str(out), "--tile", "32", "--val-fraction", "0.5",
                     "--seed", str(seed)]) == 0
        manifest = manifest_of(out)
        assert {i["path"] for i in manifest["sources"].values()} <= {"a.png", "same_pixels.bmp", "c.png", "d.png"}
        reasons = {r["path"]: r["reason"] for r in manifest["rejected"]}
        assert reasons["b.png"] == reasons["link.png"] == "duplicate of a.png"
        assert reasons["moved.png"] == f"unreadable: a broken link (to {tmp_path / 'gone.png'}, which does not exist)"
        assert len(manifest["sources"]) == 3 and any("(the same pixels)" in r for r in reasons.values()), reasons
        digests = {s: {i["sha256"] for i in manifest["sources"].values() if i["split"] == s} for s in ("train", "val")}
        assert digests["train"] and digests["val"] and not digests["train"] & digests["val"]
        if unreadable:
            assert reasons["mem.png"].startswith("unreadable: OSError"), reasons
            assert "rejected mem.png: unreadable" in capsys.readouterr().err


def test_prepare_folder_skips_hidden_files_and_folders(tmp_path):
    """A .thumbnails copy sorted before its photo made the photo 'a duplicate of .thumbnails/a.png' (rejected) and
    trained on the copy; macOS's ._a.png was rejected as undecodable. Hidden entries are skipped, as globs skip them."""
    from dist_dejpeg.data.folder import prepare_folder

    src = tmp_path / "src"
    first = _noise(src / "a.png", 0)
    (src / ".thumbnails").mkdir()
    (src / ".thumbnails" / "a.png").write_bytes(first.read_bytes())
    (src / "._a.png").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    _noise(src / "b.png", 1)
    manifest = prepare_folder(src, tmp_path / "out", tile=32, train_step=32, shard_size=8, val_fraction=0.5)
    assert sorted(i["path"] for i in manifest["sources"].values()) == ["a.png", "b.png"]
    assert manifest["rejected"] == []


def test_prepare_folder_takes_photos_up_to_the_pixel_limit_of_restore(tmp_path, monkeypatch):
    """PIL's own decompression-bomb limit (89.5 MP; lowered here) does not reject a photo below prepare's limit (the
    one restore uses, 100 MP; lowered here too); one above it is rejected, saying so."""
    from dist_dejpeg.data.folder import prepare_folder
    from dist_dejpeg.jpeg import formats
    from dist_dejpeg.restore import images as restore_images

    assert restore_images.DEFAULT_MAX_PIXELS == formats.DEFAULT_MAX_PIXELS == 100_000_000
    import inspect

    assert inspect.signature(prepare_folder).parameters["max_pixels"].default == formats.DEFAULT_MAX_PIXELS
    src = tmp_path / "src"
    _noise(src / "fits.png", 0, 150)  # 22500 px: over twice PIL's lowered limit, under prepare's
    _noise(src / "large.png", 1, 200)  # 40000 px: over prepare's
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    manifest = prepare_folder(src, tmp_path / "out", tile=64, train_step=64, shard_size=8, max_pixels=30000)
    assert set(manifest["sources"]) == {"fits"}
    assert manifest["rejected"] == [{"source": "large", "path": "large.png",
                                     "reason": "too large: 200 x 200 = 0.0 MP, over the 0.03 MP limit (--max-pixels)"}]
    assert Image.MAX_IMAGE_PIXELS == 5000  # put back


def test_prepare_folder_cli_max_pixels_lets_larger_photos_in(tmp_path, capsys):
    """A photo over the limit is rejected with the option that raises it, and --max-pixels raises it (a 102 MP
    medium-format camera is over the 100 MP default)."""
    from dist_dejpeg.cli import main

    src = tmp_path / "src"
    for i in range(3):
        _noise(src / f"p{i}.png", i, 80)  # 6400 px each
    assert main(["prepare", "folder", str(src), "--out", str(tmp_path / "a"), "--tile", "32", "--max-pixels", "6399"]) == 2
    assert "3 too large); raise --max-pixels" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["prepare", "folder", str(src), "--out", str(tmp_path / "b"), "--tile", "32", "--max-pixels", "6400"]) == 0
    assert len(manifest_of(tmp_path / "b")["sources"]) == 3


@pytest.mark.parametrize("action", ["halve", "keep"])
def test_prepare_folder_rejects_a_lossy_webp_but_takes_a_lossless_one(tmp_path, action):
    """A lossy WebP has no JPEG grid for the pixel check to find: its file says it is lossy, and it is rejected
    unless --jpeg-sources keep; a lossless WebP is a clean source. (Animated lossy frames are looked into too.)"""
    from dist_dejpeg.data.folder import prepare_folder

    src = tmp_path / "src"
    src.mkdir()
    rgb = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), np.uint8) for i in range(3)]
    Image.fromarray(rgb[0]).save(src / "lossless.webp", lossless=True)
    Image.fromarray(rgb[1]).save(src / "lossy.WEBP", quality=90)
    Image.fromarray(rgb[2]).save(src / "frames.webp", quality=90, save_all=True,
                                 append_images=[Image.fromarray(rgb[0][::-1].copy())])
    manifest = prepare_folder(src, tmp_path / "out", tile=32, train_step=32, shard_size=8, jpeg=action)
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    if action == "keep":  # (the animation: its frames as files of their own, as restore asks)
        assert set(manifest["sources"]) == {"lossless", "lossy"} and set(rejected) == {"frames.webp"}
        assert rejected["frames.webp"].startswith("several images: an animated WEBP (2 frames): save each as a file")
    else:
        assert set(manifest["sources"]) == {"lossless"}
        assert set(rejected) == {"lossy.WEBP", "frames.webp"}
        assert all(r.startswith("lossy WebP: ") and "--jpeg-sources keep" in r for r in rejected.values())


def test_prepare_folder_rejects_a_tiff_of_pages_and_an_animation_but_not_a_tiffs_preview(tmp_path):
    """A TIFF of several pages and an animated GIF gave prepare their first image without a word (restore refuses
    them): each is rejected, saying what it holds; a TIFF whose second page is a reduced-resolution preview of the
    first (NewSubfileType 1) is one photo."""
    from dist_dejpeg.data.folder import prepare_folder

    src = tmp_path / "src"
    src.mkdir()
    photo = source_photo("astronaut")
    pages = [Image.fromarray(photo[:64, 64 * i:64 * i + 64]) for i in range(4)]
    pages[0].save(src / "scan.tif", save_all=True, append_images=pages[1:3])
    pages[1].save(src / "plain.png")
    pages[2].save(src / "clip.gif", save_all=True, append_images=[pages[3]])
    # (Pillow writes one tiffinfo for every page; only the later pages' is read)
    pages[3].save(src / "with_preview.tif", save_all=True, append_images=[pages[3].resize((16, 16))], tiffinfo={254: 1})
    manifest = prepare_folder(src, tmp_path / "out", tile=32, train_step=32, shard_size=8)
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    assert set(manifest["sources"]) == {"plain", "withpreview"}, (manifest["sources"], rejected)
    assert rejected == {"scan.tif": "several images: a TIFF of 3 pages: save each as a file of its own to train on it",
                        "clip.gif": "several images: an animated GIF (2 frames): save each as a file of its own to "
                                    "train on it"}


@pytest.mark.parametrize("action", ["halve", "keep"])
def test_prepare_folder_names_an_avif_as_lossy_and_a_jpeg_xl_it_cannot_decode(tmp_path, action):
    """An AVIF is rejected as lossy, like a lossy WebP (kept with --jpeg-sources keep), and a JPEG XL that this
    Pillow cannot decode is named as such: neither was left out as a format prepare "cannot read"."""
    from PIL import features

    from dist_dejpeg.data.folder import prepare_folder

    if not features.check("avif"):
        pytest.skip("this Pillow writes no AVIF")
    src = tmp_path / "src"
    src.mkdir()
    photo = source_photo("astronaut")
    for i, name in enumerate(("a.png", "b.png")):
        Image.fromarray(photo[:64, 64 * i:64 * i + 64]).save(src / name)
    Image.fromarray(photo[64:128, :64]).save(src / "phone.AVIF", quality=90)
    (src / "export.jxl").write_bytes(b"\xff\x0a" + bytes(64))  # a JPEG XL codestream's signature
    manifest = prepare_folder(src, tmp_path / "out", tile=32, train_step=32, shard_size=8, jpeg=action)
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    assert rejected["export.jxl"].startswith("JPEG XL: convert to PNG first"), rejected
    if action == "keep":
        assert "phone.AVIF" not in rejected and "phone" in manifest["sources"]
    else:
        assert rejected["phone.AVIF"].startswith("lossy AVIF: its compression artefacts would become clean targets")
        assert set(manifest["sources"]) == {"a", "b"}


@pytest.mark.parametrize("action", ["halve", "keep"])
def test_prepare_folder_refuses_what_restore_wrote_as_a_clean_target(tmp_path, action):
    """A folder holding restore's outputs beside the photos (restore photos -o photos): each output, a model's
    work, is rejected by name unless --jpeg-sources keep; its originals are used."""
    from dist_dejpeg.data.folder import prepare_folder
    from dist_dejpeg.restore.images import save_image

    src = tmp_path / "src"
    src.mkdir()
    photo = source_photo("astronaut")
    for i, name in enumerate(("a.png", "b.png")):
        Image.fromarray(photo[:64, 64 * i:64 * i + 64]).save(src / name)
    save_image(photo[64:128, :64], src / "a_restored.png")  # as restore writes every output
    save_image(photo[64:128, 64:128], src / "b_restored.jpg")
    manifest = prepare_folder(src, tmp_path / "out", tile=32, train_step=32, shard_size=8, jpeg=action)
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    if action == "keep":
        assert not rejected and set(manifest["sources"]) == {"a", "b", "arestored", "brestored"}
    else:
        assert set(rejected) == {"a_restored.png", "b_restored.jpg"} and set(manifest["sources"]) == {"a", "b"}
        assert all(r.startswith("restored by dist-dejpeg: ") and "--jpeg-sources keep" in r for r in rejected.values())


def test_prepare_folder_reads_colours_as_restore_does(tmp_path):
    """A CMYK photo with its profile is tiled in the sRGB pixels restore reads (through the profile, not PIL's
    naive conversion); an RGB photo with a profile keeps its own values in both."""
    from PIL import ImageCms

    from dist_dejpeg.data.folder import prepare_folder
    from dist_dejpeg.restore.images import load_image
    from test_faults_restore import cmyk_profile

    src = tmp_path / "src"
    src.mkdir()
    photo = source_photo("astronaut")[100:164, 180:244]
    Image.fromarray(photo).convert("CMYK").save(src / "print.tif", icc_profile=cmyk_profile())
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(photo[:, ::-1]).save(src / "tagged.png", icc_profile=srgb)
    prepare_folder(src, tmp_path / "out", tile=32, train_step=32, shard_size=8, val_fraction=0)
    tiles = _tiles_by_source(tmp_path / "out")
    for name in ("print", "tagged"):
        rgb = load_image(next(src.glob(f"{name}.*"))).rgb
        assert [t.tobytes() for t in tiles[name]] == [rgb[y:y + 32, x:x + 32].tobytes() for y in (0, 32)
                                                      for x in (0, 32)], name


def test_prepare_folder_follows_linked_folders_once_and_names_photos_it_cannot_read(tmp_path, caplog):
    """A symlinked sub-folder's photos are used (each real folder once: a link loop ends); HEIC/RAW files are
    counted in a warning, and a folder of nothing else is an error that names them."""
    from dist_dejpeg.data.folder import prepare_folder

    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    _noise(src / "a.png", 0)
    _noise(elsewhere / "b.png", 1)
    (src / "linked").symlink_to(elsewhere)
    (src / "loop").symlink_to(src)
    (src / "IMG_1.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (src / "IMG_2.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (src / "Thumbs.db").write_bytes(b"x")
    with caplog.at_level("WARNING"):
        manifest = prepare_folder(src, tmp_path / "out", tile=32, train_step=32, shard_size=8, val_fraction=0.5)
    assert sorted(i["path"] for i in manifest["sources"].values()) == ["a.png", "linked/b.png"]
    assert not manifest["rejected"]
    assert "left out 2 .heic under" in caplog.text and "Thumbs" not in caplog.text
    only = tmp_path / "iphone"
    only.mkdir()
    (only / "IMG_3.HEIC").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"found 1 \.heic, which prepare cannot read"):
        prepare_folder(only, tmp_path / "out2")


def test_prepare_folder_tiles_an_exif_rotated_photo_upright(tmp_path):
    """A camera's portrait photo is stored sideways with an EXIF orientation: its tiles are taken upright (as
    restore reads it; photos have an up, the loader turns crops only with rot90), its size recorded upright."""
    from dist_dejpeg.data.folder import prepare_folder

    src = tmp_path / "src"
    src.mkdir()
    stored = np.random.default_rng(0).integers(0, 255, (32, 64, 3), np.uint8)  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.fromarray(stored).save(src / "portrait.png", exif=exif)
    _noise(src / "other.png", 1, 64)
    manifest = prepare_folder(src, tmp_path / "out", tile=32, train_step=32, shard_size=8, val_fraction=0.5, seed=1)
    info = manifest["sources"]["portrait"]
    assert (info["height"], info["width"]) == (64, 32)
    upright = np.rot90(stored, -1)
    got = _tiles_by_source(tmp_path / "out")["portrait"]
    assert [t.tobytes() for t in got] == [upright[:32].tobytes(), upright[32:].tobytes()]


@pytest.mark.parametrize("args, says", [
    (["--shard-size", "-1"], "argument --shard-size: a whole number >= 0"),
    (["--step", "-5"], "argument --step: a whole number >= 0"),
    (["--tile", "-1"], "argument --tile: a whole number >= 0"),
    (["--val-fraction", "-0.5"], "argument --val-fraction: a fraction in [0, 1)"),
    (["--val-fraction", "nan"], "argument --val-fraction: a fraction in [0, 1)"),
    (["--val-fraction", "1.5"], "argument --val-fraction: a fraction in [0, 1)"),
])
def test_prepare_refuses_bad_numbers_before_any_work(tmp_path, capsys, args, says):
    from dist_dejpeg.cli import main

    _noise(tmp_path / "src" / "a.png", 0)
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "folder", str(tmp_path / "src"), "--out", str(tmp_path / "out"), *args])
    assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prepare_refuses_a_bad_out_or_src_and_the_api_a_shard_size_below_one(tmp_path, capsys):
    from dist_dejpeg.cli import main
    from dist_dejpeg.data.folder import prepare_folder

    src = tmp_path / "src"
    _noise(src / "a.png", 0)
    (tmp_path / "file").write_text("x")
    cases = [(["--src", str(src), "--out", str(tmp_path / "file")], f"--out {tmp_path / 'file'} is a file, not a folder"),
             (["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], f"no such folder: {tmp_path / 'missing'}"),
             (["--src", str(tmp_path / "file"), "--out", str(tmp_path / "o")], "is a file, not a folder of images")]
    for args, says in cases:
        assert main(["prepare", "folder", *args]) == 2
        err = capsys.readouterr().err
        assert says in err and err.startswith("error: ") and "Traceback" not in err, err
    for bad in (0, -1):
        with pytest.raises(shards.PrepareError, match="shard_size must be a whole number >= 1"):
            prepare_folder(src, tmp_path / "o", tile=32, train_step=32, shard_size=bad)
        with pytest.raises(ValueError, match="shard_size must be >= 1"):
            shards.ShardSink(tmp_path, "train", bad)
    assert not (tmp_path / "o").exists()


def test_prepare_without_a_training_tile_fails_saying_why(tmp_path, capsys):
    """Every image smaller than the tile: exit 2, the counts and the reason, nothing written (not even --out)."""
    from dist_dejpeg.cli import main

    src = tmp_path / "src"
    for i in range(2):
        _noise(src / f"{i}.png", i, 40)
    (src / "bad.png").write_bytes(b"not a png")
    assert main(["prepare", "folder", str(src), "--out", str(tmp_path / "out"), "--tile", "64"]) == 2
    err = capsys.readouterr().err
    assert ("error: no training tile was written: 3 of 3 images rejected (2 smaller than the 64 px tile, "
            "1 undecodable); lower --tile (now 64 px) or add larger photos (e.g. ") in err, err
    assert "bad: undecodable: UnidentifiedImageError" in err  # each file's own reason: a run that fails lists no "rejected" lines
    assert not (tmp_path / "out").exists()


def test_an_interrupted_prepare_leaves_the_folder_as_it_was_and_a_finished_one_cleans_up(tmp_path, monkeypatch):
    from dist_dejpeg.data import folder

    src = tmp_path / "src"
    for i in range(4):
        _noise(src / f"{i}.png", i, 96)
    out = tmp_path / "out"
    first = folder.prepare_folder(src, out, tile=32, train_step=16, shard_size=4)
    assert len(first["splits"]["train"]["shards"]) > 2
    before = _folder_files(out)
    read, calls = folder.read_source, []

    def interrupted(path, *more):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return read(path, *more)

    monkeypatch.setattr(folder, "read_source", interrupted)
    for target in (out, tmp_path / "fresh" / "out"):  # a rerun into a prepared folder, a first run
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            folder.prepare_folder(src, target, tile=64, train_step=64, shard_size=64)
    assert _folder_files(out) == before, "an interrupted rerun changed the folder"
    assert not (tmp_path / "fresh").exists() and sorted(p.name for p in out.iterdir()) == sorted(before)
    monkeypatch.setattr(folder, "read_source", read)
    # a killed run's staging folder and temp files: a finished run removes them, and every old shard
    (out / shards.STAGING).mkdir()
    (out / shards.STAGING / "train-000000.tar").write_bytes(b"half")
    for name in (".val-000013.tar.tmp5340", ".manifest.json.tmp7", ".train-000001.idx.tmp9"):
        (out / name).write_bytes(b"half")
    (out / "train-000099.idx").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    again = folder.prepare_folder(src, out, tile=64, train_step=64, shard_size=64)
    shards_now = again["splits"]["train"]["shards"] + again["splits"]["val"]["shards"]
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(shards_now)
    assert [p.name for p in out.glob(".*")] == [".prepare.lock"]  # (its writers' lock, empty: kept, as a run's)
    assert not list(out.glob("train-000099*")) and (out / "notes.txt").is_file()
    assert len(all_keys(list_shards(out, "train-*.tar"))) == again["splits"]["train"]["samples"]


def test_list_shards_takes_the_root_literally(sample_shards, tmp_path):
    """A data.root with glob characters (data/set[1]) finds its shards: only the pattern globs."""
    import shutil

    root = tmp_path / "set[1]"
    shutil.copytree(sample_shards, root)
    assert [Path(p).name for p in list_shards(root, "train-*.tar")] == manifest_of(root)["splits"]["train"]["shards"]


def test_prepare_folder_warns_when_validation_takes_most_tiles(tmp_path, caplog):
    """Whole photos are held out: one large photo in validation can take most of the tiles (a user's 6000 x 4000
    photo held 384 of 388); prepare says so."""
    from dist_dejpeg.data.folder import prepare_folder

    import skimage.data

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(skimage.data.astronaut()[:384, :384]).save(src / "big.png")
    Image.fromarray(skimage.data.coffee()[:128, :128]).save(src / "small.png")
    for seed in range(8):
        caplog.clear()
        with caplog.at_level("WARNING", logger="dist_dejpeg"):
            manifest = prepare_folder(src, tmp_path / f"out{seed}", tile=64, train_step=64, shard_size=64, seed=seed,
                                      val_fraction=0.5)
        big_held = manifest["sources"]["big"]["split"] == "val"
        assert ("the validation photos hold" in caplog.text) == big_held, (seed, caplog.text)
        if big_held:
            break
    else:
        pytest.fail("no seed held the big photo out")


@pytest.mark.parametrize("change", ["removed", "added", "rewritten"])
def test_resume_over_other_shards_restarts_instead_of_replaying(sample_shards, tmp_path, caplog, change):
    """Each slot's saved position counts samples of its share of the shards: over a shard list with one shard
    more, one fewer or one of another size, the same positions hold other samples (half the crops after a resume
    were tiles already seen this epoch), so the loader says so and restarts the stream, as for another layout."""
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(sample_shards, folder)
    saved = TorchLoader(make_stream(folder, seed=3, num_workers=2), 4, 2, CPU)
    take(saved, 5)
    state = json.loads(json.dumps(saved.state_dict()))
    moved = tmp_path / "moved"  # the same shards elsewhere (a node-local copy): still exact
    shutil.copytree(folder, moved)
    same = TorchLoader(make_stream(moved, seed=3, num_workers=2), 4, 2, CPU)
    same.load_state_dict(state)
    assert same.consumed == 5 and "restarting" not in caplog.text
    paths = train_shards(folder)
    if change == "removed":
        Path(paths[-1]).unlink()
    elif change == "added":
        shutil.copy(paths[0], folder / "train-000099.tar")
    else:
        with tarfile.open(paths[0], "a") as tar:  # one sample more in the first shard
            info = tarfile.TarInfo("extra_s000.png")
            data = random_png(np.random.default_rng(0), 96, 96)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    other = TorchLoader(make_stream(folder, seed=3, num_workers=2), 4, 2, CPU)
    other.load_state_dict(state)
    assert other.positions == {0: (1, 0), 1: (1, 0)}  # (every slot from the start of the next epoch)
    assert re.search(r"saved over \d+ training shards, now \d+.*restarting the data stream at epoch 1", caplog.text)


def _tar_with_a_corrupt_header(write_tar, tmp_path) -> tuple[Path, set[str]]:
    """Six PNG samples, the fourth member's header overwritten: Python's tarfile reads that as the end of the tar."""
    rng = np.random.default_rng(4)
    path = write_tar(tmp_path / "hdr-000000.tar", [(f"good{i}", {"png": random_png(rng, 64, 64)}) for i in range(6)])
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    data = bytearray(path.read_bytes())
    data[members[3].offset:members[3].offset + 100] = b"\x55" * 100
    path.write_bytes(bytes(data))
    return path, {m.name.split(".")[0] for m in members[:3]}


def test_a_corrupt_tar_header_is_counted_not_the_end_of_the_shard(tmp_path, write_tar, caplog):
    """Half a shard behind a corrupt header was dropped without a word or a count (tarfile stops there as at the
    end of the archive): both the training stream and the validation set count it as an unreadable tar."""
    path, before = _tar_with_a_corrupt_header(write_tar, tmp_path)
    loader = TorchLoader(ShardStream([str(path)], CROP, QRANGE, shuffle_buffer=4, epochs=1), 1, 0, CPU)
    assert count_samples(loader) == len(before) == 3
    assert loader.skipped() == {"corrupt": 0, "too_small": 0, "no_image": 0, "bad_tar": 1}
    assert f"unreadable tar data in {path} (corrupt tar header at byte" in caplog.text
    sets, skipped = load_val_set([str(path)], CROP, [20])
    assert sets[20][1].shape[0] == 3 and skipped["bad_tar"] == 1


def test_a_truncated_tar_is_counted_once_and_named(tmp_path, write_tar, caplog):
    """webdataset raises twice for one cut-off tar (the member, then the file; the first without the shard's
    name): one count, and the warning names the shard, not "None"."""
    path, complete = _truncated_tar(write_tar, tmp_path)
    loader = TorchLoader(ShardStream([str(path)], CROP, QRANGE, shuffle_buffer=4, epochs=1), 1, 0, CPU)
    assert count_samples(loader) >= len(complete)
    assert loader.skipped()["bad_tar"] == 1
    assert f"unreadable tar data in {path} (ReadError: unexpected end of data)" in caplog.text
    assert "in None" not in caplog.text


@pytest.mark.parametrize("overrides", [["data.train_glob='*.tar'"], ["data.val_glob='*-000000.tar'"]])
def test_validation_shards_that_are_training_shards_are_refused(sample_shards, overrides):
    """A glob that matches both splits trained on the validation tiles (or validated on training ones) without a
    word: the gains validation measures, and restore's guard trusts, were then gains on seen tiles."""
    from dist_dejpeg.config import ConfigError, load_config
    from dist_dejpeg.data import build_val_set

    cfg = load_config(None, [f"data.root={sample_shards}", "data.val_crop=64", *overrides])
    with pytest.raises(ConfigError, match=r"\d shard\(s\) match both .*(train|val)-000000\.tar"):
        build_val_set(cfg, 0, 1)
    cfg = load_config(None, [f"data.root={sample_shards}", "data.val_crop=64", "data.val_max_images=2"])
    assert build_val_set(cfg, 0, 1)[0][10][0].shape[0] == 2


def test_prepare_folder_split_looks_each_photo_up_once(tmp_path):
    """held_out looked each photo's group up in a list of the held-out groups: one comparison per held group and
    photo (48,000 photos: 3.8 s). Counted by the comparisons of the group keys, not timed."""
    from dist_dejpeg.data.folder import held_out, held_out_rank

    compared = [0]

    class Key(str):
        __hash__ = str.__hash__

        def __eq__(self, other):
            compared[0] += 1
            return str.__eq__(self, other)

    names = [f"IMG_{i:05d}" for i in range(2000)]
    key, rank = {n: Key(n) for n in names}, {n: held_out_rank(n, 0) for n in names}
    names.sort(key=rank.get)
    val, _ = held_out(names, key, rank, 0.1)
    assert 100 < len(val) < 300
    assert compared[0] < len(names), compared[0]  # the list: ~200 x 2000 / 2


def test_a_shard_deleted_after_listing_is_skipped_as_bad_data(sample_shards, tmp_path):
    """A shard gone between listing and building the stream (a purged scratch folder): counted and skipped as a
    shard gone mid-run is, not a raw FileNotFoundError from the shard-list digest."""
    for p in train_shards(sample_shards)[:2]:
        (tmp_path / Path(p).name).write_bytes(Path(p).read_bytes())
    shards = train_shards(tmp_path)
    os.remove(shards[1])
    stream = ShardStream(shards, 32, (10, 90), epochs=1, shuffle_buffer=0)
    assert len(list(stream)) == len(all_keys(shards[:1]))
    assert stream.skipped[0, SKIP_REASONS.index("bad_tar")] == 1
