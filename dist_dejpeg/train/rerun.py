"""A finished run started again (every phase done, none reopened): which config changes it is refused, which it
takes (check_finished_run). Such a session trains nothing; it validates the generator once more and writes
metrics.json, the generator file (its guard gains, its training shards) and config.yaml, and its sessions.jsonl
line records what it changed (sessions.changed_since). Every key of config/schema.py is in one of the tables below
(tests/test_faults_checkpoint.py checks): a new key needs a deliberate place."""

from __future__ import annotations

from pathlib import Path

from dist_dejpeg.config import Config, ConfigError

# keys whose change says nothing about the run's continuity (where it writes, how it logs); train.processes: a
# launcher's ranks ignore it, and the batch check (resume._check_batch) says a real change of the process count
NOT_COMPARED = ("train.run_dir", "train.auto_resume", "train.resume_allow_batch_change", "train.log_level",
                "train.progress", "train.processes")
# keys a finished run may be started again with other values of:
# - those the start sets (build.build_accelerator: the precision a GPU has, a launcher's ZeRO stage; model.init_from's
#   encoder lineage), whose values in a checkpoint's config a command line may not have;
# - those of how a session runs on its machine, not of what trains: where the data and weight files are (data.root,
#   the LPIPS backbone files), loading (the backend, whose "auto" picks by what is installed; workers, buffers,
#   prefetching; the GPU JPEG round trip, which only a CUDA session uses), memory format and batch-norm syncing
#   (sync_bn acts with several processes only, and the process count is not compared), logging, compiling,
#   checkpointing, signals;
# - those of the final validation alone, which the rerun repeats: the validation set, crop, qualities, image count,
#   batch and metric network. Re-validating a finished run at more qualities (or on more images) is a reason to run
#   it again; what it writes (metrics.json, the generator file's guard gains, config.yaml) is that validation's, and
#   sessions.jsonl keeps the values the run trained and selected with (config_changed). The training-time choices
#   (train.val_every, a phase's val_every/patience/select_on) stay refused: they decided which weights the run kept.
NOT_REFUSED = ("train.mixed_precision", "train.deepspeed_stage", "model.pretrained", "model.encoder_weights",
               "data.root", "data.auto_prepare", "data.backend", "data.num_workers", "data.dali_threads",
               "data.prefetch_factor", "data.pin_memory", "data.dali_prefetch", "data.shuffle_buffer",
               "data.max_bad_samples", "data.gpu_jpeg", "data.gpu_jpeg_qualities", "data.gpu_jpeg_pack",
               "data.gpu_jpeg_ahead", "model.channels_last", "model.sync_bn", "loss.lpips_weights",
               "loss.metric_weights", "data.val_glob", "data.val_crop", "data.val_qualities", "data.val_max_images",
               "data.val_batch_size", "loss.metric_net", "train.cpu", "train.log_every", "train.image_every",
               "train.ckpt_every", "train.keep_last", "train.log_with", "train.dist_timeout_s", "train.compile",
               "train.compile_mode", "train.compile_cache", "train.fused_adamw", "train.sync_every",
               "train.preempt_budget_s", "train.cuda_stream")
# keys of what trained the run's weights (refused): the training data and its degradation, the architectures and
# model.init_from, the losses, the optimisation and its schedule, the EMA, and how the kept weights were chosen.
# A phase's steps: more reopen the phase (resume.longer_phases), fewer keep what it trained (not a change)
REFUSED = ("data.train_glob", "data.crop", "data.batch_size", "data.quality_min", "data.quality_max",
           "data.quality_power", "data.rot90", "data.channel_shuffle", "model.encoder", "model.init_from",
           "model.encoder_depth", "model.decoder_width", "model.blur", "model.self_attention",
           "model.attention_stride", "model.spectral_norm", "model.decoder_norm", "model.quality_conditioning",
           "model.keep_mean", "model.quality_blind_prob", "critic.width", "critic.n_blocks", "critic.dropout",
           "critic.self_attention", "loss.lpips_net", "loss.lpips_pretrained", "loss.adversarial",
           "loss.chroma_weight", "loss.pixel", "train.seed", "train.grad_accum", "train.order", "train.val_every",
           "train.ema_decay", "train.ema_warmup", "train.phases.")  # (every key of every phase)


def changes_text(changes: dict) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def check_finished_run(cfg: Config, path: Path, changes: dict, state: dict, kept: dict) -> None:
    """A finished run (every phase done, none reopened: nothing to train) started with another config is refused:
    it would train nothing but write its values into the run's config.yaml and trackers, beside weights that other
    values trained. Not counted: a phase given fewer steps than it trained (it keeps them) and the keys of
    :data:`NOT_REFUSED`. An unchanged rerun (its final validation again) goes on."""
    if int(state.get("phase_index", 0)) < len(cfg.train.order):
        return
    ignored = {f"train.phases.{name}.steps" for name in kept} | set(NOT_REFUSED)
    refused = {k: v for k, v in changes.items() if k not in ignored}
    if refused:
        raise ConfigError(f"{cfg.train.run_dir} is a finished run (every phase done, nothing to train), and this "
                          f"config changes {changes_text(refused)} since its checkpoint {path.name}: the run would "
                          f"train nothing but record these values as its own. Pick another train.run_dir to train "
                          f"with them (model.init_from={path} starts from its generator), or set them back")
