"""JPEG degradation of a whole batch on the GPU with torchvision's nvJPEG encode/decode, for the torch
backend where DALI is not installed (``data.gpu_jpeg``). Per-sample quality: one batched encode and
decode per distinct quality in the batch.

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
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from dist_dejpeg.data.images import JFIF_YCBCR, jpeg_roundtrip

_YCC = torch.tensor(JFIF_YCBCR)  # as libjpeg converts
_RGB = torch.linalg.inv(_YCC)
_NVJPEG_SUBSAMPLING: dict[str, int] = {}  # device -> PIL's get_sampling code of nvJPEG's output (0: 4:4:4, 2: 4:2:0)


def _nvjpeg_444(images: torch.Tensor, quality: torch.Tensor, device_sync: bool = False) -> torch.Tensor:
    """nvJPEG round trip as the encoder writes it (per-quality groups). ``device_sync``: synchronize the whole
    device around each encode and decode. torchvision's cached nvJPEG encoder and decoder run on streams of
    their own, ordered against the stream that was current when they were created; called from another
    stream (the loader's degrade-ahead thread) the bytes were read back before the encoder had written them
    ("Failed to get image info", seen on an H100). A device-wide sync in that thread blocks only the thread."""
    from torchvision.io import decode_jpeg, encode_jpeg

    def sync():
        if device_sync:
            torch.cuda.synchronize(images.device)

    out = torch.empty_like(images)
    quality = quality.cpu()  # grouped on the host: the loader hands over its CPU copy, so no device sync here
    for q in torch.unique(quality).tolist():
        index = torch.nonzero(quality == q).flatten().tolist()
        sync()
        encoded = encode_jpeg([images[i].contiguous() for i in index], quality=int(q))
        sync()
        # nvJPEG's encoder leaves the bytes on the GPU; the decoder takes them from the host (a few KB each)
        encoded = [data.cpu() for data in encoded]
        decoded_all = decode_jpeg(encoded, device=images.device)
        sync()
        for i, decoded in zip(index, decoded_all):
            out[i] = decoded
    return out


def _sampling_of(jpeg_bytes: bytes) -> int:
    from PIL import Image, JpegImagePlugin

    return JpegImagePlugin.get_sampling(Image.open(io.BytesIO(jpeg_bytes)))


def nvjpeg_subsampling(device: torch.device) -> int:
    """PIL's sampling code of what nvJPEG writes on ``device`` (0: 4:4:4, 1: 4:2:2, 2: 4:2:0), probed once."""
    key = str(device)
    if key not in _NVJPEG_SUBSAMPLING:
        from torchvision.io import encode_jpeg

        probe = torch.zeros(3, 16, 16, dtype=torch.uint8, device=device)
        _NVJPEG_SUBSAMPLING[key] = _sampling_of(bytes(encode_jpeg(probe, quality=75).cpu().numpy()))
    return _NVJPEG_SUBSAMPLING[key]


def subsample_420(images: torch.Tensor, quality: torch.Tensor, roundtrip_444) -> torch.Tensor:
    """libjpeg's 4:2:0 round trip built from a 4:4:4 one (``roundtrip_444(images, quality)``): luma of the
    full-size round trip, chroma of the 2 x 2 box-averaged one, upsampled bilinearly. N x 3 x H x W uint8."""
    h, w = images.shape[-2:]
    full = roundtrip_444(images, quality)
    half = F.avg_pool2d(images.float(), 2, ceil_mode=True).round_().clamp_(0, 255).to(torch.uint8)
    half = roundtrip_444(half, quality)
    ycc, rgb = _YCC.to(images.device), _RGB.to(images.device)
    luma = torch.einsum("j,njhw->nhw", ycc[0], full.float())[:, None]
    chroma = torch.einsum("ij,njhw->nihw", ycc[1:], half.float())
    chroma = F.interpolate(chroma, size=(h, w), mode="bilinear", align_corners=False)
    out = torch.einsum("ij,njhw->nihw", rgb, torch.cat([luma, chroma], dim=1))
    return out.round_().clamp_(0, 255).to(torch.uint8)


def jpeg_roundtrip_cuda(images: torch.Tensor, quality: torch.Tensor, device_sync: bool = False) -> torch.Tensor:
    """images: N x 3 x H x W uint8 on a CUDA device; quality: N ints. Returns the decoded JPEGs, same shape,
    with libjpeg's 4:2:0 chroma subsampling whatever nvJPEG writes (see the module docstring). ``device_sync``:
    for calls from a thread on a side stream (see _nvjpeg_444)."""
    roundtrip = partial(_nvjpeg_444, device_sync=device_sync)
    if nvjpeg_subsampling(images.device) == 2:
        return roundtrip(images, quality)  # already 4:2:0
    return subsample_420(images, quality, roundtrip)


def jpeg_roundtrip_cpu(images: torch.Tensor, quality: torch.Tensor, subsampling: int = -1) -> torch.Tensor:
    """The same contract with libjpeg (PIL), one image at a time: the reference for the CUDA path.
    ``subsampling``: PIL's code (-1: its default, 4:2:0; 0: 4:4:4)."""
    def one(img, q):
        rgb = np.ascontiguousarray(img.permute(1, 2, 0).cpu().numpy())
        if subsampling == -1:
            return torch.from_numpy(jpeg_roundtrip(rgb, int(q)))
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=int(q), subsampling=subsampling)
        return torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))

    out = [one(img, q) for img, q in zip(images, quality)]
    return torch.stack(out).permute(0, 3, 1, 2).contiguous().to(images.device)
