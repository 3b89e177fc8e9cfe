"""`prepare folder` (and div2k) in a pool of tiling processes: the same shards as one process, in the sources' order;
a photo a worker cannot decode rejected as before; Ctrl-C and a killed worker stop the pool and keep --out as it
was; the default number of processes."""

from __future__ import annotations

import faulthandler
import json
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_dejpeg.cli import main
from dist_dejpeg.data import folder, shards
from dist_dejpeg.run import pool
from dist_dejpeg.run.pool import WorkerLost, map_in_order, pool_size


def _photo(path: Path, seed: int, size: tuple[int, int], jpeg_quality: int = 0) -> None:
    """Smooth random colours (a JPEG of it shows its grid to jpeg.quality) saved losslessly at ``path``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 8 + 1, size[0] // 8 + 1, 3), np.uint8)
    img = Image.fromarray(small).resize((size[0] + 8, size[1] + 8), Image.BICUBIC).crop((0, 0) + size)
    if jpeg_quality:  # a PNG saved from a JPEG: its pixels carry the 8x8 grid
        path.with_suffix(".jpg").parent.mkdir(parents=True, exist_ok=True)
        img.save(path.with_suffix(".jpg"), quality=jpeg_quality)
        img = Image.open(path.with_suffix(".jpg")).convert("RGB")
        path.with_suffix(".jpg").unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _collection(src: Path) -> Path:
    """Photos of unequal sizes, one from a JPEG, one too small, one the same pixels as another, one undecodable."""
    for i, size in enumerate([(200, 150), (96, 160), (130, 130), (180, 100), (150, 210), (100, 100)]):
        _photo(src / f"p{i}.png", i, size)
    _photo(src / "fromjpeg.png", 9, (256, 192), jpeg_quality=50)
    _photo(src / "tiny.png", 10, (40, 40))
    Image.open(src / "p0.png").save(src / "p0_copy.bmp")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return src


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.mark.parametrize("fmt", ["raw", "png"])  # raw: tiles cut in this process; png: encoded in the workers
def test_a_pool_writes_the_same_shards_and_manifest_as_one_process(tmp_path, fmt, capsys):
    src = _collection(tmp_path / "src")
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"out{workers}"
        assert main(["prepare", "folder", str(src), "--out", str(outs[workers]), "--tile", "64", "--shard-size", "8",
                     "--val-fraction", "0.3", "--format", fmt, "--workers", str(workers)]) == 0
    one, two = _files(outs[1]), _files(outs[2])
    assert sorted(one) == sorted(two) and len([n for n in one if n.endswith(".tar")]) > 2
    assert one == two  # byte for byte: the tars (member times fixed) and the manifest
    manifest = json.loads(two["manifest.json"])
    reasons = {r["path"]: r["reason"] for r in manifest["rejected"]}
    assert reasons["broken.png"].startswith("undecodable: "), reasons  # decoded in a worker, rejected as before
    assert reasons["tiny.png"].startswith("smaller than the 64 px tile"), reasons
    assert "(the same pixels)" in reasons.get("p0_copy.bmp", "") + reasons.get("p0.png", ""), reasons
    assert manifest["jpeg_sources"].keys() == {"fromjpeg"} and manifest["sources"]["fromjpeg"]["halved"] == 1
    assert "rejected broken.png: undecodable" in capsys.readouterr().err


def _slow_echo(item: tuple[int, float]) -> tuple[int, int]:
    time.sleep(item[1])  # the first items finish last
    return item[0], os.getpid()


def test_results_come_in_the_items_order_from_other_processes():
    items = [(i, 0.3 if i < 2 else 0.0) for i in range(7)]
    done = list(map_in_order(_slow_echo, items, workers=2))
    assert [i for i, _ in done] == list(range(7))
    assert os.getpid() not in {pid for _, pid in done}
    assert multiprocessing.active_children() == []  # the pool is shut down once the items are done
    assert {pid for _, pid in map_in_order(_slow_echo, items[:3], workers=1)} == {os.getpid()}  # 1: this process


def _ctrl_c_then_echo(item: int) -> int:
    os.kill(os.getpid(), signal.SIGINT)  # as the terminal's Ctrl-C reaches the whole process group
    return item


def test_ctrl_c_reaching_a_worker_leaves_the_stop_to_the_parent():
    """Without the initializer each worker would raise KeyboardInterrupt into its photo (and print a traceback)."""
    assert list(map_in_order(_ctrl_c_then_echo, range(4), workers=2)) == [0, 1, 2, 3]


def _killed_on_the_third(item: int) -> int:
    if item == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does
    return item


def test_a_killed_worker_is_a_clear_error_not_a_hang():
    faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the run instead of blocking it
    try:
        with pytest.raises(WorkerLost, match=r"ended abruptly .* --workers \(now 2\)") as err:
            list(map_in_order(_killed_on_the_third, range(6), workers=2, names=lambda item: f"photo{item}"))
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert "photo2" in str(err.value)
    assert multiprocessing.active_children() == []


def test_a_worker_killed_between_a_result_and_the_next_submit_is_the_same_clear_error(monkeypatch):
    """A worker killed after the last result was read broke the pool before the next item went out: its submit
    raised BrokenProcessPool (a traceback, seen under load in the full suite), not the WorkerLost its results give."""
    from concurrent.futures.process import BrokenProcessPool

    from dist_dejpeg.run import pool as pool_module

    class BreaksOnTheFifth(pool_module.ProcessPoolExecutor):
        calls = 0

        def submit(self, fn, /, *args, **kwargs):
            BreaksOnTheFifth.calls += 1
            if BreaksOnTheFifth.calls == 5:
                raise BrokenProcessPool("a child process terminated abruptly")
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(pool_module, "ProcessPoolExecutor", BreaksOnTheFifth)
    with pytest.raises(WorkerLost, match=r"ended abruptly .*photo4.* --workers \(now 2\)"):
        list(map_in_order(_slow_echo, [(i, 0.0) for i in range(6)], workers=2, names=lambda item: f"photo{item[0]}"))
    assert multiprocessing.active_children() == []


def test_work_that_cannot_be_pickled_is_a_clear_error_not_a_hang():
    """A local function (as a test or a Python caller may give as a photo's loader) cannot reach a process: a
    TypeError naming the item at once, where the pool's feeder thread failed and its shutdown could wait forever."""
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        with pytest.raises(TypeError, match=r"photo0: its work cannot be sent to a tiling process .*workers=1"):
            list(map_in_order(_slow_echo, [(0, lambda: None)], workers=2, names=lambda item: f"photo{item[0]}"))
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert multiprocessing.active_children() == []


def _read_or_die(path: Path, *args) -> np.ndarray:
    if path.name == "p3.png":
        os.kill(os.getpid(), signal.SIGKILL)
    return folder.decode_rgb8(path.read_bytes())


def _written(out: Path) -> dict:
    """``out``'s files and what else it holds (a staging folder left behind would show here)."""
    return _files(out) | {"entries": sorted(p.name for p in out.iterdir())}


def test_prepare_folder_keeps_the_old_shards_when_a_worker_is_killed_or_ctrl_c_stops_it(tmp_path, monkeypatch,
                                                                                         capsys):
    src = _collection(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["prepare", "folder", str(src), "--out", str(out), "--tile", "64", "--shard-size", "8"]) == 0
    before = _written(out)
    monkeypatch.setattr(folder, "read_source", _read_or_die)  # forked workers inherit it
    assert main(["prepare", "folder", str(src), "--out", str(out), "--tile", "32", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "error: a tiling process ended abruptly" in err and "--workers (now 2)" in err, err
    assert _written(out) == before and multiprocessing.active_children() == []
    monkeypatch.undo()

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.ShardSink, "add", ctrl_c)  # Ctrl-C while this process writes, the pool busy
    with pytest.raises(KeyboardInterrupt):
        folder.prepare_folder(src, out, tile=32, train_step=32, shard_size=8, workers=2)
    assert _written(out) == before and multiprocessing.active_children() == []


def test_default_workers_are_the_cores_this_process_may_use_capped(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    caps = pool.MAX_DEFAULT_WORKERS
    assert pool_size(0, caps["folder"]) == 8 and pool_size(0, caps["div2k"]) == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 7}, raising=False)  # a SLURM job's share
    assert pool_size(0, 8) == 3 and pool_size(5, 8) == 5 and pool_size(20, 8) == 20  # asked for: as asked


def test_div2k_says_its_rejected_count_with_the_plural_right(tmp_path, caplog):
    from dist_dejpeg.data.div2k import prepare_div2k

    root = tmp_path / "root"
    for split, base, n in (("train", "DIV2K_train_HR", 3), ("val", "DIV2K_valid_HR", 2)):
        for i in range(n):
            _photo(root / base / f"{split}{i}.png", i, (96, 96))
    (root / "DIV2K_train_HR" / "broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.INFO, logger="dist_dejpeg.data.div2k"):
        prepare_div2k(root, tmp_path / "out", tile=64, step=32, shard_size=8, workers=2, progress=False)
    assert "(1 source rejected)" in caplog.text, caplog.text
