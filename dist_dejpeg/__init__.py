"""dist_dejpeg: a distributed NoGAN trainer for JPEG-artifact removal, and the tools to use what it trains.

    from dist_dejpeg import Restorer
    restored = Restorer("runs/debug").restore(Image.open("photo.jpg"))
"""

__version__ = "0.1.0"  # pyproject.toml's (tests/test_cli.py checks they agree)
__all__ = ["Restorer", "code_version", "source_commit", "version"]


def version() -> str:
    """The installed distribution's version (its metadata), else ``__version__`` (a source tree on sys.path)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("dist_dejpeg")
    except PackageNotFoundError:
        return __version__


# what "-dirty" does not count: results and prose (a benchmark writing its results into benchmarks/results/ made
# every later result of the run, and every model trained after it, say -dirty of a clean checkout)
NOT_CODE = (":(exclude)benchmarks/results", ":(exclude)*.md")


def source_commit(checkout=None) -> str | None:
    """The code that runs: ``git describe --always`` of the checkout this package is imported from (or
    ``checkout``), "-dirty" where a tracked file other than results and prose (NOT_CODE) was edited since that
    commit, for benchmark results and generator files; None outside a git checkout (an installed wheel) or without
    git."""
    from pathlib import Path

    checkout = Path(checkout or Path(__file__).resolve().parents[1])
    if not (checkout / ".git").exists():  # (git -C would find a repository around a venv's site-packages)
        return None
    described = _git(checkout, "describe", "--always")
    if not described or described[0] != 0:
        return None
    changed = _git(checkout, "diff", "--quiet", "HEAD", "--", ".", *NOT_CODE)
    return (described[1].strip() or None) and described[1].strip() + ("-dirty" if changed and changed[0] else "")


def _git(checkout, *args: str) -> tuple[int, str] | None:
    """(exit status, stdout) of git in ``checkout``; None where git cannot run or takes over 20 s."""
    import subprocess

    try:  # (Popen: the tests that fake subprocess.run for a benchmark's children still get the commit)
        git = subprocess.Popen(["git", "-C", str(checkout), *args], text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    except OSError:
        return None
    try:
        out = git.communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
        git.kill()
        git.communicate()
        return None
    return git.returncode, out


def code_version() -> str:
    """What a generator file records of the code that trained it: "dist_dejpeg 0.1.0 (3f22a0c-dirty)"."""
    commit = source_commit()
    return f"dist_dejpeg {version()}" + (f" ({commit})" if commit else "")


def __getattr__(name):  # lazy: `import dist_dejpeg` stays cheap (no torch) for the CLI's argument parsing
    if name == "Restorer":
        from dist_dejpeg.restore.restorer import Restorer

        return Restorer
    raise AttributeError(f"module 'dist_dejpeg' has no attribute {name!r}")
