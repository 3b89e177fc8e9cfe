"""benchmarks/gpu_wheels.sh and the GPU check (dist_dejpeg/bench/gpu_check.py), on this machine (no GPU; pip
reaches PyPI).

The wheel folder is made once for the module (it needs PyPI); then the offline install exactly as the check
does it, the check's usage errors (exit 2) and refusal without CUDA (exit 3, through the benchmarks/gpu_check.sh
wrapper), a failing and a timed-out step recorded while the others run, the settings in configs/gpu_check.yaml
against the config schema, gpu-summary.json's sources, and the whole check flow on the CPU (--allow-cpu --quick).
DALI's parts (gpu_wheels.sh --pack, as --dali --split writes them) are made of small fake wheels, no download:
split, checked, joined and installed, and each way a set of parts can be broken fails the install step.
"""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from dist_dejpeg.bench.compile_cache import pack, parts_of, unpack
from dist_dejpeg.bench.dali_wheels import DALI_PARTS, DALI_SUMS, DALI_TAR, WheelsError, dali_wheels
from dist_dejpeg.bench.data_wait import load_settings, resolve
from dist_dejpeg.bench.gpu_check import OPTIONAL
from dist_dejpeg.bench.gpu_summary import write_gpu_summary

REPO = Path(__file__).resolve().parents[1]
WHEELS_SH = REPO / "benchmarks" / "gpu_wheels.sh"
CHECK_SH = REPO / "benchmarks" / "gpu_check.sh"
CHECK = [sys.executable, "-m", "dist_dejpeg.bench.gpu_check"]
SETTINGS = REPO / "configs" / "gpu_check.yaml"
PREFIXES = ("lpips", "webdataset", "braceexpand", "omegaconf", "jpeglib", "dist_dejpeg")
# The CPU flow runs the steps that only the check exercises; `bench train/data/infer` are the same commands that
# tests/test_bench.py runs (and --steps is what a GPU session uses to put the most telling steps first).
FLOW = "pytest_gpu,train,evaluate,data_wait"
STEPS = ("env", "install", "cuda", *OPTIONAL)
SKIPPED = {"cuda": "skipped: no CUDA"}
SUMMARY_KEYS = ("card", "date", "commit", "gen_img_s", "gan_img_s", "train_compiled", "bench_gen_img_s", "bench_gan_img_s",
                "gpu_busy_frac", "data_wait_frac", "restore_2k_ms", "restore_2k_fp32_ms", "restore_2k_array_ms",
                "restore_2k_file_ms", "restore_12mp_ms", "restore_bf16_minus_fp32_db", "gpu_tests_passed",
                "gpu_tests_skipped", "gpu_tests_complete")


def _env(**extra: str) -> dict[str, str]:
    """This interpreter as the scripts' python3, no inherited PYTHONPATH, GPUs hidden."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def _run(cmd, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_wheels")
    proc = _run(["bash", WHEELS_SH, out], timeout=600, env=_env(), cwd=REPO)
    assert proc.returncode == 0, f"gpu_wheels.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "total:" in proc.stdout
    return out


def test_wheel_folder(wheels):
    files = sorted(wheels.glob("*.whl"))
    for prefix in PREFIXES:
        found = [f.name for f in files if f.name.startswith(prefix + "-")]
        assert len(found) == 1, f"{prefix}: {found} in {[f.name for f in files]}"
    assert len(files) == len(PREFIXES), [f.name for f in files]
    assert all(f.name.endswith(("-py3-none-any.whl", "-py2.py3-none-any.whl")) for f in files
               if not f.name.startswith("jpeglib-")), files
    assert any(f.name.startswith("jpeglib-1.0.2-cp38-abi3-manylinux") for f in files), files  # libjpeg inside
    assert any(f.name.startswith("omegaconf-2.4.0-") for f in files)  # as CI tests it (its grammar inside)
    total = sum(f.stat().st_size for f in wheels.iterdir())
    assert total < 60e6, total


def test_offline_install_imports_from_target(wheels, tmp_path):
    target = tmp_path / "site"
    proc = _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                 "--no-cache-dir", "--target", target, *sorted(wheels.glob("*.whl"))], timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = (
        "import json, dist_dejpeg, lpips, webdataset, omegaconf\n"
        "from dist_dejpeg.config import load_config\n"
        "cfg = omegaconf.OmegaConf.create({'a': '${b}', 'b': 3})\n"
        "assert cfg.a == 3\n"
        "print(json.dumps({m.__name__: m.__file__ for m in (dist_dejpeg, lpips, webdataset, omegaconf)}))\n"
    )
    work = tmp_path / "elsewhere"  # not the repository root, whose dist_dejpeg would be imported first
    work.mkdir()
    proc = _run([sys.executable, "-c", code], timeout=300, cwd=work, env=_env(PYTHONPATH=str(target)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, file in files.items():  # the wheels' copies shadow this venv's (same versions: the paths tell)
        assert Path(file).resolve().is_relative_to(target.resolve()), (name, file)


def test_check_imports_only_the_standard_library():
    """The GPU machine lacks omegaconf (and this package) until the install step: the check's own process and the
    step runner import nothing else (torch, yaml and the rest only inside the steps' children). -S: no
    site-packages at all, only the checkout and the standard library."""
    code = ("import sys, dist_dejpeg.bench.gpu_check, dist_dejpeg.bench.gpu_check_steps, dist_dejpeg.bench.data_wait, "
            "dist_dejpeg.bench.gpu_summary; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - {*sys.stdlib_module_names, '__main__'})))")
    proc = _run([sys.executable, "-S", "-c", code], timeout=60, cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["dist_dejpeg"], proc.stdout


def test_usage_errors_exit_2(tmp_path):
    """Wrong options stop the check before it probes CUDA or writes anything."""
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    (tmp_path / "a.whl").write_text("")
    cases = {"required": ([], "--wheels"), "budget": (["--wheels", tmp_path, "--out", out, "--budget", "9m"], "whole"),
             "step": (["--wheels", tmp_path, "--out", out, "--steps", "train,nope"], "unknown step 'nope'"),
             "wheels": (["--wheels", empty, "--out", out], "no wheels"),
             "settings": (["--wheels", tmp_path, "--out", out, "--settings", tmp_path / "none.yaml"], "settings"),
             "split": (["--wheels", tmp_path, "--out", out, "--compile-cache-split", "15"], "need --compile-cache"),
             "split size": (["--wheels", tmp_path, "--out", out, "--compile-cache", tmp_path / "c.tgz",
                             "--compile-cache-split", "0"], "--compile-cache-split: takes whole MiB"),
             "max": (["--wheels", tmp_path, "--out", out, "--compile-cache-max", "56"], "need --compile-cache"),
             "max size": (["--wheels", tmp_path, "--out", out, "--compile-cache", tmp_path / "c.tgz",
                           "--compile-cache-max", "5x"], "--compile-cache-max: takes whole MiB"),
             "cache folder": (["--wheels", tmp_path, "--out", out, "--compile-cache", empty], "is a folder")}
    for case, (argv, message) in cases.items():
        proc = _run([*CHECK, *argv], timeout=60, cwd=REPO, env=_env())
        assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
        assert message in proc.stderr, (case, proc.stderr)
    assert not out.exists()


def test_check_without_cuda_exits_3(wheels, tmp_path):
    """Through the old script's name, from another folder with relative paths: nothing run, the reason written."""
    shutil.copytree(wheels, tmp_path / "w")
    proc = _run(["bash", CHECK_SH, "--wheels", "w", "--out", "out"], timeout=300, cwd=tmp_path, env=_env())
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "CUDA" in proc.stderr and "--allow-cpu" in proc.stderr, proc.stderr
    out = tmp_path / "out"
    assert not list(out.glob("*.log"))  # nothing was run
    assert "No CUDA device: nothing was run" in (out / "summary.md").read_text()
    # an earlier check's results in OUT (a paid GPU run's) stay where they are: this run writes not-run.md beside them
    (out / "summary.md").write_text("# GPU check (full)\n")
    (out / "results").mkdir()
    (out / "results" / "train.json").write_text("{}")
    proc = _run(["bash", CHECK_SH, "--wheels", "w", "--out", "out"], timeout=300, cwd=tmp_path, env=_env())
    assert proc.returncode == 3 and (out / "results" / "train.json").read_text() == "{}"
    assert (out / "summary.md").read_text() == "# GPU check (full)\n" and "nothing was run" in (out / "not-run.md").read_text()


def _summary_rows(text: str) -> dict[str, tuple[str, str, str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[0] in STEPS:
            rows[cells[0]] = (cells[1], cells[2], cells[3])
    return rows


def test_failing_steps_recorded_while_others_run(wheels, tmp_path):
    """env runs out of its (1 s) time, evaluate fails (no trained run): install still runs and passes, both
    failures are in the table, under it with their logs' last lines, and in the exit code."""
    settings = yaml.safe_load(SETTINGS.read_text())
    settings["env"]["timeout_s"] = 1
    (tmp_path / "check.yaml").write_text(yaml.safe_dump(settings))
    out = tmp_path / "out"
    proc = _run([*CHECK, "--wheels", wheels, "--out", out, "--allow-cpu", "--quick", "--steps", "evaluate,bench_infer",
                 "--settings", tmp_path / "check.yaml", "--commit", "abc1234"], timeout=300, cwd=REPO, env=_env())
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr}\n{summary}"
    rows = {step: (code, result) for step, (code, _, result) in _summary_rows(summary).items()}
    assert rows == {"env": ("124", "FAILED: timed out after 1 s"), "install": ("0", "ok"),
                    "cuda": ("0", "skipped: no CUDA"), "evaluate": ("1", "FAILED"),
                    "bench_infer": ("0", "skipped: --quick")}, summary
    assert "2 of 5 steps failed: env evaluate." in summary
    assert "### evaluate: last lines of evaluate.log" in summary and "no generator from the train step" in summary
    assert "### env: last lines of env.log" in summary
    assert "dist_dejpeg from" in (out / "install.log").read_text()
    report = json.loads((out / "gpu-summary.json").read_text())
    assert tuple(report) == SUMMARY_KEYS
    assert report["commit"] == "abc1234" and report["date"]
    assert all(report[k] is None for k in SUMMARY_KEYS if k not in ("date", "commit")), report  # nothing measured


def test_an_interrupted_check_still_writes_its_headline(tmp_path):
    """SIGTERM (a lease's time running out under `timeout`, Ctrl-C) ends the running step: gpu-summary.json is still
    written from what the steps before it measured, so the folder a lease brings back has it."""
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "x.whl").write_bytes(b"")  # env, the first step, installs nothing
    out = tmp_path / "out"
    proc = subprocess.Popen([*CHECK, "--wheels", tmp_path / "wheels", "--out", out, "--allow-cpu", "--quick",
                             "--commit", "abc1234"], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("gpu_check: env (timeout"):
                proc.send_signal(signal.SIGTERM)
                break
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    report = json.loads((out / "gpu-summary.json").read_text())
    assert report["commit"] == "abc1234" and report["gpu_tests_passed"] is None, report


def test_settings_resolve_and_parse():
    """Every override list in configs/gpu_check.yaml is valid for the config it goes with (full and quick)."""
    from dist_dejpeg.config import load_config

    settings = load_settings(SETTINGS)
    assert set(OPTIONAL) <= set(settings)
    full, quick = resolve(settings["train"], False), resolve(settings["train"], True)
    assert full["config"] == "configs/div2k.yaml" and quick["config"] == "configs/debug.yaml"
    assert full["overrides"][:3] == quick["overrides"][:3] == settings["train"]["overrides"]  # lists extend
    assert resolve(settings["pytest_gpu"], True)["timeout_s"] < resolve(settings["pytest_gpu"], False)["timeout_s"]
    for mode in (False, True):
        train, wait = resolve(settings["train"], mode), resolve(settings["data_wait"], mode)
        load_config(REPO / train["config"], train["overrides"])
        compiled = load_config(REPO / train["config"], [*train["overrides"], *train.get("compile", [])])
        assert compiled.train.compile == (not mode), "--compile trains the full recipe compiled, as div2k.yaml does"
        assert list(wait["variants"])[0] == "packed-ahead"  # the first variant: the config's own loader settings
        for overrides in wait["variants"].values():
            load_config(REPO / wait["config"], [*wait["overrides"], *wait["compile"], *overrides])


def test_data_wait_leaves_out_the_dali_variant_without_dali(tmp_path, monkeypatch, capsys):
    """The full data_wait compares DALI's GPU loader with the torch loader (issue 24: DALI becomes the default where it
    trains at least as fast); where DALI is not installed that variant is left out and said so, not a failure
    that stops the variants after it."""
    import argparse

    from dist_dejpeg.bench import data_wait

    full = resolve(load_settings(SETTINGS)["data_wait"], False)
    assert full["variants"]["dali"] == ["data.backend=dali"] and list(full["variants"])[:2] == ["packed-ahead", "dali"]
    monkeypatch.setattr(data_wait, "have_dali", lambda: False)
    trained = []
    monkeypatch.setattr(data_wait.subprocess, "run", lambda cmd, **kw: trained.append(cmd))
    args = argparse.Namespace(settings=str(SETTINGS), quick=False, variants="dali", config="", steps=0, compile=False,
                              results=str(tmp_path), work=str(tmp_path / "work"), overrides=[])
    assert data_wait.main(args) == 0
    assert trained == [] and "dali: left out, NVIDIA DALI is not installed" in capsys.readouterr().out
    report = json.loads((tmp_path / data_wait.RESULTS_JSON).read_text())
    assert report["variants"] == {} and report["left_out"] == ["dali"]
    assert "| dali | left out: NVIDIA DALI is not installed | |" in (tmp_path / data_wait.RESULTS_MD).read_text()


def test_gpu_summary_sources(tmp_path):
    """gpu-summary.json reads the training run's own log (the last window of its gen and gan phases, and whether
    it was compiled), the rows bench train and bench infer name (their own labels), data_wait's first variant where
    the run did not log a data wait, and pytest's closing line; a number nobody measured stays null."""
    from dist_dejpeg.bench import gpu_summary
    from dist_dejpeg.bench.infer import FILE, GPU_SIZES, MODES, SIZES, TENSOR
    from dist_dejpeg.bench.common import TUNED
    from dist_dejpeg.bench.train import LADDER

    from dist_dejpeg.train.compile import FELL_BACK

    assert gpu_summary.TENSOR == TENSOR and gpu_summary.FELL_BACK == FELL_BACK
    (tmp_path / "results").mkdir()
    train = {LADDER[0][0]: {"gen": {"images_per_s_per_device": 100.0}},
             TUNED: {"gen": {"images_per_s_per_device": 770.0, "profile": {"device_busy_frac": 0.8}},
                     "gan": {"images_per_s_per_device": 300.0}}}
    (tmp_path / "results" / "train.json").write_text(json.dumps({"results": train}))
    size, tiled = [k for k in SIZES if k.startswith("2040")][0], [k for k in MODES if k.startswith("tiled")][0]
    rows = (("cpu", "fp32", tiled, 9000.0), ("cuda", "fp32", "whole", 1.0), ("cuda", "fp32", tiled, 80.0),
            ("cuda", "bf16", tiled, 50.0))
    infer = {f"{dev} {prec} {mode} {size}": {"ms_per_call": ms} for dev, prec, mode, ms in rows}
    infer |= {f"cuda bf16 {TENSOR} {size}": {"ms_per_call": 25.0}, f"cuda fp32 {TENSOR} {size}": {"ms_per_call": 40.0},
              f"cuda bf16 {FILE} {size}": {"ms_per_call": 300.0}, f"cuda bf16 {TENSOR} {list(GPU_SIZES)[0]}":
              {"ms_per_call": 140.0}, f"cuda bf16 vs fp32 {size}": {"bf16_minus_fp32_db": -0.01}}
    (tmp_path / "results" / "infer.json").write_text(json.dumps({"results": infer}))
    (tmp_path / "data_wait.json").write_text(json.dumps({"variants": {"list-ahead": {"data_wait_frac": 0.3},
                                                                      "packed-ahead": {"data_wait_frac": 0.01}}}))
    (tmp_path / "pytest_gpu.log").write_text("PASSED x\n===== 19 passed, 2 skipped, 388 deselected in 80.12s =====\n")
    logged = {"gen": {"train/images_per_s": 1600.0, "train/data_wait_frac": 0.015},
              "critic": {"train/images_per_s": 2000.0}, "gan": {"train/images_per_s": 850.0}}
    (tmp_path / "metrics.json").write_text(json.dumps({"meta": {"last_train_log": logged}}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("train:\n  compile: true\n  log_every: 25\n")
    (tmp_path / "run" / "train.log").write_text("2026-01-01 10:00:00,000 INFO dist_dejpeg: phase gen (1/3)\n")
    report = write_gpu_summary(tmp_path, card="NVIDIA H200", date="d", commit="c", device="cuda",
                               first_variant="packed-ahead")
    assert report == {"card": "NVIDIA H200", "date": "d", "commit": "c", "gen_img_s": 1600.0, "gan_img_s": 850.0,
                      "train_compiled": True, "bench_gen_img_s": 770.0, "bench_gan_img_s": 300.0,
                      "gpu_busy_frac": 0.8, "data_wait_frac": 0.015, "restore_2k_ms": 25.0, "restore_2k_fp32_ms": 40.0,
                      "restore_2k_array_ms": 50.0, "restore_2k_file_ms": 300.0, "restore_12mp_ms": 140.0,
                      "restore_bf16_minus_fp32_db": -0.01, "gpu_tests_passed": 19, "gpu_tests_skipped": 2,
                      "gpu_tests_complete": True}
    assert tuple(report) == SUMMARY_KEYS
    assert json.loads((tmp_path / "gpu-summary.json").read_text()) == report
    # compiled in its config, but compiling fell back to eager (the run's train.log says so: CompileWatch's
    # warning): not a compiled run (the config alone said True); no log of a compiled run: unknown
    with (tmp_path / "run" / "train.log").open("a") as log:
        log.write(f"2026-01-01 10:00:05,000 WARNING dist_dejpeg: {FELL_BACK} (3 frames; ...) and the models run "
                  "eagerly: this run is not a compiled one (its speed is eager's)\n")
    args = dict(card=None, date="d", commit="c", device="cuda", first_variant="packed-ahead")
    assert write_gpu_summary(tmp_path, **args)["train_compiled"] is False
    (tmp_path / "run" / "train.log").unlink()
    assert write_gpu_summary(tmp_path, **args)["train_compiled"] is None
    (tmp_path / "run" / "config.yaml").write_text("train:\n  compile: false\n")
    assert write_gpu_summary(tmp_path, **args)["train_compiled"] is False
    del train[TUNED]["gan"], train[TUNED]["gen"]["profile"]
    (tmp_path / "results" / "train.json").write_text(json.dumps({"results": train}))
    (tmp_path / "pytest_gpu.log").write_text("collecting ...\n")  # killed before any test ran
    (tmp_path / "metrics.json").unlink()  # no training run: its numbers are null, data_wait's wait stands in
    report = write_gpu_summary(tmp_path, card=None, date="d", commit="c", device="cpu", first_variant="packed-ahead")
    assert report["bench_gen_img_s"] == 770.0 and report["restore_2k_array_ms"] == 9000.0
    assert report["restore_2k_ms"] is None  # the CPU rows have no tensor row: only the GPU section does
    assert report["data_wait_frac"] == 0.01
    assert [report[k] for k in ("gen_img_s", "gan_img_s", "train_compiled", "bench_gan_img_s", "gpu_busy_frac",
                                "gpu_tests_passed", "gpu_tests_skipped", "gpu_tests_complete")] == [None] * 8
    # killed by its step's time limit after some tests ran: pytest -v's line of each, counted (-rA's lines, outcome
    # first, and a captured PASSED in a test's output are not), and marked incomplete, not taken for the whole run
    (tmp_path / "pytest_gpu.log").write_text(
        "collecting ... collected 400 items / 379 deselected / 21 selected\n\n"
        "tests/test_a.py::test_one PASSED                                         [  4%]\n"
        "tests/test_a.py::test_two[cuda-bf16 x] PASSED                            [  9%]\n"
        "tests/test_a.py::test_three SKIPPED (no DALI)                            [ 14%]\n"
        "tests/test_b.py::test_four FAILED                                        [ 19%]\n"
        "PASSED tests/test_a.py::test_one\n"
        "tests/test_b.py::test_five ")
    report = write_gpu_summary(tmp_path, card=None, date="d", commit="c", device="cpu", first_variant="packed-ahead")
    assert [report[k] for k in ("gpu_tests_passed", "gpu_tests_skipped", "gpu_tests_complete")] == [2, 1, False]


@pytest.mark.slow
def test_check_flow_on_cpu(wheels, tmp_path):
    out = tmp_path / "out"
    # a short TMPDIR of its own (multiprocessing's AF_UNIX sockets go there), to see that the check cleans it
    tmp = Path(tempfile.mkdtemp(prefix="gpuchk"))
    # a compile cache from an earlier check (one file of inductor's), carried in as one file, back as parts
    (tmp_path / "cache" / "inductor" / "ab").mkdir(parents=True)
    (tmp_path / "cache" / "inductor" / "ab" / "entry").write_text("compiled before")
    carried = tmp_path / "carry" / "compile.tar.gz"
    pack(tmp_path / "cache", carried)
    try:
        proc = _run([*CHECK, "--wheels", wheels, "--out", out, "--allow-cpu", "--quick", "--budget", "900",
                     "--steps", FLOW, "--compile-cache", carried, "--compile-cache-split", "1"],
                    timeout=1000, cwd=REPO, env=_env(TMPDIR=str(tmp)))
        left = list(tmp.iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{summary}"
    rows = _summary_rows(summary)
    assert list(rows) == ["env", "install", "cuda", *FLOW.split(",")], summary
    for step, (code, _, result) in rows.items():
        assert code == "0", (step, summary)
        assert result == SKIPPED.get(step, "ok"), (step, summary)
    for step in rows:
        assert (out / f"{step}.log").is_file(), step
    assert "dist_dejpeg from" in (out / "install.log").read_text()
    # the header names the commit, and says the working tree differs only when git says so
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    assert f"repo {commit}" in summary and ("differs from that commit" in summary) == commit.endswith("-dirty")
    # every step saw the carried cache; it went back (whatever the steps compiled beside it) as parts
    assert "TORCHINDUCTOR_CACHE_DIR=" in (env_log := (out / "env.log").read_text()) and "(1 files)" in env_log, env_log
    assert f"- compile cache: 1 files (0.0 MiB) unpacked from {carried}" in summary, summary
    assert "Compile cache: " in summary and not carried.exists() and parts_of(carried), summary
    unpack(carried, tmp_path / "back")
    assert (tmp_path / "back" / "inductor" / "ab" / "entry").read_text() == "compiled before"
    assert json.loads((out / "evaluate" / "metrics.json").read_text())["meta"]["images"] == 2
    table = (out / "data_wait.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ")][1:]  # below the header row
    assert [row.split("|")[1].strip() for row in rows] == ["packed-ahead"], table  # one run without CUDA
    assert table[2].startswith("Machine: ") and "no GPU" in table[2], table  # (it named no machine)
    assert re.fullmatch(r"\| packed-ahead \| \d\.\d{3} \| \d+\.\d \|", rows[0]), rows  # (raw floats)
    waits = json.loads((out / "data_wait.json").read_text())["variants"]
    assert list(waits) == ["packed-ahead"] and (out / "data_wait-packed-ahead.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads((out / "run" / "metrics.json").read_text())
    report = json.loads((out / "gpu-summary.json").read_text())
    assert tuple(report) == SUMMARY_KEYS
    assert report["card"] is None and report["bench_gen_img_s"] is None and report["restore_2k_ms"] is None  # not run
    logged = metrics["meta"]["last_train_log"]  # the training run's own log, eager (no --compile)
    assert report["gen_img_s"] == logged["gen"]["train/images_per_s"] > 0 and report["train_compiled"] is False
    assert report["gan_img_s"] == logged["gan"]["train/images_per_s"] > 0
    assert report["data_wait_frac"] == logged["gen"]["train/data_wait_frac"]
    assert report["gpu_tests_passed"] == 0 and report["gpu_tests_skipped"] > 0  # every gpu test skips on a CPU
    assert not left, left  # the check's scratch folder (installed wheels, sample shards, TMPDIR) is gone


# --- DALI's wheels as parts (gpu_wheels.sh --dali --split; here --pack of fake wheels: no download) ---------------
FAKE_DALI = "nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl"
REMAKE = "gpu_wheels.sh --dali --split 57"


def _pack(out: Path, mib: int, *wheels: Path) -> subprocess.CompletedProcess:
    return _run(["bash", WHEELS_SH, "--pack", mib, out, *wheels], timeout=60, env=_env())


def _tiny_wheel(folder: Path, name: str) -> Path:
    """A wheel pip installs: one module and its dist-info."""
    info = f"{name}-1.0.dist-info"
    files = {f"{name}.py": "VALUE = 7\n", f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in {**files, f"{info}/RECORD": record}.items():
            z.writestr(member, text)
    return path


@pytest.fixture
def dali_parts(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A folder with gpu_wheels.sh's parts of at most 1 MiB (three) of two fake wheels; their bytes by name."""
    src, out = tmp_path / "src", tmp_path / "wheels"
    src.mkdir()
    members = {FAKE_DALI: os.urandom(2_300_000), "gast-0.6.0-py3-none-any.whl": b"gast"}
    for name, data in members.items():
        (src / name).write_bytes(data)
    proc = _pack(out, 1, *(src / name for name in members))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, members


def test_wheels_pack_splits_into_checked_parts(dali_parts, tmp_path):
    """Parts of at most the size, named in order; the .sha256 file lists each and the joined tar, `sha256sum -c`
    accepts them all once joined, and the joined tar holds the wheels byte for byte. Bad sizes are refused."""
    out, members = dali_parts
    parts = sorted(out.glob(DALI_PARTS + "*"))
    assert [p.name for p in parts] == [f"{DALI_PARTS}{i:02d}" for i in range(3)]
    assert all(p.stat().st_size <= 2**20 for p in parts) and parts[0].stat().st_size == 2**20
    joined = b"".join(p.read_bytes() for p in parts)
    (out / DALI_TAR).write_bytes(joined)
    proc = _run(["sha256sum", "-c", DALI_SUMS], timeout=60, cwd=out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": OK") == 4 and f"{DALI_TAR}: OK" in proc.stdout
    assert hashlib.sha256(joined).hexdigest() in (out / DALI_SUMS).read_text()
    with tarfile.open(out / DALI_TAR) as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar} == members
    for argv, message in ((["--dali", "--split", "58"], "1 to 57"), (["--split", "5"], "pass --dali"),
                          (["--pack", "0", tmp_path / "p", parts[0]], "1 to 57")):
        proc = _run(["bash", WHEELS_SH, *argv, tmp_path / "never"], timeout=60, env=_env())
        assert proc.returncode == 1 and message in proc.stderr, (argv, proc.stderr)
    assert not (tmp_path / "never").exists()


def test_dali_parts_verified_joined_and_extracted(dali_parts, tmp_path):
    """The parts, or the tar joined by hand, give the wheels byte for byte; plain DALI wheels (unpacked by hand)
    beside the checksum file, or no DALI files at all, leave the plain wheels to the install."""
    out, members = dali_parts
    wheels = dali_wheels(out, tmp_path / "scratch")
    assert {w.name: w.read_bytes() for w in wheels} == members
    assert not (tmp_path / "scratch" / DALI_TAR).exists()  # the joined copy is removed after extracting
    by_hand = tmp_path / "by_hand"
    by_hand.mkdir()
    shutil.copy(out / DALI_SUMS, by_hand)
    (by_hand / DALI_TAR).write_bytes(b"".join(p.read_bytes() for p in sorted(out.glob(DALI_PARTS + "*"))))
    assert {w.name: w.read_bytes() for w in dali_wheels(by_hand, tmp_path / "scratch2")} == members
    (by_hand / DALI_TAR).unlink()
    (by_hand / FAKE_DALI).write_bytes(members[FAKE_DALI])
    assert dali_wheels(by_hand, tmp_path / "scratch3") == []
    assert dali_wheels(tmp_path / "src", tmp_path / "scratch4") == []


def _corrupt(folder: Path) -> None:
    part = folder / f"{DALI_PARTS}01"
    data = bytearray(part.read_bytes())
    data[1000] ^= 1
    part.write_bytes(bytes(data))


def _wrong_tar_sum(folder: Path) -> None:
    sums = folder / DALI_SUMS
    sums.write_text("".join(line if not line.endswith(f" {DALI_TAR}\n") else "0" * 64 + f"  {DALI_TAR}\n"
                            for line in sums.read_text().splitlines(keepends=True)))


BROKEN = {  # how the parts are broken -> (what is done, what the message names)
    "corrupt part": (_corrupt, f"{DALI_PARTS}01: wrong sha256"),
    "missing part": (lambda f: (f / f"{DALI_PARTS}02").unlink(), f"{DALI_PARTS}02: missing"),
    "all parts missing": (lambda f: [p.unlink() for p in f.glob(DALI_PARTS + "*")], f"{DALI_PARTS}00: missing"),
    "missing sha256": (lambda f: (f / DALI_SUMS).unlink(), f"{DALI_SUMS}: missing"),
    "unlisted part": (lambda f: shutil.copy(f / f"{DALI_PARTS}00", f / f"{DALI_PARTS}03"),
                      f"{DALI_PARTS}03: a part {DALI_SUMS} does not list"),
    "wrong tar sum": (_wrong_tar_sum, f"{DALI_TAR} (joined from 3 parts): wrong sha256"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_dali_parts_fail_naming_the_file(dali_parts, tmp_path, case):
    out, _ = dali_parts
    breaks, message = BROKEN[case]
    breaks(out)
    with pytest.raises(WheelsError) as err:
        dali_wheels(out, tmp_path / "scratch")
    assert message in str(err.value) and REMAKE in str(err.value), str(err.value)


def test_install_step_installs_dali_parts_with_the_wheels(wheels, tmp_path):
    """The install step (as the check runs it) joins verified parts and installs their wheels into the install
    folder with the others; a corrupt part (or one a restarted lease machine lost) fails it in part, naming the
    part: the project's wheels are installed without DALI's, and the later steps run (exit PARTIAL)."""
    from dist_dejpeg.bench.gpu_check_runner import PARTIAL

    folder, src = tmp_path / "wheels", tmp_path / "src"
    shutil.copytree(wheels, folder)
    src.mkdir()
    assert _pack(folder, 1, _tiny_wheel(src, "fake_dali_dep")).returncode == 0
    work = tmp_path / "work"
    ctx = {"root": str(REPO), "wheels": str(folder), "work": str(work), "site": str(work / "site"),
           "py": sys.executable, "steps": {"install": {}}}
    work.mkdir()
    (work / "context.json").write_text(json.dumps(ctx))
    step = [sys.executable, "-m", "dist_dejpeg.bench.gpu_check_steps", "install", work / "context.json"]
    env = _env(PYTHONPATH=ctx["site"])  # as the check's runner sets it for install and the later steps
    proc = _run(step, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"verified {DALI_PARTS}00 and the {DALI_TAR}" in proc.stdout and "dist_dejpeg from" in proc.stdout
    assert (work / "site" / "fake_dali_dep.py").is_file() and (work / "site" / "omegaconf").is_dir()
    assert "no DALI wheels" in proc.stdout  # a dependency alone: DALI's import check is not run
    shutil.rmtree(work / "site")
    first = folder / f"{DALI_PARTS}00"
    first.write_bytes(first.read_bytes()[:-1])
    proc = _run(step, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == PARTIAL and f"{DALI_PARTS}00: wrong sha256" in proc.stdout, proc.stdout + proc.stderr
    assert "installing without DALI" in proc.stdout and "dist_dejpeg from" in proc.stdout
    assert (work / "site" / "omegaconf").is_dir() and not (work / "site" / "fake_dali_dep.py").exists()


# --- benchmarks/lease.sh: the calls of a lent GPU machine (stage, check, keep), here with --allow-cpu -------------
LEASE_SH = REPO / "benchmarks" / "lease.sh"


def test_lease_stages_checks_and_keeps(wheels, tmp_path):
    """Two staging calls carry the wheels in pieces into one folder; check runs the GPU check there and leaves one
    archive of its folder (weights left out) and the compile cache's parts in OUT; keep puts the parts where the
    next call carries them from and the check's folder under the results, named by card and date."""
    carried, at, cache, results, out = (tmp_path / n for n in ("carried", "at", "cache", "results", "out"))
    env = _env(LEASE_WHEELS=str(carried), LEASE_CACHE=str(cache), LEASE_RESULTS=str(results), WHEELS_AT=str(at),
               OUT=str(out))
    names = sorted(w.name for w in wheels.glob("*.whl"))
    for call in (names[:3], names[3:]):  # what each call carries replaces what the one before carried
        shutil.rmtree(carried, ignore_errors=True)
        (carried / "plain").mkdir(parents=True)
        for name in call:
            shutil.copy(wheels / name, carried / "plain")
        proc = _run(["bash", LEASE_SH, "stage"], timeout=60, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in at.iterdir()) == names
    out.mkdir()
    proc = _run(["bash", LEASE_SH, "check", "--allow-cpu", "--quick", "--steps", "bench_infer", "--commit", "abc"],
                timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    back = sorted(p.name for p in out.iterdir())
    assert back == ["check.tar.gz", "compile.tar.gz.part-00"], back
    with tarfile.open(out / "check.tar.gz") as tar:
        members = tar.getnames()
    assert "check/summary.md" in members and "check/gpu-summary.json" in members, members
    assert not any(m.endswith((".safetensors", ".pt")) for m in members), members
    proc = _run(["bash", LEASE_SH, "keep", out], timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [p.name for p in cache.iterdir()] == ["compile.tar.gz.part-00"]
    kept = sorted(results.iterdir())
    assert [k.name for k in kept][1:] == ["gpu-summary.json"] and kept[0].name.startswith("gpu-cpu-20"), kept
    assert (results / "gpu-summary.json").read_bytes() == (kept[0] / "gpu-summary.json").read_bytes()
    kept = [k for k in kept if k.is_dir()]
    summary = (kept[0] / "summary.md").read_text()
    assert "| install | 0 |" in summary and "repo abc" in summary, summary
    assert "compile cache: none at" in summary, summary  # the first call: nothing carried yet
    proc = _run(["bash", LEASE_SH, "keep", out], timeout=60, env=env)  # a second keep never overwrites the first
    assert proc.returncode == 0 and len(list(results.glob("gpu-cpu-*"))) == 2, proc.stdout + proc.stderr


def _plain_wheels(folder: Path) -> Path:
    """Stand-ins for gpu_wheels.sh's small wheels in ``folder`` (each an empty zip; dist_dejpeg's holds this checkout's
    package files, as one built from it does); returns dist_dejpeg's."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in PREFIXES[:-1]:
        zipfile.ZipFile(folder / f"{prefix}-1.0-py3-none-any.whl", "w").close()
    ours = folder / "dist_dejpeg-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(ours, "w") as z:
        for path in (REPO / "dist_dejpeg").rglob("*.py"):
            z.write(path, path.relative_to(REPO).as_posix())
    return ours


def test_lease_plan_sizes_each_call_with_the_checkout(tmp_path):
    """`lease.sh plan` lists the calls (a stage call per DALI part, the small wheels with the last, smallest part,
    then check with the cache) and each call's size with the checkout; one over 64 MiB fails, named."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    wheels, cache = tmp_path / "wheels", tmp_path / "cache"
    _plain_wheels(wheels / "plain")
    cache.mkdir()
    (wheels / "plain" / "a.whl").write_bytes(b"x" * 2**20)
    for i, mib in enumerate((57, 57, 20)):
        with open(wheels / f"dali-wheels.tar.part-{i:02d}", "wb") as f:
            f.truncate(mib * 2**20)  # sparse: the apparent size is what travels
    env = _env(LEASE_WHEELS=str(wheels), LEASE_CACHE=str(cache))
    proc = _run(["bash", LEASE_SH, "plan"], timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commit = _run(["git", "-C", REPO, "describe", "--always", "--dirty"], timeout=60).stdout.strip()
    # the copy on the machine has no git metadata of this commit: the check call names it
    assert f"4. bash benchmarks/lease.sh check --commit {commit}  carry: " in proc.stdout, proc.stdout
    calls = [line.split("carry: ")[1] for line in proc.stdout.splitlines() if "carry: " in line]
    assert [c.split("  (")[0] for c in calls] == [
        f"{wheels}/dali-wheels.tar.part-00", f"{wheels}/dali-wheels.tar.part-01",
        f"{wheels}/plain {wheels}/dali-wheels.tar.part-02", str(cache)], calls
    checkout = float(proc.stdout.split("(the checkout: ")[1].split(" MiB")[0])
    assert 0.5 < checkout < 20, proc.stdout
    first = float(calls[0].split("  (")[1].split(" MiB")[0])
    assert abs(first - (57 + checkout)) < 0.2, (first, checkout)
    with open(wheels / "dali-wheels.tar.part-01", "wb") as f:
        f.truncate(63 * 2**20)
    proc = _run(["bash", LEASE_SH, "plan"], timeout=60, env=env)
    assert proc.returncode == 1 and "is over 64 MiB" in proc.stderr, proc.stdout + proc.stderr
    assert [line.endswith("OVER") for line in proc.stdout.splitlines() if "carry: " in line] == [
        False, True, False, False], proc.stdout

    # without DALI the small wheels go with the check call, or in a stage call of their own where they (jpeglib's
    # 23 MB) and a full compile cache would be over 64 MiB together
    for part in wheels.glob("dali-wheels.tar.part-*"):
        part.unlink()
    with open(wheels / "plain" / "a.whl", "wb") as f:
        f.truncate(23 * 2**20)

    def carried() -> list[str]:
        proc = _run(["bash", LEASE_SH, "plan"], timeout=60, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return [line.split("carry: ")[1].split("  (")[0] for line in proc.stdout.splitlines() if "carry: " in line]

    assert carried() == [f"{wheels}/plain {cache}"]
    with open(cache / "compile.tar.gz.part-00", "wb") as f:
        f.truncate(40 * 2**20)
    assert carried() == [f"{wheels}/plain", str(cache)]


def test_lease_plan_refuses_a_wheel_folder_the_check_cannot_install(tmp_path):
    """Without one of the small wheels (no `lease.sh prepare`, or a partial one) the check's install step fails and
    every later step is skipped: plan fails naming them, before a lease is started for nothing. A dist_dejpeg wheel
    of another tree (built before the last change) is a warning naming a file that differs."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    wheels, cache = tmp_path / "wheels", tmp_path / "cache"
    env = _env(LEASE_WHEELS=str(wheels), LEASE_CACHE=str(cache))
    proc = _run(["bash", LEASE_SH, "plan"], timeout=60, env=env)
    assert proc.returncode == 1 and "no wheel of lpips webdataset" in proc.stderr, proc.stdout + proc.stderr
    ours = _plain_wheels(wheels / "plain")
    (wheels / "plain" / "omegaconf-1.0-py3-none-any.whl").unlink()
    proc = _run(["bash", LEASE_SH, "plan"], timeout=60, env=env)
    assert proc.returncode == 1 and "no wheel of omegaconf in" in proc.stderr, proc.stdout + proc.stderr
    _plain_wheels(wheels / "plain")
    proc = _run(["bash", LEASE_SH, "plan"], timeout=60, env=env)
    assert proc.returncode == 0 and "lease.sh: " not in proc.stderr, proc.stdout + proc.stderr
    with zipfile.ZipFile(ours, "a") as z:
        z.writestr("dist_dejpeg/gone_since.py", "")
    proc = _run(["bash", LEASE_SH, "plan"], timeout=60, env=env)
    assert proc.returncode == 0 and "not this checkout's (1 files differ: gone_since.py)" in proc.stderr, proc.stderr


def test_lease_stage_says_which_dali_parts_are_lost(dali_parts, tmp_path):
    """The last stage call (it brings the checksums) checks DALI's parts in the staging folder: a part a restarted
    machine lost, or a wrong one, is named there, before the check call's minutes are spent."""
    parts, _ = dali_parts
    wheels, at = tmp_path / "carried", tmp_path / "at"
    (wheels / "plain").mkdir(parents=True)
    shutil.copy(parts / DALI_SUMS, wheels / "plain")
    for part in sorted(parts.glob(DALI_PARTS + "*")):
        shutil.copy(part, wheels)
    env = _env(LEASE_WHEELS=str(wheels), WHEELS_AT=str(at))
    proc = _run(["bash", LEASE_SH, "stage"], timeout=60, env=env)
    assert proc.returncode == 0 and "every DALI part" in proc.stdout, proc.stdout + proc.stderr
    shutil.rmtree(at)
    (wheels / f"{DALI_PARTS}01").unlink()
    proc = _run(["bash", LEASE_SH, "stage"], timeout=60, env=env)
    assert proc.returncode == 0 and f"{DALI_PARTS}01 (missing)" in proc.stderr, proc.stdout + proc.stderr
    (at / f"{DALI_PARTS}01").write_bytes(b"not it")
    proc = _run(["bash", LEASE_SH, "stage"], timeout=60, env=env)
    assert "wrong sha256" in proc.stderr and "every DALI part" not in proc.stdout, proc.stdout + proc.stderr


def test_an_installed_package_from_another_tree_is_named(tmp_path):
    """The install step fails where the wheel's dist_dejpeg is not the checkout's (built before a change: the steps
    would measure old code): the files that differ, that are new, or gone, by relative path."""
    from dist_dejpeg.bench.gpu_check_steps import changed_files

    installed, source = tmp_path / "site" / "pkg", tmp_path / "repo" / "pkg"
    for root in (installed, source):
        (root / "sub").mkdir(parents=True)
        (root / "a.py").write_text("x = 1\n")
        (root / "sub" / "b.py").write_text("y = 2\n")
        (root / "sub" / "b.txt").write_text("not code")
    assert changed_files(installed, source) == []
    (source / "sub" / "b.py").write_text("y = 3\n")
    (source / "new.py").write_text("")
    (installed / "old.py").write_text("")
    (installed / "sub" / "b.txt").write_text("other")
    assert changed_files(installed, source) == ["new.py", "old.py", "sub/b.py"]
    assert changed_files(installed, tmp_path / "no-checkout") == []


def test_lease_folders_are_ignored_by_git():
    """.gpu_wheels/ (~250 MB of wheels) and .gpu_cache/ travel to the device only where a call names them in
    `carry`: the device tool copies every file git does not ignore, so they must be ignored."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    paths = [".gpu_wheels/plain/x.whl", ".gpu_wheels/dali-wheels.tar.part-00", ".gpu_cache/compile.tar.gz.part-00"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == sorted(paths), proc.stdout + proc.stderr


def test_steps_after_a_failed_install_are_skipped(tmp_path):
    """With the install step failed, bench_train ran against whatever dist_dejpeg the machine had and its number
    went into gpu-summary.json: the later steps are now skipped, saying why."""
    from dist_dejpeg.bench.gpu_check_runner import Runner

    summary = tmp_path / "summary.md"
    summary.write_text("")
    ctx = {"steps": {n: {} for n in ("install", "cuda", "bench_train")}, "have_cuda": True, "site": ""}
    runner, ran = Runner(tmp_path, summary, ctx, {}, deadline=0, budget=1), []

    def step(name, limit):
        ran.append(name)
        if name == "install":
            runner.failed.append(name)
            runner.blocked = True

    runner.step = step
    assert runner.run(["install", "cuda", "bench_train"]) == ["install"] and ran == ["install"]
    assert summary.read_text().count("skipped: install failed") == 2


def test_steps_after_an_install_failed_in_part_run(tmp_path):
    """DALI's parts broken or lost (a lease machine restarted between the stage calls), or the project's wheel built
    before a change: install fails in part (PARTIAL) and every later step still runs; a lease's check lost them all."""
    from dist_dejpeg.bench.gpu_check_runner import PARTIAL, Runner

    summary, py = tmp_path / "summary.md", tmp_path / "py"
    summary.write_text("")
    # the step runner's interpreter: exit PARTIAL for install, 0 for any other step
    py.write_text(f'#!/bin/sh\ncase "$3" in install) exit {PARTIAL};; *) exit 0;; esac\n')
    py.chmod(0o755)
    ctx = {"steps": {n: {} for n in ("install", "bench_train")}, "have_cuda": True, "site": "", "py": str(py),
           "work": str(tmp_path), "root": str(tmp_path)}
    runner = Runner(tmp_path, summary, ctx, dict(os.environ), deadline=time.time() + 60, budget=60)
    assert runner.run(["install", "bench_train"]) == ["install"]
    rows = _summary_rows(summary.read_text())
    assert rows["install"][0] == str(PARTIAL) and "FAILED: in part" in rows["install"][2], rows
    assert rows["bench_train"][2] == "ok", rows
    py.write_text('#!/bin/sh\ncase "$3" in install) exit 1;; *) exit 0;; esac\n')  # the project cannot run
    summary.write_text("")
    runner = Runner(tmp_path, summary, ctx, dict(os.environ), deadline=time.time() + 60, budget=60)
    assert runner.run(["install", "bench_train"]) == ["install"]
    assert _summary_rows(summary.read_text())["bench_train"][2] == "skipped: install failed"
