"""The launcher of train.processes (train/launch.py) on the machine it runs on: what it leaves behind in /tmp
and how it shares out the CPUs. Its ranks are not started: torch's elastic_launch is a stand-in here."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch.distributed.launcher.api as launcher_api
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from dist_dejpeg.train import launch


def test_a_launch_leaves_no_torchelastic_folder_in_tmp(tmp_path, monkeypatch):
    """Every train.processes>=2 launch left a /tmp/torchelastic_XXXXXXXX/ (torch's default logs folder, made by
    LaunchConfig and never removed: 925 of them on one VM). The launcher's own folder is removed after the ranks
    end, whether they finish or fail (the failure's error file was read by then)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    def ranks(config, entry):
        root = Path(config.logs_specs.root_log_dir)
        assert root.is_dir() and root.parent == tmp_path
        seen.append(root)
        if len(seen) == 1:
            return lambda *args: None
        (root / "attempt_0").mkdir()
        (root / "attempt_0" / "stderr.log").write_text("a rank's output")

        def fail(*args):
            raise ChildFailedError("train", {0: ProcessFailure(0, 123, 2, str(root / "attempt_0" / "error.json"))})
        return fail

    monkeypatch.setattr(launcher_api, "elastic_launch", ranks)
    assert launch.launch(2, ["train"]) == 0
    assert launch.launch(2, ["train"]) == 2  # (a rank's own exit code)
    assert len(seen) == 2 and sorted(tmp_path.iterdir()) == [], sorted(tmp_path.iterdir())


def test_a_user_set_omp_num_threads_over_the_cpus_given_is_warned_and_kept(monkeypatch, caplog):
    """`taskset -c 0 env OMP_NUM_THREADS=4 ... train.processes=2` ran 2 processes of 4 threads on 1 CPU (8 threads,
    silently). The user's value is kept (they asked for it), with a warning naming both numbers and what to set."""
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    caplog.set_level("WARNING", logger="dist_dejpeg")
    assert launch.threads_per_process(2) == 4
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1 and "OMP_NUM_THREADS=4" in said[0] and "2 processes x 4 = 8 threads on 1 usable CPU" in \
        said[0] and "set OMP_NUM_THREADS=1" in said[0], said
    caplog.clear()
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert launch.threads_per_process(2) == 4 and not caplog.records  # (8 threads on 8 CPUs: as asked)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert launch.threads_per_process(2) == 4 and not caplog.records  # (unset: the CPUs shared out)


def test_a_rank_killed_by_sigkill_is_said_with_the_out_of_memory_killer_as_its_likely_cause(tmp_path):
    """A rank the OOM killer ended was told as 'was killed by SIGKILL' alone (a DataLoader worker's got the hint);
    another signal or a code of its own gets no such hint."""
    import signal

    def failed(code: int) -> ChildFailedError:
        return ChildFailedError("train", {1: ProcessFailure(1, 4321, code, str(tmp_path / "error.json"))})

    line = launch.first_failure_line(failed(-signal.SIGKILL))
    assert line.startswith("train: rank 1 (pid 4321) was killed by SIGKILL, the first to fail") and \
        "out-of-memory killer: check the job's memory limit" in line, line
    assert "memory" not in launch.first_failure_line(failed(-signal.SIGSEGV))
    assert launch.first_failure_line(failed(2)) is None
