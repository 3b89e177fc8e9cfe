#!/usr/bin/env bash
# Make the wheel folder that benchmarks/gpu_check.sh installs on the GPU machine (which has no network).
#
#   benchmarks/gpu_wheels.sh DIR                      # run here, where pip reaches PyPI; then carry DIR there
#   benchmarks/gpu_wheels.sh --dali --split 57 DIR    # the same plus NVIDIA DALI, as parts of at most 57 MiB
#   benchmarks/gpu_wheels.sh --dali DIR               # the same plus NVIDIA DALI as plain wheels (~250 MB)
#   benchmarks/gpu_wheels.sh --pack 57 DIR WHEEL...   # only the parts, of wheels already here (no network)
#
# That machine's Python 3.12 (x86_64) already has torch, torchvision, timm, accelerate, torchmetrics,
# tensorboard, safetensors, scikit-image, pyyaml, numpy, six, ... (../shared/ENV.md, "A GPU machine without
# network"). DIR gets wheels for exactly what it lacks, ~24 MB in all: lpips, webdataset + braceexpand,
#   omegaconf (2.4 carries its antlr runtime inside), dist_dejpeg itself (built from this checkout's working
#   tree), all pure Python, and jpeglib (23 MB, a manylinux abi3 wheel with its
#   libjpeg builds: restore's consistency with the JPEG file, the final validation's conformed gains).
# --dali adds NVIDIA DALI and what it needs that the machine lacks (~250 MB): nvidia-dali-cuda130,
#   nvidia-nvimgcodec-cu13, nvidia-libnvcomp-cu13, nvidia-nvjpeg, astunparse, gast, optree, nvtx, makefun,
#   libcst. Without them the GPU tests that need DALI skip themselves and bench data has no DALI GPU rows.
# --split MIB (1 to 57; for a machine that takes files of limited size) writes DALI's wheels as one tar split
#   into DIR/dali-wheels.tar.part-00, -01, ... of at most MIB MiB each, plus DIR/dali-wheels.sha256 (the sha256
#   of every part and of the joined tar, as `sha256sum -c` reads them). The check joins, verifies and installs
#   them; carry every part and the .sha256 file. By hand, in DIR: cat dali-wheels.tar.part-* > dali-wheels.tar &&
#   sha256sum -c dali-wheels.sha256 && tar -xf dali-wheels.tar (the check installs DALI wheels found plain in DIR,
#   or a joined dali-wheels.tar there, too).
# --pack MIB DIR WHEEL... writes only those parts and the .sha256 file, of the given wheels.
# DALI_CACHE names a folder that keeps DALI's downloads between runs (default: a temporary one).
#
# Wheels of these packages and DALI's parts already in DIR are replaced; other files are left alone (with a
# warning). The plain wheels must stay under 60 MB in all (DALI's, when not split, aside), each part under MIB MiB.
# Exits non-zero, naming the package, when a download or a build fails. PYTHON overrides python3.
set -euo pipefail

PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIMIT_MB=60
MAX_PART_MIB=57
TAR=dali-wheels.tar  # gpu_check_steps.py reads the same names
PARTS=$TAR.part-  # + 00, 01, ...
SUMS=dali-wheels.sha256

# versions seen working together (../shared/ENV.md); omegaconf as CI tests it (pyproject.toml asks >= 2.4: its
# error messages are the ones the config tests read)
DOWNLOADS=(lpips==0.1.4 webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0 jpeglib==1.0.2)
# DALI and what it needs beyond the machine's numpy, six and packaging, seen installing and passing the DALI GPU
# tests there (../shared/ENV.md)
DALI=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16
      nvidia-nvjpeg==13.3.2.43 astunparse==1.6.3 gast==0.6.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0
      libcst==1.8.6)
# wheel file name prefixes of everything this script puts into DIR
PREFIXES=(lpips webdataset braceexpand omegaconf jpeglib dist_dejpeg)
DALI_PREFIXES=()
for spec in "${DALI[@]}"; do name=${spec%%==*}; DALI_PREFIXES+=("${name//-/_}"); done

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
    exit "$1"
}
fail() { echo "gpu_wheels.sh: error: $*" >&2; exit 1; }
mib() {
    [[ $1 =~ ^[0-9]+$ ]] && (( $1 >= 1 && $1 <= MAX_PART_MIB )) \
        || fail "the part size is whole MiB from 1 to $MAX_PART_MIB, not '$1'"
    echo "$1"
}
size() { stat -c %s "$1"; }

# pack MIB DIR WHEEL...: the wheels as one tar (names only, no folders) split into DIR/$PARTS00.. of at most
# MIB MiB, and DIR/$SUMS with each part's sha256 and the joined tar's
pack() {
    local mib=$1 dir=$2 members=() w part
    shift 2
    for w in "$@"; do
        [[ -f $w && $w == *.whl ]] || fail "$w is not a wheel file"
        members+=(-C "$(cd "$(dirname "$w")" && pwd)" "${w##*/}")
    done
    rm -f "$dir/$PARTS"* "$dir/$SUMS"
    tar -cf - --owner=0 --group=0 --numeric-owner "${members[@]}" \
        | split -b "${mib}M" -d -a 2 - "$dir/$PARTS" || fail "could not write the parts into $dir"
    (
        cd "$dir"
        sha256sum "$PARTS"*
        cat "$PARTS"* | sha256sum | sed "s/ -\$/ $TAR/"
    ) > "$dir/$SUMS.tmp" && mv "$dir/$SUMS.tmp" "$dir/$SUMS"
    echo "== DALI's wheels as one tar in parts of at most $mib MiB (join: cat $PARTS* > $TAR)"
    for part in "$dir/$PARTS"*; do
        printf "%10d  %s\n" "$(size "$part")" "$part"
        (( $(size "$part") <= mib * 1024 * 1024 )) || fail "${part##*/} is over $mib MiB"
    done
    echo "checksums: $dir/$SUMS"
}

dali=0 split=""
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage 0 ;;
        --dali) dali=1; shift ;;
        --split) [[ $# -ge 2 ]] || usage 2; split=$(mib "$2"); shift 2 ;;
        --pack)
            [[ $# -ge 4 ]] || usage 2
            part_mib=$(mib "$2")
            mkdir -p "$3"
            pack "$part_mib" "$(cd "$3" && pwd)" "${@:4}"
            exit 0 ;;
        -*) echo "gpu_wheels.sh: unknown option $1" >&2; usage 2 ;;
        *) break ;;
    esac
done
[[ $# -eq 1 ]] || usage 2
[[ -z $split || $dali == 1 ]] || fail "--split splits DALI's wheels: pass --dali too"
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT

download() {  # download DEST SPEC: one wheel for CPython 3.12 manylinux x86_64
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_28_x86_64 -d "$1" "$2" \
        || fail "could not download a wheel of $2 for CPython 3.12 manylinux x86_64"
}

for p in "${PREFIXES[@]}" "${DALI_PREFIXES[@]}"; do rm -f "$DIR/$p"-*.whl; done
rm -f "$DIR/$PARTS"* "$DIR/$SUMS"

for spec in "${DOWNLOADS[@]}"; do
    echo "== download $spec"
    download "$DIR" "$spec"
done

# The project, from a copy of what a build reads (not in the checkout: a stale build/lib there would leak
# deleted modules into the wheel, and the build would write build/ and *.egg-info into the tree).
echo "== build dist_dejpeg from $ROOT"
mkdir "$SRC/project"
for f in pyproject.toml setup.py setup.cfg MANIFEST.in README.md LICENSE LICENSE.txt; do
    [[ -e $ROOT/$f ]] && cp "$ROOT/$f" "$SRC/project/"
done
cp -R "$ROOT/dist_dejpeg" "$SRC/project/"
find "$SRC/project" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
"$PYTHON" -m pip wheel -q --no-deps -w "$DIR" "$SRC/project" || fail "could not build the dist_dejpeg wheel"

shopt -s nullglob
dali_wheels=()
if [[ $dali == 1 ]]; then
    cache=${DALI_CACHE:-$SRC/dali}
    mkdir -p "$cache"
    for spec in "${DALI[@]}"; do
        echo "== download $spec (DALI) into $cache"
        download "$cache" "$spec"
        name=${spec%%==*}
        w=("$cache/${name//-/_}-${spec##*==}"-*.whl)
        [[ ${#w[@]} -eq 1 ]] || fail "expected one wheel of $spec in $cache, found ${#w[@]}"
        dali_wheels+=("${w[0]}")
    done
fi

check_tags() {  # the wheels install on CPython 3.12 x86_64
    for w in "$@"; do
        case $w in
            *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-*manylinux*x86_64.whl \
                | *-py3-none-manylinux*x86_64.whl | *-cp3?-abi3-manylinux*x86_64.whl) ;;
            *) fail "${w##*/} does not install on CPython 3.12 x86_64" ;;
        esac
    done
}
echo "== wheels in $DIR"
for p in "${PREFIXES[@]}"; do
    w=("$DIR/$p"-*.whl)
    [[ ${#w[@]} -eq 1 ]] || fail "expected one $p wheel in $DIR, found ${#w[@]}"
    check_tags "${w[0]}"
done
check_tags "${dali_wheels[@]}"
for w in "$DIR"/*.whl; do
    known=0
    for p in "${PREFIXES[@]}"; do [[ ${w##*/} == "$p"-* ]] && known=1; done
    [[ $known == 1 ]] || echo "warning: ${w##*/} is not one of this script's wheels; gpu_check.sh installs it too" >&2
done
plain=("$DIR"/*.whl)
ls -l "${plain[@]}" | awk '{printf "%10d  %s\n", $5, $NF}'
bytes=$(du -cb "${plain[@]}" | tail -1 | cut -f1)
echo "plain wheels: $bytes bytes in $DIR"
(( bytes < LIMIT_MB * 1000 * 1000 )) || fail "the plain wheels in $DIR are $bytes bytes, over the ${LIMIT_MB} MB limit"

if [[ -n $split ]]; then
    pack "$split" "$DIR" "${dali_wheels[@]}"
elif [[ $dali == 1 ]]; then
    cp "${dali_wheels[@]}" "$DIR/"
    echo "== DALI's wheels, plain (no --split)"
    for w in "${dali_wheels[@]}"; do printf "%10d  %s\n" "$(size "$w")" "$DIR/${w##*/}"; done
fi
echo "total: $(du -sh "$DIR" | cut -f1) ($(du -sb "$DIR" | cut -f1) bytes) in $DIR"
