"""Training-step throughput: images/s per device of the ``gen``, ``critic`` and ``gan`` updates, from the naive
path (fp32, eager, foreach AdamW, host checks every step) up the fast-path ladder to the tuned defaults.

    dist-dejpeg bench train --config configs/debug.yaml                       # this machine, synthetic batches
    dist-dejpeg bench train --config configs/div2k.yaml data.crop=256 model.pretrained=false loss.lpips_pretrained=false
    accelerate launch -m dist_dejpeg.cli bench train --config configs/div2k.yaml   # per-device rate under DDP
    dist-dejpeg bench train --updates gen --rungs none --profile   # naive vs tuned gen step, operator tables

Every row builds the real Trainer (same models, optimizers, autocast, DDP wrapping, host checks) with the
row's overrides and calls its ``train_step``; batches are synthetic and already on the device, so the number
is the model's, not the loader's (``dist-dejpeg bench data`` measures loaders). FLOPs per step come from
``torch.utils.flop_counter`` on one eager fp32 step; achieved FLOP/s = FLOPs / step time; on a GPU with a
known bf16 peak, the model-FLOPs utilisation against it. The LPIPS share is 1 - t(gen without LPIPS) /
t(gen), both measured on the same Trainer.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from dist_dejpeg.bench.common import (TUNED, UPDATES, add_common_arguments, bf16_peak_flops, config_of, is_writer,
                                      measure, profile_calls, sync)
from dist_dejpeg.bench.train_report import AGAIN, write_report
from dist_dejpeg.config import Config, apply_overrides, load_config
from dist_dejpeg.train.build import DEFERRED_CHECK_DEVICES

NAIVE = {"train.mixed_precision": "no", "model.channels_last": "false", "train.fused_adamw": "false",
         "train.sync_every": "1", "train.compile": "false", "train.compile_mode": "default"}
# Each rung adds one piece to the one before (the combinations that matter, not the full product). A rung is
# named by the config key it sets (--rungs picks some: each keeps the pieces of the rungs before it).
LADDER = [
    ("naive: fp32, eager, foreach AdamW, host checks every step", {}),
    ("+ channels_last", {"model.channels_last": "true"}),
    ("+ bf16 autocast", {"train.mixed_precision": "bf16"}),
    ("+ fused AdamW", {"train.fused_adamw": "true"}),
    ("+ host checks every 25 steps", {"train.sync_every": "25"}),  # CUDA only: on a CPU nothing is queued to wait for
    ("+ torch.compile", {"train.compile": "true"}),
    # CUDA only (nothing to replay on a CPU): the compiled step launches ~1600 kernels from the host
    ("+ CUDA graphs (compile mode reduce-overhead)", {"train.compile_mode": "reduce-overhead"}),
]


def rung_name(overrides: dict) -> str:
    """A rung's name: the last part of the config key it sets (compile, compile_mode, ...)."""
    return next(iter(overrides)).rsplit(".", 1)[1]


def rung_names() -> list[str]:
    return [rung_name(step) for _, step in LADDER[1:]]




class Synthetic:
    """Endless random batches of the batch contract, already on the device in the configured memory format."""

    def __init__(self, cfg: Config, device: torch.device):
        n, c = cfg.data.batch_size, cfg.data.crop
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        gen = torch.Generator().manual_seed(0)
        clean = torch.rand(n, 3, c, c, generator=gen)
        jpeg = (clean + 0.05 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
        self.batch = {"clean": clean.to(device, memory_format=fmt), "jpeg": jpeg.to(device, memory_format=fmt),
                      "quality": torch.full((n,), 20, dtype=torch.int64, device=device)}

    def __iter__(self):
        while True:
            yield self.batch


def _reset_accelerate() -> None:
    """Each row builds its own Accelerator (its own mixed precision): forget the process-wide state."""
    from dist_dejpeg.train.build import reset_accelerate_state

    reset_accelerate_state()


def _phase(cfg: Config, kind: str):
    return next((p for p in cfg.train.phases.values() if p.kind == kind), None)


def _rows_for(cfg: Config, updates: tuple[str, ...] = tuple(UPDATES)) -> list[tuple[str, str, object]]:
    """(update name, turn, phase) of each of ``updates`` (keys of UPDATES) that this config trains."""
    gen, critic, gan = _phase(cfg, "gen"), _phase(cfg, "critic"), _phase(cfg, "gan")
    rows = [("gen", "gen", gen)]
    if gen is not None and gen.w_lpips > 0:
        no_lpips = copy.deepcopy(gen)
        no_lpips.w_lpips = 0.0
        rows.append(("gen without LPIPS", "gen", no_lpips))
    if critic is not None:
        rows.append(("critic", "critic", critic))
    if gan is not None:
        rows.append(("gan generator turn", "gen", gan))
    names = {name for u in updates for name in UPDATES[u]}
    return [r for r in rows if r[2] is not None and r[0] in names]


def count_flops(cfg: Config) -> float:
    """FLOPs of one eager fp32 ``gen`` update (generator forward + backward, LPIPS forward + backward to its
    input), from torch.utils.flop_counter. Optimizer arithmetic is not counted (it has no matmul/conv)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dist_dejpeg.train.trainer import Trainer

    _reset_accelerate()
    cfg = _with(cfg, NAIVE)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.run_dir = tmp
        trainer = Trainer(cfg, train_loader=Synthetic(cfg, _device(cfg)), val_set={})
        try:
            with FlopCounterMode(display=False) as counter:
                trainer.train_step(_phase(cfg, "gen"), "gen", iter(trainer.loader))
            return float(counter.get_total_flops())
        finally:
            trainer.close()


def naive_label_of(ladder: bool) -> str:
    return LADDER[0][0] if ladder else TUNED


def _device(cfg: Config) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu")


def _with(cfg: Config, overrides: dict) -> Config:
    return apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])


def bench_variant(cfg: Config, rows: list[tuple[str, str, object]], *, warmup: int, steps: int,
                  repeats: int, profile_to: Path | None = None, fresh_compile: bool = False) -> dict[str, dict]:
    """Build one Trainer with ``cfg`` and time each (update, turn, phase) row on it; with ``profile_to`` (a file
    name stem) also profile the gen row's steps after timing them (``<stem>.txt``). ``fresh_compile``: forget what
    dynamo compiled for the rows before (a row of another batch size would otherwise get a graph with a dynamic
    batch dimension, which training at one batch size never runs; inductor's kernel cache on disk stays)."""
    from dist_dejpeg.train.trainer import Trainer

    _reset_accelerate()
    if fresh_compile and cfg.train.compile:
        torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = copy.deepcopy(cfg)
        cfg.train.run_dir = tmp
        cfg.train.progress = False
        trainer = Trainer(cfg, train_loader=Synthetic(cfg, _device(cfg)), val_set={})
        images = cfg.data.batch_size * cfg.train.grad_accum
        batches = iter(trainer.loader)
        out = {}

        def step(phase, turn):  # as the training loop does: the update, then the host checks when due
            trainer.train_step(phase, turn, batches)
            if trainer.checks.due:
                trainer.checks.read(trainer.state.global_step)

        from torch._dynamo.utils import compile_times, counters

        from dist_dejpeg.train.compile import compile_counts, compile_outcome, outcome_text

        try:
            for name, turn, phase in rows:
                # the first step on its own: it pays the compilation, if any (what a short run pays too)
                skips, since = counters["inductor"]["cudagraph_skips"], compile_counts()
                start = time.perf_counter()
                step(phase, turn)
                sync(trainer.accelerator.device)
                first = time.perf_counter() - start
                if cfg.train.compile:  # where the first step's compiling went (dynamo's phases, cumulative)
                    print(f"bench train: {name}: first step {first:.1f} s; torch._dynamo compile times:\n"
                          f"{compile_times(aggregate=True)}", flush=True)
                timing = measure(lambda: step(phase, turn), warmup=max(warmup - 1, 0), steps=steps, repeats=repeats,
                                 device=trainer.accelerator.device)
                out[name] = dict(timing.as_dict(), first_step_s=first,
                                 images_per_s_per_device=images / timing.seconds_per_call)
                if cfg.train.compile:  # suppress_errors: a compile that failed ran eagerly, not a compiled timing
                    out[name]["compile"] = compile_outcome(since)
                    if outcome_text(out[name]["compile"]):
                        print(f"bench train: {name}: {outcome_text(out[name]['compile'])}", flush=True)
                if trainer.cudagraphs:  # inductor falls back to plain compiled code where it cannot graph a region
                    out[name]["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
                if profile_to is not None and name == "gen":
                    out[name]["profile"] = profile_calls(lambda: step(phase, turn), profile_to.with_suffix(".txt"),
                                                         steps=steps, device=trainer.accelerator.device)
        finally:
            trainer.close()
        return out


def _over_rounds(samples: list[dict]) -> dict:
    """One row from its measurements in several rounds: the median round (by ms/step); spread: across rounds
    (within the block medians when there is one round); first_step_s: the first round's (it compiled)."""
    if len(samples) == 1:
        return dict(samples[0], rounds=1)
    ms = sorted(r["ms_per_call"] for r in samples)
    median = statistics.median(ms)
    images = samples[0]["images_per_s_per_device"] * samples[0]["ms_per_call"]  # images per step x 1000
    compiled = [r["compile"] for r in samples if "compile" in r]  # a round that fell back to eager marks the row
    return {**({"compile": next((c for c in compiled if c["fell_back"]), compiled[0])} if compiled else {}),
            "ms_per_call": median, "spread": (ms[-1] - ms[0]) / median, "images_per_s_per_device": images / median,
            "first_step_s": samples[0].get("first_step_s"), "calls": sum(r.get("calls", 0) for r in samples),
            "rounds": len(samples), "ms_per_round": [r["ms_per_call"] for r in samples]}


def run(config: str, overrides: list[str], out_dir: str | Path, *, warmup: int = 3, steps: int = 10,
        repeats: int = 3, ladder: bool = True, updates: tuple[str, ...] = tuple(UPDATES), rounds: int = 1,
        name: str = "train", rungs: tuple[str, ...] | None = None, profile: bool = False,
        batch_sizes: tuple[int, ...] = ()) -> dict:
    """``rounds`` > 1 measures the whole list of variants that many times, one after the other, and reports each
    row's median round: on a machine whose speed drifts, every variant then sees the drift alike. ``rungs``: the
    ladder's rungs to time (names from rung_names(); None: all; (): only the naive baseline, then the tuned row:
    what fits a GPU check whose compiled rows take minutes each). A rung keeps the pieces of the rungs before it,
    timed or not. The CUDA graphs rung is left out on a CPU. ``profile``: each variant's gen steps are also profiled,
    the operator tables in ``<name>_profile_<n>.txt`` and the device-busy share in the table. ``batch_sizes``: the
    tuned gen update again at each of these per-device batch sizes (does a larger batch raise images/s?); x naive
    is always a ratio of images/s, so rows of other batch sizes compare with the naive one."""
    # rows share inductor's default cache (each row's run folder is a temporary one): later compiled rows reuse kernels
    base = load_config(config, list(overrides) + ["train.progress=false", "train.compile_cache=''"])
    device = _device(base)
    if ladder and "gen" not in updates:
        raise ValueError("bench train: the ladder times the gen update; add gen to --updates or use --no-ladder")
    if rounds < 1 or any(b < 1 for b in batch_sizes):
        raise ValueError(f"bench train: --rounds and --batch-sizes must be >= 1, got {rounds}, {list(batch_sizes)}")
    if batch_sizes and "gen" not in updates:
        raise ValueError("bench train: --batch-sizes times the gen update; add gen to --updates")
    unknown = sorted(set(rungs or ()) - set(rung_names()))
    if unknown:
        raise ValueError(f"bench train: unknown rung(s) {unknown}; the rungs: {', '.join(rung_names())}")
    rows_all = _rows_for(base, updates)
    gen_rows = [r for r in rows_all if r[0].startswith("gen")]
    results: dict[str, dict[str, dict]] = {}
    samples: dict[str, dict[str, list[dict]]] = {}
    naive_cfg, done = _with(base, NAIVE), {}
    variants = []
    if ladder:
        for label, step in LADDER:
            done.update(step)
            if step and ((rungs is not None and rung_name(step) not in rungs)
                         or (device.type != "cuda" and "train.compile_mode" in step)
                         or (device.type not in DEFERRED_CHECK_DEVICES and "train.sync_every" in step)):
                continue
            variants.append((label, _with(naive_cfg, done), rows_all if label.startswith("naive") else gen_rows))
    variants.append((TUNED, base, rows_all))
    for size in batch_sizes:
        variants.append((f"{TUNED}, batch {size}", _with(base, {"data.batch_size": size}), gen_rows[:1]))
    if ladder:
        variants.append((AGAIN, naive_cfg, gen_rows[:1]))
    errors: dict[str, str] = {}
    # this run replaces its name's results, and its operator tables too: an earlier run's left beside the new
    # tables (a --profile run, then one without) were read as this run's
    for stale in Path(out_dir).glob(f"{name}_profile_*.txt") if is_writer() else ():
        stale.unlink()
    flops = count_flops(base)
    peak = bf16_peak_flops() if device.type == "cuda" else None
    naive_label = naive_label_of(ladder)
    report: dict = {}
    schedule = [(r, v) for r in range(rounds) for v in variants]
    for i, (round_index, (label, cfg, rows)) in enumerate(schedule):
        print(f"bench train: {label}" + (f" (round {round_index + 1} of {rounds})" if rounds > 1 else "") + " ...",
              flush=True)
        try:
            stem = Path(out_dir) / f"{name}_profile_{i % len(variants) + 1}" if profile else None
            fresh = i > 0 and cfg.data.batch_size != schedule[i - 1][1][1].data.batch_size
            measured = bench_variant(cfg, rows, warmup=warmup, steps=steps, repeats=repeats, profile_to=stem,
                                     fresh_compile=fresh)
            for update, row in measured.items():
                samples.setdefault(label, {}).setdefault(update, []).append(row)
            results[label] = {update: _over_rounds(rs) for update, rs in samples[label].items()}
        except Exception as err:  # one broken variant (a compiler failure, say) must not lose the other rows
            traceback.print_exc()
            first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            errors[label] = f"{type(err).__name__}: {first_line}"
        if naive_label in results:  # the tables after every row: a run cut short (a time limit) keeps what it measured
            pending = [f"{v[0]} (round {r + 1})" if rounds > 1 else v[0] for r, v in schedule[i + 1:]]
            report = write_report(config, overrides, out_dir, name, base, device, results, errors, flops, peak,
                                  naive_label, ladder, pending, echo=not pending, warmup=warmup, steps=steps,
                                  repeats=repeats, rounds=rounds)
    if naive_label not in results:
        raise RuntimeError(f"bench train: the baseline failed: {errors}")
    return report


def add_options(parser: argparse.ArgumentParser) -> None:
    """bench train's own flags (bench all takes them too)."""
    parser.add_argument("--steps", type=int, default=10, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps (compile happens here)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    parser.add_argument("--no-ladder", action="store_true", help="only the tuned row (the config's settings)")
    parser.add_argument("--rungs", nargs="+", default=["all"], metavar="RUNG",
                        help=f"the ladder's rungs to time, by the config key each sets ({' '.join(rung_names())}; "
                             f"each keeps the pieces of the rungs before it); none: only the naive baseline and the "
                             f"tuned row")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each variant's gen steps (torch.profiler: operator tables in "
                             "<name>_profile_<n>.txt, the share of the step the GPU was busy in the table)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every variant this many times in turn and report the median round")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[], metavar="N",
                        help="also time the tuned gen update at each of these per-device batch sizes (e.g. 64 128: "
                             "does a larger batch raise images/s?)")
    parser.add_argument("--updates", nargs="+", choices=list(UPDATES), default=list(UPDATES),
                        help="the updates to time (gen includes its row without LPIPS)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "train")
    add_options(parser)
    parser.add_argument("--scaling-model", action="store_true", help="also write the predicted DDP efficiency")


def run_from_args(args: argparse.Namespace, config: str, overrides: list[str], name: str = "train") -> dict:
    """run() with add_options' flags."""
    unknown = sorted(set(args.rungs) - {"all", "none", *rung_names()})
    if unknown or (len(args.rungs) > 1 and {"all", "none"} & set(args.rungs)):  # (`none compile` ran compile)
        problem = (f"unknown rung(s) {' '.join(unknown)} (the rungs: {' '.join(rung_names())})" if unknown else
                   f"all or none stands alone, not with other rungs: {' '.join(args.rungs)}")
        (getattr(args, "usage_error", None) or _raise)(f"argument --rungs: {problem}")
    rungs = None if "all" in args.rungs else tuple(r for r in args.rungs if r != "none")
    return run(config, overrides, Path(args.results), warmup=args.warmup, steps=args.steps, repeats=args.repeats,
               ladder=not args.no_ladder, updates=tuple(args.updates), rounds=args.rounds, name=name, rungs=rungs,
               profile=args.profile, batch_sizes=tuple(args.batch_sizes))


def _raise(message: str):
    raise ValueError(message)


def main(args: argparse.Namespace) -> int:
    config, overrides = config_of(args)
    report = run_from_args(args, config, overrides, args.name)
    if args.scaling_model and TUNED in report["results"]:
        from dist_dejpeg.bench.scaling import scaling_model

        scaling_model(report, config, overrides, args.results)
    return 0
