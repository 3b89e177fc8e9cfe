"""``dist-dejpeg bench data-wait``: the share of the gen step spent waiting for data, one loader variant per run.

    python -m dist_dejpeg.bench.data_wait data.root=data/div2k             # every variant, 150 gen steps each
    dist-dejpeg bench data-wait --variants packed-ahead,cpu-workers --steps 300 data.root=data/div2k
    python -m dist_dejpeg.bench.data_wait --quick                          # the CPU smoke run: debug recipe, 4 steps

The variants and the overrides they share are the ``data_wait`` section of configs/gpu_check.yaml (its ``full``
block: the div2k model in bf16, eager, batch 32 x 256 px on the torch loader; ``--quick``: its ``quick`` block),
so the GPU check and this command measure the same thing. Each variant trains the gen phase in a child
``dist-dejpeg train`` (a fresh process each: no CUDA, compile or loader state carried from one to the next; its
output streams through) and reports the last log window's ``train/data_wait_frac`` and ``train/images_per_s``
from the run's metrics.json (progress.json where that lacks them). Override order: the shared ones, --compile's,
the step count, the variant's, then the command line's (which win). Writes into --results, rewritten after every
variant so that a run cut short keeps what it measured: ``data_wait-<variant>.json`` (the run's metrics.json),
``data_wait.json`` (the rows) and ``data_wait.md`` (the table). Exit: 0 done, 2 usage error, else the exit code of
the training that failed (the variants after it are not run). Torch-free: the trainings are child processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dist_dejpeg.bench import DEFAULT_RESULTS, HelpFormatter
from dist_dejpeg.run.files import atomic_write_files
from dist_dejpeg.run.layout import METRICS, PROGRESS

SECTION = "data_wait"
PHASE = "gen"  # the variants train only the gen phase (train.order=[gen])
RESULTS_JSON, RESULTS_MD = "data_wait.json", "data_wait.md"  # and data_wait-<variant>.json


def load_settings(path: str | Path) -> dict:
    """configs/gpu_check.yaml (the GPU check's steps and this benchmark's variants) as a dict. Here, not in the
    check, so that both read it one way; PyYAML is imported inside: the check imports this module before the
    wheels are installed, with the standard library only."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of steps, got {type(data).__name__}")
    return data


def resolve(section: dict | None, quick: bool) -> dict:
    """A step's settings for one mode: its own keys with its ``quick:`` or ``full:`` block laid over them (lists
    extend the step's own, other values replace)."""
    section = dict(section or {})
    blocks = {"full": section.pop("full", None), "quick": section.pop("quick", None)}
    for key, value in (blocks["quick" if quick else "full"] or {}).items():
        both_lists = isinstance(value, list) and isinstance(section.get(key), list)
        section[key] = [*section[key], *value] if both_lists else value
    return section


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", default="configs/gpu_check.yaml", metavar="YAML",
                        help="the file whose data_wait section holds the variants and the overrides they share")
    parser.add_argument("--quick", action="store_true", help="the section's quick block (a CPU smoke run)")
    parser.add_argument("--variants", default="", metavar="A,B", help="only these variants, in this order ('': all)")
    parser.add_argument("--config", default="", help="training config ('': the section's)")
    parser.add_argument("--steps", type=int, default=0, help="gen steps per variant (0: the section's)")
    parser.add_argument("--compile", action="store_true", help="train compiled (the section's compile overrides)")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="folder for the .json/.md results")
    parser.add_argument("--work", default="", help="folder for the run folders wait-<variant> ('': a temporary one, "
                                                   "removed at the end)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every variant, key=value")


def window(run_dir: Path) -> dict:
    """The gen phase's last log window: {data_wait_frac, images_per_s} from metrics.json, else progress.json."""
    try:
        last = json.loads((run_dir / METRICS).read_text())["meta"]["last_train_log"][PHASE]
        return {"data_wait_frac": last.get("train/data_wait_frac"), "images_per_s": last.get("train/images_per_s")}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        progress = json.loads((run_dir / PROGRESS).read_text())
        return {"data_wait_frac": progress.get("data_wait_frac"), "images_per_s": progress.get("images_per_s")}
    except (OSError, ValueError, AttributeError):
        return {"data_wait_frac": None, "images_per_s": None}


def write_tables(out: Path, report: dict) -> None:
    from dist_dejpeg import source_commit as commit
    from dist_dejpeg.bench.common import machine_name_without_torch  # (this process holds no CUDA context)

    report.setdefault("machine", machine_name_without_torch())
    report.setdefault("commit", commit())
    report["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    def number(value, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "?"

    lines = ["# Data wait per loader variant", "", f"Machine: {report['machine']}; commit "
             f"{report['commit'] or 'unknown (not a git checkout)'}; {report['date']}", "",
             "| loader and JPEG degradation | data_wait_frac | images/s |", "|---|---|---|"]
    lines += [f"| {name} | {number(row['data_wait_frac'], '.3f')} | {number(row['images_per_s'], '.1f')} |"
              for name, row in report["variants"].items()]
    lines += [f"| {name} | left out: NVIDIA DALI is not installed | |" for name in report.get("left_out", [])]
    lines += [f"| {name} | {why} | |" for name, why in report["pending"].items()]
    print("\n".join(lines), flush=True)  # (before the files: a full disk loses them, not the numbers)
    atomic_write_files({out / RESULTS_JSON: (json.dumps(report, indent=2) + "\n").encode(),
                        out / RESULTS_MD: ("\n".join(lines) + "\n").encode()})


def have_dali() -> bool:
    """Whether NVIDIA DALI can be imported (found, not imported: this module stays torch-free)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ImportError:  # no "nvidia" package at all
        return False


def main(args: argparse.Namespace) -> int:
    try:
        spec = resolve(load_settings(args.settings).get(SECTION), args.quick)
    except Exception as err:  # missing, unreadable, not YAML, no PyYAML
        print(f"bench data-wait: cannot read {args.settings}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    variants = spec.get("variants") or {}
    if args.variants:
        wanted = [v for v in args.variants.split(",") if v]
        variants = {name: variants[name] for name in wanted if name in variants}
        if not variants:
            print(f"bench data-wait: --variants '{args.variants}' names none of this run's variants "
                  f"({', '.join(spec.get('variants') or {})})", file=sys.stderr)
            return 2
    config, steps = args.config or spec.get("config"), args.steps or int(spec.get("steps") or 0)
    if not (config and steps > 0 and variants):
        print(f"bench data-wait: {args.settings}'s {SECTION} section needs config, steps and variants", file=sys.stderr)
        return 2
    taken = [p for p in (Path(args.work) / f"wait-{name}" for name in variants) if args.work and p.exists()]
    if taken:  # a run folder of its own per variant: an old one would be resumed or refused
        print(f"bench data-wait: {taken[0]} exists", file=sys.stderr)
        return 2
    shared = [*spec.get("overrides", []), *(spec.get("compile", []) if args.compile else [])]
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="data-wait-"))
    # the variants not measured (yet), each with its reason: a run cut short or failed says so in its tables
    report = {"config": config, "steps": steps, "overrides": [*shared, *args.overrides], "variants": {},
              "pending": {name: "not measured: the run stopped before it" for name in variants}}
    try:
        for name, overrides in variants.items():
            if "data.backend=dali" in overrides and not have_dali():
                print(f"bench data-wait: {name}: left out, NVIDIA DALI is not installed", flush=True)
                report["left_out"] = [*report.get("left_out", []), name]
                del report["pending"][name]
                write_tables(out, report)
                continue
            run_dir = work / f"wait-{name}"
            cmd = [sys.executable, "-m", "dist_dejpeg.cli", "train", "--config", config, f"train.run_dir={run_dir}",
                   *shared, f"train.phases.{PHASE}.steps={steps}", *overrides, *args.overrides]
            cmd = [str(c) for c in cmd]
            print("+ " + shlex.join(cmd), flush=True)
            start = time.perf_counter()
            rc = subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode
            failure = (f"training failed (exit {rc})" if rc else
                       f"the run wrote no {run_dir / METRICS}" if not (run_dir / METRICS).is_file() else None)
            if failure:
                print(f"bench data-wait: {name}: {failure}", file=sys.stderr)
                report["pending"][name] = f"failed: {failure}"
                write_tables(out, report)
                return (128 - rc if rc < 0 else rc) or 1
            shutil.copyfile(run_dir / METRICS, out / f"data_wait-{name}.json")
            report["variants"][name] = {"overrides": list(overrides), **window(run_dir),
                                        "seconds": round(time.perf_counter() - start, 1)}
            del report["pending"][name]
            write_tables(out, report)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m dist_dejpeg.bench.data_wait", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
