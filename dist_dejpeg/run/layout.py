"""The run folder, defined once: its file names, the checkpoint folders' names, and the ``metrics.json``
schema. Torch-free, so ``status`` reads a live run without importing the trainer; the trainer, export and
restore use the same names.

    <run_dir>/
        config.yaml               the resolved config (written at the start)
        progress.json             where the run stands (rank 0 rewrites it at every log window; monitor.py)
        sessions.jsonl            one line per training session, appended at its start: the commit, the libraries'
                                  versions, host, processes, precision, the step it starts at (train/sessions.py)
        checkpoints/step-%08d/    whole-state checkpoints (train/checkpoint.py); .tmp-step-* while written;
                                  manifest.json inside lists each file's size and sha256 (run/manifest.py)
        checkpoints/abandoned-*/  later checkpoints a resume from an older one set aside (one timeline)
        metrics.json              the final validation, with MetricsMeta under "meta" (written at the end)
        generator.safetensors     the trained generator with its config (models/generator_file.py)
        .lock                     the flock of the run's writer (run/lock.py)
        tb/                       TensorBoard events (events.out.tfevents.*)
        wandb/, mlflow/, dvclive/ the other trackers' files, where train.log_with names them (train/trackers.py)
        trackers.json             their run ids, so a resumed run logs to the same wandb and MLflow runs
        final_logged.json         the trackers that got the final validation (a rerun logs it to them once)
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

CONFIG = "config.yaml"
PROGRESS = "progress.json"
WRITE_ERRORS = "write_errors"  # progress.json's and metrics.json meta's key: side write -> failures (rank 0)
# (eta_*_s: the steps left at the current step time; val_s: the mean seconds of a validation in a phase, this session's:
# status adds those left, which the step time leaves out)
PROGRESS_KEYS = ("time", "status", "reason", "phase", "phase_index", "phases", "phase_step", "phase_steps",
                 "global_step", "total_steps", "images_per_s", "data_wait_frac", "lr", "eta_phase_s", "eta_run_s",
                 "val_s", "losses", "last_val", "best", "host", "pid", "slurm_job", "processes", WRITE_ERRORS)
SESSIONS = "sessions.jsonl"  # one JSON object a line per training session (train/sessions.py: SESSION_KEYS)
METRICS = "metrics.json"
EVALUATE_CSV = "metrics.csv"  # `evaluate -o` writes it beside its own metrics.json (a run never does)
GENERATOR = "generator.safetensors"
LOCK = ".lock"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tb"
TENSORBOARD_EVENTS = "events.out.tfevents.*"  # the event files' pattern inside tb/
# inside a checkpoint folder
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks the folder complete
LOADER_STATE = "loader_{rank}.json"  # each rank's data-stream position: one file per process
BEST_GENERATOR = "best_generator.safetensors"
# a gan phase's end put its best generator back: its last step's (and EMA), where more steps continue it from
LAST_GENERATOR = "last_generator.safetensors"
EMA_GENERATOR = "ema_generator.safetensors"  # the EMA of the generator's parameters and its update count
EMA_UPDATES = "num_updates"  # the EMA file's update count (its other keys: the generator's parameter names)
CHECKPOINT_MODEL = "model.safetensors"  # accelerate's save_state: the generator (the first prepared model)
MANIFEST = "manifest.json"  # every other file's size and sha256, written just before trainer_state.json
BUFFERS = "buffers_{rank}.safetensors"  # each rank's model buffers (batch-norm statistics differ per rank)
RANDOM_STATES = "random_states_{rank}.pkl"  # accelerate's save_state: each rank's RNG streams
# the files each rank writes for itself (the main process writes every other file of a checkpoint)
RANK_FILE = re.compile(r"^(?:loader_(\d+)\.json|buffers_(\d+)\.safetensors|random_states_(\d+)\.pkl)$")
ABANDONED_PREFIX = "abandoned-"  # checkpoints/abandoned-<time>/: later checkpoints set aside by a rollback

STEP_DIR = re.compile(r"^step-(\d{8})$")
PARTIAL_PREFIX = ".tmp-step-"


def step_name(global_step: int) -> str:
    return f"step-{global_step:08d}"


def loader_state_name(rank: int) -> str:
    return LOADER_STATE.format(rank=rank)


def buffers_name(rank: int) -> str:
    return BUFFERS.format(rank=rank)


def rank_of_file(name: str) -> int | None:
    """The rank whose own file ``name`` is (loader, buffers, RNG states), or None for the main process's files."""
    match = RANK_FILE.match(name)
    return None if match is None else int(next(g for g in match.groups() if g is not None))


def partial_name(global_step: int) -> str:
    return f"{PARTIAL_PREFIX}{global_step:08d}"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders (a ``trainer_state.json`` inside), oldest first."""
    try:
        entries = list(checkpoint_dir(run_dir).iterdir())
    except OSError:
        return []
    found = [p for p in entries if p.is_dir() and STEP_DIR.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def step_of(path: str | Path) -> int | None:
    """The global step in a checkpoint folder's name (``step-00001200`` -> 1200), or None for another name."""
    match = STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """``.tmp-step-*`` folders: being written now, or left half-written by a killed run."""
    root = checkpoint_dir(run_dir)
    return sorted(root.glob(PARTIAL_PREFIX + "*")) if root.is_dir() else []


# a MetricsMeta field's annotation -> the JSON type its value must have (an int may be null)
META_TYPES = {"str": str, "dict": dict, "int | None": int, "float": (int, float)}


@dataclass
class MetricsMeta:
    """``metrics.json``'s ``meta``: what the final validation measured and how the run got there. The trainer
    writes it; ``status`` reads it (older files may lack keys: :meth:`from_dict` takes what it knows)."""

    lpips: str = ""  # the validation LPIPS network, e.g. "lpips-alex" or "... (RANDOM backbone ...)"
    encoder: str = ""  # "mobilenetv3_large_100 (ImageNet)" or "(random init)"
    steps: dict = field(default_factory=dict)  # phase -> configured steps
    stopped_early: dict = field(default_factory=dict)  # phase -> step where the stop rule fired
    global_step: int | None = None
    processes: int | None = None
    val_images_per_quality: int | None = None
    data_skipped: dict = field(default_factory=dict)  # reason -> samples skipped, summed over ranks
    loss_lpips: str = ""  # the training loss's LPIPS network
    last_train_log: dict = field(default_factory=dict)  # phase -> rank 0's newest logged window
    # side writes that failed and were skipped, on rank 0: "progress", "tracker.<name>", "image.<name>", "console"
    write_errors: dict = field(default_factory=dict)
    # train.ema_decay > 0: {"decay", "warmup", "updates", "raw": the raw (non-EMA) generator's final validation};
    # the metrics above are the EMA's
    ema: dict = field(default_factory=dict)
    train_seconds: float = 0.0  # wall seconds in training steps, over all phases and resumes (TrainerState's)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data) -> "MetricsMeta":
        """The known keys whose values have the field's type; anything else (junk, a newer key) is dropped."""
        if not isinstance(data, dict):
            return cls()
        kept = {}
        for f in dataclasses.fields(cls):
            value = data.get(f.name)
            if isinstance(value, META_TYPES[f.type]) and not isinstance(value, bool):
                kept[f.name] = value
        return cls(**kept)


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts (a config's to_dict, a config.yaml read back) -> {"a.b.c": value}; an empty dict stays a value.
    dist_dejpeg.config exports it (this layer may not import config; status's sweep columns use it here)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
