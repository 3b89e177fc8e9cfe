"""Quality ablation: does telling the model the JPEG quality help, and does restore ever do harm?

    python benchmarks/experiments/quality.py                                 # from the repository root
    python benchmarks/experiments/quality.py train.phases.gen.steps=200 --seeds 0 --qualities 10 40

Trains the config (the whole recipe: gen, critic, gan) once per seed as a blind model and once as a
quality-conditioned one (``model.quality_conditioning``), and evaluates each on the validation photos at
each quality (libjpeg 4:2:0), as ``restore`` runs it: with the do-no-harm guard (images of a quality where
the model's own validation measured no gain are passed through) and without it (the raw model). The
conditioned model is evaluated a third time without being told the quality (blind mode, as for a PNG
input). Writes ``benchmarks/results/quality.json`` / ``quality.md``: RGB and Y PSNR gains over the JPEG
input, mean and spread (max - min) over the seeds, and each run's training time.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from dist_dejpeg.bench.common import write_results

import common  # common.py beside this script

log = logging.getLogger(__name__)

QUALITIES = (10, 20, 30, 40, 60, 80, 90)
# (label, conditioned model, with the guard, told the quality)
VARIANTS = (("blind", False, True, True), ("blind, no guard", False, False, True),
            ("conditioned", True, True, True), ("conditioned, no guard", True, False, True),
            ("conditioned, told nothing", True, True, False))


def run(config: str, overrides: list[str], out_dir: str | Path, *, seeds=(0, 1, 2), qualities=QUALITIES,
        work: str | Path = "runs/bench-quality", name: str = "quality") -> dict:
    from dist_dejpeg.evaluation.evaluate import evaluate
    from dist_dejpeg.restore.restorer import Restorer

    work, images = common.quality_bench_setup(config, overrides, work)
    runs: dict[str, dict] = {}
    for conditioned in (False, True):
        for seed in seeds:
            tag = f"{'conditioned' if conditioned else 'blind'}-s{seed}"
            run_dir = work / tag
            seconds = common.train_once(config, [*overrides, f"train.seed={seed}",
                                                 f"model.quality_conditioning={str(conditioned).lower()}"],
                                        run_dir, work / f"{tag}.log")
            runs[tag] = {"seed": seed, "conditioned": conditioned, "train_seconds": seconds, "eval": {}}
            # The raw model is evaluated once per way of telling it the quality; the guarded numbers follow from
            # the guard's decision at each quality (it passes a whole quality through or none of it: gain 0).
            guarded = Restorer(str(run_dir), device="cpu", guard=True)
            raw = Restorer(str(run_dir), device="cpu", guard=False)
            for told in ((True, False) if conditioned else (True,)):
                result = evaluate(raw, images, list(qualities), run_dir / f"eval-{'told' if told else 'blind'}",
                                  progress=False, blind=not told, only=("psnr",))
                for label, cond, guard, told_v in VARIANTS:
                    if cond != conditioned or told_v != told:
                        continue
                    rows_q = {}
                    for q, r in result["per_quality"].items():
                        passes = guard and told and guarded.decide(int(q)).passthrough
                        rows_q[q] = {"rgb": 0.0 if passes else r["gain"]["psnr"],
                                     "y": 0.0 if passes else r["gain"]["psnr_y"],
                                     "passed_through": r["images"] if passes else 0, "images": r["images"]}
                    runs[tag]["eval"][label] = rows_q
            runs[tag]["val_psnr_gain"] = guarded.gains
            log.info("quality bench: %s done (%.1f min)", tag, seconds / 60)
    table, rows = {}, []
    for label, cond, _, _ in VARIANTS:
        tags = [t for t, r in runs.items() if r["conditioned"] == cond]
        table[label] = {}
        for q in map(str, qualities):
            rgb = common.mean_spread([runs[t]["eval"][label][q]["rgb"] for t in tags])
            y = common.mean_spread([runs[t]["eval"][label][q]["y"] for t in tags])
            passed = sum(runs[t]["eval"][label][q]["passed_through"] for t in tags)
            total = sum(runs[t]["eval"][label][q]["images"] for t in tags)
            table[label][q] = {"rgb_mean": rgb[0], "rgb_spread": rgb[1], "y_mean": y[0], "y_spread": y[1],
                               "passed_through": passed, "images": total}
            rows.append([label, q, f"{rgb[0]:+.2f} ± {rgb[1] / 2:.2f}", f"{y[0]:+.2f} ± {y[1] / 2:.2f}",
                         f"{passed}/{total}"])
    minutes = [r["train_seconds"] / 60 for r in runs.values()]
    report = {"config": config, "overrides": overrides, "seeds": list(seeds), "qualities": list(qualities),
              "images": [Path(p).name for p in images], "table": table, "runs": runs,
              "train_minutes": {"min": min(minutes), "max": max(minutes)}}
    note = (f"`{config}` {' '.join(overrides)} (the whole recipe), seeds {', '.join(map(str, seeds))}, each "
            f"trained blind and quality-conditioned; evaluated on {len(images)} validation photo(s) never trained "
            f"on ({', '.join(Path(p).stem for p in images[:6])}), libjpeg 4:2:0 at each quality. Gains: restored "
            f"minus JPEG PSNR in dB, mean over the seeds ± half the spread (max - min). Guard: images of a "
            f"quality where the model's own validation measured no gain are passed through (gain 0); 'no guard' "
            f"is the raw model; 'told nothing' runs the conditioned model without the quality. Training took "
            f"{min(minutes):.1f}-{max(minutes):.1f} min per run here.")
    write_results(out_dir, name, report, "Blind vs quality-conditioned restoration, with and without the guard",
                  note, ["model / restore", "quality", "RGB gain (dB)", "Y gain (dB)", "passed through"], rows)
    return report


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "quality", work="runs/bench-quality", qualities=QUALITIES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    args = common.parse(p, argv)
    run(args.config, args.overrides, args.results, seeds=tuple(args.seeds),
        qualities=tuple(args.qualities), work=args.work, name=args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
