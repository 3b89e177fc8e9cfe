"""What the research ablations (colour.py, quality.py, chroma.py beside this file) share: their flags, and (from
dist_dejpeg.bench.common, which ``dist-dejpeg bench quality`` uses too) real trainings in child processes, the
validation photos they are evaluated on and the mean and spread over seeds.

Not a script: the ablations import it (``python benchmarks/experiments/quality.py`` puts this folder first on
sys.path). They write their results with the package's benchmark results files (dist_dejpeg.bench.common).
"""

from __future__ import annotations

import argparse
import logging

from dist_dejpeg.bench import HelpFormatter
from dist_dejpeg.bench.common import (CPU_CONFIG, add_common_arguments, mean_spread, quality_bench_setup,  # noqa: F401
                                      train_once, validation_images)


def parser(doc: str, name: str, *, work: str, qualities: tuple[int, ...]) -> argparse.ArgumentParser:
    """An ablation's parser with the flags they share (``doc``: the script's docstring, shown by --help)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    add_common_arguments(p, name, config=False)
    p.add_argument("--config", default=CPU_CONFIG[0], help="training config")
    p.add_argument("--qualities", type=int, nargs="+", default=list(qualities), help="JPEG qualities (libjpeg 4:2:0)")
    p.add_argument("--work", default=work, help="folder for the runs")
    p.add_argument("overrides", nargs="*", default=[], help="config overrides, key=value (anywhere but right after "
                                                            "an option that takes several values, such as --seeds)")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The command line (overrides before, between or after the options), with logging to stderr set up."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return p.parse_intermixed_args(argv)
