"""Shared by the benchmarks: the machine's name and writing results as JSON plus a Markdown table."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def machine_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def write_results(out: str | Path, report: dict, title: str, note: str, header: list[str], rows: list[list[str]]) -> None:
    """``out``.json (the report) and ``out``.md (title with the machine, a note, the table); prints the table."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [f"# {title}: {report['machine']}", "", note, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
