"""What every benchmark shares: its common flags (``--results``, ``--name``, ``--config`` and ``key=value``
overrides) and the default config, the machine's description, warm-up + device sync + repeated timing, and the
results files (``<name>.json`` with everything, ``<name>.md`` with the table and the machine's name). For the
quality benchmarks (``bench quality`` and the ablations in benchmarks/experiments/): trainings in child processes,
the held-out photos they are evaluated on, the mean and spread over seeds.

Timing rule: run ``warmup`` calls, synchronize the device, then time ``repeats`` blocks of ``steps`` calls,
synchronizing before each clock read; the reported time is the median block, the spread is (max - min) /
median. Ratios between rows are only ever computed from rows of one run (one results file).

torch is imported inside the functions that use it: the flags are added without it (``dist-dejpeg bench
NAME --help``, and the GPU check before its install step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dist_dejpeg import source_commit
from dist_dejpeg.bench import DEFAULT_RESULTS
from dist_dejpeg.run.files import atomic_write_files, atomic_write_text
from dist_dejpeg.run.layout import GENERATOR

if TYPE_CHECKING:
    import torch

# Without a GPU: the CPU debug recipe. With one: configs/div2k.yaml at 256 px crops (the throughput target's
# settings), random-init backbones so that no download is needed (speed does not depend on the weights).
CPU_CONFIG = ("configs/debug.yaml", [])
GPU_CONFIG = ("configs/div2k.yaml", ["data.crop=256", "model.pretrained=false", "loss.lpips_pretrained=false"])

# The label of bench train's row with the config's own settings: bench scaling and the scaling model read it
TUNED = "tuned: the config's own settings"
# bench train's updates (its --updates, and bench scaling's) -> the rows each times
UPDATES = {"gen": ("gen", "gen without LPIPS"), "critic": ("critic",), "gan": ("gan generator turn",)}


def add_common_arguments(parser: argparse.ArgumentParser, name: str | None, *, config: bool = True) -> None:
    """The flags benchmarks share: --results; --name (``name``: the default file name; None: no such flag);
    with ``config`` (the benchmark builds models from a training config), --config and the key=value overrides."""
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="folder for the .json/.md results")
    if name:
        parser.add_argument("--name", default=name, help="results file name (<name>.json and <name>.md)")
    if config:
        parser.add_argument("--config", help="training config (none: configs/debug.yaml on a CPU; on a GPU "
                                             "configs/div2k.yaml at 256 px with random-init backbones)")
        parser.add_argument("overrides", nargs="*", default=[],
                            help="config overrides, key=value (anywhere but right after an option "
                                 "that takes several values)")


CHECKOUT = Path(__file__).resolve().parents[2]  # the repository (an editable install's)


def bundled(config: str) -> str:
    """One of the repository's configs: relative to this folder where it is there (the repository root), else the
    checkout's own (a benchmark run from another folder)."""
    return config if Path(config).is_file() or not (CHECKOUT / config).is_file() else str(CHECKOUT / config)


def default_config() -> tuple[str, list[str]]:
    """The machine's default config (bundled) and its overrides."""
    import torch

    config, overrides = GPU_CONFIG if torch.cuda.is_available() else CPU_CONFIG
    return bundled(config), overrides


def config_of(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The config and overrides a benchmark runs: --config, or the machine's default config with its own
    overrides first; the command line's overrides after them (a new list: the defaults stay as they are)."""
    config, defaults = (args.config, []) if args.config else default_config()
    return config, [*defaults, *args.overrides]


# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity), for model-FLOPs
# utilisation. Matched by substring of torch.cuda.get_device_name(); DIST_DEJPEG_PEAK_TFLOPS overrides.
BF16_PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0,
    "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 0.0, "T4": 0.0,
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _nvidia_smi(field: str) -> list[str]:
    """``field`` of each GPU as nvidia-smi lists it; [] without nvidia-smi (or when it fails)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines() if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        return []


def _gpu_driver() -> str:
    return (_nvidia_smi("driver_version") or [""])[0]


def machine_name_without_torch() -> str:
    """The machine named as machine_name does, from /proc/cpuinfo and nvidia-smi: for a process that must not
    import torch or hold a CUDA context (bench data-wait's parent, between its trainings)."""
    gpus, cpu = _nvidia_smi("name"), f"{_cpu_model()} ({os.cpu_count()} cores)"
    driver = f", driver {_gpu_driver()}" if gpus and _gpu_driver() else ""
    return f"{gpus[0]} x{len(gpus)}{driver}; {cpu}" if gpus else f"{cpu}, no GPU"


def is_writer() -> bool:
    """Whether this process writes the results: rank 0 under a launcher (``accelerate launch ... bench train``:
    every rank measures the same, and N ranks writing one file at once could leave it mixed), else the one process."""
    return os.environ.get("RANK", "0") == "0"


def machine_info() -> dict:
    """CPU model and cores, GPU and driver (when CUDA is there), torch/CUDA versions and the commit: stored in every
    result."""
    import torch

    info = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": source_commit(), "gpu": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    driver=_gpu_driver(), bf16=torch.cuda.is_bf16_supported())
    return info


def machine_name(info: dict | None = None) -> str:
    info = info or machine_info()
    cpu = f"{info['cpu']} ({info['cpu_cores']} cores)"
    if info.get("gpu"):
        driver = f", driver {info['driver']}" if info.get("driver") else ""
        return f"{info['gpu']} x{info['gpu_count']} (CUDA {info['cuda']}{driver}); {cpu}"
    return f"{cpu}, no GPU"


def bf16_peak_flops() -> float | None:
    """The card's dense bf16 peak in FLOP/s, or None when unknown (then no utilisation is reported)."""
    if os.environ.get("DIST_DEJPEG_PEAK_TFLOPS"):
        return float(os.environ["DIST_DEJPEG_PEAK_TFLOPS"]) * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, tflops in BF16_PEAK_TFLOPS.items():  # the dict lists specific names before general ones
        if key in name:
            return tflops * 1e12 or None
    return None


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued device work, so that a host clock read measures it."""
    import torch

    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    seconds_per_call: float  # median over the repeats
    spread: float | None  # (slowest - fastest) / median block; None: one block (--repeats 1), no spread measured
    calls: int  # timed calls in all

    def as_dict(self) -> dict:
        return {"ms_per_call": 1000 * self.seconds_per_call, "spread": self.spread, "calls": self.calls}


def measure(fn: Callable[[], object], *, warmup: int = 3, steps: int = 10, repeats: int = 3,
            device: torch.device | str | None = None) -> Timing:
    """Warm up, then time ``repeats`` blocks of ``steps`` calls with the device synchronized around each."""
    for _ in range(warmup):
        fn()
    sync(device)
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        blocks.append((time.perf_counter() - start) / steps)
    median = statistics.median(blocks)
    spread = (max(blocks) - min(blocks)) / median if median > 0 and len(blocks) > 1 else None  # (one: "0%" said)
    return Timing(median, spread, steps * repeats)


def spread_text(spread: float | None) -> str:
    """A timing's spread as its table prints it: "4%", or "one block" where one was timed (none to measure)."""
    return "one block" if spread is None else f"{100 * spread:.0f}%"


def covered(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: the time some kernel ran, counting kernels that
    overlap (on several streams) once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_calls(fn: Callable[[], object], path: str | Path, *, steps: int = 5,
                  device: torch.device | str | None = None) -> dict:
    """Run ``fn`` ``steps`` times under torch.profiler (after the caller's warm-up) and write ``path``: the top
    operators by self device time and by self host time. Returns the wall time per call and, where a GPU ran
    kernels, the time per call during which at least one kernel ran (``device_busy_ms``): a busy share well
    under 1 means the host (Python, launches, syncs) and not the GPU sets the pace."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile

    device = torch.device(device) if device is not None else torch.device("cpu")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        wall = (time.perf_counter() - start) / steps
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    out = {"steps": steps, "wall_ms": wall * 1e3, "kernels_per_step": len(kernels) / steps,
           "device_busy_ms": covered(kernels) / 1e3 / steps if kernels else None}
    out["device_busy_frac"] = out["device_busy_ms"] / out["wall_ms"] if kernels else None
    table = prof.key_averages()
    text = [f"{k}: {v}" for k, v in out.items()]
    if kernels:
        text += ["", "## by self device time", table.table(sort_by="self_device_time_total", row_limit=30)]
    text += ["", "## by self host time", table.table(sort_by="self_cpu_time_total", row_limit=30)]
    if is_writer():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(text) + "\n")
    return out


_replaced: set = set()  # the committed results this process has said it replaces


def say_replaced(path: Path) -> None:
    """Say once, on stderr, that ``path`` is a result committed to this checkout that a benchmark now replaces (the
    numbers benchmarks/RESULTS.md cites were overwritten by a one-step run without a word)."""
    if path in _replaced or not path.is_file():
        return
    _replaced.add(path)
    try:
        tracked = subprocess.run(["git", "-C", str(path.parent), "ls-files", "--error-unmatch", path.name],
                                 capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return
    if tracked:
        print(f"bench: replacing {path}, a committed result (git diff shows what changed, git checkout puts it "
              f"back; --results DIR writes elsewhere)", file=sys.stderr, flush=True)


def write_results(out_dir: str | Path, name: str, report: dict, title: str, note: str, header: list[str],
                  rows: list[list[str]], echo: bool = True) -> Path:
    """``out_dir/name.json`` (the report plus the machine) and ``out_dir/name.md`` (title naming the machine, the
    commit, a note, the table); on rank 0 alone (is_writer). Returns the Markdown path."""
    out_dir = Path(out_dir)
    md = out_dir / f"{name}.md"
    if not is_writer():
        return md
    out_dir.mkdir(parents=True, exist_ok=True)
    say_replaced(out_dir / f"{name}.json")
    about = {"machine": machine_name(), "machine_info": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    body = {k: v for k, v in report.items() if k not in about}
    report.clear()
    report.update(about, **body)  # in place: the caller's report names the machine too
    lines = [f"# {title}", "", f"Machine: {report['machine']}; torch {report['machine_info']['torch']}; "
             f"commit {report['machine_info']['commit'] or 'unknown (not a git checkout)'}; {report['date']}", "",
             note, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if echo:  # before the files: a full results disk loses them, not the numbers measured
        print("\n".join(lines), flush=True)
    # the pair together, each atomically (bench infer and train write again after each block: a step stopped for
    # time mid-write keeps the last; a full disk leaves both as they were, not a new .json beside an old .md)
    atomic_write_files({out_dir / f"{name}.json": json.dumps(report, indent=2, default=str).encode(),
                        md: ("\n".join(lines) + "\n").encode()})
    return md


# -- quality benchmarks (bench quality, benchmarks/experiments/): trainings in child processes, held-out photos ---
def validation_images(config, work: Path) -> list[str]:
    """Whole validation photos when data.root holds the bundled samples (written as PNG into ``work``),
    otherwise the validation shards."""
    from PIL import Image

    from dist_dejpeg.data import shards

    root = Path(config.data.root)
    try:
        dataset = json.loads((root / shards.MANIFEST).read_text()).get("dataset")
    except (OSError, ValueError):
        dataset = None
    if dataset == shards.SAMPLE_DATASET:
        work.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in shards.SAMPLE_VAL:
            path = work / f"{name}.png"
            if not path.exists():  # the photo the sample shards were cut from, from scikit-image's wheel
                Image.fromarray(shards.sample_photo(name)).save(path)
            paths.append(str(path))
        return paths
    return [str(p) for p in shards.list_shards(root, config.data.val_glob)]


def quality_bench_setup(config: str, overrides: list[str], work: str | Path) -> tuple[Path, list[str]]:
    """The run folder (made) and the validation images of a quality benchmark; the sample shards are prepared
    once here, before the runs (each would otherwise check on its own)."""
    from dist_dejpeg.config import load_config
    from dist_dejpeg.data import ensure_samples

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config, overrides)
    ensure_samples(cfg)
    return work, validation_images(cfg, work / "val_photos")


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and spread (max - min; 0 for one value) over seeds."""
    return statistics.fmean(values), (max(values) - min(values)) if len(values) > 1 else 0.0


def train_once(config: str, overrides: list[str], run_dir: Path, log_file: Path) -> float | None:
    """One ``dist-dejpeg train`` in a child process (a fresh Accelerate state each time); returns seconds. A
    run folder that a finished earlier call left (``bench_train.json`` beside its generator, same command) is
    reused, so an interrupted benchmark goes on where it stopped."""
    cmd = [sys.executable, "-m", "dist_dejpeg.cli", "train", "--config", config, *overrides,
           f"train.run_dir={run_dir}"]
    marker = Path(run_dir) / "bench_train.json"
    try:
        done = json.loads(marker.read_text())
        if done.get("args") == cmd[3:] and (Path(run_dir) / GENERATOR).is_file():
            return done.get("seconds")
    except (OSError, ValueError):
        pass
    start = time.perf_counter()
    with open(log_file, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"training failed ({' '.join(cmd)}), log {log_file}:\n{tail}")
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps({"args": cmd[3:], "seconds": seconds}))
    return seconds
