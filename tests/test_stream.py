"""Streaming: an analysis holds one chunk in memory (and the next one, read ahead), never the whole
checkpoint, so its peak host memory does not grow with the number of modules; reading ahead changes
no number."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from spectra.engine import EngineConfig
from spectra.operators import Dense
from spectra.pipeline import analyze_run
from spectra.synthetic import qwen2_shapes
from spectra.writer import RunWriter

FAST = {"device": "cpu", "ks": (1, 4), "wt": "none", "bf16": True}

# In a fresh process: analyse with a small chunk budget, then with a budget that holds each shape group
# whole; print each analysis's peak resident memory (MiB) above the resident memory when it began (Linux:
# VmHWM, reset to the current RSS through /proc/self/clear_refs before each analysis).
MEASURE = """
import gc, json, re, sys
from pathlib import Path
from spectra.engine import EngineConfig
from spectra.pipeline import analyze_run, load_run

def status(key):
    return int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

run = load_run(sys.argv[1])
options = json.loads(sys.argv[2])
run.ensure_base_spectra(keep=EngineConfig(**options).keep)
out = {}
for budget in (4 << 20, 1 << 40):
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    start = status("VmRSS")
    analyze_run(run, EngineConfig(**options, max_batch_bytes=budget), save=False)
    out[budget] = status("VmHWM") - start
print(json.dumps(out))
"""


def _dense_run(path, layers: int) -> None:
    """A one-step full fine-tuning run with Gaussian W0 and ΔW (quick to write at any size)."""
    shapes = qwen2_shapes(hidden=192, intermediate=768, kv_dim=32, layers=layers)
    g = torch.Generator().manual_seed(0)
    w = RunWriter(path)
    w.write_config({"name": path.name, "method": "full", "model": "synthetic"})
    w.write_base_weights({k: torch.randn(m, n, generator=g) / n**0.5 for k, (m, n) in shapes.items()})
    w.write_delta(5, {k: Dense(torch.randn(m, n, generator=g) * 1e-3) for k, (m, n) in shapes.items()})


def _peaks(path) -> tuple[float, float]:
    options = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in FAST.items()})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", MEASURE, str(path), options]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    small, whole = json.loads(out.stdout.strip().splitlines()[-1]).values()
    return small, whole


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs"
)
def test_peak_host_memory_does_not_grow_with_the_number_of_modules(tmp_path):
    peaks = {}
    for layers in (2, 8):
        _dense_run(tmp_path / f"l{layers}", layers)
        peaks[layers] = _peaks(tmp_path / f"l{layers}")
    (small2, whole2), (small8, whole8) = peaks[2], peaks[8]
    # the measurement sees memory: holding every module of a shape group at once grows with their
    # number (6 more layers of W0, ΔW, their float64 copies and products: ~100 MiB) ...
    assert whole8 - whole2 > 60, peaks
    # ... while streaming chunks of a fixed budget grows only by what HDF5 keeps per dataset it has
    # opened (metadata caches, ≤ 32 MiB per file; ~0.1 MiB per module here)
    assert small8 - small2 < 0.25 * (whole8 - whole2), peaks


def test_reading_ahead_changes_no_number(lora_run):
    config = EngineConfig(**FAST, max_batch_bytes=1 << 16)  # many chunks: reads overlap compute
    ahead = analyze_run(lora_run, config, save=False, prefetch=True).table
    inline = analyze_run(lora_run, config, save=False, prefetch=False).table
    pd.testing.assert_frame_equal(ahead, inline)
    assert (ahead["status"] == "ok").all() and len(ahead) == 3 * 14


def test_the_device_script_runs_dry_on_the_cpu(tmp_path):
    """benchmarks/device_check.py --dry-run: the GPU measurements' commands at tiny shapes on the CPU
    (here two sections: the eigensolver table and the 7B streaming benchmark), results to --out."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "device_check.py")
    cmd = [sys.executable, script, "--dry-run", "--only", "eigh,stream_7b", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "device_check.json").read_text())
    assert results["environment"]["date"] and results["environment"]["device"].startswith("CPU")
    eigh, stream = results["sections"]["eigh"], results["sections"]["stream_7b"]
    assert eigh["status"] == "ok" and stream["status"] == "ok", (eigh["tail"], stream["tail"])
    for row in eigh["result"]["sizes"].values():
        assert row["syevd_4_streams"]["max_rel_err"] < 1e-6 and row["fastest"]
    runs = stream["result"]["runs"]
    assert sorted((r["kind"], r["layers"]) for r in runs.values()) == [
        ("base_spectra", 1), ("base_spectra", 4), ("dense", 1), ("dense", 4), ("lora", 1), ("lora", 4)
    ]  # fmt: skip
    assert all(r["peak_rss_gib"] > 0 and r["seconds"] >= 0 for r in runs.values())
    assert "| size | batch |" in (tmp_path / "device_check.md").read_text()
