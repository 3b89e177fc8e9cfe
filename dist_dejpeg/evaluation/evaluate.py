"""Judge a trained model on lossless photos: JPEG-compress each one at each quality with libjpeg, restore it,
and measure the JPEG input and the restored output against the original with the registry's metrics
(metrics/registry.py).

    dist-dejpeg evaluate --model runs/debug --images photos/ --quality 10 20 30 40 -o eval/
    dist-dejpeg evaluate --model runs/debug --images data/samples/val-*.tar --y-only -o eval_y/

Writes ``metrics.json`` (everything: settings, the model's metadata, per-quality means, per-image values),
``metrics.csv`` (one row per image, quality and input; its columns image, quality, input (jpeg or restored), each
metric (metrics.registry's order), then channel (RGB, Y or gray: what that row was measured on, added last so that
columns read by position keep their places); UTF-8 with a BOM, which Excel needs to read the names as UTF-8
and ``encoding="utf-8-sig"`` strips; a name starting with = + - @ or a tab or carriage return, which a spreadsheet
would run as a formula, is written with a leading ``'``, as OWASP advises: metrics.json keeps it as it is) and
``metrics.md`` (the per-quality tables; a photo's name or a path escaped for a table cell). The
compression is Pillow's libjpeg at 4:2:0 chroma subsampling, as PIL and OpenCV write by default and as the
published JPEG-restoration tables use (``--subsampling 4:2:2`` / ``4:4:4``: as other encoders write); a grayscale
photo becomes a one-channel JPEG and is restored as ``restore`` writes it, grayscale. References
must be lossless: a JPEG ground truth already holds artifacts, so it is refused unless ``--allow-lossy-reference``;
so is a lossless file whose pixels show a JPEG's 8x8 quantization (a PNG saved from a JPEG).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections import deque
from pathlib import Path

import numpy as np

from dist_dejpeg import code_version
from dist_dejpeg.evaluation import pairs
from dist_dejpeg.evaluation.cells import CSV_ENCODING, csv_cell, md_cell
from dist_dejpeg.evaluation.measure import MetricSet, restored_pairs
from dist_dejpeg.evaluation.references import EvaluateError, read_references, seen_in_training
from dist_dejpeg.evaluation.report import photo_parts
from dist_dejpeg.jpeg.consistency import jpeglib_missing
from dist_dejpeg.jpeg.formats import SUBSAMPLING
from dist_dejpeg.metrics.fullref import PSNRB_CONVENTIONS
from dist_dejpeg.metrics.registry import BY_NAME, COLOUR, EVALUATED, QUALITY
from dist_dejpeg.models.names import TRAIN_SHARDS, TRAIN_SOURCES
from dist_dejpeg.models.weights import WeightsError
from dist_dejpeg.restore.files import check_output_dir
from dist_dejpeg.restore.record import restorer_settings
from dist_dejpeg.restore.restorer import Restorer
from dist_dejpeg.run.files import atomic_write_files
from dist_dejpeg.run.layout import EVALUATE_CSV, METRICS
from dist_dejpeg.run.pool import map_in_order
from dist_dejpeg.run.text import visible

log = logging.getLogger(__name__)


INFINITE = "infinite: the image equals its reference exactly (a flat image's JPEG can); left out with its pair"


def _finite(v) -> bool:
    return v is not None and bool(np.isfinite(v))


def _paired_means(rows: list[dict], metric: str) -> dict[str, float | None]:
    """The JPEG and restored means of ``metric`` over the images where both values are finite: an image left out
    on one side (infinite PSNR where the JPEG is its reference exactly, NIQE undefined) is left out on the other
    too, so that restored - JPEG is the mean of the images' own gains."""
    pairs = [(r["jpeg"][metric], r["restored"][metric]) for r in rows]
    pairs = [p for p in pairs if _finite(p[0]) and _finite(p[1])]
    if not pairs:
        return {"jpeg": None, "restored": None}
    jpeg, restored = np.mean(pairs, axis=0)
    return {"jpeg": float(jpeg), "restored": float(restored)}


def evaluate(model, images: list[str], qualities: list[int], out_dir: str | Path | None, *, y_only: bool = False,
             crop_border: int = 0, lpips_weights: str = "", allow_lossy_reference: bool = False,
             max_images: int = 0, keep_images: bool = False, restorer_kwargs: dict | None = None,
             progress: bool = True, blind: bool = False, only: tuple[str, ...] | None = None,
             description: str | None = None, subsampling: str = "4:2:0", report_crop: int | None = None,
             workers: int = 1) -> dict:
    """Run the evaluation; write the three tables into ``out_dir`` (if given) and return the metrics.json
    content. ``keep_images``: also return the images as ``records`` (for the HTML report). The restorer is
    told each JPEG's quality (as ``restore`` reads it from the file's tables) unless ``blind`` (then the raw blind
    model is measured: the guard cannot judge an image of unknown quality). ``only``: measure just these of the
    quality metrics (metrics/registry.py QUALITY; the others are "not requested"); the colour columns are always
    there.
    ``description``: the progress bar's label, the command the user ran ("report" when ``keep_images``, which
    is what the report asks for, else "evaluate"). ``subsampling``: the JPEGs' chroma subsampling (SUBSAMPLING).
    ``workers``: processes measuring all but LPIPS while this one restores (1: here, as is an evaluation of fewer
    than POOL_MIN_MEGAPIXELS; MAX_DEFAULT_WORKERS in pairs.py says why not many more).
    ``report_crop``: each photo's records are cut to what the report shows at this crop size (report.photo_parts,
    for write_report with that crop) as soon as the photo is measured: the full-size images of every photo and
    quality, kept until the page is written, ran a report of many camera photos out of memory (~180 MB per 12 MP
    photo at two qualities).
    An image the metrics cannot measure (below SSIM's 11x11 or LPIPS's 31x31 pixels, or nothing left after the border
    crop) is skipped and listed in ``meta["skipped"]`` as an undecodable file is; a repeated quality counts once."""
    import PIL

    from dist_dejpeg.run.progress import Progress

    if subsampling not in SUBSAMPLING:
        raise EvaluateError(f"subsampling must be one of {', '.join(SUBSAMPLING)}, got {subsampling!r}")
    if not qualities or any(not 1 <= q <= 100 for q in qualities):
        raise EvaluateError(f"qualities must be in 1..100, got {qualities}")
    qualities = list(dict.fromkeys(int(q) for q in qualities))  # each once, in the order given
    if out_dir is not None:
        check_output_dir(out_dir)  # before any computation: an OutputError (a ValueError) names the folder
    restorer = model if hasattr(model, "restore_array") else Restorer(model, **(restorer_kwargs or {}))
    try:
        metric = MetricSet(lpips_weights, y_only, crop_border, str(restorer.device).split(" ")[0], only)
    except WeightsError as err:  # --lpips-weights names a file that is missing or not AlexNet's
        raise EvaluateError(str(err)) from None
    if metric.lpips is not None and metric.lpips.unverified:
        log.warning("LPIPS: %s; its values are not LPIPS's unless it holds the same weights", metric.lpips.unverified)
    # (an image too small for the metrics is skipped before --max-images counts it)
    accepted = []  # the pixels of each reference the size check accepts, in order

    def size_problem(rgb: np.ndarray) -> str | None:
        if (why := metric.size_problem(rgb)) is None:
            accepted.append(rgb.shape[0] * rgb.shape[1])
        return why

    refs, skipped = read_references(images, allow_lossy_reference, max_images, size_problem)
    if sum(accepted[:len(refs)]) / 1e6 * len(qualities) < pairs.POOL_MIN_MEGAPIXELS:
        workers = 1  # (less work than starting the processes takes)
    if seen := seen_in_training(images, refs, restorer.info.get(TRAIN_SHARDS) or {},
                                restorer.info.get(TRAIN_SOURCES) or {}):
        log.warning("%s", seen_note(seen, len(refs)))
    desc = description or ("report" if keep_images else "evaluate")
    bar = Progress(len(refs) * len(qualities), desc, "image", enabled=progress)  # (without a terminal: plain lines)
    timing = {"restore_seconds": 0.0, "megapixels": 0.0}
    pending: deque[dict] = deque()  # what the rows need beside each pair's values, in the pairs' order
    rows, records, measured, photo, gray = [], [], 0, None, 0
    restored = restored_pairs(refs, qualities, restorer, metric, blind, SUBSAMPLING[subsampling], keep_images,
                              pending, timing, skipped, bar)
    # the pairs measured in metrics processes (--workers) while the next images are restored here, in their order
    for result in map_in_order(pairs.measure_pair, restored, workers, names=lambda pair: pair.name, role="metrics",
                               outcome="no tables were written", start="spawn", setup=pairs.one_thread):
        item = pending.popleft()
        if photo is None or item["ref"] is not photo["ref"]:
            photo = {"ref": item["ref"], "rows": [], "kept": [], "undefined": {}, "failed": False}
        problem = result.get("unmeasurable") or item["lpips_error"]
        if problem and not photo["failed"]:  # skipped and listed as an undecodable file is; the others are measured
            photo["failed"] = True
            skipped.append(f"{item['ref'].source}: {problem}")
        bar.update()
        if photo["failed"]:
            continue
        for name, what in result["undefined"].items():
            entry = photo["undefined"].setdefault(name, {"reason": what["reason"], "count": 0})
            entry["count"] += what["count"]
        measures = result["values"]
        for values, distance in zip(measures, item["lpips"]):
            values["lpips"] = distance
        row = {**item["row"], "jpeg": measures[0], "restored": measures[1]}
        for m in EVALUATED:  # an infinite value leaves the means with its pair (_paired_means)
            if any(v is not None and not _finite(v) for v in (row["jpeg"][m], row["restored"][m])):
                photo["undefined"].setdefault(m, {"reason": INFINITE, "count": 0})["count"] += 2
        photo["rows"].append(row)
        if keep_images:
            photo["kept"].append({**item["images"], "image": row["image"], "quality": row["quality"],
                                  "passthrough": row["passthrough"],
                                  "metrics": {"jpeg": row["jpeg"], "restored": row["restored"]}})
        if item["last"]:
            rows += photo["rows"]
            kept = photo["kept"]
            records += photo_parts(kept, report_crop) if kept and report_crop is not None else kept
            metric.tally(photo["undefined"])
            measured += 1
            gray += photo["rows"][0]["channel"] == "gray"
    bar.close()
    restore_seconds, megapixels = timing["restore_seconds"], timing["megapixels"]
    if not measured:
        raise EvaluateError(f"none of the {len(refs)} image(s) could be measured: " + "; ".join(skipped[-3:]))
    per_quality = {}
    for q in qualities:
        sel = [r for r in rows if r["quality"] == q]
        paired = {m: _paired_means(sel, m) for m in EVALUATED}
        means = {kind: {m: paired[m][kind] for m in EVALUATED} for kind in ("jpeg", "restored")}
        means["gain"] = {m: (None if means["restored"][m] is None or means["jpeg"][m] is None
                             else means["restored"][m] - means["jpeg"][m]) for m in EVALUATED}
        means["images"] = len(sel)
        means["passed_through"] = sum(r["passthrough"] for r in sel)
        per_quality[str(q)] = means
    info = {k: v for k, v in restorer.info.items() if k != "model"}
    result = {
        "meta": {
            "model": info, "model_config": restorer.info.get("model"),
            "trained_by": info.get("code") or None, "evaluated_by": code_version(),
            "backbones": _backbone_note(info),
            "compression": f"libjpeg via Pillow {PIL.__version__}, {subsampling} chroma subsampling",
            "qualities": qualities, "images": measured, "skipped": skipped, "seen_in_training": seen,
            "channel": pairs.Y_CHANNEL if y_only else pairs.RGB_CHANNEL, "grayscale_images": gray,
            "psnr_b": PSNRB_CONVENTIONS["kair"], "crop_border": crop_border, "unavailable": metric.unavailable,
            "undefined": metric.undefined,
            "lpips": _lpips_label(metric.lpips),
            **restorer_settings(restorer),  # tile, overlap, batch size, threads, ...: as restore's record has them
            "quality_given": not blind, "conditioned": restorer.conditioned, "guard": restorer.guard and not blind,
            # (jpeglib missing: nothing was made consistent, whatever the restorer asked)
            "consistent_with_file": getattr(restorer, "consistent", True) and not jpeglib_missing(),
            "cell_half_widths": {str(q): h for q, h in (getattr(restorer, "half_widths", None) or {}).items()},
            "restore_ms_per_megapixel": 1000 * restore_seconds / megapixels if megapixels else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        },
        "per_quality": per_quality,
        "per_image": rows,
    }
    if out_dir is not None:
        write_tables(result, out_dir)
    if keep_images:
        result["records"] = records
    return result


def consistent_note(meta: dict) -> str:
    """How metrics.md says the restored JPEGs were made consistent with their files (meta from evaluate)."""
    if not meta.get("consistent_with_file", True):
        return "restored JPEGs kept as the model made them (--no-consistency)"
    widths = meta.get("cell_half_widths") or {}
    cells = ", ".join(f"q{q} {h:g}" for q, h in widths.items()) if widths else "0.5, the files' own"
    return f"restored JPEGs made consistent with their files (cell half-widths {cells})"


def seen_note(seen: dict, total: int) -> str:
    """The warning for ``meta["seen_in_training"]`` (see references.seen_in_training) of ``total`` images."""
    where = [f"from shards the model trained on ({visible(', '.join(seen['shards']))})"] if seen.get("shards") else []
    if photos := seen.get("photos"):  # (names from the model file: any text, escapes too)
        more = f" and {len(photos) - 5} more" if len(photos) > 5 else ""
        where.append(f"photos the model trained on ({visible(', '.join(photos[:5]))}{more})")
    return (f"{seen['images']} of the {total} images are {' or '.join(where)}: their gains overstate what photos "
            f"it never saw get; evaluate on its validation shards or other photos")


def _lpips_label(lpips) -> str:
    """metrics.json's meta "lpips": the network and its backbone, or "unavailable"."""
    if lpips is None:
        return "unavailable"
    return lpips.description if lpips.unverified else "lpips-alex (ImageNet AlexNet backbone)"


def _backbone_note(info: dict) -> str:
    init = info.get("encoder_init", "unknown")
    if init == "random init":
        return ("the generator's encoder started from RANDOM weights (a debug/test model): these numbers are not "
                "comparable with a model trained from the ImageNet encoder")
    return f"the generator's encoder started from {init} weights"


def format_value(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if not np.isfinite(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    model = meta["model"]
    lines = [f"# Evaluation of {md_cell(model.get('source'))}", "",
             f"Model: encoder {md_cell(model.get('encoder'))} ({md_cell(model.get('encoder_init'))}), training "
             f"steps {md_cell(model.get('global_step'))}, trained by "
             f"{md_cell(meta.get('trained_by') or 'not recorded')}; "
             f"{meta['backbones']}; evaluated by {meta.get('evaluated_by') or 'not recorded'}.",
             f"Images: {meta['images']} lossless references ({len(meta['skipped'])} skipped); compression: "
             f"{meta['compression']}; full-reference metrics on {pairs.channel_note(meta)}, border crop "
             f"{meta['crop_border']}; "
             f"PSNR-B as {meta.get('psnr_b') or 'not recorded'}.",
             f"Restored on {meta['device']} ({meta['precision'] + ', ' if meta.get('precision') else ''}tile "
             f"{meta['tile']}, overlap {meta['overlap']}), " + (
                 "nothing restored (every image passed through)." if meta["restore_ms_per_megapixel"] is None else
                 f"{format_value(meta['restore_ms_per_megapixel'], 0)} ms per megapixel of the restored images."),
             f"Quality-conditioned model: {'yes' if meta.get('conditioned') else 'no'}; quality told to it: "
             f"{'yes' if meta.get('quality_given') else 'no (blind)'}; do-no-harm guard: "
             f"{'on' if meta.get('guard') else 'off'}; {consistent_note(meta)}" + "".join(
                 f"; q{q}: {m['passed_through']} of {m['images']} passed through unchanged"
                 for q, m in result["per_quality"].items() if m.get("passed_through")) + ".", ""]
    for name, why in meta["unavailable"].items():
        lines.append(f"- {name}: unavailable: {why}")
    for name, what in meta["undefined"].items():
        lines.append(f"- {name}: left out for {what.get('images', '?')} of {meta['images']} image(s) "
                     f"({what['count']} values: JPEG and restored, at each quality): {what['reason']}")
    lines += [f"- skipped: {md_cell(why)}" for why in meta["skipped"]]  # (each names its file)
    if seen := meta.get("seen_in_training"):
        lines.append(f"- seen in training: {md_cell(seen_note(seen, meta['images']))}")
    if unverified := "UNVERIFIED" in meta.get("lpips", ""):
        lines.append(f"- LPIPS: {meta['lpips']}")
    if meta["unavailable"] or meta["undefined"] or meta["skipped"] or seen or unverified:
        lines.append("")
    lines += ["Means over the images of each image's value (PSNR: the mean of per-image PSNRs, as published tables "
              "average, not the PSNR of the mean error), over the images with a finite JPEG and restored value.", "",
              "| quality | metric | JPEG | restored | restored - JPEG |", "|---|---|---|---|---|"]
    for q, means in result["per_quality"].items():
        for m in QUALITY:
            lines.append(f"| {q} | {m} ({BY_NAME[m].phrase}) | {format_value(means['jpeg'][m])} | "
                         f"{format_value(means['restored'][m])} | "
                         f"{'+' if (means['gain'][m] or 0) > 0 else ''}{format_value(means['gain'][m])} |")
    lines += ["", "Where the error sits and colour shift (PSNR on full-range JFIF Y/Cb/Cr: its psnr_y is 1.32 dB "
              "below the published PSNR-Y, --y-only's BT.601 16-235 Y; mean signed shift per RGB channel in levels, "
              "0-255: a cast is a shift the JPEG input does not have):", "",
              "| quality | input | " + " | ".join(COLOUR) + " |", "|---|---|" + "---|" * len(COLOUR)]
    for q, means in result["per_quality"].items():
        for kind in ("jpeg", "restored"):
            lines.append(f"| {q} | {kind} | " + " | ".join(format_value(means[kind][m], 2) for m in COLOUR) + " |")
    lines += ["", "Per image:", "", "| image | quality | " + " | ".join(f"{m} JPEG -> restored" for m in QUALITY)
              + " |", "|---|---|" + "---|" * len(QUALITY)]
    for r in result["per_image"]:
        lines.append(f"| {md_cell(r['image'])} | {r['quality']} | " + " | ".join(
            f"{format_value(r['jpeg'][m], 3)} -> {format_value(r['restored'][m], 3)}" for m in QUALITY) + " |")
    return "\n".join(lines) + "\n"


def _strict_json(value):
    """``value`` with its infinite and NaN numbers as None: json.dumps writes them as Infinity and NaN, which jq and
    JSON.parse refuse (meta["undefined"] says why a value is left out)."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


def write_tables(result: dict, out_dir: str | Path) -> None:
    """metrics.json, metrics.csv and metrics.md (table_files) into ``out_dir``, all or none
    (run.files.atomic_write_files: a full disk leaves the folder's earlier three as they were)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_files({out / name: data for name, data in table_files(result).items()})


def table_files(result: dict) -> dict[str, bytes]:
    """{file name: bytes}: metrics.json (strict JSON: an infinite value is null), metrics.csv ("inf", which Python
    and pandas read; UTF-8 with a BOM, and a name a spreadsheet would run as a formula with a leading ``'``:
    cells.csv_cell) and metrics.md."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "quality", "input", *EVALUATED, "channel"])  # channel: RGB, Y or gray (image_channel)
    for r in result["per_image"]:  # (channel last: the columns before it keep the places they had without it)
        for kind in ("jpeg", "restored"):
            writer.writerow([csv_cell(r["image"]), r["quality"], kind,
                             *("" if r[kind].get(m) is None else r[kind][m] for m in EVALUATED), r.get("channel", "")])
    tables = _strict_json({k: v for k, v in result.items() if k != "records"})
    return {METRICS: json.dumps(tables, indent=2, default=float, allow_nan=False).encode(),
            EVALUATE_CSV: buf.getvalue().encode(CSV_ENCODING), "metrics.md": markdown(result).encode()}
