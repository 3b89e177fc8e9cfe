"""Restoring many files: images named by files, folders (searched recursively) and globs, into an output
folder under the same relative names, never stopping at a bad file.

    from dist_dejpeg.restore.files import restore_files
    results = restore_files(Restorer("runs/debug"), ["photos/", "*.jpg"], "restored/")
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass
from pathlib import Path

from dist_dejpeg.jpeg.formats import IMAGE_SUFFIXES, OUTPUT_FORMATS
from dist_dejpeg.jpeg.quality import estimate_quality
from dist_dejpeg.restore.images import DEFAULT_MAX_PIXELS, InputImageError, load_image, save_image
from dist_dejpeg.restore.restorer import Restorer



@dataclass
class RestoreResult:
    source: str
    output: str | None = None
    error: str | None = None
    seconds: float = 0.0
    megapixels: float = 0.0
    quality: int | None = None  # the JPEG quality used (None: unknown)
    quality_from: str = ""  # "given" (--quality), "file tables", or why it is unknown
    passthrough: bool = False  # written unchanged: no gain predicted at this quality
    note: str = ""  # the restore decision's reason


def collect_inputs(inputs: list[str]) -> tuple[list[tuple[Path, Path]], list[RestoreResult]]:
    """(file, output path relative to the output folder) for every image named by ``inputs`` (files, folders
    searched recursively for image suffixes, globs), in order, each once; and a failure for each input that
    names nothing."""
    found, failures, seen = [], [], set()

    def add(path: Path, rel: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append((path, rel))

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                failures.append(RestoreResult(item, error=f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder"))
            for p in files:
                add(p, p.relative_to(path))
        elif path.is_file():
            add(path, Path(path.name))
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                failures.append(RestoreResult(item, error="no such file, and no file matches it as a glob"))
            for p in matches:
                add(p, Path(p.name))
    return found, failures


def check_output_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` and prove it is writable before any work is done; an InputImageError otherwise."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".dist_dejpeg_write_test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InputImageError(f"output folder {out} is not writable "
                              f"({type(err).__name__}: {err.strerror or err})") from None
    return out


def restore_files(restorer: Restorer, inputs: list[str], out_dir: str | Path, *, fmt: str = "png",
                  max_pixels: int = DEFAULT_MAX_PIXELS, skip_existing: bool = False,
                  progress: bool = True, quality: int | None = None) -> list[RestoreResult]:
    """Restore every image ``inputs`` names into ``out_dir`` (same relative name, ``fmt`` suffix). Never stops
    at a bad file: each result carries its error. The output folder is checked before anything runs. Each
    image's quality is ``quality`` when given, else read from its JPEG tables, else unknown."""
    from tqdm import tqdm

    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    out = check_output_dir(out_dir)
    files, results = collect_inputs(inputs)
    sources = {p.resolve() for p, _ in files}
    claimed: dict[Path, Path] = {}
    for path, rel in tqdm(files, desc="restore", unit="image", disable=not progress):
        target = out / rel.with_suffix(f".{fmt}")
        result = RestoreResult(str(path))
        results.append(result)
        key = target.resolve()
        if key in sources:
            result.error = f"refusing to overwrite an input: the output would be {target}"
            continue
        if key in claimed:
            result.error = f"output {target} is also the output of {claimed[key]}: restore them into different folders"
            continue
        claimed[key] = path
        if skip_existing and target.exists():
            result.output = str(target)
            continue
        start = time.perf_counter()
        try:
            image = load_image(path, max_pixels)
            if quality is not None:
                result.quality, result.quality_from = int(quality), "given"
            else:
                est = estimate_quality(image.image) if image.image is not None else None
                result.quality = est.quality if est else None
                result.quality_from = ("file tables" if result.quality is not None
                                       else (est.reason if est else f"not a JPEG ({image.format})"))
            restored = restorer.restore_array(image.rgb, result.quality)
            decision = restorer.last_decision
            result.passthrough, result.note = decision.passthrough, decision.reason
            target.parent.mkdir(parents=True, exist_ok=True)
            save_image(restored, target, alpha=image.alpha, grayscale=image.grayscale)
        except (InputImageError, OSError, ValueError, RuntimeError) as err:
            result.error = str(err) if isinstance(err, InputImageError) else f"{type(err).__name__}: {err}"
            continue
        result.output = str(target)
        result.seconds = time.perf_counter() - start
        result.megapixels = image.rgb.shape[0] * image.rgb.shape[1] / 1e6
    return results
