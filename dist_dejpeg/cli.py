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
    dist-dejpeg compare eval_a/ eval_b/ [--metrics psnr ssim lpips] [-o compare.md]
    dist-dejpeg export --model runs/debug --onnx model.onnx
    dist-dejpeg status runs/debug [--json]          (several runs, or runs/: one line each)

train exits 0 when done; 2 on a config, weights, busy-run-folder, damaged-checkpoint or too-many-bad-samples error; 3 when a non-finite
loss or a full disk stopped it (the last good checkpoint is kept: fix the cause and rerun); 75 when
SIGUSR1/SIGTERM stopped it (checkpoint kept; rerun to continue).
    accelerate launch -m dist_dejpeg.cli train --config configs/div2k.yaml

Thin: parses arguments and calls the modules that do the work.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dist_dejpeg import version
from dist_dejpeg.cli_args import (CommandLine, HelpFormatter, compare_arguments, evaluate_arguments, export_arguments,
                                  prepare_arguments, report_arguments, restore_arguments, status_arguments,
                                  train_arguments)
from dist_dejpeg.cli_output import (CORE_MODULES, WatchedStdout, closed_stderr, relax_encoding, stdout_failed,
                                    strict_again, write_failed)
from dist_dejpeg.cli_use import (compare_command, evaluate_command, export_command, report_command, restore_command,
                                 status_command)
from dist_dejpeg.train.launch import EXIT_PREEMPTED, LAUNCHER_PID  # (torch-free: the launcher's stdlib half)

DESCRIPTION = ("Train a JPEG-artifact remover (NoGAN, on one or many GPUs) and restore photos with it. "
               "dist-dejpeg COMMAND --help shows a command's options and their defaults.")


def _prepare_dataset(args: argparse.Namespace, tile: int, step: int, shard_size: int) -> dict:
    """prepare's manifest for ``args.dataset``."""
    if args.dataset == "div2k":
        from dist_dejpeg.data.div2k import prepare_div2k

        return prepare_div2k(args.root, args.out, download_missing=args.download, tile=tile, step=step,
                             shard_size=shard_size, workers=args.workers, seed=args.seed,
                             keep_staging=args.keep_staging, fmt=args.format)
    if args.dataset == "samples":
        from dist_dejpeg.data.shards import prepare_samples

        return prepare_samples(args.out, tile=tile, train_step=step, shard_size=shard_size, seed=args.seed,
                               fmt=args.format)
    from dist_dejpeg.data.folder import prepare_folder

    return prepare_folder(args.src, args.out, tile=tile, train_step=step, shard_size=shard_size,
                          val_fraction=args.val_fraction, seed=args.seed, fmt=args.format, jpeg=args.jpeg_sources,
                          max_pixels=args.max_pixels, workers=args.workers)


def _prepare(args: argparse.Namespace) -> int:
    from dist_dejpeg.data.shards import PrepareError
    from dist_dejpeg.run.pool import WorkerLost

    if args.source:  # `prepare folder photos/`, `prepare div2k data/div2k`: the option's folder, positional
        key = {"folder": "src", "div2k": "root"}.get(args.dataset)
        if key is None or getattr(args, key) not in (None, args.source):
            print(f"error: prepare {args.dataset} takes " + (f"one folder: {args.source} or --{key} "
                  f"{getattr(args, key)}" if key else f"no folder (got {args.source})"), file=sys.stderr)
            return 2
        setattr(args, key, args.source)
    tile = args.tile or {"samples": 128, "folder": 256, "div2k": 480}[args.dataset]
    step = args.step or max(1, tile // 2)
    shard_size = args.shard_size or (64 if args.dataset == "samples" else 256)
    if args.dataset != "samples" and not getattr(args, key := "root" if args.dataset == "div2k" else "src"):
        print(f"error: prepare {args.dataset} needs --{key} " + ("<folder with the DIV2K zips or folders>"
              if key == "root" else "<folder of images>"), file=sys.stderr)
        return 2
    from dist_dejpeg.data.download import DownloadError
    from dist_dejpeg.jpeg.formats import shown
    from dist_dejpeg.data.verify import dominant_sources

    try:
        manifest = _prepare_dataset(args, tile, step, shard_size)
    except (FileNotFoundError, DownloadError, PrepareError, WorkerLost) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, an unwritable --out: said, not a traceback (--out as it was)
        return write_failed(err, args.out)
    splits, rejected = manifest["splits"], len(manifest["rejected"])  # (said once: publish() logs no count)
    print(f"wrote {splits['train']['samples']} train and {splits['val']['samples']} val tiles "
          f"({len(splits['train']['shards'])} + {len(splits['val']['shards'])} shards) to {args.out}"
          + (f"; {rejected} source{'s' if rejected != 1 else ''} rejected" if rejected else ""))
    for item in manifest["rejected"]:
        print(f"rejected {shown(item.get('path', item['source']))}: {item['reason']}", file=sys.stderr)
    if big := dominant_sources(manifest):
        print(f"warning: {big}", file=sys.stderr)
    if splits["val"]["samples"] == 0:
        usable = len(manifest.get("sources", {}))
        fix = ("--val-fraction 0 holds none out: give it a share (0.1), or point data.val_glob at other shards"
               if getattr(args, "val_fraction", None) == 0 else
               f"Add another photo of at least {tile} x {tile} px (one is held out whenever there are two), lower "
               f"--tile, or point data.val_glob at other shards")
        print(f"warning: no validation tiles were written ({usable} usable photo(s) of at least {tile} px, all "
              f"used for training): training needs val-*.tar shards. {fix}.", file=sys.stderr)
    return 0


def stop_while_starting() -> dict:
    """Until the run takes the stop signals itself (train()'s StopSignals, the launcher's StopForwarder: after the
    imports and the config, ~5-8 s), SIGTERM, SIGUSR1 or Ctrl-C end the command at once as a stop (exit 75: nothing
    is saved yet, the same command starts or continues the run), not with 143 and no word; so do they in a rank of
    several after its training loop (the loop's StopSignals put these back), but for SIGTERM in one leaving with an
    error (_stopped). Returns the handlers it replaced (the caller puts them back)."""
    import signal
    import threading

    def stop(signum, frame):
        if os.environ.get("LOCAL_RANK", "0") == "0":  # once per node: the launcher passes the signal to every rank
            os.write(2, f"stopped by {signal.Signals(signum).name} where the run had nothing new to save (starting, "
                        f"or a rank finishing); the same command continues the run\n".encode())
        os._exit(EXIT_PREEMPTED)

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}


def _train(args: argparse.Namespace) -> int:
    import signal

    previous = stop_while_starting()
    try:
        return _train_command(args)
    finally:  # (a caller in Python, e.g. a test, goes on with its own handlers)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train_command(args: argparse.Namespace) -> int:
    from dist_dejpeg.config import ConfigError, did_you_mean, load_config, to_yaml
    from dist_dejpeg.config.checks import order_warnings

    if args.resume and "=" in args.resume and not os.path.exists(args.resume):  # `--resume key=value ...`: argparse
        args.overrides, args.resume = [args.resume, *args.overrides], "latest"  # took an override for the folder
    overrides = list(args.overrides) + ([f"train.log_level={args.log_level}"] if args.log_level else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.get is not None:  # (an empty key too: `--get "$KEY"` with KEY unset started a whole training)
        from omegaconf import OmegaConf

        value = OmegaConf.select(OmegaConf.structured(cfg), args.get, default=None) if args.get.strip() else None
        if value is None:
            print(f"error: no config key '{args.get}'{did_you_mean(cfg, args.get)}", file=sys.stderr)
            return 2
        print(OmegaConf.to_yaml(value).strip() if OmegaConf.is_config(value) else value)
        return 0
    if os.environ.get("RANK", "0") == "0" and LAUNCHER_PID not in os.environ:  # once: rank 0 or train.processes
        for warning in order_warnings(cfg):
            print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return _refused(cfg, args.resume)
    from dist_dejpeg.models.weights import WeightsError
    from dist_dejpeg.train.launch import already_launched, check_before_ranks, launch, ranks_here, record_stop

    ranks = ranks_here(cfg.train.processes, cfg.train.cpu)
    if ranks > 1 and not already_launched():  # the same command again, as `ranks` processes
        from dist_dejpeg.run.lock import lock_status

        held = lock_status(cfg.train.run_dir)  # said now, not once per rank after their start-up (~20 s)
        if held["held"] is True:
            print(f"error: run folder {cfg.train.run_dir} is in use by another training run ({held['detail']}); two "
                  f"runs would overwrite each other's checkpoints. Stop that run, or set another train.run_dir.",
                  file=sys.stderr)
            return 2
        from dist_dejpeg.train.resume import check_before_start

        try:  # what resuming would refuse, trackers, weights: said now, once, not by every rank after its start-up
            check_before_start(cfg, args.resume, ranks)
            check_before_ranks(cfg)
        except (ConfigError, FileNotFoundError, WeightsError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        argv = ["train", *(["--config", args.config] if args.config else []),
                *(["--resume", args.resume] if args.resume else []),
                *(["--log-level", args.log_level] if args.log_level else []), *args.overrides]
        code = launch(ranks, argv)
        if code == EXIT_PREEMPTED:  # (ranks a stop ended with nothing to save wrote no word of it)
            record_stop(cfg.train.run_dir)
        return code
    if "LOCAL_RANK" in os.environ:  # a rank of accelerate launch or torchrun: ended with it, not left an orphan
        from dist_dejpeg.train.launch import die_with_parent

        die_with_parent(os.getppid())
    from dist_dejpeg.data.verify import TooFewSamples, TooManyBadSamples, UnreadableShard
    from dist_dejpeg.run.lock import RunDirBusy
    from dist_dejpeg.run.verdict import crash_said, file_error, lost_peer
    from dist_dejpeg.train.trainer import Preempted, TrainingStopped, train

    try:  # (a start that failed, a misspelt encoder, leaves no run folder behind: train() removes what it made)
        results = train(cfg, resume=args.resume)
    except (ConfigError, WeightsError, FileNotFoundError, RunDirBusy, TooManyBadSamples, TooFewSamples,
            UnreadableShard) as err:
        return _stopped("error", err, 2)
    except Preempted as err:
        return _stopped("stopped", err, EXIT_PREEMPTED)
    except TrainingStopped as err:  # every rank stops at the same step, each with its own numbers: rank 0 says it
        return _stopped("error", err, 3, every_rank=False)
    except RuntimeError as err:  # a lost peer (gloo, NCCL), a full /dev/shm, a killed loader: one line, no traceback
        if (said := lost_peer(err, cfg.train.dist_timeout_s, cfg.train.run_dir) or crash_said(err)) is None:
            raise
        logging.getLogger("dist_dejpeg").debug("the error here", exc_info=True)
        return _stopped("error", said, 1)
    except OSError as err:  # a file it could not write or read (permissions, a read-only or failing filesystem)
        logging.getLogger("dist_dejpeg").debug("the file error here", exc_info=True)
        copy = getattr(err, "copied_from_rank", None) is not None  # (the rank it came from says it)
        return _stopped("error", err if copy else file_error(err, cfg.train.run_dir), 1)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one closing line per run, not one per rank
        return 0
    lowest = min(results, key=lambda k: int(k[1:]))
    r = results[lowest]
    print(f"done: {lowest} PSNR {r['jpeg']['psnr']:.3f} (JPEG) -> {r['restored']['psnr']:.3f} dB (restored); "
          f"metrics in {cfg.train.run_dir}/metrics.json")
    print(_what_restore_does(results, cfg.train.run_dir))
    return 0


def _refused(cfg, resume: str | None) -> int:
    """--dry-run's checks of what the start would refuse, said now (exit 2), not after the ranks' start-up: resuming
    the checkpoint (phases, global batch, process count, shapes), building the model (encoder, stages, model.init_from's
    config, of these shapes; no weights read) and the shards' tiles (no smaller than the crop; none here: warned)."""
    import dataclasses

    from dist_dejpeg.config import ConfigError
    from dist_dejpeg.models.unet import build_generator, generator_notes
    from dist_dejpeg.models.weights import EncoderError
    from dist_dejpeg.train.build import refused_before_launch
    from dist_dejpeg.train.init_from import init_from_config
    from dist_dejpeg.train.launch import ranks_started
    from dist_dejpeg.train.data_checks import check_shards_exist, check_train_tiles
    from dist_dejpeg.train.resume import check_before_start

    ranks = ranks_started(cfg.train.processes, cfg.train.cpu)  # as the start counts them
    try:
        check_before_start(cfg, resume, ranks, say=lambda line: print(line, file=sys.stderr))  # (what it accepts too)
        refused_before_launch(cfg, ranks)  # (fp16 on the CPU, DeepSpeed in one process with no launcher)
        model = dataclasses.replace(init_from_config(cfg.model), pretrained=False, init_from="")  # (its config only)
        for note in generator_notes(build_generator(model), cfg.data, cfg.model.sync_bn and ranks > 1):  # (ConfigError)
            print(f"warning: {note}", file=sys.stderr)
        try:  # the shards: tiles the crop fits; not there here (a login node without the compute nodes' scratch,
            check_shards_exist(cfg)  # data prepared later, data.auto_prepare's): said, not refused
        except FileNotFoundError as err:
            if cfg.data.auto_prepare == "none":
                print(f"warning: {err}", file=sys.stderr)
        else:  # (the crop; the loader slots are the compute node's: its ranks, and DALI or not)
            check_train_tiles(cfg, None)
    except (ConfigError, EncoderError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:  # (last: a login node's dry run of an sbatch script's command needs its train.processes=N)
        print(f"note: checked for {ranks} process(es) (train.processes; under a launcher, its WORLD_SIZE)",
              file=sys.stderr)
    return 0


def _what_restore_does(results: dict, run_dir) -> str:
    """The guard's reading of the generator file just written, as restore judges a JPEG file (the gains of the
    restored image made consistent with it, where the file holds them; else the validation's ``results``)."""
    from pathlib import Path

    from dist_dejpeg.models.generator_file import read_metadata
    from dist_dejpeg.models.names import CONFORMED_KEYS, GAIN_KEYS, file_gains
    from dist_dejpeg.restore.guard import guard_summary
    from dist_dejpeg.run.layout import GENERATOR
    from dist_dejpeg.train.final import guard_gains

    try:
        tables = file_gains(read_metadata(Path(run_dir) / GENERATOR))
    except (OSError, ValueError):
        tables = {}
    keys = CONFORMED_KEYS[:2] if tables.get(CONFORMED_KEYS[0]) else GAIN_KEYS
    if not tables.get(keys[0]):
        tables = file_gains(guard_gains(results))
    return guard_summary(*(tables[key] for key in keys))


def _stopped(what: str, err: Exception, code: int, every_rank: bool = True) -> int:
    """Say why training stopped, on the rank that raised it: the other ranks raise a copy (train/collective.py),
    which would print the same line once per rank; ranks that raised the same error themselves (the same missing
    file) say it once per node; ``every_rank`` False: the main process alone says it (a stop all ranks make
    together, each with its own numbers, as a non-finite loss's)."""
    import signal
    import threading

    from dist_dejpeg.train.launch import first_on_node, leave_process_group

    if code != EXIT_PREEMPTED and threading.current_thread() is threading.main_thread():  # an error's: the SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # that closes the ranks ends it as that, not as a stop (75)
    if not every_rank and os.environ.get("RANK", "0") != "0":
        pass
    elif getattr(err, "copied_from_rank", None) is None and first_on_node(f"{what}: {err}"):
        print(f"{what}: {err}", file=sys.stderr)
    leave_process_group()
    return code


# The subcommands, in the order --help lists them: name -> (help, add its arguments, run it). `bench` brings
# its own parser, one sub-parser per benchmark (dist_dejpeg.bench).
COMMANDS = {
    "prepare": ("write WebDataset shards of lossless tiles", prepare_arguments, _prepare),
    "train": ("run the NoGAN phases (resumable)", train_arguments, _train),
    "restore": ("restore images (files, folders searched recursively, globs) with a trained generator",
                restore_arguments, restore_command),
    "evaluate": ("JPEG-compress lossless photos, restore them, and measure both with PSNR, PSNR-B, SSIM, LPIPS, "
                 "BRISQUE and NIQE", evaluate_arguments, evaluate_command),
    "report": ("a self-contained HTML page: clean | JPEG | restored crops with the metrics", report_arguments,
               report_command),
    "compare": ("compare models from their evaluate folders: per quality, photo by photo against the first",
                compare_arguments, compare_command),
    "export": ("export the generator to ONNX (dynamic batch/height/width), checked in onnxruntime",
               export_arguments, export_command),
    "status": ("where a run stands, read from its folder (safe on a live run)", status_arguments, status_command),
}


def build_parser() -> argparse.ArgumentParser:
    examples = __doc__.split("\n\n")[1]  # the command lines above
    parser = CommandLine(prog="dist-dejpeg", description=DESCRIPTION, epilog=f"examples:\n{examples}",
                         formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter, allow_abbrev=False)
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
    command = command_parser(parser, args)  # (options are never abbreviated: `given` names them as typed)
    if extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    args.usage_error, args.given = command.error, {a.split("=")[0] for a in argv if a.startswith("--")}
    closed = closed_stderr()  # `2>&-`: os.devnull (for every command; stdout's, as below)
    relaxed = relax_encoding(sys.stdout, sys.stderr)  # (before logging's handler, the wrapper: every command)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stdout = sys.stdout  # (a write to it that fails: stdout_failed; closed, `>&-`: None, so os.devnull)
    sys.stdout = WatchedStdout(stdout if stdout is not None else open(os.devnull, "w"))  # noqa: SIM115
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that left (a pipe into head) is handled below
        return code
    except ModuleNotFoundError as err:  # the README's restore-only install (no PyTorch) running another command
        if (err.name or "").partition(".")[0] not in CORE_MODULES:  # (ours: a bug; an extra: its own message)
            raise
        print(f"error: {args.command} needs {err.name}, which this environment lacks: install the package with its "
              f"dependencies (pip install -e .; the restore-only install runs `restore --model FILE.onnx`)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where no step handles it (training's steps checkpoint first): no traceback
        print(f"\n{args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # `status RUN | head` (the reader left), `> /dev/full`: no traceback; a file's: raised
        if (code := stdout_failed(err, args.command)) is None:
            raise
        return code
    finally:
        sys.stdout = stdout if isinstance(sys.stdout, WatchedStdout) else sys.stdout
        sys.stderr = None if closed else sys.stderr
        strict_again(relaxed)


if __name__ == "__main__":
    sys.exit(main())
