"""What the research ablations (colour.py, quality.py, chroma.py beside this file) share: real trainings in child
processes, the validation photos they are evaluated on, the mean and spread over seeds, and their flags.

Not a script: the ablations import it (``python benchmarks/experiments/quality.py`` puts this folder first on
sys.path). They write their results with the package's benchmark results files (dist_dejpeg.bench.common).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dist_dejpeg.bench import HelpFormatter
from dist_dejpeg.bench.common import CPU_CONFIG, add_common_arguments
from dist_dejpeg.run.layout import GENERATOR


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


def validation_images(config, work: Path) -> list[str]:
    """Whole validation photos when data.root holds the bundled samples (written as PNG into ``work``),
    otherwise the validation shards."""
    import skimage.data
    from PIL import Image

    from dist_dejpeg.data import shards
    from dist_dejpeg.data.images import decode_rgb8

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
                photo = decode_rgb8((Path(skimage.data.__file__).parent / f"{name}.png").read_bytes())
                Image.fromarray(photo).save(path)
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
