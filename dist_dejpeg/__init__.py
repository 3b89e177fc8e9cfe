"""dist_dejpeg: a distributed NoGAN trainer for JPEG-artifact removal, and the tools to use what it trains.

    from dist_dejpeg import Restorer
    restored = Restorer("runs/debug").restore(Image.open("photo.jpg"))
"""

__version__ = "0.1.0"
__all__ = ["Restorer"]


def __getattr__(name):  # lazy: `import dist_dejpeg` stays cheap (no torch) for the CLI's argument parsing
    if name == "Restorer":
        from dist_dejpeg.restore.restorer import Restorer

        return Restorer
    raise AttributeError(f"module 'dist_dejpeg' has no attribute {name!r}")
