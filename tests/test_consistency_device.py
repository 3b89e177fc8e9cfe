"""The projection onto a JPEG file's cells as torch operations (models/consistency.py): the numpy original's
pixels (jpeg/consistency.py) on the CPU and, where there is one, on a GPU, for every orientation, sampling and
batch; what a GPU Restorer conforms with."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from dist_dejpeg.jpeg.consistency import NotConsistent, conform, read_cells
from dist_dejpeg.metrics.fullref import psnr
from dist_dejpeg.models import consistency as device_consistency
from dist_dejpeg.models.consistency import conform_batch, conform_image

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _jpeg(rgb: np.ndarray, quality: int, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, **options)
    return buf.getvalue()


def _wrong(data: bytes, seed: int = 0) -> np.ndarray:
    """A restoration gone wrong: the file's decoded image blurred (5 x 5 box) with noise of +-6 levels on top."""
    from PIL import ImageFilter

    blurred = Image.open(io.BytesIO(data)).convert("RGB").filter(ImageFilter.BoxBlur(2))
    noise = np.random.default_rng(seed).integers(-6, 7, (blurred.height, blurred.width, 3))
    return np.clip(np.asarray(blurred, np.int16) + noise, 0, 255).astype(np.uint8)


def _same_pixels(a: np.ndarray, b: np.ndarray) -> None:
    """Equal but for float rounding: no pixel a level apart by more than one, and few by one."""
    diff = np.abs(a.astype(np.int16) - b)
    assert a.shape == b.shape and diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_the_device_projection_gives_the_numpy_ones_pixels(device, subsampling):
    """A JPEG of odd size (blocks and chroma samples cut at both edges), at the file's cells and narrower ones."""
    photo = skimage.data.astronaut()[5:262, 3:298]
    data = _jpeg(photo, 30, subsampling=subsampling)
    cells, wrong = read_cells(data), _wrong(data)
    for half in (0.5, 0.2):
        fixed = conform_image(wrong, cells, half_width=half, device=device)
        _same_pixels(fixed, conform(wrong, cells, half_width=half))
    assert psnr(fixed, photo) > psnr(wrong, photo) + 1.0  # (it did move the image, towards the photo)


@pytest.mark.parametrize("device", DEVICES)
def test_every_orientation_grayscale_and_stripes(device, monkeypatch):
    """A camera JPEG stored turned (EXIF orientations 2-8) conformed as displayed: the numpy projection's pixels
    (its turns are PIL's). A grayscale file's one plane. Stripes of a few block rows give one stripe's pixels. An
    image of another size than the file's is refused."""
    photo = skimage.data.coffee()[:203, :301]
    data = _jpeg(photo, 20)
    cells, wrong = read_cells(data), _wrong(data, 1)
    for orientation in range(1, 9):
        shown = np.asarray(Image.fromarray(wrong).transpose(Image.Transpose.TRANSPOSE)) if orientation >= 5 else wrong
        shown = np.ascontiguousarray(shown)
        if orientation in (2, 3, 4, 7):  # (the flips: any displayed image of the right size will do)
            shown = np.ascontiguousarray(shown[::-1, ::-1])
        _same_pixels(conform_image(shown, cells, orientation, device=device), conform(shown, cells, orientation))
    with pytest.raises(NotConsistent, match="301 x 203"):
        conform_image(np.ascontiguousarray(wrong.transpose(1, 0, 2)), cells, device=device)

    gray = skimage.data.camera()[:157, :203]
    gdata = _jpeg(gray, 25)
    gwrong = np.repeat(_wrong(gdata)[..., :1], 3, axis=2)
    fixed = conform_image(gwrong, read_cells(gdata), device=device)
    assert (fixed[..., 0] == fixed[..., 1]).all() and (fixed[..., 1] == fixed[..., 2]).all()
    _same_pixels(fixed, conform(gwrong, read_cells(gdata)))

    whole = conform_image(wrong, cells, device=device)
    monkeypatch.setattr(device_consistency, "_STRIPE_PIXELS", 16 * 301)  # 16 rows: one 4:2:0 block row per stripe
    striped = conform_image(wrong, cells, device=device)
    if device == "cpu":  # the same sums in the same order
        assert np.array_equal(striped, whole)
    else:  # (a GPU's kernels may sum a stripe's rows otherwise: a value at .5 may round the other way)
        _same_pixels(striped, whole)


@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_is_each_image_conformed_to_its_own_file(device):
    """Validation's batch of crops, each with its own file at one quality (and narrower cells): each image as
    conformed alone; crops of files whose planes differ are refused, as is a wrong count."""
    big = skimage.data.astronaut()
    crops = [np.ascontiguousarray(big[y:y + 64, x:x + 96]) for y, x in ((0, 0), (100, 50), (300, 380))]
    cells = [read_cells(_jpeg(c, 15)) for c in crops]
    wrong = [_wrong(_jpeg(c, 15), i) for i, c in enumerate(crops)]
    batch = torch.from_numpy(np.stack(wrong)).permute(0, 3, 1, 2).to(device)
    out = conform_batch(batch, cells, 0.35)
    assert out.dtype == torch.uint8 and out.device.type == device and out.shape == batch.shape
    for image, c, w in zip(out.permute(0, 2, 3, 1).cpu().numpy(), cells, wrong):
        _same_pixels(image, conform(w, c, half_width=0.35))
    with pytest.raises(ValueError, match="same planes"):
        conform_batch(batch, cells[:2] + [read_cells(_jpeg(crops[2], 15, subsampling=0))])
    with pytest.raises(ValueError, match="N cells"):
        conform_batch(batch, cells[:2])


@pytest.mark.parametrize("device", DEVICES)
def test_clipped_graphics_alternate_as_on_the_host(device):
    """A saturated silhouette needs several rounds of the alternation, a photo few: in one batch (the images with a
    block row still clipped go round again, the others wait) and alone, each as the numpy projection makes it."""
    horse = np.stack([np.where(skimage.data.horse()[:96, :128], 255, 0).astype(np.uint8)] * 3, axis=-1)
    photo = np.ascontiguousarray(skimage.data.chelsea()[:96, :128])
    crops = [horse, photo, np.ascontiguousarray(horse[::-1])]
    cells = [read_cells(_jpeg(c, 10)) for c in crops]
    wrong = [_wrong(_jpeg(c, 10), i) for i, c in enumerate(crops)]
    out = conform_batch(torch.from_numpy(np.stack(wrong)).permute(0, 3, 1, 2).to(device), cells, 0.35)
    for image, c, w in zip(out.permute(0, 2, 3, 1).cpu().numpy(), cells, wrong):
        _same_pixels(image, conform(w, c, half_width=0.35))
    _same_pixels(conform_image(wrong[0], cells[0], 1, 0.35, device=device), conform(wrong[0], cells[0], 1, 0.35))
    one_round = conform(wrong[0], cells[0], 1, 0.35, rounds=1)
    assert psnr(conform(wrong[0], cells[0], 1, 0.35), horse) > psnr(one_round, horse) + 0.5  # (several rounds ran)


@pytest.mark.gpu
def test_a_gpu_restorer_conforms_on_its_gpu_beside_its_captures(tmp_path):
    """restore's encode threads (its default number) conform on the GPU (Restorer.conform) while the main thread
    captures a graph at every image and replays it: a conform waits for a capture in progress (CAPTURING), so no
    capture fails (graphs stay on), nothing deadlocks, and each written image is the numpy projection of what the
    model made."""
    from dist_dejpeg.restore.files import restore_files
    from dist_dejpeg.restore.restorer import Restorer

    model = torch.nn.AvgPool2d(5, stride=1, padding=2, count_include_pad=False)  # a "restoration" that blurs
    restorer = Restorer(model, device="cuda", tile=128, overlap=32, batch_size=4, guard=False, precision="fp32")
    restore_rgb = restorer.restore_rgb

    def recapturing(rgb, quality):  # from the second image on, each captured at its first batch (its shape seen),
        restorer.graphs.clear()      # while the encode threads conform the image before
        return restore_rgb(rgb, quality)

    restorer.restore_rgb = recapturing
    big = skimage.data.astronaut()
    sources = []
    for i in range(6):
        sources.append(tmp_path / f"in{i}.jpg")
        sources[-1].write_bytes(_jpeg(np.ascontiguousarray(big[40 * i:40 * i + 300, 30 * i:30 * i + 400]), 20))
    results = restore_files(restorer, [str(p) for p in sources], tmp_path / "out", progress=False)
    assert all(r.error is None for r in results) and restorer.cuda_graphs and restorer.graphs
    for source, result in zip(sources, results):
        decoded = np.asarray(Image.open(source).convert("RGB"))
        expected = conform(restorer.restore_array(decoded), read_cells(source))
        _same_pixels(np.asarray(Image.open(result.output).convert("RGB")), expected)
