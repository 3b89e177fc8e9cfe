"""Restoring many files: images named by files, folders (searched recursively) and globs, into an output
folder under the same relative names, never stopping at a bad file.

    from dist_dejpeg.restore.files import restore_files
    results = restore_files(Restorer("runs/debug"), ["photos/", "*.jpg"], "restored/")

Each output is written atomically (a hidden ``.NAME.tmpPID`` renamed into place), so an output that exists is
whole unless something else wrote it. A killed restore can leave those temp files: the next restore into the
same folder removes the ones of its own outputs that are stale, i.e. whose writer's pid is not alive on this
host or that are older than ``STALE_TEMP_S`` (a write takes seconds; the age covers a reused pid). Restores
from two hosts into one folder at once are not supported: they would overwrite each other's outputs anyway.
``skip_existing`` skips an output only when it decodes fully as its format (``output_complete``).
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from dist_dejpeg.jpeg.formats import IMAGE_SUFFIXES, OUTPUT_FORMATS
from dist_dejpeg.jpeg.quality import estimate_quality
from dist_dejpeg.restore.images import DEFAULT_MAX_PIXELS, InputImageError, load_image, output_complete, save_image
from dist_dejpeg.restore.restorer import Restorer
from dist_dejpeg.run.files import TEMP_NAME
from dist_dejpeg.run.lock import pid_alive

log = logging.getLogger(__name__)

STALE_TEMP_S = 600  # a temp file of an output this old is stale whatever its pid says


class OutputError(ValueError):
    """An output folder or file that cannot be written."""


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
    skipped: bool = False  # a complete output existed (skip_existing): nothing was done


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
    """Create ``out_dir`` and prove it is writable before any work is done (restore, evaluate, report); an
    OutputError otherwise."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".dist_dejpeg_write_test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"output folder {out} is not writable "
                          f"({type(err).__name__}: {err.strerror or err})") from None
    return out


def check_output_file(path: str | Path) -> Path:
    """``check_output_dir`` for the folder of the file ``path``, which must not be a folder itself."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a folder: give a file name (e.g. {path / 'report.html'})")
    check_output_dir(path.parent)
    return path


def remove_stale_temps(targets: list[Path], max_age_s: float = STALE_TEMP_S, keep: frozenset | set = frozenset()
                       ) -> list[Path]:
    """Remove the temp files a killed writer left beside ``targets`` (``.NAME.tmpPID``, NAME one of theirs):
    those whose pid is not alive on this host, or older than ``max_age_s``; never a resolved path in ``keep``
    (the inputs). One listing per folder."""
    names: dict[Path, set[str]] = defaultdict(set)
    for target in targets:
        names[target.parent].add(target.name)
    removed, now = [], time.time()
    for folder, wanted in names.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:  # not created yet: nothing left there
            continue
        for entry in entries:
            match = TEMP_NAME.match(entry.name)
            if match is None or match["name"] not in wanted:
                continue
            try:
                if not entry.is_file(follow_symlinks=False) or Path(entry.path).resolve() in keep:
                    continue
                if pid_alive(int(match["pid"])) and now - entry.stat(follow_symlinks=False).st_mtime < max_age_s:
                    continue
                os.unlink(entry.path)
            except OSError:
                continue
            removed.append(Path(entry.path))
    return removed


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
    targets = [out / rel.with_suffix(f".{fmt}") for _, rel in files]
    stale = remove_stale_temps(targets, keep=sources)
    if stale:
        log.info("removed %d temp file(s) a killed restore left in %s", len(stale), out)
    claimed: dict[Path, Path] = {}
    for (path, rel), target in tqdm(list(zip(files, targets)), desc="restore", unit="image", disable=not progress):
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
            if output_complete(target, max_pixels):
                result.output, result.skipped = str(target), True
                continue
            log.warning("%s exists but does not decode fully (a truncated or foreign file): restoring it again",
                        target)
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
            save_image(restored, target, alpha=image.alpha, grayscale=image.grayscale,
                       icc_profile=image.icc_profile, exif=image.exif)
        except (InputImageError, OSError, ValueError, RuntimeError) as err:
            result.error = str(err) if isinstance(err, InputImageError) else f"{type(err).__name__}: {err}"
            continue
        result.output = str(target)
        result.seconds = time.perf_counter() - start
        result.megapixels = image.rgb.shape[0] * image.rgb.shape[1] / 1e6
    return results
