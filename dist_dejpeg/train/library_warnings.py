"""Warnings that libraries print at every run about calls the project cannot change (Accelerate's and DeepSpeed's),
filtered by their message and category alone, so that every other warning still shows."""

from __future__ import annotations

import logging
import warnings

# DeepSpeed's own logger (deepspeed/utils/logging.py); it prints to stdout itself and does not propagate
DEEPSPEED_LOGGER = "DeepSpeed"


def _not_cpu_accelerator_note(record: logging.LogRecord) -> bool:
    """False for DeepSpeed's "Setting accelerator to CPU" warning, emitted once per process when deepspeed is first
    imported on a machine without a GPU (Accelerate imports it to unwrap any model): a CPU run means the CPU."""
    return not str(record.msg).startswith("Setting accelerator to CPU")


def silence_library_warnings() -> None:
    """torch 2.14's DDP calls broadcast_buffers deprecated (once per rank and model) for forward_sync_buffers, which
    Accelerate cannot pass yet and older torch lacks (build.py's False is meant); DeepSpeed's ZeRO calls
    torch.distributed.all_gather_into_tensor, which torch 2.14 calls deprecated for all_gather_single; MLflow's
    store uses a SQLAlchemy loader strategy deprecated in its 2.1. DeepSpeed's CPU note is a logging record:
    filtered on its logger, which exists before deepspeed is imported (getLogger makes it; DeepSpeed's set-up keeps
    its filters)."""
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    # MLflow's SQLite store (train.log_with=[mlflow]) sets up its tables with a SQLAlchemy loader deprecated in 2.1
    warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated",
                            category=DeprecationWarning)
    logging.getLogger(DEEPSPEED_LOGGER).addFilter(_not_cpu_accelerator_note)  # (added once however often called)
