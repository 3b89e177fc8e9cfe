"""dist_dejpeg: a distributed NoGAN trainer for JPEG-artifact removal, and the tools to use what it trains.

    from dist_dejpeg import Restorer
    restored = Restorer("runs/debug").restore(Image.open("photo.jpg"))
"""

__version__ = "0.1.0"  # pyproject.toml's (tests/test_cli.py checks they agree)
__all__ = ["Restorer", "version"]


def version() -> str:
    """The installed distribution's version (its metadata), else ``__version__`` (a source tree on sys.path)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("dist_dejpeg")
    except PackageNotFoundError:
        return __version__


def __getattr__(name):  # lazy: `import dist_dejpeg` stays cheap (no torch) for the CLI's argument parsing
    if name == "Restorer":
        from dist_dejpeg.restore.restorer import Restorer

        return Restorer
    raise AttributeError(f"module 'dist_dejpeg' has no attribute {name!r}")
