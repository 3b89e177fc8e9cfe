"""What a run tells the people watching it: plain log lines without a terminal, progress.json, the LPIPS
package's deprecation warnings silenced narrowly, and the experiment trackers through Accelerate (TensorBoard
and MLflow's local file store)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from dist_dejpeg.config import ConfigError
from dist_dejpeg.run.layout import PROGRESS_KEYS
from dist_dejpeg.run.text import duration
from dist_dejpeg.train.trackers import check_trackers
from dist_dejpeg.train.trainer import Trainer

from test_trainer import fresh_accelerator_state, shards, tiny  # noqa: F401 - fixtures shared with test_trainer


def test_plain_lines_progress_json_and_tensorboard(tmp_path, shards, caplog):
    """Without a terminal (pytest captures stderr): no bar, one line per log window with losses, images/s,
    data wait, lr and the ETAs; one line per validation quality; progress.json says where the run is."""
    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="dist_dejpeg")
    t = Trainer(tiny(run, shards, "train.log_every=2", "train.phases.gen.steps=4", "train.order=[gen]"))
    assert not t.monitor.use_bar
    t.fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "dist_dejpeg"]
    window = [line for line in lines if line.startswith("gen 2/4") or line.startswith("gen 4/4")]
    assert len(window) == 2, lines
    assert re.search(r"gen 2/4 \(50%\) \| gen/l1 \S+ gen/lpips \S+ gen/total \S+ \| [\d.]+ img/s \| data wait \d+% "
                     r"\| lr \S+ \| ETA phase \S+, run \S+", window[0]), window[0]
    for q in ("q10", "q20", "q40"):
        assert any(re.match(rf"val final @4 {q}: PSNR [\d.]+ -> [\d.]+ dB, SSIM [\d.]+ -> [\d.]+, "
                            rf"LPIPS\(random\) [\d.]+ -> [\d.]+$", line) for line in lines), q  # (tiny: random backbone)
    logged = (run / "train.log").read_text()  # the run folder keeps what it said (a terminal's scrollback does not)
    assert all(line in logged for line in window) and "val final @4 q10: PSNR" in logged, logged
    progress = json.loads((run / "progress.json").read_text())
    assert list(progress) == list(PROGRESS_KEYS)
    assert progress["status"] == "finished" and progress["global_step"] == progress["total_steps"] == 4
    assert progress["last_val"]["q10"]["restored"]["psnr"] > 0 and progress["images_per_s"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert {"train/gen/l1", "train/data_wait_frac", "final/q10_restored_psnr"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"], "the validation image grid reaches TensorBoard"


def test_lpips_deprecation_warnings_are_silenced_narrowly():
    import lpips

    from dist_dejpeg.models.lpips import LPIPS

    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    assert any("pretrained" in str(w.message) for w in raw), "the package itself warns (else this test is vacuous)"
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        LPIPS(net="alex", pretrained=False)
        warnings.warn("an unrelated warning still shows", UserWarning)
    messages = [str(w.message) for w in ours]
    assert not any("pretrained" in m or "weight enum" in m for m in messages), messages
    assert "an unrelated warning still shows" in messages


def test_trackers_are_checked_before_anything_starts(tmp_path, shards, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbored'"):
        check_trackers(["tensorbored"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="needs the wandb package.*pip install wandb"):
        Trainer(tiny(tmp_path / "run", shards, "train.log_with=[tensorboard,wandb]"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_mlflow_and_wandb_offline_get_the_scalars_and_the_grid(tmp_path, shards, monkeypatch):
    """One run logged to TensorBoard, MLflow's local file store and wandb in offline mode (no server, no
    account): the same scalars and the validation grid reach MLflow and wandb; wandb's files go to the run
    folder, not to the working directory (where every run's landed in one ./wandb)."""
    pytest.importorskip("mlflow", reason="mlflow is in the test extra")
    pytest.importorskip("wandb", reason="wandb is in the test extra")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dist_dejpeg_test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = Trainer(tiny(tmp_path / "run", shards, "train.log_with=[tensorboard,mlflow,wandb]", "train.order=[gen]",
                     "train.phases.gen.steps=2"))
    t.fit()
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("dist_dejpeg_test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert {"train/gen/l1", "train/images_per_s", "final/q10_restored_psnr"} <= set(run.data.metrics)
    assert run.data.params["train.log_with"] == "['tensorboard', 'mlflow', 'wandb']"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["images"], "the validation grid"

    # wandb's offline run: its record log (run-*.wandb, protobuf records holding each history row's keys and
    # JSON values; wandb 0.31 ships no reader for it) and the media files
    assert not list((tmp_path / "cwd").iterdir())
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")
    data = records.read_bytes()
    for key in ("train/gen/l1", "train/images_per_s", "final/q10_restored_psnr", "train.log_with"):
        assert key.encode() in data, key
    assert list(offline.glob("files/media/images/val/*.png")), "the validation grid"


def test_duration_format():
    assert duration(5) == "5s" and duration(125) == "2m05s" and duration(3 * 3600 + 60) == "3h01m"
    assert duration(None) == "?"


def test_a_run_logged_to_a_file_reads_as_plain_lines(tmp_path, shards):
    """The issue's check: `dist-dejpeg train ... > log 2>&1` (as under SLURM) leaves plain lines: no carriage
    returns, losses and ETA readable, no deprecation warnings, one closing line."""
    import subprocess
    import sys

    from dist_dejpeg.config import to_yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(to_yaml(tiny(tmp_path / "run", shards, "train.progress=true", "train.log_every=2",
                                   "train.phases.gen.steps=2", "train.order=[gen]")))
    log_file = tmp_path / "train.log"
    with open(log_file, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "dist_dejpeg.cli", "train", "--config", str(config)],
                              stdout=out, stderr=subprocess.STDOUT, timeout=300)
    text = log_file.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text
    assert "deprecat" not in text.lower(), text
    assert re.search(r"gen 2/2 \(100%\) \| gen/l1 \S+ .* \| ETA phase 0s, run 0s", text), text
    assert text.count("done: q10") == 1
    assert re.search(r"^restore: (restores JPEGs of q\S+|validation found no sure gain)", text, re.M), text


def test_a_resumed_run_logs_each_step_once_and_keeps_each_phases_last_window(tmp_path, shards):
    """A run resumed from an older checkpoint (a kill -9 after it, or a rollback) logs the lost steps again:
    TensorBoard must show them once, not twice with the curve going back in time. metrics.json's
    last_train_log keeps the phases an earlier session trained (it held only the resumed session's). The
    config goes to tb/ itself as hparams: each start made two tb/<time>/ folders, each a run in TensorBoard."""
    from accelerate.state import AcceleratorState, GradientState
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_dejpeg.train.trainer import train

    run = tmp_path / "run"
    over = ("train.order=[gen,critic]", "train.phases.gen.steps=4", "train.phases.critic.steps=1",
            "train.ckpt_every=2", "train.keep_last=5", "data.val_max_images=2", "data.val_qualities=[10]")
    train(tiny(run, shards, *over))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train(tiny(run, shards, *over), resume=str(run / "checkpoints" / "step-00000004"))  # the critic step again
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    points = events.Scalars("train/images_per_s")
    assert [p.step for p in points] == [1, 2, 3, 4, 5], [p.step for p in points]
    assert [p.wall_time for p in points] == sorted(p.wall_time for p in points)
    assert [p.step for p in events.Images("val/jpeg_restored_clean_final")] == [5]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    assert not [p.name for p in (run / "tb").iterdir() if p.is_dir()]
    logged = json.loads((run / "metrics.json").read_text())["meta"]["last_train_log"]
    assert logged["gen"]["step"] == 4 and logged["critic"]["step"] == 5, logged


def test_a_finished_run_run_again_logs_its_final_validation_once(tmp_path, shards, monkeypatch):
    """A finished run run again validates again at its last step: TensorBoard purged from the step after it, and
    every final/* scalar and the final image grid had two points at that step; the step is purged, and what was
    logged there written again. Every other tracker got the final validation again too (MLflow kept both, wandb
    dropped it with a warning): the run folder records who got it (trackers.FINAL_LOGGED), and those keep the
    first one, TensorBoard included; the rest of what was logged stays as after one run."""
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.tracking import GeneralTracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_dejpeg.train import monitor as monitor_mod
    from dist_dejpeg.train.trainer import train

    class Recorder(GeneralTracker):  # any other tracker (wandb, MLflow, ...): the tags and steps it was given
        name, requires_logging_directory, main_process_only = "recorder", False, True

        def __init__(self):
            super().__init__()

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            recorded.extend((tag, step) for tag in values)

        def log_images(self, values, step=None, **kwargs):
            recorded.extend((tag, step) for tag in values)

    def logged():
        events = EventAccumulator(str(run / "tb"))
        events.Reload()
        tags = events.Tags()
        return ({t: [(p.step, p.wall_time) for p in events.Scalars(t)] for t in tags["scalars"]},
                {t: [p.step for p in events.Images(t)] for t in tags["images"]})

    recorded, objects = [], monitor_mod.tracker_objects
    monkeypatch.setattr(monitor_mod, "tracker_objects", lambda names, run_dir: [*objects(names, run_dir), Recorder()])
    run = tmp_path / "run"
    over = ("train.order=[gen,critic]", "train.phases.gen.steps=4", "train.phases.critic.steps=1",
            "train.ckpt_every=2", "train.log_every=1", "data.val_max_images=2", "data.val_qualities=[10]")
    train(tiny(run, shards, *over))
    (scalars, images), again = logged(), None
    first = list(recorded)
    assert first.count(("final/q10_restored_psnr", 5)) == 1 and ("val/jpeg_restored_clean_final", 5) in first
    from dist_dejpeg.models.generator_file import read_metadata
    from dist_dejpeg.train import final as final_mod

    trained_by = read_metadata(run / "generator.safetensors")["code"]
    monkeypatch.setattr(final_mod, "code_version", lambda: "dist_dejpeg 9.9.9 (a newer version)")
    for _ in range(2):  # a rerun's final validation, and a rerun's of a rerun
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        train(tiny(run, shards, *over))
        # (no step trained: the code that trained the weights stays credited, not the version that validated again)
        assert read_metadata(run / "generator.safetensors")["code"] == trained_by
        assert recorded == first, recorded[len(first):]  # (was every final/* tag and the grid again)
        again = logged()
        steps = {t: [s for s, _ in points] for t, points in again[0].items()}
        assert again[1] == images and images["val/jpeg_restored_clean_final"] == [5], again[1]
        assert steps["final/q10_restored_psnr"] == [5] and steps["train/images_per_s"] == [1, 2, 3, 4, 5], steps
        assert again[0] == scalars  # every tag's points as the first session logged them, the final ones too
    assert json.loads((run / "final_logged.json").read_text())["trackers"] == ["recorder", "tensorboard"]


def _scalars(run, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [(p.step, p.value) for p in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def test_the_final_validation_has_its_own_tags_and_the_critic_its_own_lr(tmp_path, shards, monkeypatch, caplog):
    """A gan phase that keeps its best generator (step 1) validates it again at the end, at the step of the
    phase's last validation: that number must not land on val_q10/... at the same step (TensorBoard drew two
    points there, or one over the other). The critic turns' learning rate (lr x critic_lr_mult) is logged too."""
    from dist_dejpeg.train import final as final_mod
    from dist_dejpeg.train import trainer as trainer_mod

    from test_trainer import _validated

    scripted = iter([0.4, 0.5, 0.6, 0.9, 0.8])  # steps 1, 2, 3; the kept step-1 generator; the raw one
    fake = lambda *a, **k: _validated(next(scripted))  # noqa: E731
    monkeypatch.setattr(trainer_mod, "validate", fake)
    monkeypatch.setattr(final_mod, "validate", fake)
    caplog.set_level(logging.INFO, logger="dist_dejpeg")
    run = tmp_path / "run"
    Trainer(tiny(run, shards, "train.order=[gan]", "train.phases.gan.steps=3", "train.phases.gan.val_every=1",
                 "train.phases.gan.critic_iters=1", "train.phases.gan.gen_iters=1", "train.phases.gan.lr=1e-3",
                 "train.phases.gan.critic_lr_mult=5", "train.phases.gan.schedule=constant",
                 "train.phases.gan.warmup=0", "train.phases.gan.patience=0")).fit()
    assert _scalars(run, "val_q10/restored_lpips") == [(1, pytest.approx(0.4)), (2, pytest.approx(0.5)),
                                                       (3, pytest.approx(0.6))]
    assert _scalars(run, "final/q10_restored_lpips") == [(3, pytest.approx(0.9))]
    assert [v for _, v in _scalars(run, "train/lr")] == [pytest.approx(1e-3)] * 3
    assert [v for _, v in _scalars(run, "train/critic_lr")] == [pytest.approx(5e-3)] * 3
    lines = [r.getMessage() for r in caplog.records if r.name == "dist_dejpeg"]
    assert any(re.search(r"gan 3/3 .* \| lr 1.00e-03, critic 5.00e-03 \|", line) for line in lines), lines
    progress = json.loads((run / "progress.json").read_text())
    assert progress["lr"] == pytest.approx(1e-3) and "critic_lr" not in progress["losses"]
    assert isinstance(progress["val_s"], float) and progress["val_s"] >= 0  # (the mean validation: status's ETA)


def test_images_per_s_and_data_wait_leave_out_validation_and_checkpoints():
    """A log window holding a validation (or a checkpoint) showed images/s and data wait as a fraction of the
    training's (debug recipe: 5.9 img/s after a validation, 55 otherwise, and an ETA ten times too long)."""
    import time
    from types import SimpleNamespace

    import torch

    from dist_dejpeg.train.window import LogWindow, TimedBatches

    batches = TimedBatches(iter(range(10)))
    window = LogWindow(SimpleNamespace(num_processes=1), images_per_step=8, batches=batches)
    for _ in range(2):
        next(batches)
        time.sleep(0.05)
        window.add({"gen/l1": torch.tensor(1.0)})
    with window.paused():
        time.sleep(0.5)
    scalars, seconds_per_step = window.read(1e-3)
    assert 100 < scalars["train/images_per_s"] <= 160, scalars  # 16 images in ~0.1 s of training, not ~0.6 s
    assert 0.3 < seconds_per_step < 0.4  # the ETA's rate: the phase's wall time, validation spread over its steps
    assert "train/critic_lr" not in scalars and window.read(1e-3, 5e-3)[0]["train/critic_lr"] == 5e-3


def test_a_paused_block_on_cuda_waits_for_the_queued_steps_first(monkeypatch):
    """On CUDA the steps queued before a paused block (an image grid at a step without a host check) are training
    time: the block waits for them before its own clock starts."""
    from types import SimpleNamespace

    import torch

    from dist_dejpeg.train.window import LogWindow

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    cuda = SimpleNamespace(type="cuda")
    with LogWindow(SimpleNamespace(num_processes=1, device=cuda), images_per_step=8).paused():
        assert synced == [cuda]
    with LogWindow(SimpleNamespace(num_processes=1, device=torch.device("cpu")), images_per_step=8).paused():
        assert synced == [cuda]


def test_a_gan_windows_losses_are_means_over_the_turns_that_logged_them():
    """A gan window of 5 critic and 2 gen turns divided gen/l1's sum by all 7 steps: the gan phase's generator
    losses read 3.5x too small (7/5 for the critic's), and changed with each window's mix of turns."""
    from types import SimpleNamespace

    import torch

    from dist_dejpeg.train.window import LogWindow

    window = LogWindow(SimpleNamespace(num_processes=1), images_per_step=8)
    for turn in ["critic"] * 5 + ["gen"] * 2:
        window.add({"critic/loss": torch.tensor(1.5)} if turn == "critic" else {"gen/l1": torch.tensor(0.02)})
    scalars, _ = window.read(1e-4)
    assert scalars["train/gen/l1"] == pytest.approx(0.02) and scalars["train/critic/loss"] == pytest.approx(1.5)


def _session(run, shards, *over):
    """One session of a run's trackers, as a Trainer starts them, logging two steps and the grid."""
    import torch

    from dist_dejpeg.config import to_dict
    from dist_dejpeg.train.build import build_accelerator
    from dist_dejpeg.train.monitor import Monitor

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # (a second session in this process: as test_trainer's fixture does)
    GradientState._reset_state()
    acc, cfg = build_accelerator(tiny(run, shards, "train.order=[gen]", *over))
    run.mkdir(exist_ok=True)
    monitor = Monitor(acc, cfg, run, to_dict(cfg))
    for step in (1, 2):
        monitor.scalars({"train/gen/l1": 0.1 * step}, step)
    monitor.image("val/grid", torch.rand(3, 8, 8), 2)
    monitor.close()
    return monitor, acc


def _checkpoint(run, step: int = 2):
    """A complete checkpoint folder as list_checkpoints sees one: the run has a checkpoint to resume."""
    from dist_dejpeg.run.layout import TRAINER_STATE, checkpoint_dir, step_name

    folder = checkpoint_dir(run) / step_name(step)
    folder.mkdir(parents=True)
    (folder / TRAINER_STATE).write_text("{}")


def _offline_trackers(monkeypatch, tmp_path) -> None:
    """MLflow into a file store under tmp_path, wandb offline and silent, no run ids from the environment."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_RUN_ID", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


def test_a_resumed_run_logs_to_the_same_wandb_and_mlflow_runs(tmp_path, shards, monkeypatch):
    """Each session of a run (a start, each resume after a preemption) made a new wandb run and a new MLflow run;
    a second session, even with a changed config (a longer phase: MLflow refuses a changed param), continues
    the first one's: their ids are kept in the run folder. Nothing lands in the working directory."""
    pytest.importorskip("mlflow", reason="mlflow is in the test extra")
    pytest.importorskip("wandb", reason="wandb is in the test extra")
    from mlflow.tracking import MlflowClient

    from dist_dejpeg.train.trackers import TRACKER_RUNS

    _offline_trackers(monkeypatch, tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    run, over = tmp_path / "run", ("train.log_with=[mlflow,wandb]",)
    _, acc = _session(run, shards, *over)
    first = {t.name: t for t in acc.trackers}
    ids = json.loads((run / TRACKER_RUNS).read_text())
    assert ids["wandb"] == first["wandb"].run.id and ids["mlflow"]["run_id"] == first["mlflow"].active_run.info.run_id
    _checkpoint(run)  # (what the second session resumes)
    _, acc = _session(run, shards, *over, "train.phases.gen.steps=7")
    second = {t.name: t for t in acc.trackers}
    assert second["wandb"].run.id == ids["wandb"]
    assert second["mlflow"].active_run.info.run_id == ids["mlflow"]["run_id"]
    client = MlflowClient()
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert len(client.get_metric_history(mlflow_run.info.run_id, "train/gen/l1")) == 4  # both sessions' steps
    assert mlflow_run.data.params["train.phases.gen.steps"] == "3", "the first session's params are kept"
    # offline-run-<date>_<time>-<id>, with "-1" after it where both sessions started in the same second (wandb_init)
    folders = [re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w+)(-\d+)?", p.name)
               for p in (run / "wandb").glob("offline-run-*")]
    assert all(folders) and {m.group(1) for m in folders} == {ids["wandb"]}
    assert not list((tmp_path / "cwd").iterdir())


def test_no_trackers_start_without_a_warning_about_trackers(tmp_path, shards):
    """train.log_with=[] (trackers off): Accelerate warned "`log_with=[]` was passed but no supported trackers are
    currently installed" on every start, as if one were missing."""
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        _session(tmp_path / "run", shards, "train.log_with=[]")
    assert not [str(w.message) for w in shown if "tracker" in str(w.message)]


def test_mlflow_without_a_tracking_uri_keeps_its_store_in_the_run_folder(tmp_path, shards, monkeypatch):
    """Without MLFLOW_TRACKING_URI, MLflow 3 wrote ./mlflow.db (and the image grid under ./mlruns) in the
    working directory: every run's in one database wherever the command ran. Now <run_dir>/mlflow/; the
    process-wide store (and MLflow's env var, which it sets) is unset again after the run."""
    pytest.importorskip("mlflow", reason="mlflow is in the test extra")
    pytest.importorskip("sqlalchemy", reason="MLflow's SQLite store: in mlflow, not in mlflow-skinny")
    pytest.importorskip("alembic", reason="MLflow's SQLite store: in mlflow, not in mlflow-skinny")
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        _session(run, shards, "train.log_with=[mlflow]")
    assert not [w for w in shown if "noload" in str(w.message)], "SQLAlchemy's deprecation, inside MLflow's store"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert not list((tmp_path / "cwd").iterdir())
    client = MlflowClient(f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert len(client.get_metric_history(mlflow_run.info.run_id, "train/gen/l1")) == 2
    assert list((run / "mlflow" / "artifacts").rglob("*.png")), "the grid, in the run folder"


def test_tracker_files_and_runs_follow_the_run_folder_unless_the_libraries_env_says(tmp_path, monkeypatch):
    """dvclive wrote ./dvclive (and deleted what an earlier session logged there); wandb's, MLflow's own env
    vars still win; an MLflow run id is reused only in the store it belongs to."""
    from dist_dejpeg.train.trackers import TRACKER_RUNS, check_trackers, tracker_init

    for name in ("WANDB_DIR", "WANDB_RUN_ID", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    run.mkdir()
    init, store = tracker_init(["wandb", "mlflow", "dvclive", "tensorboard"], run)
    assert init["dvclive"] == {"dir": str(run / "dvclive"), "resume": True}
    assert init["wandb"] == {"dir": str(run)} and store == f"sqlite:///{run.resolve() / 'mlflow' / 'mlflow.db'}"
    assert init["mlflow"] == {"logging_dir": (run / "mlflow" / "artifacts").resolve().as_uri()}
    (run / TRACKER_RUNS).write_text(json.dumps({"wandb": "abc123", "mlflow": {"run_id": "r1", "store": store}}))
    assert tracker_init(["wandb", "mlflow"], run)[0] == {"wandb": {"dir": str(run)}, "mlflow": init["mlflow"]}
    _checkpoint(run)  # a session that resumes one continues the runs; one without starts the run over: new runs
    init, _ = tracker_init(["wandb", "mlflow"], run)
    assert init["wandb"] == {"dir": str(run), "id": "abc123", "resume": "allow"} and init["mlflow"]["run_id"] == "r1"
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("WANDB_RUN_ID", "mine")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracker_init(["wandb", "mlflow"], run) == ({"wandb": {}, "mlflow": {}}, None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    if real("mlflow") is not None:
        with pytest.raises(ConfigError, match="needs sqlalchemy.*pip install mlflow, or set MLFLOW_TRACKING_URI"):
            check_trackers(["mlflow"])


def test_tensorboard_on_a_sweeps_parent_folder_shows_its_metrics_and_the_varied_hyperparameters(tmp_path):
    """Each run wrote an hparams experiment record with no metrics; TensorBoard, opened on a sweep's parent
    folder, took one run's as the experiment: its HParams dashboard had no metrics and no varied value. The runs
    write only their session records, so TensorBoard builds the experiment from all of them."""
    from tensorboard import context
    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    from dist_dejpeg.train.trackers import tracker_objects

    for name, lr in (("lr1e-4", 1e-4), ("lr5e-3", 5e-3)):
        (board,) = tracker_objects(["tensorboard"], tmp_path / name)
        board.start()
        board.store_init_configuration({"train.phases.gen.lr": lr, "train.phases.gen.steps": 10})
        board.writer.add_scalar("final/q10_gain_psnr", 0.5, 3)
        board.finish()
    events = EventMultiplexer()
    events.AddRunsFromDirectory(str(tmp_path))
    events.Reload()
    hparams = backend_context.Context(base_plugin.TBContext(
        data_provider=MultiplexerDataProvider(events, str(tmp_path)), logdir=str(tmp_path)))
    request = context.RequestContext()
    content = hparams.hparams_metadata(request, "")
    experiment = hparams.experiment_from_metadata(request, "", True, content,
                                                  hparams.hparams_from_data_provider(request, "", None))
    assert [m.name.tag for m in experiment.metric_infos] == ["final/q10_gain_psnr"], experiment
    assert {h.name: h.differs for h in experiment.hparam_infos} == {"train.phases.gen.lr": True,
                                                                    "train.phases.gen.steps": False}, experiment


def test_a_tracker_run_gone_from_its_store_names_the_file_to_delete(tmp_path, shards, monkeypatch):
    """trackers.json names an MLflow run its store no longer has (deleted by hand): the start fails, saying which
    file makes it continue that run and that deleting it starts new ones."""
    pytest.importorskip("mlflow", reason="mlflow is in the test extra")
    from dist_dejpeg.config import ConfigError
    from dist_dejpeg.train.trackers import TRACKER_RUNS, tracker_init

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    _, store = tracker_init(["mlflow"], run)
    (run / TRACKER_RUNS).write_text(json.dumps({"mlflow": {"run_id": "0123456789abcdef", "store": store}}))
    _checkpoint(run)
    with pytest.raises(ConfigError, match=f"could not start.*continues the runs named in {run / TRACKER_RUNS}: "
                                          f"delete that file to start new ones"):
        _session(run, shards, "train.log_with=[mlflow]")


def test_a_session_that_starts_the_run_over_gets_new_tracker_runs_and_a_clean_tensorboard(tmp_path, shards,
                                                                                          monkeypatch):
    """A session with no checkpoint to resume (the first was killed before one, or its checkpoints were moved
    aside) trains steps 1, 2... again: it continued the first session's wandb run (which dropped those steps, its
    steps only go forward) and MLflow run, and TensorBoard drew the first session's points beside the new ones.
    Now new wandb and MLflow runs (trackers.json names them for the sessions that resume), and TensorBoard drops
    what the earlier session logged."""
    pytest.importorskip("mlflow", reason="mlflow is in the test extra")
    pytest.importorskip("wandb", reason="wandb is in the test extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_dejpeg.train.trackers import TRACKER_RUNS

    _offline_trackers(monkeypatch, tmp_path)
    run, over = tmp_path / "run", ("train.log_with=[tensorboard,mlflow,wandb]",)
    _session(run, shards, *over)
    first = json.loads((run / TRACKER_RUNS).read_text())
    _, acc = _session(run, shards, *over)
    second = {t.name: t for t in acc.trackers}
    assert second["wandb"].run.id != first["wandb"]
    assert second["mlflow"].active_run.info.run_id != first["mlflow"]["run_id"]
    ids = json.loads((run / TRACKER_RUNS).read_text())
    assert ids["wandb"] == second["wandb"].run.id and ids["mlflow"]["run_id"] == second["mlflow"].active_run.info.run_id
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [p.step for p in events.Images("val/grid")] == [2], "the first session's grid is dropped"
    assert [p.step for p in events.Scalars("train/gen/l1")] == [1, 2]


def test_a_resume_before_steps_an_earlier_session_logged_says_what_wandb_drops(tmp_path, shards, monkeypatch,
                                                                               caplog):
    """wandb keeps the steps an earlier session logged after the checkpoint (a kill -9, a rollback) and drops the
    new ones up to there, silently: the resume says which steps, where wandb is a tracker."""
    pytest.importorskip("wandb", reason="wandb is in the test extra")
    from dist_dejpeg.config import to_dict
    from dist_dejpeg.train.build import build_accelerator
    from dist_dejpeg.train.monitor import Monitor

    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    _checkpoint(run, 4)
    (run / "progress.json").write_text(json.dumps({"status": "running", "global_step": 6}))  # the killed session's
    acc, cfg = build_accelerator(tiny(run, shards, "train.order=[gen]", "train.log_with=[tensorboard,wandb]"))
    monitor = Monitor(acc, cfg, run, to_dict(cfg))
    try:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dist_dejpeg"):
            monitor.resumed(6)
            said = [r.getMessage() for r in caplog.records if r.name == "dist_dejpeg"]
            assert not said, "nothing was logged after the checkpoint: nothing to say"
            monitor.resumed(4)
    finally:
        monitor.close()
    (said,) = [r.getMessage() for r in caplog.records if r.name == "dist_dejpeg"]
    assert said.startswith("resume: an earlier session logged steps 5..6, after this checkpoint: wandb keeps those "
                           "and drops what this session logs up to step 6"), said


def test_deepspeeds_all_gather_deprecation_is_silenced_narrowly(tmp_path, shards, monkeypatch):
    """Every DeepSpeed run printed torch 2.14's "all_gather_into_tensor is deprecated" from inside DeepSpeed's
    ZeRO (once per rank): filtered where DDP's broadcast_buffers one is, by its message and category only."""
    import torch

    from dist_dejpeg.train.build import build_accelerator

    def gather():  # torch warns, then finds no process group
        with pytest.raises(ValueError, match="process group"):
            torch.distributed.all_gather_into_tensor(torch.zeros(2), torch.zeros(1))

    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        gather()
    assert any("all_gather_into_tensor` is deprecated" in str(w.message) for w in raw), "else this test is vacuous"
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match="DeepSpeed"):  # (no launcher: it stops before any engine)
            build_accelerator(tiny(tmp_path / "run", shards, "train.deepspeed_stage=2"))
        gather()
        warnings.warn("an unrelated FutureWarning still shows", FutureWarning)
    messages = [str(w.message) for w in ours]
    assert not any("all_gather_into_tensor" in m for m in messages), messages
    assert "an unrelated FutureWarning still shows" in messages


DEEPSPEED_IMPORT = """
import logging
seen = []
logging.getLogger("DeepSpeed").addFilter(lambda r: seen.append(r.getMessage()) or True)  # (runs before ours)
from dist_dejpeg.train.library_warnings import silence_library_warnings
silence_library_warnings()
import deepspeed  # (as Accelerate's unwrap_model imports it, after build_accelerator silenced)
logging.getLogger("DeepSpeed").warning("a DeepSpeed warning still shows")
print("SEEN", [m for m in seen if m.startswith("Setting accelerator")])
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (the test extra)")
def test_deepspeeds_cpu_accelerator_note_is_silenced_and_its_other_warnings_show():
    """Every CPU training run printed DeepSpeed's "[real_accelerator.py:213:get_accelerator] Setting accelerator to
    CPU..." once per rank (a logging record of its own logger, emitted when deepspeed is first imported)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # (a GPU machine emits it for a CPU run too)
    out = subprocess.run([sys.executable, "-c", DEEPSPEED_IMPORT], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SEEN ['Setting accelerator to CPU" in out.stdout, "else this test is vacuous: " + out.stdout[-2000:]
    assert "Setting accelerator to CPU" not in out.stdout.replace("SEEN ['Setting accelerator to CPU", "")
    assert "a DeepSpeed warning still shows" in out.stdout


def test_train_log_gets_what_a_terminals_bar_shows_and_a_failed_write_is_said_once(tmp_path, shards, capsys):
    """On a terminal the log windows and validation lines live in the progress bar (gone with the scrollback):
    train.log gets them as lines; a train.log that cannot be written is said once, and the run goes on."""
    from dist_dejpeg.train.build import build_accelerator
    from dist_dejpeg.train.monitor import Monitor

    run = tmp_path / "run"
    acc, cfg = build_accelerator(tiny(run, shards, "train.order=[gen]", "train.log_with=[]"))
    run.mkdir()
    monitor = Monitor(acc, cfg, run, {})

    class Bar:
        def __init__(self):
            self.shown = []

        def __getattr__(self, name):
            return lambda *args, **kwargs: self.shown.append((name, args))

    monitor.start_phase("gen", 0, 0, 0)
    monitor.bar = Bar()
    monitor.window("gen", {"train/gen/l1": 0.5, "train/lr": 1e-3}, 2, 2, 0.1)
    monitor.validation("val", {"q10": {"jpeg": {"psnr": 25.0, "ssim": 0.7, "lpips": 0.3},
                                       "restored": {"psnr": 26.0, "ssim": 0.8, "lpips": 0.2}}}, 2)
    logged = (run / "train.log").read_text()
    assert "phase gen (1/1): steps 0.." in logged and "gen 2/" in logged and "val val @2 q10: PSNR 25.000" in logged
    assert not any(name == "write" and "gen 2/" in args[0] for name, args in monitor.bar.shown)  # (postfix only)
    (run / "train.log").unlink()
    (run / "train.log").mkdir()  # a train.log that cannot be opened for writing
    monitor.run_log.close()  # (reopened at the next line)
    monitor.window("gen", {"train/gen/l1": 0.4, "train/lr": 1e-3}, 4, 4, 0.1)
    monitor.window("gen", {"train/gen/l1": 0.3, "train/lr": 1e-3}, 6, 6, 0.1)
    monitor.close()
    assert capsys.readouterr().err.count("warning: cannot write") == 1
    import logging as stdlib_logging

    assert monitor.run_log not in stdlib_logging.getLogger().handlers  # closed with the monitor


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, never listening: a connect is refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_sessions_line_that_cannot_be_written_is_said_and_counted_and_training_goes_on(tmp_path, monkeypatch,
                                                                                          caplog):
    """A full disk under sessions.jsonl, or a library whose version cannot be read, is said and training goes on
    (a crash at the start of a 3-day job over a bookkeeping line); a line that is written says the SLURM job, the
    ZeRO stage and a time with its UTC offset (the nodes of one job can be set to other zones)."""
    import errno
    from datetime import datetime
    from types import SimpleNamespace

    from dist_dejpeg.run.files import read_jsonl
    from dist_dejpeg.train import sessions
    from dist_dejpeg.train.side_writes import SideWrites

    monitor = SideWrites()
    monitor.write_errors, monitor.progress, monitor.run_dir = {}, {}, tmp_path
    acc = SimpleNamespace(is_main_process=True, num_processes=2, device="cpu")
    trainer = SimpleNamespace(accelerator=acc, cfg=tiny(tmp_path, tmp_path), run_dir=tmp_path, monitor=monitor,
                              state=SimpleNamespace(global_step=7), deepspeed=False)

    def full(path, line):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(sessions, "append_line", full)
    with caplog.at_level(logging.INFO, logger="dist_dejpeg"):
        line = sessions.record_session(trainer, tmp_path / "checkpoints" / "step-00000007")
    assert (line["start_step"], line["processes"]) == (7, 2) and monitor.write_errors == {"sessions": 1}
    assert "disk full" in caplog.text.lower() and "sessions write failed" in caplog.text, caplog.text
    monkeypatch.undo()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    trainer.cfg.train.deepspeed_stage = 2
    line = sessions.record_session(trainer, None)
    assert (line["slurm_job"], line["deepspeed_stage"]) == ("4242", 2)  # which job, and how ZeRO sharded it
    assert datetime.fromisoformat(line["time"]).utcoffset() is not None  # (a time with no offset: which zone?)

    def broken(*args, **kwargs):
        raise RuntimeError("a library's metadata unreadable")

    monkeypatch.setattr(sessions, "library_versions", broken)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dist_dejpeg"):
        assert sessions.record_session(trainer, None) is None  # said, not raised: training goes on
    assert "line is not written (RuntimeError: a library's metadata unreadable); training goes on" in caplog.text
    monkeypatch.undo()
    acc.is_main_process = False  # the other ranks write nothing
    assert sessions.record_session(trainer, None) is None
    assert [(s["start_step"], s["resumed_from"]) for s in read_jsonl(tmp_path / "sessions.jsonl")] == [(7, None)]


def test_an_mlflow_server_that_does_not_answer_fails_the_start_at_once(tmp_path, shards, monkeypatch):
    """MLFLOW_TRACKING_URI naming a server that is down: MLflow retried each request 7 times with backoff (over
    90 s here before the first call gave up), so "fails the start at once" took minutes. Now one HEAD request with
    a short timeout before Accelerate starts the tracker: a one-line ConfigError naming the URI (without its
    password) and MLflow's retry settings; a server that answers, with any status, passes; a file store is not
    probed."""
    import http.server
    import threading
    import time

    pytest.importorskip("mlflow", reason="mlflow is in the test extra")
    down = f"http://user:secret@127.0.0.1:{_closed_port()}/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    start = time.monotonic()
    with pytest.raises(ConfigError) as raised:
        Trainer(tiny(tmp_path / "run", shards, "train.log_with=[tensorboard,mlflow]"))
    message = str(raised.value)
    assert time.monotonic() - start < 30 and "\n" not in message
    assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{down.rsplit(':', 1)[1]}" in message and "secret" not in message
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in message and "MLFLOW_HTTP_REQUEST_TIMEOUT" in message
    assert not (tmp_path / "run" / "checkpoints").exists()

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # (an MLflow behind a proxy may answer the root with anything: it answered)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
        check_trackers(["tensorboard", "mlflow"])
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    check_trackers(["mlflow"])
