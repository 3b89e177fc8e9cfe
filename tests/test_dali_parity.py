"""The DALI loader trains on what the torch loader trains on: small sets, the same pixels, the same crop offsets
(CPU pipeline, device_id=None)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

dali = pytest.importorskip("dist_dejpeg.data.dali")
if not dali.HAVE_DALI:  # pragma: no cover - CI installs DALI with the test extra
    pytest.skip("NVIDIA DALI is not installed (pip install -e '.[test]' installs it)", allow_module_level=True)

from dist_dejpeg.data.dali import DaliLoader  # noqa: E402
from dist_dejpeg.data.images import decode_component  # noqa: E402
from dist_dejpeg.data.verify import TooFewSamples  # noqa: E402


def png(image: np.ndarray | Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, "PNG", **save)
    return buf.getvalue()


def coded_tile(side: int, ident: int) -> np.ndarray:
    """R: the column, G: the row, B: the sample's id (a crop says where it came from)."""
    tile = np.zeros((side, side, 3), np.uint8)
    tile[..., 0], tile[..., 1], tile[..., 2] = np.arange(side)[None, :], np.arange(side)[:, None], ident
    return tile


def coded_shard(write_tar, path, count: int, side: int) -> str:
    return str(write_tar(path, [(f"t{i:03d}", {"png": png(coded_tile(side, i))}) for i in range(count)]))


def ids(batch) -> list[int]:
    return [int(round(float(x) * 255)) for x in batch["clean"][:, 2, 0, 0]]


def test_a_rank_with_fewer_samples_than_a_batch_trains(tmp_path, write_tar):
    """5 tiles, batches of 8 (the torch loader trains on it): "no data in the pipeline" from DALI's iterator before.
    The stream crosses epochs as the torch loader's does: every tile in the first batch, then the next pass."""
    shard = coded_shard(write_tar, tmp_path / "train-000000.tar", 5, 40)
    batches = [b for _, b in zip(range(3), DaliLoader([shard], 32, (10, 40), 8, num_threads=1, initial_fill=1))]
    assert [b["clean"].shape[0] for b in batches] == [8, 8, 8]
    seen = sum((ids(b) for b in batches), [])
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:10]) == list(range(5)), seen


def test_more_processes_than_samples_is_said(tmp_path, write_tar):
    shard = coded_shard(write_tar, tmp_path / "train-000000.tar", 3, 40)
    with pytest.raises(TooFewSamples, match="3 usable training sample.*4 processes.*train.processes"):
        DaliLoader([shard], 32, (10, 40), 2, rank=3, world=4, num_threads=1)


def test_transparent_tiles_are_left_out_and_opaque_alpha_is_read(tmp_path, write_tar):
    """DALI's decode drops alpha; the torch loader and validation composite it on white (up to 127 levels apart on
    a half-transparent tile). A tile with transparent pixels is left out, counted, with data.backend=torch named;
    an alpha channel that is opaque everywhere reads the same pixels in both."""
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    opaque = png(np.dstack([rgb, np.full((40, 40), 255, np.uint8)]))
    samples = [("half", {"png": png(np.dstack([rgb, np.full((40, 40), 128, np.uint8)]))}),
               ("gray_alpha", {"png": png(np.dstack([rgb[..., 0], rgb[..., 1]]))}),
               ("palette", {"png": png(Image.fromarray(rgb).convert("P"), transparency=0)}),
               ("opaque", {"png": opaque})]
    shard = str(write_tar(tmp_path / "train-000000.tar", samples))
    loader = DaliLoader([shard], 40, (50, 50), 1, augment=False, num_threads=1, max_bad_samples=-1)
    assert loader.skipped()["no_image"] == 3
    crops = [out["clean"][0].numpy() for (out,) in loader._build(endless=False)]
    assert len(crops) == 1 and np.array_equal(crops[0], decode_component("png", opaque))


@pytest.mark.parametrize("fmt", ["png", "raw"])
def test_crop_offsets_are_uniform_over_whole_pixels(tmp_path, write_tar, fmt):
    """12 px tiles, 8 px crops: offsets 0..4. A uniform crop_pos in [0, 1] rounds to the two end offsets half as
    often as to the inner ones (12.5% vs 25%); the torch loader draws each 20%. 480 crops, both axes, fixed seed."""
    tiles = [coded_tile(12, i) for i in range(8)]
    shard = str(write_tar(tmp_path / "train-000000.tar", [
        (f"t{i}", {"png": png(t)} if fmt == "png" else {"raw": t.tobytes()}) for i, t in enumerate(tiles)]))
    counts = np.zeros(5, int)
    for _, batch in zip(range(60), DaliLoader([shard], 8, (50, 50), 8, seed=1, num_threads=1, initial_fill=1)):
        clean = (batch["clean"] * 255).round().int()
        counts += np.bincount(clean[:, 0].amin(dim=(1, 2)).numpy(), minlength=5)  # left (mirror or not)
        counts += np.bincount(clean[:, 1].amin(dim=(1, 2)).numpy(), minlength=5)  # top
    assert counts.sum() == 960 and len(counts) == 5, counts
    # each end offset ~192 times (the old draw: ~96 against ~256); seeds 0-7 gave end/inner ratios 0.81-1.13
    assert counts[[0, 4]].min() > 0.7 * counts[1:4].mean() and counts[1:4].max() < 1.4 * counts[[0, 4]].mean(), counts


def test_an_exif_orientation_in_a_tile_is_read_as_stored_by_both_backends(tmp_path, write_tar):
    """DALI's decoder turned a tile by its EXIF orientation (its default) where the torch loader and validation read
    it as stored: a tagged 40 x 56 tile was trained on sideways under data.backend=dali. Both read it as stored."""
    from dist_dejpeg.data.torch_loader import load_val_set

    tile = np.zeros((40, 56, 3), np.uint8)
    tile[..., 0], tile[..., 1] = np.arange(56)[None, :] * 4, np.arange(40)[:, None] * 5  # R: column, G: row
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees to display
    coded = {"png": png(tile, exif=exif)}
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, "JPEG", quality=100, exif=exif)
    shard = str(write_tar(tmp_path / "val-000000.tar", [("t_png", coded), ("t_jpg", {"jpg": buf.getvalue()})]))
    dali_crops = [out["clean"][0].numpy() for (out,) in DaliLoader(
        [shard], 32, (50, 50), 1, augment=False, num_threads=1)._build(endless=False)]
    sets, _ = load_val_set([shard], 32, [50])
    torch_crops = [c.permute(1, 2, 0).numpy() for c in sets[50][1]]
    assert np.array_equal(dali_crops[0], tile[4:36, 12:44]) and np.array_equal(torch_crops[0], tile[4:36, 12:44])
    assert np.abs(dali_crops[1].astype(int) - torch_crops[1]).max() <= 1  # (the JPEG: decoders round apart)
    for _, batch in zip(range(4), DaliLoader([shard], 32, (50, 50), 2, seed=1, num_threads=1, initial_fill=1)):
        green = (batch["clean"][:, 1] * 255).round().int()  # training crops: G constant along each row as stored
        assert (green.amax(dim=2) - green.amin(dim=2)).max() <= 8, green[:, 0]  # (the JPEG's noise; turned: 155)
