"""The exponential moving average (EMA) of the generator's weights (BasicSR's and Real-ESRGAN's ``ema_decay``
0.999): what validation measures, the image grids show, the GAN phase keeps as its best and the generator file
holds. ``train.ema_decay=0`` turns it off: then every method here hands back the raw generator.

    ema = GeneratorEma(generator_raw, cfg.train.ema_decay, cfg.train.ema_warmup)
    ema.update(generator_raw, optimizer)        # after each generator optimizer step (gen and gan phases)
    validate(accelerator, ema.model(generator_raw), ...)

timm's ``ModelEmaV3`` keeps the copy (in fp32 whatever the model's dtype: DeepSpeed's bf16 module included)
and does the foreach lerp. Parameters are averaged and buffers copied from the live generator
(``exclude_buffers``): spectral norm's power-iteration vectors u and v are unit vectors, and an average of two
unit vectors is shorter than one, so sigma = u'Wv would come out too small and the normalised weight too large;
batch-norm running statistics (the encoder's) are averages already, and the live ones have just been averaged
over ranks before a validation (validation.average_bn_stats); group norm has none. The buffers are copied again
each time the EMA is used (:meth:`model`), so the checkpoint's file holds the parameters only, which are the same
on every rank (DDP's and ZeRO-1/2's parameters are): every rank updates its own copy, with no collective, and
the main process writes it once.

Each phase that trains the generator starts the average afresh from the live weights (:meth:`restart`): a
0.999 average carried over from the gen phase would hide a short GAN phase (its validation, its best-generator
choice and the generator file would all be the gen phase's weights: 300 GAN steps at lr 1e-4 moved the debug
recipe's validated q10 PSNR by 0.005 dB), and the GAN phase's stop rule would watch an average it barely moves.

Warm-up (``train.ema_warmup``, as TensorFlow's ExponentialMovingAverage with ``num_updates``): the t-th update
(t from 0) uses min(decay, (1 + t) / (10 + t)), so the early average forgets the initial weights instead of
being held back by them for thousands of steps (0.1 at the first update, the new weights' share 0.9; 0.99 at
t=890, 0.999 from t=8991).

A skipped optimizer step does not move the EMA: fp16's GradScaler (and DeepSpeed's overflow) say so on the
host; the deferred finite checks skip on the device (fused AdamW's ``found_inf``, steps.py), and there the
EMA's weight is multiplied by the same device flag (no host read). Such a step still counts towards the
warm-up (the host does not know of it; the run stops at the next host check anyway). The update reads nothing
back to the host and copies no buffers (:meth:`GeneratorEma._average`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.utils import ModelEmaV3

from dist_dejpeg.run.layout import EMA_GENERATOR, EMA_UPDATES
from dist_dejpeg.train.build import innermost_optimizer

log = logging.getLogger("dist_dejpeg")

UPDATES = EMA_UPDATES  # the EMA file's update count (the warm-up's t); the other keys are parameter names
SNAPSHOT_PREFIX = "ema/"  # the EMA's parameters inside the GAN phase's best-generator snapshot


def warmup_decay(decay: float, t: int, warmup: bool = True) -> float:
    """The decay of the t-th update (t from 0)."""
    return min(decay, (1 + t) / (10 + t)) if warmup else decay


def step_skipped(optimizer) -> bool | torch.Tensor:
    """Whether the optimizer step just taken was skipped: True (fp16's GradScaler through Accelerate, DeepSpeed's
    overflow), a device float 1.0/0.0 (fp16's scale backed off, steps.py's ``scaler_skipped``, the one sign of a
    fused AdamW's skip; the deferred finite checks' ``found_inf``), or False."""
    if getattr(optimizer, "step_was_skipped", False) is True:
        return True
    inner = innermost_optimizer(optimizer)
    backed_off = getattr(inner, "scaler_skipped", None)  # (with a GradScaler there is no found_inf left)
    if isinstance(backed_off, torch.Tensor):
        return backed_off.float()
    found_inf = getattr(inner, "found_inf", None)
    return found_inf if isinstance(found_inf, torch.Tensor) else False


class GeneratorEma:
    """Every rank's EMA of its unwrapped generator's parameters (see the module docstring)."""

    def __init__(self, generator: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.ema: ModelEmaV3 | None = None
        if decay > 0:
            self.ema = ModelEmaV3(generator, decay=decay, dtype=torch.float32, exclude_buffers=True)
            # trainer.compile compiles in place (nn.Module.compile): the deep copy would share the original's
            # compiled call, and so run the live generator's forward instead of its own
            self.ema.module._compiled_call_impl = None
            self.ema.module.requires_grad_(False)

    @property
    def enabled(self) -> bool:
        return self.ema is not None

    @torch.no_grad()
    def update(self, generator: torch.nn.Module, optimizer=None) -> None:
        """After a generator optimizer step (``optimizer``: the prepared one, asked whether it skipped)."""
        if self.ema is None:
            return
        skipped = step_skipped(optimizer) if optimizer is not None else False
        if skipped is True:
            return
        weight = 1.0 - warmup_decay(self.decay, self.updates, self.warmup)  # the live weights' share
        if isinstance(skipped, torch.Tensor):  # weight 0 where the device skipped the step
            weight = weight * (1.0 - skipped.float())
        self._average(generator, weight)
        self.updates += 1

    @torch.no_grad()
    def _average(self, generator: torch.nn.Module, weight: float | torch.Tensor) -> None:
        """The parameters' lerp towards ``generator``'s by ``weight``, in a few multi-tensor kernels. Not timm's
        apply_update_no_buffers_: it also copies every buffer at every step (a kernel each; :meth:`model` copies
        them when the EMA is used), and a device tensor as the weight of torch._foreach_lerp_ is read to the host
        (``.item()``: a wait for the GPU at every step); with one, (live - ema) * weight is added instead."""
        ema = list(self.ema.module.parameters())
        live = [p if p.dtype == e.dtype else p.to(e.dtype) for p, e in zip(generator.parameters(), ema)]
        if isinstance(weight, torch.Tensor):
            step = torch._foreach_sub(live, ema)
            torch._foreach_mul_(step, weight)
            torch._foreach_add_(ema, step)
        else:
            torch._foreach_lerp_(ema, live, weight)

    @torch.no_grad()
    def restart(self, generator: torch.nn.Module) -> None:
        """Start the average afresh from ``generator``'s weights, warm-up included (at the start of each phase
        that trains the generator)."""
        if self.ema is not None:
            self.ema.set(generator)
            self.updates = 0

    @torch.no_grad()
    def model(self, generator: torch.nn.Module) -> torch.nn.Module:
        """The module to validate, show or export: the EMA, its buffers copied from ``generator`` now; or
        ``generator`` itself without EMA."""
        if self.ema is None:
            return generator
        for mine, live in zip(self.ema.module.buffers(), generator.buffers()):
            mine.copy_(live)
        return self.ema.module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**dict(self.ema.module.named_parameters()), UPDATES: torch.tensor(self.updates, dtype=torch.int64)}

    def files(self) -> dict[str, dict]:
        """The checkpoint's main-process files: {ema_generator.safetensors: parameters and count}, or {}."""
        return {EMA_GENERATOR: self.state_dict()} if self.ema is not None else {}

    @torch.no_grad()
    def _load_parameters(self, tensors: dict, source: str) -> None:
        own = dict(self.ema.module.named_parameters())
        if set(own) != set(tensors):
            raise ValueError(f"{source}: the EMA's parameters differ from the generator's "
                             f"({len(set(own) ^ set(tensors))} names differ)")
        for name, param in own.items():
            param.copy_(tensors[name])

    def resume(self, folder: str | Path, generator: torch.nn.Module) -> None:
        """Load the checkpoint's EMA; a checkpoint written before the EMA existed starts it from the generator."""
        if self.ema is None:
            return
        path = Path(folder) / EMA_GENERATOR
        if not path.is_file():
            self.restart(generator)
            log.info("EMA: %s has no %s (written before the EMA existed): the EMA starts from the resumed "
                     "generator's weights", folder, EMA_GENERATOR)
            return
        tensors = load_file(str(path))
        self.updates = int(tensors.pop(UPDATES))
        self._load_parameters(tensors, str(path))

    def snapshot(self, generator: torch.nn.Module) -> dict[str, torch.Tensor]:
        """CPU copies of the raw generator's state and (prefixed ``ema/``) the EMA's parameters: the GAN phase's
        best generator, which :meth:`restore` puts back."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in generator.state_dict().items()}
        if self.ema is not None:
            state.update({SNAPSHOT_PREFIX + k: v.detach().to("cpu", copy=True)
                          for k, v in self.ema.module.named_parameters()})
        return state

    def roll_back(self, generator: torch.nn.Module, snapshot: dict, device) -> dict[str, torch.Tensor]:
        """Put a :meth:`snapshot` back; returns the one of the weights it replaced."""
        last = self.snapshot(generator)
        self.restore(generator, snapshot, device)
        return last

    def restore(self, generator: torch.nn.Module, snapshot: dict, device) -> None:
        """Put a :meth:`snapshot` back (one without EMA tensors, from an older checkpoint: the EMA restarts from
        the raw generator)."""
        generator.load_state_dict({k: v.to(device) for k, v in snapshot.items() if not k.startswith(SNAPSHOT_PREFIX)})
        if self.ema is None:
            return
        ema = {k[len(SNAPSHOT_PREFIX):]: v for k, v in snapshot.items() if k.startswith(SNAPSHOT_PREFIX)}
        if ema:
            self._load_parameters(ema, "the best generator")
        else:
            self.ema.set(generator)

    def meta(self, measure_raw) -> dict:
        """metrics.json's meta "ema": the settings and the raw generator's final validation (``measure_raw``: a
        collective callable returning validate's results), or {} without EMA."""
        if self.ema is None:
            return {}
        raw = measure_raw()
        log.info("final validation of the raw (non-EMA) generator: %s", ", ".join(
            f"{q} {r['restored']['psnr'] - r['jpeg']['psnr']:+.3f} dB" for q, r in raw.items()))
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "raw": raw}
