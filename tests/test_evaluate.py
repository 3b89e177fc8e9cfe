"""`dist-dejpeg evaluate` and `report` on real photos: the three tables with all six metrics at two qualities,
LPIPS marked unavailable offline (never a random backbone), lossy references refused, shards as input."""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_dejpeg.cli import main
from dist_dejpeg.config import ModelConfig
from dist_dejpeg.evaluation.evaluate import read_references
from dist_dejpeg.metrics.registry import BY_NAME, EVALUATED, PHRASES
from dist_dejpeg.models.generator_file import save_generator

TINY = dict(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=16)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    import torch
    from torch import nn

    from dist_dejpeg.models.unet import build_generator

    torch.manual_seed(0)
    g = build_generator(ModelConfig(**TINY))
    nn.init.normal_(g.head.weight, std=0.005)
    path = tmp_path_factory.mktemp("model") / "generator.safetensors"
    save_generator(g, ModelConfig(**TINY), path, extra={"global_step": 3})
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two real photos (lossless PNG crops of scikit-image's bundled ones), one in a subfolder."""
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.chelsea()[50:250, 100:300]).save(folder / "chelsea.png")
    (folder / "more").mkdir()
    Image.fromarray(skimage.data.coffee()[100:300, 150:350]).save(folder / "more" / "coffee.png")
    return folder


def test_evaluate_writes_three_tables_with_six_metrics(tmp_path, model_file, photos, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(model_file), "--images", str(photos), "--quality", "10", "40",
                 "-o", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # --quiet: stdout holds the result lines only; torch.hub's "Downloading: https://..." (LPIPS trying its
    # backbone offline) goes to stderr, once at most
    assert all(line.startswith(("q10:", "q40:", "wrote ")) for line in captured.out.splitlines()), captured.out
    assert captured.err.count("Downloading") <= 1
    result = json.loads((out / "metrics.json").read_text())
    meta = result["meta"]
    assert meta["images"] == 2 and meta["qualities"] == [10, 40]
    assert meta["model"]["encoder_init"] == "random init" and "RANDOM" in meta["backbones"]
    assert meta["model"]["global_step"] == 3 and "4:2:0" in meta["compression"]
    # Offline here: no AlexNet backbone, so LPIPS is unavailable with its reason, never a random-backbone number.
    assert "lpips" in meta["unavailable"] and "--lpips-weights" in meta["unavailable"]["lpips"]
    assert len(result["per_image"]) == 4
    for row in result["per_image"]:
        for kind in ("jpeg", "restored"):
            assert set(row[kind]) == set(EVALUATED)
            assert all(BY_NAME[m].phrase in PHRASES.values() for m in row[kind])  # a direction for every one
            assert row[kind]["lpips"] is None
            for m in ("psnr", "psnr_b", "ssim", "brisque", "niqe"):
                assert np.isfinite(row[kind][m]), (m, row)
            assert row[kind]["psnr_b"] <= row[kind]["psnr"] + 1e-9
    q10, q40 = result["per_quality"]["10"], result["per_quality"]["40"]
    assert q10["jpeg"]["psnr"] < q40["jpeg"]["psnr"]  # the compression really happened at two qualities
    assert q10["images"] == 2
    rows = list(csv.DictReader(io.StringIO((out / "metrics.csv").read_text())))
    assert len(rows) == 8 and set(rows[0]) == {"image", "quality", "input", *EVALUATED}
    assert {r["image"] for r in rows} == {"chelsea", "coffee"}
    jpeg10 = [float(r["psnr"]) for r in rows if r["quality"] == "10" and r["input"] == "jpeg"]
    assert abs(np.mean(jpeg10) - q10["jpeg"]["psnr"]) < 1e-9
    md = (out / "metrics.md").read_text()
    assert "| 10 | psnr_b (higher is better) |" in md and "| 40 | niqe (lower is better) |" in md
    assert "lpips: unavailable" in md and "n/a" in md


def test_y_only_and_border_crop_change_the_numbers(tmp_path, model_file, photos):
    from dist_dejpeg.evaluation.evaluate import evaluate
    from dist_dejpeg.restore.restorer import Restorer

    restorer = Restorer(str(model_file), tile=0)
    rgb = evaluate(restorer, [str(photos / "chelsea.png")], [20], None, progress=False)
    y = evaluate(restorer, [str(photos / "chelsea.png")], [20], None, y_only=True, crop_border=4, progress=False)
    assert y["meta"]["channel"].startswith("Y") and y["meta"]["crop_border"] == 4
    # Y carries less of the chroma error that 4:2:0 adds: its PSNR is higher than RGB's for the JPEG input
    assert y["per_quality"]["20"]["jpeg"]["psnr"] > rgb["per_quality"]["20"]["jpeg"]["psnr"]
    # only PSNR requested (the benchmarks): the rest is None and says why; the colour columns stay
    psnr = evaluate(restorer, [str(photos / "chelsea.png")], [20], None, progress=False, only=("psnr",))
    row = psnr["per_image"][0]["restored"]
    assert row["psnr"] == rgb["per_image"][0]["restored"]["psnr"] and row["psnr_cb"] is not None
    assert all(row[m] is None for m in ("psnr_b", "ssim", "lpips", "brisque", "niqe"))
    assert psnr["meta"]["unavailable"]["niqe"] == "not requested"


def test_subsampling_compresses_the_references_as_asked(tmp_path, model_file, photos, capsys):
    """--subsampling 4:4:4 keeps the chroma at full resolution: the JPEG input is closer to the reference than
    4:2:0's, the metadata says which, and a value outside the three is refused."""
    from dist_dejpeg.evaluation.evaluate import EvaluateError, evaluate

    psnr = {}
    for sub in ("4:2:0", "4:4:4"):
        out = tmp_path / sub.replace(":", "")
        assert main(["evaluate", "--model", str(model_file), "--images", str(photos / "chelsea.png"), "--qualities",
                     "30", "--subsampling", sub, "-o", str(out), "--quiet"]) == 0, capsys.readouterr().err
        result = json.loads((out / "metrics.json").read_text())
        assert f"{sub} chroma subsampling" in result["meta"]["compression"]
        psnr[sub] = result["per_quality"]["30"]["jpeg"]["psnr_cb"]
    assert psnr["4:4:4"] > psnr["4:2:0"] + 0.5, psnr
    with pytest.raises(EvaluateError, match="subsampling"):
        evaluate(str(model_file), [str(photos / "chelsea.png")], [30], None, progress=False, subsampling="4:1:1")


def test_lossy_references_refused_unless_allowed(tmp_path):
    import skimage.data

    Image.fromarray(skimage.data.coffee()[:64, :64]).save(tmp_path / "ref.jpg", quality=95)
    from dist_dejpeg.evaluation.evaluate import EvaluateError

    with pytest.raises(EvaluateError, match="lossy reference"):
        read_references([str(tmp_path)])
    refs, _ = read_references([str(tmp_path)], allow_lossy=True)
    assert len(refs) == 1 and refs[0][1].shape == (64, 64, 3)


def test_a_png_saved_from_a_jpeg_is_a_lossy_reference(tmp_path):
    """scikit-image's coins.png was a q85 JPEG once: as a reference it is refused like a .jpg (naming the quality its
    pixels show), skipped beside lossless ones, and used with --allow-lossy-reference."""
    import skimage.data

    from dist_dejpeg.evaluation.evaluate import EvaluateError

    Image.fromarray(skimage.data.coins()).save(tmp_path / "coins.png")
    with pytest.raises(EvaluateError, match=r"lossy reference.*coins.png \(a JPEG's q85 grid in its pixels\)"):
        read_references([str(tmp_path)])
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "chelsea.png")
    refs, skipped = read_references([str(tmp_path)])
    assert [n for n, _ in refs] == ["chelsea"] and "coins.png" in skipped[0] and "allow-lossy" in skipped[0]
    refs, skipped = read_references([str(tmp_path)], allow_lossy=True)
    assert [n for n, _ in refs] == ["chelsea", "coins"] and not skipped


def test_references_from_shards(sample_shards):
    refs, skipped = read_references([str(sample_shards / "val-*.tar")], max_images=3)
    assert len(refs) == 3 and not skipped
    assert all(r.shape == (96, 96, 3) and r.dtype == np.uint8 for _, r in refs)


def test_report_page_from_the_cli(tmp_path, model_file, photos, capsys):
    page = tmp_path / "report.html"
    code = main(["report", "--model", str(model_file), "--images", str(photos), "--quality", "10",
                 "-o", str(page), "--crop", "64"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "report: 100%" in err and "evaluate:" not in err  # the progress bar names the command run
    text = page.read_text()
    assert text.count("data:image/png;base64,") >= 2 * 3  # two photos, clean | JPEG | restored each
    assert "random" in text.lower() and "chelsea" in text and "coffee" in text
    assert (tmp_path / "report" / "metrics.json").is_file()
    # every metric evaluate measured has its direction; LPIPS's reason (offline here) is on the page once;
    # the gain per quality is drawn
    assert "direction unknown" not in text
    reason = json.loads((tmp_path / "report" / "metrics.json").read_text())["meta"]["unavailable"]["lpips"]
    assert text.count(html.escape(reason)) == 1 and 'id="plot-psnr"' in text
