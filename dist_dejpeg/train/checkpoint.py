"""Whole-state checkpoints in step-named folders, written atomically, keep-last-K.

    <run_dir>/checkpoints/step-00001200/
        model.safetensors, model_1.safetensors, optimizer*.bin, scaler.pt, random_states_<rank>.pkl
                                                      (accelerator.save_state: models, optimizers, AMP
                                                       scaler, every rank's RNG streams)
        trainer_state.json                            phase, step, stop rule, best metric, data skips
        loader_<rank>.json                            each rank's data-stream position
        buffers_<rank>.safetensors                    each rank's model buffers (batch-norm running
                                                       statistics differ per rank under DDP; the model
                                                       files hold rank 0's only)
        config.yaml                                   the resolved config of the run

Everything is written into ``.tmp-step-*`` and renamed into place once every rank has finished, so a
crash mid-write leaves no folder that looks complete. Learning rates are a pure function of the phase
step (phases.lr_at), so there is no scheduler state to save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from dist_dejpeg.run.files import fsync_dir
from dist_dejpeg.run.layout import (CONFIG, TRAINER_STATE, checkpoint_dir, latest_checkpoint, list_checkpoints,
                                    loader_state_name, partial_checkpoints, partial_name, step_name)

def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, global_step: int, trainer_state: dict,
                    loader_state: dict, config_yaml: str, keep_last: int, buffers: dict | None = None,
                    main_tensors: dict[str, dict] | None = None) -> Path:
    """Collective: every rank calls it. ``buffers``: this rank's model buffers; ``main_tensors``: extra
    safetensors files (name -> tensors) written by the main process. Returns the final folder."""
    root = checkpoint_dir(run_dir)
    final = root / step_name(global_step)
    tmp = root / partial_name(global_step)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    _write_json(tmp / loader_state_name(accelerator.process_index), loader_state)
    if buffers:
        save_file(_packed(buffers), str(tmp / f"buffers_{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if main_tensors:
            for name, tensors in main_tensors.items():
                save_file(_packed(tensors), str(tmp / name))
        (tmp / CONFIG).write_text(config_yaml)
        _write_json(tmp / TRAINER_STATE, trainer_state)  # last file: marks the folder complete
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a NaN stop right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _packed(tensors: dict) -> dict:
    """Contiguous CPU copies: safetensors refuses strided tensors, and channels_last weights are strided."""
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def rank_buffers(models: dict) -> dict:
    """This rank's model buffers ({"generator": module, ...} -> {"generator.<name>": tensor}): DDP here does not
    broadcast buffers, so batch-norm running statistics follow each rank's own batches, and an exact resume
    must give every rank its own back (:func:`load_rank_buffers`)."""
    return {f"{m}.{k}": v for m, model in models.items() for k, v in model.named_buffers()}


def load_rank_buffers(models: dict, buffers: dict) -> None:
    own = rank_buffers(models)  # the live buffer tensors, under the same names
    for key, value in buffers.items():
        if key in own:
            own[key].copy_(value)


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Delete ``.tmp-step-*`` folders a killed run left half-written. Only the holder of the run folder's lock
    may call it (another live writer could be filling one)."""
    partial = partial_checkpoints(run_dir)
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> tuple[dict, dict | None, dict]:
    """Collective. Restores models, optimizers, scaler and RNG; returns (trainer_state, loader_state, this
    rank's buffers or {})."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no trainer_state.json): {path}")
    accelerator.load_state(str(path))
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    loader_file = path / loader_state_name(accelerator.process_index)
    loader_state = json.loads(loader_file.read_text()) if loader_file.is_file() else None
    buffer_file = path / f"buffers_{accelerator.process_index}.safetensors"
    buffers = {}
    if buffer_file.is_file():
        buffers = load_file(str(buffer_file))
    return trainer_state, loader_state, buffers


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """``--resume``: "latest" (or "") means the newest checkpoint of the run; otherwise a folder path."""
    if resume is None:
        return None
    if resume in ("", "latest"):
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {checkpoint_dir(run_dir)}")
        return found
    return Path(resume)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


# -- preemption -------------------------------------------------------------------------------------------
class TrainingStopped(RuntimeError):
    """Training ended early on an error that left a checkpoint behind (e.g. a non-finite loss)."""


class Preempted(TrainingStopped):
    """A stop signal (SIGUSR1/SIGTERM) ended the run after a step; the checkpoint in ``path`` resumes it."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


class StopSignals:
    """SIGUSR1 (SLURM's advance warning, ``--signal``) and SIGTERM (scancel, preemption, the launcher
    passing either on) ask the run to stop: the handler only records the signal, and the trainer checks
    :meth:`requested` after each optimizer step, so the step in flight finishes, a checkpoint is written, and
    the process exits. Installed in the main thread only; ``restore`` puts the previous handlers back."""

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            os.write(2, f"dist_dejpeg: got signal {signum}; stopping after this step with a checkpoint\n".encode())

    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.received).name if self.received is not None else ""

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
