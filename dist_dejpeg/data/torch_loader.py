"""The PyTorch data path: webdataset + PIL in DataLoader workers, yielding the batch contract.

    batch = {"jpeg": N x 3 x H x W float [0,1], "clean": same, "quality": N int64}   on the device

Sharding: every (rank, worker) pair is a *slot*. Each epoch the shard list is shuffled with a seed shared by all
ranks, then dealt to slots (whole shards when there are at least as many shards as slots, otherwise every slot keeps
every n-th sample of all shards, reading only those: data/reading.py), so within an epoch no sample is seen twice.

Exact resume: a sample's crop, mirror, JPEG quality (and turn, channel order, with ``rot90``, ``channel_shuffle``)
come from an RNG seeded by (seed, epoch, slot, position), not from a running generator, and each batch carries its
slot's stream position. The loader's ``state_dict()`` records the position after the last batch the trainer took;
on resume every slot skips to it without decoding, and the slot played by DataLoader worker 0 is rotated so
batches come in the same order as in an uninterrupted run. (Same ranks, workers and shards, by name and size,
required; otherwise it restarts the stream at the epoch after the newest any rank saved: fresh seeds, not the
run's first batches again.)

Batch-level degradation (``degrade_batch``, the GPU path: nvJPEG): workers send clean crops and the batch is
degraded on the device. nvJPEG's encoder takes one quality per call, so each distinct quality in a batch costs a
round trip (two for the 4:2:0 rebuild): ``quality_groups`` K > 0 draws K qualities per batch (as the workers draw
them, see contract.draw_quality, from an RNG seeded by the batch's index: exact on resume) and deals them to the
samples in turn, so every sample's quality still has the workers' distribution while a batch needs at most K round
trips. ``run_ahead`` R > 0 degrades up to R batches ahead in a background thread, on its own CUDA stream, so the
round trips overlap the training step instead of adding to it; the loader's state still counts only the batches the
trainer took.

Orientation: a tile is decoded as stored, an EXIF orientation tag in it not applied (decode_component), in training
and validation alike, and by the DALI loader too (data/dali.py); prepare writes tiles upright and untagged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_dejpeg.data.images import BadImage, center_crop, decode_component, image_bytes, jpeg_roundtrip
from dist_dejpeg.data.contract import draw_quality, to_device
from dist_dejpeg.data.reading import (EMPTY, dealt_samples, legacy_shard_list_digest, shard_list_digest,  # noqa: F401
                                      shard_samples)
from dist_dejpeg.data.verify import EXAMPLES, SKIP_REASONS, TooFewSamples, over_limit, too_many
from dist_dejpeg.data.workers import ignore_stop_signals, stop_cleanly

log = logging.getLogger(__name__)

_MAX_WARNINGS = 20  # per slot; counts keep going after the log stops


class ShardStream(IterableDataset):
    """Endless (or ``epochs``-long) stream of degraded/clean crops from one rank's slots (``quality_power``: see
    contract.draw_quality; ``rot90``: each crop also turned by a random multiple of 90 degrees;
    ``channel_shuffle``: the share of crops whose RGB planes are put in a random order)."""

    def __init__(self, shards: list[str], crop: int, quality_range: tuple[int, int], seed: int = 0,
                 rank: int = 0, world: int = 1, num_workers: int = 0, shuffle_buffer: int = 256,
                 epochs: int | None = None, max_bad_samples: int | None = None, quality_power: float = 0.0,
                 rot90: bool = False, channel_shuffle: float = 0.0):
        self.shards = sorted(shards)
        self.digest = shard_list_digest(self.shards)
        self.crop = crop
        self.qmin, self.qmax = quality_range
        self.quality_power, self.rot90, self.channel_shuffle = quality_power, rot90, channel_shuffle
        self.seed, self.rank, self.world = seed, rank, world
        self.n_local = max(num_workers, 1)
        self.shuffle_buffer = shuffle_buffer
        self.epochs = epochs
        self.degrade = True  # False (set by TorchLoader): the consumer degrades whole batches; no "jpeg" key
        self.start: dict[int, tuple[int, int]] = {}  # local slot -> (epoch, position) to resume from
        self.rotation = 0  # DataLoader worker w plays local slot (w + rotation) % n_local
        # One row per worker, so workers never race; shared memory so the main process can read it.
        self.skipped = torch.zeros(self.n_local, len(SKIP_REASONS), dtype=torch.int64).share_memory_()
        # The limit is on the bad samples met in one pass (epoch, count per row), not on a total that grows each epoch
        self.max_bad_samples = max_bad_samples
        self.epoch_bad = torch.zeros(self.n_local, 2, dtype=torch.int64).share_memory_()
        self.examples: list[str] = []  # this process's first reasons, quoted when the limit stops the run

    # -- the raw (undecoded) stream of one slot in one epoch -------------------------------------------
    def _dealt(self, epoch: int, slot: int, n_slots: int) -> list[str]:
        """The shards ``slot`` reads in ``epoch``: whole ones, or (fewer shards than slots) all, sample by sample."""
        shards = list(self.shards)
        random.Random(f"{self.seed}-shards-{epoch}").shuffle(shards)
        return shards[slot::n_slots] if len(shards) >= n_slots else shards

    def _epoch_raw(self, epoch: int, slot: int, n_slots: int, row: int) -> Iterator[dict]:
        shards = self._dealt(epoch, slot, n_slots)

        def report(shard: str, reason: str) -> None:  # (an empty tar is bad data too: whole shards, a slot's only one)
            self._count(row, "bad_tar", f"no samples in {shard} (an empty tar)" if reason == EMPTY
                        else f"unreadable tar data in {shard} ({reason})")

        whole = len(self.shards) >= n_slots
        raw = shard_samples(shards, report, empty=True) if whole else dealt_samples(shards, n_slots, slot, report)
        rng = random.Random(f"{self.seed}-buffer-{epoch}-{slot}")
        return wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 64), rng=rng)(iter(raw))

    def _count(self, row: int, reason: str, message: str) -> None:
        self.skipped[row, SKIP_REASONS.index(reason)] += 1
        if int(self.skipped[row].sum()) <= _MAX_WARNINGS:
            log.warning("skipping sample: %s", message)
        if len(self.examples) < EXAMPLES:
            self.examples.append(message)
        self.epoch_bad[row, 1] += 1
        epoch = self.epoch_bad[row, 0]
        in_pass = int(self.epoch_bad[self.epoch_bad[:, 0] == epoch, 1].sum())  # this rank's workers, this epoch
        if over_limit(in_pass, self.max_bad_samples):
            counts = dict(zip(SKIP_REASONS, (int(c) for c in self.skipped.sum(dim=0).tolist())))
            raise too_many(in_pass, counts, self.examples, self.max_bad_samples,
                           f"met in epoch {int(epoch)} by rank {self.rank}") from None

    def _make(self, raw: dict, epoch: int, slot: int, pos: int, row: int) -> dict | None:
        where = f"{raw.get('__key__')} in {raw.get('__url__')}"
        found = image_bytes(raw)
        if found is None:
            self._count(row, "no_image", f"{where}: no image component (has {sorted(k for k in raw if not k.startswith('__'))})")
            return None
        try:
            rgb = decode_component(*found)
        except BadImage as err:
            self._count(row, "corrupt", f"{where}: {err}")
            return None
        h, w = rgb.shape[:2]
        if h < self.crop or w < self.crop:
            self._count(row, "too_small", f"{where}: {w}x{h} is smaller than the {self.crop} px crop")
            return None
        rng = np.random.default_rng([self.seed, epoch, slot, pos])
        top, left = int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1))
        clean = rgb[top:top + self.crop, left:left + self.crop]
        if rng.random() < 0.5:  # horizontal mirror (photos have an up: turning them is the rot90 option)
            clean = clean[:, ::-1]
        quality = int(draw_quality(rng, self.qmin, self.qmax, self.quality_power))
        if self.rot90:  # drawn last, so that without it every sample draws as before
            clean = np.rot90(clean, int(rng.integers(4)))  # square crop; JPEG's 8x8 grid comes after
        if self.channel_shuffle and rng.random() < self.channel_shuffle:  # after the others, likewise
            clean = clean[:, :, rng.permutation(3)]  # one of the 6 orders (the same one included)
        clean = np.array(clean)  # a writable, contiguous copy
        sample = {"clean": torch.from_numpy(clean).permute(2, 0, 1), "quality": quality}
        if self.degrade:
            sample["jpeg"] = torch.from_numpy(jpeg_roundtrip(clean, quality)).permute(2, 0, 1)
        return sample

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        local = (worker + self.rotation) % self.n_local
        slot, n_slots = self.rank * self.n_local + local, self.world * self.n_local
        epoch, skip = self.start.get(local, (0, 0))
        dry: set[str] = set()  # the shards of the slot's latest epochs in a row that gave it no sample
        while self.epochs is None or epoch < self.epochs:
            seen = made = 0
            self.epoch_bad[worker] = torch.tensor([epoch, 0])
            for pos, raw in enumerate(self._epoch_raw(epoch, slot, n_slots, worker)):
                seen += 1
                if pos < skip:
                    continue
                sample = self._make(raw, epoch, slot, pos, worker)
                if sample is not None:
                    made += 1
                    sample.update(_slot=local, _epoch=epoch, _next=pos + 1)
                    yield sample
            if made == 0 and (seen == 0 or seen > skip):
                self._no_samples(epoch, slot, n_slots, seen - skip, worker, dry)
            else:
                dry.clear()
            epoch, skip = epoch + 1, 0

    def _no_samples(self, epoch: int, slot: int, n_slots: int, tried: int, row: int, dry: set[str]) -> None:
        """Slot ``slot`` made no sample in ``epoch`` (``tried``: how many it skipped; <= 0: it read none). Whole
        shards: the next epoch deals it others (its bad ones counted as they were met, against
        data.max_bad_samples), so it goes on, deterministically (exact resume holds), until its epochs in a row
        without a sample have dealt it every shard (``dry``). Shared shards: every epoch, as fewer samples than
        slots, or every one bad, would be the same."""
        dealt = self._dealt(epoch, slot, n_slots)
        dry.update(dealt)
        if len(dry) < len(self.shards):
            say = log.warning if int(self.skipped[row].sum()) <= _MAX_WARNINGS else log.debug  # (as _count's)
            say("data slot %d of %d got no usable sample in epoch %d from %s (bad data, counted): going on with "
                "epoch %d", slot, n_slots, epoch, ", ".join(map(os.path.basename, dealt)), epoch + 1)
            return
        if tried <= 0:
            why = (f"its shards could not be read (e.g. {self.examples[-1]})" if self.epoch_bad[row, 1]
                   else f"fewer samples than ranks x workers ({len(self.shards)} shards)")
            since = "" if len(dealt) == len(self.shards) else " (nor from any other shard in the epochs before it)"
            raise TooFewSamples(f"data slot {slot} of {n_slots} got no samples in epoch {epoch}{since}: {why}")
        counts = dict(zip(SKIP_REASONS, (int(c) for c in self.skipped[row].tolist())))
        raise TooFewSamples(f"data slot {slot} of {n_slots}: all {tried} samples of epoch {epoch} were "
                            f"skipped ({counts}); e.g. tiles smaller than the {self.crop} px crop")


class TorchLoader:
    """Iterates contract batches on ``device``; ``state_dict``/``load_state_dict`` for exact resume.
    ``degrade_batch(clean_u8, quality) -> jpeg_u8``: JPEG-degrade whole batches on ``device`` (e.g. with
    nvJPEG) instead of per sample in the workers."""

    def __init__(self, stream: ShardStream, batch_size: int, num_workers: int, device: torch.device,
                 channels_last: bool = False, degrade_batch=None, prefetch_factor: int = 4, pin_memory: bool = True,
                 quality_groups: int = 0, run_ahead: int = 0):
        self.stream, self.batch_size, self.num_workers = stream, batch_size, num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.device, self.channels_last = device, channels_last
        self.degrade_batch = degrade_batch
        self.quality_groups, self.run_ahead = quality_groups, run_ahead
        stream.degrade = degrade_batch is None
        self.consumed = 0  # batches handed to the trainer, over the whole run
        self.positions: dict[int, tuple[int, int]] = {}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "positions": {str(k): list(v) for k, v in self.positions.items()},
                "num_workers": self.num_workers, "world": self.stream.world, "rank": self.stream.rank,
                "shards": [len(self.stream.shards), self.stream.digest]}

    def load_state_dict(self, state: dict) -> None:
        """Resume where ``state`` (this rank's) left off; where it cannot (other ranks, workers or shards), restart
        the stream at the epoch after the newest that any rank's saved state reached (``state["every_rank"]``,
        train/checkpoint.py's; else ``state`` alone), at its batch count, every rank alike: new shuffles, crops,
        qualities and turns, where epoch 0 replayed the run's first batches."""
        saved = state.get("every_rank") or [state]
        epoch = 1 + max((int(p[0]) for s in saved for p in (s.get("positions") or {}).values()), default=-1)
        restart = (f"restarting the data stream at epoch {epoch} (after the newest any rank saved: new shuffles and "
                   f"crops, not the run's first batches again) instead of resuming it exactly")
        warn = log.warning if self.stream.rank == 0 else log.debug  # (every rank finds the same: said once)
        if state.get("num_workers") != self.num_workers or state.get("world") != self.stream.world:
            warn("data loader state was saved with %s workers x %s ranks, now %s x %s: %s",
                 state.get("num_workers"), state.get("world"), self.num_workers, self.stream.world, restart)
            return self._restart(epoch, max(int(s.get("consumed", 0)) for s in saved))
        count, digest = state.get("shards") or (len(self.stream.shards), self.stream.digest)  # older: unchecked
        if digest != self.stream.digest and digest != legacy_shard_list_digest(self.stream.shards):
            # another sample at each position: resuming would replay and skip samples
            warn("the training shards changed since the data loader's state was saved over %d training "
                 "shards, now %d%s: %s", count, len(self.stream.shards),
                 " (as many, but others or of other sizes)" if count == len(self.stream.shards) else "", restart)
            return self._restart(epoch, max(int(s.get("consumed", 0)) for s in saved))
        self.consumed = int(state["consumed"])
        self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in state["positions"].items()}

    def _restart(self, epoch: int, consumed: int) -> None:
        """Every slot from the start of ``epoch``; the batch count (the quality groups' seed) goes on from
        ``consumed``."""
        self.consumed = consumed
        self.positions = {local: (epoch, 0) for local in range(self.stream.n_local)}

    def skipped(self) -> dict[str, int]:
        totals = self.stream.skipped.sum(dim=0).tolist()
        return dict(zip(SKIP_REASONS, (int(t) for t in totals)))

    def __iter__(self) -> Iterator[dict]:
        self.stream.start = dict(self.positions)
        self.stream.rotation = self.consumed % max(self.num_workers, 1)
        # Its own generator: starting the workers must not draw from the global torch RNG, which a
        # checkpoint restores (the draw would shift dropout masks after a resume).
        loader = DataLoader(self.stream, batch_size=self.batch_size, num_workers=self.num_workers,
                            pin_memory=self.pin_memory and self.device.type == "cuda", persistent_workers=False,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            generator=torch.Generator().manual_seed(self.stream.seed),
                            worker_init_fn=ignore_stop_signals)
        batches = stop_cleanly(iter(loader))  # the worker processes start here, in the main thread
        if self.degrade_batch is None:
            for batch in batches:
                self._took(batch)
                yield to_device(batch, self.device, self.channels_last)
            return
        index = self.consumed
        if self.run_ahead <= 0:
            for batch in batches:
                jpeg = self._degrade(batch, index)
                index += 1
                self._took(batch)
                yield to_device(jpeg, self.device, self.channels_last)
            return
        yield from self._ahead(batches, index)

    def _took(self, batch: dict) -> None:
        """The trainer takes ``batch``: the state moves past it."""
        slot, epoch, nxt = int(batch["_slot"][-1]), int(batch["_epoch"][-1]), int(batch["_next"][-1])
        self.positions[slot] = (epoch, nxt)
        self.consumed += 1

    def _degrade(self, batch: dict, index: int) -> dict:
        """The batch with its clean crops on the device and degraded there (qualities grouped, see the module
        docstring); still uint8."""
        quality = batch["quality"]
        if self.quality_groups > 0:
            rng = np.random.default_rng([self.stream.seed, self.stream.rank, index, 7])
            levels = draw_quality(rng, self.stream.qmin, self.stream.qmax, self.stream.quality_power,
                                  size=self.quality_groups)
            quality = torch.as_tensor(levels[np.arange(len(quality)) % self.quality_groups], dtype=torch.int64)
        clean = batch["clean"].to(self.device, non_blocking=True)
        jpeg = self.degrade_batch(clean, quality)
        if self.device.type == "cuda":
            # here, not in to_device: in the degrade-ahead thread this copy from pageable memory waits for the
            # thread's own stream only, and no page-locked memory is allocated per batch (pin_memory), which an
            # H100 check suggests can wait for the whole device
            quality = quality.to(self.device)
        return dict(batch, clean=clean, quality=quality, jpeg=jpeg)

    def _ahead(self, batches: Iterator[dict], index: int) -> Iterator[dict]:
        """Degrade up to ``run_ahead`` batches ahead in a thread (its own CUDA stream on a GPU)."""
        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None
        ready: queue.Queue = queue.Queue(maxsize=self.run_ahead)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            i = index
            try:
                with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                    for batch in batches:
                        out = self._degrade(batch, i)
                        i += 1
                        event = None
                        if cuda:
                            event = torch.cuda.Event()
                            event.record(side)
                        if not put(("batch", out, event)):
                            return
                put(("end", None, None))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
                put(("error", err, None))

        thread = threading.Thread(target=work, name="degrade-ahead", daemon=True)
        thread.start()
        try:
            while True:
                kind, out, event = ready.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise out
                if event is not None:  # the device waits for the side stream; the host does not
                    main = torch.cuda.current_stream(self.device)
                    main.wait_event(event)
                    for key in ("clean", "jpeg", "quality"):
                        out[key].record_stream(main)
                self._took(out)
                yield to_device(out, self.device, self.channels_last)
        finally:
            stop.set()
            thread.join(timeout=10)


def load_val_set(shards: list[str], crop: int, qualities: list[int], rank: int = 0, world: int = 1,
                 max_images: int = 0) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], dict[str, int]]:
    """Fixed validation crops: the centre ``crop`` of each val tile (tiles i with i % world == rank),
    JPEG-degraded at each quality. Returns {quality: (jpeg uint8, clean uint8)} and skip counts."""
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    clean = []
    index = 0

    def report(shard: str, reason: str) -> None:
        skipped["bad_tar"] += 1
        log.warning("validation shard %s: unreadable tar data (%s); using what came before it", shard, reason)

    for raw in shard_samples(sorted(shards), report):
        if max_images and index >= max_images:
            break
        found = image_bytes(raw)
        try:
            if found is None:
                raise KeyError
            rgb = decode_component(*found)
        except KeyError:
            skipped["no_image"] += 1
            continue
        except BadImage as err:
            log.warning("skipping val sample %s: %s", raw.get("__key__"), err)
            skipped["corrupt"] += 1
            continue
        if min(rgb.shape[:2]) < crop:
            skipped["too_small"] += 1
            continue
        if index % world == rank:
            clean.append(np.ascontiguousarray(center_crop(rgb, crop)))
        index += 1
    out = {}
    for q in qualities:
        jpeg = [jpeg_roundtrip(c, q) for c in clean]
        out[q] = (_stack(jpeg, crop), _stack(clean, crop))
    return out, skipped


def _stack(images: list[np.ndarray], crop: int) -> torch.Tensor:
    if not images:
        return torch.zeros(0, 3, crop, crop, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
