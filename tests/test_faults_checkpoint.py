"""Faults 2, 3 and 7 of issue 21 on CPU: a damaged newest checkpoint (truncated model, optimizer or RNG file)
is skipped for the newest one that verifies, and the run ends with the weights an uninterrupted run has;
a named damaged checkpoint is a clear error (exit 2); rolling back to an older checkpoint sets the later ones
aside, so pruning and the next auto-resume stay on one timeline; a resume whose config changes a model's
shapes, or the global batch without train.resume_allow_batch_change, is a ConfigError that names the keys."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from dist_dejpeg.cli import main as cli_main
from dist_dejpeg.config import ConfigError, to_yaml
from dist_dejpeg.run.lock import RunLock
from dist_dejpeg.run.layout import MANIFEST, TRAINER_STATE, checkpoint_dir, list_checkpoints, step_name
from dist_dejpeg.run.manifest import checkpoint_files, verify_checkpoint
from dist_dejpeg.train.checkpoint import CheckpointError
from dist_dejpeg.train.resume import check_before_start, check_resume_config, choose_checkpoint
from dist_dejpeg.train.steps import generator_step
from dist_dejpeg.train.trainer import Trainer, train

from test_trainer import fresh_accelerator_state, shards, tiny  # noqa: F401 (fixtures)

# one phase of 6 generator steps, a checkpoint every 2: step-2, step-4, step-6 (the end of the phase)
OVER = ("train.order=[gen]", "train.phases.gen.steps=6", "train.ckpt_every=2", "train.keep_last=5",
        "train.log_with=[]")
MAIN_PROCESS = SimpleNamespace(is_main_process=True, num_processes=1)  # choose_checkpoint's view of a one-process run


def reset() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def base(shards, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run's folder (checkpoints at steps 2, 4, 6) and its final generator weights."""
    reset()
    run = tmp_path_factory.mktemp("base") / "run"
    train(tiny(run, shards, *OVER))
    assert [p.name for p in list_checkpoints(run)] == [step_name(s) for s in (2, 4, 6)]
    return run, weights(checkpoint_dir(run) / step_name(6))


def copy_run(base_run: Path, to: Path) -> Path:
    shutil.copytree(base_run, to)
    return to


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_manifest_lists_every_file_and_catches_truncation_and_changed_bytes(base, tmp_path):
    run = copy_run(base[0], tmp_path / "run")
    step6 = checkpoint_dir(run) / step_name(6)
    listed = json.loads((step6 / MANIFEST).read_text())["files"]
    assert set(listed) == set(checkpoint_files(step6)) and "optimizer.bin" in listed
    assert verify_checkpoint(step6).ok
    data = bytearray((step6 / "optimizer.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the hash sees it
    (step6 / "optimizer.bin").write_bytes(bytes(data))
    assert verify_checkpoint(step6, hashes=False).ok
    assert verify_checkpoint(step6).problems == ["optimizer.bin: sha256 differs from the one written (changed on disk)"]
    truncate(step6 / "model.safetensors")
    problems = verify_checkpoint(step6, hashes=False).problems
    assert len(problems) == 1 and problems[0].startswith("model.safetensors: ") and "(truncated)" in problems[0]


def test_every_file_of_a_checkpoint_is_fsynced(shards, tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    t = Trainer(tiny(tmp_path / "run", shards, *OVER))
    try:
        monkeypatch.setattr(os, "fsync", spy)
        path = t.save()
    finally:
        monkeypatch.undo()
        t.close()
    names = {re.sub(r"^\.(.+)\.tmp\d+$", r"\1", Path(p).name) for p in synced}  # atomic writes: their temp file
    assert set(checkpoint_files(path)) | {MANIFEST, TRAINER_STATE} <= names


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(base, shards, tmp_path, caplog, damaged):
    base_run, uninterrupted = base
    run = copy_run(base_run, tmp_path / "run")
    truncate(checkpoint_dir(run) / step_name(6) / damaged)
    reset()
    with caplog.at_level(logging.INFO, logger="dist_dejpeg"):
        train(tiny(run, shards, *OVER))  # the same command again: train.auto_resume
    assert f"skipping the damaged checkpoint {step_name(6)}: {damaged}: " in caplog.text
    assert f"continuing the run in {run} from {step_name(4)} (newer, damaged: {step_name(6)})" in caplog.text
    # the damaged one is set aside (not deleted), and steps 5 and 6 were trained again to the same weights
    aside = list(checkpoint_dir(run).glob("abandoned-*/" + step_name(6)))
    assert len(aside) == 1 and not verify_checkpoint(aside[0]).ok
    again = weights(checkpoint_dir(run) / step_name(6))
    assert verify_checkpoint(checkpoint_dir(run) / step_name(6)).ok
    assert not [k for k in uninterrupted if not torch.equal(uninterrupted[k], again[k])]


def test_resume_of_a_named_damaged_checkpoint_exits_2(base, shards, tmp_path, capsys):
    run = copy_run(base[0], tmp_path / "run")
    step6 = checkpoint_dir(run) / step_name(6)
    truncate(step6 / "random_states_0.pkl")
    config = tmp_path / "config.yaml"
    config.write_text(to_yaml(tiny(run, shards, *OVER)))
    reset()
    assert cli_main(["train", "--config", str(config), "--resume", str(step6)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {step6}: the checkpoint is damaged: random_states_0.pkl: " in err
    assert "Traceback" not in err


def test_choice_without_a_manifest_and_when_nothing_verifies(base, tmp_path, caplog):
    run = copy_run(base[0], tmp_path / "run")
    for step in (2, 4, 6):
        (checkpoint_dir(run) / step_name(step) / MANIFEST).unlink()  # as an older version wrote them
    with caplog.at_level(logging.WARNING, logger="dist_dejpeg"):
        assert choose_checkpoint(MAIN_PROCESS, run, None, True) == checkpoint_dir(run) / step_name(6)
    assert "has no manifest" in caplog.text and "unverified" in caplog.text
    other = copy_run(base[0], tmp_path / "other")
    for step in (2, 4, 6):
        truncate(checkpoint_dir(other) / step_name(step) / "optimizer.bin")
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies: step-00000006: optimizer.bin"):
        choose_checkpoint(MAIN_PROCESS, other, "latest", True)
    with pytest.raises(ConfigError, match="false starts a new run"):  # auto_resume off: a new run, refused there
        choose_checkpoint(MAIN_PROCESS, other, None, False)
    emptied = copy_run(base[0], tmp_path / "emptied")  # every checkpoint's files deleted (rm -rf step-*/*)
    for step in (2, 4, 6):
        for f in (checkpoint_dir(emptied) / step_name(step)).iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    with pytest.raises(CheckpointError, match="holds step-00000002, step-00000004, step-00000006 but no complete"):
        choose_checkpoint(MAIN_PROCESS, emptied, None, True)  # (it started over at step 0, two runs in one folder)


def test_rolling_back_keeps_one_timeline(base, shards, tmp_path):
    """keep_last=2 and [4, 6]: --resume step-4, one save; the next auto-resume continues from 5, not from 6."""
    run = copy_run(base[0], tmp_path / "run")
    shutil.rmtree(checkpoint_dir(run) / step_name(2))
    cfg = tiny(run, shards, *OVER, "train.keep_last=2")
    reset()
    t = Trainer(cfg)
    try:
        t.resume(choose_checkpoint(t.accelerator, run, str(checkpoint_dir(run) / step_name(4)), True))
        t.generator.train()
        generator_step(t.accelerator, t.generator, t.g_opt, iter(t.loader), grad_accum=1, w_pixel=1.0,
                       w_lpips=0.1, lpips=t.lpips)
        t.state.phase_step += 1
        t.state.global_step += 1
        t.save()
    finally:
        t.close()
    assert [p.name for p in list_checkpoints(run)] == [step_name(4), step_name(5)]
    assert [p.name for p in checkpoint_dir(run).glob("abandoned-*/*")] == [step_name(6)]
    assert choose_checkpoint(MAIN_PROCESS, run, None, True) == checkpoint_dir(run) / step_name(5)
    aside = next(checkpoint_dir(run).glob("abandoned-*/" + step_name(6)))  # named: this run's own, said how to
    with pytest.raises(CheckpointError, match=r"this run's own checkpoint, set aside into abandoned-.*/ when the run "
                                              r"went back .* \(step-00000004, step-00000005\) are the run now"):
        choose_checkpoint(MAIN_PROCESS, run, str(aside), True)


def test_a_model_shape_change_is_a_config_error_naming_the_key(base, shards, tmp_path):
    run = copy_run(base[0], tmp_path / "run")
    reset()
    with pytest.raises(ConfigError, match=r"model\.decoder_width 16 -> 32: these keys change the shapes"):
        train(tiny(run, shards, *OVER, "model.decoder_width=32"))
    # nothing was loaded or moved, and the run folder's lock was released (a corrected command may run)
    assert [p.name for p in list_checkpoints(run)] == [step_name(s) for s in (2, 4, 6)]
    lock = RunLock(run)
    lock.acquire()
    lock.release()


def test_a_batch_change_needs_the_flag(base, shards, tmp_path, caplog):
    run = copy_run(base[0], tmp_path / "run")
    over = (*OVER, "data.batch_size=4")
    reset()
    with pytest.raises(ConfigError, match=r"global batch .* changes from 2 \(2 x 1 x 1\) to 4 \(4 x 1 x 1\)"):
        train(tiny(run, shards, *over))
    reset()
    t = Trainer(tiny(run, shards, *over, "train.resume_allow_batch_change=true"))
    try:
        with caplog.at_level(logging.WARNING, logger="dist_dejpeg"):
            t.resume(checkpoint_dir(run) / step_name(4))
    finally:
        t.close()
    assert "changes from 2 (2 x 1 x 1) to 4 (4 x 1 x 1)" in caplog.text and t.state.global_step == 4


def test_what_every_rank_finds_alike_on_resume_is_warned_by_the_main_process_only(base, shards, tmp_path, caplog,
                                                                                   monkeypatch):
    """A 2-process resume with an edited config showed "resume: config changed since the checkpoint: ..." twice on
    the console (32 times on 4 x 8 GPUs), no rank marker: every rank checks the config (each must raise its error)
    and non-main ranks log warnings. The main process warns; the others say it at debug level."""
    run = copy_run(base[0], tmp_path / "run")
    changed = ("data.batch_size=4", "train.resume_allow_batch_change=true", "train.phases.gen.lr=5e-3",
               "data.val_max_images=1")
    said = ("resume: config changed since the checkpoint: ", "(train.resume_allow_batch_change)",
            "the validation set changed since the checkpoint")
    for main in (True, False):
        reset()
        t = Trainer(tiny(run, shards, *OVER, *changed))
        try:
            monkeypatch.setattr(type(t.accelerator), "is_main_process", property(lambda self: main))
            t.monitor.main = main
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="dist_dejpeg"):
                t.resume(checkpoint_dir(run) / step_name(4))
        finally:
            monkeypatch.undo()
            t.close()
        for text in said:
            levels = {r.levelno for r in caplog.records if text in r.getMessage()}
            assert levels == {logging.WARNING if main else logging.DEBUG}, (main, text, caplog.text)


def test_a_process_count_change_says_where_the_data_stream_restarts(base, shards):
    step4 = checkpoint_dir(base[0]) / step_name(4)
    state = json.loads((step4 / TRAINER_STATE).read_text())
    cfg = tiny(base[0], shards, *OVER, "data.batch_size=1")  # 1 x 1 x 2 processes: the same 2
    restarts = "process count changes .1 -> 2.*restarts its data stream at the epoch after the newest any rank saved"
    with pytest.raises(ConfigError, match=restarts) as err:
        check_resume_config(cfg, step4, state, processes=2, has_critic=False)
    # the global batch does not change: said so (it said "changes from 2 ... to 2 ...: each step now averages 2
    # images instead of 2")
    assert "the global batch stays 2: 2 x 1 x 1 -> 1 x 1 x 2" in str(err.value), str(err.value)
    assert "changes from" not in str(err.value) and "instead of" not in str(err.value)
    other_order = tiny(base[0], shards, *OVER, "train.order=[gen,critic]")
    with pytest.raises(ConfigError, match=r"phases \['gen'\] differ from train.order .*set train.order back"):
        check_resume_config(other_order, step4, state, processes=1, has_critic=True)


def test_resume_takes_a_run_folder_and_refuses_another_runs_checkpoint_over_its_own(base, tmp_path):
    """--resume OTHER_RUN/checkpoints/step-4 on a run with checkpoints of its own set this run's step-4 and step-6
    aside as 'later' and went on from the other run's state; now refused, nothing moved. A fresh run folder may
    start from another run's checkpoint; a run folder names its newest checkpoint; a missing path says so."""
    run, other = copy_run(base[0], tmp_path / "run"), copy_run(base[0], tmp_path / "other")
    assert choose_checkpoint(MAIN_PROCESS, run, str(run), True) == checkpoint_dir(run) / step_name(6)
    with pytest.raises(CheckpointError, match=r"is a checkpoint of another run, .* \(newest step-00000006\)"):
        choose_checkpoint(MAIN_PROCESS, run, str(checkpoint_dir(other) / step_name(4)), True)
    assert [p.name for p in checkpoint_dir(run).iterdir()] and \
        [p.name for p in list_checkpoints(run)] == [step_name(s) for s in (2, 4, 6)]
    assert choose_checkpoint(MAIN_PROCESS, tmp_path / "fresh", str(other), True) == checkpoint_dir(other) / step_name(6)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        choose_checkpoint(MAIN_PROCESS, run, str(tmp_path / "nope"), True)


def test_saving_a_step_again_keeps_the_old_folder_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """A run preempted at a phase's last step saves that step again once resumed (the phase's end). With
    keep_last=1, a kill while the old folder was being deleted left the run without any checkpoint (the new
    one still a .tmp-step-* folder, which the next start removes)."""
    from accelerate import Accelerator

    from dist_dejpeg.train import checkpoint as ckpt

    acc = Accelerator(cpu=True)
    first = ckpt.save_checkpoint(acc, tmp_path, 6, {"global_step": 6, "phase_index": 0}, {}, "x: 1\n", keep_last=1)
    real = shutil.rmtree

    def killed_once_deleted(path, *args, **kwargs):  # the process dies right after a folder is deleted
        if Path(path).exists():
            real(path, *args, **kwargs)
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_once_deleted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(acc, tmp_path, 6, {"global_step": 6, "phase_index": 1}, {}, "x: 1\n", keep_last=1)
    assert list_checkpoints(tmp_path) == [first]
    assert json.loads((first / TRAINER_STATE).read_text())["phase_index"] == 1, "the new one, in place"

    # killed between the two renames (the old folder aside, the new one not yet named): the next start puts the
    # old one back rather than removing both as half-written
    real_replace = os.replace

    def killed_after_the_first_rename(src, dst):
        if Path(dst).name == step_name(6):  # the new folder about to take the name
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    monkeypatch.setattr(ckpt.os, "replace", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(acc, tmp_path, 6, {"global_step": 6, "phase_index": 2}, {}, "x: 1\n", keep_last=1)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert list_checkpoints(tmp_path) == []  # (only the two .tmp-step-* folders)
    ckpt.remove_partial(tmp_path)
    assert list_checkpoints(tmp_path) == [first] and not list(checkpoint_dir(tmp_path).glob(".tmp-*"))
    assert json.loads((first / TRAINER_STATE).read_text())["phase_index"] == 1, "the complete one set aside"


def test_an_fp16_run_resumes_a_checkpoint_written_without_a_loss_scale(tmp_path):
    """fp16 resuming a bf16 or fp32 checkpoint (build.py's advice on a GPU without bf16): Accelerate's load_state
    wanted a scaler.pt the checkpoint never had, and said "resume from an older one", which has none either. It
    resumes from GradScaler's initial scale; the checkpoint's weights are loaded. (Emulated on the CPU, to which
    Accelerate gives no fp16 scaler.)"""
    from accelerate import Accelerator

    from dist_dejpeg.train.checkpoint import load_checkpoint

    torch.manual_seed(0)
    saved = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    saved.prepare(model, torch.optim.AdamW(model.parameters(), fused=True))
    saved.save_state(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / TRAINER_STATE).write_text(json.dumps({"global_step": 4}))
    assert not (tmp_path / "ckpt" / "scaler.pt").exists()
    reset()
    fp16 = Accelerator(cpu=True)
    fp16.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    other = torch.nn.Linear(3, 2)
    fp16.prepare(other, torch.optim.AdamW(other.parameters(), fused=True))
    assert load_checkpoint(fp16, tmp_path / "ckpt")[0] == {"global_step": 4}
    assert torch.equal(other.weight, model.weight) and fp16.scaler is scaler and scaler.get_scale() == 2.0**12
    scaler.scale(torch.ones(()))  # (its scale is made at the first use)
    scaler.update(2.0**7)
    fp16.save_state(str(tmp_path / "ckpt"))  # one written in fp16 has it, and it is loaded
    fp16.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    load_checkpoint(fp16, tmp_path / "ckpt")
    assert fp16.scaler.get_scale() == 2.0**7


def test_resume_of_a_run_folder_without_checkpoints_builds_nothing_and_leaves_nothing(tmp_path, shards, capsys):
    """One process, --resume on a folder with no checkpoint: refused before the models, the lock and TensorBoard
    (they left .lock and tb/ events in the folder it refused), as train.processes' launcher refuses it."""
    config = tmp_path / "config.yaml"
    config.write_text(to_yaml(tiny(tmp_path / "none", shards, *OVER)))
    (tmp_path / "none").mkdir()  # made beforehand (a job script's mkdir): not this command's to remove
    reset()
    assert cli_main(["train", "--config", str(config), "--resume"]) == 2
    assert "no checkpoint under" in capsys.readouterr().err
    assert not list((tmp_path / "none").iterdir())


def test_resume_across_deepspeed_and_ddp_or_process_counts_is_a_config_error(tmp_path):
    """A DeepSpeed checkpoint (an engine folder, the optimizer partitioned per process) under train.deepspeed_stage=0
    or another process count, and a DDP one under DeepSpeed: a ConfigError saying why, before either library
    fails on the other's layout (an AssertionError, a missing file, ZeRO's "DP world size" error, each shown as
    "resume from an older one", which would fail the same)."""
    from accelerate.utils import DistributedType

    from dist_dejpeg.train.checkpoint import load_checkpoint

    def fake(deepspeed: bool, processes: int):
        def load_state(path):
            raise AssertionError  # as DeepSpeed's loader on a DDP checkpoint
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED if deepspeed else DistributedType.MULTI_CPU,
                               num_processes=processes, process_index=0, load_state=load_state)

    zero, ddp = tmp_path / "zero", tmp_path / "ddp"
    for rank in (0, 1):
        (zero / "pytorch_model").mkdir(parents=True, exist_ok=True)
        (zero / "pytorch_model" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    ddp.mkdir()
    (ddp / "model.safetensors").write_bytes(b"x")
    for folder in (zero, ddp):
        (folder / TRAINER_STATE).write_text("{}")
    with pytest.raises(ConfigError, match=r"written under DeepSpeed, this run uses train.deepspeed_stage=0.*back"):
        load_checkpoint(fake(False, 2), zero)
    with pytest.raises(ConfigError, match=r"written without DeepSpeed \(train.deepspeed_stage=0\), this run uses "
                                          r"DeepSpeed"):
        load_checkpoint(fake(True, 2), ddp)
    with pytest.raises(ConfigError, match=r"a DeepSpeed checkpoint of 2 processes, this run has 3.*"
                                          r"train.processes=2"):
        load_checkpoint(fake(True, 3), zero)
    with pytest.raises(CheckpointError, match="cannot be loaded"):  # the same layout and count: loaded
        load_checkpoint(fake(True, 2), zero)


def test_one_process_under_an_accelerate_deepspeed_config_passes_the_check_before_start(tmp_path, shards,
                                                                                       monkeypatch):
    """accelerate launch --num_processes 1 with launch/accelerate/deepspeed_zero2.yaml: the config's stage is 0
    until build_accelerator reads the launcher's; the check before start must not call its DeepSpeed checkpoint
    one of a run without DeepSpeed."""
    run = tmp_path / "run"
    ckpt_dir = checkpoint_dir(run) / step_name(2)
    (ckpt_dir / "pytorch_model").mkdir(parents=True)
    (ckpt_dir / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (ckpt_dir / TRAINER_STATE).write_text(json.dumps({"global_step": 2}))
    cfg = tiny(run, shards, *OVER)
    with pytest.raises(ConfigError, match="written under DeepSpeed, this run uses train.deepspeed_stage=0"):
        check_before_start(cfg, None, 1)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    try:
        check_before_start(cfg, None, 1)
    except ConfigError as err:
        assert "DeepSpeed" not in str(err), err


def test_init_from_a_deepspeed_run_is_a_config_error(shards, tmp_path):  # noqa: F811
    """An unfinished DeepSpeed run (its checkpoint: a config, the engines' files, no model.safetensors) as
    model.init_from: a ConfigError naming the key, where a ModelFileError traceback came from every rank."""
    source = tmp_path / "ds" / "checkpoints" / step_name(4)
    (source / "pytorch_model").mkdir(parents=True)
    (source / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (source / "config.yaml").write_text(to_yaml(tiny(tmp_path / "ds", shards, *OVER)))
    (source / TRAINER_STATE).write_text("{}")
    with pytest.raises(ConfigError, match=r"model.init_from.*step-00000004: a checkpoint folder without "
                                          r"model.safetensors"):
        Trainer(tiny(tmp_path / "run", shards, *OVER, f"model.init_from={tmp_path / 'ds'}"))


def test_a_new_run_in_a_folder_holding_a_run_is_refused_and_changes_nothing(base, shards, tmp_path, capsys):
    """train.auto_resume=false in a run folder with checkpoints started a new run among the old run's: keep_last
    deleted the new run's lower steps at once (old 4 and 6 kept, new 2 gone) and the next auto-resume took the old
    run's newest. Now a one-line error naming the folder and both ways out, before anything is written; --resume
    still continues the run, and the launcher of train.processes says the same before its ranks start."""
    run = copy_run(base[0], tmp_path / "run")
    before = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    config = tmp_path / "config.yaml"
    config.write_text(to_yaml(tiny(run, shards, *OVER, "train.keep_last=2", "train.log_with=[tensorboard]")))
    reset()
    assert cli_main(["train", "--config", str(config), "train.auto_resume=false"]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"false starts a new run, but {run} holds a run already (newest checkpoint step-00000006)" in line, err
    assert "(train.auto_resume=true, or --resume), or start the new one in another train.run_dir" in line, err
    assert "Traceback" not in err
    after = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}  # no TensorBoard file
    assert after.keys() - {Path(".lock")} == before.keys() - {Path(".lock")}
    assert all(after[k] == before[k] for k in before if k.name != ".lock")
    with pytest.raises(ConfigError, match=f"{run} holds a run already"):
        check_before_start(tiny(run, shards, *OVER, "train.auto_resume=false"), None, 2)
    assert choose_checkpoint(MAIN_PROCESS, run, "latest", False) == checkpoint_dir(run) / step_name(6)
    assert choose_checkpoint(MAIN_PROCESS, tmp_path / "new", None, False) is None  # an empty folder: a new run


def test_a_finished_run_started_with_another_config_is_refused_and_changes_nothing(base, shards, tmp_path, capsys):
    """A second run under a finished run's name trained nothing (every phase done) but wrote its own values into
    the run's config.yaml and TensorBoard hparams, beside weights that other values trained. Now exit 2 naming the
    keys, before anything is written; a phase given fewer steps than it trained is no change (it keeps them)."""
    run = copy_run(base[0], tmp_path / "run")
    before = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    config = tmp_path / "config.yaml"
    trained = tiny(run, shards, *OVER)
    config.write_text(to_yaml(tiny(run, shards, *OVER, "train.phases.gen.lr=5e-3", "train.log_with=[tensorboard]")))
    reset()
    assert cli_main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert (f"{run} is a finished run (every phase done, nothing to train), and this config changes "
            f"train.phases.gen.lr {trained.train.phases['gen'].lr!r} -> 0.005 since its checkpoint step-00000006") in line
    assert "Pick another train.run_dir" in line and "Traceback" not in err, err
    after = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}  # no TensorBoard file
    assert after.keys() - {Path(".lock")} == before.keys() - {Path(".lock")}
    assert all(after[k] == before[k] for k in before if k.name != ".lock")
    check_before_start(tiny(run, shards, *OVER), None, 1)  # unchanged: its final validation again, as before
    check_before_start(tiny(run, shards, *OVER, "train.phases.gen.steps=4"), None, 1)
    with pytest.raises(ConfigError, match="changes train.phases.gen.w_pixel 1.0 -> 2.0 since"):
        check_before_start(tiny(run, shards, *OVER, "train.phases.gen.steps=4", "train.phases.gen.w_pixel=2"), None, 1)


def test_a_finished_run_takes_keys_of_how_a_session_runs_and_of_its_final_validation(base, shards, tmp_path):
    """A finished run was refused keys that only say how a session runs (data.backend=auto where it trained with
    torch, model.channels_last, data.shuffle_buffer) or what its final validation, which the rerun repeats, measures
    (data.val_qualities, data.val_max_images): re-validating at more qualities was refused (merged-diff review).
    What trained the weights, or chose them, stays refused."""
    run = copy_run(base[0], tmp_path / "run")
    check_before_start(tiny(run, shards, *OVER, "data.backend=auto", "model.channels_last=true",
                            "data.shuffle_buffer=4", "data.val_max_images=8", "data.val_qualities=[10,30]",
                            "data.gpu_jpeg=false", "model.sync_bn=true"), None, 1)
    for key, value in (("data.quality_min", 20), ("train.val_every", 3), ("train.ema_decay", 0.9)):
        with pytest.raises(ConfigError, match=f"is a finished run .*changes {key} "):
            check_before_start(tiny(run, shards, *OVER, f"{key}={value}"), None, 1)


def test_every_config_key_is_placed_for_a_finished_runs_rerun():
    """Each schema key is deliberately refused, taken or not compared when a finished run starts again
    (train/rerun.py): a new key without a place fails here."""
    from dist_dejpeg.config import flatten, load_config, to_dict
    from dist_dejpeg.train.rerun import NOT_COMPARED, NOT_REFUSED, REFUSED

    tables = (NOT_COMPARED, NOT_REFUSED, REFUSED)
    assert all(len(set(t)) == len(t) for t in tables)
    for key in flatten(to_dict(load_config(None, []))):
        places = [t for t in tables for k in t if key == k or (k.endswith(".") and key.startswith(k))]
        assert len(places) == 1, (key, len(places))


def test_a_resume_with_another_config_records_the_changes_and_status_shows_them(base, shards, tmp_path):
    """A resume with other values rewrote config.yaml: the first session's values were left in checkpoint copies
    and one train.log warning. The session's sessions.jsonl line has the changes; status names them."""
    from dist_dejpeg.run.status import run_status
    from dist_dejpeg.run.text import format_status
    from dist_dejpeg.train.sessions import record_session

    run = copy_run(base[0], tmp_path / "run")
    old_lr = tiny(run, shards, *OVER).train.phases["gen"].lr
    reset()
    t = Trainer(tiny(run, shards, *OVER, "train.phases.gen.lr=5e-3"))
    try:
        t.resume(checkpoint_dir(run) / step_name(4))
        line = record_session(t, checkpoint_dir(run) / step_name(4))
    finally:
        t.close()
    assert line["config_changed"] == {"train.phases.gen.lr": [old_lr, 0.005]}, line
    sessions = len((run / "sessions.jsonl").read_text().splitlines())
    shown = format_status(run_status(run))
    assert f"config changed in session {sessions}: train.phases.gen.lr {old_lr!r} -> 0.005" in shown, shown
