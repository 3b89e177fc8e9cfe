#!/usr/bin/env bash
# The GPU check is dist_dejpeg/bench/gpu_check.py (same options; --help); this keeps the recorded commands working.
PYTHONPATH=$(dirname "$0")/..${PYTHONPATH:+:$PYTHONPATH} exec "${PYTHON:-python3}" -m dist_dejpeg.bench.gpu_check "$@"
