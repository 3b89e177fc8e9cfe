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
        ema_generator.safetensors                     the generator's EMA parameters and update count
                                                      (train/ema.py; none with train.ema_decay=0)
        best_generator.safetensors                    the gan phase's best generator so far (and its EMA)
        last_generator.safetensors                    at a gan phase's end that put its best generator back:
                                                      its last step's (and EMA), which more steps continue
        config.yaml                                   the resolved config of the run
        manifest.json                                 every other file's size and sha256 (run/manifest.py),
                                                      written after them and before trainer_state.json

Everything is written into ``.tmp-step-*`` and renamed into place once every rank has finished, so a
crash mid-write leaves no folder that looks complete. Each rank fsyncs the files it wrote (accelerate's
save_state does not), then the main process hashes them all into the manifest, so a resume can check that
nothing was truncated or changed since (train/resume.py). Learning rates are a pure function of the phase
step (phases.lr_at), so there is no scheduler state to save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils.constants import SCALER_NAME
from safetensors.torch import load_file, save_file

from dist_dejpeg.config import ConfigError
from dist_dejpeg.run.files import fsync_dir
from dist_dejpeg.run.layout import (ABANDONED_PREFIX, CONFIG, LOADER_STATE, PARTIAL_PREFIX, STEP_DIR,  # noqa: F401
                                    TRAINER_STATE, buffers_name, checkpoint_dir, latest_checkpoint, list_checkpoints,
                                    loader_state_name, partial_checkpoints, partial_name, step_name, step_of)
from dist_dejpeg.run.manifest import fsync_dirs, fsync_own_files, write_manifest
from dist_dejpeg.train.collective import all_ranks_or_raise
from dist_dejpeg.train.launch import LAUNCHER_PID, already_launched

log = logging.getLogger("dist_dejpeg")

FINAL_STAGE = "during the final validation"  # (StopSignals.at_once: train/final.py)
REPLACED = ".replaced"  # + a partial name: a complete checkpoint set aside while its step is saved again


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, global_step: int, trainer_state: dict,
                    loader_state: dict, config_yaml: str, keep_last: int, buffers: dict | None = None,
                    main_tensors: dict[str, dict] | None = None) -> Path:
    """Collective: every rank calls it. ``buffers``: this rank's model buffers; ``main_tensors``: extra
    safetensors files (name -> tensors) written by the main process. Returns the final folder."""
    root = checkpoint_dir(run_dir)
    final = root / step_name(global_step)
    tmp = root / partial_name(global_step)
    with all_ranks_or_raise(accelerator):  # a full disk on rank 0 fails every rank at once, not at the timeout
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
    # Under DDP only rank 0 writes the models and optimizers, so that is where a full disk strikes: every rank
    # fails with it. DeepSpeed's save_state has collectives of its own inside (each rank writes its partition):
    # a rank failing before one of them cannot be met by a collective of ours, so its barrier stays plain.
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    with contextlib.nullcontext() if deepspeed else all_ranks_or_raise(accelerator):
        accelerator.save_state(str(tmp), safe_serialization=True)
        _write_json(tmp / loader_state_name(accelerator.process_index), loader_state)
        if buffers:
            save_file(_packed(buffers), str(tmp / buffers_name(accelerator.process_index)))
        if accelerator.is_main_process:
            if main_tensors:
                for name, tensors in main_tensors.items():
                    save_file(_packed(tensors), str(tmp / name))
            (tmp / CONFIG).write_text(config_yaml)
        fsync_own_files(tmp, accelerator.process_index)  # by the rank that wrote each (save_state does not fsync)
    if deepspeed:
        accelerator.wait_for_everyone()
    with all_ranks_or_raise(accelerator):  # an error here on rank 0 fails every rank at once, not at the timeout
        if accelerator.is_main_process:
            write_manifest(tmp)  # after every rank's files: their sizes and sha256
            _write_json(tmp / TRAINER_STATE, trainer_state)  # last file: marks the folder complete
            fsync_dirs(tmp)
            # the same step saved again (a NaN stop right after a periodic save; a run preempted at a phase's last
            # step, then resumed): the old folder is deleted only once the new one is in place, so that a kill
            # meanwhile leaves a checkpoint (the aside's .tmp-step-* name: the next start removes it if left)
            replaced = root / f"{tmp.name}{REPLACED}"
            if final.exists():
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
            os.replace(tmp, final)
            fsync_dir(root)
            shutil.rmtree(replaced, ignore_errors=True)
            for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
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
    """Delete ``.tmp-step-*`` folders a killed run left half-written; a complete checkpoint set aside for the same
    step saved again (``...REPLACED``) goes back to its name where the kill came before the new one took it. Only
    the holder of the run folder's lock may call it (another live writer could be filling one)."""
    for aside in partial_checkpoints(run_dir):
        digits = aside.name[len(PARTIAL_PREFIX):].removesuffix(REPLACED)
        final = aside.parent / step_name(int(digits)) if aside.name.endswith(REPLACED) and digits.isdigit() else None
        if final is not None and not final.exists():  # the kill came between the two renames
            os.replace(aside, final)
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
    check_deepspeed_layout(path, accelerator.distributed_type == DistributedType.DEEPSPEED, accelerator.num_processes)
    # a checkpoint written in bf16 or fp32 has no fp16 loss scale (Accelerate's load_state would fail on the missing
    # scaler.pt): an fp16 run continuing it starts from GradScaler's initial scale, as at its first step
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and not (path / SCALER_NAME).is_file():
        if accelerator.is_main_process:
            log.info("resuming %s: it has no fp16 loss scale (written in bf16 or fp32); starting from %g", path,
                     scaler.get_scale())
        accelerator.scaler = None
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # a raw "size mismatch" or a truncated file's parse error: say what it means
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if any(s in str(err) for s in ("size mismatch", "Missing key", "Unexpected key")):
            raise ConfigError(f"resuming {path}: the checkpoint holds other tensors than the models this config "
                              f"builds ({first[:300]}); model.* and critic.* must be the ones the run began "
                              f"with") from err
        raise CheckpointError(f"resuming {path}: the checkpoint cannot be loaded ({type(err).__name__}: "
                              f"{first[:300]}); resume from an older one (--resume <folder>)") from err
    finally:
        if scaler is not None:
            accelerator.scaler = scaler
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    loader_state = loader_states(path, accelerator.process_index)
    buffer_file = path / buffers_name(accelerator.process_index)
    buffers = {}
    if buffer_file.is_file():
        buffers = load_file(str(buffer_file))
    return trainer_state, loader_state, buffers


def loader_states(path: Path, rank: int) -> dict | None:
    """Rank ``rank``'s data loader state in the checkpoint at ``path`` (``{}`` where it saved none: a rank more
    than the checkpoint's), with ``every_rank``: every rank's saved state (rank 0's first). A loader that cannot
    resume its own position (other ranks or workers) restarts after the newest epoch any of them reached, every
    rank alike: each reads every file, so no collective is needed. None where the checkpoint has no loader state."""
    named = (f.stem.rpartition("_")[2] for f in path.glob(LOADER_STATE.format(rank="*")))
    ranks = sorted(int(n) for n in named if n.isdigit())
    every = [json.loads((path / loader_state_name(r)).read_text()) for r in ranks]
    if not every:
        return None
    own = path / loader_state_name(rank)
    return {**(json.loads(own.read_text()) if own.is_file() else {}), "every_rank": every}


DEEPSPEED_ENGINE = "pytorch_model"  # accelerate's folder for the first model's DeepSpeed engine
ZERO_PARTITION = "zero_pp_rank_*_optim_states.pt"  # one per process: its share of the optimizer states


def check_deepspeed_layout(path: Path, deepspeed: bool, processes: int) -> None:
    """A DeepSpeed checkpoint (an engine folder per model, the optimizer states partitioned over its processes)
    loads only under DeepSpeed with as many processes (ZeRO-1 and -2 share the layout but cannot repartition),
    and Accelerate's model files only without it: a ConfigError that says so, where either library would fail on
    the other's layout with an AssertionError or a missing file."""
    engine = path / DEEPSPEED_ENGINE
    if engine.is_dir() != deepspeed:
        saved, now = ("under DeepSpeed", "train.deepspeed_stage=0") if engine.is_dir() else \
            ("without DeepSpeed (train.deepspeed_stage=0)", "DeepSpeed")
        raise ConfigError(f"--resume {path}: the checkpoint was written {saved}, this run uses {now}: the models "
                          f"and optimizers are stored differently. Set train.deepspeed_stage back to continue the "
                          f"run (ZeRO-1 and -2 read each other's), or start a new run (another train.run_dir)")
    saved_processes = len(list(engine.glob(ZERO_PARTITION))) if deepspeed else 0
    if saved_processes and saved_processes != processes:
        raise ConfigError(f"--resume {path}: a DeepSpeed checkpoint of {saved_processes} processes, this run has "
                          f"{processes}: ZeRO cannot repartition its optimizer states (whatever "
                          f"train.resume_allow_batch_change says). Resume with {saved_processes} processes "
                          f"(train.processes={saved_processes}, or the launcher's count)")


def set_aside_later(run_dir: str | Path, resumed: str | Path, global_step: int) -> Path | None:
    """One timeline: a run resumed from ``resumed`` (its ``global_step``) moves this run's checkpoints of that
    step or later (but ``resumed`` itself) into ``checkpoints/abandoned-<time>/``, so keep-last pruning and the
    next auto-resume never mix them with the new ones. Moved, not deleted: a rollback by mistake (or a damaged
    newer checkpoint a resume skipped) stays recoverable and inspectable; deleting the folder is the user's
    call. Main process only. Returns the folder they went to, or None when there were none."""
    root, resumed = checkpoint_dir(run_dir), Path(resumed).resolve()
    try:
        later = sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
                       and step_of(p) >= global_step and p.resolve() != resumed)
    except OSError:
        return None
    if not later:
        return None
    aside = root / f"{ABANDONED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        aside, n = root / f"{ABANDONED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
    aside.mkdir()
    for path in later:
        os.replace(path, aside / path.name)
    fsync_dir(aside)
    fsync_dir(root)
    return aside


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from (damaged, or none under the run that verifies): the command
    ends with exit 2, as for a config error, and the message names the folder and what is wrong."""


# -- preemption -------------------------------------------------------------------------------------------
class TrainingStopped(RuntimeError):
    """Training ended early on an error that left a checkpoint behind (e.g. a non-finite loss)."""


class Preempted(TrainingStopped):
    """A stop signal (SIGUSR1/SIGTERM/SIGINT) ended the run after a step, or where it had nothing to save (before
    training, in the final validation); the checkpoint in ``path`` resumes it (None: there is none yet)."""

    def __init__(self, message: str, path: Path | None):
        super().__init__(message)
        self.path = path


class StopNow(BaseException):
    """A stop signal where nothing would be saved by waiting for a step (before training began, during the final
    validation): raised by the handler at once, like KeyboardInterrupt, so that no ``except Exception`` on the way
    (a checkpoint load's) takes it for an error; train() turns it into :class:`Preempted` (:func:`stopped_at_once`)."""

    def __init__(self, signal_name: str, stage: str):
        super().__init__(f"{signal_name} {stage}")
        self.signal_name, self.stage = signal_name, stage


class StopSignals:
    """SIGUSR1 (SLURM's advance warning, ``--signal``), SIGTERM (scancel, preemption, the launcher passing
    either on) and SIGINT (Ctrl-C) ask the run to stop: the handler only records the signal, and the trainer
    checks :meth:`requested` after each optimizer step, so the step in flight finishes, a checkpoint is
    written, and the process exits. Inside :meth:`at_once` the handler raises :class:`StopNow` instead. A second
    Ctrl-C stops a process that no launcher started at once (under one, the launcher passes the first on again,
    and ends the ranks itself after its grace period). Installed in the main thread only; installs nest, and the
    outermost ``restore`` puts the previous handlers back."""

    SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")

    def __init__(self):
        self.received: int | None = None
        self.stage: str | None = None  # set: a signal raises StopNow (at_once)
        self._previous: dict[int, object] = {}
        self._depth = 0

    def install(self) -> "StopSignals":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._depth += 1
            if self._depth == 1:
                for name in self.SIGNALS:
                    sig = getattr(signal, name)
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @contextlib.contextmanager
    def at_once(self, stage: str):
        """A stop signal in the block (or one received before it) raises StopNow(``stage``): where the run has
        nothing to save. Without installed handlers (several processes: their launcher maps a rank that a
        signal ended to exit 75, train/launch.py) the block runs as it is."""
        if self._depth and self.received is not None:
            raise StopNow(self.name, stage)
        self.stage = stage if self._depth else None
        try:
            yield self
        finally:
            self.stage = None

    def _handle(self, signum, frame) -> None:
        import signal

        alone = not already_launched()
        if self.received is None:
            self.received = signum
            if self.stage is not None:
                stage, self.stage = self.stage, None
                raise StopNow(signal.Signals(signum).name, stage)
            # a second Ctrl-C stops at once alone, or under train.processes' launcher (it kills the ranks)
            at_once = alone or LAUNCHER_PID in os.environ
            again = " (Ctrl-C again: stop now, without one)" if signum == signal.SIGINT and at_once else ""
            if os.environ.get("LOCAL_RANK", "0") == "0":  # once per node, not once per rank (Ctrl-C signals all)
                os.write(2, f"dist_dejpeg: got {signal.Signals(signum).name}; stopping after this step with a "
                            f"checkpoint{again}\n".encode())
        elif signum == signal.SIGINT and alone:
            raise KeyboardInterrupt

    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.received).name if self.received is not None else ""

    def restore(self) -> None:
        import signal

        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()


def stopped_at_once(stop: StopNow, run_dir: str | Path, trainer=None) -> Preempted:
    """The Preempted that a StopNow ends the run with (exit 75: the same command continues), told to ``status``
    through progress.json where the trainer got as far as its monitor; the trainer's lock and trackers released."""
    last = latest_checkpoint(run_dir)
    if stop.stage == FINAL_STAGE and last is not None:
        then = f"{last} holds every phase: the same command validates it again and writes the run's files"
    elif last is not None:
        then = f"nothing new to save; the same command continues the run from {last}"
    else:
        then = "nothing to save yet; the same command starts the run"
    message = f"stopped by {stop.signal_name} {stop.stage}; {then}"
    if trainer is not None:
        trainer.monitor.finish("preempted", message)
        trainer.close()
    return Preempted(message, last)
