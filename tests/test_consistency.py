"""A restored JPEG made consistent with its file (jpeg/consistency.py): each DCT coefficient put back inside the
quantization cell the file names. Photos from skimage; JPEGs written by Pillow's libjpeg."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from dist_dejpeg.jpeg.consistency import JPEGLIB_MISSING, NotConsistent, conform, conform_to_file, read_cells
from dist_dejpeg.jpeg.quality import dct_rows
from dist_dejpeg.metrics.fullref import psnr


def _jpeg(rgb: np.ndarray, quality: int, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, **options)
    return buf.getvalue()


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _blurred(rgb: np.ndarray) -> np.ndarray:
    """A restoration that went wrong: far smoother than the photo (a box blur of 5 x 5)."""
    a = np.pad(rgb.astype(np.float32), ((2, 2), (2, 2), (0, 0)), mode="edge")
    out = sum(a[i:i + rgb.shape[0], j:j + rgb.shape[1]] for i in range(5) for j in range(5)) / 25
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_the_coefficients_and_tables_read_decode_to_the_files_pixels():
    """The block order, the table order and the level shift as libjpeg's: the file's coefficients times its table,
    inverse transformed, give Pillow's decode of a grayscale JPEG to its 8-bit rounding (a transposed table or
    block would be far off)."""
    gray = skimage.data.camera()[:203, :317]
    data = _jpeg(gray, 40)
    (plane,) = read_cells(data).planes
    assert plane.coefficients.shape == (26, 40, 8, 8) and plane.factor == (1, 1)
    blocks = (plane.coefficients.reshape(-1, 64) * plane.table.reshape(64)) @ np.kron(dct_rows(), dct_rows()) + 128
    pixels = blocks.reshape(26, 40, 8, 8).transpose(0, 2, 1, 3).reshape(26 * 8, 40 * 8)[:203, :317]
    decoded = np.asarray(Image.open(io.BytesIO(data)), np.float32)
    assert np.abs(np.clip(pixels, 0, 255) - decoded).max() <= 1.5


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_a_wrong_restoration_is_pulled_towards_the_photo(subsampling):
    """Whatever the model made, the nearest image the file could have come from is nearer the photo: a
    blurred "restoration" of a 4:2:x JPEG of odd size gains dB once conformed, and its coefficients are back in
    the file's cells (the blur's were not)."""
    photo = skimage.data.astronaut()[5:262, 3:298]  # 257 x 295: partial blocks and chroma samples at both edges
    data = _jpeg(photo, 30, subsampling=subsampling)
    cells = read_cells(data)
    assert [p.factor for p in cells.planes] == [(1, 1)] + [{0: (1, 1), 1: (1, 2), 2: (2, 2)}[subsampling]] * 2
    wrong = _blurred(_decoded(data))
    fixed = conform(wrong, cells)
    assert fixed.shape == wrong.shape and fixed.dtype == np.uint8
    assert psnr(fixed, photo) > psnr(wrong, photo) + 1.5
    assert psnr(fixed, photo) > psnr(_decoded(data), photo) - 0.5  # back near the JPEG's own error

    def outside(image: np.ndarray) -> float:
        """The share of the luma coefficients more than 1 off their cell (the 8-bit rounding moves a few by less)."""
        (y,) = read_cells(_jpeg(image, 100, subsampling=0)).planes[:1]  # ~exact coefficients of the image
        (file_y,) = cells.planes[:1]
        coef, q = y.coefficients * y.table, file_y.table
        return float(np.mean(np.abs(coef - file_y.coefficients * q) > q / 2 + 1))

    assert outside(fixed) < 0.01 and outside(wrong) > 0.05


def test_the_blocks_the_edge_cuts_are_brought_into_their_cells_too():
    """A block the image's edge cuts is the encoder's of the image padded by its edge pixels: the padding's share of
    the projection is folded onto the pixels it repeats (it was cut off: such blocks stayed up to 3.7 steps outside
    at q90, 1.3 at q50; what is left is the 8-bit rounding of the few rows a block keeps, repeated by the padding).
Measured by an independent DCT (scipy's) of the padded image; the torch projection alike."""
    import torch
    from scipy.fft import dctn

    from dist_dejpeg.models.consistency import conform_batch

    gray = skimage.data.camera()[:203, :250]  # 203 x 250: a cut block row and column
    noise = np.random.default_rng(0).normal(0, 6, gray.shape + (3,))
    for quality, most in ((50, 0.8), (90, 2.5)):  # (before: 1.33 and 4.44 here)
        data = _jpeg(gray, quality)
        cells = read_cells(data)
        (plane,) = cells.planes
        fixed = conform(np.clip(_decoded(data) + noise, 0, 255).astype(np.uint8), cells)

        rows, cols = plane.coefficients.shape[:2]
        padded = np.pad(fixed[..., 0].astype(float) - 128, ((0, rows * 8 - 203), (0, cols * 8 - 250)), mode="edge")
        coef = dctn(padded.reshape(rows, 8, cols, 8).transpose(0, 2, 1, 3), axes=(2, 3), norm="ortho") / plane.table
        steps = np.maximum(np.abs(coef - plane.coefficients) - 0.5, 0).max(axis=(2, 3))
        assert steps[:-1, :-1].max() < 0.6 and max(steps[-1].max(), steps[:, -1].max()) < most, (quality, steps.max())
        noisy = torch.from_numpy(np.clip(_decoded(data) + noise, 0, 255).astype(np.uint8)).permute(2, 0, 1)[None]
        assert np.array_equal(conform_batch(noisy, [cells])[0].permute(1, 2, 0).numpy(), fixed)


def test_a_restoration_already_consistent_is_kept():
    """A restored image inside every cell is not moved (up to the 8-bit rounding and clipping): conforming twice
    is conforming once."""
    photo = skimage.data.chelsea()
    data = _jpeg(photo, 50)
    once = conform(_blurred(_decoded(data)), read_cells(data))
    diff = np.abs(conform(once, read_cells(data)).astype(int) - once)
    assert diff.mean() < 0.05 and np.mean(diff > 1) < 0.001, (diff.mean(), np.mean(diff > 1))


def test_orientation_and_sizes():
    """A camera JPEG stored sideways (EXIF orientation 6) is restored as displayed: conformed in the file's own
    orientation and turned back. An image of another size than the file's is refused, not conformed to the
    wrong blocks."""
    photo = skimage.data.coffee()[:200, :296]
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(photo, 30, exif=exif)
    shown = np.rot90(_blurred(_decoded(data)), -1)  # as displayed: turned clockwise
    fixed = conform(shown, read_cells(data), orientation=6)
    assert np.array_equal(fixed, np.rot90(conform(np.rot90(shown, 1), read_cells(data)), -1))
    assert psnr(fixed, np.rot90(photo, -1)) > psnr(shown, np.rot90(photo, -1)) + 1.5
    with pytest.raises(NotConsistent, match="296 x 200"):
        conform(shown, read_cells(data))  # orientation not applied: the sizes disagree


def test_grayscale_cmyk_and_no_jpeg(tmp_path):
    """A grayscale JPEG's one plane is the mean of the channels and comes back in all three; a CMYK JPEG or a
    PNG has no cells to use: said, and the image kept."""
    gray = skimage.data.camera()[:160, :200]
    data = _jpeg(gray, 20)
    wrong = np.repeat(_blurred(_decoded(data))[..., :1], 3, axis=2)
    fixed = conform(wrong, read_cells(data))
    assert (fixed[..., 0] == fixed[..., 1]).all() and (fixed[..., 1] == fixed[..., 2]).all()
    assert psnr(fixed[..., 0], gray) > psnr(wrong[..., 0], gray) + 1.0

    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).convert("CMYK").save(buf, format="JPEG", quality=50)
    same, why = conform_to_file(wrong, buf.getvalue())
    assert same is wrong and "a CMYK JPEG" in why
    png = tmp_path / "x.png"
    Image.fromarray(gray).save(png)
    same, why = conform_to_file(wrong, png)
    assert same is wrong and why.startswith("not made consistent with its JPEG data: its JPEG coefficients cannot")


def test_without_jpeglib_restore_keeps_the_models_image_and_says_so_once(monkeypatch, caplog):
    import dist_dejpeg.jpeg.consistency as consistency

    monkeypatch.setitem(sys.modules, "jpeglib", None)  # import jpeglib: ImportError
    monkeypatch.setattr(consistency, "_warned", [])
    data = _jpeg(skimage.data.chelsea()[:64, :64], 30)
    image = _decoded(data)
    with caplog.at_level(logging.WARNING, logger=consistency.__name__):
        for _ in range(3):
            same, why = conform_to_file(image, data)
            assert same is image and JPEGLIB_MISSING in why
    assert [r.getMessage() for r in caplog.records] == [JPEGLIB_MISSING]


def test_restore_says_jpeglib_is_missing_once_before_its_progress_bar(tmp_path, monkeypatch, capsys):
    """The warning was a log line glued to the progress bar (a user's walk): the command says it first, once."""
    import dist_dejpeg.jpeg.consistency as consistency
    from dist_dejpeg.cli import main

    from test_infer import TINY  # (a tiny generator file, as the guard tests build)
    from dist_dejpeg.config.schema import ModelConfig
    from dist_dejpeg.models.generator_file import save_generator
    from dist_dejpeg.models.unet import build_generator

    cfg = ModelConfig(**TINY)
    save_generator(build_generator(cfg).eval(), cfg, tmp_path / "generator.safetensors")
    (tmp_path / "photo.jpg").write_bytes(_jpeg(skimage.data.chelsea()[:64, :64], 30))
    monkeypatch.setitem(sys.modules, "jpeglib", None)
    monkeypatch.setattr(consistency, "_warned", [])
    code = main(["restore", str(tmp_path / "photo.jpg"), "-o", str(tmp_path / "out"), "--model",
                 str(tmp_path / "generator.safetensors")])
    err = capsys.readouterr().err
    assert code == 0 and err.startswith(f"warning: {JPEGLIB_MISSING}") and err.count("jpeglib is not installed") == 1
    monkeypatch.setattr(consistency, "_warned", [])  # --no-consistency: nothing read, nothing to say
    assert main(["restore", str(tmp_path / "photo.jpg"), "-o", str(tmp_path / "out2"), "--model",
                 str(tmp_path / "generator.safetensors"), "--no-consistency"]) == 0
    assert JPEGLIB_MISSING not in capsys.readouterr().err


def test_restore_and_the_api_write_the_consistent_image(tmp_path):
    """The command (restore_files) and the API (Restorer.restore of the opened file) both conform what the model
    returned; an array given to restore_array is the model's own (no file to conform it to)."""
    from types import SimpleNamespace

    from dist_dejpeg.restore.base import ImageRestorer
    from dist_dejpeg.restore.files import restore_files

    class Blurring(ImageRestorer):
        """The shared restorer surface (guard off) with a model that blurs: restore_array does the harm."""

        device = "cpu"

        def __init__(self):
            self.setup({}, tile=0, overlap=0, batch_size=1, guard=False)

        def restore_array(self, rgb, quality=None, source="given", conformed=False):
            self.last_decision = SimpleNamespace(passthrough=False, reason="blurs", quality=quality, source=source,
                                                 gain=None, jpeg_psnr=None)
            return _blurred(rgb)

        def conform(self, rgb, cells, orientation=1, half_width=0.5):  # the restorer's own (Restorer: on its GPU)
            self.conformed.append((orientation, half_width))
            return super().conform(rgb, cells, orientation, half_width)

    photo = skimage.data.astronaut()[:240, :320]
    src = tmp_path / "photo.jpg"
    src.write_bytes(_jpeg(photo, 25))
    restorer = Blurring()
    restorer.conformed = []
    (result,) = restore_files(restorer, [str(src)], tmp_path / "out", progress=False)
    assert result.error is None and result.note == "blurs" and restorer.conformed == [(1, 0.5)]
    written = np.asarray(Image.open(result.output).convert("RGB"))
    assert np.array_equal(written, conform(_blurred(_decoded(src.read_bytes())), read_cells(src)))
    assert psnr(written, photo) > psnr(_blurred(_decoded(src.read_bytes())), photo) + 1.5
    via_api = restorer.restore(Image.open(src))
    assert np.array_equal(np.asarray(via_api), written) and restorer.last_decision.reason == "blurs"
    assert len(restorer.conformed) == 2
    assert np.array_equal(restorer.restore_array(_decoded(src.read_bytes())), _blurred(_decoded(src.read_bytes())))


def test_the_final_validation_measures_the_consistent_gain_and_picks_each_qualitys_cell_width():
    """conformed_gains restores the validation crops and conforms them to their JPEG files (libjpeg's of the
    clean crops, as load_val_set's JPEGs are) at each half-width: for a blurring model far above its raw gain.
    guard_gains keeps, per quality, the half-width whose lower bound is highest (NaN loses, 0.5 wins a tie)."""
    import json
    import math

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from dist_dejpeg.data.images import jpeg_roundtrip
    from dist_dejpeg.jpeg.consistency import HALF_WIDTHS
    from dist_dejpeg.train.final import among, guard_gains
    from dist_dejpeg.train.validation import conformed_gains, validate

    class Blur(torch.nn.Module):
        def forward(self, x, quality=None):
            return torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)

    class NoLpips:
        def __call__(self, a, b):
            return torch.zeros(a.shape[0], device=a.device)

    crops = [skimage.data.astronaut()[:64, :64], skimage.data.coffee()[100:164, 200:264], skimage.data.chelsea()[:64, :64]]
    clean = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    val_set = {q: (torch.from_numpy(np.stack([jpeg_roundtrip(c, q) for c in crops])).permute(0, 3, 1, 2).contiguous(),
                   clean) for q in (10, 60)}
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True)
    raw = validate(acc, Blur(), val_set, NoLpips(), 2)
    conformed = conformed_gains(acc, Blur(), val_set, 2)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    for q in (10, 60):
        assert set(conformed[q]) == set(HALF_WIDTHS) and conformed[q][0.5]["count"] == 3
        # the crops conformed as one batch on the device: the numpy projection's gains, crop by crop
        blurred = Blur()(val_set[q][0].float() / 255).clamp(0, 1).mul(255).round().to(torch.uint8)
        for half in HALF_WIDTHS:
            gains = [psnr(conform(b, read_cells(_jpeg(c, q)), half_width=half), c) - psnr(j, c) for b, j, c in
                     zip(blurred.permute(0, 2, 3, 1).numpy(), val_set[q][0].permute(0, 2, 3, 1).numpy(), crops)]
            assert abs(conformed[q][half]["psnr"] - np.mean(gains)) < 0.005, (q, half, conformed[q][half], gains)
        assert conformed[q][0.5]["psnr"] > raw[f"q{q}"]["gain"]["psnr"] + 0.3, (q, conformed[q], raw[f"q{q}"]["gain"])
    meta = {k: json.loads(v) for k, v in guard_gains(raw, conformed).items()}
    for q in ("10", "60"):
        half = meta["cell_half_width"][q]
        lows = {h: among(s, len(HALF_WIDTHS)) for h, s in conformed[int(q)].items()}  # (a choice among three)
        assert lows[half] == max(lows.values()) == meta["val_psnr_gain_conformed_low"][q]
        assert lows[half] < conformed[int(q)][half]["psnr_low"] < conformed[int(q)][half]["psnr"]
        assert meta["val_psnr_gain_conformed"][q] == conformed[int(q)][half]["psnr"]
    tie = {20: {0.5: {"psnr": 1.0, "psnr_low": 0.2}, 0.35: {"psnr": 1.2, "psnr_low": 0.2},
                0.2: {"psnr": 2.0, "psnr_low": math.nan}}}
    assert json.loads(guard_gains(raw, tie)["cell_half_width"]) == {"20": 0.5}
    assert "cell_half_width" not in guard_gains(raw, None)  # jpeglib missing where it trained: the raw gains only


def test_the_best_of_the_half_widths_is_kept_as_surely_as_one_bound():
    """A model gaining nothing at every half-width (41 crops, the widths' gains correlated 0.9): the bound
    guard_gains keeps is above zero about as rarely as one width's own bound (~2.3 %); the best of the three raw
    bounds was, 1.5-2 times as often."""
    import json

    import torch

    from dist_dejpeg.jpeg.consistency import HALF_WIDTHS
    from dist_dejpeg.train.final import guard_gains
    from dist_dejpeg.train.validation import gain_summary

    rng = np.random.default_rng(0)
    trials, crops, rho = 3000, 41, 0.9
    gains = rho ** 0.5 * rng.standard_normal((trials, crops, 1)) + (1 - rho) ** 0.5 * rng.standard_normal(
        (trials, crops, len(HALF_WIDTHS)))
    summary = lambda g: gain_summary(torch.tensor([g.sum(), (g * g).sum(), len(g)], dtype=torch.float64))  # noqa: E731
    raw = {"q20": {"gain": {"psnr": 0.0, "psnr_low": -0.1}, "jpeg": {"psnr": 30.0}}}
    one = best_raw = kept = 0
    for trial in gains:
        widths = {h: summary(trial[:, j]) for j, h in enumerate(HALF_WIDTHS)}
        one += widths[HALF_WIDTHS[0]]["psnr_low"] > 0
        best_raw += max(s["psnr_low"] for s in widths.values()) > 0
        kept += json.loads(guard_gains(raw, {20: widths})["val_psnr_gain_conformed_low"])["20"] > 0
    assert 0.015 < one / trials < 0.035 and best_raw > 1.4 * one, (one, best_raw)
    assert kept <= one, (one, best_raw, kept)


def test_restore_judges_a_jpeg_by_the_gain_of_its_consistent_image(tmp_path):
    """A model file with both tables: a JPEG file (its cells read) is judged by the gains validation measured of
    its consistent image and conformed at the half-width of the nearest validated quality; a PNG of the same
    pixels (no cells) by the raw gains. Here q80 loses raw but gains made consistent."""
    import json

    import torch

    from dist_dejpeg.config.schema import ModelConfig
    from dist_dejpeg.models.unet import build_generator
    from dist_dejpeg.models.generator_file import save_generator
    from dist_dejpeg.restore.files import restore_files
    from dist_dejpeg.restore.restorer import Restorer

    torch.manual_seed(0)
    cfg = ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=16)
    path = tmp_path / "generator.safetensors"
    table = lambda d: json.dumps({str(k): v for k, v in d.items()})  # noqa: E731
    save_generator(build_generator(cfg).eval(), cfg, path, extra={
        "val_psnr_gain": table({10: 0.5, 80: -0.1}), "val_psnr_gain_low": table({10: 0.4, 80: -0.2}),
        "val_psnr_gain_conformed": table({10: 0.6, 80: 0.3}), "val_psnr_gain_conformed_low": table({10: 0.5, 80: 0.2}),
        "cell_half_width": table({10: 0.5, 80: 0.2})})
    restorer = Restorer(path, device="cpu", tile=0)
    assert restorer.decide(80).passthrough and restorer.decide(80).half_width is None
    assert not restorer.decide(80, conformed=True).passthrough and restorer.decide(80, conformed=True).half_width == 0.2
    assert restorer.decide(30, conformed=True).half_width == 0.5  # nearest validated: q10
    blind = Restorer(path, device="cpu", tile=0, guard=False).decide(None, conformed=True)
    assert not blind.passthrough and blind.half_width == 0.5  # no width was validated for an unknown quality

    photo = skimage.data.astronaut()[:96, :128]
    src, png = tmp_path / "in" / "photo.jpg", tmp_path / "in" / "photo_as.png"
    src.parent.mkdir()
    src.write_bytes(_jpeg(photo, 80))
    Image.fromarray(_decoded(src.read_bytes())).save(png)
    results = restore_files(restorer, [str(src), str(png)], tmp_path / "out", quality=80, progress=False)
    assert [r.passthrough for r in results] == [False, True], [r.note for r in results]
    assert results[0].note.endswith("made consistent with its file (cells of half-width 0.2)"), results[0].note
    model = restorer.restore_array(_decoded(src.read_bytes()), 80, conformed=True)
    expected = conform(model, read_cells(src), half_width=0.2)
    assert np.array_equal(np.asarray(Image.open(results[0].output).convert("RGB")), expected)

    # --no-consistency (restorer.consistent = False): the model's own image, judged by its own gains
    from dist_dejpeg.cli import main
    from dist_dejpeg.evaluation.evaluate import evaluate

    assert main(["restore", str(src), "-o", str(tmp_path / "plain.png"), "--model", str(path), "--input-quality",
                 "10", "--no-consistency", "--quiet"]) == 0
    plain = np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))
    assert np.array_equal(plain, restorer.restore_array(_decoded(src.read_bytes()), 10))
    Image.fromarray(photo).save(tmp_path / "ref.png")
    from dist_dejpeg.evaluation.evaluate import consistent_note

    calls, own = [], restorer.conform  # evaluate conforms with the restorer's own (a GPU Restorer's: on its GPU)
    restorer.conform = lambda *args: (calls.append(args[2:]), own(*args))[1]
    meta = evaluate(restorer, [str(tmp_path / "ref.png")], [10], None, progress=False, only=("psnr",))["meta"]
    assert consistent_note(meta) == "restored JPEGs made consistent with their files (cell half-widths q10 0.5, q80 0.2)"
    assert calls == [(1, 0.5)]
    del restorer.conform
    restorer.consistent = False
    meta = evaluate(restorer, [str(tmp_path / "ref.png")], [10], None, progress=False, only=("psnr",))["meta"]
    assert meta["consistent_with_file"] is False and "(--no-consistency)" in consistent_note(meta)
    restorer.consistent = True  # jpeglib missing: nothing was made consistent, and metrics.json says so
    import dist_dejpeg.jpeg.consistency as consistency

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "jpeglib", None)
        patch.setattr(consistency, "_warned", [])
        meta = evaluate(restorer, [str(tmp_path / "ref.png")], [10], None, progress=False, only=("psnr",))["meta"]
    assert meta["consistent_with_file"] is False


def test_the_api_conforms_only_an_image_that_is_still_its_files(tmp_path):
    """Restorer.restore(Image.open(path)) reads the cells of the file the image came from; an image edited in
    place since, turned in place (exif_transpose in_place: its orientation tag gone) or another frame is no longer
    the file's decode: restored as the model made it, and the decision says why. One untouched is conformed."""
    from types import SimpleNamespace

    from PIL import ImageDraw, ImageOps

    from dist_dejpeg.restore.images import file_cells

    photo = skimage.data.astronaut()[:96, :128]
    exif = Image.Exif()
    exif[0x0112] = 3
    src = tmp_path / "photo.jpg"
    src.write_bytes(_jpeg(photo, 30, exif=exif))
    untouched = Image.open(src)
    shown = np.asarray(ImageOps.exif_transpose(untouched).convert("RGB"))
    assert file_cells(untouched, rgb=shown)[0] is not None
    edited = Image.open(src)
    edited.load()
    ImageDraw.Draw(edited).rectangle([10, 10, 40, 40], fill=(255, 255, 255))
    cells, why = file_cells(edited, rgb=np.asarray(ImageOps.exif_transpose(edited).convert("RGB")))
    assert cells is None and "no longer the file's" in why
    turned = Image.open(src)
    ImageOps.exif_transpose(turned, in_place=True)
    assert file_cells(turned, rgb=np.asarray(turned.convert("RGB")))[0] is None
    assert file_cells(SimpleNamespace(format="JPEG", filename=str(src), tell=lambda: 1), rgb=shown)[1].endswith(
        "frame 1, not the file's first image")
    dotted = Image.open(src)  # a retouch of two pixels (a review's: pulled back to 134 of 255, said consistent)
    dotted.load()
    for xy in ((20, 30), (21, 30)):
        dotted.putpixel(xy, (255, 255, 255) if sum(dotted.getpixel(xy)) < 384 else (0, 0, 0))
    assert file_cells(dotted, rgb=np.asarray(ImageOps.exif_transpose(dotted).convert("RGB")))[0] is None


def _blurring():
    """A restorer (restore/base.py's, as both backends') whose restoration went wrong: _blurred, no guard."""
    from dist_dejpeg.restore.base import ImageRestorer

    class Blurring(ImageRestorer):
        device = "cpu"

        def __init__(self):
            self.setup({}, tile=0, overlap=0, batch_size=1, guard=False)

        def forward(self, batch, quality=None):
            return batch

        def restore_rgb(self, rgb, quality):
            return _blurred(rgb)

    return Blurring()


def test_the_api_reads_an_upload_and_says_when_a_converted_image_has_no_file(tmp_path):
    """An image opened from bytes (an upload) is made consistent as its file would be (the bytes Pillow holds
    until it loads); a converted copy has no file: restored as the model made it, and the decision says so."""
    data = _jpeg(skimage.data.astronaut()[:96, :128], 25)
    (tmp_path / "photo.jpg").write_bytes(data)
    restorer = _blurring()
    upload = np.asarray(restorer.restore(Image.open(io.BytesIO(data))))
    assert restorer.last_decision.reason.endswith("made consistent with its file (cells of half-width 0.5)")
    assert np.array_equal(upload, np.asarray(restorer.restore(str(tmp_path / "photo.jpg"))))
    converted = np.asarray(restorer.restore(Image.open(io.BytesIO(data)).convert("RGB")))
    assert np.array_equal(converted, _blurred(_decoded(data)))
    assert "a converted or copied image has none" in restorer.last_decision.reason


def test_the_api_takes_an_uploads_bytes_and_warns_of_an_image_that_lost_them(tmp_path):
    """bytes, a bytearray, a memoryview and a binary file object (an upload) are restored as their file is: quality
    from its tables, made consistent with it. A PIL image loaded from a BytesIO (.load(), np.asarray, ...) lost its
    bytes: restored as the model made it, with a warning and a reason that say what to give instead (the old words,
    "not opened from a file", were untrue and gave no remedy). Bytes that do not decode are refused as a file is."""
    from dist_dejpeg.restore.images import InputImageError

    data = _jpeg(skimage.data.astronaut()[:96, :128], 25)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    restorer = _blurring()
    expected = np.asarray(restorer.restore(str(path)))
    assert not np.array_equal(expected, _blurred(_decoded(data)))  # (made consistent: not the blur itself)
    with open(path, "rb") as opened:
        opened.read(7)  # (read from its start, as Image.open reads it)
        for upload in (data, bytearray(data), memoryview(data), io.BytesIO(data), opened):
            assert np.array_equal(np.asarray(restorer.restore(upload)), expected), type(upload).__name__
            decision = restorer.last_decision
            assert decision.quality == 25 and decision.source == "file tables", decision
            assert decision.reason.endswith("made consistent with its file (cells of half-width 0.5)")
    loaded = Image.open(io.BytesIO(data))
    loaded.load()
    with pytest.warns(UserWarning, match=r"bytes are gone .*give restore the bytes or the path, or the image befo"):
        assert np.array_equal(np.asarray(restorer.restore(loaded)), _blurred(_decoded(data)))
    assert "give restore the bytes" in restorer.last_decision.reason
    with pytest.raises(InputImageError, match=r"^image: cannot decode \(OSError: .*\); the file is cut short"):
        restorer.restore(data[:-300])
    with pytest.raises(InputImageError, match=r"^image: not an image PIL can read \(UnidentifiedImageError: [^<]*\)$"):
        restorer.restore(b"not an image")
    with open(path) as text, pytest.raises(TypeError, match="binary mode"):
        restorer.restore(text)


def test_a_jpeg_whose_name_is_no_utf8_is_made_consistent_through_its_bytes(tmp_path):
    """A Latin-1 name on Linux (b'caf\\xe9.jpg', a camera card or an old archive): jpeglib cannot open it (its name
    goes to libjpeg as UTF-8, a UnicodeEncodeError), so its bytes are read: made consistent, as its copy named in ASCII."""
    import os

    from dist_dejpeg.restore.images import load_image

    if sys.platform == "win32" or sys.getfilesystemencoding().lower() not in ("utf-8", "utf8"):
        pytest.skip("a name that is no UTF-8 needs a UTF-8 file system encoding (Linux)")
    data = _jpeg(skimage.data.coffee()[:64, :96], 20)
    latin = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.jpg"))
    latin.write_bytes(data)
    loaded = load_image(latin)
    assert loaded.cells is not None and loaded.cells_note == "", loaded.cells_note
    assert np.array_equal(loaded.cells.planes[0].coefficients, read_cells(data).planes[0].coefficients)


def test_stripes_arithmetic_coding_and_bytes_that_cannot_be_written(tmp_path, monkeypatch):
    """conform works a stripe of block rows at a time (its float copies stay small): the same pixels as in one
    stripe. An arithmetic-coded JPEG (Pillow reads it) has its cells read too. Bytes that cannot be written for
    jpeglib (a full disk) are a NotConsistent error, not an OSError that would stop a restore or a run."""
    import jpeglib

    import dist_dejpeg.jpeg.consistency as consistency

    photo = skimage.data.coffee()[:203, :301]
    data = _jpeg(photo, 20)
    wrong = _blurred(_decoded(data))
    striped = conform(wrong, read_cells(data))
    monkeypatch.setattr(consistency, "_STRIPE_BLOCKS", 1000)
    assert np.array_equal(conform(wrong, read_cells(data)), striped)

    arithmetic = tmp_path / "arith.jpg"
    jpeglib.version.set("9f")
    jpeglib.from_spatial(photo).write_spatial(str(arithmetic), qt=50, flags=["+ARITH_CODE"])
    assert Image.open(arithmetic).size == (301, 203)
    assert read_cells(arithmetic).planes[0].coefficients.shape[:2] == (26, 38)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(consistency.tempfile, "TemporaryDirectory", full)
    with pytest.raises(NotConsistent, match="No space left"):
        read_cells(data)


def test_a_cameras_mpo_in_a_folder_is_restored_consistent_and_stays_a_jpeg(tmp_path):
    """A camera's .mpo (a JPEG first picture, then more): a folder search found none (the suffix was not an
    image's); found now, restored from its first picture, made consistent with it, and `--format same` writes a
    .jpg (a JPEG named .mpo confused viewers; a PNG was written before)."""
    from dist_dejpeg.restore.files import restore_files

    first, second = skimage.data.astronaut()[:96, :128], skimage.data.coffee()[:96, :128]
    folder = tmp_path / "card"
    folder.mkdir()
    Image.fromarray(first).save(folder / "DSCF0001.MPO", format="MPO", save_all=True, quality=30,
                                append_images=[Image.fromarray(second)])
    assert Image.open(folder / "DSCF0001.MPO").format == "MPO"

    class Blurring:
        device, guard, gains = "cpu", False, {}

        def restore_array(self, rgb, quality=None, source="given", conformed=False):
            from types import SimpleNamespace

            self.last_decision = SimpleNamespace(passthrough=False, reason="blurs", quality=quality, source=source,
                                                 gain=None, jpeg_psnr=None, half_width=0.5 if conformed else None)
            return _blurred(rgb)

    (result,) = restore_files(Blurring(), [str(folder)], tmp_path / "out", fmt="same", progress=False)
    assert result.error is None and result.output.endswith("DSCF0001.jpg"), (result.error, result.output)
    with Image.open(folder / "DSCF0001.MPO") as mpo:
        cells, decoded = read_cells(folder / "DSCF0001.MPO"), np.asarray(mpo.convert("RGB"))
    assert Image.open(result.output).format == "JPEG"
    consistent = conform(_blurred(decoded), cells)
    written = np.asarray(Image.open(result.output).convert("RGB")).astype(int)
    assert np.abs(written - consistent).mean() < np.abs(written - _blurred(decoded)).mean()  # (a q95 re-encoding)



def test_clipped_graphics_are_brought_inside_both_sets_by_alternating(monkeypatch):
    """Where the decoder clipped (a black-and-white silhouette), the cells' image needs clipping to 0..255, which
    takes it out of its cells again: conform alternates the two projections (both sets hold the clean image), and
    gains dB over one round on the wrongly restored silhouette, its coefficients back inside their cells; on a photo
    that needs little clipping it changes next to nothing. The device version alternates the same way."""
    import torch

    import dist_dejpeg.jpeg.consistency as consistency
    from dist_dejpeg.models.consistency import conform_batch

    horse = np.stack([np.where(skimage.data.horse()[:200, :240], 255, 0).astype(np.uint8)] * 3, axis=-1)
    data = _jpeg(horse, 50)
    cells, wrong = read_cells(data), _blurred(_decoded(data))
    alternated = conform(wrong, cells)
    monkeypatch.setattr(consistency, "ROUNDS", 1)
    once = conform(wrong, cells)
    assert psnr(alternated, horse) > psnr(once, horse) + 1.0, (psnr(alternated, horse), psnr(once, horse))

    def outside(image: np.ndarray) -> float:
        """The share of the luma coefficients more than 1 off their cell (as test_a_wrong_restoration_...)."""
        (y,) = read_cells(_jpeg(image, 100, subsampling=0)).planes[:1]
        coef, q = y.coefficients * y.table, cells.planes[0].table
        return float(np.mean(np.abs(coef - cells.planes[0].coefficients * q) > q / 2 + 1))

    assert outside(alternated) < outside(once) / 2, (outside(alternated), outside(once))
    photo = skimage.data.chelsea()[:160, :200]
    pdata = _jpeg(photo, 30)
    pwrong = _blurred(_decoded(pdata))
    single = conform(pwrong, read_cells(pdata))
    monkeypatch.undo()
    assert abs(psnr(conform(pwrong, read_cells(pdata)), photo) - psnr(single, photo)) < 0.05
    batch = conform_batch(torch.from_numpy(wrong).permute(2, 0, 1)[None], [cells]).permute(0, 2, 3, 1)[0].numpy()
    diff = np.abs(batch.astype(np.int16) - alternated)
    assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())


def test_a_clipped_graphics_decode_is_still_its_files_own():
    """is_decode_of judges by one round of conform: a saturated silhouette's own decode (the decoder clipped it)
    passes at every quality, where the alternation's further rounds would move it by up to 75 levels and the API
    would leave such a graphic, the one that gains most, unconformed."""
    from dist_dejpeg.jpeg.consistency import is_decode_of

    horse = np.stack([np.where(skimage.data.horse()[:200, :240], 255, 0).astype(np.uint8)] * 3, axis=-1)
    for q in (5, 10, 50, 90):
        data = _jpeg(horse, q)
        assert is_decode_of(_decoded(data), read_cells(data)), q
    assert not is_decode_of(255 - _decoded(data), read_cells(data))  # (another image still is not)
