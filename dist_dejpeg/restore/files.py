"""Restoring many files: images named by files, folders (searched recursively) and globs, into an output
folder under the same relative names, never stopping at a bad file.

    from dist_dejpeg.restore.files import restore_files
    results = restore_files(Restorer("runs/debug"), ["photos/", "*.jpg"], "restored/", fmt="jpg")

Which files are inputs, and each one's output name: restore/inputs.py (a file's name with the output format's
suffix, keeping its path below a folder or a glob's fixed prefix; an output that would overwrite an input is
refused; a search of the output folder itself leaves an earlier restore's outputs there alone). An image the guard
passes through is written as the input file itself, byte for byte, where the output has the input's format
(--format same, or jpg for a JPEG): "unchanged", never re-encoded.

Each output is written atomically (a hidden ``.NAME.tmpPID`` renamed into place), so an output that exists is
whole unless something else wrote it. A killed restore can leave those temp files: the next restore into the
same folder removes the ones of its own outputs that are stale, i.e. whose writer's pid is not alive on this
host or that are older than ``inputs.STALE_TEMP_S`` (a write takes seconds; the age covers a reused pid). Restores
into one folder at once never replace each other's outputs: each output is linked into place where none is there
(os.link, no-clobber), and where one is, its ownership checked again just before the rename (an error for a file).
``skip_existing`` skips an output only when it decodes fully as its format (``output_complete``).

Overlap (issue 24): with ``workers`` threads (default: none on a CPU, whose cores the model already uses; where
the restorer runs on a GPU, one per core this process may use, 2 to ``MAX_IO_THREADS``), the next files are decoded
(and their quality and cells read; at most ``LOADS_AHEAD`` ahead of the restores) and the finished ones made
consistent with their files, encoded and written in a thread pool while the model restores the current one; the
restores stay on the calling thread, in input order. A 12 MP photo's decode, cells and PNG encode take ~1.1 s of a
core (2-core EPYC; the PNG 0.9 s of it), its restore on an H200 ~0.15 s: two threads would leave the GPU idle
most of the time. The results, outputs (byte for byte) and messages are those of the sequential
loop (workers 0), which runs the same code with each task done at once.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from dist_dejpeg.jpeg.formats import (ALPHA_FORMATS, IMAGE_SUFFIXES, OUTPUT_SUFFIXES, SAME_FORMAT, output_format,
                                      save_options, source_identity)
from dist_dejpeg.jpeg.consistency import conform
from dist_dejpeg.jpeg.quality import DOUBLE, earlier_compression, estimate_quality
from dist_dejpeg.restore.images import (DEFAULT_MAX_PIXELS, InputImageError, LoadedImage, cells_for, load_image,
                                        made_consistent, output_complete, pixel_limit, save_image)
from dist_dejpeg.restore.inputs import (CURRENT, REFUSED, RestoreResult, collect_inputs, linked_out, output_names,
                                        folded, ownership, refusal, remove_stale_temps)
from dist_dejpeg.restore.metadata import jpeg_without_gps, without_gps
from dist_dejpeg.restore.record import Record, RestoreInterrupted, restorer_settings
from dist_dejpeg.restore.reencode import reencoding_outweighs, written_as
from dist_dejpeg.restore.base import ImageRestorer  # Restorer (PyTorch) or OnnxRestorer: no torch import here
from dist_dejpeg.run.files import atomic_write_bytes, disk_full_text, is_disk_full, is_quota, prove_writable
from dist_dejpeg.run.pool import pool_size

log = logging.getLogger(__name__)

MAX_IO_THREADS = 8  # decode/encode threads beside a GPU restorer, at most (each holds an image or two in memory)
LOADS_AHEAD = 2  # files decoded ahead of the one the model restores, at most
# the pixels of the outputs being made consistent and encoded at once, at most (one however large: alone); each holds
# its image, its input and its file's cells (~9 bytes a pixel), so ~1 GB, eight 12 MP photos or one 100 MP scan
SAVE_PIXELS = 100_000_000


class OutputError(ValueError):
    """An output folder or file that cannot be written."""


def check_output_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` and prove it is writable before any work is done (restore, evaluate, report); an
    OutputError otherwise."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {out} is not writable: it is a file, not a folder")
    try:
        prove_writable(out)
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


class Inline:
    """An executor that runs each task at once on the calling thread: the sequential restore loop (workers 0)."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - kept for result(), as a pool's future keeps it
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


RESTORE_ERRORS = (InputImageError, OSError, ValueError, RuntimeError)  # a file's failure: reported, never fatal


def error_text(err: Exception) -> str:
    """A file's failure as its result says it: an InputImageError's own words, else the type and message."""
    return str(err) if isinstance(err, (InputImageError, OutputError)) else f"{type(err).__name__}: {err}"


def names_a_file(out: str | Path) -> bool:
    """Whether restore's output ``out`` names one image file (an image suffix, not an existing folder, not written
    as a folder: ``out.png/``)."""
    return Path(out).suffix.lower() in OUTPUT_SUFFIXES and not Path(out).is_dir() and not as_folder(out)


def unknown_suffix(out: str | Path) -> bool:
    """Whether ``out``, not yet there and not written as a folder, ends in what reads as a file type that is no
    image's (out.xyz, out.txt): a file meant, and restore would make a folder of that name."""
    suffix = Path(out).suffix.lower()
    return (re.fullmatch(r"\.[a-z][a-z0-9]{1,4}", suffix) is not None and suffix not in IMAGE_SUFFIXES
            and not as_folder(out) and not Path(out).exists())


def as_folder(out: str | Path) -> bool:
    """Whether ``out`` is written as a folder (a trailing /), whatever its name."""
    return str(out).endswith(("/", os.sep))


def check_restore_output(out: str | Path) -> Path:
    """The folder restore writes into, made and proved writable: ``out`` itself, or the folder of the one file
    it names. An OutputError for a file restore cannot write (x.bmp, x.gif), never a folder made of that name."""
    if names_a_file(out):
        return check_output_file(out).parent
    if Path(out).suffix.lower() in IMAGE_SUFFIXES and not Path(out).is_dir() and not as_folder(out):
        raise OutputError(f"restore cannot write {Path(out).suffix} files: name the output file with one of "
                          f"{', '.join(sorted(set(OUTPUT_SUFFIXES) - {'.jpe', '.jfif'}))}, or give a folder")
    return check_output_dir(out)


def restore_files(restorer: ImageRestorer, inputs: list[str], out_dir: str | Path, *, fmt: str = "png",
                  max_pixels: int = DEFAULT_MAX_PIXELS, skip_existing: bool = False, progress: bool = True,
                  quality: int | None = None, suffix: str = "", output_quality: int | None = None,
                  workers: int | None = None, record: str | Path | Record | None = None, strip_gps: bool = False
                  ) -> list[RestoreResult]:
    """Restore every image ``inputs`` names into ``out_dir`` (names: output_names; ``fmt`` an OUTPUT_FORMATS
    name or "same"; ``output_quality``: jpg and webp outputs at that quality), or, where ``out_dir`` names a
    file (``names_a_file``: photo.png), the one image ``inputs`` names into that file, in its suffix's format
    (an OutputError for more than one). Never stops at a bad file: each result carries its error; an output that
    finds the disk full (or the quota used up) stops the run there, the files not yet begun ``stopped`` (their
    error says why), instead of restoring each to fail its write. The output folder is checked before anything
    runs. Each image's quality is ``quality`` when given, else estimated
    (jpeg.quality.estimate_quality: the file's tables, else its pixels), else unknown. ``workers``:
    decode/encode threads beside the restores (None: for a restorer on a GPU one per usable core, 2 to
    MAX_IO_THREADS, 0 on a CPU; 0: one file after another). ``record``: a file each result is appended to as a JSON
    line once final (restore/record.py; None: none). Ctrl-C raises RestoreInterrupted (a KeyboardInterrupt) holding
    every result, those not finished ``stopped`` ("not restored: interrupted"), once the threads' writes finished.
    ``strip_gps``: the outputs without the EXIF's GPS sub-IFD and the XMP's exif:GPS* (restore/metadata.py)."""
    if not isinstance(record, Record):
        record = Record(record, str(getattr(restorer, "info", {}).get("source") or "") or None,
                        restorer_settings(restorer))
    results: list[RestoreResult] = []
    try:
        restore_into(restorer, inputs, out_dir, results, record, fmt=fmt, max_pixels=max_pixels, progress=progress,
                     skip_existing=skip_existing, quality=quality, suffix=suffix, output_quality=output_quality,
                     workers=workers, strip_gps=strip_gps)
    except KeyboardInterrupt:
        raise RestoreInterrupted(results, record) from None
    record.add_all(results)
    return results


def restore_into(restorer: ImageRestorer, inputs: list[str], out_dir: str | Path, results: list[RestoreResult],
                 record: Record, *, fmt: str, max_pixels: int, skip_existing: bool, progress: bool,
                 quality: int | None, suffix: str, output_quality: int | None, workers: int | None,
                 strip_gps: bool = False) -> None:
    """restore_files' work, each result put in ``results`` (every file's before any is restored) and recorded
    once final."""
    from dist_dejpeg.run.progress import Progress

    output_format(fmt, ".png")  # a ValueError for an unknown format, before any work
    as_same = fmt == SAME_FORMAT
    one_file = names_a_file(out_dir)
    out = check_restore_output(out_dir)
    files, found = collect_inputs(inputs, out, fmt, suffix)
    record.add_all(found)  # (an input naming nothing, an earlier output)
    results.extend(found)
    if one_file and len(files) + len(found) != 1:
        raise OutputError(f"output {out_dir} names one file, and {len(files) + len(found)} images were given: "
                          f"give an output folder")
    sources = {p.resolve() for p, _ in files}
    # and the files themselves: on a case-insensitive disk (macOS, Windows, exFAT) the output a.png of a.PNG in its
    # own folder is the input under another path, which replacing would lose
    source_files = {_file_id(p) for p, _ in files} - {None}
    targets = [Path(out_dir)] if one_file else [out / rel for rel in output_names([rel for _, rel in files], fmt,
                                                                                  suffix)]
    outside = {target: why for target in targets if (why := linked_out(target, out))}  # (a planted link)
    stale = remove_stale_temps([target for target in targets if target not in outside], keep=sources)
    if stale:
        log.info("removed %d temp file(s) a killed restore left in %s", len(stale), out)
    claimed: dict[str, Path] = {}  # (resolved outputs, folded: one file on a case-insensitive disk)
    jobs: list[tuple[RestoreResult, Path, Path]] = []  # (result, input, output) of the files to restore
    bar = Progress(len(files), "restore", "image", enabled=progress)  # (without a terminal: plain lines)
    results.extend(RestoreResult(str(path)) for path, _ in files)  # (Ctrl-C: each one's result is there)
    for path, target, result in zip((p for p, _ in files), targets, results[len(found):]):
        key = target.resolve()
        if (why := outside.get(target)) or key in sources or _file_id(target) in source_files:
            result.error = why or (f"refusing to overwrite an input: the output would be {target} (give another "
                                   f"output {'file name, or an output folder' if one_file else 'folder, or --suffix'})")
        elif (fold := folded(key)) in claimed:
            result.error = f"output {target} is also the output of {claimed[fold]}: restore them into different folders"
        elif (state := ownership(target, path))[0] in REFUSED:  # (--skip-existing too: not this one's output)
            claimed[fold] = path
            result.error = refusal(target, state, one_file)
        else:
            claimed[fold] = path
            if skip_existing and state[0] == "changed":
                log.info("%s: restored again, its input %s changed since", target, path)
            elif skip_existing and state[0] in CURRENT:
                if output_complete(target, max_pixels, path):
                    result.output, result.skipped = str(target), True
                else:
                    log.warning("%s exists but does not decode fully (a truncated or foreign file): restoring it "
                                "again", target)
            if not result.skipped:
                jobs.append((result, path, target))
                continue
        record.add(result)
        bar.update()
    if workers is None:
        workers = max(2, pool_size(0, MAX_IO_THREADS)) if "cuda" in str(restorer.device) else 0
    ahead = min(workers, LOADS_AHEAD)  # (decoded images waiting for the model: memory, and decode is quick)

    def load(path: Path, target: Path, result: RestoreResult) -> tuple[LoadedImage, str]:
        image = load_image(path, max_pixels, cells=getattr(restorer, "consistent", True))  # (--no-consistency)
        if image.alpha is not None and save_options(target.suffix)[0] not in ALPHA_FORMATS:
            how = ("name the output .png, .webp or .tiff" if one_file
                   else "write it as png, webp or tiff (--format, or --format same)")
            raise InputImageError(f"{path}: has an alpha channel (transparency), which {target.suffix} cannot "
                                  f"hold: {how}")
        source = read_quality(result, image, quality)
        earlier = earlier_compression(result.quality, source, image.image)
        image.cells, image.cells_note = cells_for(image.cells, image.cells_note, earlier)
        return image, source

    def save(restored, image: LoadedImage, target: Path, path: Path, decision) -> tuple[str | None, str, bool]:
        """Write the output; returns why it is the input unchanged after all (a lossy re-encoding), or None, why a
        restored JPEG is not consistent with its file's data ("": it is, or it is no JPEG), and whether a pass-through
        was re-encoded with loss (a PNG given --format jpg)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fmt, real = save_options(target.suffix)[0], written_as(image.format)
        same = real == fmt  # (a camera's MPO is a JPEG file)
        # --format same, the input's name kept: a pass-through is its input file even where that name lies (a PNG
        # named .jpg: not re-encoded as a JPEG); a GIF's x.gif.png is encoded
        kept = same or (as_same and not one_file and target.suffix.lower() == path.suffix.lower())
        if decision.passthrough and kept and (copy := input_copy(path, image, real)) is not None:  # unchanged: the
            atomic_write_bytes(target, copy, vet=vet_of(path))  # file, not a re-encode
            return None, "", False
        unmade = "" if decision.passthrough else image.cells_note
        if not same and kept and not decision.passthrough:  # (its name kept: what reads it goes by the name)
            lie = f"written as {fmt}, as its name says: the file is a {image.format}"
            unmade = f"{unmade}; {lie}" if unmade else lie
        if not decision.passthrough and image.cells is not None:
            half_width = getattr(decision, "half_width", None)
            restored, unmade = made_consistent(restored, image.cells, image.image, half_width,
                                                getattr(restorer, "conform", conform))
        exif, xmp = without_gps(image.exif, image.xmp) if strip_gps else (image.exif, image.xmp)
        data = save_image(restored, target, alpha=image.alpha, grayscale=image.grayscale,
                          icc_profile=image.icc_profile, exif=exif, quality=output_quality, dpi=image.dpi,
                          xmp=xmp, comment=image.comment, iptc=image.iptc, text=image.text,
                          encode_only=True, source=source_identity(path))
        gain = getattr(decision, "gain", None)
        lossy = fmt == "JPEG" or (fmt == "WEBP" and output_quality is not None)
        why = None
        if lossy and same and not decision.passthrough and gain is not None:
            why = reencoding_outweighs(restored, data, image, decision.quality, gain,
                                       getattr(decision, "jpeg_psnr", None),
                                       earlier_compression(decision.quality, decision.source, image.image))
        copy = input_copy(path, image, fmt) if why else None
        atomic_write_bytes(target, copy or data, vet=vet_of(path))
        return why if copy else None, unmade, decision.passthrough and lossy  # (the last: a lossy re-encode)

    def vet_of(path: Path) -> Callable[[Path], None]:
        """Vet a file at ``path``'s output right before the rename (another restore may have put it there)."""
        def vet(target: Path) -> None:
            if (state := ownership(target, path))[0] in REFUSED:
                raise OutputError(refusal(target, state, one_file, meanwhile=True))
        return vet

    def input_copy(path: Path, image: LoadedImage, fmt: str) -> bytes | None:
        """The input file as a pass-through's output; with ``strip_gps``, where it holds GPS, a JPEG's without it
        (its pixels' data untouched), None for another format (encoded then: its pixels, without the GPS)."""
        if not strip_gps or without_gps(image.exif, image.xmp) == (image.exif, image.xmp):
            return path.read_bytes()
        return jpeg_without_gps(path.read_bytes(), source_identity(path)) if fmt == "JPEG" else None

    def saved(result: RestoreResult, target: Path, image: LoadedImage, future: Future) -> None:
        try:
            why, unmade, result.reencoded = future.result()
            if why:
                result.passthrough, result.note = True, why
            elif unmade:
                result.note = f"{result.note}; {unmade}" if result.note else unmade
        except RESTORE_ERRORS as err:
            result.error = error_text(err)
            result.disk_full = is_disk_full(err)
            if result.disk_full:  # (a quota as a quota: the filesystem may be far from full)
                full.append(disk_full_text(err, target) if is_quota(err) else f"the disk is full ({result.error})")
        else:
            result.output = str(target)
            result.megapixels = image.rgb.shape[0] * image.rgb.shape[1] / 1e6
        record.add(result)
        bar.update()

    pool = ThreadPoolExecutor(workers, thread_name_prefix="restore-io") if workers else Inline()
    loads: deque = deque()  # (job, decode future): the current file's and up to ``ahead`` more
    saves: deque = deque()  # (result, target, image, encode future): at most ``workers``, SAVE_PIXELS unfinished
    pending = iter(jobs)
    full: list[str] = []  # why outputs found the disk full (or the quota used up): nothing more is begun
    # PIL's pixel limit (a global that load_image raises and restores around each open) is raised here, once,
    # so that the threads' own raises and restores all write this one value
    with pixel_limit(max_pixels):
        try:
            while not full:
                while len(loads) <= ahead and (job := next(pending, None)) is not None:
                    result, path, target = job
                    loads.append((job, pool.submit(load, path, target, result)))
                if not loads:
                    break
                (result, path, target), loading = loads.popleft()
                start = time.perf_counter()
                try:
                    image, source = loading.result()
                    restored = restorer.restore_array(image.rgb, result.quality, source=source,
                                                      conformed=image.cells is not None)
                except RESTORE_ERRORS as err:
                    result.error = error_text(err)
                    record.add(result)
                    bar.update()
                    continue
                decision = restorer.last_decision
                result.passthrough, result.note = decision.passthrough, decision.reason
                result.seconds = time.perf_counter() - start
                pixels = image.rgb.shape[0] * image.rgb.shape[1]  # (the earlier outputs finish first, to make room)
                while saves and (len(saves) >= workers or pixels + sum(s[2].rgb.shape[0] * s[2].rgb.shape[1]
                                                                       for s in saves) > SAVE_PIXELS):
                    saved(*saves.popleft())
                encoding = pool.submit(save, restored, image, target, path, decision)
                saves.append((result, target, image, encoding))
                while len(saves) > workers:  # (workers 0: each output written before the next restore)
                    saved(*saves.popleft())
            while saves:
                saved(*saves.popleft())
            for result, _, _ in [job for job, _ in loads] + list(pending) if full else []:
                result.stopped, result.disk_full, result.error = True, True, f"not restored: {full[0]}"
                bar.update()
        except KeyboardInterrupt:  # the outputs restored are written, counted and recorded (restore_files: the rest)
            for _, loading in loads:
                loading.cancel()
            pool.shutdown(wait=True)
            for result, target, image, encoding in saves:
                if encoding.done() and not encoding.cancelled() and (encoding.exception() is None or isinstance(
                        encoding.exception(), RESTORE_ERRORS)):
                    saved(result, target, image, encoding)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()


def _file_id(path: Path) -> tuple[int, int] | None:
    """The file ``path`` names (its device and inode), or None where there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def read_quality(result: RestoreResult, image, quality: int | None) -> str:
    """Fill ``result.quality`` and ``quality_from`` for a loaded image: ``quality`` when given, else estimated
    from its tables or pixels; returns the source the restorer records ("given", "file tables", ...)."""
    if quality is not None:
        result.quality, result.quality_from = int(quality), "given"
        return "given"
    est = estimate_quality(image.image, image.rgb)
    result.quality = est.quality
    if est.quality is None:
        result.quality_from = est.reason or "quality unknown"
    elif est.source == DOUBLE:  # the tables say one quality, the pixels an earlier, coarser one: say both
        result.quality_from = f"{est.source}: {est.reason}" if est.reason else est.source
    else:
        result.quality_from = est.source or "estimated"
    return est.source or "unknown"
