"""The GPU check: every GPU path of dist_dejpeg in one command, for a machine with one NVIDIA GPU, PyTorch
already installed and no network (../shared/ENV.md, "A GPU machine without network": Python 3.12, torch +
CUDA, torchvision, timm, accelerate, pyyaml, ... but no lpips, webdataset, omegaconf, jpeglib, DALI, nor this
project).

1. Here, where pip reaches PyPI, make the wheel folder (~24 MB, jpeglib's 23 of it; with NVIDIA DALI, about
   250 MB more, as parts of at most 57 MiB for a machine that takes files of limited size):
       benchmarks/gpu_wheels.sh [--dali --split 57] /path/to/wheels
2. Carry the checkout and that folder to the GPU machine; there, from the repository root:
       python -m dist_dejpeg.bench.gpu_check --wheels /path/to/wheels --out /path/to/out [--quick] [--allow-cpu]
   (or `benchmarks/gpu_check.sh ...`; `dist-dejpeg bench gpu-check ...` where the package is installed)

Steps, in order: env, install, cuda, pytest_gpu, bench_infer, bench_train, train, evaluate, bench_data, data_wait.
Each runs in a child process (dist_dejpeg/bench/gpu_check_steps.py) in a process group of its own under its own
timeout, even when an earlier one failed, with its stdout+stderr in OUT/<step>.log; OUT/summary.md gets a row per
step (exit code, seconds, result) and, under the table, the last lines of each failing step's log. Also in OUT:
results/ (bench train.json/.md, data.json/.md, infer.json/.md), run/ (the training run), metrics.json,
data_wait.md/.json, and gpu-summary.json (the headline numbers, each null where no step of this check measured it).
What each step adds to the configs (override lists, bench options, timeouts) is in configs/gpu_check.yaml.
With --compile-cache FILE inductor's and Triton's caches are unpacked from FILE before the first step, shared by
every step, and packed back into FILE at the end (dist_dejpeg/bench/compile_cache.py): rows compiled in one check
are read back in the next, on a machine that keeps nothing between calls. The wheels are installed with
`pip --target` into a temporary folder put first on PYTHONPATH (nothing is installed into the machine's Python);
that folder, the sample data and TMPDIR are removed at the end. This module imports only the standard library
(PyYAML when it reads the settings): omegaconf and torch are imported only by the steps, after the install. PYTHON names the interpreter of the steps (default: this one).
Exit: 0 every step passed, 1 some step failed, 2 usage error, 3 no CUDA (and no --allow-cpu).

NVIDIA DALI (with its nvimgcodec, nvcomp and nvJPEG wheels, about 250 MB) is in the wheel folder only with
gpu_wheels.sh --dali: with --split, as dali-wheels.tar.part-00, -01, ... and dali-wheels.sha256. The install step
checks every part and the joined tar against that file, joins the parts in name order, and installs the wheels in
the tar after the others; a missing part or checksum file, a part it does not list or a wrong checksum fails the
step in part, naming the file: the project is installed without DALI and the later steps run (so do they where
DALI does not install or import, or the project's wheel is not this checkout's: the steps import the checkout's
code from its root). DALI's wheels found plain in the folder (parts joined and unpacked by hand), or a
dali-wheels.tar joined there, install too. With DALI, install also imports it from the install folder, the GPU
tests that need it run and `bench data` has its DALI GPU rows; without it those tests skip themselves, `bench data`
leaves out its DALI rows, and training uses data.backend=torch with the GPU (nvJPEG) JPEG degradation either way.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dist_dejpeg.bench.compile_cache import MAX_SPLIT_MIB, cache_env, pack, unpack
from dist_dejpeg.bench.data_wait import load_settings, resolve
from dist_dejpeg.bench.gpu_check_runner import Runner, write_footer
from dist_dejpeg.bench.gpu_summary import write_gpu_summary
from dist_dejpeg.run.layout import METRICS

FIRST = ("env", "install", "cuda")  # always run, in this order, before the chosen steps
# most telling first: when the budget runs out the later steps are reported as not run. The cheap rows never measured
# come before bench_train's compiled ones (each minutes of compiling without a carried cache); data_wait compares
# loader variants, which train's own log already measures for the config's loader
OPTIONAL = ("pytest_gpu", "bench_infer", "bench_train", "train", "evaluate", "bench_data", "data_wait")
DEFAULT_BUDGET = 470  # s: the whole check ends within 8 minutes
PROBE = ("import json, torch; ok = torch.cuda.is_available(); print(json.dumps({'cuda': ok, "
         "'torch': torch.__version__, 'built': torch.version.cuda, "
         "'card': torch.cuda.get_device_name(0) if ok else None}))")


def repo_root() -> Path:
    """The checkout this module sits in (the check runs its tests and configs); the working folder otherwise."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "configs" / "gpu_check.yaml").is_file() else Path.cwd()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The check's options (``dist-dejpeg bench gpu-check`` and ``python -m dist_dejpeg.bench.gpu_check``)."""
    parser.add_argument("--wheels", required=True, metavar="DIR", help="the wheel folder of benchmarks/gpu_wheels.sh")
    parser.add_argument("--out", required=True, metavar="OUTDIR", help="folder for the logs, summary and results")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings everywhere (a smoke test; about a minute on a GPU)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run the flow without CUDA (the cuda step is skipped; train and data_wait use --quick's "
                             "settings); without it, no CUDA means exit 3 at once")
    parser.add_argument("--budget", type=_seconds, default=DEFAULT_BUDGET, metavar="S",
                        help="stop starting steps once S seconds have gone (the default: the whole check ends within "
                             "8 minutes; each step also has its own timeout)")
    parser.add_argument("--steps", default="", metavar="A,B",
                        help=f"run only these of the optional steps, in this order ('': all, {','.join(OPTIONAL)}; "
                             f"env, install and cuda always run first)")
    parser.add_argument("--tests", default="", metavar="EXPR",
                        help="pytest_gpu runs only the gpu tests matching this -k expression")
    parser.add_argument("--compile", action="store_true",
                        help="train and data_wait train compiled (train: as configs/div2k.yaml does; data_wait: the "
                             "data path must keep up with a shorter step); bench_train runs first in the same check "
                             "(or --compile-cache carries its kernels) and inductor's cache makes it quicker")
    parser.add_argument("--rungs", action="store_true",
                        help="bench_train times the whole ladder (each compiled row minutes of compiling); without it: "
                             "the naive baseline, the CUDA graphs rung and the config's tuned row")
    parser.add_argument("--wait", default="", metavar="A,B",
                        help="data_wait runs only these of its variants (configs/gpu_check.yaml), in this order")
    parser.add_argument("--compile-cache", default="", metavar="FILE",
                        help="inductor's and Triton's caches kept in FILE (a .tar.gz) between checks: unpacked before "
                             "the first step where it exists (or its parts FILE.part-NN), packed back at the end, so a "
                             "row compiled in one check is read back in the next (dist_dejpeg/bench/compile_cache.py)")
    parser.add_argument("--compile-cache-split", type=_split, default=0, metavar="MIB",
                        help="write the compile cache as parts FILE.part-00, -01, ... of at most MIB MiB (for a "
                             "machine that returns files of limited size)")
    parser.add_argument("--compile-cache-max", type=_split, default=0, metavar="MIB",
                        help="over MIB MiB the cache is packed without Triton's folder, or not at all (old one kept)")
    parser.add_argument("--settings", default="", metavar="YAML",
                        help="the steps' settings ('': configs/gpu_check.yaml of the checkout)")
    parser.add_argument("--commit", default="",
                        help="the commit named in the summaries ('': git describe --always --dirty)")


def _seconds(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError("--budget takes whole seconds")
    return int(text)


def _split(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_SPLIT_MIB:
        raise argparse.ArgumentTypeError(f"takes whole MiB from 1 to {MAX_SPLIT_MIB}")
    return int(text)


def _error(message: str, code: int = 2) -> int:
    print(f"gpu_check: {message}", file=sys.stderr)
    return code


def _out(cmd: list[str], timeout: float = 30, **kwargs) -> tuple[int, str]:
    """(exit code, stdout + stderr) of a short command; 127 when it is not there, 124 when it hangs."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
        return proc.returncode, proc.stdout + proc.stderr
    except FileNotFoundError:
        return 127, f"{cmd[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(cmd)}: no answer within {timeout:.0f} s"


def probe_cuda(py: str) -> tuple[dict | None, str]:
    """What the steps' Python sees: ({cuda, torch, built, card}, "") or (None, why torch did not answer)."""
    rc, text = _out([py, "-c", PROBE], timeout=120)
    last = text.strip().splitlines()[-1] if text.strip() else ""
    try:
        return (json.loads(last), "") if rc == 0 else (None, f"PyTorch cannot be imported by {py} (exit {rc}): {last}")
    except ValueError:
        return None, f"the CUDA probe of {py} printed no answer: {last}"


def _no_cuda_why(probe: dict) -> str:
    rc, smi = _out(["nvidia-smi", "-L"])
    smi = "nvidia-smi: not found" if rc == 127 else "nvidia-smi: " + (smi.strip().splitlines() or [""])[0]
    return (f"CUDA is not available: torch.cuda.is_available() is False (torch {probe['torch']}, built for CUDA "
            f"{probe['built']}); {smi}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}")


def main(args: argparse.Namespace) -> int:
    """Run the check (the module docstring says what it does); returns its exit code."""
    started = time.time()
    chosen = [s for s in args.steps.split(",") if s] if args.steps else list(OPTIONAL)
    unknown = [s for s in chosen if s not in OPTIONAL]
    if unknown:
        return _error(f"unknown step '{unknown[0]}' (steps: {' '.join(OPTIONAL)})")
    if not sorted(Path(args.wheels).glob("*.whl")):
        return _error(f"no wheels in '{args.wheels}' (make them with benchmarks/gpu_wheels.sh DIR where pip reaches "
                      f"PyPI)")
    if (args.compile_cache_split or args.compile_cache_max) and not args.compile_cache:
        return _error("--compile-cache-split and --compile-cache-max need --compile-cache FILE")
    if args.compile_cache and Path(args.compile_cache).is_dir():
        return _error(f"--compile-cache names a file (a .tar.gz), and '{args.compile_cache}' is a folder")
    root = repo_root()
    settings_path = Path(args.settings).resolve() if args.settings else root / "configs" / "gpu_check.yaml"
    try:
        settings = load_settings(settings_path)
    except Exception as err:  # missing, unreadable, not YAML (yaml.YAMLError), no PyYAML
        return _error(f"cannot read the settings {settings_path}: {type(err).__name__}: {err}")
    wheels, out = Path(args.wheels).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = [*FIRST, *chosen]
    py = os.environ.get("PYTHON") or sys.executable
    summary = out / "summary.md"
    probe, why = probe_cuda(py)
    have_cuda = bool(probe and probe.get("cuda"))
    if not have_cuda:
        why = why or _no_cuda_why(probe)
        if not args.allow_cpu:  # an earlier check's outputs in OUT stay as they are
            (out / "not-run.md" if summary.exists() else summary).write_text(
                f"# GPU check: not run\n\n{why}\n\nNo CUDA device: nothing was run (pass --allow-cpu to run the flow "
                f"on the CPU).\n")
            _error(why)
            return _error("this check needs a CUDA GPU (pass --allow-cpu to run the flow on the CPU anyway)", 3)
        print(f"gpu_check: {why} -- running on the CPU (--allow-cpu)", flush=True)
    # an earlier check's outputs (a paid GPU run's, maybe) are moved aside, not deleted: previous-<time>/
    earlier = [p for p in [*(out / f"{s}.log" for s in (*FIRST, *OPTIONAL)), *out.glob("data_wait*"), out / METRICS,
                           summary, out / "gpu-summary.json", out / "run", out / "results", out / "evaluate",
                           out / "not-run.md"] if p.exists()]
    if earlier:
        aside = out / time.strftime("previous-%Y%m%d-%H%M%S", time.gmtime())
        aside.mkdir(exist_ok=True)
        for path in earlier:
            shutil.move(str(path), str(aside / path.name))
        print(f"gpu_check: the earlier check's outputs moved to {aside}", flush=True)
    commit = args.commit or _commit(root)
    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    work = Path(tempfile.mkdtemp(prefix="gpu_check."))  # under TMPDIR
    previous, ctx = signal.signal(signal.SIGTERM, _interrupt), None
    try:
        ctx = _context(args, settings, settings_path, root=root, out=out, wheels=wheels, work=work, py=py,
                       have_cuda=have_cuda)
        env, notes = _step_env(work), []
        if args.compile_cache:
            notes.append(f"compile cache: {unpack(Path(args.compile_cache).resolve(), work / 'cache' / 'compile')}")
            env.update(cache_env(work / "cache" / "compile"))
        _write_header(summary, args, wheels, commit, date, have_cuda, probe, notes)
        failed = Runner(out, summary, ctx, env, deadline=started + args.budget, budget=args.budget).run(steps)
        notes = [f"Compile cache: {_pack_cache(args, work)}."] if args.compile_cache else []
        write_footer(summary, out, failed, len(steps), started, notes)
        _headline(out, ctx, probe if have_cuda else None, date, commit)
    except KeyboardInterrupt:
        if args.compile_cache and (work / "cache" / "compile").is_dir():
            _pack_cache(args, work)  # what was compiled before the interruption is whole: inductor writes atomically
        _headline(out, ctx, probe if have_cuda else None, date, commit)  # the steps that ended measured
        return _error("interrupted", 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: summary in {summary}")
    return 1 if failed else 0


def _pack_cache(args, work: Path) -> str:
    """Pack the steps' compile caches into --compile-cache; a failure (a full disk) is reported, never raised: the
    check's own results come first, and the old archive stays as it was."""
    try:
        line = pack(work / "cache" / "compile", Path(args.compile_cache).resolve(), args.compile_cache_split,
                    args.compile_cache_max)
    except OSError as err:
        line = f"not written ({type(err).__name__}: {err}); {args.compile_cache} left as it was"
    print(f"gpu_check: compile cache: {line}", flush=True)
    return line


def _headline(out: Path, ctx: dict | None, probe: dict | None, date: str, commit: str) -> None:
    """gpu-summary.json from what the steps wrote; ``probe``: the CUDA probe's answer, None without CUDA."""
    variants = (ctx["steps"]["data_wait"].get("variants") or {}) if ctx else {}
    write_gpu_summary(out, card=(probe or {}).get("card"), date=date, commit=commit, device="cuda" if probe else "cpu",
                      first_variant=next(iter(variants), None))


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the running step's group is killed, the scratch folder removed


def _commit(root: Path) -> str:
    rc, text = _out(["git", "-C", str(root), "describe", "--always", "--dirty"])
    return text.strip() if rc == 0 and text.strip() else "?"


def _context(args, settings: dict, settings_path: Path, *, root: Path, out: Path, wheels: Path, work: Path,
             py: str, have_cuda: bool) -> dict:
    """What a step's child process is told (written to WORK/context.json): folders, options and each step's
    settings resolved for this run's mode."""
    steps = {}
    for name in (*FIRST, *OPTIONAL):
        section = settings.get(name) or {}
        quick = args.quick or (not have_cuda and bool(section.get("quick_without_cuda")))
        steps[name] = dict(resolve(section, quick), quick=quick)
    ctx = {"root": str(root), "out": str(out), "wheels": str(wheels), "work": str(work), "site": str(work / "site"),
           "data": str(work / "data"), "py": py, "quick": args.quick, "have_cuda": have_cuda, "tests": args.tests,
           "compile": args.compile, "rungs": args.rungs, "wait": args.wait, "settings": str(settings_path),
           "prepare": [str(a) for a in settings.get("prepare") or []], "steps": steps}
    for sub in ("site", "t", "cache"):
        (work / sub).mkdir()
    (work / "context.json").write_text(json.dumps(ctx, indent=1))
    return ctx


def _step_env(work: Path) -> dict:
    env = dict(os.environ)
    # a short TMPDIR: multiprocessing puts AF_UNIX sockets (108-byte path limit) under it
    env.update(TMPDIR=str(work / "t"), TRITON_CACHE_DIR=str(work / "cache" / "triton"),
               MPLCONFIGDIR=str(work / "cache" / "matplotlib"), PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return env


def _write_header(summary: Path, args, wheels: Path, commit: str, date: str, have_cuda: bool, probe: dict | None,
                  notes: list[str]):
    device = "no CUDA (--allow-cpu)"
    if have_cuda:
        rc, text = _out(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
        device = text.strip().splitlines()[0] if rc == 0 and text.strip() else f"{probe['card']} (nvidia-smi not found)"
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    summary.write_text(
        f"# GPU check ({'quick' if args.quick else 'full'})\n\n"
        f"- command: `{command}` (wheels {wheels})\n"
        f"- host: {socket.gethostname()}, {date}, repo {commit}"
        f"{' (the working tree differs from that commit)' if commit.endswith('-dirty') else ''}\n"
        f"- device: {device}\n"
        f"- budget: {args.budget} s; logs: <step>.log in this folder\n"
        + "".join(f"- {note}\n" for note in notes) + "\n"
        "| step | exit code | seconds | result |\n|---|---|---|---|\n")


def build_parser() -> argparse.ArgumentParser:
    from dist_dejpeg.bench import HelpFormatter  # as `dist-dejpeg bench gpu-check --help` shows it

    parser = argparse.ArgumentParser(prog="python -m dist_dejpeg.bench.gpu_check", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
