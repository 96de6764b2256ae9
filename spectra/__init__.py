"""spectra: the spectral geometry of RLVR weight updates.

The analysis core. It needs only torch, numpy, scipy, h5py, pandas and the plotting libraries; it never
imports the trainer (``spectra.train``), the probes or the command line.

>>> import spectra
>>> run = spectra.load_run("runs/lora")            # doctest: +SKIP
>>> df = run.analyze()                              # one row per step × module  # doctest: +SKIP
>>> analysis = spectra.analyze_run("runs/lora")      # … and analysis/ written     # doctest: +SKIP

Inside, imports run one way (tests/test_layering.py, docs/architecture.md): files (``h5io``, ``codecs``,
``deltafile``, ``store``, ``writer``) → tensors (``operators``, ``svd``, ``base``) → metrics (``metrics``,
with the registry) → engine (``engine``) → tables (``tables``) → pipeline (``run``, ``schedule``,
``pipeline``, ``shard``) → reports (``figures``, ``render``, ``report``).
"""

from typing import TYPE_CHECKING, Any

from spectra.errors import (  # light: no torch
    DeltaFileError,
    RunDirError,
    ShapeMismatchError,
    SpectraError,
)

if TYPE_CHECKING:
    from spectra.engine import EngineConfig
    from spectra.operators import DeltaOperator, Dense, DoRA, LowRank, Scaled, VectorDelta
    from spectra.pipeline import Analysis, Run, analyze_run, load_run
    from spectra.writer import RunWriter

#: The exports that need torch, imported when first asked for (PEP 562), so that ``spectra --help``
#: and the config dataclasses start without it: {name: the module that defines it}.
_LAZY = {
    "EngineConfig": "spectra.engine",
    **dict.fromkeys(("DeltaOperator", "Dense", "DoRA", "LowRank", "Scaled"), "spectra.operators"),
    "VectorDelta": "spectra.operators",
    **dict.fromkeys(("Analysis", "Run", "analyze_run", "load_run"), "spectra.pipeline"),
    "RunWriter": "spectra.writer",
}


def __getattr__(name: str) -> Any:
    """A torch-backed export, imported on first use and then kept in the module's namespace."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
