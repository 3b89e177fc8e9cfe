"""Restore speed: what a user waits for (``dist-dejpeg restore`` from the shell on a 512 px photo, a 2000 x 1500
one and a 12 MP one: wall seconds, peak memory) and the restoring alone (in one process, warm), on the CPU and
(when present) the GPU, through the same restorers that ``dist-dejpeg restore`` uses: the PyTorch generator
file and its ONNX export (onnxruntime, torch never imported), side by side.

    dist-dejpeg bench infer                          # CPU: configs/debug.yaml's generator, and its ONNX export
    dist-dejpeg bench infer --config configs/div2k.yaml --no-shell --no-onnx

Shell rows: ``python -m dist_dejpeg.cli restore photo.jpg -o OUT --model M --device cpu`` in a fresh process, per
size, with the command's defaults, on skimage's astronaut resized, saved as a q20 JPEG (restored, not passed
through); start to exit (imports, model load, decode, restore, PNG encode); the child's own peak RSS and minor page
faults (``os.wait4``: LAUNCHER). Restore rows: ``Restorer.restore_array`` on a uint8 image (tiling, blending; not
decoding, encoding), median of ``--repeats``; whole (one pass) and tiled (512 px tiles, 64 px overlap, the Restorer's
batch: 1 on the CPU, 8 on a GPU), fp32 and bf16 autocast; the ONNX export's in fp32 on the CPU. The generator: the
config's, random weights, loaded from a file as ``restore`` does; the ONNX rows export it once (``dist-dejpeg
export``'s code, ~1 min on 2 cores), skipped with the reason where onnx, onnxruntime or onnxscript is missing.

Order (issue 24): the GPU rows first, in a section of their own, written after each block (``infer.json``'s pending:
what is still to come), the host-bound ones (folder, projection) last; then the CPU rows (shell, ONNX export,
restore; ``--no-cpu``: none): a step stopped for time keeps what it measured. On a GPU the tiled rows run with the
Restorer's CUDA graphs and again without (``GPU_MODES``); a 12 MP photo too (``GPU_SIZES``); a float tensor on the
GPU in and out (``TENSOR``: no host copies); file to file (``FILE``: decode, restore, PNG encode) at restore's
default precision; the fp32 and bf16 outputs' PSNR against the clean photo (issue 24: bf16 faster, within 0.05 dB of
fp32); the projection onto the JPEG's cells that restore adds (``CONFORM``, 12 MP: the Restorer's on the GPU, numpy's
on the host); a folder of 12 MP JPEGs into PNGs with 2 decode/encode threads and with restore's default (``FOLDER``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dist_dejpeg.bench.common import add_common_arguments, config_of, measure, spread_text, write_results
from dist_dejpeg.config import load_config
from dist_dejpeg.metrics.fullref import psnr

SIZES = {"512 x 512": (512, 512), "2040 x 1356 (DIV2K 2K)": (1356, 2040)}
MODES = {"whole": dict(tile=0), "tiled 512/64": dict(tile=512, overlap=64)}
GPU_MODES = {"tiled 512/64 eager (no CUDA graphs)": dict(tile=512, overlap=64, cuda_graphs=False)}  # GPU rows only
# GPU rows only (issue 24's targets): a 12 MP photo too (tiled: whole, its attention would not fit), and at 2K a float
# tensor already on the GPU in and out (TENSOR: restore_2k_ms in gpu-summary.json) and file to file (FILE)
GPU_SIZES = {"12 MP (4000 x 3000)": (3000, 4000)}
WHOLE_MAX_PIXELS = 4_000_000
TILED = dict(tile=512, overlap=64)
TENSOR, FILE = "tensor in/out, tiled 512/64", "file to file (q20 JPEG -> PNG), tiled 512/64"
# the projection onto a JPEG file's cells that restore adds to a JPEG's restore (half-width 0.35): on the GPU, as a GPU
# Restorer does it from restore's encode threads, and the host's numpy (one image's, beside it) for comparison
CONFORM = "consistency projection"
# a folder of JPEGs of the largest size restored to PNGs by restore_files: two decode/encode threads (its old default
# on a GPU) and its default (one per core, 2 to files.MAX_IO_THREADS), side by side; ms per file
FOLDER, FOLDER_FILES = "folder, q20 JPEGs -> PNGs", 4
# the targets on 2 cores (issue 22): (height, width) -> wall seconds, peak RSS GB from the shell
SHELL_SIZES = {"512 x 512": (512, 512), "2000 x 1500": (1500, 2000), "12 MP (4000 x 3000)": (3000, 4000)}
QUALITY = 20  # the photos' JPEG quality: read from the tables, restored


def _gpus() -> list:
    import torch

    return [torch.device("cuda", 0)] if torch.cuda.is_available() else []


def clean_photo(h: int, w: int) -> np.ndarray:
    """A real photo (skimage's astronaut) resized to h x w."""
    import skimage.data
    from PIL import Image

    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((w, h), Image.BICUBIC))


def jpeg_photo(h: int, w: int) -> bytes:
    """clean_photo as a q20 JPEG file's bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(clean_photo(h, w)).save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def photo(h: int, w: int) -> np.ndarray:
    """jpeg_photo's pixels."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(jpeg_photo(h, w))).convert("RGB"))


# Runs the command given as its arguments and prints its wall time and rusage as JSON (the last line). The
# measured process is this small launcher's child, not the bench's: Linux keeps the peak RSS (ru_maxrss)
# across exec, and a child that the bench (holding torch and a model: ~1 GB) spawned directly would report
# the bench's own peak as its own.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - start, "code": os.waitstatus_to_exitcode(status),
                  "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_mb": usage.ru_maxrss / 1024,
                  "minor_faults": usage.ru_minflt}))
"""


def shell_restore(model: Path, h: int, w: int, folder: Path) -> dict:
    """``dist-dejpeg restore`` on an h x w q20 JPEG in a fresh process: wall seconds, peak RSS, page faults."""
    src = folder / f"photo_{w}x{h}.jpg"
    if not src.exists():
        src.write_bytes(jpeg_photo(h, w))
    cmd = [sys.executable, "-m", "dist_dejpeg.cli", "restore", str(src), "-o", str(folder / "out"), "--model",
           str(model), "--device", "cpu", "--quiet"]
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace")
    lines = done.stdout.strip().splitlines()
    row = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"code": done.returncode}
    if done.returncode != 0 or row.pop("code") != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}")
    return dict(row, ms_per_megapixel=1000 * row["wall_s"] / (h * w / 1e6))


def export_for_bench(model: Path, onnx_path: Path) -> tuple[Path | None, dict]:
    """``model`` exported to ``onnx_path`` (None and the reason where the ONNX packages are missing)."""
    from dist_dejpeg.models.names import OnnxUnavailable, require_onnx

    try:
        require_onnx()
    except OnnxUnavailable as err:
        print(f"bench infer: ONNX rows skipped: {err}", flush=True)
        return None, {"skipped": str(err)}
    from dist_dejpeg.models.onnx_export import export_model

    logging.disable(logging.INFO)  # the exporter logs hundreds of INFO lines
    try:
        result, _ = export_model(model, onnx_path, log=lambda *args: None)
    finally:
        logging.disable(logging.NOTSET)
    print(f"bench infer: exported {onnx_path.name} in {result['export_s']} s", flush=True)
    return onnx_path, {"export_s": result["export_s"], "max_abs_diff": result["max_abs_diff"]}


def save_bench_generator(model_cfg, path: Path) -> Path:
    """A random-init generator of ``model_cfg`` for the timings, its output layer drawn (seed 0) instead of zero:
    a zero-init head returns the input in any precision, and bf16's PSNR deviation from fp32 would read 0."""
    import torch

    from dist_dejpeg.models.generator_file import save_generator
    from dist_dejpeg.models.unet import build_generator

    generator = build_generator(model_cfg).eval()
    with torch.no_grad():
        torch.nn.init.normal_(generator.head.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    save_generator(generator, model_cfg, path)
    return path


def save_stand_in_alexnet(path: Path, seed: int = 0) -> dict:
    """A random AlexNet file in torchvision's layout (features.{0,3,6,8,10}.{weight,bias}, He-scaled) at ``path``,
    for timing evaluate's LPIPS where the ImageNet one cannot be downloaded: its time and memory are LPIPS's, its
    values are not. Returns the state written."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for idx, (cout, cin, k) in {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3),
                                10: (256, 256, 3)}.items():
        state[f"features.{idx}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5
        state[f"features.{idx}.bias"] = torch.randn(cout, generator=g) * 0.01
    torch.save(state, path)
    return state


def gpu_rows(device, path: Path, folder: Path, sizes: dict, repeats: int, add_row, results: dict):
    """The GPU section's own rows (issue 24), after its restore rows: a float tensor on the device in and out (every
    size in ``sizes``) in fp32 and bf16, the two precisions' PSNR against the clean photo at 2K (bf16 within 0.05 dB
    of fp32), and file to file at restore's default precision. ``add_row(device, precision, mode, label, h, w,
    timing)`` files a timed row; ``results`` takes the PSNR entry. Returns the restorer (folder_rows, conform_rows')."""
    import torch

    from dist_dejpeg.restore import open_restorer
    from dist_dejpeg.restore.files import restore_files

    label = next((k for k in sizes if k.startswith("2040")), list(sizes)[-1])  # (tests: a small one)
    h, w = sizes[label]
    outputs = {}
    for precision in ("fp32", "bf16"):
        restorer = open_restorer(path, device=str(device), precision=precision, **TILED)
        for size, (hh, ww) in sizes.items():
            x = torch.from_numpy(photo(hh, ww).copy()).to(device).permute(2, 0, 1).float().div_(255)
            add_row(device, precision, TENSOR, size, hh, ww,
                    measure(lambda: restorer.restore_tensor(x, QUALITY), warmup=2, steps=5, repeats=repeats,
                            device=device))
        outputs[precision] = restorer.restore_array(photo(h, w), QUALITY)
    clean = clean_photo(h, w)
    fp32, bf16 = psnr(outputs["fp32"], clean), psnr(outputs["bf16"], clean)
    results[f"{device.type} bf16 vs fp32 {label}"] = {"psnr_fp32_db": fp32, "psnr_bf16_db": bf16,
                                                      "bf16_minus_fp32_db": bf16 - fp32}
    print(f"bench infer: {label} PSNR against the clean photo: fp32 {fp32:.3f} dB, bf16 {bf16:.3f} dB", flush=True)
    restorer = open_restorer(path, device=str(device), **TILED)  # restore's default precision on this device
    src = folder / "photo_2k.jpg"
    src.write_bytes(jpeg_photo(h, w))
    add_row(device, "bf16" if restorer.bf16 else "fp32", FILE, label, h, w,
            measure(lambda: restore_files(restorer, [str(src)], folder / "out_gpu", progress=False), warmup=1,
                    steps=1, repeats=repeats, device=device))
    return restorer


def _largest(sizes: dict) -> tuple[str, int, int]:
    label = max(sizes, key=lambda k: sizes[k][0] * sizes[k][1])
    return label, *sizes[label]


def folder_rows(restorer, device, folder: Path, sizes: dict, add_row) -> None:
    """FOLDER's rows: FOLDER_FILES JPEGs of the largest of ``sizes`` restored into PNGs, ms per file."""
    from dataclasses import replace

    from dist_dejpeg.restore.files import MAX_IO_THREADS, restore_files
    from dist_dejpeg.run.pool import pool_size

    label, h, w = _largest(sizes)
    src = folder / "folder_in"
    src.mkdir(exist_ok=True)
    data = jpeg_photo(h, w)
    for i in range(FOLDER_FILES):
        (src / f"{i}.jpg").write_bytes(data)
    for threads in sorted({2, max(2, pool_size(0, MAX_IO_THREADS))}):  # (one row where the default is 2)
        timing = measure(lambda: restore_files(restorer, [str(src)], folder / f"folder_out{threads}", progress=False,
                                               workers=threads), warmup=0, steps=1, repeats=2, device=device)
        add_row(device, "bf16" if restorer.bf16 else "fp32", f"{FOLDER}, {threads} decode/encode threads",
                f"{label}: per file of {FOLDER_FILES}", h, w,
                replace(timing, seconds_per_call=timing.seconds_per_call / FOLDER_FILES))


def conform_rows(restorer, device, sizes: dict, repeats: int, add_row) -> None:
    """CONFORM's rows at the largest of ``sizes``: ``restorer.conform`` (on its GPU) and numpy's on the host."""
    import torch
    from PIL import Image

    from dist_dejpeg.jpeg.consistency import NotConsistent, conform, read_cells

    label, h, w = _largest(sizes)
    data = jpeg_photo(h, w)
    try:
        cells = read_cells(data)
    except NotConsistent as err:
        print(f"bench infer: {CONFORM} rows skipped: {err}", flush=True)
        return
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    add_row(device, "fp32", f"{CONFORM} (Restorer.conform)", label, h, w,
            measure(lambda: restorer.conform(image, cells, 1, 0.35), warmup=1, steps=3, repeats=repeats, device=device))
    add_row(torch.device("cpu"), "fp32", f"{CONFORM} (numpy, host)", label, h, w,
            measure(lambda: conform(image, cells, 1, 0.35), warmup=0, steps=1, repeats=repeats,
                    device=torch.device("cpu")))


def run(config: str, overrides: list[str], out_dir: str | Path, *, repeats: int = 3, name: str = "infer",
        sizes: dict | None = None, modes: dict | None = None, shell: dict | None = None, onnx: bool = False,
        cpu: bool = True, gpus: list | None = None) -> dict:
    """The restore rows for ``sizes`` x ``modes`` on each device and precision, the GPUs' first (with ``GPU_MODES``
    where ``modes`` is not given; the results written after each block); then, with ``cpu``, the CPU's: with
    ``shell`` (label -> (h, w), e.g. SHELL_SIZES), the shell rows first; with ``onnx``, the same for the ONNX export
    (CPU, fp32; each shell row after PyTorch's). ``gpus``: the GPUs to measure (None: CUDA device 0 if any)."""
    import torch

    from dist_dejpeg.restore import open_restorer

    cfg = load_config(config, list(overrides))
    gpu_modes = {**(modes or MODES), **({} if modes else GPU_MODES)}
    gpu_sizes = {**(sizes or SIZES), **({} if sizes else GPU_SIZES)}
    sizes, modes = sizes or SIZES, modes or MODES
    gpus = [torch.device(d) for d in (_gpus() if gpus is None else gpus)]
    if not cpu and not gpus:
        raise ValueError("--no-cpu on a machine without a GPU leaves nothing to measure")
    results, shell_results, onnx_report = {}, {}, {}
    sections: dict[str, list] = {"GPU": [], "CPU": []}  # table rows

    def add_row(device, precision: str, mode: str, label: str, h: int, w: int, timing) -> None:
        megapixels = h * w / 1e6
        key = f"{device.type} {precision} {mode} {label}"
        ms = timing.as_dict()["ms_per_call"]
        results[key] = dict(timing.as_dict(), ms_per_megapixel=ms / megapixels)
        what = "OnnxRestorer" if precision == "onnx" else "Restorer"
        sections["CPU" if device.type == "cpu" else "GPU"].append(
            [device.type, precision.replace("onnx", "fp32"), f"{what} {mode}", label, f"{ms:.0f}",
             f"{ms / megapixels:.0f}", "", spread_text(timing.spread)])
        print(f"bench infer: {key}: {ms:.1f} ms", flush=True)

    def restore_rows(device, precision: str, path: Path, device_modes: dict, device_sizes: dict) -> None:
        cpu_row = device.type == "cpu"
        for mode, kwargs in device_modes.items():
            if precision == "onnx" and not kwargs.get("tile"):  # onnx_backend.MAX_SCORES_BYTES: tiles only
                continue
            restorer = open_restorer(path, device=str(device), precision=precision.replace("onnx", "fp32"),
                                     **kwargs)
            for label, (h, w) in device_sizes.items():
                if not kwargs.get("tile") and h * w > WHOLE_MAX_PIXELS:
                    continue
                image = photo(h, w)
                add_row(device, precision, mode, label, h, w,
                        measure(lambda: restorer.restore_array(image, QUALITY), warmup=1 if cpu_row else 2,
                                steps=1 if cpu_row else 5, repeats=repeats, device=device))

    def write(pending: str | None) -> dict:
        report = {"config": config, "overrides": list(overrides), "encoder": cfg.model.encoder,
                  "decoder_width": cfg.model.decoder_width, "torch_threads": torch.get_num_threads(),
                  "gpus": [str(d) for d in gpus],
                  "what": "shell: dist-dejpeg restore of one q20 JPEG in a fresh process; restore: "
                          "Restorer.restore_array on a uint8 image, warm",
                  "modes": {k: dict(v) for k, v in modes.items()},
                  "gpu_modes": {k: dict(v) for k, v in gpu_modes.items()}, "onnx": onnx_report,
                  "shell": shell_results, "results": results, "pending": pending}
        skipped = f" ONNX rows skipped: {onnx_report['skipped']}." if "skipped" in onnx_report else ""
        not_run = [what for what, ran in (("shell", shell), ("ONNX", onnx), ("CPU", cpu)) if not ran]
        if not_run:  # (bench all, --no-shell, --no-onnx, --no-cpu): said, not left for the reader to notice
            skipped += f" Not measured in this run: the {', '.join(not_run)} rows (`bench infer` runs them)."
        if not gpus:
            skipped += " No GPU rows: no CUDA device on this machine."
        note = (f"`{config}` {' '.join(overrides)}: {cfg.model.encoder}, decoder width {cfg.model.decoder_width}, "
                f"random weights, {torch.get_num_threads()} torch threads. GPU rows first, then the CPU rows, each "
                f"in its own section. Shell: `dist-dejpeg restore photo.jpg -o OUT --model M --device cpu` in a "
                f"fresh process (imports, model load, decode, restore, PNG encode), its wall time and peak RSS; M "
                f"the generator file (PyTorch) or its ONNX export (onnxruntime: torch is not imported). Restorer / "
                f"OnnxRestorer: `restore_array` on a uint8 image, warm (tiling, blending included; decoding/"
                f"encoding not), median of {repeats}. Whole: one pass (not for ONNX, whose attention holds its "
                f"whole score matrix: a 2K image needs > 20 GB); tiled: 512 px tiles overlapping 64 px (on a GPU "
                f"8 per batch, replayed as a CUDA graph; eager: without the graph). Other processes running at "
                f"the same time slow the wall times: see the date and compare rows of one file only.{skipped}"
                + (f" Incomplete: {pending} still to measure." if pending else ""))
        table = [row for title, rows in sections.items() if rows
                 for row in [[f"**{title} rows**"] + [""] * 7] + rows]
        write_results(out_dir, name, report, "Restore speed", note,
                      ["device", "precision", "what", "image", "ms", "ms per megapixel", "peak RSS MB", "spread"],
                      table, echo=pending is None)
        return report

    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        model = save_bench_generator(cfg.model, Path(tmp) / "generator.safetensors")
        # GPU blocks first, each written when measured (a step stopped for time keeps them), the host-bound ones last
        todo = [f"{d} {what} rows" for d in gpus for what in ("fp32 restore", "bf16 restore", "tensor and file")]
        todo += [f"{d} {what} rows" for d in gpus for what in ("folder", CONFORM)] + ["the CPU rows"] * cpu

        def measured(block: str) -> None:
            todo.remove(block)
            if todo:  # (after the last block: run's closing write)
                write(", ".join(todo))

        restorers = []
        for device in gpus:
            for precision in ("fp32", "bf16"):
                restore_rows(device, precision, model, gpu_modes, gpu_sizes)
                measured(f"{device} {precision} restore rows")
            restorers.append(gpu_rows(device, model, Path(tmp), gpu_sizes, repeats, add_row, results))
            measured(f"{device} tensor and file rows")
        for device, restorer in zip(gpus, restorers):
            folder_rows(restorer, device, Path(tmp), gpu_sizes, add_row)
            measured(f"{device} folder rows")
            conform_rows(restorer, device, gpu_sizes, repeats, add_row)
            measured(f"{device} {CONFORM} rows")
        if cpu:
            onnx_path, onnx_report = export_for_bench(model, Path(tmp) / "generator.onnx") if onnx else (None, {})
            backends = {"PyTorch": model, **({"onnxruntime": onnx_path} if onnx_path else {})}
            for label, (h, w) in (shell or {}).items():
                for backend, path in backends.items():
                    row = shell_restore(path, h, w, Path(tmp))
                    shell_results[f"{backend} {label}"] = row
                    sections["CPU"].append(["cpu (shell)", "fp32", f"dist-dejpeg restore ({backend})", label,
                                            f"{1000 * row['wall_s']:.0f}", f"{row['ms_per_megapixel']:.0f}",
                                            f"{row['max_rss_mb']:.0f}", "1 run"])
                    print(f"bench infer: shell {backend} {label}: {row['wall_s']:.1f} s, "
                          f"{row['max_rss_mb']:.0f} MB", flush=True)
            for precision in ("fp32", "bf16"):
                restore_rows(torch.device("cpu"), precision, model, modes, sizes)
            if onnx_path:
                restore_rows(torch.device("cpu"), "onnx", onnx_path, modes, sizes)
    return write(None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "infer")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    parser.add_argument("--no-shell", action="store_true",
                        help="skip the shell rows (dist-dejpeg restore of a 512 px, 2000 x 1500 and 12 MP photo)")
    parser.add_argument("--no-onnx", action="store_true",
                        help="skip the ONNX rows (they export the model first: ~1 min on 2 cores)")
    parser.add_argument("--no-cpu", action="store_true",
                        help="skip every CPU row (shell, ONNX, Restorer on the CPU): the GPU rows alone")


def main(args: argparse.Namespace) -> int:
    config, overrides = config_of(args)
    if args.no_cpu and not _gpus():
        print("bench infer: --no-cpu on a machine without a GPU leaves nothing to measure", file=sys.stderr)
        return 2
    run(config, overrides, Path(args.results), repeats=args.repeats, name=args.name,
        shell=None if args.no_shell else SHELL_SIZES, onnx=not args.no_onnx, cpu=not args.no_cpu)
    return 0
