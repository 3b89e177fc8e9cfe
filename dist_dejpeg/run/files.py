"""Writing a file so that a crash leaves the old one or the new one, never half of either; reading one that
may be missing or half-written without raising; telling a full disk from other write errors; the folders a
command made, removed again when it fails. Torch-free: every layer uses it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Callable

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# what libraries say when a write runs out of room without raising an OSError: safetensors' Rust writer ("No space
# left on device (os error 28)"), and torch's zip writer, whose short write shows only as "unexpected pos N vs M"
# or "file write failed" (the one common cause of a short write to a local file is a full disk or quota)
DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122", "unexpected pos",
                  "file write failed")
QUOTA_TEXT = ("disk quota exceeded", "os error 122")  # (of DISK_FULL_TEXT: a quota's)
# what torch says when /dev/shm is full: a DataLoader worker's "unable to allocate shared memory(shm) for file
# </torch_...>: No space left on device (28)" (and the main process's receiving a batch): not the run folder's disk
SHM_TEXT = ("shared memory", "</torch_")


# The hidden temp file a write goes through, beside its target: ".NAME.tmpPID" (NAME: temp_stem's). A process
# killed mid-write leaves it; restore removes those of its own outputs whose writer is gone (restore.files).
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")
STEM_BYTES = 200  # of a target's name in its temp file's: ".NAME.tmpPID" stays within NAME_MAX (255 bytes)


def temp_stem(name: str) -> str:
    """The NAME in a target's temp file name: its name, or for a name over STEM_BYTES bytes (a legal 250-byte
    name made its temp name too long to create: ENAMETOOLONG on every write) its first bytes and a hash of it."""
    raw = os.fsencode(name)
    if len(raw) <= STEM_BYTES:
        return name
    return f"{raw[:STEM_BYTES - 9].decode('utf-8', 'ignore')}~{hashlib.sha1(raw).hexdigest()[:8]}"


def temp_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{temp_stem(path.name)}.tmp{os.getpid()}")


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)  # (Windows: binary)


def open_temp(tmp: Path):
    """The temp file ``tmp`` (temp_path's) open "wb", made anew (create_new: O_EXCL, O_NOFOLLOW), so a link
    planted under that guessable name in a shared folder is never followed (a write through it would replace
    the file it points to): a killed writer's temp or a link there is unlinked first, its target untouched."""
    return open(tmp, "wb", opener=lambda name, flags: create_new(Path(name)))


def create_new(path: Path) -> int:
    """A new file at ``path`` (O_EXCL, O_NOFOLLOW: whatever has the name is unlinked first, a link and never its
    target), open for writing; an OSError where it cannot be made (EEXIST: another process took the name)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW
    try:
        return os.open(path, flags, 0o666)
    except FileExistsError:
        path.unlink()
        return os.open(path, flags, 0o666)


# what os.link raises on a filesystem without hard links (some FUSE, SMB, FAT mounts) or that refuses one here;
# EINVAL: Windows' CreateHardLinkW on FAT32/exFAT or an SMB share (ERROR_INVALID_FUNCTION, ERROR_NOT_SUPPORTED:
# CPython maps both to EINVAL). Falling back there swallows nothing: vet still runs, and an EINVAL that meant a
# bad name (Linux) is raised again by the os.replace after it.
NO_LINK_ERRNOS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EACCES,
                  errno.EINVAL}


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None,
                       vet: Callable[[Path], None] | None = None) -> None:
    """Write ``data`` to a hidden temp file beside ``path``, fsync it, then rename it into place. ``mode``:
    the file's permission bits (None: as the umask makes them). ``vet``: never replace a file another process
    put at ``path`` unasked: the temp file is linked into place (os.link: fails where a file is there, so a file
    written meanwhile is never clobbered), and only where one is there (or the filesystem has no hard links) is
    ``vet(path)`` called, right before the rename: it raises to keep that file."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open_temp(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        if vet is not None:
            if linked(tmp, path):
                with contextlib.suppress(OSError):  # (published: a temp left is a second name of it, removed
                    tmp.unlink()  # as stale later)
                return
            vet(path)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # (none made: its folder a file; the error said is the write's)
            tmp.unlink(missing_ok=True)  # a full disk or a kill leaves no temp file behind
        if isinstance(err, OSError) and str(err.filename) in ("None", str(tmp)) and err.filename2 is None:
            err.filename = str(path)  # a write's ENOSPC names no file, an open the hidden temp: name the one written
        raise


def linked(tmp: Path, path: Path) -> bool:
    """Give the file ``tmp`` the name ``path`` too where nothing has that name (True); False where something
    has, or where the filesystem makes no hard links."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in NO_LINK_ERRNOS:
            raise
        with contextlib.suppress(OSError):  # a link made though it said it failed is ours (vet would keep it);
            ours, there = os.stat(tmp), os.stat(path)  # (st_ino 0: a share with no file ids, every file alike)
            return ours.st_nlink > 1 and ours.st_ino != 0 and (ours.st_dev, ours.st_ino) == (there.st_dev,
                                                                                            there.st_ino)
        return False
    return True


def atomic_write_files(files: dict) -> None:
    """Several files ({path: bytes}) all or none: each written to its hidden temp file and fsynced, then all
    renamed into place. A full disk while writing leaves every one as it was (evaluate's three tables, a report's
    page and tables: a new metrics.json beside old metrics.csv and .md read as one evaluation); only a kill
    between the renames, microseconds, can leave some new."""
    temps: dict[Path, Path] = {}
    path = None
    try:
        for path, data in files.items():
            temps[temp_path(path)] = Path(path)
            with open_temp(temp_path(path)) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps.items():
            os.replace(tmp, path)
    except BaseException as err:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None and path is not None:
            err.filename = str(path)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data, **kwargs) -> None:
    atomic_write_text(path, json.dumps(data, **{"indent": 2, **kwargs}))


def prove_writable(folder: str | Path) -> None:
    """Make ``folder`` (and its parents) and write and remove an empty file in it: an OSError where it cannot be
    written (os.access says yes to root on a read-only or virtual filesystem such as /proc)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".dist_dejpeg_write_test{os.getpid()}"
    os.close(create_new(probe))  # (never through a link planted under that name: it would empty its target)
    probe.unlink()


def open_regular(path: str | Path, flags: int) -> int:
    """os.open(path, flags | O_CREAT) (the file made as the umask allows), never through a symbolic link nor to
    anything but a regular file (an OSError naming ``path``): a link planted in a shared folder would have the
    write land in the file it points to (a shell's startup file)."""
    try:
        fd = os.open(path, flags | os.O_CREAT | NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP and os.path.islink(path):
            raise OSError(errno.ELOOP, "a symbolic link, not followed", str(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file, not written", str(path))
    os.set_blocking(fd, True)  # (O_NONBLOCK was for the open alone: a planted FIFO must not hang it)
    return fd


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` (and a newline) to ``path`` with one write, the file made as the umask allows. A line an
    earlier write left cut short (a full disk) is ended first, so this one reads whole; a short write (the disk
    full now) is an OSError (ENOSPC) naming ``path``, as any other failure; so is a symbolic link or anything
    but a regular file at ``path`` (open_regular: never written through)."""
    fd = open_regular(path, os.O_RDWR | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        data = (("\n" if size and os.pread(fd, 1, size - 1) != b"\n" else "") + line.rstrip("\n") + "\n").encode()
        if os.write(fd, data) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a file of one a line (append_line's), skipping lines cut short or damaged; [] when the
    file is missing or unreadable (never raises)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            found.append(data)
    return found


def read_json(path: str | Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or half-written (never raises)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _umask() -> int:
    mask = os.umask(0o022)  # (read by setting it: once, at import, before any thread of ours starts)
    os.umask(mask)
    return mask


# the permission bits a plain open() gives a new file here (0644 under the usual umask 022, 0664 under 002): what
# every file of a run folder gets, so that a group sharing it reads it (safetensors 0.8 writes its files 0600)
FILE_MODE = 0o666 & ~_umask()


def as_umask_allows(path: str | Path) -> None:
    """Give the file ``path`` the permission bits FILE_MODE, where it has others (a library's 0600 file)."""
    if os.stat(path).st_mode & 0o777 != FILE_MODE:
        os.chmod(path, FILE_MODE)


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder by name (a folder: makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (where the platform has directory descriptors)."""
    try:
        fsync_path(path)
    except OSError:  # pragma: no cover - platforms without directory fds
        return


def _chain(err: BaseException | None):
    """``err`` and the exceptions it was raised from (__cause__, else __context__), each once."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a write that ran out of room: ENOSPC or EDQUOT,
    or a library's message for one (:data:`DISK_FULL_TEXT`); not where that room was shared memory (/dev/shm,
    not the disk the run writes to): an exception whose own text is :func:`is_shm_full`'s or an OSError on a
    file in /dev/shm. An OSError naming a file elsewhere is the disk's even when raised while handling a full
    /dev/shm (the run folder's progress.json written after a worker's crash); one that names no file is taken
    as /dev/shm's where the chain holds a full /dev/shm."""
    shm = is_shm_full(err)
    for e in _chain(err):
        if _shm_text(str(e)):
            continue
        if isinstance(e, OSError):
            if e.errno in DISK_FULL_ERRNOS:
                names = [n for n in (e.filename, e.filename2) if isinstance(n, (str, bytes, os.PathLike))]
                if (not shm and not names) or any(not _in_dev_shm(n) for n in names):
                    return True
        elif not shm and any(t in str(e).lower() for t in DISK_FULL_TEXT):
            return True
    return False


def _in_dev_shm(name) -> bool:
    path = os.path.abspath(os.fsdecode(name))
    return path == "/dev/shm" or path.startswith("/dev/shm/")


def _shm_text(text: str) -> bool:
    text = text.lower()
    return any(t in text for t in SHM_TEXT) and any(t in text for t in ("no space left", "os error 28", "(28)"))


def is_shm_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is torch's shared memory (/dev/shm) running out: a
    DataLoader worker's batch that found no room there (:data:`SHM_TEXT`, with "no space left on device")."""
    return any(_shm_text(str(e)) for e in _chain(err))


def is_quota(err: BaseException) -> bool:
    """Whether the full disk :func:`is_disk_full` sees in ``err`` is a user's or project's quota (EDQUOT), which
    a filesystem far from full can hit: its free space says nothing there."""
    return any(isinstance(e, OSError) and e.errno == errno.EDQUOT
               or not isinstance(e, OSError) and any(t in str(e).lower() for t in QUOTA_TEXT) for e in _chain(err))


def disk_full_text(err: BaseException, where: str | Path, free: int | None = None) -> str:
    """What a write that ran out of room says: ``disk full: <where>, <free> free`` (``free``: measured before,
    else now), or for a quota ``quota exceeded (EDQUOT) on <folder>; check `quota -s` / `lfs quota``` (no free
    space figure: the filesystem's would mislead)."""
    if is_quota(err):
        folder = Path(where) if Path(where).is_dir() else Path(where).parent
        return f"quota exceeded (EDQUOT) on {folder}; check `quota -s` / `lfs quota`"
    return f"disk full: {where}, {size_text(free_bytes(where) if free is None else free)} free"


def free_bytes(path: str | Path) -> int | None:
    """Free bytes (for unprivileged users) on the filesystem of ``path`` or of its nearest existing parent; None
    when not even that can be read. A quota (EDQUOT) can be exhausted with the filesystem far from full."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def size_text(n: int | None) -> str:
    """``0 B``, ``512 B``, ``3.1 KiB``, ``20.0 MiB``, ``1.5 GiB``; ``?`` when unknown."""
    if n is None:
        return "?"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def new_folders(*folders) -> list[Path]:
    """``folders`` and their parents that do not exist yet, deepest first: what a failed run removes again."""
    made = {f for folder in folders for f in (Path(folder).absolute(), *Path(folder).absolute().parents)
            if not f.exists()}
    return sorted(made, key=lambda f: len(f.parts), reverse=True)


def remove_empty(folders: list[Path], leftovers: tuple[str, ...] = ()) -> None:
    """Remove each of ``folders`` (deepest first, as new_folders lists them) that is still empty, or that holds
    nothing but files named in ``leftovers`` (a training start that failed leaves its released run lock)."""
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty (something else wrote there), or gone
            if all(p.name in leftovers and p.is_file() for p in folder.iterdir()):
                for name in leftovers:
                    (folder / name).unlink(missing_ok=True)
            folder.rmdir()
