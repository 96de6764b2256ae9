"""spectra: the spectral geometry of RLVR weight updates.

The analysis core. It needs only torch, numpy, scipy, h5py, pandas and the plotting libraries; it never
imports the trainer (``spectra.train``), the probes or the command line.

>>> import spectra
>>> run = spectra.load_run("runs/lora")            # doctest: +SKIP
>>> df = run.analyze()                              # one row per step × module  # doctest: +SKIP
"""

from spectra.engine import EngineConfig, analyze_run
from spectra.errors import (
    DeltaFileError,
    RunDirError,
    ShapeMismatchError,
    SpectraError,
)
from spectra.operators import DeltaOperator, Dense, DoRA, LowRank, Scaled, VectorDelta
from spectra.store import Run, RunWriter, load_run

__version__ = "0.1.0"

__all__ = [
    "DeltaFileError",
    "DeltaOperator",
    "Dense",
    "DoRA",
    "EngineConfig",
    "LowRank",
    "Run",
    "RunDirError",
    "RunWriter",
    "Scaled",
    "ShapeMismatchError",
    "SpectraError",
    "VectorDelta",
    "__version__",
    "analyze_run",
    "load_run",
]
