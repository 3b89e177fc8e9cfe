"""Critic: DeOldify-style spectral-norm conv critic with self-attention and dropout; patch logits.

    stem conv 4x4/2 -> Dropout2d(p/2) -> conv 3x3
    n_blocks x [conv 3x3 -> Dropout2d(p) -> conv 4x4/2 (x2 channels; self-attention in the first)]
    conv 3x3 -> conv 4x4 (valid) to one channel: N x 1 x h x w logits, one per patch

Spectral norm everywhere, LeakyReLU 0.2, no batch norm (as DeOldify's gan_critic).

``paired=True`` (the critic step's [real; fake] batch of the same crops): image i and image i + N/2 share each
dropout mask. A crop's content is far larger than what tells its restored version from it; with independent
masks the content's share of the logits differs between the two and that noise swamps the difference (the
critic stayed at chance, loss 2 ln 2, on clean vs q10 crops for 1000 steps; shared masks: below 0.8 by 150).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_dejpeg.config import CriticConfig
from dist_dejpeg.models.layers import ConvBlock, conv

SLOPE = 0.2


class PairedDropout2d(nn.Dropout2d):
    """Dropout2d that, given ``paired=True``, draws each channel mask once for image i and image i + N/2."""

    def forward(self, x: torch.Tensor, paired: bool = False) -> torch.Tensor:
        if not (paired and self.training and self.p > 0):
            return super().forward(x)
        if x.shape[0] % 2:
            raise ValueError(f"a paired critic batch holds real and fake halves; got {x.shape[0]} images")
        mask = super().forward(x.new_ones(x.shape[0] // 2, x.shape[1], 1, 1))  # 0 or 1 / (1 - p)
        return x * torch.cat([mask, mask])


class Critic(nn.Module):
    """The defaults are CriticConfig's (the one source of them); :func:`build_critic` builds one from a config."""

    def __init__(self, width: int = CriticConfig.width, n_blocks: int = CriticConfig.n_blocks,
                 dropout: float = CriticConfig.dropout, self_attention: bool = CriticConfig.self_attention):
        super().__init__()

        def block(ni, nf, ks, stride=1, attention=False):
            return ConvBlock(ni, nf, ks, stride, sn=True, norm="none", attention=attention, slope=SLOPE)

        layers = [block(3, width, 4, 2), PairedDropout2d(dropout / 2), block(width, width, 3)]
        nf = width
        for i in range(n_blocks):
            layers += [block(nf, nf, 3), PairedDropout2d(dropout),
                       block(nf, nf * 2, 4, 2, attention=self_attention and i == 0)]
            nf *= 2
        layers += [block(nf, nf, 3), conv(nf, 1, 4, sn=True, bias=False, padding=0, slope=SLOPE)]
        self.net = nn.Sequential(*layers)
        self.min_size = CriticConfig(n_blocks=n_blocks).min_size

    def forward(self, image: torch.Tensor, paired: bool = False) -> torch.Tensor:
        """image: N x 3 x H x W in [0, 1] (H, W >= min_size); returns N x 1 x h x w patch logits. ``paired``:
        the batch is [real; fake] of the same crops (see the module's docstring)."""
        if min(image.shape[-2:]) < self.min_size:
            raise ValueError(f"critic input {tuple(image.shape[-2:])} is smaller than its minimum "
                             f"{self.min_size} px (raise data.crop or lower critic.n_blocks)")
        x = image * 2 - 1
        for layer in self.net:
            x = layer(x, paired) if isinstance(layer, PairedDropout2d) else layer(x)
        return x


def build_critic(critic_cfg: CriticConfig) -> Critic:
    return Critic(width=critic_cfg.width, n_blocks=critic_cfg.n_blocks, dropout=critic_cfg.dropout,
                  self_attention=critic_cfg.self_attention)
