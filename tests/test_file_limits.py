"""Small inputs that would take many GB of memory read (a sparse file, a tar's sparse member, a zip bomb) are
refused, named, before they are read: each the failure of its own file, never the run's (jpeg/formats.py:
MAX_FILE_BYTES). The files here are sparse (truncate), so they cost nothing on disk."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_dejpeg.evaluation.references import read_references
from dist_dejpeg.jpeg import formats


def _png(seed: int = 0, side: int = 48) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def small_limit(monkeypatch):
    """MAX_FILE_BYTES lowered to 64 KiB: a "too big" file needs no GB to be one."""
    monkeypatch.setattr(formats, "MAX_FILE_BYTES", 64 << 10)
    monkeypatch.setattr(formats, "BYTES_PER_PIXEL", 0)


def _sparse_tar(tmp_path: Path, before: int = 0) -> Path:
    """A GNU tar of ``before`` whole PNGs, then one followed by a hole: sparse (4 MiB read, a few KB in the tar)."""
    if shutil.which("tar") is None or "GNU" not in subprocess.run(["tar", "--version"], capture_output=True,
                                                                   text=True).stdout:
        pytest.skip("GNU tar makes sparse members")
    src = tmp_path / "src"
    src.mkdir()
    names = [f"{i:03d}.png" for i in range(before + 1)]
    for i, name in enumerate(names):
        (src / name).write_bytes(_png(i))
    os.truncate(src / names[-1], 4 << 20)
    out = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-C", str(src), "-cf", str(out), *names], check=True)
    with tarfile.open(out) as tar:
        if not tar.getmembers()[-1].issparse():
            pytest.skip("this filesystem reports no holes: tar wrote the member whole")
    return out


def test_evaluate_skips_a_sparse_shard_member_unread(tmp_path, monkeypatch):
    shard = _sparse_tar(tmp_path)
    good = _tar(tmp_path / "good.tar", {"001.png": _png(1)})
    read = []
    real = tarfile.ExFileObject.read
    monkeypatch.setattr(tarfile.ExFileObject, "read", lambda self, *a: read.append(real(self, *a)) or read[-1])
    refs, skipped = read_references([str(shard), str(good)])
    assert [r.source for r in refs] == ["good.tar:001"]
    assert len(skipped) == 1 and "sparse.tar:000" in skipped[0] and "sparse tar member" in skipped[0]
    assert [len(data) for data in read] == [len(_png(1))]  # the sparse member was never read


def test_evaluate_skips_a_file_or_member_over_the_size_limit(tmp_path, small_limit):
    big = tmp_path / "big.png"
    big.write_bytes(_png(2))
    os.truncate(big, 1 << 20)  # (1 MiB, most of it a hole)
    shard = _tar(tmp_path / "s.tar", {"000.png": _png(3, 480), "001.png": _png(4)})  # (690 KB: over 8 x 64 KiB)
    ok, layered = tmp_path / "ok.png", tmp_path / "layered.png"  # (real bytes over the limit, under 8 x: read)
    ok.write_bytes(_png(5))
    layered.write_bytes(_png(6, 200))
    assert (64 << 10) < layered.stat().st_size < (512 << 10)
    refs, skipped = read_references([str(big), str(shard), str(ok), str(layered)])
    assert sorted(r.source for r in refs) == sorted(["s.tar:001", str(ok), str(layered)])
    assert len(skipped) == 2, skipped
    assert any("(a sparse file or a decompression bomb): not read" in s for s in skipped)
    assert any("GiB an image file is read with: not read; restore and prepare's --max-pixels" in s for s in skipped)


def test_evaluate_out_of_memory_on_one_reference_skips_it(tmp_path, monkeypatch):
    from dist_dejpeg.evaluation import references

    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
    real = references.decode_rgb8

    def decode(data, *a, **k):
        if data == _png(0):
            raise MemoryError
        return real(data, *a, **k)

    monkeypatch.setattr(references, "decode_rgb8", decode)
    refs, skipped = read_references([str(tmp_path)])
    assert [r.source for r in refs] == [str(tmp_path / "1.png")]
    assert skipped == [f"{tmp_path / '0.png'}: not enough memory to read and decode it"]


def _jpeg(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_png(seed))).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def test_restore_refuses_a_sparse_photo_unread(tmp_path, monkeypatch):
    from dist_dejpeg.restore.images import InputImageError, load_image

    photo = tmp_path / "big.jpg"
    photo.write_bytes(_jpeg())
    os.truncate(photo, 6 << 30)  # (a hole: nothing on disk)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read whole"))
    with pytest.raises(InputImageError, match=r"big.jpg: 6 GiB from 0.00\d+ MiB stored \(a sparse file"):
        load_image(photo)
    assert formats.file_limit(400_000_000) == 4_000_000_000  # (--max-pixels raised: a larger file is read)


def test_restore_out_of_memory_loading_one_photo_is_that_photos_failure(tmp_path, monkeypatch):
    from dist_dejpeg.restore import images

    photo = tmp_path / "a.jpg"
    photo.write_bytes(_jpeg())

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(images, "structure_problem", out_of_memory)
    with pytest.raises(images.InputImageError, match=r"a.jpg: not enough memory to load it"):
        images.load_image(photo)


def test_training_reads_the_samples_before_a_sparse_member_and_names_the_shard(tmp_path, monkeypatch):
    from dist_dejpeg.data import reading

    shard = str(_sparse_tar(tmp_path, before=2))
    monkeypatch.setattr(reading, "_STOPS", {})
    monkeypatch.setattr(reading, "_INDEX", {})
    for read in (lambda report: reading.shard_samples([shard], report),
                 lambda report: reading.dealt_samples([shard], 1, 0, report)):
        reports = []
        samples = list(read(lambda s, why: reports.append((s, why))))
        assert [(s["__key__"], s["png"]) for s in samples] == [("000", _png(0)), ("001", _png(1))]
        assert reports == [(shard, "002.png: a sparse tar member of 4194304 bytes (holes of zeros, not an image): "
                                   "not read")]


def test_prepare_div2k_refuses_a_zip_bomb_member_unread(tmp_path, small_limit, monkeypatch):
    import zipfile

    from dist_dejpeg.data.div2k import Source, _tile_one

    archive = tmp_path / "DIV2K_train_HR.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("DIV2K_train_HR/0001.png", b"\0" * (1 << 20))  # (1 MiB of zeros: 1 KB compressed)
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda *a: pytest.fail("the member was read"))
    record = _tile_one(Source("0001", "train", str(archive), "DIV2K_train_HR/0001.png"), tmp_path, 32, 32, "png")
    assert record["rejected"].startswith("too large: 0.000977 GiB from 0.000985 MiB stored (a sparse file or a "
                                         "decompression bomb)"), record


def test_prepare_folder_refuses_a_sparse_photo_unread(tmp_path, small_limit):
    from dist_dejpeg.data.folder import read_source
    from dist_dejpeg.data.images import TooManyPixels

    photo = tmp_path / "a.png"
    photo.write_bytes(_png())
    os.truncate(photo, 1 << 20)
    with pytest.raises(TooManyPixels, match=r"0.000977 GiB from 0.0\d+ MiB stored \(a sparse file"):
        read_source(photo)


def test_prepare_div2k_folder_takes_regular_files_only(tmp_path):
    from dist_dejpeg.data.div2k import find_sources

    folder = tmp_path / "DIV2K_train_HR"
    folder.mkdir()
    (folder / "0001.png").write_bytes(_png())
    (tmp_path / "elsewhere.png").write_bytes(_png(1))
    (folder / "0002.png").symlink_to(tmp_path / "elsewhere.png")  # (a link to a photo: used)
    os.mkfifo(folder / "0009.png")  # (read: prepare would wait for a writer forever)
    (folder / "0010.png").symlink_to("/dev/zero")  # (read: memory grows until MemoryError)
    sources, _ = find_sources(tmp_path, "train")
    assert [Path(s.path).name for s in sources] == ["0001.png", "0002.png"]


@pytest.mark.parametrize("meta", [{"pad_to": "100000"}, {"pad_to": "0"}, {"pad_to": "abc"}, {"pad_to": "-5"},
                                  {"pad_to": "48"}, {"attention_at": "1000"}, {"attention_at": "3"}])
def test_an_onnx_files_strides_are_checked(meta):
    from dist_dejpeg.models.generator_file import ModelFileError
    from dist_dejpeg.restore.onnx_backend import attention_at, onnx_info

    key = next(iter(meta))
    with pytest.raises(ModelFileError, match=f"m.onnx: its metadata's {key} is '{meta[key]}', not a power of two"):
        onnx_info("m.onnx", meta, type("Session", (), {"get_providers": lambda self: ["CPUExecutionProvider"]})())
    assert attention_at({"attention_at": "null"}, {}, 32) == 0 and attention_at({"attention_at": "8"}, {}, 32) == 8


def test_a_model_files_encoder_from_a_strangers_hub_repository_is_refused_unfetched(monkeypatch):
    """A model file naming hf-hub:evil-org/beacon had restore send a request there (a beacon); timm's own hub models,
    a local folder, and any repository once the user trusts the file (DIST_DEJPEG_TRUST_ENCODER=1) are built."""
    from dist_dejpeg.config import ModelConfig
    from dist_dejpeg.models import generator_file

    monkeypatch.delenv("DIST_DEJPEG_TRUST_ENCODER", raising=False)
    monkeypatch.setattr(generator_file, "build_generator", lambda cfg, resolved=None: pytest.fail(f"built {cfg.encoder}"))
    with pytest.raises(generator_file.ModelFileError, match="m.safetensors: its encoder 'hf-hub:evil-org/beacon' is "
                       "built from a Hugging Face repository it names, fetched: set DIST_DEJPEG_TRUST_ENCODER=1"):
        generator_file._build_and_load(ModelConfig(encoder="hf-hub:evil-org/beacon"), {}, "m.safetensors")
    built = []
    monkeypatch.setattr(generator_file, "build_generator", lambda cfg, resolved=None: built.append(cfg.encoder) or 1 / 0)
    names = ["hf-hub:timm/mobilenetv3_large_100.ra_in1k", "local-dir:/tmp/x", "hf-hub:evil-org/beacon"]
    for name in names:
        if name == names[-1]:
            monkeypatch.setenv("DIST_DEJPEG_TRUST_ENCODER", "1")
        with pytest.raises(generator_file.ModelFileError):  # (built, then failed: no weights)
            generator_file._build_and_load(ModelConfig(encoder=name), {}, "m")
    assert built == names


def test_training_with_a_strangers_hub_encoder_says_when_its_generator_file_needs_trust(monkeypatch, caplog):
    """A run whose encoder is another hf-hub: repository trains; its generator file records the architecture the
    name resolves to and loads untrusted, but where that repository's config has model_args (not built from the
    record) it loads only with DIST_DEJPEG_TRUST_ENCODER=1: said at its start, not found out at restore."""
    from types import SimpleNamespace

    from dist_dejpeg.config import Config, ConfigError
    from dist_dejpeg.train import build

    def stop(*args):
        raise ConfigError("not built further here")

    monkeypatch.delenv("DIST_DEJPEG_TRUST_ENCODER", raising=False)
    monkeypatch.setattr(build, "generator_notes", stop)
    for encoder, args, warned in (("hf-hub:someorg/net", {"drop_rate": 0.1}, True), ("hf-hub:someorg/net", {}, False),
                                  ("hf-hub:timm/mobilenetv3_large_100", {"drop_rate": 0.1}, False)):
        built = SimpleNamespace(encoder=SimpleNamespace(pretrained_cfg={"architecture": "mobilenetv3_large_100"},
                                                        _model_args={"features_only": True, **args}))
        monkeypatch.setattr(build, "build_generator", lambda model_cfg: built)
        cfg = Config()
        cfg.model.encoder = encoder
        caplog.clear()
        with pytest.raises(ConfigError, match="not built further here"):
            build.build_parts(cfg, SimpleNamespace(is_main_process=True))
        assert ("DIST_DEJPEG_TRUST_ENCODER=1" in caplog.text) == warned, caplog.text
