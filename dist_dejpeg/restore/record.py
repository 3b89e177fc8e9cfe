"""restore's per-file record: one JSON object a line, appended to ``restore-record.jsonl`` in the output folder (the
command's default; ``--record PATH`` another file, ``--no-record`` none; the API's ``restore_files(record=PATH)``)
as each file's result is final, so a night's restore can be audited, and an interrupted night and its rerun form one
file (each rerun appends; the last line of a source is its latest). Torch-free.

Each line: ``time`` (local, ISO 8601 with its offset), ``status`` (restored, passed through: its file or its pixels
unchanged, re-encoded: not restored but written with loss, a PNG given --format jpg, skipped, left alone: an
earlier restore's output a search found, failed, not begun: the disk was full or Ctrl-C came first), ``source``,
``source_bytes``, ``output`` (the file written, or skipped as there; its name as restore chose it: a.jpg.png),
``quality`` and ``quality_from`` (given, file tables, pixels, or why unknown), ``reason`` (the guard's decision),
``error``, ``seconds``, ``model``, and what the restored pixels depend on beside the model and the photo: ``tile``,
``overlap`` (the generator's group norm and keep_mean act per tile: another tiling gives other pixels, a few levels
apart; the same tiling gives the same, up to a level in a few pixels at another batch size or thread count: float
rounding, oneDNN's kernels), ``batch_size``, ``threads`` (torch's intra-op threads; None for an ONNX model),
``device`` and ``precision``. Its suffix
is no image's: a later search of the folder never reads it as one.

The record is a side write: a line that cannot be written (a full disk, a quota) is logged once with its reason and
then counted (``Record.failed``; the command's summary says how many), and the restore goes on; each line is written
whole with one append (run/files.append_line, as a run's sessions.jsonl), a line a failed write left cut short
ended first.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from dist_dejpeg.run.files import append_line

log = logging.getLogger(__name__)

RECORD_NAME = "restore-record.jsonl"  # in the output folder: no image suffix, never an input of a later search
SETTINGS = ("tile", "overlap", "batch_size", "threads", "device", "precision")  # each line's: how it was restored (restorer_settings)


def status(result) -> str:
    """What was done with a RestoreResult's file, in the record's words."""
    if result.earlier:
        return "left alone"
    if result.skipped:
        return "skipped"
    if result.stopped or (result.error is None and result.output is None):
        return "not begun"
    if result.error is not None:
        return "failed"
    if result.passthrough:  # (not restored: its input file, or its pixels, kept; "re-encoded": with loss)
        return "re-encoded" if getattr(result, "reencoded", False) else "passed through"
    return "restored"


def size_of(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def restorer_settings(restorer) -> dict:
    """A restorer's tile, overlap, batch size, thread count, device and precision, as each record line has them
    (None: one it lacks)."""
    device, bf16 = getattr(restorer, "device", None), getattr(restorer, "bf16", False)  # (ONNX: float32 alone)
    torch = sys.modules.get("torch") if hasattr(restorer, "bf16") else None  # (a PyTorch restorer imported it)
    return {"tile": getattr(restorer, "tile", None), "overlap": getattr(restorer, "overlap", None),
            "batch_size": getattr(restorer, "batch_size", None), "threads": torch.get_num_threads() if torch else None,
            "device": None if device is None else str(device),
            "precision": ("bf16" if bf16 else "fp32") if hasattr(restorer, "tile") else None}


class Record:
    """Appends one line per finished RestoreResult to ``path`` (None: a record that writes nothing); ``model``: what
    restored (the restorer's model file); ``settings``: restorer_settings' (tile, overlap, batch size, threads,
    device, precision), on every line. Each result is written once, whatever calls ``add`` again."""

    def __init__(self, path: str | Path | None, model: str | None = None, settings: dict | None = None):
        self.path, self.model = (Path(path) if path is not None else None), model
        self.settings = {key: None for key in SETTINGS} | (settings or {})
        self.failed, self.written = 0, set()

    def add(self, result) -> None:
        if self.path is None or id(result) in self.written:
            return
        self.written.add(id(result))
        line = {"time": datetime.now().astimezone().isoformat(timespec="seconds"), "status": status(result),
                "source": result.source, "source_bytes": size_of(result.source), "output": result.output,
                "quality": result.quality, "quality_from": result.quality_from or None, "reason": result.note or None,
                "error": result.error, "seconds": round(result.seconds, 3), "model": self.model, **self.settings}
        try:  # (ASCII, JSON's escapes: a name that is no UTF-8, held as surrogates, is written too, and read back)
            append_line(self.path, json.dumps(line))  # (a line a full disk cut short is ended first)
        except OSError as err:
            if not self.failed:
                log.warning("could not write the restore record %s (%s): its lines are counted, the restore goes on",
                            self.path, f"{type(err).__name__}: {err.strerror or err}")
            self.failed += 1

    def add_all(self, results) -> None:
        for result in results:
            self.add(result)


class RestoreInterrupted(KeyboardInterrupt):
    """restore_files stopped by Ctrl-C, a KeyboardInterrupt still: ``results`` holds every file's result, those not
    finished ``stopped`` with the error "not restored: interrupted", each recorded in ``record``."""

    def __init__(self, results: list, record: Record):
        super().__init__("interrupted")
        self.results, self.record = results, record
        for result in results:
            if result.output is None and result.error is None and not result.earlier:
                result.stopped, result.error = True, "not restored: interrupted"
        record.add_all(results)
