"""Chroma ablation: where does the RGB error remain, and does weighting chroma in the loss help?

    python benchmarks/experiments/chroma.py                                  # from the repository root
    python benchmarks/experiments/chroma.py --chroma-weights 1 2 --seeds 0 --qualities 10

JPEG at 4:2:0 keeps chroma at a quarter of the resolution, and the restored image's RGB gain is smaller than
its gain on Y. For each ``loss.chroma_weight`` (1: L1 on RGB, the recipe's; w != 1: L1 on JPEG's Y, Cb, Cr
planes with the chroma weighted by w) the whole recipe is trained once per seed (same steps, so the same
training time) and evaluated raw (no guard), told each image's quality, on the validation photos at each
quality. Reported, mean over the seeds ± half the spread: RGB, Y, Cb and Cr gains over the JPEG input, and
the share of the restored image's RGB squared error that its chroma carries: the RGB MSE its Cb/Cr errors
alone would make, over that plus the MSE its Y error alone would make (colour photos only).

The weight-1 runs are exactly quality.py's conditioned runs (same command, same folder names): ``--work``
defaults to that script's folder, so they are reused instead of trained again. Writes
``benchmarks/results/chroma.json`` / ``chroma.md``.
"""

from __future__ import annotations

import logging
import statistics
import sys
from pathlib import Path

from dist_dejpeg.bench.common import write_results

import common  # common.py beside this script

log = logging.getLogger(__name__)

QUALITIES = (10, 20, 30, 40, 60, 80, 90)
WEIGHTS = (1.0, 2.0, 4.0)
# Sum over R, G, B of the squared coefficient of Cb and of Cr in JFIF's YCbCr -> RGB (R = Y + 1.402 Cr,
# G = Y - 0.344136 Cb - 0.714136 Cr, B = Y + 1.772 Cb): an error e in Cb alone adds 3.259 e^2 / 3 to the RGB MSE.
CB_TO_RGB = (0.344136 ** 2 + 1.772 ** 2) / 3
CR_TO_RGB = (1.402 ** 2 + 0.714136 ** 2) / 3


def _mse(psnr: float) -> float:
    return 255.0 ** 2 * 10 ** (-psnr / 10)


def chroma_share(metrics: dict) -> float | None:
    """The share of an image's RGB squared error carried by its chroma: the RGB MSE of its Cb/Cr errors alone
    over that plus the RGB MSE of its Y error alone (an error in Y alone moves R, G and B by the same amount).
    None for a grayscale reference (no chroma PSNR)."""
    if metrics.get("psnr_cb") is None or metrics.get("psnr_cr") is None or metrics.get("psnr_y") is None:
        return None
    chroma = CB_TO_RGB * _mse(metrics["psnr_cb"]) + CR_TO_RGB * _mse(metrics["psnr_cr"])
    return chroma / (chroma + _mse(metrics["psnr_y"]))


def _tag(weight: float, seed: int) -> str:
    # weight 1 is the recipe itself: the name quality.py gives its conditioned runs, so that they are reused
    return f"conditioned-s{seed}" if weight == 1.0 else f"conditioned-cw{weight:g}-s{seed}"


def summarise(result: dict) -> dict:
    """Per quality: the gains, and the chroma share of the JPEG input's and the restored image's error."""
    out = {}
    for q, pq in result["per_quality"].items():
        row = {f"gain_{m}": pq["gain"][m] for m in ("psnr", "psnr_y", "psnr_cb", "psnr_cr")}
        for side in ("jpeg", "restored"):
            shares = [s for r in result["per_image"] if str(r["quality"]) == q
                      for s in [chroma_share(r[side])] if s is not None]
            row[f"chroma_share_{side}"] = statistics.fmean(shares) if shares else None
        out[q] = row
    return out


def run(config: str, overrides: list[str], out_dir: str | Path, *, weights=WEIGHTS, seeds=(0, 1, 2),
        qualities=QUALITIES, work: str | Path = "runs/bench-quality", name: str = "chroma") -> dict:
    from dist_dejpeg.evaluation.evaluate import evaluate

    work, images = common.quality_bench_setup(config, overrides, work)
    runs: dict[str, dict] = {}
    for weight in weights:
        for seed in seeds:
            tag = _tag(weight, seed)
            run_dir = work / tag
            extra = [] if weight == 1.0 else [f"loss.chroma_weight={weight:g}"]
            seconds = common.train_once(config, [*overrides, f"train.seed={seed}", "model.quality_conditioning=true",
                                                 *extra], run_dir, work / f"{tag}.log")
            result = evaluate(str(run_dir), images, list(qualities), run_dir / "eval-chroma", progress=False,
                              restorer_kwargs={"device": "cpu", "guard": False}, only=("psnr",))
            runs[tag] = {"weight": weight, "seed": seed, "train_seconds": seconds, "per_quality": summarise(result)}
            log.info("chroma bench: %s done", tag)
    table, rows = {}, []
    for weight in weights:
        tags = [_tag(weight, s) for s in seeds]
        table[f"{weight:g}"] = {}
        for q in map(str, qualities):
            cells = {}
            for key in ("gain_psnr", "gain_psnr_y", "gain_psnr_cb", "gain_psnr_cr", "chroma_share_jpeg",
                        "chroma_share_restored"):
                values = [runs[t]["per_quality"][q][key] for t in tags]
                values = [v for v in values if v is not None]
                cells[key] = common.mean_spread(values) if values else (float("nan"), 0.0)
            table[f"{weight:g}"][q] = {k: {"mean": m, "spread": s} for k, (m, s) in cells.items()}
            rows.append([f"{weight:g}", q, *(f"{cells[k][0]:+.2f} ± {cells[k][1] / 2:.2f}" for k in
                                            ("gain_psnr", "gain_psnr_y", "gain_psnr_cb", "gain_psnr_cr")),
                         f"{100 * cells['chroma_share_jpeg'][0]:.0f} %",
                         f"{100 * cells['chroma_share_restored'][0]:.0f} %"])
    minutes = [r["train_seconds"] / 60 for r in runs.values() if r["train_seconds"]]
    report = {"config": config, "overrides": overrides, "weights": list(weights), "seeds": list(seeds),
              "qualities": list(qualities), "images": [Path(p).name for p in images], "table": table, "runs": runs}
    note = (f"`{config}` {' '.join(overrides)} (the whole recipe, quality-conditioned), seeds "
            f"{', '.join(map(str, seeds))}, one run per `loss.chroma_weight` and seed, the same steps each; "
            f"evaluated raw (no guard), told the quality, on {len(images)} validation photo(s) never trained on "
            f"({', '.join(Path(p).stem for p in images[:6])}), libjpeg 4:2:0. Gains: restored minus JPEG PSNR in "
            f"dB, mean over the seeds ± half the spread; Cb/Cr over the colour photos only. Chroma share: the part "
            f"of the RGB squared error its Cb/Cr errors alone would make (vs its Y error alone), colour photos. "
            f"Weight 1 is L1 on RGB (the recipe); other weights are L1 on Y, Cb, Cr with the chroma weighted. "
            + (f"Training took {min(minutes):.1f}-{max(minutes):.1f} min per run here." if minutes else ""))
    write_results(out_dir, name, report, "Where the RGB error remains, and weighting chroma in the loss", note,
                  ["chroma weight", "quality", "RGB gain", "Y gain", "Cb gain", "Cr gain", "chroma share (JPEG)",
                   "chroma share (restored)"], rows)
    return report


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "chroma", work="runs/bench-quality", qualities=QUALITIES)
    p.add_argument("--chroma-weights", type=float, nargs="+", default=list(WEIGHTS),
                   help="loss.chroma_weight values (1: L1 on RGB, the recipe's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    args = common.parse(p, argv)
    run(args.config, args.overrides, args.results, weights=tuple(args.chroma_weights), seeds=tuple(args.seeds),
        qualities=tuple(args.qualities), work=args.work, name=args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
