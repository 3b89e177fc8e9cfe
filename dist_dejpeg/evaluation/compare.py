"""Compare models from what ``evaluate`` (or ``report``) wrote: the same photos at the same qualities, paired.

    dist-dejpeg evaluate --model runs/a --images photos/ -o eval_a/     # (each on its own node, if you like)
    dist-dejpeg evaluate --model runs/b --images photos/ -o eval_b/     # (or report ... -o report_b.html)
    dist-dejpeg compare eval_a/ eval_b/ --metrics psnr ssim            # B - A per quality, paired per photo

The first evaluation is the baseline. Per metric and quality: the JPEG's mean, each model's mean (and its gain
over the JPEG), and each other model's difference from the baseline as the mean of the per-photo differences
with two standard errors of that mean (about a 95% interval: a difference whose interval holds zero is not
shown to be one) and the photos on which it is better (a per-photo difference within the metric's same_within, half
its last printed digit, is a tie: float rounding, as of the same model exported to ONNX, is no better or worse). Only
photo-quality pairs every evaluation measured, with
a finite value in each, count; evaluations measured differently (another colour channel, border crop, chroma
subsampling or LPIPS backbone) are refused: their numbers do not compare; so are photos whose JPEG inputs measure
differently (another photo of the same name, or another compression). Torch-free.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dist_dejpeg.evaluation.cells import md_cell
from dist_dejpeg.evaluation.pairs import channel_note
from dist_dejpeg.metrics.registry import BY_NAME, ZERO
from dist_dejpeg.run.layout import METRICS as METRICS_JSON  # (evaluate writes the name a run's metrics have)

# the settings that change what a number means: evaluations that differ in one are not compared
SAME = {"channel": "colour channel (--y-only)", "crop_border": "border crop (--crop-border)",
        "subsampling": "chroma subsampling of the JPEGs (--subsampling)", "lpips": "LPIPS backbone",
        "psnr_b": "PSNR-B convention"}
DEFAULT_METRICS = ("psnr", "ssim", "lpips")
# what an evaluation that records no PSNR-B convention (made before meta.psnr_b) measured: the exact boundary-pair
# count, which KAIR's equals only where a photo's sides are multiples of 8 (481x321 at q10: 0.04 dB apart)
PSNR_B_BEFORE = "the exact boundary-pair count (before the KAIR convention was recorded)"


class CompareError(ValueError):
    """Evaluations that cannot be compared, or a path that holds none; the message says which and why."""


def read_evaluation(path: str | Path) -> dict:
    """metrics.json from ``path``: the file, the folder ``evaluate -o`` wrote, or a ``report`` page (its tables
    are in the folder named as the page without its suffix)."""
    path = Path(path)
    if path.suffix.lower() in (".html", ".htm"):
        path = path.with_suffix("")
    file = path / METRICS_JSON if path.is_dir() else path
    if not path.exists():
        raise CompareError(f"{path}: no such file or folder")
    try:
        result = json.loads(file.read_text())
    except FileNotFoundError:
        raise CompareError(f"{path}: no {METRICS_JSON} there: give the folder `dist-dejpeg evaluate -o` wrote, or "
                           f"its {METRICS_JSON}") from None
    except (OSError, ValueError) as err:
        raise CompareError(f"{file}: not readable as evaluate's {METRICS_JSON} ({err})") from None
    if isinstance(result, dict) and "per_image" not in result and "global_step" in (result.get("meta") or {}):
        raise CompareError(f"{file}: a training run's {METRICS_JSON} (its validation crops): compare takes what "
                           f"`dist-dejpeg evaluate --model RUN --images PHOTOS -o EVAL` writes, one per model")
    if not isinstance(result, dict) or not {"meta", "per_image"} <= set(result):
        raise CompareError(f"{file}: not evaluate's {METRICS_JSON} (no meta and per_image)")
    result["meta"]["path"] = str(path)
    return result


def check_compare_output(out: Path, results: list[dict]) -> None:
    """A CompareError where ``-o out`` is a folder, or would write over what an evaluation compared holds (its
    metrics.json, .csv, .md or report page: the comparison's own input, lost)."""
    if out.is_dir():
        raise CompareError(f"-o {out} is a folder: give the file to write (compare.md)")
    stem = METRICS_JSON.rsplit(".", 1)[0]
    for result in results:
        given = Path(result["meta"]["path"])  # the folder, its metrics.json, or a report page's folder
        folder = given if given.is_dir() else given.parent
        own = [given, given.with_suffix(".html"), *(folder / f"{stem}.{ext}" for ext in ("json", "csv", "md"))]
        if out.resolve() in {p.resolve() for p in own}:
            raise CompareError(f"-o {out} is part of the evaluation {given} compared: give another file")


def _setting(meta: dict, key: str):
    if key == "subsampling":  # "libjpeg via Pillow 11.0.0, 4:2:0 chroma subsampling": the Pillow version aside
        return meta.get("compression", "").rpartition(", ")[2]
    if key == "lpips" and meta.get(key) == "unavailable":
        return None  # (its values are missing: the table says so, the others still compare)
    if key == "psnr_b":
        return meta.get(key) or PSNR_B_BEFORE
    if key == "channel" and str(meta.get(key)).startswith("Y ("):  # (the label changed, rgb_to_y did not: _check_gray)
        return "Y (ITU-R BT.601)"
    return meta.get(key)


def _check_gray(results: list[dict]) -> None:
    """Y evaluations labelled before and since grayscale photos were measured on their one channel (ea7c3c6:
    +1.32 dB PSNR for such a photo; a colour photo's Y unchanged) compare unless grayscale photos are in them."""
    labels = {r["meta"].get("channel") for r in results if _setting(r["meta"], "channel") == "Y (ITU-R BT.601)"}
    if len(labels) < 2 or not any((r["meta"].get("grayscale_images") or 0) > 0 for r in results):
        return
    old = [r["meta"]["path"] for r in results if "grayscale_images" not in r["meta"]]
    gray = [f"{r['meta']['path']} ({r['meta']['grayscale_images']})" for r in results
            if (r["meta"].get("grayscale_images") or 0) > 0]
    raise CompareError(f"grayscale photos in {', '.join(gray)}: measured on their one channel, where "
                       f"{', '.join(old) or 'the older evaluations'} measured a grayscale photo's Y (1.32 dB lower); "
                       f"how many of {'its' if len(old) == 1 else 'their'} photos were grayscale is not recorded "
                       f"(it predates the count), so which numbers moved cannot be known: evaluate them again")


def _key(row: dict) -> tuple:
    return row["image"], row.get("height"), row.get("width"), int(row["quality"])


def _values(result: dict, metric: str) -> dict[tuple, tuple[float, float]]:
    """{(photo, height, width, quality): (JPEG value, restored value)} where both are finite."""
    found = {}
    for row in result["per_image"]:
        pair = (row.get("jpeg", {}).get(metric), row.get("restored", {}).get(metric))
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair):
            found[_key(row)] = pair
    return found


def compare(results: list[dict], metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict:
    """The comparison of ``results`` (read_evaluation's; the first is the baseline) on ``metrics``: per metric,
    per quality: photos, the JPEG's mean, each model's mean and the photos its guard passed through unchanged, and
    each other model's paired difference from the baseline (mean, two standard errors, photos better).
    CompareError where they were measured differently, or of other photos."""
    if unknown := [m for m in metrics if m not in BY_NAME]:  # (first: `ev1 --metrics psnr ev2` took ev2 for one)
        paths = [m for m in unknown if Path(m).exists()]
        raise CompareError(f"unknown metric(s) {', '.join(unknown)}: choose from {', '.join(BY_NAME)}" + (
            f" ({', '.join(paths)}: an evaluation? give the evaluations before --metrics)" if paths else ""))
    if len(results) < 2:
        raise CompareError("compare needs two evaluations or more (the first is the baseline)")
    paths = [(p / METRICS_JSON if p.is_dir() else p).resolve() for p in (Path(r["meta"]["path"]) for r in results)]
    if twice := sorted({r["meta"]["path"] for r, p in zip(results, paths) if paths.count(p) > 1}):
        raise CompareError(f"{', '.join(twice)} given twice: compare sets different evaluations side by side")
    for key, what in SAME.items():
        if key == "psnr_b" and "psnr_b" not in metrics:
            continue  # (the other metrics' numbers do not depend on it)
        settings = [_setting(r["meta"], key) for r in results]
        differ = [r["meta"]["path"] for r, v in zip(results, settings)
                  if v != settings[0] and None not in (v, settings[0])]
        if differ:
            raise CompareError(f"{', '.join(differ)} measured with another {what} than {results[0]['meta']['path']} "
                               f"({settings[0]!r}): their numbers do not compare; evaluate them alike")
    _check_gray(results)
    _check_same_inputs(results)
    measured = [{_key(row) for row in r["per_image"]} for r in results]
    if not set.intersection(*measured):
        each = [f"{r['meta']['path']}: {len({k[0] for k in m})} photo(s) at "
                f"{', '.join(f'q{q}' for q in sorted({k[3] for k in m})) or 'no quality'}"
                for r, m in zip(results, measured)]
        raise CompareError(f"no photo at any quality was measured in all of them ({'; '.join(each)}): evaluate them "
                           f"on the same photos and qualities")
    passed = [{_key(row) for row in r["per_image"] if row.get("passthrough")} for r in results]
    tables = {}
    for metric in metrics:
        each = [_values(r, metric) for r in results]
        common = sorted(set.intersection(*(set(v) for v in each)))
        rows = {}
        for q in sorted({key[3] for key in common}):
            keys = [k for k in common if k[3] == q]
            jpeg = [each[0][k][0] for k in keys]
            models = [[v[k][1] for k in keys] for v in each]
            rows[str(q)] = {"photos": len(keys), "jpeg": _mean(jpeg), "models": [_mean(m) for m in models],
                            "passed_through": [len(p.intersection(keys)) for p in passed],
                            "versus_first": [_paired(models[0], m, BY_NAME[metric]) for m in models[1:]]}
        tables[metric] = {"label": BY_NAME[metric].caption, "phrase": BY_NAME[metric].phrase, "qualities": rows,
                          "left_out": sum(len(v) for v in each) - len(common) * len(each),
                          "not_measured": [i for i, v in enumerate(each) if not v],
                          # why, as its metrics.json says (None: no word: the metric did not exist when it was made)
                          "unavailable": [((r["meta"].get("unavailable") or {}).get(metric))
                                          for r, v in zip(results, each) if not v]}
    return {"evaluations": [_describe(r["meta"]) for r in results], "measured": _measured(results[0]["meta"]),
            "metrics": tables}


def _measured(meta: dict) -> dict:
    """How every evaluation compared was measured (SAME: they agree, or compare refused them), the baseline's words:
    the channel (with its grayscale photos), the JPEGs' chroma subsampling, the border crop, the PSNR-B convention."""
    return {"channel": channel_note(meta) if meta.get("channel") else None,
            "subsampling": _setting(meta, "subsampling") or None, "crop_border": meta.get("crop_border"),
            "psnr_b": _setting(meta, "psnr_b")}


def _check_same_inputs(results: list[dict], metric: str = "psnr") -> None:
    """The JPEG inputs' PSNRs must agree: the same photo compressed alike measures the same, on any device (float64
    numpy; its name and size alone could be another photo's), so a difference means other photos or another
    compression."""
    each = [_values(r, metric) for r in results]
    for key in sorted(set.intersection(*(set(v) for v in each))):
        first = each[0][key][0]
        for result, values in zip(results[1:], each[1:]):
            if abs(values[key][0] - first) > 1e-6 * max(1.0, abs(first)):
                raise CompareError(
                    f"photo {key[0]!r} at q{key[3]}: its JPEG's {metric} is {first!r} in {results[0]['meta']['path']} "
                    f"but {values[key][0]!r} in {result['meta']['path']}: not the same photo (a name shared by "
                    f"another), or compressed differently; compare evaluations of the same photos")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _paired(first: list[float], other: list[float], metric) -> dict:
    """other - first, photo by photo: the mean difference, two standard errors of it (None for one photo), on how
    many photos ``other`` is better (metric.improved) and on how many the same (within metric.same_within)."""
    diffs = [b - a for a, b in zip(first, other)]
    n, mean = len(diffs), _mean(diffs)
    spread = (2 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)) if n > 1 else None
    within = metric.same_within
    same = [abs(abs(b) - abs(a) if metric.direction == ZERO else b - a) <= within for a, b in zip(first, other)]
    better = sum(bool(metric.improved(a, b)) and not tie for a, b, tie in zip(first, other, same))
    return {"mean": mean, "two_se": spread, "better": better, "same": sum(same), "same_within": within, "photos": n}


def _describe(meta: dict) -> dict:
    model = meta.get("model") or {}
    return {"path": meta["path"], "model": model.get("source"), "global_step": model.get("global_step"),
            "encoder_init": model.get("encoder_init"), "guard": meta.get("guard"),
            "quality_given": meta.get("quality_given"), "images": meta.get("images")}


def markdown(comparison: dict) -> str:
    """The comparison as markdown tables, one per metric (what ``compare`` prints and ``-o`` writes)."""
    evals = comparison["evaluations"]
    letters = [chr(ord("A") + i) if i < 26 else f"M{i}" for i in range(len(evals))]
    how = comparison.get("measured") or {}
    lines = [f"Evaluations (A is the baseline), all measured on {how.get('channel') or 'a channel not recorded'}, "
             f"JPEGs at {how.get('subsampling') or 'a chroma subsampling not recorded'}, border crop "
             f"{how.get('crop_border', 'not recorded')}"
             + (f", PSNR-B as {how.get('psnr_b') or 'not recorded'}" if "psnr_b" in comparison["metrics"] else "")
             + ":", ""]
    for letter, e in zip(letters, evals):
        lines.append(f"- {letter}: {md_cell(e['path'])}: model {md_cell(e['model'])}, step {e['global_step']}, encoder "
                     f"{e['encoder_init']}, guard {'on' if e['guard'] else 'off'}, quality "
                     f"{'told' if e['quality_given'] else 'not told (blind)'}, {e['images']} photos")
    for metric, table in comparison["metrics"].items():
        lines += ["", f"{table['label']}, {table['phrase']}: mean over the photos every evaluation measured (gain "
                      f"over the JPEG); difference from A photo by photo, +- two standard errors"
                  + (f" ({table['left_out']} values not common to all left out)" if table["left_out"] else ""), "",
                  "| quality | photos | JPEG | " + " | ".join(letters) + " | "
                  + " | ".join(f"{x} - A" for x in letters[1:]) + " |",
                  "|---|---|---|" + "---|" * (2 * len(letters) - 1)]
        digits = 3 if BY_NAME[metric].unit == "dB" else BY_NAME[metric].decimals
        for q, row in table["qualities"].items():
            means = [f"{m:.{digits}f} ({m - row['jpeg']:+.{digits}f}" + (f", {n} passed through)" if n else ")")
                     for m, n in zip(row["models"], row["passed_through"])]
            diffs = [f"{d['mean']:+.{digits}f}" + (f" +- {d['two_se']:.{digits}f}" if d["two_se"] is not None
                                                   else "") + f" ({_photos_better(d, BY_NAME[metric].unit)})"
                     for d in row["versus_first"]]
            lines.append(f"| q{q} | {row['photos']} | {row['jpeg']:.{digits}f} | " + " | ".join(means + diffs) + " |")
        why = dict(zip(table["not_measured"], table["unavailable"]))
        if said := [letters[i] for i, reason in why.items() if reason]:
            lines.append(f"| not measured in {', '.join(said)} (meta.unavailable in {METRICS_JSON} says why) |")
        if unsaid := [f"{letters[i]}'s" for i, reason in why.items() if not reason]:
            verb = "evaluations predate" if len(unsaid) > 1 else "evaluation predates"
            lines.append(f"| {', '.join(unsaid)} {verb} this metric (or did not measure it): run evaluate again |")
    return "\n".join(lines) + "\n"


def _photos_better(d: dict, unit: str) -> str:
    """"better on 1 of 4, same within 0.005 dB on 3": the photos better, and those within the metric's same_within."""
    same = f"same within {d['same_within']:g}{' ' + unit if unit else ''} on {d['same']}"
    if d["same"] == d["photos"]:
        return f"{same} of {d['photos']}"
    return f"better on {d['better']} of {d['photos']}" + (f", {same}" if d["same"] else "")

