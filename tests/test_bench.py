"""`dist-dejpeg bench` on this CPU at tiny sizes: each benchmark writes its JSON and Markdown naming the
machine, the ratios come from rows of the same run, and the scaling model's arithmetic."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

from dist_dejpeg.bench import scaling
from dist_dejpeg.cli import main
from dist_dejpeg.config import load_config

EXPERIMENTS = Path(__file__).parents[1] / "benchmarks" / "experiments"
TINY = ["data.batch_size=2", "data.crop=64", "model.decoder_width=16", "critic.width=8",
        "model.encoder=mobilenetv3_small_050"]


def read(folder, name):
    report = json.loads((folder / f"{name}.json").read_text())
    md = (folder / f"{name}.md").read_text()
    assert report["machine"] in md and "torch" in md
    assert report["machine_info"]["cpu_cores"] >= 1
    return report, md


# Command lines as the README, benchmarks/gpu_check.sh and configs/gpu_check.yaml write them: options may come
# before the benchmark's name, overrides before or after the options
@pytest.mark.parametrize("line, expected", [
    ("bench --results R --no-ladder --steps 1 --repeats 1 --warmup 1 --config configs/debug.yaml train "
     "data.batch_size=2 data.crop=64",
     {"which": "train", "results": "R", "no_ladder": True, "steps": 1, "repeats": 1, "warmup": 1,
      "config": "configs/debug.yaml", "overrides": ["data.batch_size=2", "data.crop=64"]}),
    ("bench --results R --updates=gen --rungs=compile_mode train", {"updates": ["gen"], "rungs": ["compile_mode"]}),
    ("bench --updates gen --rungs none train", {"which": "train", "updates": ["gen"], "rungs": ["none"]}),
    ("bench train --updates gen --rounds 3", {"updates": ["gen"], "rounds": 3, "name": "train", "warmup": 5}),
    ("bench train --config configs/div2k.yaml data.crop=256 model.pretrained=false --profile "
     "loss.lpips_pretrained=false",
     {"config": "configs/div2k.yaml", "profile": True,
      "overrides": ["data.crop=256", "model.pretrained=false", "loss.lpips_pretrained=false"]}),
    ("bench --name data train", {"which": "train", "name": "data"}),  # an option's value is not the name
    ("bench --updates=gen --batch-sizes 64 128 train", {"which": "train", "batch_sizes": [64, 128]}),
    ("bench --results R --tiles 288 --formats raw --batches 2 --threads 1 data",
     {"which": "data", "tiles": [288], "formats": ["raw"], "batches": 2, "threads": 1, "crop": 256, "name": "data"}),
    ("bench --results R --formats raw png --batches 10 data", {"which": "data", "formats": ["raw", "png"]}),
    ("bench data --threads 0", {"which": "data", "threads": 0}),  # all cores, as its help says (it was refused)
    ("bench all --threads 0", {"which": "all", "threads": 0}),
    ("bench infer --results R", {"which": "infer", "results": "R", "repeats": 3, "config": None, "overrides": []}),
    ("bench scaling --config configs/debug.yaml --steps 1 data.crop=64",
     {"steps": 1, "overrides": ["data.crop=64"], "updates": ["gen", "critic", "gan"]}),
    ("bench scaling --updates gen critic --steps 2", {"updates": ["gen", "critic"], "steps": 2}),
    ("bench all --no-ladder --tiles 288", {"which": "all", "no_ladder": True, "tiles": [288], "repeats": 3}),
])
def test_bench_command_lines_parse(line, expected):
    from dist_dejpeg.cli import build_parser

    args, extra = build_parser().parse_known_args(line.split())
    assert extra == [] and args.command == "bench"
    assert {k: getattr(args, k) for k in expected} == expected


@pytest.mark.parametrize("line", ["bench data --config configs/debug.yaml", "bench data data.crop=64",
                                  "bench infer --no-ladder", "bench scaling --tiles 288", "bench train --norms group",
                                  "bench colour", "bench all --name x"])
def test_each_benchmark_takes_only_its_flags(line, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(line.split())
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err or "invalid choice: 'colour'" in err


def test_bench_help_shows_defaults_and_imports_no_benchmark(capsys, monkeypatch):
    import subprocess
    import sys

    # the parser lists the benchmarks without importing any of them, nor torch: `dist-dejpeg --help` stays quick
    code = ("import sys; from dist_dejpeg.bench import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in sys.modules if m.startswith(('dist_dejpeg.bench.', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    with pytest.raises(SystemExit):
        main(["bench", "train", "--help"])
    text = capsys.readouterr().out
    assert "dist-dejpeg bench train --config" in text  # the module's docstring, its commands as written
    assert "--warmup WARMUP" in text and "(default: 5)" in text and "--tiles" not in text

    # every benchmark the parser lists is a module that exists
    import importlib.util

    import dist_dejpeg.bench as bench

    assert set(bench.build_parser().benchmarks) == set(bench.BENCHMARKS)
    assert all(importlib.util.find_spec(module) for module, _ in bench.BENCHMARKS.values())


def test_bench_train_ladder_writes_rows_and_ratios(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    # two rungs of the ladder (compiling on 2 cores takes minutes; the trainer tests cover compile)
    from dist_dejpeg.bench import train

    monkeypatch.setattr(train, "LADDER", [train.LADDER[0], next(r for r in train.LADDER if "fused" in r[0])])
    # an earlier --profile run's operator tables: replaced with the results (another name's stay)
    (tmp_path / "train_profile_3.txt").write_text("an earlier run's")
    (tmp_path / "other_profile_1.txt").write_text("another benchmark name's")
    # LPIPS in the gen loss (the debug recipe has none since 2026-12-05), so that its share is measured
    assert main(["bench", "train", "--config", "configs/debug.yaml", "--steps", "1", "--repeats", "2", "--warmup", "1",
                 "--results", str(tmp_path), "--scaling-model", *TINY, "train.phases.gen.w_lpips=0.1"]) == 0
    report, md = read(tmp_path, "train")
    assert not (tmp_path / "train_profile_3.txt").exists() and (tmp_path / "other_profile_1.txt").exists()
    naive, tuned = report["results"][train.LADDER[0][0]], report["results"][train.TUNED]
    assert set(tuned) == {"gen", "gen without LPIPS", "critic", "gan generator turn"}
    assert naive["gen"]["x_naive"] == 1.0
    again = report["results"][train.AGAIN]["gen"]
    assert math.isclose(report["summary"]["baseline_repeat_ratio"], naive["gen"]["ms_per_call"] / again["ms_per_call"])
    assert math.isclose(tuned["gen"]["x_naive"], naive["gen"]["ms_per_call"] / tuned["gen"]["ms_per_call"])
    assert report["gflops_per_gen_step"] > 0 and tuned["gen"]["achieved_tflops"] > 0
    # the share is a ratio of two timings (it can come out below 0 when tiny steps are noisy): check its formula
    assert math.isclose(report["summary"]["lpips_share_tuned"],
                        1 - tuned["gen without LPIPS"]["ms_per_call"] / tuned["gen"]["ms_per_call"])
    assert "+ fused AdamW" in md and "tuned gen / naive gen" in md
    # the first step of each row is timed on its own (where compilation happens), and shown
    assert all(r["first_step_s"] > 0 for rows in report["results"].values() for r in rows.values())
    assert "| first step s |" in md
    model, md = read(tmp_path, "scaling_model")
    assert report["machine"] in model["from"]
    assert model["gradient_bytes"]["generator"] > model["gradient_bytes"]["critic"] > 0


def test_bench_train_updates_pick_the_rows(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    from dist_dejpeg.bench import train

    cfg = load_config("configs/debug.yaml")  # no LPIPS in its gen loss: nothing to take out
    assert [r[0] for r in train._rows_for(cfg, ("gen",))] == ["gen"]
    with_lpips = load_config("configs/debug.yaml", ["train.phases.gen.w_lpips=0.1"])
    assert [r[0] for r in train._rows_for(with_lpips, ("gen",))] == ["gen", "gen without LPIPS"]
    assert [r[0] for r in train._rows_for(cfg, ("critic", "gan"))] == ["critic", "gan generator turn"]
    with pytest.raises(ValueError, match="add gen to --updates"):
        train.run("configs/debug.yaml", TINY, repo_root / "unused", updates=("critic",))


def test_bench_train_rounds_report_the_median_round(tmp_path, repo_root, monkeypatch):
    """--rounds N measures the list of variants N times in turn; each row is its median round."""
    monkeypatch.chdir(repo_root)
    from dist_dejpeg.bench import train

    monkeypatch.setattr(train, "LADDER", train.LADDER[:2])  # naive, + channels_last, then tuned and naive again
    times = iter([10, 20, 30, 40, 30, 20, 10, 20, 20, 40, 20, 60])  # ms of each variant, round after round

    def fake(cfg, rows, **_):
        ms = float(next(times))
        return {update: {"ms_per_call": ms, "images_per_s_per_device": 1000 / ms, "spread": 0.0,
                         "first_step_s": 1.0, "calls": 30} for update, *_ in rows}

    monkeypatch.setattr(train, "bench_variant", fake)
    report = train.run("configs/debug.yaml", TINY, tmp_path, rounds=3)
    results = report["results"]
    naive = results[train.LADDER[0][0]]["gen"]
    assert naive["ms_per_round"] == [10, 30, 20] and naive["ms_per_call"] == 20 and naive["rounds"] == 3
    assert naive["spread"] == 1.0 and naive["calls"] == 90 and naive["images_per_s_per_device"] == 50
    assert results[train.LADDER[1][0]]["gen"]["ms_per_call"] == 20  # 20, 20, 40
    assert math.isclose(results[train.TUNED]["gen"]["x_naive"], 1.0)  # 30, 10, 20
    assert report["summary"]["baseline_repeat_ratio"] == 0.5  # 40, 20, 60
    assert report["rounds"] == 3 and report["pending"] == []
    md = read(tmp_path, "train")[1]
    assert "measured in 3 rounds" in md and ". ." not in md  # (no LPIPS share to say: it wrote "noise. . Median")


def test_bench_train_flags_a_compiled_row_that_fell_back_to_eager(tmp_path, repo_root, monkeypatch):
    """dynamo's suppress_errors runs a model whose compiling failed eagerly: its row says so (results, table, note)
    instead of passing for a compiled timing; a row that compiled is not flagged (compile_outcome's counts; a whole
    compiled run: test_trainer's cache test, ~20 s saved here)."""
    import torch

    from dist_dejpeg.bench import train
    from dist_dejpeg.train import compile as compile_mod

    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("this compiler is broken on purpose")

    monkeypatch.chdir(repo_root)
    torch._dynamo.reset()
    monkeypatch.setattr(compile_mod, "COMPILE_BACKEND", broken_backend)
    # two encoder stages: dynamo traces each frame that fails again (and the frames below it), ~30% of the test
    report = train.run("configs/debug.yaml", TINY + ["train.compile=true", "model.encoder_depth=2"], tmp_path,
                       warmup=1, steps=1, repeats=1, ladder=False, updates=("gen",))
    outcome = report["results"][train.TUNED]["gen"]["compile"]
    md = (tmp_path / "train.md").read_text()
    assert outcome["fell_back"] and outcome["graphs"] == 0 and outcome["failed_frames"] > 0, outcome
    assert f"| gen | {train.TUNED} (compiled: fell back to eager (" in md, md
    assert "**Compiled rows that fell back to eager**" in md, md
    since = compile_mod.compile_counts()  # a row that compiled graphs and failed no frame since is not flagged
    counts = {"failed": since["failed"], "graphs": since["graphs"] + 2}
    monkeypatch.setattr(compile_mod, "compile_counts", lambda: counts)
    assert compile_mod.compile_outcome(since) == {"graphs": 2, "failed_frames": 0, "fell_back": False}
    assert compile_mod.outcome_text(compile_mod.compile_outcome(since)) == ""


def test_bench_train_rungs_pick_the_ladder_rows(tmp_path, repo_root, monkeypatch):
    """--rungs none: the naive baseline, the tuned row and the baseline again, nothing between (a GPU check);
    --rungs A B: those rungs, each with the pieces of the rungs before it; the CUDA graphs rung needs CUDA."""
    monkeypatch.chdir(repo_root)
    from dist_dejpeg.bench import train

    seen, profiled = [], []

    def fake(cfg, rows, profile_to=None, **_):
        seen.append((cfg.train.mixed_precision, cfg.train.compile, cfg.model.channels_last))
        profiled.append(profile_to and profile_to.name)
        ms = {"no": 30.0}.get(cfg.train.mixed_precision, 10.0)
        out = {update: {"ms_per_call": ms, "images_per_s_per_device": 1000 / ms, "spread": 0.0,
                        "first_step_s": 1.0, "calls": 30} for update, *_ in rows}
        if profile_to is not None:  # as a GPU's profile: 6 ms of kernels in a profiled step of 40 ms
            out["gen"]["profile"] = {"kernels_per_step": 1612, "device_busy_ms": 6.0, "wall_ms": 40.0}
        if cfg.train.compile:  # as a GPU's CUDA graphs row where inductor could not graph two regions
            out["gen"]["cudagraph_skips"] = 2
        return out

    monkeypatch.setattr(train, "bench_variant", fake)
    assert main(["bench", "train", "--config", "configs/debug.yaml", "--rungs", "none", "--updates", "gen", "--profile",
                 "--results", str(tmp_path), *TINY, "train.mixed_precision=bf16", "train.compile=true"]) == 0
    report, md = read(tmp_path, "train")
    assert list(report["results"]) == [train.LADDER[0][0], train.TUNED, train.AGAIN]
    assert seen == [("no", False, False), ("bf16", True, True), ("no", False, False)]
    assert profiled == ["train_profile_1", "train_profile_2", "train_profile_3"]  # one file per variant
    profiled.clear()
    assert report["results"][train.TUNED]["gen"]["x_naive"] == 3.0
    assert "+ channels_last" not in md
    # the busy share is taken against the unprofiled step (the profiler lengthens the profiled one)
    assert "1612 kernels, GPU busy 6.0 ms of the 10.0 ms step (60%; profiled step 40.0 ms)" in md
    assert f"without CUDA graphs (TORCH_LOGS=cudagraphs says why): {train.TUNED} / gen: 2." in md

    seen.clear()
    report = train.run("configs/debug.yaml", TINY, tmp_path, updates=("gen",), rungs=("fused_adamw", "compile"))
    labels = list(report["results"])
    assert labels == [train.LADDER[0][0], "+ fused AdamW", "+ torch.compile", train.TUNED, train.AGAIN]
    assert seen[1] == ("bf16", False, True) and seen[2] == ("bf16", True, True)  # the pieces below them included
    assert train.rung_names()[-1] == "compile_mode"
    report = train.run("configs/debug.yaml", TINY, tmp_path, updates=("gen",), rungs=("compile_mode",))
    assert "+ CUDA graphs (compile mode reduce-overhead)" not in report["results"]  # this CPU: nothing to replay
    report = train.run("configs/debug.yaml", TINY, tmp_path, updates=("gen",), rungs=("sync_every",))
    assert list(report["results"]) == [train.LADDER[0][0], train.TUNED, train.AGAIN]  # CPU: nothing queued to wait for
    assert report["tuned"]["sync_every"] == 1  # what the trainer runs here, not the config's 25
    with pytest.raises(ValueError, match="unknown rung.*'cuda_graphs'"):
        train.run("configs/debug.yaml", TINY, tmp_path, rungs=("cuda_graphs",))
    report = train.run("configs/debug.yaml", TINY, tmp_path, updates=("gen",), ladder=False)
    assert report["results"][train.TUNED]["gen"]["x_naive"] is None  # no naive row: no ratio (it said 1.00)


def test_bench_train_batch_sizes_add_tuned_rows(tmp_path, repo_root, monkeypatch):
    """--batch-sizes 4 8: the tuned gen update again at each per-device batch, x naive as a ratio of images/s (the
    naive row ran at batch 2), dynamo's memory cleared before a row of another batch (never a dynamic-batch graph);
    and one real row at another batch on this CPU."""
    monkeypatch.chdir(repo_root)
    from dist_dejpeg.bench import train

    seen = []

    def fake(cfg, rows, fresh_compile=False, **_):
        seen.append((cfg.data.batch_size, fresh_compile, [r[0] for r in rows]))
        ms = 10.0 * cfg.data.batch_size ** 0.5  # a larger batch: more images per second
        return {update: {"ms_per_call": ms, "images_per_s_per_device": 1000 * cfg.data.batch_size / ms,
                         "spread": 0.0, "first_step_s": 1.0, "calls": 3} for update, *_ in rows}

    monkeypatch.setattr(train, "bench_variant", fake)
    assert main(["bench", "train", "--config", "configs/debug.yaml", "--rungs", "none", "--batch-sizes", "4", "8",
                 "--results", str(tmp_path), *TINY, "train.phases.gen.w_lpips=0.1"]) == 0
    report, md = read(tmp_path, "train")
    assert list(report["results"]) == [train.LADDER[0][0], train.TUNED, f"{train.TUNED}, batch 4",
                                       f"{train.TUNED}, batch 8", train.AGAIN]
    assert [(b, fresh) for b, fresh, _ in seen] == [(2, False), (2, False), (4, True), (8, True), (2, True)]
    assert seen[2][2] == ["gen"]  # the gen update alone (not its row without LPIPS)
    rows = report["results"]
    assert math.isclose(rows[f"{train.TUNED}, batch 8"]["gen"]["x_naive"], 8 ** 0.5 / 2 ** 0.5)
    assert f"| gen | {train.TUNED}, batch 8 |" in md
    with pytest.raises(ValueError, match="must be >= 1"):
        train.run("configs/debug.yaml", TINY, tmp_path, batch_sizes=(0,))
    with pytest.raises(ValueError, match="add gen to --updates"):
        train.run("configs/debug.yaml", TINY, tmp_path, ladder=False, updates=("critic",), batch_sizes=(4,))
    monkeypatch.undo()
    monkeypatch.chdir(repo_root)
    report = train.run("configs/debug.yaml", TINY, tmp_path, ladder=False, updates=("gen",), batch_sizes=(3,),
                       warmup=1, steps=1, repeats=1)
    row = report["results"][f"{train.TUNED}, batch 3"]["gen"]
    assert math.isclose(row["images_per_s_per_device"], 3 * 1000 / row["ms_per_call"])


def test_profile_writes_the_operator_tables(tmp_path):
    """bench train --profile's helper on the CPU (no kernels: no busy time), and the busy time's union of
    overlapping kernel intervals."""
    import torch

    from dist_dejpeg.bench.common import covered, profile_calls

    a = torch.randn(64, 64)
    out = profile_calls(lambda: a @ a, tmp_path / "p.txt", steps=3)
    assert out["steps"] == 3 and out["wall_ms"] > 0 and out["device_busy_ms"] is None
    text = (tmp_path / "p.txt").read_text()
    assert "by self host time" in text and "aten::mm" in text
    assert covered([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert covered([]) == 0


def test_bench_train_keeps_its_rows_when_cut_short(tmp_path, repo_root, monkeypatch):
    """The tables are written after every variant: a run stopped by a time limit (a GPU check's step) keeps
    what it measured and says what is missing."""
    monkeypatch.chdir(repo_root)
    from dist_dejpeg.bench import train

    calls = []

    def fake(cfg, rows, **_):
        calls.append(cfg)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what the time limit's signal ends the run with
        ms = 10.0 * len(calls)
        return {update: {"ms_per_call": ms, "images_per_s_per_device": 1000 / ms, "spread": 0.0} for update, *_ in rows}

    monkeypatch.setattr(train, "bench_variant", fake)
    with pytest.raises(KeyboardInterrupt):
        train.run("configs/debug.yaml", TINY, tmp_path)
    report, md = read(tmp_path, "train")
    assert list(report["results"]) == [label for label, _ in train.LADDER[:2]]
    assert report["results"][train.LADDER[1][0]]["gen"]["x_naive"] == 0.5
    assert report["pending"][0] == train.LADDER[2][0] and report["pending"][-1] == train.AGAIN
    assert "Incomplete: still to measure" in md and train.TUNED in md


def test_bench_data_and_infer(tmp_path, repo_root, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(repo_root)
    assert main(["bench", "data", "--tiles", "128", "--results", str(tmp_path)]) == 2  # (a traceback: exit 1)
    assert "need tiles of at least 256 px" in capsys.readouterr().err
    assert main(["bench", "data", "--tiles", "128", "--crop", "64", "--formats", "png", "raw", "--batches", "2",
                 "--threads", "1", "--results", str(tmp_path)]) == 0
    report, md = read(tmp_path, "data")
    if not torch.cuda.is_available():  # the GPU rows say why they are not there (they vanished)
        assert report["not_measured"]["DALI GPU"].startswith("not measured: ")
        assert "| torch loader + nvJPEG on GPU | not measured: no CUDA device |" in md
    rows = report["crops_per_s"]
    assert rows["torch loader (webdataset + PIL) [128 px raw]"] > 0
    peer = rows["BasicSR-style peer (cv2 in workers) [128 px png files]"]
    assert math.isclose(report["ratio_to_peer_same_tiles"]["torch loader (webdataset + PIL) [128 px png]"],
                        rows["torch loader (webdataset + PIL) [128 px png]"] / peer)

    from dist_dejpeg.bench import infer

    infer.run("configs/debug.yaml", TINY, tmp_path, repeats=1, sizes={"64 x 96": (64, 96)},
              modes={"whole": dict(tile=0), "tiled": dict(tile=64, overlap=16)})
    report, md = read(tmp_path, "infer")
    assert report["results"]["cpu fp32 whole 64 x 96"]["ms_per_megapixel"] > 0
    assert report["results"]["cpu bf16 tiled 64 x 96"]["ms_per_megapixel"] > 0
    assert "Not measured in this run: the shell, ONNX rows" in md  # (bench all's infer said nothing of it)
    assert ("No GPU rows: no CUDA device" in md) is not torch.cuda.is_available()


def test_bench_infer_gpu_rows_run_their_flow_on_the_cpu(tmp_path, repo_root, monkeypatch):
    """The GPU section's own rows (issue 24: a tensor on the device in and out, file to file, bf16 against fp32's
    PSNR), run here with the CPU standing in for the GPU: every row is timed and named as gpu-summary.json reads it."""
    import torch

    from dist_dejpeg.bench import infer
    from dist_dejpeg.bench.gpu_summary import _first

    monkeypatch.chdir(repo_root)
    report = infer.run("configs/debug.yaml", TINY, tmp_path, repeats=1, sizes={"64 x 96": (64, 96)},
                       modes={"tiled": dict(tile=64, overlap=16)}, cpu=False, gpus=[torch.device("cpu")])
    rows = report["results"]
    for precision in ("fp32", "bf16"):
        assert rows[f"cpu {precision} {infer.TENSOR} 64 x 96"]["ms_per_call"] > 0
    assert rows[f"cpu fp32 {infer.FILE} 64 x 96"]["ms_per_call"] > 0  # restore's default on a CPU: fp32
    versus = rows["cpu bf16 vs fp32 64 x 96"]
    assert 10 < versus["psnr_fp32_db"] < 60 and versus["bf16_minus_fp32_db"] == versus["psnr_bf16_db"] - versus[
        "psnr_fp32_db"]
    assert _first(rows, f"cpu bf16 {infer.TENSOR} 64")["ms_per_call"] == rows[f"cpu bf16 {infer.TENSOR} 64 x 96"][
        "ms_per_call"]
    assert (tmp_path / "out_gpu").exists() is False  # the file rows write into the run's own temporary folder


def test_bench_infer_stopped_in_its_host_rows_leaves_the_summarys_restore_numbers(tmp_path, repo_root, monkeypatch):
    """The GPU check's bench infer --no-cpu (the CPU standing in for the GPU) stopped for time in its folder rows:
    infer.json already holds the restore, tensor and file rows, and gpu-summary.json reads its restore fields."""
    import torch

    from dist_dejpeg.bench import infer
    from dist_dejpeg.bench.gpu_summary import write_gpu_summary

    def stop(*args):
        raise KeyboardInterrupt("the step's time limit (SIGTERM)")

    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(infer, "folder_rows", stop)
    with pytest.raises(KeyboardInterrupt):
        infer.run("configs/debug.yaml", TINY, tmp_path / "results", repeats=1,
                  sizes={"2040 x 1356 (tiny)": (64, 96), "12 MP (tiny)": (64, 96)},
                  modes={"tiled 512/64": dict(tile=64, overlap=16)}, cpu=False, gpus=[torch.device("cpu")])
    report = json.loads((tmp_path / "results" / "infer.json").read_text())
    assert report["pending"] == f"cpu folder rows, cpu {infer.CONFORM} rows"
    summary = write_gpu_summary(tmp_path, card=None, date="d", commit="c", device="cpu", first_variant=None)
    for field in ("restore_2k_ms", "restore_2k_fp32_ms", "restore_2k_array_ms", "restore_2k_file_ms",
                  "restore_12mp_ms", "restore_bf16_minus_fp32_db"):
        assert summary[field] is not None, field


def test_allreduce_model_worked_example():
    # 100 MB over 8 GPUs on NVLink (400 GB/s, 5 us per hop): 2 * 7/8 * 1e8 / 4e11 s + 14 * 5 us
    assert math.isclose(scaling.allreduce_seconds(8, 1e8), 2 * 7 / 8 * 1e8 / 400e9 + 14 * 5e-6)
    assert scaling.allreduce_seconds(1, 1e8) == 0.0
    # across nodes the InfiniBand link (45 GB/s) bounds the ring
    assert scaling.allreduce_seconds(64, 1e8) > 5 * scaling.allreduce_seconds(8, 1e8)


@pytest.mark.parametrize("step_s", [0.01, 0.1])
def test_predicted_efficiency_falls_with_gpus_and_overlap_helps(step_s):
    no = [scaling.predicted_efficiency(step_s, 5e7, n, overlap=False) for n in (1, 8, 64, 256)]
    yes = [scaling.predicted_efficiency(step_s, 5e7, n, overlap=True) for n in (1, 8, 64, 256)]
    assert no[0] == yes[0] == 1.0
    assert no == sorted(no, reverse=True) and yes == sorted(yes, reverse=True)
    assert all(o >= n for o, n in zip(yes, no))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_scaling_model_from_a_cpu_step_says_it_is_no_gpu_prediction(tmp_path, monkeypatch, device):
    """bench train --scaling-model / bench all on a CPU wrote efficiencies at 8/64/256 GPUs from a CPU's step
    time without a word of it."""
    from dist_dejpeg.bench.common import TUNED

    monkeypatch.setattr(scaling, "gradient_bytes", lambda *a: {"generator": 5e7, "critic": 1e7})
    train_report = {"machine": "m", "device": device, "results": {TUNED: {"gen": {"ms_per_call": 500.0}}}}
    report = scaling.scaling_model(train_report, "configs/debug.yaml", [], tmp_path)
    md = (tmp_path / "scaling_model.md").read_text()
    assert report["step_device"] == device
    assert ("from a CPU step: not a GPU prediction" in md.splitlines()[0]) == (device == "cpu")
    assert ("The step times are a CPU's (no GPU step measured)" in md) == (device == "cpu")


def test_bench_scaling_launches_one_and_two_processes(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    # --updates gen: the gen update alone in each launch (timing critic and gan too took two thirds of the time)
    assert main(["bench", "scaling", "--config", "configs/debug.yaml", "--steps", "1", "--updates", "gen", "--results",
                 str(tmp_path), *TINY]) == 0
    report, _ = read(tmp_path, "scaling")
    assert list(report["measured"]) == ["gen"], report["measured"]
    gen = report["measured"]["gen"]
    assert gen["images_per_s_1"] > 0 and gen["images_per_s_2"] > 0
    assert math.isclose(gen["efficiency"], gen["images_per_s_2"] / (2 * gen["images_per_s_1"]))


def test_a_measured_efficiency_above_100_percent_is_flagged_as_noise(tmp_path, monkeypatch):
    """bench scaling printed gan 126% from single runs one after the other, as if it were a measurement."""
    from dist_dejpeg.bench.common import TUNED

    def launch(cmd, env, check):
        name = cmd[cmd.index("--name") + 1]
        rows = {u: {"images_per_s_per_device": r if name.endswith("_1") else r * e}
                for u, r, e in (("gen", 10.0, 0.58), ("gan", 10.0, 1.26))}
        (Path(cmd[cmd.index("--results") + 1]) / f"{name}.json").write_text(json.dumps({"results": {TUNED: rows}}))

    monkeypatch.setattr(scaling, "gradient_bytes", lambda *a: {"generator": 5e7, "critic": 1e7})
    monkeypatch.setattr(scaling.subprocess, "run", launch)
    scaling.run("configs/debug.yaml", [], tmp_path, steps=1)
    md = (tmp_path / "scaling.md").read_text()
    assert "| 126% (>100%: noise; rerun with more --steps) |" in md and "| 58% |" in md
    assert "above 100% is noise" in md


def test_bench_all_times_only_the_updates_asked_for_in_scaling(tmp_path, repo_root, monkeypatch):
    """`bench all --updates gen`: its scaling part times the gen update alone too (it timed every update, the
    longest part of the suite on a CPU). The four benchmarks are faked; the scaling launches are recorded."""
    from dist_dejpeg.bench import data, infer, train
    from dist_dejpeg.bench.common import TUNED

    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(train, "run_from_args", lambda *a, **k: {"results": {}})
    monkeypatch.setattr(data, "run_from_args", lambda *a, **k: None)
    monkeypatch.setattr(infer, "run", lambda *a, **k: None)
    launched = []

    def launch(cmd, env, check):
        launched.append(cmd)
        name = cmd[cmd.index("--name") + 1]
        rows = {"gen": {"images_per_s_per_device": 10.0 if name.endswith("_1") else 8.0}}
        (Path(cmd[cmd.index("--results") + 1]) / f"{name}.json").write_text(json.dumps({"results": {TUNED: rows}}))

    monkeypatch.setattr(scaling.subprocess, "run", launch)
    assert main(["bench", "all", "--updates", "gen", "--results", str(tmp_path)]) == 0
    assert len(launched) == 2 and all(cmd[cmd.index("--updates") + 1:][:2] == ["gen", "--config"] for cmd in launched)
    report, _ = read(tmp_path, "scaling")
    assert report["measured"]["gen"]["efficiency"] == pytest.approx(0.8)


# -- the ablations (benchmarks/experiments/colour.py, quality.py, chroma.py): the trainings and evaluations are faked
# here (each real one takes minutes); what is tested is which runs they ask for and the tables they make of the results
@pytest.fixture
def experiment(monkeypatch):
    """Imports an ablation script as ``python benchmarks/experiments/NAME.py`` runs it: its folder first on sys.path
    (where it finds common.py)."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    return importlib.import_module


def _fake_eval(gains_by_run: dict):
    names = ("psnr", "psnr_y", "psnr_cb", "psnr_cr", "shift_r", "shift_g", "shift_b")

    def evaluate(model, images, qualities, out_dir, progress=True, blind=False, **kw):
        run = str(getattr(model, "source", model))
        key = next(k for k in gains_by_run if k in run)
        per_quality = {}
        for q in qualities:
            g = gains_by_run[key](q, blind)
            per_quality[str(q)] = {"gain": {n: g for n in names}, "jpeg": {n: 0.0 for n in names},
                                   "restored": {n: g / 10 for n in names}, "images": 3,
                                   "passed_through": int(g <= 0)}
        return {"per_quality": per_quality}
    return evaluate


def test_bench_quality_tables_blind_vs_conditioned(tmp_path, monkeypatch, experiment):
    from dist_dejpeg.evaluation import evaluate as evaluate_mod
    from dist_dejpeg.restore import restorer as infer

    common, quality = experiment("common"), experiment("quality")

    calls = []

    def train_once(config, overrides, run_dir, log_file):
        calls.append(overrides)
        return 60.0

    class FakeRestorer:
        def __init__(self, source, device="cpu", guard=True):
            self.source, self.gains = f"{source}-{'guard' if guard else 'raw'}", {10: 1.0}

        def decide(self, q):  # validation said: no gain at q90
            from types import SimpleNamespace

            return SimpleNamespace(passthrough=q >= 90)

    seed_of = {"blind-s0": 0.5, "blind-s1": 0.7, "conditioned-s0": 0.9, "conditioned-s1": 1.1}
    monkeypatch.setattr(common, "train_once", train_once)
    monkeypatch.setattr("dist_dejpeg.bench.common.validation_images", lambda cfg, work: ["a.png", "b.png"])
    monkeypatch.setattr("dist_dejpeg.data.ensure_samples", lambda cfg: False)
    monkeypatch.setattr(infer, "Restorer", FakeRestorer)
    monkeypatch.setattr(evaluate_mod, "evaluate", _fake_eval(
        {k: (lambda v: lambda q, blind: v - q / 100 - (0.2 if blind else 0))(v) for k, v in seed_of.items()}))
    report = quality.run("configs/debug.yaml", [], tmp_path / "res", seeds=(0, 1), qualities=(10, 90),
                         work=tmp_path / "work")
    assert [o[-2:] for o in calls] == [["train.seed=0", "model.quality_conditioning=false"],
                                       ["train.seed=1", "model.quality_conditioning=false"],
                                       ["train.seed=0", "model.quality_conditioning=true"],
                                       ["train.seed=1", "model.quality_conditioning=true"]]
    t = report["table"]
    assert t["blind"]["10"]["rgb_mean"] == pytest.approx(0.5) and t["blind"]["10"]["rgb_spread"] == pytest.approx(0.2)
    assert t["conditioned, no guard"]["90"]["rgb_mean"] == pytest.approx(0.1)
    assert t["blind, no guard"]["90"]["rgb_mean"] == pytest.approx(-0.3)
    assert t["conditioned"]["90"]["rgb_mean"] == 0.0 and t["blind"]["90"]["rgb_mean"] == 0.0  # passed through
    assert t["conditioned, told nothing"]["10"]["rgb_mean"] == pytest.approx(0.7)
    assert t["conditioned, told nothing"]["90"]["rgb_mean"] == pytest.approx(-0.1)  # no quality: no guard
    assert t["blind"]["90"]["passed_through"] == 6 and t["blind"]["90"]["images"] == 6
    md = (tmp_path / "res" / "quality.md").read_text()
    assert "| conditioned | 10 | +0.90 ± 0.10 |" in md and report["machine"] in md


def test_bench_colour_rows(tmp_path, monkeypatch, experiment):
    from dist_dejpeg.evaluation import evaluate as evaluate_mod

    colour, common = experiment("colour"), experiment("common")

    calls = []
    monkeypatch.setattr(common, "train_once", lambda c, o, run_dir, log: calls.append(o) or 120.0)
    monkeypatch.setattr("dist_dejpeg.bench.common.validation_images", lambda cfg, work: ["a.png"])
    monkeypatch.setattr("dist_dejpeg.data.ensure_samples", lambda cfg: False)
    monkeypatch.setattr(evaluate_mod, "evaluate", _fake_eval(
        {"batch-": lambda q, b: 0.3, "group-1000": lambda q, b: 0.5, "group-5000": lambda q, b: 0.8}))
    report = colour.run("configs/debug.yaml", [], tmp_path / "res", norms=("batch", "group"), gen_steps=(1000, 5000),
                        qualities=(10,), work=tmp_path / "work")
    assert [o[-2:] for o in calls][:2] == [["model.decoder_norm=batch", "train.phases.gen.steps=1000"],
                                            ["model.decoder_norm=batch", "train.phases.gen.steps=5000"]]
    assert all("train.order=[gen]" in o for o in calls)
    r = report["results"]["group-5000"]["per_quality"]["10"]
    assert r["gain_psnr"] == pytest.approx(0.8) and r["max_abs_shift"] == pytest.approx(0.08)
    assert "| group | 5000 | 10 | +0.80 |" in (tmp_path / "res" / "colour.md").read_text()


def test_chroma_share_from_the_jfif_inverse(experiment):
    import numpy as np

    from dist_dejpeg.jpeg.formats import JFIF_YCBCR

    chroma = experiment("chroma")

    inv = np.linalg.inv(np.array(JFIF_YCBCR))  # YCbCr difference -> RGB difference
    assert chroma.CB_TO_RGB == pytest.approx((inv[:, 1] ** 2).sum() / 3, rel=1e-4)
    assert chroma.CR_TO_RGB == pytest.approx((inv[:, 2] ** 2).sum() / 3, rel=1e-4)
    same = chroma.chroma_share({"psnr_y": 30.0, "psnr_cb": 30.0, "psnr_cr": 30.0})
    assert same == pytest.approx((chroma.CB_TO_RGB + chroma.CR_TO_RGB) / (chroma.CB_TO_RGB + chroma.CR_TO_RGB + 1))
    # chroma 10 dB better than Y: each plane's MSE is a tenth, so the share falls accordingly
    better = chroma.chroma_share({"psnr_y": 30.0, "psnr_cb": 40.0, "psnr_cr": 40.0})
    k = (chroma.CB_TO_RGB + chroma.CR_TO_RGB) / 10
    assert better == pytest.approx(k / (k + 1))
    assert chroma.chroma_share({"psnr_y": 30.0, "psnr_cb": None, "psnr_cr": None}) is None  # grayscale


def test_bench_chroma_runs_and_table(tmp_path, monkeypatch, experiment):
    from dist_dejpeg.evaluation import evaluate as evaluate_mod

    chroma, common = experiment("chroma"), experiment("common")

    calls = []
    monkeypatch.setattr(common, "train_once", lambda c, o, run_dir, log: calls.append((Path(run_dir).name, o)) or 180.0)
    monkeypatch.setattr("dist_dejpeg.bench.common.validation_images", lambda cfg, work: ["a.png", "gray.png"])
    monkeypatch.setattr("dist_dejpeg.data.ensure_samples", lambda cfg: False)
    cb_gain = {"conditioned-s0": 0.2, "conditioned-s1": 0.4, "conditioned-cw2-s0": 0.6, "conditioned-cw2-s1": 0.8}

    def evaluate(model, images, qualities, out_dir, **kw):
        assert kw["restorer_kwargs"]["guard"] is False  # the raw model
        tag = Path(model).name
        g = cb_gain[tag]
        per_quality, per_image = {}, []
        for q in qualities:
            gain = {"psnr": g / 2, "psnr_y": 0.5, "psnr_cb": g, "psnr_cr": g}
            per_quality[str(q)] = {"gain": gain}
            jpeg = {"psnr_y": 30.0, "psnr_cb": 30.0, "psnr_cr": 30.0}
            restored = {"psnr_y": 30.5, "psnr_cb": 30.0 + g, "psnr_cr": 30.0 + g}
            per_image += [{"image": "a", "quality": q, "jpeg": jpeg, "restored": restored},
                          {"image": "gray", "quality": q, "jpeg": {**jpeg, "psnr_cb": None, "psnr_cr": None},
                           "restored": {**restored, "psnr_cb": None, "psnr_cr": None}}]
        return {"per_quality": per_quality, "per_image": per_image}

    monkeypatch.setattr(evaluate_mod, "evaluate", evaluate)
    report = chroma.run("configs/debug.yaml", ["data.crop=96"], tmp_path / "res", weights=(1.0, 2.0), seeds=(0, 1),
                        qualities=(10,), work=tmp_path / "work")
    # weight 1 is bench quality's conditioned run, same name and command (so that it is reused)
    assert calls[0] == ("conditioned-s0", ["data.crop=96", "train.seed=0", "model.quality_conditioning=true"])
    assert calls[3] == ("conditioned-cw2-s1", ["data.crop=96", "train.seed=1", "model.quality_conditioning=true",
                                               "loss.chroma_weight=2"])
    cell = report["table"]["2"]["10"]
    assert cell["gain_psnr_cb"]["mean"] == pytest.approx(0.7) and cell["gain_psnr_cb"]["spread"] == pytest.approx(0.2)
    assert cell["gain_psnr"]["mean"] == pytest.approx(0.35)
    share = report["table"]["1"]["10"]["chroma_share_jpeg"]["mean"]  # the grayscale photo is left out
    assert share == pytest.approx(chroma.chroma_share({"psnr_y": 30.0, "psnr_cb": 30.0, "psnr_cr": 30.0}))
    assert report["table"]["2"]["10"]["chroma_share_restored"]["mean"] < share  # better chroma, smaller share
    md = (tmp_path / "res" / "chroma.md").read_text()
    assert "| 2 | 10 | +0.35 ± 0.05 | +0.50 ± 0.00 | +0.70 ± 0.10 |" in md


@pytest.mark.parametrize("name, argv, expected", [
    ("quality", ["data.crop=32", "--seeds", "0", "--qualities", "10", "40"],
     {"overrides": ["data.crop=32"], "seeds": (0,), "qualities": (10, 40), "work": "runs/bench-quality"}),
    ("colour", ["--norms", "group", "--gen-steps", "10", "--work", "W", "train.seed=1"],
     {"overrides": ["train.seed=1"], "norms": ("group",), "gen_steps": (10,), "qualities": (10, 20, 40), "work": "W"}),
    ("chroma", ["--chroma-weights", "1", "2", "--name", "c2"],
     {"weights": (1.0, 2.0), "seeds": (0, 1, 2), "work": "runs/bench-quality", "name": "c2"}),
])
def test_experiment_scripts_pass_their_flags(name, argv, expected, experiment, monkeypatch):
    import subprocess
    import sys

    script = experiment(name)
    seen = {}
    monkeypatch.setattr(script, "run", lambda config, overrides, out_dir, **kw: seen.update(kw, overrides=overrides,
                                                                                           config=config))
    assert script.main(argv) == 0
    assert seen["config"] == "configs/debug.yaml" and {k: seen[k] for k in expected} == expected
    # runnable by its path, as its docstring says
    out = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and f"python benchmarks/experiments/{name}.py" in out.stdout


def test_gan_phase_picks_the_generator_from_before_the_gan_phase(experiment, tmp_path):
    """The gen-only generator is the newest checkpoint saved before the gan phase's first step (the critic phase
    leaves the generator as the gen phase did); a run that kept none says what is missing."""
    import shutil
    import subprocess
    import sys

    gan_phase = experiment("gan_phase")
    run = tmp_path / "run"
    order = ["gen", "critic", "gan"]
    for step, phase_index, phase_step in ((500, 0, 500), (1000, 1, 0), (1040, 2, 0), (1070, 2, 30), (1100, 3, 0)):
        folder = run / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "phase_index": phase_index,
                                                               "phase_step": phase_step}))
    assert gan_phase.gen_only_checkpoint(run, order).name == "step-00001040"
    for late in ("step-00001040", "step-00001000", "step-00000500"):
        shutil.rmtree(run / "checkpoints" / late)
    with pytest.raises(SystemExit, match="no checkpoint from before its gan phase"):
        gan_phase.gen_only_checkpoint(run, order)
    with pytest.raises(SystemExit, match="has no gan phase"):
        gan_phase.gen_only_checkpoint(run, ["gen"])
    out = subprocess.run([sys.executable, str(EXPERIMENTS / "gan_phase.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "python benchmarks/experiments/gan_phase.py" in out.stdout


def test_before_after_alternates_sides_and_tables_medians(tmp_path, monkeypatch, experiment):
    """benchmarks/experiments/before_after.py: the old commit runs from a worktree of its own (removed after), the
    rounds alternate old, new, new, old, and each row's median per side and new / old are tabled (benches faked)."""
    import shutil
    import subprocess

    repo = Path(__file__).parents[1]
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD~1"],
                                                     capture_output=True).returncode:
        pytest.skip("needs a git checkout with history")
    before_after = experiment("before_after")
    calls, trees = [], []

    def fake(tree, which, out, name, extra):
        side = "old" if tree != before_after.REPO else "new"
        calls.append((side, which))
        trees.append(tree)
        assert (tree / "dist_dejpeg" / "__init__.py").is_file()
        value = {"old": [10.0, 30.0, 20.0], "new": [5.0, 9.0, 7.0]}[side][sum(c == (side, which) for c in calls) - 1]
        return {f"{which}: row": value}

    monkeypatch.setattr(before_after, "run_side", fake)
    assert before_after.main(["HEAD~1", "--rounds", "3", "--results", str(tmp_path), "--name", "ab"]) == 0
    assert [side for side, which in calls if which == "train"] == ["old", "new", "new", "old", "old", "new"]
    assert not any(t.exists() for t in trees if t != before_after.REPO)  # the worktree is gone
    report = json.loads((tmp_path / "ab.json").read_text())
    row = report["results"]["train: row"]
    assert (row["old_ms"], row["new_ms"]) == (20.0, 7.0) and math.isclose(row["new_over_old"], 0.35)
    assert "| train: row | 20.0 | 7.0 | 0.35 |" in (tmp_path / "ab.md").read_text()


def test_bench_refuses_bad_counts_results_and_configs_before_measuring(tmp_path, capsys):
    """Negative --steps wrote negative images/s into the results, --repeats 0 a median of nothing, --batches 0 a
    hang; a --results that cannot be written failed after every row was measured; a missing config was a
    traceback (exit 1). Now each is an error before any work, exit 2, and no results folder is left behind."""
    from dist_dejpeg.cli import main

    for args, message in ((["train", "--steps", "-3"], "--steps: a whole number >= 1, not '-3'"),
                          (["data", "--batches", "0"], "--batches: a whole number >= 1"),
                          (["data", "--threads", "-1"], "--threads: a whole number >= 0"),
                          (["infer", "--repeats", "0"], "--repeats: a whole number >= 1"),
                          (["train", "--rungs", "none", "compile"], "all or none stands alone"),  # (ran compile)
                          (["train", "--rungs", "bogus"], "unknown rung(s) bogus")):
        with pytest.raises(SystemExit) as stop:
            main(["bench", *args])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["bench", "train", "--results", str(tmp_path / "afile" / "sub")]) == 2
    assert "error: --results " in capsys.readouterr().err
    assert main(["bench", "train", "--results", str(tmp_path / "r"), "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "error: config file not found" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_results_name_the_commit_and_only_rank_0_writes_them(tmp_path, monkeypatch):
    """A results file names the code it measured (git describe, -dirty where edited), beside the machine and
    torch; under a launcher (`accelerate launch ... bench train`) only rank 0 writes (every rank wrote the same
    files at once, and printed the tables once per rank)."""
    from dist_dejpeg import source_commit
    from dist_dejpeg.bench.common import CHECKOUT, write_results

    expected = source_commit()
    assert (expected is None) == (not (CHECKOUT / ".git").exists())
    monkeypatch.setenv("RANK", "1")
    write_results(tmp_path, "r", {"x": 1}, "T", "note", ["a"], [["1"]])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    write_results(tmp_path, "r", {"x": 1}, "T", "note", ["a"], [["1"]])
    report, md = read(tmp_path, "r")
    assert report["machine_info"]["commit"] == expected
    assert f"commit {expected or 'unknown'}" in md.splitlines()[2]


def test_a_full_results_disk_prints_the_table_keeps_the_old_pair_and_exits_3(tmp_path, monkeypatch, capsys):
    """A full results disk after the measuring was a traceback (exit 1), the table lost (echoed after the writes),
    and data.json written before data.md failed: a new .json beside an old .md. Now the table is printed first, the
    pair is written all or none, and the failure is one line, exit 3."""
    import argparse
    import errno
    import os

    from dist_dejpeg.bench import run_benchmark
    from dist_dejpeg.bench.common import write_results

    for name in ("r.json", "r.md"):
        (tmp_path / name).write_text("old")
    fsyncs = []

    def fsync(fd):  # the second file's write finds the disk full (a real write's ENOSPC names no file)
        fsyncs.append(fd)
        if len(fsyncs) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    bench = lambda args: write_results(args.results, "r", {"x": 1}, "T", "note", ["a"], [["42"]]) and 0  # noqa: E731
    assert run_benchmark(bench, argparse.Namespace(results=str(tmp_path))) == 3
    said = capsys.readouterr()
    assert "| 42 |" in said.out
    assert said.err.startswith(f"error: disk full writing {tmp_path / 'r.md'} (") and said.err.count("\n") == 1
    assert [(tmp_path / n).read_text() for n in ("r.json", "r.md")] == ["old", "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # (no temp file left)


def test_the_commit_is_dirty_only_where_code_was_edited(tmp_path):
    """A benchmark writing its results into benchmarks/results/ (tracked) made its own later rows, and every model
    trained after it, say -dirty of a clean checkout: results and prose do not count, code does."""
    import subprocess

    from dist_dejpeg import source_commit

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    for name, text in (("pkg.py", "x = 1\n"), ("README.md", "a\n"), ("benchmarks/results/train.json", "{}")):
        (tmp_path / name).write_text(text)
    git("add", "-A")
    git("commit", "-qm", "c")
    clean = source_commit(tmp_path)
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "benchmarks" / "results" / "train.json").write_text('{"rows": 1}')
    (tmp_path / "README.md").write_text("b\n")
    assert source_commit(tmp_path) == clean
    (tmp_path / "pkg.py").write_text("x = 2\n")
    assert source_commit(tmp_path) == f"{clean}-dirty"


def test_replacing_a_committed_result_is_said_once(tmp_path, capsys, monkeypatch):
    """`bench train` replaced benchmarks/results/train.json (the numbers RESULTS.md cites) without a word: a
    committed result is said to be replaced, once; a new result or an uncommitted one is written quietly."""
    import subprocess

    from dist_dejpeg.bench.common import write_results

    monkeypatch.delenv("RANK", raising=False)
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "train.json").write_text("{}")
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    for name in ("train", "train", "data"):
        write_results(results, name, {"x": 1}, "T", "note", ["a"], [["1"]], echo=False)
    err = capsys.readouterr().err
    assert err.count("bench: replacing") == 1 and f"replacing {results / 'train.json'}, a committed result" in err


def test_bench_flag_mistakes_are_one_line_errors(tmp_path, capsys, monkeypatch):
    """A combination of flags a benchmark refuses, --root without shards, an unknown shard format: one error line,
    exit 2, no traceback (they were ValueError/AttributeError tracebacks, exit 1; --formats tiff after the shards
    of the other formats were written), and no temporary folder left behind."""
    import tempfile

    (temp := tmp_path / "temp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    for args, message in ((["train", "--updates", "critic"], "error: bench train: the ladder times the gen update"),
                          (["data", "--root", str(tmp_path)], "error: no shards match")):
        assert main(["bench", *args, "--results", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as stop:
        main(["bench", "data", "--formats", "raw", "tiff"])
    assert stop.value.code == 2 and "invalid choice: 'tiff'" in capsys.readouterr().err
    assert not list(temp.iterdir())


def test_bench_scaling_from_another_folder_checks_first_and_names_a_failed_launch(tmp_path, monkeypatch, capsys):
    """bench scaling (and bench quality) without --config ran configs/debug.yaml relative to the current folder
    (bench train finds the checkout's): outside the repository root both launches failed. A bad override was found
    only by the launched processes, and a failed launch was a CalledProcessError traceback."""
    from subprocess import CalledProcessError

    from dist_dejpeg.bench.common import CPU_CONFIG

    monkeypatch.chdir(tmp_path)
    launched = []

    def fail(cmd, **kwargs):
        launched.append(cmd)
        raise CalledProcessError(2, cmd)

    monkeypatch.setattr(scaling.subprocess, "run", fail)
    assert main(["bench", "scaling", "--results", str(tmp_path), "data.crop=abc"]) == 2
    assert "data.crop" in capsys.readouterr().err and launched == []  # the config, checked before any launch
    assert main(["bench", "scaling", "--results", str(tmp_path), *TINY]) == 1
    err = capsys.readouterr().err
    assert len(launched) == 1 and "Traceback" not in err and "failed (exit 2); its output is above" in err
    config = launched[0][launched[0].index("--config") + 1]
    assert Path(config).is_absolute() and Path(config).is_file() and config.endswith(CPU_CONFIG[0])


def test_the_libjpeg_ceiling_codes_photo_crops_not_noise():
    """The ceiling row JPEG-coded random noise, slower than photos: a loader of photos beat its "ceiling"."""
    import numpy as np

    from dist_dejpeg.bench import data
    from dist_dejpeg.data.images import jpeg_encode

    crops = data.photo_crops(64)
    assert len(crops) >= 4 and all(c.shape == (64, 64, 3) and c.dtype == np.uint8 for c in crops)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert sum(len(jpeg_encode(c, 30)) for c in crops) < len(crops) * len(jpeg_encode(noise, 30)) * 0.7  # photos
    assert data.photo_crops(600)[0].shape == (600, 600, 3)  # larger than every photo: enlarged first


def test_bench_help_is_written_for_users(capsys):
    """`bench --help` printed the package docstring, meant for developers (RST ``...``, :mod:`...`, "A benchmark is
    a module with add_arguments(parser) ..."); each benchmark's --help showed its docstring's RST markup."""
    import dist_dejpeg.bench as bench

    for which in ["--help", *[[name, "--help"] for name in bench.BENCHMARKS]]:
        with pytest.raises(SystemExit):
            main(["bench", *([which] if isinstance(which, str) else which)])
        text = capsys.readouterr().out
        assert "``" not in text and ":mod:" not in text and "add_arguments" not in text, which
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "Benchmarks: reproducible numbers" in text and "dist-dejpeg bench train --help" in text
    assert all(name in text for name in bench.BENCHMARKS)
    assert "add_arguments(parser)" in bench.__doc__  # the developer text stays in the docstring


def test_bench_scaling_help_names_the_config_it_runs_without_one(capsys):
    """Its help said a GPU machine defaults to configs/div2k.yaml; cpu_config_of runs configs/debug.yaml anywhere."""
    with pytest.raises(SystemExit):
        main(["bench", "scaling", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "none: configs/debug.yaml, on any machine" in text and "div2k" not in text


def test_bench_data_wait_cut_short_says_what_it_did_not_measure(tmp_path, monkeypatch):
    """data_wait's tables are rewritten after each variant; a run that a variant's failure (or Ctrl-C) stopped
    listed only the variants measured, a table that looked complete. Now the rest are rows that say why not."""
    import argparse
    import subprocess

    from dist_dejpeg.bench import data_wait
    from dist_dejpeg.run.layout import METRICS

    settings = tmp_path / "s.yaml"
    settings.write_text("data_wait:\n  config: configs/debug.yaml\n  steps: 2\n"
                        "  variants: {one: [a=1], two: [b=2], three: [c=3]}\n")

    def train(cmd, **kwargs):
        run_dir = Path(next(c for c in cmd if c.startswith("train.run_dir="))[len("train.run_dir="):])
        if "b=2" in cmd:
            return subprocess.CompletedProcess(cmd, 3)
        run_dir.mkdir(parents=True)
        (run_dir / METRICS).write_text(json.dumps({"meta": {"last_train_log": {"gen": {
            "train/data_wait_frac": 0.25, "train/images_per_s": 4.0}}}}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(data_wait.subprocess, "run", train)
    args = argparse.Namespace(settings=str(settings), quick=False, variants="", config="", steps=0, compile=False,
                              results=str(tmp_path / "r"), work=str(tmp_path / "w"), overrides=[])
    assert data_wait.main(args) == 3
    report = json.loads((tmp_path / "r" / data_wait.RESULTS_JSON).read_text())
    md = (tmp_path / "r" / data_wait.RESULTS_MD).read_text()
    assert list(report["variants"]) == ["one"] and "| one | 0.250 | 4.0 |" in md
    assert report["pending"] == {"two": "failed: training failed (exit 3)",
                                 "three": "not measured: the run stopped before it"}
    assert "| two | failed: training failed (exit 3) | |" in md and "| three | not measured" in md
    assert "commit " in md.splitlines()[2]


def test_one_timed_block_has_no_spread_rather_than_zero():
    """--repeats 1 timed one block and printed "0% spread", as if the timing were exact: there is none to measure."""
    from dist_dejpeg.bench.common import measure, spread_text

    one, three = measure(lambda: None, warmup=0, steps=2, repeats=1), measure(lambda: None, warmup=0, repeats=3)
    assert one.spread is None and one.as_dict()["spread"] is None and spread_text(one.spread) == "one block"
    assert three.spread is not None and spread_text(0.04) == "4%"
