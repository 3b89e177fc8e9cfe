"""Training losses: the pixel loss (L1 or Charbonnier; RGB, or YCbCr with a chroma weight) and the adversarial
losses. LPIPS, the perceptual loss, is a frozen network: dist_dejpeg.models.lpips.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

CHARBONNIER_EPS = 1e-3  # sqrt(d^2 + eps^2): MPRNet's / Restormer's Charbonnier constant for [0, 1] images


def penalty(diff: torch.Tensor, pixel: str) -> torch.Tensor:
    """Per-element pixel penalty: |d| ("l1") or sqrt(d^2 + eps^2) ("charbonnier": ~|d| away from 0, smooth at 0,
    so small residuals get small gradients instead of L1's constant push)."""
    if pixel == "l1":
        return diff.abs()
    if pixel == "charbonnier":
        return torch.sqrt(diff * diff + CHARBONNIER_EPS ** 2)
    raise ValueError(f"pixel loss {pixel!r} is not one of ['l1', 'charbonnier']")


def pixel_loss(restored: torch.Tensor, clean: torch.Tensor, chroma_weight: float = 1.0,
               pixel: str = "l1") -> torch.Tensor:
    """Mean ``pixel`` penalty (see :func:`penalty`) on RGB; with ``chroma_weight`` != 1, on JPEG's Y, Cb, Cr
    planes with Cb and Cr weighted by it (normalised by the mean weight): the chroma that 4:2:0 throws away
    counts more (or less)."""
    if chroma_weight == 1.0:
        if pixel == "l1":
            return F.l1_loss(restored.float(), clean.float())
        return penalty(restored.float() - clean.float(), pixel).mean()
    m, w = _plane_weights(restored.device, chroma_weight)
    diff = penalty(torch.einsum("ij,njhw->nihw", m, restored.float() - clean.float()), pixel).mean(dim=(0, 2, 3))
    return (diff * w).sum() / w.sum()


@functools.lru_cache(maxsize=8)
def _plane_weights(device: torch.device, chroma_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The RGB -> YCbCr matrix and the planes' weights on ``device``, made once: a tensor made from Python numbers
    on a GPU is a blocking copy, and the step must never wait for the GPU (issue 24)."""
    from dist_dejpeg.jpeg.formats import JFIF_YCBCR

    return (torch.tensor(JFIF_YCBCR, device=device),
            torch.tensor([1.0, chroma_weight, chroma_weight], device=device))


def critic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Critic: real -> 1, fake -> 0 (BCE-with-logits), or the hinge loss."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def generator_adv_loss(fake_logits: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Generator: make the critic call its output real."""
    fake_logits = fake_logits.float()
    if kind == "hinge":
        return -fake_logits.mean()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
