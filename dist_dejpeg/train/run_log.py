"""The run folder's ``train.log``: rank 0's log lines, appended session after session, so that a run started
from a terminal (or a job whose own log is elsewhere) keeps what it said beside its checkpoints. The lines a
terminal's progress bar shows in place of log lines (the log windows, validation) go into the file as log lines.
A file that cannot be written (a full disk, a quota, the folder gone) is said once and tried again every
:data:`RETRY_LINES` lines (a spell of full disk loses that spell's lines only, counted as ``lost``: the Monitor's
``write_errors``); the console keeps every line."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from dist_dejpeg.run.files import open_regular

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RUN_LOG = "train.log"
RETRY_LINES = 20  # a train.log that failed is opened again for every 20th line after


class RunLog(logging.FileHandler):
    """A FileHandler on ``<run_dir>/train.log`` that, after a failed write (one warning), skips lines but every
    RETRY_LINES-th, which opens the file again; ``lost``: the lines not written."""

    def __init__(self, run_dir: Path):
        super().__init__(Path(run_dir) / RUN_LOG, mode="a", encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.failed, self.warned, self.lost, self.error = False, False, 0, False

    def _open(self):
        """The file opened to append, never through a symbolic link or to anything but a regular file (a link
        planted in a shared run folder would have the log appended to the file it points to)."""
        fd = open_regular(self.baseFilename, os.O_WRONLY | os.O_APPEND)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed:
            self.lost += 1
            if self.lost % RETRY_LINES:
                return
        self.error = False
        try:  # (FileHandler opens its file outside the try that sends write errors to handleError)
            super().emit(record)  # (reopens the file once close() left it closed: mode "a")
        except OSError:
            self.handleError(record)
        if self.failed and not self.error:
            self.failed, self.lost = False, self.lost - 1
            print(f"note: {self.baseFilename} is written again; {self.lost} lines before this one are missing from "
                  f"it (the console has them)", file=sys.stderr)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self.error = True
        if not self.failed:
            self.failed, self.lost = True, self.lost + 1
            err = sys.exc_info()[1]
            if not self.warned:
                self.warned = True
                print(f"warning: cannot write {self.baseFilename} ({type(err).__name__}: {err}): the log goes to the "
                      f"console only, and the file is tried again every {RETRY_LINES} lines", file=sys.stderr)
        with contextlib.suppress(OSError, ValueError):  # (its buffer cannot be flushed either)
            self.close()


def open_run_log(run_dir: Path) -> RunLog:
    """Attach a RunLog to the root logger (every logger's lines at the level setup_logging set)."""
    handler = RunLog(run_dir)
    logging.getLogger().addHandler(handler)
    return handler


def close_run_log(handler: RunLog | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


def to_run_log(handler: RunLog | None, line: str, name: str = "dist_dejpeg", level: int = logging.INFO) -> None:
    """A line the console shows otherwise (the progress bar's, the command's own last word), into the file alone."""
    if handler is not None:
        handler.handle(logging.makeLogRecord({"name": name, "levelno": level, "levelname": logging.getLevelName(level),
                                              "msg": line}))
