"""Inductor's and Triton's caches kept between GPU checks, for machines that keep nothing between calls:

    gpu_check ... --compile-cache cache/compile.tar.gz [--compile-cache-split 15]

Before the first step the archive (or its parts, ``compile.tar.gz.part-00``, ``-01``, ... joined in name order) is
unpacked into the check's scratch folder, and every step compiles with ``TORCHINDUCTOR_CACHE_DIR`` and
``TRITON_CACHE_DIR`` pointing into it (inductor's FX graph and AOTAutograd caches switched on), so a row compiled
in one call is read back in the next; after the last step the folder is packed back into the same path (with
``--compile-cache-split MIB``: as parts of at most MIB MiB, for a machine that returns files of limited size). The
old archive is replaced only once the new one is complete. A cache is only ever a shortcut: one that is missing,
truncated or corrupt (a gzip CRC or tar error) is reported in the summary and the steps compile from scratch; a
member outside ``inductor/`` and ``triton/`` (or a link, a device) is refused the same way. Triton's kernels are
keyed by their source and the card, so they are found again on any machine with the same card and software;
inductor's own entries also key on its inputs (the torch version, the graph). Triton's group files
(``__grp__*.json``) name each kernel's files by absolute path, and Triton treats a group whose files are not at
those paths as a miss: unpacking points them at the files' new place (the check's scratch folder is new each time).

What travels is kept small: packing drops each Triton kernel's intermediate IRs (Triton loads a cached kernel from
its metadata and binary alone), and with ``--compile-cache-max MIB`` an archive over MIB MiB is written without
Triton's folder (inductor's FX graph entries carry their kernels' winning configs, ``bundle_triton_into_fx_graph_
cache``, on by default), or not at all (the old one stays), so it always fits a machine's limits on what comes back.

Standard library only: the check runs this before anything is installed.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import tarfile
import zlib
from pathlib import Path

PARTS = ".part-"  # + 00, 01, ...
# the intermediate IRs Triton keeps beside a kernel's metadata (.json) and binary (.cubin, .hsaco, .zebin): a cache
# hit reads every file its group names, but only the binary is loaded (triton/compiler/compiler.py: CompiledKernel)
TRITON_IRS = frozenset({"source", "ttir", "ttgir", "llir", "ptx", "amdgcn", "spv"})
MEMBERS = ("inductor", "triton")  # the two caches, as folders of the archive and of the unpacked cache
MAX_SPLIT_MIB = 1024


def cache_env(folder: Path) -> dict[str, str]:
    """The variables that make every step's compiler read and write ``folder``'s caches."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TRITON_CACHE_DIR": str(folder / "triton"),
            "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def parts_of(archive: Path) -> list[Path]:
    """The archive's parts in order (``--compile-cache-split``'s files), [] when it has none."""
    pattern = re.compile(re.escape(archive.name + PARTS) + r"\d+")
    found = [p for p in archive.parent.glob(archive.name + PARTS + "*") if pattern.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name[len(archive.name + PARTS):]))


def _size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def unpack(archive: Path, folder: Path) -> str:
    """Fill ``folder`` (made empty first) from the archive or its parts; a line for the summary saying what."""
    shutil.rmtree(folder, ignore_errors=True)
    for name in MEMBERS:
        (folder / name).mkdir(parents=True)
    parts = parts_of(archive)
    sources = parts or ([archive] if archive.is_file() else [])
    if not sources:
        return f"none at {archive} yet: every compiled step compiles (packed there at the end)"
    numbers = [int(p.name[len(archive.name + PARTS):]) for p in parts]
    try:
        if numbers != list(range(len(numbers))):
            gap = next(i for i, n in enumerate(numbers) if n != i)
            raise ValueError(f"part {gap:02d} is missing (found {', '.join(p.name for p in parts)})")
        data = b"".join(p.read_bytes() for p in sources)
        # decompressed whole first: gzip's CRC and length are checked at the stream's end, which tarfile never reads
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data)), mode="r:") as tar:
            members = tar.getmembers()
            bad = [m.name for m in members if not (m.isfile() or m.isdir()) or Path(m.name).parts[:1] not in
                   [(name,) for name in MEMBERS] or ".." in Path(m.name).parts]
            if bad:
                raise ValueError(f"it holds {bad[0]}, not a file of the {' or '.join(MEMBERS)} caches")
            tar.extractall(folder, filter="data")
    except (OSError, EOFError, ValueError, tarfile.TarError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        shutil.rmtree(folder, ignore_errors=True)
        for name in MEMBERS:
            (folder / name).mkdir(parents=True)
        return f"{archive} not used ({type(err).__name__}: {err}): every compiled step compiles from scratch"
    files, size = _size(folder)
    source = f"{len(parts)} parts" if parts else "one file"
    moved = relocate_triton_groups(folder / "triton")
    return (f"{files} files ({_mb(size)}) unpacked from {archive} ({source}, {_mb(len(data))})"
            + (f"; {moved} Triton kernel groups pointed at their new place" if moved else ""))


def relocate_triton_groups(triton: Path) -> int:
    """Point every Triton group file under ``triton`` (``<key>/__grp__<name>.json``: {"child_paths": {file: absolute
    path}}) at the files beside it, as Triton wrote them in a folder that may have moved since; returns how many
    it changed. A group that is not such a table is left alone (Triton reads it as a miss)."""
    changed = 0
    for group, data, paths in _triton_groups(triton):
        moved = {name: str(group.parent / Path(old).name) for name, old in paths.items()}
        if moved != paths:
            data["child_paths"] = moved
            group.write_text(json.dumps(data))
            changed += 1
    return changed


def _triton_groups(triton: Path):
    """(group file, its table, its child_paths) for every Triton group file under ``triton`` that reads as one
    (``{"child_paths": {file: path}}``); the others are skipped (Triton reads them as a miss)."""
    for group in triton.glob("*/__grp__*.json"):
        try:
            data = json.loads(group.read_text())
            paths = data["child_paths"]
            if isinstance(paths, dict) and all(isinstance(p, str) for p in paths.values()):
                yield group, data, dict(paths)
        except (OSError, ValueError, KeyError, TypeError):
            continue


def prune_triton_irs(triton: Path) -> int:
    """Drop the intermediate IRs (``TRITON_IRS``) of every kernel group under ``triton`` and their lines in the
    group, so that Triton still finds the kernel (its metadata and binary); returns the bytes freed. A group that
    is not such a table, or that would keep no metadata and binary, is left whole."""
    freed = 0
    for group, data, paths in _triton_groups(triton):
        keep = {name: path for name, path in paths.items() if name.rpartition(".")[2] not in TRITON_IRS}
        if len(keep) == len(paths) or len(keep) < 2 or not any(name.endswith(".json") for name in keep):
            continue
        data["child_paths"] = keep
        group.write_text(json.dumps(data))
        for name in paths.keys() - keep.keys():
            ir = group.parent / Path(name).name
            if ir.is_file():
                freed += ir.stat().st_size
                ir.unlink()
    return freed


def pack(folder: Path, archive: Path, split_mib: int = 0, max_mib: int = 0) -> str:
    """Write ``folder``'s caches to the archive (one .tar.gz, or parts of at most ``split_mib`` MiB), replacing the
    old one (file and parts) only once the new one is written; a line for the summary saying what. Triton's
    kernels lose their intermediate IRs first (in ``folder``); with ``max_mib`` an archive over it is written
    without Triton's folder, or, still over, not at all (the old archive stays)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".writing")
    freed = prune_triton_irs(folder / "triton") if (folder / "triton").is_dir() else 0
    notes = [f"Triton's intermediate IRs dropped ({_mb(freed)})"] if freed else []
    try:
        for members in [MEMBERS, MEMBERS[:1]] if max_mib else [MEMBERS]:
            with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
                for name in members:
                    if (folder / name).is_dir():
                        tar.add(folder / name, arcname=name, filter=_plain)
            size = tmp.stat().st_size
            if not max_mib or size <= max_mib * 2**20:
                break
            notes.append(f"{_mb(size)} with {' and '.join(members)} is over --compile-cache-max {max_mib} MiB")
        else:
            tmp.unlink()
            return f"not written: {'; '.join(notes)}; {archive} left as it was"
        if members != MEMBERS:
            notes.append("packed without Triton's folder (inductor's FX graph entries carry their kernels)")
        new = [tmp]
        if split_mib:
            step, new = split_mib * 2**20, []
            with tmp.open("rb") as src:
                while chunk := src.read(step):
                    part = tmp.with_name(f"{tmp.name}{PARTS}{len(new):02d}")
                    part.write_bytes(chunk)
                    new.append(part)
            tmp.unlink()
    except OSError:  # a full disk: the half-written files go, the old archive stays
        for half in [tmp, *tmp.parent.glob(tmp.name + PARTS + "*")]:
            half.unlink(missing_ok=True)
        raise
    for old in [archive, *parts_of(archive)]:
        old.unlink(missing_ok=True)
    for path in new:
        os.replace(path, archive.with_name(archive.name + path.name[len(tmp.name):]))
    files = sum(_size(folder / name)[0] for name in members)
    where = f"{len(new)} parts {archive.name}{PARTS}NN" if split_mib else "one file"
    return f"{files} files packed into {archive} ({where}, {_mb(size)})" + "".join(f"; {n}" for n in notes)


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Files and folders only, owned by no one in particular (a cache has no links worth keeping)."""
    if not (info.isfile() or info.isdir()):
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
