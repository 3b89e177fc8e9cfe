"""Batched fixed-shape tiling (issue 24): windows through the model ``batch_size`` at a time, and with
``full_batches`` (CUDA) every call of a tiled image one shape, give the per-window result: each window
restored alone and blended by the documented ramps into whole-image sums."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from dist_dejpeg.config import ModelConfig
from dist_dejpeg.models.unet import build_generator
from dist_dejpeg.restore.restorer import Restorer
from dist_dejpeg.restore.tiling import blend_ramp, tile_starts

TINY = dict(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=16)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A tiny generator with a randomised head: its output depends on each window's context."""
    torch.manual_seed(0)
    g = build_generator(ModelConfig(**TINY, decoder_norm="batch"))
    nn.init.normal_(g.head.weight, std=0.02)
    return g.eval()


def _photo(h: int, w: int) -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[20:20 + h, 100:100 + w])


def per_window(model: nn.Module, image: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """The reference: every window through the model alone, weighted by blend_ramp, summed over the image."""
    _, h, w = image.shape
    th, tw = min(tile, h), min(tile, w)
    acc, weight = torch.zeros(3, h, w), torch.zeros(1, h, w)
    for y in tile_starts(h, th, overlap):
        for x in tile_starts(w, tw, overlap):
            with torch.no_grad():
                out = model(image[None, :, y:y + th, x:x + tw])[0]
            ramp = torch.from_numpy(blend_ramp(th, overlap, y == 0, y + th == h)[:, None]
                                    * blend_ramp(tw, overlap, x == 0, x + tw == w)[None, :])
            acc[:, y:y + th, x:x + tw] += out * ramp
            weight[:, y:y + th, x:x + tw] += ramp
    return acc / weight


# (h, w, tile, overlap): sides not divisible by the tile, a window row that moves back over the band, a tile
# larger than the image in one and in both directions, an image of exactly 2 x 2 tiles
SIZES = [(200, 168, 64, 16), (130, 300, 96, 32), (60, 300, 128, 32), (100, 90, 128, 32), (128, 256, 64, 0)]


@pytest.mark.parametrize("h, w, tile, overlap", SIZES)
def test_batches_give_the_per_window_result(model, h, w, tile, overlap):
    """Batches of 1, 3 and 8 windows, partial or filled up (full_batches), restore as every window alone does:
    max abs difference under 1e-5 (float rounding) on a real photo, fp32 on the CPU."""
    x = torch.from_numpy(_photo(h, w)).permute(2, 0, 1).float() / 255
    reference = per_window(model, x, tile, overlap)
    assert (reference - x).abs().max() > 0.01  # the model changes the image: the comparison is not vacuous
    for batch_size in (1, 3, 8):
        for full in (False, True):
            restorer = Restorer(model, device="cpu", tile=tile, overlap=overlap, batch_size=batch_size,
                                precision="fp32", guard=False)
            restorer.full_batches = full  # what CUDA sets: here on the CPU
            out = restorer.restore_tensor(x)
            diff = (out - reference).abs().max().item()
            assert diff < 1e-5, (batch_size, full, diff)


def test_full_batches_give_one_shape_for_every_image(model):
    """With full_batches every forward of a tiled image has the shape batch_size x 3 x tile x tile, also the
    last, partial batch (its extra slots zeroed), for images of different sizes; an image of one window goes
    alone. Without it (the CPU) the last batch holds only its windows."""
    shapes = []

    def recording(restorer):
        forward = restorer.forward

        def record(batch, quality=None):
            shapes.append((tuple(batch.shape), float(batch[len(batch) - 1].abs().sum())))
            return forward(batch, quality)
        restorer.forward = record
        return restorer

    full = recording(Restorer(model, device="cpu", tile=64, overlap=16, batch_size=4, guard=False))
    full.full_batches = True
    for h, w in [(150, 100), (64, 300), (97, 97)]:  # 6, 6 and 4 windows
        full.restore_array(_photo(h, w))
    assert {s for s, _ in shapes} == {(4, 3, 64, 64)} and len(shapes) == 2 + 2 + 1
    assert shapes[1][1] == 0.0  # 6 windows in batches of 4: the second batch's last slot is filled up with zeros
    shapes.clear()
    full.restore_array(_photo(50, 60))  # smaller than the tile: one window, alone
    assert [s for s, _ in shapes] == [(1, 3, 50, 60)]
    shapes.clear()
    partial = recording(Restorer(model, device="cpu", tile=64, overlap=16, batch_size=4, guard=False))
    assert not partial.full_batches and partial.batch_size == 4
    partial.restore_array(_photo(150, 100))
    assert [s for s, _ in shapes] == [(4, 3, 64, 64), (2, 3, 64, 64)]


def test_batch_defaults():
    """Tiles per forward: 1 on the CPU (batching was slower there), 8 on a GPU with every batch full; a
    module's forward on the CPU gets no CUDA graphs, and asking for them there is an error."""
    restorer = Restorer(nn.Identity(), device="cpu")
    assert restorer.batch_size == 1 and not restorer.full_batches and not restorer.cuda_graphs
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Restorer(nn.Identity(), device="cpu", cuda_graphs=True)


@pytest.mark.gpu
def test_cuda_defaults_and_graph_replay_match_eager(model):
    """On CUDA: 8 tiles per batch, full batches, channels_last, graphs; a shape's second call is captured and
    replayed, and a folder's worth of images restores as the eager forward does (fp32: float rounding only;
    bf16: within 35 dB PSNR of fp32 on the CPU, the existing bound for bf16)."""
    gpu = Restorer(model, device="cuda", tile=64, overlap=16, precision="fp32")
    eager = Restorer(model, device="cuda", tile=64, overlap=16, precision="fp32", cuda_graphs=False)
    assert gpu.batch_size == 8 and gpu.full_batches and gpu.cuda_graphs and gpu.memory_format == torch.channels_last
    for h, w in [(150, 100), (200, 168), (150, 100)]:
        rgb = _photo(h, w)
        a, b = gpu.restore_array(rgb).astype(int), eager.restore_array(rgb).astype(int)
        assert np.abs(a - b).max() <= 1
    assert gpu.cuda_graphs and [shape for shape, _ in gpu.graphs] == [(8, 3, 64, 64)]  # captured, not failed
    # its own stream (torch's shared one: the first capture's device), on the Restorer's device ("cuda" made cuda:N)
    assert gpu.capture_stream.device == gpu.device == torch.device("cuda", torch.cuda.current_device())
    whole = Restorer(model, device="cuda", tile=0, precision="fp32")  # a whole image at once: never captured
    for _ in range(3):
        whole.restore_array(_photo(150, 100))
        gpu.restore_array(_photo(60, 50))  # within one tile: one window alone, never captured either
    assert whole.cuda_graphs and not whole.graphs and [shape for shape, _ in gpu.graphs] == [(8, 3, 64, 64)]
    bf16 = Restorer(model, device="cuda", tile=64, overlap=16, precision="bf16")
    # a copy: a Restorer moves the module it is given (in place), and bf16's would then meet CPU weights
    cpu = Restorer(copy.deepcopy(model), device="cpu", tile=64, overlap=16, precision="fp32").restore_array(
        _photo(200, 168))
    for _ in range(2):  # eager, then captured
        out = bf16.restore_array(_photo(200, 168))
    mse = ((out.astype(np.float64) - cpu) ** 2).mean()
    assert 10 * np.log10(255.0 ** 2 / max(mse, 1e-12)) > 35.0


@pytest.mark.gpu
def test_cuda_graph_takes_each_calls_quality_and_falls_back_where_capture_fails(caplog):
    """A conditioned generator replayed from its graph is told each call's quality (static input refilled); a
    module that syncs with the host cannot be captured: a warning, graphs off, the same result eagerly, and the
    calling thread back on its stream (torch.cuda.graph's exit left it on the capture stream)."""
    torch.manual_seed(1)
    g = build_generator(ModelConfig(**TINY, quality_conditioning=True))
    nn.init.normal_(g.head.weight, std=0.02)
    nn.init.normal_(g.film.heads.weight, std=0.5)  # zero-initialised: the quality would change nothing
    graphed = Restorer(g.eval(), device="cuda", tile=64, overlap=16, precision="fp32", guard=False)
    eager = Restorer(g, device="cuda", tile=64, overlap=16, precision="fp32", guard=False, cuda_graphs=False)
    rgb = _photo(150, 100)
    outs = {}
    for q in (10, 90, 10, 90):  # the first call of the batch shape runs eagerly, the later ones replay
        outs.setdefault(q, []).append(graphed.restore_array(rgb, q).astype(int))
        assert np.abs(outs[q][-1] - eager.restore_array(rgb, q).astype(int)).max() <= 1
    assert graphed.graphs and np.abs(outs[10][-1] - outs[90][-1]).max() > 0

    class Syncing(nn.Module):
        def forward(self, x):
            if x.mean().item() > 2:  # a host sync: not allowed while a stream is captured
                raise AssertionError
            return (x * 0.8 + 0.1).clamp(0, 1)

    syncing = Restorer(Syncing(), device="cuda", tile=64, overlap=16, guard=False)
    for _ in range(3):
        out = syncing.restore_array(rgb)
    assert not syncing.cuda_graphs and "CUDA graph failed" in caplog.text
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # not left on the failed capture's stream
    assert np.abs(out.astype(int) - np.rint(rgb * 0.8 + 25.5).astype(int)).max() <= 1
