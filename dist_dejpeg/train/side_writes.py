"""Side writes of a training run's rank 0: what the run tells its watchers and can do without.

Side writes never end a run: a failure of ``progress.json``, a tracker's ``log`` or ``finish``, an image grid or
the console bar, ``train.log`` (an OSError; for trackers any exception: wandb, mlflow and TensorBoard's writer
thread raise their own) is logged once per kind with its reason, then only counted (:attr:`Monitor.write_errors`,
in ``progress.json``, which ``status`` shows, and ``metrics.json``'s meta as ``write_errors``), and the run goes
on. A failed TensorBoard writer is replaced every ``TB_RETRY_CALLS`` log calls and train.log tried again every
``RETRY_LINES`` lines, so a spell of full disk or quota loses that spell's entries only. A full disk there is said
as such, with the folder that failed and its free space, a quota (EDQUOT) as a quota; the writes that hold the
run's state (checkpoints, ``config.yaml``, ``metrics.json``, the generator file) are not side writes: when one
finds the disk full the run stops with :class:`DiskFull` (exit 3), a message naming the path, the free space (a
quota: the folder and how to check it) and the newest complete checkpoint, and no half-written checkpoint folder
(:meth:`Monitor.disk_full_error`), instead of torch's "unexpected pos".
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from dist_dejpeg.run.files import disk_full_text, is_disk_full, is_quota
from dist_dejpeg.run.layout import METRICS, PROGRESS, WRITE_ERRORS
from dist_dejpeg.train.trackers import TB_RETRY_CALLS, reopen_tensorboard

log = logging.getLogger("dist_dejpeg")


class SideWrites:
    """Monitor's side writes; it sets ``acc``, ``main``, ``run_dir``, ``run_log``, ``progress``, ``write_errors``
    (side write ("progress", "tracker.<name>", "train.log"...) -> failures) and ``tb_retry`` (log calls left before
    a failed TensorBoard writer is replaced, or None)."""

    @contextlib.contextmanager
    def side_write(self, kind: str, catch: tuple = (OSError,), path: Path | None = None):
        """A block whose ``catch`` errors are logged (the first of each ``kind``) and counted, not raised."""
        try:
            yield
        except catch as err:
            self.write_errors[kind] = self.write_errors.get(kind, 0) + 1
            self.progress[WRITE_ERRORS] = dict(self.write_errors)
            if self.write_errors[kind] > 1:
                return
            later = f"later {kind} failures are counted in {PROGRESS} and {METRICS} ({WRITE_ERRORS}), not logged"
            if is_disk_full(err):
                where = getattr(err, "filename", None) or path or self.run_dir
                log.warning("%s: a %s write failed; training goes on without it, but a checkpoint that finds the %s "
                            "stops the run (the newest complete one is kept); %s", disk_full_text(err, where), kind,
                            "quota still used up" if is_quota(err) else "disk still full", later)
            else:
                log.warning("a %s write failed (%s: %s); training goes on without it; %s", kind, type(err).__name__,
                            str(err)[:300], later)

    @contextlib.contextmanager
    def _tracker_write(self, kind: str, tracker):
        """A side write to ``tracker`` (its folder named when the disk fills); a failed TensorBoard one has its
        writer replaced ``TB_RETRY_CALLS`` log calls later (:meth:`_retry_tensorboard`)."""
        failed = True
        with self.side_write(f"{kind}.{tracker.name}", (Exception,), path=getattr(tracker, "logging_dir", None)):
            yield
            failed = False
        if failed and tracker.name == "tensorboard" and self.tb_retry is None:
            self.tb_retry = TB_RETRY_CALLS

    def _retry_tensorboard(self) -> None:
        """One log call (a window, a validation) nearer to replacing a failed TensorBoard writer; at the last, a
        new writer (a new event file), which fails in turn while the disk is still full."""
        if self.tb_retry is None or not self.main:
            return
        self.tb_retry -= 1
        if self.tb_retry > 0:
            return
        self.tb_retry = None
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                with self._tracker_write("tracker", tracker):
                    reopen_tensorboard(tracker)
                    log.info("TensorBoard: a new writer in %s after failed writes (%s)", tracker.logging_dir,
                             ", ".join(f"{k} {n}" for k, n in self.write_errors.items() if k.endswith("tensorboard")))

    def _log_errors(self) -> None:
        """train.log's lost lines (train/run_log.py), counted with the other side writes."""
        if self.run_log is not None and self.run_log.lost:
            self.write_errors["train.log"] = self.run_log.lost
            self.progress[WRITE_ERRORS] = dict(self.write_errors)

