"""``dist-dejpeg bench {train,data,infer,scaling,all}``: throughput as measured, reproducible numbers.

    dist-dejpeg bench all                          # every benchmark on this machine -> benchmarks/results/
    dist-dejpeg bench colour                       # colour fidelity vs training length (real trainings: long)
    dist-dejpeg bench quality                      # blind vs quality-conditioned, 3 seeds (real trainings: long)
    dist-dejpeg bench chroma                       # chroma-weighted loss vs RGB L1, 3 seeds (real trainings: long)
    dist-dejpeg bench train --config configs/div2k.yaml data.crop=256 model.pretrained=false loss.lpips_pretrained=false

Each benchmark writes ``<results>/<name>.json`` and ``.md`` naming the machine (CPU model and cores, GPU and
driver), torch version and settings; ratios come only from rows of one run. Timing, warm-up, device
synchronisation and the results files live in :mod:`dist_dejpeg.bench.common`, shared by all of them.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_RESULTS = "benchmarks/results"  # relative to where the command runs (the repository root)

# Without a GPU: the CPU debug recipe. With one: configs/div2k.yaml at 256 px crops (the throughput target's
# settings), random-init backbones so that no download is needed (speed does not depend on the weights).
CPU_CONFIG = ("configs/debug.yaml", [])
GPU_CONFIG = ("configs/div2k.yaml", ["data.crop=256", "model.pretrained=false", "loss.lpips_pretrained=false"])


def default_config() -> tuple[str, list[str]]:
    import torch

    return GPU_CONFIG if torch.cuda.is_available() else CPU_CONFIG


def scaling_model(train_report: dict, config: str, overrides: list[str], out_dir: str | Path,
                  name: str = "scaling_model") -> dict:
    """The predicted DDP efficiency at 8/64/256 GPUs from a ``bench train`` report's tuned step times."""
    from dist_dejpeg.bench import scaling
    from dist_dejpeg.bench.common import write_results
    from dist_dejpeg.bench.train import TUNED

    tuned = train_report["results"][TUNED]
    grads = scaling.gradient_bytes(config, overrides)
    steps = {"generator": tuned["gen"]["ms_per_call"] / 1000}
    if "critic" in tuned:
        steps["critic"] = tuned["critic"]["ms_per_call"] / 1000
    rows = scaling.model_table(steps, grads)
    report = {"from": train_report.get("machine"), "config": config, "overrides": overrides,
              "step_seconds": steps, "gradient_bytes": grads, "links": scaling.LINKS,
              "backward_share": scaling.BACKWARD_SHARE, "bucket_bytes": scaling.BUCKET_BYTES}
    note = (f"Step times: the tuned rows of `bench train` on {train_report.get('machine')} (`{config}` "
            f"{' '.join(overrides)}). Ring all-reduce of fp32 gradients, NVLink {scaling.LINKS['nvlink']['bw_gbs']:.0f} "
            f"GB/s within a node of {scaling.GPUS_PER_NODE}, InfiniBand {scaling.LINKS['infiniband']['bw_gbs']:.0f} "
            f"GB/s per GPU across nodes; cells: efficiency without / with overlap of communication and backward. "
            f"Formula in dist_dejpeg/bench/scaling.py and the README.")
    write_results(out_dir, name, report, "Predicted DDP efficiency (model, not measured)", note,
                  ["model", "step ms", "gradient MB", "8 GPUs", "64 GPUs", "256 GPUs"], rows)
    return report


def main(args) -> int:
    """Entry point of ``dist-dejpeg bench`` (arguments from dist_dejpeg.cli)."""
    out = Path(args.results)
    # the default config's own overrides first, the command line's after (a new list: the defaults stay as they are)
    config, defaults = (args.config, []) if args.config else default_config()
    overrides = [*defaults, *args.overrides]
    which = args.which
    reports = {}
    if which == "colour":  # quality, not throughput: not part of "all"
        from dist_dejpeg.bench import colour

        reports["colour"] = colour.run(args.config or CPU_CONFIG[0], args.overrides, out, norms=tuple(args.norms),
                                       gen_steps=tuple(args.gen_steps), qualities=tuple(args.qualities or (10, 20, 40)),
                                       work=args.work or "runs/bench-colour", name=args.name or "colour")
    if which == "quality":
        from dist_dejpeg.bench import quality

        reports["quality"] = quality.run(args.config or CPU_CONFIG[0], args.overrides, out, seeds=tuple(args.seeds),
                                         qualities=tuple(args.qualities or quality.QUALITIES),
                                         work=args.work or "runs/bench-quality", name=args.name or "quality")
    if which == "chroma":
        from dist_dejpeg.bench import chroma

        reports["chroma"] = chroma.run(args.config or CPU_CONFIG[0], args.overrides, out, weights=tuple(args.chroma_weights),
                                       seeds=tuple(args.seeds), qualities=tuple(args.qualities or chroma.QUALITIES),
                                       work=args.work or "runs/bench-quality", name=args.name or "chroma")
    if which in ("train", "all"):
        from dist_dejpeg.bench import train

        reports["train"] = train.run(config, overrides, out, warmup=args.warmup, steps=args.steps,
                                     repeats=args.repeats, ladder=not args.no_ladder,
                                     updates=tuple(args.updates), rounds=args.rounds, name=args.name or "train",
                                     rungs=None if "all" in args.rungs else tuple(r for r in args.rungs if r != "none"),
                                     profile=args.profile)
        if (which == "all" or args.scaling_model) and train.TUNED in reports["train"]["results"]:
            scaling_model(reports["train"], config, overrides, out)
    if which in ("data", "all"):
        from dist_dejpeg.bench import data

        reports["data"] = data.run(out, root=args.root, crop=args.crop, batches=args.batches, threads=args.threads or None,
                                   tiles=tuple(args.tiles), formats=tuple(args.formats), name=args.name or "data")
    if which in ("infer", "all"):
        from dist_dejpeg.bench import infer

        reports["infer"] = infer.run(config, overrides, out, repeats=args.repeats, name=args.name or "infer")
    if which in ("scaling", "all"):
        from dist_dejpeg.bench import scaling

        cpu_config, cpu_overrides = (config, overrides) if args.config else CPU_CONFIG
        reports["scaling"] = scaling.run(cpu_config, cpu_overrides, out, steps=args.steps, name=args.name or "scaling")
    return 0


def add_parser(sub) -> None:
    """The ``bench`` sub-command's arguments (called by dist_dejpeg.cli.build_parser)."""
    b = sub.add_parser("bench", help="throughput benchmarks (results in benchmarks/results/)")
    b.add_argument("which", choices=["train", "data", "infer", "scaling", "all", "colour", "quality", "chroma"],
                   help="all: the four throughput benchmarks; colour: colour fidelity vs training length; "
                        "quality: blind vs quality-conditioned over seeds; chroma: chroma-weighted loss vs RGB L1 "
                        "(colour, quality and chroma train real models)")
    b.add_argument("--config", help="training config (default: configs/debug.yaml on CPU; configs/div2k.yaml at "
                                    "256 px with random-init backbones on a GPU)")
    b.add_argument("--results", default=DEFAULT_RESULTS, help="folder for the .json/.md results")
    b.add_argument("--name", default="", help="results file name (default: the benchmark's)")
    b.add_argument("--steps", type=int, default=10, help="train/scaling: timed steps per block")
    b.add_argument("--warmup", type=int, default=5, help="train: warm-up steps (compile happens here)")
    b.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    b.add_argument("--no-ladder", action="store_true", help="train: only the tuned row (the config's settings)")
    b.add_argument("--rungs", nargs="+", default=["all"], metavar="RUNG",
                   help="train: the ladder's rungs to time, by the config key each sets (channels_last "
                        "mixed_precision fused_adamw sync_every compile compile_mode; each keeps the pieces of the "
                        "rungs before it); none: only the naive baseline and the tuned row; default all")
    b.add_argument("--profile", action="store_true",
                   help="train: also profile each variant's gen steps (torch.profiler: operator tables in "
                        "<name>_profile_<n>.txt, the share of the step the GPU was busy in the table)")
    b.add_argument("--rounds", type=int, default=1,
                   help="train: measure every variant this many times in turn and report the median round")
    b.add_argument("--updates", nargs="+", choices=["gen", "critic", "gan"], default=["gen", "critic", "gan"],
                   help="train: the updates to time (gen includes its row without LPIPS)")
    b.add_argument("--scaling-model", action="store_true", help="train: also write the predicted DDP efficiency")
    b.add_argument("--root", help="data: prepared shards instead of the sample photos")
    b.add_argument("--batches", type=int, default=20, help="data: timed batches per loader")
    b.add_argument("--threads", type=int, default=0, help="data: threads/workers per loader (0: all cores)")
    b.add_argument("--tiles", type=int, nargs="+", default=[288, 480], help="data: tile sizes of the sample shards")
    b.add_argument("--crop", type=int, default=256, help="data: crop size (at most the smallest tile)")
    b.add_argument("--formats", nargs="+", default=["png", "raw", "jp2"], help="data: shard formats")
    b.add_argument("--norms", nargs="+", default=["batch", "group", "none"], help="colour: decoder norms")
    b.add_argument("--gen-steps", type=int, nargs="+", default=[1000, 5000], help="colour: gen steps per run")
    b.add_argument("--qualities", type=int, nargs="+", help="colour/quality: JPEG qualities (10 20 40 / 10 ... 90)")
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="quality/chroma: training seeds")
    b.add_argument("--chroma-weights", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                   help="chroma: loss.chroma_weight values (1: L1 on RGB, the recipe's)")
    b.add_argument("--work", default="", help="colour/quality/chroma: folder for the runs (runs/bench-<name>; chroma: "
                                                    "runs/bench-quality, whose conditioned runs it reuses)")
    b.add_argument("overrides", nargs="*", help="config overrides, key=value (before options that take "
                                                "several values, such as --norms)")
    b.set_defaults(func=main)
