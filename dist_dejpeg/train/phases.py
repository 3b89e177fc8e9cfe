"""NoGAN phases as data: which models a phase trains, its learning-rate schedule, the GAN stop rule.

    gen     generator alone: w_lpips * LPIPS + w_pixel * L1
    critic  generator frozen (eval, no grad); critic learns clean (real) vs generated (fake)
    gan     both: critic_iters critic updates, then gen_iters generator updates (+ w_adv * adversarial),
            validated every val_every steps; stops when validation LPIPS has not improved for `patience`
            validations, and the best generator is kept
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dist_dejpeg.config import PhaseConfig


def trains_generator(phase: PhaseConfig) -> bool:
    return phase.kind in ("gen", "gan")


def trains_critic(phase: PhaseConfig) -> bool:
    return phase.kind in ("critic", "gan")


def uses_lpips(phase: PhaseConfig) -> bool:
    return trains_generator(phase) and phase.w_lpips > 0


def gan_turn(phase: PhaseConfig, step: int) -> str:
    """Which model the gan phase updates at optimizer step ``step``: 'critic' or 'gen'."""
    cycle = phase.critic_iters + phase.gen_iters
    return "critic" if step % cycle < phase.critic_iters else "gen"


def generator_updates(phase: PhaseConfig) -> int:
    """How many of the phase's steps update the generator (a gan phase: its gen turns, by gan_turn)."""
    if phase.kind != "gan":
        return phase.steps if trains_generator(phase) else 0
    return sum(gan_turn(phase, step) == "gen" for step in range(phase.steps))


def lr_at(phase: PhaseConfig, step: int, base_lr: float | None = None) -> float:
    """Learning rate at optimizer step ``step`` of the phase (a pure function of the step, so resume
    needs no scheduler state). onecycle: cosine warm-up from lr/25, cosine decay to lr/1e4 (fastai's
    fit_one_cycle shape); cosine: linear warm-up, cosine decay to 0; constant: linear warm-up."""
    lr = phase.lr if base_lr is None else base_lr
    total = max(phase.steps, 1)
    warm = int(round(phase.warmup * total))
    t = min(step, total)
    if phase.schedule == "onecycle":
        if t < warm:
            start = lr / 25
            return start + (lr - start) * (1 - math.cos(math.pi * t / warm)) / 2
        end = lr / 1e4
        frac = (t - warm) / max(total - warm, 1)
        return end + (lr - end) * (1 + math.cos(math.pi * frac)) / 2
    if t < warm:
        return lr * (t + 1) / warm
    if phase.schedule == "cosine":
        return lr * (1 + math.cos(math.pi * (t - warm) / max(total - warm, 1))) / 2
    return lr


@dataclass
class StopRule:
    """Early stopping on validation LPIPS (lower is better)."""

    patience: int = 0  # 0: never stop
    best: float = math.inf
    best_step: int = -1
    bad_checks: int = 0

    def update(self, value: float, step: int) -> tuple[bool, bool]:
        """Record one validation; returns (improved, stop)."""
        if value < self.best:
            self.best, self.best_step, self.bad_checks = value, step, 0
            return True, False
        self.bad_checks += 1
        return False, self.patience > 0 and self.bad_checks >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "StopRule":
        return cls(**state)
