"""The Accelerator in front of the training loop, and the optimizer wrappers it puts around AdamW.

    acc = build_accelerator(cfg)   # Accelerate (DDP / one process / CPU), or one DeepSpeed engine per model
    setup_logging(acc)             # INFO on the main process, WARNING on the others
    _innermost(opt)                # the torch AdamW under Accelerate's and DeepSpeed's optimizer wrappers

``train.deepspeed_stage`` 1 or 2 (or an ``accelerate launch`` DeepSpeed config, whose stage must agree)
selects Accelerate's multi-model DeepSpeed: one plugin per model, "gen" and, when a phase trains it,
"critic"; the trainer prepares them one after the other. Otherwise a plain Accelerator with the run's
mixed precision and gradient accumulation. Config errors name the config key.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

from dist_dejpeg.config import Config, ConfigError, clip_norms
from dist_dejpeg.train.phases import trains_critic


def build_accelerator(cfg: Config) -> Accelerator:
    t = cfg.train
    cpu = t.cpu or not torch.cuda.is_available()
    if cpu and t.mixed_precision == "fp16":
        raise ConfigError("config key 'train.mixed_precision': fp16 needs a GPU; use bf16 or no on CPU")
    if not cpu and t.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        # pre-Ampere cards emulate bf16 slowly: the default bf16 becomes fp32 there, said once, not silently
        logging.getLogger("dist_dejpeg").warning("train.mixed_precision=bf16: %s has no bf16; training in fp32 "
                                                 "(set fp16 to use its tensor cores)", torch.cuda.get_device_name())
        t.mixed_precision = "no"
    # a dead or stuck rank fails every collective after this long instead of hanging
    timeout = timedelta(seconds=t.dist_timeout_s)
    launched = _launcher_deepspeed_stage()
    if launched is not None:
        if t.deepspeed_stage == 0:
            t.deepspeed_stage = launched
        if t.deepspeed_stage != launched or launched not in (1, 2):
            raise ConfigError(f"config key 'train.deepspeed_stage': {t.deepspeed_stage}, but the accelerate launcher "
                              f"config asks for ZeRO stage {launched}; the trainer supports 1 and 2")
    if t.deepspeed_stage:
        return _deepspeed_accelerator(cfg, cpu, timeout)
    return Accelerator(
        cpu=cpu,
        mixed_precision=t.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.grad_accum, sync_with_dataloader=False),
        # Spectral-norm (u, v) and batch-norm buffers change in every forward; broadcasting them from
        # rank 0 at each forward breaks when a model runs twice before a backward.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                         InitProcessGroupKwargs(timeout=timeout)],
        **_tracking(cfg),
    )


def _tracking(cfg: Config) -> dict:
    """Accelerate's experiment trackers (train.log_with), checked before anything else starts."""
    from pathlib import Path

    from dist_dejpeg.train.monitor import check_trackers, tracker_objects

    check_trackers(list(cfg.train.log_with))
    run_dir = Path(cfg.train.run_dir)
    return {"log_with": tracker_objects(list(cfg.train.log_with), run_dir), "project_dir": str(run_dir)}


def _launcher_deepspeed_stage() -> int | None:
    """The ZeRO stage when `accelerate launch` was given a DeepSpeed config (launch/accelerate/
    deepspeed_zero2.yaml). Its ACCELERATE_DEEPSPEED_* settings are dropped: the trainer's two per-model
    plugins carry the whole DeepSpeed config, and Accelerate refuses the mix of both."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("1", "true", "yes"):
        return None
    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    dropped = ("ACCELERATE_CONFIG_DS_FIELDS", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING")
    for key in [k for k in os.environ if k.startswith("ACCELERATE_DEEPSPEED_") or k in dropped]:
        del os.environ[key]
    return stage


def deepspeed_config(cfg: Config, world: int, max_grad_norm: float) -> dict:
    """One model's DeepSpeed config. Parameters stay fp32 (the steps autocast to bf16 themselves: DeepSpeed's
    own bf16 casts parameters but not batch-norm buffers and wants bf16 inputs); no "optimizer" key, so the
    trainer's AdamW is used; the engine divides by and steps after grad_accum micro-steps."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world,  # explicit: no loader is prepared
        "gradient_accumulation_steps": t.grad_accum,
        "zero_optimization": {"stage": t.deepspeed_stage},
        "gradient_clipping": float(max_grad_norm),  # 0.0: off (left out, or "auto", DeepSpeed clips at 1.0)
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
    }


def _deepspeed_accelerator(cfg: Config, cpu: bool, timeout: timedelta) -> Accelerator:
    """Accelerate's multi-model DeepSpeed: one plugin (one engine) per model, "gen" selected by default."""
    try:
        import deepspeed  # noqa: F401
        from accelerate.utils import DeepSpeedPlugin
    except ImportError:
        raise ConfigError("config key 'train.deepspeed_stage': DeepSpeed is not installed; "
                          "pip install 'dist-dejpeg[deepspeed]' (or set train.deepspeed_stage=0)") from None
    if cfg.train.cpu and torch.cuda.is_available():
        # Accelerator(cpu=True) silently turns DeepSpeed off
        raise ConfigError("config keys 'train.cpu'/'train.deepspeed_stage': DeepSpeed on the CPU of a GPU machine is "
                          "not supported; hide the GPUs (CUDA_VISIBLE_DEVICES=) or set train.cpu=false")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by the launcher; train_batch_size must be explicit
    norms = clip_norms(cfg.train)
    phases = [cfg.train.phases[name] for name in cfg.train.order]
    plugins = {"gen": DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world, norms["gen"]))}
    if any(trains_critic(p) for p in phases):
        plugins["critic"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world, norms["critic"]))
    group = InitProcessGroupKwargs(backend="gloo", timeout=timeout) if cpu else InitProcessGroupKwargs(timeout=timeout)
    acc = Accelerator(
        cpu=False,  # cpu=True (or ACCELERATE_USE_CPU=1) disables DeepSpeed; without a GPU it runs on the CPU
        mixed_precision="no",  # the run's bf16 is applied by autocast in the steps (Trainer.autocast)
        deepspeed_plugins=plugins,
        kwargs_handlers=[group],
        **_tracking(cfg),
    )
    if acc.num_processes != world:
        raise RuntimeError(f"DeepSpeed: {acc.num_processes} processes, but WORLD_SIZE said {world}")
    return acc


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(accelerator: Accelerator, level: str = "info") -> None:
    """One format for every logger; ``level`` on the main process, warnings and errors on the others."""
    value = getattr(logging, level.upper()) if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(level=value, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(value)
    logging.getLogger("dist_dejpeg").setLevel(value)
    # accelerate narrates every checkpoint file at INFO (six lines per save); the trainer says "checkpoint:
    # <folder>" once. Its warnings and errors still show; --log-level debug shows everything.
    logging.getLogger("accelerate").setLevel(value if value <= logging.DEBUG else max(value, logging.WARNING))


def _innermost(optimizer):
    """The torch optimizer under Accelerate's wrapper (DDP: AcceleratedOptimizer -> AdamW) or DeepSpeed's
    (DeepSpeedOptimizerWrapper -> DeepSpeedZeroOptimizer -> AdamW, over the flat fp32 partitions)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _refresh_master_weights(optimizer) -> None:
    """After writing a DeepSpeed model's parameters directly: ZeRO-1/2 keep their own fp32 master copy, which
    the next step (and a checkpoint's resume) would otherwise restore over what was written."""
    while optimizer is not None:
        if hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()
            return
        optimizer = getattr(optimizer, "optimizer", None)
