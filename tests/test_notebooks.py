"""The notebooks in notebooks/ run headless from top to bottom, and are stored without outputs.

Each notebook is executed with nbclient on a kernel that is this interpreter (a kernelspec written to a
temporary JUPYTER_PATH), in a temporary working directory, with ``SPECTRA_RUN`` unset and every cache
(``SPECTRA_CACHE``, TMPDIR, IPython, Jupyter runtime, Hugging Face, matplotlib) pointed into the test's
temporary directory, so that nothing is written into the repository or the user's home. The notebooks
check their own results with ``assert``; a cell that raises fails the test with that cell's error.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from _requires import require

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CORE_NOTEBOOK = "metrics_on_synthetic.ipynb"  # needs the analysis core only
RUN_NOTEBOOK = "explore_run.ipynb"  # builds a small run: needs the train extra
KERNEL = "spectra-test-python"
TRAIN_EXTRA = ("transformers", "peft", "trl", "accelerate", "datasets")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def stored_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_notebooks_are_there():
    names = {p.name for p in stored_notebooks()}
    assert {CORE_NOTEBOOK, RUN_NOTEBOOK} <= names


@pytest.mark.parametrize("path", stored_notebooks(), ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"{path.name}: code cell {i} has stored outputs; strip them"
        assert cell.get("execution_count") is None, f"{path.name}: code cell {i} has an execution count"


@pytest.fixture
def headless(tmp_path, monkeypatch):
    """Environment for a notebook kernel: this interpreter, everything written under tmp_path.

    Returns the working directory the kernel starts in."""
    kernels = tmp_path / "jupyter" / "kernels" / KERNEL
    kernels.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "spectra tests",
        "language": "python",
    }
    (kernels / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    for var, sub in [
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("IPYTHONDIR", "ipython"),
        ("SPECTRA_CACHE", "spectra-cache"),
        ("TMPDIR", "tmp"),
        ("HF_HOME", "hf"),
        ("MPLCONFIGDIR", "mpl"),
    ]:
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SPECTRA_RUN", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    work = tmp_path / "work"
    work.mkdir()
    return work


def execute(name: str, work: Path, timeout: int) -> None:
    """Run every cell of notebooks/<name> in ``work``; fail with the first failing cell's error."""
    nbformat = require("nbformat")
    nbclient = require("nbclient")
    require("ipykernel")
    from nbclient.exceptions import CellExecutionError

    path = NOTEBOOKS / name
    stored = path.read_bytes()
    nb = nbformat.reads(stored.decode("utf-8"), as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(work)}}
    )
    error = None
    try:
        client.execute()
    except CellExecutionError as e:
        error = _ANSI.sub("", str(e))
    if error is not None:  # outside the except block: the report shows the cell's error, not ours
        pytest.fail(f"{name}: a cell raised\n{error}", pytrace=False)
    assert path.read_bytes() == stored  # executing never writes the stored notebook


def test_metrics_on_synthetic_notebook_runs(headless):
    execute(CORE_NOTEBOOK, headless, timeout=300)


def test_explore_run_notebook_builds_a_run_and_runs(headless):
    for pkg in TRAIN_EXTRA:
        require(pkg, "the train extra")
    execute(RUN_NOTEBOOK, headless, timeout=600)
    assert not any(headless.iterdir())  # the run was built in a temporary directory, not in the cwd
