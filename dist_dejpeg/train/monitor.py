"""What a training run tells the people watching it, from rank 0: the console, the experiment trackers and
``progress.json``.

- Console: on a terminal, a tqdm bar per phase with the latest losses; without one (a SLURM log file, a pipe),
  no bar and instead one plain log line every ``train.log_every`` steps::

      gen 300/1000 (30%) | gen/l1 0.0231 gen/lpips 0.0052 | 31.2 img/s | data wait 4% | lr 1.8e-03 | ETA phase 1m52s, run 2m10s

  and one line per validation quality. Everything goes through ``logging`` (one format, level from
  ``train.log_level`` or ``--log-level``).
- Trackers: Accelerate's (``train.log_with``: tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive,
  trackio); each gets the same scalars and the validation image grid. Their files go to the run folder, and a
  resumed run continues the same wandb and MLflow runs (train/trackers.py); it has TensorBoard drop what an
  earlier session logged after the checkpoint (:meth:`Monitor.resumed`), and a session that starts the run over
  (no checkpoint) all that earlier sessions logged. The final validation's scalars are
  ``final/q10_restored_psnr`` etc., the in-phase ones ``val_q10/restored_psnr``.
- ``progress.json`` (atomic rewrite at every log window, validation, phase boundary and at the end): where the
  run stands, for ``dist-dejpeg status`` and scripts; see :data:`PROGRESS_KEYS`.

Side writes (progress.json, the trackers, the console, train.log) never end a run: train/side_writes.py.
A write that holds the run's state and finds the disk full (or the quota used up) stops it with
:class:`DiskFull` (exit 3; :meth:`Monitor.disk_full_error`).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

from dist_dejpeg.config import to_dict
from dist_dejpeg.run.files import (atomic_write_json, atomic_write_text, disk_full_text, is_disk_full, is_quota,
                                   read_json)
from dist_dejpeg.run.layout import (CONFIG, METRICS, PARTIAL_PREFIX, PROGRESS, PROGRESS_KEYS, TENSORBOARD_EVENTS,
                                    WRITE_ERRORS, MetricsMeta, latest_checkpoint, list_checkpoints, partial_checkpoints)
from dist_dejpeg.run.folder import config_summary
from dist_dejpeg.run.text import window_line
from dist_dejpeg.run.verdict import crash_line, crash_said, with_validations
from dist_dejpeg.train.checkpoint import TrainingStopped, remove_partial
from dist_dejpeg.train.run_log import close_run_log, open_run_log, to_run_log
from dist_dejpeg.train.trackers import (TRACKER_RUNS, check_trackers, continued_runs, set_mlflow_store,  # noqa: F401
                                        tracker_config, tracker_init, tracker_objects)  # (build.py: two from here)
from dist_dejpeg.train.side_writes import SideWrites
from dist_dejpeg.train.trackers import (FINAL_LOGGED, final_logged, final_tag, quiet_tensorboard_threads,
                                        tensorboard_events_at)

log = logging.getLogger("dist_dejpeg")


CONSOLE_ERRORS = (OSError, ValueError)  # a closed or broken stderr (ValueError: I/O on a closed file)


class DiskFull(TrainingStopped):
    """A write that holds the run's state found the disk full (or the quota used up); ``path``: where."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


class Monitor(SideWrites):
    """One per Trainer. Every method may be called on every rank; only rank 0 writes or prints."""

    def __init__(self, accelerator, cfg, run_dir: Path, config_dict: dict):
        self.acc, self.cfg, self.run_dir = accelerator, cfg, Path(run_dir)
        self.main = accelerator.is_main_process
        self.use_bar = bool(cfg.train.progress) and self.main and sys.stderr.isatty()
        self.order = list(cfg.train.order)
        self.steps = {n: cfg.train.phases[n].steps for n in self.order}
        self.bar = None
        self.closed = False
        self.write_errors: dict[str, int] = {}  # side write ("progress", "tracker.<name>", ...) -> failures
        self.final_done, self.final_at = set(), None  # trackers.final_logged's; (step, val_set) of the final logged
        self.final_failed: set[str] = set()  # trackers whose final validation's writes failed
        self.tb_retry: int | None = None  # log calls left before a failed TensorBoard writer is replaced
        self.progress: dict = {"status": "running", "reason": "", "phases": self.order,
                               "total_steps": sum(self.steps.values()), "host": socket.gethostname(),
                               "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                               "processes": self.acc.num_processes, "losses": {}, "last_val": None, "best": None,
                               "images_per_s": None, "data_wait_frac": None, "lr": None, "eta_phase_s": None,
                               "eta_run_s": None, "val_s": None, WRITE_ERRORS: {}}
        self.val_plan = config_summary(to_dict(cfg), run_dir)["phases"]  # (kind, val_every as status reads them)
        self.val_times: list[float] = []  # (seconds) this session's validations in a phase: progress.json's val_s
        self.run_log = open_run_log(self.run_dir) if self.main else None  # <run_dir>/train.log (train/run_log.py)
        # (TensorBoard's writer thread prints a traceback when a write fails: side_write says it instead)
        self.loud_threads = quiet_tensorboard_threads() if self.main and "tensorboard" in cfg.train.log_with else None
        init, self.mlflow_store = tracker_init(list(cfg.train.log_with), self.run_dir)
        try:
            if self.mlflow_store:
                (self.run_dir / "mlflow").mkdir(exist_ok=True)
                set_mlflow_store(self.mlflow_store)
            accelerator.init_trackers(self.run_dir.name or "dist_dejpeg", init_kwargs=init)
            if not list_checkpoints(self.run_dir):  # this session starts the run over (train/trackers.py)
                self._restart_tensorboard(0, earlier_only=True)
            for tracker in accelerator.trackers if self.main else []:
                run = tracker.active_run.data.params if tracker.name == "mlflow" else None
                tracker.store_init_configuration(tracker_config(config_dict, run))
        except Exception as err:  # noqa: BLE001 - a tracker that cannot start: say so now, not hours later
            from dist_dejpeg.config import ConfigError

            if self.mlflow_store:
                set_mlflow_store(None)
            close_run_log(self.run_log)
            if self.loud_threads:
                self.loud_threads()
            again = (f"; it continues the runs named in {self.run_dir / TRACKER_RUNS}: delete that file to start "
                     f"new ones" if continued_runs(self.run_dir) else "")
            raise ConfigError(f"config key 'train.log_with': a tracker of {cfg.train.log_with} could not start "
                              f"({type(err).__name__}: {err}){again}") from err
        store = self.mlflow_store or os.environ.get("MLFLOW_TRACKING_URI")  # the run ids, for the next session
        runs = {t.name: t.run.id if t.name == "wandb" else {"run_id": t.active_run.info.run_id, "store": store}
                for t in (accelerator.trackers if self.main else []) if t.name in ("wandb", "mlflow")}
        if runs and runs != read_json(self.run_dir / TRACKER_RUNS):
            with self.side_write("trackers", path=self.run_dir / TRACKER_RUNS):
                atomic_write_json(self.run_dir / TRACKER_RUNS, runs)

    def write_config(self, config_yaml: str) -> None:
        """``config.yaml`` (main process): the run's state, so a full disk here stops the run (not a side write)."""
        if self.main:
            atomic_write_text(self.run_dir / CONFIG, config_yaml)

    def write_metrics(self, results: dict, *, lpips: str, state, val_images: int, skipped: dict, last_train: dict,
                      ema: dict) -> None:
        """``metrics.json`` (main process): the final validation with its meta (run/layout.MetricsMeta: how the run
        got there; ``state``: the TrainerState) and the side-write failure counts. Not a side write: it raises."""
        if not self.main:
            return
        self._log_errors()
        m, lo, t = self.cfg.model, self.cfg.loss, self.cfg.train
        meta = MetricsMeta(
            lpips=lpips, encoder=f"{m.encoder} ({'ImageNet' if m.pretrained else 'random init'})",
            steps={n: t.phases[n].steps for n in t.order}, stopped_early=state.stopped_early,
            global_step=state.global_step, processes=self.acc.num_processes, val_images_per_quality=val_images,
            data_skipped=skipped, last_train_log=last_train,  # last_train: per phase, rank 0's newest window
            loss_lpips=f"lpips-{lo.lpips_net}" + ("" if lo.lpips_pretrained else " (random backbone)"),
            write_errors=dict(self.write_errors), ema=ema, train_seconds=state.train_seconds)
        atomic_write_json(self.run_dir / METRICS, dict(results, meta=meta.to_dict()))

    def disk_full_error(self, err: BaseException) -> BaseException:
        """What a run that failed with ``err`` raises: a :class:`DiskFull` with the message users need when ``err``
        is a full disk (the main process first removes the half-written checkpoint folder), else ``err``."""
        if isinstance(err, TrainingStopped):
            return err
        if not is_disk_full(err):  # a crash: progress.json says why, for `status` (when it can still be written)
            self.finish("crashed", crash_said(err) or crash_line(err))  # (a likely cause, where one misleads)
            return err
        partial = partial_checkpoints(self.run_dir)
        where = Path(getattr(err, "filename", None) or (partial[-1] if partial else self.run_dir))
        # a file of the checkpoint being saved, whose .tmp-step-* folder is removed below: the checkpoints folder said
        tmp = next((p for p in (where, *where.parents) if p.name.startswith(PARTIAL_PREFIX)), None)
        full = disk_full_text(err, where := tmp.parent if tmp else where) + (  # (the space before the removal)
            f" (saving checkpoint step-{tmp.name[len(PARTIAL_PREFIX):]})" if tmp else "")
        if self.main:
            remove_partial(self.run_dir)  # the lock is still held (fit releases it after this)
        last = latest_checkpoint(self.run_dir)
        rerun = "rerun the same command" if self.cfg.train.auto_resume else "rerun it with --resume"
        message = (f"{full}; free space{' within the quota' if is_quota(err) else ''} and {rerun} "
                   + (f"(the last complete checkpoint is {last})" if last else "(there is no checkpoint yet)"))
        self.finish("stopped", message)
        stop = DiskFull(message, where)
        stop.__cause__ = err
        return stop

    # -- trackers --------------------------------------------------------------------------------------
    def scalars(self, values: dict, step: int) -> None:
        if self.main:
            for tracker in self.acc.trackers:  # as accelerator.log, but one failing tracker stops neither the others
                if not (final_tag(next(iter(values), "")) and tracker.name in self.final_done):  # (had it)
                    with self._tracker_write("tracker", tracker):  # nor the run
                        tracker.log(values, step=step)

    def set_lengths(self, steps: dict[str, int]) -> None:
        """The phases' lengths, where resuming kept a phase's trained steps over a shorter config (resume.py)."""
        self.steps = dict(steps)
        self.progress["total_steps"] = sum(self.steps.values())

    def resumed(self, global_step: int, done: bool = False, val_set: str = "") -> None:
        """A run resumed from the checkpoint at ``global_step``: TensorBoard drops what an earlier session logged
        after it (steps a kill or crash lost; a rollback's abandoned ones), so no curve has two points per step
        or goes back in time. ``done``: every phase is (a finished run validating again, one stopped in its final
        validation): the final validation logs at ``global_step`` again, so TensorBoard drops that step too and
        gets back what else earlier sessions logged there (the last window, the last validation) but the final
        validation's, unless it had that (trackers.final_logged; ``val_set``: the fingerprint validated). wandb cannot
        (its steps only go forward): said, with the steps it will drop."""
        if not self.main:
            return
        self.final_done = final_logged(self.run_dir, global_step, val_set) if done else set()
        self._restart_tensorboard(global_step if done else global_step + 1, keep_step=done)
        earlier = (read_json(self.run_dir / PROGRESS) or {}).get("global_step")  # (the last session's, until ours)
        if "wandb" in [t.name for t in self.acc.trackers] and isinstance(earlier, int) and earlier > global_step:
            log.warning("resume: an earlier session logged steps %d..%d, after this checkpoint: wandb keeps those and "
                        "drops what this session logs up to step %d (its steps only go forward); TensorBoard shows "
                        "this session's, MLflow both", global_step + 1, earlier, earlier)

    def _restart_tensorboard(self, purge_step: int, earlier_only: bool = False, keep_step: bool = False) -> None:
        """A new TensorBoard writer whose ``purge_step`` records a restart in the event files: TensorBoard drops
        what earlier files logged at that step or later. ``earlier_only``: only where earlier sessions wrote files
        (the writer Accelerate started has one of its own). ``keep_step``: what they logged at ``purge_step``
        is written again after it, but the final validation's (its scalars and image grid)."""
        for tracker in self.acc.trackers if self.main else []:
            if tracker.name != "tensorboard":
                continue
            if earlier_only and len(list(Path(tracker.logging_dir).glob(TENSORBOARD_EVENTS))) <= 1:
                continue
            with self.side_write(f"tracker.{tracker.name}", (Exception,)):
                tracker.writer.close()
                drop = (lambda tag: False) if "tensorboard" in self.final_done else final_tag
                kept = tensorboard_events_at(tracker.logging_dir, purge_step, drop) if keep_step else []
                tracker.writer = type(tracker.writer)(tracker.logging_dir, purge_step=purge_step)
                for event in kept:
                    tracker.writer.file_writer.add_event(event, walltime=event.wall_time)

    def image(self, tag: str, grid, step: int) -> None:
        """``grid``: 3 x H x W float in [0, 1] (torch). To every tracker that takes images."""
        if not self.main:
            return
        chw = grid.detach().float().clamp(0, 1).cpu().numpy()
        hwc = (chw.transpose(1, 2, 0) * 255).round().astype(np.uint8)
        for tracker in [t for t in self.acc.trackers if not (final_tag(tag) and t.name in self.final_done)]:
            with self._tracker_write("image", tracker):
                if tracker.name == "tensorboard":
                    tracker.writer.add_image(tag, chw, step)
                elif tracker.name == "mlflow":
                    import mlflow

                    mlflow.log_image(hwc, key=tag.replace("/", "_"), step=step)
                elif hasattr(tracker, "log_images"):
                    tracker.log_images({tag: [hwc]}, step=step)

    # -- console and progress.json ------------------------------------------------------------------------
    def start_phase(self, name: str, index: int, initial: int, global_step: int) -> None:
        self.progress.update(phase=name, phase_index=index, phase_step=initial, phase_steps=self.steps[name],
                             global_step=global_step)
        if self.use_bar:
            from tqdm.auto import tqdm

            with self.side_write("console", CONSOLE_ERRORS):
                self.bar = tqdm(total=self.steps[name], initial=initial, desc=name, dynamic_ncols=True)
        line = f"phase {name} ({index + 1}/{len(self.order)}): steps {initial}..{self.steps[name]}"
        if self.bar is None and self.main:
            log.info(line)
        else:
            to_run_log(self.run_log, line)
        self._write()

    def advance(self) -> None:
        self._bar(lambda bar: bar.update(1))

    def window(self, name: str, scalars: dict, phase_step: int, global_step: int, seconds_per_step: float) -> None:
        """One logged window: trackers, then the bar's postfix or a plain line, then progress.json."""
        self._retry_tensorboard()
        self.scalars(scalars, global_step)
        if not self.main:
            return
        left_phase = self.steps[name] - phase_step
        later = sum(self.steps[n] for n in self.order[self.order.index(name) + 1:])
        eta_phase = left_phase * seconds_per_step
        eta_run = (left_phase + later) * seconds_per_step  # later phases at this phase's rate: a rough figure
        losses = {k[len("train/"):]: v for k, v in scalars.items()
                  if k not in ("train/images_per_s", "train/data_wait_frac", "train/lr", "train/critic_lr")}
        self.progress.update(phase_step=phase_step, global_step=global_step, losses=losses,
                             images_per_s=scalars.get("train/images_per_s"),
                             data_wait_frac=scalars.get("train/data_wait_frac"), lr=scalars.get("train/lr"),
                             eta_phase_s=eta_phase, eta_run_s=eta_run)
        postfix = {k.split("/", 1)[1]: f"{v:.4g}" for k, v in scalars.items() if "acc" not in k}
        # (the console's ETA adds the validations left, as status does; progress.json's eta_*_s are the steps')
        phases = [{**p, "steps": self.steps[p["name"]]} for p in self.val_plan]  # (set_lengths may change steps)
        eta = with_validations(phases, self.order.index(name), phase_step, eta_phase, eta_run, self.progress["val_s"])
        line = window_line(name, phase_step, self.steps[name], losses, scalars, *eta)
        if self._bar(lambda bar: bar.set_postfix(postfix)):
            to_run_log(self.run_log, line)
        else:
            log.info(line)
        self._write()

    def validation(self, tag: str, results: dict, step: int, seconds: float | None = None) -> None:
        """Per-quality results {q10: {jpeg: {...}, restored: {...}}}: trackers, one line per quality. The final
        validation has its own tags (``final/q10_restored_psnr``): it shares its step with the gan phase's last
        validation, and measures the kept best generator, not always the weights that one measured."""
        self._retry_tensorboard()
        if seconds is not None and tag != "final":  # (None: the numbers of one before) -> val_s, a phase's mean
            self.val_times.append(seconds)
            self.progress["val_s"] = sum(self.val_times) / len(self.val_times)
        for q, groups in results.items():
            for group, values in groups.items():
                name = f"final/{q}_{group}" if tag == "final" else f"val_{q}/{group}"
                self.scalars({f"{name}_{m}": v for m, v in values.items()}, step)
        if not self.main:
            return
        lpips = "LPIPS" if self.cfg.loss.lpips_pretrained else "LPIPS(random)"  # as status labels it
        for q in sorted(results, key=lambda k: int(k[1:])):
            j, r = results[q]["jpeg"], results[q]["restored"]
            self._emit(f"val {tag} @{step} {q}: PSNR {j['psnr']:.3f} -> {r['psnr']:.3f} dB, SSIM {j['ssim']:.4f} -> "
                       f"{r['ssim']:.4f}, {lpips} {j['lpips']:.4f} -> {r['lpips']:.4f}")
        self.progress["last_val"] = results
        self._write()

    def final(self, results: dict, grid, step: int, val_set: str) -> None:
        """The final validation (``grid``: its image grid, or None) to the trackers but those an earlier session of the
        run gave it (resumed); who got it is recorded when they close (flushed: trackers.FINAL_LOGGED)."""
        if self.final_done and self.main:
            log.info("final validation: not logged again to %s (an earlier session did)", ", ".join(self.final_done))
        self.final_at, before = (step, val_set), dict(self.write_errors)
        self.validation("final", results, step)
        if grid is not None:
            self.image("val/jpeg_restored_clean_final", grid, step)
        self.final_failed = self._failed_since(before)  # (not recorded as given it: a rerun tries them again)

    def _failed_since(self, before: dict) -> set:
        """The trackers with a failed write since the side-write counts were ``before``."""
        return {kind.split(".", 1)[1] for kind, n in self.write_errors.items()
                if kind.startswith(("tracker.", "image.")) and n > before.get(kind, 0)}

    def set_best(self, best: dict) -> None:
        """The stop rule's best validation value so far ({metric, value, step, phase})."""
        self.progress["best"] = best
        self._write()

    def end_phase(self, name: str, global_step: int) -> None:
        self._close_bar()
        self.progress.update(phase_step=self.steps[name], global_step=global_step, eta_phase_s=0.0)
        self._write()

    def finish(self, status: str, reason: str = "", global_step: int | None = None) -> None:
        """``status``: finished, preempted, stopped (a non-finite loss, a full disk) or crashed (an error). A stop's
        ``reason`` goes into train.log alone: the command it ends prints it (cli._stopped, once per node), so a
        terminal reads it once, not logged and printed."""
        self._close_bar()
        self._log_errors()
        if status in ("stopped", "preempted") and not self.closed:
            to_run_log(self.run_log, reason, level=logging.ERROR if status == "stopped" else logging.INFO)
        if self.write_errors and self.main:
            log.warning("side writes that failed in this run (counted, not logged after the first): %s",
                        ", ".join(f"{k} {n}" for k, n in self.write_errors.items()))
        self.progress.update(status=status, reason=reason, **({} if global_step is None else {"global_step": global_step}))
        if status == "finished":
            self.progress.update(eta_phase_s=0.0, eta_run_s=0.0)
        self._write()

    def close(self) -> None:
        self._close_bar()
        if not self.closed:
            self.closed = True
            close_run_log(self.run_log)  # (its last lines: the trackers' below go to the console only)
            # not accelerator.end_training(): it also destroys the process group, which the run still uses
            # (a final barrier; benchmarks and tests that keep the Accelerator) and other ranks may be inside
            before = dict(self.write_errors)
            for tracker in self.acc.trackers:
                with self.side_write(f"tracker.{tracker.name}", (Exception,)):  # e.g. TensorBoard's last flush
                    tracker.finish()
            if self.loud_threads:
                self.loud_threads()
            if self.mlflow_store:
                set_mlflow_store(None)
            if self.final_at is not None and self.main:
                failed = self.final_failed | self._failed_since(before)  # (its final values may be lost)
                names = sorted(self.final_done | {t.name for t in self.acc.trackers} - failed)
                with self.side_write("trackers", path=self.run_dir / FINAL_LOGGED):
                    atomic_write_json(self.run_dir / FINAL_LOGGED, dict(zip(("step", "val_set"), self.final_at),
                                                                        trackers=names))

    def _bar(self, action) -> bool:
        """``action(bar)`` on the console bar; whether there was one. A bar whose stream fails is dropped: plain
        log lines follow."""
        if self.bar is None:
            return False
        with self.side_write("console", CONSOLE_ERRORS):
            action(self.bar)
            return True
        self.bar, self.use_bar = None, False
        return False

    def _close_bar(self) -> None:
        self._bar(lambda bar: bar.close())
        self.bar = None

    def _emit(self, line: str) -> None:
        """A line that must not tear the bar apart on a terminal."""
        if self._bar(lambda bar: bar.write(line, file=sys.stderr)):
            to_run_log(self.run_log, line)
        else:
            log.info(line)

    def _write(self) -> None:
        if not self.main or not self.run_dir.is_dir():
            return
        self._log_errors()
        self.progress["time"] = time.time()
        data = {k: self.progress.get(k) for k in PROGRESS_KEYS}
        with self.side_write("progress", path=self.run_dir / PROGRESS):
            atomic_write_json(self.run_dir / PROGRESS, data, indent=1, default=float)
