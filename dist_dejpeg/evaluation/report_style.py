"""The report page's style sheet and its zoom script (evaluation/report.py embeds both: one self-contained file)."""

CSS = """
:root { --zoom: 1; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.2em; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin: 0 0 .4em; } h2 { font-size: 1.2em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; margin: .4em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; } th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.better { color: #11772d; } td.worse { color: #b3261e; } .pass { color: #8a5a00; font-weight: 600; }
.na { color: #888; } a.fn { color: inherit; text-decoration: none; vertical-align: super; font-size: .8em; }
.notes { color: #555; margin: .2em 0; padding-left: 1.4em; }
.warn { border: 2px solid #b3261e; background: #fdecea; padding: .6em .9em; margin: .6em 0; font-weight: 600; }
.zoom { position: sticky; top: 0; background: #fff; padding: .4em 0; z-index: 1; border-bottom: 1px solid #ddd; }
.zoom button { font: inherit; padding: 1px 10px; }
.zoom button.on { background: #333; color: #fff; }
.photo { margin-top: 1.2em; border-top: 2px solid #444; }
.rec { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; margin: .8em 0; }
.crops { display: flex; gap: 6px; flex-wrap: wrap; }
figure { margin: 0; } figcaption { text-align: center; font-size: .9em; color: #444; }
img.crop { image-rendering: pixelated; image-rendering: crisp-edges; cursor: zoom-in; display: block;
           width: calc(var(--w) * var(--zoom) * 1px); height: auto; }
.rec.z1 img.crop { width: calc(var(--w) * 1px); } .rec.z2 img.crop { width: calc(var(--w) * 2px); }
.rec.z4 img.crop { width: calc(var(--w) * 4px); }
figure.thumb { display: inline-block; } .thumb img { display: block; }
.legend td:first-child { white-space: nowrap; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } svg.plot { background: #fff; }
"""

JS = """
(function () {
  // a crop shown again (the original at each quality) is embedded once: its other <img>s copy that one's source
  document.querySelectorAll('img[data-same]').forEach(function (img) {
    img.src = document.getElementById(img.dataset.same).src;
  });
  var LEVELS = [1, 2, 4], page = 1;
  function rowZoom(r) {
    var own = LEVELS.filter(function (z) { return r.classList.contains('z' + z); });
    return own.length ? own[0] : page;
  }
  function setZoom(z) {
    page = z;
    document.documentElement.style.setProperty('--zoom', z);
    document.querySelectorAll('.zoom button').forEach(function (b) {
      b.classList.toggle('on', b.dataset.z === String(z));
    });
    document.querySelectorAll('.rec').forEach(function (r) { r.classList.remove('z1', 'z2', 'z4'); });
  }
  document.querySelectorAll('.zoom button').forEach(function (b) {
    b.addEventListener('click', function () { setZoom(Number(b.dataset.z)); });
  });
  // Click a crop: its photo/quality row steps to the next of 1x -> 2x -> 4x -> 1x from what it shows now (the
  // page's zoom or its own), so every click changes it; the level equal to the page's follows the page again.
  document.querySelectorAll('img.crop').forEach(function (img) {
    img.addEventListener('click', function () {
      var r = img.closest('.rec'), next = LEVELS[(LEVELS.indexOf(rowZoom(r)) + 1) % LEVELS.length];
      r.classList.remove('z1', 'z2', 'z4');
      if (next !== page) { r.classList.add('z' + next); }
    });
  });
})();
"""
