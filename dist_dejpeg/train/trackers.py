"""The experiment trackers of a run (``train.log_with``, through Accelerate): checked before any work, their files
in the run folder, and one tracker run per run folder over all its sessions.

- Files: TensorBoard in ``<run_dir>/tb`` (one folder, the config as its hparams), wandb in ``<run_dir>/wandb``,
  MLflow in ``<run_dir>/mlflow/`` (``mlflow.db``, SQLite, and ``artifacts/``), dvclive in ``<run_dir>/dvclive``,
  not in the working directory (their defaults: every run's in one ``./wandb``, ``./mlflow.db``...). Where the
  library's own env var says where (WANDB_DIR, MLFLOW_TRACKING_URI), it wins.
- Sessions: a resumed run (a requeued job, a longer phase) logs to the wandb run (``id``, ``resume="allow"``) and
  the MLflow run (``run_id``; one of the same store) of its first session: :data:`TRACKER_RUNS` keeps their ids
  (WANDB_RUN_ID and MLFLOW_RUN_ID win); dvclive appends (``resume=True``). A session with no checkpoint of the run
  to resume (the first, or one after a kill before any checkpoint) starts the run over: new wandb and MLflow runs
  (their steps 1, 2... again would go to the old ones), and TensorBoard drops what earlier sessions logged. Steps
  that an earlier session logged after the checkpoint the run resumed from come again: TensorBoard drops the old
  ones (``Monitor.resumed``), wandb the new ones (its steps only go forward; the resume warns), MLflow keeps both.
- The final validation: a finished run run again (or one stopped in its final validation) validates again at the
  same step; the trackers that an earlier session gave it (:data:`FINAL_LOGGED`, written when they closed) keep
  that one and get none again: MLflow kept both, wandb warned and dropped it, TensorBoard rewrote it. A changed
  validation set (other numbers) is logged again.
- Failures: a TensorBoard writer whose thread died on a write (a full disk, a quota) fails every later call; the
  Monitor gets a new one (:func:`reopen_tensorboard`) every ``TB_RETRY_CALLS`` log calls until one works.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from dist_dejpeg.config import TRACKER_PACKAGES, ConfigError, flatten
from dist_dejpeg.run.files import read_json
from dist_dejpeg.run.layout import TENSORBOARD_EVENTS, list_checkpoints
from dist_dejpeg.run.net import unreachable

TRACKER_RUNS = "trackers.json"  # <run_dir>/: {"wandb": id, "mlflow": {"run_id", "store"}} of the run's trackers
FINAL_LOGGED = "final_logged.json"  # <run_dir>/: {"step", "val_set", "trackers"}: who got the final validation
TB_RETRY_CALLS = 10  # a failed TensorBoard writer is replaced at the 10th log call (window, validation) after
MLFLOW_PROBE_S = 10  # an MLflow server that does not answer in this long fails the start (check_mlflow_server)


def check_trackers(names: list[str]) -> None:
    """Every name known and its packages importable, before any work (a ConfigError naming the fix)."""
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"config key 'train.log_with': unknown tracker '{name}' (known: "
                              f"{', '.join(TRACKER_PACKAGES)})")
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ConfigError(f"config key 'train.log_with': tracker '{name}' needs the {TRACKER_PACKAGES[name]} "
                              f"package, which is not installed: pip install {TRACKER_PACKAGES[name]}")
        missing = [p for p in ("sqlalchemy", "alembic") if importlib.util.find_spec(p) is None]
        if name == "mlflow" and missing and not os.environ.get("MLFLOW_TRACKING_URI"):
            raise ConfigError(f"config key 'train.log_with': mlflow without MLFLOW_TRACKING_URI keeps the run in "
                              f"<run_dir>/mlflow/mlflow.db (SQLite), which needs {' and '.join(missing)} (mlflow-skinny "
                              f"lacks them): pip install mlflow, or set MLFLOW_TRACKING_URI (e.g. an MLflow server)")
        if name == "mlflow":
            check_mlflow_server(os.environ.get("MLFLOW_TRACKING_URI", ""))


def check_mlflow_server(uri: str) -> None:
    """An http(s) tracking URI must answer now: MLflow retries each request 7 times with backoff and waits up to
    120 s for each, so a server that is down or mistyped would hold the start for many minutes (and fail it
    anyway). A file or database store is MLflow's to open; it is not probed."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    why = unreachable(uri, MLFLOW_PROBE_S)
    if why:
        shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # (no credentials in a log)
        raise ConfigError(f"config key 'train.log_with': the MLflow server MLFLOW_TRACKING_URI={shown} did not "
                          f"answer within {MLFLOW_PROBE_S} s ({why}): start it or correct the URI, or leave mlflow "
                          f"out of train.log_with (MLflow's own retries, MLFLOW_HTTP_REQUEST_MAX_RETRIES and "
                          f"MLFLOW_HTTP_REQUEST_TIMEOUT, would have taken minutes to say so)")


def tracker_objects(names: list[str], run_dir: Path) -> list:
    """Accelerate's ``log_with``: TensorBoard as an instance writing to ``<run_dir>/tb``, the others by name."""
    from accelerate.tracking import TensorBoardTracker

    class OneFolderTensorBoard(TensorBoardTracker):
        """The config as hparams in the run's own event files: Accelerate's writes them, and an hparams.yml,
        to two new ``tb/<time>/`` folders at every start and resume, each a run of its own in TensorBoard's list
        (``config.yaml`` beside ``tb/`` is the run's config file). Only the session start and end records: the
        experiment record (``_hparams_/experiment``) that ``hparams()`` also makes would, in a sweep's parent
        folder, be taken as is from one run, with no metrics and no varied hyperparameter; without it
        TensorBoard builds the experiment from every run's values and scalar tags."""

        def store_init_configuration(self, values: dict) -> None:
            from torch.utils.tensorboard.summary import hparams

            _experiment, session_start, session_end = hparams(values, {})
            for summary in (session_start, session_end):
                self.writer.file_writer.add_summary(summary)
            self.writer.flush()

    return [OneFolderTensorBoard("tb", str(run_dir)) if n == "tensorboard" else n for n in names]


def tracker_init(names: list[str], run_dir: Path) -> tuple[dict, str | None]:
    """Accelerate's ``init_kwargs`` for ``names``, and the MLflow store to set (None: MLFLOW_TRACKING_URI's or
    no MLflow): files in the run folder, earlier sessions' runs continued (see the module's doc)."""
    env, init, store = os.environ, {}, None
    runs = continued_runs(run_dir)
    if "wandb" in names:
        init["wandb"] = {} if env.get("WANDB_DIR") else {"dir": str(run_dir)}
        if runs.get("wandb") and not env.get("WANDB_RUN_ID"):
            init["wandb"].update(id=runs["wandb"], resume="allow")
    if "mlflow" in names:
        init["mlflow"] = {}
        if not env.get("MLFLOW_TRACKING_URI"):  # (MLflow's default: ./mlflow.db, its artifacts in ./mlruns)
            store = f"sqlite:///{(run_dir / 'mlflow' / 'mlflow.db').resolve()}"
            init["mlflow"]["logging_dir"] = (run_dir / "mlflow" / "artifacts").resolve().as_uri()
        if (runs.get("mlflow") or {}).get("store") == (store or env.get("MLFLOW_TRACKING_URI")):
            init["mlflow"]["run_id"] = runs["mlflow"]["run_id"]
    if "dvclive" in names:  # resume: Live() otherwise deletes what the earlier sessions logged
        init["dvclive"] = {"dir": str(run_dir / "dvclive"), "resume": True}
    return init, store


def continued_runs(run_dir: Path) -> dict:
    """The tracker runs this session continues: :data:`TRACKER_RUNS`' where the run has a checkpoint to resume,
    else none (a session that starts the run over starts new ones)."""
    return (read_json(run_dir / TRACKER_RUNS) or {}) if list_checkpoints(run_dir) else {}


def final_tag(tag: str) -> bool:
    """A tag of the final validation: its scalars (Monitor.validation), its image grid (Monitor.final)."""
    return tag.startswith("final/") or tag == "val/jpeg_restored_clean_final"


def final_logged(run_dir: Path, step: int, val_set: str) -> set[str]:
    """The trackers an earlier session of this run gave its final validation at ``step`` of the validation set
    ``val_set`` (data_checks.val_fingerprint); none where the run starts over (no checkpoint) or either differs."""
    record = (read_json(run_dir / FINAL_LOGGED) or {}) if list_checkpoints(run_dir) else {}
    if record.get("step") != step or record.get("val_set") != val_set or not isinstance(record.get("trackers"), list):
        return set()
    return {name for name in record["trackers"] if isinstance(name, str)}


def set_mlflow_store(uri: str | None) -> None:
    """MLflow's store is process-wide (and sets its env var): this run's, then None again after it (ending its
    active run first: MLflow's exit hook would end it in the default store, ./mlflow.db)."""
    import mlflow

    if uri is None:
        mlflow.end_run()
    mlflow.set_tracking_uri(uri)


def tracker_config(config_dict: dict, params: dict | None = None) -> dict:
    """The config as trackers take it: dotted keys, scalar values (others as text; empty sections left out);
    without the keys in ``params`` (a continued MLflow run's: MLflow refuses a changed value, a longer phase's)."""
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
            for k, v in flatten(config_dict).items() if v != {} and k not in (params or {})}


def tensorboard_events_at(logging_dir: str | Path, step: int, drop) -> list:
    """The events TensorBoard shows at ``step`` from the event files in ``logging_dir`` (read in its order; a
    restart's purge at or before ``step`` drops what came before it), without the values whose tag ``drop``
    accepts: what a writer purging from ``step`` writes again to keep them."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    kept = []
    for path in sorted(Path(logging_dir).glob(TENSORBOARD_EVENTS)):
        for event in LegacyEventFileLoader(str(path)).Load():  # (as written: no migration)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START and event.step <= step:
                kept = []
            elif event.step == step and event.HasField("summary"):
                values = [v for v in event.summary.value if not drop(v.tag)]
                if values:
                    del event.summary.value[:]
                    event.summary.value.extend(values)
                    kept.append(event)
    return kept


def reopen_tensorboard(tracker) -> None:
    """A new writer (a new event file in the same folder) for a TensorBoard ``tracker`` whose writer failed: once
    its writer thread died (a full disk, a quota), the writer raises that error on every later call, although the
    space may be back. The old one is closed as far as it can be (a dead one cannot flush)."""
    for file_writer in (getattr(tracker.writer, "all_writers", None) or {}).values():
        with contextlib.suppress(Exception):
            file_writer.close()
    tracker.writer = type(tracker.writer)(tracker.logging_dir)


def quiet_tensorboard_threads() -> Callable[[], None]:
    """Leave out the traceback (~40 lines) that TensorBoard's writer thread prints when a write fails: the writer
    raises the same error on the next log call, said there once (Monitor.side_write). Returns the undo."""
    previous = threading.excepthook

    def hook(args):
        thread = type(args.thread)
        if not (thread.__name__ == "_AsyncWriterThread" and thread.__module__.startswith("tensorboard")):
            previous(args)

    threading.excepthook = hook

    def undo() -> None:
        if threading.excepthook is hook:
            threading.excepthook = previous
    return undo
