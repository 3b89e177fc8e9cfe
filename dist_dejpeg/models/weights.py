"""Pretrained weights, found the standard way or not at all.

The encoder's ImageNet weights come from timm (the Hugging Face cache, or an explicit file); LPIPS's
backbone comes from torchvision's files in the torch hub cache (or an explicit file). Offline with nothing
found (HF_HUB_OFFLINE, or a download host that does not answer within seconds: asked once, before the download's
retries; or a download that then stalls), the error names the missing file and the config key that points at one.
There is no silent fallback to random init: random init is asked for with ``model.pretrained=false`` /
``loss.lpips_pretrained=false``, and everything the run writes says so.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from dist_dejpeg.run.net import no_download_from, stall_timeout, stalled_download

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Pretrained weights that were asked for and cannot be found or fetched."""


class EncoderError(ValueError):
    """A model.encoder that timm does not know, or one the U-Net cannot use (no features at any image size)."""


def hf_cached_file(repo_id: str) -> str | None:
    """The cached weights file of a Hugging Face repo (timm's ImageNet weights), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def create_encoder(name: str, pretrained: bool, weights_file: str = "", depth: int = 0,
                   resolved: dict | None = None) -> nn.Module:
    """A timm ``features_only`` encoder of its first ``depth`` stages (0: all; the blocks after the last one used
    are dropped, not just left unused). ``pretrained`` loads ImageNet weights from ``weights_file``, else from
    the timm / Hugging Face cache, else downloads them; offline it fails with what to do. ``resolved``: what the
    source-prefixed ``name`` resolved to (:func:`encoder_resolved`, without model_args), built random-init from
    its architecture and pretrained_cfg alone: no folder read, nothing fetched."""
    import timm

    arch = resolved["architecture"] if resolved else name
    if (resolved or ":" not in arch) and not timm.is_model(arch):  # ("hf-hub:..." and "local-dir:..." are timm's to
        # resolve; a record's architecture is a built-in: one naming a source would have timm fetch it)
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise EncoderError(f"timm has no model '{arch}'" + (f" (encoder '{name}' resolved to it)" if resolved else "")
                           + (f" (close: {', '.join(close)})" if close else ""))
    try:
        if resolved:
            return _keep_used_blocks(timm.create_model(arch, features_only=True, pretrained=False,
                                                       pretrained_cfg=_build_cfg(resolved["pretrained_cfg"]),
                                                       **_stages(depth)))
        return _keep_used_blocks(_create_encoder(name, pretrained, weights_file, depth))
    except (AssertionError, IndexError) as err:  # timm's checks of out_indices, features_only
        raise EncoderError(f"timm cannot build '{name}' as a features_only encoder"
                           + (f" of model.encoder_depth={depth} stages" if depth else "") + f": {err}"
                           + (_stages_it_has(name) if depth else "")) from None


# the pretrained_cfg keys an encoder_resolved record keeps: those that shape the encoder or its input (timm's
# _update_default_model_kwargs: in_chans, and img_size where fixed_input_size, from input_size) and the normalisation
# the Generator takes from it; not where weights are (url, file, hf_hub_id: nothing is fetched), nor the classifier's
# class count and label names (a features_only encoder has no classifier: a stranger's file could ask a vast one)
_RESOLVED_CFG = ("architecture", "input_size", "test_input_size", "min_input_size", "fixed_input_size",
                 "interpolation", "crop_pct", "test_crop_pct", "crop_mode", "mean", "std", "pool_size",
                 "test_pool_size", "first_conv", "classifier")


def encoder_resolved(encoder: nn.Module, name: str, depth: int = 0) -> dict | None:
    """What timm resolved the source-prefixed encoder ``name`` (hf-hub:..., local-dir:...) of the built ``encoder``
    to (its architecture, the pretrained_cfg it was built with and the source config's model_args, read off the
    module: nothing fetched again), for a generator file to be built without the folder or the hub; None for a
    built-in name, or where that cannot be told (an older timm, a value JSON cannot hold)."""
    import json

    import timm

    try:
        source, _ = timm.models.parse_model_name(name)
        cfg, args = dict(getattr(encoder, "pretrained_cfg", None) or {}), getattr(encoder, "_model_args", None)
        if not source or not timm.is_model(cfg.get("architecture") or "") or not isinstance(args, dict):
            return None
        args = {k: v for k, v in args.items() if k != "features_only" and (k, v) not in _stages(depth).items()}
        record = {"architecture": cfg["architecture"], "model_args": args,
                  "pretrained_cfg": {k: cfg[k] for k in _RESOLVED_CFG if cfg.get(k) is not None}}
        return json.loads(json.dumps(record, allow_nan=False))  # (tuples as lists, as the file gives them back)
    except (ValueError, TypeError, AttributeError):  # (parse_model_name's ValueError; a value JSON cannot hold)
        return None


def source_missing(name: str, model_args: dict | None = None) -> str | None:
    """Why timm cannot resolve the source-prefixed encoder ``name`` here, in words with what to do: its local-dir:
    folder lacks config.json, or its hf-hub: repository's config.json is not in the Hugging Face cache (and could not
    be fetched); None for another name, or where the source is there (the build failed otherwise). ``model_args``:
    those of the file's :func:`encoder_resolved` record, which therefore could not stand in for the source (None:
    the file has no record)."""
    import timm

    try:
        source, where = timm.models.parse_model_name(name)
    except (ValueError, AttributeError):
        return None
    file = ("a generator file saved before dist_dejpeg recorded the architecture an encoder name resolves to"
            if model_args is None else "the file records the architecture, but its source config's model_args ("
            + ", ".join(sorted(model_args)[:4]) + ") are built from the source as named")
    if source == "local-dir" and not (Path(where) / "config.json").is_file():
        return (f"its encoder '{name}' is built from {Path(where) / 'config.json'} (timm's architecture for it), "
                f"which is not there ({file}): copy that folder there from the machine it was trained on")
    if source == "hf-hub":
        from huggingface_hub import constants, try_to_load_from_cache

        repo, _, revision = where.partition("@")
        if not isinstance(try_to_load_from_cache(repo, "config.json", revision=revision or None), str):
            return (f"its encoder '{name}' is built from the config.json of the Hugging Face repository '{repo}', "
                    f"which is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and could not be fetched "
                    f"({file}): load it once with access to huggingface.co, which caches it")
    return None


def _build_cfg(cfg: dict) -> dict:
    """A recorded pretrained_cfg as timm's PretrainedCfg takes it: the kept keys this timm knows."""
    import dataclasses

    import timm

    known = {f.name for f in dataclasses.fields(timm.models.PretrainedCfg)}
    return {k: v for k, v in cfg.items() if k in _RESOLVED_CFG and k in known}


def encoder_strides(name: str, depth: int = 0) -> list[int] | None:
    """The strides of the features_only encoder ``name`` of ``depth`` stages (0: all), as the U-Net's encoder has
    them, from timm's model built on the meta device (no weights read, no memory taken: a fraction of a second);
    None where timm cannot build it (create_encoder says why, at the build)."""
    import timm

    try:
        with torch.device("meta"):
            return list(timm.create_model(name, features_only=True, pretrained=False,
                                          **_stages(depth)).feature_info.reduction())
    except Exception:  # noqa: BLE001 - an unknown name, a depth it has not, a model meta tensors cannot build
        return None


def check_any_size(encoder: nn.Module, name: str, stride: int) -> None:
    """The U-Net pads each image to a multiple of the encoder's largest ``stride``, so the encoder must take any
    such size: a ViT's fixed patch grid, a window that needs 256 px or valid convolutions that shrink a small
    input to nothing fail here, at build, with a message, not at the first step with timm's traceback."""
    was = encoder.training
    encoder.eval()  # (batch norm of one sample; no running statistics touched)
    try:
        with torch.no_grad():
            encoder(torch.zeros(1, 3, stride, 2 * stride))
    except (AssertionError, RuntimeError, ValueError) as err:
        first = str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__
        raise EncoderError(f"'{name}' cannot encode a {stride} x {2 * stride} px input (a multiple "
                           f"of its stride {stride}, as the U-Net pads any image to): {first}; use a convolutional "
                           f"encoder that takes any image size (mobilenetv3_large_100, resnet18, efficientnet_b0, "
                           f"convnext_atto, ...)") from None
    finally:
        encoder.train(was)


def _stages(depth: int) -> dict:
    return {"out_indices": tuple(range(depth))} if depth > 0 else {}


def _stages_it_has(name: str) -> str:
    """What an encoder_depth error adds (timm's own words for it are "list index out of range")."""
    import timm

    try:
        n = len(timm.create_model(name, features_only=True, pretrained=False).feature_info)
    except (AssertionError, IndexError, RuntimeError):
        return ""
    return f"; it has {n} (model.encoder_depth: 0 for all, or 2..{n})"


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
    cached = hf_cached_file(repo) if repo else None
    if cached:
        log.info("encoder %s: ImageNet weights from the Hugging Face cache: %s", name, cached)
        return _encoder_from_file(name, cached, depth, source=f"Hugging Face cache of '{repo}'")
    from huggingface_hub import constants

    host = constants.ENDPOINT if repo or name.startswith("hf-hub:") else getattr(cfg, "url", "")
    why = host and not constants.is_offline_mode() and no_download_from(host)
    if why:  # (huggingface_hub would retry a failed lookup for ~45 s before it says the same)
        raise _encoder_unavailable(name, repo, f": {why}")
    try:
        # (a timm download address goes through torch.hub, which has no timeout of its own; huggingface_hub gives each
        # read HF_HUB_DOWNLOAD_TIMEOUT, 10 s, and tries 7 times while no 10 MB chunk comes: 76 s, then a ReadTimeout,
        # its partial file removed; 14 s seen here at 1 s a read)
        with stall_timeout():
            return timm.create_model(name, features_only=True, pretrained=True, **_stages(depth))
    except (AssertionError, IndexError):  # timm's own checks of the model (out_indices): create_encoder names them
        raise
    except Exception as err:  # noqa: BLE001 - any other failure here means "weights not available"
        stalled = stalled_download(host, err, constants.HF_HUB_DOWNLOAD_TIMEOUT if host == constants.ENDPOINT else None)
        raise _encoder_unavailable(name, repo, f": {stalled}" if stalled else f" ({type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''})") from None


def _encoder_unavailable(name: str, repo: str | None, why: str) -> WeightsError:
    """What to do about ImageNet weights that are neither cached nor downloadable (``why``: the end of the first
    sentence)."""
    from huggingface_hub import constants

    where = f"Hugging Face repo '{repo}'" if repo else "timm's download address"
    return WeightsError(
        f"ImageNet weights for encoder '{name}' are not in the local cache and could not be downloaded "
        f"from {where}{why}.\n"
        f"Fix one of: run once with internet access so timm caches them (in {constants.HF_HUB_CACHE}); "
        f"or download the weights file and set "
        f"model.encoder_weights=/path/to/model.safetensors; or set model.pretrained=false for a "
        f"random-init encoder (tests and debugging only). On a machine without internet, HF_HUB_OFFLINE=1 "
        f"says this at once."
    )


def _encoder_from_file(name: str, path: str, depth: int = 0, source: str = "model.encoder_weights") -> nn.Module:
    """timm loads ``features_only`` weights non-strictly; check that the file really held them."""
    import timm

    try:
        model = timm.create_model(name, features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                  **_stages(depth))
    except (AssertionError, IndexError):  # timm's checks of the model (out_indices): create_encoder names them
        raise
    except Exception as err:  # noqa: BLE001 - another model's file (sizes, names) or no weights file at all
        raise WeightsError(f"{source}: {path} does not load into encoder '{name}' ({type(err).__name__}: "
                           f"{' '.join(str(err).split())[:240]}): not weights for this encoder?") from None
    stored = {k.removeprefix("module.") for k in timm.models.load_state_dict(path).keys()}
    missing = [k for k in model.state_dict()
               if not k.endswith("num_batches_tracked") and stored.isdisjoint(_file_names(k))]
    if missing:
        raise WeightsError(f"{source}: {path} lacks {len(missing)} of encoder '{name}''s weights "
                           f"(e.g. {', '.join(missing[:3])}): not weights for this encoder?")
    return model


def _file_names(key: str) -> list[str]:
    """The names a feature model's ``key`` may have in the classifier's file: timm's feature wrappers flatten the
    model's top-level Sequentials into their own children (ConvNeXt's ``stages.0.x`` is their ``stages_0.x``)."""
    first, dot, rest = key.partition(".")
    return [key, *(f"{first[:i]}.{first[i + 1:]}{dot}{rest}" for i, c in enumerate(first) if c == "_")]


def lpips_backbone_weights(net: str):
    """torchvision's ImageNet weights enum of LPIPS's ``net`` backbone (its url names the cached file)."""
    import torchvision

    return {"vgg": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
            "alex": torchvision.models.AlexNet_Weights.IMAGENET1K_V1}[net]


def lpips_backbone_state(net: str, weights_file: str, key: str) -> dict:
    """The state of lpips_backbone (its weights alone)."""
    return lpips_backbone(net, weights_file, key)[0]


def lpips_backbone(net: str, weights_file: str, key: str) -> tuple[dict, str]:
    """torchvision ImageNet weights for LPIPS's ``net`` backbone: an explicit file, the torch hub cache,
    or a download into that cache; and "" where they are torchvision's file (by its SHA-256, as torch.hub's
    check_hash checks a download), else why not (a stand-in or another file: the numbers are then not LPIPS's).
    ``key`` is the config key named in errors."""
    if weights_file:
        if not Path(weights_file).is_file():
            raise WeightsError(f"{key}: file not found: {weights_file}"
                               + (" (a folder: name the file in it)" if Path(weights_file).is_dir() else ""))
        return _state_dict(weights_file, f"{key}: {weights_file}"), not_torchvisions(weights_file, net)
    url = lpips_backbone_weights(net).url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if cached.is_file():
        return (_state_dict(cached, f"the cached {cached} (remove it: it is downloaded again)"),
                not_torchvisions(cached, net))
    why = no_download_from(url)  # (torch.hub's download has no timeout: a network that drops packets would hold it)
    if not why:
        try:
            # torch.hub writes into a .partial file and renames it when complete (removed on any error): a stalled
            # download leaves nothing in the cache that a later run could take for the weights
            with stall_timeout():
                return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True,
                                                          check_hash=True), ""
        except Exception as err:  # noqa: BLE001 - any failure here means "weights not available"
            why = stalled_download(url, err) or type(err).__name__
    raise WeightsError(
        f"LPIPS-{net} needs torchvision's ImageNet backbone {cached.name}, which is not at {cached} and "
        f"could not be downloaded from {url} ({why}).\n"
        f"Fix one of: place the file there (or set TORCH_HOME); or set {key}=/path/to/{cached.name}; or "
        f"set loss.lpips_pretrained=false for a random backbone (tests and debugging only: the LPIPS "
        f"numbers are then not LPIPS)."
    )


def not_torchvisions(path: str | Path, net: str) -> str:
    """"" where the file at ``path`` is torchvision's ImageNet file of LPIPS's ``net`` backbone (its SHA-256 starts
    with the digits its download name carries: alexnet-owt-7be5be79.pth), else what it is not."""
    name = os.path.basename(lpips_backbone_weights(net).url)
    expected = re.search(r"-([0-9a-f]{6,})\.", name).group(1)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    got = digest.hexdigest()
    return "" if got.startswith(expected) else (f"{Path(path).name} is not torchvision's {name} (its SHA-256 starts "
                                                f"{got[:len(expected)]}, not {expected})")


def _state_dict(path, named: str) -> dict:
    """The tensors a torch weights file holds; a WeightsError naming it (``named``) where it holds none (a text
    file, a download cut short: torch's unpickler raised KeyError or UnicodeDecodeError, naming nothing)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler raises anything for bytes that are not its format
        # (by type only: its messages are a stray key, or advice to unpickle the file with weights_only=False)
        raise WeightsError(f"{named} is not a torch weights file (torch.load: {type(err).__name__})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{named} holds a {type(state).__name__}, not a state dict of weights")
    return state


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
