"""ONNX export (dist-dejpeg export): dynamic batch/height/width, onnxruntime vs PyTorch on a real photo,
metadata, exit codes; restoring with the exported file (restore/onnx_backend.py, torch-free) with the
Restorer's tiling and guard. One export for the module (the dynamo exporter is the slow part), of a quality-conditioned
generator: its graph has both inputs; a blind one is the same graph without ``quality``."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnxruntime as ort  # noqa: E402

from dist_dejpeg.config import ModelConfig  # noqa: E402
from dist_dejpeg.models.generator_file import load_model, save_generator  # noqa: E402
from dist_dejpeg.models.unet import build_generator  # noqa: E402
from dist_dejpeg.cli import main  # noqa: E402
from dist_dejpeg.restore.images import InputImageError  # noqa: E402
from dist_dejpeg.models.onnx_export import (ONNX_FORMAT, TOLERANCE, check_batch, fold_spectral_norm,  # noqa: E402
                                            load_check_image, read_onnx_metadata)

# three encoder stages (a stride-8 U-Net): every op of the full one, half the nodes, the export ~2x quicker;
# keep_mean as the debug recipe has it (the correction's mean is taken over the image, not its padding)
CFG = ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=32, quality_conditioning=True,
                  encoder_depth=3, keep_mean=True)
GAINS = {10: 0.5, 40: 0.1, 60: -0.2}
LOWS = {10: 0.4, 40: -0.05, 60: -0.3}  # q40's gain is not surely one


def _cli(argv: list[str]) -> int:
    return main(argv)


def _trained_like_generator():
    """A generator whose output is not its input: an untrained one returns the input exactly (zero head,
    zero attention gamma), which would make any ONNX comparison trivially pass."""
    torch.manual_seed(0)
    g = build_generator(CFG)
    with torch.no_grad():
        torch.nn.init.normal_(g.head.weight, std=0.05)
        torch.nn.init.normal_(g.film.heads.weight, std=0.2)
        for m in g.modules():
            if hasattr(m, "gamma"):
                m.gamma.fill_(0.5)
            if isinstance(m, torch.nn.BatchNorm2d):  # running stats other than 0 / 1
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    g.train()  # spectral norm: a few power iterations so that u, v are not their random init
    for _ in range(2):
        g(torch.rand(2, 3, 64, 64))
    return g.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The generator file and its export by the CLI (once for the module): (model, onnx, exit code, stdout,
    the warnings it raised)."""
    folder = tmp_path_factory.mktemp("onnx")
    model, onnx_path = folder / "generator.safetensors", folder / "model.onnx"
    save_generator(_trained_like_generator(), CFG, model,
                   extra={"global_step": 7, "val_psnr_gain": json.dumps(GAINS), "val_psnr_gain_low": json.dumps(LOWS),
                          "val_jpeg_psnr": json.dumps({10: 27.0, 90: 37.5}),
                          "val_psnr_gain_conformed": json.dumps({10: 0.6, 40: 0.2}),
                          "val_psnr_gain_conformed_low": json.dumps({10: 0.5, 40: 0.1}),
                          "cell_half_width": json.dumps({10: 0.5, 40: 0.35}),
                          "train_shards": json.dumps({"train-000000.tar": "10240:0123456789abcdef"}),
                          "train_sources": json.dumps({"fedcba9876543210": "astronaut"}),
                          "code": "dist_dejpeg 0.1.0 (abc1234)"})
    with contextlib.redirect_stdout(io.StringIO()) as out, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = _cli(["export", "--model", str(model), "--onnx", str(onnx_path)])
    return model, onnx_path, code, out.getvalue(), [str(w.message) for w in caught]


def test_export_matches_pytorch_on_a_photo_at_two_sizes(exported, capsys):
    model, onnx_path, code, out, raised = exported
    assert code == 0, out
    # torch's "The axis name: batch will not be used, since it shares the same shape constraints with another
    # axis: batch." on every export of a conditioned model: its two inputs share the batch Dim, as meant
    assert not [m for m in raised if "axis name" in m], raised
    diffs = {m[0]: float(m[1]) for m in re.findall(r"(\d+x3x\d+x\d+): max abs difference ([0-9.e+-]+)", out)}
    with capsys.disabled():
        print(f"\nonnxruntime vs PyTorch (max abs difference on [0, 1]): {diffs}")
    assert set(diffs) == {"1x3x200x152", "2x3x96x160", "1x3x20x27"}, out
    assert all(d < TOLERANCE for d in diffs.values()), diffs
    assert onnx_path.is_file() and not list(onnx_path.parent.glob(".*tmp*"))

    # an independent run: a third size and batch, the generator as load_model gives it
    generator, _ = load_model(model)
    batch = check_batch(load_check_image(), 3, 72, 100)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    quality = np.array([15, 0, 80], np.float32)
    (got,) = session.run(["restored"], {"degraded": batch, "quality": quality})
    with torch.no_grad():
        expected = generator(torch.from_numpy(batch), torch.from_numpy(quality)).numpy()
        correction = np.abs(expected - batch).max()
        (other,) = session.run(["restored"], {"degraded": batch, "quality": np.array([90, 15, 0], np.float32)})
    assert np.abs(other - got).max() > 1e-3  # the quality input reaches the graph
    diff = float(np.abs(got - expected).max())
    with capsys.disabled():
        print(f"3x3x72x100: max abs difference {diff:.3g} (largest correction {correction:.3g})")
    assert got.shape == batch.shape and diff < TOLERANCE
    assert correction > 0.05  # the comparison is not between two identities

    (inp, qin), outp = session.get_inputs(), session.get_outputs()[0]
    assert (inp.name, inp.shape) == ("degraded", ["batch", 3, "height", "width"])
    assert (qin.name, qin.shape) == ("quality", ["batch"])
    assert (outp.name, outp.shape) == ("restored", ["batch", 3, "height", "width"])

    meta = read_onnx_metadata(onnx_path)
    assert meta["format"] == ONNX_FORMAT
    assert meta["encoder"] == CFG.encoder
    assert json.loads(meta["model"]) == dataclasses.asdict(CFG)
    assert meta["source"] == str(model)
    assert {int(k): v for k, v in json.loads(meta["val_psnr_gain"]).items()} == GAINS
    assert {int(k): v for k, v in json.loads(meta["val_psnr_gain_low"]).items()} == LOWS
    assert json.loads(meta["val_jpeg_psnr"]) == {"10": 27.0, "90": 37.5}  # (a lossy output's check: files.py)
    assert json.loads(meta["cell_half_width"]) == {"10": 0.5, "40": 0.35}  # a JPEG made consistent: as in the file
    assert json.loads(meta["val_psnr_gain_conformed_low"]) == {"10": 0.5, "40": 0.1}
    assert "quality" in meta["input"]
    # what the guard and the Restorer need, for any runtime: conditioned, the training step, the stride
    assert (meta["conditioned"], meta["global_step"], meta["pad_to"]) == ("true", "7", "8")
    assert meta["attention_at"] == "4"  # (asked 8; the skips of a stride-8 U-Net are at 2 and 4: the memory guard's)
    assert meta["encoder_init"] == "random init" and meta["code"] == "dist_dejpeg 0.1.0 (abc1234)"  # (report: trained by)
    assert json.loads(meta["train_shards"]) == {"train-000000.tar": "10240:0123456789abcdef"}  # evaluate's "seen in training"
    assert json.loads(meta["train_sources"]) == {"fedcba9876543210": "astronaut"}  # and its photos, by their pixels
    assert session.get_modelmeta().custom_metadata_map["format"] == ONNX_FORMAT


def test_export_says_each_check_once(exported):
    """The three checks' lines were repeated in the closing line: each difference is said once, then the summary."""
    out = exported[3]
    for label in ("1x3x200x152", "2x3x96x160", "1x3x20x27"):
        assert out.count(label) == 1, out
    assert out.splitlines()[-1].endswith(f"the 3 onnxruntime checks above are within {TOLERANCE:g} of PyTorch"), out


def test_an_api_export_without_gains_says_restore_will_check_nothing(monkeypatch, exported, capsys):
    """The module's own example left out info=: its export held no gain tables, and restore with it restored
    every image unchecked, where the CLI's export of the same model passed a q95 photo through. Said now."""
    import dist_dejpeg.models.onnx_export as onnx_export
    from dist_dejpeg.models.names import OnnxUnavailable

    def stop():  # (after the tables are read: the export's minute is not needed to see what it would say)
        raise OnnxUnavailable("stopped here")

    monkeypatch.setattr(onnx_export, "require_onnx", stop)
    for info, said in ((None, "pass load_model's info="), ({"val_psnr_gain": GAINS}, None),
                       ({"source": "a checkpoint"}, "the model has none: a checkpoint")):
        with pytest.raises(OnnxUnavailable):
            onnx_export.export_onnx(None, "api.onnx", info=info, log=pytest.fail)  # (stdout: the results' lines)
        err = capsys.readouterr().err
        assert (said in err and "holds no validated gains" in err) if said else not err, err
    assert "holds no validated gains" not in exported[3]  # (the CLI's passes load_model's info)


def test_fold_spectral_norm_keeps_outputs_and_leaves_the_original_alone():
    g = _trained_like_generator()
    folded = fold_spectral_norm(g)
    x = torch.from_numpy(check_batch(load_check_image(), 1, 64, 96))
    with torch.no_grad():
        diff = (folded(x) - g(x)).abs().max().item()
    assert diff < 1e-6
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in folded.modules())
    assert any(torch.nn.utils.parametrize.is_parametrized(m) for m in g.modules())
    g(x)  # the original still has its parametrized weights


def test_not_a_generator_is_exit_2_with_a_clear_message(tmp_path, capsys):
    bogus = tmp_path / "notes.safetensors"
    bogus.write_bytes(b"not a model at all")
    assert _cli(["export", "--model", str(bogus), "--onnx", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "not a safetensors file" in err and str(bogus) in err
    assert not (tmp_path / "x.onnx").exists()

    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "something.else"})
    assert _cli(["export", "--model", str(other), "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert "not a dist_dejpeg generator file" in capsys.readouterr().err


def test_missing_onnx_packages_say_how_to_install(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    assert _cli(["export", "--model", str(tmp_path / "m.safetensors"), "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert "pip install -e '.[onnx]'" in capsys.readouterr().err  # as the README says
    # restoring with an ONNX file: the same message, as a ModelFileError (the CLI's exit 2)
    from dist_dejpeg.models.generator_file import ModelFileError
    from dist_dejpeg.restore import open_restorer

    with pytest.raises(ModelFileError, match=re.escape("needs onnxruntime (onnxruntime is not installed")) as err:
        open_restorer(tmp_path / "x.onnx")
    assert "pip install -e '.[onnx]'" in str(err.value)
    assert _cli(["restore", str(tmp_path / "in.jpg"), "-o", str(tmp_path / "out"), "--model",
                 str(tmp_path / "x.onnx")]) == 2
    assert "pip install -e '.[onnx]'" in capsys.readouterr().err


def _jpeg_photo(quality: int) -> tuple[bytes, np.ndarray]:
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()[:300, :280]).save(buf, format="JPEG", quality=quality)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return buf.getvalue(), np.asarray(im.convert("RGB"))


# `dist-dejpeg restore --model model.onnx` as a fresh process runs it after the README's restore-only install
# (onnxruntime, pillow, numpy, tqdm; the package with --no-deps): the training side's libraries cannot be imported
TORCH_FREE_RESTORE = """
import sys
ABSENT = {"torch", "torchvision", "timm", "lpips", "webdataset", "accelerate", "torchmetrics", "omegaconf", "yaml",
          "tensorboard", "safetensors", "skimage", "scipy"}
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (not in a restore-only install)", name=name)
sys.meta_path.insert(0, NotInstalled())
from dist_dejpeg.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ABSENT if m in sys.modules)
print("imported:", heavy)
sys.exit(code or (3 if heavy else 0))
"""


def test_onnx_restore_tiles_blends_and_guards_like_pytorch(exported, tmp_path, capsys, monkeypatch):
    """The exported file through the Restorer: the same tiles and blend as PyTorch (within a level or two),
    where one whole-image pass differs by far more at the seams; the guard reads the gains from the metadata;
    ``restore --model model.onnx`` needs none of the training side's libraries (torch, timm, omegaconf, ...)."""
    import subprocess
    import sys

    from PIL import Image

    from dist_dejpeg.restore import open_restorer
    from dist_dejpeg.restore.onnx_backend import OnnxRestorer
    from dist_dejpeg.restore.restorer import Restorer

    from dist_dejpeg.jpeg.consistency import conform_to_file

    model, onnx_path, code, *_ = exported
    assert code == 0
    data, jpeg = _jpeg_photo(10)
    photo, out = tmp_path / "photo.jpg", tmp_path / "out"
    photo.write_bytes(data)
    # as a user runs it, in a fresh process (started first: it runs while this one restores with PyTorch)
    cli = subprocess.Popen([sys.executable, "-c", TORCH_FREE_RESTORE, "restore", "--model", str(onnx_path),
                            str(photo), "-o", str(out), "--tile", "128", "--overlap", "32", "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tiled = dict(tile=128, overlap=32)  # 300 x 280: 3 x 3 tiles
    torch_tiled = Restorer(str(model), **tiled).restore_array(jpeg, 10)
    onnx = open_restorer(onnx_path, **tiled)
    assert isinstance(onnx, OnnxRestorer) and isinstance(Restorer(onnx_path, tile=0), OnnxRestorer)
    assert onnx.conditioned and onnx.gains == GAINS and onnx.lows == LOWS and onnx.info["global_step"] == 7
    assert onnx.half_widths == {10: 0.5, 40: 0.35} and onnx.decide(40, conformed=True).half_width == 0.35
    assert onnx.device == "cpu (onnxruntime)" and onnx.batch_size == 1
    assert onnx.info["encoder"] == CFG.encoder and onnx.info["encoder_init"] == "random init"
    assert onnx.info["train_sources"] == {"fedcba9876543210": "astronaut"}  # (evaluate's "seen in training")
    assert onnx.info["code"] == "dist_dejpeg 0.1.0 (abc1234)"
    onnx_tiled = onnx.restore_array(jpeg, 10, source="file tables")
    assert onnx.last_decision.source == "file tables" and not onnx.last_decision.passthrough
    onnx_whole = open_restorer(onnx_path, tile=0).restore_array(jpeg, 10)
    diff = int(np.abs(onnx_tiled.astype(int) - torch_tiled).max())
    seams = int(np.abs(onnx_whole.astype(int) - torch_tiled).max())
    with capsys.disabled():
        print(f"\nONNX vs PyTorch, tiled 128/32 on a 300x280 photo: max abs diff {diff} levels (one whole-image "
              f"pass: {seams}); largest correction {int(np.abs(torch_tiled.astype(int) - jpeg).max())}")
    assert diff <= 2 and seams > 10 * max(diff, 1)
    assert np.abs(torch_tiled.astype(int) - jpeg).max() > 20  # not two identities compared

    # the guard: q60's validated gain is -0.2 dB, so the image comes back as it went in
    passed = onnx.restore_array(jpeg, 60)
    assert onnx.last_decision.passthrough and "-0.20 dB" in onnx.last_decision.reason
    np.testing.assert_array_equal(passed, jpeg)
    assert onnx.decide(40).passthrough and "lower bound -0.05 dB" in onnx.decide(40).reason
    # a grayscale image and one below the exported range (padded as the generator pads, cropped back)
    gray = onnx.restore_array(jpeg[..., 0], 10)
    assert gray.shape == jpeg.shape[:2] and np.abs(gray.astype(int) - jpeg[..., 0]).max() > 5
    # keep_mean centres the correction over the image, not the padding: measured on the values that did not clip
    # (this model's corrections are large: 2% of these clip, biasing it by under two levels)
    small = np.random.default_rng(0).uniform(0.4, 0.6, (1, 3, 20, 27)).astype(np.float32)
    with torch.no_grad():
        expected = load_model(model)[0](torch.from_numpy(small), torch.tensor([10.0])).numpy()
    assert np.abs(onnx.forward(small.copy(), 10) - expected).max() < 2 / 255

    # a window whose attention score matrix would not fit (a whole 2K image: 7 GB) is refused, saying the largest tile
    # that fits; the stride is where the attention sits (4), not the config's 8 (there the whole image: 7 MB)
    from dist_dejpeg.restore import onnx_backend

    monkeypatch.setattr(onnx_backend, "MAX_SCORES_BYTES", 8 << 20)  # this model's whole 300 x 280: 110 MB
    with pytest.raises(InputImageError, match=r"\(at stride 4\) would hold a 0.1 GB score matrix, over its 8 MB "
                                              r"limit; .*\(tile=128, overlap=32\)"):  # (the API's words: README)
        open_restorer(onnx_path, tile=0).restore_array(jpeg, 10)
    assert open_restorer(onnx_path, **tiled).restore_array(jpeg, 10).shape == jpeg.shape  # 32 x 32: 4 MB

    output, _ = cli.communicate(timeout=120)
    assert cli.returncode == 0 and "imported: []" in output, output
    (written,) = out.glob("photo*")
    with Image.open(written) as im:
        written = conform_to_file(torch_tiled, data)[0]  # restore's output: consistent with the file's data
        assert int(np.abs(np.asarray(im.convert("RGB")).astype(int) - written).max()) <= 2
    # the PyTorch generator file in the same install: one error line saying what is missing and the way round it
    cli = subprocess.run([sys.executable, "-c", TORCH_FREE_RESTORE, "restore", "--model", str(model), str(photo),
                          "-o", str(tmp_path / "pt"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and cli.stderr.startswith("error: ") and "Traceback" not in cli.stderr, cli.stderr
    assert "needs torch, which is not installed" in cli.stderr and "--onnx model.onnx" in cli.stderr
    assert not (tmp_path / "pt").exists()
    # evaluate (the README said it took an ONNX file without PyTorch; it needs the full install): one line, exit 2
    cli = subprocess.run([sys.executable, "-c", TORCH_FREE_RESTORE, "evaluate", "--model", str(onnx_path), "--images",
                          str(photo), "-o", str(tmp_path / "ev")], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr
    assert cli.stderr.startswith("error: evaluate needs ") and "this environment lacks" in cli.stderr, cli.stderr


def test_onnx_backend_centres_a_padded_windows_correction_over_the_image(monkeypatch):
    """A window whose side is below the stride's pad (6 px at stride 16) is padded by the ONNX backend (edge, as
    the generator replicates there), and a keep_mean export centres its correction over the padded window;
    centred again over the image it matches the generator (which centres over the image) exactly where nothing
    clips. A fake session stands in for onnxruntime: a known correction, centred over what it got."""
    from dist_dejpeg.restore.onnx_backend import OnnxRestorer

    rng = np.random.default_rng(1)
    batch = rng.uniform(0.3, 0.7, (2, 3, 6, 27)).astype(np.float32)
    fixed = rng.normal(0.05, 0.02, (2, 3, 32, 32)).astype(np.float32)  # a correction with a mean of its own

    class Session:
        def run(self, names, feeds):
            x = feeds["degraded"]
            c = fixed[..., :x.shape[-2], :x.shape[-1]]
            return [np.clip(x + c - c.mean((-2, -1), keepdims=True), 0, 1)]

    onnx = object.__new__(OnnxRestorer)
    onnx.session, onnx.conditioned, onnx.pad_to, onnx.attention_stride, onnx.keep_mean = Session(), False, 16, 0, True
    got = onnx.forward(batch.copy())
    c = fixed[..., :6, :27]
    np.testing.assert_allclose(got, batch + c - c.mean((-2, -1), keepdims=True), atol=1e-6)
    onnx.keep_mean = False  # an export without keep_mean: what the session gave, cropped
    assert np.abs(onnx.forward(batch.copy()) - got).max() > 1e-3


def test_onnx_memory_guard_says_the_tile_or_batch_that_fits_at_the_attentions_stride(monkeypatch):
    """The guard took the config's attention_stride (32 on a stride-16 U-Net, whose attention sits at 8: the matrix
    under-estimated 256x) and its advice was fixed text ("--tile 512, the default") that a stride-2 model on --tile
    512 could not follow. It reads the export's attention_at (an older export: the ask, taken to the strides below
    pad_to) and says the largest --tile or --batch-size that fits, or the PyTorch model where no tile does."""
    from dist_dejpeg.restore import onnx_backend
    from dist_dejpeg.restore.onnx_backend import OnnxRestorer, attention_at

    assert attention_at({"attention_at": "8"}, {"attention_stride": 32}, 16) == 8
    assert attention_at({"attention_at": "null"}, {}, 32) == 0  # (no self-attention)
    assert attention_at({}, {"attention_stride": 32}, 16) == 8  # an export from before attention_at
    assert attention_at({}, {"attention_stride": 1}, 32) == 2 and attention_at({}, {}, 32) == 8
    assert attention_at({}, {"self_attention": False, "attention_stride": 8}, 32) == 0

    def restorer(stride, tile=512, overlap=64, batch_size=1):
        onnx = object.__new__(OnnxRestorer)
        onnx.attention_stride, onnx.tile, onnx.overlap, onnx.batch_size = stride, tile, overlap, batch_size
        onnx.cli_options = True  # (restore's words; the API's: below)
        return onnx

    def refusal(onnx, n, h, w):
        with pytest.raises(InputImageError) as err:  # (a plain ValueError was no input error: review)
            onnx.forward(np.zeros((n, 3, h, w), np.float32))
        return str(err.value)

    said = refusal(restorer(2), 1, 512, 512)  # stride 2 at --tile 512: 16 GB
    assert "(at stride 2) would hold a 16.0 GB score matrix, over its 1.0 GB limit" in said
    assert said.endswith("restore in tiles of at most 256 px (--tile 256)"), said
    said = refusal(restorer(4, batch_size=4), 4, 512, 512)  # CUDA's batch of 4 at stride 4: 4 GB
    assert said.endswith("restore with --batch-size 1 (or --tile 352)"), said
    api = restorer(4, batch_size=4)
    api.cli_options = False
    assert refusal(api, 4, 512, 512).endswith("restore with batch_size=1 (or tile=352)")
    said = refusal(restorer(8, tile=0, overlap=64), 1, 2040, 1356)  # a whole 2K photo at stride 8
    assert said.endswith("(--tile 1024)"), said
    monkeypatch.setattr(onnx_backend, "MAX_SCORES_BYTES", 1 << 20)
    said = refusal(restorer(2), 1, 512, 512)
    assert "over its 1 MB limit; no tile size fits (a 64 px tile: 4 MB)" in said and "the PyTorch model" in said, said
    assert refusal(restorer(4, tile=128), 1, 128, 128).endswith("(--tile 64 --overlap 16)")
    api = restorer(4, tile=128)
    api.cli_options = False  # Restorer(...).restore: the API's keywords
    assert refusal(api, 1, 128, 128).endswith("(tile=64, overlap=16)")


def test_export_refuses_at_once_what_would_fail_after_exporting(tmp_path, capsys):
    """An ONNX file as the model, a folder or an unwritable place as the output, an opset the exporter cannot
    write: exit 2 before the minute of exporting and checking (the folder was a traceback after it)."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    for args, message in ((["--model", "m.onnx", "--onnx", str(tmp_path / "x.onnx")], "is an ONNX export already"),
                          (["--model", "runs/x", "--onnx", str(folder)], "is a folder; give a file name"),
                          (["--model", "runs/x", "--onnx", str(tmp_path / "dejpeg")],
                           "give the file the .onnx suffix"),  # (restore would read it as a generator file)
                          (["--model", "runs/x", "--onnx", str(tmp_path / "y.onnx"), "--opset", "5"],
                           "writes opset 18 or newer"),
                          # (an opset past onnxscript's converter: a ValidationError traceback after the export)
                          (["--model", "runs/x", "--onnx", str(tmp_path / "y.onnx"), "--opset", "99"],
                           "writes opsets 18 to "),
                          (["--model", "runs/x", "--onnx", "/proc/nope/x.onnx"], "cannot write to /proc/nope"),
                          # (os.access says root may write to /proc itself: said after the minute of exporting)
                          (["--model", "runs/x", "--onnx", "/proc/x.onnx"], "cannot write to /proc (")):
        assert main(["export", *args]) == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [folder]


def test_a_check_image_that_is_not_an_image_is_exit_2_before_the_export(tmp_path, capsys, monkeypatch):
    """``--check-image notes.txt``: a PIL traceback (exit 1); now one line, exit 2, before the model is even
    loaded (load_model is not reached)."""
    from dist_dejpeg.models import onnx_export

    monkeypatch.setattr(onnx_export, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["export", "--model", "runs/x", "--onnx", str(tmp_path / "x.onnx"), "--check-image", str(bad)]) == 2
    assert "--check-image" in (err := capsys.readouterr().err) and "not an image that Pillow reads" in err, err
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_windows_under_32_px_match_pytorch(exported):
    """Windows under 32 px whose stride pad fits (here 20 x 27, 5 x 7 at stride 8) run through the graph as they are,
    whose reflect pad and crop before keep_mean's centring are the generator's: equal to float rounding (the backend
    padded them itself and re-centred over the unclipped values: 8.5 and 23 levels off on these crops).
    (A 3-px side, where the generator replicates, is still padded by the backend and re-centred:
    test_onnx_backend_centres_a_padded_windows_correction_over_the_image.)"""
    from dist_dejpeg.restore.onnx_backend import OnnxRestorer

    model, onnx_path, code, *_ = exported
    assert code == 0
    generator, _ = load_model(model)
    onnx = OnnxRestorer(onnx_path, device="cpu")
    for h, w in ((20, 27), (5, 7)):
        batch = check_batch(load_check_image(), 1, h, w)
        with torch.no_grad():
            expected = generator(torch.from_numpy(batch), torch.tensor([10.0])).numpy()
        diff = float(np.abs(onnx.forward(batch.copy(), 10) - expected).max())
        assert diff < TOLERANCE, (h, w, diff * 255)


def test_restorers_keywords_are_taken_by_an_onnx_model_alike(exported):
    """Restorer("x.onnx", ...) hands its keywords to OnnxRestorer: each of them is one OnnxRestorer takes, at
    Restorer's defaults too (cuda_graphs=None was a TypeError: OnnxRestorer had no such keyword); cuda_graphs=True
    is refused in a line; batch_size 0 is refused by both as Restorer refuses it (OnnxRestorer took it as 1)."""
    import inspect

    from dist_dejpeg.restore.onnx_backend import OnnxRestorer
    from dist_dejpeg.restore.restorer import Restorer

    _, onnx_path, code, *_ = exported
    assert code == 0
    keywords = {k: p.default for k, p in inspect.signature(Restorer).parameters.items() if k != "model"}
    assert set(keywords) <= set(inspect.signature(OnnxRestorer).parameters)
    assert isinstance(Restorer(onnx_path, **keywords), OnnxRestorer)
    assert Restorer(onnx_path, device="cpu", cuda_graphs=False).batch_size == 1
    with pytest.raises(ValueError, match=r"^cuda_graphs=True: CUDA graphs are PyTorch's; an ONNX model runs on "
                                         r"onnxruntime"):
        Restorer(onnx_path, device="cpu", cuda_graphs=True)
    for make in (Restorer, OnnxRestorer):
        with pytest.raises(ValueError, match=r"^batch_size must be at least 1 tile, got 0$"):
            make(onnx_path, device="cpu", batch_size=0)


def test_onnx_device_cuda_that_onnxruntime_could_not_start_is_an_error(exported, monkeypatch):
    """onnxruntime-gpu whose CUDA provider fails to start (its CUDA or cuDNN libraries) falls back to the CPU on its
    own: ``--device cuda`` restored on the CPU, saying "cpu (onnxruntime)"; now a ModelFileError (the CLI's exit 2).
    A device that is not cpu, cuda[:N] or auto is a ValueError (``cuda:x`` was int()'s message)."""
    from dist_dejpeg.models.names import ModelFileError
    from dist_dejpeg.restore.onnx_backend import OnnxRestorer

    _, onnx_path, code, *_ = exported
    assert code == 0
    real = ort.InferenceSession

    class CudaFailed(real):  # what onnxruntime-gpu gives when its CUDA provider cannot start: a CPU session
        def __init__(self, path, options=None, providers=None, **kwargs):
            assert providers[0][0] == "CUDAExecutionProvider", providers
            super().__init__(path, options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", CudaFailed)
    with pytest.raises(ModelFileError, match="could not start its CUDA provider"):
        OnnxRestorer(onnx_path, device="cuda")
    assert OnnxRestorer(onnx_path, device="auto").device == "cpu (onnxruntime)"  # auto: the CPU is fine
    for device in ("cuda:x", "CUDA", "tensorrt"):
        with pytest.raises(ValueError, match="device must be cpu, cuda"):
            OnnxRestorer(onnx_path, device=device)


def test_a_generator_file_without_a_readable_model_config_is_a_clear_error(tmp_path, capsys):
    """A generator file whose metadata lacks its model config, or holds one that is not a JSON object: export and
    restore printed a KeyError / JSONDecodeError traceback; now one line naming the file, exit 2."""
    from safetensors.torch import save_file

    for name, meta in (("no_model", {"format": "dist_dejpeg.generator.v1"}),
                       ("bad_model", {"format": "dist_dejpeg.generator.v1", "model": "{not json"}),
                       ("list_model", {"format": "dist_dejpeg.generator.v1", "model": "[1, 2]"})):
        path = tmp_path / f"{name}.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata=meta)
        assert _cli(["export", "--model", str(path), "--onnx", str(tmp_path / "x.onnx")]) == 2
        err = capsys.readouterr().err
        assert "model config" in err and str(path) in err and "Traceback" not in err, err
        assert _cli(["restore", str(tmp_path / "in.jpg"), "-o", str(tmp_path / "out"), "--model", str(path)]) == 2
        assert "model config" in capsys.readouterr().err


def test_a_generator_with_nan_weights_is_refused_before_the_export(exported, tmp_path, capsys):
    """A generator file (or checkpoint) whose weights hold a NaN: a minute of exporting, then "onnxruntime differs
    from PyTorch by more than 0.0001: {...: nan}" (exit 1), blaming the export; now exit 2 at once, naming the
    tensor."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, *_ = exported
    with safe_open(str(model), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(model))
    state["head.weight"] = torch.full_like(state["head.weight"], float("nan"))
    broken = tmp_path / "generator.safetensors"
    save_file(state, str(broken), metadata=meta)
    assert _cli(["export", "--model", str(broken), "--onnx", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "a broken model, not exported" in err and "head.weight" in err, err
    assert not (tmp_path / "x.onnx").exists()


def test_export_of_a_checkpoint_records_its_runs_shards_from_any_folder(tmp_path, monkeypatch, capsys, sample_shards):
    """`export --model runs/x/checkpoints/step-N` from another folder recorded `train_shards` {} (data.root read
    against the current folder); now the run's own shards and the folder they were read from. (The exporter's half
    minute is replaced by its graph for an untrained generator, which returns its input exactly: checked as ever.)"""
    import shutil
    from types import SimpleNamespace

    from onnx import TensorProto, helper
    from safetensors.torch import save_file

    from dist_dejpeg.config import Config, to_yaml
    from dist_dejpeg.models.names import shard_fingerprint

    start = tmp_path / "project"
    shutil.copytree(sample_shards, start / "data" / "set")
    trained = {p.name: shard_fingerprint(p) for p in (start / "data" / "set").glob("train-*.tar")}
    cfg = Config()
    cfg.model = ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, encoder_depth=2, decoder_width=8)
    cfg.data.root, cfg.train.run_dir = "data/set", "runs/x"
    ckpt = start / "runs" / "x" / "checkpoints" / "step-00000012"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in build_generator(cfg.model).state_dict().items()},
              str(ckpt / "model.safetensors"))
    (ckpt / "config.yaml").write_text(to_yaml(cfg))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
    dims = ["batch", 3, "height", "width"]
    graph = helper.make_graph([helper.make_node("Identity", ["degraded"], ["restored"])], "identity",
                              [helper.make_tensor_value_info("degraded", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("restored", TensorProto.FLOAT, dims)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: SimpleNamespace(model_proto=proto))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert _cli(["export", "--model", str(ckpt), "--onnx", "model.onnx"]) == 0, capsys.readouterr()
    meta = read_onnx_metadata("model.onnx")
    assert json.loads(meta["train_shards"]) == trained and len(trained) > 0
    assert meta["train_shards_from"] == str(start / "data" / "set")
    sources = json.loads((start / "data" / "set" / "manifest.json").read_text())["sources"]  # their photos too
    assert sorted(json.loads(meta["train_sources"]).values()) == sorted(n for n, s in sources.items()
                                                                       if s["split"] == "train")
