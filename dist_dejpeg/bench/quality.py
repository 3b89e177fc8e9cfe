"""``dist-dejpeg bench quality``: time to quality (MLPerf's measure), per recipe, over seeds.

    dist-dejpeg bench quality                                  # the debug recipe, seeds 0 1 2
    dist-dejpeg bench quality train.phases.gen.steps=500 --seeds 0 --budgets 1 2
    dist-dejpeg bench quality --config configs/div2k.yaml data.root=data/div2k --every 500 --targets 0.5 1.0

Each seed trains the recipe (config + overrides) in a child ``dist-dejpeg train`` with a checkpoint every
``--every`` global steps (kept: ``train.keep_last=0``); then every checkpoint (its EMA weights, as the run validates
them) restores the WHOLE held-out photos at q10 with the guard off, and the run's generator file gives the last
point. The x axes: ``train_seconds`` (wall time in training steps only: no validation, image logging or
checkpoint saving; trainer_state.json of each checkpoint, metrics.json's meta for the run) and the images drawn
from the loader over all phases (global step x data.batch_size x train.grad_accum x processes). Reported: the
minutes and images until the q10 gain (restored minus JPEG RGB PSNR) first reaches each ``--targets`` dB; the q10
gain of the last checkpoint at or before each ``--budgets`` minutes; the final generator's gain at each
``--qualities`` with restore's guard (passed-through qualities count 0.0) and without it, and its colour shift at
q10; mean and spread (max - min) over the seeds; the curve as ``<name>.png``.

Held-out photos: the sample set's validation photos (never trained on) when data.root holds the bundled samples,
else the config's validation shards. A run folder that a finished earlier call left is reused with the curve it
measured (``bench_quality_curve.json``), so an interrupted benchmark goes on where it stopped; the checkpoint
folders (~70 MB each for the debug recipe) are deleted once measured unless ``--keep-checkpoints``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

from dist_dejpeg.bench.common import (add_common_arguments, mean_spread, quality_bench_setup, train_once,
                                      write_results)
from dist_dejpeg.bench.scaling import cpu_config_of
from dist_dejpeg.cli_args import at_least, jpeg_quality, positive_number
from dist_dejpeg.run.layout import GENERATOR, METRICS, TRAINER_STATE, checkpoint_dir, list_checkpoints

log = logging.getLogger(__name__)

NAME = "time_to_quality"  # not "quality": benchmarks/results/quality.* hold the blind/conditioned ablation's numbers
CURVE_QUALITY = 10
TARGETS = (0.3, 0.5, 1.0)  # dB of q10 gain
BUDGETS = (1.0, 2.0, 5.0)  # minutes of training
QUALITIES = (10, 20, 30, 40, 60, 80, 90)
POINTS = 15  # --every's default: the run's global steps over this
CURVE_FILE = "bench_quality_curve.json"  # in each run folder: the measured checkpoints, for a rerun
SHORTER = "run shorter than budget"
TOO_EARLY = "no checkpoint at or before the budget"


# -- the pure part: a run's curve -> the reported numbers ----------------------------------------------------------
def first_reached(points: list[dict], target: float) -> dict | None:
    """The first point (in training time) whose gain reaches ``target`` dB, or None: not reached."""
    return next((p for p in sorted(points, key=lambda p: p["train_seconds"]) if p["gain"] >= target), None)


def at_budget(points: list[dict], minutes: float) -> tuple[dict | None, str]:
    """The last point at or before ``minutes`` of training, or None with the reason: the run trained less than the
    budget (its gain there is unknown), or its first checkpoint came later."""
    budget = 60.0 * minutes
    ordered = sorted(points, key=lambda p: p["train_seconds"])
    if not ordered or ordered[-1]["train_seconds"] < budget:
        return None, SHORTER
    before = [p for p in ordered if p["train_seconds"] <= budget]
    return (before[-1], "") if before else (None, TOO_EARLY)


def over_seeds(values: list[float | None]) -> dict:
    """Mean and spread over the seeds that have a value (None: not reached / not measured), and how many did."""
    have = [v for v in values if v is not None]
    mean, spread = mean_spread(have) if have else (None, None)
    return {"mean": mean, "spread": spread, "seeds": len(have), "of": len(values), "values": values}


def summarize(runs: list[dict], targets, budgets, qualities) -> dict:
    """Every reported number over the seeds: time and images to each target, the gain at each budget, the final
    gains with and without the guard, the colour shift, the whole run's minutes and images."""
    out: dict = {"targets": {}, "budgets": {}, "final": {}}
    for t in targets:
        hits = [first_reached(r["points"], t) for r in runs]
        out["targets"][str(t)] = {"minutes": over_seeds([h and h["train_seconds"] / 60 for h in hits]),
                                  "images": over_seeds([h and h["images"] for h in hits])}
    for b in budgets:
        found = [at_budget(r["points"], b) for r in runs]
        out["budgets"][str(b)] = {"gain": over_seeds([p and p["gain"] for p, _ in found]),
                                  "at_minutes": [p and p["train_seconds"] / 60 for p, _ in found],
                                  "missing": [why for _, why in found]}
    for q in map(str, qualities):
        finals = [r["final"][q] for r in runs]
        out["final"][q] = {"guard": over_seeds([f["guard"] for f in finals]),
                           "raw": over_seeds([f["raw"] for f in finals]),
                           "passed_through": sum(f["passed_through"] for f in finals)}
    out["colour_shift_q10"] = over_seeds([r["colour_shift_q10"] for r in runs])
    out["train_minutes"] = over_seeds([r["points"][-1]["train_seconds"] / 60 for r in runs])
    out["wall_minutes"] = over_seeds([r["wall_seconds"] / 60 if r.get("wall_seconds") else None for r in runs])
    out["images"] = over_seeds([r["points"][-1]["images"] for r in runs])
    return out


def _cell(s: dict, fmt: str, none: str = "not reached") -> str:
    """``mean ± half spread``, with how many seeds have a value when not all do (``none``: when no seed has)."""
    if s["mean"] is None:
        return none
    text = f"{s['mean']:{fmt}} ± {s['spread'] / 2:{fmt.lstrip('+')}}"
    return text if s["seeds"] == s["of"] else f"{text} ({s['seeds']}/{s['of']} seeds)"


def _per_seed(values: list, seeds, fmt: str, missing: str = "not reached") -> str:
    return ", ".join(f"s{s}: {missing if v is None else format(v, fmt)}" for s, v in zip(seeds, values))


def table_rows(summary: dict, seeds) -> list[list[str]]:
    rows = []
    for t, s in summary["targets"].items():
        rows.append([f"minutes to q10 gain +{float(t):g} dB", _cell(s["minutes"], ".2f"),
                     _per_seed(s["minutes"]["values"], seeds, ".2f"), "first checkpoint at or above the target"])
        rows.append([f"images to q10 gain +{float(t):g} dB", _cell(s["images"], ".0f"),
                     _per_seed(s["images"]["values"], seeds, ".0f"), "images drawn from the loader over all phases"])
    for b, s in summary["budgets"].items():
        values = [why if v is None else f"{v:+.3f} (at {m:.2f} min)"
                  for v, m, why in zip(s["gain"]["values"], s["at_minutes"], s["missing"])]
        rows.append([f"q10 gain after {float(b):g} min", _cell(s["gain"], "+.3f", "n/a"), _per_seed(values, seeds, ""),
                     "the last checkpoint at or before the budget"])
    for q, s in summary["final"].items():
        note = f"passed through (counted 0.0) in {s['passed_through']} of {s['guard']['of']} runs"
        rows.append([f"final gain q{q}, guard", _cell(s["guard"], "+.3f"), _per_seed(s["guard"]["values"], seeds,
                                                                                     "+.3f"), note])
        rows.append([f"final gain q{q}, raw", _cell(s["raw"], "+.3f"), _per_seed(s["raw"]["values"], seeds, "+.3f"),
                     "no guard"])
    rows.append(["colour shift q10 (levels)", _cell(summary["colour_shift_q10"], ".2f"),
                 _per_seed(summary["colour_shift_q10"]["values"], seeds, ".2f"), "final generator, no guard"])
    rows.append(["training minutes (whole run)", _cell(summary["train_minutes"], ".2f"),
                 _per_seed(summary["train_minutes"]["values"], seeds, ".2f"), "wall time in training steps"])
    rows.append(["wall minutes of the train command", _cell(summary["wall_minutes"], ".2f", "n/a"),
                 _per_seed(summary["wall_minutes"]["values"], seeds, ".2f", "n/a"),
                 "start to exit: start-up, validation and the bench's extra checkpoints included"])
    rows.append(["images (whole run)", _cell(summary["images"], ".0f"),
                 _per_seed(summary["images"]["values"], seeds, ".0f"), "images drawn from the loader over all phases"])
    return rows


# -- measuring a run -----------------------------------------------------------------------------------------------
def _gain_at(restorer, images: list[str], qualities: list[int]) -> dict:
    from dist_dejpeg.evaluation.evaluate import evaluate

    return evaluate(restorer, images, qualities, None, progress=False, only=("psnr",))


def curve(run_dir: Path, images: list[str], images_per_step: int, before: int) -> list[dict]:
    """The q10 gain of every checkpoint folder of ``run_dir`` before global step ``before`` (its EMA weights, guard
    off) on the whole ``images``, with its global step, images drawn and training seconds; oldest first."""
    from dist_dejpeg.restore.restorer import Restorer

    points = []
    for folder in list_checkpoints(run_dir):
        state = json.loads((folder / TRAINER_STATE).read_text())
        step = int(state["global_step"])
        if step >= before:
            continue
        result = _gain_at(Restorer(folder, device="cpu", guard=False), images, [CURVE_QUALITY])
        points.append({"step": step, "images": step * images_per_step * int(state.get("processes", 1)),
                       "train_seconds": float(state.get("train_seconds", 0.0)), "source": folder.name,
                       "gain": result["per_quality"][str(CURVE_QUALITY)]["gain"]["psnr"]})
        log.info("bench quality: %s %s: q10 gain %+.3f dB after %.2f min", run_dir.name, folder.name,
                 points[-1]["gain"], points[-1]["train_seconds"] / 60)
    return points


def final(run_dir: Path, images: list[str], qualities, images_per_step: int) -> dict:
    """The run's generator file: its point of the curve, the gain at each quality with the guard (as ``restore``
    runs it: a passed-through quality counts 0.0) and without, and the colour shift at q10 (mean over the images
    of the largest |mean channel difference| restored vs clean, 0-255 levels, guard off)."""
    from dist_dejpeg.restore.guard import decide
    from dist_dejpeg.restore.restorer import Restorer

    meta = json.loads((run_dir / METRICS).read_text())["meta"]
    raw = Restorer(run_dir / GENERATOR, device="cpu", guard=False)
    measured = sorted({*qualities, CURVE_QUALITY})
    result = _gain_at(raw, images, measured)
    gains = {}
    for q in map(int, qualities):
        gain = result["per_quality"][str(q)]["gain"]["psnr"]
        passes = decide(raw.gains, q, "given", guard=True, lows=raw.lows).passthrough
        gains[str(q)] = {"raw": gain, "guard": 0.0 if passes else gain, "passed_through": passes}
    shifts = [max(abs(r["restored"][f"shift_{c}"]) for c in "rgb") for r in result["per_image"]
              if r["quality"] == CURVE_QUALITY]
    step = int(meta["global_step"])
    point = {"step": step, "images": step * images_per_step * int(meta.get("processes") or 1),
             "train_seconds": float(meta.get("train_seconds", 0.0)), "source": GENERATOR,
             "gain": result["per_quality"][str(CURVE_QUALITY)]["gain"]["psnr"]}
    return {"point": point, "final": gains, "colour_shift_q10": sum(shifts) / len(shifts)}


def measure_run(run_dir: Path, images: list[str], qualities, images_per_step: int, keep_checkpoints: bool) -> dict:
    """A trained run's curve (checkpoints, then the generator file) and final numbers. The curve is kept in the run
    folder: a rerun on the same run (same training seconds, same photos) reads it instead of the deleted
    checkpoints."""
    end = final(run_dir, images, qualities, images_per_step)
    saved, names = run_dir / CURVE_FILE, [Path(p).name for p in images]
    try:
        old = json.loads(saved.read_text())
        same = old["images"] == names and old["train_seconds"] == end["point"]["train_seconds"]
        points = old["points"] if same else None
    except (OSError, ValueError, KeyError, TypeError):
        points = None
    if points is None:  # the last checkpoint is the generator file's step: the file stands for it
        points = curve(run_dir, images, images_per_step, before=end["point"]["step"])
        saved.write_text(json.dumps({"images": names, "train_seconds": end["point"]["train_seconds"],
                                     "points": points}, indent=1))
    if not keep_checkpoints:
        shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)
    return {"points": [*points, end["point"]], "final": end["final"], "colour_shift_q10": end["colour_shift_q10"]}


def plot(runs: list[dict], targets, path: Path) -> None:
    """q10 gain vs minutes of training, one thin line per seed, the targets as horizontal dashed lines (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in runs:
        pts = r["points"]
        ax.plot([p["train_seconds"] / 60 for p in pts], [p["gain"] for p in pts], lw=0.9, marker=".",
                label=f"seed {r['seed']}")
    for t in targets:
        ax.axhline(t, ls="--", lw=0.8, color="grey")
        ax.annotate(f"+{t:g} dB", (0.01, t), xycoords=ax.get_yaxis_transform(), xytext=(0, 2),
                    textcoords="offset points", fontsize=8, color="grey")
    ax.set_xlim(left=0)
    ax.set_xlabel("minutes of training (train_seconds / 60)")
    ax.set_ylabel(f"q{CURVE_QUALITY} RGB PSNR gain over the JPEG (dB)")
    ax.set_title("time to quality, held-out photos")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def run(config: str, overrides: list[str], out_dir: str | Path, *, seeds=(0, 1, 2), every: int = 0,
        targets=TARGETS, budgets=BUDGETS, qualities=QUALITIES, work: str | Path = "runs/bench-quality",
        keep_checkpoints: bool = False, name: str = NAME) -> dict:
    from dist_dejpeg.config import load_config

    if len(set(seeds)) != len(seeds):  # one run would count as two seeds in every mean and "of N runs"
        raise ValueError(f"--seeds {' '.join(map(str, seeds))}: a seed given twice (each seed is one training run)")
    cfg = load_config(config, overrides)
    every = every or max(1, sum(cfg.train.phases[p].steps for p in cfg.train.order) // POINTS)
    images_per_step = cfg.data.batch_size * cfg.train.grad_accum  # x the processes, from each checkpoint
    work, images = quality_bench_setup(config, overrides, work)
    # one folder per recipe and seed: a rerun of the same recipe reuses it, another recipe gets its own
    recipe = hashlib.sha1(json.dumps([config, overrides, every]).encode()).hexdigest()[:8]
    runs = []
    for seed in seeds:
        run_dir = work / f"ttq-{recipe}-s{seed}"
        wall = train_once(config, [*overrides, f"train.ckpt_every={every}", "train.keep_last=0", f"train.seed={seed}"],
                          run_dir, work / f"ttq-{recipe}-s{seed}.log")
        runs.append({"seed": seed, "run_dir": str(run_dir), "wall_seconds": wall,
                     **measure_run(run_dir, images, qualities, images_per_step, keep_checkpoints)})
        log.info("bench quality: seed %d done (%.1f min of training)", seed,
                 runs[-1]["points"][-1]["train_seconds"] / 60)
    summary = summarize(runs, targets, budgets, qualities)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}.png"
    plot(runs, targets, png)
    held_out = [Path(p).stem for p in images]
    report = {"config": config, "overrides": list(overrides), "seeds": list(seeds), "every": every,
              "targets": list(targets), "budgets": list(budgets), "qualities": list(qualities),
              "held_out": held_out, "images_per_step": images_per_step, "plot": png.name, "summary": summary,
              "runs": runs}
    note = (f"Recipe: `{config}` {' '.join(overrides)} (+ `train.ckpt_every={every} train.keep_last=0 "
            f"train.seed=<seed>`); seeds {', '.join(map(str, seeds))}. Held-out photos (whole, never trained on): "
            f"{', '.join(held_out)}. Gain: restored minus JPEG RGB PSNR in dB (libjpeg 4:2:0), at q10 on each "
            f"checkpoint's EMA weights without the guard. Minutes: wall time in training steps only (no validation, "
            f"image logging or checkpoint saving); images: images drawn from the loader over all phases (global step "
            f"x {cfg.data.batch_size} x grad_accum {cfg.train.grad_accum} x processes). A target counts at the first "
            f"checkpoint at or above it (checkpoints every {every} steps; 'not reached': no checkpoint got there); a "
            f"budget's gain is the last checkpoint's at or before it ('{SHORTER}': the run trained less). Final: "
            f"the run's generator file with restore's guard (a passed-through quality counts 0.0) and without it "
            f"(raw); colour shift: mean over the photos of the largest |mean channel difference| restored vs "
            f"clean, 0-255 levels. Cells: mean over the seeds ± half the spread (max - min).\n\n"
            f"![q10 gain vs minutes of training]({png.name})")
    write_results(out_dir, name, report, "Time to quality: q10 gain on held-out photos vs training time", note,
                  ["measure", "mean ± half spread", "per seed", "how"], table_rows(summary, seeds))
    return report


# -- the command ---------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, NAME, config=False)
    parser.add_argument("--config", help="training config (none: configs/debug.yaml, on any machine)")
    parser.add_argument("overrides", nargs="*", default=[], help="config overrides, key=value (anywhere but right "
                                                                 "after an option that takes several values)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--every", type=at_least(1), default=None,
                        help=f"checkpoint (curve point) every N global steps (default: the run's steps // {POINTS})")
    parser.add_argument("--targets", type=positive_number, nargs="+", default=list(TARGETS), help="q10 gains, dB")
    parser.add_argument("--budgets", type=positive_number, nargs="+", default=list(BUDGETS),
                        help="minutes of training")
    parser.add_argument("--qualities", type=jpeg_quality, nargs="+", default=list(QUALITIES),
                        help="JPEG qualities of the final generator's gains")
    parser.add_argument("--work", default="runs/bench-quality", help="folder for the runs (ttq-<recipe>-s<seed>)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint folders")


def main(args: argparse.Namespace) -> int:
    from dist_dejpeg.config import ConfigError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("bench quality: the curve is drawn with matplotlib, which is not installed: pip install matplotlib "
              "(or the package's bench extra)", file=sys.stderr)
        return 2
    config, overrides = cpu_config_of(args)
    try:
        run(config, overrides, args.results, seeds=tuple(args.seeds), every=args.every or 0,
            targets=tuple(args.targets), budgets=tuple(args.budgets), qualities=tuple(args.qualities),
            work=args.work, keep_checkpoints=args.keep_checkpoints, name=args.name)
    except ConfigError as err:
        print(f"bench quality: {err}", file=sys.stderr)
        return 2
    return 0
