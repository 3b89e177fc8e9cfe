"""The ``dist-dejpeg`` command.

    dist-dejpeg prepare samples --out data/samples
    dist-dejpeg prepare folder --src ~/photos --out data/photos
    dist-dejpeg prepare div2k --root data/div2k_src --out data/div2k --download
    dist-dejpeg train --config configs/debug.yaml [--resume [CKPT]] [--dry-run] [key=value ...]
    dist-dejpeg bench {train,data,data-wait,infer,scaling,quality,all,gpu-check} [--config C] [key=value ...]
    dist-dejpeg restore IN... -o OUT_DIR --model runs/debug [--format png|jpg|webp|tiff|same] [--suffix S]
    dist-dejpeg restore -i photos/ -o out/ --model runs/debug --ext jpg --tile 512 --tile-pad 32 --fp32
    dist-dejpeg evaluate --model runs/debug --images photos/ --qualities 10 20 30 40 -o eval/ [--y-only]
    dist-dejpeg report --model runs/debug --images photos/ -o report.html
    dist-dejpeg export --model runs/debug --onnx model.onnx
    dist-dejpeg status runs/debug [--json]

train exits 0 when done; 2 on a config, weights, busy-run-folder, damaged-checkpoint or too-many-bad-samples error; 3 when a non-finite
loss or a full disk stopped it (the last good checkpoint is kept: fix the cause and rerun); 75 when
SIGUSR1/SIGTERM stopped it (checkpoint kept; rerun to continue).
    accelerate launch -m dist_dejpeg.cli train --config configs/div2k.yaml

Thin: parses arguments and calls the modules that do the work.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dist_dejpeg import version
from dist_dejpeg.cli_args import (HelpFormatter, evaluate_arguments, export_arguments, prepare_arguments,
                                  report_arguments, restore_arguments, status_arguments, train_arguments)

DESCRIPTION = ("Train a JPEG-artifact remover (NoGAN, on one or many GPUs) and restore photos with it. "
               "dist-dejpeg COMMAND --help shows a command's options and their defaults.")
# Libraries that log every step at INFO (the ONNX exporter: hundreds of lines); their warnings still show.
CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo", "torch._export")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal with a checkpoint; the same command continues the run


def _prepare(args: argparse.Namespace) -> int:
    from dist_dejpeg.data.shards import prepare_folder, prepare_samples

    if args.source:  # `prepare folder photos/`, `prepare div2k data/div2k`: the option's folder, positional
        key = {"folder": "src", "div2k": "root"}.get(args.dataset)
        if key is None or getattr(args, key) not in (None, args.source):
            print(f"error: prepare {args.dataset} takes " + (f"one folder: {args.source} or --{key} "
                  f"{getattr(args, key)}" if key else f"no folder (got {args.source})"), file=sys.stderr)
            return 2
        setattr(args, key, args.source)
    tile = args.tile or {"samples": 128, "folder": 256, "div2k": 480}[args.dataset]
    step = args.step or tile // 2
    shard_size = args.shard_size or (64 if args.dataset == "samples" else 256)
    if args.dataset == "div2k":
        from dist_dejpeg.data.div2k import prepare_div2k
        from dist_dejpeg.data.download import DownloadError

        if not args.root:
            print("error: prepare div2k needs --root <folder with the DIV2K zips or folders>", file=sys.stderr)
            return 2
        try:
            manifest = prepare_div2k(args.root, args.out, download_missing=args.download, tile=tile, step=step,
                                     shard_size=shard_size, workers=args.workers, seed=args.seed,
                                     keep_staging=args.keep_staging, fmt=args.format)
        except (FileNotFoundError, DownloadError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    elif args.dataset == "samples":
        manifest = prepare_samples(args.out, tile=tile, train_step=step, shard_size=shard_size, seed=args.seed,
                                   fmt=args.format)
    else:
        if not args.src:
            print("error: prepare folder needs --src <folder of images>", file=sys.stderr)
            return 2
        try:
            manifest = prepare_folder(args.src, args.out, tile=tile, train_step=step, shard_size=shard_size,
                                      val_fraction=args.val_fraction, seed=args.seed, fmt=args.format,
                                      jpeg=args.jpeg_sources)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    splits = manifest["splits"]
    print(f"wrote {splits['train']['samples']} train and {splits['val']['samples']} val tiles "
          f"({len(splits['train']['shards'])} + {len(splits['val']['shards'])} shards) to {args.out}")
    for item in manifest["rejected"]:
        print(f"rejected {item['source']}: {item['reason']}", file=sys.stderr)
    if splits["val"]["samples"] == 0:
        usable = len(manifest.get("sources", {}))
        print(f"warning: no validation tiles were written ({usable} usable photo(s) of at least {tile} px, all "
              f"used for training): training needs val-*.tar shards. Add another photo of at least {tile} x {tile} "
              f"px (one is held out whenever there are two), lower --tile, or point data.val_glob at other "
              f"shards.", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    from dist_dejpeg.config import ConfigError, load_config, to_yaml

    overrides = list(args.overrides) + ([f"train.log_level={args.log_level}"] if args.log_level else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.get:
        from omegaconf import OmegaConf

        value = OmegaConf.select(OmegaConf.structured(cfg), args.get, default=None)
        if value is None:
            print(f"error: no config key '{args.get}'", file=sys.stderr)
            return 2
        print(OmegaConf.to_yaml(value).strip() if OmegaConf.is_config(value) else value)
        return 0
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from dist_dejpeg.train.launch import already_launched, launch, ranks_here

    ranks = ranks_here(cfg.train.processes, cfg.train.cpu)
    if ranks > 1 and not already_launched():  # the same command again, as `ranks` processes
        argv = ["train", *(["--config", args.config] if args.config else []),
                *(["--resume", args.resume] if args.resume else []),
                *(["--log-level", args.log_level] if args.log_level else []), *args.overrides]
        return launch(ranks, argv, EXIT_PREEMPTED)
    from dist_dejpeg.data.verify import TooManyBadSamples
    from dist_dejpeg.models.weights import WeightsError
    from dist_dejpeg.run.lock import RunDirBusy
    from dist_dejpeg.train.trainer import Preempted, TrainingStopped, train

    try:
        results = train(cfg, resume=args.resume)
    except (ConfigError, WeightsError, FileNotFoundError, RunDirBusy, TooManyBadSamples) as err:
        return _stopped(f"error: {err}", 2)
    except Preempted as err:
        return _stopped(f"stopped: {err}", EXIT_PREEMPTED)
    except TrainingStopped as err:
        return _stopped(f"error: {err}", 3)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one closing line per run, not one per rank
        return 0
    lowest = min(results, key=lambda k: int(k[1:]))
    r = results[lowest]
    print(f"done: {lowest} PSNR {r['jpeg']['psnr']:.3f} (JPEG) -> {r['restored']['psnr']:.3f} dB (restored); "
          f"metrics in {cfg.train.run_dir}/metrics.json")
    return 0


def _stopped(message: str, code: int) -> int:
    from dist_dejpeg.train.launch import leave_process_group

    print(message, file=sys.stderr)
    leave_process_group()
    return code


def _restore(args: argparse.Namespace) -> int:
    # torch-free down to the model: an ONNX model restores without importing torch (restore/onnx_backend.py)
    from dist_dejpeg.models.names import ModelFileError, OnnxUnavailable
    from dist_dejpeg.restore import open_restorer
    from dist_dejpeg.restore.files import (check_output_dir, check_output_file, collect_inputs, names_a_file,
                                           restore_files)
    from dist_dejpeg.restore.images import InputImageError

    inputs = [*args.inputs, *args.more_inputs]
    if not inputs:
        args.usage_error("give the images to restore: files, folders or globs (as arguments or with -i)")
    fmt = "same" if args.format == "auto" else args.format
    if args.output_quality is not None and fmt not in ("jpg", "webp", "same"):
        args.usage_error(f"--output-quality is for jpg and webp outputs; --format {fmt} is lossless")
    overlap = args.overlap
    if hasattr(args, "tile_pad"):  # Real-ESRGAN's padding on each side: the two tiles around a seam share 2P
        if "--overlap" in args.given and overlap != 2 * args.tile_pad:
            args.usage_error(f"--tile-pad {args.tile_pad} means --overlap {2 * args.tile_pad}, and --overlap "
                             f"{overlap} was given too: give one of them")
        overlap = 2 * args.tile_pad
    if names_a_file(args.out):
        if (n := sum(map(len, collect_inputs(inputs)))) != 1:
            args.usage_error(f"-o {args.out} names one image file, and {n} images were given: give an output folder")
        if given := sorted(args.given & {"--format", "--ext", "--suffix"}):
            args.usage_error(f"-o {args.out} names the output file, whose suffix is its format: {given[0]} is for an "
                             f"output folder")
    try:
        check_output_file(args.out) if names_a_file(args.out) else check_output_dir(args.out)
        restorer = open_restorer(args.model, device=args.device, tile=args.tile, overlap=overlap,
                                 batch_size=args.batch_size, precision=args.precision, guard=not args.no_guard)
    except (ModelFileError, InputImageError, OnnxUnavailable, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = restore_files(restorer, inputs, args.out, fmt=fmt, max_pixels=args.max_pixels,
                            skip_existing=args.skip_existing, progress=not args.quiet, quality=args.input_quality,
                            suffix=args.suffix, output_quality=args.output_quality)
    print_restore_summary(results, args, restorer.device)
    return 1 if any(r.error for r in results) else 0


def print_restore_summary(results: list, args: argparse.Namespace, device) -> None:
    """One line of counts (restored, passed through, skipped, failed); per image (not under --quiet; all with
    --verbose): what was passed through or restored without a known quality, what was skipped; every failure."""
    failed = [r for r in results if r.error]
    skipped = [r for r in results if r.skipped]
    written = [r for r in results if r.output and not r.skipped]
    restored = [r for r in written if not r.passthrough]
    seconds, megapixels = sum(r.seconds for r in restored), sum(r.megapixels for r in restored)
    rate = f", {1000 * seconds / megapixels:.0f} ms per megapixel" if megapixels else ""
    passed = len(written) - len(restored)
    print(f"restored {len(restored)} image(s) into {args.out} on {device}{rate}; "
          + (f"passed {passed} through unchanged; " if passed else "")
          + (f"skipped {len(skipped)} existing; " if skipped else "") + f"{len(failed)} failed")
    if args.quiet and not args.verbose:
        written, skipped = [], []
    for r in written:
        if args.verbose or r.passthrough or r.quality is None:
            q = f"q{r.quality} ({r.quality_from})" if r.quality is not None else r.quality_from
            print(f"{'passed through' if r.passthrough else 'restored'}: {r.source}: {q}; {r.note}")
    for r in skipped if args.verbose else []:
        print(f"skipped: {r.source}: {r.output} exists")
    for r in failed:
        print(f"failed: {r.source}: {r.error}", file=sys.stderr)


def _evaluation(args: argparse.Namespace, keep_images: bool) -> dict | int:
    """evaluate()'s result, or an exit status after printing the error."""
    from dist_dejpeg.evaluation.evaluate import EvaluateError, evaluate
    from dist_dejpeg.evaluation.report import check_report_output
    from dist_dejpeg.models.names import ModelFileError, OnnxUnavailable
    from dist_dejpeg.restore import open_restorer
    from dist_dejpeg.restore.files import check_output_dir
    from dist_dejpeg.run.files import new_folders, remove_empty

    out, result = Path(args.out), 2
    made = new_folders(out.parent, out.with_suffix("")) if keep_images else new_folders(out)
    try:  # the outputs first: one that cannot be written fails before any computation
        check_report_output(args.out) if keep_images else check_output_dir(args.out)
        restorer = open_restorer(args.model, device=args.device, tile=args.tile, overlap=args.overlap,
                                 batch_size=args.batch_size, guard=not args.no_guard)
        result = evaluate(restorer, args.images, args.qualities, None if keep_images else args.out,
                          y_only=args.y_only, blind=args.blind, subsampling=args.subsampling,
                          crop_border=args.crop_border, lpips_weights=args.lpips_weights,
                          allow_lossy_reference=args.allow_lossy_reference, max_images=args.max_images,
                          keep_images=keep_images, progress=not args.quiet)
    except (ModelFileError, EvaluateError, OnnxUnavailable, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
    finally:
        if isinstance(result, int):  # failed (or stopped): no empty folder of its making is left behind
            remove_empty(made)
    for why in result["meta"]["skipped"] if isinstance(result, dict) else []:
        print(f"skipped: {why}", file=sys.stderr)
    return result


def _evaluate(args: argparse.Namespace) -> int:
    result = _evaluation(args, keep_images=False)
    if isinstance(result, int):
        return result
    for q, means in result["per_quality"].items():
        j, r = means["jpeg"], means["restored"]
        print(f"q{q}: PSNR {j['psnr']:.3f} -> {r['psnr']:.3f} dB, SSIM {j['ssim']:.4f} -> {r['ssim']:.4f} "
              f"({means['images']} image{'s' if means['images'] != 1 else ''}, {result['meta']['channel']})")
    for name, why in result["meta"]["unavailable"].items():
        print(f"{name} unavailable: {why.splitlines()[0]}", file=sys.stderr)
    print(f"wrote metrics.json, metrics.csv and metrics.md to {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from dist_dejpeg.evaluation.evaluate import write_tables
    from dist_dejpeg.evaluation.report import check_report_output, write_report

    result = _evaluation(args, keep_images=True)
    if isinstance(result, int):
        return result
    meta, model = result["meta"], result["meta"]["model"]
    shown = {"model": model.get("source"), "encoder": model.get("encoder"), "encoder_init": model.get("encoder_init"),
             "training steps": model.get("global_step"), "backbones": meta["backbones"],
             "compression": meta["compression"], "metrics on": meta["channel"], "border crop": meta["crop_border"],
             "restored on": f"{meta['device']} (tile {meta['tile']}, overlap {meta['overlap']})",
             "do-no-harm guard": "on" if meta["guard"] else "off",
             "unavailable": meta["unavailable"], "date": meta["date"]}
    path = write_report(result.pop("records"), args.out, title=f"dist_dejpeg: {Path(str(model.get('source'))).name}",
                        meta=shown, crop=args.crop)
    write_tables(result, tables := check_report_output(args.out))
    print(f"wrote {path} and its tables in {tables}/")
    return 0


def _export(args: argparse.Namespace) -> int:
    from dist_dejpeg.models.generator_file import ModelFileError
    from dist_dejpeg.models.onnx_export import OnnxCheckError, OnnxUnavailable, export_model, export_target_problem

    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    problem = export_target_problem(args.model, args.onnx, args.opset)  # (before a minute of exporting)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        result, info = export_model(args.model, args.onnx, opset=args.opset, check_image=args.check_image)
    except (ModelFileError, OnnxUnavailable, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OnnxCheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {result['path']} ({result['bytes'] / 1e6:.1f} MB, opset {result['opset']}, encoder "
          f"{info['encoder']}, export {result['export_s']} s); max abs difference from PyTorch: "
          + ", ".join(f"{k} {v:.3g}" for k, v in result["max_abs_diff"].items()))
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from dist_dejpeg.run.layout import CHECKPOINTS, CONFIG, LOCK, METRICS, PROGRESS
    from dist_dejpeg.run.status import run_status
    from dist_dejpeg.run.text import format_status

    def fail(message: str) -> int:  # --json: scripts get a JSON object on errors too
        print(json.dumps({"error": message}) if args.json else f"error: {message}",
              file=sys.stdout if args.json else sys.stderr)
        return 2

    try:
        status = run_status(args.run_dir)
    except FileNotFoundError as err:
        return fail(str(err))
    if not status["run_folder"]:
        return fail(f"{args.run_dir} is not a run folder (no {CONFIG}, {CHECKPOINTS}/, {PROGRESS}, {METRICS} or "
                    f"{LOCK}); give the folder a run's train.run_dir points at")
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


# The subcommands, in the order --help lists them: name -> (help, add its arguments, run it). `bench` brings
# its own parser, one sub-parser per benchmark (dist_dejpeg.bench).
COMMANDS = {
    "prepare": ("write WebDataset shards of lossless tiles", prepare_arguments, _prepare),
    "train": ("run the NoGAN phases (resumable)", train_arguments, _train),
    "restore": ("restore images (files, folders searched recursively, globs) with a trained generator",
                restore_arguments, _restore),
    "evaluate": ("JPEG-compress lossless photos, restore them, and measure both with PSNR, PSNR-B, SSIM, LPIPS, "
                 "BRISQUE and NIQE", evaluate_arguments, _evaluate),
    "report": ("a self-contained HTML page: clean | JPEG | restored crops with the metrics", report_arguments,
               _report),
    "export": ("export the generator to ONNX (dynamic batch/height/width), checked in onnxruntime",
               export_arguments, _export),
    "status": ("where a run stands, read from its folder (safe on a live run)", status_arguments, _status),
}


def build_parser() -> argparse.ArgumentParser:
    examples = __doc__.split("\n\n")[1]  # the command lines above
    parser = argparse.ArgumentParser(prog="dist-dejpeg", description=DESCRIPTION, epilog=f"examples:\n{examples}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        add_arguments(p)
        p.set_defaults(func=run)
    from dist_dejpeg.bench import add_parser as add_bench

    add_bench(sub)
    parser.commands = sub.choices  # name -> its parser (command_parser)
    return parser


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``args`` ran: an error in its arguments comes with its usage."""
    found = parser.commands.get(getattr(args, "command", None), parser)
    benchmarks = getattr(found, "benchmarks", None)  # bench: one parser per benchmark
    return benchmarks.get(getattr(args, "which", None), found) if benchmarks else found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    command = command_parser(parser, args)
    # `bench WHICH --options key=value`: argparse has already closed the positionals when overrides follow
    # the options, so they come back as extras here
    if extra and getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    args.usage_error, args.given = command.error, {a.split("=")[0] for a in argv if a.startswith("--")}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
