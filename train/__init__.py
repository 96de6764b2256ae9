"""spectra.train: the RLVR trainer on TRL (method registry, ΔW checkpoints, rewards, the model organism).

>>> from spectra.train import TrainConfig, train
>>> run_dir = train(TrainConfig(method="dora", max_steps=20))   # doctest: +SKIP

In a training script of one's own (any transformers/TRL Trainer), one callback records the same run:

>>> from spectra.train import SpectraCallback
>>> trainer.add_callback(SpectraCallback(out="runs", name="my-run"))   # doctest: +SKIP
"""

from typing import Any

from spectra.train.config import TrainConfig, TrainConfigError


def train(cfg: TrainConfig, resume: bool = False):
    """Run (or resume) one RLVR run and return its directory (see :mod:`spectra.train.trainer`)."""
    from spectra.train.trainer import train as _train

    return _train(cfg, resume=resume)


def __getattr__(attr: str) -> Any:
    """``SpectraCallback`` and ``CallbackError``, imported when first asked for (they need transformers)."""
    if attr in ("SpectraCallback", "CallbackError"):
        from spectra.train import callback

        return getattr(callback, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["CallbackError", "SpectraCallback", "TrainConfig", "TrainConfigError", "train"]
