"""Restoring images with a trained generator, starting from the generator file (never from the trainer):
``images`` (files in and out), ``metadata`` (what of an input's metadata its output keeps), ``inputs`` (the images
files, folders and globs name, and their output names), ``tiling`` (windows and blending), ``guard`` (restore or pass
through), ``reencode`` (whether writing the output in the input's lossy format again costs more than restoring
gains), ``base`` (what every restorer shares), ``restorer`` (the PyTorch ``Restorer``), ``onnx_backend`` (an
exported model on onnxruntime, torch-free), ``files`` (folders and globs into an output folder).

    from dist_dejpeg.restore import Restorer, open_restorer
    restorer = open_restorer("model.onnx", tile=512)   # OnnxRestorer: onnxruntime, torch never imported
    restorer = open_restorer("runs/debug")             # Restorer: PyTorch
    save_restored(restorer.restore("photo.jpg"), "photo.png")   # with the photo's ICC, EXIF, XMP
    # an input it cannot restore (not an image, cut short, animated ...): InputImageError (a ValueError), saying why
"""

__all__ = ["InputImageError", "OnnxRestorer", "Restorer", "open_restorer", "save_restored"]


def __getattr__(name):  # lazy, as dist_dejpeg's: importing this package imports no torch (the ONNX path)
    if name == "Restorer":
        from dist_dejpeg.restore.restorer import Restorer

        return Restorer
    if name == "OnnxRestorer":
        from dist_dejpeg.restore.onnx_backend import OnnxRestorer

        return OnnxRestorer
    if name == "InputImageError":  # what restore raises for an input it cannot restore (a ValueError): HTTP 400
        from dist_dejpeg.restore.images import InputImageError

        return InputImageError
    raise AttributeError(f"module 'dist_dejpeg.restore' has no attribute {name!r}")


def open_restorer(model, **kwargs):
    """The restorer for ``model``: an OnnxRestorer for an exported ``.onnx`` file (torch is not imported), else
    a PyTorch Restorer (a generator file, a run or checkpoint folder, or a module). ``kwargs``: Restorer's."""
    from dist_dejpeg.restore.onnx_backend import OnnxRestorer, is_onnx

    if is_onnx(model):
        return OnnxRestorer(model, **kwargs)
    try:
        from dist_dejpeg.restore.restorer import Restorer
    except ModuleNotFoundError as err:  # the README's restore-only install: onnxruntime, not the training side
        from dist_dejpeg.models.names import ModelFileError

        raise ModelFileError(f"{model}: restoring with a PyTorch model needs {err.name}, which is not installed here "
                             f"(pip install -e . installs it); or export it to ONNX where PyTorch is (dist-dejpeg "
                             f"export --model {model} --onnx model.onnx) and restore with --model model.onnx") from None
    return Restorer(model, **kwargs)


def save_restored(image, path, quality: int | None = None, strip_gps: bool = False) -> None:
    """Write a PIL image ``Restorer.restore`` returned with the writer the ``restore`` command uses: in the format
    ``path``'s suffix names (.png, .jpg, .webp, .tif; ``quality``: a jpg's or webp's), atomically, with the input's
    ICC profile, EXIF and XMP from ``image.info`` in every format, its dpi in all but WebP (which has no field for
    it) and a JPEG's comment in a JPEG (a PNG: its "Comment" text; WebP and TIFF: none), as restore/metadata.py says
    (Pillow's ``image.save(path, **image.info)`` drops the XMP and the comment from a PNG). What the command does
    beside it is its own: a PNG's text chunks and a JPEG's IPTC carried, and a JPEG written as a JPEG again left the
    input file where the re-encoding would cost more than restoring gains (restore/files.py). ``strip_gps``: without
    the EXIF's GPS and the XMP's exif:GPS* (restore --strip-gps). Torch-free."""
    from dist_dejpeg.restore.images import save_image, split_image
    from dist_dejpeg.restore.metadata import without_gps

    rgb, alpha, grayscale = split_image(image)
    info = image.info
    xmp = info.get("xmp")
    exif, xmp = without_gps(info.get("exif"), xmp.encode() if isinstance(xmp, str) else xmp) if strip_gps else (
        info.get("exif"), xmp)
    save_image(rgb, path, alpha=alpha, grayscale=grayscale, icc_profile=info.get("icc_profile"),
               exif=exif, quality=quality, dpi=info.get("dpi"), xmp=xmp, comment=info.get("comment"))
