"""The DALI data path: sharded WebDataset reader, decode (GPU when there is one), random crop and mirror
(a turn by a random multiple of 90 degrees with ``data.rot90``, RGB planes in a random order with
``data.channel_shuffle``), JPEG degradation at a per-sample random quality (uniform, or weighted by
``data.quality_power`` as in the torch loader), the batch contract.

    data.backend=dali   (or auto: DALI when it imports, torch otherwise)

On a GPU the image decode runs ``mixed`` (nvJPEG / nvJPEG2000; PNG decodes on the CPU inside DALI; raw tiles
need no decode) and crop, mirror and ``jpeg_compression_distortion`` run on the GPU; with ``device_id=None`` everything runs on the CPU
(CI, laptops). The reader is sharded by rank (``shard_id``/``num_shards``), shuffles within
``initial_fill`` samples (shards are shuffled at prepare time) and streams across epochs as the torch loader
does: a batch that crosses the end of a pass takes the rest from the next, so a rank with fewer samples than a
batch still trains, and no sample is dropped at an epoch's end.

Resume: DALI's stream is not resumed sample-exactly (the torch loader is). After a resume the reader
starts a new pass with a seed derived from the number of batches already consumed, so a resumed run does
not replay the batches it has seen; models, optimizers and RNG are restored exactly as with any backend.
Validation does not go through DALI: both backends share the same fixed validation set.

Orientation: a tile is read as stored, an EXIF orientation tag in it ignored (DALI applies it by default:
``adjust_orientation=False`` here), as the torch loader, validation and evaluate's shard references read it.
prepare writes every tile upright (a photo's EXIF orientation applied before tiling) and with no tag, so its
shards read the same either way; a tagged tile in a shard made elsewhere is trained on as stored by both backends.

Bad samples: DALI cannot skip a sample it fails on (one truncated PNG or one tile smaller than the crop ends
its pipeline), so the loader checks every sample once before the first batch (data/verify.py, cached beside
each shard) and leaves the bad ones out of the index files the reader gets; they are counted like the torch
loader's skips, and more than ``data.max_bad_samples`` stops the run on every rank with the count.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dist_dejpeg.data.index import check_indexes
from dist_dejpeg.data.contract import quality_weights, to_device
from dist_dejpeg.data.verify import (SKIP_REASONS, TooFewSamples, dali_usable, over_limit, raw_side, scan_shards,
                                     too_many, unreadable, write_index)
from dist_dejpeg.jpeg.formats import ENCODED_SHARD_EXTS


try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    HAVE_DALI = True
except ImportError:  # pragma: no cover - exercised where DALI is not installed
    HAVE_DALI = False

EXTENSIONS = ";".join(ENCODED_SHARD_EXTS)  # one output: whichever encoded image a sample has
log = logging.getLogger(__name__)


def first_unreadable_tar(shards: list[str]) -> tuple[str, str] | None:
    """(path, reason) of the first shard whose tar structure is broken (truncated, corrupt), or None."""
    import tarfile

    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.isfile() and member.offset_data + member.size > Path(shard).stat().st_size:
                        return shard, "truncated"
        except (tarfile.TarError, OSError) as err:
            return shard, f"{type(err).__name__}: {err}"
    return None


if HAVE_DALI:

    def rotate90(images, angle):
        """``images`` (square, HWC) turned by ``angle`` degrees, a per-sample multiple of 90: exact (nearest
        neighbour on a square keeps every pixel), counter-clockwise as np.rot90 with k = angle / 90."""
        return fn.rotate(images, angle=angle, interp_type=types.INTERP_NN, keep_size=True)

    def crop_position(size, crop):
        """A crop's relative position (DALI's crop_pos, whose offset is round(pos * (size - crop))) for an offset drawn
        uniformly from the size - crop + 1 whole ones, as the torch loader draws it: a uniform pos would give the
        two end offsets half a step each, half as often as the others. ``size``: an int or a per-sample node."""
        fixed = isinstance(size, int)
        span = float(size - crop) if fixed else fn.cast(size, dtype=types.FLOAT) - crop
        offset = dmath.min(dmath.floor(fn.random.uniform(range=(0.0, 1.0)) * (span + 1)), span)  # (u < 1: a guard)
        return offset / (max(span, 1.0) if fixed else dmath.max(span, 1.0))

    def train_quality(quality_range, quality_power):
        """A per-sample training quality: uniform over the range (quality_power 0, the draws of earlier runs), or
        weighted as the torch loader draws it (contract.quality_weights)."""
        if quality_power == 0:
            return fn.random.uniform(values=list(range(quality_range[0], quality_range[1] + 1)), dtype=types.INT32)
        values, p = quality_weights(*quality_range, quality_power)
        return fn.random.choice(values.astype(np.int32), p=p.tolist())

    def degrade_graph(paths, index_paths, crop, quality_range, shard_id, num_shards, initial_fill, gpu, augment=True,
                      raw_tile=0, quality_power=0.0, rot90=False, channel_shuffle=0.0):
        """The pipeline graph (wrapped once by ``pipeline_def`` below). ``raw_tile``: the shards hold
        uncompressed square tiles of that side (no decode), else encoded images. ``quality_power``, ``rot90``,
        ``channel_shuffle``: the data config's options (off: the graph, and so every draw, of runs before they
        existed)."""
        encoded = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=["raw" if raw_tile else EXTENSIONS],
            missing_component_behavior="skip", shard_id=shard_id, num_shards=num_shards, random_shuffle=augment,
            initial_fill=initial_fill, name="Reader")
        if raw_tile:
            images = fn.reshape(encoded, shape=[raw_tile, raw_tile, 3], layout="HWC")
            images = images.gpu() if gpu else images
        else:
            # pixels as stored: an EXIF orientation in a tile is not applied (DALI's default), as the torch
            # loader and validation read it (module docstring)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       adjust_orientation=False)
        if augment:
            # One pass for crop + horizontal mirror (a separate fn.flip costs a full copy per crop); any
            # pixel offset, so the crop's phase within the 8x8 JPEG grid of the source varies too.
            shape = [raw_tile, raw_tile] if raw_tile else fn.peek_image_shape(  # H, W (, C) as stored, as decoded
                encoded, adjust_orientation=False)
            clean = fn.crop_mirror_normalize(images, crop=(crop, crop), crop_pos_x=crop_position(shape[1], crop),
                                             crop_pos_y=crop_position(shape[0], crop),
                                             mirror=fn.random.coin_flip(), dtype=types.UINT8, output_layout="HWC")
            quality = train_quality(quality_range, quality_power)
            if rot90:  # before the degradation: the crop's own 8x8 JPEG grid is unaffected
                clean = rotate90(clean, fn.random.choice([0.0, 90.0, 180.0, 270.0]))
            if channel_shuffle:
                clean = shuffle_channels(clean, channel_shuffle)
        else:
            clean = fn.crop(images, crop=(crop, crop))  # centred, for tests of the reader's sharding
            quality = fn.random.uniform(values=[quality_range[0]], dtype=types.INT32)
        jpeg = fn.jpeg_compression_distortion(clean, quality=quality)
        # uint8 HWC out: the float conversion runs in torch on the training device (4x less to copy)
        return jpeg, clean, quality

    def shuffle_channels(images, share):
        """``images`` (HWC) with their RGB planes in one of the 6 orders (the same one included) drawn for a
        ``share`` of the samples; the others unchanged. The order is a per-sample permutation matrix applied to
        each pixel's channels (``fn.coord_transform``: exact on uint8)."""
        orders = [np.eye(3, dtype=np.float32)[list(p)] for p in itertools.permutations(range(3))]  # [0]: same
        p = [1 - share + share / len(orders)] + [share / len(orders)] * (len(orders) - 1)
        pick = fn.random.choice(list(range(len(orders))), p=p)
        matrix = sum(fn.cast(pick == k, dtype=types.FLOAT) * types.Constant(m) for k, m in enumerate(orders))
        return fn.coord_transform(images, M=matrix, dtype=types.UINT8)

    degrade_pipeline = pipeline_def(degrade_graph)


class DaliLoader:
    """Iterates contract batches from a DALI pipeline; restarts epochs forever."""

    def __init__(self, shards: list[str], crop: int, quality_range: tuple[int, int], batch_size: int, *,
                 seed: int = 0, rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu"),
                 num_threads: int = 2, initial_fill: int = 256, channels_last: bool = False, augment: bool = True,
                 raw_tile: int | None = None, prefetch: int = 2, max_bad_samples: int | None = None,
                 quality_power: float = 0.0, rot90: bool = False, channel_shuffle: float = 0.0):
        if not HAVE_DALI:
            raise ImportError("data.backend=dali needs NVIDIA DALI: pip install -e '.[dali]' "
                              "(or data.backend=torch)")
        self.shards = sorted(shards)
        self.index_paths = check_indexes(self.shards, say=rank == 0)  # (every rank checks every shard)
        self.crop, self.quality_range, self.batch_size = crop, quality_range, batch_size
        self.seed, self.rank, self.world, self.device = seed, rank, world, device
        # DALI's shuffling reader crashes the process (a segfault) with initial_fill 0; 1 shuffles nothing, as
        # data.shuffle_buffer 0 does in the torch loader
        self.num_threads, self.initial_fill = num_threads, max(1, initial_fill)
        self.channels_last, self.augment, self.raw_tile = channels_last, augment, raw_tile
        self.prefetch = prefetch  # DALI's prefetch_queue_depth: batches the pipeline runs ahead
        self.quality_power, self.rot90, self.channel_shuffle = quality_power, rot90, channel_shuffle
        self.consumed = 0
        self.bad = self._leave_out_bad_samples(max_bad_samples)

    def _leave_out_bad_samples(self, limit: int | None) -> dict[str, int]:
        """Check every sample once (data/verify.py: DALI cannot skip one it fails on); bad ones are counted and
        left out of the index files the reader gets, which are written from the scan where a sample is bad or the
        shards have no current set of their own. Over ``limit`` (or none usable): an error, on every rank."""
        scans = scan_shards(self.shards, self.num_threads)
        if self.raw_tile is None:  # as the shards hold them, not as a manifest says (shards changed by hand since)
            self.raw_tile = raw_side(scans)
        usable = dali_usable(scans, self.crop, self.raw_tile)
        if usable.broken:
            raise unreadable(*usable.broken)
        if over_limit(usable.bad, limit):
            raise too_many(usable.bad, usable.counts, usable.examples, limit, f"in {len(self.shards)} shards")
        if usable.good == 0:
            raise RuntimeError(f"all {usable.bad} samples of the {len(self.shards)} shards were skipped "
                               f"({usable.counts}); e.g. {usable.examples[0] if usable.examples else ''}")
        if usable.good < self.world:  # DALI's reader fails on a rank with none ("pipeline object is no longer valid")
            raise TooFewSamples(f"{usable.good} usable training sample(s) in {len(self.shards)} shards for "
                                f"{self.world} processes, which need one each: lower train.processes, or prepare "
                                f"more tiles" + (f" (left out: {usable.counts})" if usable.bad else ""))
        if usable.bad:  # (every rank scans every shard: rank 0 says it)
            (log.warning if self.rank == 0 else log.debug)("DALI loader: leaving out %d bad samples %s; e.g. %s",
                                                           usable.bad, usable.counts, "; ".join(usable.examples[:3]))
        if usable.bad or self.index_paths is None or not all(usable.samples.values()):  # (an empty tar: left out)
            folder = Path(tempfile.mkdtemp(prefix="dist-dejpeg-idx-"))
            weakref.finalize(self, shutil.rmtree, folder, True)
            self.shards = [s for s in self.shards if usable.samples[s]]  # DALI refuses an empty index
            self.index_paths = []
            for i, shard in enumerate(self.shards):
                self.index_paths.append(str(folder / f"{i:06d}.idx"))
                write_index(Path(self.index_paths[-1]), usable.samples[shard])
        return usable.counts

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "backend": "dali"}

    def load_state_dict(self, state: dict) -> None:
        """The batch count the reader's seed derives from: the highest any rank saved (``state["every_rank"]``,
        train/checkpoint.py's), so a rank the checkpoint had not (more processes now) starts no seed already used."""
        self.consumed = max(int(s.get("consumed", 0)) for s in state.get("every_rank") or [state])

    def skipped(self) -> dict[str, int]:
        """Bad samples left out of the data set, on rank 0 only (every rank counts all shards; the trainer sums
        over ranks). Counted once, not at every epoch as the torch loader counts the samples it meets."""
        return dict(self.bad) if self.rank == 0 else dict.fromkeys(SKIP_REASONS, 0)

    def _build(self, endless: bool = True):
        """The pipeline's iterator. ``endless``: one stream across epochs, as the torch loader's (a batch that
        crosses an epoch's end takes the rest from the next pass; a rank with fewer samples than a batch still
        fills one). Else one pass of this rank's reader shard, its partial last batch dropped (tests)."""
        gpu = self.device.type == "cuda"
        pipe = degrade_pipeline(
            paths=self.shards, index_paths=self.index_paths or [], crop=self.crop, quality_range=self.quality_range,
            shard_id=self.rank, num_shards=self.world, initial_fill=self.initial_fill, gpu=gpu, augment=self.augment,
            raw_tile=self.raw_tile, quality_power=self.quality_power, rot90=self.rot90,
            channel_shuffle=self.channel_shuffle,
            batch_size=self.batch_size, num_threads=self.num_threads, prefetch_queue_depth=self.prefetch,
            device_id=(self.device.index or 0) if gpu else None,
            seed=(self.seed * 1_000_003 + self.rank * 7_919 + self.consumed) % (2**31 - 1))
        try:
            pipe.build()
        except RuntimeError as err:
            bad = first_unreadable_tar(self.shards)
            said = str(err).strip().splitlines()[-1][:300]
            if bad:
                raise unreadable(*bad, f"; DALI said: {said}") from None
            raise RuntimeError(f"DALI could not read the shards: no tar was found unreadable by Python's tarfile. "
                               f"DALI said: {said}") from None
        if endless:  # size -1, no reader_name: DALI does not size epochs, the reader wraps round at the end of each
            return DALIGenericIterator(pipe, ["jpeg", "clean", "quality"])
        return DALIGenericIterator(pipe, ["jpeg", "clean", "quality"], reader_name="Reader",
                                   last_batch_policy=LastBatchPolicy.DROP)

    def __iter__(self) -> Iterator[dict]:
        for (out,) in self._build():
            self.consumed += 1
            yield to_device({"jpeg": out["jpeg"].permute(0, 3, 1, 2), "clean": out["clean"].permute(0, 3, 1, 2),
                             "quality": out["quality"].reshape(-1)}, self.device, self.channels_last)
