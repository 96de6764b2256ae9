#!/usr/bin/env bash
# Issue 17's GPU measurements on the device machine, in one call (≤ 8 minutes on one H200):
#
#   here, once (needs the package index):  bash benchmarks/device_check.sh --download
#   on the device (tool `run`, carry [".whl"], timeout_s 600):  bash benchmarks/device_check.sh
#   on this CPU, tiny shapes (checks every path):  bash benchmarks/device_check.sh --dry-run
#
# --download fetches, into .whl/ (ignored by git), the wheels the GPU image lacks: nvmath-python (the
# batched cuSOLVER eigensolver; with cuda-core and cuda-pathfinder, installed there only if the image's
# are older than it needs) and WeightWatcher with powerlaw (benchmarks/bench_esd.py). On the device the
# wheels go to /tmp/site (never into the image's environment) and spectra is imported from the checkout.
# Results: $OUT/device_check.{json,md,log}. Other arguments go to benchmarks/device_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--download" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
        manylinux2014_x86_64 manylinux1_x86_64 any; do platforms+=(--platform "$p"); done
    for wheel in nvmath-python==1.0.0 cuda-core==1.2.2 cuda-pathfinder==1.9.1 weightwatcher==0.7.7 \
        powerlaw==2.0.0 matplotlib-inline traitlets; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" -d .whl "$wheel" || exit 1
    done
    ls -la .whl
    exit 0
fi

PY=python3
if [[ "${1:-}" == "--dry-run" ]]; then
    PY=${PYTHON:-.venv/bin/python}
else
    export OUT=${OUT:-/tmp/device_check_out}
    mkdir -p "$OUT"
    if ls .whl/*.whl >/dev/null 2>&1; then
        # nvmath and WeightWatcher always; cuda-core / cuda-pathfinder only where the image's are too old
        base=$(ls .whl/*.whl | grep -v -e cuda_core -e cuda_pathfinder)
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            $base || echo "warning: the carried wheels did not install"
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        if ! $PY -c "import nvmath.bindings.cusolverDn" 2>/dev/null; then
            $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site-cuda .whl/cuda_core-*.whl .whl/cuda_pathfinder-*.whl \
                && export PYTHONPATH=/tmp/site-cuda:$PYTHONPATH
            $PY -c "import nvmath.bindings.cusolverDn" || echo "warning: nvmath-python does not import here"
        fi
    else
        echo "warning: no .whl/ carried: nvmath-python (batched eigensolver) and WeightWatcher are missing"
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
exec $PY benchmarks/device_check.py "$@"
