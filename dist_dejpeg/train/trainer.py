"""The NoGAN training loop under Accelerate: build, prepare once, run the phases, validate, checkpoint.

    dist-dejpeg train --config configs/debug.yaml                      # one process, CPU or one GPU
    accelerate launch -m dist_dejpeg.cli train --config configs/div2k.yaml
    dist-dejpeg train --config configs/debug.yaml --resume             # continue from the newest checkpoint

Order (as the Accelerate examples): Accelerator, seed, models, optimizers, one ``prepare``, per-rank seed,
loaders, then the phase loop. Generator and critic are prepared together once; a phase that trains one
model never runs the other's forward or optimizer. With ``train.deepspeed_stage`` 1 or 2 each model gets its
own DeepSpeed engine (Accelerate's multi-model DeepSpeed: one plugin per model, two ``prepare`` calls, gen
then critic); the steps then call the engine's backward/step, and bf16 is a plain autocast over fp32 engines.
Logged scalars are reduced over ranks; files and TensorBoard are written by the main process only.
The Accelerator and its DeepSpeed plugins are built in accelerator.py.

The fast path (each piece a config key, on by default where ``dist-dejpeg bench train`` measured it faster):
channels_last models and batches, bf16 autocast, fused AdamW, ``torch.compile`` of both models and LPIPS, and
no host synchronisation inside a step on CUDA: the non-finite flag and the stop-signal flag are read (one
all-reduce for both) every ``train.sync_every`` steps, with non-finite updates skipped on the device
meanwhile (see steps.py). ``train/data_wait_frac`` is the share of wall time spent waiting for batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, set_seed

from dist_dejpeg.config import CUDAGRAPH_MODES, Config, ConfigError, PhaseConfig, to_yaml
from dist_dejpeg.data import build_train_loader, build_val_set, ensure_samples
from dist_dejpeg.models.generator_file import save_generator
from dist_dejpeg.models.lpips import LPIPS
from dist_dejpeg.models.critic import build_critic
from dist_dejpeg.models.sync_bn import convert_sync_batchnorm
from dist_dejpeg.models.unet import build_generator
from dist_dejpeg.run.layout import latest_checkpoint
from dist_dejpeg.run.lock import RunDirBusy, RunLock
from dist_dejpeg.train import checkpoint as ckpt
from dist_dejpeg.train.build import _innermost, _refresh_master_weights, build_accelerator, setup_logging
from dist_dejpeg.train.monitor import Monitor
from dist_dejpeg.train.phases import StopRule, gan_turn, lr_at, trains_critic, trains_generator, uses_lpips
from dist_dejpeg.train.steps import DeviceFlags, NonFiniteLoss, critic_step, generator_step
from dist_dejpeg.train.validation import image_grid, mean_restored_lpips, validate

log = logging.getLogger("dist_dejpeg")


class TrainingStopped(RuntimeError):
    """Training ended early on an error that left a checkpoint behind (e.g. a non-finite loss)."""


class Preempted(TrainingStopped):
    """A stop signal (SIGUSR1/SIGTERM) ended the run after a step; the checkpoint in ``path`` resumes it."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


@dataclass
class TrainerState:
    phase_index: int = 0
    phase_step: int = 0  # optimizer steps done in the current phase
    global_step: int = 0  # optimizer steps done in the whole run
    stop: dict = field(default_factory=lambda: StopRule().state_dict())
    history: list = field(default_factory=list)  # (phase, step, mean restored LPIPS) per validation
    stopped_early: dict = field(default_factory=dict)  # phase name -> step where the stop rule fired


def _set_optimizer(optimizer, phase: PhaseConfig, lr: float, reset: bool) -> None:
    inner = _innermost(optimizer)
    if reset:  # a fresh optimizer per phase, as the seed's separate fits
        inner.state.clear()
    for group in inner.param_groups:
        group.update(lr=lr, betas=tuple(phase.betas), weight_decay=phase.weight_decay)


def _set_lr(optimizer, lr: float) -> None:
    for group in _innermost(optimizer).param_groups:
        group["lr"] = lr


# Devices with a fused AdamW kernel (on the 2-core CPU: 3.2 ms per step against foreach's 14.1 ms).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")
# Devices where host reads are deferred to every train.sync_every steps: on CUDA a read waits for the queued
# work; on the CPU nothing is queued, so reading every step costs nothing (tests add "cpu" to cover it).
DEFERRED_CHECK_DEVICES = ("cuda",)


class TimedBatches:
    """Wraps the batch iterator and adds up the wall time spent waiting in ``next``."""

    def __init__(self, batches):
        self.batches, self.waited = batches, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited += time.perf_counter() - start


COMPILE_BACKEND = "inductor"  # torch.compile's backend (tests swap in a failing one)


def _user_compile_cache() -> str | None:
    """A TORCHINDUCTOR_CACHE_DIR set before the run started is the user's choice: train.compile_cache leaves it
    alone. Inductor writes its default there itself once it has looked it up (an import may do that first)."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if value is None:
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return None if os.path.abspath(value) == os.path.abspath(default_cache_dir()) else value


_USER_COMPILE_CACHE = _user_compile_cache()


def compile_cache_dir(cfg: Config) -> Path | None:
    """Where inductor keeps what it compiled (``train.compile_cache``, relative to the run folder; None: the
    library's default, a folder under /tmp on this node, or the user's TORCHINDUCTOR_CACHE_DIR). In the run
    folder, a requeued or resumed run on any node finds its kernels compiled: on the 2-core CPU the first step
    of the compiled div2k model took 292 s cold and 12.6 s from the cache."""
    if _USER_COMPILE_CACHE is not None or not cfg.train.compile_cache:
        return None
    return Path(cfg.train.run_dir) / cfg.train.compile_cache


def _use_compile_cache(path: Path | None) -> None:
    """Point inductor at ``path`` (read when it first compiles, after this); None: back to its default."""
    if _USER_COMPILE_CACHE is not None:
        return
    if path is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.absolute())


def _compile(model: torch.nn.Module, mode: str = "default") -> None:
    """``torch.compile`` in place (same module, same state_dict keys, so checkpoints and DDP are unchanged).
    Compilation is lazy; where it fails at the first call, dynamo's suppress_errors runs that frame eagerly
    and logs a warning instead of stopping the run. ``mode``: train.compile_mode."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    model.compile(backend=COMPILE_BACKEND, mode=None if mode == "default" else mode)


class Trainer:
    def __init__(self, cfg: Config, train_loader=None, val_set=None):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.run_dir)
        self.accelerator = acc = build_accelerator(cfg)
        setup_logging(acc, cfg.train.log_level)
        phases = [cfg.train.phases[name] for name in cfg.train.order]
        need_critic = any(trains_critic(p) for p in phases)
        self.lock = RunLock(self.run_dir)
        busy = None
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.lock.acquire()
            except RunDirBusy as err:
                busy = str(err)
            if busy is None and ckpt.remove_partial(self.run_dir):
                log.info("removed half-written checkpoint folders of an earlier, killed run")
            if busy is None and train_loader is None and ensure_samples(cfg):
                log.info("wrote the sample shards into %s", cfg.data.root)
        if acc.num_processes > 1:
            busy = broadcast_object_list([busy])[0]  # every rank fails, none waits for the others
        if busy is not None:
            raise RunDirBusy(busy)

        set_seed(cfg.train.seed)  # same initial weights on every rank
        generator = build_generator(cfg.model)
        self.blind_prob = cfg.model.quality_blind_prob if cfg.model.quality_conditioning else 0.0
        if cfg.model.sync_bn and acc.num_processes > 1:
            generator = convert_sync_batchnorm(generator, cuda=acc.device.type == "cuda")
        critic = build_critic(cfg.critic) if need_critic else None
        if critic is not None and cfg.data.crop < critic.min_size:
            raise ConfigError(f"config key 'data.crop': {cfg.data.crop} px is below the critic's minimum "
                              f"{critic.min_size} px (lower critic.n_blocks)")
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.deepspeed = cfg.train.deepspeed_stage > 0
        # fused: one kernel per step instead of one per parameter group and op; under DeepSpeed the ZeRO
        # optimizer steps its own flat partitions, so it keeps the default implementation
        self.fused = cfg.train.fused_adamw and acc.device.type in FUSED_ADAMW_DEVICES and not self.deepspeed
        adamw = lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3, fused=self.fused or None)  # noqa: E731
        generator = generator.to(memory_format=fmt)
        g_opt = adamw(generator)
        if critic is not None:
            critic = critic.to(memory_format=fmt)
            c_opt = adamw(critic)
        # CUDA graphs replay a compiled step's kernels from one launch each (the compiled gen step is bound by
        # its ~1600 host launches on an H200: benchmarks/results/gpu-nvidia-h200-2026-11-27); a replay reuses
        # its output memory, so every training step and validation forward starts a new one (mark_step_begin)
        self.cudagraphs = cfg.train.compile and cfg.train.compile_mode in CUDAGRAPH_MODES and acc.device.type == "cuda"
        if cfg.train.compile:
            _use_compile_cache(compile_cache_dir(cfg))
            for model in (generator, critic):
                if model is not None:
                    _compile(model, cfg.train.compile_mode)
        # Deferred host checks need the fused AdamW's on-device skip; elsewhere every step checks at once.
        self.sync_every = cfg.train.sync_every if self.fused and acc.device.type in DEFERRED_CHECK_DEVICES else 1
        self.flags = DeviceFlags() if self.sync_every > 1 else None
        if self.deepspeed:
            # One engine per model, each prepared under its own plugin; the order (gen, then critic) must be
            # the same when a checkpoint is saved and loaded.
            self.generator, self.g_opt = acc.prepare(generator, g_opt)
            self.critic = self.c_opt = None
            if critic is not None:
                acc.state.select_deepspeed_plugin("critic")
                self.critic, self.c_opt = acc.prepare(critic, c_opt)
                acc.state.select_deepspeed_plugin("gen")
        elif critic is not None:
            self.generator, self.g_opt, self.critic, self.c_opt = acc.prepare(generator, g_opt, critic, c_opt)
        else:
            self.generator, self.g_opt = acc.prepare(generator, g_opt)
            self.critic = self.c_opt = None
        self.autocast = self._autocast_factory()

        lo = cfg.loss
        self.lpips = (LPIPS(lo.lpips_net, lo.lpips_pretrained, lo.lpips_weights, "loss.lpips_weights").to(acc.device)
                      if any(uses_lpips(p) for p in phases) else None)
        same = self.lpips is not None and lo.metric_net == lo.lpips_net and lo.metric_weights == lo.lpips_weights
        self.metric_lpips = self.lpips if same else LPIPS(lo.metric_net, lo.lpips_pretrained, lo.metric_weights,
                                                          "loss.metric_weights").to(acc.device)
        for loss_net in {id(m): m for m in (self.lpips, self.metric_lpips) if m is not None}.values():
            loss_net.to(memory_format=fmt)
            if cfg.train.compile:  # frozen, but most of the gen step's time (bench train: LPIPS share)
                _compile(loss_net, cfg.train.compile_mode)
        set_seed(cfg.train.seed + acc.process_index)  # per-rank randomness (dropout, ...)

        rank, world = acc.process_index, acc.num_processes
        self.loader = train_loader or build_train_loader(cfg, rank, world, acc.device)
        if val_set is None:
            val_set, skipped = build_val_set(cfg, rank, world)
            if any(skipped.values()):
                log.warning("validation shards: skipped %s", skipped)
        self.val_set = val_set
        from omegaconf import OmegaConf

        self.monitor = Monitor(acc, cfg, self.run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)))
        self.state = TrainerState()
        self.best_generator: dict | None = None
        # the newest validation's global step and results, while the generator is still the one it measured
        self._validated: tuple[int, dict] | None = None
        self.signals = ckpt.StopSignals()
        self.config_yaml = to_yaml(cfg)
        self._unchecked, self._unchecked_from = 0, 0  # steps since the last host check, the first of them
        self.last_train_scalars: dict = {}  # phase -> its newest logged window (images/s, data wait, losses)

    def close(self) -> None:
        """Release the run folder and the trackers (fit does this itself; for callers that only step)."""
        self.monitor.close()
        self.lock.release()

    # -- helpers --------------------------------------------------------------------------------------
    def _autocast_factory(self):
        """The training autocast. DDP: Accelerate's (from train.mixed_precision). DeepSpeed: the engines keep
        fp32 parameters and the Accelerator runs with mixed_precision="no", so bf16 is a plain torch.autocast."""
        if not self.deepspeed:
            return self.accelerator.autocast
        if self.cfg.train.mixed_precision == "bf16":
            device = self.accelerator.device.type
            return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
        return contextlib.nullcontext

    @property
    def gen_raw(self):
        return self.accelerator.unwrap_model(self.generator)

    @property
    def critic_raw(self):
        return self.accelerator.unwrap_model(self.critic) if self.critic is not None else None

    def _data_skipped(self) -> dict:
        counts = getattr(self.loader, "skipped", lambda: {})()
        if not counts:
            return {}
        packed = torch.tensor(list(counts.values()), dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            packed = self.accelerator.reduce(packed, reduction="sum")
        return {k: int(v) for k, v in zip(counts, packed.tolist())}

    def _models(self) -> dict:
        return {"generator": self.gen_raw, **({"critic": self.critic_raw} if self.critic is not None else {})}

    def _rank_buffers(self) -> dict:
        """This rank's model buffers: DDP here does not broadcast buffers, so batch-norm running statistics
        follow each rank's own batches, and an exact resume must give every rank its own back."""
        return {f"{m}.{k}": v for m, model in self._models().items() for k, v in model.named_buffers()}

    def _load_rank_buffers(self, buffers: dict) -> None:
        own = self._rank_buffers()  # the live buffer tensors, under the same names
        for key, value in buffers.items():
            if key in own:
                own[key].copy_(value)

    def _average_bn_stats(self) -> None:
        """Average batch-norm running statistics over ranks before they are used (validation, a frozen
        generator in the critic phase, export), so every rank evaluates the same model. Averaging is linear,
        like the running-average updates, so when it happens does not change the averaged result."""
        if self.accelerator.num_processes > 1:
            from timm.utils import distribute_bn

            for model in self._models().values():
                distribute_bn(model, self.accelerator.num_processes, reduce=True)

    def save(self) -> Path:
        state = dict(vars(self.state), phase_names=list(self.cfg.train.order), data_skipped=self._data_skipped())
        loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else {}
        path = ckpt.save_checkpoint(self.accelerator, self.run_dir, self.state.global_step, state, loader_state,
                                    self.config_yaml, self.cfg.train.keep_last, buffers=self._rank_buffers(),
                                    main_tensors={"best_generator.safetensors": self.best_generator}
                                    if self.best_generator is not None else None)
        log.info("checkpoint: %s", path)
        return path

    def resume(self, path: Path) -> None:
        trainer_state, loader_state, buffers = ckpt.load_checkpoint(self.accelerator, path)
        self._load_rank_buffers(buffers)
        if trainer_state.get("phase_names") != list(self.cfg.train.order):
            raise ConfigError(f"--resume: the checkpoint's phases {trainer_state.get('phase_names')} differ from "
                              f"train.order {list(self.cfg.train.order)}")
        known = set(vars(TrainerState()))
        self.state = TrainerState(**{k: v for k, v in trainer_state.items() if k in known})
        if loader_state and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(loader_state)
        best = path / "best_generator.safetensors"
        if best.is_file():
            from safetensors.torch import load_file

            self.best_generator = load_file(str(best))
        log.info("resumed from %s: phase %d (%s) step %d", path, self.state.phase_index,
                 self.cfg.train.order[min(self.state.phase_index, len(self.cfg.train.order) - 1)],
                 self.state.phase_step)

    # -- validation -----------------------------------------------------------------------------------
    def run_validation(self, tag: str) -> dict:
        step = self.state.global_step
        if self._validated is not None and self._validated[0] == step:
            # no update since the last validation (e.g. the final one after a gan phase that ended on a validation of
            # the generator it keeps): the same weights on the same images give the same numbers
            results = self._validated[1]
            log.info("%s validation: the generator validated at step %d, unchanged since", tag, step)
        else:
            self._average_bn_stats()
            results = validate(self.accelerator, self.gen_raw, self.val_set, self.metric_lpips,
                               self.cfg.data.val_batch_size, cudagraphs=self.cudagraphs)
            self._validated = (step, results)
        self.monitor.validation(tag, results, step)
        if self.accelerator.is_main_process:
            self.monitor.image(f"val/jpeg_restored_clean_{tag}", image_grid(self.accelerator, self.gen_raw,
                                                                             self.val_set, cudagraphs=self.cudagraphs), step)
        return results

    # -- the phase loop -------------------------------------------------------------------------------
    def run_phase(self, name: str, phase: PhaseConfig, batches) -> None:
        cfg, acc, st = self.cfg, self.accelerator, self.state
        fresh = st.phase_step == 0
        if fresh:  # (a resumed phase got every rank's own statistics back from the checkpoint)
            self._average_bn_stats()
        if trains_generator(phase):
            _set_optimizer(self.g_opt, phase, lr_at(phase, st.phase_step), reset=fresh)
        if trains_critic(phase):
            mult = phase.critic_lr_mult if phase.kind == "gan" else 1.0
            _set_optimizer(self.c_opt, phase, lr_at(phase, st.phase_step) * mult, reset=fresh)
        if fresh:
            st.stop = StopRule(patience=phase.patience if phase.kind == "gan" else 0).state_dict()
            if phase.kind == "gan":
                self.best_generator = None
        stop = StopRule.from_state(st.stop)
        self.generator.train(trains_generator(phase))
        if self.critic is not None:
            self.critic.train(trains_critic(phase))
        val_every = phase.val_every or cfg.train.val_every
        self.monitor.start_phase(name, st.phase_index, st.phase_step, st.global_step)
        window: dict[str, torch.Tensor] = {}
        window_steps, images, t0 = 0, 0, time.perf_counter()
        per_step = cfg.data.batch_size * cfg.train.grad_accum * acc.num_processes
        stopped = not fresh and name in st.stopped_early  # resumed after the stop rule fired
        waited0 = getattr(batches, "waited", 0.0)
        while st.phase_step < phase.steps and not stopped:
            turn = phase.kind if phase.kind != "gan" else gan_turn(phase, st.phase_step)
            lr = lr_at(phase, st.phase_step)
            if turn == "gen":
                _set_lr(self.g_opt, lr)
            else:
                _set_lr(self.c_opt, lr * (phase.critic_lr_mult if phase.kind == "gan" else 1.0))
            logs = self.train_step(phase, turn, batches)
            st.phase_step += 1
            st.global_step += 1
            images += per_step
            window_steps += 1
            for k, v in logs.items():
                window[k] = window.get(k, 0) + v
            self.monitor.advance()
            validating = val_every and st.phase_step % val_every == 0 and st.phase_step < phase.steps
            saving = cfg.train.ckpt_every and st.global_step % cfg.train.ckpt_every == 0 and st.phase_step < phase.steps
            # the host reads the flags every sync_every steps, and always before anything is validated or saved
            stop_now = self.host_checks() if (self.checks_due or validating or saving
                                               or st.phase_step == phase.steps) else False
            if st.phase_step % cfg.train.log_every == 0 or st.phase_step == phase.steps:
                keys = sorted(window)  # every rank has the same keys: same phase, same turns
                means = torch.stack([window[k].float() / window_steps for k in keys])
                means = acc.reduce(means, reduction="mean") if acc.num_processes > 1 else means
                scalars = {f"train/{k}": v for k, v in zip(keys, means.tolist())}
                elapsed = time.perf_counter() - t0
                scalars["train/images_per_s"] = images / max(elapsed, 1e-9)
                if hasattr(batches, "waited"):  # this rank's share of wall time spent waiting for batches
                    scalars["train/data_wait_frac"] = (batches.waited - waited0) / max(elapsed, 1e-9)
                    waited0 = batches.waited
                scalars["train/lr"] = lr
                self.monitor.window(name, scalars, st.phase_step, st.global_step, elapsed / max(window_steps, 1))
                self.last_train_scalars[name] = dict(scalars, step=st.global_step)
                window, window_steps, images, t0 = {}, 0, 0, time.perf_counter()
            if validating:
                stopped = self._validate_in_phase(name, phase, stop)
            saved = None
            if saving:
                st.stop = stop.state_dict()
                saved = self.save()
            if stop_now:
                st.stop = stop.state_dict()
                path = saved or self.save()
                message = (f"stopped by {self.signals.name or 'a signal on another rank'} after step "
                           f"{st.phase_step} of phase '{name}' (global step {st.global_step}); the checkpoint "
                           f"{path} resumes it: run the same command again (train.auto_resume)")
                self.monitor.finish("preempted", message, st.global_step)
                raise Preempted(message, path)
        self.monitor.end_phase(name, st.global_step)
        if phase.kind == "gan":
            if not stopped:
                self._validate_in_phase(name, phase, stop)
            if self.best_generator is not None and stop.best_step != st.phase_step:
                log.info("%s: keeping the best generator (step %d, LPIPS %.4f)", name, stop.best_step, stop.best)
                self.gen_raw.load_state_dict({k: v.to(acc.device) for k, v in self.best_generator.items()})
                self._validated = None  # other weights than the last validation measured
                if self.deepspeed:
                    _refresh_master_weights(self.g_opt)
        st.stop = stop.state_dict()
        st.phase_index += 1
        st.phase_step = 0
        self.save()

    def train_step(self, phase: PhaseConfig, turn: str, batches) -> dict:
        """One optimizer update of ``turn``'s model ("gen" or "critic") under ``phase``'s loss weights; returns
        the detached losses. The learning rate is the caller's (run_phase sets it from the schedule)."""
        cfg, acc = self.cfg, self.accelerator
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if turn == "gen":
            logs = generator_step(acc, self.generator, self.g_opt, batches, grad_accum=cfg.train.grad_accum,
                                  w_pixel=phase.w_pixel, w_lpips=phase.w_lpips,
                                  w_adv=phase.w_adv if phase.kind == "gan" else 0.0, lpips=self.lpips,
                                  critic_raw=self.critic_raw if phase.kind == "gan" else None,
                                  adversarial=cfg.loss.adversarial, max_grad_norm=phase.max_grad_norm,
                                  autocast=self.autocast, deepspeed=self.deepspeed, flags=self.flags,
                                  blind_prob=self.blind_prob, chroma_weight=cfg.loss.chroma_weight)
        else:
            logs = critic_step(acc, self.critic, self.c_opt, batches, generator_raw=self.gen_raw,
                               grad_accum=cfg.train.grad_accum, adversarial=cfg.loss.adversarial,
                               max_grad_norm=phase.max_grad_norm, autocast=self.autocast,
                               deepspeed=self.deepspeed, flags=self.flags, blind_prob=self.blind_prob)
        self._unchecked += 1
        self._unchecked_from = self._unchecked_from or self.state.global_step + 1
        return logs

    @property
    def checks_due(self) -> bool:
        return self._unchecked >= self.sync_every

    def host_checks(self) -> bool:
        """Read what the device and the signal handlers flagged since the last check, in one all-reduce so that
        every rank decides the same: raises NonFiniteLoss when a non-finite loss was counted (deferred mode;
        those updates were skipped on the device), returns whether any rank got a stop signal."""
        first, last = self._unchecked_from, self.state.global_step
        self._unchecked, self._unchecked_from = 0, 0
        flag = float(self.signals.requested())
        bad = self.flags.take() if self.flags is not None else None
        if self.accelerator.num_processes == 1 and bad is None:
            return flag > 0
        device = self.accelerator.device
        values = torch.stack([torch.tensor(flag, device=device),
                              bad.float() if bad is not None else torch.zeros((), device=device)])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        stop, nonfinite = values.tolist()
        if nonfinite > 0:
            raise NonFiniteLoss("", {}, message=f"{int(nonfinite)} non-finite loss(es) between global steps {first} "
                                                f"and {last}; their updates were skipped on the device", skipped=True)
        return stop > 0

    def _validate_in_phase(self, name: str, phase: PhaseConfig, stop: StopRule) -> bool:
        results = self.run_validation(name)
        value = mean_restored_lpips(results)
        self.state.history.append([name, self.state.phase_step, value])
        if phase.kind != "gan":
            return False
        improved, should_stop = stop.update(value, self.state.phase_step)
        self.monitor.set_best({"metric": "lpips", "value": stop.best, "step": stop.best_step, "phase": name})
        if improved:
            self.best_generator = {k: v.detach().to("cpu", copy=True) for k, v in self.gen_raw.state_dict().items()}
        if should_stop:
            log.info("%s: validation LPIPS has not improved for %d checks; stopping at step %d (best %.4f at %d)",
                     name, stop.patience, self.state.phase_step, stop.best, stop.best_step)
            self.state.stopped_early[name] = self.state.phase_step
        return should_stop

    def fit(self) -> dict:
        """Run the remaining phases, then the final validation; returns the final metrics. The run folder's
        lock is released at the end, however the run ends."""
        try:
            with self._training_stream():
                return self._fit()
        finally:
            self.lock.release()

    @contextlib.contextmanager
    def _training_stream(self):
        """On CUDA with ``train.cuda_stream``: the run's device work goes on a stream of its own instead of the
        default (legacy) stream 0, where torchvision's nvJPEG encoder copies out its bytes. The loader's
        degrade-ahead thread waits for stream 0 after each encode (gpu_jpeg._nvjpeg_encode): with the training
        on stream 0 that wait lasted until every queued step had run, and the next batch was late."""
        device = self.accelerator.device
        if device.type != "cuda" or not self.cfg.train.cuda_stream:
            yield
            return
        default, stream = torch.cuda.current_stream(device), torch.cuda.Stream(device)
        stream.wait_stream(default)  # the models, optimizers and any resumed state were written on stream 0
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            default.wait_stream(stream)

    def _fit(self) -> dict:
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
        batches = TimedBatches(iter(self.loader))
        self.signals.install()
        try:
            while self.state.phase_index < len(cfg.train.order):
                name = cfg.train.order[self.state.phase_index]
                self.run_phase(name, cfg.train.phases[name], batches)
        except NonFiniteLoss as err:
            name = cfg.train.order[self.state.phase_index]
            self.g_opt.zero_grad(set_to_none=True)
            if self.c_opt is not None:
                self.c_opt.zero_grad(set_to_none=True)
            path = self.save()
            state = ("the state after it (no update was made from a non-finite loss)" if err.skipped
                     else "the state before that step")
            message = (f"training stopped: {err} in phase '{name}' at step {self.state.phase_step} "
                       f"(global step {self.state.global_step}); {state} is saved in {path}. "
                       f"Lower the phase's lr, set max_grad_norm, or use bf16 instead of fp16, then --resume.")
            log.error(message)
            self.monitor.finish("stopped", message, self.state.global_step)
            raise TrainingStopped(message) from None
        except Preempted as err:
            log.info("%s", err)
            raise
        finally:
            self.signals.restore()
        return self.finish()

    def finish(self) -> dict:
        acc = self.accelerator
        results = self.run_validation("final")
        skipped = self._data_skipped()
        local = next(iter(self.val_set.values()))[0].shape[0] if self.val_set else 0
        n_val = torch.tensor([float(local)], device=acc.device)
        n_val = int(acc.reduce(n_val, reduction="sum").item()) if acc.num_processes > 1 else local
        if any(skipped.values()):
            log.warning("training data: skipped %s", skipped)
        if acc.is_main_process:
            m, lo = self.cfg.model, self.cfg.loss
            meta = {
                "lpips": self.metric_lpips.description,
                "encoder": f"{m.encoder} ({'ImageNet' if m.pretrained else 'random init'})",
                "steps": {n: self.cfg.train.phases[n].steps for n in self.cfg.train.order},
                "stopped_early": self.state.stopped_early,
                "global_step": self.state.global_step,
                "processes": acc.num_processes,
                "val_images_per_quality": n_val,
                "data_skipped": skipped,
                "loss_lpips": f"lpips-{lo.lpips_net}" + ("" if lo.lpips_pretrained else " (random backbone)"),
                "last_train_log": self.last_train_scalars,  # per phase, rank 0's newest window (this session)
            }
            out = dict(results, meta=meta)
            (self.run_dir / "metrics.json").write_text(json.dumps(out, indent=2))
            # the RGB PSNR gain at each validated quality: restore passes through where it predicts none
            gains = {k[1:]: r["restored"]["psnr"] - r["jpeg"]["psnr"] for k, r in results.items()}
            save_generator(self.gen_raw, self.cfg.model, self.run_dir / "generator.safetensors",
                           extra={"lpips": self.metric_lpips.description, "global_step": self.state.global_step,
                                  "val_psnr_gain": json.dumps(gains)})
            log.info("wrote %s and %s", self.run_dir / "metrics.json", self.run_dir / "generator.safetensors")
        self.monitor.finish("finished", "", self.state.global_step)
        self.monitor.close()
        acc.wait_for_everyone()
        return results


def train(cfg: Config, resume: str | None = None, train_loader=None, val_set=None) -> dict:
    """Build a Trainer, resume (``"latest"``, a checkpoint folder, or by ``train.auto_resume`` the run folder's
    newest checkpoint), run to the end."""
    trainer = Trainer(cfg, train_loader=train_loader, val_set=val_set)
    path = ckpt.resolve_resume(trainer.run_dir, resume)
    if path is None and cfg.train.auto_resume:
        path = latest_checkpoint(trainer.run_dir)
        if path is not None:
            log.info("train.auto_resume: continuing the run in %s from %s", trainer.run_dir, path.name)
    if path is not None:
        trainer.resume(path)
    return trainer.fit()
