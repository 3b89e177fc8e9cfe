"""Colour ablation: does the restored image keep its colours, and does the gain grow with training?

    python benchmarks/experiments/colour.py                                  # from the repository root
    python benchmarks/experiments/colour.py --norms group --gen-steps 1000 --qualities 10

For each decoder normalisation (``model.decoder_norm``: batch, group, none) the config's ``gen`` phase is
trained for each step count (default 1000 and 5000; separate runs, each with its own one-cycle schedule),
and the result is evaluated on the validation photos (whole photos for the bundled samples, else the val
shards) at libjpeg 4:2:0 qualities: RGB and Y/Cb/Cr PSNR gains over the JPEG input, and the mean signed
shift of each RGB channel in 0-255 levels. A cast is a shift the JPEG input does not have; the target is
under 1 level at every step count, with the RGB gain growing from the short run to the long one.

This measures quality, not speed: it runs real trainings (the CPU debug recipe: ~3 min per 1000 steps on 2
cores) and writes ``benchmarks/results/colour.json`` / ``colour.md`` with the machine named.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from dist_dejpeg.bench.common import write_results

import common  # common.py beside this script

log = logging.getLogger(__name__)

NORMS = ("batch", "group", "none")


def summarise(result: dict, q: str) -> dict:
    """The numbers the table shows for one quality of an evaluate result."""
    pq = result["per_quality"][q]
    row = {f"gain_{m}": pq["gain"][m] for m in ("psnr", "psnr_y", "psnr_cb", "psnr_cr")}
    row.update({f"{m}": pq["restored"][m] for m in ("shift_r", "shift_g", "shift_b")})
    row.update({f"jpeg_{m}": pq["jpeg"][m] for m in ("shift_r", "shift_g", "shift_b")})
    row["max_abs_shift"] = max(abs(row[m]) for m in ("shift_r", "shift_g", "shift_b"))
    return row


def run(config: str, overrides: list[str], out_dir: str | Path, *, norms=NORMS, gen_steps=(1000, 5000),
        qualities=(10, 20, 40), work: str | Path = "runs/bench-colour", name: str = "colour") -> dict:
    from dist_dejpeg.evaluation.evaluate import evaluate

    base = [*overrides, "train.order=[gen]"]
    work, images = common.quality_bench_setup(config, base, work)
    results, rows = {}, []
    for norm in norms:
        for steps in gen_steps:
            tag = f"{norm}-{steps}"
            run_dir = work / tag
            seconds = common.train_once(config, [*base, f"model.decoder_norm={norm}",
                                                 f"train.phases.gen.steps={steps}"], run_dir, work / f"{tag}.log")
            result = evaluate(str(run_dir), images, list(qualities), run_dir / "eval", progress=False, only=("psnr",))
            results[tag] = {"norm": norm, "gen_steps": steps, "train_seconds": seconds,
                            "per_quality": {q: summarise(result, q) for q in result["per_quality"]}}
            for q, r in results[tag]["per_quality"].items():
                rows.append([norm, str(steps), q, f"{r['gain_psnr']:+.2f}", f"{r['gain_psnr_y']:+.2f}",
                             f"{r['gain_psnr_cb']:+.2f}", f"{r['gain_psnr_cr']:+.2f}",
                             f"{r['shift_r']:+.2f} / {r['shift_g']:+.2f} / {r['shift_b']:+.2f}",
                             f"{r['max_abs_shift']:.2f}", f"{seconds / 60:.1f}"])
            log.info("colour bench: %s done", tag)
    report = {"config": config, "overrides": base, "images": [Path(p).name for p in images],
              "qualities": list(qualities), "results": results}
    note = (f"`{config}` {' '.join(base)}, `gen` phase only, trained for each step count and each "
            f"`model.decoder_norm`; evaluated on {len(images)} validation image(s) never trained on "
            f"({', '.join(Path(p).stem for p in images[:6])}), libjpeg 4:2:0. Gains are restored minus JPEG "
            f"PSNR in dB; shift is the restored image's mean signed error per RGB channel in 0-255 levels "
            f"(the JPEG input's own is in colour.json). Random-init backbones where the config says so.")
    write_results(out_dir, name, report, "Colour fidelity and gain vs training length", note,
                  ["decoder norm", "gen steps", "quality", "RGB gain", "Y gain", "Cb gain", "Cr gain",
                   "shift R / G / B", "max abs shift", "train min"], rows)
    return report


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "colour", work="runs/bench-colour", qualities=(10, 20, 40))
    p.add_argument("--norms", nargs="+", default=list(NORMS), help="decoder norms (model.decoder_norm)")
    p.add_argument("--gen-steps", type=int, nargs="+", default=[1000, 5000], help="gen steps per run")
    args = common.parse(p, argv)
    run(args.config, args.overrides, args.results, norms=tuple(args.norms), gen_steps=tuple(args.gen_steps),
        qualities=tuple(args.qualities), work=args.work, name=args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
