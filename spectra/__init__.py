"""spectra: the spectral geometry of RLVR weight updates.

The analysis core. It needs only torch, numpy, scipy, h5py, pandas and the plotting libraries; it never
imports the trainer (``spectra.train``), the probes or the command line.

>>> import spectra
>>> run = spectra.load_run("runs/lora")            # doctest: +SKIP
>>> df = run.analyze()                              # one row per step × module  # doctest: +SKIP
>>> analysis = spectra.analyze_run("runs/lora")      # … and analysis/ written     # doctest: +SKIP

Inside, imports run one way (tests/test_layering.py, docs/architecture.md): files (``h5io``, ``codecs``,
``store``, ``writer``) → tensors (``operators``, ``svd``, ``base``) → metrics (``metrics``, with the
registry) → engine (``engine``) → tables (``tables``) → pipeline (``pipeline``) → reports (``figures``,
``render``, ``report``).
"""

from spectra.engine import EngineConfig
from spectra.errors import (
    DeltaFileError,
    RunDirError,
    ShapeMismatchError,
    SpectraError,
)
from spectra.operators import DeltaOperator, Dense, DoRA, LowRank, Scaled, VectorDelta
from spectra.pipeline import Analysis, Run, analyze_run, load_run
from spectra.writer import RunWriter

__version__ = "0.2.0"

__all__ = [
    "Analysis",
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
