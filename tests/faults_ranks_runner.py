"""A training run in which rank 0 alone fails at one place, for tests/test_faults_ranks.py: every rank must stop
with the same error within seconds instead of waiting for the distributed timeout.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/accelerate/cpu_multi.yaml \
        tests/faults_ranks_runner.py CONFIG FAULT        # FAULT: tracker | save | finish

tracker: TensorBoard's writer cannot start (init_trackers runs on rank 0 only); save: renaming the finished
checkpoint folder fails (rank 0 renames it); finish: writing the generator file fails (rank 0 writes it), after
steps with CUDA's deferred host checks (their interval paced by train/collective.PacedChecks) on the CPU.
Each rank writes its pid to <run_dir>/pid-<rank> first; rank 0 writes the time of the injected failure to
<run_dir>/failed-at; a rank whose run raises prints "rank R failed: Type: message", writes the time to
<run_dir>/raised-<rank> and exits 1.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def inject(fault: str, run_dir: Path) -> None:
    """Make rank 0's ``fault`` step raise (this process only)."""

    def failing(message: str):
        (run_dir / "failed-at").write_text(repr(time.time()))
        return PermissionError(f"injected: {message}")

    if fault == "tracker":
        from accelerate.tracking import TensorBoardTracker

        def start(self):
            raise failing("the tracker's log folder is not writable")

        TensorBoardTracker.start = start
    elif fault == "save":
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name.startswith("step-"):
                raise failing(f"cannot rename the checkpoint into {dst}")
            return real(src, dst, *args, **kwargs)

        os.replace = replace
    elif fault == "finish":
        from dist_dejpeg.train import final as final_mod

        def save_generator(*args, **kwargs):
            raise failing("cannot write the generator file")

        final_mod.save_generator = save_generator
    else:
        raise ValueError(f"unknown fault {fault!r}")


def main(config: str, fault: str) -> int:
    from accelerate import PartialState

    from dist_dejpeg.config import load_config
    from dist_dejpeg.train.trainer import train

    cfg = load_config(config)
    rank, run_dir = PartialState(cpu=True).process_index, Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"pid-{rank}").write_text(str(os.getpid()))
    if fault == "finish":  # every rank: the deferred checks' reads and pacing are collectives
        from dist_dejpeg.train import build

        build.DEFERRED_CHECK_DEVICES = ("cuda", "cpu")
    if rank == 0:
        inject(fault, run_dir)
    try:
        train(cfg)
    except Exception as err:  # noqa: BLE001 - what each rank ended with is the test's evidence
        (run_dir / f"raised-{rank}").write_text(repr(time.time()))
        print(f"rank {rank} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"rank {rank} finished", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
