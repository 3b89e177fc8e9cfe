"""One optimizer update of each model: ``generator_step`` and ``critic_step``.

Each takes ``grad_accum`` batches, runs them under ``accelerator.accumulate`` (or, with ``deepspeed=True``,
through the model's DeepSpeed engine) and the training autocast (``autocast``: a context factory, by default
``accelerator.autocast``), refuses to step on a non-finite loss (on every rank at once), and returns the
detached losses. With DeepSpeed, clipping is the engine's config (``max_grad_norm`` is not used here).

Non-finite losses, two ways. By default every micro-step reads a flag back to the host (one device sync) and
raises :class:`NonFiniteLoss` before the update. With ``flags`` (a :class:`DeviceFlags`; the trainer passes
one on CUDA with a fused AdamW), nothing is read back: the loss's flag is counted on the device, and the
update is skipped on the device when the (all-reduced, so identical on every rank) gradients are not finite,
through the fused AdamW's ``found_inf`` input (what GradScaler uses); the trainer reads the count every
``train.sync_every`` steps and stops the run then. Either way no update is made from a non-finite loss.

A step that is not made leaves no trace. A micro-step is bad when its loss, the batch's ``jpeg`` or ``clean``, or
a running statistic its forward produced is not finite; then the whole update (all ``grad_accum`` micro-steps)
is skipped, and the forward's side effects on both models (batch-norm running statistics, spectral norm's
power-iteration vectors: the other model runs in train mode in the gan phase) are put back as they were
before the update (:class:`BufferGuard`). Deferred, a bad rank's backward is multiplied by NaN, so the
all-reduced gradients skip the update on every rank together, and the buffers are put back on the device
(``torch.where``, no host read).

DDP notes: the generator step runs the critic *unwrapped* with its parameters frozen, and the critic step
runs the generator *unwrapped* under no_grad, so neither backward touches the other model's DDP reducer.
The critic sees real and fake in one forward over the concatenated batch (one set of spectral-norm power
iterations per step, and nothing for DDP's buffer broadcast to trip over).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch
from accelerate import Accelerator

from dist_dejpeg.models.lpips import LPIPS
from dist_dejpeg.train.losses import critic_loss, generator_adv_loss, pixel_loss
from dist_dejpeg.train.build import innermost_optimizer


class NonFiniteLoss(RuntimeError):
    """``skipped``: raised by a deferred check, after the non-finite updates were skipped on the device."""

    def __init__(self, what: str, values: dict, message: str | None = None, skipped: bool = False):
        super().__init__(message or f"non-finite {what} loss: " +
                         ", ".join(f"{k}={float(v):.4g}" for k, v in values.items()))
        self.values, self.skipped = values, skipped


INPUTS = ("jpeg", "clean")  # the batch's images: one inf pixel poisons the running statistics of a forward


class BufferGuard:
    """The modules' buffers (batch-norm running statistics and step counts, spectral norm's power-iteration
    vectors) as they were before an update, put back when the update is not made. Kept as one flat copy per
    dtype and device: a handful of kernels per update whatever the number of layers, and no host read."""

    def __init__(self, modules):
        groups: dict = {}
        for module in modules:
            for buffer in module.buffers() if module is not None else ():
                groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
        self.groups = [(buffers, self._flat(buffers)) for buffers in groups.values()]

    @staticmethod
    def _flat(buffers: list) -> torch.Tensor:
        return torch.cat([b.detach().reshape(-1) for b in buffers])

    def nonfinite(self) -> torch.Tensor | None:
        """A device bool: some floating buffer holds a non-finite value now (None: no floating buffers)."""
        flags = [~torch.isfinite(self._flat(buffers)).all() for buffers, saved in self.groups
                 if saved.is_floating_point()]
        return torch.stack(flags).any() if flags else None

    @torch.no_grad()
    def restore(self, where: torch.Tensor | None = None) -> None:
        """Put the saved buffers back: all of them, or (``where``: a device bool) only if it is True."""
        for buffers, saved in self.groups:
            if where is not None:
                saved = torch.where(where, saved, self._flat(buffers))
            torch._foreach_copy_(buffers, [s.view(b.shape) for s, b in
                                           zip(saved.split([b.numel() for b in buffers]), buffers)])


def _nonfinite(total: torch.Tensor, batch: dict, guard: BufferGuard) -> torch.Tensor:
    """A device bool: this micro-step's loss, one of its input images or a running statistic is not finite."""
    bad = ~torch.isfinite(total.detach())
    for key in INPUTS:
        if isinstance(batch.get(key), torch.Tensor):
            bad = bad | ~torch.isfinite(batch[key]).all()
    buffers = guard.nonfinite()
    return bad if buffers is None else bad | buffers


def _check_finite(accelerator: Accelerator, what: str, total: torch.Tensor, parts: dict, bad: torch.Tensor,
                  batch: dict, guard: BufferGuard) -> None:
    """Immediate mode: one host read of every rank's flag; on a bad step the buffers are put back (the
    update's earlier micro-steps included) before NonFiniteLoss is raised."""
    flag = bad.float().reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if flag.item() > 0:
        values = {k: v.detach() for k, v in parts.items()} | {"total": total.detach()}
        inputs = [k for k in INPUTS if isinstance(batch.get(k), torch.Tensor) and not torch.isfinite(batch[k]).all()]
        buffers = guard.nonfinite()
        notes = ([f"non-finite values in the batch's {' and '.join(inputs)}"] if inputs else []) + (
            ["the forward made running statistics non-finite"] if buffers is not None and buffers.item() else []
        ) + (["on another rank"] if not bad.item() else [])
        guard.restore()
        message = (f"non-finite {what} loss: " + ", ".join(f"{k}={float(v):.4g}" for k, v in values.items())
                   + (f" ({'; '.join(notes)})" if notes else ""))
        raise NonFiniteLoss(what, values, message=message)


class DeviceFlags:
    """Non-finite losses counted on the device, read by the host only when :meth:`take` is called."""

    def __init__(self):
        self.count: torch.Tensor | None = None

    def add(self, bad: torch.Tensor) -> None:
        """``bad``: a device bool, True for a micro-step with a non-finite loss, input or running statistic."""
        bad = bad.sum()
        self.count = bad if self.count is None else self.count + bad

    def take(self) -> torch.Tensor | None:
        """The count since the last take (a device tensor, or None when no step ran), reset to zero."""
        count, self.count = self.count, None
        return count


class HostChecks:
    """What the device (:class:`DeviceFlags`) and the stop-signal handlers (``signals.requested()``) flagged,
    read by the host once ``sync_every`` steps have run (1: after every step), or sooner when the trainer must
    know (before a validation, a save, the end of a phase), in one all-reduce so that every rank decides the
    same."""

    def __init__(self, accelerator: Accelerator, signals, sync_every: int):
        self.accelerator, self.signals, self.sync_every = accelerator, signals, sync_every
        self.flags = DeviceFlags() if sync_every > 1 else None  # None: each step checks its loss at once
        self.unchecked, self.first = 0, 0  # steps since the last read, the global step of the first of them

    def stepped(self, global_step: int) -> None:
        self.unchecked += 1
        self.first = self.first or global_step

    @property
    def due(self) -> bool:
        return self.unchecked >= self.sync_every

    def read(self, global_step: int) -> bool:
        """Raises NonFiniteLoss when a non-finite loss was counted (deferred mode; those updates were skipped on
        the device); returns whether any rank got a stop signal. ``global_step``: the newest step."""
        first, self.unchecked, self.first = self.first, 0, 0
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
                                                f"and {global_step} (or inputs, or running statistics); their "
                                                f"updates were skipped on the device, running statistics put back",
                                skipped=True)
        return stop > 0


def _skip_update_if_nonfinite(accelerator: Accelerator, model, optimizer, norm) -> torch.Tensor:
    """Give the fused AdamW a device flag that makes its step a no-op (parameters, moments and step count
    untouched) when the gradients are not finite. fp16 leaves this to Accelerate's GradScaler. Returns the
    flag (a device bool: the same on every rank, the gradients being all-reduced)."""
    if not isinstance(norm, torch.Tensor):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=accelerator.device)
    found_inf = ~torch.isfinite(norm)
    if accelerator.scaler is None:
        inner = innermost_optimizer(optimizer)
        inner.grad_scale = None
        inner.found_inf = found_inf.float()
    return found_inf


def _loss_scale(accelerator: Accelerator) -> torch.Tensor | None:
    """fp16's loss scale before a step (a device copy: no host read), or None without a GradScaler. A fused AdamW
    takes GradScaler's skip flag into its kernel and so is always stepped: Accelerate's ``step_was_skipped``
    (a step never called) stays False, and only a scale backed off by the update tells a skipped step."""
    scale = getattr(accelerator.scaler, "_scale", None)
    return scale.clone() if isinstance(scale, torch.Tensor) else None


def _update(accelerator: Accelerator, model, optimizer, batches: Iterator[dict], grad_accum: int,
            loss_fn: Callable[[dict], dict], weights: dict, what: str, max_grad_norm: float,
            autocast: Callable[[], ContextManager] | None = None, deepspeed: bool = False,
            flags: DeviceFlags | None = None, also_guard=None) -> dict:
    """``also_guard``: the other model, whose buffers the forward may change too (run in train mode)."""
    autocast = autocast or accelerator.autocast
    accelerator.step = 0  # align accumulate()'s counter: the last of grad_accum micro-steps syncs
    logged: dict[str, torch.Tensor] = {}
    guard = BufferGuard([model, also_guard])
    bad_any = skipped = None  # deferred mode: device bools (a micro-step of this rank was bad; the update skipped)
    for _ in range(grad_accum):
        batch = next(batches)
        with contextlib.nullcontext() if deepspeed else accelerator.accumulate(model):
            with autocast():
                parts = loss_fn(batch)
            total = sum(weights[k] * v for k, v in parts.items())
            bad = _nonfinite(total, batch, guard)
            backward = total
            if flags is None:
                _check_finite(accelerator, what, total, parts, bad, batch, guard)
            else:
                flags.add(bad)
                bad_any = bad if bad_any is None else bad_any | bad
                # NaN gradients from a bad rank reach every rank through the all-reduce: all skip together
                backward = total * torch.where(bad, float("nan"), 1.0).to(total.dtype)
            if deepspeed:
                # ``model`` is this model's DeepSpeed engine: its backward divides by grad_accum and its step
                # updates (clipping at the config's gradient_clipping) on the accumulation boundary.
                # accelerator.backward would reach the first engine only; the prepared optimizer's
                # step/zero_grad and accelerator.clip_grad_norm_ do nothing under DeepSpeed.
                model.backward(backward)
                model.step()
            else:
                accelerator.backward(backward)
                norm = None
                if max_grad_norm > 0 and accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                if flags is not None and accelerator.sync_gradients:
                    skipped = _skip_update_if_nonfinite(accelerator, model, optimizer, norm)
                scale = _loss_scale(accelerator)
                optimizer.step()
                if scale is not None:  # fp16: GradScaler skipped the step where it backed its scale off
                    innermost_optimizer(optimizer).scaler_skipped = accelerator.scaler._scale < scale
                optimizer.zero_grad(set_to_none=True)
        for k, v in parts.items():
            logged[f"{what}/{k}"] = logged.get(f"{what}/{k}", 0) + v.detach() / grad_accum
        logged[f"{what}/total"] = logged.get(f"{what}/total", 0) + total.detach() / grad_accum
    if bad_any is not None:  # a skipped update (this rank's flag or, through the gradients, another's)
        guard.restore(bad_any if skipped is None else bad_any | skipped)
    return logged


def quality_input(batch: dict, blind_prob: float) -> torch.Tensor:
    """The batch's per-sample JPEG quality for a conditioned generator, with a ``blind_prob`` share hidden
    (0 = unknown) so that the same model learns to restore without it."""
    q = batch["quality"]
    if blind_prob > 0:
        q = q.masked_fill(torch.rand(q.shape, device=q.device) < blind_prob, 0)
    return q


def generator_step(accelerator: Accelerator, generator, optimizer, batches: Iterator[dict], *,
                   grad_accum: int, w_pixel: float, w_lpips: float, w_adv: float = 0.0,
                   lpips: LPIPS | None = None, critic_raw=None, adversarial: str = "bce",
                   max_grad_norm: float = 0.0, autocast=None, deepspeed: bool = False,
                   flags: DeviceFlags | None = None, blind_prob: float = 0.0, chroma_weight: float = 1.0,
                   pixel: str = "l1") -> dict:
    """Generator update: w_pixel * pixel loss (``pixel``: L1 or Charbonnier; logged as "l1") + w_lpips * LPIPS
    (+ w_adv * adversarial through the frozen critic).
    The generator gets the batch's quality (a blind one ignores it), ``blind_prob`` of it hidden."""
    weights = {"l1": w_pixel, "lpips": w_lpips, "adv": w_adv}

    def losses(batch: dict) -> dict:
        restored = generator(batch["jpeg"], quality_input(batch, blind_prob))
        parts = {}
        if w_pixel:
            parts["l1"] = pixel_loss(restored, batch["clean"], chroma_weight, pixel)
        if w_lpips:
            parts["lpips"] = lpips(restored, batch["clean"]).mean()
        if w_adv:
            parts["adv"] = generator_adv_loss(critic_raw(restored), adversarial)
        return parts

    if critic_raw is not None:
        critic_raw.requires_grad_(False)
    try:
        return _update(accelerator, generator, optimizer, batches, grad_accum, losses, weights, "gen",
                       max_grad_norm, autocast, deepspeed, flags, also_guard=critic_raw)
    finally:
        if critic_raw is not None:
            critic_raw.requires_grad_(True)


def critic_step(accelerator: Accelerator, critic, optimizer, batches: Iterator[dict], *, generator_raw,
                grad_accum: int, adversarial: str = "bce", max_grad_norm: float = 0.0, autocast=None,
                deepspeed: bool = False, flags: DeviceFlags | None = None, blind_prob: float = 0.0) -> dict:
    """Critic update on clean (real) vs generated (fake, detached) images."""

    def losses(batch: dict) -> dict:
        with torch.no_grad():
            fake = generator_raw(batch["jpeg"], quality_input(batch, blind_prob))
        # paired: a real crop and its fake share the critic's dropout masks (models/critic.py)
        logits = critic(torch.cat([batch["clean"], fake.to(batch["clean"].dtype)]), paired=True)
        real_logits, fake_logits = logits.chunk(2)
        return {"loss": critic_loss(real_logits, fake_logits, adversarial),
                "real_acc": (real_logits.detach().float() > 0).float().mean(),
                "fake_acc": (fake_logits.detach().float() < 0).float().mean()}

    return _update(accelerator, critic, optimizer, batches, grad_accum, losses,
                   {"loss": 1.0, "real_acc": 0.0, "fake_acc": 0.0}, "critic", max_grad_norm, autocast, deepspeed,
                   flags, also_guard=generator_raw)
