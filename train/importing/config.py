"""`ImportConfig`: every option of `spectra import`, one field each (read by :mod:`spectra.cli.options`).

Light on purpose: importing it loads neither torch nor transformers. The values are checked by
:func:`spectra.train.importing.run.import_run`, so that a bad one is a one-line error from the command
line and from Python alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ImportConfig:
    """BASE, the SOURCEs and where the run goes."""

    base: str = field(
        metadata={"help": "The base model: a local model folder, or a hub id found in the local hub cache."}
    )
    sources: tuple[str, ...] = field(
        metadata={
            "help": "One or more: a second model (a base/RL pair), a folder of trainer checkpoints "
            "(checkpoint-N/, global_step_N/), or a PEFT adapter folder."
        }
    )
    out: str = field(default="runs", metadata={"help": "Folder the run directory is written in."})
    name: str | None = field(
        default=None, metadata={"help": "Run name (default: the last SOURCE's folder name)."}
    )
    step: int | None = field(
        default=None,
        metadata={"help": "Step of a model or adapter SOURCE (default 1; the next SOURCE the next step)."},
    )
    strict: bool = field(
        default=False, metadata={"help": "Tensors present in one model only are an error, not a warning."}
    )
