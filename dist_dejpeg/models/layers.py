"""DeOldify-style building blocks: spectral-norm convs, ICNR pixel shuffle with blur, self-attention.

Plain ``nn.Module``s with no training logic. Written from the published descriptions (fastai / DeOldify,
SAGAN), not copied. And :func:`fold_batch_norms`, which folds a timm encoder's batch norms into its convolutions for
inference (generator_file.ready_for_inference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

# LeakyReLU rather than DeOldify's ReLU: with a zero-initialised output conv a dead ReLU in front of it
# leaves the residual head stuck at exactly zero on some seeds (seen in ../shared/ENV.md's experiments).
ACT_SLOPE = 0.1


def act(slope: float = ACT_SLOPE) -> nn.Module:
    return nn.LeakyReLU(slope, inplace=True)


def conv(ni: int, nf: int, ks: int = 3, stride: int = 1, sn: bool = True, bias: bool = True,
         padding: int | None = None, slope: float = ACT_SLOPE) -> nn.Module:
    layer = nn.Conv2d(ni, nf, ks, stride=stride, padding=(ks - 1) // 2 if padding is None else padding, bias=bias)
    nn.init.kaiming_normal_(layer.weight, a=slope, nonlinearity="leaky_relu")
    if bias:
        nn.init.zeros_(layer.bias)
    return spectral_norm(layer) if sn else layer


NORMS = ("batch", "group", "none")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The decoder's normalisation: ``batch`` (DeOldify's; running statistics learned from the training crops),
    ``group`` (GroupNorm, up to 8 groups: each image's own statistics, the same in training and at test time)
    or ``none``."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"decoder norm must be one of {', '.join(NORMS)}, got {kind!r}")


class ConvBlock(nn.Sequential):
    """conv (spectral norm) -> act -> norm -> optional self-attention, DeOldify's custom_conv_layer."""

    def __init__(self, ni: int, nf: int, ks: int = 3, stride: int = 1, sn: bool = True,
                 norm: str = "batch", attention: bool = False, slope: float = ACT_SLOPE):
        layers = [conv(ni, nf, ks, stride, sn=sn, bias=norm == "none", slope=slope), act(slope)]
        if norm != "none":
            layers.append(norm_layer(norm, nf))
        if attention:
            layers.append(SelfAttention(nf, sn=sn))
        super().__init__(*layers)


def icnr_(weight: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """ICNR init (Aitken et al. 2017): sub-kernels of one output pixel group start equal, so that the
    pixel shuffle starts as nearest-neighbour upsampling and makes no checkerboard."""
    out_ch, in_ch, kh, kw = weight.shape
    sub = torch.empty(out_ch // scale**2, in_ch, kh, kw)
    nn.init.kaiming_normal_(sub, a=ACT_SLOPE, nonlinearity="leaky_relu")
    with torch.no_grad():
        weight.copy_(sub.repeat_interleave(scale**2, dim=0))
    return weight


class Blur(nn.Module):
    """fastai's blur after a pixel shuffle: replicate the first row and column, then a 2x2 average with stride 1
    (same size out). The replication is a concatenation, not ReplicationPad2d: inductor's compiled
    replication_pad2d_backward assumes contiguous strides and fails on channels_last tensors (seen with torch
    2.14 on the CPU); same values either way (tested)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(2, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, :, :1], x], dim=2)
        return self.pool(torch.cat([x[:, :, :, :1], x], dim=3))


class PixelShuffleICNR(nn.Module):
    """1x1 conv to ``nf * scale**2`` channels (ICNR init), act, pixel shuffle, then an optional blur
    (replication pad + 2x2 average pool, stride 1). Unlike DeOldify's version, ``blur=False`` really
    turns the blur off."""

    def __init__(self, ni: int, nf: int, scale: int = 2, blur: bool = True, sn: bool = True):
        super().__init__()
        layer = nn.Conv2d(ni, nf * scale**2, 1)
        icnr_(layer.weight, scale)
        nn.init.zeros_(layer.bias)
        self.conv = spectral_norm(layer) if sn else layer
        self.act = act()
        self.shuffle = nn.PixelShuffle(scale)
        self.blur = Blur() if blur else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shuffle(self.act(self.conv(x)))
        return self.blur(x) if self.blur is not None else x


class SelfAttention(nn.Module):
    """SAGAN self-attention over all positions; starts as identity (gamma = 0). Uses PyTorch's fused
    scaled-dot-product attention so memory stays linear in the number of positions on GPU kernels."""

    def __init__(self, channels: int, sn: bool = True):
        super().__init__()
        inner = max(channels // 8, 1)
        wrap = spectral_norm if sn else (lambda m: m)
        self.query = wrap(nn.Conv1d(channels, inner, 1, bias=False))
        self.key = wrap(nn.Conv1d(channels, inner, 1, bias=False))
        self.value = wrap(nn.Conv1d(channels, channels, 1, bias=False))
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        flat = x.flatten(2)  # N, C, HW
        q = self.query(flat).transpose(1, 2)  # N, HW, C/8
        k = self.key(flat).transpose(1, 2)
        v = self.value(flat).transpose(1, 2)  # N, HW, C
        if torch.is_inference_mode_enabled() and x.device.type == "cpu":
            out = cpu_attention(q, k, v)
        else:
            # SAGAN's dot products are unscaled; the usual 1/sqrt(d) scale keeps the logits in fp16 range.
            out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        out = out.transpose(1, 2).reshape(n, c, h, w)
        return x + self.gamma * out


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v) (N x L x d, N x L x d, N x L x C), equal up to float rounding,
    for restoring on the CPU. Queries and keys narrower than the values (C/8 vs C) send SDPA on the CPU to its
    math path, which holds the whole N x L x L score matrix (4 x 64 MB for a batch of four 512 px tiles) and
    spends a quarter of its time on masking checks; zero-padded to C (dot products unchanged, the scale given
    explicitly) they take the fused flash kernel: blocked, ~5x faster here (2 cores), memory linear in L."""
    d, pad = q.shape[-1], v.shape[-1] - q.shape[-1]
    if pad > 0:
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
    return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.contiguous().unsqueeze(1),
                                          scale=d ** -0.5).squeeze(1)


class ResBlock(nn.Module):
    """Two conv blocks with an identity shortcut (DeOldify's res_block before the output conv)."""

    def __init__(self, channels: int, sn: bool = True, norm: str = "batch"):
        super().__init__()
        self.body = nn.Sequential(ConvBlock(channels, channels, sn=sn, norm=norm),
                                  ConvBlock(channels, channels, sn=sn, norm=norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


# timm's encoder blocks: (convolution, the batch norm its output goes to and nothing else), in their forward's order
_CONV_BN = {"MobileNetV3Features": (("conv_stem", "bn1"),), "MobileNetV3": (("conv_stem", "bn1"),),
            "EfficientNetFeatures": (("conv_stem", "bn1"),), "EfficientNet": (("conv_stem", "bn1"),),
            "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
            "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
            "ConvBnAct": (("conv", "bn1"),), "EdgeResidual": (("conv_exp", "bn1"), ("conv_pwl", "bn2"))}


def fold_batch_norms(generator: torch.nn.Module) -> int:
    """Each eval-mode batch norm of a timm encoder block that directly follows a plain convolution (_CONV_BN)
    computed into that convolution's weight and bias (torch's fuse_conv_bn_weights), the norm replaced by what it
    did after normalizing (timm's BatchNormAct2d: its dropout and activation; a plain BatchNorm2d: nothing): the
    same outputs up to float rounding, 36 fewer passes over the encoder's activations (a 512 px tile 1.07x, a 12 MP
    restore_rgb 1.05x on a 2-core CPU: medians of paired runs). Other modules (the decoder's group norms, a block
    type not listed, a subclassed norm) are left as they are. Returns how many were folded. Inference only: the
    state dict's keys change."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # (no timm: no timm blocks)
        return 0
    folded = 0
    for module in list(generator.modules()):
        if not type(module).__module__.startswith("timm."):
            continue
        for conv_name, bn_name in _CONV_BN.get(type(module).__name__, ()):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if (type(conv) is not torch.nn.Conv2d or type(bn) not in (torch.nn.BatchNorm2d, BatchNormAct2d)
                    or bn.training or bn.running_mean is None or bn.running_var is None):
                continue
            with torch.no_grad():
                weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                    bn.weight, bn.bias)
            conv.weight, conv.bias = weight, bias
            rest = (torch.nn.Sequential(bn.drop, bn.act) if type(bn) is BatchNormAct2d else torch.nn.Identity())
            setattr(module, bn_name, rest.eval())
            folded += 1
    return folded
