"""What a run's data must satisfy, said before anything is built or trained: shards that exist, tiles at least
the crop (and the validation crop) and at least one per loader slot (from prepare's manifest.json), a validation tile somewhere."""

from __future__ import annotations

import hashlib
import json
import logging
import os

from accelerate import Accelerator

from dist_dejpeg.config import Config, ConfigError, DataConfig
from dist_dejpeg.data import build_val_set, resolve_backend
from dist_dejpeg.data.folder import first_photos, photos_hint
from dist_dejpeg.data.shards import MANIFEST, list_shards, read_manifest
from dist_dejpeg.models.names import shard_fingerprint, shard_keys
from dist_dejpeg.train.collective import warn_on_main
from dist_dejpeg.train.window import sum_over_ranks

log = logging.getLogger("dist_dejpeg")


def check_shards_exist(cfg: Config) -> None:
    """A FileNotFoundError naming the pattern where data.train_glob or data.val_glob matches nothing."""
    for pattern in (cfg.data.train_glob, cfg.data.val_glob):
        try:
            list_shards(cfg.data.root, pattern)
        except FileNotFoundError as err:  # a folder of photos given as data.root: said so, with what to do
            photos = first_photos(cfg.data.root) if os.path.isdir(cfg.data.root) else []
            if photos:
                raise FileNotFoundError(f"{err}; {photos_hint(cfg.data.root, photos)}") from None
            raise


def check_train_tiles(cfg: Config, processes: int | None) -> None:
    """What the shards' manifest (prepare's) tells before the first batch: tiles smaller than the crop or the
    validation crop (which the start finds with its validation set, and a dry run would not), or fewer
    training tiles than the loader's slots (each rank's loader workers; DALI: each rank) would each need one
    (``processes`` None: not checked, where the ranks and the backend are the compute node's to know). Shards
    without a readable manifest, read through another glob, or changed since it was written are not checked here
    (the loader says it then)."""
    d = cfg.data
    try:
        manifest = read_manifest(d.root) or {}
    except (OSError, ValueError) as err:  # (cut short by a copy, or not JSON: the shards may still be fine)
        log.warning("%s/%s does not read (%s): the shards are not checked against it", d.root, MANIFEST, err)
        return
    if (d.train_glob != DataConfig().train_glob or not isinstance(manifest, dict) or not manifest
            or not describes(manifest, d.root)):
        return
    tile, count = manifest.get("tile"), (manifest.get("splits", {}).get("train") or {}).get("samples")
    if isinstance(tile, int) and tile < d.crop:
        raise ConfigError(f"config key 'data.crop': {d.crop} px, but the tiles in {d.root} are {tile} px (its "
                          f"manifest.json): lower data.crop, or prepare the photos again with --tile {d.crop} or more")
    if isinstance(tile, int) and tile < d.val_crop and d.val_glob == DataConfig().val_glob:  # (checked_val_set's)
        raise ConfigError(f"config key 'data.val_crop': {d.val_crop} px, but the tiles in {d.root} are {tile} px "
                          f"(its manifest.json; prepare cuts the val tiles as large): no validation tile to "
                          f"validate on; lower data.val_crop, or prepare the photos again with --tile {d.val_crop} "
                          f"or more")
    per = max(1, d.num_workers) if resolve_backend(d.backend) == "torch" else 1  # DALI: one reader per rank
    if processes is not None and isinstance(count, int) and count < processes * per:
        raise ConfigError(f"{d.root} holds {count} training tile(s), fewer than the {processes * per} loader slots "
                          f"that each need one ({processes} process(es) x {per} loader worker(s)): lower "
                          f"data.num_workers or train.processes, or prepare more tiles")


def describes(manifest: dict, root: str) -> bool:
    """Whether ``manifest`` still describes the training shards in ``root``: the same names and sizes (manifests
    written before prepare recorded sizes: the names). Shards added, removed or rewritten by hand would be judged by
    counts and a tile size they no longer have: a run refused that would train, or let through to fail later."""
    found = {os.path.basename(p): os.path.getsize(p) for p in list_shards(root, DataConfig().train_glob)}
    train = manifest.get("splits", {}).get("train") or {}
    sizes = train.get("bytes") or {name: found.get(name) for name in train.get("shards") or []}
    if sizes == found:
        return True
    gone = sorted(name for name in sizes if name not in found)
    changed = sorted(f"{name} ({found[name]} bytes, prepare wrote {sizes[name]})" for name in sizes
                     if name in found and sizes[name] is not None and found[name] != sizes[name])
    if gone or changed:  # a shard cut short by a copy, damaged, or deleted since prepare: its samples are lost
        log.warning("%s: training shards are not as prepare wrote them (%s): their samples are lost or damaged; "
                    "copy them again, or `dist-dejpeg prepare` again", root, "; ".join(
                        ([f"gone: {', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}"] if gone else [])
                        + ([f"other size: {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}"]
                           if changed else [])))
    else:
        log.info("%s/%s does not describe the training shards beside it (shards added since): not judging them by "
                 "it; `dist-dejpeg prepare` again to refresh it", root, MANIFEST)
    return False


def val_fingerprint(cfg: Config) -> str:
    """What the validation measures: its shards (shard_keys: file names, as older checkpoints recorded them, or
    paths in data.root where two share a name; and shard_fingerprint) and the data.val_* settings, hashed;
    "" where the shards cannot be listed. A resumed run whose fingerprint differs validates other crops, so its
    numbers from before (the gan phase's best) do not compare with those after (resume.py)."""
    d = cfg.data
    try:
        shards = {key: shard_fingerprint(p) for p, key in shard_keys(list_shards(d.root, d.val_glob), d.root).items()}
    except OSError:
        return ""
    what = [shards, d.val_crop, list(d.val_qualities), d.val_max_images]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def checked_val_set(cfg: Config, acc: Accelerator) -> dict:
    """Collective. This rank's validation crops (data.build_val_set); none on any rank (every tile smaller than
    data.val_crop, say) is a ConfigError now, not NaN metrics and a guard that cannot judge after training."""
    val_set, skipped = build_val_set(cfg, acc.process_index, acc.num_processes)
    if any(skipped.values()):  # (each rank its own share of the shards)
        log.warning("validation shards: skipped %s", ", ".join(f"{n} {why.replace('_', ' ')}"
                                                                for why, n in skipped.items() if n))
    local = next(iter(val_set.values()))[0].shape[0] if val_set else 0
    total = sum_over_ranks(acc, {"tiles": local})["tiles"]
    if total == 1:  # (every rank has the sum: said by the main one)
        warn_on_main(acc.is_main_process)("one validation tile: the gain per quality has no spread to bound it by, "
                                          "so restore's guard will pass every image through (--no-guard restores "
                                          "anyway); prepare more validation tiles")
    if not total:
        reasons = ", ".join(f"{k} {v}" for k, v in skipped.items() if v) or "the shards hold none"
        raise ConfigError(f"no validation tile to validate on in {cfg.data.root}/{cfg.data.val_glob} ({reasons}): "
                          f"data.val_crop={cfg.data.val_crop} must not exceed the val tiles' size (lower it, or "
                          f"prepare larger tiles)")
    return val_set
