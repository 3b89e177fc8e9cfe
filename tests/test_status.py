"""``dist-dejpeg status``: read-only verdicts on real run folders (finished in this process; running, then
killed with SIGKILL, and preempted with SIGUSR1, as separate training processes), the verdict rules as a
pure function, and lock detection through /proc/locks without ever taking the lock."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_dejpeg.cli import main
from dist_dejpeg.run import status as st
from dist_dejpeg.run import verdict as run_verdict
from dist_dejpeg.run.lock import lock_status
from dist_dejpeg.run.text import format_status
from dist_dejpeg.config import to_yaml
from dist_dejpeg.train.trainer import train

from test_trainer import fresh_accelerator_state, shards, tiny  # noqa: F401 (fixtures)

ROOT = Path(__file__).parents[1]
LINUX = Path("/proc/locks").is_file()


def cli(*argv: str) -> int:
    return main(list(argv))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def forbid_locking(monkeypatch) -> None:
    """status must never lock (a trainer starting at that moment would fail): any flock call fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("status called flock/lockf")

    monkeypatch.setattr(fcntl, "flock", refuse)
    monkeypatch.setattr(fcntl, "lockf", refuse)


@pytest.fixture
def no_flock(monkeypatch):
    forbid_locking(monkeypatch)


# -- the verdict as a pure function ---------------------------------------------------------------------------
def verdict(progress=None, age=5.0, held=False, finished=False, ckpts=True, config=True):
    return run_verdict.verdict(has_config=config, progress=progress, progress_age_s=age if progress else None,
                      lock_held=held, finished_files=finished, has_checkpoints=ckpts)[0]


@pytest.mark.parametrize("progress, held, finished, ckpts, config, expected", [
    ({"status": "running"}, True, False, True, True, "running"),
    (None, True, False, False, False, "running"),  # lock held while the models are being built
    ({"status": "finished"}, False, True, True, True, "finished"),
    ({"status": "finished"}, False, False, True, True, "finished"),
    (None, False, True, True, True, "finished"),  # an older run without progress.json
    ({"status": "running"}, False, True, True, True, "finished"),
    ({"status": "preempted", "reason": "SIGUSR1"}, False, False, True, True, "preempted"),
    ({"status": "stopped", "reason": "non-finite"}, False, False, True, True, "stopped"),
    ({"status": "running"}, False, False, True, True, "crashed or killed"),
    ({"status": "crashed", "reason": "ZeroDivisionError: x"}, False, False, True, True, "crashed or killed"),
    (None, False, False, True, True, "crashed or killed"),
    (None, False, False, False, True, "crashed or killed"),  # died before its first checkpoint
    (None, False, False, False, False, "not started"),
])
def test_verdict_rules(progress, held, finished, ckpts, config, expected):
    assert verdict(progress, held=held, finished=finished, ckpts=ckpts, config=config) == expected


def test_a_crash_on_a_lost_peer_names_another_process_as_the_cause():
    """One rank killed (kill -9, the OOM killer): rank 0, which writes progress.json, then fails in its next
    collective with gloo's "Connection reset by peer". That is the symptom; status must not present it as the
    cause."""
    gloo = ("RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
            "[127.0.0.1]:31927: Connection reset by peer. This is typically caused by a remote worker hanging")
    stuck = ("RuntimeError: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:133] Timed out waiting "
             "30000ms for send operation to complete")  # a rank stopped (kill -STOP), not dead: rank 0's timeout
    for reason in (gloo, stuck, "DistBackendError: NCCL error: remote process exited or there was a network error"):
        state, why = run_verdict.verdict(has_config=True, progress={"status": "crashed", "reason": reason}, progress_age_s=5,
                                lock_held=False, finished_files=False, has_checkpoints=True)
        assert state == "crashed or killed"
        assert why.startswith("another process of the run probably died first"), why
    _, why = run_verdict.verdict(has_config=True, progress={"status": "crashed", "reason": "ZeroDivisionError: x"},
                        progress_age_s=5, lock_held=False, finished_files=False, has_checkpoints=True)
    assert why == "it stopped on an error: ZeroDivisionError: x"
    # a full disk stops the run as "stopped" too (progress.json's reason): not said to be a non-finite loss
    full = "disk full: /runs/x/checkpoints/.tmp-step-00000012, 12.0 MB free; free space and rerun the same command"
    state, why = run_verdict.verdict(has_config=True, progress={"status": "stopped", "reason": full}, progress_age_s=5,
                                     lock_held=False, finished_files=False, has_checkpoints=True)
    assert state == "stopped" and why.startswith("the disk filled (disk full: ") and "non-finite" not in why, why


def test_verdict_when_the_lock_is_on_another_host():
    assert verdict({"status": "running"}, age=30, held=None) == "running"
    assert verdict({"status": "running"}, age=3 * run_verdict.STALE_S, held=None) == "crashed or killed"
    assert verdict({"status": "preempted"}, age=3 * run_verdict.STALE_S, held=None) == "preempted"


# -- lock detection -------------------------------------------------------------------------------------------
def write_lock(folder: Path, host: str, pid: int) -> Path:
    path = folder / ".lock"
    path.write_text(json.dumps({"host": host, "pid": pid, "slurm_job": "4242", "since": "2026-01-01 00:00:00"}))
    return path


def test_lock_on_another_host_is_unknown_and_a_listed_inode_is_held(tmp_path, no_flock):
    path = write_lock(tmp_path, "node17", 999999)
    empty = tmp_path / "locks"
    empty.write_text("")
    lock = lock_status(tmp_path, proc_locks=str(empty), hostname="login1")
    assert lock["held"] is None and "unknown (held by host node17? cannot check from here" in lock["detail"]
    assert lock["slurm_job"] == "4242"
    s = os.stat(path)
    listed = tmp_path / "locks2"
    listed.write_text(f"1: FLOCK  ADVISORY  WRITE 999999 {os.major(s.st_dev):02x}:{os.minor(s.st_dev):02x}:"
                      f"{s.st_ino} 0 EOF\n2: -> FLOCK  ADVISORY  WRITE 12 00:00:1 0 EOF\n")
    lock = lock_status(tmp_path, proc_locks=str(listed), hostname="login1")
    assert lock["held"] is True and "node17" in lock["detail"] and "4242" in lock["detail"]
    same = lock_status(tmp_path, proc_locks=str(empty), hostname="node17")
    assert same["held"] is False  # this host, no lock in the kernel's table


@pytest.mark.skipif(not LINUX, reason="/proc/locks is Linux's")
def test_a_real_flock_is_seen_without_locking(tmp_path, monkeypatch):
    path = write_lock(tmp_path, os.uname().nodename, os.getpid())
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the test holds it, as a trainer would
    try:
        forbid_locking(monkeypatch)
        assert lock_status(tmp_path)["held"] is True
    finally:
        monkeypatch.undo()
        os.close(fd)
    assert lock_status(tmp_path)["held"] is False


def test_fake_progress_drives_the_verdict_and_eta(tmp_path, no_flock):
    (tmp_path / "config.yaml").write_text("data:\n  batch_size: 4\ntrain:\n  run_dir: runs/x\n  order: [gen]\n"
                                          "  phases:\n    gen:\n      steps: 100\n")
    now = time.time()
    progress = {"time": now - 10, "status": "preempted", "reason": "SIGUSR1", "phase": "gen", "phase_index": 0,
                "phases": ["gen"], "phase_step": 40, "phase_steps": 100, "global_step": 40, "total_steps": 100,
                "images_per_s": 12.5, "data_wait_frac": 0.02, "lr": 1e-3, "eta_phase_s": 60.0, "eta_run_s": 60.0,
                "losses": {"gen/l1": 0.1}, "best": {"metric": "lpips", "value": 0.25, "step": 30},
                "last_val": {"q10": {"jpeg": {"psnr": 25.0, "ssim": 0.7, "lpips": 0.4},
                                     "restored": {"psnr": 26.0, "ssim": 0.8, "lpips": 0.3}}},
                "host": "node1", "pid": 1, "slurm_job": None}
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    s = st.run_status(tmp_path, now=now)
    assert s["state"] == "preempted" and s["eta"] is None and s["best"]["value"] == 0.25
    assert s["position"]["phase_step"] == 40 and s["speed"]["images_per_s"] == 12.5
    write_lock(tmp_path, "node1", 1)  # held on a host this machine cannot check: judged by progress age
    progress["status"] = "running"
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    s = st.run_status(tmp_path, now=now)
    if s["lock"]["held"] is None:
        assert s["state"] == "running" and s["eta"]["run_s"] == pytest.approx(50.0)
    text = format_status(s)
    assert "q10 PSNR 25.00->26.00" in text and "LPIPS 0.2500" in text and len(text.splitlines()) <= 16
    assert "x " not in text.split("batch", 1)[1].split("|")[0]  # not known: no process count claimed
    progress["processes"] = 2  # progress.json says it before any checkpoint or metrics.json does
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    assert "batch 4 x 2 processes" in format_status(st.run_status(tmp_path, now=now))
    progress["status"] = "stopped"
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    assert st.run_status(tmp_path, now=now)["state"] == "stopped"
    # killed after its last checkpoint (progress.json at step 40, the checkpoint at 30): where it resumes is said
    progress["status"] = "running"
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    (tmp_path / ".lock").unlink(missing_ok=True)
    step = tmp_path / "checkpoints" / "step-00000030"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"global_step": 30, "phase_index": 0, "phase_step": 30,
                                                         "phase_names": ["gen"]}))
    s = st.run_status(tmp_path, now=now)
    assert s["state"] == "crashed or killed", s
    assert "step-00000030" in (text := format_status(s)) and "resumes there, at global step 30" in text, text
    # JSON of another shape (another version's, an edit): said, never a TypeError/AttributeError traceback
    for bad in ({"global_step": "x"}, {"phase_step": None, "total_steps": "100"}, {"last_val": {"q10": None}},
                {"last_val": {"q10": {"jpeg": 3}}, "best": "0.25"}, {"time": "yesterday", "losses": [1, 2]}):
        (tmp_path / "progress.json").write_text(json.dumps({**progress, **bad}))
        s = st.run_status(tmp_path, now=now)
        assert format_status(s) and json.dumps(s), bad
        assert "q10" not in (s["last_val"] or {}) or "PSNR 25.00->26.00" in format_status(s), bad


def test_a_newest_checkpoint_a_resume_would_skip_is_said_damaged(tmp_path, no_flock):
    """A truncated file in the newest checkpoint (a resume and restore skip it by its manifest): status named it
    as the newest without a word; now it says damaged, and which one a resume takes."""
    from dist_dejpeg.run.manifest import write_manifest

    for step in (2, 4):
        folder = tmp_path / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(bytes(1000))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        write_manifest(folder)
    s = st.run_status(tmp_path)
    assert s["checkpoint"]["name"] == "step-00000004" and "damaged" not in s["checkpoint"]
    (tmp_path / "checkpoints" / "step-00000004" / "model.safetensors").write_bytes(bytes(300))
    s = st.run_status(tmp_path)
    assert "truncated" in s["checkpoint"]["damaged"] and s["checkpoint"]["usable"] == "step-00000002"
    assert "DAMAGED (model.safetensors: 300 bytes" in format_status(s) and "resuming takes step-00000002" in \
        format_status(s)


def test_a_finished_run_reopened_on_another_process_count_shows_the_new_count(tmp_path, no_flock):
    """status preferred metrics.json's meta (written at the end of the run) for the process count: a finished run
    reopened with more steps on 1 process instead of 2 still showed "x 2 processes". The newest file that says it
    wins: progress.json or the newest checkpoint, metrics.json only where it is the newest."""
    (tmp_path / "config.yaml").write_text("model:\n  encoder: x\ndata:\n  batch_size: 4\ntrain:\n  order: [gen]\n"
                                          "  phases:\n    gen:\n      steps: 100\n")

    def write(name: str, content: dict, age_s: float) -> None:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
        os.utime(path, (time.time() - age_s,) * 2)

    write("metrics.json", {"meta": {"processes": 2, "global_step": 50}}, age_s=300)  # the run's end, on 2
    write("checkpoints/step-00000050/trainer_state.json", {"global_step": 50, "phase_index": 1, "phase_step": 0,
                                                           "phase_names": ["gen"], "processes": 2}, age_s=310)
    assert st.run_status(tmp_path)["config"]["processes"] == 2
    write("checkpoints/step-00000060/trainer_state.json", {"global_step": 60, "phase_index": 0, "phase_step": 60,
                                                           "phase_names": ["gen"], "processes": 1}, age_s=100)
    assert st.run_status(tmp_path)["config"]["processes"] == 1  # reopened on 1: its checkpoint says so
    write("progress.json", {"status": "running", "phase": "gen", "phase_index": 0, "phases": ["gen"],
                            "global_step": 61, "processes": 1}, age_s=10)
    assert st.run_status(tmp_path)["config"]["processes"] == 1
    write("metrics.json", {"meta": {"processes": 2, "global_step": 60}}, age_s=400)  # (older than progress.json)
    write("progress.json", {"status": "finished", "phases": ["gen"], "global_step": 70, "processes": 3}, age_s=5)
    assert st.run_status(tmp_path)["config"]["processes"] == 3
    write("metrics.json", {"meta": {"processes": 4, "global_step": 70}}, age_s=1)  # newest: it says it
    assert st.run_status(tmp_path)["config"]["processes"] == 4


def test_not_a_run_folder(tmp_path, capsys):
    assert cli("status", str(tmp_path / "missing")) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli("status", str(tmp_path)) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert st.run_status(tmp_path)["state"] == "not started"
    step = tmp_path / "run" / "checkpoints" / "step-00000035"  # (said 'CRASHED OR KILLED', exit 0)
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    assert cli("status", str(step)) == 2
    assert f"is a checkpoint folder; give its run folder, {tmp_path / 'run'}" in capsys.readouterr().err
    (tmp_path / "run" / "config.yaml").write_text("train: [cut short\n")  # (said only 'no config.yaml')
    assert "config.yaml is unreadable" in " ".join(st.run_status(tmp_path / "run")["warnings"])


def test_an_evaluate_folder_is_not_a_run(tmp_path, capsys):
    """`evaluate -o` writes a metrics.json too: status said NOT STARTED of its folder (exit 0, "global step None/?")
    and listed each such folder in a parent as a run; a run's folder beside them is still one."""
    import numpy as np
    from PIL import Image

    from dist_dejpeg.evaluation.evaluate import evaluate
    from dist_dejpeg.restore import Restorer

    Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)).save(tmp_path / "ramp.png")
    evals = tmp_path / "evals"
    for name in ("debug", "div2k"):
        evaluate(Restorer(torch.nn.Identity(), device="cpu", guard=False), [str(tmp_path / "ramp.png")], [50],
                 evals / name, progress=False, only=("psnr",))
    assert cli("status", str(evals / "debug")) == 2
    assert "is an `evaluate -o` folder, not a run folder" in capsys.readouterr().err
    assert cli("status", str(evals)) == 2  # no run inside: the folder itself, not a run
    assert "not a run folder" in capsys.readouterr().err
    (evals / "run").mkdir()
    (evals / "run" / "config.yaml").write_text("train: {run_dir: run}\n")
    assert st.find_runs([str(evals)]) == [evals / "run"]


# -- real run folders -----------------------------------------------------------------------------------------
def test_a_file_is_said_to_be_a_file_and_a_runs_file_points_at_its_run(tmp_path, capsys):
    """`status photo.jpg` said "no such folder" of a photo that was there."""
    step = tmp_path / "run" / "checkpoints" / "step-00000035"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "config.yaml").write_text("train: {}\n")
    for name in ("photo.jpg", "run/generator.safetensors", "run/checkpoints/step-00000035/model.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    said = {}
    for name in ("photo.jpg", "run/generator.safetensors", "run/checkpoints/step-00000035/model.safetensors"):
        assert cli("status", str(tmp_path / name)) == 2
        said[name] = capsys.readouterr().err
        assert "no such folder" not in said[name]
    assert "photo.jpg is a file, not a run folder" in said["photo.jpg"]
    run = f"status takes its run folder: dist-dejpeg status {tmp_path / 'run'}\n"
    assert "generator.safetensors is a generator file of a run" in said["run/generator.safetensors"]
    assert said["run/generator.safetensors"].endswith(run)
    assert "model.safetensors is a file of a checkpoint" in said["run/checkpoints/step-00000035/model.safetensors"]
    assert said["run/checkpoints/step-00000035/model.safetensors"].endswith(run)
    assert cli("status", "--json", str(tmp_path / "photo.jpg")) == 2
    assert "is a file, not a run folder" in json.loads(capsys.readouterr().out)["error"]


def test_finished_run(tmp_path, shards, capsys, monkeypatch):
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine, 2 threads fight the other processes (3 s against 50)
    try:
        train(tiny(run, shards, "train.ckpt_every=4"))
    finally:
        torch.set_num_threads(threads)
    forbid_locking(monkeypatch)
    before = snapshot(run)
    s = st.run_status(run)
    assert snapshot(run) == before, "status wrote into the run folder"
    assert s["state"] == "finished", s["why"]
    assert s["lock"]["exists"] and s["lock"]["held"] is False and s["lock"]["pid"] == os.getpid()
    assert s["position"]["phases_done"] == ["gen", "critic", "gan"] and s["position"]["global_step"] == 9
    assert s["checkpoint"]["name"] == "step-00000009" and s["checkpoint"]["age_s"] < 600
    assert s["eta"] is None and s["best"] is not None and s["best"]["step"] == 4
    assert s["best"]["metric"] == "psnr" and s["best"]["value"] > 10  # its LPIPS backbone is random: kept by PSNR
    assert set(s["last_val"]) == {"q10", "q20", "q40"} and "lpips" in s["last_val"]["q10"]["restored"]
    c = s["config"]
    assert (c["data_root"], c["batch_size"], c["crop"], c["mixed_precision"]) == (str(shards), 2, 32, "no")
    assert (c["encoder"], c["pretrained"], c["processes"]) == ("mobilenetv3_small_050", False, 1)
    assert [(p["name"], p["steps"]) for p in c["phases"]] == [("gen", 3), ("critic", 2), ("gan", 4)]
    capsys.readouterr()  # what training printed
    assert cli("status", str(run), "--json") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "finished"
    assert cli("status", str(run)) == 0
    text = capsys.readouterr().out
    assert "FINISHED" in text and "gen 3 done" in text and "mobilenetv3_small_050" in text


def start_training(tmp_path: Path, shards: Path, name: str) -> tuple[subprocess.Popen, Path]:
    run = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(to_yaml(tiny(run, shards, "train.phases.gen.steps=5000", "train.ckpt_every=2",
                                   "train.keep_last=2")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / f"{name}.log", "w") as log:  # a file, not a pipe nobody drains
        proc = subprocess.Popen([sys.executable, "-m", "dist_dejpeg.cli", "train", "--config", str(config)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, run


def log_tail(run: Path) -> str:
    return (run.parent / f"{run.name}.log").read_text()[-3000:]


def wait_until_running(proc: subprocess.Popen, run: Path) -> dict:
    deadline = time.time() + 90
    while time.time() < deadline:
        assert proc.poll() is None, f"training ended early: {log_tail(run)}"
        if (run / "progress.json").is_file() or list((run / "checkpoints").glob("step-*/trainer_state.json")):
            s = st.run_status(run)
            if s["state"] == "running" and (s["progress"] is None or s["speed"]["images_per_s"] is not None):
                return s  # (with progress.json: after the first logged window)
        time.sleep(0.1)
    raise AssertionError(f"no running run in {run}")


@pytest.mark.skipif(not LINUX, reason="the lock check reads /proc/locks")
def test_running_then_killed_and_preempted(tmp_path, shards, no_flock):
    """Two training processes at once (2 cores): one is killed with SIGKILL, the other gets SIGUSR1."""
    killed, run_k = start_training(tmp_path, shards, "killed")
    preempted, run_p = start_training(tmp_path, shards, "preempted")
    try:
        s = wait_until_running(killed, run_k)
        assert s["lock"]["held"] is True and s["lock"]["pid"] == killed.pid, s["lock"]
        assert s["lock"]["checked_by"] == "/proc/locks"
        assert s["position"]["phase"] == "gen" and s["position"]["phases_done"] == []
        assert s["config"]["phases"][0]["steps"] == 5000
        if s["progress"] is not None:  # written by trainers that have progress.json
            assert s["speed"]["images_per_s"] > 0 and s["eta"] is not None and s["eta"]["run_s"] > 0
        assert "RUNNING" in format_status(s)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        (run_k / "checkpoints" / ".tmp-step-99999999").mkdir(parents=True)  # as if killed while saving
        s = st.run_status(run_k)
        assert s["state"] == "crashed or killed", s
        assert s["lock"]["held"] is False and s["lock"]["pid"] == killed.pid and s["eta"] is None
        # the kill may also land while the run writes a checkpoint: that half-written folder is listed as well
        assert ".tmp-step-99999999" in s["partial_checkpoints"] and "killed run" in s["warnings"][0]
        assert all(p.startswith(".tmp-step-") for p in s["partial_checkpoints"]), s["partial_checkpoints"]

        wait_until_running(preempted, run_p)
        preempted.send_signal(signal.SIGUSR1)
        assert preempted.wait(timeout=60) == 75, log_tail(run_p)
        s = st.run_status(run_p)
        assert s["lock"]["held"] is False and s["checkpoint"] is not None
        if s["progress"] is not None:
            assert s["state"] == "preempted", s
        else:  # an older trainer: nothing in the folder tells a preemption from a kill
            assert s["state"] == "crashed or killed" and "look the same" in s["why"]
    finally:
        for proc in (killed, preempted):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- what the numbers mean ------------------------------------------------------------------------------------
def fake_run(folder: Path, history: list, lpips_pretrained: bool = True) -> Path:
    """A run folder at its checkpoint step 30 (gen 30 done, critic next) with the given validation history."""
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(
        "train:\n  run_dir: runs/x\n  order: [gen, critic, gan]\n  phases:\n    gen: {steps: 30}\n"
        "    critic: {steps: 10}\n    gan: {steps: 40}\n"
        f"loss:\n  metric_net: alex\n  lpips_pretrained: {str(lpips_pretrained).lower()}\n")
    step = folder / "checkpoints" / "step-00000030"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({
        "phase_index": 1, "phase_step": 0, "global_step": 30, "history": history,
        "phase_names": ["gen", "critic", "gan"],
        "stop": {"patience": 0, "best": float("inf"), "best_step": -1, "bad_checks": 0}}))
    return folder


def test_several_runs_or_a_sweeps_folder_give_one_line_each(tmp_path, capsys, no_flock):
    """`status runs/` (a job array's runs/sweep-N) or `status a b`: one line per run, in name order, with its
    state, position, gain at the lowest validated quality and best; a path that is no run says why (exit 2)."""
    sweep = tmp_path / "runs"
    sweep.mkdir()
    fake_run(sweep / "sweep-1", [["gen", 30, 0.0035], ["gan", 20, 0.004]])
    fake_run(sweep / "sweep-0", [["gen", 30, 0.0035]])
    (sweep / "sweep-0" / "progress.json").write_text(json.dumps({
        "time": time.time() - 5, "status": "preempted", "phase": "critic", "phase_index": 1, "phase_step": 4,
        "phase_steps": 10, "global_step": 34, "total_steps": 80, "images_per_s": 12.5,
        "last_val": {"q20": {"jpeg": {"psnr": 30.0}, "restored": {"psnr": 30.5}},
                     "q10": {"jpeg": {"psnr": 25.0}, "restored": {"psnr": 26.25}}}}))
    (sweep / "notes.txt").write_text("not a run")
    (sweep / "empty").mkdir()
    assert [p.name for p in st.find_runs([str(sweep)])] == ["sweep-0", "sweep-1"]
    assert st.find_runs([str(sweep / "sweep-1"), str(tmp_path / "none")]) == [sweep / "sweep-1", tmp_path / "none"]
    assert cli("status", str(sweep)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "state", "phase", "step"] and len(lines) == 3, lines
    assert lines[1].startswith(str(sweep / "sweep-0")) and lines[2].startswith(str(sweep / "sweep-1"))
    assert re.search(r"PREEMPTED +critic 4/10 +34/80 +12\.5 .* q10 \+1\.25 dB", lines[1]), lines[1]
    assert re.search(r" LPIPS 0\.0040 @ gan 20 +1$", lines[2]), lines[2]  # (its run_dir runs/x: a copy, warned)
    assert cli("status", str(sweep / "sweep-1"), str(sweep / "empty"), str(tmp_path / "none")) == 2
    said = capsys.readouterr()
    assert len(said.out.splitlines()) == 2 and str(sweep / "sweep-1") in said.out  # the table: to stdout
    assert f"error: {sweep / 'empty'} is not a run folder" in said.err
    assert f"error: no such folder: {tmp_path / 'none'}" in said.err
    assert cli("status", "--json", str(sweep), str(sweep / "empty")) == 2
    listed = json.loads(capsys.readouterr().out)
    assert [s.get("state") for s in listed] == ["preempted", "crashed or killed", None] and "error" in listed[2], listed
    assert cli("status", str(sweep / "empty")) == 2 and "is not a run folder" in capsys.readouterr().err


def test_the_runs_of_a_sweep_are_told_apart_by_the_config_values_that_differ(tmp_path, capsys, no_flock):
    """`status runs/` showed batch, crop, precision and steps at most: a sweep's runs over lr or a loss weight
    looked the same. Now the table ends with the config values that differ between the runs (config.yaml's, by
    the shortest names that stay unambiguous: every phase here has an lr, only gan a w_adv), a few at most."""
    from dist_dejpeg.run.sweep import short_names
    from dist_dejpeg.run.text import format_table

    sweep = tmp_path / "runs"
    sweep.mkdir()
    for i, (lr, w_adv, extra) in enumerate([(1e-3, 0.01, ""), (5e-3, 0.01, ""), (1e-3, 0.5, "  seed: 3\n")]):
        fake_run(sweep / f"sweep-{i}", [["gen", 30, 0.0035]])
        (sweep / f"sweep-{i}" / "config.yaml").write_text(
            f"train:\n  run_dir: {sweep / f'sweep-{i}'}\n{extra}  order: [gen, critic, gan]\n  phases:\n"
            f"    gen: {{steps: 30, lr: {lr}}}\n    critic: {{steps: 10, lr: 1.0e-4}}\n"
            f"    gan: {{steps: 40, lr: 1.0e-5, w_adv: {w_adv}}}\n")
    assert cli("status", str(sweep)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("config differs"), lines[0]
    assert [line.split("  ")[-1].strip() for line in lines[1:]] == [
        "w_adv=0.01 gen.lr=0.001 seed=-", "w_adv=0.01 gen.lr=0.005 seed=-", "w_adv=0.5 gen.lr=0.001 seed=3"]
    assert cli("status", "--json", str(sweep)) == 0  # (the command's list carries them too)
    assert [s["config_differs"]["train.phases.gen.lr"] for s in json.loads(capsys.readouterr().out)] == [
        0.001, 0.005, 0.001]
    from dist_dejpeg.run.sweep import with_differences  # (for `status --json`'s list: cli_use.status_command)

    listed = with_differences([st.run_status(sweep / f"sweep-{i}") for i in (1, 2)] + [{"run_dir": "x", "error": "e"}])
    assert [s.get("config_differs") for s in listed] == [
        {"train.phases.gan.w_adv": 0.01, "train.phases.gen.lr": 0.005, "train.seed": None},
        {"train.phases.gan.w_adv": 0.5, "train.phases.gen.lr": 0.001, "train.seed": 3}, None]
    statuses = [st.run_status(sweep / f"sweep-{i}") for i in (0, 0)]  # (one config twice: no column)
    assert not format_table(statuses).splitlines()[0].endswith("config differs")
    many = {f"train.phases.gen.w_{i}": 1 for i in range(6)}
    assert short_names(["train.phases.gen.lr", "data.crop"], ["train.phases.gan.lr", "data.val_crop", *many]) == {
        "train.phases.gen.lr": "gen.lr", "data.crop": "crop"}


def test_best_is_the_gan_phases_and_a_random_backbone_lpips_says_so(tmp_path, no_flock):
    """'best validation LPIPS 0.0035 at gen step 30': best is the generator the gan phase keeps (the gen phase
    keeps its last one). And a random-init LPIPS (configs/debug.yaml) was shown as if it were LPIPS."""
    run = fake_run(tmp_path / "a", [["gen", 30, 0.0035]])
    s = st.run_status(run)
    assert s["best"] is None and "\nbest " not in format_status(s)
    assert s["lpips"]["pretrained"] is True and not any("LPIPS" in w for w in s["warnings"])
    run = fake_run(tmp_path / "b", [["gen", 30, 0.0035], ["gan", 20, 0.004], ["gan", 40, 0.005]], False)
    s = st.run_status(run)
    assert (s["best"]["phase"], s["best"]["step"], s["best"]["value"]) == ("gan", 20, 0.004)
    text = format_status(s)
    assert "LPIPS (RANDOM BACKBONE) 0.0040 at gan step 20" in text
    assert "RANDOM-init backbone (loss.lpips_pretrained=false): not real LPIPS" in text
    (run / "config.yaml").unlink()  # metrics.json's meta says it too
    (run / "metrics.json").write_text(json.dumps({"meta": {"lpips": "lpips-alex (RANDOM backbone: not real LPIPS)"}}))
    assert st.run_status(run)["lpips"] == {"network": "lpips-alex", "pretrained": False, "source": "metrics.json"}
    unverified = "lpips-alex (UNVERIFIED backbone: alexnet-owt-7be5be79.pth is not torchvision's ...)"
    (run / "metrics.json").write_text(json.dumps({"meta": {"lpips": unverified}}))
    assert f"LPIPS here is {unverified}: comparable only with runs measured with the same file" in st.run_status(
        run)["warnings"]


def test_best_names_the_metric_the_gan_phase_selects_on(tmp_path, no_flock):
    """With a random-backbone LPIPS the gan phase keeps its best by PSNR (select_on auto): status said 'best
    validation LPIPS (RANDOM BACKBONE) 22.0000' of a PSNR, and picked its best from the LPIPS history."""
    history = [["gan", 20, 0.004], ["gan", 40, 0.005]]
    run = fake_run(tmp_path, history, lpips_pretrained=False)
    state_file = next((run / "checkpoints").glob("step-*")) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["stop"] = {"patience": 2, "best": 22.0, "best_step": 40, "bad_checks": 0, "metric": "psnr"}
    state_file.write_text(json.dumps(state))
    s = st.run_status(run)
    assert (s["best"]["metric"], s["best"]["value"], s["best"]["phase"], s["best"]["step"]) == ("psnr", 22.0, "gan", 40)
    assert "best       validation PSNR 22.0000 at gan step 40" in format_status(s)
    state["stop"] = {"patience": 2, "best": float("-inf"), "best_step": -1, "bad_checks": 0, "metric": "psnr"}
    state_file.write_text(json.dumps(state))
    assert st.run_status(run)["best"] is None  # not the LPIPS history's minimum: that is not what the phase keeps
    (run / "progress.json").write_text(json.dumps({"status": "running", "best": {"metric": "psnr", "value": 21.5,
                                                                                 "step": 30, "phase": "gan"}}))
    assert st.run_status(run)["best"]["metric"] == "psnr"
    (run / "progress.json").write_text(json.dumps({"status": "running", "best": {"metric": "lpips", "value": 0.3,
                                                                                 "step": 30, "phase": "gan"}}))
    assert st.run_status(run)["best"]["metric"] == "lpips (random backbone)"


@pytest.mark.skipif(not LINUX, reason="the lock check reads /proc/locks")
def test_a_run_starting_again_is_told_from_its_earlier_session(tmp_path, no_flock, monkeypatch):
    """Started again (building, loading its checkpoint), a run showed the killed session's progress.json:
    running at its last step, with its ETA, though it resumes from the checkpoint before that."""
    run = fake_run(tmp_path, [])
    here, now = os.uname().nodename, time.time()
    (run / "progress.json").write_text(json.dumps({
        "time": now - 600, "status": "running", "phase": "critic", "phase_index": 1, "phases": ["gen", "critic", "gan"],
        "phase_step": 8, "phase_steps": 10, "global_step": 38, "total_steps": 80, "eta_run_s": 900.0, "host": here,
        "pid": 999999}))
    monkeypatch.undo()  # (the test takes the lock, as the new session does)
    fd = os.open(write_lock(run, here, os.getpid()), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        forbid_locking(monkeypatch)
        s = st.run_status(run, now=now)
    finally:
        os.close(fd)
    assert s["state"] == "running" and "starting again" in s["why"], s["why"]
    assert (s["position"]["global_step"], s["position"]["source"]) == (30, "checkpoint step-00000030")
    assert s["eta"] is None
    s = st.run_status(run, now=now)  # that start ended before its first phase: the earlier session's verdict
    assert s["state"] == "crashed or killed" and "ended before its first phase began" in " ".join(s["warnings"])
    write_lock(run, "node17", 4242)  # a new session on another host, lock just taken: not judged by the old file
    s = st.run_status(run, now=time.time())
    assert s["lock"]["held"] is None and s["state"] == "running" and "starting again" in s["why"], s["why"]


def test_a_copied_or_moved_run_folder_says_which_folder_its_command_continues(tmp_path, no_flock):
    """A preempted run copied elsewhere: 'the same command continues it' would continue (or start anew) the
    folder its config names, not this one."""
    moved = fake_run(tmp_path / "moved", [])
    warning = [w for w in st.run_status(moved)["warnings"] if "train.run_dir" in w]
    assert warning and f"add train.run_dir={moved} to continue this one" in warning[0]
    assert not [w for w in st.run_status(fake_run(tmp_path / "x", []))["warnings"] if "train.run_dir" in w]


def test_a_run_killed_after_a_phase_ended_is_at_the_next_phase(tmp_path, no_flock):
    """Killed after a phase's end was saved (as the next phase's step 0; e.g. in the final validation): status
    read progress.json's last word on the ended phase and said 'gen 30 <- now'."""
    run = fake_run(tmp_path / "x", [])
    (run / "progress.json").write_text(json.dumps({
        "time": time.time(), "status": "running", "phase": "gen", "phase_index": 0, "phases": ["gen", "critic", "gan"],
        "phase_step": 30, "phase_steps": 30, "global_step": 30, "total_steps": 80, "pid": 1, "host": "node1"}))
    s = st.run_status(run)
    assert s["state"] == "crashed or killed"
    assert (s["position"]["phase"], s["position"]["phase_step"], s["position"]["phases_done"]) == ("critic", 0, ["gen"])


def test_the_last_validation_line_names_a_random_backbone_lpips():
    from dist_dejpeg.run.text import result_lines

    val = {"q10": {"jpeg": {"psnr": 27.0, "lpips": 0.0077}, "restored": {"psnr": 27.9, "lpips": 0.0070}}}
    for pretrained, name in ((False, "LPIPS(random) 0.0077->0.0070"), (True, "LPIPS 0.0077->0.0070")):
        line = result_lines({"lpips": {"pretrained": pretrained}, "last_val": val, "last_val_source": "x"})[-1]
        assert line.startswith("last val") and name in line, line


def test_a_folder_that_never_began_training_says_so_and_not_an_older_run(tmp_path):
    """A start that failed while building (only .lock, or .lock and config.yaml) or one still building was shown
    as "no progress.json (an older run)"; progress.json is written when the first phase begins."""
    run = tmp_path / "run"
    run.mkdir()
    path = write_lock(run, os.uname().nodename, 2**22 + 12345)  # (above pid_max's default: not alive)
    s = st.run_status(run)
    assert s["state"] == "not started" and "a start (pid 4206649" in s["why"] and "ended before writing" in s["why"]
    assert s["progress_missing"].startswith("none: training never began")
    (run / "config.yaml").write_text("train:\n  run_dir: run\n  order: [gen]\n  phases:\n    gen:\n      steps: 4\n")
    s = st.run_status(run)
    assert s["state"] == "crashed or killed" and s["progress_missing"].startswith("none: training never began")
    text = format_status(s)
    assert "older run" not in text and "progress   none: training never began" in text, text
    if LINUX:  # held: still building its models
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            s = st.run_status(run)
        finally:
            os.close(fd)
        assert s["state"] == "running" and s["progress_missing"].startswith("none yet: starting"), s["why"]
    step = run / "checkpoints" / "step-00000002"  # checkpoints without progress.json: an older version's run
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"global_step": 2, "phase_index": 0, "phase_step": 2}))
    assert st.run_status(run)["progress_missing"].startswith("no progress.json (a run of a version before it")


def test_a_finished_run_without_speed_in_progress_shows_metrics_last_window_never_question_marks(tmp_path):
    """A finished run started again validates without training: its progress.json has no images/s, data wait or
    lr, and status printed "? images/s | data wait ? | lr ?"."""
    (tmp_path / "config.yaml").write_text("train:\n  run_dir: x\n  order: [gen]\n  phases:\n    gen:\n      steps: 4\n")
    progress = {"time": time.time(), "status": "finished", "phase": None, "phase_index": None, "phases": ["gen"],
                "global_step": 4, "total_steps": 4, "images_per_s": None, "data_wait_frac": None, "lr": None}
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    line = [ln for ln in format_status(st.run_status(tmp_path)).splitlines() if ln.startswith("progress")]
    assert len(line) == 1 and re.fullmatch(r"progress   updated \d+s ago \(finished\)", line[0]), line
    window = {"train/images_per_s": 65.59, "train/data_wait_frac": 0.042, "train/lr": 1e-5, "step": 4}
    (tmp_path / "metrics.json").write_text(json.dumps({"meta": {"last_train_log": {"gen": window}}}))
    s = st.run_status(tmp_path)
    assert s["speed"] == {"images_per_s": 65.59, "data_wait_frac": 0.042, "lr": 1e-5,
                          "source": "metrics.json (last window)"}
    line = [ln for ln in format_status(s).splitlines() if ln.startswith("progress")][0]
    assert "65.6 images/s | data wait 4% | lr 1e-05 | from metrics.json (last window)" in line and "?" not in line


def test_a_phase_of_zero_steps_shows_its_zero():
    """A phase configured with 0 steps (gan=0: a run without its GAN) showed "step 0/?" in the position line."""
    s = {"run_dir": "r", "state": "running", "why": "w", "lock": {"detail": "held"}, "config": {},
         "position": {"phase": "gan", "phase_index": 2, "phase_step": 0, "phase_steps": 0, "global_step": 60,
                      "total_steps": 60, "source": "progress.json"}}
    assert "phase gan (3/?) step 0/0, global step 60/60 (from progress.json)" in format_status(s)


@pytest.mark.skipif(not LINUX, reason="the lock check reads /proc/locks")
def test_after_the_last_phase_status_says_what_the_run_is_doing(tmp_path, monkeypatch):
    """After its last phase a run validates (minutes on a big validation set, no file written meanwhile), then
    writes metrics.json and the generator file: status said "all phases done" and RUNNING all along, as for a
    hung run, with an ETA of 0s."""
    run = fake_run(tmp_path, [])  # its end saved as the checkpoint after the last phase
    (run / "checkpoints" / "step-00000030" / "trainer_state.json").write_text(json.dumps({
        "phase_index": 3, "phase_step": 0, "global_step": 80, "phase_names": ["gen", "critic", "gan"]}))
    here, now = os.uname().nodename, time.time()
    (run / "metrics.json").write_text("{}")  # an earlier session's end (a finished run started again)
    os.utime(run / "metrics.json", (now - 3600, now - 3600))
    progress = {"time": now, "status": "running", "phase": "gan", "phase_index": 2, "phases": ["gen", "critic", "gan"],
                "phase_step": 40, "phase_steps": 40, "global_step": 80, "total_steps": 80, "eta_phase_s": 0.0,
                "eta_run_s": 0.0, "host": here, "pid": os.getpid()}
    (run / "progress.json").write_text(json.dumps(progress))
    fd = os.open(write_lock(run, here, os.getpid()), os.O_RDONLY)  # this session's lock, held
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    seen = []
    try:
        forbid_locking(monkeypatch)
        for write in (None, "metrics.json", "generator.safetensors"):  # in the order train/final.py writes them
            if write:
                (run / write).write_text("{}")
            s = st.run_status(run)
            assert s["state"] == "running" and s["eta"] is None, (s["why"], s["eta"])
            seen.append([ln for ln in format_status(s).splitlines() if ln.startswith("position")][0])
    finally:
        os.close(fd)
    assert seen == [f"position   all phases done, {stage}, global step 80/80 (from checkpoint step-00000030)"
                    for stage in ("final validation running", "final validation done, writing generator.safetensors",
                                  "metrics.json and generator.safetensors written, closing")]
    (run / "progress.json").write_text(json.dumps(dict(progress, status="finished")))
    s = st.run_status(run)  # the lock released
    assert s["state"] == "finished" and s["position"]["stage"] == "finished"
    assert "position   all phases done, finished, global step 80/80" in format_status(s)
    (run / "generator.safetensors").unlink()
    (run / "progress.json").write_text(json.dumps(progress))  # killed while writing the generator file
    s = st.run_status(run)
    assert s["state"] == "crashed or killed" and s["position"]["stage"] == "the final validation did not complete"


@pytest.mark.skipif(not LINUX, reason="the lock check reads /proc/locks")
def test_a_real_runs_final_validation_and_files_are_told_apart(tmp_path, shards, monkeypatch):
    """The same, from what the trainer writes: status taken inside the final validation and before the generator
    file is saved."""
    from dist_dejpeg.train import final

    run, seen = tmp_path / "run", {}
    validation, save = final.final_validation, final.save_generator

    def watched_validation(trainer):
        seen.setdefault("final", st.run_status(run))
        return validation(trainer)

    def watched_save(*args, **kwargs):
        seen["save"] = st.run_status(run)
        return save(*args, **kwargs)

    monkeypatch.setattr(final, "final_validation", watched_validation)
    monkeypatch.setattr(final, "save_generator", watched_save)
    train(tiny(run, shards, "train.order=[gen]", "train.phases.gen.steps=2", "data.val_max_images=1",
               "data.val_qualities=[10]"))
    assert list(seen) == ["final", "save"]
    for key, stage in (("final", "final validation running"),
                       ("save", "final validation done, writing generator.safetensors")):
        s = seen[key]
        assert (s["state"], s["position"]["stage"], s["position"]["global_step"]) == ("running", stage, 2), s["why"]
        assert f"all phases done, {stage}, global step 2/2" in format_status(s) and s["eta"] is None
    s = st.run_status(run)
    assert (s["state"], s["position"]["stage"]) == ("finished", "finished")


def test_side_writes_that_failed_are_a_warning(tmp_path, no_flock, capsys):
    """progress.json's write_errors (TensorBoard, image grids, train.log that a full disk or quota cut) were in the
    file and nowhere in `status`: the operator learnt of lost curves only from the run's own log."""
    run = fake_run(tmp_path / "run", [])
    progress = {"time": time.time(), "status": "running", "phase": "critic", "phase_index": 1,
                "phases": ["gen", "critic", "gan"], "phase_step": 0, "phase_steps": 10, "global_step": 30,
                "total_steps": 80, "write_errors": {"tracker.tensorboard": 314, "image.tensorboard": 14}}
    (run / "progress.json").write_text(json.dumps(progress))
    s = st.run_status(run)
    assert s["progress"]["write_errors"] == {"tracker.tensorboard": 314, "image.tensorboard": 14}
    warning = [w for w in s["warnings"] if w.startswith("side writes failed")]
    assert warning and "tracker.tensorboard 314, image.tensorboard 14; write_errors in progress.json" in warning[0]
    assert f"warning    {warning[0]}" in format_status(s)
    assert main(["status", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["progress"]["write_errors"]["tracker.tensorboard"] == 314
    progress["write_errors"] = {}
    (run / "progress.json").write_text(json.dumps(progress))
    assert not [w for w in st.run_status(run)["warnings"] if w.startswith("side writes failed")]


def test_the_eta_counts_the_validations_left(tmp_path, no_flock):
    """The ETA was the steps left at the step time (progress.json's), which leaves the validations out: a run that
    validates often finished far later than said. Now those left (every val_every steps of a phase that trains the
    generator, not at its last step; a gan phase's at its end) at the run's mean validation time (val_s) are added."""
    (tmp_path / "config.yaml").write_text("data:\n  batch_size: 4\ntrain:\n  run_dir: runs/x\n  val_every: 10\n"
                                          "  order: [gen, critic, gan]\n  phases:\n    gen:\n      steps: 100\n"
                                          "    critic:\n      steps: 20\n    gan:\n      steps: 50\n      kind: gan\n"
                                          "      val_every: 0\n")
    now = time.time()
    progress = {"time": now - 10, "status": "running", "reason": "", "phase": "gen", "phase_index": 0,
                "phases": ["gen", "critic", "gan"], "phase_step": 40, "phase_steps": 100, "global_step": 40,
                "total_steps": 170, "images_per_s": 12.5, "eta_phase_s": 60.0, "eta_run_s": 100.0, "val_s": 5.0}
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    write_lock(tmp_path, "node-of-the-eta-test", 1)  # (another host's: judged by progress.json's age)
    s = st.run_status(tmp_path, now=now)
    assert s["state"] == "running"
    # gen: at 50, 60, 70, 80, 90 (not at 100, its last step); critic: none; gan: at 10..40 and at its end
    assert s["eta"]["phase_s"] == pytest.approx(60 + 5 * 5 - 10)
    assert s["eta"]["run_s"] == pytest.approx(100 + 10 * 5 - 10)
    del progress["val_s"]  # (a run of a version before it: the step time alone, as before)
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    assert st.run_status(tmp_path, now=now)["eta"]["run_s"] == pytest.approx(90)
    # the trainer's console line counts them the same way (it said the steps' time alone)
    from dist_dejpeg.run.text import window_line
    from dist_dejpeg.run.verdict import with_validations

    phases = [{"name": "gen", "kind": "gen", "steps": 100, "val_every": 10},
              {"name": "critic", "kind": "critic", "steps": 20, "val_every": 10},
              {"name": "gan", "kind": "gan", "steps": 50, "val_every": 10}]
    assert with_validations(phases, 0, 40, 60.0, 100.0, 5.0) == (60 + 5 * 5, 100 + 10 * 5)
    assert with_validations(phases, 0, 40, 60.0, 100.0, None) == (60.0, 100.0)  # (none measured yet)
    assert with_validations(phases, 2, 45, 6.0, 6.0, 5.0) == (11.0, 11.0)  # (the gan phase's last)
    line = window_line("gen", 40, 100, {"gen/l1": 0.02}, {"train/lr": 1e-3}, *with_validations(
        phases, 0, 40, 60.0, 100.0, 5.0))
    assert line == "gen 40/100 (40%) | gen/l1 0.02 | lr 1.00e-03 | ETA phase 1m25s, run 2m30s", line


def test_an_eta_that_has_passed_says_overdue_not_0s(tmp_path, no_flock):
    """A live run whose progress.json is older than the ETA it gave (a busy machine: slower than its last window
    said) showed "eta 0s" with half its steps left. Now that ETA is none, and by how long it has passed is said."""
    from dist_dejpeg.run.text import format_table

    (tmp_path / "config.yaml").write_text("data:\n  batch_size: 4\ntrain:\n  run_dir: runs/x\n  order: [gen, gan]\n"
                                          "  phases:\n    gen:\n      steps: 100\n    gan:\n      steps: 100\n")
    now = time.time()
    progress = {"time": now - 300, "status": "running", "reason": "", "phase": "gen", "phase_index": 0,
                "phases": ["gen", "gan"], "phase_step": 90, "phase_steps": 100, "global_step": 90,
                "total_steps": 200, "images_per_s": 12.5, "eta_phase_s": 60.0, "eta_run_s": 500.0}
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    write_lock(tmp_path, "node-of-the-overdue-test", 1)  # (another host's: judged by progress.json's age)
    s = st.run_status(tmp_path, now=now)
    assert s["state"] == "running" and s["eta"]["phase_s"] is None and s["eta"]["run_s"] > 150  # (+ the gan's val)
    assert s["eta"]["overdue_s"] == {"phase": pytest.approx(240.0)}, s["eta"]
    assert "eta        phase overdue 4m00s | run 3m" in format_status(s)
    progress["time"] = now - 800  # (under STALE_S: still judged running)
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    s = st.run_status(tmp_path, now=now)
    assert s["eta"]["run_s"] is None and s["eta"]["finish_at"] is None and s["eta"]["overdue_s"]["run"] > 0
    assert "run overdue " in format_status(s) and "has passed" in format_status(s) and "eta 0s" not in str(s)
    assert " overdue " in format_table([s]).splitlines()[1]


def test_status_json_is_a_list_for_a_folder_of_runs_however_many_it_holds(tmp_path, capsys, no_flock):
    """`status --json runs/` gave an object when the sweep's folder held one run and a list when it held two: a
    script read one shape. A folder of runs, or several paths, is a list; one run folder given, an object."""
    sweep = tmp_path / "runs"
    sweep.mkdir()
    assert cli("status", "--json", str(sweep)) == 2  # (no run yet: a list still, its one entry the error)
    listed = json.loads(capsys.readouterr().out)
    assert isinstance(listed, list) and "not a run folder" in listed[0]["error"], listed
    fake_run(sweep / "sweep-0", [["gen", 30, 0.0035]])
    assert cli("status", "--json", str(sweep)) == 0
    listed = json.loads(capsys.readouterr().out)
    assert isinstance(listed, list) and [s["run_dir"] for s in listed] == [str(sweep / "sweep-0")]
    assert cli("status", "--json", str(sweep / "sweep-0")) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == str(sweep / "sweep-0")  # one run folder: an object
    fake_run(sweep / "sweep-1", [["gen", 30, 0.0035]])
    assert cli("status", "--json", str(sweep)) == 0 and len(json.loads(capsys.readouterr().out)) == 2
    assert cli("status", "--json", str(sweep / "sweep-0"), str(tmp_path / "none")) == 2  # several: a list, errors in it
    assert [("error" in s) for s in json.loads(capsys.readouterr().out)] == [False, True]


def test_status_counts_the_sessions_and_names_the_last_ones_commit(tmp_path, no_flock):
    """sessions.jsonl (train/sessions.py: one line a training session) read by status: how many, and the last
    one's commit and torch, in --json and in one text line; a damaged line skipped, a run without the file has
    none (and no line)."""
    (tmp_path / "config.yaml").write_text("train:\n  order: [gen]\n  phases:\n    gen:\n      steps: 10\n")
    s = st.run_status(tmp_path)
    assert s["sessions"] is None and "sessions" not in format_status(s)
    lines = [{"commit": "v1-3-gabc1234", "versions": {"torch": "2.4.0"}},
             {"commit": "v1-5-gdef5678-dirty", "versions": {"torch": "2.5.1+cu121"}}]
    (tmp_path / "sessions.jsonl").write_text("\n".join(map(json.dumps, lines)) + '\n{"commit": "cut sh')
    s = st.run_status(tmp_path)
    assert s["sessions"] == {"count": 2, "last_commit": "v1-5-gdef5678-dirty", "last_torch": "2.5.1+cu121",
                             "config_changed": []}
    assert "sessions   2, the last at commit v1-5-gdef5678-dirty, torch 2.5.1+cu121" in format_status(s)
    assert "config changed" not in format_status(s)
    lines[1]["config_changed"] = {"train.phases.gen.lr": [0.0001, 0.005], "loss.pixel": ["l1", "charbonnier"]}
    (tmp_path / "sessions.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")  # a resume with other values
    s = st.run_status(tmp_path)
    assert s["sessions"]["config_changed"] == [{"session": 2, "keys": lines[1]["config_changed"]}]
    assert ("config changed in session 2: train.phases.gen.lr 0.0001 -> 0.005, loss.pixel 'l1' -> 'charbonnier'"
            in format_status(s)), format_status(s)
    (tmp_path / "sessions.jsonl").write_text(json.dumps({"commit": None, "versions": "?"}) + "\n")  # outside git
    s = st.run_status(tmp_path)
    assert s["sessions"] == {"count": 1, "last_commit": None, "last_torch": None, "config_changed": []}
    assert json.dumps(s)
    assert "sessions   1, the last at commit ?, torch ?" in format_status(s)


def test_pid_alive_on_windows_asks_psutil_never_os_kill(tmp_path, monkeypatch):
    """Windows: os.kill(pid, 0) is no existence check but a CTRL_C_EVENT sent to console group ``pid`` (restore's
    stale-temp cleanup would have interrupted a live writer's group); psutil answers there, and without psutil
    (the restore-only install) a pid counts as alive: its temp file waits for its max age."""
    import psutil

    from dist_dejpeg.restore.inputs import remove_stale_temps
    from dist_dejpeg.run import lock

    monkeypatch.setattr(lock, "WINDOWS", True)
    monkeypatch.setattr(lock.os, "kill", lambda *a: pytest.fail(f"os.kill{a} on Windows"))
    monkeypatch.setattr(psutil, "pid_exists", lambda pid: pid == 4242)
    assert lock.pid_alive(4242) and not lock.pid_alive(4243) and not lock.pid_alive(0)
    live, gone = tmp_path / ".a.png.tmp4242", tmp_path / ".a.png.tmp4243"
    for path in (live, gone):
        path.write_bytes(b"x")
    assert remove_stale_temps([tmp_path / "a.png"]) == [gone] and live.exists()
    monkeypatch.setitem(sys.modules, "psutil", None)  # (import psutil: ImportError)
    gone.write_bytes(b"x")
    assert lock.pid_alive(4243) and remove_stale_temps([tmp_path / "a.png"]) == []


def test_the_sweep_columns_flatten_configs_as_the_config_does():
    """run/sweep.py had its own copy of dist_dejpeg.config.flatten (merged-diff review): one definition now, in the
    torch-free run layer (which may not import config), that config exports."""
    from dist_dejpeg import config
    from dist_dejpeg.run import sweep

    assert sweep.flatten is config.flatten and not hasattr(sweep, "_flat")
    assert config.flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {}, "d": [1]}
