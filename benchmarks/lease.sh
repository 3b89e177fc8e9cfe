#!/usr/bin/env bash
# The GPU check on a lent GPU machine that keeps nothing between leases, takes at most 64 MiB a call and returns
# at most 8 files of 16 MiB (the workplace's device tool). The calls, in order:
#
# Here, where pip reaches PyPI, after the last change to dist_dejpeg/ (the check installs the project's wheel):
#   benchmarks/lease.sh prepare
#       the wheel folder of gpu_wheels.sh --dali --split 57, laid out for carrying: .gpu_wheels/plain/ (the small
#       wheels and DALI's sha256 file) and .gpu_wheels/dali-wheels.tar.part-00 ... -04 (DALI's downloads are kept
#       in .gpu_wheels/cache for the next prepare). .gpu_wheels/ and .gpu_cache/ are ignored by git. Then plan.
#   benchmarks/lease.sh plan
#       the calls below with what each carries and its size with the checkout (exit 1 where one is over 64 MiB).
# There, each call as soon as the last returns (the machine keeps /tmp only while it is warm, ~30 s):
#   benchmarks/lease.sh stage        carry: .gpu_wheels/dali-wheels.tar.part-00   (then -01, -02, -03)
#   benchmarks/lease.sh stage        carry: .gpu_wheels/plain .gpu_wheels/dali-wheels.tar.part-04   (the smallest)
#   benchmarks/lease.sh check [gpu_check options]        carry: .gpu_cache
#       stage copies what the call carried into /tmp/gpu_wheels. check stages too, then runs the GPU check on that
#       folder with inductor's and Triton's caches from and back into .gpu_cache/compile.tar.gz (parts of 15 MiB,
#       at most 56 MiB: what comes back is 64 MiB in all and what travels 64 MiB with the ~3 MiB checkout; a bigger
#       cache goes without Triton's folder, or stays as it was), and leaves in $OUT: check.tar.gz (the check's
#       folder without weights: summary.md, logs, results, gpu-summary.json) and the cache's parts (at most 4).
#       Its exit code is the check's.
# Here again, with the reply's files_at:
#   benchmarks/lease.sh keep FILES_AT
#       the cache's parts into .gpu_cache/ (the next check call carries them: rows compiled once are not compiled
#       again), the check's folder into benchmarks/results/gpu-<card>-<date>/ and its gpu-summary.json to
#       benchmarks/results/gpu-summary.json (commit both).
#
# A lease's 15 minutes: ~2-3 to start the machine, ~1 for the five stage calls, so one check call of at most
# `--budget 540` (run's timeout_s 600). Its steps go cheapest-new first: the gpu tests (up to 300 s on a cold
# cache: two of them compile), bench infer (~1-2 min), then bench train's compiled rows, which fill what is left;
# the compile cache that comes back makes the next lease's compiled tests and rows quick: then
# `check --steps bench_train,train --compile` trains the recipe compiled as configs/div2k.yaml does.
# Without DALI (plain wheels only, one call): prepare --no-dali, then check carrying .gpu_wheels/plain and .gpu_cache.
# LEASE_WHEELS, LEASE_CACHE, LEASE_RESULTS, WHEELS_AT move .gpu_wheels, .gpu_cache, benchmarks/results and
# /tmp/gpu_wheels; PYTHON names the interpreter (default python3).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=${LEASE_WHEELS:-$ROOT/.gpu_wheels}
CACHE=${LEASE_CACHE:-$ROOT/.gpu_cache}
RESULTS=${LEASE_RESULTS:-$ROOT/benchmarks/results}
AT=${WHEELS_AT:-/tmp/gpu_wheels}
PYTHON=${PYTHON:-python3}
CACHE_FILE=compile.tar.gz
SPLIT_MIB=15  # files of at most 16 MiB come back (8 of them)
MAX_MIB=56    # ... and 64 MiB in all: check.tar.gz (logs and tables) and at most 4 parts; the next call carries them

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
    exit "$1"
}
fail() { echo "lease.sh: error: $*" >&2; exit 1; }
CARRY_MIB=64  # what one call carries: the checkout's files that git does not ignore, and the paths of `carry`

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

bytes_of() {  # the apparent size of files and folders, summed
    (( $# )) || { echo 0; return; }
    du -cbs "$@" 2>/dev/null | tail -1 | cut -f1
}

plan() {
    local tree calls=() call i=0 over=0 size flag
    # the checkout as the device tool sends it: tracked files and the untracked ones git does not ignore
    tree=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null \
           | tail -1 | cut -f1)
    [[ $tree =~ ^[0-9]+$ ]] || fail "cannot size the checkout $ROOT (not a git checkout?)"
    shopt -s nullglob
    local parts=("$WHEELS"/dali-wheels.tar.part-*)
    if (( ${#parts[@]} )); then
        for part in "${parts[@]::${#parts[@]}-1}"; do calls+=("stage|$part"); done
        calls+=("stage|$WHEELS/plain ${parts[-1]}")  # the last part is the smallest
        calls+=("check|$CACHE")
    else
        calls+=("check|$WHEELS/plain $CACHE")
    fi
    echo "lease.sh: the calls, each as soon as the last returns (the checkout: $(mib "$tree") MiB of each):"
    for call in "${calls[@]}"; do
        i=$((i + 1))
        read -ra carried <<< "${call#*|}"
        size=$((tree + $(bytes_of "${carried[@]}")))
        flag=""
        ((size > CARRY_MIB * 1048576)) && { flag="  OVER"; over=1; }
        printf '  %d. lease.sh %-6s carry: %s  (%s MiB of %d)%s\n' "$i" "${call%%|*}" "${carried[*]#"$ROOT"/}" \
            "$(mib "$size")" "$CARRY_MIB" "$flag"
    done
    ((over)) && echo "lease.sh: a call is over ${CARRY_MIB} MiB: split smaller (gpu_wheels.sh --split) or trim the checkout" >&2
    return "$over"
}

stage() {
    mkdir -p "$AT" || fail "cannot make $AT"
    shopt -s nullglob
    local carried=("$WHEELS"/plain/* "$WHEELS"/dali-wheels.tar.part-*)
    (( ${#carried[@]} )) && { cp -f "${carried[@]}" "$AT/" || fail "cannot copy into $AT (disk full?)"; }
    echo "lease.sh: $AT now holds:"
    ls -l "$AT" | awk 'NR > 1 {printf "%10d  %s\n", $5, $NF}'
}

case ${1:-} in
    -h | --help) usage 0 ;;
    prepare)
        dali=(--dali --split 57)
        [[ ${2:-} == --no-dali ]] && dali=()
        rm -rf "$WHEELS/plain" "$WHEELS"/dali-wheels.tar.part-*
        mkdir -p "$WHEELS/plain" "$WHEELS/cache"
        DALI_CACHE=$WHEELS/cache bash "$ROOT/benchmarks/gpu_wheels.sh" "${dali[@]}" "$WHEELS/plain" \
            || fail "gpu_wheels.sh failed"
        shopt -s nullglob
        parts=("$WHEELS"/plain/dali-wheels.tar.part-*)
        (( ${#parts[@]} )) && mv "${parts[@]}" "$WHEELS/"
        plan ;;
    plan) plan ;;
    stage) stage ;;
    check)
        shift
        [[ -n ${OUT:-} ]] || fail "OUT is not set (the device tool sets it: the folder whose files come back)"
        stage
        mkdir -p "$CACHE"
        cd "$ROOT" || fail "cannot enter $ROOT"
        PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" -m dist_dejpeg.bench.gpu_check --wheels "$AT" \
            --out "$OUT/check" --compile-cache "$CACHE/$CACHE_FILE" --compile-cache-split "$SPLIT_MIB" \
            --compile-cache-max "$MAX_MIB" "$@"
        rc=$?
        # weights and checkpoints stay behind (tens of MB; a file back is at most 16 MiB): logs, tables and JSON come
        tar -czf "$OUT/check.tar.gz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.pth' --exclude='*.bin' \
            --exclude='*.onnx' -C "$OUT" check && rm -rf "$OUT/check"
        cp "$CACHE/$CACHE_FILE".part-* "$OUT/" 2>/dev/null
        echo "lease.sh: back in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')(the check exited $rc)"
        exit "$rc" ;;
    keep)
        [[ $# -eq 2 && -f $2/check.tar.gz ]] || fail "keep FILES_AT: a folder with check.tar.gz (the reply's files_at)"
        shopt -s nullglob
        parts=("$2/$CACHE_FILE".part-*)
        if (( ${#parts[@]} )); then
            mkdir -p "$CACHE" && rm -f "$CACHE/$CACHE_FILE"* && cp "${parts[@]}" "$CACHE/" && chmod u+w "$CACHE"/*
        fi
        tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
        tar -xzf "$2/check.tar.gz" -C "$tmp" || fail "$2/check.tar.gz: cannot unpack"
        name=$("$PYTHON" - "$tmp/check/gpu-summary.json" <<'EOF'
import json, re, sys
try:
    s = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    s = {}
card = re.sub(r"[^a-z0-9]+", "-", (s.get("card") or "cpu").lower()).strip("-")
print(f"gpu-{card}-{(s.get('date') or 'undated')[:10]}")
EOF
)
        dest=$RESULTS/$name n=2
        while [[ -e $dest ]]; do dest=$RESULTS/$name-$n; n=$((n + 1)); done
        mkdir -p "$RESULTS" && mv "$tmp/check" "$dest" && chmod -R u+w "$dest" || fail "cannot write $dest"
        # the newest headline numbers beside the folders (issue 24: results/gpu-summary.json, committed with its folder)
        [[ -f $dest/gpu-summary.json ]] && cp "$dest/gpu-summary.json" "$RESULTS/gpu-summary.json"
        echo "lease.sh: the check's folder in $dest; ${#parts[@]} cache parts in $CACHE" ;;
    *) usage 2 ;;
esac
