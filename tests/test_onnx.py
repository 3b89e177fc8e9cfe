"""ONNX export (dist-dejpeg export): dynamic batch/height/width, onnxruntime vs PyTorch on a real photo,
metadata, exit codes. One export for the module (the dynamo exporter is the slow part), of a
quality-conditioned generator: its graph has both inputs; a blind one is the same graph without ``quality``."""

from __future__ import annotations

import dataclasses
import json
import re

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
from dist_dejpeg.models.onnx_export import (ONNX_FORMAT, TOLERANCE, check_batch, fold_spectral_norm,  # noqa: E402
                                            load_check_image, read_onnx_metadata)

CFG = ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=32, quality_conditioning=True)
GAINS = {10: 0.5, 40: 0.1, 60: -0.2}


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
    folder = tmp_path_factory.mktemp("onnx")
    model, onnx_path = folder / "generator.safetensors", folder / "model.onnx"
    save_generator(_trained_like_generator(), CFG, model,
                   extra={"global_step": 7, "val_psnr_gain": json.dumps(GAINS)})
    return model, onnx_path


def test_export_matches_pytorch_on_a_photo_at_two_sizes(exported, capsys):
    model, onnx_path = exported
    assert _cli(["export", "--model", str(model), "--onnx", str(onnx_path)]) == 0
    out = capsys.readouterr().out
    diffs = {m[0]: float(m[1]) for m in re.findall(r"(\d+x3x\d+x\d+): max abs difference ([0-9.e+-]+)", out)}
    with capsys.disabled():
        print(f"\nonnxruntime vs PyTorch (max abs difference on [0, 1]): {diffs}")
    assert set(diffs) == {"1x3x200x152", "2x3x96x160"}, out
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
    assert "quality" in meta["input"]
    assert session.get_modelmeta().custom_metadata_map["format"] == ONNX_FORMAT


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
    assert "pip install 'dist_dejpeg[onnx]'" in capsys.readouterr().err
