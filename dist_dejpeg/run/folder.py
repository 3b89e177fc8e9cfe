"""A run folder's files, each read once for ``status``: what the run wrote, tolerant of files that are missing,
half-written or damaged (they read as None). Pure reading: nothing is created, locked or written. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dist_dejpeg.run.files import read_json, read_jsonl
from dist_dejpeg.run.layout import (CONFIG, METRICS, PROGRESS, SESSIONS, TRAINER_STATE, MetricsMeta,
                                    list_checkpoints, partial_checkpoints)
from dist_dejpeg.run.lock import lock_status


@dataclass
class RunFolder:
    """What ``status`` reads from a run folder, each file once; missing or damaged files are None."""

    path: Path
    checkpoints: list[Path]  # complete ones, oldest first
    partial: list[str]  # names of .tmp-step-* folders
    trainer_state: dict | None  # the newest checkpoint's trainer_state.json
    config: dict | None  # config_summary of config.yaml (the run's, else the newest checkpoint's copy)
    progress: dict | None
    progress_unreadable: bool
    metrics: dict | None
    meta: MetricsMeta  # metrics.json's meta (empty without one)
    lock: dict  # lock_status
    sessions: list[dict] = field(default_factory=list)  # sessions.jsonl's lines (train/sessions.py), oldest first

    @property
    def newest(self) -> Path | None:
        return self.checkpoints[-1] if self.checkpoints else None


def read_folder(run_dir: Path) -> RunFolder:
    """Everything at once, so the verdict and the numbers come from the same look at a live folder."""
    checkpoints = list_checkpoints(run_dir)
    newest = checkpoints[-1] if checkpoints else None
    config_path = run_dir / CONFIG
    cfg = read_yaml(config_path)
    if cfg is None and newest is not None:
        config_path = newest / CONFIG
        cfg = read_yaml(config_path)
    progress, metrics = read_json(run_dir / PROGRESS), read_json(run_dir / METRICS)
    return RunFolder(
        path=run_dir, checkpoints=checkpoints, partial=[p.name for p in partial_checkpoints(run_dir)],
        trainer_state=read_json(newest / TRAINER_STATE) if newest else None,
        config=config_summary(cfg, config_path) if cfg is not None else None,
        progress=progress, progress_unreadable=progress is None and (run_dir / PROGRESS).exists(),
        metrics=metrics, meta=MetricsMeta.from_dict((metrics or {}).get("meta")), lock=lock_status(run_dir),
        sessions=read_jsonl(run_dir / SESSIONS))


def session_summary(sessions: list[dict]) -> dict | None:
    """How many training sessions sessions.jsonl records and the last one's commit and torch (None: not said, or
    of another shape), and ``config_changed``: [{"session": N (1: the first), "keys": {key: [old, new]}}] for
    each session that resumed with another config; None without a line (a run of a version before the file, or
    one that never started)."""
    if not sessions:
        return None
    last = sessions[-1]
    versions = last.get("versions") if isinstance(last.get("versions"), dict) else {}
    said = (last.get("commit"), versions.get("torch"))
    commit, torch = (v if isinstance(v, str) else None for v in said)
    changed = [{"session": n, "keys": line["config_changed"]} for n, line in enumerate(sessions, 1)
               if isinstance(line.get("config_changed"), dict) and line["config_changed"]]
    return {"count": len(sessions), "last_commit": commit, "last_torch": torch, "config_changed": changed}


def config_summary(cfg: dict, source: Path) -> dict:
    """The keys ``status`` shows, from the config as a plain dict: not through dist_dejpeg.config, so a config
    written by an older or newer version (unknown or missing keys) still reads."""
    data, model, train = (cfg.get(k) if isinstance(cfg.get(k), dict) else {} for k in ("data", "model", "train"))
    phases_cfg = train.get("phases") if isinstance(train.get("phases"), dict) else {}
    order = train.get("order") if isinstance(train.get("order"), list) else list(phases_cfg)
    phases = []
    for name in order:
        p = phases_cfg.get(name) if isinstance(phases_cfg.get(name), dict) else {}
        phases.append({"name": name, "kind": p.get("kind") or name, "steps": p.get("steps"),
                       "val_every": p.get("val_every") or train.get("val_every")})  # (a phase's 0: train's)
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


def read_yaml(path: Path) -> dict | None:
    """A YAML mapping, or None when the file is missing, damaged or not a mapping (never raises)."""
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
    except Exception:  # noqa: BLE001 - a damaged file is reported as missing, not a crash of `status`
        return None
    return data if isinstance(data, dict) else None
