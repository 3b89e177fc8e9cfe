"""JPEG degradation of a whole batch on the GPU with torchvision's nvJPEG encode/decode, for the torch
backend where DALI is not installed (``data.gpu_jpeg``). Per-sample quality: one batched encode and
decode per distinct quality in the batch."""

from __future__ import annotations

import numpy as np
import torch

from dist_dejpeg.data.images import jpeg_roundtrip


def jpeg_roundtrip_cuda(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """images: N x 3 x H x W uint8 on a CUDA device; quality: N ints. Returns the decoded JPEGs, same shape."""
    from torchvision.io import decode_jpeg, encode_jpeg

    out = torch.empty_like(images)
    quality = quality.cpu()  # grouped on the host: the loader hands over its CPU copy, so no device sync here
    for q in torch.unique(quality).tolist():
        index = torch.nonzero(quality == q).flatten().tolist()
        encoded = encode_jpeg([images[i].contiguous() for i in index], quality=int(q))
        # nvJPEG's encoder leaves the bytes on the GPU; the decoder takes them from the host (a few KB each)
        encoded = [data.cpu() for data in encoded]
        for i, decoded in zip(index, decode_jpeg(encoded, device=images.device)):
            out[i] = decoded
    return out


def jpeg_roundtrip_cpu(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """The same contract with libjpeg (PIL), one image at a time: the reference for the CUDA path."""
    out = [torch.from_numpy(jpeg_roundtrip(np.ascontiguousarray(img.permute(1, 2, 0).cpu().numpy()), int(q)))
           for img, q in zip(images, quality)]
    return torch.stack(out).permute(0, 3, 1, 2).contiguous().to(images.device)
