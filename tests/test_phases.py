"""NoGAN phase helpers: learning-rate schedules, gan turn-taking, the early-stop rule, phase kinds."""

from __future__ import annotations

import json
import math

import pytest

from dist_dejpeg.config import ConfigError, PhaseConfig, load_config
from dist_dejpeg.train.phases import (StopRule, gan_rule, gan_turn, generator_updates, lr_at, select_metric,
                                      trains_critic, trains_generator, uses_lpips)

LR = 1e-3


def _phase(**kw) -> PhaseConfig:
    kw.setdefault("kind", "gen")
    kw.setdefault("steps", 100)
    kw.setdefault("lr", LR)
    return PhaseConfig(**kw)


# --------------------------------------------------------------------------------------------- lr_at


def test_onecycle_shape():
    p = _phase(schedule="onecycle", warmup=0.25)
    lrs = [lr_at(p, s) for s in range(101)]
    assert lrs[0] == pytest.approx(LR / 25)
    assert lrs[25] == pytest.approx(LR)
    assert max(lrs) == pytest.approx(LR) and lrs.index(max(lrs)) == 25
    assert lrs[100] == pytest.approx(LR / 1e4, rel=1e-6)
    assert lrs[99] < LR / 100
    assert all(a < b for a, b in zip(lrs[:25], lrs[1:26])), "warm-up is increasing"
    assert all(a > b for a, b in zip(lrs[25:100], lrs[26:101])), "annealing is decreasing"
    assert lr_at(p, 10_000) == pytest.approx(LR / 1e4)  # past the end: stays at the floor


def test_cosine_shape():
    p = _phase(schedule="cosine", warmup=0.1)
    lrs = [lr_at(p, s) for s in range(101)]
    assert lrs[0] == pytest.approx(LR / 10)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert lrs[9] == pytest.approx(LR) and lrs[10] == pytest.approx(LR)
    assert all(a > b for a, b in zip(lrs[10:100], lrs[11:101]))
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert lrs[99] < LR * 1e-3
    assert min(lrs) >= 0.0


def test_cosine_without_warmup_starts_at_peak():
    p = _phase(schedule="cosine", warmup=0.0)
    assert lr_at(p, 0) == pytest.approx(LR)
    assert lr_at(p, 50) == pytest.approx(LR / 2)


def test_constant_after_warmup():
    p = _phase(schedule="constant", warmup=0.2)
    lrs = [lr_at(p, s) for s in range(101)]
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:20]))
    assert lrs[0] < LR
    assert all(v == pytest.approx(LR) for v in lrs[20:])
    assert lrs[19] == pytest.approx(LR)
    p0 = _phase(schedule="constant", warmup=0.0)
    assert all(lr_at(p0, s) == LR for s in (0, 1, 50, 100, 500))


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_base_lr_override_scales(schedule):
    p = _phase(schedule=schedule, warmup=0.25)
    for s in (0, 10, 25, 60, 99):
        assert lr_at(p, s, base_lr=5 * LR) == pytest.approx(5 * lr_at(p, s))


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_lr_finite_for_degenerate_phases(schedule):
    for steps, warmup in ((0, 0.25), (1, 0.0), (1, 1.0), (3, 0.5)):
        p = _phase(schedule=schedule, steps=steps, warmup=warmup)
        for s in range(5):
            v = lr_at(p, s)
            assert math.isfinite(v) and 0 <= v <= LR * (1 + 1e-12), (schedule, steps, warmup, s, v)


# --------------------------------------------------------------------------------------------- gan_turn


def test_gan_turn_pattern():
    p = _phase(kind="gan", critic_iters=5, gen_iters=2)
    pattern = "".join("C" if gan_turn(p, s) == "critic" else "G" for s in range(35))
    assert pattern == "CCCCCGG" * 5
    assert {gan_turn(p, s) for s in range(7)} == {"critic", "gen"}


def test_gan_turn_other_ratios():
    p = _phase(kind="gan", critic_iters=1, gen_iters=1)
    assert "".join("C" if gan_turn(p, s) == "critic" else "G" for s in range(6)) == "CGCGCG"
    p = _phase(kind="gan", critic_iters=0, gen_iters=3)
    assert all(gan_turn(p, s) == "gen" for s in range(10))
    p = _phase(kind="gan", critic_iters=2, gen_iters=0)
    assert all(gan_turn(p, s) == "critic" for s in range(10))


def test_generator_updates_counts_the_gan_phases_gen_turns():
    for critic_iters, gen_iters in ((5, 2), (1, 1), (0, 3), (2, 0), (3, 1)):
        for steps in range(0, 20):
            p = _phase(kind="gan", critic_iters=critic_iters, gen_iters=gen_iters, steps=steps)
            assert generator_updates(p) == sum(gan_turn(p, s) == "gen" for s in range(steps)), (critic_iters, steps)
    assert generator_updates(_phase(kind="gen", steps=7)) == 7 and generator_updates(_phase(kind="critic", steps=7)) == 0


def test_a_gan_phase_without_generator_updates_is_warned_of(caplog):
    """train.phases.gan.steps=3 with critic_iters=5 (a quick test run): every step a critic update, the generator
    file exactly what the earlier phases left, +0.000 dB from the gan phase, without a word."""
    import logging
    from pathlib import Path

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from dist_dejpeg.config import load_config
    from dist_dejpeg.train.build import build_parts

    AcceleratorState._reset_state(True)  # (another test's accelerator in this process)
    GradientState._reset_state()
    cfg = load_config(Path(__file__).parents[1] / "configs" / "debug.yaml",
                      ["model.encoder=mobilenetv3_small_050", "model.decoder_width=16", "train.cpu=true",
                       "train.phases.gan.steps=3", "train.phases.gan.critic_iters=5"])
    with caplog.at_level(logging.WARNING, logger="dist_dejpeg"):
        build_parts(cfg, Accelerator(cpu=True))
    assert "train.phases.gan: its 3 steps are all critic updates" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dist_dejpeg"):
        build_parts(load_config(Path(__file__).parents[1] / "configs" / "debug.yaml",
                                ["model.encoder=mobilenetv3_small_050", "model.decoder_width=16", "train.cpu=true"]),
                    Accelerator(cpu=True))
    assert "critic updates" not in caplog.text


# --------------------------------------------------------------------------------------------- StopRule


def test_stop_rule_scripted_sequence():
    rule = StopRule(patience=2)
    values = [0.5, 0.4, 0.45, 0.41, 0.3]
    results = []
    for step, v in enumerate(values):
        improved, stop = rule.update(v, step * 100)
        results.append((improved, stop))
        if stop:
            break
    assert results == [(True, False), (True, False), (False, False), (False, True)]
    assert len(results) == 4  # fired at the 4th value
    assert rule.best == 0.4 and rule.best_step == 100
    assert rule.bad_checks == 2


def test_stop_rule_improvement_resets_count():
    rule = StopRule(patience=2)
    for step, v in enumerate([0.5, 0.6, 0.4, 0.45]):
        _, stop = rule.update(v, step)
        assert not stop
    assert rule.best == 0.4 and rule.bad_checks == 1
    assert rule.update(0.4, 4) == (False, True)  # equal is not an improvement


def test_stop_rule_patience_zero_never_stops():
    rule = StopRule(patience=0)
    first = rule.update(0.1, 0)
    assert first == (True, False)
    for step in range(1, 50):
        improved, stop = rule.update(0.1 + step, step)
        assert not improved and not stop
    assert rule.best == 0.1 and rule.best_step == 0 and rule.bad_checks == 49


def test_stop_rule_state_round_trip():
    rule = StopRule(patience=3)
    for step, v in enumerate([0.5, 0.3, 0.35]):
        rule.update(v, step)
    state = rule.state_dict()
    assert state == {"patience": 3, "best": 0.3, "best_step": 1, "bad_checks": 1, "metric": "lpips", "best_global": -1}
    restored = StopRule.from_state(json.loads(json.dumps(state)))
    assert restored == rule
    # both go on identically
    for step, v in enumerate([0.36, 0.37], start=3):
        assert restored.update(v, step) == rule.update(v, step)
    assert restored.update(0.9, 5) == (False, True)

    fresh = StopRule()
    assert StopRule.from_state(json.loads(json.dumps(fresh.state_dict()))) == fresh
    assert fresh.best == math.inf


def test_stop_rule_on_psnr_takes_higher_as_better():
    rule = StopRule.start(2, "psnr")
    assert rule.best == -math.inf and StopRule.from_state(json.loads(json.dumps(rule.state_dict()))) == rule
    results = [rule.update(v, step) for step, v in enumerate([20.0, 21.0, 20.5, 20.9])]
    assert results == [(True, False), (True, False), (False, False), (False, True)]
    assert (rule.best, rule.best_step) == (21.0, 1)


def test_a_change_within_float_noise_is_no_improvement():
    """One process and two sum the batch in another order: their validations differ in the last digits, and where
    two steps were that close (PSNR 30.0127 vs 30.0130 dB) they kept different generators (test_distributed)."""
    for metric, values in (("psnr", [30.0, 30.0033, 30.0036]), ("lpips", [0.2, 0.19998, 0.199975])):
        rule = StopRule.start(0, metric)
        assert [rule.update(v, step)[0] for step, v in enumerate(values)] == [True, True, False], metric
        assert rule.best_step == 1


def test_select_on_auto_follows_lpips_only_when_its_backbone_is_pretrained():
    """A random-backbone LPIPS (loss.lpips_pretrained=false, configs/debug.yaml) ranks generators arbitrarily:
    auto keeps the best by PSNR there."""
    gan = _phase(kind="gan")
    assert gan.select_on == "auto"
    assert select_metric("gan", gan, lpips_pretrained=True) == "lpips"
    assert select_metric("gan", gan, lpips_pretrained=False) == "psnr"
    assert select_metric("gan", _phase(kind="gan", select_on="lpips"), lpips_pretrained=False) == "lpips"
    assert select_metric("gan", _phase(kind="gan", select_on="psnr"), lpips_pretrained=True) == "psnr"
    with pytest.raises(ConfigError, match=r"'train.phases.gan.select_on': 'ssim' is not one of"):  # when loaded
        load_config(None, ["train.phases.gan.select_on=ssim"])


def test_a_resumed_rule_from_before_select_on_loads_and_follows_this_runs_metric(caplog):
    old = {"patience": 2, "best": 0.4, "best_step": 20, "bad_checks": 1}  # a checkpoint's, before the metric field
    assert StopRule.from_state(old).metric == "lpips"
    gan = _phase(kind="gan", patience=5)
    with caplog.at_level("INFO", logger="dist_dejpeg"):
        rule = gan_rule("gan", gan, old, fresh=False, decided=False, lpips_pretrained=False)
    assert "gan: keeping the best generator by validation PSNR (the validation LPIPS backbone is random)" in caplog.text
    assert rule == StopRule.start(5, "psnr")  # the LPIPS best means nothing to PSNR: the next validation is the best
    caplog.clear()
    with caplog.at_level("INFO", logger="dist_dejpeg"):
        kept = gan_rule("gan", gan, old, fresh=False, decided=True, lpips_pretrained=False)  # the stop already fired
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "rank generators arbitrarily" in caplog.text
    assert (kept.metric, kept.best, kept.best_step) == ("lpips", 0.4, 20)
    same = gan_rule("gan", gan, old, fresh=False, decided=False, lpips_pretrained=True)
    assert (same.best, same.bad_checks, same.patience) == (0.4, 1, 5)  # this run's patience


# --------------------------------------------------------------------------------------------- kinds


def test_phase_kinds():
    gen = _phase(kind="gen", w_lpips=1.0)
    critic = _phase(kind="critic", w_lpips=1.0)
    gan = _phase(kind="gan", w_lpips=1.0)
    assert (trains_generator(gen), trains_critic(gen), uses_lpips(gen)) == (True, False, True)
    assert (trains_generator(critic), trains_critic(critic), uses_lpips(critic)) == (False, True, False)
    assert (trains_generator(gan), trains_critic(gan), uses_lpips(gan)) == (True, True, True)
    assert not uses_lpips(_phase(kind="gen", w_lpips=0.0))
    assert not uses_lpips(_phase(kind="gan", w_lpips=0.0))


# ------------------------------------------------------------------ resume with more steps for a finished phase
def _steps(gen: int, critic: int, gan: int):
    from dist_dejpeg.config import load_config

    return load_config(None, [f"train.phases.gen.steps={gen}", f"train.phases.critic.steps={critic}",
                              f"train.phases.gan.steps={gan}"])


SAVED = {"train.phases.gen.steps": 10, "train.phases.critic.steps": 4, "train.phases.gan.steps": 6}


def test_longer_phases_reopens_only_the_phase_that_ended_last():
    from dist_dejpeg.config import ConfigError
    from dist_dejpeg.train.resume import longer_phases

    finished = {"phase_index": 3, "phase_step": 0, "stopped_early": {}}
    assert longer_phases(_steps(10, 4, 9), SAVED, finished) == {"phase_index": 2, "phase_step": 6}
    assert longer_phases(_steps(10, 4, 6), SAVED, finished) == {}  # unchanged
    assert longer_phases(_steps(8, 2, 6), SAVED, finished) == {}  # shorter: the phases are done all the same
    assert longer_phases(_steps(12, 4, 6), SAVED, {"phase_index": 1, "phase_step": 0}) == \
        {"phase_index": 0, "phase_step": 10}  # the critic phase not begun: gen goes on
    with pytest.raises(ConfigError, match="phase 'critic' has trained since"):
        longer_phases(_steps(12, 4, 6), SAVED, {"phase_index": 1, "phase_step": 2})
    with pytest.raises(ConfigError, match="phase 'critic' has trained since"):
        longer_phases(_steps(12, 4, 6), SAVED, finished)
    with pytest.raises(ConfigError, match="its stop rule ended it at step 3"):
        longer_phases(_steps(10, 4, 9), SAVED, dict(finished, stopped_early={"gan": 3}))
    # the phase in progress may grow or shrink: the loop runs to its new length
    assert longer_phases(_steps(10, 4, 9), SAVED, {"phase_index": 2, "phase_step": 2}) == {}


def test_shorter_phases_keep_the_steps_they_trained():
    from dist_dejpeg.train.resume import shorter_phases

    finished = {"phase_index": 3, "phase_step": 0}
    assert shorter_phases(_steps(8, 4, 2), SAVED, finished) == {"gen": 10, "gan": 6}  # done: as trained
    assert shorter_phases(_steps(10, 4, 9), SAVED, finished) == {}  # longer: longer_phases' business
    in_gan = {"phase_index": 2, "phase_step": 5}
    assert shorter_phases(_steps(10, 4, 3), SAVED, in_gan) == {"gan": 5}  # in progress: it ends where it is
    assert shorter_phases(_steps(10, 4, 5), SAVED, in_gan) == {}  # ends at its new length, not yet reached
    assert shorter_phases(_steps(1, 1, 3), {}, in_gan) == {"gan": 5}  # no readable config: done ones unjudged


def test_the_generator_file_names_the_step_of_the_generator_it_holds():
    """A gan phase that kept its best validation's generator (global step 320) wrote global_step 330, the run's last
    step: evaluate and report said "training steps 330" of weights trained 320 steps. The kept one's step is in the
    stop rule's state (checkpointed with it); a run that kept none, or a checkpoint from before, gives the last."""
    from types import SimpleNamespace

    from dist_dejpeg.train.final import generator_step

    rule = StopRule.start(2, "psnr")
    rule.best_global = 320
    kept = StopRule.from_state(rule.state_dict())
    assert generator_step(SimpleNamespace(stop=kept.state_dict(), global_step=330)) == 320
    assert generator_step(SimpleNamespace(stop=StopRule().state_dict(), global_step=330)) == 330
    old = {k: v for k, v in rule.state_dict().items() if k != "best_global"}  # a checkpoint from before the field
    assert generator_step(SimpleNamespace(stop=old, global_step=330)) == 330


def test_the_phases_docstring_names_each_loss_weight_and_the_pixel_loss():
    """train/phases.py said the gen phase trains "w_lpips * LPIPS + w_pixel * L1"; the pixel loss is loss.pixel's
    (L1 or Charbonnier, per plane with loss.chroma_weight): the docstring and generator_step's name every w_* term."""
    from dist_dejpeg.config.checks import loss_weights
    from dist_dejpeg.train import phases, steps

    assert "loss.pixel" in phases.__doc__ and "L1 or Charbonnier" in phases.__doc__
    for weight in loss_weights(PhaseConfig()):
        assert weight in phases.__doc__ and weight in steps.generator_step.__doc__, weight
