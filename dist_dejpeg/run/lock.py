"""One writer per run folder: an exclusive ``flock`` on ``<run_dir>/.lock`` (:class:`RunLock`), and whether it
is held, read without locking (:func:`lock_status`, for ``status`` on a live run). Torch-free.

Whether the lock is held is read from the ``.lock`` file's inode among the FLOCK entries of ``/proc/locks``
(Linux; the kernel drops the flock when the holder dies, so a killed run shows none), and, when the file names
this host as the holder, whether that pid is alive. A holder on another host cannot be seen from here on most
shared filesystems (``/proc/locks`` lists this node's locks only); the lock is then "unknown".
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

from dist_dejpeg.run.files import new_folders, remove_empty
from dist_dejpeg.run.layout import LOCK

log = logging.getLogger(__name__)


class RunDirBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunDirLockFailed(RunDirBusy):
    """The run folder's filesystem refused the lock itself (ENOLCK, EOPNOTSUPP, ...): no other run is known to
    hold it. A RunDirBusy, so every caller that stops a run on a busy folder (all ranks, exit 2) stops on it."""


class RunLock:
    """One writer per run folder: an exclusive ``flock`` on ``<run_dir>/.lock``, held by the main process for
    the whole run and released by the kernel when the process ends (no stale locks after a kill -9 or a
    requeue). The file names the holder, for the error the second writer gets."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)  # (a failed start may have removed it meanwhile)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # only these mean "held by another"
                os.close(fd)
                raise RunDirLockFailed(
                    f"cannot lock run folder {self.path.parent}: flock failed with "
                    f"{errno.errorcode.get(err.errno, err.errno)} ({err.strerror}) on its filesystem ({filesystem(self.path)}): "
                    f"not another run holding it, but a filesystem that refuses file locks (some network "
                    f"filesystems do: NFS without lockd, Lustre or FUSE mounts without flock), so two runs could "
                    f"not be kept from overwriting each other's checkpoints. Set train.run_dir to a folder on a "
                    f"filesystem with working locks (a local disk, or ask your admins which shared one has "
                    f"them).") from None
            holder = describe_holder(os.read(fd, 4096).decode(errors="replace").strip())
            os.close(fd)
            raise RunDirBusy(f"run folder {self.path.parent} is in use by another training run ({holder}); two "
                             f"runs would overwrite each other's checkpoints. Stop that run, or set another "
                             f"train.run_dir.") from None
        if not _still_there(fd, self.path):  # (unlinked by the start that held it: lock the file there now)
            os.close(fd)
            return self.acquire()
        os.ftruncate(fd, 0)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd
        st = os.fstat(fd)
        _HELD_HERE.add((st.st_dev, st.st_ino))

    @contextlib.contextmanager
    def released_on_error(self) -> Iterator[RunLock]:
        """What follows acquire (a trainer's build): the lock released where it fails, not held by a half-built
        trainer until that is collected (a notebook's last traceback keeps it: a corrected run there was busy)."""
        try:
            yield self
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._fd is not None:
            st = os.fstat(self._fd)
            _HELD_HERE.discard((st.st_dev, st.st_ino))
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self):
        self.release()


_HELD_HERE: set[tuple[int, int]] = set()  # (device, inode) of the run locks this process's RunLocks hold
PREPARE_LOCK = ".prepare.lock"  # in a data folder: one process writes shards there at a time
def _still_there(fd: int, path: Path) -> bool:
    """Whether the file locked through ``fd`` is still the one at ``path``: a start that failed removes its folder's
    lock file, holding the flock while it unlinks it (remove_unheld), so a process whose flock was granted on that
    file then holds a lock no later process can see, and must take the file there now instead."""
    try:
        here, locked = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (locked.st_dev, locked.st_ino)


@contextlib.contextmanager
def removed_if_start_fails(run_dir: str | Path) -> Iterator[None]:
    """A training start in ``run_dir``: the folders it makes (new_folders; by the main process, RANK 0) removed
    again (remove_unheld) where the block fails with an error, so that a start that failed (a misspelt encoder)
    leaves no run folder behind. Not where it failed as RunDirBusy: the folder is then another run's, made
    meanwhile (two starts raced for one new folder)."""
    made = new_folders(run_dir) if os.environ.get("RANK", "0") == "0" else []
    try:
        yield
    except RunDirBusy:
        raise
    except Exception:
        remove_unheld(made)
        raise


def remove_unheld(folders: list[Path], name: str = LOCK) -> None:
    """remove_empty(``folders``, leftovers=(``name``,)) for a start that failed, unless another process holds the
    lock file ``name`` in the deepest of them: then they are that process's (two runs started on one new folder:
    the one that lost the race removed the winner's folder and lock, and a third could start in it). The file is
    unlinked while its flock is held here, so a process waiting on it takes the new one (_still_there)."""
    import fcntl

    lock = next((f / name for f in folders if (f / name).is_file()), None)
    if lock is None:
        return remove_empty(folders)
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: by a RunLock of this process (a start that failed, its trainer not yet collected),
            st = os.fstat(fd)  # or another's folder now: left to it (not told by the file's holder entry: an
            if (st.st_dev, st.st_ino) not in _HELD_HERE:  # earlier holder's stays until the next one writes its own)
                return None
        remove_empty(folders, leftovers=(name,))
    finally:
        os.close(fd)


def describe_holder(raw: str) -> str:
    """The lock file's holder as people read it: "held by host node1, pid 12, SLURM job 7 since 2026-12-07 10:00"."""
    try:
        holder = json.loads(raw) if raw else None
    except ValueError:
        holder = None
    if not isinstance(holder, dict):  # empty: its holder locked it a moment ago and has not named itself yet
        return "held by a run that is just starting" if not raw else f"held; the lock file says {raw[:200]!r}"
    return f"held by {_who(holder)} since {holder.get('since') or '?'}"


def _who(holder: dict) -> str:
    pid = holder.get("pid")
    who = f"host {holder.get('host') or '?'}, pid {pid if pid is not None else '?'}"
    return who + (f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else "")


_held: dict[str, int] = {}  # this process's data-folder locks (path -> depth): taken again inside, not waited for


@contextlib.contextmanager
def writing_into(folder: str | Path) -> Iterator[None]:
    """One process at a time writes shards into ``folder`` (made if missing): an exclusive ``flock`` on its
    ``.prepare.lock``, waited for (said once) while another holds it, e.g. the runs of a SLURM array that all
    write the sample shards into the same data.root on their first start. Where the filesystem refuses flock,
    the block runs unlocked, as before. A block that fails leaves no folder of its making (nor its lock file)."""
    import fcntl

    key = os.path.realpath(folder)
    if key in _held:  # (prepare_samples inside ensure_samples' check)
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    made = new_folders(folder)
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(folder) / PREPARE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                log.info("waiting for another process writing shards into %s", folder)
                fcntl.flock(fd, fcntl.LOCK_EX)
        while not _still_there(fd, Path(folder) / PREPARE_LOCK):  # (a failed holder removed it: lock the new one)
            os.close(fd)
            fd = -1  # (closed: not again in finally, should what follows fail)
            Path(folder).mkdir(parents=True, exist_ok=True)
            fd = os.open(Path(folder) / PREPARE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _held[key] = 1
        yield
    except BaseException:
        remove_empty(made, leftovers=(PREPARE_LOCK,))  # (its flock still held: see _still_there)
        raise
    finally:
        _held.pop(key, None)
        if fd >= 0:
            os.close(fd)  # (drops the flock)


def filesystem(path: str | Path, mounts: str = "/proc/self/mounts") -> str:
    """The type and mount point of the filesystem holding ``path`` ("nfs4 at /home"), read from the mount
    table (Linux); "unknown" where it cannot be read."""
    try:
        target = os.path.realpath(path)
        best = ("", "")
        for line in Path(mounts).read_text().splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            point = fields[1].replace("\\040", " ")
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best[0]):
                best = (point, fields[2])
    except OSError:
        return "unknown"
    return f"{best[1]} at {best[0]}" if best[0] else "unknown"


def _proc_locks(path: str = "/proc/locks") -> list[dict] | None:
    """FLOCK entries of /proc/locks as [{pid, dev: (major, minor), inode}], or None where it cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    found = []
    for line in text.splitlines():
        fields = line.split()
        if "->" in fields:  # a waiter blocked on a lock, not a holder
            continue
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            pid = int(fields[4])
            major, minor, inode = fields[5].split(":")
            found.append({"pid": pid, "dev": (int(major, 16), int(minor, 16)), "inode": int(inode)})
        except ValueError:
            continue
    return found


# Windows' os.kill(pid, 0) is no existence check: it sends CTRL_C_EVENT to the console group ``pid``
WINDOWS = os.name == "nt"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (another user's counts). On Windows psutil's answer (a
    dependency of accelerate; the restore-only install may lack it): without it, True (a stale temp file waits
    for its max age; a lock with that pid reads as held), never os.kill."""
    if pid <= 0:  # kill(0) and kill(-n) signal process groups, not a process
        return False
    if WINDOWS:
        try:
            import psutil
        except ImportError:
            return True
        try:
            return psutil.pid_exists(pid)
        except OverflowError:  # a number no pid can be
            return False
        except (OSError, psutil.Error):  # (cannot tell: as if alive)
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, OverflowError):  # OverflowError: a number no pid can be
        return False
    return True


def lock_status(run_dir: str | Path, proc_locks: str = "/proc/locks", hostname: str | None = None) -> dict:
    """Whether ``<run_dir>/.lock`` is held, without locking it. ``held``: True, False, or None (unknown)."""
    path = Path(run_dir) / LOCK
    out = {"exists": False, "held": False, "host": None, "pid": None, "slurm_job": None, "since": None,
           "checked_by": None, "detail": "no lock file (the run never started a trainer)"}
    try:
        st = path.stat()
        raw = path.read_text(errors="replace").strip()
    except OSError:
        return out
    out["exists"] = True
    try:
        holder = json.loads(raw) if raw else {}
    except ValueError:
        holder = {}
    if isinstance(holder, dict):
        out.update({k: holder.get(k) for k in ("host", "pid", "slurm_job", "since")})
    here = hostname or socket.gethostname()
    host = out["host"] if isinstance(out["host"], str) and out["host"] else None
    pid = out["pid"] if isinstance(out["pid"], int) and not isinstance(out["pid"], bool) else None
    same_host = host is None or host == here or host.split(".")[0] == here.split(".")[0]
    locks = _proc_locks(proc_locks)
    if locks is not None:
        dev = (os.major(st.st_dev), os.minor(st.st_dev))
        # the inode on the same device; an inode-only match (overlay filesystems report another device) counts
        # when its pid is the one the lock file names
        match = [e for e in locks if e["inode"] == st.st_ino and (e["dev"] == dev or (pid and e["pid"] == pid))]
        if match:
            out.update(held=True, checked_by="/proc/locks")
            if pid is None and match[0]["pid"] > 0:
                out["pid"] = match[0]["pid"]
        elif same_host:  # this kernel would list the lock of a process on this host
            out.update(held=False, checked_by="/proc/locks")
        else:  # a shared filesystem: this node's /proc/locks does not list another node's locks
            out.update(held=None, checked_by=None)
    elif same_host and pid:  # no /proc/locks (not Linux): a live holder pid on this host
        out.update(held=pid_alive(pid), checked_by="pid")
    else:
        out.update(held=None, checked_by=None)
    who = _who(out)
    out["pid_alive"] = pid_alive(pid) if same_host and pid else None
    if out["held"] is True:
        out["detail"] = f"held by {who} since {out['since'] or '?'}"
        if out["checked_by"] == "pid":
            out["detail"] += " (pid alive; /proc/locks unreadable)"
        elif out["pid_alive"] is False:  # a forked child (data worker) still has the locked file open
            out["detail"] += f" (pid {pid} is gone; a child process it left still holds the lock)"
    elif out["held"] is False:
        out["detail"] = f"not held (last holder: {who})"
        if out["pid_alive"]:
            out["detail"] += f"; pid {pid} is alive but no longer holds it"
    else:
        out["detail"] = f"unknown (held by host {host or '?'}? cannot check from here; last holder: {who})"
    return out
