"""spectra.train: the RLVR trainer on TRL (method registry, ΔW checkpoints, rewards, the model organism).

>>> from spectra.train import TrainConfig, train
>>> run_dir = train(TrainConfig(method="dora", max_steps=20))   # doctest: +SKIP
"""

from spectra.train.config import TrainConfig, TrainConfigError


def train(cfg: TrainConfig, resume: bool = False):
    """Run (or resume) one RLVR run and return its directory (see :mod:`spectra.train.trainer`)."""
    from spectra.train.trainer import train as _train

    return _train(cfg, resume=resume)


__all__ = ["TrainConfig", "TrainConfigError", "train"]
