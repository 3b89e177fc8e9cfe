"""The Restorer's speed work keeps its outputs (a generator made ready for inference, the CPU attention, the
band-by-band blend), and its Python API: the quality's source, unknown qualities, ICC profile and EXIF."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from dist_dejpeg.config import ModelConfig
from dist_dejpeg.models.generator_file import load_generator, ready_for_inference, save_generator
from dist_dejpeg.models.layers import SelfAttention
from dist_dejpeg.restore.images import output_metadata
from dist_dejpeg.restore.restorer import Restorer

from test_infer import GAINS, TINY, _jpeg_bytes, _model, _photo, guarded_file  # noqa: F401 - a fixture


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

    assert restorer.restore(jpeg, quality=10) and restorer.last_decision.source == "given"
    clean = Image.fromarray(rgb)  # never compressed: no quality, nothing to predict
    assert np.array_equal(np.asarray(restorer.restore(clean)), rgb)
    d = restorer.last_decision
    assert d.passthrough and d.quality is None and "--input-quality" in d.reason
    blind = Restorer(guarded_file, device="cpu", tile=0, guard=False)
    assert not np.array_equal(np.asarray(blind.restore(clean)), rgb) and "blind" in blind.last_decision.reason
