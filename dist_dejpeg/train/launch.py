"""``train.processes: N``: ``dist-dejpeg train`` runs itself as N ranks on this machine, through PyTorch's own
launcher (``torchrun --standalone --nproc-per-node N``, called as a library so that the exit code of a failing
rank comes back as the command's: 2 config/weights/folder errors, 3 stopped by a fault, 75 preempted). Under a
launcher (``accelerate launch``, ``torchrun``, the sbatch scripts: LOCAL_RANK or WORLD_SIZE set, or
ACCELERATE_MIXED_PRECISION from accelerate's one-process launcher, as with launch/accelerate/cpu.yaml) the key is
ignored: the launcher decides the processes.

On a CPU the processes are gloo DDP ranks with ``cores // N`` threads each: on 2 cores two 1-thread processes
train ~1.6x the images per second of one 2-thread process (a small model's convolutions do not split well
over threads; benchmarks/RESULTS.md, "Two processes on two cores"). On GPUs it is what ``accelerate launch
--multi_gpu --num_processes N`` does (one GPU per process); SLURM runs go through the sbatch scripts instead.

Each rank runs ``python -m dist_dejpeg.train.launch`` (the CLI behind :func:`die_with_parent`): a launcher that
dies (kill -9) takes its ranks with it instead of leaving them training as orphans that hold the run folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

from dist_dejpeg.run.net import no_download_from

log = logging.getLogger("dist_dejpeg")

# set by torchrun / accelerate launch / the sbatch scripts; the last by accelerate launch's one-process launcher too
LAUNCHER_ENV = ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION")
RANK_MODULE = "dist_dejpeg.train.launch"  # what each rank runs: the CLI, ended with its launcher (__main__ below)
LAUNCHER_PID = "DIST_DEJPEG_LAUNCHER_PID"
# EX_TEMPFAIL: stopped by a signal (after a checkpoint, or with nothing new to save); the same command continues the run
EXIT_PREEMPTED = 75
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def already_launched() -> bool:
    return any(name in os.environ for name in LAUNCHER_ENV)


def ranks_here(processes: int, cpu: bool) -> int:
    """The ranks to start: ``processes``, but on GPUs no more than there are (one GPU per rank)."""
    import torch

    if processes > 1 and not cpu and torch.cuda.is_available() and torch.cuda.device_count() < processes:
        log.warning("train.processes=%d but this machine has %d GPU(s): starting %d", processes,
                    torch.cuda.device_count(), torch.cuda.device_count())
        return torch.cuda.device_count()
    return processes


def warn_unlaunched(processes: int, cpu: bool) -> None:
    """train() called from Python (a notebook) with no launcher trains in its own process: a train.processes that
    the command line would start as several ranks (ranks_here's count; the CLI calls train() itself only where
    that is 1) is said to be ignored, not left to halve the global batch without a word."""
    import torch

    ranks = min(processes, torch.cuda.device_count()) if not cpu and torch.cuda.is_available() else processes
    if ranks > 1 and not already_launched():
        log.warning("train.processes=%d is not started by train() called from Python: it trains in this one "
                    "process, with 1/%d of the global batch (continuing the run with %d processes later needs "
                    "train.resume_allow_batch_change); `dist-dejpeg train` (or accelerate launch) starts %d",
                    processes, ranks, ranks, ranks)


def ranks_started(processes: int, cpu: bool) -> int:
    """The ranks a start has: under a launcher, its WORLD_SIZE (``processes``, train.processes, is ignored
    there: 1 where it sets none, accelerate's one-process launcher); else :func:`ranks_here`'s."""
    return int(os.environ.get("WORLD_SIZE", "1")) if already_launched() else ranks_here(processes, cpu)


def threads_per_process(processes: int) -> int:
    """``OMP_NUM_THREADS`` when the user set it (warned where the processes' threads outnumber the usable cores:
    a site's job-wide OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK), else the usable cores shared out (at least one each)."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if given.isdigit() and int(given) > 0:
        if processes * int(given) > cores:
            log.warning("train: OMP_NUM_THREADS=%s (set before the run) makes %d processes x %s = %d threads on %d "
                        "usable CPU(s) (this process's affinity): oversubscribed, every step slows; set "
                        "OMP_NUM_THREADS=%d, or unset it (the launcher then shares the CPUs out)", given, processes,
                        given, processes * int(given), cores, max(1, cores // processes))
        return int(given)
    return max(1, cores // processes)


def failed_code(err, stop: int | None = None) -> int:
    """The command's exit code from the launcher's ChildFailedError: a rank's own code (2, 3, 75: what the rank
    decided) before a signal's (128 + S, as a shell reports it: a rank killed, or aborted on its way out while the
    launcher stopped the others); among equals, the first failure's. ``stop``: the stop signal the launcher passed
    on; ranks that ended by it (no handler yet: building, loading) or by Ctrl-C's KeyboardInterrupt (130) stopped
    as asked, with nothing to save: 75, as a stop with a checkpoint (the same command continues the run). With no
    stop passed on, a 75 after another rank's failure is no stop a rank decided but the SIGTERM by which torch's
    launcher closed it (a rank ending on a lost peer when another was killed): counted as that signal, so that a
    rank killed first (the OOM killer's SIGKILL: 137) is no "run again"."""
    _, first = err.get_first_failure()

    def exitcode(f) -> int:
        closed = stop is None and f.exitcode == EXIT_PREEMPTED and f is not first
        return -signal.SIGTERM if closed else f.exitcode

    chosen = min(err.failures.values(), key=lambda f: (exitcode(f) <= 0, f is not first))
    code = 128 - exitcode(chosen) if exitcode(chosen) < 0 else exitcode(chosen)
    if stop is not None and code in (128 + stop, 128 + signal.SIGINT):
        log.warning("train: %s stopped the processes where they could not checkpoint (before training began, or "
                    "after it ended); the same command continues the run from its newest checkpoint",
                    signal.Signals(stop).name)
        return EXIT_PREEMPTED
    return code


def record_stop(run_dir: str | Path) -> None:
    """After the ranks stopped on a stop signal (exit 75), a progress.json still "running" says so: ranks the signal
    ended where they had nothing new to save (building, the final validation) wrote no word, and ``status`` would
    call the run crashed. A progress.json that cannot be read or written is left as it is, and so is one of a run
    that holds the folder's lock now (two launchers on one folder: the ranks stopped are the one that lost)."""
    from dist_dejpeg.run.files import atomic_write_json, read_json
    from dist_dejpeg.run.layout import PROGRESS
    from dist_dejpeg.run.lock import lock_status

    path = Path(run_dir) / PROGRESS
    if lock_status(run_dir)["held"] is True:  # (this launcher's ranks have ended: another process holds it)
        return
    try:
        progress = read_json(path)
        if isinstance(progress, dict) and progress.get("status") == "running":
            progress.update(status="preempted", time=time.time(), reason="stopped by a signal where the run had "
                            "nothing new to save (starting, or in the final validation)")
            atomic_write_json(path, progress, indent=1)
    except (OSError, ValueError):
        pass


def first_failure_line(err) -> str | None:
    """One line on the rank that failed first when its exit says nothing by itself (a signal, an unknown code);
    None for the codes a rank explains in its own output (2, 3, 75) and a traceback's 1."""
    rank, failure = err.get_first_failure()
    if failure.exitcode in (1, 2, 3, EXIT_PREEMPTED):
        return None
    how = (f"was killed by {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
           else f"exited with {failure.exitcode}")
    oom = ("; a SIGKILL no one sent is most often the out-of-memory killer: check the job's memory limit (sacct, "
           "dmesg), lower data.batch_size / data.num_workers / data.shuffle_buffer"
           if failure.exitcode == -signal.SIGKILL else "")
    return f"train: rank {rank} (pid {failure.pid}) {how}, the first to fail; the others stopped with it{oom}"


def first_on_node(message: str) -> bool:
    """Whether this rank is the first of its node to say ``message``: ranks that fail alike (every rank builds the
    same model from the same disk: a missing weights file) say it once per node, not once per rank. Counted in the
    store of torch's elastic agent (torchrun, accelerate launch, ``train.processes``), which outlives the ranks;
    without one, or where it does not answer, every rank says it."""
    env = os.environ
    if int(env.get("LOCAL_WORLD_SIZE") or 1) <= 1 or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return True
    import hashlib
    from datetime import timedelta

    from torch.distributed import TCPStore

    key = "/".join(("dist_dejpeg_said", env.get("TORCHELASTIC_RESTART_COUNT", "0"), env.get("GROUP_RANK", ""),
                    hashlib.sha256(message.encode()).hexdigest()))
    try:
        store = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=5))
        return store.add(key, 1) == 1
    except (KeyError, ValueError, RuntimeError, OSError) as err:  # (a store gone: say it rather than not at all)
        log.debug("the launcher's store: %s", err)
        return True


def check_before_ranks(cfg) -> None:
    """What every rank would stop on after its start-up (~20 s), each saying it: a tracker that cannot start (an
    MLflow server that does not answer), a model.init_from that is not there or of other shapes (a ConfigError; its
    config alone is read) and every pretrained file that cannot be found (a WeightsError listing them all)."""
    from dist_dejpeg.models.weights import WeightsError
    from dist_dejpeg.train.init_from import init_from_config
    from dist_dejpeg.train.trackers import check_trackers

    check_trackers(list(cfg.train.log_with))
    init_from_config(cfg.model)
    missing = missing_weights(cfg)
    if missing:
        raise WeightsError("pretrained weights this run needs cannot be found:\n"
                           + "\n".join(f"- {line}" for line in missing))


def missing_weights(cfg) -> list[str]:
    """The pretrained files the ranks would load (encoder, LPIPS backbones) that are neither where the config names
    nor in their caches and cannot be downloaded (offline, or the host does not answer), found by file lookups
    alone: a launcher says them all at once, in seconds, instead of every rank the first it meets after its
    start-up (with huggingface_hub's retries, ~45 s offline). What can be downloaded is left to the ranks."""
    from dist_dejpeg.train.phases import uses_lpips

    found, m, lo = [], cfg.model, cfg.loss
    if m.pretrained and not m.init_from:  # (init_from: the source generator's weights, no ImageNet file)
        found += _missing_encoder(m.encoder, m.encoder_weights)
    if lo.lpips_pretrained:
        nets = {(lo.metric_net, lo.metric_weights): ["loss.metric_weights"]}
        if any(uses_lpips(cfg.train.phases[name]) for name in cfg.train.order):
            nets.setdefault((lo.lpips_net, lo.lpips_weights), []).insert(0, "loss.lpips_weights")
        for (net, file), keys in nets.items():
            found += _missing_lpips(net, file, keys)
    return found


def _missing_encoder(name: str, file: str) -> list[str]:
    import timm
    from huggingface_hub import constants

    from dist_dejpeg.models.weights import hf_cached_file

    if file:
        return [] if Path(file).is_file() else [f"model.encoder_weights: file not found: {file}"]
    if ":" in name or not timm.is_model(name):  # (hf-hub:/local-dir: names, unknown ones: the ranks say)
        return []
    repo = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    if not repo or hf_cached_file(repo):  # (the file the ranks would load: they judge it)
        return []
    why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else no_download_from(constants.ENDPOINT)
    if not why:
        return []
    return [f"ImageNet weights for encoder '{name}' (Hugging Face repo '{repo}'): not in {constants.HF_HUB_CACHE}, "
            f"and {why}. Set model.encoder_weights=/path/to/model.safetensors, or run once with internet access "
            f"so that timm caches them, or model.pretrained=false (random init: tests and debugging only)"]


def _missing_lpips(net: str, file: str, keys: list[str]) -> list[str]:
    import torch

    from dist_dejpeg.models.weights import lpips_backbone_weights

    if file:
        return [] if Path(file).is_file() else [f"{' and '.join(keys)}: file not found: {file}"]
    url = lpips_backbone_weights(net).url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    why = None if cached.is_file() else no_download_from(url)
    if not why:
        return []
    named = " and ".join(f"{key}=/path/to/{cached.name}" for key in keys)
    return [f"LPIPS-{net}'s backbone {cached.name}: not at {cached}, and {why}. Place it there (or set TORCH_HOME), "
            f"or set {named}, or loss.lpips_pretrained=false (random: tests and debugging only)"]


class _NoFailureLine(logging.Filter):
    """torch's launcher logs "failed (exitcode: N) local_rank: R ... of binary: python" for any exit but 0, a
    stop's 75 and a rank's own error included, and "Sending process P closing signal SIGTERM" for each rank still
    running then: :func:`launch` says what matters instead (first_failure_line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("failed (exitcode", "Sending process"))


def die_with_parent(parent: int) -> None:
    """A rank ends with the launcher that started it: on Linux the kernel sends it SIGTERM when the launcher dies
    (a kill -9, the OOM killer), a stop signal like any other (a rank in training checkpoints, then exits 75;
    one still building ends at once), so no orphan keeps training, the GPU and the run folder's lock."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    elif parent and os.getppid() != parent:  # the launcher ended before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def leave_process_group() -> None:
    """A rank that stops on an error leaves its process group before it exits: the others' collectives fail at
    once instead of waiting out a timeout, and gloo's threads stop before the interpreter does (seen once without
    this: a rank aborted on its way out, "terminate called without an active exception", exit -6)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as err:  # leaving is best effort: the error that stopped the rank is what counts
            log.debug("leaving the process group: %s", err)


class StopForwarder:
    """The launcher's own SIGINT/SIGTERM/SIGUSR1 handling: the first signal goes on to every rank, and the launcher
    keeps waiting for them, however long their step, validation and checkpoint take (torch's launcher would kill
    them after its 30 s shutdown timeout, and a third Ctrl-C would leave it with the ranks still running); their
    exit code (75 with a checkpoint) is then the command's. A second Ctrl-C kills the ranks at once."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: int | None = None
        self.killed = False

    def install(self) -> dict:
        return {sig: signal.signal(sig, self._handle) for sig in (getattr(signal, n) for n in self.SIGNALS)}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            for rank in ranks_of_this_launcher():
                _signal(rank, signum, group=False)
        elif signum == signal.SIGINT:  # Ctrl-C again: now, without a checkpoint (loader workers too)
            self.killed = True
            for rank in ranks_of_this_launcher():
                _signal(rank, signal.SIGKILL, group=True)


def ranks_of_this_launcher() -> list[int]:
    """The pids of the training processes this process started (torch's launcher starts each in its own session)."""
    import psutil  # (accelerate's dependency)

    found = []
    for child in psutil.Process().children():
        try:
            if RANK_MODULE in child.cmdline():
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


def _signal(pid: int, signum: int, group: bool) -> None:
    try:
        os.killpg(pid, signum) if group and os.getpgid(pid) == pid else os.kill(pid, signum)
    except OSError:  # ended meanwhile
        pass


def launch(processes: int, argv: list[str]) -> int:
    """Run ``python -m dist_dejpeg.cli *argv`` as ``processes`` ranks; returns the first failing rank's exit
    code (75 when a stop signal made them checkpoint; 130 when a second Ctrl-C killed them)."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    env = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "TORCHELASTIC_SIGNALS_TO_HANDLE",
                                                    LAUNCHER_PID)}
    threads = threads_per_process(processes)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the ranks inherit it (torchrun would otherwise say it set 1)
    os.environ[LAUNCHER_PID] = str(os.getpid())
    log.info("train: %d processes of %d thread(s) each (torch.distributed.run, standalone)", processes, threads)
    # torch's launcher keeps only the signals no rank handles (a closed terminal); StopForwarder the others. Its
    # folder for the ranks' error files is ours, removed at the end: its default, a new /tmp/torchelastic_* per
    # launch, was never removed (the failures' messages are read from those files before launch returns)
    logs = tempfile.mkdtemp(prefix="dist_dejpeg_launch_")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          signals_to_handle="SIGHUP,SIGQUIT", logs_specs=DefaultLogsSpecs(log_dir=logs))
    handled = [getattr(signal, name) for name in config.signals_to_handle.split(",") if hasattr(signal, name)]
    saved = {sig: signal.getsignal(sig) for sig in handled}  # the launcher installs its own and leaves them
    stops, quiet = StopForwarder(), _NoFailureLine()
    saved.update(stops.install())
    torch_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    torch_log.addFilter(quiet)
    try:
        elastic_launch(config, sys.executable)("-m", RANK_MODULE, *argv)
    except ChildFailedError as err:
        if stops.killed:
            log.warning("train: stopped at once by a second Ctrl-C, without a checkpoint; the run continues from "
                        "its newest checkpoint")
            return 128 + signal.SIGINT
        line = first_failure_line(err) if stops.received is None else None
        if line:
            log.error("%s", line)
        return failed_code(err, stops.received)
    except SignalException as err:  # SIGHUP, SIGQUIT: the launcher ended the ranks with it
        log.warning("train: %s stopped the launcher and the processes", signal.Signals(err.sigval).name)
        return 128 + err.sigval
    finally:  # this process as it was (a caller in Python, e.g. a test, goes on); the ranks are gone
        shutil.rmtree(logs, ignore_errors=True)
        torch_log.removeFilter(quiet)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return 0


if __name__ == "__main__":  # a rank of launch(): the CLI, as `python -m dist_dejpeg.cli` would run it
    import runpy

    die_with_parent(int(os.environ.get(LAUNCHER_PID, "0")))
    runpy.run_module("dist_dejpeg.cli", run_name="__main__", alter_sys=True)
