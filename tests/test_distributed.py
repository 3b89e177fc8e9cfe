"""Two CPU processes (gloo) under `accelerate launch` against one process with the same global batch: after
all three NoGAN phases both models have the same parameters (synchronised batch norm, critic dropout off so
that no per-rank randomness enters), and validation is reduced over ranks with every image counted once."""

import json

import pytest
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from dist_dejpeg.config import load_config
from dist_dejpeg.train import checkpoint as ckpt

from ddp_runner import GLOBAL_BATCH, write_config
from ddp_runner import run as run_one_process


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, sample_shards, ddp_two_processes):
    _, two_dir = ddp_two_processes
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    run_one_process(str(write_config(tmp_path, sample_shards, "one")), GLOBAL_BATCH)
    one_dir = tmp_path / "one"

    two, one = ckpt.latest_checkpoint(two_dir), ckpt.latest_checkpoint(one_dir)
    assert two.name == one.name == f"step-{8:08d}"
    # Float tolerance after Adam, derived rather than measured: DDP sums each rank's gradient and one process
    # sums the whole batch's, so the two runs see gradients that differ in the last float bits. Where a
    # gradient is far from zero that changes nothing visible; where it is at the noise floor its sign can flip,
    # and Adam's normalised step (|m / sqrt(v)| about 1 per update) then moves that element by up to lr one
    # way in one run and the other way in the other. So: every element within 2 * (sum of lr over updates),
    # and all but a few elements within a tight tolerance. A real desync (e.g. without sync_bn: 248 of 314
    # generator tensors off, by up to 2.5) fails both. On a loaded 2-core machine 2 of 896 values of one
    # encoder weight differed by 4.6e-4 (a tight atol of 3e-4 made the test flaky).
    cfg = load_config(write_config(tmp_path, sample_shards, "bound"))
    phases = [cfg.train.phases[n] for n in cfg.train.order]
    bound = 2 * sum(p.lr * p.steps * (p.critic_lr_mult if p.kind == "gan" else 1.0) for p in phases)
    for name in ("model.safetensors", "model_1.safetensors"):  # generator, critic
        a, b = load_file(str(two / name)), load_file(str(one / name))
        assert a.keys() == b.keys()
        outside, total = 0, 0
        for key in a:
            diff = (a[key].double() - b[key].double()).abs()
            assert diff.max().item() <= bound, f"{name} {key}: differs by {diff.max().item():.3g} > {bound:.3g}"
            outside += int((diff > 3e-4 + 1e-3 * b[key].double().abs()).sum())
            total += diff.numel()
        assert outside <= max(4, total // 10_000), f"{name}: {outside} of {total} values outside rtol 1e-3 / atol 3e-4"

    m2 = json.loads((two_dir / "metrics.json").read_text())
    m1 = json.loads((one_dir / "metrics.json").read_text())
    assert m2["meta"]["val_images_per_quality"] == m1["meta"]["val_images_per_quality"] == 7
    for q in ("q10", "q20", "q40"):
        for metric in ("psnr", "ssim"):
            assert m2[q]["jpeg"][metric] == pytest.approx(m1[q]["jpeg"][metric], rel=1e-9, abs=1e-9)
            assert m2[q]["restored"][metric] == pytest.approx(m1[q]["restored"][metric], rel=1e-4)


# -- train.processes: the launcher's stop signals (train/launch.py) ----------------------------------------
FAKE_RANK = """
import os, signal, sys, time
out, hold = sys.argv[-2], float(sys.argv[-1])
got = []
if hold >= 0:  # (hold < 0: a rank still building, no handler yet: a stop signal ends it)
    signal.signal(signal.SIGINT, lambda *a: got.append(1))
    signal.signal(signal.SIGTERM, lambda *a: got.append(1))
open(os.path.join(out, f"up-{os.getpid()}"), "w").close()
while not got:
    time.sleep(0.05)
time.sleep(hold)  # the step, a validation and the checkpoint a real rank finishes first
open(os.path.join(out, f"saved-{os.getpid()}"), "w").close()
sys.exit(75)
"""


def _fake_ranks(tmp_path, monkeypatch):
    """``launch`` starting two stand-ins for training ranks: each stops ``hold`` s after its first stop signal
    with exit 75, as a rank that checkpoints does (its command line names dist_dejpeg.train.launch like a real
    one's); ``hold`` < 0: a rank that a stop signal ends at once, as one still building its models does."""
    import sys

    script = tmp_path / "rank.py"
    script.write_text(FAKE_RANK)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "1")  # torch's launcher: SIGKILL 1 s after its signal


def _signal_when_up(tmp_path, times: int, sig=None):
    """Ctrl-C (or ``sig``) to this process up to ``times`` times, 0.3 s apart, once both ranks are up, until the
    returned event is set (launch returned)."""
    import os
    import signal
    import threading
    import time

    def send():
        while len(list(tmp_path.glob("up-*"))) < 2:
            time.sleep(0.05)
        for _ in range(times):
            if not done.is_set():
                os.kill(os.getpid(), sig or signal.SIGINT)
            time.sleep(0.3)

    done = threading.Event()
    threading.Thread(target=send, daemon=True).start()
    return done


def test_ctrl_c_waits_for_the_ranks_checkpoint_and_returns_their_exit_code(tmp_path, monkeypatch):
    from dist_dejpeg.train.launch import launch, ranks_of_this_launcher

    _fake_ranks(tmp_path, monkeypatch)
    done = _signal_when_up(tmp_path, 1)
    code = launch(2, [str(tmp_path), "3"])
    done.set()
    assert code == 75
    # torch's launcher alone killed them after its shutdown timeout, before they saved, and said 75 all the same
    assert len(list(tmp_path.glob("saved-*"))) == 2
    assert ranks_of_this_launcher() == []


def test_a_second_ctrl_c_stops_the_ranks_at_once_and_leaves_none_running(tmp_path, monkeypatch):
    import time

    from dist_dejpeg.train.launch import launch, ranks_of_this_launcher

    _fake_ranks(tmp_path, monkeypatch)
    done = _signal_when_up(tmp_path, 3)  # an impatient user: torch's launcher returned at the third, ranks running
    start = time.time()
    code = launch(2, [str(tmp_path), "60"])
    done.set()
    assert code == 130
    assert time.time() - start < 30
    assert ranks_of_this_launcher() == [] and not list(tmp_path.glob("saved-*"))


def test_sigterm_before_the_ranks_handle_it_exits_75_with_one_line_and_no_torch_failure_line(tmp_path, monkeypatch,
                                                                                             caplog):
    """SIGTERM while the ranks still build (no stop handler yet) ends them at once, with nothing to save: the
    command says so and exits 75 like any stop (the same command continues), not 143; and torch's launcher's
    "failed (exitcode ...)" line is not shown."""
    import signal

    from dist_dejpeg.train.launch import launch

    _fake_ranks(tmp_path, monkeypatch)
    done = _signal_when_up(tmp_path, 1, signal.SIGTERM)
    with caplog.at_level("INFO"):
        code = launch(2, [str(tmp_path), "-1"])
    done.set()
    assert code == 75
    assert "SIGTERM stopped the processes where they could not checkpoint" in caplog.text
    assert "failed (exitcode" not in caplog.text


def test_a_rank_dies_with_its_launcher(tmp_path):
    """kill -9 of the launcher (the process the user started): its ranks get SIGTERM from the kernel (a stop
    signal: one in training checkpoints first) instead of training on as orphans that hold the run folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from dist_dejpeg.train.launch import RANK_MODULE

    rank = (f"import os, signal, sys, time; from {RANK_MODULE} import die_with_parent; "
            f"signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1] + '/term', 'w').close(), sys.exit(75))); "
            f"die_with_parent(os.getppid()); open(sys.argv[1] + '/up', 'w').close(); time.sleep(60)")
    launcher = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); "
                                 "time.sleep(60)", sys.executable, "-c", rank, str(tmp_path)])
    try:
        deadline = time.time() + 30
        while not (tmp_path / "up").exists():
            assert time.time() < deadline and launcher.poll() is None
            time.sleep(0.05)
        os.kill(launcher.pid, signal.SIGKILL)
        deadline = time.time() + 10
        while not (tmp_path / "term").exists():
            assert time.time() < deadline, "the rank outlived its launcher"
            time.sleep(0.05)
    finally:
        launcher.kill()
        launcher.wait()


def test_accelerate_launch_with_the_one_process_config_is_a_launcher(monkeypatch):
    """`accelerate launch --config_file launch/accelerate/cpu.yaml` (or single_gpu.yaml) runs one process and sets
    no LOCAL_RANK: configs/debug.yaml's train.processes=2 must not start two more inside it (it did, with the
    launcher's 2 OpenMP threads each on 2 cores)."""
    from dist_dejpeg.train.launch import already_launched

    for name in ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    assert not already_launched()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what accelerate's one-process launcher always sets
    assert already_launched()
