"""Typed configuration: dataclasses + OmegaConf structured config, YAML files and ``key=value`` overrides.

    dist-dejpeg train --config configs/debug.yaml train.run_dir=runs/try1 data.batch_size=8

Every field is typed and has a default. Loading is strict: an unknown key or a value of the wrong type is a
:class:`ConfigError` that names the key (and where a key of that name is, for one put in the wrong section).
Nothing here mutates what it was given. schema.py holds the fields, checks.py what their types cannot say,
reference.py docs/CONFIG.md's tables.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dist_dejpeg.config.checks import UNUSED_PHASE_KEYS, clip_norms, validate
from dist_dejpeg.config.reference import reference_markdown
from dist_dejpeg.config.schema import (COMPILE_MODES, CUDAGRAPH_MODES, PHASE_KINDS, TRACKER_PACKAGES, Config, ConfigError,
                                       CriticConfig, DataConfig, LossConfig, ModelConfig, PhaseConfig, TrainConfig,
                                       default_phases)
from dist_dejpeg.run.layout import flatten  # (defined in the torch-free layer, which may not import config)

__all__ = ["COMPILE_MODES", "CUDAGRAPH_MODES", "PHASE_KINDS", "TRACKER_PACKAGES", "Config", "ConfigError",
           "CriticConfig", "DataConfig", "LossConfig", "ModelConfig", "PhaseConfig", "TrainConfig", "apply_overrides",
           "clip_norms", "default_phases", "did_you_mean", "flatten", "from_dict", "load_config",
           "reference_markdown", "to_dict", "to_yaml", "validate"]


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults, then the YAML file (if any), then ``key=value`` overrides; validated."""
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            path = Path(path)
            merged = OmegaConf.merge(merged, _read_file(path))
        merged = OmegaConf.merge(merged, _dotlist(overrides))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _config_error(err) from None
    except TypeError:  # omegaconf merging a list or a value where sections of keys are, or the reverse
        raise ConfigError(_other_kind(path, overrides)) from None
    validate(cfg)
    given = flatten(OmegaConf.to_container(_dotlist(overrides))) if overrides else {}
    # (read by checks.order_warnings: the overrides of a phase train.order leaves out, which set nothing)
    setattr(cfg, UNUSED_PHASE_KEYS, [k for k in given if k.startswith("train.phases.")
                                     and k.split(".")[2] not in cfg.train.order])
    return cfg


def _other_kind(path: Path | None, overrides: Sequence[str]) -> str:
    """Which override (else the file) gives a list or a value where the schema has sections of keys, or the
    reverse (`train.phases=[gan]` for train.order): omegaconf's TypeError names none."""
    kinds = "a list or a value where the config holds sections of keys, or the reverse"
    for item in overrides:
        try:
            OmegaConf.merge(OmegaConf.structured(Config), _dotlist([item]))
        except (TypeError, OmegaConfBaseException):
            key = item.split("=", 1)[0]
            hint = "; the phases' order is train.order" if key == "train.phases" else ""
            return f"config key '{key}': `{item}` gives {kinds}{hint}"
    return f"config file {path}: it gives {kinds}"


def _read_file(path: Path) -> DictConfig:
    """A config file's sections; a missing file, a YAML syntax error or a file that is not sections of keys (a
    list, binary) is a one-line ConfigError, not a parser's traceback."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: give the YAML file (e.g. {path / 'train.yaml'})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path}: not valid YAML: {err.problem or err.context}{where}") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:  # (binary, a bare number, no read permission)
        first = str(err).splitlines()[0]
        raise ConfigError(f"config file {path}: cannot be read as a YAML config ({first})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path}: holds a list, not sections of keys (data:, model:, train: ...)")
    sections = {f.name for f in dataclasses.fields(Config)}
    for key, value in OmegaConf.to_container(loaded, resolve=False).items():
        if value is None and len(loaded) == 1 and path.read_text(errors="replace").strip() == str(key):
            raise ConfigError(f"config file {path}: holds the text {str(key)[:60]!r}, not sections of keys "
                              f"(data:, model:, train: ...)")
        if key in sections and value is None:  # a section whose keys are all commented out: its defaults
            del loaded[key]
        elif key in sections and not isinstance(value, dict):  # (unknown keys: validation's message)
            raise ConfigError(f"config file {path}: {key}: is {value!r}, not a section of keys (its keys are "
                              f"written indented below it)")
    return loaded


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A new Config: ``cfg`` with ``key=value`` overrides applied, validated the same way as load_config."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), _dotlist(overrides))
        out = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _config_error(err) from None
    validate(out)
    return out


# YAML indicators that start no config value but a glob or a path can (data.train_glob=*.tar): such a value is the
# text itself, not a YAML alias (a traceback) or anchor (silently None)
LITERAL_STARTS = tuple("*&!%@`|>")


def _dotlist(overrides: Sequence[str]):
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    parts = []
    for override in overrides:
        key, _, value = override.partition("=")
        if more := re.search(r"\s([a-z_]+\.[\w.]+=\S*)", value):  # "$OVERRIDES" quoted: one argument of several
            raise ConfigError(f"config key '{key}': its value {value!r} holds another override ({more.group(1)}): give "
                              f"each key=value as an argument of its own (a shell variable of several unquoted, or "
                              f"a bash array)")
        if value.startswith(LITERAL_STARTS) or not value:  # (key= : the empty text, as a shell leaves key='')
            override = f"{key}={json.dumps(value)}"  # a JSON string is a YAML string
        try:
            parts.append(OmegaConf.from_dotlist([override]))
        except yaml.YAMLError as err:
            raise ConfigError(f"config key '{key}': cannot read the value {value!r} "
                              f"({str(err).splitlines()[0]}); a list is [a,b], a text with YAML's "
                              f"characters goes in quotes: '{key}=\"...\"'") from None
    return OmegaConf.merge(*parts) if parts else OmegaConf.create()


# where an unknown key's reader looks for the keys there are (a new key is declared there, with its comment)
KEYS_DECLARED = " (keys are declared in dist_dejpeg/config/schema.py; docs/CONFIG.md lists them)"


def _config_error(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None)
    first = str(err).splitlines()[0]
    if key and isinstance(err, ConfigKeyError) and "Did you mean" not in first:
        first += _elsewhere(key)
    if isinstance(err, ConfigKeyError):
        first += KEYS_DECLARED
    if "is not a ListConfig" in first:  # a list key given one value
        first = f"expects a list, e.g. {key}=[a,b] (in quotes on a shell command line)"
    return ConfigError(f"config key '{key}': {first}" if key else first)


def _elsewhere(key: str) -> str:
    """An unknown key whose last part is a key of another section: where it is (``train.lr`` is a phase's)."""
    leaf = key.rpartition(".")[2]
    found = sorted({re.sub(r"^train\.phases\.[^.]+\.", "train.phases.<name>.", k)
                    for k in flatten(to_dict(Config())) if k.rpartition(".")[2] == leaf})
    return f". Did you mean {' or '.join(repr(k) for k in found)}?" if found else ""


def did_you_mean(cfg: Config, key: str) -> str:
    """For a key ``cfg`` lacks (``--get``): ". Did you mean ...?" naming keys or sections spelled alike, else
    where a key of that last name is (``lr``: a phase's); "" when there is none."""
    flat = flatten(to_dict(cfg))
    names = sorted(set(flat) | {k.rsplit(".", n)[0] for k in flat for n in range(1, k.count(".") + 1)})
    close = difflib.get_close_matches(key, names, n=2)
    return f". Did you mean {' or '.join(map(repr, close))}?" if close else _elsewhere(key)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. stored beside exported weights); strict."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data)))
    except OmegaConfBaseException as err:
        raise _config_error(err) from None
    except TypeError as err:  # omegaconf merging a list or a value where sections of keys are, or the reverse
        raise ConfigError(f"a list or a value where the config holds sections of keys, or the reverse: {err}") from None
    validate(cfg)
    return cfg
