"""What tells a sweep's runs apart: the config values that differ between the runs ``status`` lists, from each
run's config.yaml (the one status read: the run's, else its newest checkpoint's copy), each key by the shortest
name that stays unambiguous among the configs' keys (``gen.lr``, ``crop``). Pure reading. Torch-free."""

from __future__ import annotations

from pathlib import Path

from dist_dejpeg.run.folder import read_yaml
from dist_dejpeg.run.layout import flatten  # (the one dist_dejpeg.config exports: run/ may not import config)

OWN_KEYS = ("train.run_dir",)  # each run's own folder: the table's first column says it
ABSENT = object()  # a key one run's config lacks (a config of another version)


def run_configs(statuses: list[dict]) -> list[dict | None]:
    """Each status's config.yaml (the file status read), flattened to {"a.b.c": value}; None where there is none."""
    out = []
    for s in statuses:
        source = (s.get("config") or {}).get("source") if "error" not in s else None
        tree = read_yaml(Path(source)) if source else None
        out.append(flatten(tree) if tree is not None else None)
    return out


def differences(configs: list[dict | None]) -> list[dict | None]:
    """For each of run_configs's configs: {full key: value} of the keys whose values are not the same in every
    config (a key a config lacks: None), sorted by key; None where the config is None. All {} when fewer than
    two configs are known."""
    known = [c for c in configs if c is not None]
    keys = sorted({k for c in known for k in c} - set(OWN_KEYS)) if len(known) > 1 else []
    differ = [k for k in keys if any(c.get(k, ABSENT) != known[0].get(k, ABSENT) for c in known)]
    return [{k: (None if c.get(k, ABSENT) is ABSENT else c[k]) for k in differ} if c is not None else None
            for c in configs]


def short_names(keys, all_keys) -> dict[str, str]:
    """Each of ``keys`` -> its shortest dotted tail that no other of ``all_keys`` ends with (``train.phases.gen.lr``
    -> ``gen.lr``: every phase has an lr; ``data.crop`` -> ``crop``)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(other != key and (other == tail or other.endswith("." + tail)) for other in all_keys):
                break
        out[key] = tail
    return out


def value_text(value) -> str:
    """A value as a config override writes it: 0.005, [gen, gan], true; '-' for a key the run's config lacks."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(value_text(v) for v in value) + "]"
    return str(value)


def differs_column(statuses: list[dict], most: int = 4) -> list[str]:
    """Per status: 'gen.lr=0.005 w_adv=0.5' (at most ``most`` keys, then '+N more'; '' where nothing differs or
    the run has no config)."""
    configs = run_configs(statuses)
    diffs = differences(configs)
    names = short_names({k for d in diffs if d for k in d}, {k for c in configs if c for k in c})
    out = []
    for d in diffs:
        items = [f"{names[k]}={value_text(v)}" for k, v in (d or {}).items()]
        out.append(" ".join(items[:most]) + (f" +{len(items) - most} more" if len(items) > most else ""))
    return out


def with_differences(statuses: list[dict]) -> list[dict]:
    """``statuses`` (several runs', for ``status --json``), each with "config_differs": {full key: value} of the
    config values that differ between them (keys a train command's overrides name: train.phases.gen.lr);
    {} where none differs, left out for a path that is no run or has no config."""
    for s, differs in zip(statuses, differences(run_configs(statuses))):
        if differs is not None:
            s["config_differs"] = differs
    return statuses
