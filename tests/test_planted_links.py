"""A shared, group-writable output or run folder in which someone else planted a symbolic link (or a FIFO) under a
name the project writes: the write never goes through it. The hidden temp file of an atomic write (``.NAME.tmpPID``,
its pid guessable) is made anew, a link there unlinked (its target untouched); an appended file (the restore record,
sessions.jsonl, train.log) that is a link or no regular file is refused with an OSError, which each writer's failure
path already reports; restore writes no output into a subfolder that is a link out of its output folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dist_dejpeg.run.files import (append_line, atomic_write_bytes, atomic_write_files, prove_writable,
                                   read_jsonl, temp_path)

SECRET = b"the victim's own bytes\n"


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim" / "v.txt"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def _plant(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)


@pytest.mark.parametrize("writer", ["bytes", "vet", "files"])
def test_an_atomic_write_never_follows_a_link_planted_at_its_temp_name(tmp_path, victim, writer):
    """`ln -s victim OUT/.a.png.tmp$PID`: open(tmp, "wb") wrote the PNG into the victim (and the rename then moved
    the link into place)."""
    out = tmp_path / "out"
    target, other = out / "a.png", out / "b.csv"
    _plant(temp_path(target), victim)
    _plant(temp_path(other), victim)
    if writer == "files":
        atomic_write_files({target: b"new", other: b"other"})
        assert other.read_bytes() == b"other" and not other.is_symlink()
    else:
        atomic_write_bytes(target, b"new", vet=(lambda p: None) if writer == "vet" else None)
    assert victim.read_bytes() == SECRET
    assert target.read_bytes() == b"new" and not target.is_symlink()
    assert sorted(p.name for p in out.iterdir()) == sorted({target.name, other.name} if writer == "files"
                                                           else {target.name, temp_path(other).name})


def test_a_shard_is_never_written_through_a_link_planted_at_its_temp_name(tmp_path, victim):
    from dist_dejpeg.data.shards import write_shard

    shard = tmp_path / "shards" / "train-000000.tar"
    _plant(temp_path(shard), victim)
    assert write_shard(shard, [("k0", b"png bytes")]) == 1
    assert victim.read_bytes() == SECRET and shard.is_file() and not shard.is_symlink()


def test_a_stale_temp_file_of_a_dead_writer_with_this_pid_is_replaced(tmp_path):
    target = tmp_path / "a.json"
    temp_path(target).write_bytes(b"half of an old write")
    atomic_write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}" and not temp_path(target).exists()


def test_the_write_probe_never_empties_a_linked_file(tmp_path, victim):
    out = tmp_path / "out"
    _plant(out / f".dist_dejpeg_write_test{os.getpid()}", victim)
    prove_writable(out)
    assert victim.read_bytes() == SECRET and list(out.iterdir()) == []


def test_append_line_refuses_a_link_or_a_fifo(tmp_path, victim):
    """`ln -s ~/.bashrc OUT/restore-record.jsonl` and a photo named `$(touch PWNED).jpg` appended a line that ran
    the command at the next shell start."""
    link = tmp_path / "out" / "restore-record.jsonl"
    _plant(link, victim)
    with pytest.raises(OSError, match="symbolic link"):
        append_line(link, '{"source": "$(touch PWNED).jpg"}')
    assert victim.read_bytes() == SECRET
    fifo = tmp_path / "out" / "sessions.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):  # (and no hang)
        append_line(fifo, "{}")
    plain = tmp_path / "out" / "ok.jsonl"
    append_line(plain, '{"a": 1}')
    append_line(plain, '{"a": 2}')
    assert read_jsonl(plain) == [{"a": 1}, {"a": 2}]


def test_the_restore_record_says_once_that_it_cannot_write_a_linked_file(tmp_path, victim, caplog):
    from dist_dejpeg.restore.inputs import RestoreResult
    from dist_dejpeg.restore.record import Record

    link = tmp_path / "out" / "restore-record.jsonl"
    _plant(link, victim)
    record = Record(link)
    with caplog.at_level(logging.WARNING):
        record.add_all([RestoreResult("a.jpg"), RestoreResult("b.jpg")])
    assert record.failed == 2 and "symbolic link" in caplog.text and victim.read_bytes() == SECRET


def test_train_log_is_never_appended_through_a_link(tmp_path, victim, capsys):
    from dist_dejpeg.train.run_log import RUN_LOG, RunLog, to_run_log

    _plant(tmp_path / RUN_LOG, victim)
    handler = RunLog(tmp_path)
    try:
        to_run_log(handler, "a line")
    finally:
        handler.close()
    assert victim.read_bytes() == SECRET and handler.failed
    assert "symbolic link" in capsys.readouterr().err
    (tmp_path / RUN_LOG).unlink()
    handler = RunLog(tmp_path)  # a plain file: written as before
    try:
        to_run_log(handler, "a line")
    finally:
        handler.close()
    assert "a line" in (tmp_path / RUN_LOG).read_text() and not handler.failed


class Identity:
    device, passthrough, guard, gains = "cpu", False, False, {}

    def restore_array(self, rgb, quality=None, source="given", conformed=False):
        self.last_decision = SimpleNamespace(passthrough=False, reason="identity", quality=quality, source=source)
        return rgb.copy()


def _jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path, quality=50)
    return path


def test_restore_writes_its_output_beside_a_planted_temp_link_and_never_through_it(tmp_path, victim):
    from dist_dejpeg.restore.files import restore_files

    source = _jpeg(tmp_path / "in" / "a.jpg")
    out = tmp_path / "out"
    _plant(temp_path(out / "a.png"), victim)
    [result] = restore_files(Identity(), [str(source)], out, progress=False)
    assert result.error is None and victim.read_bytes() == SECRET
    assert Image.open(out / "a.png").size == (32, 24) and not (out / "a.png").is_symlink()


def test_restore_writes_nothing_through_a_subfolder_linked_out_of_its_output_folder(tmp_path):
    """`ln -s /elsewhere OUT/sub`: restoring a folder with a subfolder sub wrote sub/a.png into /elsewhere."""
    from dist_dejpeg.restore.files import restore_files

    _jpeg(tmp_path / "in" / "top.jpg")
    _jpeg(tmp_path / "in" / "sub" / "a.jpg")
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    _plant(out / "sub", elsewhere)
    results = {Path(r.source).name: r for r in restore_files(Identity(), [str(tmp_path / "in")], out,
                                                             progress=False)}
    assert results["top.jpg"].error is None and (out / "top.png").is_file()
    assert "leads out of the output folder" in results["a.jpg"].error and results["a.jpg"].output is None
    assert list(elsewhere.iterdir()) == []
