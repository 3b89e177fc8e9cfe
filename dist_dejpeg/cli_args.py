"""The arguments of each ``dist-dejpeg`` subcommand (dist_dejpeg.cli holds the table that uses them): argparse
only, importing no torch, so that ``--help`` is instant."""

from __future__ import annotations

import argparse

from dist_dejpeg.jpeg.formats import OUTPUT_FORMATS, TILE_FORMATS


def add_restorer_args(p: argparse.ArgumentParser) -> None:
    """The model and how it runs: shared by restore, evaluate and report."""
    p.add_argument("--model", required=True, help="generator.safetensors, a run folder or a checkpoint folder")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--tile", type=int, default=512, help="tile size in pixels, a multiple of 32 (0: whole images)")
    p.add_argument("--overlap", type=int, default=64, help="overlap between tiles, blended linearly")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    p.add_argument("--no-guard", action="store_true", help="restore every image, even where the model's "
                                                           "validation predicts no gain at its quality")


def add_evaluation_args(p: argparse.ArgumentParser, default_qualities: list[int]) -> None:
    add_restorer_args(p)
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


def prepare_arguments(p: argparse.ArgumentParser) -> None:
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


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see configs/); schema defaults otherwise")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint of train.run_dir (what train.auto_resume does by "
                        "default), or from the given folder")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="log level of rank 0 (train.log_level; other ranks log warnings and errors)")
    p.add_argument("--get", metavar="KEY", help="print one resolved config value (e.g. train.run_dir) and exit")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. data.batch_size=8)")


def restore_arguments(p: argparse.ArgumentParser) -> None:
    from dist_dejpeg.restore.images import DEFAULT_MAX_PIXELS  # numpy and PIL, no torch

    p.add_argument("inputs", nargs="+", help="image files, folders or globs (quote globs: 'photos/**/*.jpg')")
    p.add_argument("-o", "--out", required=True, help="output folder (same relative names, lossless)")
    add_restorer_args(p)
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="png", help="lossless output format")
    p.add_argument("--quality", type=int, default=None,
                   help="the inputs' JPEG quality (default: read from each JPEG's quantization tables)")
    p.add_argument("--verbose", action="store_true", help="one line per image: its quality and the decision")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger images (decompression bombs); default {DEFAULT_MAX_PIXELS / 1e6:.0f} MP")
    p.add_argument("--skip-existing", action="store_true", help="leave outputs that already exist and decode fully")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    add_evaluation_args(p, [10, 20, 30, 40])
    p.add_argument("-o", "--out", required=True, help="folder for metrics.json, metrics.csv, metrics.md")


def report_arguments(p: argparse.ArgumentParser) -> None:
    add_evaluation_args(p, [10, 40])
    p.add_argument("-o", "--out", required=True, help="the HTML file to write (tables go beside it)")
    p.add_argument("--crop", type=int, default=192, help="crop size in pixels")


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="generator.safetensors, a run folder or a checkpoint folder")
    p.add_argument("--onnx", required=True, metavar="OUT", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (the exporter's default otherwise)")
    p.add_argument("--check-image", metavar="PATH", default=None,
                   help="photo for the onnxruntime-vs-PyTorch check (default: scikit-image's astronaut)")


def status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run folder (train.run_dir)")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
