"""``dist-dejpeg bench all``: the four throughput benchmarks in a row (train, data, infer, scaling) and the
scaling model from bench train's tuned step times, each into its own results file.

    dist-dejpeg bench all                          # this machine -> benchmarks/results/{train,data,infer,scaling}.*
    dist-dejpeg bench all --no-ladder --tiles 288  # the tuned train row only, the small tiles only

It takes bench train's and bench data's flags; infer uses --repeats, scaling --steps and --updates. Scaling runs on the CPU
(the debug recipe unless --config names a config).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_dejpeg.bench import data, infer, scaling, train
from dist_dejpeg.bench.common import TUNED, add_common_arguments, config_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, None)  # each benchmark writes under its own name
    train.add_options(parser)
    data.add_options(parser)


def main(args: argparse.Namespace) -> int:
    config, overrides = config_of(args)
    report = train.run_from_args(args, config, overrides)
    if TUNED in report["results"]:
        scaling.scaling_model(report, config, overrides, args.results)
    data.run_from_args(args)
    infer.run(config, overrides, Path(args.results), repeats=args.repeats)
    scaling.run(*scaling.cpu_config_of(args), Path(args.results), steps=args.steps, updates=tuple(args.updates))
    return 0
