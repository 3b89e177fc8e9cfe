"""The arguments of each ``dist-dejpeg`` subcommand (dist_dejpeg.cli holds the table that uses them): argparse
only, importing no torch, so that ``--help`` is instant. Every option's help ends with its default."""

from __future__ import annotations

import argparse
import os
import sys

from dist_dejpeg.jpeg.formats import (DEFAULT_MAX_PIXELS, JPEG_SOURCE_ACTIONS, OUTPUT_FORMATS, SAME_FORMAT, SUBSAMPLING,
                                      TILE_FORMATS)
from dist_dejpeg.metrics.registry import EVALUATED


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help, where it has one to show (not None, False or empty); the
    description as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is False or default in ("", [])  # (0 is shown)
                or default is argparse.SUPPRESS or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class CommandLine(argparse.ArgumentParser):
    """dist-dejpeg's parser (``commands``: name -> its parser, set by cli.build_parser). A command's words are read
    intermixed, its positionals before, between or after its options (`restore a.jpg -o out b.jpg`, `status RUN
    --json`): argparse's own parse closed a positional at the first option, refusing the words after it."""

    commands: dict[str, argparse.ArgumentParser] = {}

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        command = self.commands.get(args[0]) if args else None
        if command is None or hasattr(command, "benchmarks"):  # --version, --help, a typo; bench: its own parser
            return super().parse_known_args(args, namespace)
        namespace = namespace if namespace is not None else argparse.Namespace()
        namespace.command, words = args[0], args[1:]
        if "--" not in words:
            return command.parse_known_intermixed_args(words, namespace)
        # the words after `--` are positionals whatever they start with, but the intermixed parse reads one that
        # starts with "-" as an option (`-- -b.jpg`: "unrecognized arguments"): each stands in as a word it cannot
        # misread, put back after the parse; the words before `--` stay intermixed (`restore a.jpg -o out -- -b.jpg`)
        cut = words.index("--")
        stand_ins = {f"\0{i}": word for i, word in enumerate(words[cut + 1:], cut + 1) if word.startswith("-")}
        after = [f"\0{i}" if word.startswith("-") else word for i, word in enumerate(words[cut + 1:], cut + 1)]

        def back(value):
            if isinstance(value, list):
                return [back(v) for v in value]
            return stand_ins.get(value, value) if isinstance(value, str) else value

        def error(message):  # (any message argparse builds from a word: none shows a stand-in)
            for stand_in, word in sorted(stand_ins.items(), key=lambda item: -len(item[0])):  # (\x0012 before \x001)
                message = message.replace(repr(stand_in), repr(word)).replace(stand_in, word)
            return type(command).error(command, message)

        # each word is put back before its type= conversion and choices check sees it (`prepare -- -x`: "invalid
        # choice: '-x'", not the stand-in); by then argparse has read it as a positional
        command._get_value = lambda action, word: type(command)._get_value(command, action, back(word))
        command.error = error
        try:
            namespace, extras = command.parse_known_intermixed_args(words[:cut] + ["--", *after], namespace)
        finally:
            del command._get_value, command.error
        for key, value in vars(namespace).items():
            setattr(namespace, key, back(value))
        return namespace, back(extras)


def jpeg_quality(text: str) -> int:
    """argparse type: a JPEG quality, 1..100."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"a JPEG quality is a whole number in 1..100, not {text!r}")
    return value


def html_page(text: str) -> str:
    """argparse type: report's -o, a page a browser opens by its suffix (-o r.png wrote HTML into a .png)."""
    if os.path.splitext(text)[1].lower() not in (".html", ".htm"):
        raise argparse.ArgumentTypeError(f"the HTML page to write, a name ending in .html or .htm (report.html: its "
                                         f"tables go into report/), not {text!r}")
    return text


COMPARISON_SUFFIXES = (".md", ".markdown", ".txt", ".json")  # compare -o: Markdown tables, or JSON for .json


def comparison_file(text: str) -> str:
    """argparse type: compare's -o, a text file by its suffix (-o g.safetensors replaced the model with Markdown)."""
    if os.path.splitext(text)[1].lower() not in COMPARISON_SUFFIXES and not os.path.isdir(text):  # (a folder:
        raise argparse.ArgumentTypeError(f"the file to write the comparison to, a name ending in .md, .markdown or "
                                         f".txt (Markdown tables) or .json (JSON), not {text!r}")
    return text  # compare says so)


def record_file(text: str) -> str:
    """restore's --record: a file to append to, not a folder."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder: name the file to append to (e.g. {text}/record.jsonl)")
    return text


def at_least(low: int):
    """An argparse type: a whole number >= ``low`` (counts and sizes: refused before any work)."""
    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"a whole number >= {low}, not {text!r}")
        return value

    return whole


def positive_number(text: str) -> float:
    """argparse type: a number above 0 (minutes, dB)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):  # (NaN too)
        raise argparse.ArgumentTypeError(f"a number above 0, not {text!r}")
    return value


def add_restorer_args(p: argparse.ArgumentParser) -> None:
    """The model and how it runs: shared by restore, evaluate and report."""
    p.add_argument("--model", required=True, help="generator.safetensors, a run folder, a checkpoint folder, or "
                                                  "an exported .onnx file (run on onnxruntime)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--tile", type=int, default=512,
                   help="tile size in pixels: a multiple of 32, at least 64; 0: the whole image at once")
    p.add_argument("--overlap", type=int, default=64,
                   help="pixels neighbouring tiles share, blended linearly (less than half the tile)")
    p.add_argument("--batch-size", type=at_least(1), default=None,
                   help="tiles per forward pass (default: 1 on the CPU, faster there and half the memory; 8 on a "
                        "GPU, every batch full so that one CUDA graph serves all images; ONNX on CUDA: 4)")
    p.add_argument("--no-guard", action="store_true", help="restore every image, even where the model's "
                                                           "validation predicts no gain at its quality")
    p.add_argument("--no-consistency", action="store_true",
                   help="keep the model's own image: a restored JPEG is not made consistent with its file's DCT "
                        "coefficients (judged then by the model's own validated gains)")


def add_evaluation_args(p: argparse.ArgumentParser, default_qualities: list[int]) -> None:
    add_restorer_args(p)
    p.add_argument("--images", required=True, nargs="+",
                   help="lossless reference photos: files, folders (recursive) or WebDataset shards (.tar)")
    p.add_argument("--qualities", type=jpeg_quality, nargs="+", default=default_qualities, metavar="Q",
                   help="the JPEG qualities to compress the references at (libjpeg)")
    p.add_argument("--subsampling", choices=tuple(SUBSAMPLING), default="4:2:0",
                   help="the JPEGs' chroma subsampling (4:2:0: libjpeg's default, the published benchmarks'; "
                        "4:4:4: high-quality exports of some editors and cameras)")
    p.add_argument("--quality", dest="qualities", type=jpeg_quality, nargs="+", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the name before --qualities
    p.add_argument("--workers", type=at_least(0), default=0,
                   help="metrics processes beside the one restoring (0: one per core this process may use, at most "
                        "8; 1: measure in this process)")
    p.add_argument("--y-only", action="store_true",
                   help="full-reference metrics of colour photos (4:2:0 JPEGs) on BT.601 Y, float (BasicSR/SwinIR): "
                        "the Y-channel scores of colour restoration; a grayscale photo is measured on its one channel, "
                        "with or without it (grayscale benchmarks: give grayscale PNGs, no --y-only)")
    p.add_argument("--crop-border", type=at_least(0), default=0, help="pixels cut from each border before measuring")
    p.add_argument("--lpips-weights", default="", help="torchvision's AlexNet file (alexnet-owt-7be5be79.pth) for "
                                                       "LPIPS when it is not in the torch hub cache")
    p.add_argument("--allow-lossy-reference", action="store_true", help="accept JPEG/WebP references")
    p.add_argument("--max-images", type=at_least(0), default=0, help="use at most this many reference images (0: all)")
    p.add_argument("--blind", action="store_true", help="do not tell the model the quality")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (a bar on a terminal; without one, a log line at each tenth of the images)")


def prepare_arguments(p: argparse.ArgumentParser) -> None:
    def fraction(text: str) -> float:  # argparse type: a share in [0, 1)
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0 <= value < 1:  # NaN too
            raise argparse.ArgumentTypeError(f"a fraction in [0, 1), not {text!r}")
        return value

    p.add_argument("dataset", choices=["samples", "folder", "div2k"],
                   help="samples: photographs bundled with scikit-image; folder: your own images (--src); "
                        "div2k: the DIV2K HR archives (--root, --download)")
    p.add_argument("source", nargs="?", metavar="FOLDER",
                   help="folder: the images' folder (as --src); div2k: the archives' folder (as --root)")
    p.add_argument("--root", help="div2k: folder with DIV2K_{train,valid}_HR.zip or their extracted folders")
    p.add_argument("--download", action="store_true", help="div2k: fetch missing archives (resumable, verified)")
    p.add_argument("--workers", type=at_least(0), default=0,
                   help="folder and div2k: decoding and tiling processes (0: one per core this process may use, at "
                        "most 8 for folder, 16 for div2k; 1: none, all in this process)")
    p.add_argument("--keep-staging", action="store_true", help="div2k: keep the per-image tile tars")
    p.add_argument("-o", "--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--src", help="folder: the images (searched recursively; lossless formats preferred)")
    p.add_argument("--tile", type=at_least(0), default=0, help="tile size in pixels (0: samples 128, folder 256, div2k 480)")
    p.add_argument("--step", type=at_least(0), default=0, help="stride between training tiles (0: half the tile)")
    p.add_argument("--shard-size", type=at_least(0), default=0, help="samples per shard (0: samples 64, folder and div2k 256)")
    p.add_argument("--val-fraction", type=fraction, default=0.1,
                   help="folder: share of images held out for validation, each by its name and --seed; at least "
                        "one of two. Prepared again into the same --out, a photo keeps its split (by its pixels or "
                        "path in manifest.json): photos added or removed never move one that trained into validation")
    p.add_argument("--jpeg-sources", choices=JPEG_SOURCE_ACTIONS, default="halve",
                   help="folder: JPEG sources, whose pixels show JPEG compression (a .jpg, or a PNG saved from one) "
                        "or whose file's tables say it (a .jpg above ~q90, 4:4:4 or CMYK; a TIFF of JPEG compression), "
                        "are used halved to q90 (a 2x2 area mean erases the 8x8 grid; twice below q30; above q90 as "
                        "they are, named in a warning), kept as they are, or left out; keep also takes lossy WebP/AVIF "
                        "files and restore's outputs, rejected otherwise")
    p.add_argument("--max-pixels", type=at_least(1), default=DEFAULT_MAX_PIXELS,
                   help="folder: photos with more pixels are rejected (decompression bombs)")
    p.add_argument("--seed", type=int, default=0,
                   help="folder: which photos are held out for validation (by name); and the training tiles' shuffle")
    p.add_argument("--format", choices=TILE_FORMATS, default="raw",
                   help="lossless tile format: png, raw (uncompressed, no decode), jp2 (GPU-decodable in DALI)")


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see configs/); schema defaults otherwise")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint of train.run_dir (what train.auto_resume does by "
                        "default), or from the given folder")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, check what the start would refuse (resuming the run folder's "
                        "checkpoint, building the model; pretrained files are checked at the start) and exit")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="log level of rank 0 (train.log_level; other ranks log warnings and errors)")
    p.add_argument("--get", metavar="KEY", help="print one resolved config value (e.g. train.run_dir) and exit")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. data.batch_size=8)")
    p.epilog = ("exit codes: 0 done; 1 a lost peer (another rank gone) or a file it could not read or write;\n"
                "2 a config, weights, busy run folder, damaged checkpoint or too-many-bad-samples error; 3 a\n"
                "non-finite loss or a full disk stopped it (the last good checkpoint is kept: fix the cause and\n"
                "rerun); 75 a stop (SIGUSR1, SIGTERM, Ctrl-C): the checkpoint is kept, the same command continues;\n"
                "130 a second Ctrl-C: stopped at once, the same command continues from the newest checkpoint;\n"
                "128 + a signal's number: a rank killed (137: SIGKILL, e.g. the out-of-memory killer)")


def restore_arguments(p: argparse.ArgumentParser) -> None:
    from dist_dejpeg.restore.images import DEFAULT_MAX_PIXELS  # numpy and PIL, no torch

    p.add_argument("inputs", nargs="*", help="image files, folders (searched recursively) or globs (quote them: "
                                             "'photos/**/*.jpg')")
    p.add_argument("-i", "--input", dest="more_inputs", action="extend", nargs="+", default=[], metavar="IN",
                   help="more inputs, as the positional ones (Real-ESRGAN's -i; repeatable)")
    p.add_argument("-o", "--out", "--output", dest="out", required=True,
                   help="output folder: outputs keep the inputs' names and sub-folders (below a folder, or below "
                        "a glob's fixed part; from two folders or globs or more, each one's below its name); inputs "
                        "that would share a name, in any case, each keep their extension in it "
                        "(a.jpg, a.png -> a.jpg.png, a.png.png). For one image, a file name with an image suffix "
                        "(photo.png, photo.jpg, ...) is the output file, in that suffix's format")
    add_restorer_args(p)
    p.add_argument("--tile-pad", "--tile_pad", dest="tile_pad", type=at_least(0), default=argparse.SUPPRESS,
                   metavar="P",
                   help="Real-ESRGAN's tile padding: P pixels of context on each side of a tile; here the same as "
                        "--overlap 2P (neighbouring tiles share 2P pixels, blended linearly)")
    formats = [*OUTPUT_FORMATS, SAME_FORMAT]
    p.add_argument("--format", choices=formats, default="png",
                   help="png: lossless; jpg: quality 95, 4:4:4 (full-resolution chroma), optimized; webp: "
                        "lossless; tiff: lossless, deflate-compressed (raw with a camera's EXIF); same: a JPEG stays "
                        "a JPEG (q95, 4:4:4), a PNG a PNG, a WebP a WebP, under its own suffix, anything else png")
    p.add_argument("--ext", dest="format", choices=["auto", *OUTPUT_FORMATS], default=argparse.SUPPRESS,
                   help="Real-ESRGAN's name for --format (auto: same)")
    p.add_argument("--output-quality", type=jpeg_quality, default=None, metavar="Q",
                   help="write jpg and webp outputs at quality Q (default: jpg 95, webp lossless)")
    p.add_argument("--suffix", default="", metavar="S",
                   help="added to every output's name: photo.jpg -> photo_S.png (no '_' added when S starts "
                        "with another character: --suffix=-S, --suffix=.S)")
    p.add_argument("--input-quality", type=jpeg_quality, default=None, metavar="Q",
                   help="the inputs' JPEG quality, for all of them (default: estimated per image, from its "
                        "quantization tables or its pixels)")
    p.add_argument("--quality", dest="input_quality", type=jpeg_quality, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the name before --input-quality
    p.add_argument("--verbose", action="store_true",
                   help="one line per image: its quality and the decision (not with --quiet)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    p.add_argument("--fp32", dest="precision", action="store_const", const="fp32", default=argparse.SUPPRESS,
                   help="--precision fp32 (Real-ESRGAN's name)")
    p.add_argument("--max-pixels", type=at_least(1), default=DEFAULT_MAX_PIXELS,
                   help="refuse larger images (decompression bombs)")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave outputs of the same photo, as it is now, that already exist and decode fully (counted "
                        "as skipped); an output of an input changed since is restored again")
    p.add_argument("--strip-gps", action="store_true",
                   help="write the outputs without the location: the EXIF's GPS and the XMP's exif:GPS* (a "
                        "passed-through JPEG stays its input's data, bit for bit, without them)")
    records = p.add_mutually_exclusive_group()
    records.add_argument("--record", metavar="PATH", type=record_file, default=None,
                   help="append one JSON line per file to PATH as its result is final: time, status (restored, "
                        "passed through, skipped, left alone, failed, not begun), source, source_bytes, output, "
                        "quality, quality_from, reason, error, seconds, model (default: OUT/restore-record.jsonl "
                        "for an output folder, none for one output file; reruns append)")
    records.add_argument("--no-record", action="store_true", help="write no record")
    p.add_argument("--quiet", action="store_true", help="no progress (a bar on a terminal; without one, a log "
                                                        "line at each tenth of the images), no per-image lines")
    p.epilog = ("exit codes: 0 every image restored (or passed through, or skipped); 1 some failed (each is listed\n"
                "with its reason; the others are written); 2 a usage error, a bad model or an unwritable output\n"
                "folder; 3 the disk full or the quota used up (rerun with --skip-existing once there is room); 130\n"
                "Ctrl-C (the counts and failures so far printed first; rerun with --skip-existing)")


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    add_evaluation_args(p, [10, 20, 30, 40])
    p.add_argument("-o", "--out", required=True, help="folder for metrics.json, metrics.csv, metrics.md")


def report_arguments(p: argparse.ArgumentParser) -> None:
    add_evaluation_args(p, [10, 40])
    p.add_argument("-o", "--out", required=True, type=html_page,
                   help="the HTML file to write, .html or .htm (tables go beside it)")
    p.add_argument("--crop", type=at_least(1), default=192, help="crop size in pixels")


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="generator.safetensors, a run folder or a checkpoint folder")
    p.add_argument("--onnx", "-o", "--out", dest="onnx", required=True, metavar="OUT", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (the exporter's default otherwise)")
    p.add_argument("--check-image", metavar="PATH", default=None,
                   help="photo for the onnxruntime-vs-PyTorch check (default: scikit-image's astronaut)")


def status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="the run folder (train.run_dir); several, or a folder of runs (a sweep's): one line each, "
                        "ending with a 'config differs' column of the config values that differ between them")
    p.add_argument("--json", action="store_true",
                   help="for scripts: one JSON object for one run folder; a list for several, or a folder of runs "
                        "(however many it holds), each with config_differs ({full key: value} of those values)")


def compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("evaluations", nargs="+", metavar="EVAL",
                   help="folders `evaluate -o` wrote (or their metrics.json, or report pages): the first is the "
                        "baseline")
    p.add_argument("--metrics", nargs="+", default=["psnr", "ssim", "lpips"], metavar="M",
                   help=f"which metrics: {', '.join(EVALUATED)}")
    p.add_argument("-o", "--out", default=None, type=comparison_file,
                   help="also write the comparison to this file: Markdown tables (.md, .markdown, .txt), or JSON "
                        "(.json); other names are refused")
    p.add_argument("--json", action="store_true", help="the comparison as JSON, for scripts")
