"""Whether a run is running, finished, stopped, preempted, crashed or not started (its ``state``), and what one
whose phases are all done is doing: read from its folder alone (run/folder.py), for ``dist-dejpeg status``
(run/status.py). Pure reading; torch-free.

Verdict (``state``), first match wins:
    running            the lock is held (or, held on another host and unverifiable, progress.json is fresh); where
                       the lock names another process than progress.json, starting again (building, loading its
                       checkpoint): the position is then the checkpoint's
    finished           progress.json says finished, or metrics.json and generator.safetensors are there
    stopped            progress.json says a non-finite loss stopped it (a checkpoint was kept; --resume), or a full
                       disk (free space, the same command continues)
    preempted          progress.json says preempted (SIGUSR1/SIGTERM; the same command continues it)
    crashed or killed  started (progress "running", checkpoints or config.yaml) but the lock is not held; where
                       rank 0 crashed on a lost peer (gloo, NCCL), another process probably died first: said so
    not started        no config.yaml, no checkpoint, no progress
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from dist_dejpeg.run.folder import RunFolder
from dist_dejpeg.run.layout import (CONFIG, GENERATOR, LOCK, METRICS, PROGRESS, TENSORBOARD, TENSORBOARD_EVENTS,
                                   TRAINER_STATE, latest_checkpoint)
from dist_dejpeg.run.text import duration

STALE_S = 900.0  # progress older than this while the lock cannot be checked: judged not running
# what rank 0 (the one that writes progress.json) reports when another process of the run died or dropped out first:
# gloo's and NCCL's lost-peer errors, the symptom and not the cause
LOST_PEER = re.compile(r"(Connection (reset|closed) by peer|Broken pipe|remote process exited|communicator was "
                       r"aborted|DistNetworkError|DistBackendError|Timed out waiting)", re.IGNORECASE)


def lost_peer(err: BaseException, timeout_s: float, run_dir: str | Path) -> str | None:
    """What a rank of a run of several processes says when a collective lost another one (``err`` matches
    LOST_PEER): that process's own failure is the cause, and the newest checkpoint, where there is one, is where
    the same command resumes. None where ``err`` is not that (one process alone: no peer to lose)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2 or not LOST_PEER.search(str(err)):
        return None
    first = (str(err).strip().splitlines() or [""])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:200]  # (gloo's source file and line)
    return (f"rank {os.environ.get('RANK', '0')} lost another process of this run ({first}): that process died, or "
            f"stopped answering for train.dist_timeout_s ({timeout_s:g} s), first; its own output says why (the "
            f"launcher's, or logs/train-*.log under SLURM). {where_it_resumes(run_dir)}")


_ERROR_LINE = re.compile(r"[A-Za-z_][\w.]*(:\s|:?$)")  # a traceback's last line: "ValueError: ...", "pkg.Error"


def crash_line(err: BaseException) -> str:
    """The line a crash is told by: ``Type: its first line``; for an error a DataLoader worker raised (torch raises
    it again as "Caught X in DataLoader worker process N." followed by the worker's traceback) the worker's own
    ``Type: message`` line, the error itself, with any further lines of its message (joined by spaces)."""
    raw = str(err).strip().splitlines()
    lines = [line.strip() for line in raw if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        frames = [i for i, line in enumerate(raw) if line.startswith("  File ")]  # (the traceback's, indented)
        start = next((i for i in range(frames[-1] + 1 if frames else 1, len(raw)) if _ERROR_LINE.match(raw[i])),
                     None)  # (its code and ^^^ lines are indented: the first line after at column 0 names the error)
        return " ".join(line.strip() for line in raw[start:] if line.strip())[:300] if start else lines[-1][:300]
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def crash_hint(err: BaseException) -> str | None:
    """The likely cause of a crash whose message alone misleads, and what to change; None for any other."""
    import shutil

    from dist_dejpeg.run.files import is_shm_full, size_text

    if is_shm_full(err):  # (not the run folder's disk: run/files.is_disk_full leaves it out)
        try:
            usage = shutil.disk_usage("/dev/shm")
            size = f"{size_text(usage.total)}, {size_text(usage.free)} free"
        except OSError:  # (no /dev/shm: not Linux)
            size = "its size unknown"
        return (f"/dev/shm ({size}) is too small for data.num_workers x data.prefetch_factor batches in "
                f"flight: raise the container's --shm-size, or lower data.num_workers / data.prefetch_factor")
    if "killed by signal: killed" in str(err).lower():  # (torch's words for a DataLoader worker's SIGKILL)
        return ("a process killed by SIGKILL is most often the out-of-memory killer: check the job's memory limit "
                "(sacct, dmesg), lower data.num_workers / data.shuffle_buffer")
    return None


def crash_said(err: BaseException) -> str | None:
    """A crash with a likely cause that its message misleads about (crash_hint's), said in one line: the error and
    the hint; None for any other."""
    hint = crash_hint(err)
    return f"{crash_line(err).rstrip('. ')}; {hint}" if hint else None


def file_error(err: OSError, run_dir: str | Path) -> str:
    """What a run says when a file it must write or read failed (not a full disk: DiskFull says that): the error,
    its likely causes, and where the same command resumes."""
    return (f"training stopped on a file error: {type(err).__name__}: {err}. Check the folder's permissions and "
            f"filesystem (read-only, over quota, failing), then run the same command. {where_it_resumes(run_dir)}")


def where_it_resumes(run_dir: str | Path) -> str:
    newest = latest_checkpoint(run_dir)
    return (f"The newest checkpoint, {newest.name}, is kept: the same command resumes from it." if newest else
            "It had no checkpoint yet: the same command starts it again.")


STATES = ("running", "finished", "stopped", "preempted", "crashed or killed", "not started")


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def finite(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


# -- the verdict --------------------------------------------------------------------------------------------
def verdict(*, has_config: bool, progress: dict | None, progress_age_s: float | None, lock_held: bool | None,
            finished_files: bool, has_checkpoints: bool, stale_s: float = STALE_S) -> tuple[str, str]:
    """(state, why) from what the folder holds; a pure function (the rules are in the module docstring).
    ``progress_age_s``: seconds since progress.json was written (without one: since the run last wrote a
    checkpoint or TensorBoard events), used only when the lock cannot be checked."""
    pstatus = (progress or {}).get("status")
    reason = str((progress or {}).get("reason") or "?").split(";")[0][:160]
    if lock_held is True:
        return "running", "the run's lock is held"
    if pstatus == "finished":
        return "finished", f"{PROGRESS} says finished"
    if finished_files and pstatus in (None, "running"):
        return "finished", f"{METRICS} and {GENERATOR} are written"
    if pstatus == "stopped" and str((progress or {}).get("reason") or "").startswith("disk full"):
        return "stopped", f"the disk filled ({reason}); free space, then continue it as its message says"
    if pstatus == "stopped" and str((progress or {}).get("reason") or "").startswith("quota exceeded"):
        return "stopped", f"the quota ran out ({reason}); free space within it, then continue it as its message says"
    if pstatus == "stopped":
        return "stopped", f"a non-finite loss stopped it ({reason}); a checkpoint is kept, --resume continues"
    if pstatus == "preempted":
        return "preempted", f"{reason}; the same command continues it from the checkpoint"
    if pstatus == "crashed" and LOST_PEER.search(str(progress.get("reason"))):
        return "crashed or killed", (f"another process of the run probably died first (the cause is then in its own "
                                     f"output: the launcher's, or logs/train-*.log under SLURM); rank 0 then lost "
                                     f"it: {reason}")
    if pstatus == "crashed":
        return "crashed or killed", f"it stopped on an error: {reason}"
    if lock_held is None and (pstatus == "running" or (progress is None and (has_config or has_checkpoints))):
        what = PROGRESS if progress is not None else "the run folder"
        if progress_age_s is not None and progress_age_s < stale_s:
            return "running", (f"the lock cannot be checked from this host; {what} was updated "
                                f"{duration(progress_age_s)} ago")
        if progress_age_s is not None:
            return "crashed or killed", (f"the lock cannot be checked from this host and {what} has not "
                                         f"changed for {duration(progress_age_s)}")
        return "crashed or killed", "the lock cannot be checked from this host and nothing tells its age (guess)"
    if pstatus == "running" or has_checkpoints or has_config:
        return "crashed or killed", "the run started but its lock is not held (the process is gone)"
    return "not started", f"no {CONFIG}, checkpoint or {PROGRESS}"


def progress_age(run: RunFolder, now: float) -> float | None:
    ptime = finite((run.progress or {}).get("time"))
    return max(0.0, now - ptime) if ptime is not None else None


def _activity_age(run: RunFolder, now: float) -> float | None:
    """Seconds since the run last wrote: progress.json; for an older run without one, the newest of its
    checkpoint, TensorBoard events and config.yaml."""
    if run.progress is not None:
        return progress_age(run, now)
    newest = [run.newest / TRAINER_STATE] if run.newest else []
    times = [mtime(p) for p in [*(run.path / TENSORBOARD).glob(TENSORBOARD_EVENTS), run.path / CONFIG, *newest]]
    times = [t for t in times if t is not None]
    return max(0.0, now - max(times)) if times else None


def _finished_files(run: RunFolder) -> bool:
    """metrics.json and the generator are written, by this session of the run (not an earlier one's)."""
    if run.metrics is None or not (run.path / GENERATOR).is_file():
        return False
    ptime = finite((run.progress or {}).get("time"))
    if ptime is not None and run.progress.get("status") == "running":
        # progress.json written after the end: the finished run was started again (e.g. with more steps)
        return ptime <= (mtime(run.path / METRICS) or 0.0) + 1.0
    return True


def newer_start(run: RunFolder) -> bool:
    """Whether the run was started again after progress.json was written: the lock names another process than
    progress.json does (a new session building its models or loading its checkpoint, which writes progress.json
    at its first phase line; or one that ended before that: stopped, or failed while starting)."""
    lock, progress = run.lock, run.progress or {}
    return isinstance(lock.get("pid"), int) and isinstance(progress.get("pid"), int) and (
        (lock["pid"], lock.get("host")) != (progress["pid"], progress.get("host")))


def judge(run: RunFolder, now: float) -> tuple[str, str]:
    """(state, why) of the run folder as read, as of ``now``."""
    newer = newer_start(run)
    # progress.json of an earlier session says nothing about a newer one the lock cannot tell about (another host):
    # judged as a folder without one, by when the newer one took the lock
    unknown = newer and run.lock["held"] is None
    lock_age = max(0.0, now - (mtime(run.path / LOCK) or 0.0))
    state, why = verdict(has_config=(run.path / CONFIG).is_file(), progress=None if unknown else run.progress,
                         progress_age_s=lock_age if unknown else _activity_age(run, now), lock_held=run.lock["held"],
                         finished_files=_finished_files(run), has_checkpoints=bool(run.checkpoints))
    if state == "not started" and isinstance(run.lock.get("pid"), int):  # (the lock is the first thing a start makes)
        why += (f"; a start (pid {run.lock['pid']}, since {run.lock.get('since') or '?'}) ended before writing "
                f"{CONFIG}: it failed or was stopped while starting (see its output)")
    if state == "crashed or killed" and not run.progress and run.trainer_state:
        why += f"; without {PROGRESS} a preemption or a non-finite-loss stop looks the same"
    if newer and state == "running":
        why += (f"; starting again (pid {run.lock['pid']}, since {run.lock.get('since') or '?'}): building, loading "
                f"its checkpoint; {PROGRESS} is the earlier session's until the new one writes it")
    return state, why


def final_stage(run: RunFolder, state: str) -> str:
    """What a run whose phases are all done is doing (or did). Its end (train/final.py) writes nothing for the
    minutes the final validation takes on a big validation set, then metrics.json, then the generator file, then
    progress.json's "finished" before the trackers close; each file counts when written since this session took
    the lock (a finished run started again has the earlier session's), so a run there is not taken for a hung one."""
    if state == "finished":
        return "finished"
    if state != "running":
        return "the final validation did not complete"
    since = mtime(run.path / LOCK) or 0.0
    metrics_at, generator_at = mtime(run.path / METRICS) or -1.0, mtime(run.path / GENERATOR) or -1.0
    if (run.progress or {}).get("status") == "finished" or min(metrics_at, generator_at) >= since:
        return f"{METRICS} and {GENERATOR} written, closing"
    if metrics_at >= since:
        return f"final validation done, writing {GENERATOR}"
    return "final validation running"


def validations_left(config: dict | None, position: dict | None) -> tuple[int, int]:
    """The validations left in the phase and in the run's phases, as the trainer runs them: every val_every steps of
    a phase that trains the generator (not at its last step), and at the end of a gan phase (none after its stop
    rule ended it). (0, 0) where the config or the position is unknown."""
    if not config or not position or not isinstance(position.get("phase_index"), int):
        return 0, 0
    index, step, counts = position["phase_index"], position.get("phase_step") or 0, []
    stopped = position.get("stopped_early") or {}
    for i, p in enumerate(config["phases"][index:], index):
        steps, every, at = p.get("steps"), p.get("val_every"), step if i == index else 0
        if not isinstance(steps, int) or p["name"] in stopped:
            counts.append(0)
            continue
        validates = isinstance(every, int) and every > 0 and p["kind"] in ("gen", "gan")
        counts.append((max((steps - 1) // every - at // every, 0) if validates else 0) + (p["kind"] == "gan"))
    return (counts[0] if counts else 0), sum(counts)


def eta_from_now(phase_s: float | None, run_s: float | None, age_s: float, now: float) -> dict:
    """progress.json's seconds left in the phase and the run (as of its writing, ``age_s`` ago), counted from now.
    One that has passed is not 0 s (status said "eta 0s" for a live run with half its steps left: it went slower
    than its last window, on a busy machine or in a long validation, or it is stuck): it is None, and
    ``overdue_s`` says by how long it has passed."""
    eta, overdue = {}, {}
    for key, left in (("phase", phase_s), ("run", run_s)):
        eta[f"{key}_s"] = left - age_s if left is not None and left >= age_s else None
        if left is not None and left < age_s:
            overdue[key] = age_s - left
    eta["finish_at"] = now + eta["run_s"] if eta["run_s"] is not None else None
    return {**eta, "overdue_s": overdue} if overdue else eta


def with_validations(phases: list[dict], index: int, phase_step: int, eta_phase_s: float, eta_run_s: float,
                     val_s: float | None) -> tuple[float, float]:
    """The trainer's ETAs (the steps left at the step time) with the validations left at ``val_s`` each (its
    session's mean; None: none measured yet) added: the console's, as ``status`` counts them. ``phases``: the
    run's, as status's config has them (name, kind, steps, val_every)."""
    val_phase, val_run = validations_left({"phases": phases}, {"phase_index": index, "phase_step": phase_step})
    return eta_phase_s + val_phase * (val_s or 0.0), eta_run_s + val_run * (val_s or 0.0)
