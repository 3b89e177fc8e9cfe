"""Nothing poisoned is saved: every checkpoint is checked to be finite before it is written, and the stop on a
non-finite step says truthfully what it saved.

The steps (steps.py) keep a non-finite loss, input or running statistic out of the weights and buffers; what
they cannot see is weights that an update made non-finite from finite gradients (a diverging run, an lr far
too high): the next forward fails, but the state before it is already lost. So ``Trainer.save`` calls
:func:`check_finite_state` first (one pass over the models and optimizer states per checkpoint, one
all-reduce, so every rank decides the same), and a state that is not finite is never written: the stop names
the newest checkpoint on disk, which passed the same check when it was saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch

from dist_dejpeg.run.layout import latest_checkpoint
from dist_dejpeg.train.build import innermost_optimizer
from dist_dejpeg.train.steps import NonFiniteLoss


class NonFiniteState(NonFiniteLoss):
    """The model or optimizer state itself holds non-finite values: it is not saved."""


def named_state(models: dict, optimizers: Iterable = (), extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Every floating tensor a checkpoint holds, by name: models' parameters and buffers
    (``generator.<name>``), the optimizers' state (``optimizer_<i>.<param index>.<key>``), and the tensors of
    ``extra``'s files ({file name: {name: tensor}}: the gan phase's best and last generators, the EMA's)."""
    named = {f"{m}.{k}": v for m, model in models.items() for k, v in model.state_dict().items()}
    for i, optimizer in enumerate(o for o in optimizers if o is not None):
        for j, state in enumerate(innermost_optimizer(optimizer).state.values()):
            named.update({f"optimizer_{i}.{j}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    named.update({f"{file}.{k}": v for file, tensors in (extra or {}).items() for k, v in tensors.items()})
    return {k: v for k, v in named.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def nonfinite_names(named: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity (one host read per device)."""
    names = list(named)
    flags: list[bool] = []
    for device in {v.device for v in named.values()}:
        keys = [k for k in names if named[k].device == device]
        bad = torch.stack([~torch.isfinite(named[k].detach()).all() for k in keys]).tolist()
        flags += [k for k, b in zip(keys, bad) if b]
    return sorted(flags, key=names.index)


def check_finite_state(accelerator, models: dict, optimizers: Iterable = (), extra: dict | None = None) -> None:
    """Collective. Raises NonFiniteState on every rank when any rank's state holds a non-finite tensor."""
    bad = nonfinite_names(named_state(models, optimizers, extra))
    count = torch.tensor([float(len(bad))], device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    if count.item() > 0:
        where = (f"{len(bad)} non-finite tensor(s) on this rank, e.g. {', '.join(bad[:3])}" if bad
                 else "non-finite tensors on another rank")
        raise NonFiniteState("", {}, message=f"the weights or optimizer state are not finite ({where}): the run "
                                             f"diverged")


def save_last_good(save: Callable[[], Path], err: NonFiniteLoss, run_dir: str | Path) -> str:
    """The stop's save, and what its message says about it: what is saved where, or that nothing is (the state
    is not finite) and which checkpoint is the newest finite one."""
    try:
        if isinstance(err, NonFiniteState):  # raised by a save: the state is not finite, the message says so
            raise err
        path = save()
    except NonFiniteState as bad:
        latest = latest_checkpoint(run_dir)
        newest = (f"the newest checkpoint, {latest}, is the last state saved (checked finite)" if latest is not None
                  else "no checkpoint was saved before it")
        return ("nothing is saved" + ("" if bad is err else f" ({bad})") + f"; {newest}")
    state = ("the state after it (no update was made from a non-finite loss)" if err.skipped
             else "the state before that step")
    return f"{state} is saved in {path}"


def non_finite_stop(trainer, err: NonFiniteLoss) -> str:
    """A run's stop on ``err``: the gradients dropped, the last good state saved (nothing non-finite:
    save_last_good), progress.json "stopped"; returns the message TrainingStopped carries."""
    state = trainer.state
    name = trainer.cfg.train.order[state.phase_index]
    for optimizer in [o for o in (trainer.g_opt, trainer.c_opt) if o is not None]:
        optimizer.zero_grad(set_to_none=True)
    saved = save_last_good(trainer.save, err, trainer.run_dir)
    message = (f"training stopped: {err} in phase '{name}' at step {state.phase_step} (global step "
               f"{state.global_step}); {saved}. Lower the phase's lr, set max_grad_norm, or use bf16 instead of fp16, "
               f"then --resume (if it stops again at once, the saved state had diverged already: --resume an older "
               f"checkpoint)")
    trainer.monitor.finish("stopped", message, state.global_step)
    return message
