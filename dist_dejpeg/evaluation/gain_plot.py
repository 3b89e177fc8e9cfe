"""The report's plots of the gain per quality (restored - JPEG), as inline SVG the page carries itself: no
plotting library, no external resource, drawn by any browser.

    from dist_dejpeg.evaluation.gain_plot import gain_svg, gains_by_quality
    points = gains_by_quality(records, summary, "psnr")   # {quality: (mean gain, [each photo's gain], [passed])}
    svg = gain_svg("psnr", points)                          # "<svg class="plot" ...>...</svg>"

One plot per metric: the mean gain per quality as a line with markers (green where the mean is better than the
JPEG input by the metric's direction, red where worse), each photo's gain as a grey dot and the spread of the
photos as a vertical bar (hollow: a photo the do-no-harm guard passed through, its gain 0 by that choice, not
the model's), a dashed line at 0 (the JPEG input), axis labels with the unit and the direction.
"""

from __future__ import annotations

import html
import math

from dist_dejpeg.metrics.registry import BY_NAME

WIDTH, HEIGHT = 440, 270
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 30, 46  # margins: room for the y tick labels, the title, the x label
GOOD, BAD, MEAN, EACH = "#11772d", "#b3261e", "#1f4e9c", "#8a8a8a"


def finite(v) -> float | None:
    """``v`` as a float, or None where it is None, NaN or infinite."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def gains_by_quality(records: list[dict], summary: list[dict], metric: str) -> dict[int, tuple]:
    """``{quality: (mean gain, [each photo's gain], [whether the guard passed that photo through])}`` of
    ``metric`` (restored - JPEG), qualities with a value only. The mean is the summary's (restored mean - JPEG
    mean, what the table prints) where it has both, else the mean of the photos' gains."""
    each: dict[int, list[float]] = {}
    passed: dict[int, list[bool]] = {}
    for r in records:
        m = r.get("metrics", {})
        j, x = finite(m.get("jpeg", {}).get(metric)), finite(m.get("restored", {}).get(metric))
        if j is not None and x is not None:
            each.setdefault(int(r["quality"]), []).append(x - j)
            passed.setdefault(int(r["quality"]), []).append(bool(r.get("passthrough")))
    means = {int(s["quality"]): x - j for s in summary if str(s.get("metric")) == metric
             and (j := finite(s.get("jpeg"))) is not None and (x := finite(s.get("restored"))) is not None}
    out = {}
    for q in sorted(set(each) | set(means)):
        vals = each.get(q, [])
        mean = means.get(q, sum(vals) / len(vals) if vals else None)
        if mean is not None:
            out[q] = (mean, vals, passed.get(q, []))
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(s * power for s in (1, 2, 5, 10) if s * power >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _text(x: float, y: float, s: str, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{html.escape(s)}</text>'


def gain_svg(metric: str, points: dict[int, tuple]) -> str:
    """One plot (see the module docstring) of ``points`` as :func:`gains_by_quality` gives them; "" when empty."""
    if not points:
        return ""
    info = BY_NAME.get(metric)
    label, unit = (info.label, info.unit) if info else (metric, "")
    phrase = info.phrase if info else "direction unknown"
    qs = sorted(points)
    values = [0.0] + [v for q in qs for v in (points[q][0], *points[q][1])]
    ticks = nice_ticks(min(values), max(values))
    y_lo, y_hi = min(ticks[0], min(values)), max(ticks[-1], max(values))
    pad = max(2.0, (qs[-1] - qs[0]) * 0.06)
    x_lo, x_hi = qs[0] - pad, qs[-1] + pad
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    sx = lambda q: LEFT + (q - x_lo) / (x_hi - x_lo) * pw  # noqa: E731
    sy = lambda v: TOP + (y_hi - v) / (y_hi - y_lo) * ph  # noqa: E731
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))

    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>']
    for t in ticks:
        y = sy(t)
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e2e2e2"/>')
        parts.append(_text(LEFT - 6, y + 4, f"{t:+.{decimals}f}" if t else "0", "end"))
    y0 = sy(0.0)
    parts.append(f'<line class="zero" x1="{LEFT}" x2="{LEFT + pw}" y1="{y0:.1f}" y2="{y0:.1f}" stroke="#444" '
                 'stroke-dasharray="5 3"/>')
    parts.append(_text(LEFT + pw - 4, y0 - 4, "JPEG input", "end", ' fill="#444" font-size="10"'))
    for q in qs:
        parts.append(_text(sx(q), TOP + ph + 16, str(q)))
        vals = points[q][1]
        if len(vals) > 1:  # the photos' spread
            parts.append(f'<line class="spread" x1="{sx(q):.1f}" x2="{sx(q):.1f}" y1="{sy(min(vals)):.1f}" '
                         f'y2="{sy(max(vals)):.1f}" stroke="{EACH}" stroke-width="3" stroke-opacity=".45"/>')
        for v, passed in zip(vals, points[q][2]):
            if passed:  # hollow, with why: the guard's choice, not the model's result
                parts.append(f'<circle class="each pass" cx="{sx(q) + 7:.1f}" cy="{sy(v):.1f}" r="2.5" fill="#fff" '
                             f'stroke="{EACH}"><title>q{q}: passed through unchanged (do-no-harm guard)</title>'
                             "</circle>")
            else:
                parts.append(f'<circle class="each" cx="{sx(q) + 7:.1f}" cy="{sy(v):.1f}" r="2.5" fill="{EACH}"/>')
    line = " ".join(f"{sx(q):.1f},{sy(points[q][0]):.1f}" for q in qs)
    parts.append(f'<polyline class="mean" points="{line}" fill="none" stroke="{MEAN}" stroke-width="2"/>')
    for q in qs:
        mean = points[q][0]
        better = info.improved(0.0, mean) if info and info.direction != "zero" else None
        colour = MEAN if better is None else GOOD if better else BAD
        n, n_passed = len(points[q][1]), sum(points[q][2])
        parts.append(f'<circle class="mean" cx="{sx(q):.1f}" cy="{sy(mean):.1f}" r="4.5" fill="{colour}">'
                     f"<title>q{q}: mean {mean:+.{info.decimals if info else 4}f}{' ' + unit if unit else ''}"
                     f"{f' over {n} photos' if n else ''}{f', {n_passed} passed through' if n_passed else ''}"
                     "</title></circle>")
    name = f"{label} gain" + (f" ({unit})" if unit else "")
    parts.append(_text(LEFT + pw / 2, HEIGHT - 8, "JPEG quality of the input"))
    parts.append(_text(16, TOP + ph / 2, f"{name}, restored \u2212 JPEG", extra=f' transform="rotate(-90 16 '
                                                                                   f'{TOP + ph / 2:.1f})"'))
    parts.append(_text(LEFT, 18, f"{label}: restored \u2212 JPEG per quality ({phrase})", "start",
                       ' font-weight="600"'))
    title = (f"{name} per JPEG quality: " + ", ".join(f"q{q} {points[q][0]:+.3g}" for q in qs))
    return (f'<svg class="plot" id="plot-{html.escape(metric)}" role="img" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="system-ui, sans-serif" font-size="11">'
            f"<title>{html.escape(title)}</title>{''.join(parts)}</svg>")


def gain_plots(records: list[dict], summary: list[dict], metrics=("psnr", "ssim", "lpips")) -> str:
    """The plots of ``metrics`` that have values, side by side, with a caption; "" when none has."""
    svgs = [s for m in metrics if (s := gain_svg(m, gains_by_quality(records, summary, m)))]
    if not svgs:
        return ""
    hollow = ("; hollow: passed through unchanged by the do-no-harm guard (its gain is 0 by that choice)"
              if any(r.get("passthrough") for r in records) else "")
    return ('<div class="plots" id="gain-plots">' + "".join(svgs) + '</div><p class="notes">Line: the mean over '
            f"the photos (green: better than the JPEG input, red: worse); grey: each photo and their spread{hollow}; "
            "dashed: no change.</p>")
