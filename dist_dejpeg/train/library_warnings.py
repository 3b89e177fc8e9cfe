"""Warnings that libraries print at every run about calls the project cannot change (Accelerate's and DeepSpeed's),
filtered by their message and category alone, so that every other warning still shows."""

from __future__ import annotations

import warnings


def silence_library_warnings() -> None:
    """torch 2.14's DDP calls broadcast_buffers deprecated (once per rank and model) for forward_sync_buffers, which
    Accelerate cannot pass yet and older torch lacks (build.py's False is meant); DeepSpeed's ZeRO calls
    torch.distributed.all_gather_into_tensor, which torch 2.14 calls deprecated for all_gather_single."""
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
