"""Typed configuration: dataclasses + OmegaConf structured config, YAML files and ``key=value`` overrides.

    dist-dejpeg train --config configs/debug.yaml train.run_dir=runs/try1 data.batch_size=8

Every field is typed and has a default. Loading is strict: an unknown key or a value of the wrong type is a
:class:`ConfigError` that names the key. Nothing here mutates what it was given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

PHASE_KINDS = ("gen", "critic", "gan")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class DataConfig:
    root: str = "data/samples"  # folder that holds the shards (train-*.tar, val-*.tar, manifest.json)
    train_glob: str = "train-*.tar"  # training shards inside root (glob)
    val_glob: str = "val-*.tar"  # validation shards inside root (glob)
    auto_prepare: str = "none"  # "samples": write the bundled sample shards into root if it holds none
    backend: str = "auto"  # loader: "dali", "torch" (webdataset + PIL workers), "auto" (DALI if installed)
    dali_threads: int = 4  # DALI CPU worker threads per device
    gpu_jpeg: bool = True  # torch backend on CUDA: JPEG-degrade batches on the GPU (nvJPEG), not in workers
    gpu_jpeg_qualities: int = 4  # GPU degradation: distinct qualities per batch (each uniform; 0: one per sample)
    gpu_jpeg_pack: bool = True  # GPU degradation: one nvJPEG round trip per quality on a canvas of the tiles
    gpu_jpeg_ahead: int = 2  # GPU degradation: batches degraded ahead in a thread on a side stream (0: inline)
    prefetch_factor: int = 4  # torch backend: batches each worker prepares ahead
    pin_memory: bool = True  # torch backend on CUDA: page-locked batches, copied to the GPU asynchronously
    dali_prefetch: int = 2  # DALI: prefetch queue depth (batches the pipeline runs ahead of the trainer)
    crop: int = 256  # training crop size in pixels (square)
    batch_size: int = 16  # per device, per micro-step
    num_workers: int = 4  # DataLoader worker processes per device
    quality_min: int = 10  # JPEG quality range for training degradations (inclusive)
    quality_max: int = 95  # upper end of that range (inclusive): light compression too, where restore must do no harm
    quality_power: float = 0.0  # training qualities drawn with P(q) proportional to q^-quality_power over quality_min..quality_max: 0 uniform, 1 as 1/q (more heavy compression); 0..4
    rot90: bool = False  # augmentation: besides the horizontal mirror, turn each training crop by a random multiple of 90 degrees (before the JPEG degradation)
    channel_shuffle: float = 0.0  # augmentation: the share of training crops whose R, G, B planes are put in a random order (before the JPEG degradation); 0..1
    shuffle_buffer: int = 256  # samples held in each worker's shuffle buffer
    max_bad_samples: int = 100  # bad training samples (undecodable, too small, no image) tolerated in one pass over the data; one more stops the run with the count (torch: per process, as met; DALI: all shards, checked at start); -1: no limit
    val_crop: int = 256  # fixed centre crop of each validation tile
    val_qualities: List[int] = field(default_factory=lambda: [10, 20, 40])  # validation JPEG qualities
    val_max_images: int = 0  # cap on validation tiles (0: all)
    val_batch_size: int = 16  # validation batch size per device


@dataclass
class ModelConfig:
    encoder: str = "mobilenetv3_large_100"  # any timm model that supports features_only
    pretrained: bool = True  # ImageNet weights for the encoder (from the HF cache or encoder_weights)
    encoder_weights: str = ""  # explicit local weights file for the encoder (.safetensors/.pth); "" = cache
    encoder_depth: int = 0  # encoder stages the U-Net uses, from the first (0: all); 4 stops MobileNetV3 at stride 16
    decoder_width: int = 256  # channels of the deepest decoder block; halved per level, floor 16
    blur: bool = True  # blur after each pixel shuffle (removes checkerboard artefacts)
    self_attention: bool = True  # one self-attention block in the decoder
    attention_stride: int = 8  # output stride of the decoder block that gets self-attention
    spectral_norm: bool = True  # spectral norm on the decoder convolutions (DeOldify; the norm layer: decoder_norm)
    decoder_norm: str = "group"  # decoder normalisation: group (each image's own statistics), batch (DeOldify's), none
    quality_conditioning: bool = False  # the decoder takes the JPEG quality (FiLM); 0/unknown runs blind
    keep_mean: bool = False  # the correction has zero mean per image (tile) and channel: the output keeps the JPEG's mean colour
    quality_blind_prob: float = 0.25  # conditioned training: share of samples whose quality is hidden (blind mode)
    channels_last: bool = False  # memory format for the models and batches (faster on tensor cores)
    sync_bn: bool = False  # several processes: batch-norm statistics over the global batch, not per device


@dataclass
class CriticConfig:
    width: int = 64  # channels of the first conv (DeOldify nf)
    n_blocks: int = 3  # stride-2 downsampling blocks
    dropout: float = 0.15  # Dropout2d probability in each block
    self_attention: bool = True  # self-attention after the first downsampling block


@dataclass
class LossConfig:
    lpips_net: str = "vgg"  # LPIPS backbone for the training loss: "vgg" (the seed's) or "alex"
    metric_net: str = "alex"  # LPIPS backbone for validation metrics (Alex is the reported convention)
    lpips_pretrained: bool = True  # ImageNet backbone for LPIPS (torch hub cache or lpips_weights)
    lpips_weights: str = ""  # explicit torchvision backbone file for lpips_net; "" = torch hub cache
    metric_weights: str = ""  # explicit torchvision backbone file for metric_net; "" = torch hub cache
    adversarial: str = "bce"  # "bce" (BCE-with-logits, the seed's) or "hinge"
    chroma_weight: float = 1.0  # pixel loss: 1 = L1 on RGB; else L1 on Y, Cb, Cr with the chroma planes weighted (measured worse: benchmarks/RESULTS.md, Chroma)
    pixel: str = "l1"  # pixel loss penalty: "l1" or "charbonnier" (sqrt(d^2 + 1e-3^2), mean: smooth at 0, ~L1 elsewhere); per plane with chroma_weight


@dataclass
class PhaseConfig:
    kind: str = ""  # "gen" | "critic" | "gan"; "" takes the phase's name when that is a kind
    steps: int = 1000  # batches this phase consumes (per device, counted in micro-steps / grad_accum)
    lr: float = 1e-3  # peak learning rate of the model(s) this phase trains (generator in gan)
    critic_lr_mult: float = 5.0  # gan phase: critic lr = lr * critic_lr_mult
    schedule: str = "onecycle"  # "onecycle" | "cosine" | "constant"
    warmup: float = 0.25  # fraction of steps spent warming up (onecycle/cosine)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])  # Adam betas
    weight_decay: float = 1e-3  # AdamW weight decay
    w_lpips: float = 1.0  # generator loss weight of LPIPS
    w_pixel: float = 1.0  # generator loss weight of L1
    w_adv: float = 1.5  # gan phase: generator loss weight of the adversarial term
    critic_iters: int = 5  # gan phase: critic updates per cycle
    gen_iters: int = 2  # gan phase: generator updates per cycle
    val_every: int = 0  # validate every N steps (0: train.val_every)
    patience: int = 0  # gan phase: stop after this many validations without LPIPS improvement (0: never)
    max_grad_norm: float = 0.0  # gradient clipping (0: off)


def _default_phases() -> Dict[str, PhaseConfig]:
    return {
        "gen": PhaseConfig(kind="gen", steps=2000, lr=1e-3),
        "critic": PhaseConfig(kind="critic", steps=500, lr=1e-4, w_lpips=0.0, w_pixel=0.0),
        "gan": PhaseConfig(kind="gan", steps=2000, lr=1e-5, schedule="constant", warmup=0.0,
                           betas=[0.0, 0.9], patience=5),
    }


# torch.compile's modes; the two with CUDA graphs need a step marker per iteration (Trainer.cudagraphs)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # everything a run writes goes here
    seed: int = 0  # base seed; each rank adds its index
    mixed_precision: str = "bf16"  # "no" | "bf16" | "fp16"
    cpu: bool = False  # force CPU even when a GPU is present
    processes: int = 1  # `dist-dejpeg train` starts this many ranks on this machine (torchrun --standalone) when no launcher did; on a CPU each gets cores/N threads
    grad_accum: int = 1  # micro-steps per optimizer step
    phases: Dict[str, PhaseConfig] = field(default_factory=_default_phases)  # phase name -> settings
    order: List[str] = field(default_factory=lambda: ["gen", "critic", "gan"])  # phases to run, in order
    log_every: int = 50  # steps between scalar logs
    val_every: int = 500  # steps between validations (phases may override)
    image_every: int = 0  # steps between TensorBoard image grids, plus one at the end (0: at each validation)
    ckpt_every: int = 1000  # steps between checkpoints (and one at the end of every phase)
    keep_last: int = 3  # checkpoints kept (oldest removed first)
    progress: bool = True  # rank-0 progress bar on a terminal (without one: a plain log line every log_every steps)
    log_level: str = "info"  # debug | info | warning | error (rank 0; other ranks log warnings and errors)
    log_with: List[str] = field(default_factory=lambda: ["tensorboard"])  # Accelerate trackers: tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive, trackio
    auto_resume: bool = True  # continue from the newest checkpoint in run_dir when there is one (requeued jobs)
    resume_allow_batch_change: bool = False  # resume although the global batch (data.batch_size x grad_accum x processes) or process count differs from the checkpoint's
    dist_timeout_s: int = 900  # a collective that waits longer fails the run instead of hanging (dead rank)
    compile: bool = False  # torch.compile the generator and critic (eager, with a warning, where compiling fails)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs: the step's kernels replayed, far fewer host launches) | max-autotune | max-autotune-no-cudagraphs
    compile_cache: str = "compile_cache"  # inductor's cache folder, relative to run_dir (a requeued run reuses it); '': its /tmp default
    fused_adamw: bool = True  # fused AdamW kernel (CUDA and CPU; one kernel per step); DeepSpeed keeps its own
    sync_every: int = 25  # steps between host reads of the non-finite and stop flags on CUDA (1: every step)
    preempt_budget_s: float = 90.0  # CUDA: fewer steps between stop-flag reads when slow, so steps + save fit (SLURM warns 120 s ahead)
    cuda_stream: bool = True  # CUDA: train on a stream of its own, not stream 0 (where nvJPEG copies out; see trainer)
    ema_decay: float = 0.999  # EMA of the generator's weights, used for validation and the generator file; 0: no EMA
    ema_warmup: bool = True  # the EMA's decay at its t-th update is min(ema_decay, (1 + t) / (10 + t)): early updates forget the init
    deepspeed_stage: int = 0  # ZeRO stage for both models via Accelerate's DeepSpeed (one plugin per model); 0: plain DDP


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults, then the YAML file (if any), then ``key=value`` overrides; validated."""
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        merged = OmegaConf.merge(merged, _dotlist(overrides))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _config_error(err) from None
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A new Config: ``cfg`` with ``key=value`` overrides applied, validated the same way as load_config."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), _dotlist(overrides))
        out = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _config_error(err) from None
    validate(out)
    return out


def _dotlist(overrides: Sequence[str]):
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    return OmegaConf.from_dotlist(list(overrides))


def _config_error(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None)
    first = str(err).splitlines()[0]
    return ConfigError(f"config key '{key}': {first}" if key else first)


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
    if not 0.0 <= cfg.model.quality_blind_prob <= 1.0:
        raise ConfigError("config key 'model.quality_blind_prob': must be in [0, 1]")
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
    for q in d.val_qualities:
        if not 1 <= q <= 100:
            raise ConfigError(f"config key 'data.val_qualities': quality {q} outside 1..100")
    for name in ("crop", "batch_size", "val_crop", "val_batch_size"):
        if getattr(d, name) < 1:
            raise ConfigError(f"config key 'data.{name}': must be >= 1")
    if d.crop % 8 or d.val_crop % 8:
        raise ConfigError("config keys 'data.crop'/'data.val_crop': must be multiples of 8 (the JPEG block)")
    for name, unit in (("grad_accum", ""), ("processes", ""), ("sync_every", " (steps)")):
        if getattr(t, name) < 1:
            raise ConfigError(f"config key 'train.{name}': must be >= 1{unit}")
    if t.preempt_budget_s <= 0:
        raise ConfigError("config key 'train.preempt_budget_s': must be > 0 (seconds)")
    if d.prefetch_factor < 1 or d.dali_prefetch < 1:
        raise ConfigError("config keys 'data.prefetch_factor'/'data.dali_prefetch': must be >= 1")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError("config key 'train.ema_decay': must be in [0, 1) (0: no EMA)")
    if t.dist_timeout_s < 1:
        raise ConfigError("config key 'train.dist_timeout_s': must be >= 1 (seconds)")
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
    defaults = _default_phases()
    for name in t.order:
        if name not in t.phases:
            raise ConfigError(f"config key 'train.order': phase '{name}' is not defined in train.phases")
    for name, phase in t.phases.items():
        if name not in t.order and name not in defaults:
            raise ConfigError(f"config key 'train.phases.{name}': defined but not listed in train.order "
                              f"(a typo in a phase name?)")
        if not phase.kind:
            if name not in PHASE_KINDS:
                raise ConfigError(f"config key 'train.phases.{name}.kind': must be set to one of {list(PHASE_KINDS)}")
            phase.kind = name
        _one_of(f"train.phases.{name}.kind", phase.kind, PHASE_KINDS)
        _one_of(f"train.phases.{name}.schedule", phase.schedule, ("onecycle", "cosine", "constant"))
        if phase.steps < 0:
            raise ConfigError(f"config key 'train.phases.{name}.steps': must be >= 0")
        if len(phase.betas) != 2:
            raise ConfigError(f"config key 'train.phases.{name}.betas': needs two values")
        adv = phase.w_adv if phase.kind == "gan" else 0.0  # the gen phase has no critic
        if phase.kind in ("gen", "gan") and phase.w_pixel <= 0 and phase.w_lpips <= 0 and adv <= 0:
            raise ConfigError(f"config keys 'train.phases.{name}.w_pixel/w_lpips': the generator needs a loss")
        if phase.kind == "gan" and phase.critic_iters + phase.gen_iters < 1:
            raise ConfigError(f"config keys 'train.phases.{name}.critic_iters/gen_iters': both zero")
    if t.deepspeed_stage:
        _same_clipping(t)


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


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts (a to_dict result, a config.yaml read back) -> {"a.b.c": value}; an empty dict stays a value."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def from_dict(data: dict) -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. stored beside exported weights); strict."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data)))
    except OmegaConfBaseException as err:
        raise _config_error(err) from None
    validate(cfg)
    return cfg


def reference_markdown() -> str:
    """The config reference (one table per section) built from the schema's field comments; docs/CONFIG.md
    holds it between markers and tests/test_docs.py keeps the two in sync.

        python -m dist_dejpeg.config                          # print the tables
        python -m dist_dejpeg.config --write docs/CONFIG.md   # replace them between the file's markers
    """
    import inspect
    import re

    pattern = re.compile(r"^\s+(\w+):\s*([^=]+?)\s*=\s*(.+?)\s*#\s*(.+)$")
    sections = [("data", DataConfig), ("model", ModelConfig), ("critic", CriticConfig), ("loss", LossConfig),
                ("train", TrainConfig), ("train.phases.<name>", PhaseConfig)]
    out = []
    for prefix, cls in sections:
        out += [f"**{prefix}**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        defaults = cls()
        for line in inspect.getsource(cls).splitlines():
            match = pattern.match(line)
            if not match:
                continue
            name, typ, _, comment = match.groups()
            value = getattr(defaults, name)
            shown = "(gen, critic, gan; see below)" if name == "phases" else repr(value)
            meaning = comment.strip().replace("|", "\\|")  # "a | b" in a comment would split the table's cell
            out.append(f"| `{prefix}.{name}` | {typ.strip()} | `{shown}` | {meaning} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if len(sys.argv) == 3 and sys.argv[1] == "--write":  # the page's prose stays; the tables between its markers change
        start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
        head, rest = Path(sys.argv[2]).read_text().split(start, 1)
        tail = rest.split(end, 1)[1]
        Path(sys.argv[2]).write_text(f"{head}{start}\n{reference_markdown().strip()}\n{end}{tail}")
    else:
        print(reference_markdown())
