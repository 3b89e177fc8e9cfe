"""A checkpoint folder's manifest: each file's size and sha256, so a resume can tell a checkpoint that is whole
from one a full disk, a kill during a copy or a failing disk truncated or changed (accelerate and safetensors
would load a truncated RNG file silently, or stop with a raw traceback on a truncated model or optimizer).

The main process writes ``manifest.json`` after every other file (every rank's) and before
``trainer_state.json``, whose presence still marks the folder complete. Torch-free: ``status`` can check a
run's checkpoints (sizes only: ``hashes=False``) without importing the trainer.

Cost: sha256 reads every byte once, ~790 MB/s on one core of the 2-core CPU machine; a div2k checkpoint
(generator 6.2M + critic 6.0M parameters, fp32, with AdamW's two moments: ~150 MB) hashes in ~0.2 s, on
save (from the page cache) and on resume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from dist_dejpeg.run.files import as_umask_allows, atomic_write_json, fsync_dir, fsync_path, read_json
from dist_dejpeg.run.layout import CHECKPOINT_MODEL, MANIFEST, TRAINER_STATE, rank_of_file

MANIFEST_VERSION = 1
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(folder: str | Path) -> list[str]:
    """Every regular file under ``folder`` (DeepSpeed writes subfolders) as a relative POSIX path, sorted; not
    the manifest or trainer_state.json (written after the manifest), nor hidden temp files."""
    folder = Path(folder)
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in (MANIFEST, TRAINER_STATE) and not path.name.startswith("."):
            found.append(rel)
    return sorted(found)


def fsync_own_files(folder: str | Path, rank: int) -> int:
    """fsync every file under ``folder`` but the other ranks' own files (run/layout.py RANK_FILE), each given the
    umask's permission bits first (as_umask_allows): called by each rank after its own writes, so every file is
    fsynced by the process that wrote it (accelerate's save_state and safetensors do not fsync). A file another
    process is still writing is only flushed early (harmless); on a shared filesystem, a file another node wrote
    has no dirty pages here (a cheap call). Returns the number of files."""
    folder, count = Path(folder), 0
    for rel in checkpoint_files(folder):
        owner = rank_of_file(rel)
        if owner is not None and owner != rank:
            continue
        try:
            as_umask_allows(folder / rel)  # (safetensors 0.8 writes 0600: a group sharing the run could not read it)
            fsync_path(folder / rel)
        except FileNotFoundError:  # pragma: no cover - removed while we walked
            continue
        count += 1
    return count


def fsync_dirs(folder: str | Path) -> None:
    """fsync ``folder`` and every folder under it (their entries: the files' names)."""
    folder = Path(folder)
    for sub in [p for p in folder.rglob("*") if p.is_dir()]:
        fsync_dir(sub)
    fsync_dir(folder)


def write_manifest(folder: str | Path) -> dict:
    """Hash every file in ``folder`` (see :func:`checkpoint_files`) into ``manifest.json`` (atomic, fsynced)."""
    folder = Path(folder)
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": file_sha256(folder / rel)}
             for rel in checkpoint_files(folder)}
    manifest = {"version": MANIFEST_VERSION, "files": files}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


@dataclass
class Verdict:
    """What :func:`verify_checkpoint` found: ``problems`` empty means the folder can be loaded; a folder without
    a manifest (written before manifests existed) passes unverified, with ``has_manifest`` False."""

    folder: Path
    problems: list[str] = field(default_factory=list)
    has_manifest: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        return f"{self.folder.name}: " + ("; ".join(self.problems) if self.problems else
                                          "verified" if self.has_manifest else "no manifest (not verified)")


def usable_checkpoint(folder: str | Path) -> bool:
    """Whether a checkpoint folder holds the generator's weights and its files match their manifest's sizes (no
    hashes): what a run folder's model is read from (models/generator_file.py: resolve_model_path)."""
    return (Path(folder) / CHECKPOINT_MODEL).is_file() and verify_checkpoint(folder, hashes=False).ok


def verify_checkpoint(folder: str | Path, hashes: bool = True) -> Verdict:
    """Check a checkpoint folder against its manifest: every listed file present with its size, and (``hashes``)
    its sha256; trainer_state.json present and valid JSON. Never raises for a bad folder: the problems are
    in the verdict, one per file, e.g. "model.safetensors: 1200 bytes, 52400 written (truncated)"."""
    folder = Path(folder)
    verdict = Verdict(folder)
    state_file = folder / TRAINER_STATE
    if not state_file.is_file():
        verdict.problems.append(f"no {TRAINER_STATE} (not a complete checkpoint)")
    elif read_json(state_file) is None:
        verdict.problems.append(f"{TRAINER_STATE}: not a JSON object (damaged)")
    if not (folder / MANIFEST).exists():
        verdict.has_manifest = False
        return verdict
    manifest = read_json(folder / MANIFEST)
    files = manifest.get("files") if manifest else None
    if not isinstance(files, dict):
        verdict.problems.append(f"{MANIFEST}: unreadable or not a manifest (damaged)")
        return verdict
    for rel, entry in sorted(files.items()):
        path = folder / rel
        try:
            size = path.stat().st_size
        except OSError:
            verdict.problems.append(f"{rel}: missing")
            continue
        expected = entry.get("size") if isinstance(entry, dict) else None
        if size != expected:
            how = "truncated" if isinstance(expected, int) and size < expected else "changed"
            verdict.problems.append(f"{rel}: {size} bytes, {expected} written ({how})")
        elif hashes:
            try:
                if file_sha256(path) != entry.get("sha256"):
                    verdict.problems.append(f"{rel}: sha256 differs from the one written (changed on disk)")
            except OSError as err:
                verdict.problems.append(f"{rel}: unreadable ({err.strerror or err})")
    return verdict

