"""The config's checks that a type alone cannot express (values in range, one of a set, phases that fit
together); each failure is a ConfigError naming the key."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from dist_dejpeg.config.schema import (COMPILE_MODES, LPIPS_MIN_SIDE, PHASE_KINDS, TRACKER_PACKAGES, Config, ConfigError, PhaseConfig,
                                       TrainConfig, default_phases)


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{name}': {value!r} is not one of {list(allowed)}")


def validate(cfg: Config) -> None:
    """Checks that a type alone cannot express. Fills each phase's ``kind`` from its name when empty."""
    d, t = cfg.data, cfg.train
    # YAML 1.1 reads an unquoted `no` as false, which OmegaConf then turns into the string "False".
    if t.mixed_precision.lower() in ("false", "fp32", "none", "off"):
        t.mixed_precision = "no"
    _one_of("data.backend", d.backend, ("auto", "dali", "torch"))
    _one_of("data.auto_prepare", d.auto_prepare, ("none", "samples"))
    _one_of("train.mixed_precision", t.mixed_precision, ("no", "bf16", "fp16"))
    _one_of("train.compile_mode", t.compile_mode, COMPILE_MODES)
    _one_of("model.decoder_norm", cfg.model.decoder_norm, ("batch", "group", "none"))
    if cfg.model.encoder_depth == 1 or cfg.model.encoder_depth < 0:  # a U-Net needs a skip and a deeper stage
        raise ConfigError(f"config key 'model.encoder_depth': must be 0 (all stages) or at least 2, got "
                          f"{cfg.model.encoder_depth}")
    for key, value, least in (("model.decoder_width", cfg.model.decoder_width, 1), ("critic.width", cfg.critic.width, 1),
                              ("critic.n_blocks", cfg.critic.n_blocks, 0)):  # (else a layer of no channels: torch's error)
        if value < least:
            raise ConfigError(f"config key '{key}': must be >= {least}, got {value}")
    if not 0.0 <= cfg.model.quality_blind_prob <= 1.0:
        raise ConfigError("config key 'model.quality_blind_prob': must be in [0, 1]")
    if cfg.model.quality_conditioning and cfg.model.quality_blind_prob == 1.0:  # validation, guard, restore tell it
        raise ConfigError("config key 'model.quality_blind_prob': 1 hides every sample's quality, so the "
                          "quality-conditioned path that validation and restore use is never trained; for a blind "
                          "model set model.quality_conditioning=false")
    t.log_level = t.log_level.lower()
    _one_of("train.log_level", t.log_level, ("debug", "info", "warning", "error"))
    _one_of("loss.lpips_net", cfg.loss.lpips_net, ("vgg", "alex"))
    _one_of("loss.metric_net", cfg.loss.metric_net, ("vgg", "alex"))
    _one_of("loss.adversarial", cfg.loss.adversarial, ("bce", "hinge"))
    if cfg.loss.chroma_weight <= 0:
        raise ConfigError("config key 'loss.chroma_weight': must be > 0")
    _one_of("loss.pixel", cfg.loss.pixel, ("l1", "charbonnier"))
    if not 0 <= d.quality_power <= 4:  # also false for nan
        raise ConfigError(f"config key 'data.quality_power': must be a finite number in [0, 4] (0: uniform), "
                          f"got {d.quality_power}")
    if not 0 <= d.channel_shuffle <= 1:  # also false for nan
        raise ConfigError(f"config key 'data.channel_shuffle': must be a share in [0, 1], got {d.channel_shuffle}")
    if not 1 <= d.quality_min <= d.quality_max <= 100:
        raise ConfigError(f"config keys 'data.quality_min'/'data.quality_max': need 1 <= min <= max <= 100, "
                          f"got {d.quality_min}, {d.quality_max}")
    if not d.val_qualities:
        raise ConfigError("config key 'data.val_qualities': needs at least one quality (validation, the gan phase's "
                          "stop rule and restore's guard measure at these)")
    for q in d.val_qualities:
        if not 1 <= q <= 100:
            raise ConfigError(f"config key 'data.val_qualities': quality {q} outside 1..100")
    for name in ("crop", "batch_size", "val_crop", "val_batch_size"):
        if getattr(d, name) < 1:
            raise ConfigError(f"config key 'data.{name}': must be >= 1")
    for name in ("num_workers", "shuffle_buffer", "val_max_images"):  # (0: none, no shuffling, all)
        if getattr(d, name) < 0:
            raise ConfigError(f"config key 'data.{name}': must be >= 0, got {getattr(d, name)}")
    if d.max_bad_samples < -1:
        raise ConfigError(f"config key 'data.max_bad_samples': must be >= 0, or -1 (no limit), got {d.max_bad_samples}")
    if d.crop % 8 or d.val_crop % 8:
        raise ConfigError("config keys 'data.crop'/'data.val_crop': must be multiples of 8 (the JPEG block)")
    for name, unit in (("grad_accum", ""), ("processes", ""), ("sync_every", " (steps)")):
        if getattr(t, name) < 1:
            raise ConfigError(f"config key 'train.{name}': must be >= 1{unit}")
    _paths(cfg)
    if not 0 <= t.seed < 2 ** 31:  # each rank seeds with seed + its index, below 2**32
        raise ConfigError(f"config key 'train.seed': must be in [0, 2**31), got {t.seed}")
    if t.preempt_budget_s <= 0:
        raise ConfigError("config key 'train.preempt_budget_s': must be > 0 (seconds)")
    if d.prefetch_factor < 1 or d.dali_prefetch < 1:
        raise ConfigError("config keys 'data.prefetch_factor'/'data.dali_prefetch': must be >= 1")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError("config key 'train.ema_decay': must be in [0, 1) (0: no EMA)")
    if t.dist_timeout_s < 1:
        raise ConfigError("config key 'train.dist_timeout_s': must be >= 1 (seconds)")
    unknown = [name for name in t.log_with if name not in TRACKER_PACKAGES]
    if unknown:  # (whether each one's package is installed: when the run starts, train/monitor.py)
        raise ConfigError(f"config key 'train.log_with': unknown tracker(s) {', '.join(map(repr, unknown))} (known: "
                          f"{', '.join(TRACKER_PACKAGES)})")
    for name in ("val_every", "ckpt_every", "image_every"):  # (a negative one was taken as its absolute value)
        if getattr(t, name) < 0:
            raise ConfigError(f"config key 'train.{name}': must be >= 0 (steps; 0: off), got {getattr(t, name)}")
    if t.log_every < 1:
        raise ConfigError("config key 'train.log_every': must be >= 1 (steps)")
    if t.keep_last < 0:
        raise ConfigError("config key 'train.keep_last': must be >= 0 (0: keep every checkpoint)")
    if len(set(t.order)) != len(t.order):
        twice = sorted({n for n in t.order if t.order.count(n) > 1})
        raise ConfigError(f"config key 'train.order': phase {', '.join(repr(n) for n in twice)} listed twice; a phase "
                          f"runs once: define another (e.g. train.phases.gan2.kind=gan) and list that")
    if not t.order:
        raise ConfigError("config key 'train.order': no phases to run")
    if t.deepspeed_stage == 3:
        raise ConfigError("config key 'train.deepspeed_stage': ZeRO-3 is not supported: the trainer runs each model's "
                          "raw module inside the other model's step (the frozen critic in the generator's loss, the "
                          "generator under no_grad for the critic's fakes), and ZeRO-3 partitions the parameters so "
                          "that only its own engine's forward can gather them. Use 1 or 2.")
    _one_of("train.deepspeed_stage", t.deepspeed_stage, (0, 1, 2))
    if t.deepspeed_stage and t.mixed_precision == "fp16":
        raise ConfigError("config key 'train.mixed_precision': fp16 with train.deepspeed_stage > 0 has no gradient "
                          "scaler (DeepSpeed keeps fp32 parameters here and the steps autocast); use bf16")
    defaults = default_phases()
    for name in t.order:
        if name not in t.phases:
            raise ConfigError(f"config key 'train.order': phase '{name}' is not defined in train.phases")
        if name == "final":  # its validations would be logged as the final one's (final/qN_* scalars, image)
            raise ConfigError("config key 'train.order': a phase cannot be named 'final', the final validation's "
                              "name (its final/qN_* scalars and image); give the phase another name")
    for name, phase in t.phases.items():
        if name not in t.order and name not in defaults:
            raise ConfigError(f"config key 'train.phases.{name}': defined but not listed in train.order "
                              f"(a typo in a phase name?)")
        if not phase.kind:
            if name not in PHASE_KINDS:
                raise ConfigError(f"config key 'train.phases.{name}.kind': must be set to one of {list(PHASE_KINDS)}")
            phase.kind = name
        _one_of(f"train.phases.{name}.kind", phase.kind, PHASE_KINDS)
        _one_of(f"train.phases.{name}.select_on", phase.select_on, ("auto", "lpips", "psnr"))
        _one_of(f"train.phases.{name}.schedule", phase.schedule, ("onecycle", "cosine", "constant"))
        if phase.steps < 0:
            raise ConfigError(f"config key 'train.phases.{name}.steps': must be >= 0")
        _phase_numbers(name, phase)
        if len(phase.betas) != 2:
            raise ConfigError(f"config key 'train.phases.{name}.betas': needs two values")
        _generator_loss(name, phase)
        if phase.kind == "gan" and phase.critic_iters + phase.gen_iters < 1:
            raise ConfigError(f"config keys 'train.phases.{name}.critic_iters/gen_iters': both zero")
    if t.deepspeed_stage:
        _same_clipping(t)
    _lpips_sides(cfg)
    # (found only at the start of training before, after the dry run had said the config was fine)
    if _phases_training(cfg.train)["critic"] and cfg.data.crop < cfg.critic.min_size:
        raise ConfigError(f"config key 'data.crop': {cfg.data.crop} px is below the critic's minimum "
                          f"{cfg.critic.min_size} px (lower critic.n_blocks)")


def _paths(cfg: Config) -> None:
    """A run folder that is empty (an unset shell variable: the run went into the current folder), the filesystem's
    root, or a file; a data folder that is a file (tracebacks from mkdir or the sample shards' writer)."""
    run_dir, root = cfg.train.run_dir, cfg.data.root
    if not str(run_dir).strip() or (where := Path(run_dir).resolve()) == Path(where.anchor):
        why = "the filesystem's root" if str(run_dir).strip() else "empty: an unset shell variable?"
        raise ConfigError(f"config key 'train.run_dir': {run_dir!r} is no run folder ({why}): name the folder the run "
                          f"writes, e.g. train.run_dir=runs/mine")
    for key, path in (("train.run_dir", run_dir), ("data.root", root)):
        if path and Path(path).is_file():
            raise ConfigError(f"config key '{key}': {path} is a file, not a folder")


def _lpips_sides(cfg: Config) -> None:
    """Crops that LPIPS's pooling leaves no pixel of failed inside the network, a validation crop at the first
    validation (possibly hours in): validation measures with loss.metric_net, a phase with w_lpips > 0 trains with
    loss.lpips_net."""
    lo, d = cfg.loss, cfg.data
    given = [k for k in ("lpips_weights", "metric_weights") if getattr(lo, k)]
    if given and not lo.lpips_pretrained:  # (the file was left unread: a random backbone, labelled so)
        raise ConfigError(f"config key 'loss.{given[0]}': a backbone file is given, but loss.lpips_pretrained is "
                          f"false (random backbones): set loss.lpips_pretrained=true to use it, or drop the file")
    uses = [(lo.metric_net, "data.val_crop", d.val_crop, "loss.metric_net")]
    if any(p.kind in ("gen", "gan") and p.w_lpips > 0 for p in (cfg.train.phases[n] for n in cfg.train.order)):
        uses.append((lo.lpips_net, "data.crop", d.crop, "loss.lpips_net"))
    for net, key, side, net_key in uses:
        if side < LPIPS_MIN_SIDE[net]:
            raise ConfigError(f"config key '{key}': {side} px is below the {LPIPS_MIN_SIDE[net]} px a side that "
                              f"LPIPS-{net} ({net_key}) needs: larger crops, or LPIPS-vgg (16 px)")


def loss_weights(phase: PhaseConfig) -> tuple[str, ...]:
    """The phase's generator loss weights: every PhaseConfig field named ``w_*`` (a new loss term's weight is
    checked by :func:`_phase_numbers` and :func:`_generator_loss` as it is declared in schema.py)."""
    return tuple(f.name for f in dataclasses.fields(phase) if f.name.startswith("w_"))


def _generator_loss(name: str, phase: PhaseConfig) -> None:
    """A phase that trains the generator needs a weight above 0 (the gen phase has no critic: its w_adv is not
    one)."""
    if phase.kind not in ("gen", "gan"):
        return
    weights = [w for w in loss_weights(phase) if phase.kind == "gan" or w != "w_adv"]
    if all(getattr(phase, w) <= 0 for w in weights):
        raise ConfigError(f"config keys 'train.phases.{name}.{'/'.join(weights)}': the generator needs a loss (one "
                          f"weight above 0)")


def _phase_numbers(name: str, phase: PhaseConfig) -> None:
    """Numbers training would take without a word and misuse: a negative lr climbs the loss, a warmup of 1 or
    more never reaches the peak lr, a negative count or weight turns its rule around."""
    key = f"train.phases.{name}"
    for field in ("lr", "critic_lr_mult"):
        value = getattr(phase, field)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"config key '{key}.{field}': must be a finite number > 0, got {value}")
    for field in ("weight_decay", *loss_weights(phase), "max_grad_norm"):
        value = getattr(phase, field)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"config key '{key}.{field}': must be a finite number >= 0, got {value}")
    if not 0 <= phase.warmup < 1:  # (NaN too)
        raise ConfigError(f"config key '{key}.warmup': must be a share of the phase's steps in [0, 1), got "
                          f"{phase.warmup}")
    if not all(0 <= beta < 1 for beta in phase.betas):
        raise ConfigError(f"config key '{key}.betas': Adam's betas must each be in [0, 1), got {phase.betas}")
    for field in ("critic_iters", "gen_iters", "val_every", "patience"):
        if getattr(phase, field) < 0:
            raise ConfigError(f"config key '{key}.{field}': must be >= 0, got {getattr(phase, field)}")


# the attribute of a Config from load_config that lists its key=value overrides of phases not in train.order
UNUSED_PHASE_KEYS = "_unused_phase_keys"


def order_warnings(cfg: Config) -> list[str]:
    """Phase orders that validate (tests and ablations run single phases) but waste a real run: a critic trained
    for no later gan phase (train.order cannot change on resume), a gan phase on an untrained generator, nothing
    to train at all; and overrides (load_config's) of a built-in phase that train.order leaves out, which change
    nothing (a config file's settings of such a phase are a recipe's, cut by an order=[gen] run on purpose).
    Zero-step phases count as absent."""
    order = [name for name in cfg.train.order if cfg.train.phases[name].steps > 0]
    kinds = [cfg.train.phases[name].kind for name in order]
    out = [] if order else [f"every phase of train.order {list(cfg.train.order)} has 0 steps: nothing is trained, "
                            f"the run only validates and writes the generator it starts with"]
    unused = getattr(cfg, UNUSED_PHASE_KEYS, [])
    for phase in dict.fromkeys(key.split(".")[2] for key in unused):
        keys = [f"'{k}'" for k in unused if k.split(".")[2] == phase]
        what = ("key", "is", "value is", "key") if len(keys) == 1 else ("keys", "are", "values are", "keys")
        out.append(f"config {what[0]} {', '.join(keys)} {what[1]} set, but phase '{phase}' is not in train.order "
                   f"{list(cfg.train.order)}: it runs no steps and the {what[2]} unused (list the phase in "
                   f"train.order, or drop the {what[3]})")
    for i, (name, kind) in enumerate(zip(order, kinds)):
        phase = f"phase '{name}'" + (f" (a {kind} phase)" if name != kind else "")
        if kind == "critic" and "gan" not in kinds[i + 1:]:
            out.append(f"{phase} trains the critic, but no gan phase with steps runs after it: its steps are "
                       f"wasted (a resumed run cannot change train.order)")
        if kind == "gan" and "gen" not in kinds[:i] and not cfg.model.init_from:
            out.append(f"{phase} starts from an untrained generator: no gen phase with steps runs before it and "
                       f"model.init_from is not set")
    return out


def _phases_training(t: TrainConfig) -> dict[str, list[str]]:
    """The phases (in order) that train each model: "gen" (gen and gan phases) and "critic" (critic and gan)."""
    return {model: [n for n in t.order if t.phases[n].kind in kinds]
            for model, kinds in (("gen", ("gen", "gan")), ("critic", ("critic", "gan")))}


def _same_clipping(t: TrainConfig) -> None:
    """DeepSpeed clips inside its engine with the config's ``gradient_clipping``, fixed per model when the engine
    is built; so every phase that trains a model must ask for the same max_grad_norm."""
    for model, names in _phases_training(t).items():
        if len({t.phases[n].max_grad_norm for n in names}) > 1:
            model = "generator" if model == "gen" else model
            keys = ", ".join(f"'train.phases.{n}.max_grad_norm' = {t.phases[n].max_grad_norm}" for n in names)
            raise ConfigError(f"config keys {keys}: with train.deepspeed_stage > 0 the {model}'s gradient clipping is "
                              f"fixed when its DeepSpeed engine is built, so every phase that trains the {model} "
                              f"needs the same max_grad_norm")


def clip_norms(t: TrainConfig) -> dict[str, float]:
    """The max_grad_norm of each model ("gen", "critic") over the phases that train it (0.0: off); with DeepSpeed
    these are equal within a model (checked by :func:`validate`)."""
    return {model: float(t.phases[names[0]].max_grad_norm) if names else 0.0
            for model, names in _phases_training(t).items()}
