"""``dist-dejpeg compare``: models compared from their evaluate folders, photo by photo against the first, and
evaluations measured differently refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dist_dejpeg.cli import main
from dist_dejpeg.config import ModelConfig
from dist_dejpeg.evaluation.compare import CompareError, compare, markdown, read_evaluation
from dist_dejpeg.models.generator_file import save_generator

from test_evaluate import TINY, model_file, photos  # noqa: F401 - fixtures


def _row(image: str, quality: int, jpeg: dict, restored: dict) -> dict:
    return {"image": image, "quality": quality, "height": 64, "width": 64, "jpeg": jpeg, "restored": restored}


def _result(path: str, rows: list[dict], **meta) -> dict:
    return {"meta": {"path": path, "channel": "RGB", "crop_border": 0, "lpips": "unavailable",
                     "compression": "libjpeg via Pillow 11.0.0, 4:2:0 chroma subsampling", **meta},
            "per_image": rows}


def test_paired_differences_their_spread_and_the_photos_better_follow_each_metrics_direction():
    a = _result("a", [_row(f"p{i}", 10, {"psnr": 20.0, "lpips": 0.5}, {"psnr": 21.0, "lpips": 0.4}) for i in range(3)])
    b = _result("b", [_row(f"p{i}", 10, {"psnr": 20.0, "lpips": 0.5}, {"psnr": 21.0 + d, "lpips": 0.4 + d / 10})
                      for i, d in enumerate((1.0, 2.0, 3.0))])
    b["per_image"].append(_row("only_in_b", 10, {"psnr": 1.0, "lpips": 1.0}, {"psnr": 2.0, "lpips": 1.0}))
    b["per_image"][0]["restored"]["lpips"] = None  # infinite or undefined in metrics.json: left out with its pair
    b["per_image"][2]["passthrough"] = True
    got = compare([a, b], ("psnr", "lpips"))
    psnr = got["metrics"]["psnr"]["qualities"]["10"]
    assert psnr["photos"] == 3 and psnr["jpeg"] == 20.0 and psnr["models"] == [21.0, 23.0]
    assert psnr["passed_through"] == [0, 1]
    diff = psnr["versus_first"][0]
    assert diff["mean"] == 2.0 and diff["two_se"] == pytest.approx(2 / math.sqrt(3)) and diff["better"] == 3
    assert got["metrics"]["psnr"]["left_out"] == 1  # only_in_b
    lpips = got["metrics"]["lpips"]["qualities"]["10"]["versus_first"][0]
    assert lpips["photos"] == 2 and lpips["better"] == 0  # higher LPIPS is worse
    text = markdown(got)
    # what the numbers are of, as published tables say it: the channel, the JPEGs' subsampling, the border crop
    assert got["measured"]["channel"] == "RGB" and got["measured"]["subsampling"] == "4:2:0 chroma subsampling"
    assert got["measured"]["crop_border"] == 0
    assert text.startswith("Evaluations (A is the baseline), all measured on RGB, JPEGs at 4:2:0 chroma subsampling, "
                           "border crop 0:")  # (PSNR-B only where it is compared)
    assert ("| q10 | 3 | 20.000 | 21.000 (+1.000) | 23.000 (+3.000, 1 passed through) | +2.000 +- 1.155 (better on 3 "
            "of 3) |") in text


def test_differences_within_float_rounding_are_the_same_not_better():
    """The same model exported to ONNX differs by ~1e-5 dB a photo: compare said "better on 3 of 4"."""
    from dist_dejpeg.metrics.registry import BY_NAME

    assert BY_NAME["psnr"].same_within == 0.005 and BY_NAME["ssim"].same_within == 5e-5  # half the last digit shown
    a = _result("a", [_row(f"p{i}", 10, {"psnr": 20.0, "ssim": 0.5}, {"psnr": 21.0, "ssim": 0.6}) for i in range(4)])
    b = _result("b", [_row(f"p{i}", 10, {"psnr": 20.0, "ssim": 0.5}, {"psnr": 21.0 + d, "ssim": 0.6 - d / 1e3})
                      for i, d in enumerate((1e-5, 1e-5, -1e-5, 0.5))])
    got = compare([a, b], ("psnr", "ssim"))
    psnr = got["metrics"]["psnr"]["qualities"]["10"]["versus_first"][0]
    assert psnr["better"] == 1 and psnr["same"] == 3 and psnr["same_within"] == 0.005
    text = markdown(got)
    assert "(better on 1 of 4, same within 0.005 dB on 3)" in text
    assert "(better on 0 of 4, same within 5e-05 on 3)" in text  # SSIM: 1e-8 three times, one photo worse
    b["per_image"][3]["restored"]["psnr"] = 21.0
    assert "(same within 0.005 dB on 4 of 4)" in markdown(compare([a, b], ("psnr",)))


def test_evaluations_measured_differently_are_refused_by_name():
    rows = [_row("p", 10, {"psnr": 20.0}, {"psnr": 21.0})]
    base = _result("a", rows)
    with pytest.raises(CompareError, match="two evaluations or more"):
        compare([base])
    with pytest.raises(CompareError, match="unknown metric.*bogus"):
        compare([base, _result("b", rows)], ("bogus",))
    for other, what in ((dict(channel="Y (ITU-R BT.601, MATLAB-style)"), "colour channel"),
                        (dict(crop_border=4), "border crop"),
                        (dict(compression="libjpeg via Pillow 11.0.0, 4:4:4 chroma subsampling"), "subsampling"),
                        (dict(lpips="lpips-vgg"), "LPIPS backbone")):
        with pytest.raises(CompareError, match=f"^b measured with another .*{what}.* than a"):
            compare([_result("a", rows, lpips="lpips-alex"), _result("b", rows, **other)])
    other_photo = [_row("p", 10, {"psnr": 20.5}, {"psnr": 21.0})]  # the same name and size, another JPEG input
    with pytest.raises(CompareError, match="photo 'p' at q10: its JPEG's psnr is 20.0 in a but 20.5 in b: not the"):
        compare([base, _result("b", other_photo)])
    # a thousandth of a dB is no float rounding (the same photo measures the same to ~1e-12): another JPEG input
    with pytest.raises(CompareError, match="not the same photo"):
        compare([base, _result("b", [_row("p", 10, {"psnr": 20.001}, {"psnr": 21.0})])])
    # another Pillow (the same libjpeg settings) and LPIPS measured on one side only still compare
    got = compare([_result("a", rows, lpips="lpips-alex"),
                   _result("b", rows, compression="libjpeg via Pillow 12.1.0, 4:2:0 chroma subsampling")])
    assert got["metrics"]["lpips"]["not_measured"] == [0, 1] and got["metrics"]["psnr"]["qualities"]["10"]


def test_an_evaluation_made_before_a_metric_existed_is_told_to_run_again():
    """A metric absent from an older metrics.json was "not measured in A (meta.unavailable says why)", though
    meta.unavailable had no word on it: that case says the evaluation predates it; a stated reason still points
    to meta.unavailable."""
    rows = [_row("p", 10, {"psnr": 20.0}, {"psnr": 21.0})]
    with_ssim = [_row("p", 10, {"psnr": 20.0, "ssim": 0.5}, {"psnr": 21.0, "ssim": 0.6})]
    got = compare([_result("a", rows), _result("b", with_ssim)], ("psnr", "ssim"))
    assert got["metrics"]["ssim"]["not_measured"] == [0] and got["metrics"]["ssim"]["unavailable"] == [None]
    text = markdown(got)
    assert "| A's evaluation predates this metric (or did not measure it): run evaluate again |" in text
    assert "meta.unavailable" not in text
    said = _result("a", rows, unavailable={"ssim": "not requested"})
    text = markdown(compare([said, _result("b", rows)], ("psnr", "ssim")))
    assert "| not measured in A, B (meta.unavailable in metrics.json says why) |" not in text
    assert "| not measured in A (meta.unavailable in metrics.json says why) |" in text
    assert "| B's evaluation predates this metric" in text


def test_compare_reads_what_evaluate_wrote(tmp_path, model_file, photos, capsys):  # noqa: F811
    """Two models evaluated by the real evaluate, compared from their folders: the difference is the mean of
    the per-photo differences of their metrics.json; a Y-only evaluation is refused; a missing folder is exit 2."""
    import torch
    from torch import nn

    from dist_dejpeg.evaluation.evaluate import evaluate
    from dist_dejpeg.models.unet import build_generator

    torch.manual_seed(1)
    other = build_generator(ModelConfig(**TINY))
    nn.init.normal_(other.head.weight, std=0.02)
    save_generator(other, ModelConfig(**TINY), other_file := tmp_path / "other.safetensors", extra={"global_step": 5})
    images, only = [str(photos)], ("psnr", "ssim")
    for name, model, y in (("a", model_file, False), ("b", other_file, False), ("y", model_file, True)):
        evaluate(str(model), images, [10, 30], tmp_path / name, progress=False, only=only, y_only=y,
                 restorer_kwargs={"tile": 0})
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b" / "metrics.json"), "--metrics", "psnr", "ssim",
                 "-o", str(tmp_path / "compare.md"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    a, b = (read_evaluation(tmp_path / n) for n in "ab")
    for q in (10, 30):
        first, second = ([r["restored"]["psnr"] for r in e["per_image"] if r["quality"] == q] for e in (a, b))
        diff = got["metrics"]["psnr"]["qualities"][str(q)]["versus_first"][0]
        assert diff["photos"] == 2 and diff["mean"] == pytest.approx(np.mean(np.subtract(second, first)))
        assert diff["better"] == sum(np.greater(second, first))
    assert got["evaluations"][1]["global_step"] == 5
    assert "| quality | photos | JPEG | A | B | B - A |" in (tmp_path / "compare.md").read_text()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "compare.json")]) == 0
    assert "| quality |" in capsys.readouterr().out  # the file's format follows its suffix, stdout stays markdown
    assert json.loads((tmp_path / "compare.json").read_text())["metrics"]["psnr"] == got["metrics"]["psnr"]
    (tmp_path / "a.html").write_text("<html>")  # a report page: its tables are in the folder named as it
    assert main(["compare", str(tmp_path / "a.html"), str(tmp_path / "b")]) == 0
    assert "| q30 | 2 |" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "y")]) == 2
    assert "y measured with another colour channel (--y-only) than " in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "none")]) == 2
    assert f"{tmp_path / 'none'}: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "empty")]) == 2
    assert "no metrics.json there" in capsys.readouterr().err
    (tmp_path / "run").mkdir()  # a training run's own metrics.json: its validation, not an evaluation
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"q10": {}, "meta": {"global_step": 40}}))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "run")]) == 2
    assert "a training run's metrics.json" in capsys.readouterr().err


def test_nothing_in_common_the_same_folder_twice_and_an_output_over_an_input_are_refused(tmp_path, capsys):
    """Evaluations of other qualities (or photos) share no value: an error naming what each measured, not empty
    tables and exit 0; one folder given twice is refused; -o onto an evaluation's own files (which then held
    markdown: the next compare failed) or onto a folder is refused before anything is printed; -o into a
    folder not yet made makes it."""
    rows = {q: [_row(f"p{i}", q, {"psnr": 20.0 + q}, {"psnr": 21.0 + q}) for i in range(2)] for q in (10, 20)}
    with pytest.raises(CompareError, match=r"no photo at any quality was measured in all of them \(a: 2 photo\(s\) at "
                                           r"q10; b: 2 photo\(s\) at q20\)"):
        compare([_result("a", rows[10]), _result("b", rows[20])])
    for name, result in (("a", _result("a", rows[10] + rows[20])), ("b", _result("b", rows[10]))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(result))
        (tmp_path / name / "metrics.md").write_text("evaluate's table")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for again in (str(tmp_path / "a" / ".." / "a"), str(tmp_path / "a" / "metrics.json")):
        assert main(["compare", a, again]) == 2
        assert "given twice" in capsys.readouterr().err, again
    for out, why in ((tmp_path / "b" / "metrics.md", "is part of the evaluation"),
                     (tmp_path / "a" / "metrics.json", "is part of the evaluation"), (tmp_path / "b", "is a folder")):
        assert main(["compare", a, b, "-o", str(out)]) == 2
        captured = capsys.readouterr()
        assert why in captured.err and not captured.out, captured
    assert (tmp_path / "b" / "metrics.md").read_text() == "evaluate's table"
    assert main(["compare", a, b, "-o", str(tmp_path / "new" / "sub" / "compare.md")]) == 0
    assert "| q10 | 2 |" in (tmp_path / "new" / "sub" / "compare.md").read_text()


def test_psnr_b_before_its_convention_was_recorded_and_y_labelled_before_and_since_the_grayscale_change():
    """An evaluation without meta.psnr_b counted the boundary pairs exactly (0.04 dB from KAIR's on 481x321 at q10):
    it passed as the same convention. --y-only's label changed, rgb_to_y did not: old and new Y evaluations were
    refused as another channel, though only a grayscale photo's numbers moved (+1.32 dB)."""
    rows = [_row("p", 10, {"psnr": 20.0, "psnr_b": 19.0}, {"psnr": 21.0, "psnr_b": 20.0})]
    kair = "KAIR/SwinIR calculate_psnrb: per-channel mean, BEF over H*(W//8-1) boundary pairs"
    old, new = _result("old", rows), _result("new", rows, psnr_b=kair)
    with pytest.raises(CompareError, match="^new measured with another PSNR-B convention than old"):
        compare([old, new], ("psnr", "psnr_b"))
    assert "PSNR-B" not in markdown(compare([old, new], ("psnr",)))  # (PSNR's numbers do not depend on it)
    assert "PSNR-B as the exact boundary-pair count" in markdown(compare([old, _result("o2", rows)], ("psnr_b",)))
    old_y = dict(channel="Y (ITU-R BT.601, MATLAB-style)")
    new_y = dict(channel="Y (ITU-R BT.601 16-235, float, not rounded: the BasicSR/SwinIR convention)")
    assert compare([_result("old", rows, **old_y), _result("new", rows, **new_y, grayscale_images=0)])
    # two evaluations since the change (one label) with grayscale photos measured them alike: they compare
    assert compare([_result("a", rows, **new_y, grayscale_images=2), _result("b", rows, **new_y, grayscale_images=2)])
    with pytest.raises(CompareError, match=r"grayscale photos in new \(1\): .* old measured a grayscale photo's Y .*"
                                           r"not recorded"):
        compare([_result("old", rows, **old_y), _result("new", rows, **new_y, grayscale_images=1)])
    with pytest.raises(CompareError, match="another colour channel"):
        compare([_result("old", rows, **old_y), _result("new", rows, grayscale_images=0)])  # (RGB)
