#!/usr/bin/env bash
# Make the wheel folder that benchmarks/gpu_check.sh installs on the GPU machine (which has no network).
#
#   benchmarks/gpu_wheels.sh DIR          # run here, where pip reaches PyPI; then carry DIR to the GPU machine
#
# That machine's Python 3.12 (x86_64) already has torch, torchvision, timm, accelerate, torchmetrics,
# tensorboard, safetensors, scikit-image, pyyaml, ... (../shared/ENV.md, "A GPU machine without network").
# DIR gets wheels for exactly what it lacks, all pure Python (py3-none-any), well under 1 MB in all:
#   lpips, webdataset + braceexpand, omegaconf + antlr4-python3-runtime (4.9.3 ships only as an sdist,
#   so it is built here), and dist_dejpeg itself (built from this checkout's working tree).
# NVIDIA DALI is left out on purpose (~300 MB of wheels with nvimgcodec/nvjpeg): the GPU tests that need it
# skip themselves.
#
# Wheels of these packages already in DIR are replaced; other files are left alone (with a warning).
# Exits non-zero, naming the package, when a download or a build fails. PYTHON overrides python3.
set -euo pipefail

PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIMIT_MB=60

# versions seen working together (../shared/ENV.md); omegaconf 2.3 needs antlr4-python3-runtime 4.9.*
DOWNLOADS=(lpips==0.1.4 webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.3.0)
BUILDS=(antlr4-python3-runtime==4.9.3)
# wheel file name prefixes of everything this script puts into DIR
PREFIXES=(lpips webdataset braceexpand omegaconf antlr4_python3_runtime dist_dejpeg)

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
    [[ $# -eq 1 && ($1 == -h || $1 == --help) ]] && exit 0 || exit 2
fi
mkdir -p "$1"
DIR=$(cd "$1" && pwd)

fail() { echo "gpu_wheels.sh: error: $*" >&2; exit 1; }

for p in "${PREFIXES[@]}"; do rm -f "$DIR/$p"-*.whl; done

for spec in "${DOWNLOADS[@]}"; do
    echo "== download $spec"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$DIR" "$spec" || fail "could not download a wheel of $spec for CPython 3.12 manylinux x86_64"
done

for spec in "${BUILDS[@]}"; do
    echo "== build $spec (sdist only)"
    "$PYTHON" -m pip wheel -q --no-deps -w "$DIR" "$spec" || fail "could not build a wheel of $spec"
done

# The project, from a copy of what a build reads (not in the checkout: a stale build/lib there would leak
# deleted modules into the wheel, and the build would write build/ and *.egg-info into the tree).
echo "== build dist_dejpeg from $ROOT"
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
for f in pyproject.toml setup.py setup.cfg MANIFEST.in README.md LICENSE LICENSE.txt; do
    [[ -e $ROOT/$f ]] && cp "$ROOT/$f" "$SRC/"
done
cp -R "$ROOT/dist_dejpeg" "$SRC/"
find "$SRC" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
"$PYTHON" -m pip wheel -q --no-deps -w "$DIR" "$SRC" || fail "could not build the dist_dejpeg wheel"

echo "== wheels in $DIR"
shopt -s nullglob
for p in "${PREFIXES[@]}"; do
    w=("$DIR/$p"-*.whl)
    [[ ${#w[@]} -eq 1 ]] || fail "expected one $p wheel in $DIR, found ${#w[@]}"
    case ${w[0]} in
        *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-*manylinux*x86_64.whl) ;;
        *) fail "${w[0]##*/} does not install on CPython 3.12 x86_64" ;;
    esac
done
for w in "$DIR"/*.whl; do
    known=0
    for p in "${PREFIXES[@]}"; do [[ ${w##*/} == "$p"-* ]] && known=1; done
    [[ $known == 1 ]] || echo "warning: ${w##*/} is not one of this script's wheels; gpu_check.sh installs it too" >&2
done
ls -l "$DIR"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
bytes=$(du -sb "$DIR" | cut -f1)
echo "total: $(du -sh "$DIR" | cut -f1) ($bytes bytes) in $DIR"
(( bytes < LIMIT_MB * 1000 * 1000 )) || fail "$DIR holds $bytes bytes, over the ${LIMIT_MB} MB limit"
