"""Fault 6 of issue 21: a failure on one rank must not hang the others. Two CPU processes (gloo) under
`accelerate launch`, rank 0 alone failing as it starts its tracker, renames a checkpoint or writes the generator
file: both ranks raise the same error and exit within seconds (not at train.dist_timeout_s). And the stop-signal
check interval that keeps interval x step time + save time inside train.preempt_budget_s."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_dejpeg.config import to_yaml
from dist_dejpeg.train import collective
from dist_dejpeg.train.checkpoint import Preempted
from dist_dejpeg.train.collective import PacedChecks, RankFailed, all_ranks_or_raise, check_interval

from test_trainer import shards, tiny  # noqa: F401 (fixture)

ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:  # not accelerate's fixed 29500: other tests may be launching processes
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def launch_failing(tmp_path: Path, shards: Path, fault: str, *overrides: str):
    """tests/faults_ranks_runner.py on two processes; a hang would end at the 120 s collective timeout."""
    run_dir = tmp_path / fault
    config = tmp_path / f"{fault}.yaml"
    config.write_text(to_yaml(tiny(run_dir, shards, "train.order=[gen]", "train.phases.gen.steps=2",
                                   "train.dist_timeout_s=120", *overrides)))
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "launch" / "accelerate" / "cpu_multi.yaml"), "--main_process_port",
                           str(free_port()), str(ROOT / "tests" / "faults_ranks_runner.py"), str(config), fault],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    ended, elapsed = time.time(), time.monotonic() - start
    pids = [int((run_dir / f"pid-{rank}").read_text()) for rank in (0, 1)]
    failed_at = float((run_dir / "failed-at").read_text())
    raised = [float(p.read_text()) - failed_at for p in sorted(run_dir.glob("raised-*"))]
    return done, elapsed, ended - failed_at, pids, raised


@pytest.mark.parametrize("fault, error, overrides", [
    ("tracker", "(ConfigError|PermissionError): .*injected: the tracker's log folder", ()),
    ("save", "PermissionError: injected: cannot rename the checkpoint", ()),
    # after 4 steps read every 2 (CUDA's deferred checks, on the CPU): the paced interval agreed over ranks
    ("finish", "PermissionError: injected: cannot write the generator file",
     ("train.phases.gen.steps=4", "train.sync_every=2", "train.ckpt_every=0")),
])
def test_an_error_on_rank_0_alone_stops_both_ranks_within_seconds(tmp_path, shards, fault, error, overrides):
    import re

    done, elapsed, after, pids, raised = launch_failing(tmp_path, shards, fault, "train.ckpt_every=1", *overrides)
    assert done.returncode != 0, done.stderr[-3000:]
    # both ranks raised the error themselves (rank 1 was not killed by the launcher after rank 0 died)
    for rank in (0, 1):
        assert re.search(f"rank {rank} failed: {error}", done.stderr), done.stderr[-3000:]
    assert len(raised) == 2 and max(raised) < 10, f"seconds from the failure to each rank's error: {raised}"
    # the launcher exits within a minute of the failure (a waiting rank: 120 s more, the collective timeout);
    # measured from the failure, as the start-up before it (~20 s on 2 idle cores) grows with the machine's load
    assert after < 60, f"the launcher exited {after:.0f} s after the failure ({elapsed:.0f} s in all)"
    assert not [pid for pid in pids if alive(pid)], "a rank's process outlived the launcher"
    if fault == "finish":
        assert "stop signal read every 2 steps (train.sync_every 2" in done.stderr, done.stderr[-3000:]


# -- all_ranks_or_raise in one process ------------------------------------------------------------------------
ONE = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True, device=torch.device("cpu"))


def test_one_process_passes_results_and_errors_through():
    assert all_ranks_or_raise(ONE, lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(KeyError, match="boom"):
        all_ranks_or_raise(ONE, {}.__getitem__, "boom")
    with pytest.raises(ValueError):
        with all_ranks_or_raise(ONE):
            raise ValueError("inside a block")


def test_an_error_that_does_not_pickle_whole_reaches_the_others_as_its_text():
    sent = collective._portable(PermissionError("no write"), 0)
    assert type(sent) is PermissionError and str(sent) == "no write"
    odd = collective._portable(Preempted("stopped by SIGTERM", Path("/x")), 2)  # two-argument constructor
    assert isinstance(odd, RankFailed) and str(odd) == "rank 2 failed: Preempted: stopped by SIGTERM"
    held = collective._portable(RuntimeError(lambda: None), 1)  # an argument that does not pickle
    assert isinstance(held, RankFailed) and "rank 1 failed: RuntimeError" in str(held)


# -- the stop-signal check interval -------------------------------------------------------------------------
def test_the_interval_keeps_steps_plus_the_save_inside_the_budget():
    assert check_interval(0.0, 0.0, 90, 25) == 25  # nothing measured yet: train.sync_every
    assert check_interval(0.05, 5.0, 90, 25) == 25  # fast steps: the cap
    assert check_interval(5.0, 40.0, 90, 25) == 10  # 10 x 5 s + 40 s = 90 s
    assert check_interval(5.0, 41.0, 90, 25) == 9
    assert check_interval(30.0, 80.0, 90, 25) == 1  # the save alone nearly fills it: every step
    assert check_interval(1.0, 200.0, 90, 25) == 1  # never below one step
    for step_s, save_s in ((0.3, 12.0), (2.0, 30.0), (7.5, 3.0)):
        n = check_interval(step_s, save_s, 90, 25)
        assert n * step_s + save_s <= 90 and (n == 25 or (n + 1) * step_s + save_s > 90)


class FakeChecks:
    """steps.HostChecks' interface, without a device: counts the steps since the last read."""

    def __init__(self, sync_every: int):
        self.accelerator, self.sync_every, self.flags, self.unchecked, self.reads = ONE, sync_every, None, 0, 0

    @property
    def due(self) -> bool:
        return self.unchecked >= self.sync_every

    def stepped(self, global_step: int) -> None:
        self.unchecked += 1

    def read(self, global_step: int) -> bool:
        self.unchecked, self.reads = 0, self.reads + 1
        return False


def run_paced(monkeypatch, step_s: float, save_s: float, steps: int, save_every: int) -> PacedChecks:
    """The trainer's loop against a clock: each step takes step_s, a save (after the read) save_s."""
    clock = [0.0]
    monkeypatch.setattr(collective.time, "perf_counter", lambda: clock[0])
    paced = PacedChecks(FakeChecks(25), budget_s=90)
    for step in range(1, steps + 1):
        clock[0] += step_s
        paced.stepped(step)
        saving = step % save_every == 0
        if paced.due or saving:
            paced.read(step)
            if saving:
                clock[0] += save_s
    return paced


def test_slow_steps_shorten_the_interval_and_it_is_logged_once(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="dist_dejpeg"):
        paced = run_paced(monkeypatch, step_s=5.0, save_s=40.0, steps=300, save_every=50)
    # the pause measured after a save runs to the end of the next step (45 s): 9 x 5 s + 45 s = 90 s
    assert paced.sync_every == 9
    told = [r.getMessage() for r in caplog.records if "stop signal read every" in r.getMessage()]
    assert len(told) == 1 and told[0].startswith("stop signal read every")
    # with no save measured yet the interval came from the step time alone (18 x 5 s = 90 s)
    assert "every 18 steps" in told[0]


def test_fast_steps_keep_train_sync_every(monkeypatch):
    paced = run_paced(monkeypatch, step_s=0.05, save_s=20.0, steps=300, save_every=100)
    assert paced.sync_every == 25 and paced.checks.reads >= 12


def test_a_save_longer_than_the_budget_warns_and_reads_every_step(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="dist_dejpeg"):
        paced = run_paced(monkeypatch, step_s=1.0, save_s=120.0, steps=200, save_every=40)
    assert paced.sync_every == 1
    warned = [r for r in caplog.records if "more than train.preempt_budget_s" in r.getMessage()]
    assert len(warned) == 1


def test_one_process_leaves_sync_every_one_alone(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(collective.time, "perf_counter", lambda: clock[0])
    paced = PacedChecks(FakeChecks(1), budget_s=90)
    for step in range(1, 20):
        clock[0] += 50.0
        paced.stepped(step)
        paced.read(step)
    assert paced.sync_every == 1 and paced.checks.reads == 19


# -- an error every rank raises itself: said once per node ----------------------------------------------------
def test_ranks_that_fail_alike_say_it_once_per_node(monkeypatch):
    """Counted in the elastic agent's store (which outlives the ranks): the first rank of a node with a message
    says it, another of the same node does not, another node's first does; no agent store: every rank says it."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    from dist_dejpeg.train.launch import first_on_node

    server = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))
    for name, value in {"LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(server.port), "GROUP_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    assert first_on_node("error: weights missing") and not first_on_node("error: weights missing")
    assert first_on_node("error: another")
    monkeypatch.setenv("GROUP_RANK", "1")
    assert first_on_node("error: weights missing")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert first_on_node("error: another") and first_on_node("error: another")


def test_a_stop_every_rank_makes_together_is_said_by_rank_0_alone(monkeypatch, capsys):
    """A non-finite loss stops every rank at the same step, each raising TrainingStopped with its own loss values
    (two different-looking failures were printed): rank 0 says it; an error only one rank raised is said by it."""
    from dist_dejpeg.cli import _stopped
    from dist_dejpeg.train.checkpoint import TrainingStopped

    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert _stopped("error", TrainingStopped(f"training stopped: non-finite gen loss (rank {rank})"), 3,
                        every_rank=False) == 3
        assert ("non-finite gen loss" in capsys.readouterr().err) == said, rank
    monkeypatch.setenv("RANK", "1")
    _stopped("error", FileNotFoundError("no shards under data/x"), 2)
    assert "no shards under data/x" in capsys.readouterr().err


def test_a_weights_file_every_rank_fails_to_load_is_said_once(tmp_path, monkeypatch, capfd, sample_shards):
    """`train.processes=2` with a model.encoder_weights file that is no weights file (found by the launcher, so
    the ranks start): each rank raised its own WeightsError and printed it, one block per rank."""
    from dist_dejpeg.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    junk = tmp_path / "model.safetensors"
    junk.write_text("not weights")
    assert main(["train", "train.processes=2", "train.cpu=true", "model.pretrained=true",
                 f"model.encoder_weights={junk}", "loss.lpips_pretrained=false", f"data.root={sample_shards}",
                 "data.crop=64", "data.val_crop=64", "data.val_max_images=4", "model.encoder=mobilenetv3_small_050",
                 "model.decoder_width=16", "critic.width=8", "loss.lpips_net=alex", "loss.metric_net=alex",
                 f"train.run_dir={tmp_path / 'run'}"]) == 2
    err = "".join(capfd.readouterr())  # the ranks' output, as the launcher passes it on
    assert err.count(f"{junk} does not load into encoder") == 1, err[-3000:]
