"""Generator: U-Net with a timm ``features_only`` encoder and a DeOldify-style decoder, residual output.

    degraded [0,1] --(the encoder's pretrained_cfg mean, std)--> encoder stages (strides s1..sn; NCHW)
        --> middle convs --> n-1 up blocks (ICNR pixel shuffle + blur, skip via decoder_norm, conv; one with
            self-attention) --> pixel shuffle to full size --> concat the input --> res block --> 1x1 conv
        --> correction;  restored = clamp(degraded + correction, 0, 1)

The output conv starts at zero, so an untrained generator returns its input (a good start for artefact
removal); LeakyReLU in front of it keeps that head from dying (see layers.ACT_SLOPE).

Quality conditioning (``quality_conditioning=True``): the per-sample JPEG quality (1..100; 0 or None:
unknown) goes through a small embedding whose output scales and shifts (FiLM) the middle and each up
block's features. An unknown quality uses a learned "unknown" embedding, trained by hiding the quality of
some samples (``train`` does that), so one model runs with or without the quality. The FiLM heads start
at zero: a new conditioned generator computes exactly what the unconditioned one would.
Any H x W works: the input is padded to the encoder's largest stride and the output cropped back.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from dist_dejpeg.config import ConfigError, ModelConfig
from dist_dejpeg.models.layers import ConvBlock, PixelShuffleICNR, ResBlock, act, norm_layer
from dist_dejpeg.models.weights import EncoderError, check_any_size, create_encoder, encoder_strides


class UpBlock(nn.Module):
    """DeOldify's UnetBlockWide: upsample the deeper features, batch-norm the skip, concat, conv."""

    def __init__(self, up_in: int, skip_in: int, out: int, scale: int, blur: bool, sn: bool, attention: bool,
                 norm: str):
        super().__init__()
        half = max(out // 2, 8)
        self.up = (PixelShuffleICNR(up_in, half, scale, blur=blur, sn=sn) if scale > 1
                   else ConvBlock(up_in, half, 1, sn=sn, norm=norm))
        self.skip_bn = norm_layer(norm, skip_in)
        self.act = act()
        self.conv = ConvBlock(half + skip_in, out, sn=sn, norm=norm, attention=attention)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(deep)
        if up.shape[-2:] != skip.shape[-2:]:  # encoders whose stages do not divide exactly
            up = F.interpolate(up, size=skip.shape[-2:], mode="nearest")
        return self.conv(self.act(torch.cat([up, self.skip_bn(skip)], dim=1)))


class QualityFiLM(nn.Module):
    """JPEG quality -> one (scale, shift) pair per channel of each conditioned decoder stage (FiLM, Perez et al.
    2018). Known qualities are embedded from q/100; unknown ones (q <= 0) use a learned vector. Both paths are
    computed for every batch (blended by a mask), so every parameter takes part in every step (DDP needs it)."""

    def __init__(self, channels: list[int], dim: int = 64):
        super().__init__()
        self.channels = list(channels)
        self.known = nn.Linear(1, dim)
        self.unknown = nn.Parameter(torch.randn(dim) * 0.5)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim), nn.SiLU())
        self.heads = nn.Linear(dim, 2 * sum(channels))
        nn.init.zeros_(self.heads.weight)
        nn.init.zeros_(self.heads.bias)

    def forward(self, quality: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        q = quality.float().view(-1, 1)
        known = (q > 0).to(self.unknown.dtype)
        emb = known * self.known(q.clamp(0, 100) / 100) + (1 - known) * self.unknown
        out = self.heads(self.mlp(emb))
        films, start = [], 0
        for c in self.channels:
            scale, shift = out[:, start:start + c], out[:, start + c:start + 2 * c]
            films.append((1 + scale[..., None, None], shift[..., None, None]))
            start += 2 * c
        return films


class Generator(nn.Module):
    """The defaults are ModelConfig's (the one source of them): ``Generator()`` builds what a user of the default
    config trains. :func:`build_generator` builds one from a ModelConfig."""

    def __init__(self, encoder: str = ModelConfig.encoder, pretrained: bool = ModelConfig.pretrained,
                 encoder_weights: str = ModelConfig.encoder_weights, encoder_depth: int = ModelConfig.encoder_depth,
                 decoder_width: int = ModelConfig.decoder_width,
                 blur: bool = ModelConfig.blur, self_attention: bool = ModelConfig.self_attention,
                 attention_stride: int = ModelConfig.attention_stride, spectral_norm: bool = ModelConfig.spectral_norm,
                 decoder_norm: str = ModelConfig.decoder_norm,
                 quality_conditioning: bool = ModelConfig.quality_conditioning, keep_mean: bool = ModelConfig.keep_mean,
                 *, resolved: dict | None = None):
        super().__init__()
        self.keep_mean = keep_mean
        if encoder_depth == 1 or encoder_depth < 0:
            raise ValueError(f"encoder_depth must be 0 (all stages) or at least 2, got {encoder_depth}")
        self.encoder = create_encoder(encoder, pretrained, encoder_weights, encoder_depth, resolved)
        chans = self.encoder.feature_info.channels()
        strides = self.encoder.feature_info.reduction()
        for a, b in zip(strides, strides[1:]):
            if b % a or (b // a) & (b // a - 1):
                raise EncoderError(f"encoder '{encoder}': stage strides {strides} are not powers-of-two steps")
        if strides[0] & (strides[0] - 1):
            raise EncoderError(f"encoder '{encoder}': first stage stride {strides[0]} is not a power of two")
        check_any_size(self.encoder, encoder, strides[-1])
        cfg = getattr(self.encoder, "pretrained_cfg", {}) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.pad_to = strides[-1]
        self.strides = list(strides)
        # timm's channels-last families (MambaOut, ...) hand their features over as N x H x W x C
        self.nhwc = getattr(self.encoder, "output_fmt", "NCHW") == "NHWC"  # (timm's Format is a str enum)

        width = decoder_width
        norm = decoder_norm
        self.middle = nn.Sequential(norm_layer(norm, chans[-1]), act(),
                                    ConvBlock(chans[-1], width, sn=spectral_norm, norm=norm),
                                    ConvBlock(width, width, sn=spectral_norm, norm=norm))
        # Put attention at the requested stride, or the nearest available one (attention_note says which)
        attn_at = nearest_stride(strides[:-1], attention_stride)
        self.attention_at = attn_at if self_attention else None  # (the ONNX export records it: its memory guard)
        self.attention_stride = attention_stride
        blocks, outs, prev, prev_stride = [], [], width, strides[-1]
        for i in range(len(chans) - 2, -1, -1):
            out = max(decoder_width >> (len(chans) - 1 - i), 16)
            blocks.append(UpBlock(prev, chans[i], out, prev_stride // strides[i], blur, spectral_norm,
                                  attention=self_attention and strides[i] == attn_at, norm=norm))
            prev, prev_stride = out, strides[i]
            outs.append(out)
        self.blocks = nn.ModuleList(blocks)
        self.final_up = (PixelShuffleICNR(prev, prev, strides[0], blur=blur, sn=spectral_norm) if strides[0] > 1
                         else nn.Identity())
        self.final_res = ResBlock(prev + 3, sn=spectral_norm, norm=norm)
        self.head = nn.Conv2d(prev + 3, 3, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # last, so that the other layers draw the same initial weights with or without it
        self.conditioned = quality_conditioning
        self.film = QualityFiLM([width, *outs]) if quality_conditioning else None

    def correction(self, degraded: torch.Tensor, quality: torch.Tensor | None = None, size=None) -> torch.Tensor:
        """The restoring correction of ``degraded``, cropped to ``size`` (h, w; default: the input's own) before
        keep_mean centres it: an input padded by the caller (the ONNX export's) is centred over the image alone."""
        H, W = degraded.shape[-2:]
        h, w = size or (H, W)
        ph, pw = (-H) % self.pad_to, (-W) % self.pad_to
        x = degraded
        if ph or pw:
            mode = "reflect" if ph < H and pw < W else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        normed = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = self.encoder(normed)
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        y = self.middle(feats[-1])
        films = self.film(self._quality(quality, degraded)) if self.film is not None else None
        if films is not None:
            y = y * films[0][0].to(y.dtype) + films[0][1].to(y.dtype)
        for i, (block, skip) in enumerate(zip(self.blocks, reversed(feats[:-1]))):
            y = block(y, skip)
            if films is not None:
                y = y * films[i + 1][0].to(y.dtype) + films[i + 1][1].to(y.dtype)
        y = self.final_up(y)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:], mode="nearest")
        y = self.final_res(torch.cat([y, normed], dim=1))
        correction = self.head(y)[..., :h, :w]
        if self.keep_mean:  # each channel's correction sums to zero: the output keeps the input's mean colour
            correction = correction - correction.mean(dim=(-2, -1), keepdim=True)
        return correction

    @staticmethod
    def _quality(quality, degraded: torch.Tensor) -> torch.Tensor:
        n = degraded.shape[0]
        if quality is None:
            return torch.zeros(n, device=degraded.device)
        q = torch.as_tensor(quality, device=degraded.device).float().reshape(-1)
        return q.expand(n) if q.numel() == 1 else q

    def forward(self, degraded: torch.Tensor, quality: torch.Tensor | None = None) -> torch.Tensor:
        """degraded: N x 3 x H x W in [0, 1]; quality: the JPEG quality per sample (N values, or one for all;
        0 or None: unknown), used by a conditioned generator and ignored by a blind one. Returns the restored
        image, same shape, in [0, 1]."""
        return (degraded + self.correction(degraded, quality)).clamp(0.0, 1.0)


def nearest_stride(skip_strides, asked: int) -> int:
    """The skip stride nearest ``asked`` (in octaves; of two as near, the smaller): where the attention sits."""
    return min(skip_strides, key=lambda s: abs(math.log2(s) - math.log2(max(asked, 1))))


def attention_site(encoder: str, encoder_depth: int, self_attention: bool, attention_stride: int) -> int | None:
    """Where a generator of these config values puts its self-attention (Generator.attention_at: the encoder's skip
    stride nearest ``attention_stride``; None without one), from the encoder's strides alone (no model built); the
    asked stride where timm cannot tell the encoder's strides (its build fails anyway)."""
    if not self_attention:
        return None
    strides = encoder_strides(encoder, encoder_depth)
    return nearest_stride(strides[:-1], attention_stride) if strides and len(strides) > 1 else attention_stride


def attention_note(generator: Generator) -> str | None:
    """A warning's text where ``model.attention_stride`` is not one of the encoder's skip strides (the decoder puts
    the attention at the nearest one: a silent change of the asked memory and receptive field); None where it is,
    or where the generator has no self-attention."""
    at, asked = getattr(generator, "attention_at", None), getattr(generator, "attention_stride", None)
    if at is None or asked == at:
        return None
    return (f"model.attention_stride={asked} is not one of the encoder's skip strides {generator.strides[:-1]} (its "
            f"stages to stride {generator.strides[-1]}, model.encoder_depth): the self-attention sits at the nearest, "
            f"stride {at}")


def crop_note(generator: Generator, crop: int, batch_size: int, global_bn: bool = False) -> str | None:
    """A warning's text where the training crop (``data.crop``) is no multiple of the encoder's largest stride: the
    U-Net pads each crop up to one (a share of every step's work on padding, and the deepest stages see the padded
    border); None where it is. A ConfigError where the crop leaves the deepest stage one position and a device's
    batch holds one crop (``batch_size``): batch norm has one value a channel there, which fails the first step
    deep in the model ("Expected more than 1 value per channel when training"); not where ``global_bn`` (model.sync_bn
    in several processes: SyncBatchNorm, or on the CPU GlobalBatchStats, counts the global batch's values)."""
    stride = generator.pad_to
    padded = -(-crop // stride) * stride
    if padded == stride and batch_size < 2 and not global_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                   for m in generator.modules()):
        raise ConfigError(f"config key 'data.crop': {crop} px with data.batch_size={batch_size} leaves the encoder's "
                          f"deepest stage (stride {stride}) one position of one crop, which its batch norm cannot "
                          f"train on: the smallest crop that works here is {2 * stride} px (data.crop={2 * stride}), "
                          f"or set data.batch_size=2 or more")
    if padded == crop:
        return None
    fits = [c for c in (crop // stride * stride, padded) if c]
    return (f"data.crop={crop} is no multiple of the encoder's largest stride {stride} (model.encoder, "
            f"model.encoder_depth): each crop is padded to {padded} px, {1 - crop * crop / padded ** 2:.0%} of each "
            f"step's pixels are padding; data.crop={' or '.join(map(str, fits))} wastes none")


def generator_notes(generator: Generator, data_cfg, global_bn: bool = False) -> list[str]:
    """What a run's start warns of its generator (attention_note, crop_note: ``data_cfg``'s crop and batch size;
    ``global_bn``: model.sync_bn in several processes)."""
    return [n for n in (attention_note(generator), crop_note(generator, data_cfg.crop, data_cfg.batch_size, global_bn))
            if n]


# the ModelConfig keys that describe the module (the others are training settings: channels_last, sync_bn, ...)
GENERATOR_KEYS = tuple(k for k, p in inspect.signature(Generator).parameters.items() if p.kind is not p.KEYWORD_ONLY)


def build_generator(model_cfg: ModelConfig, resolved: dict | None = None) -> Generator:
    """The Generator ``model_cfg`` describes; ``resolved``: what its source-prefixed encoder name resolved to when the
    generator file was saved (weights.encoder_resolved), built from that instead of the folder or hub it names."""
    return Generator(**{key: getattr(model_cfg, key) for key in GENERATOR_KEYS}, resolved=resolved)
