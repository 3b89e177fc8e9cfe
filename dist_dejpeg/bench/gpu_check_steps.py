"""The GPU check's steps, one per child process (dist_dejpeg/bench/gpu_check.py starts them, each in a process
group of its own under its timeout, stdout+stderr into OUT/<step>.log):

    python -m dist_dejpeg.bench.gpu_check_steps STEP WORK/context.json

The context (written by the check) names the folders, the check's options and each step's settings from
configs/gpu_check.yaml, resolved for the run's mode. Only the standard library at the top: the env step runs
before the wheels are installed; torch is imported inside the steps that probe it, and the project's commands
run as their own processes (``python -m dist_dejpeg.cli ...``), each command echoed first (``+ ...``).
At the end the check itself calls bench/gpu_summary.py's write_gpu_summary over the files the steps wrote.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from dist_dejpeg.bench.dali_wheels import WheelsError, dali_wheels
from dist_dejpeg.bench.gpu_check_runner import PARTIAL
from dist_dejpeg.run.layout import GENERATOR, METRICS


def changed_files(installed: Path, source: Path) -> list[str]:
    """The .py files (relative paths) that differ between an installed package and the source folder it should have
    been built from, or that only one of them has; [] where there is no source folder (a check outside a checkout)."""
    if not source.is_dir():
        return []
    a, b = ({p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.py")}
            for root in (installed, source))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


# install's import check, run outside the repository: the project and the wheels' packages must come from the
# install folder, and omegaconf's grammar must work (an interpolation: its antlr runtime is inside its wheel)
IMPORT_CHECK = """
import os
import io
import dist_dejpeg, jpeglib, lpips, omegaconf, webdataset
from importlib.metadata import version
for m, dist in ((dist_dejpeg, "dist_dejpeg"), (lpips, "lpips"), (webdataset, "webdataset"), (omegaconf, "omegaconf"),
                (jpeglib, "jpeglib")):
    print(f"{dist:24s} {version(dist):8s} {m.__file__}")
cfg = omegaconf.OmegaConf.create({"a": "${b}", "b": 3})
assert cfg.a == 3, cfg
# pyproject's floor (a wheel folder made before it carried 2.3.0, whose messages two config tests do not read)
assert tuple(int(p) for p in version("omegaconf").split(".")[:2]) >= (2, 4), version("omegaconf")
from PIL import Image
from dist_dejpeg.jpeg.consistency import read_cells
buf = io.BytesIO()
Image.new("RGB", (24, 16), (200, 30, 60)).save(buf, format="JPEG", quality=50)
assert [p.factor for p in read_cells(buf.getvalue()).planes] == [(1, 1), (2, 2), (2, 2)]  # libjpeg-turbo loads there
site = os.path.realpath(os.environ["GPU_CHECK_SITE"])
where = os.path.realpath(dist_dejpeg.__file__)
assert where.startswith(site + os.sep), f"dist_dejpeg imported from {where}, not from {site}"
print("ok: dist_dejpeg from", site)
"""

# install's DALI check, where DALI's wheels were installed: the GPU tests and bench data's DALI rows need it to import
# from the install folder, with the PyTorch plugin the project's loader uses
DALI_CHECK = """
import os
import nvidia.dali, nvidia.dali.plugin.pytorch
from dist_dejpeg.data.dali import HAVE_DALI
where = os.path.realpath(nvidia.dali.__file__)
print("nvidia.dali", nvidia.dali.__version__, where)
assert where.startswith(os.path.realpath(os.environ["GPU_CHECK_SITE"]) + os.sep), f"DALI imported from {where}"
assert HAVE_DALI, "dist_dejpeg.data.dali does not see DALI"
"""
def sh(*cmd, cwd: str | None = None, env: dict | None = None) -> int:
    """Run one command with the step's output (``set -x`` style: echoed first); its exit code."""
    cmd = [str(c) for c in cmd]
    print("+ " + shlex.join(cmd), flush=True)
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL).returncode
    except FileNotFoundError:
        print(f"gpu_check: {cmd[0]}: not found", flush=True)
        return 127


def cli(ctx, *args) -> list[str]:
    return [ctx.py, "-m", "dist_dejpeg.cli", *map(str, args)]


def missing(path: Path) -> int:
    """1 with a line when a step's expected output is not there (or empty), else 0."""
    if path.is_file() and path.stat().st_size:
        return 0
    print(f"gpu_check: no {path}", flush=True)
    return 1


def env(ctx, s: dict) -> int:
    print("## machine", flush=True)
    sh("date", "-u")
    print(" ".join(platform.uname()))
    print(f"cores: {os.cpu_count()}", flush=True)
    if shutil.which("free"):
        sh("free", "-g")
    print("## repository", flush=True)
    sh("git", "-C", ctx.root, "log", "-1", "--oneline")
    status = subprocess.run(["git", "-C", ctx.root, "status", "--short"], capture_output=True, text=True)
    print("\n".join(status.stdout.splitlines()[:40]), flush=True)
    print("## nvidia-smi", flush=True)
    if shutil.which("nvidia-smi"):
        sh("nvidia-smi")
    else:
        print("nvidia-smi: not found", flush=True)
    print("## python / torch", flush=True)
    import torch

    print("python", sys.version.replace("\n", " "), platform.machine())
    print("torch", torch.__version__, "| CUDA (build)", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
    print("cuda available", torch.cuda.is_available(), "| devices", torch.cuda.device_count())
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    print("## compile caches (gpu_check --compile-cache sets them)", flush=True)
    for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        value = os.environ.get(key)
        files = sum(p.is_file() for p in Path(value).rglob("*")) if value and Path(value).is_dir() else 0
        print(f"{key}={value or '<unset>'} ({files} files)", flush=True)
    print("## pip list", flush=True)
    if rc := sh(ctx.py, "-m", "pip", "list"):
        print(f"gpu_check: pip list failed (exit {rc})", flush=True)
    print("## wheels to install", flush=True)
    for wheel in sorted(Path(ctx.wheels).iterdir()):
        print(f"{wheel.stat().st_size:10d}  {wheel.name}")
    return 0


def _pip_install(ctx, wheels: list[Path]) -> int:
    """Install the wheels into the install folder (pip --target; unpacked where the steps' Python has no pip)."""
    import zipfile

    if subprocess.run([ctx.py, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        return sh(ctx.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                  "--target", ctx.site, *wheels)
    print(f"gpu_check: no pip for {ctx.py}; unpacking the wheels into {ctx.site} instead", flush=True)
    for wheel in wheels:  # unpacked onto PYTHONPATH, the wheels import the same (no console scripts)
        zipfile.ZipFile(wheel).extractall(ctx.site)
    return 0


def install(ctx, s: dict) -> int:
    """The wheels, then the imports the later steps need: exit 1 where the project cannot run (every later step is
    skipped), PARTIAL where it can but DALI is left out or the project's wheel is not this checkout's (a lease's
    other steps still measure: they import the checkout's own code, from its root)."""
    try:
        dali, partial = dali_wheels(Path(ctx.wheels), Path(ctx.work) / "dali"), False
    except WheelsError as err:
        print(f"gpu_check: {err}\ngpu_check: installing without DALI (its GPU tests skip)", flush=True)
        dali, partial = [], True
    # a wheel both plain in the folder and in the parts: the verified one, installed with DALI's
    plain = [w for w in sorted(Path(ctx.wheels).glob("*.whl")) if w.name not in {d.name for d in dali}]
    if rc := _pip_install(ctx, plain):
        return rc
    print(f"installed into {ctx.site}:", *sorted(p.name for p in Path(ctx.site).iterdir()), sep="\n", flush=True)
    print(f"## imports from outside the repository (cwd {ctx.work}): dist_dejpeg must come from {ctx.site}", flush=True)
    if rc := sh(ctx.py, "-c", IMPORT_CHECK, cwd=ctx.work, env=dict(os.environ, GPU_CHECK_SITE=ctx.site)):
        return rc
    print(f"## from the repository root (cwd {ctx.root}; what the later steps import)", flush=True)
    if rc := sh(ctx.py, "-c", 'import dist_dejpeg; print("dist_dejpeg", dist_dejpeg.__file__)'):
        return rc
    if stale := changed_files(Path(ctx.site) / "dist_dejpeg", Path(ctx.root) / "dist_dejpeg"):
        print(f"gpu_check: the installed dist_dejpeg is not this checkout's ({len(stale)} files differ: "
              f"{', '.join(stale[:3])}): its wheel was built from another tree; the steps import the checkout's code "
              f"from its root, but a process started elsewhere would run the wheel's; rebuild it "
              f"(benchmarks/gpu_wheels.sh DIR, or benchmarks/lease.sh prepare)", flush=True)
        partial = True
    if dali and (rc := _pip_install(ctx, dali)):
        print(f"gpu_check: DALI's wheels did not install (exit {rc}): the GPU tests that need DALI skip", flush=True)
        partial = True
    elif not any(w.name.startswith("nvidia_dali") for w in [*plain, *dali]):
        print("## no DALI wheels (gpu_wheels.sh --dali adds them): the GPU tests that need DALI skip", flush=True)
    else:
        print(f"## DALI, from {ctx.site}", flush=True)
        if rc := sh(ctx.py, "-c", DALI_CHECK, cwd=ctx.work, env=dict(os.environ, GPU_CHECK_SITE=ctx.site)):
            print(f"gpu_check: DALI does not import (exit {rc}): its GPU tests and bench data's DALI rows fail",
                  flush=True)
            partial = True
    return PARTIAL if partial else 0


def cuda(ctx, s: dict) -> int:
    import time

    import torch

    assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
    dev = torch.device("cuda", 0)
    p = torch.cuda.get_device_properties(0)
    print("device:", torch.cuda.get_device_name(0), f"capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    print("bf16 supported:", torch.cuda.is_bf16_supported())
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, 512, generator=g, dtype=torch.float64)
    b = torch.randn(512, 512, generator=g, dtype=torch.float64)
    ref = a @ b
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
        err = (((a.to(dev, dtype) @ b.to(dev, dtype)).double().cpu() - ref).abs().max() / ref.abs().max()).item()
        print(f"matmul {dtype}: max relative error {err:.2e} (limit {tol:g})")
        assert err < tol, f"{dtype} matmul on the GPU is wrong: {err:.2e}"
    x = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    x @ x
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        x @ x
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 20
    print(f"bf16 4096^3 matmul: {dt * 1e3:.2f} ms, {2 * 4096**3 / dt / 1e12:.0f} TFLOP/s")
    assert torch.cuda.is_bf16_supported(), "no bf16 on this GPU"
    print("ok")
    return 0


def pytest_gpu(ctx, s: dict) -> int:
    import importlib.util

    # -rA and the short tracebacks print each failure's message right after the test, not only at the end;
    # -o addopts=: not the suite's `-n 2` (pytest-xdist is not on the GPU machine; GPU tests run one at a time)
    options = ["--timeout", s["per_test_timeout_s"]] if importlib.util.find_spec("pytest_timeout") else []
    options += ["-k", ctx.tests] if ctx.tests else []
    # only the files that mark a test gpu: collecting the whole suite imports every module for nothing (15 s on 2 cores)
    files = sorted(str(f.relative_to(ctx.root)) for f in (Path(ctx.root) / "tests").glob("test_*.py")
                   if "mark.gpu" in f.read_text(errors="replace"))
    rc = sh(ctx.py, "-m", "pytest", "-o", "addopts=", "-m", "gpu", "-v", "-rA", "--tb=line", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", *options, *(files or ["tests"]))
    if rc == 5:
        print("gpu_check: pytest exit 5: no test collected (counted as a failure)")
    return rc


def bench(ctx, s: dict, which: str, *extra) -> int:
    """``dist-dejpeg bench``: options before the benchmark's name, overrides after it (what every version parses)."""
    results = Path(ctx.out) / "results"
    cmd = cli(ctx, "bench", "--results", results, *s.get("args", []), *extra, which, *s.get("overrides", []))
    if rc := sh(*cmd, env=dict(os.environ, **s.get("env", {}))):
        return rc
    return missing(results / f"{which}.json")


def bench_train(ctx, s: dict) -> int:
    return bench(ctx, s, "train", *([] if ctx.rungs else s.get("rungs", [])))


def bench_data(ctx, s: dict) -> int:
    return bench(ctx, s, "data")


def bench_infer(ctx, s: dict) -> int:
    return bench(ctx, s, "infer")


def prepare(ctx) -> int:
    """The sample photos in the settings' tiles, once per check (the full train and data_wait share them)."""
    if (Path(ctx.data) / "manifest.json").is_file():
        return 0
    return sh(*cli(ctx, "prepare", *ctx.prepare, "--out", ctx.data))


def train(ctx, s: dict) -> int:
    if s.get("prepare") and (rc := prepare(ctx)):
        return rc
    run = Path(ctx.out) / "run"
    if rc := sh(*cli(ctx, "train", "--config", s["config"], f"train.run_dir={run}", f"data.root={ctx.data}",
                     *s.get("overrides", []), *(s.get("compile", []) if ctx.compile else []))):
        return rc
    shutil.copyfile(run / METRICS, Path(ctx.out) / METRICS)
    print(f"gpu_check: copied {METRICS} to {ctx.out}")
    meta = json.loads((run / METRICS).read_text())["meta"]
    for phase, log in (meta.get("last_train_log") or {}).items():
        print(f"gpu_check: {phase} phase, last log window: data_wait_frac {log.get('train/data_wait_frac')}, "
              f"images/s {log.get('train/images_per_s')}")
    return 0


def evaluate(ctx, s: dict) -> int:
    """The trained run's generator: the metrics, then a restore of a photo through the CLI."""
    run, out = Path(ctx.out) / "run", Path(ctx.out) / "evaluate"
    if missing(run / GENERATOR):
        print("gpu_check: no generator from the train step")
        return 1
    shards = sorted(str(p) for p in Path(ctx.data).glob("val-*.tar"))
    if rc := sh(*cli(ctx, "evaluate", "--model", run, "--images", *shards, "--quality", *s["qualities"],
                     "--max-images", s["max_images"], "-o", out, "--quiet")):
        return rc
    print("\n".join((out / "metrics.md").read_text().splitlines()[:24]), flush=True)
    photo = Path(ctx.work) / "astronaut.png"
    make = ("import sys, skimage.data; from PIL import Image\n"
            "Image.fromarray(skimage.data.astronaut()).resize((int(sys.argv[2]), int(sys.argv[3]))).save(sys.argv[1])")
    if rc := sh(ctx.py, "-c", make, photo, *s["photo"]):
        return rc
    return sh(*cli(ctx, "restore", photo, "-o", Path(ctx.work) / "restored", "--model", run, "--quiet"))


def data_wait(ctx, s: dict) -> int:
    """The data-wait benchmark (dist_dejpeg/bench/data_wait.py) with this check's settings file and mode."""
    if s.get("prepare") and (rc := prepare(ctx)):
        return rc
    options = ["--quick"] if s["quick"] else []
    options += ["--settings", ctx.settings]
    options += ["--compile"] if ctx.compile else []
    options += ["--variants", ctx.wait] if ctx.wait else []
    return sh(ctx.py, "-m", "dist_dejpeg.bench.data_wait", *options, "--results", ctx.out, "--work", ctx.work,
              f"data.root={ctx.data}")


STEPS = {f.__name__: f for f in (env, install, cuda, pytest_gpu, bench_train, train, evaluate, data_wait, bench_data,
                                 bench_infer)}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in STEPS:
        print(f"usage: python -m dist_dejpeg.bench.gpu_check_steps {{{','.join(STEPS)}}} CONTEXT_JSON", file=sys.stderr)
        return 2
    ctx = SimpleNamespace(**json.loads(Path(argv[1]).read_text()))
    return STEPS[argv[0]](ctx, ctx.steps[argv[0]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
