"""Fault 4, a full disk: side writes (progress.json, the trackers' scalars and image grids, the console bar)
fail without ending the run and are counted; a write that holds the run's state (a checkpoint, the generator
file) and finds the disk full stops the run with "disk full: <path>, <free> free; ..." and exit 3, never torch's
"unexpected pos", leaves no half-written checkpoint folder, and the same command continues from the newest
complete checkpoint. One test fills a real (tmpfs) disk where this machine lets it mount one."""

from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dist_dejpeg.cli import main as cli_main
from dist_dejpeg.config import to_yaml
from dist_dejpeg.models.generator_file import load_generator
from dist_dejpeg.run import files as files_mod
from dist_dejpeg.run.files import atomic_write_text, free_bytes, is_disk_full, size_text
from dist_dejpeg.run.layout import STEP_DIR, TRAINER_STATE, checkpoint_dir, list_checkpoints, partial_checkpoints
from dist_dejpeg.train.build import build_accelerator
from dist_dejpeg.train.monitor import DiskFull, Monitor
from dist_dejpeg.train.trainer import Trainer, TrainingStopped, train

from test_trainer import fresh_accelerator_state, shards, tiny  # noqa: F401 - fixtures shared with test_trainer

TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def enospc(path="") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) or None)


def steps_done(run: Path) -> list[int]:
    return [int(STEP_DIR.match(p.name).group(1)) for p in list_checkpoints(run)]


def assert_no_half_checkpoint(run: Path) -> None:
    """No temp folder, and every step-* folder complete (its trainer_state.json, written last, is there)."""
    assert not partial_checkpoints(run)
    for folder in checkpoint_dir(run).iterdir():
        if STEP_DIR.match(folder.name):
            assert (folder / TRAINER_STATE).is_file(), folder


# -- run/files.py ------------------------------------------------------------------------------------------------
def test_a_write_that_finds_the_disk_full_names_its_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """A real write's ENOSPC names no file; the disk-full message needs it (the temp file's cleanup and the old
    file kept are test_run_layout's)."""
    target = tmp_path / "generator.safetensors"
    target.write_text("old")

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(files_mod, "open", lambda *a, **k: FullFile(builtins.open(*a, **k)), raising=False)
    with pytest.raises(OSError) as raised:
        atomic_write_text(target, "new")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_evaluates_tables_on_a_disk_that_fills_are_all_old_or_all_new(tmp_path, monkeypatch):
    """evaluate wrote metrics.json, .csv and .md one after another, each atomic: ENOSPC on the second left a new
    metrics.json beside the old .csv and .md, which compare and report read as one evaluation (a docs review; the
    README said "--out as it was"). Now all are written to temp files, then renamed: the folder as it was."""
    from dist_dejpeg.evaluation import evaluate

    monkeypatch.setattr(evaluate, "table_files", lambda result: {n: f"new {n}".encode() for n in result})
    names = ["metrics.json", "metrics.csv", "metrics.md"]
    for name in names:
        (tmp_path / name).write_text(f"old {name}")
    opened = []

    def full_on_the_second(path, mode="r", *args, **kwargs):
        opened.append(path)
        if len(opened) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files_mod, "open", full_on_the_second, raising=False)
    with pytest.raises(OSError) as raised:
        evaluate.write_tables(names, tmp_path)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / names[1])
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {n: f"old {n}" for n in names}  # (no temp left)
    monkeypatch.setattr(files_mod, "open", builtins.open, raising=False)
    evaluate.write_tables(names, tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {n: f"new {n}" for n in names}


def test_disk_full_is_told_from_other_errors():
    class SafetensorError(Exception):  # safetensors' Rust error: no errno, only the text
        pass

    assert is_disk_full(enospc("/x")) and is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert is_disk_full(RuntimeError(TORCH_SHORT_WRITE))
    try:  # wrapped: the cause counts
        try:
            raise enospc()
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(OSError(errno.EIO, "unexpected pos"))  # an OSError says what it is by its errno
    assert not is_disk_full(ValueError("bad value"))
    assert free_bytes("/no/such/folder/at/all") is not None  # its nearest existing parent's
    assert [size_text(n) for n in (0, 1500, 3 * 2**20, None)] == ["0 B", "1.5 KiB", "3.0 MiB", "?"]


# what a DataLoader worker's full /dev/shm reaches the main process as (torch 2.x, a 64 KiB /dev/shm, measured)
SHM_FULL = ("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n  File "
            "\"torch/storage.py\", line 423, in _new_shared\n    return cls._new_using_fd_cpu(size)\nRuntimeError: "
            "unable to allocate shared memory(shm) for file </torch_30175_249956385_0>: No space left on device (28)")


def test_a_full_run_folder_disk_while_handling_a_full_dev_shm_is_disk_full():
    """The monitor writing progress.json after a worker's /dev/shm crash and finding the run folder's disk full:
    its ENOSPC was not disk full because the /dev/shm text was somewhere in the chain. An OSError naming a file in
    /dev/shm, or one naming none while /dev/shm is full, stays /dev/shm's."""
    def raised(outer: OSError) -> BaseException:
        try:
            try:
                raise RuntimeError(SHM_FULL)
            except RuntimeError:
                raise outer
        except OSError as err:
            return err

    assert is_disk_full(raised(enospc("/runs/x/progress.json")))
    assert is_disk_full(raised(OSError(errno.EDQUOT, "Disk quota exceeded", b"/runs/x/progress.json")))
    assert not is_disk_full(raised(enospc("/dev/shm/torch_1")))
    assert not is_disk_full(raised(OSError(errno.ENOSPC, "No space left on device")))
    assert not is_disk_full(RuntimeError(SHM_FULL)) and is_disk_full(enospc("/x"))


def test_a_worker_error_with_a_message_of_several_lines_is_told_whole_with_its_type():
    """A DataLoader worker's ValueError("bad sample in shard\\nsee data.max_bad_samples") was told by its last line
    alone, "see data.max_bad_samples": now from the line naming its type to the end."""
    from dist_dejpeg.run.verdict import crash_line

    worker = ("Caught ValueError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
              "  File \"dist_dejpeg/data/reading.py\", line 9, in decode\n    raise ValueError(\"bad: x\")\n"
              "    ^^^^^^^^^^^^^^^^^^^^^^^^^^\nValueError: bad sample in shard\nsee data.max_bad_samples\n")
    assert crash_line(ValueError(worker)) == "ValueError: bad sample in shard see data.max_bad_samples"
    assert crash_line(RuntimeError(SHM_FULL)) == SHM_FULL.splitlines()[-1]
    assert crash_line(ValueError("bad\nmore")) == "ValueError: bad"


def test_a_full_dev_shm_is_a_crash_with_its_own_line_and_a_hint_not_a_full_disk(tmp_path, shards, monkeypatch,
                                                                                 capsys):
    """A container's small /dev/shm (Docker's default 64 MB) filled by the DataLoader workers' batches read "disk
    full: <run folder>, 40.3 GiB free" (exit 3), the worker's error nowhere: its "No space left on device" is
    /dev/shm's. Now a crash that says the worker's own line and what to change; the CLI says it in one line, exit 1."""
    import dist_dejpeg.train.trainer as trainer_mod

    err = RuntimeError(SHM_FULL)
    assert not is_disk_full(err)
    assert files_mod.is_shm_full(err) and not files_mod.is_shm_full(RuntimeError("No space left on device"))
    assert is_disk_full(RuntimeError("No space left on device (os error 28)"))  # (a disk's, as before)
    run = tmp_path / "run"
    acc, cfg = build_accelerator(tiny(run, shards, "train.order=[gen]", "train.log_with=[]"))
    run.mkdir()
    monitor = Monitor(acc, cfg, run, {})
    assert monitor.disk_full_error(err) is err  # (the error itself: a crash, not DiskFull)
    monitor.close()
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "crashed", progress
    reason = progress["reason"]
    assert reason.startswith("RuntimeError: unable to allocate shared memory(shm) for file </torch_"), reason
    assert "/dev/shm (" in reason and "--shm-size" in reason and "data.prefetch_factor" in reason, reason
    monkeypatch.setattr(trainer_mod, "train", lambda cfg, resume=None: (_ for _ in ()).throw(err))
    assert cli_main(["train", "--config", str(Path(__file__).parents[1] / "configs" / "debug.yaml"),
                     f"train.run_dir={tmp_path / 'cli'}", "train.processes=1"]) == 1
    said = capsys.readouterr().err
    assert said.startswith("error: RuntimeError: unable to allocate shared memory(shm)") and "Traceback" not in said
    assert "raise the container's --shm-size, or lower data.num_workers / data.prefetch_factor" in said, said


# -- side writes --------------------------------------------------------------------------------------------------
def test_failing_progress_tracker_and_image_writes_never_end_the_run(tmp_path, shards, monkeypatch, caplog):
    """Every progress.json write hits ENOSPC, TensorBoard's log raises, its image grid hits ENOSPC: the run
    finishes, its checkpoints and metrics are complete, each failure is logged once and counted in metrics.json."""
    from accelerate.tracking import TensorBoardTracker
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    cfg = tiny(run, shards, "train.order=[gen]", "train.phases.gen.steps=4", "train.ckpt_every=2",
               "train.image_every=2")
    real_replace, failed, at_metrics = os.replace, [], []

    def replace(src, dst):
        if Path(dst).name == "progress.json":
            failed.append(dst)
            raise enospc(dst)
        if Path(dst).name == "metrics.json":
            at_metrics.append(len(failed))
        return real_replace(src, dst)

    def tracker_down(self, values, step=None, **kwargs):
        raise RuntimeError("tracker server unreachable")

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(TensorBoardTracker, "log", tracker_down)
    monkeypatch.setattr(SummaryWriter, "add_image", lambda *a, **k: (_ for _ in ()).throw(enospc(run / "tb")))
    caplog.set_level(logging.INFO, logger="dist_dejpeg")
    results = train(cfg)
    assert results["q10"]["restored"]["psnr"] > 0
    assert steps_done(run) == [2, 4]
    assert_no_half_checkpoint(run)
    meta = json.loads((run / "metrics.json").read_text())["meta"]
    assert meta["global_step"] == 4 and (run / "generator.safetensors").is_file()
    errors = meta["write_errors"]
    assert errors["progress"] == at_metrics[0] >= 6  # phase start, 4 windows, validation: every one counted
    assert errors["tracker.tensorboard"] >= 4 and errors["image.tensorboard"] >= 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("a progress write failed" in w for w in warnings) == 1, warnings  # once, with the reason
    assert any(w.startswith("disk full: ") and "a progress write failed" in w for w in warnings), warnings
    told = "a tracker.tensorboard write failed (RuntimeError: tracker server unreachable)"
    assert sum(told in w for w in warnings) == 1, warnings
    assert not list(run.glob(".progress.json.tmp*")), "a failed atomic write leaves no temp file"
    assert not (run / "progress.json").exists()


def test_a_console_bar_that_cannot_write_is_dropped_for_plain_lines(tmp_path, shards, caplog):
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.log_with=[]")
    acc, cfg = build_accelerator(cfg)
    (tmp_path / "run").mkdir()
    monitor = Monitor(acc, cfg, tmp_path / "run", {})

    class BrokenBar:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")
            return fail

    caplog.set_level(logging.INFO, logger="dist_dejpeg")
    monitor.start_phase("gen", 0, 0, 0)
    monitor.bar, monitor.use_bar = BrokenBar(), True
    monitor.advance()
    monitor.advance()
    monitor.window("gen", {"train/gen/l1": 0.5, "train/lr": 1e-3}, 2, 2, 0.1)
    monitor.finish("finished", "", 2)
    assert monitor.write_errors == {"console": 1} and monitor.bar is None
    assert any(r.getMessage().startswith("gen 2/") for r in caplog.records), "plain lines after the bar broke"
    assert json.loads((tmp_path / "run" / "progress.json").read_text())["write_errors"] == {"console": 1}


# -- writes that hold the run's state -----------------------------------------------------------------------------
def test_disk_full_in_a_checkpoint_stops_with_a_clear_message_and_the_previous_one_resumes(
        tmp_path, shards, monkeypatch, capsys, caplog):
    """torch's zip writer says only "unexpected pos" when the disk fills under optimizer.bin: the run stops
    with exit 3 and a disk-full message naming the newest complete checkpoint, which the same command resumes."""
    run = tmp_path / "run"
    cfg = tiny(run, shards, "train.order=[gen]", "train.phases.gen.steps=4", "train.ckpt_every=2",
               "train.keep_last=5")
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(cfg))
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if ".tmp-step-00000004" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 half a zip")  # what torch leaves: part of the file
            raise RuntimeError(TORCH_SHORT_WRITE)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert cli_main(["train", "--config", str(config)]) == 3
    err = capsys.readouterr().err
    assert "error: disk full: " in err and "unexpected pos" not in err, err
    assert f"the last complete checkpoint is {run / 'checkpoints' / 'step-00000002'}" in err, err
    assert "free space and rerun the same command" in err
    assert not list(checkpoint_dir(run).glob("**/*.tmp*"))
    assert steps_done(run) == [2]
    assert_no_half_checkpoint(run)
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "stopped" and progress["reason"].startswith("disk full: ")

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command continues from step 2
    caplog.set_level(logging.INFO, logger="dist_dejpeg")
    fresh_accelerator_state_reset()
    assert cli_main(["train", "--config", str(config)]) == 0
    assert any("step-00000002" in r.getMessage() and "resumed from" in r.getMessage() for r in caplog.records)
    assert steps_done(run) == [2, 4]
    assert json.loads((run / "metrics.json").read_text())["meta"]["global_step"] == 4


def test_disk_full_writing_the_generator_file_stops_and_a_rerun_writes_it(tmp_path, shards, monkeypatch):
    run = tmp_path / "run"
    cfg = tiny(run, shards, "train.order=[gen]", "train.phases.gen.steps=2")
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "generator.safetensors" in str(file) and "w" in mode:
            f.close()
            raise enospc()  # as a write would: no file name (atomic_write_bytes adds it)
        return f

    monkeypatch.setattr(files_mod, "open", full_open, raising=False)
    with pytest.raises(DiskFull) as stopped:
        train(cfg)
    message = str(stopped.value)
    assert isinstance(stopped.value, TrainingStopped)  # the CLI's exit 3
    assert message.startswith(f"disk full: {run / 'generator.safetensors'}, ") and " free; " in message, message
    assert f"the last complete checkpoint is {run / 'checkpoints' / 'step-00000002'}" in message
    assert not (run / "generator.safetensors").exists() and not list(run.glob(".generator.safetensors.tmp*"))

    monkeypatch.undo()
    fresh_accelerator_state_reset()
    train(cfg)  # resumes at the end of the last phase: only the final validation and files
    generator = load_generator(run / "generator.safetensors")
    assert generator(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    assert json.loads((run / "metrics.json").read_text())["meta"]["global_step"] == 2


def fresh_accelerator_state_reset() -> None:
    """Between two runs inside one test (the autouse fixture resets only around a test)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# -- a real full disk -----------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs (needs root and mount rights: skipped where the machine gives neither)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_disk_that_fills_mid_run_stops_it_with_its_last_checkpoint(small_disk, tmp_path, shards, monkeypatch):
    """The disk fills after step 3: progress and TensorBoard writes fail quietly, the checkpoint at the phase's
    end (step 4) finds no room and stops the run with the disk-full message; freed, the same command finishes
    from step 2."""
    run = small_disk / "run"
    cfg = tiny(run, shards, "train.order=[gen]", "train.phases.gen.steps=4", "train.ckpt_every=2",
               "train.keep_last=5")
    filler = small_disk / "filler"
    real_step = Trainer.train_step

    def step_then_fill(self, *args, **kwargs):
        logs = real_step(self, *args, **kwargs)
        if self.state.global_step + 1 == 3 and not filler.exists():
            with open(filler, "wb") as f:  # everything the tmpfs has left
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError as err:
                    assert err.errno == errno.ENOSPC
        return logs

    monkeypatch.setattr(Trainer, "train_step", step_then_fill)
    with pytest.raises(DiskFull) as stopped:
        train(cfg)
    assert str(stopped.value).startswith("disk full: "), stopped.value
    assert f"the last complete checkpoint is {run / 'checkpoints' / 'step-00000002'}" in str(stopped.value)
    assert steps_done(run) == [2]
    assert_no_half_checkpoint(run)
    # the last progress.json that fitted, whole (its "stopped" fits only where the removed half checkpoint freed
    # room), and no temp file of the ones that did not
    assert json.loads((run / "progress.json").read_text())["status"] in ("running", "stopped")
    assert not list(run.glob(".*.tmp*"))

    filler.unlink()
    monkeypatch.undo()
    fresh_accelerator_state_reset()
    train(cfg)
    assert steps_done(run) == [2, 4]
    assert json.loads((run / "metrics.json").read_text())["meta"]["global_step"] == 4


def _fill(disk: Path, leave: int) -> Path:
    """A file taking all but about ``leave`` bytes of the tmpfs ``disk``."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.truncate(max(shutil.disk_usage(disk).free - leave, 0))
    with open(filler, "r+b") as f:  # (a tmpfs allocates on write: write what truncate reserved only in name)
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        for _ in range(0, size, 1 << 20):
            f.write(b"\1" * min(1 << 20, size - f.tell()))
    return filler


def test_prepare_on_a_full_disk_says_so_and_leaves_nothing(small_disk, capsys):
    """prepare ended in a traceback of tarfile's ENOSPC (three chained); now one line, exit 3, and no temp file
    or half-written shard; with room again the same command writes the set."""
    filler = _fill(small_disk, 256 << 10)
    out = small_disk / "samples"
    assert cli_main(["prepare", "samples", "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"error: disk full writing {out}") and "Traceback" not in err, err
    assert "free space and run the same command again" in err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"], list(small_disk.rglob("*"))
    filler.unlink()
    assert cli_main(["prepare", "samples", "--out", str(out)]) == 0
    assert (out / "manifest.json").is_file()


def test_evaluate_and_report_on_a_full_disk_print_their_numbers_and_say_so(small_disk, tmp_path, capsys):
    """Their tables are written after all the work: a full disk there ended in a traceback, the numbers lost; now
    evaluate prints them anyway, and both say what failed in one line, exit 3."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from test_evaluate import TINY
    from dist_dejpeg.config import ModelConfig
    from dist_dejpeg.models.generator_file import save_generator
    from dist_dejpeg.models.unet import build_generator

    model = tmp_path / "generator.safetensors"
    save_generator(build_generator(ModelConfig(**TINY)), ModelConfig(**TINY), model)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.ascontiguousarray(skimage.data.astronaut()[:96, :128])).save(photo)
    _fill(small_disk, 4 << 10)
    common = ["--model", str(model), "--images", str(photo), "--qualities", "20", "--quiet"]
    assert cli_main(["evaluate", *common, "-o", str(small_disk / "eval")]) == 3
    said = capsys.readouterr()
    assert said.out.startswith("q20: PSNR ") and f"error: disk full writing {small_disk / 'eval'}" in said.err
    assert cli_main(["report", *common, "-o", str(small_disk / "report.html")]) == 3
    assert f"error: disk full writing {small_disk / 'report.html'}" in capsys.readouterr().err
    assert not [p for p in small_disk.rglob("*") if p.is_file() and p.name != "filler"]


def test_export_and_compare_say_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    """The ONNX file is written after a minute of exporting and checking: ENOSPC there was a traceback."""
    import dist_dejpeg.models.onnx_export as onnx_export

    def full(*args, **kwargs):
        raise enospc(tmp_path / "m.onnx")

    monkeypatch.setattr(onnx_export, "export_target_problem", lambda *a: None)
    monkeypatch.setattr(onnx_export, "export_model", full)
    assert cli_main(["export", "--model", str(tmp_path / "run"), "--onnx", str(tmp_path / "m.onnx")]) == 3
    assert capsys.readouterr().err.startswith(f"error: disk full writing {tmp_path / 'm.onnx'} (")
    evaluation = {"meta": {"channel": "RGB"}, "per_image": [{"image": "p", "quality": 10, "jpeg": {"psnr": 20.0},
                                                            "restored": {"psnr": 21.0}}]}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(evaluation))
    monkeypatch.setattr(files_mod, "atomic_write_bytes", full)
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "c.md")]) == 3
    assert "error: disk full writing" in capsys.readouterr().err


def test_a_quota_is_said_as_a_quota_by_the_commands_that_write(tmp_path, monkeypatch, capsys):
    """EDQUOT (a quota used up, the filesystem maybe far from full) was said as "disk full writing ... <free> free
    there": the filesystem's free space, which misleads. Now as training says it (run/files.disk_full_text)."""
    import dist_dejpeg.models.onnx_export as onnx_export

    def quota(*args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "m.onnx"))

    monkeypatch.setattr(onnx_export, "export_target_problem", lambda *a: None)
    monkeypatch.setattr(onnx_export, "export_model", quota)
    assert cli_main(["export", "--model", str(tmp_path / "run"), "--onnx", str(tmp_path / "m.onnx")]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"error: quota exceeded (EDQUOT) on {tmp_path}; check `quota -s` / `lfs quota`"), err
    assert "disk full" not in err and " free there" not in err and "within the quota" in err, err


# -- a spell of full disk or quota: the side writes come back --------------------------------------------------
def test_a_tensorboard_writer_that_failed_is_replaced_once_space_is_back(tmp_path, shards, monkeypatch, caplog,
                                                                        capsys):
    """TensorBoard's writer thread dies on its first ENOSPC and its writer raises that error on every later call:
    one quota spike lost the rest of the run's curves. Now the writer is replaced TB_RETRY_CALLS log calls later,
    the warning names the TensorBoard folder (not the run folder), and the thread prints no traceback."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer.record_writer import RecordWriter

    from dist_dejpeg.train.trackers import TB_RETRY_CALLS

    run = tmp_path / "run"
    acc, cfg = build_accelerator(tiny(run, shards, "train.order=[gen]", "train.log_with=[tensorboard]"))
    run.mkdir()
    monitor = Monitor(acc, cfg, run, {})
    tb = next(t for t in acc.trackers if t.name == "tensorboard")
    real_write, full = RecordWriter.write, [True]

    def write(self, data):
        if full[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # (as the real one: no file named)
        return real_write(self, data)

    def window(step: int) -> None:
        monitor.window("gen", {"train/gen/l1": 1.0 / step, "train/lr": 1e-3}, step, step, 0.1)

    caplog.set_level(logging.INFO, logger="dist_dejpeg")
    monkeypatch.setattr(RecordWriter, "write", write)
    tb.writer.add_scalar("probe", 0.0, 0)
    with pytest.raises(OSError):
        tb.writer.flush()  # (waits for the thread to take the event and die on it)
    tb.writer.file_writer.event_writer._async_writer._worker.join(10)  # (its excepthook has run)
    full[0] = False  # space is back: the writer still raises, at every call
    last = TB_RETRY_CALLS + 3
    for step in range(1, last + 1):
        window(step)
    monitor.finish("finished", "", last)
    monitor.close()
    assert "Exception in thread" not in capsys.readouterr().err
    assert monitor.write_errors == {"tracker.tensorboard": TB_RETRY_CALLS}  # windows 1..10: the dead writer
    written = []
    for events in sorted(Path(tb.logging_dir).glob("events.out.tfevents.*")):
        acc_ = EventAccumulator(str(events))
        acc_.Reload()
        written += [e.step for e in acc_.Scalars("train/gen/l1")] if "train/gen/l1" in acc_.Tags()["scalars"] else []
    assert written == list(range(TB_RETRY_CALLS + 1, last + 1)), written  # the new writer's
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith(f"disk full: {tb.logging_dir}, ") for w in warnings), warnings
    assert any("TensorBoard: a new writer in" in r.getMessage() for r in caplog.records)
    assert json.loads((run / "progress.json").read_text())["write_errors"] == monitor.write_errors


def test_a_quota_is_said_as_a_quota_without_a_free_space_figure(tmp_path, shards, caplog):
    """EDQUOT (a user's or project's quota, the filesystem far from full) read "disk full: ..., 54.0 GiB free"."""
    from dist_dejpeg.run import verdict as run_verdict
    from dist_dejpeg.run.files import disk_full_text

    run = tmp_path / "run"
    acc, cfg = build_accelerator(tiny(run, shards, "train.order=[gen]", "train.log_with=[]"))
    run.mkdir()
    monitor = Monitor(acc, cfg, run, {})
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(run / "progress.json"))
    caplog.set_level(logging.INFO, logger="dist_dejpeg")
    with monitor.side_write("progress", path=run / "progress.json"):
        raise quota
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][0]
    assert warning.startswith(f"quota exceeded (EDQUOT) on {run}; check `quota -s` / `lfs quota`"), warning
    assert " free" not in warning.split(";")[0]
    partial = run / "checkpoints" / ".tmp-step-00000040"
    partial.mkdir(parents=True)
    stop = monitor.disk_full_error(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(partial / "manifest.json")))
    assert isinstance(stop, DiskFull) and not partial.exists()
    # (it named the .tmp-step-* folder it had just removed: the checkpoints folder now, and the checkpoint)
    assert str(stop).startswith(f"quota exceeded (EDQUOT) on {partial.parent}; check `quota -s` / `lfs quota` (saving "
                                f"checkpoint step-00000040); free space within the quota and rerun the same "
                                f"command"), stop
    assert ".tmp-step" not in str(stop) and stop.path == partial.parent
    progress = json.loads((run / "progress.json").read_text())
    state, why = run_verdict.verdict(has_config=True, progress=progress, progress_age_s=1.0, lock_held=False,
                                     finished_files=False, has_checkpoints=False)
    assert state == "stopped" and why.startswith("the quota ran out (quota exceeded (EDQUOT) on"), why
    assert disk_full_text(enospc(tmp_path), tmp_path).startswith(f"disk full: {tmp_path}, ")  # (as before)
    monitor.close()


def test_train_log_is_tried_again_and_its_lost_lines_counted(tmp_path, shards, capsys):
    """A train.log that failed once stayed off for the rest of the run; now every RETRY_LINES-th line opens it
    again, and the lines it missed are counted in progress.json's write_errors."""
    from dist_dejpeg.train.run_log import RETRY_LINES, to_run_log

    run = tmp_path / "run"
    acc, cfg = build_accelerator(tiny(run, shards, "train.order=[gen]", "train.log_with=[]"))
    run.mkdir()
    monitor = Monitor(acc, cfg, run, {})
    to_run_log(monitor.run_log, "line before")
    monitor.run_log.close()
    (run / "train.log").rename(run / "kept.log")
    (run / "train.log").mkdir()  # cannot be opened for writing
    for i in range(5):
        to_run_log(monitor.run_log, f"line {i}")
    (run / "train.log").rmdir()  # writable again
    for i in range(5, RETRY_LINES + 2):
        to_run_log(monitor.run_log, f"line {i}")
    monitor.finish("finished", "", 1)
    monitor.close()
    written = (run / "train.log").read_text()
    assert f"line {RETRY_LINES - 1}" in written and f"line {RETRY_LINES - 2}" not in written, written
    err = capsys.readouterr().err
    assert err.count("warning: cannot write") == 1 and f"{RETRY_LINES - 1} lines before this one are missing" in err
    assert json.loads((run / "progress.json").read_text())["write_errors"] == {"train.log": RETRY_LINES - 1}


def test_a_tracker_whose_final_validation_write_failed_gets_it_again_on_a_rerun(tmp_path, shards, monkeypatch):
    """final_logged.json names the trackers a rerun must not give the final validation again; it named every
    tracker, so one whose final writes failed (a full disk, a dropped network) never got it, rerun or not."""
    from dist_dejpeg.train.trackers import FINAL_LOGGED

    results = {"q10": {"jpeg": dict(psnr=1.0, ssim=1.0, lpips=1.0), "restored": dict(psnr=2.0, ssim=1.0, lpips=0.5),
                       "gain": dict(psnr=1.0, psnr_low=0.5, count=1)}}
    for failing, expected in ((False, ["tensorboard"]), (True, [])):
        run = tmp_path / f"run{failing}"
        acc, cfg = build_accelerator(tiny(run, shards, "train.order=[gen]", "train.log_with=[tensorboard]"))
        run.mkdir()
        monitor = Monitor(acc, cfg, run, {})
        tb = next(t for t in acc.trackers if t.name == "tensorboard")
        if failing:
            monkeypatch.setattr(tb, "log", lambda values, step=None, **kw: (_ for _ in ()).throw(OSError(errno.ENOSPC,
                                                                                                       "full")))
        monitor.final(results, torch.zeros(3, 8, 8), 5, "val-set")
        monitor.finish("finished", "", 5)
        monitor.close()
        assert json.loads((run / FINAL_LOGGED).read_text())["trackers"] == expected, failing
        assert ("tracker.tensorboard" in monitor.write_errors) == failing


class _FullStdout:
    """A standard output on a full disk (`> /dev/full`, a log file): every write raises ENOSPC, as the real one."""

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        pass


def test_a_stdout_that_cannot_be_written_is_one_line_after_the_files_are_written(tmp_path, monkeypatch, capsys):
    """`evaluate > /dev/full` (or a log on a full disk) died at its first number with a traceback, exit 1, before
    its tables were written; compare and status --json gave tracebacks too. Now the files are written first and
    the failed stdout is one line, exit 3 (ENOSPC)."""
    import dist_dejpeg.cli_use as cli_use
    import dist_dejpeg.evaluation.evaluate as evaluate_module

    result = {"per_quality": {20: {"jpeg": {"psnr": 30.0, "ssim": 0.9}, "restored": {"psnr": 31.0, "ssim": 0.92},
                                   "images": 1}}, "meta": {"channel": "RGB", "unavailable": {}}}
    monkeypatch.setattr(cli_use, "_evaluation", lambda args, keep_images, made: result)
    monkeypatch.setattr(evaluate_module, "write_tables", lambda r, out: (Path(out) / "metrics.json").write_text("{}"))
    capsys.readouterr()
    monkeypatch.setattr("sys.stdout", _FullStdout())
    out = tmp_path / "eval"
    out.mkdir()
    assert cli_main(["evaluate", "--model", "m", "--images", "p", "-o", str(out)]) == 3
    err = capsys.readouterr().err
    assert (out / "metrics.json").is_file()
    assert err == "error: evaluate: cannot write to standard output (No space left on device): what it printed " \
                  "there is lost\n", err
    evaluation = {"meta": {"channel": "RGB"}, "per_image": [{"image": "p", "quality": 10, "jpeg": {"psnr": 20.0},
                                                            "restored": {"psnr": 21.0}}]}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(evaluation))
    monkeypatch.setattr("sys.stdout", _FullStdout())
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "c.md")]) == 3
    assert (tmp_path / "c.md").is_file() and "Traceback" not in capsys.readouterr().err
    from dist_dejpeg.cli_output import stdout_failed

    assert stdout_failed(enospc(tmp_path / "x"), "compare") is None  # a file's ENOSPC is not taken for stdout's


def test_evaluate_and_report_whose_final_write_fails_leave_out_as_it_was(tmp_path, monkeypatch, capsys):
    """A full disk at evaluate's tables or report's page (after all the work) left the folders they had made, empty:
    the empty-folder cleanup ran only on a failed evaluation. --out is left as it was (README)."""
    import dist_dejpeg.cli_use as cli_use
    import dist_dejpeg.evaluation.evaluate as evaluate_module
    import dist_dejpeg.evaluation.report as report_module

    def full(*args, **kwargs):
        raise enospc()

    model = {"source": "m", "encoder": "e", "encoder_init": "random", "global_step": 1}
    meta = {"channel": "RGB", "unavailable": {}, "skipped": [], "undefined": {}, "images": 1, "model": model,
            "backbones": {}, "compression": "libjpeg", "crop_border": 0, "device": "cpu", "tile": 0, "overlap": 0,
            "guard": True, "lpips": "alex", "date": "today"}
    result = {"per_quality": {20: {"jpeg": {"psnr": 30.0, "ssim": 0.9}, "restored": {"psnr": 31.0, "ssim": 0.92},
                                   "images": 1}}, "meta": meta, "records": []}

    def evaluation(args, keep_images, made=None):  # (as the real one: the output folders made before the work)
        (Path(args.out).parent if keep_images else Path(args.out)).mkdir(parents=True)
        return dict(result)

    monkeypatch.setattr(cli_use, "_evaluation", evaluation)
    monkeypatch.setattr(evaluate_module, "write_tables", full)
    monkeypatch.setattr(evaluate_module, "table_files", lambda r: {})
    monkeypatch.setattr(report_module, "write_report", full)
    common = ["--model", "m", "--images", "p", "--quiet", "-o"]
    assert cli_main(["evaluate", *common, str(tmp_path / "new" / "eval")]) == 3
    assert cli_main(["report", *common, str(tmp_path / "new" / "page" / "report.html")]) == 3
    assert capsys.readouterr().err.count("error: disk full writing") == 2
    assert list(tmp_path.iterdir()) == []


def test_a_closed_stdout_is_no_traceback(tmp_path):
    """`dist-dejpeg status --json RUN >&-`: Python's sys.stdout is None with fd 1 closed, and the command crashed with
    "'NoneType' object has no attribute 'write'" (exit 1); what it prints goes nowhere, its own exit code stays."""
    import sys

    done = subprocess.run([sys.executable, "-m", "dist_dejpeg", "status", "--json", str(tmp_path / "no-run")],
                          preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
