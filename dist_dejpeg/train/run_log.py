"""The run folder's ``train.log``: rank 0's log lines, appended session after session, so that a run started
from a terminal (or a job whose own log is elsewhere) keeps what it said beside its checkpoints. The lines a
terminal's progress bar shows in place of log lines (the log windows, validation) go into the file as log lines.
A file that cannot be written (a full disk, the folder gone) is said once; the console keeps every line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RUN_LOG = "train.log"


class RunLog(logging.FileHandler):
    """A FileHandler on ``<run_dir>/train.log`` that stops after its first failed write, with one warning."""

    def __init__(self, run_dir: Path):
        super().__init__(Path(run_dir) / RUN_LOG, mode="a", encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        try:  # (FileHandler opens its file outside the try that sends write errors to handleError)
            super().emit(record)
        except OSError:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if not self.failed:
            self.failed = True
            err = sys.exc_info()[1]
            print(f"warning: cannot write {self.baseFilename} ({type(err).__name__}: {err}): the log goes to the "
                  f"console only from here", file=sys.stderr)
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
