"""What evaluate's tables (metrics.csv, metrics.md) and compare's make of photo names and paths that a spreadsheet
or a markdown renderer would read as something else: a formula, a column break, a row break, HTML. Fast: built
from a result dict, nothing measured."""

from __future__ import annotations

import csv
import io
import json

from dist_dejpeg.evaluation.cells import csv_cell, md_cell
from dist_dejpeg.evaluation.compare import compare, markdown as compare_markdown
from dist_dejpeg.evaluation.evaluate import markdown, table_files
from dist_dejpeg.metrics.registry import EVALUATED, QUALITY

HOSTILE = ["=cmd|' -C calc'!A0", "+1", "-2", "@sum", "\tx", "a|b", "new\nline é", "<img src=x onerror=alert(1)>",
           "a&b \"q\"", "plain"]


def _values(v: float) -> dict:
    return {m: v for m in EVALUATED}


def _result(names: list[str], source: str = "runs/x") -> dict:
    rows = [{"image": n, "quality": 10, "height": 64, "width": 64, "channel": "RGB", "passthrough": False,
             "jpeg": _values(20.0), "restored": _values(21.5)} for n in names]
    mean = {"jpeg": _values(20.0), "restored": _values(21.5), "gain": _values(1.5), "images": len(names),
            "passed_through": 0}
    meta = {"model": {"source": source}, "backbones": "b", "images": len(names), "skipped": [], "channel": "RGB",
            "compression": "libjpeg via Pillow 11.0.0, 4:2:0 chroma subsampling", "crop_border": 0, "device": "cpu",
            "tile": 0, "overlap": 0, "restore_ms_per_megapixel": 1.0, "unavailable": {}, "undefined": {},
            "lpips": "lpips-alex", "path": "eval"}
    return {"meta": meta, "per_quality": {"10": mean}, "per_image": rows}


def test_metrics_csv_names_cannot_run_as_formulas_and_excel_reads_it_as_utf8():
    """A photo named ``=cmd|' -C calc'!A0.png`` ran as a formula when metrics.csv was opened in a spreadsheet; and
    without a BOM Excel on Windows read ``é`` as two Latin-1 characters. metrics.json keeps the names as they are."""
    files = table_files(_result(HOSTILE))
    data = files["metrics.csv"]
    assert data.startswith(b"\xef\xbb\xbf")  # UTF-8's BOM
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    assert list(rows[0]) == ["image", "quality", "input", *EVALUATED, "channel"]  # the BOM stripped, as pandas does
    names = [r["image"] for r in rows[::2]]
    assert names == ["'=cmd|' -C calc'!A0", "'+1", "'-2", "'@sum", "'\tx", *HOSTILE[5:]]
    assert float(rows[0]["psnr"]) == 20.0 and float(rows[1]["psnr"]) == 21.5  # numbers untouched
    assert [r["image"] for r in json.loads(files["metrics.json"])["per_image"]] == HOSTILE
    assert csv_cell("\rx") == "'\rx" and csv_cell(-2.5) == -2.5  # (a carriage return starts a formula too)


def _table_rows(text: str, first: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and first in line]


def test_metrics_md_escapes_names_for_a_table_cell_and_for_inline_html():
    """A ``|`` in a photo's name shifted its numbers a column; a newline split its row; ``<img onerror>`` went raw
    to wikis that render inline HTML; the heading carried the model's path alike."""
    names = ["a|b", "new\nline", "<img src=x onerror=alert(1)>", "x&y"]
    md = markdown(_result(names, source="runs/<b>|x"))
    assert md.startswith("# Evaluation of runs/&lt;b&gt;\\|x\n")
    rows = [line for line in md.splitlines() if line.startswith("| ") and "->" in line and "JPEG" not in line]
    assert len(rows) == 4  # one line each: no row split by a newline
    for row in rows:
        assert len(row.replace("\\|", "").split("|")) == 4 + len(QUALITY), row  # the ends, image, quality, the metrics
    assert rows[0].startswith("| a\\|b | 10 |") and rows[1].startswith("| new line | 10 |")
    assert rows[2].startswith("| &lt;img src=x onerror=alert(1)&gt; | 10 |") and "<img" not in md
    assert rows[3].startswith("| x&amp;y | 10 |")
    # a name's own backslash before a | would unescape it (a column break again); every line break ends a row
    assert md_cell("a\\|b") == "a\\\\\\|b" and md_cell("a\rb\u2028c\x85d\r\ne") == "a b c d e"


def test_compare_md_escapes_the_evaluations_paths_and_models():
    a, b = _result(["p"]), _result(["p"], source="runs/<script>")
    a["meta"]["path"], b["meta"]["path"] = "eval|a\nb", "<img onerror=x>"
    text = compare_markdown(compare([a, b], ("psnr",)))
    assert "- A: eval\\|a b: model runs/x," in text
    assert "- B: &lt;img onerror=x&gt;: model runs/&lt;script&gt;," in text and "<" not in text
