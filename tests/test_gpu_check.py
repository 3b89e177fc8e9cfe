"""benchmarks/gpu_wheels.sh and benchmarks/gpu_check.sh, on this machine (no GPU; pip reaches PyPI).

The wheel folder is made once for the module (it needs PyPI); then the offline install exactly as the check
does it, the check's refusal without CUDA (exit 3), and the whole check flow on the CPU (--allow-cpu --quick).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WHEELS_SH = REPO / "benchmarks" / "gpu_wheels.sh"
CHECK_SH = REPO / "benchmarks" / "gpu_check.sh"
PREFIXES = ("lpips", "webdataset", "braceexpand", "omegaconf", "antlr4_python3_runtime", "dist_dejpeg")
# The CPU flow runs the steps that only the check exercises; `bench train/data/infer` are the same commands that
# tests/test_bench.py runs (and --steps is what a GPU session uses to put the most telling steps first).
FLOW = "pytest_gpu,train,evaluate,data_wait"
STEPS = ("env", "install", "cuda", *FLOW.split(","))
SKIPPED = {"cuda": "skipped: no CUDA"}


def _env(**extra: str) -> dict[str, str]:
    """This interpreter as the scripts' python3, no inherited PYTHONPATH, GPUs hidden."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def _run(cmd, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_wheels")
    proc = _run(["bash", WHEELS_SH, out], timeout=600, env=_env(), cwd=REPO)
    assert proc.returncode == 0, f"gpu_wheels.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "total:" in proc.stdout
    return out


def test_wheel_folder(wheels):
    files = sorted(wheels.glob("*.whl"))
    for prefix in PREFIXES:
        found = [f.name for f in files if f.name.startswith(prefix + "-")]
        assert len(found) == 1, f"{prefix}: {found} in {[f.name for f in files]}"
    assert len(files) == len(PREFIXES), [f.name for f in files]
    assert all(f.name.endswith(("-py3-none-any.whl", "-py2.py3-none-any.whl")) for f in files), files
    assert any(f.name.startswith("antlr4_python3_runtime-4.9.3-") for f in files)
    assert any(f.name.startswith("omegaconf-2.3.0-") for f in files)
    total = sum(f.stat().st_size for f in wheels.iterdir())
    assert total < 60e6, total


def test_offline_install_imports_from_target(wheels, tmp_path):
    target = tmp_path / "site"
    proc = _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                 "--no-cache-dir", "--target", target, *sorted(wheels.glob("*.whl"))], timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = (
        "import json, dist_dejpeg, lpips, webdataset, omegaconf\n"
        "from dist_dejpeg.config import load_config\n"
        "cfg = omegaconf.OmegaConf.create({'a': '${b}', 'b': 3})\n"
        "assert cfg.a == 3\n"
        "print(json.dumps({m.__name__: m.__file__ for m in (dist_dejpeg, lpips, webdataset, omegaconf)}))\n"
    )
    work = tmp_path / "elsewhere"  # not the repository root, whose dist_dejpeg would be imported first
    work.mkdir()
    proc = _run([sys.executable, "-c", code], timeout=300, cwd=work, env=_env(PYTHONPATH=str(target)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, file in files.items():  # the wheels' copies shadow this venv's (omegaconf 2.3.0 here, too)
        assert Path(file).resolve().is_relative_to(target.resolve()), (name, file)


def test_check_without_cuda_exits_3(wheels, tmp_path):
    out = tmp_path / "out"
    proc = _run(["bash", CHECK_SH, "--wheels", wheels, "--out", out], timeout=300, cwd=REPO, env=_env())
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "CUDA" in proc.stderr and "--allow-cpu" in proc.stderr, proc.stderr
    assert not list(out.glob("*.log"))  # nothing was run


def _summary_rows(text: str) -> dict[str, tuple[str, str, str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[0] in STEPS:
            rows[cells[0]] = (cells[1], cells[2], cells[3])
    return rows


@pytest.mark.slow
def test_check_flow_on_cpu(wheels, tmp_path):
    out = tmp_path / "out"
    # a short TMPDIR of its own (multiprocessing's AF_UNIX sockets go there), to see that the check cleans it
    tmp = Path(tempfile.mkdtemp(prefix="gpuchk"))
    try:
        proc = _run(["bash", CHECK_SH, "--wheels", wheels, "--out", out, "--allow-cpu", "--quick", "--budget", "900",
                     "--steps", FLOW],
                    timeout=1000, cwd=REPO, env=_env(TMPDIR=str(tmp)))
        left = list(tmp.iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{summary}"
    rows = _summary_rows(summary)
    assert list(rows) == list(STEPS), summary
    for step, (code, _, result) in rows.items():
        assert code == "0", (step, summary)
        assert result == SKIPPED.get(step, "ok"), (step, summary)
    for step in STEPS:
        assert (out / f"{step}.log").is_file(), step
    assert "dist_dejpeg from" in (out / "install.log").read_text()
    assert json.loads((out / "evaluate" / "metrics.json").read_text())["meta"]["images"] == 2
    table = (out / "data_wait.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["packed-ahead"], table  # one run without CUDA
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads((out / "run" / "metrics.json").read_text())
    assert not left, left  # the check's scratch folder (installed wheels, sample shards, TMPDIR) is gone
