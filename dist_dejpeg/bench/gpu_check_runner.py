"""The GPU check's steps run one after the other, each in a child process group of its own under its timeout
(SIGTERM, then SIGKILL after KILL_GRACE), with a row per step in summary.md and, at the end, the last lines of
each failing step's log (bench/gpu_check.py drives it). Standard library only."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

KILL_GRACE = 10  # s between a step's SIGTERM and its SIGKILL (coreutils' `timeout -k 10`)
# install's exit code where the project runs but not all is right (DALI left out, the project's wheel from another
# tree): the step failed, and the later steps run all the same (a lease's minutes are not thrown away)
PARTIAL = 10


class Runner:
    """Runs the steps one after the other, each in a child process group under its timeout, and adds their rows."""

    def __init__(self, out: Path, summary: Path, ctx: dict, env: dict, *, deadline: float, budget: int):
        self.out, self.summary, self.ctx, self.env = out, summary, ctx, env
        self.deadline, self.budget = deadline, budget
        self.failed: list[str] = []
        self.blocked = False  # the install step failed: the later steps would not run this checkout

    def run(self, steps: list[str]) -> list[str]:
        for name in steps:  # most telling first: when the budget runs out, the later steps are reported as not run
            settings = self.ctx["steps"][name]
            if name == "install":  # for install's own import check and every later step
                self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.ctx["site"], os.environ.get("PYTHONPATH")]))
            if name == "cuda" and not self.ctx["have_cuda"]:
                self.skip(name, "no CUDA", "no CUDA (--allow-cpu)")
            elif self.blocked:  # every later step would measure the machine's own packages, if any
                self.skip(name, "install failed", "the install step failed: this step would not run this checkout")
            elif settings.get("skip"):
                self.skip(name, settings["skip"], f"{settings['skip']} ({settings.get('why', '')})")
            else:
                self.step(name, int(settings.get("timeout_s", 120)))
        return self.failed

    def row(self, name: str, code: int, seconds: str, result: str) -> None:
        with self.summary.open("a") as f:
            f.write(f"| {name} | {code} | {seconds} | {result} |\n")
        print(f"gpu_check: {name}: {result} (exit {code}, {seconds} s)", flush=True)

    def skip(self, name: str, short: str, long: str) -> None:
        (self.out / f"{name}.log").write_text(f"skipped: {long}\n")
        self.row(name, 0, "0", f"skipped: {short}")

    def step(self, name: str, limit: int) -> None:
        log = self.out / f"{name}.log"
        left = int(self.deadline - time.time()) - KILL_GRACE - 2  # the kill grace plus bookkeeping
        if left < 10:
            log.write_text(f"not run: the check's {self.budget} s budget is spent\n")
            self.failed.append(name)
            return self.row(name, 124, "0", f"FAILED: not run, the {self.budget} s budget is spent")
        limit = min(limit, left)
        print(f"gpu_check: {name} (timeout {limit} s) ...", flush=True)
        t0 = time.perf_counter()
        cmd = [self.ctx["py"], "-m", "dist_dejpeg.bench.gpu_check_steps", name,
               str(Path(self.ctx["work"]) / "context.json")]
        with log.open("w") as f:
            # a group of its own: a timeout (or Ctrl-C) ends the trainer, its loader workers and compilers with it
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                    cwd=self.ctx["root"], start_new_session=True)
            try:
                rc = _wait(proc, limit)
            finally:
                _kill_group(proc.pid, signal.SIGKILL)  # whatever of the step is left (a trainer saving after SIGTERM)
        result = {0: "ok", 124: f"FAILED: timed out after {limit} s", 137: f"FAILED: timed out after {limit} s"}
        result = result.get(rc, "FAILED")
        if rc == 5 and name == "pytest_gpu":
            result = "FAILED: no test collected"
        if name == "install" and rc == PARTIAL:
            result = "FAILED: in part (its log says what; the later steps run)"
        if rc:
            self.failed.append(name)
            self.blocked |= name == "install" and rc != PARTIAL
        self.row(name, rc, f"{time.perf_counter() - t0:.1f}", result)


def _wait(proc: subprocess.Popen, limit: float) -> int:
    """The step's exit code; 124 when it ran out of time and stopped on SIGTERM, 137 when it needed SIGKILL."""
    try:
        rc = proc.wait(timeout=limit)
        return 128 - rc if rc < 0 else rc  # killed by a signal (the OOM killer, say): as a shell reports it
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE)
            return 124
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
            return 137
    except KeyboardInterrupt:
        _kill_group(proc.pid, signal.SIGKILL)
        raise


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def write_footer(summary: Path, out: Path, failed: list[str], total: int, started: float, notes: list[str]) -> None:
    lines = ["", f"Total: {int(time.time() - started)} s; {len(failed)} of {total} steps failed"
             + (f": {' '.join(failed)}." if failed else "."), *notes]
    for name in failed:
        log = out / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
        lines += ["", f"### {name}: last lines of {name}.log", "", "```text", *tail, "```"]
    with summary.open("a") as f:
        f.write("\n".join(lines) + "\n")
