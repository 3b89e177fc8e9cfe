"""The Restorer's speed work keeps its outputs (a generator made ready for inference, the CPU attention, the
band-by-band blend), and its Python API: the quality's source, unknown qualities, ICC profile and EXIF."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dist_dejpeg.config import ModelConfig
from dist_dejpeg.models.generator_file import load_generator, ready_for_inference, save_generator
from dist_dejpeg.models.layers import SelfAttention
from dist_dejpeg.restore.metadata import output_metadata
from dist_dejpeg.restore.restorer import Restorer

from test_infer import GAINS, TINY, Pointwise, _jpeg_bytes, _model, _photo, guarded_file  # noqa: F401 - a fixture


def test_ready_for_inference_keeps_the_generators_outputs():
    """Spectral norms computed into plain weights and channels_last: the same outputs as the module trained
    (no_grad, the training code path) up to float rounding; the CPU attention equals SDPA's."""
    def build():
        model = _model(norm="group")
        torch.manual_seed(1)
        for m in model.modules():
            if isinstance(m, SelfAttention):
                torch.nn.init.normal_(m.gamma, std=1.0)  # gamma starts at 0: make attention count
        return model

    # two builds, not a deepcopy: removing a parametrization edits its class, which a deepcopy shares
    model, ready = build(), ready_for_inference(build())
    nn_attention = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert nn_attention, "the tiny generator has a self-attention block: the CPU path is exercised"
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in ready.modules())
    x, q = torch.rand(2, 3, 96, 128), None
    with torch.no_grad():
        reference = model(x, q)
    with torch.inference_mode():
        fast = ready(x.contiguous(memory_format=torch.channels_last), q)
    assert (fast - reference).abs().max() < 1e-4
    attention = nn_attention[0]
    feats = torch.randn(3, attention.value.out_channels, 24, 20)
    with torch.no_grad():
        sdpa = attention(feats)
    with torch.inference_mode():
        cpu = attention(feats)
    assert (cpu - sdpa).abs().max() < 1e-5



def test_ready_for_inference_folds_the_encoders_batch_norms():
    """The timm encoder's batch norms (trained statistics, not the identity of a fresh one) folded into their
    convolutions: none left, the same outputs up to float rounding."""
    from dist_dejpeg.models.generator_file import fold_batch_norms

    def build():
        model = _model(norm="group")
        gen = torch.Generator().manual_seed(2)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
                m.weight.data.copy_(torch.randn(n, generator=gen))
                m.bias.data.copy_(torch.randn(n, generator=gen) * 0.3)
        return model

    model, ready = build(), ready_for_inference(build())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not [m for m in ready.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert fold_batch_norms(ready) == 0  # (again: nothing left to fold)
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        reference = model(x, None)
    with torch.inference_mode():
        fast = ready(x.contiguous(memory_format=torch.channels_last), None)
    assert (fast - reference).abs().max() < 1e-4

def test_restorer_from_a_file_matches_the_plain_module_on_a_real_photo(tmp_path):
    """The restore command's path (a file: made ready for inference, one tile per batch on the CPU, rows
    blended band by band) against the same weights as a plain module, 3 x 3 tiles in batches that span rows:
    within one level of 255 on a real photo, and the whole-image pass too."""
    path = tmp_path / "generator.safetensors"
    save_generator(_model(norm="group"), ModelConfig(**TINY), path)
    plain = load_generator(path)
    rgb = _photo(300, 280)
    fast = Restorer(path, device="cpu", tile=128, overlap=32, guard=False)
    assert fast.batch_size == 1 and fast.memory_format == torch.channels_last
    slow = Restorer(plain, device="cpu", tile=128, overlap=32, batch_size=4, guard=False)
    ours, theirs = fast.restore_array(rgb, 20), slow.restore_array(rgb, 20)
    assert np.abs(ours.astype(int) - rgb).max() > 10  # restored, not passed through
    assert np.abs(ours.astype(int) - theirs).max() <= 1
    whole = Restorer(path, device="cpu", tile=0, guard=False).restore_array(rgb, 20)
    with torch.no_grad():
        x = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None]
        ref = plain(x, torch.tensor([20.0]))[0].permute(1, 2, 0).mul(255).round().clamp(0, 255).numpy()
    assert np.abs(whole.astype(int) - ref.astype(int)).max() <= 1
    # a float tensor through the same path: the same pixels
    tensor = fast.restore_tensor(torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1), 20)
    assert np.abs(np.rint(tensor.permute(1, 2, 0).numpy() * 255).astype(int) - ours).max() <= 1


def test_python_api_records_the_quality_source_and_keeps_icc_and_exif(guarded_file):  # noqa: F811
    """Restorer.restore(PIL): the quality read from the file's tables is recorded as such (not 'given'); the
    output carries the input's ICC profile, EXIF, XMP and JPEG comment as the restore command writes them; an image without JPEG
    compression is passed through (its quality is unknown), and restored blind only with the guard off."""
    from PIL import ImageCms

    restorer = Restorer(guarded_file, device="cpu", tile=64, overlap=16)
    rgb = _photo(96, 128)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    jpeg = Image.open(io.BytesIO(_jpeg_bytes(rgb, 20, icc_profile=icc, exif=exif, xmp=xmp, comment=b"caption")))
    out = restorer.restore(jpeg)
    d = restorer.last_decision
    assert d.quality == 20 and d.source == "file tables" and not d.passthrough, d
    assert not np.array_equal(np.asarray(out), np.asarray(jpeg.convert("RGB")))
    want_icc, want_exif = output_metadata(jpeg, False)
    assert out.info["icc_profile"] == want_icc == icc and out.info["exif"] == want_exif
    saved = io.BytesIO()
    out.save(saved, format="PNG", **out.info)
    again = Image.open(saved)
    assert again.info.get("icc_profile") == icc and again.getexif().get(0x010F) == "TestCam"
    assert out.info["xmp"] == xmp
    out.save(saved := io.BytesIO(), format="JPEG", **out.info)
    assert Image.open(saved).info.get("xmp") == xmp and Image.open(saved).info.get("comment") == b"caption"

    with pytest.warns(UserWarning, match="bytes are gone"):  # (the first restore loaded it: Pillow let them go)
        assert restorer.restore(jpeg, quality=10) and restorer.last_decision.source == "given"
    clean = Image.fromarray(rgb)  # never compressed: no quality, nothing to predict
    assert np.array_equal(np.asarray(restorer.restore(clean)), rgb)
    d = restorer.last_decision
    assert d.passthrough and d.quality is None and "give quality=Q" in d.reason
    blind = Restorer(guarded_file, device="cpu", tile=0, guard=False)
    assert not np.array_equal(np.asarray(blind.restore(clean)), rgb) and "blind" in blind.last_decision.reason


def test_python_api_restores_a_file_given_by_its_path(guarded_file, tmp_path):  # noqa: F811
    """restore("photo.jpg") (or a Path): what restore(Image.open(...)) gives, its quality read from the file's
    tables, its metadata in .info; a file the restore command refuses is refused the same way, by name (bytes:
    "image")."""
    from dist_dejpeg.restore.images import InputImageError

    restorer = Restorer(guarded_file, device="cpu", tile=64, overlap=16)
    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg_bytes(_photo(96, 128), 20, comment=b"caption"))  # (1.6 kB)
    by_path = restorer.restore(str(path))
    assert restorer.last_decision.source == "file tables" and restorer.last_decision.quality == 20
    assert np.array_equal(np.asarray(by_path), np.asarray(restorer.restore(Image.open(path))))
    assert by_path.info["comment"] == b"caption" and np.asarray(restorer.restore(path)).shape == (96, 128, 3)
    (tmp_path / "cut.jpg").write_bytes(path.read_bytes()[:-600])  # its header whole, its scan cut
    for bad, why in (("cut.jpg", "cannot decode"), ("none.jpg", "no such file")):
        with pytest.raises(InputImageError, match=f"{bad}: {why}"):
            restorer.restore(tmp_path / bad)
    with pytest.raises(InputImageError, match=r"^image: not an image PIL can read"):  # (bytes: an upload's)
        restorer.restore(b"not a path")
    with pytest.raises(TypeError, match="an image file's path, bytes or binary file object"):
        restorer.restore(20)


def test_a_truncated_pil_image_is_refused_as_its_file_is(tmp_path):
    """A truncated JPEG opened lazily (Image.open, from its path or a BytesIO) decodes inside restore: an
    InputImageError in the words the path gets (it was PIL's raw OSError, "image file is truncated")."""
    from dist_dejpeg.restore.images import InputImageError

    restorer = Restorer(Pointwise(), tile=0, guard=False)
    path = tmp_path / "cut.jpg"
    path.write_bytes(_jpeg_bytes(_photo(96, 128), 20)[:-600])  # its header whole, its scan cut
    with pytest.raises(InputImageError) as by_path:
        restorer.restore(path)
    assert "cannot decode (OSError: image file is truncated" in str(by_path.value)
    assert str(by_path.value).endswith("the file is cut short (an interrupted copy or download?): copy it again "
                                       "from its source")
    for image, name in ((Image.open(path), str(path)), (Image.open(io.BytesIO(path.read_bytes())), "image")):
        with pytest.raises(InputImageError) as lazy:
            restorer.restore(image)
        assert str(lazy.value) == str(by_path.value).replace(str(path), name, 1)


def test_the_restore_package_gives_both_restorers():
    """``from dist_dejpeg.restore import Restorer, open_restorer``, as the package's docstring shows, works (it
    was an ImportError: only dist_dejpeg itself gave Restorer); the ONNX one comes from there too."""
    import dist_dejpeg.restore as restore
    from dist_dejpeg.restore import OnnxRestorer, open_restorer  # noqa: F401 - the import is the test
    from dist_dejpeg.restore import Restorer as exported
    from dist_dejpeg.restore.onnx_backend import OnnxRestorer as onnx

    assert exported is Restorer and OnnxRestorer is onnx and set(restore.__all__) >= {"Restorer", "open_restorer"}


def test_reversed_views_are_restored_like_their_copies():
    """An OpenCV user's BGR -> RGB view (``[..., ::-1]``) and a flipped one have negative strides, which
    torch.from_numpy refuses: they were a torch ValueError telling the user to copy; now they are restored."""
    restorer = Restorer(Pointwise(), tile=64, overlap=16, guard=False)
    bgr = _photo(80, 96)
    for view in (bgr[..., ::-1], bgr[::-1], bgr[:, ::-2]):
        assert np.array_equal(restorer.restore_array(view, 20), restorer.restore_array(view.copy(), 20))
    assert np.array_equal(np.asarray(restorer.restore(bgr[..., ::-1], 20)), restorer.restore_array(bgr[..., ::-1].copy(), 20))


def test_each_thread_reads_its_own_decision_and_images_take_turns_at_the_model():
    """One Restorer shared by threads: ``last_decision`` is the calling thread's own (a thread's call no longer
    overwrites what another thread reads), and two images are never in the model at once (on CUDA the pinned
    buffers and captured graphs are the restorer's: two at once corrupted each other's pixels)."""
    import threading
    import time

    inside, overlaps = [], []

    class Slow(Pointwise):
        def forward(self, x):
            inside.append(1)
            overlaps.append(len(inside) > 1)
            time.sleep(0.02)
            inside.pop()
            return super().forward(x)

    restorer = Restorer(Slow(), tile=64, overlap=16, guard=False)
    rgb = _photo(96, 96)
    expected = restorer.restore_array(rgb, 10)
    assert restorer.last_decision.quality == 10
    outputs = {}

    def work(name, quality):
        outputs[name] = restorer.restore_array(rgb, quality), restorer.last_decision.quality

    threads = [threading.Thread(target=work, args=(name, q)) for name, q in (("a", 30), ("b", 40))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert restorer.last_decision.quality == 10  # this thread's call, not the others'
    assert outputs["a"][1] == 30 and outputs["b"][1] == 40
    assert all(np.array_equal(out, expected) for out, _ in outputs.values()) and len(overlaps) == 12
    assert not any(overlaps)


def test_devices_torch_cannot_run_on_here_are_one_line_errors():
    """device="meta" or an accelerator this torch build lacks ("mps", "xpu" on Linux) was torch's own
    RuntimeError, AssertionError or NotImplementedError from deep inside; now a ValueError naming the device."""
    for device in ("meta", "mps", "xpu"):
        accelerator = getattr(torch, "accelerator", None)
        if accelerator and accelerator.is_available() and accelerator.current_accelerator().type == device:
            continue
        with pytest.raises(ValueError, match=f"device {device}: not a device this machine's torch"):
            Restorer(Pointwise(), device=device)
    assert Restorer(Pointwise(), device="cpu:0", tile=0).device == torch.device("cpu:0")


def test_help_shows_the_arguments_restorer_takes():
    """help(Restorer) and IDEs read the signature of ``__new__`` (``model=None, **kwargs``, for the ONNX
    dispatch), which hid every argument; they show ``__init__``'s, and the docstring says what ``device`` is."""
    import inspect
    import pydoc

    params = inspect.signature(Restorer).parameters
    assert list(params)[:2] == ["model", "device"] and params["tile"].default == 512 and "guard" in params
    text = pydoc.render_doc(Restorer, renderer=pydoc.plaintext)
    assert "Restorer(model, *, device" in text and '``device``: "auto"' in text and "last_decision" in text


def test_a_uint8_tensor_is_restored_as_its_array_is_with_no_whole_float_copy():
    """A uint8 batch goes through the tiling as restore_array's image does (each window made float as it is cut,
    each band rounded into the uint8 output): bit for bit the pixels its float32 copy (/ 255) gives, rounded, as
    before, and restore_array's, on a real photo in filled-up batches (CUDA's path); and no allocation as large
    as one image's float copy (12 MP on the CPU: 485 MB above the start, now 190-270 MB as restore_array's)."""
    from torch.profiler import profile

    photos = [_photo(128, 160), np.ascontiguousarray(_photo(128, 160)[::-1])]
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2)
    restorer = Restorer(_model(), device="cpu", tile=64, overlap=16, batch_size=3, guard=False)
    restorer.full_batches = True
    got = restorer.restore_tensor(x, 20)
    floats = restorer.restore_tensor(x.float() / 255, 20)
    assert got.dtype == torch.uint8 and torch.equal(got, floats.mul(255).round().clamp(0, 255).byte())
    assert torch.equal(got[1].permute(1, 2, 0), torch.from_numpy(restorer.restore_array(photos[1], 20)))
    assert (got.int() - x.int()).abs().max() > 10  # restored, not passed through
    pointwise = Restorer(Pointwise(), device="cpu", tile=64, overlap=16, guard=False)
    with profile(profile_memory=True) as prof:
        pointwise.restore_tensor(x, 20)
    largest = max(event.self_cpu_memory_usage for event in prof.events())
    assert 0 < largest < x[0].numel() * 4, largest  # the uint8 output batch at most: no float copy of an image


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_tensor_is_restored_with_no_whole_float32_copy(dtype):
    """A float16 or bfloat16 batch goes through the tiling as a uint8 one does (each window made float32 as it is
    cut, each band cast back as it is written): bit for bit its float32 copy's result cast back, as before, on a
    300 x 200 photo in 64 px tiles; and no allocation as large as the batch's float32 copy (12 MP float16 on the
    CPU: peak RSS +434..452 MiB over the start, now +182..206 MiB; bfloat16 +425..434 -> +184..200 MiB)."""
    from torch.profiler import profile

    photos = [_photo(200, 300), np.ascontiguousarray(_photo(200, 300)[:, ::-1])]
    x = (torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 255).to(dtype)
    restorer = Restorer(_model(), device="cpu", tile=64, overlap=16, batch_size=3, guard=False)
    got = restorer.restore_tensor(x, 20)
    assert got.dtype == dtype and torch.equal(got, restorer.restore_tensor(x.float(), 20).to(dtype))
    assert torch.equal(restorer.restore_tensor(x[1], 20), got[1])  # one image, 3 x H x W, the same
    assert (got.float() - x.float()).abs().max() > 0.04  # restored, not passed through
    pointwise = Restorer(Pointwise(), device="cpu", tile=64, overlap=16, guard=False)
    with profile(profile_memory=True) as prof:
        pointwise.restore_tensor(x, 20)
    largest = max(event.self_cpu_memory_usage for event in prof.events())
    assert 0 < largest < x.numel() * 4, largest  # the output batch (2 bytes a value) at most: no float32 copy


def test_bf16_on_a_cpu_without_bf16_arithmetic_is_warned_of(guarded_file, monkeypatch, caplog):  # noqa: F811
    """--precision bf16 on a CPU without AVX-512 BF16 or AMX ran ~10x slower than fp32, unsaid: one warning now;
    none where the CPU has it, or for fp32 (the CPU's default)."""
    import logging

    import torch

    from dist_dejpeg.restore import restorer as restorer_module

    for has, precision, warned in ((False, "bf16", True), (True, "bf16", False), (False, "auto", False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=restorer_module.__name__):
            Restorer(guarded_file, device="cpu", tile=0, precision=precision)
        assert ("is emulated" in caplog.text) == warned, (has, precision, caplog.text)


def _board(square: int = 8, h: int = 64, w: int = 96, offset: int = 0, a=(0, 0, 0), b=(255, 255, 255)):
    """A checkerboard of ``square`` px squares (whole JPEG blocks where ``offset`` is 0), cut ``offset`` px in."""
    y, x = np.mgrid[offset:offset + h, offset:offset + w]
    on = ((y // square + x // square) % 2).astype(bool)[..., None]
    return np.where(on, np.array(b, np.uint8), np.array(a, np.uint8))


def test_a_jpeg_that_reproduced_its_flat_blocks_is_passed_through(guarded_file, tmp_path, capsys):  # noqa: F811
    """A grid-aligned checkerboard's JPEG is exact or nearly (45 dB at q20, lossless at q80): the model smoothed its
    block edges (the quick start's: -8.4 dB at q20), the guard keyed on the quality alone. Now passed through, by the
    API (a file, an array, a tensor batch beside a photo), the command line, and said; a photo is still restored."""
    from dist_dejpeg.cli import main

    restorer = Restorer(guarded_file, device="cpu", tile=0)  # validation: a gain at q20
    data = _jpeg_bytes(_board(16, a=(200, 30, 40), b=(20, 60, 180)), 20, subsampling=0)  # two colours, 4:4:4
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    out = restorer.restore(data)
    d = restorer.last_decision
    assert np.array_equal(np.asarray(out), decoded) and d.passthrough and d.quality == 20, d
    assert "one colour" in d.reason and d.reason.endswith("passed through unchanged")
    assert np.array_equal(restorer.restore_array(decoded, 20), decoded) and restorer.last_decision.passthrough
    mirrored = np.asarray(Image.open(io.BytesIO(_jpeg_bytes(_board(w=100), 20))).convert("RGB"))[:, ::-1].copy()
    assert np.array_equal(restorer.restore_array(mirrored, 20), mirrored)  # (an EXIF flip: the grid 4 px off)
    photo = np.asarray(Image.open(io.BytesIO(_jpeg_bytes(_photo(64, 96), 20))).convert("RGB"))
    assert not np.array_equal(restorer.restore_array(photo, 20), photo) and not restorer.last_decision.passthrough
    unguarded = Restorer(guarded_file, device="cpu", tile=0, guard=False)
    assert not np.array_equal(unguarded.restore_array(decoded, 20), decoded)  # --no-guard: restored all
    # a tensor batch: the board kept, the photo beside it restored
    batch = torch.from_numpy(np.stack([decoded, photo])).permute(0, 3, 1, 2).contiguous()
    x = batch.float() / 255
    y = restorer.restore_tensor(x, 20)
    assert torch.equal(y[0], x[0]) and not torch.equal(y[1], x[1])
    assert "1 of 2 image(s) passed through unchanged" in restorer.last_decision.reason
    y = restorer.restore_tensor(batch[:1], 20)
    assert torch.equal(y, batch[:1]) and restorer.last_decision.passthrough
    src = tmp_path / "board.jpg"
    src.write_bytes(_jpeg_bytes(_board(), 40))
    args = ["restore", str(src), "-o", str(tmp_path / "out"), "--model", str(guarded_file), "--format", "same",
            "--verbose"]
    assert main(args) == 0
    assert (tmp_path / "out" / "board.jpg").read_bytes() == src.read_bytes()  # the file itself
    said = capsys.readouterr().out
    assert "passed through: " in said and "one colour" in said


def test_exact_blocks_tells_a_graphics_edges_from_blocking():
    """Flat blocks with edges between them: nothing to restore. A gradient's JPEG (4:4:4, q20) is block-flat too,
    but its steps are blocking (within what the quantization hides of a ramp): restored. Photos never trigger."""
    import skimage.data

    from dist_dejpeg.restore.guard import block_colours, exact_blocks

    def decoded(rgb, q, ss=0):
        return np.asarray(Image.open(io.BytesIO(_jpeg_bytes(rgb, q, subsampling=ss))).convert("RGB"))

    yy, xx = np.mgrid[0:128, 0:192]
    sky = np.rint(np.stack([90 + 60 * yy / 128, 140 + 60 * yy / 128, 230 - 10 * xx / 192], -1)).astype(np.uint8)
    assert block_colours(decoded(sky, 20)) is not None and exact_blocks(decoded(sky, 20), 20) == ""
    assert exact_blocks(decoded(_board(), 20, 2), 20) and exact_blocks(decoded(_board(), 80), 80)
    assert exact_blocks(decoded(_board(16), 5, 2), 5)
    assert exact_blocks(decoded(_board(), 20).transpose(2, 0, 1), 20, channels_first=True)
    assert exact_blocks(decoded(_board(), 20)[..., 0], 20)  # grayscale
    assert block_colours(_board(offset=3)) is not None and block_colours(_board(5)) is None  # a grid, 8 px or not
    assert exact_blocks(decoded(skimage.data.checkerboard(), 20, 2), 20) == ""  # 25 px squares: ringing
    for name in ("astronaut", "camera", "coffee"):
        image = getattr(skimage.data, name)()[:128, :128]
        rgb = np.stack([image] * 3, -1) if image.ndim == 2 else image
        for q in (5, 20, 90):
            assert exact_blocks(decoded(rgb, q, 2), q) == "", (name, q)
