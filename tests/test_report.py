"""The HTML comparison report (dist_dejpeg.evaluation.report): the page's structure from real photos (skimage.data, JPEG
via PIL, "restored" = a slight blur; no model), the crop rule, and the page opened in headless Chromium
(every image decoded, the table there, the zoom control working, a screenshot saved).

Chromium: Debian's ``chromium`` (or chromium-browser / google-chrome on PATH). Where none is found and we are
root with apt-get, it is installed as launch/local-slurm/start.sh installs SLURM (about 25 s and 400 MB here);
otherwise the browser test skips with the reason. The screenshot is also copied to $DIST_DEJPEG_ARTIFACTS.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dist_dejpeg.evaluation.report import error_crop, render_report, summarize, write_report

QUALITIES = (10, 40)
CROP = 96
LPIPS_REASON = "AlexNet weights not downloadable offline"


def _photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {"astronaut.png": data.astronaut()[40:232, 120:376],   # 192 x 256
            "coffee <&\"x>.png": data.coffee()[100:260, 150:350]}  # 160 x 200, a name that needs escaping


def _jpeg(img: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))


def _records() -> list[dict]:
    recs = []
    for name, clean in _photos().items():
        for q in QUALITIES:
            jpeg = _jpeg(clean, q)
            restored = np.asarray(Image.fromarray(jpeg).filter(ImageFilter.GaussianBlur(0.6)))
            recs.append({"image": name, "quality": q, "clean": clean, "jpeg": jpeg, "restored": restored,
                         "metrics": {k: {"psnr": _psnr(v, clean), "ssim": None, "lpips": None}
                                     for k, v in (("jpeg", jpeg), ("restored", restored))}})
    return recs


META = {"source": "runs/test/generator.safetensors", "encoder": "resnet34", "encoder_init": "random init",
        "steps": 120, "lpips": "unavailable", "unavailable": {"lpips": LPIPS_REASON}}
N_IMAGES = len(_photos()) * (1 + 3 * len(QUALITIES))  # a thumbnail per photo + clean|JPEG|restored per quality


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self.rows, self._table = [], [], {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "table":
            self._table = a.get("id") or a.get("class")
            self.tables.append(self._table)
        elif tag == "tr" and "data-metric" in a:
            self.rows.setdefault(self._table, []).append((a.get("data-quality"), a["data-metric"]))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    recs = _records()
    assert write_report(recs, out, title="dejpeg <test>", meta=META, crop=CROP) == out
    return out, recs


def test_page_structure(report):
    out, recs = report
    text = out.read_text(encoding="utf-8")
    assert not list(out.parent.glob(".*tmp*")), "temp file left behind"
    page = _Page()
    page.feed(text)

    # Self-contained: every image is embedded at the expected size (a crop as a PNG, a thumbnail as a JPEG), or names
    # the one that embeds it (a crop shown again); no external resource at all.
    assert len(page.imgs) == N_IMAGES
    assert not re.search(r'(src|href)\s*=\s*"(?!data:|#)', text) and "url(" not in text and "@import" not in text
    by_id = {a["id"]: a for a in page.imgs if "id" in a}
    sizes = []
    for a in page.imgs:
        a = {**a, "src": by_id[a["data-same"]]["src"]} if "data-same" in a else a
        kind = "png" if "crop" in a.get("class", "") else "jpeg"
        assert a["src"].startswith(f"data:image/{kind};base64,")
        im = Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1])))
        assert im.format == kind.upper() and im.mode == "RGB"
        sizes.append(im.size)
        if "crop" in a.get("class", ""):
            assert im.size == (int(a["width"]), int(a["height"]))
    assert sizes.count((CROP, CROP)) == 3 * len(recs)
    assert sorted(s for s in sizes if s != (CROP, CROP)) == [(200, 160), (256, 192)]  # thumbnails (<= 256 px)

    # Crops are lossless: the restored crop is exactly the restored array at the error_crop window.
    rec = recs[0]
    top, left, h, w = error_crop(rec["clean"], [r["jpeg"] for r in recs[:2]], CROP)
    crops = [a for a in page.imgs if "crop" in a.get("class", "")]
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(crops[2]["src"].split(",", 1)[1]))))
    np.testing.assert_array_equal(got, rec["restored"][top:top + h, left:left + w])

    # Tables: the summary has one row per (quality, metric); each record has its own table.
    assert "summary" in page.tables and "meta" in page.tables and "legend" in page.tables
    assert page.rows["summary"] == [(str(q), m) for q in QUALITIES for m in ("psnr", "ssim", "lpips")]
    assert len(page.rows["metrics record"]) == 3 * len(recs)
    expect = summarize(recs)
    assert expect[0]["jpeg"] == pytest.approx(np.mean([r["metrics"]["jpeg"]["psnr"] for r in recs[::2]]))
    assert f"{expect[0]['jpeg']:.2f}" in text and expect[1]["jpeg"] is None

    # None prints as n/a linked to the reason, which the page says once; directions are shown; random init is
    # flagged; names are escaped.
    na = '<span class="na" title="unavailable: see the note under the summary">n/a<a class="fn" href="#na-lpips">'
    assert text.count(na) == 2 * (len(QUALITIES) + len(recs))
    assert re.search(rf'<li id="na-lpips"><b>LPIPS</b> n/a: {LPIPS_REASON}</li>', text)
    assert text.count(LPIPS_REASON) == 1 and '<a href="#na-lpips">LPIPS</a>' in text  # the meta row links to it
    assert re.search(r">n/a</span>", text)  # SSIM: no reason given
    assert "higher is better" in text and "lower is better" in text
    assert 'id="random-init-warning"' in text and "not comparable to pretrained results" in text
    assert html.escape('coffee <&"x>.png') in text and 'coffee <&"x>' not in text
    assert "<title>dejpeg &lt;test&gt;</title>" in text

    # The gain plot: PSNR only (SSIM and LPIPS have no values); a mean marker per quality, a dot per photo.
    svg = text.split('<svg class="plot" id="plot-psnr"')[1].split("</svg>")[0]
    assert "plot-ssim" not in text and "plot-lpips" not in text
    assert svg.count('<circle class="mean"') == len(QUALITIES) and svg.count('<circle class="each"') == len(recs)
    assert "JPEG quality of the input" in svg and "PSNR gain (dB), restored" in svg and "higher is better" in svg
    for q in QUALITIES:  # the plotted means are the summary's (restored - JPEG)
        row = next(r for r in expect if r["quality"] == q and r["metric"] == "psnr")
        assert f"q{q}: mean {row['restored'] - row['jpeg']:+.2f} dB over 2 photos</title>" in svg


def test_no_warning_for_pretrained_and_given_summary(tmp_path):
    recs = _records()[:1]
    summary = [{"quality": 10, "metric": "psnr_b", "jpeg": 25.0, "restored": 26.5, "n": 1},
               {"quality": 10, "metric": "niqe", "jpeg": 6.0, "restored": None}]
    text = write_report(recs, tmp_path / "r.html", title="t", meta={"encoder_init": "ImageNet", "training steps": None},
                        summary=summary, crop=CROP).read_text()
    page = _Page()
    page.feed(text)
    assert "random-init-warning" not in text
    assert page.rows["summary"] == [("10", "psnr_b"), ("10", "niqe")]
    assert "+1.50" in text and "PSNR-B" in text and "NIQE" in text
    assert "<th>training steps</th><td>unknown</td>" in text and "None" not in text  # a fact not recorded
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        write_report([{**recs[0], "jpeg": recs[0]["jpeg"].astype(np.float32)}], tmp_path / "x.html",
                     title="t", meta={})
    assert not (tmp_path / "x.html").exists()


def test_passed_through_said_per_quality_and_per_photo(report, tmp_path):
    """Where the do-no-harm guard passed a photo through, the page says so under the summary (per quality: how many
    of the photos) and at the photo's row (restored = JPEG), not only "+0.00"; nothing where none was."""
    assert "passthrough-notes" not in report[0].read_text() and 'class="pass"' not in report[0].read_text()
    recs = [{**r, "restored": r["jpeg"], "passthrough": True} if r["quality"] == 40 and r["image"] == "astronaut.png"
            else r for r in _records()]
    text = write_report(recs, tmp_path / "r.html", title="t", meta={}, crop=CROP).read_text()
    notes = text.split('<ul class="notes" id="passthrough-notes">')[1].split("</ul>")[0]
    assert notes.count("<li") == 1 and '<li class="pass" id="passed-q40">quality 40: 1 of 2 photo(s) passed ' \
        "through unchanged by the do-no-harm guard" in notes and "restored image is the JPEG" in notes
    section = text.split('<div class="rec" data-quality="40">')[1].split('<div class="rec"')[0]
    assert '<h3>quality 40 <span class="pass">passed through unchanged (do-no-harm guard)</span></h3>' in section
    assert "<figcaption>restored (= JPEG)</figcaption>" in section and text.count("restored (= JPEG)") == 1
    # the gain plot draws that photo hollow (its 0 is the guard's choice), says so, and names it in the caption
    svg = text.split('<svg class="plot" id="plot-psnr"')[1].split("</svg>")[0]
    assert svg.count('<circle class="each pass"') == 1 and svg.count('<circle class="each"') == len(recs) - 1
    assert "<title>q40: passed through unchanged (do-no-harm guard)</title>" in svg and ", 1 passed through</title>" in svg
    assert "hollow: passed through unchanged" in text and "hollow:" not in report[0].read_text()


def test_every_evaluated_metric_has_its_registry_direction(tmp_path):
    """The report reads the metric registry: every column evaluate writes (the six and the colour ones) is shown
    with its caption and direction, in the registry's order; a name it does not know still prints, last."""
    from dist_dejpeg.metrics.registry import BY_NAME, EVALUATED

    rec = _records()[0]
    values = {"jpeg": {m: 1.0 for m in EVALUATED} | {"shift_r": -2.0, "extra": 1.0},
              "restored": {m: 2.0 for m in EVALUATED} | {"shift_r": 0.5, "extra": 2.0}}
    text = write_report([{**rec, "metrics": values}], tmp_path / "r.html", title="t", meta={}, crop=CROP).read_text()
    page = _Page()
    page.feed(text)
    assert [m for _, m in page.rows["summary"]] == [*EVALUATED, "extra"]
    legend = text.split('id="legend"')[1].split("</table>")[0]
    assert legend.count("direction unknown") == 1 and "<td>extra</td><td>direction unknown</td>" in legend
    for m in EVALUATED:
        assert f"<td>{html.escape(BY_NAME[m].caption)} <span class=\"dir\" title=\"{BY_NAME[m].phrase}\">" in legend
    # shift R moved from -2 to +0.5 levels: closer to 0, so better although the value rose; shift G from 1 to 2
    assert re.search(r'data-metric="shift_r">.*?<td class="num delta better">\+2\.5000</td>', text)
    assert re.search(r'data-metric="shift_g">.*?<td class="num delta worse">\+1\.0000</td>', text)
    assert re.search(r'data-metric="psnr_y">.*?<td class="num delta better">\+1\.0000</td>', text)
    # plots for PSNR, SSIM and LPIPS, coloured by direction: +1 is a gain for SSIM, a loss for LPIPS
    assert text.count('<svg class="plot"') == 3
    ssim, lpips = (text.split(f'id="plot-{m}"')[1].split("</svg>")[0] for m in ("ssim", "lpips"))
    assert 'class="mean" cx' in ssim and 'fill="#11772d"><title>q10: mean +1.0000' in ssim
    assert 'fill="#b3261e"><title>q10: mean +1.0000' in lpips and "lower is better" in lpips


def test_summary_means_pair_each_photo_s_jpeg_and_restored_values():
    """A photo whose JPEG equals its reference (PSNR inf: a blank page) made the JPEG mean inf while the restored
    mean was finite, and a value missing on one side (BRISQUE of a flat JPEG) left one mean but not the other: the
    delta then compared two different sets of photos. Each mean is now over the photos with both values."""
    rec = _records()[0]
    two = [{**rec, "image": "blank", "metrics": {"jpeg": {"psnr": float("inf"), "brisque": None},
                                                 "restored": {"psnr": 45.0, "brisque": 80.0}}},
           {**rec, "image": "photo", "metrics": {"jpeg": {"psnr": 30.0, "brisque": 40.0},
                                                 "restored": {"psnr": 31.0, "brisque": 35.0}}}]
    rows = {r["metric"]: r for r in summarize(two)}
    assert (rows["psnr"]["jpeg"], rows["psnr"]["restored"], rows["psnr"]["n"]) == (30.0, 31.0, 1)
    assert (rows["brisque"]["jpeg"], rows["brisque"]["restored"]) == (40.0, 35.0)
    page = render_report(two, title="t", meta={}, crop=CROP)
    assert "the mean of per-photo PSNRs, not the PSNR of the mean error" in page


def test_summary_photo_count_is_the_photos_a_mean_is_over():
    """The summary's "photos" column said every photo for a metric measured on none (LPIPS n/a offline: "n/a n/a 2"
    read as two photos measured); it counts the photos behind the means: 0 there, those with a value elsewhere."""
    recs = _records()  # PSNR on both photos, SSIM and LPIPS on none
    recs[0] = {**recs[0], "metrics": {"jpeg": {**recs[0]["metrics"]["jpeg"], "brisque": 40.0},
                                      "restored": {**recs[0]["metrics"]["restored"], "brisque": None}}}
    rows = {(r["quality"], r["metric"]): r["n"] for r in summarize(recs)}
    assert rows[(10, "psnr")] == 2 and rows[(10, "lpips")] == 0 and rows[(10, "ssim")] == 0
    assert rows[(10, "brisque")] == 1  # a value on one side only: that photo
    page = render_report(recs, title="t", meta={}, crop=CROP)
    lpips_row = page.split('<tr class="row" data-quality="40" data-metric="lpips">')[1].split("</tr>")[0]
    assert lpips_row.endswith('<td class="num">0</td>')


def test_error_crop_finds_the_worst_window():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    jpeg = clean.copy()
    jpeg[200:240, 330:370] ^= 0x40  # the only error, 40 x 40
    top, left, h, w = error_crop(clean, jpeg, 64)
    assert (h, w) == (64, 64) and top <= 200 and top + 64 >= 240 and left <= 330 and left + 64 >= 370
    assert error_crop(clean, jpeg, 1000) == (0, 0, 300, 420)  # clipped to the photo
    # Two error maps add up: a weaker, larger error elsewhere does not win against the sum at the same place.
    jpeg2 = clean.copy()
    jpeg2[10:50, 10:50] ^= 0x01
    assert error_crop(clean, [jpeg, jpeg2], 64)[:2] == (top, left)


def test_records_cut_per_photo_render_the_same_page():
    """evaluate hands the report each photo cut to its crops and thumbnail (photo_parts) as soon as it is measured,
    not every photo's full-size images: the page is byte for byte the one rendered from the full records, and
    records cut for another crop size are refused, not shown at the wrong size."""
    from dist_dejpeg.evaluation.report import photo_parts

    recs = _records()
    cut = [r for name in _photos() for r in photo_parts([r for r in recs if r["image"] == name], CROP)]
    assert not any(isinstance(v, np.ndarray) for r in cut for v in r.values())
    assert render_report(cut, title="t", meta=META, crop=CROP) == render_report(recs, title="t", meta=META, crop=CROP)
    with pytest.raises(ValueError, match=f"cut for crop={CROP}, not 64"):
        render_report(cut, title="t", meta=META, crop=64)


def test_thumbnails_are_jpegs_a_fraction_of_a_png():
    """The thumbnail only shows where the crop is, but was a lossless PNG of the whole photo: 6.3 MB of a 20 MB page
    of 50 photos. As a JPEG (q85) it is a fraction of the PNG; the crops stay lossless."""
    from dist_dejpeg.evaluation.report import THUMB_QUALITY, photo_parts

    recs = [r for r in _records() if r["image"] == "astronaut.png"]  # 192 x 256
    part = photo_parts(recs, CROP)[0]
    assert part["thumb"].startswith("data:image/jpeg;base64,") and THUMB_QUALITY == 85
    thumb = Image.open(io.BytesIO(base64.b64decode(part["thumb"].split(",", 1)[1])))
    assert thumb.format == "JPEG" and thumb.size == (256, 192)
    png = io.BytesIO()
    thumb.save(png, format="PNG")
    assert len(part["thumb"]) < 0.5 * len(base64.b64encode(png.getvalue()))
    assert all(uri.startswith("data:image/png;base64,") for uri in part["crops"].values())


def test_each_crop_is_embedded_once(tmp_path):
    """The original's crop is the same at every quality, and was embedded once per quality (~100 KB of base64 for a
    192 px crop of a camera photo, per quality). Now every distinct crop's bytes are on the page once: a second
    quality adds its JPEG and restored crops and its numbers, less than another copy of the original's crop."""
    recs = [r for r in _records() if r["image"] == "astronaut.png"]
    one, two = (render_report(recs[:n], title="t", meta=META, crop=CROP) for n in (1, 2))
    uris = re.findall(r'src="(data:image/png;base64,[^"]+)"', two)
    assert len(uris) == len(set(uris)) == 1 + 2 * 2  # original crop, JPEG and restored at 2 qualities (and a JPEG
    assert len(re.findall(r'src="data:image/jpeg;base64,', two)) == 1  # thumbnail)
    top, left, h, w = error_crop(recs[0]["clean"], [r["jpeg"] for r in recs], CROP)
    buf = io.BytesIO()
    Image.fromarray(recs[0]["clean"][top:top + h, left:left + w]).save(buf, format="PNG")
    clean_crop = base64.b64encode(buf.getvalue()).decode("ascii")
    assert two.count(clean_crop) == 1
    added = sum(len(u) for u in uris[-2:])  # the second quality's own JPEG and restored crops
    assert len(two) - len(one) - added < len(clean_crop)  # its numbers, not another copy of the original crop
    page = _Page()
    page.feed(two)
    same = [a for a in page.imgs if "data-same" in a]
    assert [a["alt"] for a in same] == ["astronaut.png q40 clean"] and "src" not in same[0]
    assert next(a for a in page.imgs if a.get("id") == same[0]["data-same"])["alt"] == "astronaut.png q10 clean"


# ------------------------------------------------------------------------------------------ Chromium

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_browser() -> str | None:
    return next((p for b in BROWSERS if (p := shutil.which(b))), None)


@pytest.fixture(scope="session")
def chromium() -> str:
    found = _find_browser()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs chromium (or chromium-browser / google-chrome) on PATH, or root and apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    log = ""
    try:
        for pre in ([], [["apt-get", "update", "-q"]]):  # as start.sh: update only if the first try fails
            for c in pre + [cmd]:
                r = subprocess.run(c, env=env, capture_output=True, text=True, timeout=600)
                log = (r.stdout + r.stderr)[-2000:]
            if r.returncode == 0 and (found := _find_browser()):
                return found
    except (OSError, subprocess.TimeoutExpired) as e:
        log = repr(e)
    pytest.skip(f"could not install chromium with apt-get: {log}")


PROBE = """<pre id="probe">pending</pre><script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images), crop = document.querySelector('img.crop');
  var zoom = [1, 2, 4].map(function (z) {  // at each page zoom: its width, then after each of 4 clicks on the crop
    document.querySelector('.zoom button[data-z="' + z + '"]').click();
    var widths = [crop.getBoundingClientRect().width];
    for (var i = 0; i < 4; i++) { crop.click(); widths.push(crop.getBoundingClientRect().width); }
    return widths;
  });
  document.querySelector('.zoom button[data-z="1"]').click();
  document.getElementById('probe').textContent = JSON.stringify({
    images: imgs.length,
    decoded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    summary_rows: document.querySelectorAll('#summary tr.row').length,
    plot: (function (svg) { var r = svg.getBoundingClientRect(), line = svg.querySelector('polyline.mean');
      return [r.width, r.height, line.getBBox().width > 100, svg.querySelectorAll('text').length]; })(
      document.querySelector('svg.plot')),
    warning: !!document.getElementById('random-init-warning'),
    zoom: zoom, errors: window.__errors || []});
});
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message)); });
</script>"""


def _run_browser(browser, args, tmp_path, timeout=60):
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-extensions", "--hide-scrollbars", "--mute-audio", "--force-device-scale-factor=1",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    env = {**os.environ, "HOME": str(tmp_path)}  # keep ~/.config, ~/.pki writes out of the real home
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_report_in_headless_chromium(report, chromium, tmp_path):
    out, recs = report
    # The probe goes before the page's own script, so listeners registered there (the zoom) already exist
    # by 'load'; it reads the result back from the DOM.
    probed = tmp_path / "probed.html"
    text = out.read_text(encoding="utf-8")
    probed.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    r = _run_browser(chromium, ["--dump-dom", "--virtual-time-budget=5000", probed.as_uri()], tmp_path)
    m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert r.returncode == 0 and m, f"chromium failed (rc {r.returncode}): {r.stderr[-2000:]}"
    res = json.loads(html.unescape(m.group(1)))
    assert res["images"] == N_IMAGES and res["decoded"] == N_IMAGES, res
    assert res["summary_rows"] == len(QUALITIES) * 3 and res["warning"] and not res["errors"], res
    # the page control, then the row's own: every click steps to the next of 1x -> 2x -> 4x -> 1x from what the row
    # shows (it was 2x again at a page zoom of 2x, and 4x again at 4x: a click that did nothing)
    c = CROP
    assert res["zoom"] == [[c, 2 * c, 4 * c, c, 2 * c], [2 * c, 4 * c, c, 2 * c, 4 * c],
                           [4 * c, c, 2 * c, 4 * c, c]], res
    w, h, drawn, texts = res["plot"]  # the gain plot laid out at its size, its line drawn, its labels there
    assert (w, h, drawn) == (440, 270, True) and texts >= 8, res

    size = (1280, 1600)
    shot = tmp_path / "report.png"
    r = _run_browser(chromium, [f"--screenshot={shot}", f"--window-size={size[0]},{size[1]}",
                                "--virtual-time-budget=5000", out.as_uri()], tmp_path)
    assert r.returncode == 0 and shot.is_file(), f"no screenshot (rc {r.returncode}): {r.stderr[-2000:]}"
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == size
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10, "screenshot is blank"
    if os.environ.get("DIST_DEJPEG_ARTIFACTS"):
        dest = os.path.join(os.environ["DIST_DEJPEG_ARTIFACTS"], "report_screenshot.png")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(shot, dest)
        shutil.copyfile(out, os.path.join(os.environ["DIST_DEJPEG_ARTIFACTS"], "report.html"))
        print(f"report screenshot: {dest}")
    else:
        print(f"report screenshot: {shot}")


def test_a_delta_below_the_shown_precision_is_neutral():
    """A passed-through photo's BRISQUE differed by -1.1e-11 (libsvm's OpenMP rounding) and the report showed it as
    a coloured -0.00 ("delta better"): a delta that prints as zero is no change; one that prints is coloured."""
    from dist_dejpeg.evaluation.report import _delta_cell

    assert _delta_cell("brisque", 19.587183905213095, 19.58718390520525) == '<td class="num delta">-0.00</td>'
    assert _delta_cell("brisque", 20.0, 19.99) == '<td class="num delta better">-0.01</td>'
    assert _delta_cell("psnr", 30.0, 30.004) == '<td class="num delta">+0.00</td>'
