#!/usr/bin/env bash
# Set up .venv with spectra (editable) and its dev tools, on a fresh machine.
#   - torch: the CPU build (torch==2.13.0) where no NVIDIA GPU is present, the default build otherwise;
#     set TORCH_SPEC to choose another (e.g. TORCH_SPEC="torch==2.13.0").
#   - EXTRAS: the optional groups besides dev, comma-separated (default: train; EXTRAS= for the core alone).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    spec=$TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch"            # a CUDA build
  else
    spec="torch==2.13.0"    # the CPU build (no GPU here)
  fi
  echo "setup: installing $spec"
  "${pip[@]}" install "$spec"
fi
extras=${EXTRAS-train}
"${pip[@]}" install -e ".[dev${extras:+,$extras}]"
echo "setup: ready ($(.venv/bin/python -c 'import torch, spectra; print("spectra", spectra.__version__, "torch", torch.__version__)'))"
