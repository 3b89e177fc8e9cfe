"""Whether a restored image written back in its input's lossy format (``restore --format same``, ``jpg``) would
be further from the clean photo than the input file itself: the re-encoding adds error, restoring removes some.
restore/files.py writes the input file instead where it would (a pass-through, said)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, JpegImagePlugin

from dist_dejpeg.restore.images import LoadedImage, join_image

# the input's compression costs the restored image 0.07-0.2 of the JPEG's own error (held-out photos, the debug
# model: benchmarks/RESULTS.md): 5 times it is the JPEG's error at most for a restoration that smooth
OWN_ERROR_SHARE = 5.0


def reencoding_outweighs(restored: np.ndarray, encoded: bytes, image: LoadedImage, quality: int, gain: float,
                         jpeg_psnr: float | None = None, earlier: bool = False) -> str | None:
    """Why ``encoded`` (the restored image, in the input's lossy format: --format same, jpg) would be worse than
    the input file itself, or None. Its error against the clean photo is the restored image's plus the
    re-encoding's (``encoded`` against ``restored``, measured), and the restored image's is the JPEG's lowered
    by ``gain`` dB (the guard's lower bound at ``quality``): restoring removes the JPEG's error times
    1 - 10^(-gain/10), and the re-encoding must add less. The JPEG's error: what the input's compression (its
    tables and subsampling) costs the restored image, this photo's own but a fraction of the JPEG's (the restored
    image is smoother than the photo: 0.07-0.2 of it on held-out photos with the debug model), so taken
    OWN_ERROR_SHARE times, and no more than the validation's at that quality (``jpeg_psnr``, in generator files
    since 2026-12-07; an older file: the fraction alone): a smooth photo, whose JPEG error is well under the
    validation's, is not re-encoded into a loss. Measured on held-out photos, q10-q90, a q95 re-encoding:
    benchmarks/RESULTS.md. ``earlier``: restored as an earlier, coarser compression than the file's own
    (jpeg.quality.earlier_compression): that one, at ``quality`` (4:2:0), is the JPEG's error, not the file's finer
    tables'."""
    written = join_image(restored, None, image.grayscale)
    ref = np.asarray(written, np.float32)

    def error(data: bytes) -> float:
        return float(np.mean((np.asarray(Image.open(io.BytesIO(data)).convert(written.mode), np.float32) - ref) ** 2))

    src = image.image
    tables = (getattr(src, "quantization", None) if src is not None and src.format in ("JPEG", "MPO") and not earlier
              else None)
    options = ({"qtables": [tables[k] for k in sorted(tables)][:1 if image.grayscale else 2],
                "subsampling": max(JpegImagePlugin.get_sampling(src), 0)} if tables
               else {"quality": quality, "subsampling": 2})
    buf = io.BytesIO()
    written.save(buf, format="JPEG", **options)
    own = error(buf.getvalue())  # the input's compression on the restored image: this photo's, a fraction of it
    mse_j = own if jpeg_psnr is None else min(255.0**2 * 10 ** (-jpeg_psnr / 10), OWN_ERROR_SHARE * own)
    mse_e = error(encoded)
    if mse_e <= mse_j * (1 - 10 ** (-gain / 10)):
        return None
    return (f"re-encoding as {written_as(image.format)} would add more error than restoring removes (the "
            f"re-encoding alone: {_psnr(mse_e):.1f} dB PSNR against the restored image; restoring: at least "
            f"{gain:+.2f} dB at q{quality}, the validation's lower bound): the input written unchanged")


def written_as(fmt: str) -> str:
    """The output format a file of Pillow format ``fmt`` is the same as (a camera's MPO: JPEG)."""
    return {"MPO": "JPEG"}.get(fmt, fmt)


def _psnr(mse: float) -> float:
    return 10 * math.log10(255**2 / mse) if mse > 0 else math.inf
