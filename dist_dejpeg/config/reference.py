"""docs/CONFIG.md's tables, built from the schema's field comments (config/schema.py).

    python -m dist_dejpeg.config                          # print the tables
    python -m dist_dejpeg.config --write docs/CONFIG.md   # replace them between the file's markers
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from dist_dejpeg.config.schema import Config, PhaseConfig, TrainConfig

MARKERS = ("<!-- config-reference:start -->", "<!-- config-reference:end -->")


def reference_markdown() -> str:
    """The config reference (one table per section) built from the schema's field comments; docs/CONFIG.md
    holds it between markers and tests/test_docs.py keeps the two in sync."""
    pattern = re.compile(r"^\s+(\w+):\s*([^=]+?)\s*=\s*(.+?)\s*#\s*(.+)$")
    out = []
    for prefix, cls in sections():
        out += [f"**{prefix}**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        defaults = cls()
        for line in inspect.getsource(cls).splitlines():
            match = pattern.match(line)
            if not match:
                continue
            name, typ, _, comment = match.groups()
            value = getattr(defaults, name)
            shown = "(gen, critic, gan; see below)" if name == "phases" else repr(value)
            meaning = comment.strip().replace("|", "\\|")  # "a | b" in a comment would split the table's cell
            out.append(f"| `{prefix}.{name}` | {typ.strip()} | `{shown}` | {meaning} |")
        out.append("")
    return "\n".join(out + builtin_phases_markdown())


def sections() -> list[tuple[str, type]]:
    """(key prefix, dataclass) of each section of keys, in Config's order, read from Config's fields: a section's
    dict of dataclasses (train.phases) follows it as "train.phases.<name>"."""
    out = []
    for f in dataclasses.fields(Config):
        section = getattr(Config(), f.name)
        out.append((f.name, type(section)))
        for g in dataclasses.fields(section):
            value = getattr(section, g.name)
            if isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
                out.append((f"{f.name}.{g.name}.<name>", type(next(iter(value.values())))))
    return out


def builtin_phase_differences() -> dict[str, dict[str, object]]:
    """Each built-in phase (TrainConfig's default train.phases) -> its values that differ from PhaseConfig's."""
    generic = dataclasses.asdict(PhaseConfig())
    return {name: {key: value for key, value in dataclasses.asdict(phase).items() if value != generic[key]}
            for name, phase in TrainConfig().phases.items()}


def builtin_phases_markdown() -> list[str]:
    """A table of what the built-in phases set over the generic train.phases.<name> defaults above."""
    out = ["**built-in phases** (train.phases.gen, .critic, .gan: their values that differ from the defaults above; "
           "a phase added by name takes the defaults above)", "", "| phase | differs from the defaults |", "|---|---|"]
    for name, values in builtin_phase_differences().items():
        shown = ", ".join(f"`{key}: {value!r}`" for key, value in values.items()) or "(nothing)"
        out.append(f"| `{name}` | {shown} |")
    out.append("")
    return out


def write_reference(page: str | Path) -> None:
    """Replace the tables between the page's markers; its prose stays."""
    page = Path(page)
    text = page.read_text()
    if MARKERS[0] not in text or MARKERS[1] not in text.split(MARKERS[0], 1)[1]:
        raise ValueError(f"{page} has no {MARKERS[0]} ... {MARKERS[1]} section to rewrite: add the two markers "
                         f"where the tables go")
    head, rest = text.split(MARKERS[0], 1)
    tail = rest.split(MARKERS[1], 1)[1]
    page.write_text(f"{head}{MARKERS[0]}\n{reference_markdown().strip()}\n{MARKERS[1]}{tail}")
