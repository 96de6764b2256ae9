"""`AuditConfig`: every option of `spectra audit`, one field each (read by :mod:`spectra.cli.options`).

Light on purpose: importing it loads neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AuditConfig:
    """What to audit, against what, and how to print it."""

    target: str = field(
        metadata={
            "help": "A run directory (run.json), a trainer checkpoint folder (checkpoint-N/ with a PEFT "
            "adapter, or a folder of them) or a PEFT adapter folder (adapter_config.json)."
        }
    )
    base: str | None = field(
        default=None,
        metadata={"help": "Base model of an adapter (default: its base_model_name_or_path, found locally)."},
    )
    method: str | None = field(
        default=None,
        metadata={"help": "The method training was asked for (default: from run.json or a trainer config)."},
    )
    targets: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Comma-separated target module names asked for (default: from the configuration)."},
    )
    json: bool = field(default=False, metadata={"help": "Print the report as JSON (docs/format.md)."})
