"""Which checkpoint a run resumes from, and whether this config may continue it.

    dist-dejpeg train --config configs/div2k.yaml                   # train.auto_resume: the newest that verifies
    dist-dejpeg train --config configs/div2k.yaml --resume          # the same, and an error when there is none
    dist-dejpeg train --config configs/div2k.yaml --resume runs/div2k/checkpoints/step-00004000

The main process checks each candidate against its manifest (run/manifest.py: sizes and sha256, before
accelerate or DeepSpeed unpickles anything) and the ranks load the one it chose. The newest checkpoint that
verifies wins; a damaged newer one is skipped with a warning naming its bad files, and set aside with any
later ones (checkpoint.set_aside_later), so one timeline continues. A named folder that does not verify is an
error (exit 2). The checkpoint's config.yaml is compared with this config: a key that changes a model's tensor
shapes is an error naming it; another global batch or process count needs train.resume_allow_batch_change.
More steps for the phase that ended last (a finished run's gan phase) reopen it; for an earlier phase, an error.
Fewer steps than a phase has trained keep the steps it trained (the phase in progress ends where it is). Other
changes are warned of (and recorded in sessions.jsonl); a finished run, with nothing to train, is refused them.
train.auto_resume=false without --resume starts a new run, which a folder holding checkpoints refuses (a new run
there goes to another train.run_dir).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
from pathlib import Path

import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType

from dist_dejpeg.config import Config, ConfigError, flatten, to_dict
from dist_dejpeg.models.critic import Critic
from dist_dejpeg.run.layout import (ABANDONED_PREFIX, CONFIG, LOADER_STATE, STEP_DIR, TRAINER_STATE, checkpoint_dir,
                                    list_checkpoints)
from dist_dejpeg.run.manifest import Verdict, verify_checkpoint
from dist_dejpeg.train.checkpoint import CheckpointError, check_deepspeed_layout, load_checkpoint, set_aside_later
from dist_dejpeg.train.collective import all_ranks_or_raise, on_main, warn_on_main
from dist_dejpeg.train.init_from import GENERATOR_NO_TENSOR, GENERATOR_SHAPE_KEYS, same_shapes_but_stride
from dist_dejpeg.train.launch import warn_unlaunched
from dist_dejpeg.train.phases import trains_critic
from dist_dejpeg.train.rerun import NOT_COMPARED, changes_text, check_finished_run
from dist_dejpeg.train.zero import launcher_uses_deepspeed

log = logging.getLogger("dist_dejpeg")

# the model keys that change no tensor's shape: the initial weights, and a dropout rate
_NO_SHAPE = ("pretrained", "encoder_weights", "dropout")
# a resumed run continues the architecture it trained: the generator's shape keys and those that make no tensor
# but change what it computes (blur, keep_mean: a new run from its generator, model.init_from, may switch them)
GENERATOR_RESUME_KEYS = GENERATOR_SHAPE_KEYS + tuple(f"model.{k}" for k in GENERATOR_NO_TENSOR)
CRITIC_SHAPE_KEYS = tuple(f"critic.{k}" for k in inspect.signature(Critic).parameters if k not in _NO_SHAPE)
def choose_checkpoint(accelerator: Accelerator, run_dir: str | Path, resume: str | None,
                      auto_resume: bool) -> Path | None:
    """Collective. ``resume``: None (train.auto_resume decides), "latest"/"" (the newest that verifies), or a
    checkpoint folder. The main process verifies and chooses; every rank gets its choice or raises its error."""
    chosen = on_main(accelerator, lambda: _choose(Path(run_dir), resume, auto_resume))
    return None if chosen is None else Path(chosen)


class _Said(logging.Filter):
    """Takes this logger's records instead of its handlers (quiet), each to ``say`` as a line (where given)."""

    def __init__(self, say=None):
        super().__init__()
        self.say = say

    def filter(self, record: logging.LogRecord) -> bool:
        if self.say is not None:
            self.say(f"{'note' if record.levelno < logging.WARNING else record.levelname.lower()}: "
                     f"{record.getMessage()}")
        return False


def check_before_start(cfg: Config, resume: str | None, processes: int, say=None) -> None:
    """What resuming would refuse (no checkpoint to resume, a damaged one, a config or a process count that
    cannot continue it), found by a launcher before it starts ``processes`` ranks, each of which would say it after
    its start-up. Quiet: the ranks log what they choose; a checkpoint whose state does not read is left to them.
    ``say``: gets each line the resume would log (which checkpoint, the config changes it accepts, a phase it
    reopens or ends), "warning: ..." or "note: ...": ``train --dry-run`` prints them."""
    said, level = _Said(say), log.level
    log.addFilter(said)
    if say is not None and not log.isEnabledFor(logging.INFO):
        log.setLevel(logging.INFO)
    try:
        chosen = _choose(Path(cfg.train.run_dir), resume, cfg.train.auto_resume)
        if chosen is None:
            return
        try:
            saved_state = json.loads((Path(chosen) / TRAINER_STATE).read_text())
        except (OSError, ValueError):
            return
        has_critic = any(trains_critic(cfg.train.phases[name]) for name in cfg.train.order)
        # (an accelerate launch DeepSpeed config sets the stage later, in build_accelerator: its variable says it)
        deepspeed = cfg.train.deepspeed_stage > 0 or launcher_uses_deepspeed()
        check_continuation(cfg, Path(chosen), saved_state, deepspeed, processes, has_critic)
    finally:
        log.removeFilter(said)
        log.setLevel(level)


def check_continuation(cfg: Config, path: Path, saved_state: dict, deepspeed: bool, processes: int,
                       has_critic: bool, main: bool = True) -> tuple[dict, dict]:
    """Raise where ``cfg`` cannot continue the checkpoint at ``path`` (its DeepSpeed layout first: its process count
    cannot change, whatever the batch check would allow; then check_resume_config, longer_phases); returns the
    trainer state the checkpoint's finished phases reopen with (longer_phases) and the phase lengths that stay
    as trained (shorter_phases). Every rank checks (each raises the same error); ``main``: this rank warns."""
    check_deepspeed_layout(path, deepspeed, processes)
    saved = check_resume_config(cfg, path, saved_state, processes, has_critic, main) or {}
    reopened, kept = longer_phases(cfg, saved, saved_state), shorter_phases(cfg, saved, saved_state)
    changes = config_changes(saved, flatten(to_dict(cfg)))
    if changes:
        check_finished_run(cfg, path, changes, {**saved_state, **reopened}, kept)
        warn_on_main(main)("resume: config changed since the checkpoint: %s", changes_text(changes))
    return reopened, kept


def config_changes(saved: dict, now: dict) -> dict[str, list]:
    """The keys whose value differs between a checkpoint's config and this one (both flattened): key -> [old,
    new], without those that say nothing about what trains (where the run writes, how it logs)."""
    return {k: [saved[k], now[k]] for k in sorted(now) if k in saved and saved[k] != now[k] and k not in NOT_COMPARED}


def _choose(run_dir: Path, resume: str | None, auto_resume: bool) -> str | None:
    if resume not in (None, "", "latest"):
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {path}: {'a file, not a folder' if path.is_file() else 'no such folder'} "
                                    f"(give a checkpoint folder, checkpoints/step-*, or a run folder for its newest)")
        if not (path / TRAINER_STATE).is_file() and list_checkpoints(path):  # a run folder: its newest checkpoint
            if path.resolve() == run_dir.resolve():
                return _choose(run_dir, "latest", auto_resume)
            path = list_checkpoints(path)[-1]
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"not a complete checkpoint (no {TRAINER_STATE}): {path}")
        own, root = list_checkpoints(run_dir), checkpoint_dir(run_dir).resolve()
        if path.resolve().parent != root:
            if own and path.resolve().parent.parent == root and path.parent.name.startswith(ABANDONED_PREFIX):
                raise CheckpointError(f"--resume {path}: this run's own checkpoint, set aside into "
                                      f"{path.parent.name}/ when the run went back to an earlier one; its "
                                      f"checkpoints since ({', '.join(p.name for p in own)}) are the run now. To "
                                      f"go back to it, move those into another folder under {root.name}/, move "
                                      f"{path.name} back into {root.name}/ and resume it; or start from it in "
                                      f"another train.run_dir")
            if own:  # another run's checkpoint would set this run's own ones aside: a mistake far more often
                raise CheckpointError(f"--resume {path} is a checkpoint of another run, and this run ({run_dir}) "
                                      f"has checkpoints of its own (newest {own[-1].name}): resume one of those "
                                      f"(--resume alone: the newest), or start from {path} in another "
                                      f"train.run_dir")
            log.info("--resume: run %s starts from %s, another run's checkpoint", run_dir, path)
        verdict = verify_checkpoint(path)
        if not verdict.ok:
            raise CheckpointError(f"--resume {path}: the checkpoint is damaged: {'; '.join(verdict.problems)}. "
                                  f"Resume from another one (--resume alone picks the newest that verifies)")
        _note_unverified(verdict)
        return str(path)
    if resume is None and not auto_resume:
        check_new_run(run_dir, resume, auto_resume)
        return None
    found = list_checkpoints(run_dir)
    if not found:
        emptied = sorted(p.name for p in checkpoint_dir(run_dir).glob("step-*") if STEP_DIR.match(p.name))
        if emptied:  # (a save writes .tmp-step-* and renames it whole: these lost their files afterwards)
            raise CheckpointError(f"{checkpoint_dir(run_dir)} holds {', '.join(emptied)} but no complete checkpoint (no "
                                  f"{TRAINER_STATE}): nothing to resume, and starting over would mix two runs in "
                                  f"{run_dir}. Move the checkpoints folder aside to start the run over, or give "
                                  f"another train.run_dir")
        if resume is None:
            return None
        raise FileNotFoundError(f"--resume: no checkpoint under {checkpoint_dir(run_dir)}")
    skipped: list[Verdict] = []
    for path in reversed(found):
        verdict = verify_checkpoint(path)
        if verdict.ok:
            break
        log.warning("resume: skipping the damaged checkpoint %s", verdict.describe())
        skipped.append(verdict)
    else:
        raise CheckpointError(f"no checkpoint under {checkpoint_dir(run_dir)} verifies: "
                              + " | ".join(v.describe() for v in skipped)
                              + ". Move the checkpoints folder aside to start the run over")
    _note_unverified(verdict)
    how = "--resume" if resume is not None else "train.auto_resume"
    older = f" (newer, damaged: {', '.join(v.folder.name for v in skipped)})" if skipped else ""
    log.info("%s: continuing the run in %s from %s%s", how, run_dir, path.name, older)
    return str(path)


def check_alone(cfg: Config, resume: str | None) -> None:
    """What train() in one process (no launcher's WORLD_SIZE over 1) checks before models, lock and trackers exist:
    check_new_run, check_before_start, and a train.processes it does not start said (launch.warn_unlaunched)."""
    warn_unlaunched(cfg.train.processes, cfg.train.cpu)
    check_new_run(Path(cfg.train.run_dir), resume, cfg.train.auto_resume)
    check_before_start(cfg, resume, 1)


def check_new_run(run_dir: Path, resume: str | None, auto_resume: bool) -> None:
    """train.auto_resume=false without --resume starts a new run: refused where ``run_dir`` holds a run's
    checkpoints (keep_last and a later auto-resume would mix the two runs'). Cheap: train() asks first, before the
    models are built and the trackers continue the folder's runs."""
    if resume is None and not auto_resume and (own := list_checkpoints(run_dir)):
        raise ConfigError(f"config key 'train.auto_resume': false starts a new run, but {run_dir} holds a run "
                          f"already (newest checkpoint {own[-1].name}), whose checkpoints keep_last and a later "
                          f"resume would mix with the new run's: continue that run (train.auto_resume=true, or "
                          f"--resume), or start the new one in another train.run_dir (or move {run_dir} aside)")


def _note_unverified(verdict: Verdict) -> None:
    if not verdict.has_manifest:
        log.warning("resume: %s has no manifest (written by an older version): loading it unverified",
                    verdict.folder)


def resume_from(accelerator: Accelerator, cfg: Config, path: str | Path, has_critic: bool):
    """Collective. Check that ``cfg`` may continue the checkpoint at ``path``, load it, and set this run's later
    checkpoints aside (one timeline). Returns load_checkpoint's (trainer_state, loader_state, buffers)."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no {TRAINER_STATE}): {path}")
    saved_state = json.loads((path / TRAINER_STATE).read_text())
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    reopened, kept = check_continuation(cfg, path, saved_state, deepspeed, accelerator.num_processes, has_critic,
                                        accelerator.is_main_process)
    # (cfg: the trainer's effective config, whose train section is its own copy: build.build_accelerator)
    cfg.train.phases = {**cfg.train.phases, **{n: dataclasses.replace(cfg.train.phases[n], steps=s)
                                               for n, s in kept.items()}}
    # a file one rank cannot load fails every rank at once; DeepSpeed's loading has collectives of its own, which
    # a rank failing before them could not meet in ours (as checkpoint.save_checkpoint's save_state)
    with contextlib.nullcontext() if deepspeed else all_ranks_or_raise(accelerator):
        trainer_state, loader_state, buffers = load_checkpoint(accelerator, path)
    trainer_state.update(reopened)
    on_main(accelerator, lambda: _one_timeline(cfg.train.run_dir, path, int(trainer_state.get("global_step", 0))))
    return trainer_state, loader_state, buffers


def _one_timeline(run_dir: str, path: Path, global_step: int) -> None:
    aside = set_aside_later(run_dir, path, global_step)
    if aside is not None:
        log.warning("resume: %s is not this run's newest checkpoint: moved the later ones (%s) to %s, so the run "
                    "continues one timeline; delete that folder when you no longer need it",
                    path.name, ", ".join(sorted(p.name for p in aside.iterdir())), aside)


def longer_phases(cfg: Config, saved: dict, state: dict) -> dict:
    """The trainer state's changes where ``cfg`` gives a finished phase more steps than the checkpoint's config
    (``saved``, flat): the phase that ended last, with nothing trained after it, is reopened at the step where it
    ended (its schedule now spans its new length); any other finished phase cannot grow: ConfigError."""
    order, done, step = list(cfg.train.order), int(state.get("phase_index", 0)), int(state.get("phase_step", 0))
    for index, name in enumerate(order[:done]):
        key = f"train.phases.{name}.steps"
        old, new = saved.get(key), cfg.train.phases[name].steps
        if not isinstance(old, int) or new <= old:
            continue
        stopped = state.get("stopped_early", {}).get(name)
        if stopped is None and index == done - 1 and step == 0:
            log.info("resume: %s %d -> %d: phase '%s' ended at step %d with nothing trained after it, so it "
                     "continues for %d more steps (its lr schedule now spans %d)", key, old, new, name, old,
                     new - old, new)
            return {"phase_index": index, "phase_step": old}
        why = (f"its stop rule ended it at step {stopped} (its validation number, select_on, had stopped improving)" if stopped
               is not None else f"phase '{order[index + 1]}' has trained since")
        raise ConfigError(f"resuming: {key} {old} -> {new}, but phase '{name}' is finished and {why}: more steps "
                          f"cannot be added to it in this run. Set {key}={old} to continue the run, or start a new "
                          f"run (another train.run_dir)")
    return {}


def other_validation(saved: str, now: str, main: bool = True) -> bool:
    """Whether the checkpoint validated other crops than this run will (``saved`` and ``now``: their
    data_checks.val_fingerprint; "" where unknown); said, once (``main``: by this rank)."""
    if not saved or not now or saved == now:
        return False
    warn_on_main(main)("resume: the validation set changed since the checkpoint (its shards, or data.val_* settings): "
                "validations from before measured other crops, so a gan phase's best so far is not compared with "
                "those after (its stop rule starts over)")
    return True


def shorter_phases(cfg: Config, saved: dict, state: dict) -> dict[str, int]:
    """{phase: steps} where ``cfg`` gives a phase fewer steps than it has trained: a finished phase keeps the
    length it was trained with (the checkpoint's config, ``saved``, flat), the phase in progress ends at its step.
    The run folder's config and status then say what the run did (they said "gan 60 done, step 2540/2400")."""
    order, done, step = list(cfg.train.order), int(state.get("phase_index", 0)), int(state.get("phase_step", 0))
    kept = {}
    for index, name in enumerate(order[:done + 1]):
        key, new = f"train.phases.{name}.steps", cfg.train.phases[name].steps
        old = saved.get(key) if index < done else step
        if isinstance(old, int) and new < old:
            kept[name] = old
            log.info("resume: %s %d -> %d: phase '%s' %s, so it keeps %d steps", key, saved.get(key, old), new, name,
                     f"has trained {old} steps: it ends here" if index == done else "is finished", old)
    return kept


def check_resume_config(cfg: Config, path: Path, saved_state: dict, processes: int, has_critic: bool,
                        main: bool = True) -> dict | None:
    """Raise ConfigError where ``cfg`` cannot continue the checkpoint: other phases, a key that changes a
    model's tensor shapes, or (without train.resume_allow_batch_change) another global batch or process count.
    Returns the checkpoint's config, flattened (None where it has none that reads). ``main``: this rank warns
    (of what every rank finds alike: a batch change allowed)."""
    if saved_state.get("phase_names") != list(cfg.train.order):
        raise ConfigError(f"resuming {path}: the checkpoint's phases {saved_state.get('phase_names')} differ from "
                          f"train.order {list(cfg.train.order)}: set train.order back to continue the run, or start "
                          f"a new run (another train.run_dir)")
    try:
        saved = yaml.safe_load((path / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        warn_on_main(main)("resume: %s has no readable %s: the config is not compared with it", path, CONFIG)
        return None
    saved = flatten(saved)
    now = flatten(to_dict(cfg))
    keys = GENERATOR_RESUME_KEYS + (CRITIC_SHAPE_KEYS if has_critic else ())
    shape = [k for k in keys if k in saved and saved[k] != now.get(k)]
    shape = same_shapes_but_stride(shape, *({k[6:]: v for k, v in flat.items() if k.startswith("model.")}
                                            for flat in (saved, now)))
    if shape:
        changes = ", ".join(f"{k} {saved[k]!r} -> {now.get(k)!r}" for k in shape)
        no_tensor = {f"model.{k}" for k in GENERATOR_NO_TENSOR}
        what = ("change what the trained generator computes" if set(shape) <= no_tensor else
                "change the shapes of the model's tensors")
        raise ConfigError(f"resuming {path}: {changes}: these keys {what}, so the checkpoint cannot continue with "
                          f"this config. Set them back to the checkpoint's values, or start a new run (another "
                          f"train.run_dir; model.init_from={path} starts one from its generator)")
    _check_batch(cfg, path, saved, saved_state, processes, main)
    return saved  # (the other changes: check_continuation warns of them)


def _check_batch(cfg: Config, path: Path, saved: dict, saved_state: dict, processes: int, main: bool) -> None:
    old_procs = saved_state.get("processes") or len(list(path.glob(LOADER_STATE.format(rank="*")))) or None
    old_b, old_a = saved.get("data.batch_size"), saved.get("train.grad_accum")
    if not isinstance(old_b, int) or not isinstance(old_a, int):
        return
    new_b, new_a = cfg.data.batch_size, cfg.train.grad_accum
    old_procs = old_procs or processes  # unknown (no loader files): assume it did not change
    old_global, new_global = old_b * old_a * old_procs, new_b * new_a * processes
    if old_global == new_global and old_procs == processes:
        return
    old_parts, new_parts = f"{old_b} x {old_a} x {old_procs}", f"{new_b} x {new_a} x {processes}"
    changes = []
    if old_global != new_global:
        changes.append(f"the global batch (data.batch_size x train.grad_accum x processes) changes from {old_global} "
                       f"({old_parts}) to {new_global} ({new_parts}). Learning rates follow the optimizer step, not "
                       f"the images seen, and are not rescaled: each step now averages {new_global} images instead "
                       f"of {old_global}")
    if old_procs != processes:
        same = "" if changes else f"; the global batch stays {new_global}: {old_parts} -> {new_parts}"
        changes.append(f"the process count changes ({old_procs} -> {processes}{same}), and the data loaders' "
                       f"positions are per rank: the torch loader restarts its data stream at the epoch after the "
                       f"newest any rank saved (new shuffles and crops), DALI reshards")
    message = f"resuming {path}: " + "; ".join(changes)
    if not cfg.train.resume_allow_batch_change:
        raise ConfigError(message + ". Set train.resume_allow_batch_change=true to continue anyway, or resume "
                                    "with the checkpoint's batch size and process count")
    warn_on_main(main)("%s (train.resume_allow_batch_change)", message)
