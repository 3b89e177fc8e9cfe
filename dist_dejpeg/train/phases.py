"""NoGAN phases as data: which models a phase trains, its learning-rate schedule, the GAN stop rule.

    gen     generator alone: w_pixel * pixel loss (loss.pixel: L1 or Charbonnier, loss.chroma_weight; logged as
            gen/l1) + w_lpips * LPIPS (train/steps.py generator_step sums the terms)
    critic  generator frozen (eval, no grad); critic learns clean (real) vs generated (fake)
    gan     both: critic_iters critic updates, then gen_iters generator updates (+ w_adv * adversarial),
            validated every val_every steps; stops when the validation number `select_on` names has not
            improved for `patience` validations, and the best generator by it is kept
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from dist_dejpeg.config import PhaseConfig

log = logging.getLogger("dist_dejpeg")

# the gan phase's selection metrics (a validation's restored number averaged over the qualities) -> higher is better
SELECT_METRICS = {"lpips": False, "psnr": True}
# the least change that counts as an improvement: a validation within float noise of the best (one process or
# several sum in another order) keeps the earlier generator, so the kept one does not depend on the process count
MIN_IMPROVEMENT = {"lpips": 1e-5, "psnr": 1e-3}


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


def select_metric(name: str, phase: PhaseConfig, lpips_pretrained: bool) -> str:
    """The number a gan phase keeps its best generator by and stops on: ``select_on``, where "auto" is LPIPS
    only when the validation LPIPS has a pretrained backbone (a random one's numbers rank generators
    arbitrarily) and PSNR otherwise."""
    if phase.select_on == "auto":
        return "lpips" if lpips_pretrained else "psnr"
    return phase.select_on  # (config/checks.py: one of auto, lpips, psnr)


@dataclass
class StopRule:
    """Early stopping on one validation number: mean restored LPIPS (lower is better) or PSNR (higher)."""

    patience: int = 0  # 0: never stop
    best: float = math.inf
    best_step: int = -1
    bad_checks: int = 0
    metric: str = "lpips"  # SELECT_METRICS' key (a checkpoint's state from before this field: LPIPS's)
    best_global: int = -1  # the global step of the best validation's generator (-1: none kept; train/final.py)

    @classmethod
    def start(cls, patience: int, metric: str = "lpips") -> "StopRule":
        return cls(patience=patience, best=-math.inf if SELECT_METRICS[metric] else math.inf, metric=metric)

    def update(self, value: float, step: int) -> tuple[bool, bool]:
        """Record one validation; returns (improved, stop). An improvement is one of at least MIN_IMPROVEMENT."""
        margin = MIN_IMPROVEMENT[self.metric]
        if value > self.best + margin if SELECT_METRICS[self.metric] else value < self.best - margin:
            self.best, self.best_step, self.bad_checks = value, step, 0
            return True, False
        self.bad_checks += 1
        return False, self.patience > 0 and self.bad_checks >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "StopRule":
        return cls(**state)


def gan_rule(name: str, phase: PhaseConfig, state: dict, fresh: bool, decided: bool,
             lpips_pretrained: bool, other_validation: bool = False) -> StopRule:
    """A gan phase's stop rule at its start (says what it follows) or resumed from ``state`` with this run's
    ``patience``. A resumed rule that followed another metric (a checkpoint from before select_on, or select_on
    changed) starts again on this one, unless it has ``decided`` (the phase was stopped by it); so does one whose
    numbers were measured on ``other_validation`` crops (resume.other_validation)."""
    metric = select_metric(name, phase, lpips_pretrained)
    rule = StopRule.start(phase.patience, metric) if fresh else StopRule.from_state(state)
    rule.patience = phase.patience
    if other_validation and not fresh and not decided:
        log.info("%s: the checkpoint's best (%s %.4f at step %d) was measured on other validation crops: the next "
                 "validation is the best so far", name, rule.metric.upper(), rule.best, rule.best_step)
        rule = StopRule.start(phase.patience, metric)
    elif rule.metric != metric and not decided:
        log.info("%s: the checkpoint's stop rule followed %s (best %.4f at step %d); it follows %s from here, so "
                 "the next validation is the best so far", name, rule.metric.upper(), rule.best, rule.best_step,
                 metric.upper())
        rule = StopRule.start(phase.patience, metric)
    arbitrary = not lpips_pretrained and rule.metric == "lpips"  # (select_on=lpips asked for it, or an older rule)
    note = "" if lpips_pretrained else " (the validation LPIPS backbone is random" + (
        ": its numbers rank generators arbitrarily)" if arbitrary else ")")
    log.log(logging.WARNING if arbitrary else logging.INFO, "%s: keeping the best generator by validation %s%s", name,
            rule.metric.upper(), note)
    return rule
