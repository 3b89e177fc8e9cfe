"""What the GAN phase does, per quality: the generator as the gen phase left it against the run's final one
(after the critic and gan phases), and both against the JPEG input, on PSNR and the no-reference scores.

    python benchmarks/experiments/gan_phase.py runs/bench-quality/seed-0 runs/bench-quality/seed-1 ...
    python benchmarks/experiments/gan_phase.py RUN --qualities 10 20 40 --metrics psnr brisque niqe lpips

Each RUN is a finished run folder: its checkpoint from before the gan phase (the end of the critic phase,
which leaves the generator as the gen phase did; the debug recipe keeps it) holds the gen-only generator (EMA
weights, as validated), ``generator.safetensors`` the final one. Both are evaluated with the guard off (a passed-through
quality would measure the JPEG twice) on the held-out photos: the sample set's validation photos, whole, when
the run trained on the bundled samples, else its validation shards. LPIPS needs its backbone's pretrained
weights; where they cannot be loaded it is reported unavailable, not estimated. Writes
``benchmarks/results/gan_phase.json`` / ``gan_phase.md`` (mean and spread over the runs).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from dist_dejpeg.bench.common import write_results

import common  # common.py beside this script

log = logging.getLogger(__name__)

METRICS = ("psnr", "brisque", "niqe", "lpips")


def gen_only_checkpoint(run_dir: Path, order: list[str]) -> Path:
    """The newest checkpoint saved before the gan phase's first step (at the end of the phase before it: the
    critic phase does not change the generator, so the end of the gen or the critic phase)."""
    from dist_dejpeg.run.layout import TRAINER_STATE, list_checkpoints

    if "gan" not in order:
        raise SystemExit(f"{run_dir}: its train.order {order} has no gan phase")
    gan = order.index("gan")
    for folder in reversed(list_checkpoints(run_dir)):
        state = json.loads((folder / TRAINER_STATE).read_text())
        if state.get("phase_index", gan + 1) < gan or (state.get("phase_index") == gan and not state.get("phase_step")):
            return folder
    raise SystemExit(f"{run_dir}: no checkpoint from before its gan phase (train.keep_last removed it? the debug "
                     f"recipe keeps the last 2, the one after the critic phase among them)")


def run(run_dirs: list[str], out_dir: str | Path, *, qualities=(10, 20, 40, 60, 80), metrics=METRICS,
        name: str = "gan_phase") -> dict:
    from dist_dejpeg.config import load_config
    from dist_dejpeg.evaluation.evaluate import evaluate
    from dist_dejpeg.restore.restorer import Restorer

    per_run, labels = {}, ("jpeg", "gen-only", "after gan")
    for run_dir in map(Path, run_dirs):
        cfg = load_config(str(run_dir / "config.yaml"), [])
        images = common.validation_images(cfg, run_dir / "heldout")
        results = {}
        for label, model in (("gen-only", gen_only_checkpoint(run_dir, list(cfg.train.order))), ("after gan", run_dir)):
            restorer = Restorer(str(model), device="cpu", guard=False)
            results[label] = evaluate(restorer, images, list(qualities), run_dir / f"eval-{label.replace(' ', '-')}",
                                      progress=False, only=tuple(metrics))
        per_run[str(run_dir)] = {"images": [Path(p).name for p in images],
                                 "per_quality": {q: {"jpeg": results["gen-only"]["per_quality"][q]["jpeg"],
                                                     "gen-only": results["gen-only"]["per_quality"][q]["restored"],
                                                     "after gan": results["after gan"]["per_quality"][q]["restored"]}
                                                 for q in results["gen-only"]["per_quality"]}}
        log.info("gan phase: %s evaluated", run_dir)
    rows, table = [], {}
    for q in map(str, qualities):
        table[q] = {}
        for label in labels:
            cells = []
            for m in metrics:
                values = [r["per_quality"][q][label][m] for r in per_run.values()]
                if any(v is None for v in values):
                    table[q].setdefault(label, {})[m] = None
                    cells.append("n/a")
                    continue
                mean, spread = common.mean_spread(values)
                table[q].setdefault(label, {})[m] = {"mean": mean, "spread": spread}
                cells.append(f"{mean:.2f} ± {spread / 2:.2f}" if len(values) > 1 else f"{mean:.2f}")
            rows.append([q, label, *cells])
    images = sorted({i for r in per_run.values() for i in r["images"]})
    report = {"runs": list(per_run), "qualities": list(qualities), "metrics": list(metrics), "table": table,
              "per_run": per_run}
    note = (f"{len(per_run)} run(s) ({', '.join(per_run)}); the gen-only generator (the checkpoint from before "
            f"the gan phase, EMA weights) against the final one, guard off, on {', '.join(images)} (whole, never "
            f"trained on), libjpeg 4:2:0; mean ± half the spread over the runs. Lower is better for BRISQUE, NIQE "
            f"and LPIPS; n/a: the metric could not run here (LPIPS without its pretrained backbone).")
    write_results(out_dir, name, report, "What the GAN phase does, per quality", note,
                  ["quality", "model", *[m.upper() for m in metrics]], rows)
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    from dist_dejpeg.bench import HelpFormatter
    from dist_dejpeg.bench.common import add_common_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_arguments(p, "gan_phase", config=False)
    p.add_argument("runs", nargs="+", help="finished run folders that kept their checkpoints")
    p.add_argument("--qualities", type=int, nargs="+", default=[10, 20, 40, 60, 80], help="JPEG qualities")
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS, help="metrics to measure")
    args = common.parse(p, argv)
    run(args.runs, args.results, qualities=tuple(args.qualities), metrics=tuple(args.metrics), name=args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
