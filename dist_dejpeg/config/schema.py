"""The training config's schema: one dataclass per section, every field typed, with its default and (the
comment after it) its meaning, which docs/CONFIG.md shows (config/reference.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


PHASE_KINDS = ("gen", "critic", "gan")


@dataclass
class DataConfig:
    root: str = "data/samples"  # folder that holds the shards (train-*.tar, val-*.tar, manifest.json)
    train_glob: str = "train-*.tar"  # training shards inside root (glob: ** any depth of folders; braces expanded, train-{000000..000099}.tar)
    val_glob: str = "val-*.tar"  # validation shards inside root (glob, as train_glob)
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
    crop: int = 256  # training crop size in pixels (square); best a multiple of the encoder's largest stride (else each crop is padded up to one: a warning says)
    batch_size: int = 16  # per device, per micro-step
    num_workers: int = 4  # DataLoader worker processes per device
    quality_min: int = 10  # JPEG quality range for training degradations (inclusive)
    quality_max: int = 95  # upper end of that range (inclusive): light compression too, where restore must do no harm
    quality_power: float = 0.0  # training qualities drawn with P(q) proportional to q^-quality_power over quality_min..quality_max: 0 uniform, 1 as 1/q (more heavy compression); 0..4
    rot90: bool = False  # augmentation: besides the horizontal mirror, turn each training crop by a random multiple of 90 degrees (before the JPEG degradation)
    channel_shuffle: float = 0.0  # augmentation: the share of training crops whose R, G, B planes are put in a random order (before the JPEG degradation); 0..1
    shuffle_buffer: int = 256  # samples held in each worker's shuffle buffer
    max_bad_samples: int = 100  # bad training samples (undecodable, too small, no image) tolerated in one pass over the data; one more stops the run with the count (torch: per process, as met, an unreadable or empty shard counting one; DALI: all shards, checked at start, where a tar it cannot read stops the run at once, exit 2, and an empty one is left out uncounted); -1: no limit
    val_crop: int = 256  # fixed centre crop of each validation tile
    val_qualities: List[int] = field(default_factory=lambda: [10, 20, 40])  # validation JPEG qualities
    val_max_images: int = 0  # cap on validation tiles (0: all)
    val_batch_size: int = 16  # validation batch size per device


@dataclass
class ModelConfig:
    encoder: str = "mobilenetv3_large_100"  # any timm model that supports features_only, or an hf-hub: / local-dir: one (the generator file records the architecture it resolves to and loads without that repository or folder, unless the source's config has model_args; a checkpoint folder, as --model run/checkpoints/step-N or a run folder without generator.safetensors gives, resolves the name and needs them; an hf-hub: repository other than hf-hub:timm/ whose config has model_args makes one that loads only with DIST_DEJPEG_TRUST_ENCODER=1)
    pretrained: bool = True  # ImageNet weights for the encoder (from the HF cache or encoder_weights)
    encoder_weights: str = ""  # explicit local weights file for the encoder (.safetensors/.pth); "" = cache
    init_from: str = ""  # a new run's generator starts from a trained one (generator.safetensors, run or checkpoint folder; the generator's shape keys must match; blur and keep_mean may differ): its weights replace the initial ones (no ImageNet file is read), the encoder's lineage (pretrained) is the source's; keep it while the run goes on
    encoder_depth: int = 0  # encoder stages the U-Net uses, from the first (0: all); 4 stops MobileNetV3 at stride 16
    decoder_width: int = 256  # channels of the deepest decoder block; halved per level, floor 16
    blur: bool = True  # blur after each pixel shuffle (removes checkerboard artefacts)
    self_attention: bool = True  # one self-attention block in the decoder
    attention_stride: int = 8  # output stride of the decoder block that gets self-attention (the encoder's nearest skip stride where it has no skip at this one: a warning says which)
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

    @property
    def min_size(self) -> int:
        """The smallest input side the critic takes: its stem's stride 2 and n_blocks more, to a 4 px final conv."""
        return 4 * 2 ** (self.n_blocks + 1)


# the smallest image side each LPIPS backbone's pooling leaves a pixel of (AlexNet's stride-4 stem and two 3x3/2
# pools; VGG's four 2x2 pools): config/checks.py, models/lpips.py, evaluate
LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16}


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
    w_pixel: float = 1.0  # generator loss weight of the pixel loss (loss.pixel: L1 or Charbonnier; logged as gen/l1)
    w_adv: float = 1.5  # gan phase: generator loss weight of the adversarial term
    critic_iters: int = 5  # gan phase: critic updates per cycle
    gen_iters: int = 2  # gan phase: generator updates per cycle
    val_every: int = 0  # validate every N steps (0: train.val_every)
    patience: int = 0  # gan phase: stop after this many validations without improvement of select_on's number (0: never)
    select_on: str = "auto"  # gan phase: the validation number that picks the kept (best) generator and that patience watches, averaged over data.val_qualities: "lpips" (restored LPIPS, lower is better), "psnr" (restored RGB PSNR, higher is better), "auto" (lpips when loss.lpips_pretrained, else psnr: a random-backbone LPIPS ranks generators arbitrarily)
    max_grad_norm: float = 0.0  # gradient clipping (0: off)


def default_phases() -> Dict[str, PhaseConfig]:
    return {
        "gen": PhaseConfig(kind="gen", steps=2000, lr=1e-3),
        "critic": PhaseConfig(kind="critic", steps=500, lr=1e-4, w_lpips=0.0, w_pixel=0.0),
        "gan": PhaseConfig(kind="gan", steps=2000, lr=1e-5, schedule="constant", warmup=0.0,
                           betas=[0.0, 0.9], patience=5),
    }


# train.log_with's trackers -> the package each needs (what `pip install` names; train/monitor.py checks it)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim",
                    "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio"}

# torch.compile's modes; the two with CUDA graphs need a step marker per iteration (Trainer.cudagraphs)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # everything a run writes goes here
    seed: int = 0  # base seed; each rank adds its index
    mixed_precision: str = "bf16"  # "no" | "bf16" | "fp16"
    cpu: bool = False  # force CPU even when a GPU is present
    processes: int = 1  # `dist-dejpeg train` starts this many ranks on this machine (torchrun --standalone) when no launcher did; on a CPU each gets cores/N threads; train() called from Python starts none (one process, a warning says)
    grad_accum: int = 1  # micro-steps per optimizer step
    phases: Dict[str, PhaseConfig] = field(default_factory=default_phases)  # phase name -> settings; a phase added by name (e.g. gan2, kind: gan) takes the generic defaults below, not the built-in phase of its kind's (gan: lr 1e-5, betas [0, 0.9], constant schedule, no warmup, patience 5): give those keys
    order: List[str] = field(default_factory=lambda: ["gen", "critic", "gan"])  # phases to run, in order
    log_every: int = 50  # steps between scalar logs (counted in each phase; its last step logs too)
    val_every: int = 500  # steps between validations, counted in each phase (phases may override; 0: none but the final one)
    image_every: int = 0  # steps between TensorBoard image grids, plus one at the end (0: at each validation)
    ckpt_every: int = 1000  # steps between checkpoints, counted over the run (global steps; and one at the end of every phase; 0: only those)
    keep_last: int = 3  # checkpoints kept (oldest removed first; 0: all)
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
