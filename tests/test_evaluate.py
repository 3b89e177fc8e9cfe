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
from dist_dejpeg.evaluation.references import read_references
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
    rows = list(csv.DictReader(io.StringIO((out / "metrics.csv").read_text(encoding="utf-8-sig"))))
    assert len(rows) == 8 and list(rows[0]) == ["image", "quality", "input", *EVALUATED, "channel"]  # (by position)
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
    assert len(refs) == 1 and refs[0].read().shape == (64, 64, 3)


def test_a_png_saved_from_a_jpeg_is_a_lossy_reference(tmp_path):
    """scikit-image's coins.png was a q85 JPEG once: as a reference it is refused like a .jpg (naming the quality its
    pixels show), skipped beside lossless ones, and used with --allow-lossy-reference; so is what restore wrote."""
    import skimage.data

    from dist_dejpeg.evaluation.evaluate import EvaluateError

    Image.fromarray(skimage.data.coins()).save(tmp_path / "coins.png")
    with pytest.raises(EvaluateError, match=r"lossy reference.*coins.png \(a JPEG's q85 grid in its pixels\)"):
        read_references([str(tmp_path)])
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "chelsea.png")
    refs, skipped = read_references([str(tmp_path)])
    assert [r.name for r in refs] == ["chelsea"] and "coins.png" in skipped[0] and "allow-lossy" in skipped[0]
    refs, skipped = read_references([str(tmp_path)], allow_lossy=True)
    assert [r.name for r in refs] == ["chelsea", "coins"] and not skipped
    # restore's output (evaluate photos -o the references' folder) is no clean reference either, however clean it looks
    from dist_dejpeg.restore.images import save_image

    save_image(skimage.data.chelsea()[:64, :64], tmp_path / "chelsea_restored.png")
    refs, skipped = read_references([str(tmp_path)])
    assert [r.name for r in refs] == ["chelsea"] and "chelsea_restored.png (written by restore)" in " ".join(skipped)


def test_references_from_shards(sample_shards):
    """A shard's tiles are read as files are: checked up front, each decoded from its tar member when measured."""
    import tarfile

    from dist_dejpeg.data.images import decode_component

    refs, skipped = read_references([str(sample_shards / "val-*.tar")], max_images=3)
    assert len(refs) == 3 and not skipped
    assert not any(isinstance(v, np.ndarray) for r in refs for v in r)
    assert all(r.read().shape == (96, 96, 3) and r.read().dtype == np.uint8 for r in refs)
    assert all(r.source.startswith("val-") and ".tar:" in r.source for r in refs)
    shard, key = refs[2].source.split(":")
    with tarfile.open(sample_shards / shard) as tar:
        member = next(m for m in tar if m.name.partition(".")[0] == key)
        tile = decode_component(member.name.partition(".")[2], tar.extractfile(member).read())
    assert np.array_equal(refs[2].read(), tile)


def test_a_shard_cut_short_or_not_a_tar_is_skipped_with_its_reason(sample_shards, tmp_path):
    """A half-copied shard (its images before the cut are used) and a file named .tar that is none: each listed
    with the reason beside the images that could be read (a tarfile.ReadError traceback lost the run)."""
    from dist_dejpeg.evaluation.evaluate import EvaluateError

    whole = sorted(sample_shards.glob("val-*.tar"))[0]
    data = whole.read_bytes()
    (half := tmp_path / "half.tar").write_bytes(data[:len(data) // 2])
    (text := tmp_path / "notes.tar").write_text("not a tar")
    all_refs, _ = read_references([str(whole)])
    refs, skipped = read_references([str(half), str(text)])
    assert 0 < len(refs) < len(all_refs) and all(r.read().shape == (96, 96, 3) for r in refs)
    assert skipped == [f"{half}: a WebDataset tar cut short after {len(refs)} image(s) (unexpected end of data): the "
                       f"rest skipped", f"{text}: not a readable WebDataset tar (file could not be opened successfully)"]
    with pytest.raises(EvaluateError, match="none of the 1 file.*notes.tar: not a readable WebDataset tar"):
        read_references([str(text)])


def test_photos_are_decoded_one_at_a_time_as_they_are_measured(tmp_path, model_file, photos, monkeypatch):
    """Every reference photo was decoded up front and kept until all were measured (36 MB per 12 MP photo: ~1.8 GB
    for 50 camera photos). Each is decoded to be checked, then again when it is measured: one in memory at a time,
    with the same numbers. A photo gone in between is skipped with the reason, not a traceback losing the rest."""
    import shutil

    import dist_dejpeg.evaluation.evaluate as evaluate_module
    import dist_dejpeg.evaluation.measure as measure_module
    import dist_dejpeg.evaluation.references as references
    from dist_dejpeg.restore.restorer import Restorer

    events, decode, encode = [], references.decode_rgb8, measure_module.jpeg_encode
    monkeypatch.setattr(references, "decode_rgb8", lambda data: events.append("decode") or decode(data))
    monkeypatch.setattr(measure_module, "jpeg_encode", lambda *a: events.append("jpeg") or encode(*a))
    restorer, run = Restorer(str(model_file), tile=0), dict(progress=False, only=("psnr",))
    result = evaluate_module.evaluate(restorer, [str(photos)], [20], None, **run)
    assert events == ["decode", "decode"] + ["decode", "jpeg"] * 2  # checked, then each decoded as measured
    assert result["meta"]["images"] == 2 and not result["meta"]["skipped"]
    chelsea = np.asarray(Image.open(photos / "chelsea.png"))
    row = next(r for r in result["per_image"] if r["image"] == "chelsea")
    jpeg = measure_module.jpeg_decode(encode(chelsea, 20))
    assert row["jpeg"]["psnr"] == measure_module.MetricSet(only=("psnr",))(jpeg, chelsea, {})["psnr"]

    shutil.copytree(photos, tmp_path / "in")
    listed = evaluate_module.read_references
    gone = lambda *a: (listed(*a), (tmp_path / "in" / "chelsea.png").unlink())[0]  # noqa: E731
    monkeypatch.setattr(evaluate_module, "read_references", gone)
    result = evaluate_module.evaluate(restorer, [str(tmp_path / "in")], [20], None, **run)
    assert result["meta"]["images"] == 1 and [r["image"] for r in result["per_image"]] == ["coffee"]
    assert result["meta"]["skipped"][0].startswith(f"{tmp_path / 'in' / 'chelsea.png'}: [Errno 2] No such file")


def test_report_page_from_the_cli(tmp_path, model_file, photos, capsys, monkeypatch, caplog):
    import dist_dejpeg.evaluation.evaluate as evaluate_module

    asked, real = [], evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: asked.append(k) or real(*a, **k))
    page = tmp_path / "report.html"
    caplog.set_level("INFO", logger="dist_dejpeg")
    code = main(["report", "--model", str(model_file), "--images", str(photos), "--quality", "10",
                 "-o", str(page), "--crop", "64"])
    err = capsys.readouterr().err
    assert code == 0, err
    # stderr is no terminal here (`report ... > log 2>&1`): no bar's carriage-return redraws, plain progress lines
    # that name the command run
    assert "\r" not in err and "%|" not in err, err
    assert [r.getMessage().split(",")[0] for r in caplog.records if "(50%)" in r.getMessage()] == ["report: 1/2 (50%)"]
    text = page.read_text()
    assert text.count("data:image/png;base64,") >= 2 * 3  # two photos, clean | JPEG | restored each
    assert "random" in text.lower() and "chelsea" in text and "coffee" in text
    assert (tmp_path / "report" / "metrics.json").is_file()
    # every metric evaluate measured has its direction; LPIPS's reason (offline here) is on the page once;
    # the gain per quality is drawn
    assert "direction unknown" not in text
    reason = json.loads((tmp_path / "report" / "metrics.json").read_text())["meta"]["unavailable"]["lpips"]
    assert text.count(html.escape(reason)) == 1 and 'id="plot-psnr"' in text
    # a page shared with colleagues names the run (its folder, not "generator.safetensors"), the LPIPS measured
    # with here and in training, and a guard that had no gains to judge by
    assert f"<title>dist_dejpeg: {html.escape(str(model_file.parent.resolve()))}" in text
    assert "LPIPS here" in text and "LPIPS in training" in text and "trained by" in text
    assert "on, but the model file holds no validated gains" in text
    assert asked[0]["report_crop"] == 64  # each photo cut to the page's crops as it is done: memory for one photo


def test_the_code_that_trained_and_that_evaluated_are_named(tmp_path, model_file, photos):
    """report said "trained by: not recorded" of a generator file that records its code; metrics.json named
    neither the training code nor the evaluating one."""
    from safetensors.torch import load_file, save_file

    from dist_dejpeg import code_version
    from dist_dejpeg.evaluation.evaluate import evaluate, markdown
    from dist_dejpeg.models.generator_file import load_model, read_metadata
    from dist_dejpeg.restore.restorer import Restorer

    path = tmp_path / "generator.safetensors"
    save_file(load_file(str(model_file)), str(path),
              {**read_metadata(model_file), "code": "dist_dejpeg 0.1.0 (93f4b62)"})
    assert load_model(path)[1]["code"] == "dist_dejpeg 0.1.0 (93f4b62)"  # what report shows as "trained by"
    result = evaluate(Restorer(str(path), tile=0), [str(photos / "chelsea.png")], [20], None, progress=False,
                      only=("psnr",))
    meta = result["meta"]
    assert meta["trained_by"] == "dist_dejpeg 0.1.0 (93f4b62)" and meta["evaluated_by"] == code_version()
    assert "trained by dist_dejpeg 0.1.0 (93f4b62)" in markdown(result)
    assert load_model(model_file)[1]["code"] == ""  # a file without it
    result["meta"]["trained_by"] = None
    assert "trained by not recorded" in markdown(result)
    # the file's metadata is anyone's text: no raw HTML from it in metrics.md (a wiki that renders it would run it)
    result["meta"]["trained_by"] = "<img src=x onerror=alert(1)>"
    result["meta"]["model"]["encoder"] = "resnet|<script>x</script>"
    text = markdown(result)
    assert "trained by &lt;img src=x onerror=alert(1)&gt;;" in text and "encoder resnet\\|&lt;script&gt;" in text
    assert "<img" not in text and "<script" not in text


def test_the_precision_restored_in_is_recorded_beside_the_device(tmp_path, model_file, photos):
    """meta recorded the device, tile and overlap but not the precision (bf16 or fp32: their numbers differ);
    now restore/record.restorer_settings' four, and metrics.md's "Restored on" line says it."""
    from dist_dejpeg.evaluation.evaluate import evaluate, markdown
    from dist_dejpeg.restore.restorer import Restorer

    result = evaluate(Restorer(str(model_file), tile=0, precision="fp32"), [str(photos / "chelsea.png")], [20], None,
                      progress=False, only=("psnr",))
    meta = result["meta"]
    assert (meta["device"], meta["precision"], meta["tile"]) == ("cpu", "fp32", 0)
    assert "Restored on cpu (fp32, tile 0, overlap " in markdown(result)
    del meta["precision"]  # a metrics.json written before it
    assert "Restored on cpu (tile 0, overlap " in markdown(result)


def _evaluate_cli(capsys, *args) -> tuple[int, str]:
    code = main(["evaluate", *args, "--quiet"])
    return code, capsys.readouterr().err


def test_an_image_too_small_to_measure_is_skipped_and_named(tmp_path, model_file, photos, capsys):
    """An image too small for SSIM, or one a --crop-border leaves nothing of, is skipped like a truncated file: listed
    with its path and reason in metrics.json and metrics.md and one console line each; the rest is measured. With
    nothing measurable left, the error names the reason and no empty output folder stays behind."""
    import shutil

    import skimage.data

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photos / "chelsea.png", folder / "chelsea.png")
    Image.fromarray(skimage.data.astronaut()[:12, :10]).save(folder / "tiny.png")
    data = (photos / "chelsea.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    code, err = _evaluate_cli(capsys, "--model", str(model_file), "--images", str(folder), "--qualities", "20",
                              "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert f"skipped: {folder / 'tiny.png'}: SSIM needs at least 11x11 pixels, got 12x10" in err.splitlines()
    assert any(line.startswith(f"skipped: {folder / 'cut.png'}: ") for line in err.splitlines()), err
    meta = json.loads((tmp_path / "out" / "metrics.json").read_text())["meta"]
    assert meta["images"] == 1 and len(meta["skipped"]) == 2 and any("tiny.png: SSIM" in s for s in meta["skipped"])
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "(2 skipped)" in md and f"- skipped: {folder / 'tiny.png'}: SSIM needs" in md
    # a border crop that leaves nothing of the small one: skipped, the other measured
    code, err = _evaluate_cli(capsys, "--model", str(model_file), "--images", str(folder / "tiny.png"),
                              str(folder / "chelsea.png"), "--qualities", "20", "--crop-border", "6",
                              "-o", str(tmp_path / "border"))
    assert code == 0 and "tiny.png: crop_border=6 leaves nothing of a 12x10 image" in err, err
    # nothing measurable: an error naming the file and the reason; the folders it made are gone again
    code, err = _evaluate_cli(capsys, "--model", str(model_file), "--images", str(folder / "tiny.png"),
                              "-o", str(tmp_path / "none" / "out"))
    assert code == 2 and err.splitlines()[-1] == (f"error: none of the 1 file(s) could be measured: "
                                                  f"{folder / 'tiny.png'}: SSIM needs at least 11x11 pixels, got 12x10")
    assert not (tmp_path / "none").exists()
    assert main(["report", "--model", str(model_file), "--images", str(folder / "tiny.png"), "--quiet",
                 "-o", str(tmp_path / "rp" / "c0" / "r.html")]) == 2
    assert "could be measured" in capsys.readouterr().err and not (tmp_path / "rp").exists()


def test_max_images_counts_only_measurable_images(tmp_path, model_file, photos, capsys):
    """--max-images N measures N images: one too small for the metrics is skipped before it is counted (it took
    a place, and `--max-images 1` over a folder that starts with a thumbnail measured nothing)."""
    import skimage.data

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(skimage.data.astronaut()[:12, :10]).save(folder / "a-thumb.png")  # first in the sorted order
    Image.fromarray(np.asarray(Image.open(photos / "chelsea.png"))).save(folder / "b-chelsea.png")
    Image.fromarray(np.asarray(Image.open(photos / "more" / "coffee.png"))).save(folder / "c-coffee.png")
    code, err = _evaluate_cli(capsys, "--model", str(model_file), "--images", str(folder), "--qualities", "20",
                              "--max-images", "1", "-o", str(tmp_path / "out"))
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "metrics.json").read_text())["meta"]
    assert meta["images"] == 1 and meta["skipped"] == [f"{folder / 'a-thumb.png'}: SSIM needs at least 11x11 "
                                                       f"pixels, got 12x10"]
    per_image = json.loads((tmp_path / "out" / "metrics.json").read_text())["per_image"]
    assert {row["image"] for row in per_image} == {"b-chelsea"}


def test_lpips_too_small_is_unmeasurable_not_a_crash():
    """AlexNet's features (LPIPS) need 31 pixels a side: a smaller image is Unmeasurable, with the reason."""
    from dist_dejpeg.evaluation.measure import MetricSet, Unmeasurable
    from dist_dejpeg.models.lpips import LPIPS

    metric = MetricSet(only=("psnr",))  # no download tried; then a random backbone (offline), enough for the sizes
    metric.lpips, _ = LPIPS(net="alex", pretrained=False), metric.unavailable.pop("lpips")
    img = np.random.default_rng(0).integers(0, 256, (31, 40, 3), dtype=np.uint8)
    assert metric(img, img[::-1].copy(), {})["lpips"] > 0
    with pytest.raises(Unmeasurable, match="LPIPS needs at least 31x31 pixels, got 30x40"):
        metric(img[:30], img[:30], {})


def test_lpips_offline_says_nothing_of_a_download_that_did_not_happen(tmp_path, monkeypatch, capsys):
    """Offline, torch.hub's 'Downloading: "https://..."' came first, as if the backbone were on its way, then
    the project's message that it is unavailable: only the reason is left. A download that succeeds leaves its
    note on stderr, never on stdout (where evaluate's results go)."""
    import torch
    import torchvision

    from dist_dejpeg.metrics.whole_image import load_lpips_metric

    def download(url, **kwargs):
        print(f'Downloading: "{url}" to {tmp_path}')
        if not online:
            raise OSError("Network is unreachable")
        return torchvision.models.alexnet().state_dict()

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # nothing in the cache
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    monkeypatch.setattr("dist_dejpeg.models.weights.no_download_from", lambda url: None)  # (the host answers)
    online = False
    model, reason = load_lpips_metric()
    captured = capsys.readouterr()
    assert model is None and "could not be downloaded" in reason
    assert "Downloading" not in captured.out + captured.err, captured
    online = True
    model, reason = load_lpips_metric()
    captured = capsys.readouterr()
    assert model is not None and not reason
    assert "Downloading" in captured.err and "Downloading" not in captured.out

def test_inputs_and_qualities_counted_once(tmp_path, model_file, photos):
    """A file named twice is read once; repeated qualities are measured once, in the order given; files of one name
    in two folders are told apart by their folders; NIQE left out is counted per image, its values said as such."""
    from dist_dejpeg.evaluation.evaluate import evaluate, markdown
    from dist_dejpeg.restore.restorer import Restorer

    refs, _ = read_references([str(photos / "chelsea.png"), str(photos), str(photos / "more" / ".." / "chelsea.png")])
    assert [r.name for r in refs] == ["chelsea", "coffee"]
    assert [r.source for r in refs] == [str(photos / "chelsea.png"), str(photos / "more" / "coffee.png")]
    import skimage.data

    for sub, rows in (("one", slice(0, 128)), ("two", slice(128, 256))):
        (tmp_path / sub).mkdir()
        Image.fromarray(skimage.data.astronaut()[rows, :128]).save(tmp_path / sub / "astro.png")
    refs, _ = read_references([str(tmp_path / "one"), str(tmp_path / "two")])
    assert [r.name for r in refs] == ["one/astro", "two/astro"]
    Image.fromarray(skimage.data.astronaut()[:128, 128:256]).save(tmp_path / "two" / "astro.tiff")
    refs, _ = read_references([str(tmp_path / "one"), str(tmp_path / "two")])
    assert [r.name for r in refs] == ["one/astro.png", "two/astro.png", "two/astro.tiff"]

    result = evaluate(Restorer(str(model_file), tile=0), [str(tmp_path / "one"), str(tmp_path / "one" / "astro.png")],
                      [20, 20, 10], None, progress=False, only=("psnr", "niqe"))
    assert result["meta"]["qualities"] == [20, 10] and list(result["per_quality"]) == ["20", "10"]
    assert [(r["image"], r["quality"]) for r in result["per_image"]] == [("astro", 20), ("astro", 10)]
    # 128 x 128 is below NIQE's two 96 x 96 blocks: 1 image, 4 values (JPEG and restored at 2 qualities)
    assert result["meta"]["undefined"]["niqe"] | {"reason": ""} == {"reason": "", "count": 4, "images": 1}
    assert result["meta"]["undefined"]["niqe"]["reason"].endswith("(e.g. 192x96 pixels)")  # no one image's size
    assert "- niqe: left out for 1 of 1 image(s) (4 values: JPEG and restored, at each quality)" in markdown(result)


def test_report_records_hold_no_full_size_image(tmp_path, model_file, photos):
    """The report kept every photo's full-size original, JPEG and restored image at every quality until the page
    was written (~180 MB per 12 MP photo at two qualities: a folder of camera photos ran out of memory). With
    report_crop each photo is cut to what the page shows as it is measured; the page is the same byte for byte."""
    from dist_dejpeg.evaluation.evaluate import evaluate
    from dist_dejpeg.evaluation.report import render_report
    from dist_dejpeg.restore.restorer import Restorer

    restorer = Restorer(str(model_file), tile=0)
    run = dict(keep_images=True, progress=False, only=("psnr", "ssim"))
    full = evaluate(restorer, [str(photos)], [10, 40], None, **run)["records"]
    cut = evaluate(restorer, [str(photos)], [10, 40], None, **run, report_crop=64)["records"]
    assert len(cut) == len(full) == 4
    assert not any(isinstance(v, np.ndarray) for r in cut for v in r.values())
    page = dict(title="t", meta={}, crop=64)
    assert render_report(cut, **page) == render_report(full, **page)


@pytest.mark.parametrize("args", [["report", "--crop", "0"], ["report", "--crop", "-3"],
                                  ["evaluate", "--max-images", "-1"], ["evaluate", "--crop-border", "-1"]])
def test_negative_sizes_refused_up_front(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as caught:
        main([args[0], "--model", "m", "--images", "x", "-o", str(tmp_path / "o" / "r.html"), *args[1:]])
    assert caught.value.code == 2 and f"argument {args[1]}: " in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_evaluate_into_a_run_folder_is_refused_and_the_runs_metrics_kept(tmp_path, model_file, photos, capsys):
    """-o at a training run's folder replaced its metrics.json (the final validation status reads) without a
    word, and status then showed evaluate's numbers as the run's; refused before any work, the file untouched. An
    evaluate folder is written again."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(model_file, run / "generator.safetensors")
    (run / "config.yaml").write_text("train: {}\n")
    (run / "metrics.json").write_text('{"final": "the run\'s own"}')
    args = ["evaluate", "--model", str(run), "--images", str(photos / "chelsea.png"), "--quality", "10", "--quiet"]
    assert main([*args, "-o", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run} is a training run's folder" in err and f"-o {run / 'evaluate'}" in err, err
    assert (run / "metrics.json").read_text() == '{"final": "the run\'s own"}' and not (run / "metrics.csv").exists()
    for _ in range(2):
        assert main([*args, "-o", str(run / "evaluate")]) == 0, capsys.readouterr().err
    (run / "evaluate" / "metrics.csv").unlink()  # an evaluate killed between its files: no run's folder
    assert main([*args, "-o", str(run / "evaluate")]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("out", ["r.png", "r", "r.html.txt"])
def test_report_page_not_named_html_is_a_usage_error(tmp_path, out, capsys):
    """-o r.png wrote the HTML page into r.png (an image viewer then fails on it): refused before any work."""
    with pytest.raises(SystemExit) as caught:
        main(["report", "--model", "m", "--images", "x", "-o", str(tmp_path / "o" / out)])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "argument -o/--out: the HTML page to write, a name ending in .html or .htm" in err
    assert not (tmp_path / "o").exists()


def test_report_says_what_the_guard_passed_through(tmp_path, model_file, photos, capsys):
    """A model whose validation measured gains up to q40 passes q95 through: the page says so for the quality and
    for the photo, as metrics.md does; q10 is restored."""
    import torch

    from dist_dejpeg.models.generator_file import load_generator

    guarded = tmp_path / "guarded.safetensors"
    save_generator(load_generator(model_file), ModelConfig(**TINY), guarded,
                   extra={"val_psnr_gain": json.dumps({"10": 0.5, "40": 0.2})})
    page = tmp_path / "r.html"
    with torch.inference_mode():
        code = main(["report", "--model", str(guarded), "--images", str(photos / "chelsea.png"), "--quiet",
                     "--qualities", "10", "95", "-o", str(page), "--crop", "32"])
    assert code == 0, capsys.readouterr().err
    text = page.read_text()
    assert ('<li class="pass" id="passed-q95">quality 95: 1 of 1 photo(s) passed through unchanged by the '
            "do-no-harm guard") in text and "passed-q10" not in text
    assert text.count('<span class="pass">passed through unchanged') == 1 and "restored (= JPEG)" in text
    assert "<th>do-no-harm guard</th><td>on</td>" in text
    assert "q95: 1 of 1 passed through unchanged" in (tmp_path / "r" / "metrics.md").read_text()


def test_the_restore_rate_counts_only_restored_images(tmp_path, model_file, photos):
    """metrics.md's "ms per megapixel" counted the megapixels of the images the guard passed through: ~2 ms per
    megapixel where every image passed through."""
    from safetensors.torch import load_file, save_file

    from dist_dejpeg.evaluation.evaluate import evaluate, markdown
    from dist_dejpeg.models.generator_file import read_metadata
    from dist_dejpeg.restore.restorer import Restorer

    guarded = tmp_path / "guarded.safetensors"  # validated gains up to q40: q95 passes through
    save_file(load_file(str(model_file)), str(guarded),
              {**read_metadata(model_file), "val_psnr_gain": json.dumps({"10": 0.5, "40": 0.2})})
    result = evaluate(Restorer(str(guarded), tile=0), [str(photos / "chelsea.png")], [95], None, progress=False,
                      only=("psnr",))
    assert result["per_quality"]["95"]["passed_through"] == 1
    assert result["meta"]["restore_ms_per_megapixel"] is None
    assert "nothing restored (every image passed through)." in markdown(result)


def test_images_the_model_trained_on_are_named_in_the_tables_and_the_report(tmp_path, sample_shards, capsys, caplog):
    """Evaluating on the run's own training shards (data/samples holds train and val shards side by side) gives
    gains the model's unseen photos never get: the tiles from shards its generator file names (by name and size) are
    counted and warned of in metrics.json, metrics.md, on the console and at the top of the report; validation
    shards, and another set's shard of the same name, are not."""
    import shutil

    import torch

    from dist_dejpeg.config import DataConfig
    from dist_dejpeg.data.shards import sample_photo
    from dist_dejpeg.models.generator_file import training_shards
    from dist_dejpeg.models.unet import build_generator

    torch.manual_seed(0)
    model = tmp_path / "generator.safetensors"
    save_generator(build_generator(ModelConfig(**TINY)), ModelConfig(**TINY), model,
                   extra=training_shards(DataConfig(root=str(sample_shards))))
    train, val = sorted(sample_shards.glob("train-*.tar"))[0], sorted(sample_shards.glob("val-*.tar"))[0]
    code = main(["evaluate", "--model", str(model), "--images", str(train), str(val), "--max-images", "20",
                 "--quality", "20", "-o", str(tmp_path / "eval"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    meta = json.loads((tmp_path / "eval" / "metrics.json").read_text())["meta"]
    assert meta["seen_in_training"] == {"images": 16, "shards": [train.name], "photos": []}  # 16 tiles, 4 from val
    assert any("16 of the 20 images are from shards the model trained on" in r.message for r in caplog.records)
    assert f"seen in training: 16 of the 20 images are from shards the model trained on ({train.name})" in \
        (tmp_path / "eval" / "metrics.md").read_text()
    # the photos the shards were cut from, as files of any name and lossless format: by their pixels
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(sample_photo("astronaut")).save(photos / "portrait.png")
    Image.fromarray(sample_photo("camera")).save(photos / "cameraman.tif")
    Image.fromarray(sample_photo("chelsea")).save(photos / "cat.png")  # a validation photo: never trained on
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned, shown upright (as prepare folder tiles it)
    Image.fromarray(np.rot90(sample_photo("brick"))).save(photos / "turned.png", exif=exif.tobytes())
    code = main(["evaluate", "--model", str(model), "--images", str(photos), "--quality", "20", "-o",
                 str(tmp_path / "eval3"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "eval3" / "metrics.json").read_text())["meta"]
    assert meta["seen_in_training"] == {"images": 3, "shards": [], "photos": ["astronaut", "brick", "camera"]}, meta
    assert "3 of the 4 images are photos the model trained on (astronaut, brick, camera)" in \
        (tmp_path / "eval3" / "metrics.md").read_text()

    code = main(["report", "--model", str(model), "--images", str(train), "--max-images", "2", "--quality", "20",
                 "-o", str(tmp_path / "report.html"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert 'id="seen-in-training-warning"' in (tmp_path / "report.html").read_text()

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(val, other / train.name)  # another set's shard with a training shard's name: not the same file
    for images in ([str(val)], [str(other / train.name)]):
        code = main(["evaluate", "--model", str(model), "--images", *images, "--max-images", "2", "--quality", "20",
                     "-o", str(tmp_path / "eval2"), "--quiet"])
        assert code == 0, capsys.readouterr().err
        assert json.loads((tmp_path / "eval2" / "metrics.json").read_text())["meta"]["seen_in_training"] == {}
        assert "seen in training" not in (tmp_path / "eval2" / "metrics.md").read_text()


def test_same_named_shards_of_two_folders_stay_two_in_the_training_record(tmp_path):
    """train_glob **/train-*.tar over partA/ and partB/ with the same file names: the generator file's record keys
    each shard by its path in data.root (it kept one of each name, so evaluate missed the other folder's training
    photos), evaluate matches either, and the validation fingerprint sees a change to either one."""
    import tarfile

    from dist_dejpeg.config import Config, DataConfig
    from dist_dejpeg.evaluation.references import Reference, seen_in_training
    from dist_dejpeg.models.generator_file import training_shards
    from dist_dejpeg.models.names import TRAIN_SHARDS
    from dist_dejpeg.train.data_checks import val_fingerprint

    for part, names in (("partA", range(4)), ("partB", range(2))):
        (tmp_path / "multi" / part).mkdir(parents=True)
        for i in names:
            for split in ("train", "val"):
                (tmp_path / "multi" / part / f"{split}-00000{i}.tar").write_bytes(f"{part} {split} {i}".encode())
    record = json.loads(training_shards(DataConfig(root=str(tmp_path), train_glob="**/train-*.tar"))[TRAIN_SHARDS])
    assert len(record) == 6 and "multi/partB/train-000000.tar" in record, record
    shard = tmp_path / "multi" / "partB" / "train-000001.tar"
    refs = [Reference("b1", f"{shard.name}:k", shard, tarfile.TarInfo("k.png"))]
    assert seen_in_training([str(shard)], refs, record) == {
        "images": 1, "shards": ["multi/partB/train-000001.tar"], "photos": []}
    assert seen_in_training([str(shard)], refs, {shard.name: "0:other"}) == {}  # an older file's name key
    old = {shard.name: record["multi/partB/train-000001.tar"]}  # older files keyed shards by file name: still read
    assert seen_in_training([str(shard)], refs, old) == {"images": 1, "shards": [shard.name], "photos": []}
    cfg = Config(data=DataConfig(root=str(tmp_path), val_glob="**/val-*.tar"))
    before = val_fingerprint(cfg)
    (tmp_path / "multi" / "partA" / "val-000000.tar").write_bytes(b"changed")
    assert val_fingerprint(cfg) != before


def test_shards_in_a_subfolder_keep_the_file_name_keys_older_runs_recorded(tmp_path):
    """data.val_glob val/val-*.tar (or an absolute glob to a scratch copy): the validation fingerprint and the
    training record key each shard by its file name, as every older checkpoint and generator file did (keyed by the
    path in data.root, every older run's resume said its validation set changed); only same-named shards differ."""
    import hashlib

    from dist_dejpeg.config import Config, DataConfig
    from dist_dejpeg.models.generator_file import training_shards
    from dist_dejpeg.models.names import TRAIN_SHARDS, shard_fingerprint
    from dist_dejpeg.train.data_checks import val_fingerprint

    (tmp_path / "val").mkdir()
    for i in range(2):
        (tmp_path / "val" / f"val-00000{i}.tar").write_bytes(f"val {i}".encode())
        (tmp_path / "val" / f"train-00000{i}.tar").write_bytes(f"train {i}".encode())
    d = DataConfig(root=str(tmp_path), val_glob="val/val-*.tar", train_glob="val/train-*.tar")
    old = {p.name: shard_fingerprint(p) for p in sorted((tmp_path / "val").glob("val-*.tar"))}  # as 247d930 keyed
    expected = hashlib.sha256(json.dumps([old, d.val_crop, list(d.val_qualities), d.val_max_images],
                                         sort_keys=True).encode()).hexdigest()[:16]
    assert val_fingerprint(Config(data=d)) == expected
    assert val_fingerprint(Config(data=DataConfig(root=str(tmp_path / "elsewhere"),  # a scratch copy's full path
                                                  val_glob=str(tmp_path / "val" / "val-*.tar")))) == expected
    assert sorted(json.loads(training_shards(d)[TRAIN_SHARDS])) == ["train-000000.tar", "train-000001.tar"]
    (tmp_path / "other").mkdir()  # a same-named shard of another folder: both named by their paths, two not one
    (tmp_path / "other" / "val-000000.tar").write_bytes(b"other")
    both = Config(data=DataConfig(root=str(tmp_path), val_glob="*/val-*.tar"))
    before = val_fingerprint(both)
    assert before != expected
    (tmp_path / "other" / "val-000000.tar").write_bytes(b"changed")
    assert val_fingerprint(both) != before


def test_a_quoted_glob_finds_upper_case_suffixes_as_a_folder_search_does(tmp_path):
    import skimage.data

    Image.fromarray(skimage.data.chelsea()[:64, :64]).save(tmp_path / "a.png")
    Image.fromarray(skimage.data.coffee()[:64, :64]).save(tmp_path / "IMG_0001.PNG")
    by_glob = read_references([str(tmp_path / "*.png")])[0]
    assert sorted(r.name for r in by_glob) == ["IMG_0001", "a"]
    assert sorted(r.name for r in read_references([str(tmp_path)])[0]) == ["IMG_0001", "a"]


def test_a_missing_path_is_said_as_missing_not_as_empty(tmp_path):
    """A misspelt --images said "no images or shards found in nothere/", as if the folder were there and empty."""
    from dist_dejpeg.evaluation.evaluate import EvaluateError

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    for images in ([str(tmp_path / "nothere")], [str(tmp_path / "a.png"), str(tmp_path / "nothere")]):
        with pytest.raises(EvaluateError, match=r"^no such file or folder: .*nothere$"):
            read_references(images)
    for images in ([str(tmp_path / "empty")], [str(tmp_path / "*.jpg")]):  # there, but nothing in it: as before
        with pytest.raises(EvaluateError, match="no images or shards found in"):
            read_references(images)


def test_a_grayscale_photo_is_measured_as_restore_writes_it(tmp_path, model_file):
    """A grayscale reference is compressed as a one-channel JPEG (as any tool saves a grayscale photo) and its
    restored image is what `restore` writes for one, the mean of the model's channels: evaluate measured the colour
    image the model returns instead, whose tint counted as error (0.5 dB here) though no user ever sees it."""
    import skimage.data
    from skimage.metrics import peak_signal_noise_ratio

    from dist_dejpeg.evaluation.evaluate import evaluate
    from dist_dejpeg.jpeg.consistency import conform_to_file
    from dist_dejpeg.restore.restorer import Restorer

    gray = skimage.data.camera()[100:260, 150:310]
    Image.fromarray(gray).save(tmp_path / "camera.png")
    restorer = Restorer(str(model_file), tile=0)
    result = evaluate(restorer, [str(tmp_path / "camera.png")], [20], None, keep_images=True, progress=False,
                      only=("psnr",))
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "JPEG", quality=20)
    jpeg = np.asarray(Image.open(buf))
    restored = restorer.restore_array(jpeg, 20, source="given")
    assert restored.ndim == 2  # restore's own answer for a grayscale image
    row, record = result["per_image"][0], result["records"][0]
    written = conform_to_file(np.repeat(restored[..., None], 3, axis=2), buf.getvalue())[0]  # as restore writes it
    assert np.array_equal(record["jpeg"][..., 0], jpeg) and np.array_equal(record["restored"], written)
    assert row["jpeg"]["psnr"] == pytest.approx(peak_signal_noise_ratio(gray, jpeg, data_range=255), abs=1e-9)
    assert row["restored"]["psnr"] == pytest.approx(peak_signal_noise_ratio(gray, written[..., 0], data_range=255),
                                                    abs=1e-9)
    # --y-only measured the three equal channels' BT.601 Y, 16 + 219/255 of the plane: +1.32 dB of PSNR, labelled Y
    y = evaluate(restorer, [str(tmp_path / "camera.png")], [20], None, y_only=True, progress=False, only=("psnr",))
    assert y["per_image"][0]["jpeg"]["psnr"] == pytest.approx(row["jpeg"]["psnr"], abs=1e-9)
    assert y["per_image"][0]["restored"]["psnr"] == pytest.approx(row["restored"]["psnr"], abs=1e-9)
    assert row["channel"] == "gray" and result["meta"]["grayscale_images"] == 1
    from dist_dejpeg.evaluation.evaluate import markdown

    assert "grayscale images on their single channel (1 of 1)" in markdown(y)
    assert "PSNR-B as KAIR/SwinIR calculate_psnrb" in markdown(y)  # the convention its PSNR-B compares with


def test_a_grayscale_pair_is_measured_on_its_plane_with_y_only():
    """The metrics processes' Measure of a grayscale photo's planes: on the plane, --y-only or not (the Y of its
    three equal channels is 16 + 219/255 of it), the colour columns on it as three equal channels."""
    import skimage.data

    from dist_dejpeg.evaluation.pairs import Measure, Pair, measure_pair
    from dist_dejpeg.metrics.fullref import psnr, psnr_b, ssim

    clean = skimage.data.camera()[:64, :72]
    rng = np.random.default_rng(0)
    jpeg = np.clip(clean + rng.normal(0, 6, clean.shape), 0, 255).astype(np.uint8)
    for y_only in (False, True):
        pair = Pair(Measure(y_only, 0, frozenset({"brisque", "niqe"})), jpeg, jpeg, clean)
        values = measure_pair(pair)["values"][0]
        assert values["psnr"] == psnr(jpeg, clean) and values["ssim"] == ssim(jpeg, clean)
        assert values["psnr_b"] == psnr_b(jpeg, clean)
        assert values["psnr_cb"] is None and values["shift_r"] == values["shift_g"]


def test_a_flat_image_identical_after_jpeg_leaves_both_means(tmp_path, model_file, photos):
    """A flat grey image survives JPEG exactly (PSNR inf): its JPEG value left the JPEG mean but its restored value
    stayed in the restored mean, so "restored - JPEG" mixed two image sets. Now both leave, the gain is the other
    photo's own gain, and the tables say why. metrics.json is strict JSON: its PSNR is null there, where it was
    written as Infinity, which jq and JavaScript's JSON.parse refuse."""
    import shutil

    from skimage.metrics import peak_signal_noise_ratio

    from dist_dejpeg.evaluation.evaluate import evaluate
    from dist_dejpeg.restore.restorer import Restorer

    shutil.copy(photos / "chelsea.png", tmp_path / "chelsea.png")
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(tmp_path / "blank.png")
    # (unguarded: the guard passes the flat image's exact JPEG through, its restored PSNR infinite too)
    result = evaluate(Restorer(str(model_file), tile=0, guard=False), [str(tmp_path)], [30], tmp_path / "out",
                      keep_images=True, progress=False, only=("psnr",))
    blank = next(r for r in result["per_image"] if r["image"] == "blank")
    assert blank["jpeg"]["psnr"] == float("inf") and np.isfinite(blank["restored"]["psnr"])
    rec = next(r for r in result["records"] if r["image"] == "chelsea")
    gain = (peak_signal_noise_ratio(rec["clean"], rec["restored"], data_range=255)
            - peak_signal_noise_ratio(rec["clean"], rec["jpeg"], data_range=255))
    assert result["per_quality"]["30"]["gain"]["psnr"] == pytest.approx(gain, abs=1e-9)
    assert "infinite" in result["meta"]["undefined"]["psnr"]["reason"]
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "- psnr: left out for 1 of 2 image(s)" in md and "the mean of per-image PSNRs" in md

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    written = json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=refuse)
    on_disk = next(r for r in written["per_image"] if r["image"] == "blank")
    assert on_disk["jpeg"]["psnr"] is None and on_disk["restored"]["psnr"] == blank["restored"]["psnr"]
    assert "infinite" in written["meta"]["undefined"]["psnr"]["reason"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "metrics.csv").read_text(encoding="utf-8-sig"))))
    assert float(next(r for r in rows if r["image"] == "blank" and r["input"] == "jpeg")["psnr"]) == float("inf")


def test_evaluate_of_only_flat_images_prints_na_instead_of_a_traceback(tmp_path, model_file, capsys):
    """Every image identical after JPEG (blank scans): the PSNR means are undefined, and the command's summary
    line says n/a where it raised a TypeError formatting None."""
    from dist_dejpeg.cli import main

    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(tmp_path / "white.png")
    code = main(["evaluate", "--model", str(model_file), "--images", str(tmp_path / "white.png"), "--quality", "30",
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    assert "q30: PSNR n/a -> n/a dB" in capsys.readouterr().out


class _KillThisProcess:
    """Stands in for a metrics process's Measure: the process dies as one killed for memory does."""

    skip = frozenset()

    def __call__(self, *args):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def test_metrics_processes_give_the_tables_of_one_process(tmp_path, model_file, photos, capsys, monkeypatch):
    """evaluate --workers: the metrics but LPIPS measured in processes (torch-free: they start without it) while
    this one restores the next photos. The same rows in the same order as in one process (BRISQUE's parallel sums
    round differently with another OpenMP team: 1e-13), a photo a metric cannot measure skipped as in one process,
    and a killed metrics process an error that names what was in progress, not a hang or a traceback."""
    import subprocess
    import sys

    import dist_dejpeg.evaluation.evaluate as evaluate_module
    import dist_dejpeg.evaluation.pairs as pairs
    from dist_dejpeg.evaluation.evaluate import evaluate
    from dist_dejpeg.evaluation.measure import MetricSet
    from dist_dejpeg.restore.restorer import Restorer

    real_map = evaluate_module.map_in_order
    code = "import sys, dist_dejpeg.evaluation.pairs, dist_dejpeg.run.pool; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    restorer = Restorer(str(model_file), tile=0)
    monkeypatch.setattr(pairs, "POOL_MIN_MEGAPIXELS", 0.0)  # (a pool for these small photos too)
    one, two = (evaluate(restorer, [str(photos)], [10, 40], None, progress=False, workers=w) for w in (1, 2))
    assert [(r["image"], r["quality"]) for r in two["per_image"]] == [(r["image"], r["quality"])
                                                                      for r in one["per_image"]]
    for a, b in zip(one["per_image"], two["per_image"]):
        for kind in ("jpeg", "restored"):
            assert b[kind].keys() == a[kind].keys() and b[kind]["lpips"] is a[kind]["lpips"] is None  # (offline)
            assert [b[kind][m] for m in a[kind] if m != "lpips"] == pytest.approx(
                [a[kind][m] for m in a[kind] if m != "lpips"], rel=1e-9), (kind, a, b)
    assert two["per_quality"]["10"]["images"] == 2 and two["meta"]["undefined"] == one["meta"]["undefined"]

    # a photo the metrics cannot measure (a ValueError where they run): skipped with the reason, the other measured
    real = pairs.Measure.__call__

    def fails_on_coffee(self, imgs, ref, undefined):
        if ref.shape[:2] == (200, 200) and ref[0, 0, 0] == coffee[0, 0, 0] and (ref == coffee).all():
            raise ValueError("no good")
        return real(self, imgs, ref, undefined)

    coffee = np.asarray(Image.open(photos / "more" / "coffee.png"))
    monkeypatch.setattr(pairs.Measure, "__call__", fails_on_coffee)
    result = evaluate(restorer, [str(photos)], [10, 40], None, progress=False, workers=1)
    assert [r["image"] for r in result["per_image"]] == ["chelsea", "chelsea"]
    assert result["meta"]["skipped"] == [f"{photos / 'more' / 'coffee.png'}: no good"]
    monkeypatch.undo()

    # a metrics process killed: an error naming the pairs in flight; the CLI says it, exit 2, no tables written
    monkeypatch.setattr(MetricSet, "measure", property(lambda self: _KillThisProcess()))
    monkeypatch.setattr(pairs, "POOL_MIN_MEGAPIXELS", 0.0)
    out = tmp_path / "killed"
    code = main(["evaluate", "--model", str(model_file), "--images", str(photos), "--qualities", "10",
                 "--workers", "2", "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "error: a metrics process ended abruptly (killed: out of memory?) while these were in " \
                         "progress: chelsea q10" in err and "no tables were written" in err, err
    assert "--workers (now 2)" in err and not out.exists()
    # less work than starting processes takes (0.16 megapixels of pairs here): measured in this process
    monkeypatch.undo()
    started = []
    monkeypatch.setattr(evaluate_module, "map_in_order", lambda *a, **k: started.append(a[2]) or real_map(*a, **k))
    evaluate(restorer, [str(photos)], [10, 40], None, progress=False, workers=8)
    assert started == [1]


def test_a_bad_lpips_weights_file_is_an_error_before_any_photo(tmp_path, model_file, photos, capsys):
    """--lpips-weights names a file: missing or not torch weights, evaluate stops with one line naming it (it
    left LPIPS out and exited 0, or ended in torch's unpickler traceback), and no output folder is left."""
    (tmp_path / "notes.pth").write_text("not weights")
    for name, says in (("nope.pth", "file not found"), ("notes.pth", "is not a torch weights file")):
        assert main(["evaluate", "--model", str(model_file), "--images", str(photos), "--qualities", "10", "-o",
                     str(tmp_path / "eval"), "--lpips-weights", str(tmp_path / name), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --lpips-weights: ") and says in err and "Traceback" not in err, err
    assert not (tmp_path / "eval").exists()


def test_a_stand_in_lpips_backbone_is_not_called_imagenet(tmp_path, model_file, photos, caplog):
    """--lpips-weights with random AlexNet weights under torchvision's name: metrics.json said "lpips-alex
    (ImageNet AlexNet backbone)"; now its meta names the file unverified, and a warning says it first."""
    from dist_dejpeg.bench.infer import save_stand_in_alexnet

    save_stand_in_alexnet(tmp_path / "alexnet-owt-7be5be79.pth")
    assert main(["evaluate", "--model", str(model_file), "--images", str(photos / "chelsea.png"), "--qualities", "10",
                 "-o", str(tmp_path / "eval"), "--lpips-weights", str(tmp_path / "alexnet-owt-7be5be79.pth"),
                 "--quiet", "--workers", "1"]) == 0
    meta = json.loads((tmp_path / "eval" / "metrics.json").read_text())["meta"]
    assert meta["lpips"].startswith("lpips-alex (UNVERIFIED backbone: alexnet-owt-7be5be79.pth is not torchvision's")
    assert "ImageNet" not in meta["lpips"] and "its values are not LPIPS's" in caplog.text
    assert f"- LPIPS: {meta['lpips']}" in (tmp_path / "eval" / "metrics.md").read_text()  # (the table says it too)
