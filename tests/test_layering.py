"""The analysis core stands alone: it never imports the trainer stack."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "spectra"
FORBIDDEN = (
    "trl",
    "peft",
    "transformers",
    "accelerate",
    "vllm",
    "deepspeed",
    "spectra.train",
    "spectra.probes",
    "spectra.cli",
)


def test_core_sources_import_no_higher_layer():
    pattern = re.compile(
        r"^\s*(?:from|import)\s+(" + "|".join(re.escape(f) for f in FORBIDDEN) + r")\b", re.M
    )
    offenders = [
        f"{p.name}: {m.group(0).strip()}" for p in CORE.rglob("*.py") for m in pattern.finditer(p.read_text())
    ]
    assert offenders == []


def test_importing_the_core_loads_no_trainer_module():
    code = (
        "import sys, spectra, spectra.metrics, spectra.engine, spectra.store; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {list(FORBIDDEN)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
