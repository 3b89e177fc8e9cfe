"""bench infer's order (issue 24): the GPU rows run first and stand in a section of their own, their results are on
disk before any CPU row runs, and --no-cpu leaves the CPU rows out. A fake GPU list and a fake restorer stand in
for CUDA, and a recorder for the GPU section's own rows (tests/test_bench.py runs the real CPU rows, and those GPU
rows with the CPU standing in)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dist_dejpeg.cli import main

TINY = ["model.decoder_width=16", "model.encoder=mobilenetv3_small_050"]
SIZES = {"32 x 48": (32, 48)}
MODES = {"whole": dict(tile=0), "tiled": dict(tile=64, overlap=16)}


class Fake:
    """A restorer that records where it was opened and copies its input (or fails on ``fail_on``: a device, or a
    device and precision)."""

    calls: list = []
    fail_on: str | None = None

    def __init__(self, path, device="cpu", precision="fp32", **kwargs):
        self.device, self.precision = device, precision
        Fake.calls.append((device, precision, kwargs))

    def restore_array(self, rgb: np.ndarray, quality=None) -> np.ndarray:
        if Fake.fail_on in (self.device, f"{self.device} {self.precision}"):
            raise RuntimeError(f"stopped on {self.device}")
        return rgb.copy()


@pytest.fixture
def fake(monkeypatch, repo_root):
    from dist_dejpeg.bench import infer

    monkeypatch.chdir(repo_root)
    monkeypatch.setattr("dist_dejpeg.restore.open_restorer", Fake)
    # infer.gpu_rows (a tensor on the device, file to file), folder_rows and conform_rows: recorded where called
    monkeypatch.setattr(infer, "gpu_rows", lambda device, *args: Fake.calls.append((str(device), "gpu_rows", {})))
    for rows in ("folder_rows", "conform_rows"):
        monkeypatch.setattr(infer, rows, lambda restorer, device, *args, rows=rows: Fake.calls.append(
            (str(device), rows, {})))
    Fake.calls, Fake.fail_on = [], None
    return Fake


def test_gpu_rows_first_in_their_own_section(tmp_path, fake):
    from dist_dejpeg.bench import infer

    report = infer.run("configs/debug.yaml", TINY, tmp_path, repeats=1, sizes=SIZES, gpus=["cuda:0"])
    # (fp32, bf16) x (whole, tiled, and on the GPU tiled without graphs): the GPU's first
    assert [(device, precision) for device, precision, _ in fake.calls] == (
        [("cuda:0", "fp32")] * 3 + [("cuda:0", "bf16")] * 3 + [("cuda:0", "gpu_rows"), ("cuda:0", "folder_rows"),
                                                                ("cuda:0", "conform_rows")]
        + [("cpu", "fp32")] * 2 + [("cpu", "bf16")] * 2)
    assert fake.calls[2][2] == dict(tile=512, overlap=64, cuda_graphs=False)
    keys = list(report["results"])
    assert keys[:3] == ["cuda fp32 whole 32 x 48", "cuda fp32 tiled 512/64 32 x 48",
                        "cuda fp32 tiled 512/64 eager (no CUDA graphs) 32 x 48"]
    assert [k.split()[0] for k in keys] == ["cuda"] * 6 + ["cpu"] * 4
    md = (tmp_path / "infer.md").read_text().splitlines()
    gpu, cpu = md.index("| **GPU rows** |  |  |  |  |  |  |  |"), md.index("| **CPU rows** |  |  |  |  |  |  |  |")
    assert gpu < cpu and all(line.startswith("| cuda |") for line in md[gpu + 1:cpu])
    assert all(line.startswith("| cpu |") for line in md[cpu + 1:]) and len(md) - cpu - 1 == 4
    assert report["pending"] is None and "Incomplete" not in "\n".join(md)


def test_gpu_results_are_written_before_the_cpu_rows(tmp_path, fake):
    """A CPU row that fails (or a step stopped for time during the CPU rows) leaves the GPU rows on disk."""
    from dist_dejpeg.bench import infer

    fake.fail_on = "cpu"
    with pytest.raises(RuntimeError, match="stopped on cpu"):
        infer.run("configs/debug.yaml", TINY, tmp_path, repeats=1, sizes=SIZES, modes=MODES, gpus=["cuda:0"])
    report = json.loads((tmp_path / "infer.json").read_text())
    assert report["pending"] == "the CPU rows" and list(report["results"]) == [
        "cuda fp32 whole 32 x 48", "cuda fp32 tiled 32 x 48", "cuda bf16 whole 32 x 48", "cuda bf16 tiled 32 x 48"]
    md = (tmp_path / "infer.md").read_text()
    assert "Incomplete: the CPU rows still to measure" in md and "**CPU rows**" not in md


@pytest.mark.parametrize("cpu", [False, True])
def test_each_gpu_block_is_on_disk_when_measured(tmp_path, fake, cpu):
    """A GPU check's bench infer --no-cpu stopped for time (its step's SIGTERM) in any GPU block keeps the blocks
    before it: the results are written after each, and pending says what is still to come."""
    from dist_dejpeg.bench import infer

    def read() -> dict:
        return json.loads((tmp_path / "infer.json").read_text())

    fake.fail_on = "cuda:0 bf16"  # stopped in the second block: the first one's rows are on disk
    with pytest.raises(RuntimeError, match="stopped on cuda:0"):
        infer.run("configs/debug.yaml", TINY, tmp_path, repeats=1, sizes=SIZES, modes=MODES, gpus=["cuda:0"], cpu=cpu)
    later = ["cuda:0 tensor and file rows", "cuda:0 folder rows", f"cuda:0 {infer.CONFORM} rows"] + [
        "the CPU rows"] * cpu
    assert read()["pending"] == ", ".join(["cuda:0 bf16 restore rows"] + later)
    assert list(read()["results"]) == ["cuda fp32 whole 32 x 48", "cuda fp32 tiled 32 x 48"]
    assert f"Incomplete: cuda:0 bf16 restore rows, {later[0]}" in (tmp_path / "infer.md").read_text()

    def stop(*args):
        raise KeyboardInterrupt("the step's time limit")

    fake.fail_on = None
    for stopped, pending in (("gpu_rows", later), ("folder_rows", later[1:]), ("conform_rows", later[2:])):
        recorder = getattr(infer, stopped)
        setattr(infer, stopped, stop)
        try:
            with pytest.raises(KeyboardInterrupt):
                infer.run("configs/debug.yaml", TINY, tmp_path, repeats=1, sizes=SIZES, modes=MODES,
                          gpus=["cuda:0"], cpu=cpu)
        finally:
            setattr(infer, stopped, recorder)
        assert read()["pending"] == ", ".join(pending) and len(read()["results"]) == 4


def test_no_cpu_runs_the_gpu_rows_alone(tmp_path, fake, capsys):
    from dist_dejpeg.bench import infer

    report = infer.run("configs/debug.yaml", TINY, tmp_path, repeats=1, sizes=SIZES, modes=MODES, gpus=["cuda:0"],
                       shell={"32 x 48": (32, 48)}, onnx=True, cpu=False)
    assert {device for device, _, _ in fake.calls} == {"cuda:0"} and report["shell"] == {} and report["onnx"] == {}
    assert fake.calls[-1] == ("cuda:0", "conform_rows", {})
    assert all(k.startswith("cuda ") for k in report["results"]) and len(report["results"]) == 4
    with pytest.raises(ValueError, match="leaves nothing to measure"):
        infer.run("configs/debug.yaml", TINY, tmp_path, sizes=SIZES, modes=MODES, gpus=[], cpu=False)
    if not torch.cuda.is_available():  # the flag, on a machine without a GPU: a usage error, nothing measured
        assert main(["bench", "infer", "--no-cpu", "--results", str(tmp_path / "none")]) == 2
        assert "leaves nothing to measure" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_the_gpu_rows_bf16_deviation_is_that_of_a_model_that_changes_the_image(tmp_path):
    """gpu_rows, run here on the CPU (bf16 autocast works there too): the bench's generator changes the image, so
    bf16's PSNR deviation from fp32 is measured, not 0 by construction (a zero-init head returns the input)."""
    from dist_dejpeg.bench import infer
    from dist_dejpeg.config import load_config

    cfg = load_config(None, ["model.encoder=mobilenetv3_small_050", "model.pretrained=false",
                             "model.decoder_width=16"])
    model = infer.save_bench_generator(cfg.model, tmp_path / "generator.safetensors")
    results, rows = {}, []
    sizes = {"2040 x 1356 (small)": (64, 96)}
    restorer = infer.gpu_rows(torch.device("cpu"), model, tmp_path, sizes, 1, lambda *row: rows.append(row), results)
    infer.folder_rows(restorer, torch.device("cpu"), tmp_path, sizes, lambda *row: rows.append(row))  # (run: last)
    infer.conform_rows(restorer, torch.device("cpu"), sizes, 1, lambda *row: rows.append(row))
    entry = results["cpu bf16 vs fp32 2040 x 1356 (small)"]
    assert entry["psnr_fp32_db"] != entry["psnr_bf16_db"] and abs(entry["bf16_minus_fp32_db"]) < 1.0
    assert [(r[1], r[2]) for r in rows][:2] == [("fp32", infer.TENSOR), ("bf16", infer.TENSOR)]
    # then a folder with 2 decode/encode threads and restore's default, and restore's consistency projection: the
    # restorer's own (a GPU's, there) and numpy's on the host
    from dist_dejpeg.restore.files import MAX_IO_THREADS
    from dist_dejpeg.run.pool import pool_size

    threads = sorted({2, max(2, pool_size(0, MAX_IO_THREADS))})  # (one row where the default is 2)
    n = len(threads) + 2
    assert [r[2] for r in rows][-n:] == [f"{infer.FOLDER}, {t} decode/encode threads" for t in threads] + [
        f"{infer.CONFORM} (Restorer.conform)", f"{infer.CONFORM} (numpy, host)"]
    assert [(r[4], r[5]) for r in rows][-n:] == [(64, 96)] * n
    assert len(list((tmp_path / "folder_out2").glob("*.png"))) == infer.FOLDER_FILES
