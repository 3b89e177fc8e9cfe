#!/usr/bin/env bash
# GPU check of dist_dejpeg in one script, for a machine with one NVIDIA GPU, PyTorch already installed and
# no network (../shared/ENV.md, "A GPU machine without network": Python 3.12, torch 2.11 + CUDA 13,
# torchvision, timm, accelerate, ... but no lpips, webdataset, omegaconf, DALI, nor this project).
#
# 1. Here, where pip reaches PyPI, make the wheel folder (pure-Python wheels, under 1 MB):
#        benchmarks/gpu_wheels.sh /path/to/wheels
# 2. Carry the checkout and that folder to the GPU machine; there, from the repository root:
#        benchmarks/gpu_check.sh --wheels /path/to/wheels --out /path/to/out [--quick] [--allow-cpu]
#    --quick      tiny settings everywhere (a smoke test; about a minute on a GPU)
#    --allow-cpu  run the flow without CUDA (the CUDA step is skipped; the training run uses --quick's
#                 settings); without it, no CUDA means exit 3 at once
#    --budget S   stop starting steps once S seconds have gone (default 470: the whole check ends within
#                 8 minutes; each step also has its own timeout)
#    --steps A,B  run only these of the optional steps, in this order (env, install and cuda always run first)
#    --tests EXPR pytest_gpu runs only the gpu tests matching this -k expression
#    --compile    data_wait trains with train.compile=true (a shorter step: the data path must keep up with
#                 it); run bench_train first in the same check and inductor's cache makes these compiles quick
#    --rungs      bench_train times the whole ladder (every rung, each compiled row minutes of compiling);
#                 without it: the naive baseline, the CUDA graphs rung (the tuned pieces + compile mode
#                 reduce-overhead) and the config's tuned row (the 2.5x target's ratio)
#    --wait A,B   data_wait runs only these of its variants (packed-ahead, packed-ahead-stream0, list-ahead,
#                 cpu-workers), in this order
# Steps, in order: env, install, cuda, pytest_gpu, bench_train, train, evaluate, data_wait, bench_data, bench_infer. Each one runs even when an
# earlier one failed, under `timeout`, with its stdout+stderr in OUT/<step>.log; OUT/summary.md gets a row per
# step (exit code, seconds, result) and, under the table, the last lines of each failing step's log.
# Also in OUT: results/ (bench train.json/.md, data.json/.md), run/ (the training run) and metrics.json.
# The wheels are installed with `pip --target` into a temporary folder put first on PYTHONPATH (nothing is
# installed into the machine's Python); that folder, the sample data and TMPDIR are removed at the end.
# Exit: 0 every step passed, 1 some step failed, 2 usage error, 3 no CUDA (and no --allow-cpu).
#
# NVIDIA DALI is not in the wheel folder: with its nvimgcodec/nvjpeg wheels it is about 300 MB, too big to
# carry. The GPU tests that need DALI skip themselves, `bench data` leaves out its DALI rows, and training
# uses data.backend=torch with the GPU (nvJPEG) JPEG degradation.
set -u

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

ARGS=$(printf ' %q' "$@")
WHEELS="" OUT="" ALLOW_CPU=0 QUICK=0 BUDGET=470 ONLY="" TESTS="" COMPILE=false RUNGS=0 WAIT=""
while (($#)); do
    case $1 in
        --wheels) WHEELS=${2-}; shift 2 || break ;;
        --out) OUT=${2-}; shift 2 || break ;;
        --allow-cpu) ALLOW_CPU=1; shift ;;
        --quick) QUICK=1; shift ;;
        --budget) BUDGET=${2-}; shift 2 || break ;;
        --steps) ONLY=${2-}; shift 2 || break ;;
        --tests) TESTS=${2-}; shift 2 || break ;;
        --compile) COMPILE=true; shift ;;
        --rungs) RUNGS=1; shift ;;
        --wait) WAIT=${2-}; shift 2 || break ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
if [[ -z $WHEELS || -z $OUT ]]; then
    echo "gpu_check.sh: --wheels DIR and --out OUTDIR are required" >&2; usage >&2; exit 2
fi
if ! [[ $BUDGET =~ ^[0-9]+$ ]]; then echo "gpu_check.sh: --budget takes whole seconds" >&2; exit 2; fi
if ! compgen -G "$WHEELS/*.whl" > /dev/null; then
    echo "gpu_check.sh: no wheels in '$WHEELS' (make them with benchmarks/gpu_wheels.sh DIR where pip reaches PyPI)" >&2
    exit 2
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
WHEELS=$(cd "$WHEELS" && pwd) || exit 2
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
SUMMARY=$OUT/summary.md
OPTIONAL=(pytest_gpu bench_train train evaluate data_wait bench_data bench_infer)
if [[ -n $ONLY ]]; then
    IFS=, read -r -a CHOSEN <<< "$ONLY"
    for s in "${CHOSEN[@]}"; do
        [[ " ${OPTIONAL[*]} " == *" $s "* ]] || { echo "gpu_check.sh: unknown step '$s' (steps: ${OPTIONAL[*]})" >&2; exit 2; }
    done
    OPTIONAL=("${CHOSEN[@]}")
fi
STEPS=(env install cuda "${OPTIONAL[@]}")
for s in "${STEPS[@]}"; do rm -f "$OUT/$s.log"; done
rm -rf "$OUT/run" "$OUT/results" "$OUT/metrics.json" "$SUMMARY"
PY=${PYTHON:-python3}
MODE=full; ((QUICK)) && MODE=quick

# --- CUDA or not, before anything else -------------------------------------------------------------------
probe=$(timeout -k 5 120 "$PY" -c 'import torch; print(int(torch.cuda.is_available()), torch.__version__, torch.version.cuda)' 2>&1)
probe_rc=$?
HAVE_CUDA=0
if ((probe_rc == 0)) && [[ $(tail -n 1 <<< "$probe") == 1\ * ]]; then HAVE_CUDA=1; fi
if ((!HAVE_CUDA)); then
    if ((probe_rc != 0)); then
        why="PyTorch cannot be imported by $PY (exit $probe_rc): $(tail -n 1 <<< "$probe")"
    else
        read -r _ tv tc <<< "$(tail -n 1 <<< "$probe")"
        smi="nvidia-smi: not found"
        command -v nvidia-smi > /dev/null && smi="nvidia-smi: $(nvidia-smi -L 2>&1 | head -n 1)"
        why="CUDA is not available: torch.cuda.is_available() is False (torch $tv, built for CUDA $tc); $smi; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}"
    fi
    if ((!ALLOW_CPU)); then
        printf '# GPU check: not run\n\n%s\n\nNo CUDA device: nothing was run (pass --allow-cpu to run the flow on the CPU).\n' "$why" > "$SUMMARY"
        echo "gpu_check.sh: $why" >&2
        echo "gpu_check.sh: this check needs a CUDA GPU (pass --allow-cpu to run the flow on the CPU anyway)" >&2
        exit 3
    fi
    echo "gpu_check.sh: $why -- running on the CPU (--allow-cpu)"
fi

# --- scratch space: the installed wheels, the sample shards, TMPDIR and compiler caches ---------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
STEP_PID=""
trap 'rm -rf "$WORK"' EXIT
trap '[[ -n $STEP_PID ]] && kill -KILL -- "-$STEP_PID" 2> /dev/null; echo "gpu_check: interrupted" >&2; exit 130' INT TERM
SITE=$WORK/site DATA=$WORK/data
mkdir -p "$SITE" "$WORK/t" "$WORK/cache"
# a short TMPDIR: multiprocessing puts AF_UNIX sockets (108-byte path limit) under it
export TMPDIR=$WORK/t TRITON_CACHE_DIR=$WORK/cache/triton MPLCONFIGDIR=$WORK/cache/matplotlib
export PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export ROOT OUT WHEELS SITE DATA WORK PY QUICK HAVE_CUDA TESTS COMPILE RUNGS WAIT

{
    echo "# GPU check ($MODE)"
    echo
    echo "- command: \`benchmarks/gpu_check.sh$ARGS\` (wheels $WHEELS)"
    echo "- host: $(hostname), $(date -u '+%Y-%m-%d %H:%M:%S UTC'), repo $(git -C "$ROOT" describe --always --dirty 2> /dev/null || echo '?') (-dirty: the working tree differs from that commit)"
    device="no CUDA (--allow-cpu)"
    if ((HAVE_CUDA)); then
        device=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2> /dev/null | head -n 1)
        device="${device:-a CUDA device (nvidia-smi not found)}"
    fi
    echo "- device: $device"
    echo "- budget: $BUDGET s; logs: <step>.log in this folder"
    echo
    echo "| step | exit code | seconds | result |"
    echo "|---|---|---|---|"
} > "$SUMMARY"

# --- the steps (each runs in its own bash under timeout; exported functions) ---------------------------------
step_env() {
    echo "## machine"; date -u; uname -a; echo "cores: $(nproc)"; free -g 2> /dev/null
    echo "## repository"; git -C "$ROOT" log -1 --oneline 2> /dev/null; git -C "$ROOT" status --short 2> /dev/null | head -n 40
    echo "## nvidia-smi"
    if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    echo "## python / torch"
    "$PY" - << 'PYEOF' || exit $?
import platform, sys
import torch
print("python", sys.version.replace("\n", " "), platform.machine())
print("torch", torch.__version__, "| CUDA (build)", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "| devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB")
PYEOF
    echo "## pip list"; "$PY" -m pip list || echo "gpu_check: pip list failed (exit $?)"
    echo "## wheels to install"; ls -l "$WHEELS"
}

step_install() {
    if "$PY" -m pip --version > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl || exit $?
    else  # all the wheels are pure Python: unpacked onto PYTHONPATH they import the same
        echo "gpu_check: no pip for $PY; unpacking the wheels into $SITE instead"
        "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
            "$SITE" "$WHEELS"/*.whl || exit $?
    fi
    echo "installed into $SITE:"; ls "$SITE"
    echo "## imports from outside the repository (cwd $WORK): dist_dejpeg must come from $SITE"
    (cd "$WORK" && "$PY" - << 'PYEOF') || exit $?
import os
import antlr4, dist_dejpeg, lpips, omegaconf, webdataset
from importlib.metadata import version
for m, dist in ((dist_dejpeg, "dist_dejpeg"), (lpips, "lpips"), (webdataset, "webdataset"), (omegaconf, "omegaconf"),
                (antlr4, "antlr4-python3-runtime")):
    print(f"{dist:24s} {version(dist):8s} {m.__file__}")
cfg = omegaconf.OmegaConf.create({"a": "${b}", "b": 3})  # interpolation: omegaconf's antlr grammar works
assert cfg.a == 3, cfg
site = os.path.realpath(os.environ["SITE"])
assert os.path.realpath(dist_dejpeg.__file__).startswith(site + os.sep), f"dist_dejpeg imported from {dist_dejpeg.__file__}, not from {site}"
print("ok: dist_dejpeg from", site)
PYEOF
    echo "## from the repository root (cwd $ROOT; what the later steps import)"
    "$PY" -c 'import dist_dejpeg; print("dist_dejpeg", dist_dejpeg.__file__)'
}

step_cuda() {
    "$PY" - << 'PYEOF'
import time
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
dev = torch.device("cuda", 0)
p = torch.cuda.get_device_properties(0)
print("device:", torch.cuda.get_device_name(0), f"capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB")
print("bf16 supported:", torch.cuda.is_bf16_supported())
g = torch.Generator().manual_seed(0)
a, b = torch.randn(512, 512, generator=g, dtype=torch.float64), torch.randn(512, 512, generator=g, dtype=torch.float64)
ref = a @ b
for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
    out = (a.to(dev, dtype) @ b.to(dev, dtype)).double().cpu()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"matmul {dtype}: max relative error {err:.2e} (limit {tol:g})")
    assert err < tol, f"{dtype} matmul on the GPU is wrong: {err:.2e}"
x = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
x @ x
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20):
    y = x @ x
torch.cuda.synchronize()
dt = (time.perf_counter() - t) / 20
print(f"bf16 4096^3 matmul: {dt * 1e3:.2f} ms, {2 * 4096**3 / dt / 1e12:.0f} TFLOP/s")
assert torch.cuda.is_bf16_supported(), "no bf16 on this GPU"
print("ok")
PYEOF
}

step_pytest_gpu() {
    # a stuck test must not eat the step: 75 s each where pytest-timeout is installed (the GPU image has it);
    # -rA and the short tracebacks print each failure's message right after the test, not only at the end
    local per_test=()
    "$PY" -c "import pytest_timeout" 2> /dev/null && per_test=(--timeout 75)
    [[ -n $TESTS ]] && per_test+=(-k "$TESTS")
    # -o addopts=: not the suite's `-n 2` (pytest-xdist is not on the GPU machine; GPU tests run one at a time)
    "$PY" -m pytest -o addopts= -m gpu -v -rA --tb=line -p no:cacheprovider --continue-on-collection-errors "${per_test[@]}" tests
    local rc=$?
    ((rc == 5)) && echo "gpu_check: pytest exit 5: no test collected (counted as a failure)"
    return $rc
}

# bench: options before the benchmark's name, overrides after it (an order every version of the CLI parses)
step_bench_train() {
    if ((QUICK)); then
        "$PY" -m dist_dejpeg.cli bench --results "$OUT/results" --no-ladder --steps 1 --repeats 1 --warmup 1 \
            --config configs/debug.yaml train data.batch_size=2 data.crop=64 || exit $?
    else
        # the gen update only (the 2.5x target's): the compiled critic and gan rows would not fit a check; and
        # without --rungs, of the rungs only CUDA graphs (the compiled step is host-bound on an H200:
        # benchmarks/results/gpu-nvidia-h200-2026-11-27); the compile rung would be the tuned row compiled twice
        local rungs=(--rungs=compile_mode)
        ((RUNGS)) && rungs=()
        # TORCH_LOGS=cudagraphs: why inductor ran a region without CUDA graphs, where it did (the row counts them)
        TORCH_LOGS=cudagraphs "$PY" -m dist_dejpeg.cli bench --results "$OUT/results" --updates=gen "${rungs[@]}" train \
            || exit $?
    fi
    [[ -s $OUT/results/train.json ]] || { echo "gpu_check: no $OUT/results/train.json"; exit 1; }
}

step_bench_data() {
    if ((QUICK)); then
        # 288 px tiles: bench data crops 256 px, and a stream of only smaller tiles never yields a batch (hangs)
        "$PY" -m dist_dejpeg.cli bench --results "$OUT/results" --tiles 288 --formats raw --batches 2 --threads 1 \
            data || exit $?
    else
        "$PY" -m dist_dejpeg.cli bench --results "$OUT/results" --formats raw png --batches 10 data || exit $?
    fi
    [[ -s $OUT/results/data.json ]] || { echo "gpu_check: no $OUT/results/data.json"; exit 1; }
}

step_bench_infer() {
    "$PY" -m dist_dejpeg.cli bench infer --results "$OUT/results" || exit $?
    [[ -s $OUT/results/infer.json ]] || { echo "gpu_check: no $OUT/results/infer.json"; exit 1; }
}

step_train() {
    local mode config
    if ((QUICK || !HAVE_CUDA)); then
        config=configs/debug.yaml
        mode=(train.mixed_precision=no data.batch_size=2 data.crop=64 data.num_workers=1 train.phases.gen.steps=4
              train.phases.critic.steps=2 train.phases.gan.steps=2 train.phases.gan.val_every=2 train.val_every=2
              data.val_crop=64 data.val_max_images=4 train.ckpt_every=100 'data.val_qualities=[10,40]')
    else
        # the real recipe's model and batch (configs/div2k.yaml: 256 px crops, batch 32, LPIPS-VGG) on the sample
        # photos cut into 288 px tiles, random-init backbones (no download), the data wait measured on the GPU path,
        # the decoder conditioned on the JPEG quality (its FiLM path under bf16)
        config=configs/div2k.yaml
        prepare_288 || exit $?
        # eager: compiling every model and mode takes minutes; bench train and the gpu tests cover compile
        mode=(data.auto_prepare=none model.pretrained=false loss.lpips_pretrained=false data.crop=256 train.compile=false
              data.num_workers=8 data.val_crop=256 data.val_max_images=32 train.mixed_precision=bf16
              train.phases.gen.steps=200 train.phases.critic.steps=20 train.phases.gan.steps=20
              train.phases.gan.val_every=10 train.phases.gan.patience=2 train.val_every=100 train.ckpt_every=100
              train.log_every=25 model.quality_conditioning=true)
    fi
    (set -x; "$PY" -m dist_dejpeg.cli train --config "$config" train.run_dir="$OUT/run" data.root="$DATA" \
        data.backend=torch data.gpu_jpeg=true train.progress=false "${mode[@]}") || exit $?
    cp "$OUT/run/metrics.json" "$OUT/metrics.json" || exit $?
    echo "gpu_check: copied metrics.json to $OUT"
    "$PY" - "$OUT/metrics.json" << 'PYEOF'
import json, sys
meta = json.load(open(sys.argv[1]))["meta"]
for phase, log in (meta.get("last_train_log") or {}).items():
    print(f"gpu_check: {phase} phase, last log window: data_wait_frac {log.get('train/data_wait_frac')}, "
          f"images/s {log.get('train/images_per_s')}")
PYEOF
}

prepare_288() {  # the sample photos in 288 px tiles (256 px crops), once per check
    [[ -s $DATA/manifest.json ]] || "$PY" -m dist_dejpeg.cli prepare samples --out "$DATA" --tile 288 --step 64
}

step_data_wait() {
    # The share of the gen step spent waiting for data on the torch loader, side by side in one check (150 gen
    # steps each): nvJPEG with one round trip per quality on a canvas of the batch's tiles, degraded ahead, the
    # training on a CUDA stream of its own (the defaults) and on stream 0 (train.cuda_stream=false, where the
    # degrade thread's wait for nvJPEG's bytes also waits for the queued steps); nvJPEG on each quality's images
    # as a list (the defaults before packing); libjpeg in the 8 workers.
    local config=configs/div2k.yaml steps=150 common
    common=(data.auto_prepare=none model.pretrained=false loss.lpips_pretrained=false data.crop=256
            train.compile=$COMPILE "train.compile_cache=''" data.num_workers=8 data.val_crop=256 data.val_max_images=8 train.mixed_precision=bf16
            train.order=[gen] train.val_every=100000 train.ckpt_every=100000 train.log_every=25 train.progress=false
            data.backend=torch data.gpu_jpeg_qualities=4)
    if ((QUICK || !HAVE_CUDA)); then
        config=configs/debug.yaml steps=4
        common=(train.mixed_precision=no data.batch_size=2 data.crop=64 data.num_workers=1 train.order=[gen]
                train.val_every=100 train.ckpt_every=100 data.val_crop=64 data.val_max_images=2 train.progress=false
                'data.val_qualities=[10]')
    else
        prepare_288 || exit $?
    fi
    local variant name overrides names=()
    local variants=("packed-ahead|data.gpu_jpeg=true data.gpu_jpeg_pack=true data.gpu_jpeg_ahead=2"
                    "packed-ahead-stream0|data.gpu_jpeg=true data.gpu_jpeg_pack=true data.gpu_jpeg_ahead=2 train.cuda_stream=false"
                    "list-ahead|data.gpu_jpeg=true data.gpu_jpeg_pack=false data.gpu_jpeg_ahead=2"
                    "cpu-workers|data.gpu_jpeg=false")
    # without CUDA they differ in nothing (no GPU degradation): the flow runs once
    ((QUICK || !HAVE_CUDA)) && variants=("packed-ahead|data.gpu_jpeg=true")
    if [[ -n $WAIT ]]; then  # --wait: the named ones, in that order
        local chosen=() want v
        IFS=, read -r -a want <<< "$WAIT"
        for name in "${want[@]}"; do
            for v in "${variants[@]}"; do [[ ${v%%|*} == "$name" ]] && chosen+=("$v"); done
        done
        ((${#chosen[@]})) || { echo "gpu_check: --wait '$WAIT' names none of this run's data_wait variants"; exit 2; }
        variants=("${chosen[@]}")
    fi
    for variant in "${variants[@]}"; do
        IFS='|' read -r name overrides <<< "$variant"
        read -r -a overrides <<< "$overrides"
        (set -x; "$PY" -m dist_dejpeg.cli train --config "$config" train.run_dir="$WORK/wait-$name" data.root="$DATA" \
            "${common[@]}" train.phases.gen.steps=$steps "${overrides[@]}") || exit $?
        cp "$WORK/wait-$name/metrics.json" "$OUT/data_wait-$name.json" || exit $?
        names+=("$name")
        "$PY" - "$OUT" "${names[@]}" << 'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
lines = ["| JPEG degradation | data_wait_frac | images/s |", "|---|---|---|"]
for name in sys.argv[2:]:
    log = json.loads((out / f"data_wait-{name}.json").read_text())["meta"]["last_train_log"]["gen"]
    lines.append(f"| {name} | {log.get('train/data_wait_frac')} | {log.get('train/images_per_s')} |")
(out / "data_wait.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
    done
}

step_evaluate() {  # the trained run's generator on the GPU: restore + the six metrics (LPIPS unavailable offline)
    [[ -s $OUT/run/generator.safetensors ]] || { echo "gpu_check: no generator from the train step"; exit 1; }
    local n=8 size=2000x1500
    ((QUICK)) && n=2 size=320x240
    "$PY" -m dist_dejpeg.cli evaluate --model "$OUT/run" --images "$DATA"/val-*.tar --quality 10 40 \
        --max-images $n -o "$OUT/evaluate" --quiet || exit $?
    head -n 24 "$OUT/evaluate/metrics.md"
    # restore of a photo (2000 x 1500; --quick 320 x 240) through the CLI: its own ms-per-megapixel line
    "$PY" -c 'import sys, skimage.data; from PIL import Image
w, h = map(int, sys.argv[2].split("x"))
Image.fromarray(skimage.data.astronaut()).resize((w, h)).save(sys.argv[1])' "$WORK/astronaut.png" "$size" || exit $?
    "$PY" -m dist_dejpeg.cli restore "$WORK/astronaut.png" -o "$WORK/restored" --model "$OUT/run" --quiet || exit $?
}
export -f step_env step_install step_cuda step_pytest_gpu step_bench_train step_bench_data step_bench_infer step_train \
    step_evaluate step_data_wait prepare_288

FAILED=()
row() {  # step exit seconds result
    echo "| $1 | $2 | $3 | $4 |" >> "$SUMMARY"
    echo "gpu_check: $1: $4 (exit $2, $3 s)"
}

run_step() {  # step timeout_s
    local name=$1 limit=$2 log=$OUT/$1.log left t0 pid rc secs result
    left=$((DEADLINE - $(date +%s) - 12))  # 12: timeout's kill grace plus bookkeeping
    if ((left < 10)); then
        echo "not run: the check's ${BUDGET} s budget is spent" > "$log"
        FAILED+=("$name"); row "$name" 124 0 "FAILED: not run, the ${BUDGET} s budget is spent"; return
    fi
    ((limit > left)) && limit=$left
    echo "gpu_check: $name (timeout $limit s) ..."
    t0=$(date +%s.%N)
    # timeout leads its own process group; once it returns, whatever of the step is left in that group (a
    # trainer finishing its checkpoint after SIGTERM while the bash around it is gone, loader workers) is killed
    timeout -k 10 "$limit" bash -c "step_$name" > "$log" 2>&1 < /dev/null &
    pid=$!
    STEP_PID=$pid
    wait "$pid"
    rc=$?
    kill -KILL -- "-$pid" 2> /dev/null
    STEP_PID=""
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) result=ok ;;
        124 | 137) result="FAILED: timed out after $limit s" ;;
        *) result=FAILED ;;
    esac
    ((rc == 5)) && [[ $name == pytest_gpu ]] && result="FAILED: no test collected"
    ((rc != 0)) && FAILED+=("$name")
    row "$name" "$rc" "$secs" "$result"
}

run_step env 60
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"  # for install's import check and every later step
run_step install 120
if ((HAVE_CUDA)); then
    run_step cuda 90
else
    echo "skipped: no CUDA (--allow-cpu)" > "$OUT/cuda.log"
    row cuda 0 0 "skipped: no CUDA"
fi
# most telling first: when the budget runs out, the later steps are reported as not run
for s in "${OPTIONAL[@]}"; do
    case $s in
        pytest_gpu) if ((QUICK)); then run_step pytest_gpu 120; else run_step pytest_gpu 180; fi ;;
        bench_train) run_step bench_train 480 ;;  # two compiled rows, each 120-160 s of compiling on an H200
        train) run_step train 180 ;;
        evaluate) run_step evaluate 90 ;;
        data_wait) run_step data_wait 260 ;;
        bench_data) run_step bench_data 120 ;;
        bench_infer)
            if ((QUICK)); then
                echo "skipped: --quick (tests/test_bench.py covers bench infer on the CPU)" > "$OUT/bench_infer.log"
                row bench_infer 0 0 "skipped: --quick"
            else
                run_step bench_infer 90
            fi ;;
    esac
done

{
    echo
    echo "Total: $(($(date +%s) - START)) s; ${#FAILED[@]} of ${#STEPS[@]} steps failed${FAILED[*]:+: ${FAILED[*]}}."
    for s in "${FAILED[@]}"; do
        echo
        echo "### $s: last lines of $s.log"
        echo
        echo '```text'
        tail -n 15 "$OUT/$s.log"
        echo '```'
    done
} >> "$SUMMARY"
echo "gpu_check: summary in $SUMMARY"
((${#FAILED[@]} == 0)) && exit 0
exit 1
