"""The commands that use what training made: ``restore``, ``evaluate``, ``report``, ``export``, ``status``
(cli.py parses the arguments and calls these). Each prints one ``error: ...`` line and returns 2 for bad input
or setup, 1 for a failure of the work itself; it never prints a traceback for those."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dist_dejpeg.cli_output import write_failed

# libraries that log every graph pass at INFO while exporting
CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo", "torch._export")


def restore_command(args: argparse.Namespace) -> int:
    # torch-free down to the model: an ONNX model restores without importing torch (restore/onnx_backend.py)
    from dist_dejpeg.jpeg.formats import LOSSY_SUFFIXES
    from dist_dejpeg.restore.files import names_a_file, unknown_suffix
    from dist_dejpeg.restore.inputs import collect_inputs
    from dist_dejpeg.run.files import new_folders, remove_empty

    inputs = [*args.inputs, *args.more_inputs]
    if not inputs:
        args.usage_error("give the images to restore: files, folders or globs (as arguments or with -i)")
    fmt = "same" if args.format == "auto" else args.format
    one_file = names_a_file(args.out)  # photo.jpg: the output file, in its suffix's format
    if args.out == "-":  # (a folder named "-" was made)
        args.usage_error("-o -: restore writes image files, not to standard output; name an output folder or file")
    if any(sep in args.suffix for sep in ("/", "\\", "\0")):
        args.usage_error(f"--suffix {args.suffix!r} is added to file names: it cannot hold a / (name the output "
                         f"folder with -o)")
    if args.output_quality is not None and (Path(args.out).suffix.lower() not in LOSSY_SUFFIXES if one_file
                                            else fmt not in ("jpg", "webp", "same")):
        args.usage_error("--output-quality is for jpg and webp outputs; "
                         + (f"{args.out} is lossless" if one_file else f"--format {fmt} is lossless"))
    overlap = args.overlap
    if hasattr(args, "tile_pad"):  # Real-ESRGAN's padding on each side: the two tiles around a seam share 2P
        if "--overlap" in args.given and overlap != 2 * args.tile_pad:
            args.usage_error(f"--tile-pad {args.tile_pad} means --overlap {2 * args.tile_pad}, and --overlap "
                             f"{overlap} was given too: give one of them")
        overlap = 2 * args.tile_pad
        if args.tile and overlap * 2 >= args.tile:  # (the restorer would name the overlap, which was not typed)
            args.usage_error(f"--tile-pad {args.tile_pad} shares {overlap} px between tiles of {args.tile} px: it "
                             f"must be under a quarter of --tile (e.g. --tile-pad {args.tile // 8})")
    if one_file:
        if (n := sum(map(len, collect_inputs(inputs)))) != 1:
            args.usage_error(f"-o {args.out} names one image file, and {n} images were given: give an output folder")
        if given := sorted(args.given & {"--format", "--ext", "--suffix"}):
            args.usage_error(f"-o {args.out} names the output file, whose suffix is its format: {given[0]} is for an "
                             f"output folder")
    elif unknown_suffix(args.out) and sum(map(len, collect_inputs(inputs))) == 1:  # out.xyz for one photo
        args.usage_error(f"-o {args.out}: restore writes no {Path(args.out).suffix} files; name the output file "
                         f"with .png, .jpg, .webp or .tif, or write {args.out}/ for a folder of that name")
    # the output folder is made before the model loads (an unwritable one fails first); one that ends up empty (a
    # bad model, no image found, Ctrl-C before the first output: its record of the failures aside) is removed again
    from dist_dejpeg.restore.record import RECORD_NAME

    made = new_folders(Path(args.out).parent if one_file else args.out)
    try:
        return _restore(args, inputs, fmt, overlap, one_file)
    finally:
        remove_empty(made, leftovers=(RECORD_NAME,))


def _restore(args: argparse.Namespace, inputs: list[str], fmt: str, overlap: int, one_file: bool) -> int:
    from dist_dejpeg.models.names import ModelFileError, OnnxUnavailable
    from dist_dejpeg.restore import open_restorer
    from dist_dejpeg.restore.files import check_restore_output, restore_files
    from dist_dejpeg.restore.images import InputImageError
    from dist_dejpeg.restore.record import RECORD_NAME, Record, restorer_settings
    from dist_dejpeg.restore.summary import print_restore_summary

    try:
        check_restore_output(args.out)
        restorer = open_restorer(args.model, device=args.device, tile=args.tile, overlap=overlap,
                                 batch_size=args.batch_size, precision=args.precision, guard=not args.no_guard)
        restorer.consistent = not args.no_consistency
        restorer.quality_hint = "--input-quality Q"  # (an unknown quality's reason: the API's says quality=Q)
        restorer.cli_options = True  # (a refusal names --tile N, not the API's tile=N)
    except (ModelFileError, InputImageError, OnnxUnavailable, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _say_checkpoint(args.model, getattr(restorer, "info", {}))
    from dist_dejpeg.jpeg.consistency import jpeglib_missing

    if restorer.consistent and (missing := jpeglib_missing()):  # (said once, here: not under the progress bar)
        print(f"warning: {missing}", file=sys.stderr)
    from dist_dejpeg.jpeg.formats import others_in, suffix_counts

    if others := [p for item in inputs if Path(item).is_dir() for p in others_in(item)]:  # (a folder search's)
        print(f"note: left out {len(others)} file(s) in formats restore does not read ({suffix_counts(others)}: "
              f"{', '.join(map(str, others[:3]))}{', ...' * (len(others) > 3)}): not JPEGs (HEIC, AVIF: another "
              f"codec's artefacts; RAW: none); convert one to PNG to restore it anyway", file=sys.stderr)
    if restorer.guard and not restorer.gains:  # (said per image only under --verbose)
        print(f"warning: {args.model} holds no validated gains (a checkpoint, or a run not yet finished: its "
              f"generator.safetensors has them): every image of a known JPEG quality is restored unchecked (those "
              f"of unknown quality are still passed through)", file=sys.stderr)
    where = None if args.no_record else args.record or (None if one_file else Path(args.out) / RECORD_NAME)
    record = Record(where, str(getattr(restorer, "info", {}).get("source") or args.model), restorer_settings(restorer))
    try:
        results = restore_files(restorer, inputs, args.out, fmt=fmt, max_pixels=args.max_pixels, record=record,
                                skip_existing=args.skip_existing, progress=not args.quiet, strip_gps=args.strip_gps,
                                quality=args.input_quality, suffix=args.suffix, output_quality=args.output_quality)
    except KeyboardInterrupt as err:  # what a user stopping a folder needs: what was done, is what is there whole
        print_restore_summary(getattr(err, "results", []), args, restorer.device, record, interrupted=True)
        print(f"restore: interrupted; every output written is whole (each is renamed into place once complete): the "
              f"same command{'' if args.skip_existing else ' with --skip-existing'} continues with the rest",
              file=sys.stderr)
        return 130
    print_restore_summary(results, args, restorer.device, record)  # 3: stopped by a full disk, as the others
    return 3 if any(r.disk_full for r in results) else 1 if any(r.error for r in results) else 0


def _say_checkpoint(model: str, info: dict) -> None:
    """A run folder without its generator file restores with a checkpoint: which one, and why not a newer one."""
    from dist_dejpeg.run.layout import list_checkpoints
    from dist_dejpeg.run.manifest import usable_checkpoint  # (a live run's newer checkpoint: complete since?)

    if info.get("format") != "checkpoint" or not Path(model).is_dir() or Path(model).resolve() == Path(
            info["source"]).resolve():
        return
    used, newest = Path(info["source"]), (list_checkpoints(Path(model)) or [None])[-1]
    newer = "" if newest is None or newest.name == used.name else f"; the newer {newest.name} " + (
        "was completed after it was read" if usable_checkpoint(newest) else "is incomplete")  # (as it is now)
    print(f"note: restoring with {used} (the run has no generator file yet: training has not finished{newer})",
          file=sys.stderr)


def _evaluation(args: argparse.Namespace, keep_images: bool, made: list[Path]) -> dict | int:
    """evaluate()'s result, or an exit status after printing the error; ``made``: the folders of --out that did
    not exist (new_folders), removed again where left empty (the command's final write can fail too)."""
    from dist_dejpeg.run.pool import WorkerLost, pool_size
    from dist_dejpeg.evaluation.evaluate import EvaluateError, evaluate
    from dist_dejpeg.evaluation.pairs import MAX_DEFAULT_WORKERS
    from dist_dejpeg.evaluation.report import check_report_output
    from dist_dejpeg.run.layout import CHECKPOINTS, CONFIG, GENERATOR, LOCK, PROGRESS
    from dist_dejpeg.models.names import ModelFileError, OnnxUnavailable
    from dist_dejpeg.restore import open_restorer
    from dist_dejpeg.restore.files import check_output_dir
    from dist_dejpeg.run.files import remove_empty

    out, result = Path(args.out), 2
    try:  # the outputs first: one that cannot be written fails before any computation
        # (a metrics.json alone is no run's: an evaluate killed before its metrics.csv left it)
        if not keep_images and any((out / name).exists() for name in (CONFIG, PROGRESS, CHECKPOINTS, LOCK, GENERATOR)):
            raise ValueError(f"{out} is a training run's folder: evaluate's metrics.json would replace the run's "
                             f"own (its final validation, which status reads); give another folder, e.g. "
                             f"-o {out / 'evaluate'}")
        check_report_output(args.out) if keep_images else check_output_dir(args.out)
        restorer = open_restorer(args.model, device=args.device, tile=args.tile, overlap=args.overlap,
                                 batch_size=args.batch_size, guard=not args.no_guard)
        restorer.consistent = not args.no_consistency
        restorer.cli_options = True  # (a refusal names --tile N)
        result = evaluate(restorer, args.images, args.qualities, None,  # (the commands write: write_failed)
                          y_only=args.y_only, blind=args.blind, subsampling=args.subsampling,
                          crop_border=args.crop_border, lpips_weights=args.lpips_weights,
                          allow_lossy_reference=args.allow_lossy_reference, max_images=args.max_images,
                          keep_images=keep_images, progress=not args.quiet,
                          report_crop=args.crop if keep_images else None,  # (each photo cut to the page's parts)
                          workers=pool_size(args.workers, MAX_DEFAULT_WORKERS))
    except (ModelFileError, EvaluateError, OnnxUnavailable, ValueError, WorkerLost) as err:
        print(f"error: {err}", file=sys.stderr)  # (WorkerLost: a metrics process killed, out of memory?)
    finally:
        if isinstance(result, int):  # failed (or stopped): no empty folder of its making is left behind
            remove_empty(made)
    for why in result["meta"]["skipped"] if isinstance(result, dict) else []:
        print(f"skipped: {why}", file=sys.stderr)
    return result


def evaluate_command(args: argparse.Namespace) -> int:
    from dist_dejpeg.run.files import new_folders, remove_empty

    made = new_folders(args.out)  # (a failure leaves --out as it was)
    result = _evaluation(args, keep_images=False, made=made)
    if isinstance(result, int):
        return result
    from dist_dejpeg.evaluation.evaluate import format_value as fmt  # "n/a" where a mean is undefined (blank photos)
    from dist_dejpeg.evaluation.evaluate import write_tables
    from dist_dejpeg.evaluation.pairs import channel_note

    try:  # the tables first: a stdout that cannot be written (`> /dev/full`) fails at the first number
        write_tables(result, args.out)
        failed = None
    except OSError as err:  # (the numbers below are printed whatever happens to the files)
        failed = err
    for q, means in result["per_quality"].items():
        j, r = means["jpeg"], means["restored"]
        print(f"q{q}: PSNR {fmt(j['psnr'], 3)} -> {fmt(r['psnr'], 3)} dB, SSIM {fmt(j['ssim'])} -> {fmt(r['ssim'])} "
              f"({means['images']} image{'s' if means['images'] != 1 else ''}, {channel_note(result['meta'])})")
    for name, why in result["meta"]["unavailable"].items():
        print(f"{name} unavailable: {why.splitlines()[0]}", file=sys.stderr)
    if failed is not None:
        remove_empty(made)
        return write_failed(failed, args.out)
    print(f"wrote metrics.json, metrics.csv and metrics.md to {args.out}")
    return 0


def _run_name(source) -> str:
    """What names a model on a shared page: its run folder for a run's generator.safetensors, else the path."""
    path = Path(str(source)).resolve()
    return str(path.parent if path.name == "generator.safetensors" else path)


def report_command(args: argparse.Namespace) -> int:
    from dist_dejpeg.evaluation.evaluate import seen_note, table_files
    from dist_dejpeg.evaluation.pairs import channel_note
    from dist_dejpeg.evaluation.report import check_report_output, write_report
    from dist_dejpeg.run.files import new_folders, remove_empty

    made = new_folders(Path(args.out).parent, Path(args.out).with_suffix(""))  # (the page's and its tables')
    result = _evaluation(args, keep_images=True, made=made)
    if isinstance(result, int):
        return result
    meta, model = result["meta"], result["meta"]["model"]
    shown = {"model": model.get("source"), "encoder": model.get("encoder"), "encoder_init": model.get("encoder_init"),
             "training steps": model.get("global_step"), "trained by": model.get("code") or "not recorded",
             "backbones": meta["backbones"],
             "compression": meta["compression"], "metrics on": channel_note(meta), "border crop": meta["crop_border"],
             "restored on": f"{meta['device']} (tile {meta['tile']}, overlap {meta['overlap']})",
             "do-no-harm guard": ("off" if not meta["guard"] else "on" if model.get("val_psnr_gain") else
                                  "on, but the model file holds no validated gains: every photo restored"),
             "LPIPS here": meta["lpips"],
             "LPIPS in training": model.get("lpips") or "not recorded",
             "unavailable": meta["unavailable"], "date": meta["date"]}
    if meta["skipped"]:
        shown["skipped"] = "; ".join(meta["skipped"])
    if meta["undefined"]:
        shown["left out"] = "; ".join(f"{m}: {w['images']} of {meta['images']} photos ({w['reason']})"
                                      for m, w in meta["undefined"].items())
    if meta.get("seen_in_training"):
        shown["seen in training"] = seen_note(meta["seen_in_training"], meta["images"])
    try:
        tables = check_report_output(args.out)  # (the page and its tables: all or none)
        path = write_report(result.pop("records"), args.out, title=f"dist_dejpeg: {_run_name(model.get('source'))}",
                            meta=shown, crop=args.crop, tables={tables / n: d for n, d in table_files(result).items()})
    except OSError as err:
        remove_empty(made)
        return write_failed(err, args.out)
    print(f"wrote {path} and its tables in {tables}/")
    return 0


def export_command(args: argparse.Namespace) -> int:
    from dist_dejpeg.models.generator_file import ModelFileError
    from dist_dejpeg.models.onnx_export import (CheckImageError, OnnxCheckError, OnnxUnavailable, export_model,
                                                export_target_problem)

    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    problem = export_target_problem(args.model, args.onnx, args.opset)  # (before a minute of exporting)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        result, info = export_model(args.model, args.onnx, opset=args.opset, check_image=args.check_image)
    except (ModelFileError, OnnxUnavailable, FileNotFoundError, CheckImageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OnnxCheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk: one line, not a traceback after a minute of exporting
        return write_failed(err, args.onnx)
    # (each check's difference is on its own line above, printed as it ran: not repeated here)
    print(f"wrote {result['path']} ({result['bytes'] / 1e6:.1f} MB, opset {result['opset']}, encoder "
          f"{info['encoder']}, export {result['export_s']} s); the {len(result['max_abs_diff'])} onnxruntime checks "
          f"above are within {result['tolerance']:g} of PyTorch")
    return 0


def compare_command(args: argparse.Namespace) -> int:
    import json

    from dist_dejpeg.evaluation.compare import CompareError, check_compare_output, compare, markdown, read_evaluation
    from dist_dejpeg.run.files import atomic_write_bytes

    try:
        results = [read_evaluation(path) for path in args.evaluations]
        if args.out:  # checked before the comparison is printed
            check_compare_output(Path(args.out), results)
        comparison = compare(results, tuple(args.metrics))
        text, as_json = markdown(comparison), json.dumps(comparison, indent=2) + "\n"
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            as_file = as_json if Path(args.out).suffix.lower() == ".json" else text
            atomic_write_bytes(Path(args.out), as_file.encode())
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        return write_failed(err, args.out)
    print(as_json if args.json else text, end="")
    return 0


def status_command(args: argparse.Namespace) -> int:
    import json

    from dist_dejpeg.run.layout import TRAINER_STATE
    from dist_dejpeg.run.status import find_runs, is_run_folder
    from dist_dejpeg.run.text import format_status, format_table

    runs = find_runs(args.run_dirs)
    statuses = [_one_status(path) for path in runs]
    # --json: an object for one run folder given, a list for several or a folder of runs (a sweep's runs/, however
    # many it holds today, none yet included: a script reads one shape); judged by the path given, not what it
    # expanded to (an empty folder is no run); a file or a checkpoint folder given (an error): an object
    given = Path(args.run_dirs[0])
    one = len(args.run_dirs) == 1 and not (given.is_dir() and not is_run_folder(given)
                                           and not (given / TRAINER_STATE).is_file())
    if args.json and not one:
        from dist_dejpeg.run.sweep import with_differences

        print(json.dumps(with_differences(statuses), indent=2))
        return 2 if any("error" in s for s in statuses) else 0
    if len(statuses) == 1 and "error" not in statuses[0]:
        print(json.dumps(statuses[0], indent=2) if args.json else format_status(statuses[0]))
        return 0
    if len(statuses) == 1:  # --json: scripts get a JSON object on errors too
        print(json.dumps(statuses[0]) if args.json else f"error: {statuses[0]['error']}",
              file=sys.stdout if args.json else sys.stderr)
        return 2
    errors = [s["error"] for s in statuses if "error" in s]  # (each names its path)
    if len(errors) < len(statuses):
        print(format_table(statuses))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 2 if errors else 0


def _one_status(path: Path) -> dict:
    """run_status's dict for ``path``, or {"run_dir", "error"} saying why it has none."""
    from dist_dejpeg.run.layout import CHECKPOINTS, CONFIG, LOCK, METRICS, PROGRESS, TRAINER_STATE
    from dist_dejpeg.run.status import is_evaluate_folder, run_status

    def fail(message: str) -> dict:
        return {"run_dir": str(path), "error": message}

    if (path / TRAINER_STATE).is_file():
        return fail(f"{path} is a checkpoint folder; give its run folder, {path.parent.parent}")
    try:
        status = run_status(path)
    except (FileNotFoundError, NotADirectoryError) as err:
        return fail(str(err))
    if not status["run_folder"] and is_evaluate_folder(path):
        return fail(f"{path} is an `evaluate -o` folder, not a run folder (its {METRICS} is evaluate's: `dist-dejpeg "
                    f"compare` and `report` read it); give the folder a run's train.run_dir points at")
    if not status["run_folder"]:
        return fail(f"{path} is not a run folder (no {CONFIG}, {CHECKPOINTS}/, {PROGRESS}, {METRICS} or {LOCK}); "
                    f"give the folder a run's train.run_dir points at")
    return status
