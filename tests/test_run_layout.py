"""The run folder's torch-free layer: ``status`` imports no torch, the checkpoint folders are listed and named
as the trainer writes them, ``metrics.json``'s meta survives a round trip and junk, an atomic write that fails
leaves the old file and no temp file, and one duration format for the log lines and ``status``."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_dejpeg.run import files, layout
from dist_dejpeg.run.layout import MetricsMeta
from dist_dejpeg.run.text import duration

ROOT = Path(__file__).parents[1]


def test_status_imports_no_torch():
    """``dist-dejpeg status`` on a login node must not pay for (or need) torch."""
    code = ("import json, sys, dist_dejpeg.run.status, dist_dejpeg.run.text, dist_dejpeg.run.folder; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'accelerate'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [], out.stdout


# -- checkpoint folders -----------------------------------------------------------------------------------------
def checkpoint(run: Path, step: int, complete: bool = True) -> Path:
    folder = layout.checkpoint_dir(run) / layout.step_name(step)
    folder.mkdir(parents=True)
    if complete:
        (folder / layout.TRAINER_STATE).write_text("{}")
    return folder


def test_step_names():
    assert layout.step_name(7) == "step-00000007" and layout.STEP_DIR.match(layout.step_name(123456789 % 10**8))
    assert layout.partial_name(7) == ".tmp-step-00000007" and not layout.STEP_DIR.match(layout.partial_name(7))
    assert layout.loader_state_name(3) == "loader_3.json"


def test_checkpoints_listed_by_step_and_incomplete_ones_ignored(tmp_path):
    assert layout.list_checkpoints(tmp_path) == [] and layout.latest_checkpoint(tmp_path) is None
    for step in (100, 9, 20):  # created out of order; names sort as numbers do
        checkpoint(tmp_path, step)
    checkpoint(tmp_path, 500, complete=False)  # no trainer_state.json: still being written, or a killed save
    (layout.checkpoint_dir(tmp_path) / "step-12").mkdir()  # not the step-%08d pattern
    (layout.checkpoint_dir(tmp_path) / "notes.txt").write_text("x")
    found = layout.list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-00000009", "step-00000020", "step-00000100"]
    assert layout.latest_checkpoint(tmp_path).name == "step-00000100"


def test_partial_checkpoints(tmp_path):
    assert layout.partial_checkpoints(tmp_path) == []
    root = layout.checkpoint_dir(tmp_path)
    for step in (30, 4):
        (root / layout.partial_name(step)).mkdir(parents=True)
    checkpoint(tmp_path, 10)
    assert [p.name for p in layout.partial_checkpoints(tmp_path)] == [".tmp-step-00000004", ".tmp-step-00000030"]
    assert [p.name for p in layout.list_checkpoints(tmp_path)] == ["step-00000010"]


# -- metrics.json's meta ----------------------------------------------------------------------------------------
def test_metrics_meta_round_trip():
    meta = MetricsMeta(lpips="lpips-alex", encoder="mobilenetv3_small_050 (random init)", steps={"gen": 3, "gan": 4},
                       stopped_early={"gan": 2}, global_step=7, processes=2, val_images_per_quality=8,
                       data_skipped={"decode": 1}, loss_lpips="lpips-vgg", last_train_log={"gen": {"train/lr": 1e-3}})
    data = json.loads(json.dumps(meta.to_dict()))
    assert MetricsMeta.from_dict(data) == meta
    assert list(data) == [f.name for f in dataclasses.fields(MetricsMeta)]


def test_metrics_meta_from_dict_keeps_what_it_knows():
    assert MetricsMeta.from_dict(None) == MetricsMeta() and MetricsMeta.from_dict([1, 2]) == MetricsMeta()
    meta = MetricsMeta.from_dict({"processes": "2", "global_step": True, "stopped_early": [1], "lpips": 3,
                                  "steps": {"gen": 3}, "val_images_per_quality": 8, "a_newer_key": 1})
    assert meta == MetricsMeta(steps={"gen": 3}, val_images_per_quality=8)
    assert MetricsMeta.from_dict({"global_step": None}).global_step is None  # an older file's null


# -- atomic writes ----------------------------------------------------------------------------------------------
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fails", ["write", "replace"])
def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, fails):
    path = tmp_path / layout.PROGRESS
    files.atomic_write_json(path, {"status": "running"})
    if fails == "replace":
        monkeypatch.setattr(os, "replace", no_space)
    else:
        monkeypatch.setattr(os, "fsync", no_space)  # the disk fills while the temp file is written
    with pytest.raises(OSError) as err:
        files.atomic_write_json(path, {"status": "finished"})
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert files.read_json(path) == {"status": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [layout.PROGRESS]


def test_read_json_never_raises(tmp_path):
    assert files.read_json(tmp_path / "missing.json") is None
    (tmp_path / "half.json").write_text('{"status": "runn')
    (tmp_path / "list.json").write_text("[1]")
    assert files.read_json(tmp_path / "half.json") is None and files.read_json(tmp_path / "list.json") is None


def test_read_jsonl_skips_lines_of_undecodable_bytes_and_lines_that_are_no_object(tmp_path):
    """``status`` reads sessions.jsonl through read_jsonl (run/folder.py), which promises never to raise: a line of
    bytes that are no UTF-8 (a disk error, a file copied in) would be a UnicodeDecodeError that fails ``status``,
    and a JSON line that is no object (``[1]``) a TypeError in whoever reads its keys. Both are skipped."""
    path = tmp_path / layout.SESSIONS
    path.write_bytes(b'{"n": 1}\n\xff\xfe garbage\n[1]\n"text"\n{"n": 2}\n')
    assert files.read_jsonl(path) == [{"n": 1}, {"n": 2}]


def test_append_line_ends_a_line_cut_short_and_a_short_write_is_disk_full(tmp_path, monkeypatch):
    """sessions.jsonl and restore-record.jsonl are appended a line at a time: a line an earlier write cut short is
    ended first (else the next one is lost with it), a line is never followed by a blank one, and the file gets
    the bits the umask allows (others on a shared run folder read it, as any file the run writes)."""
    path = tmp_path / layout.SESSIONS
    files.append_line(path, json.dumps({"n": 1}))
    assert path.read_text() == '{"n": 1}\n' and os.stat(path).st_mode & 0o777 == files.FILE_MODE
    files.append_line(path, '{"n": 0}\n')  # (a line that ends with its own newline gets no second one)
    assert path.read_text() == '{"n": 1}\n{"n": 0}\n'
    with open(path, "a") as f:
        f.write('{"n": 2, "cut')  # an earlier write the disk filled midway
    files.append_line(path, json.dumps({"n": 3}))
    assert files.read_jsonl(path) == [{"n": 1}, {"n": 0}, {"n": 3}]  # the cut line skipped, the new one whole
    assert path.read_text().endswith('"cut\n{"n": 3}\n')
    monkeypatch.setattr(os, "write", lambda fd, data: len(data) - 1)  # the disk full now: a short write
    with pytest.raises(OSError) as err:
        files.append_line(path, "{}")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert files.read_jsonl(tmp_path / "missing.jsonl") == []


# -- durations --------------------------------------------------------------------------------------------------
def test_duration_has_days_beyond_a_day_and_no_number_for_the_unknown():
    assert duration(59.4) == "59s" and duration(3599) == "59m59s" and duration(86399) == "23h59m"
    assert duration(2 * 86400 + 3 * 3600 + 59) == "2d03h"
    assert duration(None) == duration(float("inf")) == duration(float("nan")) == "?"


def test_progress_draws_a_bar_on_a_terminal_and_plain_lines_elsewhere(monkeypatch, capsys, caplog):
    """`dist-dejpeg report ... > log 2>&1` wrote tqdm's carriage-return redraws into the log (one long line over
    hundreds of images). Without a terminal: no bar, a log line at each tenth of the work, as training's lines."""
    from dist_dejpeg.run import progress

    caplog.set_level("INFO", logger="dist_dejpeg")
    for item in progress.Progress.over(range(25), "report", "image"):
        pass
    assert "\r" not in capsys.readouterr().err
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 8 and lines[0].startswith("report: 3/25 (12%), ") and "left" in lines[0], lines
    assert lines[-1].startswith("report: 24/25 (96%)"), lines
    caplog.clear()
    with progress.Progress(3 << 20, "file.zip", "B", initial=1 << 20, unit_scale=True) as bar:  # a resumed download
        bar.update(1 << 20)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["file.zip: 2.10MB/3.15MB (66%)"]
    caplog.clear()
    with progress.Progress(25, "restore", "image", enabled=False) as bar:  # --quiet
        bar.update(25)
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    with progress.Progress(25, "restore", "image") as bar:
        bar.update(25)
    assert "restore: 100%" in capsys.readouterr().err and not caplog.records


def test_a_long_legal_file_name_is_written_atomically_and_its_leftover_temp_found(tmp_path):
    """A 250-byte name is legal (NAME_MAX 255), but ".NAME.tmpPID" was not: every atomic write of it failed with
    ENAMETOOLONG naming a hidden temp file (restore, report). The temp name keeps 200 bytes of it and a hash."""
    from dist_dejpeg.restore.inputs import remove_stale_temps
    from dist_dejpeg.run.files import TEMP_NAME, atomic_write_bytes, atomic_write_files, temp_path

    long, other = tmp_path / ("p" * 246 + ".png"), tmp_path / ("p" * 245 + "q.png")
    atomic_write_bytes(long, b"x")
    atomic_write_files({long: b"y", other: b"z"})
    assert long.read_bytes() == b"y" and other.read_bytes() == b"z"
    assert len(temp_path(long).name.encode()) < 255 and temp_path(long).name != temp_path(other).name
    leftover, foreign = temp_path(long), temp_path(tmp_path / ("p" * 246 + ".jpg"))  # (a killed writer's)
    for path in (leftover, foreign):
        path.write_bytes(b"x")
    assert TEMP_NAME.match(leftover.name)
    assert remove_stale_temps([long], max_age_s=0) == [leftover] and foreign.exists()
    short = tmp_path / "p.png"
    assert temp_path(short).name == f".p.png.tmp{os.getpid()}"  # (a usual name's temp name as it was)
