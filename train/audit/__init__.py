"""``spectra audit``: is an adapter learning what was asked?

:func:`audit` reads a run directory, a trainer checkpoint (or a folder of them) or a PEFT adapter folder
(:mod:`.load`, through ``spectra import``'s readers), runs every check of :mod:`.checks` on what it read
and returns the findings (:mod:`.findings`: level, check, modules, evidence; a table or JSON).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from spectra.train.audit.findings import Finding, has_errors, ordered, to_json

if TYPE_CHECKING:  # subject imports torch: `spectra audit --help` starts without it
    from spectra.train.audit.subject import Subject

__all__ = ["Finding", "audit", "audit_subject", "has_errors", "to_json"]


def audit_subject(subject: Subject) -> list[Finding]:
    """Every check on an already read subject, in report order."""
    from spectra.train.audit.checks import CHECKS

    return ordered([f for check in CHECKS for f in check(subject)])


def audit(
    path: str | Path,
    base: str | None = None,
    method: str | None = None,
    targets: list[str] | None = None,
) -> tuple[Subject, list[Finding]]:
    """Audit ``path`` (a run, a checkpoint or an adapter folder): what was read, and the findings.
    ``base``: BASE of an adapter (default: its ``base_model_name_or_path``); ``method``/``targets``: what
    was asked, over any configuration found beside it."""
    from spectra.train.audit.load import load_subject

    subject = load_subject(path, base=base, method=method, targets=targets)
    return subject, audit_subject(subject)
