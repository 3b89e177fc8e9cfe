"""What restore reads and the names it writes: the images that files, folders (searched recursively) and globs
name (collect_inputs), each one's output path below the output folder (output_names), and which of the files a
search of the output folder itself finds an earlier restore into it wrote (earlier_outputs). Torch-free.

Restoring a folder into itself (``restore photos -o photos``) and then again, after new photos came in, must not
restore the first run's outputs as new photos (photo.png restored again into photo.png.png, each run adding a
layer): a search leaves alone the files restore wrote (save_image marks each with EXIF Software "dist-dejpeg
restore", as image editors name themselves: jpeg/formats.py's written_by_restore), wherever they are (restore photos
-o photos/restored, then restore photos -o photos/as_jpg restored the first run's outputs again: -0.34 dB), and, in
the output folder, the inputs it passed through byte for byte under their output names (--format same, --suffix).
A photo that merely shares an output's name is still an input (photo.jpg and photo.png, both originals, keep their
extensions in their outputs). An output folder inside a folder searched (-o photos/restored) is not searched at all;
a file named by itself always counts.
"""

from __future__ import annotations

import filecmp
import glob
import os
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from dist_dejpeg.jpeg.formats import (IMAGE_SUFFIXES, images_in, output_format, restore_mark, source_identity,
                                      written_by_restore)
from dist_dejpeg.run.files import TEMP_NAME, temp_stem
from dist_dejpeg.run.lock import pid_alive

STALE_TEMP_S = 600  # a temp file of an output this old is stale whatever its pid says


@dataclass
class RestoreResult:
    source: str
    output: str | None = None
    error: str | None = None
    seconds: float = 0.0  # waiting for its decode and restoring it (its encode overlaps the next restore)
    megapixels: float = 0.0
    quality: int | None = None  # the JPEG quality used (None: unknown)
    quality_from: str = ""  # "given" (--input-quality), how it was estimated ("file tables", ...), or why unknown
    passthrough: bool = False  # written unchanged: no gain predicted at this quality
    reencoded: bool = False  # a pass-through written with loss (a PNG given --format jpg): not unchanged
    note: str = ""  # the restore decision's reason
    skipped: bool = False  # a complete output existed (skip_existing): nothing was done
    stopped: bool = False  # not attempted: an earlier output found the disk full (error says so)
    disk_full: bool = False  # its output (stopped: an earlier one) found the disk full or the quota used up
    earlier: bool = False  # an earlier restore's output (its mark; a pass-through copy in the output folder) that a
    # search found: left alone


def collect_inputs(inputs: list[str], out_dir: str | Path | None = None, fmt: str = "png", suffix: str = ""
                   ) -> tuple[list[tuple[Path, Path]], list[RestoreResult]]:
    """(file, output path relative to the output folder) for every image named by ``inputs`` (files, folders
    searched recursively for image suffixes, globs), in order, each once; and the results decided before any
    work: a failure for each input that names nothing, an ``earlier`` result for each file a search of ``out_dir``
    itself found that an earlier restore wrote there (earlier_outputs, for this run's ``fmt`` and ``suffix``). A
    folder's or glob's files inside ``out_dir``, where that lies below the folder searched, are earlier outputs,
    not searched (-o photos/restored, run twice): an earlier restore's outputs there are ``earlier`` results, any
    other image there a failure that says why; a file named by itself always counts. Where two folders or more are
    searched (folders given, globs' fixed parts: restore x y), each one's files go below its name, or as many of its
    last names as tell the folders apart (x/a.png, x/b.png, y/a.png; 2023/photos/a.png), whatever they hold (a
    file of one name in both moved every output there once); files named by themselves of one name (x/a.jpg
    y/a.jpg) below their folders' names too (the second failed as the first's output)."""
    found, roots, results, seen, in_out, below_out, searched = [], [], [], set(), set(), {}, set()
    out = Path(out_dir).resolve() if out_dir is not None else None

    def add(path: Path, rel: Path, root: Path, top: Path | None = None, searched: bool = True) -> None:
        key = path.resolve()  # top: the folder searched, resolved (None: no output folder, or a file named by itself)
        if top is not None and out != top and out.is_relative_to(top) and key.is_relative_to(out):
            below_out.setdefault(key, (path, top))  # not searched: said below
            return
        if key not in seen:
            seen.add(key)
            if searched and written_by_restore(path):  # restore's output anywhere a search finds it (another run's
                results.append(RestoreResult(str(path), earlier=True))  # -o): restored again it loses more
                return
            if top is not None and out == top:
                in_out.add(len(found))
            found.append((path, rel))
            roots.append(root)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files, top = images_in(path), path.resolve() if out is not None else None
            searched.add(path.resolve())
            if not files:
                results.append(RestoreResult(item, error=f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder"))
            for p in files:
                add(p, p.relative_to(path), path, top)
        elif path.is_file():
            add(path, Path(path.name), path.parent, searched=False)
        else:
            matches = glob_files(item)
            if not matches:
                results.append(RestoreResult(item, error="no such file, and no file matches it as a glob"))
            prefix = glob_prefix(item)
            top = prefix.resolve() if out is not None else None
            searched.add(prefix.resolve())
            for p in matches:
                add(p, below(p, prefix), prefix, top)
    # two folders or globs or more: each one's files below its label, always (a layout that a new file of one name
    # in two of them would change moves every output); files named by themselves, where they share a path (in any
    # case: B.jpg, b.jpg), below their folder's label
    shared = defaultdict(set)  # (within one folder output_names tells them apart)
    for (_, rel), root in zip(found, roots):
        shared[folded(rel)].add(root.resolve())
    clashing = {root for group in shared.values() if len(group) > 1 for root in group}
    label = root_labels(clashing | (searched if len(searched) > 1 else set()))
    found = [(p, label[root.resolve()] / rel if root.resolve() in label else rel)
             for (p, rel), root in zip(found, roots)]
    earlier = earlier_outputs(found, in_out, out, fmt, suffix) if in_out else set()
    results += [RestoreResult(str(found[i][0]), earlier=True) for i in sorted(earlier)]
    own = own_outputs(found, out, fmt, suffix) if below_out else {}
    for key, (path, top) in below_out.items():  # an earlier restore's output, or an original said not restored
        if key in seen:
            continue
        if is_earlier_output(path, own):
            results.append(RestoreResult(str(path), earlier=True))
        else:
            results.append(RestoreResult(str(path), error=f"inside the output folder {out_dir}, which the search "
                                                           f"of {top} leaves out: not restored (name it by itself, "
                                                           f"or restore into a folder outside {top})"))
    return [f for i, f in enumerate(found) if i not in earlier], results


def root_labels(roots: set[Path]) -> dict[Path, Path]:
    """Each of ``roots`` (resolved folders) named by as few of its last folder names as tell them all apart
    (2023/photos and 2024/photos: their last two), never an absolute path (the root folder: "root")."""
    parts = {root: root.relative_to(root.anchor).parts or ("root",) for root in roots}
    for depth in range(1, max((len(p) for p in parts.values()), default=0) + 1):
        label = {root: Path(*p[-depth:]) for root, p in parts.items()}
        if len({folded(name) for name in label.values()}) == len(label):  # (in any case: B/, b/)
            return label
    return {root: Path(*p) for root, p in parts.items()}


def earlier_outputs(found: list[tuple[Path, Path]], candidates: set[int], out: Path, fmt: str, suffix: str) -> set[int]:
    """Which of ``found``'s files (indices among ``candidates``: found by a search of the output folder ``out``
    itself) an earlier restore wrote there unmarked: another input passed through byte for byte under the name this
    run gives its output (the marked ones a search leaves out already: collect_inputs)."""
    own = own_outputs(found, out, fmt, suffix)
    return {i for i in sorted(candidates) if is_copy(found[i][0], own)}


def own_outputs(found: list[tuple[Path, Path]], out: Path, fmt: str, suffix: str) -> dict[Path, Path]:
    """{the output path this run gives each of ``found``'s files (resolved): that file}."""
    return {(out / output_names([rel], fmt, suffix)[0]).resolve(): path for path, rel in found}


def is_earlier_output(path: Path, own: dict[Path, Path]) -> bool:
    """Whether an earlier restore wrote ``path``: it carries restore's mark, or it is another input passed through
    byte for byte under the name this run gives that input's output (``own``: own_outputs; a copy has no mark)."""
    return written_by_restore(path) or is_copy(path, own)


def is_copy(path: Path, own: dict[Path, Path]) -> bool:
    """Whether ``path`` is another input passed through byte for byte under the name this run gives its output."""
    source = own.get(path.resolve())
    return source is not None and source.resolve() != path.resolve() and filecmp.cmp(source, path, shallow=False)


def replaceable(target: Path, source: Path) -> bool:
    """Whether restore may write ``target`` for the input ``source``: nothing is there (or an empty file: nothing to
    lose), or restore wrote it for this input (ownership); a photo of the user's that shares the output's name is not
    (restore 'a/*.jpg' -o a replaced a/beach.png, another picture, with beach.jpg's restored image without a word),
    nor restore's output of another photo (restore sA -o o, then sB -o o replaced sA's IMG_0001.png with sB's)."""
    return ownership(target, source)[0] not in REFUSED


REFUSED = ("other", "foreign")  # ownership's states of an output restore must not replace
CURRENT = ("same", "copy", "older")  # ... and of one --skip-existing may skip (where it is complete)


def ownership(target: Path, source: Path) -> tuple[str, str]:
    """How the file ``target`` stands to the input ``source``, and the name of the photo restore wrote it from
    ("": unknown): "free" (nothing there, an empty file, or a folder: its write fails and says so), "copy"
    (``source`` passed through byte for byte), "same" (restore's output of ``source`` as it is now: its mark's
    SHA-256), "changed" (restore's output of this file before it changed: a re-scan, restored again), "other"
    (restore's output of another photo), "older" (restore's mark without its source: written by a version before
    the mark named it, taken as this input's, as then), "foreign" (neither mark nor copy: a file of the user's)."""
    try:
        if not target.is_file() or target.stat().st_size == 0:
            return "free", ""
    except OSError:
        return "free", ""  # (its write says what is wrong)
    mark, wrote = restore_mark(target)
    if mark and wrote is not None:
        own = dict(part.split(":", 1) for part in source_identity(source).split(" ", 2))
        state = ("same" if wrote["sha256"] == own["sha256"] else "changed" if wrote["path"] == own["path"]
                 else "other")
        return state, wrote["name"]
    # (source first, as output_complete compares them for --skip-existing: filecmp's cache answers it then)
    if filecmp.cmp(source, target, shallow=False):
        return "copy", source.name
    return ("older", "") if mark else ("foreign", "")


def refusal(target: Path, state: tuple[str, str], one_file: bool, meanwhile: bool = False) -> str:
    """Why restore does not replace ``target`` (ownership's ``state``: REFUSED), and what to do instead;
    ``meanwhile``: the file was put there while this restore ran (another restore into the folder at once)."""
    other = "name another output file" if one_file else "give another output folder, or --suffix"
    when = ", written there meanwhile (another restore into this folder at once)," if meanwhile else ""
    if state[0] == "other":
        return (f"output {target} is restore's output of another photo, {state[1]}{when} (not of this file, as it "
                f"is now or was): not replaced (move it away, or {other})")
    return (f"output {target} exists{when} and restore cannot tell it wrote it (no restore mark, nor a copy of "
            f"this input as it is now: a pass-through of an earlier version looks the same): not replaced (move it "
            f"away, or {other})")


def linked_out(target: Path, out: Path) -> str | None:
    """Why ``target`` is not written: its folder, symbolic links followed, lies outside the output folder ``out``
    (a link planted in a shared output folder would have restore write, and remove stale temps, where it points);
    None where it is inside."""
    if target.parent.resolve().is_relative_to(out.resolve()):
        return None
    return (f"refusing to write {target}: its folder {target.parent} leads out of the output folder {out} (a "
            f"symbolic link, to {target.parent.resolve()}): remove the link, or give another output folder")


def glob_files(pattern: str) -> list[Path]:
    """The files a glob matches, sorted, its image suffix in either case as a folder search takes it ('*.jpg'
    finds a camera's IMG_0001.JPG too; a name without wildcards stays exact)."""
    stem, suffix = os.path.splitext(pattern)
    if glob.has_magic(pattern) and suffix.lower() in IMAGE_SUFFIXES:
        pattern = stem + "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in suffix)
    return sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file())


def glob_prefix(pattern: str) -> Path:
    """The folder a glob searches in: its leading parts without wildcards ('in/**/a*.jpg' -> in)."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
    return Path(*parts[:fixed]) if fixed else Path()


def below(path: Path, folder: Path) -> Path:
    """``path`` relative to ``folder`` (a glob's prefix), or its name where that would leave the output folder."""
    try:
        rel = path.relative_to(folder)
    except ValueError:
        return Path(path.name)
    return rel if rel.parts and ".." not in rel.parts and not rel.is_absolute() else Path(path.name)


def output_names(rels: list[Path], fmt: str = "png", suffix: str = "") -> list[Path]:
    """Each input's output path relative to the output folder, from its relative path ``rels``: the stem, then
    ``suffix`` (after a "_" unless it starts with a character that is not a letter or digit: "restored" and
    "_restored" both give photo_restored.png), then the output format's suffix (output_format: ``fmt`` "same"
    keeps a JPEG's, PNG's or WebP's own). Inputs that would share an output name, in any case (B.png, b.png: one
    file on a case-insensitive disk), each keep their own extension in it (a.jpg -> a.jpg.png, a.png -> a.png.png),
    again until none is shared (a.jpg.png -> a.jpg.png.png beside them); names that still differ only in case are
    numbered. Whatever the inputs' order."""
    if suffix and suffix[0].isalnum():
        suffix = "_" + suffix

    def name(rel: Path, keep_extension: bool) -> Path:
        extension = output_format(fmt, rel.suffix)[1]
        return rel.with_name((rel.name if keep_extension else rel.stem) + suffix + extension)

    keep: set[int] = set()  # the inputs whose output keeps their extension: grown until no name is shared
    while True:
        names = [name(rel, i in keep) for i, rel in enumerate(rels)]
        shared = Counter(folded(n) for n in names)
        clash = {i for i, n in enumerate(names) if shared[folded(n)] > 1} - keep
        if not clash:
            break
        keep |= clash
    # names that still differ only in case (B.jpg, b.JPG: B.jpg.png, b.JPG.png), which a case-insensitive disk
    # (macOS, Windows, exFAT) holds as one file: the second and later (by their relative path) get " (2)", " (3)"...
    taken, order = {folded(n) for n in names}, sorted(range(len(rels)), key=lambda i: rels[i].as_posix())
    first: set[str] = set()
    for i in order:
        if folded(names[i]) in first:
            n = 2
            while folded(numbered := names[i].with_stem(f"{names[i].stem} ({n})")) in taken:
                n += 1
            names[i] = numbered
            taken.add(folded(numbered))
        first.add(folded(names[i]))
    return names


def folded(path: Path) -> str:
    """A relative output path as a case-insensitive disk compares it (two of these name one file there), in
    any Unicode normalisation too: é in NFC and in NFD (from a Linux share) name one file on APFS/HFS+. Unicode's
    canonical caseless key, NFD(casefold(NFD(name)))."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", path.as_posix()).casefold())


def remove_stale_temps(targets: list[Path], max_age_s: float = STALE_TEMP_S, keep: frozenset | set = frozenset()
                       ) -> list[Path]:
    """Remove the temp files a killed writer left beside ``targets`` (``.NAME.tmpPID``, NAME one of theirs):
    those whose pid is not alive on this host, or older than ``max_age_s``; never a resolved path in ``keep``
    (the inputs). One listing per folder."""
    names: dict[Path, set[str]] = defaultdict(set)
    for target in targets:
        names[target.parent].add(temp_stem(target.name))  # (a long name's is cut short)
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
