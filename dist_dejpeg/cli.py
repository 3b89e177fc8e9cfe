"""The ``dist-dejpeg`` command.

    dist-dejpeg prepare samples --out data/samples
    dist-dejpeg prepare folder --src ~/photos --out data/photos
    dist-dejpeg prepare div2k --root data/div2k_src --out data/div2k --download
    dist-dejpeg train --config configs/debug.yaml [--resume [CKPT]] [--dry-run] [key=value ...]
    dist-dejpeg bench {train,data,data-wait,infer,scaling,all,gpu-check} [--config C] [key=value ...]
    dist-dejpeg restore IN... -o OUT_DIR --model runs/debug [--tile 512 --overlap 64 --device auto]
    dist-dejpeg evaluate --model runs/debug --images photos/ --quality 10 20 30 40 -o eval/ [--y-only]
    dist-dejpeg report --model runs/debug --images photos/ -o report.html
    dist-dejpeg export --model runs/debug --onnx model.onnx
    dist-dejpeg status runs/debug [--json]

train exits 0 when done, 2 on a config, weights or busy-run-folder error, 3 when a non-finite loss stopped
it (checkpoint kept), 75 when SIGUSR1/SIGTERM stopped it (checkpoint kept; rerun to continue).
    accelerate launch -m dist_dejpeg.cli train --config configs/div2k.yaml

Thin: parses arguments and calls the modules that do the work.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dist_dejpeg.jpeg.formats import OUTPUT_FORMATS, TILE_FORMATS

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal with a checkpoint; the same command continues the run


def _prepare(args: argparse.Namespace) -> int:
    from dist_dejpeg.data.shards import prepare_folder, prepare_samples

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
                                      val_fraction=args.val_fraction, seed=args.seed, fmt=args.format)
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
    from dist_dejpeg.run.lock import RunDirBusy
    from dist_dejpeg.train.trainer import Preempted, TrainingStopped, train
    from dist_dejpeg.models.weights import WeightsError

    try:
        results = train(cfg, resume=args.resume)
    except (ConfigError, WeightsError, FileNotFoundError, RunDirBusy) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as err:
        print(f"stopped: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one closing line per run, not one per rank
        return 0
    lowest = min(results, key=lambda k: int(k[1:]))
    r = results[lowest]
    print(f"done: {lowest} PSNR {r['jpeg']['psnr']:.3f} (JPEG) -> {r['restored']['psnr']:.3f} dB (restored); "
          f"metrics in {cfg.train.run_dir}/metrics.json")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from dist_dejpeg.models.generator_file import ModelFileError
    from dist_dejpeg.restore.files import check_output_dir, restore_files
    from dist_dejpeg.restore.images import InputImageError
    from dist_dejpeg.restore.restorer import Restorer

    try:
        check_output_dir(args.out)
        restorer = Restorer(args.model, device=args.device, tile=args.tile, overlap=args.overlap,
                            batch_size=args.batch_size, precision=args.precision, guard=not args.no_guard)
        if args.quality is not None and not 1 <= args.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {args.quality}")
    except (ModelFileError, InputImageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = restore_files(restorer, args.inputs, args.out, fmt=args.format, max_pixels=args.max_pixels,
                            skip_existing=args.skip_existing, progress=not args.quiet, quality=args.quality)
    failed = [r for r in results if r.error]
    done = [r for r in results if r.output]
    seconds, megapixels = sum(r.seconds for r in done), sum(r.megapixels for r in done)
    rate = f", {1000 * seconds / megapixels:.0f} ms per megapixel" if megapixels else ""
    print(f"restored {len(done)} image(s) into {args.out} on {restorer.device}{rate}; {len(failed)} failed")
    for r in done:
        if r.passthrough or r.quality is None or args.verbose:
            q = f"q{r.quality} ({r.quality_from})" if r.quality is not None else r.quality_from
            print(f"{'passed through' if r.passthrough else 'restored'}: {r.source}: {q}; {r.note}")
    for r in failed:
        print(f"failed: {r.source}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def _evaluation(args: argparse.Namespace, keep_images: bool) -> dict | int:
    """evaluate()'s result, or an exit status after printing the error."""
    from dist_dejpeg.evaluation.evaluate import EvaluateError, evaluate
    from dist_dejpeg.models.generator_file import ModelFileError
    from dist_dejpeg.restore.restorer import Restorer

    try:
        restorer = Restorer(args.model, device=args.device, tile=args.tile, overlap=args.overlap,
                            batch_size=args.batch_size, guard=not args.no_guard)
        return evaluate(restorer, args.images, args.quality, None if keep_images else args.out, y_only=args.y_only,
                        blind=args.blind,
                        crop_border=args.crop_border, lpips_weights=args.lpips_weights,
                        allow_lossy_reference=args.allow_lossy_reference, max_images=args.max_images,
                        keep_images=keep_images, progress=not args.quiet)
    except (ModelFileError, EvaluateError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace) -> int:
    result = _evaluation(args, keep_images=False)
    if isinstance(result, int):
        return result
    for q, means in result["per_quality"].items():
        j, r = means["jpeg"], means["restored"]
        print(f"q{q}: PSNR {j['psnr']:.3f} -> {r['psnr']:.3f} dB, SSIM {j['ssim']:.4f} -> {r['ssim']:.4f} "
              f"({means['images']} images, {result['meta']['channel']})")
    for name, why in result["meta"]["unavailable"].items():
        print(f"{name} unavailable: {why.splitlines()[0]}", file=sys.stderr)
    print(f"wrote metrics.json, metrics.csv and metrics.md to {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from dist_dejpeg.evaluation.evaluate import write_tables
    from dist_dejpeg.evaluation.report import write_report

    result = _evaluation(args, keep_images=True)
    if isinstance(result, int):
        return result
    meta, model = result["meta"], result["meta"]["model"]
    shown = {"model": model.get("source"), "encoder": model.get("encoder"), "encoder_init": model.get("encoder_init"),
             "training steps": model.get("global_step"), "backbones": meta["backbones"],
             "compression": meta["compression"], "metrics on": meta["channel"], "border crop": meta["crop_border"],
             "restored on": f"{meta['device']} (tile {meta['tile']}, overlap {meta['overlap']})",
             "unavailable": meta["unavailable"], "date": meta["date"]}
    path = write_report(result.pop("records"), args.out, title=f"dist_dejpeg: {Path(str(model.get('source'))).name}",
                        meta=shown, crop=args.crop)
    write_tables(result, Path(args.out).with_suffix(""))
    print(f"wrote {path} and its tables in {Path(args.out).with_suffix('')}/")
    return 0


def _add_restorer_args(p: argparse.ArgumentParser) -> None:
    """The model and how it runs: shared by restore, evaluate and report."""
    p.add_argument("--model", required=True, help="generator.safetensors, a run folder or a checkpoint folder")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--tile", type=int, default=512, help="tile size in pixels, a multiple of 32 (0: whole images)")
    p.add_argument("--overlap", type=int, default=64, help="overlap between tiles, blended linearly")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    p.add_argument("--no-guard", action="store_true", help="restore every image, even where the model's "
                                                           "validation predicts no gain at its quality")


def _add_evaluation_args(p: argparse.ArgumentParser, default_qualities: list[int]) -> None:
    _add_restorer_args(p)
    p.add_argument("--images", required=True, nargs="+",
                   help="lossless reference photos: files, folders (recursive) or WebDataset shards (.tar)")
    p.add_argument("--quality", type=int, nargs="+", default=default_qualities, help="JPEG qualities (libjpeg, 4:2:0)")
    p.add_argument("--y-only", action="store_true", help="full-reference metrics on BT.601 Y (as published tables)")
    p.add_argument("--crop-border", type=int, default=0, help="pixels cut from each border before measuring")
    p.add_argument("--lpips-weights", default="", help="torchvision's AlexNet file (alexnet-owt-7be5be79.pth) for "
                                                       "LPIPS when it is not in the torch hub cache")
    p.add_argument("--allow-lossy-reference", action="store_true", help="accept JPEG/WebP references")
    p.add_argument("--max-images", type=int, default=0, help="use at most this many reference images (0: all)")
    p.add_argument("--blind", action="store_true", help="do not tell the model the quality (as for a PNG input)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _export(args: argparse.Namespace) -> int:
    from dist_dejpeg.models.generator_file import ModelFileError
    from dist_dejpeg.models.onnx_export import OnnxCheckError, OnnxUnavailable, export_model

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

    try:
        status = run_status(args.run_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not status["run_folder"]:
        print(f"error: {args.run_dir} is not a run folder (no {CONFIG}, {CHECKPOINTS}/, {PROGRESS}, {METRICS} or "
              f"{LOCK}); give the folder a run's train.run_dir points at", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=["samples", "folder", "div2k"],
                   help="samples: photographs bundled with scikit-image; folder: your own images (--src); "
                        "div2k: the DIV2K HR archives (--root, --download)")
    p.add_argument("--root", help="div2k: folder with DIV2K_{train,valid}_HR.zip or their extracted folders")
    p.add_argument("--download", action="store_true", help="div2k: fetch missing archives (resumable, verified)")
    p.add_argument("--workers", type=int, default=0, help="div2k: tiling processes (0: one per core, max 16)")
    p.add_argument("--keep-staging", action="store_true", help="div2k: keep the per-image tile tars")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--src", help="folder: the images (searched recursively; lossless formats preferred)")
    p.add_argument("--tile", type=int, default=0, help="tile size in pixels (samples 128, folder 256, div2k 480)")
    p.add_argument("--step", type=int, default=0, help="stride between training tiles (tile/2)")
    p.add_argument("--shard-size", type=int, default=0, help="samples per shard (samples 64, folder 256)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="folder: share of images held out for validation")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--format", choices=TILE_FORMATS, default="raw",
                   help="lossless tile format: png, raw (uncompressed, no decode), jp2 (GPU-decodable in DALI)")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see configs/); schema defaults otherwise")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint of train.run_dir (what train.auto_resume does by "
                        "default), or from the given folder")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="log level of rank 0 (train.log_level; other ranks log warnings and errors)")
    p.add_argument("--get", metavar="KEY", help="print one resolved config value (e.g. train.run_dir) and exit")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. data.batch_size=8)")


def _restore_arguments(p: argparse.ArgumentParser) -> None:
    from dist_dejpeg.restore.images import DEFAULT_MAX_PIXELS  # numpy and PIL, no torch

    p.add_argument("inputs", nargs="+", help="image files, folders or globs (quote globs: 'photos/**/*.jpg')")
    p.add_argument("-o", "--out", required=True, help="output folder (same relative names, lossless)")
    _add_restorer_args(p)
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="png", help="lossless output format")
    p.add_argument("--quality", type=int, default=None,
                   help="the inputs' JPEG quality (default: read from each JPEG's quantization tables)")
    p.add_argument("--verbose", action="store_true", help="one line per image: its quality and the decision")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger images (decompression bombs); default {DEFAULT_MAX_PIXELS / 1e6:.0f} MP")
    p.add_argument("--skip-existing", action="store_true", help="leave outputs that already exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    _add_evaluation_args(p, [10, 20, 30, 40])
    p.add_argument("-o", "--out", required=True, help="folder for metrics.json, metrics.csv, metrics.md")


def _report_arguments(p: argparse.ArgumentParser) -> None:
    _add_evaluation_args(p, [10, 40])
    p.add_argument("-o", "--out", required=True, help="the HTML file to write (tables go beside it)")
    p.add_argument("--crop", type=int, default=192, help="crop size in pixels")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="generator.safetensors, a run folder or a checkpoint folder")
    p.add_argument("--onnx", required=True, metavar="OUT", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (the exporter's default otherwise)")
    p.add_argument("--check-image", metavar="PATH", default=None,
                   help="photo for the onnxruntime-vs-PyTorch check (default: scikit-image's astronaut)")


def _status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run folder (train.run_dir)")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")


# The subcommands, in the order --help lists them: name -> (help, add its arguments, run it). `bench` brings
# its own parser, one sub-parser per benchmark (dist_dejpeg.bench).
COMMANDS = {
    "prepare": ("write WebDataset shards of lossless tiles", _prepare_arguments, _prepare),
    "train": ("run the NoGAN phases (resumable)", _train_arguments, _train),
    "restore": ("restore images (files, folders searched recursively, globs) with a trained generator",
                _restore_arguments, _restore),
    "evaluate": ("JPEG-compress lossless photos, restore them, and measure both with PSNR, PSNR-B, SSIM, LPIPS, "
                 "BRISQUE and NIQE", _evaluate_arguments, _evaluate),
    "report": ("a self-contained HTML page: clean | JPEG | restored crops with the metrics", _report_arguments,
               _report),
    "export": ("export the generator to ONNX (dynamic batch/height/width), checked in onnxruntime",
               _export_arguments, _export),
    "status": ("where a run stands, read from its folder (safe on a live run)", _status_arguments, _status),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-dejpeg", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=text)
        add_arguments(p)
        p.set_defaults(func=run)
    from dist_dejpeg.bench import add_parser as add_bench

    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `bench WHICH --options key=value`: argparse has already closed the positionals when overrides follow
    # the options, so they come back as extras here
    if extra and getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
