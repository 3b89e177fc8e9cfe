"""LPIPS wrapper (random backbones, no downloads), pixel and adversarial losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_dejpeg.config.schema import LPIPS_MIN_SIDE as MIN_SIDE
from dist_dejpeg.models.lpips import LPIPS
from dist_dejpeg.train.losses import critic_loss, generator_adv_loss, pixel_loss


@pytest.fixture(scope="module")
def alex():
    torch.manual_seed(0)
    return LPIPS("alex", pretrained=False)


def _pair(n=2, size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen), torch.rand(n, 3, size, size, generator=gen)


# --------------------------------------------------------------------------------------------- LPIPS


@pytest.mark.parametrize("net,size", [("alex", 64), ("vgg", 32)])
def test_lpips_matches_reference_implementation(net, size):
    torch.manual_seed(0)
    lp = LPIPS(net, pretrained=False)
    a, b = _pair(2, size, seed=1)
    with torch.no_grad():
        ours = lp(a, b)
        ref = lp.inner(a, b, normalize=True).flatten()
    assert ours.shape == ref.shape == (2,)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours, ref)
    assert (ours > 0).all()


def test_lpips_one_finite_value_per_image(alex):
    a, b = _pair(3)
    with torch.no_grad():
        d = alex(a, b)
        same = alex(a, a)
    assert d.shape == (3,) and d.dtype == torch.float32
    assert torch.isfinite(d).all() and (d > 0).all()
    assert torch.equal(same, torch.zeros(3))  # identical images: exactly zero
    # per image: a batch gives the same numbers as one image at a time
    with torch.no_grad():
        singles = torch.cat([alex(a[i:i + 1], b[i:i + 1]) for i in range(3)])
    assert torch.allclose(d, singles, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e5])
def test_lpips_finite_under_bf16_autocast(alex, scale):
    a, b = _pair(2, seed=2)
    a, b = a * scale, b * scale
    with torch.no_grad():
        full = alex(a, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = alex(a, b)
    assert mixed.shape == (2,) and mixed.dtype == torch.float32
    assert torch.isfinite(mixed).all()
    assert torch.allclose(mixed, full, rtol=0.05, atol=1e-3), (mixed, full)


def test_lpips_fp16_autocast_where_lpips_normalisation_overflows(alex):
    # At this magnitude the backbone still fits fp16, but the sum of squares in lpips' own
    # normalize_tensor overflows 65504; the wrapper does that part in float32.
    a, b = _pair(2, seed=3)
    a, b = a * 1e3, b * 1e3
    with torch.no_grad():
        full = alex(a, b)
        with torch.autocast("cpu", dtype=torch.float16):
            mixed = alex(a, b)
    assert torch.isfinite(mixed).all()
    assert torch.allclose(mixed, full, rtol=0.05, atol=1e-3), (mixed, full)


def test_lpips_stays_frozen_and_in_eval_mode(alex):
    params = list(alex.parameters())
    assert params, "LPIPS has parameters (backbone and linear heads)"
    assert not any(p.requires_grad for p in params)
    alex.train()
    assert not alex.training
    assert not any(m.training for m in alex.modules())
    holder = nn.ModuleDict({"lpips": alex, "other": nn.Linear(2, 2)})
    holder.train()
    assert holder.training and holder["other"].training
    assert not any(m.training for m in alex.modules())
    # dropout in lpips' linear heads is off: repeated calls agree exactly
    a, b = _pair(1, seed=4)
    with torch.no_grad():
        assert torch.equal(alex(a, b), alex(a, b))


def test_lpips_gradient_flows_to_the_image(alex):
    a, b = _pair(2, seed=5)
    a.requires_grad_(True)
    alex(a, b).sum().backward()
    assert a.grad is not None
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    assert all(p.grad is None for p in alex.parameters())


@pytest.mark.parametrize("net,side", [("alex", 24), ("vgg", 8)])
def test_lpips_on_images_its_backbone_pools_to_nothing_is_a_clear_error(net, side):
    """Crops that are multiples of 8 but below what the backbone's pooling needs (data.crop=24 with LPIPS-alex) are
    a ValueError naming the size and the keys, not torch's "Output size is too small" from inside the backbone."""
    lp = LPIPS(net, pretrained=False)
    a, b = _pair(1, side, seed=6)
    with pytest.raises(ValueError, match=rf"LPIPS-{net} needs images of at least \d+ px a side, got {side} x {side}"):
        lp(a, b)
    wide = torch.rand(1, 3, MIN_SIDE[net], 3 * MIN_SIDE[net])
    assert torch.isfinite(lp(wide, wide.flip(-1))).all()  # the smallest side that works, non-square


def test_lpips_description(alex):
    assert alex.description == "lpips-alex (RANDOM backbone: not real LPIPS)"


# --------------------------------------------------------------------------------------------- pixel


def test_pixel_loss_is_mean_abs_diff():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 5, 7, generator=gen), torch.rand(2, 3, 5, 7, generator=gen)
    assert torch.allclose(pixel_loss(a, b), (a - b).abs().mean())
    assert pixel_loss(a, a).item() == 0.0
    x = torch.zeros(1, 1, 2, 2)
    y = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    assert pixel_loss(x, y).item() == pytest.approx(2.5 / 4)
    out = pixel_loss(a.bfloat16(), b.bfloat16())
    assert out.dtype == torch.float32


# --------------------------------------------------------------------------------------------- adversarial


def test_critic_loss_bce():
    real = torch.full((2, 1, 3, 3), 10.0)
    fake = torch.full((2, 1, 3, 3), -10.0)
    good = critic_loss(real, fake, "bce")
    assert 0 < good.item() < 1e-3
    assert good.item() == pytest.approx(2 * math.log1p(math.exp(-10)), rel=1e-2)  # float32: ~0.4% off
    assert critic_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(2 * math.log(2), rel=1e-6)
    bad = critic_loss(fake, real, "bce")  # fooled both ways
    assert bad.item() == pytest.approx(2 * (10 + math.log1p(math.exp(-10))), rel=1e-4)
    assert critic_loss(real.bfloat16(), fake.bfloat16()).dtype == torch.float32


def test_critic_loss_hinge():
    assert critic_loss(torch.full((4,), 2.0), torch.full((4,), -2.0), "hinge").item() == 0.0
    assert critic_loss(torch.zeros(4), torch.zeros(4), "hinge").item() == pytest.approx(2.0)
    real = torch.tensor([0.5, 3.0])  # relu(1-r): 0.5, 0 -> mean 0.25
    fake = torch.tensor([0.25, -4.0])  # relu(1+f): 1.25, 0 -> mean 0.625
    assert critic_loss(real, fake, "hinge").item() == pytest.approx(0.875)


def test_generator_adv_loss():
    assert generator_adv_loss(torch.zeros(3), "bce").item() == pytest.approx(math.log(2), rel=1e-6)
    assert generator_adv_loss(torch.full((3,), 10.0), "bce").item() < 1e-4
    assert generator_adv_loss(torch.full((3,), -10.0), "bce").item() == pytest.approx(10.0, rel=1e-4)
    assert generator_adv_loss(torch.tensor([1.0, 3.0]), "hinge").item() == pytest.approx(-2.0)
    fake = torch.tensor([0.3, -0.7], requires_grad=True)
    generator_adv_loss(fake, "bce").backward()
    assert (fake.grad < 0).all()  # pushes the fake logits up (towards "real")


def test_chroma_weighted_pixel_loss():
    """chroma_weight 1 is plain RGB L1; otherwise L1 on Y/Cb/Cr with the chroma planes weighted: an error
    that is pure chroma (luma unchanged) costs more with weight 4 than with 0.25."""
    import torch

    from dist_dejpeg.jpeg.formats import JFIF_YCBCR
    from dist_dejpeg.train.losses import pixel_loss

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 8, 8, generator=g) * 0.5 + 0.25
    assert pixel_loss(clean + 0.1, clean) == pytest.approx(0.1)
    rgb_of_cb = torch.linalg.inv(torch.tensor(JFIF_YCBCR))[:, 1]  # RGB direction that moves only Cb
    chroma_err = clean + 0.05 * rgb_of_cb.view(1, 3, 1, 1)
    heavy, light = pixel_loss(chroma_err, clean, 4.0), pixel_loss(chroma_err, clean, 0.25)
    assert heavy == pytest.approx(0.05 * 4 / 9, rel=1e-4) and light == pytest.approx(0.05 * 0.25 / 1.5, rel=1e-4)
    luma_err = clean + 0.05  # grey shift: Y only
    assert pixel_loss(luma_err, clean, 4.0) == pytest.approx(0.05 / 9, rel=1e-4)


def test_charbonnier_is_l1_away_from_zero_and_smooth_at_zero():
    """loss.pixel=charbonnier: mean sqrt(d^2 + 1e-3^2); within eps^2 / 2|d| of L1 for large differences, eps at
    d = 0 with a zero (finite) gradient there, where L1's is undefined."""
    from dist_dejpeg.train.losses import CHARBONNIER_EPS

    g = torch.Generator().manual_seed(1)
    clean = torch.rand(2, 3, 8, 8, generator=g)
    sign = torch.randint(0, 2, clean.shape, generator=g) * 2 - 1
    restored = clean + sign * (0.1 + 0.4 * torch.rand(clean.shape, generator=g))  # |d| in [0.1, 0.5]
    l1, charb = pixel_loss(restored, clean), pixel_loss(restored, clean, pixel="charbonnier")
    assert 0 < (charb - l1).item() < CHARBONNIER_EPS ** 2 / (2 * 0.1) + 1e-6
    assert charb.item() == pytest.approx(torch.sqrt((restored - clean) ** 2 + 1e-6).mean().item(), rel=1e-6)

    same = clean.clone().requires_grad_(True)
    at_zero = pixel_loss(same, clean, pixel="charbonnier")
    assert at_zero.item() == pytest.approx(CHARBONNIER_EPS)
    at_zero.backward()
    assert torch.isfinite(same.grad).all() and same.grad.abs().max().item() == 0.0
    tiny = (clean + 1e-4).requires_grad_(True)  # inside eps: a gradient ~ d / eps, far below L1's 1 / n
    pixel_loss(tiny, clean, pixel="charbonnier").backward()
    assert tiny.grad.max().item() == pytest.approx(0.1 / clean.numel(), rel=0.01)
    assert pixel_loss(restored.bfloat16(), clean.bfloat16(), pixel="charbonnier").dtype == torch.float32
    with pytest.raises(ValueError, match="huber"):
        pixel_loss(restored, clean, pixel="huber")


def test_charbonnier_with_chroma_weight_penalises_each_plane():
    """The YCbCr branch applies the same penalty per plane: a pure Cb error costs ~its Charbonnier value times
    the chroma share of the weights, as L1 does, and an error-free image costs eps."""
    from dist_dejpeg.jpeg.formats import JFIF_YCBCR
    from dist_dejpeg.train.losses import CHARBONNIER_EPS

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 8, 8, generator=g) * 0.5 + 0.25
    rgb_of_cb = torch.linalg.inv(torch.tensor(JFIF_YCBCR))[:, 1]
    chroma_err = clean + 0.05 * rgb_of_cb.view(1, 3, 1, 1)
    plane = math.sqrt(0.05 ** 2 + CHARBONNIER_EPS ** 2)  # the Cb plane's penalty; Y and Cr cost eps
    heavy = pixel_loss(chroma_err, clean, 4.0, pixel="charbonnier")
    assert heavy.item() == pytest.approx((CHARBONNIER_EPS + 4 * plane + 4 * CHARBONNIER_EPS) / 9, rel=1e-3)
    assert heavy > pixel_loss(chroma_err, clean, 0.25, pixel="charbonnier")
    assert pixel_loss(clean, clean, 4.0, pixel="charbonnier").item() == pytest.approx(CHARBONNIER_EPS)
