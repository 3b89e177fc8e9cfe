"""gpu-summary.json: the GPU check's headline numbers, read from the files its steps wrote (the training run's
own log, bench train's and bench infer's results, the data-wait runs, pytest's closing line), each null where
no step of the check measured it. Standard library only (PyYAML where installed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dist_dejpeg.bench.data_wait import RESULTS_JSON
from dist_dejpeg.run.files import atomic_write_text
from dist_dejpeg.run.layout import METRICS
from dist_dejpeg.train.run_log import RUN_LOG

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _first(mapping: dict, prefix: str) -> dict:
    """The first value whose key starts with ``prefix``: bench train's and bench infer's rows are keyed by their
    labels (bench/common.py's TUNED, bench/infer.py's MODES x SIZES: modules that import torch, so the prefixes are
    written here and tests/test_gpu_check.py holds them to those labels)."""
    return next((v for k, v in mapping.items() if k.startswith(prefix) and isinstance(v, dict)), {})


def _number(value) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# a test's line in pytest -v's output: "tests/test_x.py::test_y[p] PASSED    [ 42%]", "... SKIPPED (reason)   [ 50%]"
# (-rA's closing list puts the outcome first, and comes only after the run)
_TEST_LINE = re.compile(r"^\S+::.*? (PASSED|SKIPPED|FAILED|ERROR|XFAIL|XPASS)(?: \(.*\))?(?: +\[ *\d+%\])?\s*$")


def _pytest_counts(log: Path) -> tuple[int | None, int | None, bool | None]:
    """(passed, skipped, complete) from pytest's closing line in the pytest_gpu log; where the step was cut off before
    it (its time limit), the -v lines of the tests that ran, counted, and complete False: so many at least, not all;
    (None, None, None) when no test ran."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    closing = [line for line in text.splitlines() if re.match(r"^=+ .* in [\d.]+s", line)]
    if closing:
        counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", closing[-1])}
        return counts.get("passed", 0), counts.get("skipped", 0), True
    outcomes = [m.group(1) for m in map(_TEST_LINE.match, text.splitlines()) if m]
    if not outcomes:
        return None, None, None
    return outcomes.count("PASSED"), outcomes.count("SKIPPED"), False


# the start of the warning a run whose compiling fell back to eager logs (train/compile.py's FELL_BACK: a module that
# imports torch, so it is written here and tests/test_gpu_check.py holds the two equal)
FELL_BACK = "train.compile: compiling failed"


def _compiled(run: Path) -> bool | None:
    """Whether the run in ``run`` trained compiled: its resolved config.yaml's train.compile, and where that is
    true, no session of the run saying in its own log (train.log, as CompileWatch warns after the first step) that
    compiling fell back to eager; None: unknown (no config, or a compiled run without its log)."""
    try:
        import yaml

        value = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("train", {}).get("compile")
    except (OSError, ImportError, ValueError, AttributeError):  # no run, no PyYAML, not YAML (yaml.YAMLError)
        return None
    if value is not True:
        return value if isinstance(value, bool) else None
    try:
        text = (run / RUN_LOG).read_text(errors="replace")
    except OSError:
        return None
    return FELL_BACK not in text


TENSOR = "tensor in/out, tiled 512/64"  # bench/infer.py's TENSOR label (tests hold the two equal)


def write_gpu_summary(out: Path, *, card: str | None, date: str, commit: str, device: str,
                      first_variant: str | None) -> dict:
    """OUT/gpu-summary.json: the headline numbers this check measured (stale outputs were removed at its start, so
    every file read here is this check's), each null where no step measured it. Sources: the train step's own log
    (gen/gan images per s per device and the gen phase's data wait, from the last window of each phase in its
    metrics.json, as issue 24 asks; ``train_compiled`` says whether that run trained compiled: its config, and
    its train.log for a fall-back to eager), bench train's tuned row
    (``bench_*``; the GPU-busy share only where that row was profiled), data_wait's first variant (the config's own
    loader settings) where the train step did not run, bench infer's GPU rows at 2K tiled as restore runs them
    (bf16 autocast on CUDA, fp32 on a CPU; and fp32): a tensor on the GPU in and out (``restore_2k_ms``, issue
    24's measure), a uint8 array from the host, file to file, and its bf16 and fp32 outputs' PSNR difference; the
    12 MP tensor row; the pytest_gpu log's closing line (the -v lines counted where it was cut off before it)."""
    tuned = _first(_read_json(out / "results" / "train.json").get("results") or {}, "tuned")
    infer = _read_json(out / "results" / "infer.json").get("results") or {}
    waits = (_read_json(out / RESULTS_JSON).get("variants") or {}).get(first_variant) or {}
    logged = (_read_json(out / METRICS).get("meta") or {}).get("last_train_log") or {}
    gen, gan = logged.get("gen") or {}, logged.get("gan") or {}
    auto = "bf16" if device == "cuda" else "fp32"
    passed, skipped, complete = _pytest_counts(out / "pytest_gpu.log")
    wait = _number(gen.get("train/data_wait_frac"))
    report = {
        "card": card, "date": date, "commit": commit,
        "gen_img_s": _number(gen.get("train/images_per_s")),
        "gan_img_s": _number(gan.get("train/images_per_s")),
        "train_compiled": _compiled(out / "run") if logged else None,
        "bench_gen_img_s": _number((tuned.get("gen") or {}).get("images_per_s_per_device")),
        "bench_gan_img_s": _number((tuned.get("gan") or {}).get("images_per_s_per_device")),
        "gpu_busy_frac": _number(((tuned.get("gen") or {}).get("profile") or {}).get("device_busy_frac")),
        "data_wait_frac": wait if wait is not None else _number(waits.get("data_wait_frac")),
        "restore_2k_ms": _number(_first(infer, f"{device} {auto} {TENSOR} 2040").get("ms_per_call")),
        "restore_2k_fp32_ms": _number(_first(infer, f"{device} fp32 {TENSOR} 2040").get("ms_per_call")),
        "restore_2k_array_ms": _number(_first(infer, f"{device} {auto} tiled 512/64 2040").get("ms_per_call")),
        "restore_2k_file_ms": _number(_first(infer, f"{device} {auto} file to file").get("ms_per_call")),
        "restore_12mp_ms": _number(_first(infer, f"{device} {auto} {TENSOR} 12 MP").get("ms_per_call")),
        "restore_bf16_minus_fp32_db": _number(_first(infer, f"{device} bf16 vs fp32 2040").get("bf16_minus_fp32_db")),
        # complete False: the pytest step was cut off (its time limit), the counts are those of the tests that ran
        "gpu_tests_passed": passed, "gpu_tests_skipped": skipped, "gpu_tests_complete": complete,
    }
    atomic_write_text(out / "gpu-summary.json", json.dumps(report, indent=2) + "\n")
    return report
