"""DeepSpeed ZeRO (train.deepspeed_stage 1 or 2): Accelerate's multi-model DeepSpeed, one plugin (one engine) per
model, "gen" and, when a phase trains it, "critic", prepared one after the other.

    stage = launcher_deepspeed_stage()            # an `accelerate launch` DeepSpeed config's stage, or None
    acc = deepspeed_accelerator(cfg, cpu, timeout, trackers)
    generator, g_opt, critic, c_opt = prepare_engines(acc, models, optimizers, cfg.train.mixed_precision)
    autocast = training_autocast(acc, deepspeed, cfg.train.mixed_precision)   # the steps' context factory

Precision: the engines keep fp32 parameters and the Accelerator runs with mixed_precision="no"; bf16 is
torch's autocast, in the steps and inside each engine's forward. An engine runs its module with autocast
switched off where its config has no ``torch_autocast`` section (deepspeed/runtime/torch_autocast.py:
autocast_if_enabled, when autocast is on outside, which on CUDA it is), so each model's forward autocasts
itself, with fp32 outputs, as Accelerate's prepare does for DDP. DeepSpeed's own "bf16" section is not used:
it casts parameters but not batch-norm buffers, wants bf16 inputs and names its partition files otherwise
(checkpoint.ZERO_PARTITION); its "torch_autocast" section would reduce the gradients in bf16 (DDP: fp32).
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from typing import Callable, ContextManager

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from dist_dejpeg.config import Config, ConfigError, clip_norms

NEEDS_LAUNCHER = ("config key 'train.deepspeed_stage': DeepSpeed needs a launcher, even for one process: torchrun "
                  "--nproc-per-node N -m dist_dejpeg.cli train ... (train.processes=N does it for N > 1), or "
                  "accelerate launch; or train.deepspeed_stage=0 (ZeRO partitions nothing over one)")
from dist_dejpeg.train.phases import trains_critic


def launcher_uses_deepspeed() -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (its variable; read, not removed)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")


def launcher_deepspeed_stage() -> int | None:
    """The ZeRO stage when `accelerate launch` was given a DeepSpeed config (launch/accelerate/
    deepspeed_zero2.yaml). Its ACCELERATE_DEEPSPEED_* settings are dropped: the trainer's two per-model
    plugins carry the whole DeepSpeed config, and Accelerate refuses the mix of both."""
    if not launcher_uses_deepspeed():
        return None
    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    dropped = ("ACCELERATE_CONFIG_DS_FIELDS", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING")
    for key in [k for k in os.environ if k.startswith("ACCELERATE_DEEPSPEED_") or k in dropped]:
        del os.environ[key]
    return stage


def deepspeed_config(cfg: Config, world: int, max_grad_norm: float) -> dict:
    """One model's DeepSpeed config. Parameters stay fp32 (bf16 is autocast: the module docstring); no
    "optimizer" key, so the trainer's AdamW is used; the engine divides by and steps after grad_accum
    micro-steps."""
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


def deepspeed_accelerator(cfg: Config, cpu: bool, timeout: timedelta, trackers: dict) -> Accelerator:
    """Accelerate's multi-model DeepSpeed: one plugin (one engine) per model, "gen" selected by default.
    ``trackers``: the Accelerator's log_with and project_dir."""
    try:
        import deepspeed.ops
        from accelerate.utils import DeepSpeedPlugin
    except ImportError:
        raise ConfigError("config key 'train.deepspeed_stage': DeepSpeed is not installed; "
                          "pip install -e '.[deepspeed]' (or set train.deepspeed_stage=0)") from None
    if cfg.train.cpu and torch.cuda.is_available():
        # Accelerator(cpu=True) silently turns DeepSpeed off
        raise ConfigError("config keys 'train.cpu'/'train.deepspeed_stage': DeepSpeed on the CPU of a GPU machine is "
                          "not supported; hide the GPUs (CUDA_VISIBLE_DEVICES=) or set train.cpu=false")
    if "LOCAL_RANK" not in os.environ:  # (Accelerate sets DeepSpeed's process group up only under a launcher)
        raise ConfigError(NEEDS_LAUNCHER)
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)  # (DeepSpeed's registry of ops it may build)
    if cpu and isinstance(ops, dict):  # gloo does the collectives: not the shared-memory op, g++-built at start (~80 s)
        ops["deepspeed_shm_comm"] = False
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
        gradient_accumulation_steps=cfg.train.grad_accum,  # the engines' (Accelerate warns of any other)
        deepspeed_plugins=plugins,
        kwargs_handlers=[group],
        **trackers,
    )
    if acc.num_processes != world:
        raise RuntimeError(f"DeepSpeed: {acc.num_processes} processes, but WORLD_SIZE said {world}")
    return acc


def prepare_engines(acc: Accelerator, models: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer],
                    mixed_precision: str) -> list:
    """One engine per model, each prepared under its own plugin; the order (gen, then critic) must be the same
    when a checkpoint is saved and loaded. Under bf16 each model's forward autocasts itself (module docstring)."""
    if mixed_precision == "bf16":
        for model in models:
            autocast_forward(model, acc.device.type)
    prepared = list(acc.prepare(models[0], optimizers[0]))
    if len(models) > 1:
        acc.state.select_deepspeed_plugin("critic")
        # (Accelerate warns that accelerator.backward reaches the first engine only: the steps use each engine's)
        with _without_warnings("accelerate.accelerator"):
            prepared += acc.prepare(models[1], optimizers[1])
        acc.state.select_deepspeed_plugin("gen")
    return prepared


def autocast_forward(model: torch.nn.Module, device_type: str) -> None:
    """``model.forward`` under bf16 autocast, its floating outputs fp32, bound as Accelerate's prepare_model binds
    it for DDP (a method of the module: a deepcopy of the module calls its own forward)."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    autocast = torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    model.forward = MethodType(convert_outputs_to_fp32(autocast(model.forward.__func__)), model)


def training_autocast(acc: Accelerator, deepspeed: bool, mixed_precision: str) -> Callable[[], ContextManager]:
    """The steps' autocast. DDP: Accelerate's (from train.mixed_precision). DeepSpeed: the Accelerator runs with
    mixed_precision="no", so bf16 is a plain torch.autocast (and the engines' forwards their own: prepare_engines)."""
    if not deepspeed:
        return acc.autocast
    if mixed_precision == "bf16":
        device = acc.device.type
        return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext


@contextlib.contextmanager
def _without_warnings(logger: str):
    quiet = logging.getLogger(logger)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)
