"""Where a run stands, read from its folder alone: ``dist-dejpeg status RUN_DIR [--json]``.

    dist-dejpeg status runs/div2k           # a dozen lines: verdict, config, position, speed, ETA, metrics
    dist-dejpeg status runs/div2k --json    # the same as one JSON object, for scripts

Pure reading: nothing in the run folder is created, locked or written, so it is safe on a live run (taking
the run's flock even for a moment would make a trainer starting at that moment fail with "busy"). What it
reads: ``config.yaml``, ``progress.json`` (rank 0 rewrites it at every log window, validation, phase boundary
and at the end; older runs have none), ``checkpoints/step-*/trainer_state.json`` (and ``.tmp-step-*`` left by
a killed run), ``metrics.json`` and ``generator.safetensors`` (written at the end), ``sessions.jsonl`` and ``.lock``.

Whether the lock is held is read without locking: the ``.lock`` file's inode among the FLOCK entries of
``/proc/locks`` (Linux; the kernel drops the flock when the holder dies, so a killed run shows none), and,
when the file names this host as the holder, whether that pid is alive. A holder on another host cannot be
seen from here on most shared filesystems (``/proc/locks`` lists this node's locks only); the lock is then
"unknown" and the verdict falls back on how recently ``progress.json`` was updated.

The verdict (``state``: running, finished, stopped, preempted, crashed or killed, not started) and what a run
whose phases are all done is doing (``position.stage``) are decided in run/verdict.py.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import time
from pathlib import Path

from dist_dejpeg.run.folder import RunFolder, read_folder, read_yaml, session_summary
from dist_dejpeg.run.layout import (CHECKPOINTS, CONFIG, EVALUATE_CSV, GENERATOR, LOADER_STATE, LOCK, METRICS, PROGRESS,
                                   TRAINER_STATE, WRITE_ERRORS)
from dist_dejpeg.run.manifest import verify_checkpoint
from dist_dejpeg.run.text import duration
from dist_dejpeg.run.verdict import (STALE_S, eta_from_now, final_stage, finite, judge, mtime, newer_start,
                                     progress_age, validations_left)


# -- helpers ------------------------------------------------------------------------------------------------
def _clean(obj):
    """JSON-safe: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# -- position -----------------------------------------------------------------------------------------------
def _processes(run: RunFolder) -> int | None:
    """The newest of what progress.json (rank 0's, all through a session from its first phase line), the newest
    checkpoint's trainer_state.json and metrics.json's meta (written at a run's end: stale once a finished run
    is reopened on another process count) say, by their files' times; else the newest checkpoint holds one
    loader state per rank."""
    said = [(mtime(run.path / PROGRESS) or 0.0, (run.progress or {}).get("processes")),
            (mtime(run.path / METRICS) or 0.0, run.meta.processes)]
    if run.newest is not None:
        said.append((mtime(run.newest / TRAINER_STATE) or 0.0, (run.trainer_state or {}).get("processes")))
    given = [(t, n) for t, n in said if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    if given:
        return max(given, key=lambda pair: pair[0])[1]
    if run.newest is not None:
        return len(list(run.newest.glob(LOADER_STATE.format(rank="*")))) or None
    return None


def _position(run: RunFolder, state: str) -> dict | None:
    """Where the run is: phase, steps, the phases done and those the stop rule ended early; once every phase is
    done, its ``stage`` (the final validation, writing its files, finished: verdict.final_stage), else None."""
    position, phases = _read_position(run, earlier=newer_start(run))
    if position is None:
        return None
    index = position["phase_index"] if isinstance(position["phase_index"], int) else 0
    if state == "finished":
        index = len(phases)
        position.update(phase=None, phase_index=index)
    all_done = state == "finished" or (bool(phases) and index >= len(phases))
    position["stage"] = final_stage(run, state) if all_done else None
    position["phases_done"] = phases[:index]
    stopped_early = (run.trainer_state or {}).get("stopped_early") or run.meta.stopped_early
    position["stopped_early"] = stopped_early if isinstance(stopped_early, dict) else {}
    return position


def _read_position(run: RunFolder, earlier: bool = False) -> tuple[dict | None, list]:
    """(position, phase names) from progress.json, else the newest checkpoint (also when that is as new: a
    preemption's or a stop's checkpoint is exact; always where progress.json is an ``earlier`` session's: a
    new one resumes from the checkpoint), else metrics.json's meta."""
    config, tstate, progress = run.config, run.trainer_state, run.progress
    phases = [p["name"] for p in config["phases"]] if config else list((tstate or {}).get("phase_names") or [])
    total = config["total_steps"] if config else None
    pstep, pstatus = (progress or {}).get("global_step") or 0, (progress or {}).get("status")
    pindex = (progress or {}).get("phase_index")
    # (as new: a phase's end is saved as the next phase's step 0, after progress.json's last word on that phase)
    later_phase = isinstance(pindex, int) and isinstance(tstate, dict) and tstate.get("phase_index", 0) > pindex
    ckpt_newer = tstate is not None and isinstance(tstate.get("global_step"), int) and (
        tstate["global_step"] > pstep or (tstate["global_step"] == pstep and (
            pstatus in ("preempted", "stopped") or later_phase)))
    if progress and isinstance(progress.get("phase_index"), int) and not ckpt_newer and not earlier:
        position = {k: progress.get(k) for k in ("phase", "phase_index", "phase_step", "phase_steps", "global_step",
                                                 "total_steps")}
        return {**position, "source": PROGRESS}, list(progress.get("phases") or phases)
    if tstate is not None:
        phases = list(tstate.get("phase_names") or phases)
        steps_of = {p["name"]: p["steps"] for p in config["phases"]} if config else {}
        index = tstate.get("phase_index", 0)
        name = phases[index] if index < len(phases) else None
        return {"phase": name, "phase_index": index, "phase_step": tstate.get("phase_step"),
                "phase_steps": steps_of.get(name) if name else None, "global_step": tstate.get("global_step"),
                "total_steps": total, "source": f"checkpoint {run.newest.name}"}, phases
    if run.metrics is not None:
        return {"phase": None, "phase_index": len(phases), "phase_step": 0, "phase_steps": None,
                "global_step": run.meta.global_step, "total_steps": total, "source": METRICS}, phases
    return None, phases


def _checkpoint(run: RunFolder, now: float) -> dict | None:
    """The newest complete checkpoint, its age, and the ones kept; where the newest fails its manifest's sizes
    (a truncated file: a resume skips it), why, and the newest that passes them."""
    if run.newest is None:
        return None
    written = mtime(run.newest / TRAINER_STATE)
    out = {"name": run.newest.name, "path": str(run.newest),
           "global_step": (run.trainer_state or {}).get("global_step"), "time": written,
           "age_s": max(0.0, now - written) if written else None, "kept": [p.name for p in run.checkpoints]}
    check = verify_checkpoint(run.newest, hashes=False)  # (sizes only: status reads no checkpoint whole)
    if not check.ok:
        out["damaged"] = "; ".join(check.problems)
        out["usable"] = next((p.name for p in reversed(run.checkpoints[:-1]) if verify_checkpoint(p, hashes=False).ok),
                             None)
    return out


# -- speed and ETA ------------------------------------------------------------------------------------------
def _speed(run: RunFolder, state: str) -> dict:
    """images/s, data wait and lr: progress.json's, or the newest window metrics.json kept for an older run and for
    a finished one whose progress.json has none (a finished run started again validates without training)."""
    keys, last = ("images_per_s", "data_wait_frac", "lr"), run.meta.last_train_log
    window, prefix, source = run.progress or {}, "", PROGRESS if run.progress else None
    if last and (run.progress is None or (state == "finished" and all(finite(window.get(k)) is None for k in keys))):
        window, prefix, source = last[list(last)[-1]], "train/", f"{METRICS} (last window)"
    window = window if isinstance(window, dict) else {}
    return {**{k: finite(window.get(prefix + k)) for k in keys}, "source": source}


def _no_progress(run: RunFolder, state: str) -> str | None:
    """Why there is no progress.json to show (None: there is one, or it is unreadable: a warning says so). The
    trainer writes it when the first phase begins, before any checkpoint or metrics.json."""
    if run.progress is not None or run.progress_unreadable:
        return None
    if run.checkpoints or run.metrics is not None:
        return f"no {PROGRESS} (a run of a version before it, or the file was removed)"
    return ("none yet: starting (building the models, reading the data); written when the first phase begins"
            if state == "running" else "none: training never began (it failed or was stopped while starting)")


def _eta(run: RunFolder, config: dict | None, position: dict | None, speed: dict, processes: int | None,
         now: float) -> dict | None:
    """Seconds left in the phase and the run, counted from now (progress.json's ETAs were as of its writing);
    without the trainer's ETA, the steps left at the current speed."""
    progress = run.progress
    if not progress:
        return None
    run_s, phase_s = finite(progress.get("eta_run_s")), finite(progress.get("eta_phase_s"))
    age = progress_age(run, now) or 0.0
    if run_s is None and speed["images_per_s"] and config and processes and position:
        per_step = (config["batch_size"] or 0) * (config["grad_accum"] or 1) * processes
        left = (position.get("total_steps") or 0) - (position.get("global_step") or 0)
        run_s = left * per_step / speed["images_per_s"] if per_step and left >= 0 else None
    if run_s is None and phase_s is None:
        return None
    # the step time leaves the validations out: those left, at this session's mean (progress.json's val_s)
    val_s, (val_phase, val_run) = finite(progress.get("val_s")) or 0.0, validations_left(config, position)
    return eta_from_now(phase_s + val_phase * val_s if phase_s is not None else None,
                        run_s + val_run * val_s if run_s is not None else None, age, now)


# -- validation ---------------------------------------------------------------------------------------------
def _best(run: RunFolder, lpips: dict) -> dict | None:
    """The gan phase's best validation (the generator it keeps; the other phases keep their last one) by the
    metric it selects on (train.phases.<gan>.select_on; LPIPS before that key): progress.json's, else the newest
    checkpoint's stop rule, else the best of its gan validations (their LPIPS)."""
    pbest, tstate = (run.progress or {}).get("best"), run.trainer_state

    def label(metric: str) -> str:
        return "lpips (random backbone)" if metric == "lpips" and lpips["pretrained"] is False else metric

    if isinstance(pbest, dict) and finite(pbest.get("value")) is not None:
        return {"metric": label(str(pbest.get("metric") or "lpips")), "value": pbest["value"],
                "step": pbest.get("step"), "phase": pbest.get("phase"), "source": f"{PROGRESS} (phase step)"}
    if tstate is None:
        return None
    stop = tstate.get("stop") if isinstance(tstate.get("stop"), dict) else {}
    metric = label(str(stop.get("metric") or "lpips"))
    kinds = {p["name"]: p["kind"] for p in (run.config or {}).get("phases") or []}
    history = [h for h in tstate.get("history") or [] if isinstance(h, list) and len(h) == 3
               and finite(h[2]) is not None and kinds.get(h[0], h[0]) == "gan"]
    if finite(stop.get("best")) is not None:
        named = [h[0] for h in history if h[1] == stop.get("best_step")  # (the history holds LPIPS)
                 and (h[2] == stop["best"] or not metric.startswith("lpips"))]
        return {"metric": metric, "value": stop["best"], "step": stop.get("best_step"),
                "phase": named[-1] if named else None, "source": f"stop rule in {run.newest.name} (phase step)"}
    if history and metric.startswith("lpips"):  # (the history holds LPIPS)
        name, step, value = min(history, key=lambda h: h[2])
        return {"metric": metric, "value": value, "step": step, "phase": name,
                "source": f"validation history in {run.newest.name} (phase step)"}
    return None


def _lpips(run: RunFolder) -> dict:
    """The validation LPIPS network and whether its backbone is pretrained (None: unknown): metrics.json's meta
    says it, else config.yaml's loss keys (a random backbone's numbers are not LPIPS: a debug run's, offline)."""
    if run.meta.lpips:
        return {"network": run.meta.lpips.split(" (")[0], "pretrained": "RANDOM" not in run.meta.lpips.upper(),
                "source": METRICS}
    for path in (run.path / CONFIG, *([run.newest / CONFIG] if run.newest else [])):
        loss = (read_yaml(path) or {}).get("loss")
        if isinstance(loss, dict):
            pretrained = loss.get("lpips_pretrained", True) is not False
            return {"network": f"lpips-{loss.get('metric_net', 'alex')}", "pretrained": pretrained,
                    "source": str(path.relative_to(run.path))}
    return {"network": None, "pretrained": None, "source": None}


def _last_validation(run: RunFolder) -> tuple[dict | None, str | None]:
    """(per quality results, where they came from): progress.json's last validation, else metrics.json's."""
    last_val = (run.progress or {}).get("last_val")
    if isinstance(last_val, dict) and (last_val := _per_quality(last_val)):
        return last_val, PROGRESS
    if run.metrics is not None:
        return _per_quality({k: v for k, v in run.metrics.items() if k != "meta"}), METRICS
    return None, None


def _per_quality(results: dict) -> dict:
    """The entries of a validation's results that are {"jpeg": {...}, "restored": {...}} (another version's or a
    damaged file's other entries left out)."""
    return {q: r for q, r in results.items() if isinstance(r, dict)
            and all(isinstance(r.get(side, {}), dict) for side in ("jpeg", "restored"))}


def _write_errors(run: RunFolder) -> dict[str, int]:
    """The side writes that failed (write kind -> count) in the newest session: progress.json's ``write_errors``,
    else metrics.json's meta's (a run of a version before progress.json)."""
    errors = (run.progress or {}).get(WRITE_ERRORS)
    errors = errors if isinstance(errors, dict) else run.meta.write_errors
    return {str(k): n for k, n in (errors or {}).items() if isinstance(n, int) and n > 0}


def _elsewhere(run_dir: Path, configured: str) -> bool:
    """Whether config.yaml's train.run_dir names another folder than ``run_dir`` (a relative one: by its name)."""
    here, there = run_dir.resolve(), Path(configured).expanduser()
    return there.name != here.name or (there.is_absolute() and there.resolve() != here)


def _not_a_folder(path: Path) -> str:
    """What ``status FILE`` says (it said "no such folder" of a photo that was there): a file of a checkpoint or
    of a run (its generator file, its train.log) points at the run folder status takes."""
    folder = path.parent
    if (folder / TRAINER_STATE).is_file():
        folder = folder.parent.parent  # (run/checkpoints/step-N/model.safetensors)
        return f"{path} is a file of a checkpoint; status takes its run folder: dist-dejpeg status {folder}"
    what = "a generator file" if path.suffix == ".safetensors" else "a file"
    if any((folder / n).exists() for n in (CONFIG, PROGRESS, CHECKPOINTS)):
        return f"{path} is {what} of a run; status takes its run folder: dist-dejpeg status {folder}"
    return f"{path} is {what}, not a run folder; status takes the folder train.run_dir points at"


RUN_MARKERS = (CONFIG, PROGRESS, METRICS, LOCK, CHECKPOINTS)  # what makes a folder a run's


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds a run: one of RUN_MARKERS, where a metrics.json beside evaluate's tables alone is not
    one (an ``evaluate -o`` folder, listed as a run that never started)."""
    if is_evaluate_folder(path):
        return False
    return any((path / name).exists() for name in RUN_MARKERS)


def is_evaluate_folder(path: Path) -> bool:
    """An ``evaluate -o`` folder: its metrics.json and tables, none of a run's other files."""
    return ((path / METRICS).is_file() and (path / EVALUATE_CSV).is_file()
            and not any((path / name).exists() for name in RUN_MARKERS if name != METRICS))


def find_runs(paths: list[str]) -> list[Path]:
    """The folders ``status`` reports on: each path given, where a folder that is no run but holds runs (a
    sweep's ``runs/``) stands for the runs directly inside it, by name; each folder once, where first given."""
    found = []
    for path in map(Path, paths):
        inside = sorted(p for p in path.iterdir() if p.is_dir() and is_run_folder(p)) if (
            path.is_dir() and not is_run_folder(path) and not (path / TRAINER_STATE).is_file()) else []
        found += inside or [path]
    unique: dict[Path, Path] = {}
    for path in found:  # (one given twice, or by two names: once)
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


# -- the whole picture --------------------------------------------------------------------------------------
def run_status(run_dir: str | Path, now: float | None = None) -> dict:
    """Everything ``status`` shows, as a JSON-ready dict. Raises FileNotFoundError when ``run_dir`` does not
    exist, NotADirectoryError (saying what the file is) when it is a file. ``run_folder`` is False when the folder
    holds nothing of a run."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise NotADirectoryError(_not_a_folder(run_dir))
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no such folder: {run_dir}")
    now = time.time() if now is None else now
    run = read_folder(run_dir)
    try:
        return _status(run, now)
    except (TypeError, AttributeError, KeyError, ValueError):  # JSON of the wrong shape (another version, an edit)
        if run.progress is None:
            raise
        return _status(dataclasses.replace(run, progress=None, progress_unreadable=True), now)


def _status(run: RunFolder, now: float) -> dict:
    run_dir = run.path
    warnings = [f"{PROGRESS} is unreadable (not JSON, cut short, or fields of another shape)"] \
        if run.progress_unreadable else []
    if run.config is None and (run_dir / CONFIG).is_file():
        warnings.append(f"{CONFIG} is unreadable (not YAML, or cut short): the config lines are missing")
    state, why = judge(run, now)
    processes, config = _processes(run), run.config
    if config is not None:
        config["processes"] = processes
    position = _position(run, state)
    if run.partial:
        note = "half-written checkpoint folder(s) " + ", ".join(run.partial)
        warnings.append(note + (" (being written now, or left by a killed run)" if state == "running" else
                                " left by a killed run; the next start removes them"))
    speed, newer = _speed(run, state), newer_start(run)
    # (none after the last phase: progress.json's would say "0s" while the final validation takes minutes)
    training = state == "running" and not newer and not (position or {}).get("stage")
    eta = _eta(run, config, position, speed, processes, now) if training else None
    age = progress_age(run, now)
    if state == "running" and not newer and age is not None and age > STALE_S:
        warnings.append(f"the lock is held but {PROGRESS} has not changed for {duration(age)} "
                        f"(hung? a long validation?)")
    configured = (config or {}).get("run_dir")
    if configured and _elsewhere(run_dir, str(configured)):
        warnings.append(f"this folder is not the run's train.run_dir ({configured}): a copy, or moved; the run's "
                        f"command continues that folder (or starts anew there): add train.run_dir={run_dir} to "
                        f"continue this one")
    if newer and state != "running":
        warnings.append(f"the newest start (pid {run.lock['pid']}, since {run.lock.get('since') or '?'}) ended before "
                        f"its first phase began (stopped, or failed while starting: see its output); {PROGRESS} "
                        f"is the earlier session's")
    last_val, last_val_source = _last_validation(run)
    lpips = _lpips(run)
    if lpips["pretrained"] is False and (last_val or run.trainer_state):
        warnings.append(f"LPIPS here is {lpips['network']} with a RANDOM-init backbone (loss.lpips_pretrained=false): "
                        f"not real LPIPS, comparable only with runs measured the same way")
    elif "UNVERIFIED" in run.meta.lpips:  # (models/lpips.py: a backbone file that is not torchvision's)
        warnings.append(f"LPIPS here is {run.meta.lpips}: comparable only with runs measured with the same file")
    errors = _write_errors(run)
    if errors:
        warnings.append(f"side writes failed ({', '.join(f'{k} {n}' for k, n in errors.items())}; {WRITE_ERRORS} in "
                        f"{PROGRESS if isinstance((run.progress or {}).get(WRITE_ERRORS), dict) else METRICS}): those "
                        f"entries are missing (TensorBoard curves, images, train.log lines...); the run's log says "
                        f"why at the first of each (a full disk or quota?)")
    progress_out = None
    if run.progress is not None:
        keys = ("status", "reason", "time", "losses", "host", "pid", "slurm_job", WRITE_ERRORS)
        progress_out = {**{k: run.progress.get(k) for k in keys}, "age_s": age}
    has_generator = (run_dir / GENERATOR).is_file()
    return _clean({
        "run_dir": str(run_dir),
        "run_folder": is_run_folder(run_dir),
        "checked_at": now, "host": socket.gethostname(),
        "state": state, "why": why, "config": config, "position": position, "progress": progress_out,
        "progress_missing": _no_progress(run, state),
        "checkpoint": _checkpoint(run, now), "partial_checkpoints": run.partial, "lock": run.lock,
        "speed": speed, "eta": eta, "lpips": lpips, "best": _best(run, lpips), "last_val": last_val,
        "last_val_source": last_val_source, "sessions": session_summary(run.sessions),
        "finished_files": {METRICS: run.metrics is not None, GENERATOR: has_generator}, "warnings": warnings,
    })


