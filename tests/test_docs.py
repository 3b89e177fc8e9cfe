"""The README's config reference matches the schema, and every schema field is documented."""

import dataclasses
from pathlib import Path

from dist_dejpeg import config

README = Path(__file__).parents[1] / "README.md"


def test_readme_config_reference_is_current():
    text = README.read_text()
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    embedded = text[text.index(start) + len(start):text.index(end)].strip()
    assert embedded == config.reference_markdown().strip(), (
        "README config reference is stale: regenerate it with `python -m dist_dejpeg.config`")


def test_every_config_field_has_a_documented_row():
    reference = config.reference_markdown()
    sections = {"data": config.DataConfig, "model": config.ModelConfig, "critic": config.CriticConfig,
                "loss": config.LossConfig, "train": config.TrainConfig, "train.phases.<name>": config.PhaseConfig}
    for prefix, cls in sections.items():
        for f in dataclasses.fields(cls):
            assert f"`{prefix}.{f.name}`" in reference, f"{prefix}.{f.name} has no comment in config.py"


def test_readme_commands_match_ci():
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text(), "`.ci/run` must run exactly the README's test command"
