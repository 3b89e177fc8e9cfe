"""`prepare folder` run again into the same --out (each photo keeps its split), on file names that are not UTF-8, and
on JPEG files whose pixels hide their 8x8 grid (their file's tables say what they are)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_dejpeg.data.folder import held_out_rank, prepare_folder


def _noise(path: Path, seed: int, size: int = 96) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)).save(path)
    return path


def _splits(src: Path, out: Path, **settings) -> dict[str, str]:
    """Each photo's split (by its path below ``src``) when ``src`` is prepared into ``out``."""
    manifest = prepare_folder(src, out, tile=64, train_step=64, shard_size=8, **settings)
    return {info["path"]: info["split"] for info in manifest["sources"].values()}


def _moved_into_val(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [path for path, split in before.items() if split == "train" and after.get(path) == "val"]


def test_a_folder_prepared_again_into_its_out_keeps_every_photos_split(tmp_path, caplog):
    """A photo added or removed moved others between the splits (the one held out at least was the lowest-ranked
    photo present, and never every one: a photo that trained became the validation photo). Prepared again into the
    same --out, every photo keeps the split manifest.json gave it (by its pixels, so a renamed one too), new ones
    are split by rank, and a run whose photos all trained before holds none out and says so."""
    src, out = tmp_path / "grow", tmp_path / "grow-out"
    _noise(src / "l.png", 1), _noise(src / "n.png", 2)
    first = _splits(src, out, val_fraction=0.2)
    assert first == {"l.png": "val", "n.png": "train"}, first  # (l ranked lowest at seed 0)
    _noise(src / "a.png", 3)
    with caplog.at_level(logging.INFO):
        grown = _splits(src, out, val_fraction=0.2)
    assert grown["l.png"] == "val" and grown["n.png"] == "train", grown  # n became validation
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "2 of 3 photos keep the split the earlier prepare" in said and "1 new split by --seed 0" in said, said

    src, out = tmp_path / "abc", tmp_path / "abc-out"
    for i, name in enumerate("abc"):
        _noise(src / f"{name}.png", 10 + i)
    runs = [_splits(src, out)]
    assert runs[0]["c.png"] == "val" and list(runs[0].values()).count("val") == 1, runs[0]
    _noise(src / "d.png", 20)  # d ranks below c: it held out d, c trained
    runs.append(_splits(src, out))
    assert runs[-1]["c.png"] == "val" and runs[-1]["d.png"] == "train", runs[-1]
    (src / "c.png").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        runs.append(_splits(src, out))
    assert set(runs[-1].values()) == {"train"}, runs[-1]  # every photo trained: none moves into validation
    assert "no photo is held out for validation: every photo here trained" in caplog.text, caplog.text
    (src / "d.png").unlink()  # a trained before: it became the one validation photo
    runs.append(_splits(src, out))
    assert runs[-1] == {"a.png": "train", "b.png": "train"}, runs[-1]
    _noise(src / "e.png", 30)  # a new photo is held out when the kept ones hold none
    runs.append(_splits(src, out))
    assert runs[-1] == {"a.png": "train", "b.png": "train", "e.png": "val"}, runs[-1]
    for before, after in zip(runs, runs[1:]):
        assert not _moved_into_val(before, after), (before, after)

    # renamed: the pixels tell it (the path is new), over a name whose rank would hold it out
    low = next(f"r{i}" for i in range(1000) if held_out_rank(f"r{i}", 0) < 0.1)
    (src / "b.png").rename(src / f"{low}.png")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        renamed = _splits(src, out)
    assert renamed == {"a.png": "train", f"{low}.png": "train", "e.png": "val"}, renamed
    assert "photos prepared before under other names keep their split" in caplog.text, caplog.text

    # photos added and removed at random, at several shares: a photo that trained never validates later
    rng = np.random.default_rng(0)
    src, out, present, runs = tmp_path / "random", tmp_path / "random-out", [], []
    for step in range(8):
        for _ in range(int(rng.integers(1, 3))):
            present.append(_noise(src / f"p{step}{len(present)}.png", 100 + len(present) + 10 * step))
        if len(present) > 3 and rng.random() < 0.6:
            present.pop(int(rng.integers(len(present)))).unlink()
        runs.append(_splits(src, out, val_fraction=float(rng.choice([0.1, 0.3, 0.6]))))
        assert "train" in runs[-1].values(), runs[-1]
    for before, after in zip(runs, runs[1:]):
        assert not _moved_into_val(before, after), (before, after)
    assert json.loads((out / "manifest.json").read_text())["dataset"] == f"folder {src}"


def test_another_seed_or_val_fraction_into_the_same_out_says_the_splits_were_kept(tmp_path, caplog):
    """Prepared again into the same --out with another --val-fraction or --seed, every photo kept its split (as it
    must: none that trained moves into validation) and the new settings were silently ignored: a warning names
    what was kept and how to get a fresh split (a new --out); the same settings again say nothing of it."""
    src, out = tmp_path / "src", tmp_path / "out"
    for i, name in enumerate("abcd"):
        _noise(src / f"{name}.png", 40 + i)
    first = _splits(src, out, val_fraction=0.25)
    assert json.loads((out / "manifest.json").read_text())["val_fraction"] == 0.25
    with caplog.at_level(logging.INFO):
        assert _splits(src, out, val_fraction=0.25) == first
    assert "not as the earlier prepare" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _splits(src, out, val_fraction=0.5, seed=3) == first  # (kept)
    warned = [r.getMessage() for r in caplog.records if "not as the earlier prepare" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("prepare folder: --seed 3, --val-fraction 0.5, not as"), warned
    assert "(--seed 0, --val-fraction 0.25): its 4 photos here keep their splits (3 train, 1 val" in warned[0], warned
    assert "(0 now)" in warned[0] and "prepare into a new (empty) --out" in warned[0], warned
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3


def test_prepare_folder_takes_a_file_name_that_is_not_utf8(tmp_path, capsys):
    """b"caf\\xe9.png" (Latin-1, as an old camera or a Windows share names it) stopped prepare with a UnicodeEncodeError
    ('surrogates not allowed') where its split was drawn. It is used, and split by its own bytes; the manifest records
    its path (read back, and by the next prepare into --out) and what prepare prints shows its odd byte as \\xe9."""
    from dist_dejpeg.cli import main

    src = tmp_path / "src"
    src.mkdir()
    names = [b"caf\xe9.png", b"b.png", b"\xff\xfe\xe9t\xe9.png"]
    try:
        for i, name in enumerate(names):
            _noise(Path(os.fsdecode(os.fsencode(src) + b"/" + name)), i)
        small = Path(os.fsdecode(os.fsencode(src) + b"/tiny-\xe9.png"))
        _noise(small, 9, size=16)
    except (OSError, UnicodeError):
        pytest.skip("this file system takes no file name that is not UTF-8")
    out = tmp_path / "out"
    assert main(["prepare", "folder", str(src), "--out", str(out), "--tile", "64", "--val-fraction", "0.5"]) == 0
    err = capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    paths = {info["path"]: info["split"] for info in manifest["sources"].values()}
    assert sorted(paths) == sorted(os.fsdecode(n) for n in names), paths
    assert "caf\\xe9.png" not in json.dumps(manifest)  # (the path as Python reads it back, not as shown)
    assert manifest["rejected"][0]["path"] == os.fsdecode(b"tiny-\xe9.png")
    assert "rejected tiny-\\xe9.png: smaller than the 64 px tile" in err, err
    assert _splits(src, out, val_fraction=0.5) == paths  # prepared again: each keeps its split (by its path too)


@pytest.mark.parametrize("action", ["halve", "keep", "skip"])
def test_prepare_folder_tells_a_jpeg_file_by_its_tables_where_its_pixels_hide_the_grid(tmp_path, caplog, action):
    """A .jpg at q95 or q98, a 4:4:4 one at q95, a CMYK JPEG and a TIFF of JPEG compression (at q80) show no grid to
    the pixel check, and were clean targets at full size without a word. Their files' quantization tables tell them:
    they are listed in jpeg_sources (and jpeg_files) and used as --jpeg-sources says: halve halves those up to q90 and
    uses those above as they are, named in a warning with their quality; keep keeps them; skip leaves them out."""
    import skimage.data

    from dist_dejpeg.jpeg.quality import estimate_from_pixels

    src = tmp_path / "src"
    src.mkdir()
    photo, cat = skimage.data.astronaut(), skimage.data.chelsea()
    Image.fromarray(photo[:256, :256]).save(src / "lossless.png")
    Image.fromarray(photo[256:, :256]).save(src / "q95.jpg", quality=95)
    Image.fromarray(photo[:256, 256:]).save(src / "q98.jpg", quality=98)
    Image.fromarray(photo[256:, 256:]).save(src / "q95_444.jpg", quality=95, subsampling=0)
    Image.fromarray(skimage.data.coffee()[:256, :256]).convert("CMYK").save(src / "cmyk.jpg", quality=80)
    Image.fromarray(cat[:256, :256]).save(src / "tiled.tif", compression="jpeg", quality=80)
    for path in src.iterdir():  # (what the pixel check alone saw)
        assert estimate_from_pixels(np.asarray(Image.open(path).convert("RGB"))).quality is None, path.name
    with caplog.at_level(logging.WARNING):
        manifest = prepare_folder(src, tmp_path / "out", tile=64, train_step=64, shard_size=8, jpeg=action)
    files = {"q95": 95, "q98": 98, "q95444": 95, "cmyk": 80, "tiled": 80}
    assert manifest["jpeg_sources"] == files and set(manifest["jpeg_files"]) == set(files), manifest
    assert manifest["jpeg_files"]["tiled"] == "a TIFF of JPEG compression" and manifest["jpeg_action"] == action
    sources, said = manifest["sources"], caplog.text
    assert sources["lossless"]["height"] == 256 and "halved" not in sources["lossless"]
    if action == "skip":
        assert set(sources) == {"lossless"} and len(manifest["rejected"]) == 5, manifest["rejected"]
        reasons = {r["path"]: r["reason"] for r in manifest["rejected"]}
        assert reasons["q98.jpg"] == "a JPEG file of q98 (its quantization tables): --jpeg-sources halve or keep " \
                                     "would use it", reasons
        return
    sizes = {name: (info["height"], info.get("halved", 0)) for name, info in sources.items()}
    low = (128, 1) if action == "halve" else (256, 0)  # (q80: halved, as a grid the pixels show)
    assert sizes == {"lossless": (256, 0), "q95": (256, 0), "q98": (256, 0), "q95444": (256, 0), "cmyk": low,
                     "tiled": low}, sizes
    if action == "halve":
        assert "2 of 6 photos carry JPEG compression in their pixels or their file's quantization tables" in said
        assert "cmyk (q80 by its tables)" in said and "tiled (q80 by its tables)" in said, said
        assert "3 of 6 photos are JPEGs above q90, used at full size as they are" in said, said
        assert all(f"{name} (q{q})" in said for name, q in (("q95.jpg", 95), ("q98.jpg", 98), ("q95_444.jpg", 95)))
    else:
        assert "5 of 6 photos carry JPEG compression in their pixels or their file's quantization tables" in said
        assert "q95 (q95 by its tables)" in said and "their artefacts become the clean targets" in said, said


def test_a_png_is_not_opened_again_for_its_jpeg_tables(monkeypatch):
    """Telling a JPEG file by its tables costs a PNG a look at its first bytes, not a second parse of the file."""
    import io

    from dist_dejpeg.data import jpeg_sources

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "PNG")

    def opened(*args, **kwargs):
        raise AssertionError("opened")

    monkeypatch.setattr(jpeg_sources.Image, "open", opened)
    assert jpeg_sources.jpeg_file_quality(buf.getvalue()) is None


def test_one_validation_tile_is_warned_of_at_prepare(tmp_path, caplog):
    """One validation tile gives each quality's gain no spread, so no lower bound, and restore's guard passes every
    image through whatever the training did: prepare says so (a newcomer's small held-out photo met it only after
    training, told to "train longer")."""
    for size, warned in ((64, True), (128, False)):
        src = tmp_path / f"s{size}"
        _noise(src / "l.png", 1, size), _noise(src / "n.png", 2, 128)  # (l is held out at seed 0, as above)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            manifest = prepare_folder(src, tmp_path / f"o{size}", tile=64, train_step=64, shard_size=8,
                                      val_fraction=0.2)
        assert (manifest["splits"]["val"]["samples"] == 1) == warned, manifest["splits"]
        assert ("one validation tile" in caplog.text) == warned, caplog.text
