"""Generator (timm U-Net), its building blocks, the critic, safetensors export and weight loading.

Everything runs on CPU with random-init backbones (no network): small decoder widths, small inputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import urllib.error

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from dist_dejpeg.config import CriticConfig, ModelConfig
from dist_dejpeg.models.generator_file import FORMAT, load_generator, read_metadata, save_generator
from dist_dejpeg.models.critic import Critic
from dist_dejpeg.models.layers import PixelShuffleICNR, SelfAttention, icnr_
from dist_dejpeg.models.unet import GENERATOR_KEYS, Generator, build_generator
from dist_dejpeg.models.weights import EncoderError, WeightsError, create_encoder

ENCODERS = ["mobilenetv3_large_100", "mobilenetv3_small_050", "resnet18", "efficientnet_b0", "convnext_atto"]
SIZES = [(37, 53), (64, 64), (33, 97), (8, 8)]
WIDTH = 32


def _generator(encoder: str = "mobilenetv3_small_050", seed: int = 0, **kwargs) -> Generator:
    torch.manual_seed(seed)
    kwargs.setdefault("decoder_width", WIDTH)
    return Generator(encoder=encoder, pretrained=False, **kwargs)


def _decoder_modules(g: Generator) -> list[nn.Module]:
    return [g.middle, *g.blocks, g.final_up, g.final_res]


# --------------------------------------------------------------------------------------------- generator


@pytest.mark.parametrize("encoder", ENCODERS)
def test_generator_shape_range_identity_start_and_head_learns(encoder):
    g = _generator(encoder)
    g.train()
    gen = torch.Generator().manual_seed(1)
    for h, w in SIZES:
        # values outside [0, 1] too: the output is the input clamped, exactly (zero-initialised head)
        x = torch.rand(2, 3, h, w, generator=gen) * 1.2 - 0.1
        y = g(x)
        assert y.shape == x.shape, (encoder, h, w)
        assert y.min() >= 0.0 and y.max() <= 1.0
        assert torch.equal(y, x.clamp(0.0, 1.0)), f"{encoder} {h}x{w}: untrained generator is not the identity"

    # One optimizer step on L1 toward a different target: the head must move (not stuck at zero).
    x = torch.rand(2, 3, 37, 53, generator=gen) * 0.8 + 0.1  # away from the clamp bounds
    target = 1.0 - x
    opt = torch.optim.Adam(g.parameters(), lr=1e-3)
    loss0 = (g(x) - target).abs().mean()
    opt.zero_grad()
    loss0.backward()
    assert g.head.weight.grad is not None and g.head.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        y = g(x)
        loss1 = (y - target).abs().mean()
    assert not torch.equal(y, x), f"{encoder}: output still equals the input after one step"
    assert (y - x).abs().max() > 1e-6
    assert loss1 < loss0


@pytest.mark.parametrize("encoder", ["mobilenetv3_small_050", "convnext_atto"])
def test_generator_output_clamped_with_large_head(encoder):
    g = _generator(encoder).eval()
    with torch.no_grad():
        nn.init.normal_(g.head.weight, std=2.0)
        nn.init.normal_(g.head.bias, std=2.0)
        x = torch.rand(1, 3, 33, 97, generator=torch.Generator().manual_seed(2))
        y = g(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert not torch.equal(y, x)
    # a big random correction has to hit the bounds somewhere: the clamp is really applied
    assert ((y == 0.0) | (y == 1.0)).any()


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_channels_and_strides_match_feature_info(encoder):
    g = _generator(encoder).eval()
    info = g.encoder.feature_info
    chans, reductions = info.channels(), info.reduction()
    with torch.no_grad():
        feats = g.encoder(torch.randn(1, 3, 64, 64))
    assert len(feats) == len(chans) == len(reductions)
    for i, feat in enumerate(feats):
        assert feat.shape[1] == chans[i], (encoder, i)
        assert tuple(feat.shape[-2:]) == (64 // reductions[i], 64 // reductions[i]), (encoder, i)
    assert g.strides == list(reductions)
    assert g.pad_to == reductions[-1]
    assert len(g.blocks) == len(chans) - 1


def test_encoder_input_is_normalised_with_the_encoders_own_mean_and_std():
    """timm's pretrained_cfg, not ImageNet's numbers: TF-ported MobileNets expect [-1, 1] (mean = std = 0.5)."""
    g = _generator("tf_mobilenetv3_small_minimal_100").eval()
    assert g.mean.flatten().tolist() == g.std.flatten().tolist() == [0.5, 0.5, 0.5]
    seen = []
    g.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        g(torch.ones(1, 3, 32, 32))
    assert torch.equal(seen[0], torch.ones(1, 3, 32, 32))  # white is 1 for it


def test_an_encoder_with_channels_last_features_builds_and_trains():
    """timm's MambaOut family hands its features over as N x H x W x C (its output_fmt): the U-Net takes them as
    N x C x H x W like any other encoder's (it crashed in the decoder's first norm)."""
    g = _generator("mambaout_femto", decoder_width=16).train()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(g(x), x)  # the zero-initialised head: the identity
    nn.init.normal_(g.head.weight, std=0.1)
    (g(x) - 0.5).abs().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.encoder.stages_3.parameters())


def test_generator_pixel_shuffles_start_checkerboard_free():
    """ICNR in the built generator (not only in PixelShuffleICNR alone): without blur, every sub-pixel of each
    s x s block of every pixel shuffle's output is the same at init, spectral norm or not."""
    for sn in (True, False):
        g = _generator("convnext_atto", blur=False, spectral_norm=sn)  # (its last pixel shuffle is 4x)
        outs = []
        for m in g.modules():
            if isinstance(m, PixelShuffleICNR):
                m.register_forward_hook(lambda mod, args, out: outs.append((mod.shuffle.upscale_factor, out)))
        with torch.no_grad():
            g(torch.rand(1, 3, 64, 64))
        assert {s for s, _ in outs} == {2, 4}
        for s, out in outs:
            n, c, h, w = out.shape
            blocks = out.reshape(n, c, h // s, s, w // s, s)
            assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks)), (sn, s, out.shape)


def test_module_defaults_are_the_configs():
    """One source of defaults: Generator() and Critic() take ModelConfig's and CriticConfig's, so a model built
    without arguments (a test, a notebook) is the one the default config trains (Generator's one keyword-only
    argument aside: a generator file's record of what its encoder name resolved to, no config key)."""
    import inspect

    for cls, config in ((Generator, ModelConfig()), (Critic, CriticConfig())):
        params = {k: p for k, p in inspect.signature(cls).parameters.items() if p.kind is not p.KEYWORD_ONLY}
        assert params and {k: p.default for k, p in params.items()} == {k: getattr(config, k) for k in params}
    assert GENERATOR_KEYS == tuple(inspect.signature(Generator).parameters)[:-1]
    assert inspect.signature(Generator).parameters["resolved"].kind is inspect.Parameter.KEYWORD_ONLY
    assert set(GENERATOR_KEYS) < {f.name for f in dataclasses.fields(ModelConfig)}
    assert {f.name for f in dataclasses.fields(CriticConfig)} == set(inspect.signature(Critic).parameters)


# --------------------------------------------------------------------------------------------- layers


def test_icnr_groups_identical():
    torch.manual_seed(0)
    scale = 2
    w = torch.empty(16 * scale**2, 8, 3, 3)
    out = icnr_(w, scale)
    assert out is w
    groups = w.view(16, scale**2, 8, 3, 3)
    for j in range(1, scale**2):
        assert torch.equal(groups[:, j], groups[:, 0])
    # but different groups are different (not one kernel copied everywhere)
    assert not torch.equal(groups[0, 0], groups[1, 0])

    w3 = icnr_(torch.empty(4 * 9, 5, 1, 1), scale=3).view(4, 9, 5, 1, 1)
    assert torch.equal(w3, w3[:, :1].expand_as(w3))


@pytest.mark.parametrize("sn", [True, False])
def test_pixel_shuffle_icnr_starts_nearest_neighbour(sn):
    torch.manual_seed(0)
    up = PixelShuffleICNR(8, 6, scale=2, blur=False, sn=sn)
    assert up.blur is None
    const = torch.full((1, 8, 5, 7), 0.3)
    y = up(const)
    assert y.shape == (1, 6, 10, 14)
    assert torch.allclose(y, y[..., :1, :1].expand_as(y), atol=0, rtol=0), "constant in, constant out"
    assert y.abs().sum() > 0  # not trivially zero

    # any input: each 2x2 output block is constant (nearest-neighbour upsampling of something)
    x = torch.randn(2, 8, 5, 7)
    y = up(x)
    blocks = y.view(2, 6, 5, 2, 7, 2)
    assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))


def test_pixel_shuffle_icnr_blur_flag_changes_structure_and_output():
    torch.manual_seed(0)
    sharp = PixelShuffleICNR(8, 6, scale=2, blur=False, sn=False)
    blurred = PixelShuffleICNR(8, 6, scale=2, blur=True, sn=False)
    assert sharp.blur is None
    assert isinstance(blurred.blur, nn.Module)
    assert any(isinstance(m, nn.AvgPool2d) for m in blurred.modules())
    assert not any(isinstance(m, nn.AvgPool2d) for m in sharp.modules())
    blurred.load_state_dict(sharp.state_dict())  # same conv weights: only the blur differs
    x = torch.randn(1, 8, 5, 7)
    a, b = sharp(x), blurred(x)
    assert a.shape == b.shape == (1, 6, 10, 14)
    assert not torch.allclose(a, b)
    # the blur keeps constants constant
    c = blurred(torch.full((1, 8, 5, 7), 0.3))
    assert torch.allclose(c, c[..., :1, :1].expand_as(c), atol=1e-6)

    # the generator's blur flag reaches every pixel shuffle (DeOldify ignored it)
    g_sharp = _generator(blur=False)
    g_blur = _generator(blur=True)
    shuffles_sharp = [m for m in g_sharp.modules() if isinstance(m, PixelShuffleICNR)]
    shuffles_blur = [m for m in g_blur.modules() if isinstance(m, PixelShuffleICNR)]
    assert shuffles_sharp and len(shuffles_sharp) == len(shuffles_blur)
    assert all(m.blur is None for m in shuffles_sharp)
    assert all(m.blur is not None for m in shuffles_blur)


@pytest.mark.parametrize("sn", [True, False])
def test_self_attention_starts_as_identity(sn):
    torch.manual_seed(0)
    att = SelfAttention(16, sn=sn)
    assert att.gamma.shape == (1,) and att.gamma.item() == 0.0
    x = torch.randn(2, 16, 5, 7)
    y = att(x)
    assert y.shape == x.shape
    assert torch.equal(y, x)
    # once gamma moves, attention contributes
    with torch.no_grad():
        att.gamma.fill_(1.0)
    y = att(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, x)
    assert parametrize.is_parametrized(att.query, "weight") == sn


def test_spectral_norm_on_decoder_convs():
    g_sn = _generator(spectral_norm=True)
    g_plain = _generator(spectral_norm=False)
    convs_sn = [m for part in _decoder_modules(g_sn) for m in part.modules() if isinstance(m, nn.Conv2d)]
    convs_plain = [m for part in _decoder_modules(g_plain) for m in part.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs_sn) == len(convs_plain) > 0
    assert all(parametrize.is_parametrized(m, "weight") for m in convs_sn)
    assert not any(parametrize.is_parametrized(m, "weight") for m in convs_plain)
    block_convs = [m for m in g_sn.blocks.modules() if isinstance(m, nn.Conv2d)]
    assert block_convs and all(parametrize.is_parametrized(m, "weight") for m in block_convs)


@pytest.mark.parametrize("encoder", ["mobilenetv3_small_050", "convnext_atto"])
def test_exactly_one_decoder_block_has_self_attention(encoder):
    def attn_count(module):
        return sum(isinstance(m, SelfAttention) for m in module.modules())

    g = _generator(encoder, self_attention=True)
    per_block = [attn_count(b) for b in g.blocks]
    assert sum(per_block) == 1 and max(per_block) == 1
    assert attn_count(g) == 1  # nowhere else either
    # at the requested output stride (8 by default)
    idx = per_block.index(1)
    skip_strides = list(reversed(g.strides[:-1]))
    assert skip_strides[idx] == 8

    g = _generator(encoder, self_attention=False)
    assert attn_count(g) == 0


def test_attention_at_is_the_stride_the_attention_sits_at_and_another_ask_is_noted():
    """attention_stride=32 on a stride-16 U-Net put the attention at stride 8, silently, and nothing recorded it: the
    ONNX memory guard took 32 and under-estimated the score matrix 256x. The generator keeps where it is."""
    from dist_dejpeg.models.unet import attention_note

    g = _generator(encoder_depth=3, decoder_width=16)  # strides [2, 4, 8]: skips at 2 and 4; asked: 8 (the default)
    assert g.attention_at == 4
    assert [s for s, b in zip(reversed(g.strides[:-1]), g.blocks)
            if any(isinstance(m, SelfAttention) for m in b.modules())] == [4]
    note = attention_note(g)
    assert note and "model.attention_stride=8 is not one of the encoder's skip strides [2, 4]" in note
    assert note.endswith("the self-attention sits at the nearest, stride 4")
    assert attention_note(_generator(encoder_depth=3, decoder_width=16, attention_stride=4)) is None
    off = _generator(encoder_depth=3, decoder_width=16, self_attention=False)
    assert off.attention_at is None and attention_note(off) is None


def test_the_shape_keys_are_those_that_change_the_state_dict():
    """init_from refused a source with another blur or keep_mean as "a generator of other shapes", though neither
    makes a tensor. Each generator key, switched on a small generator: the shape keys (which init_from and resume
    compare) change the state_dict's keys or shapes, the others (GENERATOR_NO_TENSOR) do not."""
    from dist_dejpeg.train.init_from import GENERATOR_NO_TENSOR, GENERATOR_SHAPE_KEYS
    from dist_dejpeg.train.resume import GENERATOR_RESUME_KEYS

    base = dict(encoder_depth=3, decoder_width=16, attention_stride=4, decoder_norm="group")
    other = dict(encoder="mobilenetv3_small_075", encoder_depth=4, decoder_width=24, blur=False, self_attention=False,
                 attention_stride=2, spectral_norm=False, decoder_norm="batch", quality_conditioning=True,
                 keep_mean=True)
    # every key that describes the module is tried (the weights' origin, pretrained and encoder_weights, aside)
    assert set(other) == set(GENERATOR_KEYS) - {"pretrained", "encoder_weights"}

    def shapes(**kwargs):
        return {k: tuple(v.shape) for k, v in _generator(**{**base, **kwargs}).state_dict().items()}

    first = shapes()
    changes = {key for key, value in other.items() if shapes(**{key: value}) != first}
    assert changes == {k.removeprefix("model.") for k in GENERATOR_SHAPE_KEYS}
    assert set(other) - changes == set(GENERATOR_NO_TENSOR) == {"blur", "keep_mean"}
    assert set(GENERATOR_RESUME_KEYS) == {f"model.{k}" for k in other}  # a resumed run stays as it was trained


# --------------------------------------------------------------------------------------------- critic


def test_critic_patch_logits_shape():
    torch.manual_seed(0)
    critic = Critic(width=16, n_blocks=3)
    assert critic.min_size == 64
    out = critic(torch.rand(2, 3, 64, 64))
    assert out.dim() == 4 and out.shape[:2] == (2, 1)
    assert out.shape[-2] >= 1 and out.shape[-1] >= 1
    assert torch.isfinite(out).all()
    out = critic(torch.rand(1, 3, 128, 96))
    assert out.shape[:2] == (1, 1) and out.shape[-2] > out.shape[-1] > 1


@pytest.mark.parametrize("n_blocks", [1, 2, 3])
def test_critic_min_size(n_blocks):
    torch.manual_seed(0)
    critic = Critic(width=8, n_blocks=n_blocks).eval()
    m = critic.min_size
    assert critic(torch.rand(1, 3, m, m)).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match=rf"smaller than its minimum {m} px"):
        critic(torch.rand(1, 3, m - 1, m + 10))
    with pytest.raises(ValueError, match="critic.n_blocks"):
        critic(torch.rand(1, 3, m + 10, m // 2))


def test_critic_has_dropout_and_spectral_norm():
    critic = Critic(width=16, n_blocks=3, dropout=0.15)
    drops = [m for m in critic.modules() if isinstance(m, nn.Dropout2d)]
    assert len(drops) >= 2
    assert {d.p for d in drops} == {0.075, 0.15}
    convs = [m for m in critic.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in critic.modules())
    assert sum(isinstance(m, SelfAttention) for m in critic.modules()) == 1
    assert not any(isinstance(m, SelfAttention) for m in Critic(width=16, self_attention=False).modules())


def test_critic_dropout_masks_are_shared_by_a_real_crop_and_its_fake():
    """The critic step's [real; fake] forward: the same crop twice gets the same logit in train mode, while
    different pairs still get their own masks (independent masks made the critic's loss noise, not signal)."""
    torch.manual_seed(0)
    critic = Critic(width=8, n_blocks=1, dropout=0.5).train()
    x = torch.rand(4, 3, 16, 16)
    real, fake = critic(torch.cat([x, x]), paired=True).chunk(2)
    assert torch.equal(real, fake)
    plain_real, plain_fake = critic(torch.cat([x, x])).chunk(2)  # a generator step's batch: no pairs
    assert not torch.equal(plain_real, plain_fake)
    same = x[:1].expand(4, -1, -1, -1)
    assert critic(torch.cat([same, same]), paired=True)[:4].unique().numel() > 1
    with pytest.raises(ValueError, match="real and fake halves"):
        critic(torch.rand(3, 3, 16, 16), paired=True)


def test_critic_step_learns_a_small_difference_under_large_content():
    """A few of the project's critic steps separate crops from the same crops plus a faint pattern (as clean vs
    restored: the content far larger than the difference); with independent dropout masks the loss stayed
    near 2 ln 2 (1.33 here)."""
    from accelerate import Accelerator

    from dist_dejpeg.train.steps import critic_step

    class Identity(nn.Module):
        def forward(self, jpeg, quality):
            return jpeg

    def batches(n=8, size=32):
        g = torch.Generator().manual_seed(1)
        pattern = ((torch.arange(size)[:, None] + torch.arange(size)) % 2 * 2 - 1).float()
        while True:
            clean = nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")
            yield {"clean": clean, "jpeg": (clean + 0.02 * pattern).clamp(0, 1), "quality": torch.full((n,), 10)}

    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    critic = Critic(width=8, n_blocks=2).train()
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-3)
    stream = batches()
    losses = [float(critic_step(acc, critic, opt, stream, generator_raw=Identity(), grad_accum=1)["critic/loss"])
              for _ in range(50)]
    assert sum(losses[-10:]) / 10 < 1.1 < 2 * math.log(2)


# --------------------------------------------------------------------------------------------- export


def _trained_ish_generator(cfg: ModelConfig) -> Generator:
    torch.manual_seed(3)
    g = build_generator(cfg)
    with torch.no_grad():
        nn.init.normal_(g.head.weight, std=0.05)  # a non-zero correction, so outputs depend on the weights
        g.train()
        for _ in range(2):  # move BN running stats and the spectral-norm power-iteration vectors
            g(torch.rand(2, 3, 64, 64))
    return g.eval()


def test_export_round_trip(tmp_path):
    cfg = ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=WIDTH)
    g = _trained_ish_generator(cfg)
    path = tmp_path / "generator.safetensors"
    save_generator(g, cfg, path, extra={"step": 123, "phase": "gan"})
    assert path.is_file()
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"

    # safetensors, not pickle: 8-byte little-endian header length, then a JSON header (the length's first byte
    # may be 0x80, a pickle's first byte too: the parse, not the first byte, tells them apart)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["format"] == FORMAT

    meta = read_metadata(path)
    assert meta["format"] == FORMAT
    assert json.loads(meta["model"]) == dataclasses.asdict(cfg)
    assert meta["step"] == "123" and meta["phase"] == "gan"

    loaded = load_generator(path)
    assert not loaded.training
    sd, sd2 = g.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    x = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = g(x), loaded(x)
    assert not torch.equal(a, x)  # the round trip is not trivially the identity
    assert torch.equal(a, b)


def test_export_of_pretrained_config_loads_without_fetching_weights(tmp_path):
    # The saved config says pretrained with a file that does not exist here: loading must not need it.
    cfg = ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=WIDTH)
    g = _trained_ish_generator(cfg)
    cfg_saved = dataclasses.replace(cfg, pretrained=True, encoder_weights="/nonexistent/enc.safetensors")
    path = tmp_path / "g.safetensors"
    save_generator(g, cfg_saved, path)
    assert json.loads(read_metadata(path)["model"])["pretrained"] is True
    loaded = load_generator(path)
    enc_key = next(k for k in g.state_dict() if k.startswith("encoder."))
    assert torch.equal(loaded.state_dict()[enc_key], g.state_dict()[enc_key])


def _local_dir_encoder(folder, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4)) -> str:
    """A local-dir: encoder: a folder whose config.json names a timm architecture and its own normalisation."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "mobilenetv3_small_050", "num_classes": 10,
                                                    "pretrained_cfg": {"mean": mean, "std": std}}))
    return f"local-dir:{folder}"


def test_a_source_named_encoders_file_loads_without_its_folder_or_hub(tmp_path, monkeypatch):
    """A file trained with model.encoder=local-dir:<folder> (or hf-hub:<repo>) records what timm resolved the name
    to: it loads where the folder is gone, offline, untrusted, as the same generator (the encoder's own mean and std
    too: the Generator's buffers are not in the state dict); the info keeps the name it was trained with."""
    from dist_dejpeg.models.generator_file import load_model
    from dist_dejpeg.models.names import ENCODER_RESOLVED

    monkeypatch.delenv("DIST_DEJPEG_TRUST_ENCODER", raising=False)
    cfg = ModelConfig(encoder=_local_dir_encoder(tmp_path / "enc"), pretrained=False, decoder_width=WIDTH,
                      encoder_depth=3)
    torch.manual_seed(3)
    g = build_generator(cfg)
    with torch.no_grad():
        nn.init.normal_(g.head.weight, std=0.05)  # (an output that depends on the weights, batch statistics moved)
        g.train()(torch.rand(2, 3, 32, 32))
    g.eval()
    assert g.mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])
    save_generator(g, cfg, tmp_path / "g.safetensors")
    # the same weights as if trained with a stranger's hub repository (its config read off the built encoder)
    hub = dataclasses.replace(cfg, encoder="hf-hub:someorg/net")
    save_generator(g, hub, tmp_path / "hub.safetensors")
    record = json.loads(read_metadata(tmp_path / "g.safetensors")[ENCODER_RESOLVED])
    assert record["architecture"] == "mobilenetv3_small_050" and record["model_args"] == {}
    (tmp_path / "enc").rename(tmp_path / "gone")
    x = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(4))
    for name, encoder in (("g", cfg.encoder), ("hub", hub.encoder)):
        loaded, info = load_model(tmp_path / f"{name}.safetensors")
        assert info["encoder"] == encoder
        assert loaded.mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])
        assert loaded.std.flatten().tolist() == pytest.approx([0.2, 0.3, 0.4])
        with torch.no_grad():
            assert torch.equal(loaded(x), g(x))
    # a built-in name records nothing (it needs nothing)
    plain = dataclasses.replace(cfg, encoder="mobilenetv3_small_050")
    save_generator(_generator(encoder_depth=3), plain, tmp_path / "plain.safetensors")
    assert ENCODER_RESOLVED not in read_metadata(tmp_path / "plain.safetensors")


def test_a_source_named_encoder_without_a_usable_record_says_what_is_missing(tmp_path, monkeypatch):
    """A file without the record (written before it) whose local-dir: folder is gone said "install the timm version
    the model was trained with"; it says which config.json is missing. A record with model_args (a stranger's could
    name checkpoint_path) is not built from: the name is resolved as it says; a malformed one is refused."""
    from safetensors.torch import load_file, save

    from dist_dejpeg.models import generator_file
    from dist_dejpeg.models.generator_file import ModelFileError, load_model
    from dist_dejpeg.models.names import ENCODER_RESOLVED

    cfg = ModelConfig(encoder=_local_dir_encoder(tmp_path / "enc"), pretrained=False, decoder_width=WIDTH,
                      encoder_depth=3)
    save_generator(_generator(encoder=cfg.encoder, encoder_depth=3), cfg, tmp_path / "g.safetensors")
    meta, state = read_metadata(tmp_path / "g.safetensors"), load_file(tmp_path / "g.safetensors")
    (tmp_path / "enc").rename(tmp_path / "gone")
    record = json.loads(meta[ENCODER_RESOLVED])
    for name, value in (("old", None), ("args", {**record, "model_args": {"checkpoint_path": str(tmp_path / "x")}})):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(save(state, metadata={k: v for k, v in meta.items() if k != ENCODER_RESOLVED} | (
            {ENCODER_RESOLVED: json.dumps(value)} if value else {})))
        with pytest.raises(ModelFileError, match=f"its encoder '{cfg.encoder}' is built from "
                           f"{tmp_path / 'enc' / 'config.json'} .*which is not there") as err:
            load_model(path)
        assert "install the timm" not in str(err.value)
    (tmp_path / "gone").rename(tmp_path / "enc")  # (the folder back: the name resolves as it says)
    assert load_model(tmp_path / "args.safetensors")[1]["encoder"] == cfg.encoder
    path.write_bytes(save(state, metadata=meta | {ENCODER_RESOLVED: '{"architecture": 5}'}))
    with pytest.raises(ModelFileError, match="metadata 'encoder_resolved' is not a resolved encoder"):
        load_model(path)
    beacon = {"architecture": "hf-hub:evil-org/beacon", "pretrained_cfg": {}, "model_args": {}}  # (not fetched)
    path.write_bytes(save(state, metadata=meta | {ENCODER_RESOLVED: json.dumps(beacon)}))
    with pytest.raises(ModelFileError, match="timm has no model 'hf-hub:evil-org/beacon'"):
        load_model(path)
    # a stranger's hub repository trusted, not in the Hugging Face cache, unreachable: said so
    from huggingface_hub import constants

    monkeypatch.setenv("DIST_DEJPEG_TRUST_ENCODER", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(generator_file, "build_generator", lambda cfg, resolved=None: 1 / 0)
    with pytest.raises(ModelFileError, match="m: its encoder 'hf-hub:someorg/net@v2' is built from the config.json of "
                       "the Hugging Face repository 'someorg/net', which is not in the Hugging Face cache"):
        generator_file._build_and_load(ModelConfig(encoder="hf-hub:someorg/net@v2"), {}, "m")


def test_a_record_with_model_args_says_so_when_its_folder_is_gone_and_training_warns(tmp_path):
    """A local-dir: folder whose config.json has model_args: the file's record cannot stand in for it (the args are
    built from the source as named), so without the folder the error says that, not "a generator file saved before
    dist_dejpeg recorded the architecture", and training warns at the start that the file will need the folder (it
    said nothing: local-dir: is trusted); a record without model_args needs no note."""
    from dist_dejpeg.models.generator_file import ModelFileError, load_model
    from dist_dejpeg.models.names import ENCODER_RESOLVED
    from dist_dejpeg.train.build import source_note

    folder = tmp_path / "enc"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "mobilenetv3_small_050", "num_classes": 10,
                                                    "pretrained_cfg": {}, "model_args": {"drop_path_rate": 0.1}}))
    cfg = ModelConfig(encoder=f"local-dir:{folder}", pretrained=False, decoder_width=WIDTH, encoder_depth=3)
    save_generator(_generator(encoder=cfg.encoder, encoder_depth=3), cfg, tmp_path / "g.safetensors")
    record = json.loads(read_metadata(tmp_path / "g.safetensors")[ENCODER_RESOLVED])
    assert record["model_args"] == {"drop_path_rate": 0.1}
    note = source_note(cfg.encoder, record)
    assert note.startswith(f"model.encoder {cfg.encoder}: this run's generator file will load") and \
        "only where that folder is there (its model_args (drop_path_rate) are read from there)" in note, note
    assert "TRUST" not in note and source_note(cfg.encoder, {**record, "model_args": {}}) == ""
    assert "and only with DIST_DEJPEG_TRUST_ENCODER=1 set" in source_note("hf-hub:someorg/net", record)
    assert source_note("mobilenetv3_small_050", None) == ""
    folder.rename(tmp_path / "gone")
    with pytest.raises(ModelFileError, match=r"the file records the architecture, but its source config's "
                       r"model_args \(drop_path_rate\) are built from the source as named") as err:
        load_model(tmp_path / "g.safetensors")
    assert "saved before" not in str(err.value)


def test_export_of_a_checkpoint_records_the_shards_the_run_trained_on(tmp_path, monkeypatch, sample_shards):
    """`export --model runs/x/checkpoints/step-N` (and evaluate, report) read the run's `data.root` against the
    current folder: from another folder it recorded no shards, or another set's that sat at that relative path.
    It is resolved as training did (the folder the run started in); for a moved run, the nearest folder above it
    that holds the shards; with none, nothing, and `train_shards_from` says so."""
    import shutil

    from safetensors.torch import save_file

    from dist_dejpeg.config import Config, to_yaml
    from dist_dejpeg.models.generator_file import TRAIN_SHARDS_FROM, load_model
    from dist_dejpeg.models.names import shard_fingerprint

    start, other = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(sample_shards, start / "data" / "set")
    (other / "data" / "set").mkdir(parents=True)  # another set's shard of the same name where the user stands
    (other / "data" / "set" / "train-000000.tar").write_bytes(b"another set")
    trained = {p.name: shard_fingerprint(p) for p in sorted((start / "data" / "set").glob("train-*.tar"))}
    cfg = Config()
    cfg.model, cfg.data.root = ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, encoder_depth=2,
                                           decoder_width=8), "data/set"

    def checkpoint(run_dir: str, at) -> str:
        cfg.train.run_dir = run_dir
        folder = at / "checkpoints" / "step-00000012"
        folder.mkdir(parents=True)
        model = build_generator(cfg.model)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.yaml").write_text(to_yaml(cfg))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
        return str(folder)

    monkeypatch.chdir(other)
    _, info = load_model(checkpoint("runs/x", start / "runs" / "x"))  # started in project/, read from elsewhere/
    assert info["train_shards"] == trained and info[TRAIN_SHARDS_FROM] == str(start / "data" / "set")
    _, info = load_model(checkpoint("/cluster/runs/y", start / "runs" / "moved" / "y"))  # a run moved here
    assert info["train_shards"] == trained and info[TRAIN_SHARDS_FROM] == str(start / "data" / "set")
    shutil.rmtree(start / "data")
    _, info = load_model(start / "runs" / "x")
    assert info["train_shards"] == {} and info[TRAIN_SHARDS_FROM].startswith("none: no train-*.tar in "
                                                                             f"{start / 'data' / 'set'}")


def test_load_generator_rejects_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a dist_dejpeg generator"):
        load_generator(plain)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a dist_dejpeg generator"):
        load_generator(other)


# --------------------------------------------------------------------------------------------- weights


def test_create_encoder_missing_file_names_key_and_file():
    with pytest.raises(WeightsError) as err:
        create_encoder("mobilenetv3_small_050", pretrained=True, weights_file="/nonexistent.safetensors")
    msg = str(err.value)
    assert "model.encoder_weights" in msg and "/nonexistent.safetensors" in msg


def test_create_encoder_loads_explicit_weights_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(11)
    full = timm.create_model("mobilenetv3_small_050", pretrained=False)
    with torch.no_grad():
        full.conv_stem.weight.add_(1.0)  # unmistakable
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    path = tmp_path / "enc.safetensors"
    save_file(state, str(path))

    torch.manual_seed(12)
    enc = create_encoder("mobilenetv3_small_050", pretrained=True, weights_file=str(path))
    torch.manual_seed(12)
    rand = create_encoder("mobilenetv3_small_050", pretrained=False)
    assert torch.equal(enc.conv_stem.weight, state["conv_stem.weight"])
    assert not torch.equal(rand.conv_stem.weight, state["conv_stem.weight"])
    for k, v in enc.state_dict().items():  # every encoder tensor came from the file
        assert torch.equal(v, state[k]), k
    shallow = create_encoder("mobilenetv3_small_050", pretrained=True, weights_file=str(path), depth=3)
    assert 0 < len(shallow.state_dict()) < len(enc.state_dict())  # model.encoder_depth: the blocks it uses
    assert all(torch.equal(v, state[k]) for k, v in shallow.state_dict().items())

    # and through the generator / its config
    g = Generator("mobilenetv3_small_050", pretrained=True, encoder_weights=str(path), decoder_width=WIDTH)
    assert torch.equal(g.encoder.conv_stem.weight, state["conv_stem.weight"])


def test_encoder_weights_load_into_feature_models_that_rename_their_layers(tmp_path, monkeypatch):
    """timm's feature wrapper renames ConvNeXt's ``stages.0`` to ``stages_0``: its ImageNet file (explicit, or the
    Hugging Face cache's) loads, where the check of the file's names refused it as 'not weights for this encoder'."""
    import timm
    from safetensors.torch import save_file

    import dist_dejpeg.models.weights as W

    torch.manual_seed(3)
    state = {k: v.contiguous() + 0.5 for k, v in timm.create_model("convnext_atto", pretrained=False)
             .state_dict().items()}
    path = tmp_path / "convnext_atto.safetensors"
    save_file(state, str(path))
    enc = create_encoder("convnext_atto", pretrained=True, weights_file=str(path), depth=3)
    assert torch.equal(enc.stem_0.weight, state["stem.0.weight"])
    assert torch.equal(enc.stages_2.blocks[0].conv_dw.weight, state["stages.2.blocks.0.conv_dw.weight"])
    monkeypatch.setattr(W, "hf_cached_file", lambda repo: str(path))
    assert torch.equal(create_encoder("convnext_atto", pretrained=True).stem_0.weight, state["stem.0.weight"])


def test_encoder_weights_of_another_variant_are_a_one_line_error(tmp_path):
    """A sibling's file (mobilenetv3_small_050's for mobilenetv3_small_100): a WeightsError naming the key, the
    file and the encoder, not torch's page of size mismatches."""
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "small_050.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("mobilenetv3_small_050").state_dict().items()},
              str(path))
    with pytest.raises(WeightsError, match=r"model.encoder_weights: .*small_050.safetensors does not load into "
                                           r"encoder 'mobilenetv3_small_100' \(RuntimeError: .*size mismatch"):
        create_encoder("mobilenetv3_small_100", pretrained=True, weights_file=str(path))


def test_create_encoder_rejects_file_without_encoder_weights(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "unrelated.safetensors"
    save_file({"foo": torch.zeros(1)}, str(path))
    with pytest.raises(WeightsError):
        create_encoder("mobilenetv3_small_050", pretrained=True, weights_file=str(path))


def test_create_encoder_offline_without_cache_fails_with_instructions(tmp_path, monkeypatch):
    import time

    import huggingface_hub.constants as hf_constants

    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    # huggingface_hub reads HF_HUB_OFFLINE / HF_HOME once, at import (already done by timm): without
    # patching its constants too, the setenv above has no effect and each file is retried ~5 times over
    # the (absent) network, about 45 s here.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        create_encoder("mobilenetv3_small_050", pretrained=True)
    assert time.monotonic() - start < 30
    msg = str(err.value)
    assert "model.encoder_weights" in msg
    assert "model.pretrained=false" in msg
    assert "mobilenetv3_small_050" in msg
    assert str(hf_home) in msg


def _fake_failed_download(calls):
    def fake(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network in tests")

    return fake


@pytest.fixture
def answering_host():
    """A local host that answers every request 404 (a download host that is up), and the paths asked of it."""
    import http.server
    import threading

    asked = []

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - http.server's naming
            asked.append(self.path)
            self.send_error(404)

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", asked
    server.shutdown()
    server.server_close()


@pytest.fixture
def stalling_host():
    """A local host that answers HEAD (as a weights host would: size, ETag, the Hub's commit header), then on GET sends
    the headers of a 100 MB weights file and 16 bytes of it, and nothing more for 20 s (a proxy that never sends the
    body, a firewall dropping packets mid-transfer); the weights files it was asked for."""
    import http.server
    import threading

    gets, stop = [], threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def _headers(self):
            self.send_response(200)
            for key, value in (("Content-Length", str(10**8)), ("ETag", '"stall"'), ("X-Repo-Commit", "a" * 40)):
                self.send_header(key, value)
            self.end_headers()

        do_HEAD = _headers  # noqa: N815 - http.server's naming

        def do_GET(self):  # noqa: N802 - http.server's naming
            if not self.path.endswith((".pth", ".safetensors")):  # (huggingface_hub's other calls: /api/...)
                return self.send_error(404)
            gets.append(self.path)
            self._headers()
            self.wfile.write(b"\0" * 16)
            self.wfile.flush()
            stop.wait(20)  # (the old code waited this out, then failed on the short body: the test fails, not hangs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", gets
    stop.set()
    server.shutdown()
    server.server_close()


def _closed_port() -> str:
    """An address that refuses at once: a download host that does not answer."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_pretrained_encoder_without_an_answering_host_fails_at_once(tmp_path, monkeypatch, answering_host):
    """`model.pretrained=true` on one process (or ranks under `accelerate launch`) with nothing cached and no network
    but no HF_HUB_OFFLINE: huggingface_hub retried the failed lookup for ~45 s before the WeightsError. The host is
    asked once, with a short timeout; one that answers gets the download, as before."""
    import time

    import timm
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "ENDPOINT", _closed_port())
    downloads = []
    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: downloads.append(k) or real_create(*a, **k))
    start = time.monotonic()
    with pytest.raises(WeightsError, match=r"(?s)encoder 'mobilenetv3_small_050' .*could not be downloaded from "
                                           r"Hugging Face repo 'timm/.*': 127.0.0.1 does not answer .*"
                                           r"model.encoder_weights=/path/to/model.safetensors"):
        create_encoder("mobilenetv3_small_050", pretrained=True)
    assert time.monotonic() - start < 5 and not downloads
    url, asked = answering_host
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(WeightsError, match=r"could not be downloaded from Hugging Face repo 'timm/.*' \("):
        create_encoder("mobilenetv3_small_050", pretrained=True)
    assert downloads and downloads[0]["pretrained"] and any("mobilenetv3_small_050" in p for p in asked), asked


def test_lpips_pretrained_missing_backbone_names_file_and_key(tmp_path, monkeypatch, answering_host):
    """A host that answers gets the download; one that does not is said at once (torch.hub's download has no
    timeout: a network that drops packets held it for minutes)."""
    from types import SimpleNamespace

    from dist_dejpeg.models import weights
    from dist_dejpeg.models.lpips import LPIPS

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    host = answering_host[0]
    monkeypatch.setattr(weights, "lpips_backbone_weights",
                        lambda net: SimpleNamespace(url=f"{host}/models/alexnet-owt-7be5be79.pth"))
    calls = []
    # never really download (233 MB) even where a network exists; the failure is what is tested
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _fake_failed_download(calls))
    with pytest.raises(WeightsError) as err:
        LPIPS("alex", pretrained=True)
    msg = str(err.value)
    assert "alexnet-owt-7be5be79.pth" in msg
    assert "loss.lpips_weights" in msg and "loss.lpips_pretrained=false" in msg
    assert str(tmp_path) in msg  # looked in the TORCH_HOME cache
    assert calls and calls[0].endswith("alexnet-owt-7be5be79.pth")

    with pytest.raises(WeightsError, match="loss.metric_weights"):
        LPIPS("alex", pretrained=True, key="loss.metric_weights")
    with pytest.raises(WeightsError, match="loss.lpips_weights: file not found: /nonexistent.pth"):
        LPIPS("alex", pretrained=True, weights_file="/nonexistent.pth")
    calls.clear()
    host = _closed_port()
    with pytest.raises(WeightsError, match=r"(?s)alexnet-owt-7be5be79.pth.*\(127.0.0.1 does not answer .*"
                                           r"loss.lpips_weights=/path/to/alexnet-owt-7be5be79.pth"):
        LPIPS("alex", pretrained=True)
    assert not calls


def test_weights_downloads_that_stall_fail_with_the_offline_message(tmp_path, monkeypatch, stalling_host):
    """A host that answers the probe, then stops sending mid-download: torch.hub's download (LPIPS's backbone) has no
    timeout and waited forever, every rank before its first step. Now nothing for DOWNLOAD_STALL_S is the offline
    WeightsError naming the stall, the socket default as it was, no partial file in the torch hub cache."""
    import socket
    import time
    from types import SimpleNamespace

    from dist_dejpeg.models import weights
    from dist_dejpeg.run import net

    url, gets = stalling_host
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(weights, "lpips_backbone_weights",
                        lambda name: SimpleNamespace(url=f"{url}/models/alexnet-owt-7be5be79.pth"))
    monkeypatch.setattr(net, "DOWNLOAD_STALL_S", 1)
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(123.0)  # (whatever the process had must be back afterwards)
    try:
        start = time.monotonic()
        with pytest.raises(WeightsError, match=r"(?s)alexnet-owt-7be5be79.pth.*\(the download stalled: 127.0.0.1 sent "
                                               r"nothing for 1 s\).*loss.lpips_weights=/path/to/alexnet-owt"):
            weights.lpips_backbone_state("alex", "", "loss.lpips_weights")
        took = time.monotonic() - start
        assert socket.getdefaulttimeout() == 123.0
    finally:
        socket.setdefaulttimeout(before)
    assert gets == ["/models/alexnet-owt-7be5be79.pth"] and took < 10, (gets, took)
    checkpoints = tmp_path / "hub" / "checkpoints"
    assert checkpoints.is_dir() and not list(checkpoints.iterdir())  # (no .partial, nothing a next run could load)


def test_encoder_download_that_stalls_fails_with_the_offline_message(tmp_path, monkeypatch, stalling_host):
    """The same from the Hugging Face Hub: huggingface_hub gives each read HF_HUB_DOWNLOAD_TIMEOUT and gives up after
    7 tries that bring nothing (76 s at its 10 s; its partial file removed); the WeightsError says it stalled, not
    "(ReadTimeout: timed out)"."""
    import socket
    import time

    from huggingface_hub import constants

    url, gets = stalling_host
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.2)
    before = socket.getdefaulttimeout()
    start = time.monotonic()
    with pytest.raises(WeightsError, match=r"(?s)encoder 'mobilenetv3_small_050' .*Hugging Face repo 'timm/.*': the "
                                           r"download stalled: 127.0.0.1 sent nothing for 0.2 s\.\n.*"
                                           r"model.encoder_weights=/path/to/model.safetensors"):
        create_encoder("mobilenetv3_small_050", pretrained=True)
    took = time.monotonic() - start
    assert gets and all(path.endswith("/model.safetensors") for path in gets) and took < 20, (gets, took)
    assert socket.getdefaulttimeout() == before
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and "blobs" in p.parts], "a partial file left"


def test_lpips_backbone_from_explicit_file(tmp_path):
    import torchvision

    from dist_dejpeg.models.lpips import LPIPS

    torch.manual_seed(5)
    alex = torchvision.models.alexnet()
    path = tmp_path / "alexnet.pth"
    torch.save(alex.state_dict(), path)
    saved = alex.state_dict()

    torch.manual_seed(6)
    lp = LPIPS("alex", pretrained=True, weights_file=str(path))
    assert lp.pretrained and "RANDOM" not in lp.description
    assert torch.equal(lp.inner.net.slice1[0].weight, saved["features.0.weight"])
    assert torch.equal(lp.inner.net.state_dict()["slice5.10.weight"], saved["features.10.weight"])
    torch.manual_seed(6)
    rand = LPIPS("alex", pretrained=False)
    assert "RANDOM" in rand.description
    assert not torch.equal(rand.inner.net.slice1[0].weight, saved["features.0.weight"])


def test_lpips_backbone_from_torch_hub_cache(tmp_path, monkeypatch):
    import torchvision

    from dist_dejpeg.models.lpips import LPIPS

    torch.manual_seed(7)
    features = {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(features, ckpt / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _fake_failed_download(calls))
    lp = LPIPS("alex", pretrained=True)
    assert not calls, "cached file present, yet a download was attempted"
    assert torch.equal(lp.inner.net.slice1[0].weight, features["features.0.weight"])


def test_lpips_backbone_file_with_wrong_keys(tmp_path):
    from dist_dejpeg.models.lpips import LPIPS

    path = tmp_path / "bogus.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="features.0.weight"):
        LPIPS("alex", pretrained=True, weights_file=str(path))


@pytest.mark.parametrize("channels_last", [False, True])
def test_blur_equals_replication_pad_then_average(channels_last):
    from dist_dejpeg.models.layers import Blur

    x = torch.randn(2, 5, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    reference = nn.Sequential(nn.ReplicationPad2d((1, 0, 1, 0)), nn.AvgPool2d(2, stride=1))(x)
    assert Blur()(x).shape == x.shape
    torch.testing.assert_close(Blur()(x), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_decoder_without_batch_norm_uses_no_batch_statistics(norm):
    """model.decoder_norm=group|none: no BatchNorm in the decoder, so in training an image's output does not
    depend on the rest of the batch (and at test time no running statistics learned from the training crops
    stand in for it). With batch (DeOldify's) it does. Spectral norm off: its power iteration moves per call."""
    g = _generator(decoder_norm=norm, decoder_width=16, spectral_norm=False)
    decoder = [m for name, m in g.named_modules() if not name.startswith("encoder")]
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in decoder) == (norm == "batch")
    assert any(isinstance(m, nn.GroupNorm) for m in decoder) == (norm == "group")
    nn.init.normal_(g.head.weight, std=0.05)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    g.train()
    g.encoder.eval()  # the encoder keeps timm's batch norm: frozen statistics here
    with torch.no_grad():
        alone, in_batch = g(x[:1]), g(x)[:1]
    assert torch.allclose(alone, in_batch, atol=1e-5) == (norm != "batch")


def test_generator_files_from_before_decoder_norm_load_as_batch_norm(tmp_path):
    from safetensors.torch import load_file, save_file

    g = _generator(decoder_width=16, decoder_norm="batch")  # what such files hold
    path = tmp_path / "old.safetensors"
    save_generator(g, ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=16), path)
    meta = read_metadata(path)
    fields = json.loads(meta["model"])
    del fields["decoder_norm"]
    meta["model"] = json.dumps(fields)
    save_file(load_file(str(path)), str(path), metadata=meta)
    assert any(isinstance(m, nn.BatchNorm2d) for m in load_generator(path).blocks.modules())


# ------------------------------------------------------------------------------------ quality conditioning


def _kick(g: Generator) -> Generator:
    """Non-zero FiLM heads and output head, as after some training."""
    with torch.no_grad():
        g.head.weight.normal_(0, 0.1)
        if g.film is not None:
            g.film.heads.weight.normal_(0, 0.2)
    return g.eval()


def test_conditioned_generator_starts_as_the_blind_one():
    """Same seed: the blind generator's weights load into the conditioned one (which only adds the FiLM
    embedding) and, with the FiLM heads at their zero init, every quality gives the blind output."""
    blind, cond = _generator(), _generator(quality_conditioning=True)
    result = cond.load_state_dict(blind.state_dict(), strict=False)
    assert result.missing_keys and all(k.startswith("film.") for k in result.missing_keys)
    assert not result.unexpected_keys
    _kick(blind)
    cond.head.load_state_dict(blind.head.state_dict())
    cond.eval()
    x = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = blind(x)
        for q in (None, torch.tensor([10, 50, 0]), 90):
            assert torch.allclose(cond(x, q), ref, atol=1e-6)
        assert torch.equal(blind(x, torch.tensor([10, 20, 30])), ref)  # a blind one ignores the quality


def test_conditioning_changes_output_per_sample_and_unknown_is_its_own():
    g = _kick(_generator(quality_conditioning=True))
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(2)).expand(4, -1, -1, -1)
    with torch.no_grad():
        out = g(x, torch.tensor([10, 10, 90, 0]))
        assert torch.equal(out[0], out[1])
        assert not torch.allclose(out[0], out[2], atol=1e-4)  # the quality matters
        assert not torch.allclose(out[3], out[0], atol=1e-4) and not torch.allclose(out[3], out[2], atol=1e-4)
        assert torch.allclose(g(x[:1], None), out[3:], atol=1e-6)  # None is "unknown"
        assert torch.allclose(g(x[:2], 10), out[:2], atol=1e-6)  # one quality for the batch


def test_every_conditioning_parameter_gets_a_gradient_from_any_batch():
    """DDP needs every parameter used in every step: the known and the unknown path both take part,
    whether the batch holds only known, only unknown or mixed qualities."""
    g = _kick(_generator(quality_conditioning=True)).train()
    x = torch.rand(2, 3, 32, 32)
    for q in (torch.tensor([10, 40]), torch.tensor([0, 0]), torch.tensor([0, 70])):
        g.zero_grad()
        g(x, q).sum().backward()
        for name, p in g.film.named_parameters():
            assert p.grad is not None, (name, q)


def test_conditioned_generator_file_round_trip(tmp_path):
    cfg = ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=WIDTH,
                      quality_conditioning=True)
    torch.manual_seed(0)
    g = _kick(build_generator(cfg))
    save_generator(g, cfg, tmp_path / "g.safetensors")
    loaded = load_generator(tmp_path / "g.safetensors")
    assert loaded.conditioned and loaded.film is not None
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([15, 0])), g(x, torch.tensor([15, 0])))


def test_keep_mean_correction_has_zero_mean_per_image_and_channel(tmp_path):
    """model.keep_mean: whatever the weights, each image's correction averages to zero per channel (the output
    keeps the JPEG's mean colour, clamping aside), the image itself still changes, and the generator file
    keeps the setting."""
    cfg = ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=WIDTH,
                      quality_conditioning=True, keep_mean=True)
    torch.manual_seed(0)
    g = _kick(build_generator(cfg))
    x = torch.rand(2, 3, 37, 53) * 0.5 + 0.25
    with torch.no_grad():
        c = g.correction(x, torch.tensor([10, 0]))
        assert c.abs().amax() > 1e-3  # a real correction ...
        assert c.mean(dim=(-2, -1)).abs().amax() < 1e-6  # ... with no mean
        g.keep_mean = False  # the same weights without the constraint move the mean
        assert g.correction(x, torch.tensor([10, 0])).mean(dim=(-2, -1)).abs().amax() > 1e-4
        g.keep_mean = True
    save_generator(g, cfg, tmp_path / "g.safetensors")
    loaded = load_generator(tmp_path / "g.safetensors")
    assert loaded.keep_mean
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([10, 0])), g(x, torch.tensor([10, 0])))


def test_encoder_depth_builds_a_shallower_u_net_without_the_unused_blocks(tmp_path):
    """model.encoder_depth: the U-Net uses the encoder's first stages only, and the encoder keeps only the blocks
    they need (timm's MobileNetV3 feature model runs every block otherwise): its features equal the full
    encoder's, the generator pads to the last stage's stride, and its file rebuilds the same model."""
    import timm

    torch.manual_seed(0)
    full = timm.create_model("mobilenetv3_small_050", features_only=True, pretrained=False).eval()
    torch.manual_seed(0)
    shallow = create_encoder("mobilenetv3_small_050", pretrained=False, depth=3).eval()
    assert shallow.feature_info.reduction() == [2, 4, 8] and len(shallow.blocks) < len(full.blocks)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(full(x), shallow(x)))
    cfg = ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=WIDTH, encoder_depth=4)
    g = _kick(build_generator(cfg))
    assert g.pad_to == 16 and g.strides == [2, 4, 8, 16]
    assert sum(p.numel() for p in g.parameters()) < sum(p.numel() for p in _kick(build_generator(
        ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=WIDTH))).parameters())
    y = torch.rand(1, 3, 37, 53)
    save_generator(g.eval(), cfg, tmp_path / "g.safetensors")
    loaded = load_generator(tmp_path / "g.safetensors")
    with torch.no_grad():
        assert loaded.pad_to == 16 and torch.equal(loaded(y), g(y)) and g(y).shape == y.shape
    with pytest.raises(ValueError, match="encoder_depth"):
        Generator("mobilenetv3_small_050", pretrained=False, encoder_depth=1)


@pytest.mark.parametrize("encoder, match", [
    ("mobilenetv3_large", r"timm has no model 'mobilenetv3_large' \(close: mobilenetv3_large_100"),
    ("vit_tiny_patch16_224", r"'vit_tiny_patch16_224' cannot encode a 16 x 32 px input .*doesn't match model "
                             r"\(224\); use a convolutional encoder"),
    ("levit_128s", "cannot encode a 64 x 128 px input"),
])
def test_an_encoder_the_u_net_cannot_use_is_refused_at_build_with_its_name(encoder, match):
    """A misspelt timm name, a ViT's fixed patch grid, an attention that needs a fixed token count: each is an
    EncoderError (a ValueError) naming the encoder when the generator is built, not timm's assertion at the
    first step (or, for an unknown name, a RuntimeError from deep inside timm)."""
    with pytest.raises(EncoderError, match=match):
        Generator(encoder=encoder, pretrained=False, decoder_width=16)


def test_encoder_depth_beyond_the_encoders_stages_names_the_key():
    with pytest.raises(EncoderError, match=r"'levit_128s' .*model.encoder_depth=4 stages: feature index 3 is out"):
        create_encoder("levit_128s", pretrained=False, depth=4)
    # timm's words for most encoders are "list index out of range": the error says how many stages there are
    with pytest.raises(EncoderError, match=r"'convnext_atto' .*encoder_depth=5 .*it has 4 \(model.encoder_depth: "
                                           r"0 for all, or 2..4\)"):
        create_encoder("convnext_atto", pretrained=False, depth=5)


def test_pretrained_encoder_errors_are_told_apart(monkeypatch, answering_host):
    """With model.pretrained=true, timm's own check of the model (an encoder_depth beyond its stages) is named as
    such, not as 'weights not in the cache'; a failed download says how an offline machine fails at once."""
    import timm

    from huggingface_hub import constants

    import dist_dejpeg.models.weights as W

    monkeypatch.setattr(W, "hf_cached_file", lambda repo: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", answering_host[0])  # (a host that answers: the download is tried)

    def out_of_range(*args, **kwargs):
        raise AssertionError("feature index 3 is out of range")

    monkeypatch.setattr(timm, "create_model", out_of_range)
    with pytest.raises(EncoderError, match=r"model.encoder_depth=4 stages: feature index 3 is out of range"):
        create_encoder("levit_128s", pretrained=True, depth=4)

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(W.WeightsError, match=r"(?s)could not be downloaded.*HF_HUB_OFFLINE=1 says this at once"):
        create_encoder("mobilenetv3_large_100", pretrained=True)


def test_init_from_and_resume_compare_where_the_attention_sits_not_the_asked_stride(tmp_path, resume_with):
    """model.attention_stride 8 and 4 on an encoder whose skips are at strides 2 and 4 both put the attention at 4
    (the same weights): init_from and resume refused them as "other shapes". Stride 2 does move it: refused."""
    import dataclasses

    from dist_dejpeg.config import ConfigError, ModelConfig
    from dist_dejpeg.models.generator_file import save_generator
    from dist_dejpeg.models.unet import build_generator
    from dist_dejpeg.train.init_from import init_from_config

    source_cfg = ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, encoder_depth=3, decoder_width=16,
                             attention_stride=8)
    source = build_generator(source_cfg)
    assert source.attention_at == 4
    assert build_generator(dataclasses.replace(source_cfg, attention_stride=4)).state_dict().keys() == \
        source.state_dict().keys()
    save_generator(source, source_cfg, tmp_path / "g.safetensors")
    asked = dataclasses.replace(source_cfg, attention_stride=4, init_from=str(tmp_path / "g.safetensors"))
    assert init_from_config(asked).attention_stride == 4
    with pytest.raises(ConfigError, match=r"other shapes: model.attention_stride 8 \(here 2\)"):
        init_from_config(dataclasses.replace(asked, attention_stride=2))

    resume = resume_with(source_cfg)
    assert resume(dataclasses.replace(source_cfg, attention_stride=4))
    with pytest.raises(ConfigError, match=r"model.attention_stride 8 -> 2: these keys change the shapes"):
        resume(dataclasses.replace(source_cfg, attention_stride=2))
