"""Everything the training loop needs before its first step: the Accelerator (DDP, one process, CPU, or one
DeepSpeed engine per model), the models, their optimizers and the LPIPS networks, prepared once.

    acc, cfg = build_accelerator(cfg)   # cfg: a copy with the precision and ZeRO stage the run really uses
    setup_logging(acc)                  # INFO on the main process, WARNING on the others
    claim_run_dir(acc, cfg, lock, write_samples=True)   # the run folder's lock, on every rank's behalf
    parts = build_parts(cfg, acc)       # prepared generator/critic and optimizers, LPIPS, fast-path settings
    innermost_optimizer(opt)            # the torch AdamW under Accelerate's and DeepSpeed's optimizer wrappers

``train.deepspeed_stage`` 1 or 2 (or an ``accelerate launch`` DeepSpeed config, whose stage must agree)
selects Accelerate's multi-model DeepSpeed (train/zero.py). Otherwise a plain Accelerator with the run's mixed precision and
gradient accumulation. Config errors name the config key. Nothing here changes the config it is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, ContextManager

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs, set_seed

from dist_dejpeg.config import CUDAGRAPH_MODES, Config, ConfigError, ModelConfig, PhaseConfig
from dist_dejpeg.data import ensure_samples
from dist_dejpeg.models.critic import build_critic
from dist_dejpeg.models.generator_file import load_model
from dist_dejpeg.models.lpips import LPIPS
from dist_dejpeg.models.names import TRUST_ENCODER, ModelFileError, trusted_encoder
from dist_dejpeg.models.sync_bn import convert_sync_batchnorm
from dist_dejpeg.models.unet import build_generator, generator_notes
from dist_dejpeg.models.weights import EncoderError, encoder_resolved
from dist_dejpeg.run.lock import RunLock
from dist_dejpeg.train.checkpoint import remove_partial
from dist_dejpeg.train.collective import all_ranks_or_raise, warn_on_main
from dist_dejpeg.train.compile import CompileWatch, compile_cache_dir, compile_model, use_compile_cache
from dist_dejpeg.train.data_checks import check_shards_exist, check_train_tiles
from dist_dejpeg.train.library_warnings import silence_library_warnings
from dist_dejpeg.train.run_log import LOG_FORMAT
from dist_dejpeg.train.phases import generator_updates, trains_critic, uses_lpips
from dist_dejpeg.train.init_from import GENERATOR_NO_TENSOR, init_from_config
from dist_dejpeg.train.zero import (deepspeed_accelerator, launcher_deepspeed_stage, prepare_engines,
                                    training_autocast)

log = logging.getLogger("dist_dejpeg")

# Devices with a fused AdamW kernel (on the 2-core CPU: 3.2 ms per step against foreach's 14.1 ms).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")
# Devices where host reads are deferred to every train.sync_every steps: on CUDA a read waits for the queued
# work; on the CPU nothing is queued, so reading every step costs nothing (tests add "cpu" to cover it).
DEFERRED_CHECK_DEVICES = ("cuda",)
# the Accelerator's kinds whose prepared model is the model itself or under DDP (unwrap)
DDP_OR_NONE = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


FP16_NEEDS_GPU = "config key 'train.mixed_precision': fp16 needs a GPU; use bf16 or no on CPU"


def refused_before_launch(cfg: Config, ranks: int) -> None:
    """--dry-run's share of what build_accelerator and zero.py refuse at the start (a ConfigError): fp16 with
    train.cpu (on a host without CUDA, a login node's, only said: the compute node may have it) and DeepSpeed in one
    process started with no launcher."""
    from dist_dejpeg.train.zero import NEEDS_LAUNCHER

    if cfg.train.mixed_precision == "fp16" and (cfg.train.cpu or not torch.cuda.is_available()):
        if cfg.train.cpu:
            raise ConfigError(FP16_NEEDS_GPU)
        log.warning("train.mixed_precision=fp16 needs a GPU, and this host has none: a start here is refused")
    if cfg.train.deepspeed_stage > 0 and ranks == 1 and "LOCAL_RANK" not in os.environ:
        raise ConfigError(NEEDS_LAUNCHER)


def build_accelerator(cfg: Config) -> tuple[Accelerator, Config]:
    """The Accelerator, and the config the run really has: a copy of ``cfg`` whose ``train.mixed_precision``
    (bf16 becomes "no" on a GPU without it) and ``train.deepspeed_stage`` (0 takes an accelerate launcher's
    DeepSpeed stage) are the effective ones. ``cfg`` itself is left as it was."""
    t = cfg.train
    precision, stage = t.mixed_precision, t.deepspeed_stage
    cpu = t.cpu or not torch.cuda.is_available()
    if cpu and precision == "fp16":
        raise ConfigError(FP16_NEEDS_GPU)
    no_bf16 = not cpu and precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False)
    if no_bf16:  # pre-Ampere cards emulate bf16 slowly: the default bf16 becomes fp32 there, said below
        precision = "no"
    # a dead or stuck rank fails every collective after this long instead of hanging
    timeout = timedelta(seconds=t.dist_timeout_s)
    launched = launcher_deepspeed_stage()
    if launched is not None:
        stage = stage or launched
        if stage != launched or launched not in (1, 2):
            raise ConfigError(f"config key 'train.deepspeed_stage': {stage}, but the accelerate launcher "
                              f"config asks for ZeRO stage {launched}; the trainer supports 1 and 2")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, mixed_precision=precision, deepspeed_stage=stage),
                              model=init_from_config(cfg.model))
    silence_library_warnings()  # DDP's broadcast_buffers and DeepSpeed's all_gather_into_tensor deprecations
    if int(os.environ.get("WORLD_SIZE") or 1) <= 1:  # one process: an earlier run's Accelerator in it (a notebook's)
        reset_accelerate_state()  # would refuse this one another mixed precision or device ("restart your runtime")
    acc = _deepspeed_accelerator(cfg, cpu, timeout) if stage else Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.grad_accum, sync_with_dataloader=False),
        # Spectral-norm (u, v) and batch-norm buffers change in every forward; broadcasting them from
        # rank 0 at each forward breaks when a model runs twice before a backward.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                         InitProcessGroupKwargs(timeout=timeout)],
        **_tracking(cfg),
    )
    if no_bf16:  # (once, by the main process: every rank finds the same card)
        warn_on_main(acc.is_main_process)("train.mixed_precision=bf16: %s has no bf16; training in fp32 (set fp16 "
                                          "to use its tensor cores)", torch.cuda.get_device_name())
    return acc, cfg


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state (AcceleratorState, GradientState, PartialState): the next Accelerator
    built in this process may have another mixed precision or device (bench's rows; a notebook's second run)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _init_from(model: ModelConfig) -> torch.nn.Module:
    """The generator ``model.init_from`` holds, as ``model`` describes it: where the run switches a key that makes no
    tensor (blur, keep_mean; init_from_config checked the others) it is built so and takes the source's weights.
    The global RNG is left as the source's load leaves it (the critic's initial weights as without the switch)."""
    try:  # (a DeepSpeed checkpoint has a config but no model file)
        generator, info = load_model(model.init_from)
    except ModelFileError as err:
        raise ConfigError(f"config key 'model.init_from': {err}") from None
    source = info.get("model") or {}
    if any(k in source and source[k] != getattr(model, k) for k in GENERATOR_NO_TENSOR):
        with torch.random.fork_rng(devices=[]):
            rebuilt = build_generator(dataclasses.replace(model, pretrained=False, encoder_weights=""))
        rebuilt.load_state_dict(generator.state_dict())
        generator = rebuilt
    # the file or checkpoint read (resolving model.init_from again could name a newer one a live source run wrote)
    log.info("model.init_from: the generator starts from %s", info["source"])
    return generator.train()


def _deepspeed_accelerator(cfg: Config, cpu: bool, timeout: timedelta) -> Accelerator:
    return deepspeed_accelerator(cfg, cpu, timeout, _tracking(cfg))


def _tracking(cfg: Config) -> dict:
    """Accelerate's experiment trackers (train.log_with), checked before anything else starts."""
    from dist_dejpeg.train.monitor import check_trackers, tracker_objects

    check_trackers(list(cfg.train.log_with))
    run_dir = Path(cfg.train.run_dir)
    # (none: None, not []: Accelerate warns that "no supported trackers are installed" of an empty list)
    return {"log_with": tracker_objects(list(cfg.train.log_with), run_dir) or None, "project_dir": str(run_dir)}


def setup_logging(accelerator: Accelerator, level: str = "info") -> None:
    """One format for every logger; ``level`` on the main process, warnings and errors on the others."""
    value = getattr(logging, level.upper()) if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(level=value, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(value)
    logging.getLogger("dist_dejpeg").setLevel(value)
    # accelerate narrates every checkpoint file at INFO (six lines per save); the trainer says "checkpoint:
    # <folder>" once. Its warnings and errors still show; --log-level debug shows everything.
    logging.getLogger("accelerate").setLevel(value if value <= logging.DEBUG else max(value, logging.WARNING))


def claim_run_dir(acc: Accelerator, cfg: Config, lock: RunLock, write_samples: bool) -> None:
    """The main process takes the run folder's lock, removes what a killed run half-wrote, and writes the sample
    shards if asked. Whatever fails there (another run holds the lock, a folder that cannot be written) fails
    every rank at once with the same error: none waits for the others (collective.all_ranks_or_raise)."""
    run_dir = Path(cfg.train.run_dir)
    with all_ranks_or_raise(acc):
        if acc.is_main_process:
            if write_samples and cfg.data.auto_prepare != "samples":  # a wrong data.root: said before anything is
                check_shards_exist(cfg)  # made or loaded (weights, downloads)
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            try:
                if remove_partial(run_dir):
                    log.info("removed half-written checkpoint folders of an earlier, killed run")
                if write_samples and ensure_samples(cfg):
                    log.info("wrote the sample shards into %s", cfg.data.root)
                if write_samples:
                    check_train_tiles(cfg, acc.num_processes)
            except BaseException:
                lock.release()
                raise


@dataclass
class Parts:
    """What :func:`build_parts` returns: the prepared models and optimizers (the critic's are None when no
    phase trains it), the LPIPS networks, and the fast-path settings the trainer's steps run with."""

    generator: torch.nn.Module
    g_opt: torch.optim.Optimizer
    critic: torch.nn.Module | None
    c_opt: torch.optim.Optimizer | None
    lpips: LPIPS | None  # the training loss's; None when no phase uses LPIPS
    metric_lpips: LPIPS  # validation's (the same object when the nets and weights agree)
    autocast: Callable[[], ContextManager]  # the training autocast context factory
    deepspeed: bool  # one DeepSpeed engine per model
    fused: bool  # fused AdamW
    sync_every: int  # steps between host reads of the device flags (1: every step)
    cudagraphs: bool  # compiled with CUDA graphs: each step and validation forward starts a new replay
    compile_watch: CompileWatch  # did compiling work (the first step says), or did the models fall back to eager


def source_note(encoder: str, resolved: dict | None) -> str:
    """What a source-named ``encoder`` (local-dir:, hf-hub:) means for the run's generator file where its
    encoder_resolved record (``resolved``) cannot stand in for the source: one with model_args, or none; "" else."""
    if ":" not in encoder or (resolved and not resolved["model_args"]):  # (the record builds it, unfetched)
        return ""
    why = (f"its model_args ({', '.join(sorted(resolved['model_args']))}) are read from there" if resolved else
           "the architecture it resolves to cannot be recorded")
    where = "that folder is there" if encoder.startswith("local-dir:") else \
        "that hub repository can be fetched or is in the Hugging Face cache"
    return (f"model.encoder {encoder}: this run's generator file will load (restore, evaluate, export) only where "
            f"{where} ({why})" + ("" if trusted_encoder(encoder) else f", and only with {TRUST_ENCODER}=1 set"))


def build_parts(cfg: Config, acc: Accelerator) -> Parts:
    """Seed, build the generator (and the critic when a phase trains it) and their AdamWs, compile them if asked,
    ``prepare`` them once, then the LPIPS networks. ``cfg``: the effective config from build_accelerator."""
    t, fmt = cfg.train, torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    phases = [t.phases[name] for name in t.order]
    for name in t.order:  # (a short test run's gan phase: all its steps are critic turns)
        phase = t.phases[name]
        if phase.kind == "gan" and phase.steps and not generator_updates(phase) and acc.is_main_process:
            log.warning("train.phases.%s: its %d steps are all critic updates (each cycle starts with "
                        "critic_iters=%d): the generator is not trained in it; give it more steps", name, phase.steps,
                        phase.critic_iters)
    set_seed(t.seed)  # same initial weights on every rank
    if cfg.model.init_from:  # (a resumed run's checkpoint replaces them in turn)
        generator = _init_from(cfg.model)
    else:
        try:
            generator = build_generator(cfg.model)
        except EncoderError as err:  # one line for the user, as any config error
            raise ConfigError(f"config key 'model.encoder': {err}") from None
    resolved = encoder_resolved(generator.encoder, cfg.model.encoder, cfg.model.encoder_depth)
    if note := source_note(cfg.model.encoder, resolved):
        warn_on_main(acc.is_main_process)("%s", note)
    global_bn = cfg.model.sync_bn and acc.num_processes > 1  # (batch norm over the global batch: one crop a rank)
    for note in generator_notes(generator, cfg.data, global_bn):  # (a crop it cannot train on: a ConfigError)
        warn_on_main(acc.is_main_process)("%s", note)
    if global_bn:
        generator = convert_sync_batchnorm(generator, cuda=acc.device.type == "cuda")
    critic = build_critic(cfg.critic) if any(trains_critic(p) for p in phases) else None  # (its crop: config checks)
    deepspeed = t.deepspeed_stage > 0
    # fused: one kernel per step instead of one per parameter group and op; under DeepSpeed the ZeRO
    # optimizer steps its own flat partitions, so it keeps the default implementation
    fused = t.fused_adamw and acc.device.type in FUSED_ADAMW_DEVICES and not deepspeed
    # DeepSpeed broadcasts each parameter as bytes (a channels_last one cannot be viewed so) and ZeRO makes it a view
    # of a flat buffer anyway: contiguous there (channels_last batches still run the convolutions channels_last)
    models = [m.to(memory_format=torch.contiguous_format if deepspeed else fmt) for m in (generator, critic)
              if m is not None]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=fused or None) for m in models]
    # CUDA graphs replay a compiled step's kernels from one launch each (the compiled gen step is bound by
    # its ~1600 host launches on an H200: benchmarks/results/gpu-nvidia-h200-2026-11-27); a replay reuses
    # its output memory, so every training step and validation forward starts a new one (mark_step_begin)
    cudagraphs = t.compile and t.compile_mode in CUDAGRAPH_MODES and acc.device.type == "cuda"
    if t.compile:
        use_compile_cache(compile_cache_dir(cfg))
        for model in models:
            compile_model(model, t.compile_mode)
    if deepspeed:
        prepared = prepare_engines(acc, models, optimizers, t.mixed_precision)
    else:
        prepared = list(acc.prepare(*[x for pair in zip(models, optimizers) for x in pair]))
    generator, g_opt, critic, c_opt = prepared + [None] * (4 - len(prepared))

    lo = cfg.loss
    lpips = (LPIPS(lo.lpips_net, lo.lpips_pretrained, lo.lpips_weights, "loss.lpips_weights").to(acc.device)
             if any(uses_lpips(p) for p in phases) else None)
    same = lpips is not None and lo.metric_net == lo.lpips_net and lo.metric_weights == lo.lpips_weights
    metric_lpips = lpips if same else LPIPS(lo.metric_net, lo.lpips_pretrained, lo.metric_weights,
                                            "loss.metric_weights").to(acc.device)
    for loss_net in {id(m): m for m in (lpips, metric_lpips) if m is not None}.values():
        loss_net.to(memory_format=fmt)
        if t.compile:  # frozen, but most of the gen step's time (bench train: LPIPS share)
            compile_model(loss_net, t.compile_mode)
    # Deferred host checks need the fused AdamW's on-device skip; elsewhere every step checks at once.
    sync_every = t.sync_every if fused and acc.device.type in DEFERRED_CHECK_DEVICES else 1
    autocast = training_autocast(acc, deepspeed, t.mixed_precision)
    return Parts(generator, g_opt, critic, c_opt, lpips, metric_lpips, autocast, deepspeed, fused, sync_every,
                 cudagraphs, CompileWatch(t.compile))


@contextlib.contextmanager
def training_stream(device: torch.device, enabled: bool):
    """On CUDA with ``train.cuda_stream``: the run's device work goes on a stream of its own instead of the
    default (legacy) stream 0, where torchvision's nvJPEG encoder copies out its bytes. The loader's
    degrade-ahead thread waits for stream 0 after each encode (gpu_jpeg._nvjpeg_encode): with the training
    on stream 0 that wait lasted until every queued step had run, and the next batch was late."""
    if device.type != "cuda" or not enabled:
        yield
        return
    default, stream = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    stream.wait_stream(default)  # the models, optimizers and any resumed state were written on stream 0
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        default.wait_stream(stream)


def unwrap(acc: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """``acc.unwrap_model(model)``: the model under DDP (or its DeepSpeed engine). Accelerate's imports DeepSpeed
    wherever it is installed, to test for an engine: 2-3 s of every training process's start (of every rank's) on a
    2-core CPU. Under plain DDP or one process the model under DDP is its answer, taken here without the import;
    anything else (DeepSpeed, FSDP, a model Accelerate compiled) goes to Accelerate. After the run's Accelerator state
    was reset (a finished trainer's models read again), the model alone tells: all but a DeepSpeed engine."""
    inner = model
    while isinstance(inner, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        inner = inner.module
    try:
        plain = acc.distributed_type in DDP_OR_NONE
    except AttributeError:  # (AcceleratorState._reset_state: Accelerate's own unwrap_model needs no state either)
        plain = type(inner).__module__.split(".")[0] != "deepspeed"
    if plain and "_orig_mod" not in inner._modules:
        return inner
    return acc.unwrap_model(model)


# -- the optimizers under their wrappers -------------------------------------------------------------------
def innermost_optimizer(optimizer):
    """The torch optimizer under Accelerate's wrapper (DDP: AcceleratedOptimizer -> AdamW) or DeepSpeed's
    (DeepSpeedOptimizerWrapper -> DeepSpeedZeroOptimizer -> AdamW, over the flat fp32 partitions)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def start_phase_optimizer(optimizer, phase: PhaseConfig, lr: float, reset: bool) -> None:
    """The phase's lr, betas and weight decay; ``reset``: a fresh optimizer state, as the seed's separate fits."""
    inner = innermost_optimizer(optimizer)
    if reset:
        inner.state.clear()
    for group in inner.param_groups:
        group.update(lr=lr, betas=tuple(phase.betas), weight_decay=phase.weight_decay)


def set_lr(optimizer, lr: float) -> None:
    for group in innermost_optimizer(optimizer).param_groups:
        group["lr"] = lr


def refresh_master_weights(optimizer) -> None:
    """After writing a DeepSpeed model's parameters directly: ZeRO-1/2 keep their own fp32 master copy, which
    the next step (and a checkpoint's resume) would otherwise restore over what was written."""
    while optimizer is not None:
        if hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()
            return
        optimizer = getattr(optimizer, "optimizer", None)
