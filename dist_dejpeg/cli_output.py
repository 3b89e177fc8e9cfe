"""What the commands say when their output cannot be written: a file (a full disk, a quota) or standard output
itself (`> /dev/full`, a log on a full disk, a reader that left); the modules of the full install. Torch-free."""

from __future__ import annotations

import sys

# the modules of pyproject.toml's dependencies that the README's restore-only install leaves out
CORE_MODULES = frozenset({"torch", "torchvision", "timm", "lpips", "webdataset", "accelerate", "torchmetrics",
                          "omegaconf", "yaml", "tensorboard", "safetensors", "skimage", "scipy"})


def write_failed(err: OSError, where) -> int:
    """The exit of a command whose output write failed: 3 where the disk (or the quota) is full, else 2; either
    way one line, not a traceback."""
    from dist_dejpeg.run.files import disk_full_text, free_bytes, is_disk_full, is_quota, size_text

    if is_disk_full(err):
        where = getattr(err, "filename", None) or where
        said = (f"{disk_full_text(err, where)}; free space within the quota" if is_quota(err)  # (training's words)
                else f"disk full writing {where} ({size_text(free_bytes(where))} free there now that the unfinished "
                     f"files are removed); free space")
        print(f"error: {said} and run the same command again", file=sys.stderr)
        return 3
    print(f"error: {err}", file=sys.stderr)
    return 2


def closed_stderr() -> bool:
    """Where standard error is closed (`2>&-`: Python's sys.stderr is None), point it at os.devnull and say True:
    print(..., file=sys.stderr) fell back to stdout (a warning inside `status --json`'s output), and a progress bar
    asked None whether it is a terminal (restore exited 1). fd 2 gets os.devnull too where it is free: else the next
    file opened takes fd 2, and what writes there (libjpeg's messages, a child process's stderr) goes into it."""
    import os

    if sys.stderr is not None:
        return False
    try:
        os.fstat(2)
    except OSError:  # (free: os.open gives the lowest free descriptor, 2 unless 0 or 1 is closed too)
        fd = os.open(os.devnull, os.O_WRONLY)
        if fd != 2:
            os.dup2(fd, 2)
            os.close(fd)
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - for the command
    else:  # (fd 2 is some file the process opened since: left alone)
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    return True


def relax_encoding(*streams) -> list:
    """Let ``streams`` (stdout, stderr) write what their encoding lacks as backslash escapes, not raise: Windows
    with stdout redirected writes the ANSI code page (cp1252), strictly, and a restore into 'восстановлено' or
    from 'ф.jpg' crashed at its summary line with UnicodeEncodeError after writing every output. Only a stream
    that is strict is changed (a surrogateescape one keeps writing undecodable file names back as they were);
    logging's handler writes the same sys.stderr object. Returns those changed, for strict_again."""
    changed = []
    for stream in streams:
        if getattr(stream, "errors", None) == "strict" and callable(getattr(stream, "reconfigure", None)):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (OSError, ValueError):  # (closed, or a stand-in that cannot)
                continue
            changed.append(stream)
    return changed


def strict_again(streams: list) -> None:
    """Undo relax_encoding on ``streams`` (main's caller gets its streams as it gave them)."""
    for stream in streams:
        try:
            stream.reconfigure(errors="strict")
        except (OSError, ValueError):  # (closed meanwhile; a reader that left: the flush fails)
            pass


class WatchedStdout:
    """sys.stdout while a command runs (cli.main): an OSError writing it is marked as standard output's, so that
    main tells it from a failed file write (`> /dev/full`, a log on a full disk; wandb, imported with timm,
    patches ``write`` on whatever sys.stdout is then: this object)."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def write(self, text):
        return self._marked(self.stream.write, text)

    def flush(self):
        return self._marked(self.stream.flush)

    @staticmethod
    def _marked(call, *args):
        try:
            return call(*args)
        except OSError as err:
            err.from_stdout = True
            raise


def stdout_failed(err: OSError, command: str) -> int | None:
    """The exit of a command whose standard output could not be written (None: ``err`` is not that): 141 for a
    reader that left (`status | head`, as a shell says SIGPIPE), else one line on stderr and 3 where the disk or
    quota is full, 2 otherwise; stdout goes to os.devnull (Python's own flush at exit would fail too)."""
    import os

    from dist_dejpeg.run.files import is_disk_full

    if not (isinstance(err, BrokenPipeError) or getattr(err, "from_stdout", False)):
        return None
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # (not a file: a test's stand-in)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - until the process ends
    if isinstance(err, BrokenPipeError):
        return 141
    print(f"error: {command}: cannot write to standard output ({err.strerror or err}): what it printed there is "
          f"lost", file=sys.stderr)
    return 3 if is_disk_full(err) else 2
