"""Where a run stands, read from its folder alone: ``dist-dejpeg status RUN_DIR [--json]``.

    dist-dejpeg status runs/div2k           # a dozen lines: verdict, config, position, speed, ETA, metrics
    dist-dejpeg status runs/div2k --json    # the same as one JSON object, for scripts

Pure reading: nothing in the run folder is created, locked or written, so it is safe on a live run (taking
the run's flock even for a moment would make a trainer starting at that moment fail with "busy"). What it
reads: ``config.yaml``, ``progress.json`` (rank 0 rewrites it at every log window, validation, phase boundary
and at the end; older runs have none), ``checkpoints/step-*/trainer_state.json`` (and ``.tmp-step-*`` left by
a killed run), ``metrics.json`` and ``generator.safetensors`` (written at the end), and ``.lock``.

Whether the lock is held is read without locking: the ``.lock`` file's inode among the FLOCK entries of
``/proc/locks`` (Linux; the kernel drops the flock when the holder dies, so a killed run shows none), and,
when the file names this host as the holder, whether that pid is alive. A holder on another host cannot be
seen from here on most shared filesystems (``/proc/locks`` lists this node's locks only); the lock is then
"unknown" and the verdict falls back on how recently ``progress.json`` was updated.

Verdict (``state``), first match wins:
    running            the lock is held (or, held on another host and unverifiable, progress.json is fresh)
    finished           progress.json says finished, or metrics.json and generator.safetensors are there
    stopped            progress.json says a non-finite loss stopped it (a checkpoint was kept; --resume)
    preempted          progress.json says preempted (SIGUSR1/SIGTERM; the same command continues it)
    crashed or killed  started (progress "running", checkpoints or config.yaml) but the lock is not held
    not started        no config.yaml, no checkpoint, no progress
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
from pathlib import Path

from dist_dejpeg.run.files import read_json
from dist_dejpeg.run.layout import (CONFIG, GENERATOR, LOCK, METRICS, PROGRESS, TENSORBOARD, TRAINER_STATE,
                                    CHECKPOINTS, list_checkpoints, partial_checkpoints)
from dist_dejpeg.run.lock import lock_status

STALE_S = 900.0  # progress older than this while the lock cannot be checked: judged not running
STATES = ("running", "finished", "stopped", "preempted", "crashed or killed", "not started")


# -- reading ------------------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict | None:
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
    except Exception:  # noqa: BLE001 - a damaged file is reported as missing, not a crash of `status`
        return None
    return data if isinstance(data, dict) else None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


# -- config -------------------------------------------------------------------------------------------------
def _config_summary(cfg: dict, source: Path) -> dict:
    data, model, train = (cfg.get(k) if isinstance(cfg.get(k), dict) else {} for k in ("data", "model", "train"))
    phases_cfg = train.get("phases") if isinstance(train.get("phases"), dict) else {}
    order = train.get("order") if isinstance(train.get("order"), list) else list(phases_cfg)
    phases = []
    for name in order:
        p = phases_cfg.get(name) if isinstance(phases_cfg.get(name), dict) else {}
        phases.append({"name": name, "kind": p.get("kind") or name, "steps": p.get("steps")})
    run_dir = train.get("run_dir")
    return {
        "source": str(source),
        "name": Path(run_dir).name if run_dir else None,
        "run_dir": run_dir,
        "data_root": data.get("root"),
        "backend": data.get("backend"),
        "batch_size": data.get("batch_size"),
        "grad_accum": train.get("grad_accum"),
        "crop": data.get("crop"),
        "mixed_precision": train.get("mixed_precision"),
        "deepspeed_stage": train.get("deepspeed_stage"),
        "encoder": model.get("encoder"),
        "pretrained": model.get("pretrained"),
        "phases": phases,
        "total_steps": sum(p["steps"] for p in phases if isinstance(p["steps"], int)),
        "log_every": train.get("log_every"),
        "ckpt_every": train.get("ckpt_every"),
    }


# -- the whole picture --------------------------------------------------------------------------------------
def _finite(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _clean(obj):
    """JSON-safe: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


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
        return "finished", "progress.json says finished"
    if finished_files and pstatus in (None, "running"):
        return "finished", "metrics.json and generator.safetensors are written"
    if pstatus == "stopped":
        return "stopped", f"a non-finite loss stopped it ({reason}); a checkpoint is kept, --resume continues"
    if pstatus == "preempted":
        return "preempted", f"{reason}; the same command continues it from the checkpoint"
    if lock_held is None and (pstatus == "running" or (progress is None and (has_config or has_checkpoints))):
        what = "progress.json" if progress is not None else "the run folder"
        if progress_age_s is not None and progress_age_s < stale_s:
            return "running", (f"the lock cannot be checked from this host; {what} was updated "
                                f"{_duration(progress_age_s)} ago")
        if progress_age_s is not None:
            return "crashed or killed", (f"the lock cannot be checked from this host and {what} has not "
                                         f"changed for {_duration(progress_age_s)}")
        return "crashed or killed", "the lock cannot be checked from this host and nothing tells its age (guess)"
    if pstatus == "running" or has_checkpoints or has_config:
        return "crashed or killed", "the run started but its lock is not held (the process is gone)"
    return "not started", "no config.yaml, checkpoint or progress.json"


def run_status(run_dir: str | Path, now: float | None = None) -> dict:
    """Everything ``status`` shows, as a JSON-ready dict. Raises FileNotFoundError when ``run_dir`` is not a
    folder. ``run_folder`` is False when the folder holds nothing of a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no such folder: {run_dir}")
    now = time.time() if now is None else now
    warnings: list[str] = []

    checkpoints, partial = list_checkpoints(run_dir), [p.name for p in partial_checkpoints(run_dir)]
    newest = checkpoints[-1] if checkpoints else None
    tstate = read_json(newest / TRAINER_STATE) if newest else None
    config_path = run_dir / CONFIG
    cfg = _read_yaml(config_path)
    if cfg is None and newest is not None:
        config_path = newest / CONFIG
        cfg = _read_yaml(config_path)
    config = _config_summary(cfg, config_path) if cfg is not None else None
    progress = read_json(run_dir / PROGRESS)
    if (run_dir / PROGRESS).exists() and progress is None:
        warnings.append("progress.json is unreadable")
    metrics = read_json(run_dir / METRICS)
    finished_files = metrics is not None and (run_dir / GENERATOR).is_file()
    lock = lock_status(run_dir)
    ptime = _finite((progress or {}).get("time"))
    progress_age = max(0.0, now - ptime) if ptime is not None else None
    if finished_files and ptime is not None and (progress or {}).get("status") == "running":
        # progress.json written after the end: the finished run was started again (e.g. with more steps)
        finished_files = ptime <= (_mtime(run_dir / METRICS) or 0.0) + 1.0
    activity_age = progress_age
    if progress is None:  # an older run: the newest of its checkpoint, TensorBoard events and config.yaml
        times = [_mtime(p) for p in [*(run_dir / TENSORBOARD).glob("events.out.tfevents.*"), run_dir / CONFIG,
                                     *([newest / TRAINER_STATE] if newest else [])]]
        times = [t for t in times if t is not None]
        activity_age = max(0.0, now - max(times)) if times else None
    run_folder = any((run_dir / n).exists() for n in (CONFIG, PROGRESS, METRICS, LOCK, CHECKPOINTS))

    state, why = verdict(has_config=(run_dir / CONFIG).is_file(), progress=progress,
                         progress_age_s=activity_age, lock_held=lock["held"], finished_files=finished_files,
                         has_checkpoints=bool(checkpoints))
    if state == "crashed or killed" and not progress and tstate:
        why += "; without progress.json a preemption or a non-finite-loss stop looks the same"

    # processes: the checkpoint holds one loader_<rank>.json per rank; metrics.json's meta says it too
    processes = None
    meta = (metrics or {}).get("meta") if isinstance((metrics or {}).get("meta"), dict) else {}
    if isinstance(meta.get("processes"), int):
        processes = meta["processes"]
    elif newest is not None:
        ranks = list(newest.glob("loader_*.json"))
        processes = len(ranks) or None
    if config is not None:
        config["processes"] = processes

    # position: progress.json, else the newest checkpoint, else metrics.json's meta
    phases = [p["name"] for p in config["phases"]] if config else list((tstate or {}).get("phase_names") or [])
    steps_of = {p["name"]: p["steps"] for p in config["phases"]} if config else {}
    position = None
    pstep, pstatus = (progress or {}).get("global_step") or 0, (progress or {}).get("status")
    ckpt_newer = tstate is not None and isinstance(tstate.get("global_step"), int) and (
        tstate["global_step"] > pstep or (tstate["global_step"] == pstep and pstatus in ("preempted", "stopped")))
    if progress and isinstance(progress.get("phase_index"), int) and not ckpt_newer:
        phases = list(progress.get("phases") or phases)
        position = {k: progress.get(k) for k in ("phase", "phase_index", "phase_step", "phase_steps", "global_step",
                                                 "total_steps")}
        position["source"] = "progress.json"
    elif tstate is not None:  # also when the checkpoint is as new (a preemption's or a stop's checkpoint is exact)
        phases = list(tstate.get("phase_names") or phases)
        index = tstate.get("phase_index", 0)
        name = phases[index] if index < len(phases) else None
        position = {"phase": name, "phase_index": index, "phase_step": tstate.get("phase_step"),
                    "phase_steps": steps_of.get(name) if name else None, "global_step": tstate.get("global_step"),
                    "total_steps": config["total_steps"] if config else None, "source": f"checkpoint {newest.name}"}
    elif metrics is not None:
        position = {"phase": None, "phase_index": len(phases), "phase_step": 0, "phase_steps": None,
                    "global_step": meta.get("global_step"), "total_steps": config["total_steps"] if config else None,
                    "source": "metrics.json"}
    if position is not None:
        index = position["phase_index"] if isinstance(position["phase_index"], int) else 0
        if state == "finished":
            index = len(phases)
            position.update(phase=None, phase_index=index)
        position["phases_done"] = phases[:index]
        stopped_early = (tstate or {}).get("stopped_early") or meta.get("stopped_early") or {}
        position["stopped_early"] = stopped_early if isinstance(stopped_early, dict) else {}

    checkpoint = None
    if newest is not None:
        written = _mtime(newest / TRAINER_STATE)
        checkpoint = {"name": newest.name, "path": str(newest), "global_step": (tstate or {}).get("global_step"),
                      "time": written, "age_s": max(0.0, now - written) if written else None,
                      "kept": [p.name for p in checkpoints]}
    if partial:
        note = "half-written checkpoint folder(s) " + ", ".join(partial)
        warnings.append(note + (" (being written now, or left by a killed run)" if state == "running" else
                                " left by a killed run; the next start removes them"))

    speed = {"images_per_s": _finite((progress or {}).get("images_per_s")),
             "data_wait_frac": _finite((progress or {}).get("data_wait_frac")),
             "lr": _finite((progress or {}).get("lr")), "source": "progress.json" if progress else None}
    if progress is None:  # an older run: the newest window metrics.json kept, if any
        last = meta.get("last_train_log") if isinstance(meta.get("last_train_log"), dict) else {}
        if last:
            window = last[list(last)[-1]] if isinstance(last[list(last)[-1]], dict) else {}
            speed = {"images_per_s": _finite(window.get("train/images_per_s")),
                     "data_wait_frac": _finite(window.get("train/data_wait_frac")),
                     "lr": _finite(window.get("train/lr")), "source": "metrics.json (last window)"}

    eta = None
    if state == "running" and progress:
        run_s, phase_s = _finite(progress.get("eta_run_s")), _finite(progress.get("eta_phase_s"))
        age = progress_age or 0.0
        if run_s is None and speed["images_per_s"] and config and processes and position:
            per_step = (config["batch_size"] or 0) * (config["grad_accum"] or 1) * processes
            left = (position.get("total_steps") or 0) - (position.get("global_step") or 0)
            run_s = left * per_step / speed["images_per_s"] if per_step and left >= 0 else None
        if run_s is not None or phase_s is not None:
            eta = {"phase_s": max(0.0, phase_s - age) if phase_s is not None else None,
                   "run_s": max(0.0, run_s - age) if run_s is not None else None}
            eta["finish_at"] = now + eta["run_s"] if eta["run_s"] is not None else None
    if state == "running" and progress_age is not None and progress_age > STALE_S:
        warnings.append(f"the lock is held but progress.json has not changed for {_duration(progress_age)} "
                        f"(hung? a long validation?)")

    best = None
    pbest = (progress or {}).get("best")
    if isinstance(pbest, dict) and _finite(pbest.get("value")) is not None:
        best = {"metric": pbest.get("metric", "lpips"), "value": pbest["value"], "step": pbest.get("step"),
                "phase": pbest.get("phase"), "source": "progress.json (phase step)"}
    elif tstate is not None:
        stop = tstate.get("stop") if isinstance(tstate.get("stop"), dict) else {}
        history = [h for h in tstate.get("history") or [] if isinstance(h, list) and len(h) == 3
                   and _finite(h[2]) is not None]
        if _finite(stop.get("best")) is not None:
            named = [h[0] for h in history if h[2] == stop["best"] and h[1] == stop.get("best_step")]
            best = {"metric": "lpips", "value": stop["best"], "step": stop.get("best_step"),
                    "phase": named[-1] if named else None, "source": f"stop rule in {newest.name} (phase step)"}
        elif history:
            name, step, value = min(history, key=lambda h: h[2])
            best = {"metric": "lpips", "value": value, "step": step, "phase": name,
                    "source": f"validation history in {newest.name} (phase step)"}

    last_val, last_val_source = None, None
    if isinstance((progress or {}).get("last_val"), dict) and progress["last_val"]:
        last_val, last_val_source = progress["last_val"], "progress.json"
    elif metrics is not None:
        last_val = {k: v for k, v in metrics.items() if k != "meta" and isinstance(v, dict)}
        last_val_source = "metrics.json"

    progress_out = None
    if progress is not None:
        progress_out = {k: progress.get(k) for k in ("status", "reason", "time", "losses", "host", "pid", "slurm_job")}
        progress_out["age_s"] = progress_age

    out = {
        "run_dir": str(run_dir), "run_folder": run_folder, "checked_at": now, "host": socket.gethostname(),
        "state": state, "why": why, "config": config, "position": position, "progress": progress_out,
        "checkpoint": checkpoint, "partial_checkpoints": partial, "lock": lock, "speed": speed, "eta": eta,
        "best": best, "last_val": last_val, "last_val_source": last_val_source,
        "finished_files": {METRICS: metrics is not None, GENERATOR: (run_dir / GENERATOR).is_file()},
        "warnings": warnings,
    }
    return _clean(out)


# -- text ---------------------------------------------------------------------------------------------------
def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _num(value, fmt: str = ".4g") -> str:
    return "?" if value is None else format(value, fmt)


def format_status(status: dict) -> str:
    """A compact block for people (about a dozen lines)."""
    s, lines = status, []
    cfg, pos, lock = s.get("config") or {}, s.get("position") or {}, s["lock"]
    name = cfg.get("name") or Path(s["run_dir"]).name
    lines.append(f"run        {s['run_dir']} ({name}): {s['state'].upper()} - {s['why']}")
    if cfg:
        processes = f" x {cfg['processes']} processes" if cfg.get("processes") else ""
        accum = f" x accum {cfg['grad_accum']}" if (cfg.get("grad_accum") or 1) > 1 else ""
        encoder = f"{cfg.get('encoder')} ({'ImageNet' if cfg.get('pretrained') else 'random init'})"
        lines.append(f"config     data {cfg.get('data_root')} | batch {cfg.get('batch_size')}{accum}{processes} | "
                     f"crop {cfg.get('crop')} | precision {cfg.get('mixed_precision')} | encoder {encoder}")
        done = set(pos.get("phases_done") or [])
        parts = []
        for p in cfg.get("phases") or []:
            mark = " done" if p["name"] in done else (" <- now" if p["name"] == pos.get("phase") else "")
            early = (pos.get("stopped_early") or {}).get(p["name"])
            parts.append(f"{p['name']} {p['steps']}{mark}" + (f" (stopped early at {early})" if early else ""))
        lines.append(f"phases     {' | '.join(parts)}  (total {cfg.get('total_steps')} steps)")
    else:
        lines.append("config     no config.yaml")
    if pos:
        count = len(cfg.get("phases") or []) or "?"
        where = (f"phase {pos['phase']} ({(pos.get('phase_index') or 0) + 1}/{count}) "
                 f"step {pos.get('phase_step')}/{pos.get('phase_steps') or '?'}, "
                 if pos.get("phase") else "all phases done, ")
        lines.append(f"position   {where}global step {pos.get('global_step')}/{pos.get('total_steps') or '?'} "
                     f"(from {pos.get('source')})")
    prog = s.get("progress")
    sp = s.get("speed") or {}
    if prog or sp.get("images_per_s") is not None:
        wait = f"{sp['data_wait_frac'] * 100:.0f}%" if sp.get("data_wait_frac") is not None else "?"
        updated = f"updated {_duration(prog['age_s'])} ago ({prog.get('status')}) | " if prog else ""
        lines.append(f"progress   {updated}{_num(sp.get('images_per_s'), '.1f')} images/s | data wait {wait} | "
                     f"lr {_num(sp.get('lr'), '.3g')}")
    else:
        lines.append("progress   no progress.json (an older run)")
    eta = s.get("eta")
    if eta:
        at = time.strftime("%Y-%m-%d %H:%M", time.localtime(eta["finish_at"])) if eta.get("finish_at") else "?"
        lines.append(f"eta        phase {_duration(eta.get('phase_s'))} | run {_duration(eta.get('run_s'))} "
                     f"(about {at})")
    ck = s.get("checkpoint")
    lines.append(f"checkpoint {ck['name']}, {_duration(ck['age_s'])} ago ({len(ck['kept'])} kept)" if ck
                 else "checkpoint none yet")
    lines.append(f"lock       {lock['detail']}")
    best = s.get("best")
    if best:
        where = f" at {best['phase'] + ' ' if best.get('phase') else ''}step {best['step']}"
        lines.append(f"best       validation {best.get('metric', 'lpips').upper()} {best['value']:.4f}{where}")
    val = s.get("last_val")
    if val:
        parts = []
        for q in sorted(val, key=lambda k: int(k[1:]) if k[1:].isdigit() else 0):
            j, r = val[q].get("jpeg") or {}, val[q].get("restored") or {}
            parts.append(f"{q} PSNR {_num(j.get('psnr'), '.2f')}->{_num(r.get('psnr'), '.2f')} "
                         f"LPIPS {_num(j.get('lpips'), '.4f')}->{_num(r.get('lpips'), '.4f')}")
        lines.append(f"last val   {' | '.join(parts)} (jpeg->restored, {s.get('last_val_source')})")
    losses = (prog or {}).get("losses")
    if isinstance(losses, dict) and losses:
        lines.append("losses     " + " | ".join(f"{k} {_num(v, '.4g')}" for k, v in sorted(losses.items())))
    for warning in s.get("warnings") or []:
        lines.append(f"warning    {warning}")
    return "\n".join(lines)


# -- command ------------------------------------------------------------------------------------------------
def _status(args: argparse.Namespace) -> int:
    try:
        status = run_status(args.run_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not status["run_folder"]:
        print(f"error: {args.run_dir} is not a run folder (no config.yaml, checkpoints/, progress.json, "
              f"metrics.json or .lock); give the folder a run's train.run_dir points at", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("status", help="where a run stands, read from its folder (safe on a live run)")
    p.add_argument("run_dir", help="the run folder (train.run_dir)")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    p.set_defaults(func=_status)
    return p
