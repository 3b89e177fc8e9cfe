"""Restoring images: tiling and blending, the Python API, the `restore` command on folders with bad files in
them, and the bad-input matrix (each case: a clear error or a correct result, nothing lost)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dist_dejpeg.cli import main
from dist_dejpeg.config import Config, ModelConfig, to_yaml
from dist_dejpeg.models.generator_file import ModelFileError, load_model, save_generator
from dist_dejpeg.restore.images import InputImageError, load_image
from dist_dejpeg.restore.restorer import Restorer
from dist_dejpeg.restore.tiling import tile_starts
from dist_dejpeg.models.unet import build_generator

TINY = dict(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=16)


def _photo(h: int = 200, w: int = 168) -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[40:40 + h, 150:150 + w])


def _jpeg_bytes(rgb: np.ndarray, quality: int = 20, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def _checkpoint(folder: Path, model: nn.Module, step: int) -> Path:
    """A training checkpoint folder of ``model`` (TINY's config) at ``step``, as a run writes one: ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    cfg = Config()
    cfg.model = ModelConfig(**TINY)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def _model(seed: int = 0, norm: str = "group") -> nn.Module:
    """A tiny generator whose zero-initialised head is randomised, so its output depends on context."""
    torch.manual_seed(seed)
    g = build_generator(ModelConfig(**TINY, decoder_norm=norm))
    nn.init.normal_(g.head.weight, std=0.02)
    return g.eval()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "generator.safetensors"
    save_generator(_model(), ModelConfig(**TINY), path, extra={"global_step": 7, "lpips": "lpips-alex"})
    return path


class Pointwise(nn.Module):
    """A per-pixel model (no spatial context): tiled and whole-image outputs must agree exactly."""

    def forward(self, x):
        return (x * 0.8 + 0.1).clamp(0, 1)


def test_tile_starts_cover_the_axis_with_full_windows():
    for length, tile, overlap in [(100, 64, 16), (64, 64, 8), (30, 64, 8), (1000, 512, 64), (513, 512, 0)]:
        starts = tile_starts(length, tile, overlap)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + tile] = True
            assert s + min(tile, length) <= length
        assert covered.all() and starts[0] == 0


def test_blending_weights_normalise_at_2000x1500():
    """The restore_array path at the size the issue names: a per-pixel model gives exactly the whole-image
    result through overlapping tiles, so the weights sum correctly everywhere (corners, borders, seams)."""
    rgb = np.asarray(Image.fromarray(_photo()).resize((2000, 1500)))
    x = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)
    tiled = Restorer(Pointwise(), tile=512, overlap=64, batch_size=4, guard=False).restore_tensor(x)
    whole = Restorer(Pointwise(), tile=0, guard=False).restore_tensor(x)
    assert tiled.shape == x.shape and (tiled - whole).abs().max() < 1e-5
    assert (whole - x).abs().max() > 0.05  # restored, not passed through: the comparison is not vacuous
    out = Restorer(Pointwise(), tile=512, overlap=64, batch_size=3, guard=False).restore_array(rgb)
    assert out.shape == rgb.shape and np.abs(out.astype(int) - np.rint(whole.permute(1, 2, 0).numpy() * 255)).max() <= 1


def test_one_tiling_for_numpy_and_torch():
    """restore_tiled is one algorithm for both backends: on numpy arrays (onnxruntime) and torch tensors
    (PyTorch) the same windows, blend and band moves give the same rows; a per-pixel function comes back
    exactly, so the weights normalise, also where the last row of windows moves back over the band (300 rows,
    tile 128, overlap 48: starts 0, 80, 160, 172)."""
    from dist_dejpeg.restore.restorer import torch_arrays
    from dist_dejpeg.restore.tiling import NUMPY, restore_tiled

    assert tile_starts(300, 128, 48) == [0, 80, 160, 172]
    rgb = _photo(300, 280)

    def context(batch):  # depends on the window: tiles and blend matter
        return batch * 0.5 + batch.mean() * 0.5

    def run(forward, image, arrays):
        out, calls = np.zeros((3, 300, 280), np.float32), []

        def write(y0, y1, rows):
            calls.append((y0, y1))
            out[:, y0:y1] = rows.numpy() if isinstance(rows, torch.Tensor) else rows
        restore_tiled(forward, image, 128, 48, 3, write, arrays)
        assert calls[0][0] == 0 and calls[-1][1] == 300 and all(a[1] == b[0] for a, b in zip(calls, calls[1:]))
        return out

    chw = rgb.transpose(2, 0, 1)
    with torch.inference_mode():
        torch_out = run(context, torch.from_numpy(rgb).permute(2, 0, 1), torch_arrays(torch.device("cpu")))
    numpy_out = run(context, chw, NUMPY)
    assert np.abs(numpy_out - torch_out).max() < 1e-5
    assert np.abs(numpy_out - (chw / 255 * 0.5 + 0.25)).max() > 0.01  # windows differ: not trivially equal
    pointwise = run(lambda batch: batch * 0.8 + 0.1, chw, NUMPY)
    assert np.abs(pointwise - (chw.astype(np.float32) / 255 * 0.8 + 0.1)).max() < 1e-5


def test_tiled_matches_whole_image_on_a_real_photo():
    """The generator sees less context per tile; on a real photo the overlap-blended result stays within
    45 dB PSNR of the whole-image one (measured ~53 dB), and the overlap beats butting tiles together.
    A batch-norm decoder here: its output depends on the context alone. A group-norm decoder (the default)
    also normalises with each tile's own statistics, which random weights blow up (30 dB here); trained, the
    debug model's group-norm decoder restored a 1200 x 800 q10 photo in 256 px tiles 50.8 dB from its
    whole-image output, gaining 0.03 dB less (batch norm: 65 dB, 0.001 dB)."""
    rgb = _photo(224, 200)
    model = _model(norm="batch")
    whole = Restorer(model, tile=0, guard=False).restore_array(rgb).astype(np.float64)
    assert np.abs(whole - rgb).mean() > 1.0  # the model changes the image: the comparison is not vacuous

    def psnr(a):
        return 10 * np.log10(255.0 ** 2 / ((a.astype(np.float64) - whole) ** 2).mean())

    blended = psnr(Restorer(model, tile=128, overlap=32, guard=False).restore_array(rgb))
    butted = psnr(Restorer(model, tile=128, overlap=0, guard=False).restore_array(rgb))
    assert blended > 45.0, blended
    assert blended > butted, (blended, butted)


def test_python_api_keeps_kind_mode_and_alpha(model_file):
    restorer = Restorer(str(model_file), tile=0)
    assert restorer.info["global_step"] == 7 and restorer.info["encoder_init"] == "random init"
    rgb = _photo(64, 96)
    out = restorer.restore(rgb)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    alpha = np.tile(np.linspace(0, 255, 96).astype(np.uint8), (64, 1))
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    restored = restorer.restore(rgba)
    assert restored.mode == "RGBA" and np.array_equal(np.asarray(restored)[..., 3], alpha)
    gray = restorer.restore(Image.fromarray(rgb).convert("L"))
    assert gray.mode == "L" and gray.size == (96, 64)
    t = restorer.restore(torch.rand(3, 40, 50))
    assert t.shape == (3, 40, 50) and 0 <= t.min() and t.max() <= 1


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


RGB = None


def _rgb() -> np.ndarray:
    global RGB
    if RGB is None:
        RGB = _photo(72, 100)
    return RGB


def _cmyk() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb()).convert("CMYK").save(buf, format="JPEG", quality=30)
    return buf.getvalue()


def _rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    Image.fromarray(_rgb()).save(buf, format="JPEG", quality=40, exif=exif)
    return buf.getvalue()


def _animated() -> bytes:
    frames = [Image.fromarray(_rgb()).convert("P"), Image.fromarray(_rgb()[::-1]).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def _deep16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((20, 30)) * 65535).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


ALPHA = np.full((72, 100), 128, np.uint8)
# name -> (file bytes, check of the output image, or the words the error must contain)
CASES = {
    "good.jpg": (lambda: _jpeg_bytes(_rgb()), lambda im: im.size == (100, 72) and im.mode == "RGB"),
    "gray.jpg": (lambda: _jpeg_bytes(_rgb()[..., 0]), lambda im: im.mode == "L" and im.size == (100, 72)),
    "cmyk.jpg": (_cmyk, lambda im: im.mode == "RGB" and im.size == (100, 72)),
    "rgba.png": (lambda: _png(Image.fromarray(np.dstack([_rgb(), ALPHA]), "RGBA")),
                 lambda im: im.mode == "RGBA" and np.array_equal(np.asarray(im)[..., 3], ALPHA)),
    # quality unknown (never a JPEG): passed through, so the file itself, palette and all
    "palette.png": (lambda: _png(Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE)),
                    lambda im: im.mode == "P" and im.size == (100, 72)),
    "tiny.png": (lambda: _png(Image.fromarray(_rgb()[:1, :1])), lambda im: im.size == (1, 1)),
    "rotated.jpg": (_rotated, lambda im: im.size == (72, 100)),  # EXIF orientation applied
    "notes.jpg": (lambda: b"this is not an image\n", "not an image PIL can read"),
    "empty.png": (lambda: b"", "empty file (0 bytes)"),
    "truncated.jpg": (lambda: (data := _jpeg_bytes(_rgb()))[:len(data) // 2], "is cut short"),
    "deep16.png": (_deep16, "16-bit"),
    "animated.gif": (_animated, "an animated GIF (2 frames)"),  # one image written: the frames would be lost
}


@pytest.fixture(scope="module")
def restorer(model_file) -> Restorer:
    return Restorer(str(model_file), tile=64, overlap=16)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_matrix(tmp_path, restorer, name):
    """Each odd input: a correct result (size, mode, alpha, orientation) or a clear error; never a crash."""
    from dist_dejpeg.restore.files import restore_files

    make, expect = CASES[name]
    src = _write(tmp_path / "in" / name, make())
    (result,) = restore_files(restorer, [str(src)], tmp_path / "out", progress=False)
    if isinstance(expect, str):
        assert result.output is None and expect in result.error, result.error
        assert not (tmp_path / "out" / Path(name).with_suffix(".png")).exists()
    else:
        assert result.error is None, result.error
        assert expect(Image.open(result.output))


def test_restore_folder_with_bad_files(tmp_path, model_file, capsys):
    """A folder (recursive) with every case in it: the good ones restored, every bad one reported with its
    reason at the end, exit status 1; the run never stops at the first failure and leaves no temporaries."""
    src = tmp_path / "in"
    for name, (make, _) in CASES.items():
        _write(src / ("sub" if name.startswith("g") else "") / name, make())
    (src / "README.txt").write_text("not an image suffix: ignored in a folder")
    out = tmp_path / "out"
    code = main(["restore", str(src), "-o", str(out), "--model", str(model_file), "--quiet", "--tile", "64",
                 "--overlap", "16"])
    err = capsys.readouterr()
    bad = [n for n, (_, e) in CASES.items() if isinstance(e, str)]
    assert code == 1
    # written: restored, or passed through unchanged (a PNG that never was a JPEG: quality unknown, guard on)
    counts = re.match(r"restored (\d+) image\(s\).*?(?:passed (\d+) through unchanged; )?(\d+) failed", err.out)
    assert counts, err.out
    assert int(counts[1]) + int(counts[2] or 0) == len(CASES) - len(bad) and int(counts[3]) == len(bad), err.out
    for name in bad:
        assert f"{name}:" in err.err, name
    assert f"failed: {src / 'notes.jpg'}: not an image PIL can read" in err.err  # the file named once
    assert (out / "sub" / "good.png").is_file() and (out / "rgba.png").is_file()
    assert not list(out.rglob(".*tmp*"))  # atomic writes leave no temporaries


def test_restore_glob_and_all_good_exit_zero(tmp_path, model_file, capsys):
    rgb = _photo(64, 64)
    for i in range(2):
        _write(tmp_path / "in" / f"p{i}.jpg", _jpeg_bytes(rgb, 10 + 10 * i))
    code = main(["restore", str(tmp_path / "in" / "*.jpg"), "-o", str(tmp_path / "out"), "--model",
                 str(tmp_path / "model_missing"), "--quiet"])
    assert code == 2 and "no such file" in capsys.readouterr().err
    code = main(["restore", str(tmp_path / "in" / "*.jpg"), "-o", str(tmp_path / "out"), "--model",
                 str(model_file), "--quiet"])
    assert code == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0.png", "p1.png",
                                                                                  "restore-record.jsonl"]


def test_refuses_to_overwrite_an_input(tmp_path, model_file, capsys):
    src = _write(tmp_path / "photo.png", _png(Image.fromarray(_photo(64, 64))))
    before = src.read_bytes()
    code = main(["restore", str(src), "-o", str(tmp_path), "--model", str(model_file), "--quiet"])
    assert code == 1 and "refusing to overwrite an input" in capsys.readouterr().err
    assert src.read_bytes() == before
    # an output file that is the input: --suffix (for an output folder) is no way out, another name is
    code = main(["restore", str(src), "-o", str(src), "--model", str(model_file), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "(give another output file name, or an output folder)" in err and "--suffix" not in err, err
    assert src.read_bytes() == before
    # an output path that names the input's file by another name: on a case-insensitive disk (macOS, Windows)
    # out/a.png of a.PNG is the input; a hard link is such a name here
    jpeg = _write(tmp_path / "in" / "a.jpg", _jpeg_bytes(_photo(64, 64), 20))
    (tmp_path / "out").mkdir()
    os.link(jpeg, tmp_path / "out" / "a.png")
    jpeg_bytes = jpeg.read_bytes()
    code = main(["restore", str(jpeg), "-o", str(tmp_path / "out"), "--model", str(model_file), "--quiet"])
    assert code == 1 and "refusing to overwrite an input" in capsys.readouterr().err
    assert jpeg.read_bytes() == (tmp_path / "out" / "a.png").read_bytes() == jpeg_bytes


def test_unwritable_output_folder_fails_before_any_work(tmp_path, model_file, capsys):
    """An output 'folder' below a regular file cannot be created, whatever the user's rights (root included)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    src = _write(tmp_path / "in.jpg", _jpeg_bytes(_photo(64, 64)))
    code = main(["restore", str(src), "-o", str(blocker / "out"), "--model", str(model_file), "--quiet"])
    assert code == 2 and "not writable" in capsys.readouterr().err


def test_an_output_file_restore_cannot_write_is_refused_not_made_a_folder(tmp_path, model_file, capsys):
    src = _write(tmp_path / "in.jpg", _jpeg_bytes(_photo(64, 64)))
    for name in ("out.bmp", "out.gif"):
        code = main(["restore", str(src), "-o", str(tmp_path / name), "--model", str(model_file), "--quiet"])
        assert code == 2 and f"restore cannot write {name[3:]} files" in capsys.readouterr().err
        assert not (tmp_path / name).exists()


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    src = _write(tmp_path / "big.png", _png(Image.new("RGB", (300, 200))))
    bomb = r"0\.06 megapixels is over the limit of 0\.05 megapixels \(50000 pixels"  # (--max-pixels is in pixels)
    with pytest.raises(InputImageError, match=bomb):
        load_image(src, max_pixels=50_000)
    assert load_image(src, max_pixels=60_000).rgb.shape == (200, 300, 3)
    assert "of 0.001 " in str(pytest.raises(InputImageError, load_image, src, max_pixels=1000).value)
    with warnings.catch_warnings():  # over PIL's own limit too: its warning is not shown beside the error
        warnings.simplefilter("error")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
        with pytest.raises(InputImageError, match="over the limit of 0.04 "):
            load_image(src, max_pixels=40_000)


def test_model_that_is_not_a_generator(tmp_path, capsys):
    from safetensors.torch import save_file

    plain = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    text = tmp_path / "model.safetensors"
    text.write_text("hello")
    for bad in (plain, text, tmp_path):
        code = main(["restore", str(plain), "-o", str(tmp_path / "o"), "--model", str(bad), "--quiet"])
        assert code == 2
    err = capsys.readouterr().err
    assert "not a dist_dejpeg generator" in err and "not a safetensors file" in err
    assert "neither generator.safetensors nor checkpoints" in err


def test_model_with_an_encoder_timm_does_not_have(tmp_path):
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good.safetensors"
    save_generator(_model(), ModelConfig(**TINY), good)
    from dist_dejpeg.models.generator_file import read_metadata

    meta = read_metadata(good)
    cfg = json.loads(meta["model"])
    cfg["encoder"] = "mobilenetv9_from_the_future"
    meta["model"] = json.dumps(cfg)
    odd = tmp_path / "future.safetensors"
    save_file(load_file(str(good)), str(odd), metadata=meta)
    with pytest.raises(ModelFileError, match="cannot be built by the installed timm"):
        load_model(odd)
    cfg["encoder"] = "mobilenetv3_small_100"  # exists, but the weights do not fit it
    meta["model"] = json.dumps(cfg)
    save_file(load_file(str(good)), str(odd), metadata=meta)
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model(odd)


def test_load_model_from_run_and_checkpoint_folders(tmp_path, model_file, capsys):
    """A run folder with generator.safetensors; a checkpoint folder (model.safetensors + config.yaml, as
    accelerate's save_state and the trainer write them); a run folder holding only checkpoints (restore says
    which one it took)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "generator.safetensors").write_bytes(model_file.read_bytes())
    _, info = load_model(run)
    assert info["format"] == "generator.safetensors" and info["global_step"] == 7

    model = _model(seed=1)
    ckpt = _checkpoint(tmp_path / "run2" / "checkpoints" / "step-00000012", model, 12)
    for where in (ckpt, tmp_path / "run2"):
        loaded, info = load_model(where)
        assert info["format"] == "checkpoint" and info["global_step"] == 12
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
    # restore with the run folder: it says which checkpoint it took, and that a newer one is incomplete
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "p.jpg", quality=30)
    (tmp_path / "run2" / "checkpoints" / "step-00000020").mkdir()
    (tmp_path / "run2" / "checkpoints" / "step-00000020" / "trainer_state.json").write_text("{}")  # no weights
    from dist_dejpeg.cli import main

    assert main(["restore", str(tmp_path / "p.jpg"), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "run2"),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"note: restoring with {ckpt} (the run has no generator file yet" in err
    assert "the newer step-00000020 is incomplete" in err


def test_a_damaged_checkpoint_named_is_a_model_file_error_not_a_traceback(tmp_path, capsys):
    """A checkpoint folder whose weights were cut short (a full disk, a copy killed) or whose trainer_state.json is
    damaged: safetensors' and json's raw errors escaped load_model (a traceback, exit 1 from restore and export)."""
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "step-00000012", _model(), 12)
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(ModelFileError, match="step-00000012: a damaged checkpoint .*name an older checkpoint"):
        load_model(ckpt)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "p.jpg", quality=30)
    assert main(["restore", str(tmp_path / "p.jpg"), "-o", str(tmp_path / "out"), "--model", str(ckpt)]) == 2
    assert "a damaged checkpoint" in capsys.readouterr().err
    (ckpt / "model.safetensors").write_bytes(weights)
    (ckpt / "trainer_state.json").write_text('{"global_st')
    with pytest.raises(ModelFileError, match=r"trainer_state.json: not a JSON object \(damaged\)"):
        load_model(ckpt)


def test_a_newer_checkpoint_completed_after_loading_is_not_called_incomplete(tmp_path, monkeypatch, capsys):
    """restore --model RUN on a live run: the note named the newest checkpoint at the time of saying "incomplete",
    though it was one the run completed after the model was read. Said as what it is now."""
    import shutil


    import dist_dejpeg.restore as restore_api
    from dist_dejpeg.cli import main

    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "step-00000012", _model(seed=1), 12)
    real_open = restore_api.open_restorer

    def open_then_the_run_saves(*args, **kwargs):
        restorer = real_open(*args, **kwargs)
        shutil.copytree(ckpt, ckpt.parent / "step-00000020")  # the live run's next save, complete
        return restorer

    monkeypatch.setattr(restore_api, "open_restorer", open_then_the_run_saves)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "p.jpg", quality=30)
    assert main(["restore", str(tmp_path / "p.jpg"), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "run"),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"note: restoring with {ckpt} (" in err and "incomplete" not in err, err
    assert "the newer step-00000020 was completed after it was read" in err, err


def test_a_checkpoint_pruned_while_it_is_read_gives_way_to_the_newer_one(tmp_path, monkeypatch, capsys):
    """evaluate --model RUN on a live run (train.keep_last=1) failed 2 times in 4 with a FileNotFoundError traceback
    (exit 1): the newest checkpoint, chosen, was pruned after the next save before its files were read. A run
    folder's newest is read again as the then-newest; a checkpoint folder the user named is a one-line error."""

    from dist_dejpeg.models import generator_file

    root = tmp_path / "run" / "checkpoints"
    old, new = _checkpoint(root / "step-00000012", _model(seed=1), 12), root / "step-00000014"
    real = generator_file.load_file

    def saved_and_pruned(path, *args, **kwargs):  # the next save, then keep_last's pruning, as the weights are read
        if Path(path).parent == old and old.is_dir():
            shutil.copytree(old, new)
            (new / "trainer_state.json").write_text(json.dumps({"global_step": 14}))
            shutil.rmtree(old)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(generator_file, "load_file", saved_and_pruned)
    _, info = load_model(tmp_path / "run")
    assert info["source"] == str(new) and info["global_step"] == 14
    shutil.move(new, old)  # named, the same: not another checkpoint in its place
    with pytest.raises(ModelFileError, match="removed while it was read .*keep_last pruning.*name a newer"):
        load_model(old)
    shutil.move(new, old)  # the command: exit 2, one line
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "p.jpg", quality=30)
    assert main(["restore", str(tmp_path / "p.jpg"), "-o", str(tmp_path / "out"), "--model", str(old),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {old}: the checkpoint was removed while it was read") and "Traceback" not in err


@pytest.mark.gpu
def test_restore_on_cuda_in_bf16_matches_cpu_fp32():
    """Device auto picks CUDA and bf16 autocast; tiles in batches; the result stays within 35 dB PSNR of the
    CPU fp32 one (bf16 has 8 bits of mantissa) on a real photo."""
    rgb = _photo(224, 200)
    model = _model()
    cpu = Restorer(model, device="cpu", tile=128, overlap=32).restore_array(rgb).astype(np.float64)
    restorer = Restorer(model, device="auto", tile=128, overlap=32, batch_size=3)
    assert restorer.device.type == "cuda" and restorer.bf16
    gpu = restorer.restore_array(rgb).astype(np.float64)
    psnr = 10 * np.log10(255.0 ** 2 / max(((gpu - cpu) ** 2).mean(), 1e-12))
    print(f"restore cuda bf16 vs cpu fp32: {psnr:.1f} dB")
    assert psnr > 35.0, psnr


def test_an_image_reads_one_flag_back_whatever_its_bands():
    """Issue 24, restore at the GPU's speed: the finite check of each band of tiles stays on the device and is read
    once per image (a read per band would make the host wait for the GPU between bands), checked on the CPU with
    the profiler on an image of several bands."""
    from torch.profiler import profile

    restorer = Restorer(_model(), device="cpu", tile=64, overlap=16, guard=False)
    rgb = _photo(200, 168)
    x = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)
    bands = []
    restorer.restore_tiled(x, 20, lambda y0, y1, rows: bands.append((y0, y1)))
    assert len(bands) >= 3, bands
    for restore in (lambda: restorer.restore_tensor(x, 20), lambda: restorer.restore_array(rgb, 20)):
        with profile() as prof:
            restore()
        reads = [e.name for e in prof.events() if e.name in ("aten::item", "aten::is_nonzero", "aten::nonzero")]
        assert reads.count("aten::is_nonzero") == 1 and reads.count("aten::item") <= 1, reads


@pytest.mark.gpu
def test_a_tensor_on_the_gpu_is_restored_there():
    """Issue 24, restore at the GPU's speed: a float tensor already on the restorer's GPU comes back on that GPU
    (never through the host), with the same pixels as the same tensor given from the CPU, which still comes back
    on the CPU; a passed-through one stays where it was too."""
    x = torch.from_numpy(_photo(224, 200).astype(np.float32) / 255).permute(2, 0, 1)
    restorer = Restorer(_model(), device="cuda", tile=128, overlap=32, precision="fp32", guard=False)
    on_gpu = restorer.restore_tensor(x.cuda())
    from_cpu = restorer.restore_tensor(x)
    assert on_gpu.device.type == "cuda" and from_cpu.device.type == "cpu" and on_gpu.shape == x.shape
    assert torch.allclose(on_gpu.cpu(), from_cpu, atol=1e-4)  # (eager, then a captured graph: cuDNN may pick anew)
    assert not torch.allclose(from_cpu, x, atol=1e-3)  # restored, not passed through
    guarded = Restorer(_model(), device="cuda", tile=128, overlap=32)
    passed = guarded.restore_tensor(x.cuda(), None)  # unknown quality: passed through
    assert guarded.last_decision.passthrough and passed.device.type == "cuda" and torch.equal(passed.cpu(), x)



@pytest.mark.gpu
def test_a_uint8_tensor_on_the_gpu_needs_no_more_gpu_memory_than_its_array():
    """A uint8 tensor on the GPU goes through the tiling as uint8 (filled-up batches, CUDA graphs): the pixels of
    its float copy (/ 255) rounded, within a level, and a peak of GPU memory no higher than restore_array's, which
    uploads the image and its output as uint8 (whole float copies in and out were 12 bytes a pixel more)."""
    rgb = np.ascontiguousarray(np.tile(_photo(256, 256), (4, 4, 1)))  # 1024 x 1024
    x = torch.from_numpy(rgb).permute(2, 0, 1).cuda()
    restorer = Restorer(_model(), device="cuda", tile=128, overlap=32, precision="fp32", guard=False)
    for _ in range(2):  # the first call of a shape runs eagerly, the second captures its graph
        got = restorer.restore_tensor(x, 20)
    assert got.dtype == torch.uint8 and got.device.type == "cuda" and restorer.graphs
    floats = restorer.restore_tensor(x.float() / 255, 20).mul(255).round().clamp(0, 255).byte()
    assert (got.int() - floats.int()).abs().max() <= 1 and (got.int() - x.int()).abs().max() > 10
    peaks = []
    for restore in (lambda: restorer.restore_array(rgb, 20), lambda: restorer.restore_tensor(x, 20)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        restore()
        peaks.append(torch.cuda.max_memory_allocated() - start)
    assert peaks[1] <= peaks[0], peaks

# -- quality and doing no harm -------------------------------------------------------------------------------
GAINS = {10: 0.6, 20: 0.3, 40: 0.1, 60: -0.2}


@pytest.fixture(scope="module")
def guarded_file(tmp_path_factory) -> Path:
    """A quality-conditioned generator whose file says what validation measured at 10, 20, 40 and 60."""
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, quality_conditioning=True)
    g = build_generator(cfg)
    nn.init.normal_(g.head.weight, std=0.02)
    nn.init.normal_(g.film.heads.weight, std=0.2)
    path = tmp_path_factory.mktemp("guarded") / "generator.safetensors"
    save_generator(g.eval(), cfg, path, extra={"global_step": 9, "val_psnr_gain": json.dumps(GAINS)})
    return path


def test_an_unknown_quality_s_reason_says_how_its_caller_gives_one(guarded_file, tmp_path, capsys):
    """restore_array(..., quality=None) passed through "...; give --input-quality Q to restore it as quality Q":
    a flag of the command line, no advice in Python. The API's reason says quality=Q, restore's command line
    (its per-image line) --input-quality Q."""
    from dist_dejpeg.restore.files import restore_files

    restorer = Restorer(guarded_file, device="cpu", tile=0)
    rgb = _photo(48, 64)
    assert np.array_equal(restorer.restore_array(rgb, quality=None), rgb)
    reason = restorer.last_decision.reason
    assert "give quality=Q to restore it as quality Q" in reason and "--input-quality" not in reason
    assert "quality=Q" in restorer.decide(None).reason
    Image.fromarray(rgb).save(src := tmp_path / "p.png")  # never a JPEG: quality unknown
    [result] = restore_files(restorer, [str(src)], tmp_path / "api", progress=False)
    assert result.passthrough and "give quality=Q" in result.note, result
    assert main(["restore", str(src), "-o", str(tmp_path / "cli"), "--model", str(guarded_file), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "give --input-quality Q to restore it as quality Q" in out and "quality=Q" not in out, out


def test_guard_passes_through_where_validation_predicts_no_gain(guarded_file):
    restorer = Restorer(guarded_file, device="cpu", tile=0)
    assert restorer.conditioned and restorer.gains == GAINS
    rgb = _photo(64, 96)
    # q45: +0.025 dB interpolated, but between a gain (q40) and a loss (q60): passed through
    for q, passes in ((10, False), (30, False), (45, True), (50, True), (60, True), (80, True), (5, False)):
        out = restorer.restore_array(rgb, q)
        d = restorer.last_decision
        assert d.passthrough == passes and d.quality == q, (q, d)
        assert np.array_equal(out, rgb) == passes, q
    assert "above the validated qualities" in restorer.decide(80).reason
    assert "-0.20 dB at q60" in restorer.decide(45).reason
    assert "+0.20 dB at q30" in restorer.decide(30).reason  # 0.3 + (30 - 20) / 20 * (0.1 - 0.3)
    # below the validated range: the lowest quality's gain, said as that (it read "predicts +0.50 dB at q5")
    assert "dB at q10, the lowest validated quality (q5, below it, was not measured)" in restorer.decide(5).reason
    out = restorer.restore_array(rgb)  # unknown quality: no gain can be predicted, passed through
    d = restorer.last_decision
    assert np.array_equal(out, rgb) and d.passthrough and d.source == "unknown" and "quality=Q" in d.reason
    unguarded = Restorer(guarded_file, device="cpu", tile=0, guard=False)
    assert not np.array_equal(unguarded.restore_array(rgb, 80), rgb)
    assert not np.array_equal(unguarded.restore_array(rgb), rgb)  # guard off: restored blind, and it says so
    assert "restored blind" in unguarded.last_decision.reason and not unguarded.last_decision.passthrough


def test_guard_trusts_a_gain_only_where_its_lower_bound_is_above_zero(guarded_file, tmp_path):
    """A file with the validation's lower bounds: a quality whose mean gain is positive but not surely (its bound
    at or below zero) is passed through, and the qualities between it and its neighbours too."""
    from safetensors.torch import load_file, save_file

    from dist_dejpeg.models.generator_file import read_metadata

    lows = {10: 0.5, 20: -0.01, 40: 0.05, 60: -0.3}
    path = tmp_path / "generator.safetensors"
    save_file(load_file(str(guarded_file)), str(path), metadata={**read_metadata(guarded_file),
                                                                 "val_psnr_gain_low": json.dumps(lows)})
    restorer = Restorer(path, device="cpu", tile=0)
    assert restorer.gains == GAINS and restorer.lows == lows
    rgb = _photo(64, 96)
    for q, passes in ((10, False), (15, True), (20, True), (30, True), (40, False), (45, True)):
        out = restorer.restore_array(rgb, q)
        assert restorer.last_decision.passthrough == passes and np.array_equal(out, rgb) == passes, q
    assert "+0.30 dB at q20, not surely a gain (lower bound -0.01 dB)" in restorer.decide(20).reason
    assert not Restorer(guarded_file, device="cpu", tile=0).decide(20).passthrough  # by the mean, without bounds


def test_a_quality_read_from_another_encoders_tables_needs_a_gain_up_to_its_error_above(guarded_file):
    """Photoshop's, a camera's or flat tables read as an IJG-equivalent quality may be some qualities low (flat
    8s read q89 are libjpeg's q92-93 by PSNR): the guard asks for a gain up to IJG_EQUIVALENT_ERROR higher, where
    an exact libjpeg table is judged at its own quality; the model is still told the quality read."""
    from dist_dejpeg.jpeg.quality import IJG_EQUIVALENT, IJG_EQUIVALENT_ERROR, estimate_from_tables

    assert estimate_from_tables([[8] * 64, [8] * 64]).source == IJG_EQUIVALENT
    restorer = Restorer(guarded_file, device="cpu", tile=0)  # gains: a gain up to q40, a loss at q60
    exact, equivalent = restorer.decide(35, "file tables"), restorer.decide(35, IJG_EQUIVALENT)
    assert not exact.passthrough and equivalent.passthrough and equivalent.quality == 35
    assert f"q35 (IJG-equivalent, so up to q{35 + IJG_EQUIVALENT_ERROR})" in equivalent.reason
    assert "-0.20 dB at q60" in equivalent.reason
    assert not restorer.decide(10, IJG_EQUIVALENT).passthrough  # a gain at q10 and q16 alike


def test_a_restoring_decision_carries_the_sure_gain_and_the_jpeg_psnr_a_lossy_output_is_weighed_by():
    from dist_dejpeg.restore.guard import decide

    gains, lows, jpeg = {10: 0.8, 30: 0.6, 90: 0.1}, {10: 0.7, 30: 0.4, 90: 0.05}, {10: 27.0, 30: 30.6, 90: 37.4}
    d = decide(gains, 20, lows=lows, jpeg_psnr=jpeg)
    assert not d.passthrough and d.gain == pytest.approx(0.55) and d.jpeg_psnr == pytest.approx(28.8)
    assert decide(gains, 20, lows=lows).jpeg_psnr is None  # a file from before the JPEG PSNR was kept
    assert decide(gains, 20, guard=False).gain is None  # unchecked: nothing to weigh
    assert decide(gains, 81, "file tables (IJG-equivalent)", lows=lows, jpeg_psnr=jpeg).jpeg_psnr == \
        pytest.approx(37.4)  # the higher quality's (q90): the smaller JPEG error


def test_guard_summary_names_the_qualities_restore_acts_at_as_decide_judges_them():
    """The closing line of training (cli.py): which JPEG qualities restore will restore, from the same decide()
    every image goes through; a model validation found no sure gain for says restore will change nothing."""
    from dist_dejpeg.restore.guard import decide, guard_summary

    # GAINS: q10 +0.6, q20 +0.3, q40 +0.1, q60 -0.2 (no bounds: judged by the mean)
    line = guard_summary(GAINS)
    assert "restores JPEGs of q1-q40 and passes the others" in line, line
    assert "q60 -0.20 dB" in line and "above q60: not validated" in line, line
    lows = {10: 0.5, 20: -0.01, 40: 0.05, 60: -0.3}  # as the lower-bound test: q15-q39 and q41 up pass
    line = guard_summary(GAINS, lows)
    assert "restores JPEGs of q1-q10, q40 and passes" in line and "q20 +0.30 dB (lower bound -0.01)" in line, line
    for q in range(1, 101):  # the span it names is decide()'s, quality by quality
        assert decide(GAINS, q, lows=lows).passthrough == (q not in [*range(1, 11), 40]), q
    nothing = guard_summary({10: -0.1, 20: float("nan")}, {10: -0.3, 20: float("nan")})
    assert "passes every image through unchanged" in nothing and "q10 -0.10 dB, q20 NaN" in nothing, nothing
    assert "train longer" in nothing and "went wrong" not in nothing, nothing  # (near 0: learned too little)
    one_crop = guard_summary({10: 0.59, 90: 0.22}, {10: float("nan"), 90: float("nan")})  # (no spread: NaN bounds)
    assert "one crop per quality" in one_crop and "train longer" not in one_crop, one_crop
    for collapsed in ({10: -8.2, 40: -11.5}, {10: float("nan"), 40: float("nan")}):  # a diverged run: not "longer"
        line = guard_summary(collapsed)
        assert "training went wrong" in line and "train longer" not in line, line
    assert "unchecked" in guard_summary({}) and "those of unknown quality are passed through" in guard_summary({})


def test_gain_tables_read_one_way_for_every_backend(guarded_file, tmp_path, capsys):
    """One reader of the gain tables (models/names.py): JSON text or a dict, keys as ints; a table missing (or
    empty: a checkpoint's export) is none, the guard says the file holds no validated gains; a malformed one
    (unreadable, qualities outside 1..100, a cell half-width not in (0, 0.5], an infinite gain) refuses the file,
    naming the key, at the loader and the command line (exit 2): taken as none, every image was restored unchecked,
    and a NaN or negative half-width wrote a black image reported restored."""
    from safetensors.torch import load_file, save_file

    from dist_dejpeg.models.generator_file import read_metadata
    from dist_dejpeg.models.names import file_gains, read_gains

    assert read_gains('{"10": 0.5, "20": -0.1}') == read_gains({"10": "0.5", 20: -0.1}) == {10: 0.5, 20: -0.1}
    assert read_gains(None) == read_gains("{}") == {}
    gain = read_gains('{"10": NaN}', "val_psnr_gain")  # a diverged run's: the guard takes NaN as harm
    assert gain[10] != gain[10] and read_gains('{"10": Infinity}', "val_jpeg_psnr") == {10: float("inf")}
    assert read_gains('{"10": 0.5, "90": 0.2}', "cell_half_width") == {10: 0.5, 90: 0.2}
    # written as strict JSON (another language's reader of an export refuses a bare NaN), read back the same
    from dist_dejpeg.models.names import table_json
    from dist_dejpeg.train.final import guard_gains

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}"))

    text = table_json({10: float("nan"), 20: 0.25, 30: float("inf"), 40: float("-inf")})
    assert strict(text) == {"10": "NaN", "20": 0.25, "30": "Infinity", "40": "-Infinity"}
    back = read_gains(text, "val_jpeg_psnr")
    assert back[10] != back[10] and back[20] == 0.25 and back[30] == float("inf") == -back[40]
    meta = guard_gains({"q10": {"gain": {"psnr": float("nan"), "psnr_low": float("nan")}, "jpeg": {"psnr": 1e400}}})
    assert all(strict(v) for v in meta.values()) and read_gains(meta["val_jpeg_psnr"]) == {10: float("inf")}
    for key, bad in (("val_psnr_gain", "[1, 2]"), ("val_psnr_gain", "{not json"), ("val_psnr_gain", '{"q10": 1}'),
                     ("val_psnr_gain", 7), ("val_psnr_gain", '{"10": "abc"}'), ("val_psnr_gain", '{"10.5": 1.0}'),
                     ("val_psnr_gain", '{"-5": 1.0, "500": 1.0}'), ("val_psnr_gain_low", '{"10": Infinity}'),
                     ("cell_half_width", '{"10": -5, "90": NaN}'), ("cell_half_width", '{"90": NaN}'),
                     ("cell_half_width", '{"10": 0}'), ("cell_half_width", '{"10": 0.6}')):
        with pytest.raises(ModelFileError, match=f"metadata '{key}' is not a table"):
            read_gains(bad, key)
    with pytest.raises(ModelFileError, match="^f.st: metadata 'val_psnr_gain' is not a table.*'{not json'"):
        file_gains({"val_psnr_gain": "{not json", "val_psnr_gain_low": '{"10": 0.2}'}, "f.st")
    assert file_gains({"val_psnr_gain_low": '{"10": 0.2}', "val_psnr_gain": "{}"}) == {
        "val_psnr_gain": {}, "val_psnr_gain_low": {10: 0.2}, "val_jpeg_psnr": {}, "val_psnr_gain_conformed": {},
        "val_psnr_gain_conformed_low": {}, "cell_half_width": {}}
    path = tmp_path / "generator.safetensors"
    weights = load_file(str(guarded_file))
    for key, bad in (("val_psnr_gain", "{truncated"), ("cell_half_width", '{"10": -5, "90": NaN}'),
                     ("train_shards", '["train-000000.tar"]'), ("train_sources", '{"ab12": 7}')):
        # (the tables of what it trained on: read as none, evaluate called the photos it trained on unseen)
        save_file(weights, str(path), metadata={**read_metadata(guarded_file), key: bad})
        with pytest.raises(ModelFileError, match=f"generator.safetensors: metadata '{key}'"):
            load_model(path)
        assert main(["restore", "--model", str(path), "--input", str(path), "--output", str(tmp_path)]) == 2
        assert f"metadata '{key}'" in capsys.readouterr().err
    from dist_dejpeg.restore.base import ImageRestorer

    with pytest.raises(ModelFileError, match="'cell_half_width'"):  # a caller's info: the same reader
        ImageRestorer().setup({"cell_half_width": {10: float("nan")}}, tile=0, overlap=0, batch_size=1, guard=True)
    from dist_dejpeg.models.onnx_export import export_onnx
    from dist_dejpeg.restore.onnx_backend import onnx_info

    with pytest.raises(ModelFileError, match="m.onnx: metadata 'val_psnr_gain_conformed'"):  # (fell back to the
        onnx_info("m.onnx", {"val_psnr_gain_conformed": '{"10": "abc"}'}, None)  # plain gains, cells 0.5)
    with pytest.raises(ModelFileError, match="m.onnx: metadata 'train_shards' is not a table of names"):
        onnx_info("m.onnx", {"train_shards": "{cut"}, None)
    with pytest.raises(ModelFileError, match="metadata 'cell_half_width'"):  # not copied into an export
        export_onnx(None, tmp_path / "m.onnx", info={"cell_half_width": {10: -5.0}})


def test_conditioned_restorer_tells_the_model_the_quality(guarded_file):
    restorer = Restorer(guarded_file, device="cpu", tile=64, overlap=16, guard=False)
    rgb = _photo(96, 128)
    at10, at40, blind = (restorer.restore_array(rgb, q) for q in (10, 40, None))
    assert not np.array_equal(at10, at40) and not np.array_equal(at10, blind)
    from dist_dejpeg.jpeg.consistency import conform, read_cells

    data = _jpeg_bytes(rgb, 10)
    jpeg = Image.open(io.BytesIO(data))  # (its quality read from its tables; made consistent with its bytes)
    assert np.array_equal(np.asarray(restorer.restore(jpeg)),
                          conform(restorer.restore_array(np.asarray(jpeg.convert("RGB")), 10), read_cells(data)))


def test_restore_command_reads_each_jpeg_quality_and_passes_through(tmp_path, guarded_file, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rgb = _photo(64, 96)
    (src / "q15.jpg").write_bytes(_jpeg_bytes(rgb, 15))
    (src / "q75.jpg").write_bytes(_jpeg_bytes(rgb, 75, subsampling=0))
    Image.fromarray(rgb).save(src / "clean.png")
    assert main(["restore", str(src), "-o", str(tmp_path / "out"), "--model", str(guarded_file),
                 "--verbose", "--device", "cpu"]) == 0  # (--quiet would win over --verbose)
    out, err = capsys.readouterr()
    assert "validated gains" not in err  # (a file that holds them: no warning)
    assert "restored: " in out and "q15 (file tables)" in out
    assert "passed through: " in out and "q75 (file tables)" in out
    assert "not a JPEG (PNG)" in out
    q75 = np.asarray(Image.open(src / "q75.jpg").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "q75.png")), q75)  # unchanged pixels
    # --input-quality overrides the tables: q15 given for all, nothing passes through
    assert main(["restore", str(src / "q75.jpg"), "-o", str(tmp_path / "out2"), "--model", str(guarded_file),
                 "--verbose", "--input-quality", "15", "--device", "cpu"]) == 0
    assert "restored: " in capsys.readouterr().out
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "out2" / "q75.png")), q75)


# --- restore_tensor's inputs (a user's exploration found a uint8 tensor restored to white) --------------------
def test_restore_tensor_takes_uint8_and_float_dtypes_and_refuses_what_it_cannot_read():
    rgb = _photo(64, 80)
    restorer = Restorer(_model(), tile=0, guard=False)
    as_uint8 = torch.from_numpy(rgb).permute(2, 0, 1)
    got = restorer.restore_tensor(as_uint8, 20)
    assert got.dtype == torch.uint8 and torch.equal(got.permute(1, 2, 0), torch.from_numpy(restorer.restore_array(rgb, 20)))
    assert torch.equal(restorer.restore(as_uint8[None], 20)[0], got)  # restore() dispatches a batch the same way
    as_float = as_uint8.double() / 255
    restored = restorer.restore_tensor(as_float, 20)
    assert restored.dtype == torch.float64 and (restored * 255 - got).abs().max() < 0.51
    for bad, match in ((as_uint8.float(), r"span 0\.\.250 \(0\.\.255 values\?"), (as_uint8.int(), "uint8 .* or float"),
                       (torch.where(as_float > 0.5, float("nan"), as_float), "NaN")):
        with pytest.raises(ValueError, match=match):
            restorer.restore_tensor(bad, 20)
    for quality in ([20, 30], torch.tensor([20, 30]), 30.7, True):  # one quality per call
        with pytest.raises(ValueError, match="one JPEG quality"):
            restorer.restore_tensor(as_float, quality)
    assert torch.equal(restorer.restore_tensor(as_float, np.int64(20)), restorer.restore_tensor(as_float, 20.0))
    for quality in (np.array([20]), torch.tensor([20])):  # one value, as an array: numpy 2 refused float() of it
        restorer.restore_tensor(as_float, quality)
        assert restorer.last_decision.quality == 20
    for quality in (np.bool_(True), torch.tensor(True)):
        with pytest.raises(ValueError, match="one JPEG quality"):
            restorer.restore_tensor(as_float, quality)


def _fake_onnx_restorer():
    """An OnnxRestorer whose session is a fake running Pointwise (64 px tiles, overlap 16, batch 2, no guard)."""
    from dist_dejpeg.restore.onnx_backend import OnnxRestorer

    class Session:
        def run(self, names, feeds):
            return [Pointwise()(torch.from_numpy(feeds["degraded"])).numpy()]

    onnx = object.__new__(OnnxRestorer)
    onnx.session, onnx.conditioned, onnx.pad_to, onnx.attention_stride, onnx.keep_mean = Session(), False, 16, 0, False
    onnx.setup({}, tile=64, overlap=16, batch_size=2, guard=False)
    return onnx


def test_the_onnx_backend_restores_tensors_too():
    """OnnxRestorer has restore_tensor (through numpy on the host), as Restorer does; a fake session is the model."""
    onnx = _fake_onnx_restorer()
    x = torch.from_numpy(_photo(100, 90)).permute(2, 0, 1)
    expected = Restorer(Pointwise(), tile=64, overlap=16, guard=False).restore_tensor(x[None])
    got = onnx.restore(x[None], 20)
    assert got.dtype == torch.uint8 and got.shape == expected.shape and (got.int() - expected.int()).abs().max() <= 1
    assert (got.int() - x.int()).abs().max() > 10  # restored, not passed through


def test_a_quality_given_as_text_is_refused_as_other_bad_qualities_are():
    """float() parses text, so quality="20" (an argv or config value never converted) was taken for q20: a str or
    bytes is refused with the message every bad quality gets, by each of the API's calls; numbers stay accepted."""
    restorer = Restorer(Pointwise(), tile=0, guard=False)
    rgb = _photo(64, 64)
    x = torch.from_numpy(rgb).permute(2, 0, 1)
    calls = (lambda q: restorer.restore_array(rgb, q), lambda q: restorer.restore_tensor(x, q),
             lambda q: restorer.restore(Image.fromarray(rgb), q))
    for quality in ("20", b"20", "q20", np.str_("20")):
        for call in calls:
            with pytest.raises(ValueError, match=r"one JPEG quality, a whole number in 1\.\.100 .* got "):
                call(quality)
    for quality in (20, 20.0, np.int64(20), torch.tensor(20)):
        for call in calls:
            call(quality)
            assert restorer.last_decision.quality == 20 and type(restorer.last_decision.quality) is int


def test_the_onnx_backend_restores_half_precision_tensors_as_their_float32_copies():
    """The onnxruntime path's tensors go through numpy, which has no bfloat16: float16 and bfloat16 batches come
    back in their dtype, with their float32 copy's pixels cast back; a fake session is the model."""
    onnx = _fake_onnx_restorer()
    x = torch.from_numpy(_photo(100, 90)).permute(2, 0, 1).float() / 255
    for dtype in (torch.float16, torch.bfloat16):
        got = onnx.restore_tensor(x.to(dtype), 20)
        assert got.dtype == dtype and torch.equal(got, onnx.restore_tensor(x.to(dtype).float(), 20).to(dtype))
        assert (got.float() - x).abs().max() > 0.04  # restored, not passed through


def test_a_cuda_device_this_machine_lacks_is_a_clear_error(model_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error needs a machine without it")
    with pytest.raises(ValueError, match="no CUDA device"):
        Restorer(model_file, device="cuda")
    with pytest.raises(ValueError, match="device 'gpu0': not a device name; use cpu, cuda, cuda:N or auto$"):
        Restorer(model_file, device="gpu0")  # (not torch's list of twenty device types)
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg_bytes(_photo(64, 64)))
    assert main(["restore", str(path), "-o", str(tmp_path / "out"), "--model", str(model_file), "--device", "cuda"]) == 2
    assert "error: device cuda: this machine has no CUDA devices" in capsys.readouterr().err


def test_cuda_without_an_index_is_the_current_device_when_made(monkeypatch):
    """"cuda" and "auto" name the device current when the Restorer is made (cuda:N), so its streams and graphs
    stay on that card after the caller switches to another (torch.device("cuda") would follow the switch)."""
    from dist_dejpeg.restore import restorer

    current = [1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    assert restorer._device("cuda") == restorer._device("auto") == torch.device("cuda", 1)
    current[0] = 0
    assert restorer._device(torch.device("cuda")) == torch.device("cuda", 0)
    assert restorer._device("cuda:1") == torch.device("cuda", 1)  # an index given is kept
    with pytest.raises(ValueError, match="has 2 CUDA devices"):
        restorer._device("cuda:2")


@pytest.mark.parametrize("mode, transparency", [("RGB", (0, 0, 0)), ("L", 0)])
def test_a_transparent_colour_becomes_alpha_and_is_kept(mode, transparency):
    """PNG's tRNS chunk (one colour transparent) in an RGB or grayscale image: the output keeps those pixels
    transparent (as alpha), as it keeps an alpha channel."""
    rgb = _photo(64, 64).copy()
    rgb[:8] = 0  # a transparent band
    image = Image.fromarray(rgb).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=transparency)
    restored = Restorer(Pointwise(), tile=0, guard=False).restore(Image.open(io.BytesIO(buf.getvalue())), 20)
    assert restored.mode == ("RGBA" if mode == "RGB" else "LA")
    alpha = np.asarray(restored.getchannel("A"))
    assert (alpha[:8] == 0).all() and (alpha[8:] == 255).mean() > 0.99


def test_the_apis_save_keeps_what_restore_keeps(tmp_path):
    """The README's API example: Restorer.restore then save_restored writes a PNG with the input's XMP, EXIF,
    profile and comment, as the restore command does (Pillow's save(path, **info) drops XMP and the comment)."""
    from PIL import ImageCms

    from dist_dejpeg.jpeg.formats import written_by_restore
    from dist_dejpeg.restore import save_restored

    restorer = Restorer(Pointwise(), tile=0, guard=False)
    XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    src = tmp_path / "camera.jpg"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(_photo()).save(src, quality=30, xmp=XMP, icc_profile=icc, comment=b"Ann's")
    restored = restorer.restore(str(src), 30)
    restored.save(tmp_path / "pillow.png", **restored.info)
    assert "xmp" not in Image.open(tmp_path / "pillow.png").info  # what the README showed before
    for name in ("api.png", "api.webp", "api.jpg"):
        save_restored(restored, tmp_path / name)
        out = Image.open(tmp_path / name)
        xmp = out.info.get("xmp")
        assert (xmp.encode() if isinstance(xmp, str) else xmp) == XMP and out.info.get("icc_profile") == icc, name
        assert written_by_restore(tmp_path / name), name
    assert Image.open(tmp_path / "api.png").info.get("Comment") == "Ann's"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "api.png")), np.asarray(restored))


def test_the_api_restores_a_cameras_mpo_as_the_command_does():
    """A phone's JPEG with an MPF second image opens as a 2-frame MPO: its first image, the photo, is restored (the
    API refused it as 'animated' for a moment, while the command took it)."""
    buf = io.BytesIO()
    photo = _photo(64, 64)
    Image.fromarray(photo).save(buf, format="MPO", quality=30, save_all=True, append_images=[Image.fromarray(photo)])
    image = Image.open(io.BytesIO(buf.getvalue()))
    assert image.format == "MPO" and image.n_frames == 2
    assert Restorer(Pointwise(), tile=0, guard=False).restore(image, 30).size == (64, 64)


def _animated() -> Image.Image:
    buf = io.BytesIO()
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (0, 255)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return Image.open(io.BytesIO(buf.getvalue()))


def test_the_api_says_what_it_takes(tmp_path, model_file):
    restorer = Restorer(Pointwise(), tile=0, guard=False)
    for call, error, match in ((lambda: Restorer(None), TypeError, "a path .* or a torch module"),
                               (lambda: Restorer(Pointwise(), tile="512"), ValueError, "whole number of pixels"),
                               (lambda: Restorer(Pointwise(), tile=64), ValueError, r"for tile 64 \(e.g. 16\)"),
                               (lambda: Restorer(Pointwise(), batch_size=2.5), ValueError, "batch_size must be a whole"),
                               (lambda: Restorer(Pointwise(), batch_size=0), ValueError, "at least 1 tile, got 0"),
                               (lambda: Restorer(Pointwise(), guard="no"), ValueError, "True or False, got 'no'"),
                               (lambda: restorer.restore_array([[1, 2]]), TypeError, "numpy array, not list"),
                               (lambda: restorer.restore(_animated()), ValueError, r"an animated GIF \(2 frames\)"),
                               (lambda: restorer.restore_array(np.zeros((0, 10, 3), np.uint8), 20), ValueError, "not empty"),
                               (lambda: restorer.restore_tensor(torch.zeros(3, 0, 5), 20), ValueError, "not empty")):
        with pytest.raises(error, match=match):
            call()
    assert restorer.restore_tensor(torch.zeros(0, 3, 8, 8), 20).shape == (0, 3, 8, 8)  # an empty batch is fine
    # a checkpoint's weights file is not a generator file: the message names the folder to give instead
    (ckpt := tmp_path / "step-00000001").mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(ckpt / "best_generator.safetensors"))
    with pytest.raises(ModelFileError, match=f"checkpoint folder.*give the folder, {ckpt}"):
        load_model(ckpt / "best_generator.safetensors")
    out = tmp_path / "a_file.txt"
    out.write_text("x")
    from dist_dejpeg.restore.files import OutputError, check_output_dir

    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(out)


def test_every_input_the_api_cannot_restore_is_an_input_image_error():
    """A service maps dist_dejpeg.restore.InputImageError (a ValueError) to HTTP 400: an animated PIL image was a
    plain ValueError (its bytes an InputImageError: the same upload a 400 or a 500 by how it was given), as were an
    array or tensor of another dtype or shape, NaN pixels and 0..255 floats; the class was not exported."""
    from dist_dejpeg.restore import InputImageError
    from dist_dejpeg.restore.images import InputImageError as defined

    assert InputImageError is defined and issubclass(InputImageError, ValueError)
    restorer = Restorer(Pointwise(), tile=0, guard=False)
    gif = io.BytesIO()
    _animated().save(gif, format="GIF", save_all=True)
    for bad, match in ((_animated(), r"^an animated GIF \(2 frames\)"), (gif.getvalue(), r"^image: an animated GIF"),
                       (np.zeros((8, 8, 3), np.float32), "expected uint8 pixels, got float32"),
                       (np.zeros((8, 8, 4), np.uint8), r"expected H x W x 3 or H x W \(not empty\)"),
                       (torch.zeros(3, 8, 8, dtype=torch.int32), "got torch.int32"),
                       (torch.zeros(4, 8, 8), r"expected 3 x H x W or N x 3 x H x W"),
                       (torch.full((3, 8, 8), float("nan")), "NaN or infinite"),
                       (torch.full((3, 8, 8), 200.0), "divide them by 255")):
        with pytest.raises(InputImageError, match=match):
            restorer.restore(bad, 20)
    with pytest.raises(TypeError):  # not a kind of input it takes: the caller's code, not the upload
        restorer.restore({"image": b""})


def test_the_apis_too_large_refusal_names_the_apis_way_to_raise_the_limit():
    """An upload over the pixel limit was refused with "raise it with --max-pixels", which Restorer.restore had no
    argument for: restore takes max_pixels now, and its refusal names it (the command's still names its option)."""
    restorer = Restorer(Pointwise(), tile=0, guard=False)
    png = io.BytesIO()
    Image.fromarray(_photo(10, 20)).save(png, format="PNG")
    with pytest.raises(InputImageError, match=r"20 x 10 = 0.0002 megapixels is over the limit") as refused:
        restorer.restore(png.getvalue(), 20, max_pixels=100)
    assert str(refused.value).endswith("raise it with restore(..., max_pixels=N) (in pixels)")
    assert restorer.restore(io.BytesIO(png.getvalue()), 20, max_pixels=200).size == (20, 10)
    with pytest.raises(InputImageError, match=r"raise it with --max-pixels \(in pixels\)$"):
        load_image(png.getvalue(), max_pixels=100)
    with pytest.raises(ValueError, match="max_pixels must be a whole number"):
        restorer.restore(png.getvalue(), max_pixels=0)


def test_loading_a_model_leaves_the_callers_random_streams_as_they_were(model_file):
    """Building a Restorer drew from torch's global generator (the build random-initialises every weight before the
    file's replace them): a caller's seeded torch.rand after it gave other numbers. A checkpoint folder's load
    (from_file=False) builds the same way."""
    import random

    from safetensors.torch import load_file

    from dist_dejpeg.models.generator_file import _build_and_load

    def draws():
        return torch.rand(4).tolist(), np.random.rand(2).tolist(), random.random()

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = draws()
    for load in (lambda: Restorer(model_file, device="cpu"),
                 lambda: _build_and_load(ModelConfig(**TINY), load_file(str(model_file)), "x", from_file=False)):
        torch.manual_seed(3), np.random.seed(3), random.seed(3)
        load()
        assert draws() == expected


def test_a_generator_file_s_model_config_is_read_as_a_config_file_is(monkeypatch):
    """The metadata 'model' typed as config.yaml's keys are (a string "false" was a true keep_mean; "abc" a
    decoder_width blamed on timm), a key this version lacks refused (it was dropped: a newer model built as an
    older one), a key an older file lacks its default, one that is no JSON object a ModelFileError (exit 2, not an
    AttributeError's traceback); a build failure blamed on timm only where timm lacks the encoder."""
    from dist_dejpeg.models import generator_file
    from dist_dejpeg.models.generator_file import _build_and_load, model_config_from_meta

    def read(**fields):
        return model_config_from_meta({"model": json.dumps(fields)}, "f.st")

    assert read(keep_mean="false").keep_mean is False and read(keep_mean=True).keep_mean is True
    assert read(encoder="resnet18") == ModelConfig(encoder="resnet18", decoder_norm="batch")  # (older: defaults)
    for key, bad in (("keep_mean", "maybe"), ("decoder_width", "abc"), ("decoder_width", 8.5), ("blur", [1])):
        with pytest.raises(ModelFileError, match=f"^f.st: .*key '{key}'"):
            read(**{key: bad})
    with pytest.raises(ModelFileError, match=re.escape("written by a newer dist_dejpeg: model keys ['x'] unknown "
                                                       "to this version; upgrade")):
        read(x=1, decoder_width=16)
    for held in ("[1]", "1", None):  # JSON but no object, or no text: one line naming the file, not a traceback
        with pytest.raises(ModelFileError, match="^f.st: .* is not a JSON object"):
            model_config_from_meta({"model": held}, "f.st")

    def fails(cfg, resolved=None):
        raise RuntimeError("Trying to create tensor with negative dimension -5")

    monkeypatch.setattr(generator_file, "build_generator", fails)
    with pytest.raises(ModelFileError, match="cannot be built .*negative dimension") as err:
        _build_and_load(ModelConfig(**{**TINY, "decoder_width": -5}), {}, "f.st")
    assert "timm" not in str(err.value)
    with pytest.raises(ModelFileError, match="cannot be built by the installed timm"):
        _build_and_load(ModelConfig(**{**TINY, "encoder": "no_such_net"}), {}, "f.st")
