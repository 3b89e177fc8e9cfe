"""Data: shards on disk -> loaders that yield the batch contract (see contract.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from dist_dejpeg.config import Config, ConfigError
from dist_dejpeg.data.folder import first_photos, photos_hint
from dist_dejpeg.data.shards import (SAMPLE_DATASET, SPLIT_FILE, list_shards, prepare_samples, read_manifest,
                                     samples_stale)
from dist_dejpeg.data.torch_loader import ShardStream, TorchLoader, load_val_set
from dist_dejpeg.run.lock import writing_into


def ensure_samples(cfg: Config) -> bool:
    """``data.auto_prepare=samples``: write the bundled sample shards into data.root if it has no training
    shards, or sample shards of an older photo list. Returns True when it wrote them. Call on one process only."""
    if cfg.data.auto_prepare != "samples":
        return False
    root = Path(cfg.data.root)

    def matched() -> bool:  # list_shards' reading of the pattern (braces expanded), as the loaders read it
        try:
            return bool(list_shards(root, cfg.data.train_glob))
        except FileNotFoundError:
            return False

    def current() -> bool:
        return matched() and not samples_stale(root)

    if current():  # (no lock taken: a read-only copy of the shards is used as it is)
        return False
    if not matched():
        refuse_foreign_folder(root, cfg.data.train_glob)  # (before the lock makes the folder)
    refuse_foreign_shards(root)
    with writing_into(root):  # the runs of an array starting at once: one writes, the others wait, then read
        if current():
            return False
        if matched():
            logging.getLogger(__name__).warning("%s holds sample shards of an older photo list: writing them again",
                                                root)
        prepare_samples(root)
    return True


def refuse_foreign_folder(root: Path, train_glob: str) -> None:
    """A ConfigError where data.root holds something the sample shards must not be written into: the user's photos
    (the run would train on the samples, and their folder get shards and a manifest among its photos), or a data
    set prepared with other names than data.train_glob matches (its manifest.json would be written over)."""
    photos = first_photos(root) if root.is_dir() else []
    if photos:
        raise ConfigError(f"config key 'data.root': {photos_hint(root, photos)} and data.auto_prepare=none; "
                          f"data.auto_prepare=samples would write the bundled sample shards among them and train on "
                          f"those")
    manifest = read_manifest(root)
    if manifest is not None and manifest.get("dataset") != SAMPLE_DATASET:
        raise ConfigError(f"config key 'data.train_glob': '{train_glob}' matches none of the shards prepared in {root} "
                          f"({manifest.get('dataset') or 'its manifest.json'}); set data.train_glob and "
                          f"data.val_glob to their names, with data.auto_prepare=none (the sample shards are not "
                          f"written over a prepared data set)")


def refuse_foreign_shards(root: Path) -> None:
    """A ConfigError where data.root holds files under prepare's shard names (train-000000.tar, their index and scan
    files) that no sample manifest there lists: shards made elsewhere, which writing the samples would replace or
    remove (publish clears every train-/val- shard of the folder). Files no preparation wrote are never written over."""
    if not root.is_dir():
        return
    manifest = read_manifest(root)
    ours = set()
    if manifest is not None and manifest.get("dataset") == SAMPLE_DATASET:
        ours = {name.removesuffix(".tar") for info in manifest.get("splits", {}).values()
                for name in info.get("shards", [])}
    foreign = sorted(p.name for p in root.iterdir() if (m := SPLIT_FILE.match(p.name)) and m["stem"] not in ours)
    if foreign:
        raise ConfigError(f"config key 'data.root': {root} holds shards the sample preparation did not write "
                          f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); data.auto_prepare=samples "
                          f"would write the sample shards over them: set data.train_glob and data.val_glob to their "
                          f"names, with data.auto_prepare=none")


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    from dist_dejpeg.data.dali import HAVE_DALI

    return "dali" if HAVE_DALI else "torch"


def build_train_loader(cfg: Config, rank: int, world: int, device: torch.device):
    """The training loader of ``data.backend``; every backend yields the same batch contract."""
    d = cfg.data
    if resolve_backend(d.backend) == "dali":
        from dist_dejpeg.data.dali import DaliLoader

        return DaliLoader(list_shards(d.root, d.train_glob), d.crop, (d.quality_min, d.quality_max), d.batch_size,
                          seed=cfg.train.seed, rank=rank, world=world, device=device, num_threads=d.dali_threads,
                          initial_fill=d.shuffle_buffer, channels_last=cfg.model.channels_last,
                          prefetch=d.dali_prefetch, max_bad_samples=d.max_bad_samples,
                          quality_power=d.quality_power, rot90=d.rot90, channel_shuffle=d.channel_shuffle)
    stream = ShardStream(list_shards(d.root, d.train_glob), d.crop, (d.quality_min, d.quality_max),
                         seed=cfg.train.seed, rank=rank, world=world, num_workers=d.num_workers,
                         shuffle_buffer=d.shuffle_buffer, max_bad_samples=d.max_bad_samples,
                         quality_power=d.quality_power, rot90=d.rot90, channel_shuffle=d.channel_shuffle)
    degrade = None
    if d.gpu_jpeg and device.type == "cuda":
        from functools import partial

        from dist_dejpeg.data.gpu_jpeg import jpeg_roundtrip_cuda

        degrade = partial(jpeg_roundtrip_cuda, pack=d.gpu_jpeg_pack)
    return TorchLoader(stream, d.batch_size, d.num_workers, device, channels_last=cfg.model.channels_last,
                       degrade_batch=degrade, prefetch_factor=d.prefetch_factor, pin_memory=d.pin_memory,
                       quality_groups=d.gpu_jpeg_qualities, run_ahead=d.gpu_jpeg_ahead)


def build_val_set(cfg: Config, rank: int, world: int):
    """This rank's validation crops; shards that data.train_glob matches too are an error (``*.tar``): validation
    would measure tiles the model trained on, and restore's guard would trust those gains."""
    d = cfg.data
    val = list_shards(d.root, d.val_glob)
    both = sorted(set(map(os.path.realpath, val)) & set(map(os.path.realpath, list_shards(d.root, d.train_glob))))
    if both:
        raise ConfigError(f"config keys 'data.train_glob'/'data.val_glob': {len(both)} shard(s) match both "
                          f"('{d.train_glob}', '{d.val_glob}'; e.g. {both[0]}): validation would measure tiles the "
                          f"model trains on; make the globs disjoint")
    return load_val_set(val, d.val_crop, list(d.val_qualities), rank, world, d.val_max_images)
