"""The trained generator as one safetensors file that carries its own model config (no pickle).

    from dist_dejpeg.models.generator_file import load_generator, load_model
    generator = load_generator("runs/debug/generator.safetensors")   # eval mode, CPU
    generator, info = load_model("runs/debug")    # a generator file, a run folder or a checkpoint folder
    generator = ready_for_inference(generator)    # for restoring only (restore.restorer.Restorer does this)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import safe_open
from safetensors.torch import load_file, save

from dist_dejpeg.config import ConfigError, ModelConfig, load_config
# torch-free home of these (the ONNX runtime uses them too)
from dist_dejpeg.models.names import (DIGEST_CHARS, ENCODER_RESOLVED, OWN_HUB, TRAIN_SHARDS, TRAIN_SOURCES,
                                      TRUST_ENCODER, ModelFileError, file_encoder_resolved, file_gains,
                                      file_train_shards, file_train_sources, shard_fingerprint, shard_keys,
                                      trusted_encoder)
from dist_dejpeg.models.layers import fold_batch_norms
from dist_dejpeg.models.unet import Generator, build_generator
from dist_dejpeg.models.weights import encoder_resolved, source_missing
from dist_dejpeg.run.files import atomic_write_bytes
from dist_dejpeg.run.layout import (CHECKPOINT_MODEL, CHECKPOINTS, CONFIG, EMA_GENERATOR, EMA_UPDATES, GENERATOR,
                                    TRAINER_STATE, list_checkpoints)
from dist_dejpeg.run.manifest import usable_checkpoint, verify_checkpoint

FORMAT = "dist_dejpeg.generator.v1"
# a checkpoint's info (and its export's metadata): the folder its train_shards were read from, or why there are none
TRAIN_SHARDS_FROM = "train_shards_from"


class NonFiniteWeights(ValueError):
    """A generator with a NaN or an infinity in its weights or buffers: it would restore images to garbage."""


class CheckpointRemoved(ModelFileError):
    """A checkpoint folder deleted while it was read: a live run's train.keep_last pruning. Chosen as a run
    folder's newest, the then-newest is read instead (:data:`NEWEST_TRIES` times in all)."""


NEWEST_TRIES = 3  # a run folder's newest checkpoint read again after it was pruned away mid-read (one per save)


def save_generator(generator: Generator, model_cfg: ModelConfig, path: str | Path, extra: dict | None = None) -> None:
    """Atomic write of the weights plus ``model_cfg`` (and ``extra`` strings) as safetensors metadata: serialized
    in memory (a generator is tens of MB), then run.files.atomic_write_bytes. A non-finite tensor is a
    NonFiniteWeights error naming it, and nothing is written. An hf-hub: or local-dir: encoder's resolution is
    recorded (ENCODER_RESOLVED): the file loads without that folder or hub repository."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in generator.state_dict().items()}
    if bad := non_finite(state):
        raise NonFiniteWeights(f"{path}: not written: {bad}")
    meta = {"format": FORMAT, "model": json.dumps(dataclasses.asdict(model_cfg))}
    if resolved := encoder_resolved(getattr(generator, "encoder", None), model_cfg.encoder, model_cfg.encoder_depth):
        meta[ENCODER_RESOLVED] = json.dumps(resolved)
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    atomic_write_bytes(path, save(state, metadata=meta))


def non_finite(state: dict) -> str:
    """Which tensors of ``state`` hold a NaN or an infinity, said in words; "" where none does."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return f"{len(bad)} tensor(s) of the generator hold NaN or infinite values ({', '.join(bad[:3])}" \
           f"{', ...' if len(bad) > 3 else ''})" if bad else ""


def training_shards(data_cfg) -> dict[str, str]:
    """The generator file's record of the shards it trained on (``data.root`` / ``data.train_glob``: {shard_keys:
    its file name, or its path in data.root where two share one: fingerprint}), by which evaluate and report tell
    images it saw from images it never saw; {} where they are gone."""
    from dist_dejpeg.data.shards import list_shards, read_manifest

    try:
        prints = {key: shard_fingerprint(p)
                  for p, key in shard_keys(list_shards(data_cfg.root, data_cfg.train_glob), data_cfg.root).items()}
    except OSError:  # (FileNotFoundError: no shards there any more)
        return {}
    try:  # the photos they were cut from, where the folder's manifest (prepare's) names them
        sources = (read_manifest(data_cfg.root) or {}).get("sources") or {}
        photos = {digest[:DIGEST_CHARS]: name for name, s in sources.items()
                  if isinstance(s, dict) and s.get("split") == "train"
                  for digest in (s.get("sha256"), s.get("pixels_sha256")) if isinstance(digest, str)}
    except (OSError, ValueError, AttributeError):
        photos = {}
    return {TRAIN_SHARDS: json.dumps(prints), **({TRAIN_SOURCES: json.dumps(photos)} if photos else {})}


def checkpoint_shards(folder: Path, cfg) -> dict:
    """:func:`training_shards` of the run that wrote checkpoint ``folder``, with ``data.root`` resolved as training
    did: against the folder the run started in (the run folder's path less its relative train.run_dir), not the
    current one. Where that cannot be told (an absolute train.run_dir, a moved run), the nearest folder above the
    run folder that holds the shards. {} where none does; :data:`TRAIN_SHARDS_FROM` says where they were read."""
    data = cfg.data
    tried = [Path(data.root).expanduser()]
    if not tried[0].is_absolute() and not os.path.isabs(data.train_glob):
        folder = Path(os.path.abspath(folder))
        run = next((p.parent for p in folder.parents if p.name == CHECKPOINTS), folder.parent)
        configured = Path(os.path.normpath(Path(cfg.train.run_dir).expanduser()))
        n = len(configured.parts)
        started = not configured.is_absolute() and ".." not in configured.parts and \
            run.parts[len(run.parts) - n:] == configured.parts
        tried = [(run.parents[n - 1] if n else run) / data.root] if started else \
            [above / data.root for above in run.parents]
    for where in tried:
        if shards := training_shards(dataclasses.replace(data, root=str(where))):
            return {**shards, TRAIN_SHARDS_FROM: str(where)}
    return {TRAIN_SHARDS_FROM: f"none: no {data.train_glob} in " + (
        str(tried[0]) if len(tried) == 1 else f"data.root={data.root} of any folder above the run folder")}


def read_metadata(path: str | Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for non-safetensors bytes
        image = _image_format(path)  # the usual mix-up, a photo given as the model: said as such, not as a
        if image:  # safetensors header "too large" (a JPEG's first bytes read as a header length)
            raise ModelFileError(f"{path}: a {image} image, not a model: give a generator file "
                                 f"(generator.safetensors), a run folder or a checkpoint folder") from None
        raise ModelFileError(f"{path}: not a safetensors file ({type(err).__name__}: {err})") from None


def _image_format(path: str | Path) -> str | None:
    """The format of the image at ``path`` ("JPEG", "PNG", ...) where PIL recognises one, else None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.format
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def _build_and_load(model_cfg: ModelConfig, state: dict, source: str, from_file: bool = True,
                    resolved: dict | None = None) -> Generator:
    """Build the generator ``model_cfg`` describes (random-init encoder: the file holds every weight; an hf-hub: or
    local-dir: one from the file's ``resolved`` record where it has one without model_args: nothing fetched or read)
    and load ``state`` strictly; an encoder this timm cannot build or weights that do not fit are a ModelFileError.
    The build's random init draws from a fork of torch's CPU generator: loading leaves the caller's stream as it was."""
    model_cfg = dataclasses.replace(model_cfg, pretrained=False, encoder_weights="")
    record, resolved = resolved, resolved if resolved and not resolved["model_args"] else None  # (model_args: from
    # the source, as named)
    if from_file and not resolved and not trusted_encoder(model_cfg.encoder):  # (a stranger's file would have timm
        # fetch from a hub repository it names; a checkpoint's is its run's own config)
        raise ModelFileError(f"{source}: its encoder '{model_cfg.encoder}' is built from a Hugging Face repository it "
                             f"names, fetched: set {TRUST_ENCODER}=1 if you trust the file (not {OWN_HUB}...)")
    try:
        with torch.random.fork_rng(devices=[]):  # (every weight it draws is replaced by the state's below)
            generator = build_generator(model_cfg, resolved)
    except Exception as err:  # noqa: BLE001 - timm raises RuntimeError / KeyError for unknown models
        import timm

        name = model_cfg.encoder
        if ":" not in name and timm.is_model(name):  # timm knows the encoder: the config's other keys did not build
            raise ModelFileError(f"{source}: the generator its model config describes cannot be built (encoder "
                                 f"'{name}'; {type(err).__name__}: {err})") from None
        if not resolved and (missing := source_missing(name, record["model_args"] if record else None)):  # (not a timm version's doing: its source is gone)
            raise ModelFileError(f"{source}: {missing} ({type(err).__name__}: {err})") from None
        raise ModelFileError(f"{source}: the model's encoder '{model_cfg.encoder}' cannot be built by the installed "
                             f"timm {timm.__version__} ({type(err).__name__}: {err}); install the timm version "
                             f"the model was trained with") from None
    missing, unexpected = [], []
    own = generator.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = [f"{len(v)} {what} (e.g. {', '.join(v[:2])})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("with another shape", shape)) if v]
        raise ModelFileError(f"{source}: the weights do not fit the generator its config describes "
                             f"(encoder '{model_cfg.encoder}'): {'; '.join(parts)}. Trained with another timm "
                             f"version, or not a generator?")
    generator.load_state_dict(state)
    return generator


def model_config_from_meta(meta: dict, source: str) -> ModelConfig:
    """The model config a generator file carries; a ModelFileError where it has none or not one that reads (a file
    written by hand or cut short: it cannot be built)."""
    try:
        fields = json.loads(meta["model"])
        fields.setdefault("decoder_norm", "batch")  # files written before the option existed had batch norm
    except KeyError:
        raise ModelFileError(f"{source}: a generator file without its model config (metadata 'model'): it cannot "
                             f"be built") from None
    except (ValueError, TypeError, AttributeError) as err:  # (json's JSONDecodeError is a ValueError; not a dict)
        raise ModelFileError(f"{source}: the generator file's model config (metadata 'model') is not a JSON "
                             f"object ({err})") from None
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown := sorted(set(fields) - known):  # (an older file lacking keys takes their defaults, as above)
        raise ModelFileError(f"{source}: written by a newer dist_dejpeg: model keys {unknown} unknown to this "
                             f"version; upgrade")
    try:  # typed as a config file's keys are (config.load_config): "false" is false, "abc" no bool
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), fields))
    except OmegaConfBaseException as err:
        raise ModelFileError(f"{source}: the generator file's model config (metadata 'model'): key "
                             f"'{getattr(err, 'full_key', '') or '?'}': {str(err).splitlines()[0]}") from None


def _not_a_generator(path: str | Path, meta: dict) -> ModelFileError:
    inside = (Path(path).parent / TRAINER_STATE).is_file()
    hint = (f"; it lies in a checkpoint folder, whose weights files hold no model config: give the folder, "
            f"{Path(path).parent}") if inside else ""
    return ModelFileError(f"{path}: not a dist_dejpeg generator file (format {meta.get('format')!r}){hint}")


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise _not_a_generator(path, meta)
    generator = _build_and_load(model_config_from_meta(meta, str(path)), load_file(str(path), device="cpu"), str(path),
                                resolved=file_encoder_resolved(meta, str(path)))
    return generator.to(device).eval()


def ready_for_inference(generator: torch.nn.Module) -> torch.nn.Module:
    """``generator`` (in eval mode) changed in place for restoring, computing the same outputs: each spectral
    norm's weight / sigma computed once into a plain weight (in eval mode it is a constant the parametrization
    recomputed at every call), the encoder's batch norms folded into their convolutions (fold_batch_norms), and
    channels_last (oneDNN's convolutions and the blur's pooling run ~20 % faster
    on the CPU without layout conversions; the results differ from NCHW's by float rounding only). Not for a
    generator that will be trained or saved again: its state dict keys change."""
    from torch.nn.utils import parametrize

    generator.eval()
    for module in generator.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    fold_batch_norms(generator)
    return generator.to(memory_format=torch.channels_last)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, dict]:
    """The generator at ``path`` (eval mode) and what is known about it. ``path`` is a ``generator.safetensors``
    file, a run folder (its ``generator.safetensors``, else its newest checkpoint) or a checkpoint folder
    (``checkpoints/step-*``: ``model.safetensors`` with the run's ``config.yaml``, its parameters replaced by the
    EMA's where the checkpoint has ``ema_generator.safetensors``, as the run validated and exports them).

    ``info``: source, format, encoder, encoder_init ("ImageNet" or "random init" at the start of training),
    global_step, lpips (the validation LPIPS of the run), code (the code that trained it, "" where not recorded:
    a checkpoint), model (the model config as a dict). A source-named encoder (local-dir:, hf-hub:) loads without
    its folder or hub where the file records ``encoder_resolved`` without model_args (a checkpoint resolves the
    name); torch's random number generators are left as they were."""
    return _resolved(path, lambda chosen: _load_checkpoint_generator(chosen, device) if chosen.is_dir()
                     else _load_generator_file(chosen, device))


def _load_generator_file(path: Path, device) -> tuple[Generator, dict]:
    meta = read_metadata(path)
    gains = file_gains(meta, str(path))  # (a malformed table refuses the file before its build)
    generator = load_generator(path, device)
    model_cfg = model_config_from_meta(meta, str(path))
    info = {"source": str(path), "format": "generator.safetensors", "global_step": _int(meta.get("global_step")),
            "lpips": meta.get("lpips", ""), "code": meta.get("code", ""), **gains,
            TRAIN_SHARDS: file_train_shards(meta, str(path)),
            TRAIN_SOURCES: file_train_sources(meta, str(path))}
    return generator, _describe(info, model_cfg)


def resolve_model_path(path: str | Path) -> Path:
    """The generator file or checkpoint folder that ``path`` (a generator file, a run folder or a checkpoint
    folder) names, as :func:`load_model` reads it; a ModelFileError where there is none."""
    path = Path(path)
    if path.is_dir():
        if (path / GENERATOR).is_file():
            return path / GENERATOR
        if (path / TRAINER_STATE).is_file():
            return path
        # the newest checkpoint whose files match their manifest's sizes and that holds the generator's weights (a
        # truncated newest one, or one without a manifest whose weights are gone, is skipped); none such: the
        # newest, whose load says what it lacks (a DeepSpeed run's)
        checkpoints = list_checkpoints(path)
        usable = (c for c in reversed(checkpoints) if usable_checkpoint(c))
        newest = next(usable, checkpoints[-1] if checkpoints else None)  # (older ones not verified once one is found)
        if newest is not None:
            return newest
        raise ModelFileError(f"{path}: a folder with neither generator.safetensors nor checkpoints/step-*: "
                             f"give a generator file, a run folder or a checkpoint folder")
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file or folder")
    return path


def model_config_at(path: str | Path) -> ModelConfig:
    """The model config of the generator ``path`` names (see :func:`resolve_model_path`), without its weights."""
    return _resolved(path, lambda chosen: _checkpoint_config(chosen).model if chosen.is_dir()
                     else _file_model_config(chosen))


def _file_model_config(path: Path) -> ModelConfig:
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise _not_a_generator(path, meta)
    return model_config_from_meta(meta, str(path))


def _resolved(path: str | Path, read):
    """``read(resolve_model_path(path))``. Where the checkpoint chosen as a run folder's newest (not one the user
    named) went while it was read (a live run's train.keep_last pruning: CheckpointRemoved, or a file gone before
    its trainer_state.json), again with the then-newest, up to NEWEST_TRIES times."""
    chosen = resolve_model_path(path)
    for tries_left in reversed(range(NEWEST_TRIES)):
        try:
            return read(chosen)
        except ModelFileError as err:
            named = chosen == Path(path)  # (resolve_model_path gives a checkpoint folder back as it is)
            again = None if named or not tries_left else resolve_model_path(path)
            if again is None or (again == chosen and not isinstance(err, CheckpointRemoved)):
                raise
            chosen = again


def _removed(folder: Path) -> CheckpointRemoved:
    return CheckpointRemoved(f"{folder}: the checkpoint was removed while it was read (a live run's "
                             f"train.keep_last pruning); retry, or name a newer checkpoint")


def _checkpoint_config(folder: Path):
    try:
        return load_config(folder / CONFIG)
    except ConfigError as err:
        if not (folder / TRAINER_STATE).is_file():  # (resolve_model_path saw it: every complete checkpoint has one)
            raise _removed(folder) from None
        raise ModelFileError(f"{folder / CONFIG}: {err}") from None


def _load_checkpoint_generator(folder: Path, device) -> tuple[Generator, dict]:
    weights, config = folder / CHECKPOINT_MODEL, folder / CONFIG
    if not weights.is_file() or not config.is_file():
        if not (folder / TRAINER_STATE).is_file():
            raise _removed(folder)
        lacking = [p.name for p in (weights, config) if not p.is_file()]
        raise ModelFileError(f"{folder}: a checkpoint folder without {' and '.join(lacking)} (a DeepSpeed "
                             f"checkpoint? restore from the run folder's generator.safetensors instead)")
    cfg = _checkpoint_config(folder)
    try:
        tensors = load_file(str(weights), device="cpu")
        ema = load_file(str(folder / EMA_GENERATOR), device="cpu") if (folder / EMA_GENERATOR).is_file() else {}
        state = json.loads((folder / TRAINER_STATE).read_text())
    except FileNotFoundError:  # (each file was there when looked for: the folder went since)
        raise _removed(folder) from None
    except Exception as err:  # noqa: BLE001 - safetensors' and json's errors on a truncated or damaged file
        problems = verify_checkpoint(folder, hashes=False).problems
        raise ModelFileError(f"{folder}: a damaged checkpoint ({'; '.join(problems) or f'{type(err).__name__}: {err}'}"
                             f"): name an older checkpoint, or the run's generator.safetensors") from None
    ema.pop(EMA_UPDATES, None)
    generator = _build_and_load(cfg.model, tensors | ema, str(weights), from_file=False).to(device).eval()
    shards = checkpoint_shards(folder, cfg)
    info = {"source": str(folder), "format": "checkpoint", "global_step": _int(state.get("global_step")),
            "lpips": "", "weights": "ema" if ema else "raw", TRAIN_SHARDS: file_train_shards(shards),
            TRAIN_SOURCES: file_train_sources(shards),
            TRAIN_SHARDS_FROM: shards[TRAIN_SHARDS_FROM]}
    return generator, _describe(info, cfg.model)


def _describe(info: dict, model_cfg: ModelConfig) -> dict:
    info.update(encoder=model_cfg.encoder, encoder_init="ImageNet" if model_cfg.pretrained else "random init",
                model=dataclasses.asdict(model_cfg))
    return info


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
