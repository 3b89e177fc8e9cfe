"""The run folder's ``sessions.jsonl``: one JSON line per training session, appended by rank 0 at its start (after
the run folder is claimed and a resume has chosen its checkpoint), so that a run records the code and libraries
that trained each part of it: a run resumed after a ``git pull`` or a library upgrade keeps every session's, and
a run that crashed or was preempted has its line (the generator file's ``code`` is written at the end alone).

Each line (:data:`SESSION_KEYS`): ``time`` (local, ISO 8601 with its offset), ``code`` (code_version's, as the
generator file's ``code``) and ``commit`` (source_commit's: "-dirty" where the checkout was edited; null outside
a git checkout), ``versions`` (python, dist_dejpeg, torch with its CUDA build and cuDNN where the run is on CUDA,
timm, accelerate, numpy, Pillow with its libjpeg: ``libjpeg`` is the libjpeg API version Pillow reports, "6.2"
for libjpeg-turbo too, whose own version is ``libjpeg_turbo``; safetensors, lpips; deepspeed where the run uses
ZeRO, DALI where its loader is imported), ``host``, ``pid``, ``slurm_job``, ``processes``, ``device``, ``gpu``,
``mixed_precision``, ``deepspeed_stage``, ``start_step`` (0, or the resumed checkpoint's global step),
``resumed_from`` (the checkpoint folder, or null) and ``config_changed`` (key -> [old, new]: what this session
changed of the resumed checkpoint's config, as the resume warns; {} where nothing or a new run), so the values
that trained each part of a run are known after config.yaml has the newest session's. One line in train.log names
the commit and torch.

A side write (train/side_writes.py): a line that cannot be written (a full disk, a quota) is said once and
counted in ``write_errors``; training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path

import torch
import yaml

from dist_dejpeg import code_version, source_commit, version
from dist_dejpeg.config import flatten, to_dict
from dist_dejpeg.run.files import append_line
from dist_dejpeg.run.layout import CONFIG, SESSIONS
from dist_dejpeg.train.resume import config_changes

log = logging.getLogger("dist_dejpeg")

SESSION_KEYS = ("time", "code", "commit", "versions", "host", "pid", "slurm_job", "processes", "device", "gpu",
                "mixed_precision", "deepspeed_stage", "start_step", "resumed_from", "config_changed")
# distribution names (importlib.metadata's: no import) -> the key each version has in ``versions``
DISTRIBUTIONS = {"timm": "timm", "accelerate": "accelerate", "numpy": "numpy", "Pillow": "Pillow",
                 "safetensors": "safetensors", "lpips": "lpips"}


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def _pillow_jpeg() -> dict:
    """Pillow's libjpeg: the API version it reports ("6.2", "8.0"...) and libjpeg-turbo's own, where that is it."""
    try:
        from PIL import features

        return {"libjpeg": features.version("jpg"), "libjpeg_turbo": features.version("libjpeg_turbo")}
    except Exception:  # noqa: BLE001 - an old Pillow without a feature: the version unknown, not a failed run
        return {"libjpeg": None, "libjpeg_turbo": None}


def library_versions(cuda: bool = False, deepspeed: bool = False) -> dict:
    """The versions of what trains: python, dist_dejpeg, torch (its CUDA build and cuDNN where ``cuda``), the
    libraries of :data:`DISTRIBUTIONS` and Pillow's libjpeg; deepspeed where ``deepspeed``, DALI where imported."""
    found = {"python": platform.python_version(), "dist_dejpeg": version(), "torch": torch.__version__}
    if cuda:
        found["cuda"] = torch.version.cuda
        found["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    found.update({key: _installed(name) for name, key in DISTRIBUTIONS.items()})
    found.update(_pillow_jpeg())
    if deepspeed:
        found["deepspeed"] = _installed("deepspeed")
    dali = sys.modules.get("nvidia.dali")
    if dali is not None:  # (the loader imported it: data.backend dali, or auto with DALI installed)
        found["dali"] = getattr(dali, "__version__", None)
    return found


def session_record(trainer, resumed_from: str | Path | None) -> dict:
    """This session's line (:data:`SESSION_KEYS`) for ``trainer`` (after its resume, if any)."""
    acc, cfg = trainer.accelerator, trainer.cfg
    device = torch.device(acc.device)
    cuda = device.type == "cuda"
    return {
        "time": datetime.now().astimezone().isoformat(timespec="seconds"), "code": code_version(),
        "commit": source_commit(), "versions": library_versions(cuda, bool(getattr(trainer, "deepspeed", False))),
        "host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "processes": acc.num_processes, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "mixed_precision": cfg.train.mixed_precision, "deepspeed_stage": cfg.train.deepspeed_stage,
        "start_step": trainer.state.global_step, "resumed_from": None if resumed_from is None else str(resumed_from),
        "config_changed": changed_since(resumed_from, cfg),
    }


def changed_since(checkpoint: str | Path | None, cfg) -> dict:
    """What ``cfg`` (the trainer's, after its resume) changed of the config the ``checkpoint`` saved: key -> [old,
    new] (resume.config_changes); {} without a checkpoint or a config in it that reads."""
    if checkpoint is None:
        return {}
    try:
        saved = yaml.safe_load((Path(checkpoint) / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config_changes(flatten(saved), flatten(to_dict(cfg))) if isinstance(saved, dict) else {}


def record_session(trainer, resumed_from: str | Path | None) -> dict | None:
    """Append this session's line to ``<run_dir>/sessions.jsonl`` and name its commit and torch in train.log (the
    main process; a side write: a failure is logged and counted, never raised). Returns the line (None elsewhere)."""
    if not trainer.accelerator.is_main_process:
        return None
    path = Path(trainer.run_dir) / SESSIONS
    try:
        record = session_record(trainer, resumed_from)
    except Exception as err:  # noqa: BLE001 - what cannot be read about the libraries must not stop training
        log.warning("%s: this session's line is not written (%s: %s); training goes on", path, type(err).__name__,
                    err)
        return None
    with trainer.monitor.side_write("sessions", path=path):
        append_line(path, json.dumps(record, default=str))
    v = record["versions"]
    cuda = f" (CUDA {v['cuda']}, cuDNN {v['cudnn']})" if "cuda" in v else ""
    start = f"resumed at step {record['start_step']}" if resumed_from is not None else "a new run"
    log.info("session: %s, torch %s%s, %d process(es), %s; %s (%s)", record["code"], v["torch"], cuda,
             record["processes"], record["mixed_precision"], start, path.name)
    return record
