"""Pretrained weights, found the standard way or not at all.

The encoder's ImageNet weights come from timm (the Hugging Face cache, or an explicit file); LPIPS's
backbone comes from torchvision's files in the torch hub cache (or an explicit file). Offline with nothing
found, the error names the missing file and the config key that points at one. There is no silent
fallback to random init: random init is asked for with ``model.pretrained=false`` /
``loss.lpips_pretrained=false``, and everything the run writes says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Pretrained weights that were asked for and cannot be found or fetched."""


def _hf_cached_file(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def create_encoder(name: str, pretrained: bool, weights_file: str = "", depth: int = 0) -> nn.Module:
    """A timm ``features_only`` encoder of its first ``depth`` stages (0: all; the blocks after the last one used
    are dropped, not just left unused). ``pretrained`` loads ImageNet weights from ``weights_file``, else from
    the timm / Hugging Face cache, else downloads them; offline it fails with what to do."""
    return _keep_used_blocks(_create_encoder(name, pretrained, weights_file, depth))


def _stages(depth: int) -> dict:
    return {"out_indices": tuple(range(depth))} if depth > 0 else {}


def _keep_used_blocks(model: nn.Module) -> nn.Module:
    """timm's EfficientNet-family feature models (MobileNetV3 among them) run every block whatever
    ``out_indices`` asks for; drop the blocks after the last stage returned (timm's other feature wrappers
    already stop there)."""
    stage_ends = getattr(model, "_stage_out_idx", None)
    if stage_ends and getattr(model, "feature_hooks", None) is None and isinstance(getattr(model, "blocks", None),
                                                                                    nn.Sequential):
        model.blocks = model.blocks[:max(stage_ends)]
    return model


def _create_encoder(name: str, pretrained: bool, weights_file: str, depth: int) -> nn.Module:
    import timm

    if not pretrained:
        return timm.create_model(name, features_only=True, pretrained=False, **_stages(depth))
    if weights_file:
        if not Path(weights_file).is_file():
            raise WeightsError(f"model.encoder_weights: file not found: {weights_file}")
        return _encoder_from_file(name, str(weights_file), depth)
    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    cached = _hf_cached_file(repo) if repo else None
    if cached:
        log.info("encoder %s: ImageNet weights from the Hugging Face cache: %s", name, cached)
        return _encoder_from_file(name, cached, depth)
    try:
        return timm.create_model(name, features_only=True, pretrained=True, **_stages(depth))
    except Exception as err:  # noqa: BLE001 - any failure here means "weights not available"
        where = f"Hugging Face repo '{repo}'" if repo else "timm's download address"
        from huggingface_hub import constants
        raise WeightsError(
            f"ImageNet weights for encoder '{name}' are not in the local cache and could not be downloaded "
            f"from {where} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).\n"
            f"Fix one of: run once with internet access so timm caches them (in {constants.HF_HUB_CACHE}); "
            f"or download the weights file and set "
            f"model.encoder_weights=/path/to/model.safetensors; or set model.pretrained=false for a "
            f"random-init encoder (tests and debugging only)."
        ) from None


def _encoder_from_file(name: str, path: str, depth: int = 0) -> nn.Module:
    """timm loads ``features_only`` weights non-strictly; check that the file really held them."""
    import timm

    model = timm.create_model(name, features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              **_stages(depth))
    stored = {k.removeprefix("module.") for k in timm.models.load_state_dict(path).keys()}
    missing = [k for k in model.state_dict() if not k.endswith("num_batches_tracked") and k not in stored]
    if missing:
        raise WeightsError(f"model.encoder_weights: {path} lacks {len(missing)} of encoder '{name}''s weights "
                           f"(e.g. {', '.join(missing[:3])}): not weights for this encoder?")
    return model


def _torchvision_weights(net: str):
    import torchvision

    return {"vgg": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
            "alex": torchvision.models.AlexNet_Weights.IMAGENET1K_V1}[net]


def lpips_backbone_state(net: str, weights_file: str, key: str) -> dict:
    """torchvision ImageNet weights for LPIPS's ``net`` backbone: an explicit file, the torch hub cache,
    or a download into that cache. ``key`` is the config key named in errors."""
    if weights_file:
        if not Path(weights_file).is_file():
            raise WeightsError(f"{key}: file not found: {weights_file}")
        return torch.load(weights_file, map_location="cpu", weights_only=True)
    url = _torchvision_weights(net).url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise WeightsError(
            f"LPIPS-{net} needs torchvision's ImageNet backbone {cached.name}, which is not at {cached} and "
            f"could not be downloaded from {url} ({type(err).__name__}).\n"
            f"Fix one of: place the file there (or set TORCH_HOME); or set {key}=/path/to/{cached.name}; or "
            f"set loss.lpips_pretrained=false for a random backbone (tests and debugging only: the LPIPS "
            f"numbers are then not LPIPS)."
        ) from None


def load_lpips_backbone(lpips_net: nn.Module, state: dict) -> None:
    """Copy torchvision ``features.<i>.*`` weights into lpips' sliced backbone (``slice<k>.<i>.*``)."""
    own = lpips_net.state_dict()
    mapped = {}
    for name in own:
        _, idx, param = name.split(".", 2)
        source = f"features.{idx}.{param}"
        if source not in state:
            raise WeightsError(f"LPIPS backbone file lacks '{source}': not a torchvision VGG16/AlexNet file?")
        mapped[name] = state[source]
    lpips_net.load_state_dict(mapped)
