"""``model.init_from``: a new run's generator starts from a trained one (fine-tuning). Which model keys must match the
source's, checked from its config alone (no weights read, no torch model built), so that ``train --dry-run`` and the
launcher of ``train.processes`` say a source of other shapes, or none, before any rank starts (the ranks found it
after their start-up). build.py builds the generator from it (build_parts).

    model = init_from_config(cfg.model)   # a ConfigError naming the keys that differ; else the effective config
"""

from __future__ import annotations

import dataclasses

from dist_dejpeg.config import ConfigError, ModelConfig
from dist_dejpeg.models.generator_file import model_config_at
from dist_dejpeg.models.names import ModelFileError
from dist_dejpeg.models.unet import GENERATOR_KEYS, attention_site

# the generator's keys that change no tensor's shape: where its initial weights come from
GENERATOR_WEIGHTS_FROM = ("pretrained", "encoder_weights")
# the generator's keys that make no tensor but change what it computes (a blur after each pixel shuffle, the
# correction's mean taken out): a new run may start from a generator with others (fine-tuning switches them), a
# resumed run may not (resume.py: it continues the architecture it trained). tests/test_models.py checks both lists
# against the state_dicts of a small generator.
GENERATOR_NO_TENSOR = ("blur", "keep_mean")
GENERATOR_SHAPE_KEYS = tuple(f"model.{k}" for k in GENERATOR_KEYS
                             if k not in GENERATOR_WEIGHTS_FROM + GENERATOR_NO_TENSOR)
# the keys that say where the self-attention sits (unet.attention_site): another attention_stride that the encoder
# takes to the same skip stride (one it has no skip at) builds the same generator
_ATTENTION_KEYS = ("encoder", "encoder_depth", "self_attention", "attention_stride")


def same_shapes_but_stride(differ: list[str], old: dict, new: dict) -> list[str]:
    """``differ`` (the generator keys whose values differ between two configs, ``old`` and ``new``: their model
    keys, unprefixed) less model.attention_stride where both put the self-attention at the same stride (or neither
    has one): the asked stride is not the one the U-Net uses where its encoder has no skip there."""
    if "model.attention_stride" not in differ or any(old.get(k) != new.get(k) for k in _ATTENTION_KEYS[:3]):
        return differ
    try:
        same = attention_site(*(old[k] for k in _ATTENTION_KEYS)) == attention_site(*(new[k] for k in _ATTENTION_KEYS))
    except (KeyError, TypeError, ValueError):  # (a config from before one of the keys, or another type there)
        return differ
    return [k for k in differ if k != "model.attention_stride"] if same else differ


def init_from_config(model: ModelConfig) -> ModelConfig:
    """``model`` as a run starting from ``model.init_from`` has it: the source's encoder lineage (``pretrained``:
    whether its encoder began as ImageNet's; no weights file is read for it). A source whose tensor shapes
    differ from ``model``'s (the generator's shape keys), or that is no generator, is a ConfigError naming them.
    Keys that make no tensor (blur, keep_mean) may differ: the run's own values hold (build.py builds it so)."""
    if not model.init_from:
        return model
    try:
        source = model_config_at(model.init_from)
    except ModelFileError as err:
        raise ConfigError(f"config key 'model.init_from': {err}") from None
    differ = [k for k in GENERATOR_SHAPE_KEYS if getattr(source, k[6:]) != getattr(model, k[6:])]
    differ = same_shapes_but_stride(differ, dataclasses.asdict(source), dataclasses.asdict(model))
    if differ:
        raise ConfigError(f"config key 'model.init_from': {model.init_from} is a generator of other shapes: "
                          + ", ".join(f"{k} {getattr(source, k[6:])!r} (here {getattr(model, k[6:])!r})" for k in differ)
                          + ": set them to the source's values to start from it")
    return dataclasses.replace(model, pretrained=source.pretrained, encoder_weights="")
