"""A run's state as text for people: durations (the trainer's log lines and ``status`` share them) and the
block ``dist-dejpeg status`` prints. Torch-free."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from dist_dejpeg.run.layout import CONFIG, PROGRESS
from dist_dejpeg.run.sweep import differs_column


CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: no name or model metadata needs one


def visible(text) -> str:
    """``text`` for a terminal line, each control character as a visible escape (``\\x1b``): a photo named with
    ESC sequences (or a model file's metadata) would otherwise clear the screen, retitle it or forge lines."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def duration(seconds: float | None) -> str:
    """``5s``, ``2m05s``, ``3h01m``, ``2d03h`` (days only beyond 24 h); ``?`` when unknown or not finite."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def eta_text(eta: dict | None, key: str, unknown: str = "?") -> str:
    """The time left in the phase or run (``key``) of ``status``'s eta, or by how long the ETA progress.json gave
    has passed (run/verdict.py's eta_from_now)."""
    overdue, left = ((eta or {}).get("overdue_s") or {}).get(key), (eta or {}).get(f"{key}_s")
    return f"overdue {duration(overdue)}" if overdue is not None else unknown if left is None else duration(left)


def window_line(name: str, phase_step: int, total: int, losses: dict, scalars: dict, eta_phase_s: float,
                eta_run_s: float) -> str:
    """The trainer's log line for one window (``scalars``: train/images_per_s, train/data_wait_frac, train/lr,
    train/critic_lr where known)::

        gen 300/1000 (30%) | gen/l1 0.0231 gen/lpips 0.0052 | 31.2 img/s | data wait 4% | lr 1.8e-03 | ETA phase ..."""
    parts = [f"{name} {phase_step}/{total} ({100 * phase_step // max(total, 1)}%)",
             " ".join(f"{k} {v:.4g}" for k, v in sorted(losses.items()) if "acc" not in k)]
    if scalars.get("train/images_per_s") is not None:
        parts.append(f"{scalars['train/images_per_s']:.1f} img/s")
    if scalars.get("train/data_wait_frac") is not None:
        parts.append(f"data wait {100 * scalars['train/data_wait_frac']:.0f}%")
    critic_lr = scalars.get("train/critic_lr")  # a gan phase's critic: its own lr
    parts.append(f"lr {scalars.get('train/lr', 0):.2e}" + ("" if critic_lr is None else f", critic {critic_lr:.2e}"))
    parts.append(f"ETA phase {duration(eta_phase_s)}, run {duration(eta_run_s)}")
    return " | ".join(p for p in parts if p)


def number(value, fmt: str = ".4g") -> str:
    return "?" if value is None else format(value, fmt)


def format_status(status: dict) -> str:
    """A compact block for people (about a dozen lines), from :func:`dist_dejpeg.run.status.run_status`."""
    s = status
    cfg, pos = s.get("config") or {}, s.get("position") or {}
    name = cfg.get("name") or Path(s["run_dir"]).name
    lines = [f"run        {s['run_dir']} ({name}): {s['state'].upper()} - {s['why']}"]
    lines += config_lines(cfg, pos)
    if pos:
        count = len(cfg.get("phases") or []) or "?"
        where = (f"phase {pos['phase']} ({(pos.get('phase_index') or 0) + 1}/{count}) "
                 f"step {pos.get('phase_step')}/{number(pos.get('phase_steps'), '')}, "
                 if pos.get("phase") else f"all phases done, {pos['stage'] + ', ' if pos.get('stage') else ''}")
        lines.append(f"position   {where}global step {pos.get('global_step')}/{number(pos.get('total_steps'), '')} "
                     f"(from {pos.get('source')})")
    prog, sp = s.get("progress"), s.get("speed") or {}
    parts = [f"updated {duration(prog['age_s'])} ago ({prog.get('status')})" if prog else
             s.get("progress_missing") or f"no {PROGRESS}"]
    speed = []  # only the numbers known (a finished run started again trains no window: metrics.json's last, or none)
    if sp.get("images_per_s") is not None:
        speed.append(f"{sp['images_per_s']:.1f} images/s")
    if sp.get("data_wait_frac") is not None:
        speed.append(f"data wait {sp['data_wait_frac'] * 100:.0f}%")
    if sp.get("lr") is not None:
        speed.append(f"lr {sp['lr']:.3g}")
    if speed and sp.get("source") != PROGRESS:
        speed.append(f"from {sp['source']}")
    lines.append("progress   " + " | ".join(parts + speed))
    eta = s.get("eta")
    if eta:
        at = time.strftime("%Y-%m-%d %H:%M", time.localtime(eta["finish_at"])) if eta.get("finish_at") else "?"
        lines.append(f"eta        phase {eta_text(eta, 'phase')} | run {eta_text(eta, 'run')} " +
                     (f"(the ETA {PROGRESS} gave has passed: slower than its last window said, a busy machine or a "
                      f"long validation, or stuck)" if "run" in (eta.get("overdue_s") or {}) else f"(about {at})"))
    ck = s.get("checkpoint")
    behind = (ck and s["state"] in ("crashed or killed", "stopped", "preempted")
              and isinstance(ck.get("global_step"), int) and isinstance(pos.get("global_step"), int)
              and ck["global_step"] < pos["global_step"])
    lines.append((f"checkpoint {ck['name']}, {duration(ck['age_s'])} ago ({len(ck['kept'])} kept)"
                  + (f": the same command resumes there, at global step {ck['global_step']}" if behind else ""))
                 if ck else "checkpoint none yet")
    if ck and ck.get("damaged"):
        usable = f"resuming takes {ck['usable']}" if ck.get("usable") else "no older one passes its sizes either"
        lines.append(f"           DAMAGED ({str(ck['damaged'])[:160]}): {usable}")
    lines.append(f"lock       {s['lock']['detail']}")
    if sessions := s.get("sessions"):  # (sessions.jsonl: a run resumed after a git pull has several commits)
        lines.append(f"sessions   {sessions['count']}, the last at commit {sessions.get('last_commit') or '?'}, "
                     f"torch {sessions.get('last_torch') or '?'}")
        for change in sessions.get("config_changed") or []:  # (the values that trained each part of the run)
            keys = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" if isinstance(v, list) and len(v) == 2 else k
                             for k, v in change["keys"].items())
            lines.append(f"           config changed in session {change['session']}: {keys}")
    lines += result_lines(s)
    losses = (prog or {}).get("losses")
    if isinstance(losses, dict) and losses:
        lines.append("losses     " + " | ".join(f"{k} {number(v, '.4g')}" for k, v in sorted(losses.items())))
    lines += [f"warning    {warning}" for warning in s.get("warnings") or []]
    return "\n".join(lines)


def format_table(statuses: list[dict]) -> str:
    """One line per run (``status RUN RUN ...``, a sweep's folder): state, position, speed, ETA, the gain at the
    lowest validated quality, the best validation, how many warnings ``status RUN`` would show, and the config
    values that differ between the runs (run/sweep.py: a sweep's runs told apart; a few, by short names); a path
    that is no run (``{"error": ...}``) is left to the caller to say."""
    head = ("run", "state", "phase", "step", "images/s", "eta", "updated", "last val gain", "best", "warnings",
            "config differs")
    rows = []
    for s, differs in zip(statuses, differs_column(statuses)):
        if "error" in s:
            continue
        pos, prog, best = s.get("position") or {}, s.get("progress") or {}, s.get("best")
        phase = (f"{pos['phase']} {pos.get('phase_step')}/{number(pos.get('phase_steps'), '')}" if pos.get("phase")
                 else pos.get("stage") or ("done" if pos else "-"))
        step = f"{pos.get('global_step')}/{number(pos.get('total_steps'), '')}" if pos else "-"
        speed = (s.get("speed") or {}).get("images_per_s")
        rows.append((s["run_dir"], s["state"].upper(), phase, step, "-" if speed is None else f"{speed:.1f}",
                     eta_text(s.get("eta"), "run", "-"),
                     f"{duration(prog['age_s'])} ago" if prog.get("age_s") is not None else "-",
                     _lowest_gain(s.get("last_val")),
                     f"{best.get('metric', 'lpips').upper()} {best['value']:.4f} @ {best.get('phase') or 'step'} "
                     f"{best['step']}" if best else "-", str(len(s.get("warnings") or [])), visible(differs)))
    if not any(r[-1] for r in rows):  # (one run, or runs of one config)
        head, rows = head[:-1], [r[:-1] for r in rows]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]) if rows else ""


def _lowest_gain(val: dict | None) -> str:
    """'q10 +0.86 dB': the RGB PSNR gain of the last validation at its lowest quality."""
    qualities = sorted((int(k[1:]), k) for k in (val or {}) if k[1:].isdigit())
    if not qualities:
        return "-"
    q = val[qualities[0][1]]
    gain = ((q.get("restored") or {}).get("psnr") or math.nan) - ((q.get("jpeg") or {}).get("psnr") or math.nan)
    return f"q{qualities[0][0]} {gain:+.2f} dB" if math.isfinite(gain) else f"q{qualities[0][0]} ?"


def config_lines(cfg: dict, pos: dict) -> list[str]:
    """The config line and the phases line (each phase marked done, now, or stopped early)."""
    if not cfg:
        return [f"config     no {CONFIG}"]
    processes = f" x {cfg['processes']} processes" if cfg.get("processes") else ""
    accum = f" x accum {cfg['grad_accum']}" if (cfg.get("grad_accum") or 1) > 1 else ""
    encoder = f"{cfg.get('encoder')} ({'ImageNet' if cfg.get('pretrained') else 'random init'})"
    done, parts = set(pos.get("phases_done") or []), []
    for p in cfg.get("phases") or []:
        mark = " done" if p["name"] in done else (" <- now" if p["name"] == pos.get("phase") else "")
        early = (pos.get("stopped_early") or {}).get(p["name"])
        parts.append(f"{p['name']} {p['steps']}{mark}" + (f" (stopped early at {early})" if early else ""))
    return [f"config     data {cfg.get('data_root')} | batch {cfg.get('batch_size')}{accum}{processes} | "
            f"crop {cfg.get('crop')} | precision {cfg.get('mixed_precision')} | encoder {encoder}",
            f"phases     {' | '.join(parts)}  (total {cfg.get('total_steps')} steps)"]


def result_lines(s: dict) -> list[str]:
    """The best validation and the last one, per quality (jpeg -> restored)."""
    lines, best, val = [], s.get("best"), s.get("last_val")
    if best:
        where = f" at {best['phase'] + ' ' if best.get('phase') else ''}step {best['step']}"
        lines.append(f"best       validation {best.get('metric', 'lpips').upper()} {best['value']:.4f}{where}")
    if val:
        parts = []
        # a random-init backbone's numbers are not LPIPS: said where they are shown (status.py's "lpips")
        name = "LPIPS(random)" if (s.get("lpips") or {}).get("pretrained") is False else "LPIPS"
        for q in sorted(val, key=lambda k: int(k[1:]) if k[1:].isdigit() else 0):
            j, r = val[q].get("jpeg") or {}, val[q].get("restored") or {}
            parts.append(f"{q} PSNR {number(j.get('psnr'), '.2f')}->{number(r.get('psnr'), '.2f')} "
                         f"{name} {number(j.get('lpips'), '.4f')}->{number(r.get('lpips'), '.4f')}")
        lines.append(f"last val   {' | '.join(parts)} (jpeg->restored, {s.get('last_val_source')})")
    return lines
