"""The HTML comparison report: one self-contained page (each distinct crop embedded once as a base64 PNG, no
external resource of any kind) showing, per photo and JPEG quality, side-by-side crops clean | JPEG | restored
taken at the same place, zoomable, with the metrics.

Independent of the model: the caller (``dist-dejpeg report``) restores and measures, then calls
:func:`write_report` with plain arrays and numbers.

Records (one per photo and quality)::

    {"image": "astronaut.png",            # shown escaped; records of one photo share a section
     "quality": 10,                       # JPEG quality the degraded input was encoded at
     "clean": uint8 HxWx3, "jpeg": uint8 HxWx3, "restored": uint8 HxWx3,   # same shape
     "passthrough": False,                # optional: True where the guard passed the JPEG through unchanged
     "metrics": {"jpeg":     {"psnr": 27.1, "ssim": 0.81, "lpips": None, ...},   # JPEG vs clean
                 "restored": {"psnr": 27.6, "ssim": 0.83, "lpips": None, ...}}}  # restored vs clean

or as :func:`photo_parts` cuts them (what ``evaluate(report_crop=...)`` hands over, one photo at a time): the three
images replaced by what the page shows of them at that crop size (``size``, ``box``, ``thumb``, ``crops``, ``crop``).

Summary rows (optional; per-quality means over the photos; derived from the records when ``None``)::

    {"quality": 10, "metric": "psnr", "jpeg": 27.1, "restored": 27.6, "n": 2}   # "n" optional

Metric names: those of the registry (dist_dejpeg.metrics.registry), shown in its order with its labels, units,
directions and decimals; others are shown as given after them, direction unknown. A value of ``None`` (or NaN)
prints as "n/a", linked to the reason from ``meta["unavailable"][metric]`` when given: each reason is written
once on the page, in the notes under the summary table. Above the tables, plots of the gain per quality
(restored - JPEG: PSNR, and SSIM and LPIPS where measured; inline SVG, evaluation/gain_plot.py).

``meta`` is a dict of model facts shown at the top in order (label -> value), e.g. ``{"source": ...,
"encoder": "resnet34", "encoder_init": "random init" | "ImageNet", "steps": 1200, "lpips": "unavailable
(...)"}``. Three keys are also read: ``encoder_init`` (a value containing "random" puts a warning at the top: the
numbers come from a random-init backbone and are not comparable to pretrained results), ``seen in training``
(a warning at the top: some photos come from the model's training shards) and ``unavailable`` (``{metric:
reason}``, the reasons printed next to "n/a").

Crop rule (:func:`error_crop`): per photo, the crop-sized window with the largest mean absolute JPEG error
``|jpeg - clean|`` (averaged over RGB, summed over all the photo's qualities so every quality shows the same
place). It is scored on a map of b x b block means (b = crop // 8) with an integral image, so candidate
windows step by b pixels; ties go to the top-most, then left-most window. A crop larger than the photo is
clipped to the photo. The three images of a record are cut at exactly that window; a thumbnail of the whole
clean photo (longest side <= 256 px) outlines it in red: a JPEG (THUMB_QUALITY; it only shows where the crop is).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dist_dejpeg.evaluation.gain_plot import finite, gain_plots
from dist_dejpeg.evaluation.report_style import CSS, JS
from dist_dejpeg.metrics.registry import BY_NAME, HIGHER, LOWER, METRICS, ZERO
from dist_dejpeg.run.files import atomic_write_files

ARROWS = {HIGHER: "&uarr;", LOWER: "&darr;", ZERO: "&rarr;0"}
UNKNOWN_DECIMALS = 4  # a metric the registry does not know
KINDS = ("clean", "jpeg", "restored")
THUMB, THUMB_QUALITY = 256, 85  # the thumbnails' longest side and JPEG quality (the crops stay lossless PNG)


# --------------------------------------------------------------------------------------------- crops

def error_crop(clean: np.ndarray, jpeg: np.ndarray | list[np.ndarray], crop: int) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the crop-sized window with the largest mean ``|jpeg - clean|``.

    ``jpeg`` may be a list of degraded versions (e.g. several qualities): their errors are summed. The error
    map (mean over channels) is reduced to b x b block means, b = max(1, crop // 8); an integral image of
    that map gives every block-aligned window's sum in O(1); the first maximum (top-most, then left-most)
    wins. Windows are clipped to the photo."""
    h, w = clean.shape[:2]
    ch, cw = min(crop, h), min(crop, w)
    jpegs = jpeg if isinstance(jpeg, list) else [jpeg]
    err = np.zeros((h, w), np.float32)
    ref = clean.astype(np.int16)
    for j in jpegs:
        err += np.abs(j.astype(np.int16) - ref).sum(axis=2, dtype=np.float32)
    b = max(1, min(ch, cw) // 8)
    bh, bw = h // b, w // b
    blocks = err[: bh * b, : bw * b].reshape(bh, b, bw, b).mean(axis=(1, 3), dtype=np.float64)
    kh, kw = max(1, ch // b), max(1, cw // b)  # window size in blocks (covers at most the crop)
    ii = np.zeros((bh + 1, bw + 1))
    ii[1:, 1:] = blocks.cumsum(0).cumsum(1)
    sums = ii[kh:, kw:] - ii[:-kh, kw:] - ii[kh:, :-kw] + ii[:-kh, :-kw]  # (bh-kh+1, bw-kw+1)
    # Positions whose full crop would overrun the photo are clamped back inside it.
    i, j = np.unravel_index(int(np.argmax(sums)), sums.shape)
    top, left = min(int(i) * b, h - ch), min(int(j) * b, w - cw)
    return top, left, ch, cw


# ------------------------------------------------------------------------------------------- helpers

def _data_uri(arr: np.ndarray, kind: str = "png", **save) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=kind, **save)
    return f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _rgb(value, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{what}: expected a uint8 HxWx3 array, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def _thumbnail(clean: np.ndarray, box: tuple[int, int, int, int]) -> str:
    h, w = clean.shape[:2]
    s = min(1.0, THUMB / max(h, w))
    im = Image.fromarray(clean).copy()
    if s < 1.0:
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    top, left, ch, cw = box
    x0, y0 = math.floor(left * s), math.floor(top * s)
    x1, y1 = max(x0 + 2, math.ceil((left + cw) * s) - 1), max(y0 + 2, math.ceil((top + ch) * s) - 1)
    draw = ImageDraw.Draw(im)
    draw.rectangle([x0, y0, x1, y1], outline=(255, 40, 40), width=2)
    return _data_uri(np.asarray(im), "jpeg", quality=THUMB_QUALITY)  # (a PNG of a photo: 8x the bytes)


def _num(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _fmt(metric: str, v: float | None, reasons: dict) -> str:
    if v is None:
        reason = reasons.get(metric)
        if reason:  # the reason is written once per page, in the notes under the summary (#na-<metric>)
            return (f'<span class="na" title="unavailable: see the note under the summary">n/a'
                    f'<a class="fn" href="#na-{html.escape(metric)}">*</a></span>')
        return '<span class="na">n/a</span>'
    return f"{v:.{_decimals(metric)}f}"


def _decimals(metric: str) -> int:
    return BY_NAME[metric].decimals if metric in BY_NAME else UNKNOWN_DECIMALS


def _direction(metric: str) -> str:
    info = BY_NAME.get(metric)
    if info is None:
        return ""
    return f' <span class="dir" title="{info.phrase}">{ARROWS[info.direction]}</span>'


def _caption(metric: str) -> str:
    return BY_NAME[metric].caption if metric in BY_NAME else metric


def _label(metric: str) -> str:
    return html.escape(_caption(metric)) + _direction(metric)


def _delta_cell(metric: str, jpeg: float | None, restored: float | None) -> str:
    if jpeg is None or restored is None:
        return '<td class="num">&ndash;</td>'
    d = restored - jpeg
    shown = abs(d) >= 0.5 * 10 ** -_decimals(metric)  # a delta printed as 0 (-1e-11, float rounding) is no change
    better = BY_NAME[metric].improved(jpeg, restored) if metric in BY_NAME and shown else None
    cls = "" if better is None else " better" if better else " worse"
    return f'<td class="num delta{cls}">{d:+.{_decimals(metric)}f}</td>'


def _metric_order(names) -> list[str]:
    known = [m.name for m in METRICS if m.name in names]
    return known + sorted(n for n in names if n not in BY_NAME)


def summarize(records: list[dict]) -> list[dict]:
    """Per-quality means of the records' metrics, in the summary-row shape (None where no value exists). Where a
    metric has JPEG and restored values, both means are over the photos finite in both (as evaluate's tables):
    a photo's infinite PSNR on one side leaves the other side's mean too, so the delta is the photos' mean gain.
    ``n``: the photos the means are over (0 for a metric no photo has a value of, not every photo)."""
    out = []
    for q in sorted({int(r["quality"]) for r in records}):
        rs = [r for r in records if int(r["quality"]) == q]
        names = _metric_order({m for r in rs for k in ("jpeg", "restored") for m in r["metrics"].get(k, {})})
        for m in names:
            row = {"quality": q, "metric": m}
            values = [[finite(r["metrics"].get(k, {}).get(m)) for k in ("jpeg", "restored")] for r in rs]
            pairs = [v for v in values if None not in v]
            for i, k in enumerate(("jpeg", "restored")):
                vals = [v[i] for v in pairs] if pairs else [v[i] for v in values if v[i] is not None]
                row[k] = sum(vals) / len(vals) if vals else None
            row["n"] = len(pairs) if pairs else max(sum(v[i] is not None for v in values) for i in (0, 1))
            out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- page

def _meta_html(meta: dict) -> str:
    rows = []
    for k, v in meta.items():
        if k == "unavailable" and isinstance(v, dict):  # names only: the reasons are in the notes, once
            links = ", ".join(f'<a href="#na-{html.escape(str(m))}">{html.escape(_caption(str(m)))}</a>' for m in v)
            rows.append(f"<tr><th>unavailable metrics</th><td>{links + ' (why: under the summary)' if v else 'none'}"
                        "</td></tr>")
            continue
        shown = "unknown" if v is None else str(v)  # (a model file without a step count: not Python's "None")
        rows.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(shown)}</td></tr>")
    return f'<table class="meta" id="meta">{"".join(rows)}</table>' if rows else ""


def _random_init(meta: dict) -> bool:
    return "random" in str(meta.get("encoder_init", "")).lower()


def _legend(names: list[str]) -> str:
    rows = []
    for m in names:
        info = BY_NAME.get(m)
        way, desc = (info.phrase, info.description) if info else ("direction unknown", "")
        rows.append(f"<tr><td>{_label(m)}</td><td>{way}</td><td>{html.escape(desc)}</td></tr>")
    head = "<tr><th>metric</th><th>direction</th><th></th></tr>"
    return f'<table class="legend" id="legend">{head}{"".join(rows)}</table>'


def _summary_html(summary: list[dict], reasons: dict) -> str:
    head = ("<tr><th>quality</th><th>metric</th><th>JPEG</th><th>restored</th>"
            "<th>&Delta; (restored &minus; JPEG)</th><th>photos</th></tr>")
    rows = []
    for s in summary:
        m = str(s["metric"])
        j, r = _num(s.get("jpeg")), _num(s.get("restored"))
        n = s.get("n")
        rows.append(f'<tr class="row" data-quality="{int(s["quality"])}" data-metric="{html.escape(m)}">'
                    f'<td class="num">{int(s["quality"])}</td><td>{_label(m)}</td>'
                    f'<td class="num">{_fmt(m, j, reasons)}</td><td class="num">{_fmt(m, r, reasons)}</td>'
                    f'{_delta_cell(m, j, r)}<td class="num">{"" if n is None else int(n)}</td></tr>')
    return f'<table class="metrics summary" id="summary">{head}{"".join(rows)}</table>'


def _na_notes(reasons: dict) -> str:
    if not reasons:
        return ""
    items = "".join(f'<li id="na-{html.escape(m)}"><b>{html.escape(_caption(m))}</b> n/a: '
                    f"{html.escape(str(r))}</li>" for m, r in reasons.items())
    return f'<ul class="notes" id="na-notes">{items}</ul>'


def _passthrough_notes(records: list[dict]) -> str:
    """A note per quality at which the guard passed photos through unchanged (restored = JPEG, a gain of 0)."""
    by_q = {q: [bool(r.get("passthrough")) for r in records if int(r["quality"]) == q]
            for q in sorted({int(r["quality"]) for r in records})}
    items = "".join(f'<li class="pass" id="passed-q{q}">quality {q}: {sum(v)} of {len(v)} photo(s) passed through '
                    "unchanged by the do-no-harm guard (the model's validation shows no sure gain at this quality): "
                    "their restored image is the JPEG, their &Delta; 0</li>" for q, v in by_q.items() if any(v))
    return f'<ul class="notes" id="passthrough-notes">{items}</ul>' if items else ""


def _record_table(rec: dict, reasons: dict) -> str:
    mj, mr = rec["metrics"].get("jpeg", {}), rec["metrics"].get("restored", {})
    rows = []
    for m in _metric_order(set(mj) | set(mr)):
        j, r = _num(mj.get(m)), _num(mr.get(m))
        rows.append(f'<tr class="row" data-metric="{html.escape(m)}"><td>{_label(m)}</td>'
                    f'<td class="num">{_fmt(m, j, reasons)}</td><td class="num">{_fmt(m, r, reasons)}</td>'
                    f'{_delta_cell(m, j, r)}</tr>')
    return ('<table class="metrics record"><tr><th>metric</th><th>JPEG</th><th>restored</th><th>&Delta;</th></tr>'
            + "".join(rows) + "</table>")


def photo_parts(recs: list[dict], crop: int) -> list[dict]:
    """One photo's records (all its qualities), quality ascending, cut down to what the page shows of them: its size,
    the crop box, the thumbnail (JPEG) and the three crops (PNG) as data URIs, the numbers. evaluate cuts each photo
    as it is measured, so a report of many camera photos holds one photo's full-size images at a time, not every photo's."""
    recs = sorted(recs, key=lambda r: int(r["quality"]))
    clean = recs[0]["clean"]
    same = all(r["clean"].shape == clean.shape for r in recs)
    box = error_crop(clean, [r["jpeg"] for r in recs], crop) if same else None
    out, clean_crop = [], None
    for rec in recs:
        rbox = box or error_crop(rec["clean"], rec["jpeg"], crop)
        t, l, ch, cw = rbox
        thumb = _thumbnail(rec["clean"], rbox) if rec is recs[0] or box is None else None
        kept = {k: v for k, v in rec.items() if k not in KINDS}
        crops = {k: _data_uri(rec[k][t:t + ch, l:l + cw]) for k in KINDS[1:]}
        if clean_crop is None or box is None:  # one box: the same original crop at every quality, encoded once
            clean_crop = _data_uri(rec["clean"][t:t + ch, l:l + cw])
        out.append({**kept, "size": clean.shape[:2], "box": rbox, "thumb": thumb, "crop": crop,
                    "crops": {"clean": clean_crop, **crops}})
    return out


def render_report(records: list[dict], *, title: str, meta: dict, summary: list[dict] | None = None,
                  crop: int = 192) -> str:
    """The page as a string (see the module docstring for the shapes); :func:`write_report` writes it."""
    if crop < 1:
        raise ValueError(f"crop must be >= 1, got {crop}")
    meta = dict(meta or {})
    reasons = {str(k): v for k, v in (meta.get("unavailable") or {}).items()} \
        if isinstance(meta.get("unavailable"), dict) else {}
    if summary is None:
        summary = summarize(records)

    # Group by photo, keeping first-seen order; qualities ascending inside a photo.
    photos: dict[str, list[dict]] = {}
    for i, rec in enumerate(records):
        if "crops" in rec:  # already cut (photo_parts), as evaluate hands them over
            if rec.get("crop") != crop:
                raise ValueError(f"record {i} ({rec.get('image')!r}) was cut for crop={rec.get('crop')}, not {crop}")
        else:
            arrs = {k: _rgb(rec[k], f"record {i} ({rec.get('image')!r}, q{rec.get('quality')}) {k}") for k in KINDS}
            if not (arrs["clean"].shape == arrs["jpeg"].shape == arrs["restored"].shape):
                raise ValueError(f"record {i} ({rec.get('image')!r}): clean/jpeg/restored shapes differ: "
                                 f"{[arrs[k].shape for k in KINDS]}")
            rec = {**rec, **arrs}
        photos.setdefault(str(rec["image"]), []).append(rec)

    names = _metric_order({m for r in records for k in ("jpeg", "restored") for m in r["metrics"].get(k, {})}
                          | {str(s["metric"]) for s in summary})
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if _random_init(meta):
        parts.append('<div class="warn" id="random-init-warning">Random-init backbone: the encoder of this model '
                     "started from random weights, not ImageNet. The numbers below come from a random-init "
                     "backbone and are not comparable to pretrained results.</div>")
    if meta.get("seen in training"):
        parts.append(f'<div class="warn" id="seen-in-training-warning">Images seen in training: '
                     f'{html.escape(str(meta["seen in training"]))}.</div>')
    parts.append(_meta_html(meta))
    plots = gain_plots(records, summary)
    if plots:
        parts.append("<h2>Gain per quality</h2>" + plots)
    parts.append("<h2>Metrics</h2>" + _legend(names))
    parts.append("<h2>Mean per quality</h2><p><small>Means over the photos of each photo's value (PSNR: the mean of "
                 "per-photo PSNRs, not the PSNR of the mean error), over the photos with a finite JPEG and restored "
                 "value.</small></p>" + _summary_html(summary, reasons) + _na_notes(reasons)
                 + _passthrough_notes(records))
    parts.append('<div class="zoom">Zoom: <button data-z="1" class="on">1x</button> <button data-z="2">2x</button> '
                 '<button data-z="4">4x</button> <small>(click a crop to zoom its row; crops are lossless PNG, '
                 "cut where |JPEG &minus; clean| is largest)</small></div>")

    # A crop shown more than once (the original at every quality, a passed-through JPEG as its restored image) is
    # embedded once, in its first <img>; the others name it (data-same) and the page's script copies its source:
    # a 12 MP photo's 192 px original crop is ~100 KB of base64 that each further quality repeated.
    embedded: dict[str, str] = {}
    for p, (name, recs) in enumerate(photos.items()):
        recs = recs if "crops" in recs[0] else photo_parts(recs, crop)
        h, w = recs[0]["size"]
        parts.append(f'<section class="photo" id="photo-{p}"><h2>{html.escape(name)} '
                     f'<small>({w}&times;{h})</small></h2>')
        for rec in recs:
            t, l, ch, cw = rec["box"]
            if rec["thumb"]:
                parts.append(f'<figure class="thumb"><img alt="{html.escape(name)}: whole photo, crop outlined" '
                             f'src="{rec["thumb"]}"><figcaption>crop at x={l}, y={t}, '
                             f"{cw}&times;{ch} px</figcaption></figure>")
            q = int(rec["quality"])
            figs, passed = [], bool(rec.get("passthrough"))
            for k, cap in zip(KINDS, ("clean", f"JPEG q{q}", "restored (= JPEG)" if passed else "restored")):
                uri = rec["crops"][k]
                if uri in embedded:
                    source = f'data-same="{embedded[uri]}"'
                else:
                    embedded[uri] = f"crop-{len(embedded)}"
                    source = f'id="{embedded[uri]}" src="{uri}"'
                figs.append(f'<figure><img class="crop" style="--w: {cw}" width="{cw}" height="{ch}" '
                            f'alt="{html.escape(name)} q{q} {k}" {source}>'
                            f"<figcaption>{cap}</figcaption></figure>")
            note = ' <span class="pass">passed through unchanged (do-no-harm guard)</span>' if passed else ""
            parts.append(f'<div class="rec" data-quality="{q}"><div><h3>quality {q}{note}</h3>'
                         f'<div class="crops">{"".join(figs)}</div></div>{_record_table(rec, reasons)}</div>')
        parts.append("</section>")

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + f"\n<script>{JS}</script>\n</body></html>\n")


def check_report_output(out_path) -> Path:
    """Prove the page ``out_path`` and its tables' folder beside it (the name without its suffix) can be written,
    before any computation; returns that folder. An OutputError (a ValueError) says what is wrong."""
    from dist_dejpeg.restore.files import OutputError, check_output_dir, check_output_file

    out = Path(out_path)
    if not out.suffix:
        raise OutputError(f"report {out}: give the page a file name with a suffix (report.html): its tables go "
                          f"into the folder named without it")
    return check_output_dir(check_output_file(out).with_suffix(""))


def write_report(records: list[dict], out_path, *, title: str, meta: dict, summary: list[dict] | None = None,
                 crop: int = 192, tables: dict | None = None) -> Path:
    """Write the self-contained comparison page to ``out_path`` atomically, with ``tables`` ({path: bytes}: its
    tables beside it) all or none (run.files.atomic_write_files); returns the path. Shapes of ``records``,
    ``summary`` and ``meta``: see the module docstring."""
    out = Path(out_path)
    page = render_report(records, title=title, meta=meta, summary=summary, crop=crop)
    for folder in {out.parent, *(Path(p).parent for p in tables or {})}:
        folder.mkdir(parents=True, exist_ok=True)
    atomic_write_files({out: page.encode("utf-8"), **(tables or {})})  # (modes as the umask makes them)
    return out
