"""``dist-dejpeg bench NAME``: the product's benchmarks; DESCRIPTION below is what ``bench --help`` shows users.

The common flags, timing, warm-up, device synchronisation and the results files live in
:mod:`dist_dejpeg.bench.common`, shared by all of them. The research ablations (colour, quality, chroma) are scripts
in benchmarks/experiments/.

A benchmark is a module with ``add_arguments(parser)`` and ``main(args) -> int``, named in BENCHMARKS; it is
imported only when its command runs or shows its help, so that other commands import no torch. Its docstring is its
``bench NAME --help`` description (its RST markup shown plain: user_text).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from functools import partial
from pathlib import Path

from dist_dejpeg.cli_args import HelpFormatter, at_least  # (HelpFormatter: a flag's default after its help, if any)

# `dist-dejpeg bench --help`: what the command does for a user (argparse lists the benchmarks below it)
DESCRIPTION = """\
Benchmarks: reproducible numbers measured on this machine. Each benchmark writes <results>/<name>.json and .md
(default: benchmarks/results/) naming the machine (CPU model and cores, GPU and driver), the torch version and the
settings; ratios come only from rows of one run.

    dist-dejpeg bench all                          # train, data, infer, scaling on this machine -> benchmarks/results/
    dist-dejpeg bench train --config configs/div2k.yaml data.crop=256 model.pretrained=false loss.lpips_pretrained=false
    dist-dejpeg bench data --tiles 288 --formats raw
    dist-dejpeg bench train --help                 # one benchmark's flags and their defaults

The research ablations (colour, quality, chroma) are scripts in benchmarks/experiments/."""

DEFAULT_RESULTS = "benchmarks/results"  # relative to where the command runs (the repository root)

# name -> (module, one line for `dist-dejpeg bench --help`)
BENCHMARKS = {
    "train": ("dist_dejpeg.bench.train", "training-step images/s per device, naive path -> fast-path ladder -> tuned"),
    "data": ("dist_dejpeg.bench.data", "data-pipeline crops/s of every loader on the same shards and cores"),
    "data-wait": ("dist_dejpeg.bench.data_wait", "the share of training time spent waiting for batches, per "
                                                  "data-path variant (short training runs)"),
    "infer": ("dist_dejpeg.bench.infer", "restore latency per image and per megapixel, whole and tiled"),
    "scaling": ("dist_dejpeg.bench.scaling", "1 -> 2 processes measured on the CPU; DDP efficiency modelled"),
    "quality": ("dist_dejpeg.bench.quality", "time to quality: minutes and images until the q10 gain on held-out "
                                              "photos reaches +0.3/+0.5/+1.0 dB"),
    "all": ("dist_dejpeg.bench.suite", "train, data, infer and scaling in a row, and the scaling model"),
    "gpu-check": ("dist_dejpeg.bench.gpu_check", "every GPU path in one command, on a GPU machine without network"),
}


# the benchmarks' counts and the least each takes (negative steps wrote negative images/s into the results; zero
# repeats a median of nothing; zero batches a hang; zero threads: all cores)
COUNTS = {"--steps": 1, "--repeats": 1, "--rounds": 1, "--batches": 1, "--threads": 0, "--tiles": 1, "--crop": 8,
          "--batch-sizes": 1, "--seeds": 0, "--warmup": 0}


def run_benchmark(main, args: argparse.Namespace) -> int:
    """A benchmark's ``main``, after its results folder is made and proven writable (a wrong --results failed
    only after every row was measured); a config that does not load, a bad combination of flags (ValueError) or
    missing shards is one ``error:`` line and exit 2; a results write that fails, one line and exit 3 for a full
    disk or quota (cli_output.write_failed); a child process that failed (bench scaling's launches,
    whose own output says why) one line naming it and exit 1."""
    from subprocess import CalledProcessError

    from dist_dejpeg.config import ConfigError
    from dist_dejpeg.run.files import new_folders, remove_empty

    results = getattr(args, "results", None)
    made = new_folders(results) if results else []
    if results:
        try:
            Path(results).mkdir(parents=True, exist_ok=True)
            if not os.access(results, os.W_OK):
                raise PermissionError("not writable")
        except OSError as err:
            print(f"error: --results {results}: cannot write there ({err})", file=sys.stderr)
            return 2
    try:
        return main(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full results disk after the measuring (the table is printed above): one line, 3
        if getattr(err, "from_stdout", False):  # (standard output's: cli.main says it)
            raise
        from dist_dejpeg.cli_output import write_failed

        return write_failed(err, results or ".")
    except CalledProcessError as err:
        print(f"error: {' '.join(map(str, err.cmd))} failed (exit {err.returncode}); its output is above",
              file=sys.stderr)
        return 1
    finally:
        remove_empty(made)  # a results folder this run made and left empty (it failed before writing)


def user_text(doc: str) -> str:
    """A docstring as a --help description: its RST markup plain (``x`` and :mod:`x` -> `x`)."""
    return re.sub(r"``(.+?)``", r"`\1`", re.sub(r":\w+:`([^`]+)`", r"`\1`", doc or ""), flags=re.S).strip("\n")


class BenchmarkParser(argparse.ArgumentParser):
    """One benchmark's parser: its flags come from its module's add_arguments, imported the first time the
    parser is used."""

    def __init__(self, *args, module: str, **kwargs):
        self.one_value: set[str] = set()  # options that take one value (filled by add_argument)
        super().__init__(*args, **kwargs)
        self.module, self.loaded = module, False

    def load(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        benchmark = importlib.import_module(self.module)
        self.description = user_text(benchmark.__doc__)
        benchmark.add_arguments(self)
        self.set_defaults(func=partial(run_benchmark, benchmark.main))

    def add_argument(self, *args, **kwargs):
        low = next((COUNTS[o] for o in args if o in COUNTS), None)
        if kwargs.get("type") is int and low is not None:  # a count: refused below its least, before any work
            kwargs["type"] = at_least(low)
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and action.nargs is None:
            self.one_value.update(action.option_strings)
        return action

    def takes_one_value(self, option: str) -> bool:
        self.load()
        return option in self.one_value

    def format_usage(self) -> str:
        self.load()
        return super().format_usage()

    def format_help(self) -> str:
        self.load()
        return super().format_help()

    def parse_known_args(self, args=None, namespace=None):
        self.load()
        namespace, extras = super().parse_known_args(args, namespace)
        if isinstance(getattr(namespace, "overrides", None), list):
            # overrides after options come back as extras: argparse closes a positional at the first option
            late = [e for e in extras if "=" in e and not e.startswith("-")]
            namespace.overrides = [*namespace.overrides, *late]
            extras = [e for e in extras if e not in late]
        return namespace, extras


class BenchParser(argparse.ArgumentParser):
    """``dist-dejpeg bench``. The benchmark's name may come after options too, as in the command lines of
    benchmarks/gpu_check.sh and configs/gpu_check.yaml (``bench --results R --updates=gen train k=v``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.benchmarks: dict[str, BenchmarkParser] = {}

    def name_first(self, args: list[str]) -> list[str]:
        """``args`` with the benchmark's name moved to the front: the first name that is not an option's value."""
        for i, word in enumerate(args):
            if word in self.benchmarks and not (i and self.benchmarks[word].takes_one_value(args[i - 1])):
                return [word, *args[:i], *args[i + 1:]]
        return args

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self.name_first(args), namespace)


def build_parser(prog: str = "dist-dejpeg bench") -> BenchParser:
    parser = BenchParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                         allow_abbrev=False)  # (as every dist-dejpeg parser: an option's name in full)
    subs = parser.add_subparsers(dest="which", required=True, parser_class=BenchmarkParser)
    for name, (module, line) in BENCHMARKS.items():
        parser.benchmarks[name] = subs.add_parser(name, help=line, module=module, formatter_class=HelpFormatter,
                                                  allow_abbrev=False)
    return parser


def add_parser(sub) -> None:
    """``bench`` in dist-dejpeg's parser (called by dist_dejpeg.cli.build_parser with its sub-parsers)."""
    bench = build_parser()
    sub.add_parser("bench", help=f"benchmarks: {', '.join(bench.benchmarks)} (results in benchmarks/results/)")
    # add_parser made a plain ArgumentParser: the BenchParser in its place also finds the name after options
    sub.choices["bench"] = bench
