"""JPEG degradation of a whole batch on the GPU with torchvision's nvJPEG encode/decode, for the torch
backend where DALI is not installed (``data.gpu_jpeg``). Per-sample quality: one encode and decode per
distinct quality in the batch, its images laid out on one canvas (``packed_roundtrip``).

Chroma subsampling. libjpeg (PIL, OpenCV) writes 4:2:0 by default, and so do the published benchmarks and
``evaluate``; torchvision's nvJPEG encoder writes 4:4:4 (its quantization tables are libjpeg's; measured on an
H100, benchmarks/results/gpu-nvidia-h100-2026-11-26). Trained on 4:4:4 alone, the model would never see the
chroma artifacts that dominate real JPEGs at light compression (4:4:4 came out 0.3 dB closer to the clean
image at q10 and 0.7 dB at q80). So the 4:2:0 round trip is rebuilt from two 4:4:4 ones, as libjpeg
computes it: luma from the full-size image (JPEG quantizes Y independently of the chroma), chroma from the
image box-averaged 2 x 2 (libjpeg's h2v2 downsampling; RGB -> YCbCr is linear, so averaging RGB averages
Cb/Cr), decoded and upsampled bilinearly (libjpeg's "fancy" triangle filter). With PIL's 4:4:4 encoder in
place of nvJPEG this lands within 0.03 dB of libjpeg's 4:2:0 at q10..q90 and within ~48 dB PSNR of its
pixels (tests/test_data.py).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dist_dejpeg.data.images import jpeg_roundtrip
from dist_dejpeg.jpeg.formats import JFIF_YCBCR

_YCC = torch.tensor(JFIF_YCBCR)  # as libjpeg converts
_RGB = torch.linalg.inv(_YCC)
_NVJPEG_SUBSAMPLING: dict[str, int] = {}  # device -> PIL's get_sampling code of nvJPEG's output (0: 4:4:4, 2: 4:2:0)


# round trips of images (each 3 x H x W uint8) at one quality -> the decoded images, same shapes and device
RoundTrip = Callable[[list[torch.Tensor], int], list[torch.Tensor]]

_BLOCK = 8  # a 4:4:4 JPEG codes 8 x 8 blocks independently (no chroma upsampling across them)
_MAX_CANVAS = 1 << 24  # pixels per packed canvas (4096^2): far below JPEG's 65535 px per side


def _nvjpeg_encode(images: list[torch.Tensor], quality: int) -> list[torch.Tensor]:
    """torchvision's nvJPEG encode of images (3 x H x W uint8, one device), the bytes on that device and written.

    Streams (torchvision's encode_jpegs_cuda.cpp): the cached encoder reads the images on a pool stream of its
    own, not ordered after the caller's stream, and copies the bytes out on the legacy default stream (stream 0),
    not ordered before it. So the caller's stream is synchronized before the encode (its images must be written)
    and stream 0 after it. Both waits are per stream: called from the loader's degrade-ahead thread they wait for
    that thread's work and for stream 0, never for a training that runs on a stream of its own
    (``train.cuda_stream``). The previous device-wide syncs waited for every queued training step."""
    from torchvision.io import encode_jpeg

    device = images[0].device
    images = [image.contiguous() for image in images]
    torch.cuda.current_stream(device).synchronize()
    encoded = encode_jpeg(images, quality=int(quality))
    torch.cuda.default_stream(device).synchronize()
    return encoded


def _nvjpeg_coder(images: list[torch.Tensor], quality: int) -> list[torch.Tensor]:
    """nvJPEG round trip of images at one quality, as the encoder writes them: one encode and one decode call.
    The decoder synchronizes its own stream and orders the caller's stream after it (decode_jpegs_cuda.cpp)."""
    from torchvision.io import decode_jpeg

    # nvJPEG's encoder leaves the bytes on the GPU; the decoder takes them from the host (a few KB each)
    return decode_jpeg([data.cpu() for data in _nvjpeg_encode(images, quality)], device=images[0].device)


def libjpeg_coder(images: list[torch.Tensor], quality: int, subsampling: int = -1) -> list[torch.Tensor]:
    """libjpeg's (PIL's) round trip of images at one quality, one by one; ``subsampling``: PIL's code (-1: its
    default, 4:2:0; 0: 4:4:4)."""
    return [torch.from_numpy(jpeg_roundtrip(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()), quality,
                                            subsampling)).permute(2, 0, 1).to(image.device) for image in images]


def _packable(tiles: list[torch.Tensor]) -> bool:
    return all(t.shape[-1] % _BLOCK == 0 and t.shape[-2] % _BLOCK == 0 for t in tiles)


def _shelf_places(sizes: list[tuple[int, int]], width: int) -> tuple[list[tuple[int, int]], int]:
    """Top-left corners of tiles laid left to right on shelves of ``width`` (tallest first), and the height."""
    places: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    y = x = shelf = 0
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i][0]):
        h, w = sizes[i]
        if x + w > width:
            y, x, shelf = y + shelf, 0, 0
        places[i] = (y, x)
        x, shelf = x + w, max(shelf, h)
    return places, y + shelf


def packed_roundtrip(tiles: list[torch.Tensor], quality: int, coder: RoundTrip) -> list[torch.Tensor]:
    """One round trip (``coder``) of many tiles at one quality, laid out on one canvas: a 4:4:4 JPEG codes every
    8 x 8 block on its own, so with every tile's size and place on the 8-pixel grid each tile decodes exactly
    as if it had been coded alone (tests/test_data.py checks it pixel for pixel with libjpeg). One nvJPEG call
    per quality instead of one per image: torchvision encodes image by image, each with two host syncs."""
    sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tiles]
    area = sum(h * w for h, w in sizes)
    if len(tiles) == 1 or area > _MAX_CANVAS:
        if len(tiles) > 1:  # split in halves until each canvas fits
            half = len(tiles) // 2
            return packed_roundtrip(tiles[:half], quality, coder) + packed_roundtrip(tiles[half:], quality, coder)
        return coder(tiles, quality)
    # about square: nvJPEG and libjpeg both take either, but a square canvas wastes less on the last shelf
    width = max(max(w for _, w in sizes), -(-int(area ** 0.5) // _BLOCK) * _BLOCK)
    places, height = _shelf_places(sizes, width)
    canvas = tiles[0].new_zeros(3, height, width)
    for t, (y, x), (h, w) in zip(tiles, places, sizes):
        canvas[:, y:y + h, x:x + w] = t
    out = coder([canvas], quality)[0]
    return [out[:, y:y + h, x:x + w] for (y, x), (h, w) in zip(places, sizes)]


def roundtrip_by_quality(tiles: list[torch.Tensor], quality: list[int], coder: RoundTrip,
                         pack: bool = True) -> list[torch.Tensor]:
    """Each tile's round trip at its own quality: tiles grouped by quality, each group packed on one canvas
    (``pack`` and 8-aligned sizes; only valid where ``coder`` writes 4:4:4) or handed to ``coder`` as a list."""
    out: list[torch.Tensor | None] = [None] * len(tiles)
    for q in sorted(set(quality)):
        index = [i for i, qi in enumerate(quality) if qi == q]
        group = [tiles[i] for i in index]
        decoded = packed_roundtrip(group, q, coder) if pack and _packable(group) else coder(group, q)
        for i, d in zip(index, decoded):
            out[i] = d
    return out  # type: ignore[return-value]


def _sampling_of(jpeg_bytes: bytes) -> int:
    from PIL import Image, JpegImagePlugin

    return JpegImagePlugin.get_sampling(Image.open(io.BytesIO(jpeg_bytes)))


def nvjpeg_subsampling(device: torch.device) -> int:
    """PIL's sampling code of what nvJPEG writes on ``device`` (0: 4:4:4, 1: 4:2:2, 2: 4:2:0), probed once."""
    key = str(device)
    if key not in _NVJPEG_SUBSAMPLING:
        probe = torch.zeros(3, 16, 16, dtype=torch.uint8, device=device)
        _NVJPEG_SUBSAMPLING[key] = _sampling_of(bytes(_nvjpeg_encode([probe], 75)[0].cpu().numpy()))
    return _NVJPEG_SUBSAMPLING[key]


def subsample_420(images: torch.Tensor, quality: torch.Tensor, coder: RoundTrip, pack: bool = True) -> torch.Tensor:
    """libjpeg's 4:2:0 round trip built from 4:4:4 ones (``coder(images, quality)``, see roundtrip_by_quality):
    luma of the full-size round trip, chroma of the 2 x 2 box-averaged one, upsampled bilinearly; both sizes at
    one quality share a canvas. N x 3 x H x W uint8."""
    n, (h, w) = images.shape[0], images.shape[-2:]
    half = F.avg_pool2d(images.float(), 2, ceil_mode=True).round_().clamp_(0, 255).to(torch.uint8)
    qs = [int(q) for q in quality.cpu().tolist()]  # the loader hands over its CPU copy: no device sync
    decoded = roundtrip_by_quality(list(images) + list(half), qs + qs, coder, pack)
    full, half = torch.stack(decoded[:n]), torch.stack(decoded[n:])
    ycc, rgb = _YCC.to(images.device), _RGB.to(images.device)
    luma = torch.einsum("j,njhw->nhw", ycc[0], full.float())[:, None]
    chroma = torch.einsum("ij,njhw->nihw", ycc[1:], half.float())
    chroma = F.interpolate(chroma, size=(h, w), mode="bilinear", align_corners=False)
    out = torch.einsum("ij,njhw->nihw", rgb, torch.cat([luma, chroma], dim=1))
    return out.round_().clamp_(0, 255).to(torch.uint8)


def jpeg_roundtrip_cuda(images: torch.Tensor, quality: torch.Tensor, pack: bool = True) -> torch.Tensor:
    """images: N x 3 x H x W uint8 on a CUDA device; quality: N ints. Returns the decoded JPEGs, same shape,
    with libjpeg's 4:2:0 chroma subsampling whatever nvJPEG writes (see the module docstring). ``pack``: one nvJPEG
    round trip per quality on a canvas of the batch's tiles (see packed_roundtrip) instead of the images as a list
    (nvJPEG codes the list image by image)."""
    if nvjpeg_subsampling(images.device) == 2:  # already 4:2:0: tiles would share chroma across their edges
        qs = [int(q) for q in quality.cpu().tolist()]
        return torch.stack(roundtrip_by_quality(list(images), qs, _nvjpeg_coder, pack=False))
    return subsample_420(images, quality, _nvjpeg_coder, pack)


def jpeg_roundtrip_cpu(images: torch.Tensor, quality: torch.Tensor, subsampling: int = -1) -> torch.Tensor:
    """The same contract with libjpeg (PIL), one image at a time: the reference for the CUDA path.
    ``subsampling``: PIL's code (-1: its default, 4:2:0; 0: 4:4:4)."""
    out = [libjpeg_coder([img], int(q), subsampling)[0] for img, q in zip(images, quality)]
    return torch.stack(out).contiguous().to(images.device)
