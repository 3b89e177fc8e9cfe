"""Preemption and crash safety in one process (the SLURM and multi-process versions are in test_slurm.py and
test_distributed.py): a stop signal finishes the step, checkpoints and exits, and the next start of the same
command resumes automatically to the same parameters as an uninterrupted run; a kill -9 at a random moment
loses at most the steps since the last checkpoint; one run folder never gets two writers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from dist_dejpeg.config import to_yaml
from dist_dejpeg.data import build_train_loader
from dist_dejpeg.run.lock import RunDirBusy, RunLock
from dist_dejpeg.train import checkpoint as ckpt
from dist_dejpeg.train.launch import LAUNCHER_PID
from dist_dejpeg.train.trainer import Preempted, Trainer, train

from test_trainer import fresh_accelerator_state, shards, tiny  # noqa: F401 (fixtures)

ROOT = Path(__file__).parents[1]


def final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    latest = ckpt.latest_checkpoint(run_dir)
    names = ("model.safetensors", "model_1.safetensors", "ema_generator.safetensors")  # the EMA's too
    return {name: load_file(str(latest / name)) for name in names}


def assert_same_weights(a: dict, b: dict) -> None:
    for name in a:
        assert a[name].keys() == b[name].keys()
        diff = [k for k in a[name] if not torch.equal(a[name][k], b[name][k])]
        assert not diff, f"{name}: {diff[:5]}"


class SignalAt:
    """A loader that sends ``sig`` to this process while batch number ``at`` is being trained on."""

    def __init__(self, inner, at: int, sig: int):
        self.inner, self.at, self.sig = inner, at, sig

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == self.at:
                os.kill(os.getpid(), self.sig)
            yield batch

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


OVER = ("train.phases.gen.steps=6", "train.phases.critic.steps=2", "train.phases.gan.steps=4",
        "train.keep_last=10", "train.ckpt_every=1")  # 12 steps, a checkpoint after each


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> dict:
    """Final weights of the run the interrupted ones must reproduce (same process settings as theirs)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(tiny(run_dir, shards, *OVER))
    return final_weights(run_dir)


def test_stop_signals_are_recorded_not_acted_on():
    signals = ckpt.StopSignals().install()
    try:
        assert not signals.requested()
        os.kill(os.getpid(), signal.SIGTERM)  # would end the process without the handler
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.requested() and signals.name == "SIGTERM"  # the first one is reported
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_ctrl_c_asks_to_stop_and_a_second_one_stops_at_once(monkeypatch):
    for name in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    signals = ckpt.StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt without the handler
        assert signals.requested() and signals.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # (the handler runs between bytecodes)
        monkeypatch.setenv("LOCAL_RANK", "0")  # a rank: its launcher passes the first Ctrl-C on again
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.name == "SIGINT"
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stop_request_is_said_once_per_node_not_once_per_rank(monkeypatch, capfd):
    """Ctrl-C signals every rank: each printed "got SIGINT; stopping after this step", two identical lines on a
    two-rank CPU run. The first rank of each node says it (under train.processes' launcher, which stops at once
    on a second Ctrl-C, with that hint, as a lone process says it); every rank still records the request."""
    said = {}
    monkeypatch.setenv(LAUNCHER_PID, str(os.getppid()))
    for local_rank in ("1", "0"):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        signals = ckpt.StopSignals().install()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            assert signals.requested() and signals.name == "SIGINT"
        finally:
            signals.restore()
        said[local_rank] = capfd.readouterr().err
    assert said["1"] == "" and "got SIGINT; stopping after this step with a checkpoint (Ctrl-C again: stop now" \
        in said["0"], said


def test_ctrl_c_on_a_two_rank_run_checkpoints_and_exits(tmp_path, shards):
    """Ctrl-C at a terminal signals the whole foreground process group: the launcher, both ranks and any
    loader workers. The ranks finish their step, agree on a checkpoint and exit 75; no traceback."""
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=100000",
                                   "train.processes=2", "data.num_workers=1", "train.log_every=1")))
    run = subprocess.Popen([sys.executable, "-m", "dist_dejpeg.cli", "train", "--config", str(config)], cwd=ROOT,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in run.stdout:  # the first steps are logged: both ranks are training
            if "gen 3/100000" in line:
                break
        os.killpg(run.pid, signal.SIGINT)
        out = run.communicate(timeout=120)[0]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 75, out[-3000:]
    assert "Traceback" not in out and "stopped by SIGINT after step" in out, out[-3000:]
    saved = ckpt.latest_checkpoint(tmp_path / "run")
    assert saved is not None and json.loads((tmp_path / "run" / "progress.json").read_text())["status"] == "preempted"


def test_signal_checkpoints_after_the_step_and_the_rerun_resumes_to_the_same_weights(tmp_path, shards,
                                                                                     uninterrupted):
    sig = signal.SIGUSR1
    cfg = tiny(tmp_path / "cut", shards, *OVER)
    loader = SignalAt(build_train_loader(cfg, 0, 1, torch.device("cpu")), at=7, sig=sig)
    previous = signal.getsignal(sig)
    t = Trainer(cfg, train_loader=loader)
    with pytest.raises(Preempted, match=signal.Signals(sig).name) as stopped:
        t.fit()
    assert signal.getsignal(sig) == previous, "the trainer must put the old handler back"
    # batch 7 is the 8th: the 2nd step of the critic phase; that step finished before the checkpoint
    assert stopped.value.path.name == f"step-{8:08d}"
    assert ckpt.latest_checkpoint(tmp_path / "cut") == stopped.value.path
    assert not (tmp_path / "cut" / "metrics.json").exists()
    del t

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train(tiny(tmp_path / "cut", shards, *OVER))  # same command again: train.auto_resume picks the checkpoint
    assert_same_weights(uninterrupted, final_weights(tmp_path / "cut"))
    assert (tmp_path / "cut" / "metrics.json").is_file()


def test_a_stop_at_a_validation_step_saves_at_once_and_the_resume_validates_first(tmp_path, shards, monkeypatch):
    """A stop read at a step that validates: the checkpoint is written before any validation (validation then
    save overran the SLURM lead time the budget allows for one of them), marked so; the resumed phase validates
    that step first, then trains on."""
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=4", "train.val_every=2",
               "train.ckpt_every=0", "data.val_max_images=1", "data.val_qualities=[10]")
    events = []
    validate = Trainer._validate_in_phase

    def noted(self, *args):
        events.append(("validate", self.state.phase_step))
        return validate(self, *args)

    monkeypatch.setattr(Trainer, "_validate_in_phase", noted)
    t = Trainer(cfg, train_loader=SignalAt(build_train_loader(cfg, 0, 1, torch.device("cpu")), at=1,
                                           sig=signal.SIGUSR1))
    with pytest.raises(Preempted) as stopped:
        t.fit()
    assert stopped.value.path.name == f"step-{2:08d}" and events == []  # saved at step 2, not validated first
    state = json.loads((stopped.value.path / "trainer_state.json").read_text())
    assert state["val_pending"] is True
    del t
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train(cfg)  # the same command: step 2's validation, then steps 3-4 (4 is the phase's last: no in-phase one)
    assert events == [("validate", 2)]
    assert (tmp_path / "run" / "metrics.json").is_file()


@pytest.fixture
def stop_noted():
    """A SIGTERM handler that only notes the signal: a trainer that does not take the signal itself fails the test
    instead of killing pytest. Yields the signals noted."""
    noted = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: noted.append(signum))
    try:
        yield noted
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_stop_before_training_begins_ends_the_run_at_once_as_a_stop(tmp_path, shards, monkeypatch, stop_noted):
    """SIGTERM while the run builds, opens its data or loads its checkpoint: one process ended with the signal
    (143, no word, a checkpoint load taken for a damaged checkpoint); now Preempted at once (exit 75)."""
    from dist_dejpeg.run import status
    from dist_dejpeg.train import trainer as trainer_mod

    handler = signal.getsignal(signal.SIGTERM)

    def slow_choice(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(20)  # the stop interrupts it

    monkeypatch.setattr(trainer_mod, "choose_checkpoint", slow_choice)
    start = time.time()
    with pytest.raises(Preempted, match="stopped by SIGTERM before training began; nothing to save yet"):
        train(tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=1"))
    assert time.time() - start < 20 and not stop_noted
    assert signal.getsignal(signal.SIGTERM) == handler, "train() must put the old handler back"
    RunLock(tmp_path / "run").acquire()  # released
    s = status.run_status(tmp_path / "run")
    assert s["state"] == "preempted" and "before training began" in s["why"], s["why"]


def test_a_stop_during_the_final_validation_keeps_the_checkpoint_and_the_rerun_finishes(tmp_path, shards,
                                                                                        monkeypatch, stop_noted):
    from dist_dejpeg.run import status
    from dist_dejpeg.train import final

    validate = final.validate

    def stopped_validation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return validate(*args, **kwargs)

    monkeypatch.setattr(final, "validate", stopped_validation)
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=2", "data.val_max_images=1",
               "data.val_qualities=[10]")
    with pytest.raises(Preempted, match="during the final validation; .*step-00000002 holds every phase") as stop:
        train(cfg)
    assert stop.value.path.name == "step-00000002" and not stop_noted
    assert not (tmp_path / "run" / "metrics.json").exists()
    s = status.run_status(tmp_path / "run")
    assert s["state"] == "preempted" and s["position"]["phase"] is None, s  # (said: crashed, phase gen 2/2 now)
    monkeypatch.undo()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train(cfg)  # the same command: validates the checkpoint's generator and writes the files
    assert status.run_status(tmp_path / "run")["state"] == "finished"
    assert (tmp_path / "run" / "generator.safetensors").is_file()


def test_a_run_folder_has_one_writer(tmp_path, shards):
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=1")
    first = Trainer(cfg)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(RunDirBusy, match=f"in use by another training run.*pid.*{os.getpid()}"):
        Trainer(cfg)
    first.fit()  # releases the lock when it ends
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    Trainer(cfg).lock.release()


def test_a_lock_held_by_another_process_is_refused_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from dist_dejpeg.run.lock import RunLock\n"
                               f"lock = RunLock({str(tmp_path)!r}); lock.acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=rf"\(held by host .*, pid {holder.pid} since 20") as caught:
            RunLock(tmp_path).acquire()
        assert "{" not in str(caught.value)  # the holder as people read it, not the lock file's JSON
        (tmp_path / ".lock").write_text("")  # the moment between the holder's lock and its writing its name
        with pytest.raises(RunDirBusy, match=r"\(held by a run that is just starting\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()  # kill -9 leaves no stale lock
    lock.release()


def test_a_start_that_loses_the_race_for_a_new_run_folder_leaves_the_winners_folder_and_lock(tmp_path,
                                                                                              monkeypatch, capsys):
    """Two starts on one new run folder (a SLURM array's run_dir without its task id): the loser saw no folder at
    its start, the winner made it and took the lock, the loser's RunDirBusy then removed the folder "it made" with
    the winner's held .lock in it. The winner trained unlocked and a third start was let in."""
    import dist_dejpeg.train.trainer as trainer

    from dist_dejpeg.cli import main

    run, winner = tmp_path / "new" / "run", RunLock(tmp_path / "new" / "run")

    def loses(cfg, **kwargs):  # the winner takes the folder between the loser's look and its lock
        winner.acquire()
        RunLock(run).acquire()

    monkeypatch.setattr(trainer, "Trainer", loses)  # (in train(), which removes a failed start's new folders)
    assert main(["train", "train.processes=1", "train.cpu=true", f"train.run_dir={run}"]) == 2
    assert "in use by another training run" in capsys.readouterr().err
    assert (run / ".lock").is_file()
    with pytest.raises(RunDirBusy):  # (the winner's lock, still there for a third start to find)
        RunLock(run).acquire()
    winner.release()


def test_a_lock_unlinked_while_a_start_waited_on_it_is_taken_afresh(tmp_path, monkeypatch):
    """A start that failed removes its folder's lock file while holding its flock (run/lock.remove_unheld); a
    process granted the flock on that unlinked file would hold a lock no later start can see: it takes the file
    there now."""
    import fcntl

    import dist_dejpeg.run.lock as run_lock

    real, calls = fcntl.flock, []

    def flock(fd, op):  # the first grant comes after the file was unlinked
        calls.append(op)
        if len(calls) == 1:
            os.unlink(tmp_path / ".lock")
        return real(fd, op)

    (tmp_path / ".lock").write_text("")
    monkeypatch.setattr(fcntl, "flock", flock)
    lock = RunLock(tmp_path)
    lock.acquire()
    assert len(calls) == 2 and os.fstat(lock._fd).st_ino == os.stat(tmp_path / ".lock").st_ino
    monkeypatch.setattr(fcntl, "flock", real)
    with pytest.raises(RunDirBusy):
        RunLock(tmp_path).acquire()
    lock.release()
    run_lock.remove_unheld([tmp_path / "gone"])  # (no lock file: only empty folders, none here)
    assert tmp_path.is_dir()


def test_a_failed_starts_cleanup_leaves_a_lock_another_process_has_just_taken(tmp_path):
    """A start whose build failed released its lock, its holder entry still in .lock; a second start had just
    flocked the file (its own entry not yet written) when the first one's cleanup read the stale entry as its own
    and removed the folder and lock: a third start then locked a new .lock in the same folder."""
    from dist_dejpeg.run.files import new_folders
    from dist_dejpeg.run.lock import remove_unheld

    run = tmp_path / "runs" / "new"
    made = new_folders(run)
    first = RunLock(run)
    first.acquire()
    first.release()
    second = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert second.stdout.readline().strip() == "held"
        remove_unheld(made)
        assert (run / ".lock").is_file()
        with pytest.raises(RunDirBusy):
            RunLock(run).acquire()
    finally:
        second.kill()
        second.wait()


def test_a_lock_retaken_after_an_unlink_says_the_retrys_own_error(tmp_path, monkeypatch):
    """Where the retry after a lock file swapped meanwhile failed (EACCES), the descriptor was closed twice (another
    thread's, if reused) and the error said EBADF."""
    import dist_dejpeg.run.lock as run_lock

    real_open, opened = os.open, []

    def refuse_second(path, *args):
        opened.append(path)
        if len(opened) == 2:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args)

    monkeypatch.setattr(run_lock, "_still_there", lambda fd, path: False)
    monkeypatch.setattr(os, "open", refuse_second)
    with pytest.raises(PermissionError, match="Permission denied"):
        RunLock(tmp_path).acquire()


def test_train_processes_refuses_a_busy_run_folder_before_starting_ranks(tmp_path, capsys, monkeypatch):
    """`train.processes=2` on a run folder another run holds: one error at once, no rank started (each rank
    found the lock only after its start-up, ~20 s, and said so once per rank)."""
    from dist_dejpeg.cli import main
    from dist_dejpeg.train import launch as launch_mod

    monkeypatch.setattr(launch_mod, "launch", lambda *a: pytest.fail("ranks were started"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run)
    lock.acquire()
    try:
        code = main(["train", "--config", str(ROOT / "configs" / "debug.yaml"), f"train.run_dir={run}",
                     "train.processes=2", "train.cpu=true"])
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert code == 2 and f"run folder {run} is in use by another training run (held by host" in err, err
    assert f"pid {os.getpid()}" in err


def test_train_processes_says_a_resume_error_once_before_starting_ranks(tmp_path, capsys, monkeypatch):
    """`train.processes=2 --resume` that cannot resume (no such checkpoint; one of other phases): one error line at
    once, no rank started (each rank said it after its start-up, ~20 s, then torch's launcher its failure)."""
    import json

    from dist_dejpeg.cli import main
    from dist_dejpeg.train import launch as launch_mod

    monkeypatch.setattr(launch_mod, "launch", lambda *a: pytest.fail("ranks were started"))
    for name in ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    command = ["train", "--config", str(ROOT / "configs" / "debug.yaml"), f"train.run_dir={run}",
               "train.processes=2", "train.cpu=true"]
    assert main([*command, "--resume", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.count("no such folder") == 1
    step = run / "checkpoints" / "step-00000005"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"phase_names": ["gen"], "global_step": 5}))
    assert main([*command, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "the checkpoint's phases ['gen'] differ from train.order" in err, err
    (step / "trainer_state.json").write_text(json.dumps({"phase_names": ["gen", "critic", "gan"], "global_step": 5}))
    (step / "pytorch_model").mkdir()  # a DeepSpeed checkpoint, resumed without DeepSpeed
    assert main([*command, "--resume"]) == 2
    assert "the checkpoint was written under DeepSpeed, this run uses train.deepspeed_stage=0" in capsys.readouterr().err


def test_an_error_every_rank_raises_is_said_by_the_rank_that_raised_it(tmp_path, capsys, monkeypatch):
    """The ranks that raise a copy of another rank's error (train/collective.py) do not print it again: one line
    per run, not one per rank."""
    from dist_dejpeg.cli import main
    from dist_dejpeg.config import ConfigError
    from dist_dejpeg.train import trainer as trainer_mod

    copy = ConfigError("--resume: no checkpoint under run/checkpoints")
    for copied_from in (None, 0):
        if copied_from is not None:
            copy.copied_from_rank = copied_from

        def fail(*a, **k):
            raise copy

        monkeypatch.setattr(trainer_mod, "train", fail)
        assert main(["train", "--config", str(ROOT / "configs" / "debug.yaml"), f"train.run_dir={tmp_path}",
                     "train.processes=1", "train.cpu=true"]) == 2
        assert capsys.readouterr().err.count("no checkpoint under") == (copied_from is None)


def test_a_rank_of_any_launcher_asks_to_die_with_it(tmp_path, monkeypatch):
    """A rank of accelerate launch or torchrun (LOCAL_RANK set) asks the kernel to end it with its launcher, as the
    ranks of train.processes do (a kill -9 of the launcher left them training, holding the GPU and the lock)."""
    from dist_dejpeg.cli import main
    from dist_dejpeg.config import ConfigError
    from dist_dejpeg.train import launch as launch_mod
    from dist_dejpeg.train import trainer as trainer_mod

    asked = []
    monkeypatch.setattr(launch_mod, "die_with_parent", asked.append)
    monkeypatch.setattr(trainer_mod, "train", lambda *a, **k: (_ for _ in ()).throw(ConfigError("stop here")))
    command = ["train", "--config", str(ROOT / "configs" / "debug.yaml"), f"train.run_dir={tmp_path}",
               "train.processes=1", "train.cpu=true"]
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main(command) == 2 and asked == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(command) == 2 and asked == [os.getppid()]


def test_kill_9_at_a_random_moment_then_resume_matches_an_uninterrupted_run(tmp_path, shards, uninterrupted):
    """The real thing: a separate process is killed with SIGKILL at a random moment after a random checkpoint;
    rerunning the same command resumes from the newest complete checkpoint and ends with the same weights."""
    config = tmp_path / "crash.yaml"
    config.write_text(to_yaml(tiny(tmp_path / "crash", shards, *OVER)))
    command = [sys.executable, "-m", "dist_dejpeg.cli", "train", "--config", str(config)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # the same float results as here
    rng = random.Random()
    kill_after = rng.randint(1, 9)  # checkpoints written before the kill (of 12)
    crashed = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(ckpt.list_checkpoints(tmp_path / "crash")) < kill_after and time.time() < deadline:
        assert crashed.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    # anywhere in a step, or in the middle of writing a checkpoint, but before the next one is complete: on an
    # idle machine the tiny run wrote its last 3 checkpoints within one fixed 0.5 s pause and ended unkilled
    pause = time.time() + rng.uniform(0, 0.5)
    while time.time() < pause and len(ckpt.list_checkpoints(tmp_path / "crash")) <= kill_after:
        time.sleep(0.002)
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    partial = ckpt.checkpoint_dir(tmp_path / "crash") / ".tmp-step-99999999"  # as if killed while saving
    partial.mkdir()
    before = ckpt.latest_checkpoint(tmp_path / "crash")
    assert before is not None and int(before.name[5:]) < 12, f"killed after {kill_after}: {before}"
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing the run in {tmp_path / 'crash'} from step-" in resumed.stderr
    assert not list(ckpt.checkpoint_dir(tmp_path / "crash").glob(".tmp-*")), "a half-written checkpoint remains"
    assert_same_weights(uninterrupted, final_weights(tmp_path / "crash"))


def test_a_stop_while_the_command_starts_is_a_stop_not_143(tmp_path):
    """SIGTERM in the seconds of imports and config before the run takes the stop signals ended the command with
    143 and no word: now the stop's exit 75 (nothing saved yet) and one line saying so."""
    import signal
    import subprocess

    done = subprocess.run([sys.executable, "-c", "import os, signal, time\n"
                           "from dist_dejpeg.cli import stop_while_starting\n"
                           "stop_while_starting()\n"
                           "os.kill(os.getpid(), signal.SIGTERM)\n"
                           "time.sleep(30)\n"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 75, (done.returncode, done.stderr)
    assert done.stderr.strip() == ("stopped by SIGTERM where the run had nothing new to save (starting, or a rank "
                                   "finishing); the same command continues the run")
    from dist_dejpeg.cli import main  # in a Python caller, the command leaves the caller's handlers as they were

    mine = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, mine)


def test_a_rank_leaving_with_an_error_ends_by_the_launchers_sigterm_not_as_a_stop():
    """A rank leaving on an error (a lost peer: another rank was killed) got torch's launcher's closing SIGTERM in
    stop_while_starting's handler: exit 75 and "stopped by SIGTERM", a stop nobody asked for. It ends by the signal."""
    import signal
    import subprocess

    done = subprocess.run([sys.executable, "-c", "import os, signal, time\n"
                           "from dist_dejpeg.cli import _stopped, stop_while_starting\n"
                           "stop_while_starting()\n"
                           "assert _stopped('error', RuntimeError('a peer was lost'), 1) == 1\n"
                           "os.kill(os.getpid(), signal.SIGTERM)\n"
                           "time.sleep(30)\n"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM, (done.returncode, done.stderr)
    assert done.stderr.strip() == "error: a peer was lost"


def test_a_multi_rank_stop_with_nothing_to_save_is_recorded_for_status(tmp_path, monkeypatch):
    """train.processes=2 stopped where the ranks had nothing new to save (building, the final validation): they
    wrote no word, progress.json said "running", and status called the run crashed; the launcher records the stop."""
    import json

    from dist_dejpeg.cli import main
    from dist_dejpeg.run.status import run_status
    from dist_dejpeg.train import launch as launch_mod

    for name in ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    run.mkdir()
    command = ["train", "--config", str(ROOT / "configs" / "debug.yaml"), f"train.run_dir={run}",
               "train.processes=2", "train.cpu=true"]
    for code, before, after in ((2, "running", "running"), (75, "preempted", "preempted"), (75, "running", "preempted")):
        (run / "progress.json").write_text(json.dumps({"status": before, "reason": "earlier", "time": 1.0}))
        monkeypatch.setattr(launch_mod, "launch", lambda *a, code=code: code)
        assert main(command) == code
        progress = json.loads((run / "progress.json").read_text())
        assert progress["status"] == after and (progress["reason"] == "earlier") == (before == after)
    assert run_status(run)["state"] == "preempted"
    # a live run holds the folder (a second launcher's ranks were the ones stopped): its progress.json is its own
    (run / "progress.json").write_text(json.dumps({"status": "running", "reason": "", "time": 1.0}))
    live = RunLock(run)

    def lost(*args):  # (both passed the launcher's check; the other run took the lock, these ranks were stopped)
        live.acquire()
        return 75

    monkeypatch.setattr(launch_mod, "launch", lost)
    try:
        assert main(command) == 75
        assert json.loads((run / "progress.json").read_text())["status"] == "running"
    finally:
        live.release()
