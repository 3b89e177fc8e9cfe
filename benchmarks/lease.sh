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
#       the calls below with what each carries and its size with the checkout (exit 1 where one is over 64 MiB, or
#       a wheel the check installs is missing; a warning where dist_dejpeg's is not this checkout's), the
#       check's --commit (the copy there is no checkout of this commit: its summaries would name another). Run it
#       right before the lease, after the last commit.
# There, each call as soon as the last returns (the machine keeps /tmp only while it is warm, ~30 s):
#   benchmarks/lease.sh stage        carry: .gpu_wheels/dali-wheels.tar.part-00   (then -01, -02, -03)
#   benchmarks/lease.sh stage        carry: .gpu_wheels/plain .gpu_wheels/dali-wheels.tar.part-04   (the smallest)
#   benchmarks/lease.sh check [gpu_check options]        carry: .gpu_cache
#       stage copies what the call carried into /tmp/gpu_wheels (the last one also checks DALI's parts: a reply with
#       warm false, a restarted machine, lost the earlier ones). check stages too, then runs the GPU check on that
#       folder with inductor's and Triton's caches from and back into .gpu_cache/compile.tar.gz (parts of 15 MiB,
#       at most 56 MiB: what comes back is 64 MiB in all and what travels 64 MiB with the ~3 MiB checkout; a bigger
#       cache goes without Triton's folder, or stays as it was), and leaves in $OUT: check.tar.gz (the check's
#       folder without weights and TensorBoard's events: summary.md, logs, results, gpu-summary.json) and the
#       cache's parts (at most 4; none where all would be over 64 MiB). Its exit code is the check's (DALI's parts
#       missing or broken, or a wheel of dist_dejpeg built before a change, fail the install step, and the other
#       steps still run).
# Here again, with the reply's files_at:
#   benchmarks/lease.sh keep FILES_AT
#       the cache's parts into .gpu_cache/ (the next check call carries them: rows compiled once are not compiled
#       again), the check's folder into benchmarks/results/gpu-<card>-<date>/ and its gpu-summary.json to
#       benchmarks/results/gpu-summary.json (commit both).
#
# A lease's 15 minutes (900 s of device time, start, idle and transfers included; a call cut by them returns
# nothing): ~1-3 to start the machine, ~1-2 for the five stage calls, so before the check call read status's
# budget_left_s, L: `--budget` L-90 (at most 540), run's timeout_s L-30 (at most 600); after it, give_back.
# DALI's five stage calls cost ~2 minutes and need each call within ~30 s of the last: without DALI (below) the
# check has them for its steps, and only the DALI GPU tests and DALI rows go. The check's steps go cheapest-new
# first: the gpu tests (up to 300 s on a cold cache: two of them compile), bench infer (~1-2 min), then bench
# train's compiled rows, which fill what is left;
# the compile cache that comes back makes the next lease's compiled tests and rows quick: then
# `check --steps bench_train,train --compile` trains the recipe compiled as configs/div2k.yaml does. In that order
# a cold lease never reaches train, the only source of gpu-summary.json's gen_img_s, gan_img_s and data_wait_frac:
# for those first, `--steps train,bench_infer,pytest_gpu,bench_train` (train ~1.5 min eager, bench infer ~1-2).
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
SUMS=dali-wheels.sha256  # gpu_wheels.sh --split's checksums of DALI's parts (dist_dejpeg/bench/dali_wheels.py)
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
    elif (( tree + $(bytes_of "$WHEELS/plain" "$CACHE") > CARRY_MIB * 1048576 )); then
        calls+=("stage|$WHEELS/plain" "check|$CACHE")  # (jpeglib's 23 MB beside a full compile cache)
    else
        calls+=("check|$WHEELS/plain $CACHE")
    fi
    # the copy there is not this checkout (its git metadata, where any, is the session's first commit): name it
    commit=$(git -C "$ROOT" describe --always --dirty 2>/dev/null) || commit=""
    echo "lease.sh: the calls, each as soon as the last returns (the checkout: $(mib "$tree") MiB of each):"
    for call in "${calls[@]}"; do
        i=$((i + 1))
        read -ra carried <<< "${call#*|}"
        size=$((tree + $(bytes_of "${carried[@]}")))
        flag=""
        ((size > CARRY_MIB * 1048576)) && { flag="  OVER"; over=1; }
        what=${call%%|*}
        [[ $what == check && -n $commit ]] && what="check --commit $commit"
        printf '  %d. bash benchmarks/lease.sh %s  carry: %s  (%s MiB of %d)%s\n' "$i" "$what" \
            "${carried[*]#"$ROOT"/}" "$(mib "$size")" "$CARRY_MIB" "$flag"
    done
    echo "lease.sh: before the check call, status's budget_left_s (L): add --budget L-90 (at most 540) and give it" \
         "timeout_s L-30 (at most 600); then give_back"
    ((over)) && echo "lease.sh: a call is over ${CARRY_MIB} MiB: split smaller (gpu_wheels.sh --split) or trim the checkout" >&2
    wheels_ready || over=1
    return "$over"
}

# the small wheels the check installs (gpu_wheels.sh's PREFIXES): without one its install step fails and every later
# step is skipped, a lease's start-up spent for nothing; a dist_dejpeg wheel of another tree fails it in part
wheels_ready() {
    local p lacking=() stale
    for p in lpips webdataset braceexpand omegaconf jpeglib dist_dejpeg; do
        compgen -G "$WHEELS/plain/$p-*.whl" > /dev/null || lacking+=("$p")
    done
    if (( ${#lacking[@]} )); then
        echo "lease.sh: error: no wheel of ${lacking[*]} in $WHEELS/plain (the check would install nothing and" \
             "run no step): benchmarks/lease.sh prepare first" >&2
        return 1
    fi
    stale=$(PYTHONPATH=$ROOT "$PYTHON" - "$ROOT" "$WHEELS"/plain/dist_dejpeg-*.whl <<'EOF'
import sys, tempfile, zipfile
from pathlib import Path
from dist_dejpeg.bench.gpu_check_steps import changed_files
with tempfile.TemporaryDirectory() as tmp:
    zipfile.ZipFile(sys.argv[-1]).extractall(tmp)
    changed = changed_files(Path(tmp) / "dist_dejpeg", Path(sys.argv[1]) / "dist_dejpeg")
print(f"{len(changed)} files differ: {', '.join(changed[:3])}" if changed else "")
EOF
) || stale="it could not be read"
    [[ -z $stale ]] || echo "lease.sh: warning: the dist_dejpeg wheel in $WHEELS/plain is not this checkout's" \
        "($stale): the check's install step will fail in part; benchmarks/lease.sh prepare again" >&2
    return 0
}

stage() {
    mkdir -p "$AT" || fail "cannot make $AT"
    shopt -s nullglob
    local carried=("$WHEELS"/plain/* "$WHEELS"/dali-wheels.tar.part-*)
    (( ${#carried[@]} )) && { cp -f "${carried[@]}" "$AT/" || fail "cannot copy into $AT (disk full?)"; }
    echo "lease.sh: $AT now holds:"
    ls -l "$AT" | awk 'NR > 1 {printf "%10d  %s\n", $5, $NF}'
    [[ -f $AT/$SUMS ]] || return 0
    # with the checksums here (the last stage call): say now which DALI parts a restarted machine lost, not in the check
    local part bad=()
    for part in $(awk '$2 ~ /\.part-/ { print $2 }' "$AT/$SUMS"); do
        [[ -f $AT/$part ]] || bad+=("$part (missing)")
    done
    if (( ${#bad[@]} == 0 )) && (cd "$AT" && grep '\.part-' "$SUMS" | sha256sum -c --quiet -); then
        echo "lease.sh: every DALI part $SUMS lists is here, its sha256 checked"
    else
        echo "lease.sh: warning: DALI's parts are not whole: ${bad[*]:-a wrong sha256 (above)}; stage them again," \
             "or the check installs without DALI" >&2
    fi
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
        # weights, checkpoints and TensorBoard's events (sample images: MBs) stay behind (a file back is at most
        # 16 MiB, all 64 MiB with the cache's 56 at most): logs, tables and JSON come
        tar -czf "$OUT/check.tar.gz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.pth' --exclude='*.bin' \
            --exclude='*.onnx' --exclude='*.tfevents.*' -C "$OUT" check && rm -rf "$OUT/check"
        cp "$CACHE/$CACHE_FILE".part-* "$OUT/" 2>/dev/null
        back=$(bytes_of "$OUT"/*)
        if ((back > 64 * 1048576)); then  # the results before the cache: not all of it would come back
            echo "lease.sh: warning: $(mib "$back") MiB to come back; the compile cache's parts stay behind" >&2
            rm -f "$OUT/$CACHE_FILE".part-*
        fi
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
