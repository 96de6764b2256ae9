"""What ``spectra audit`` says: findings (level, check, modules, evidence), as a table or as JSON.

A finding's ``level`` is ``error`` (the adapter does not learn what was asked: a CI job should fail),
``warning`` (probably wrong, worth a look) or ``info`` (a check that could not run, and why). The JSON
form is documented in docs/format.md ("The audit report").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Level = Literal["error", "warning", "info"]
LEVELS: tuple[Level, ...] = ("error", "warning", "info")
#: Bumped when the JSON form of the audit report changes.
AUDIT_FORMAT = "spectra-audit/1"
_SHOWN_MODULES = 3


@dataclass(frozen=True)
class Finding:
    """One thing an audit check found: ``check`` names the check (a function of :mod:`.checks`),
    ``modules`` the modules it concerns (empty when it concerns the whole adapter or run), ``evidence``
    one line saying what was seen and what to change."""

    level: Level
    check: str
    evidence: str
    modules: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"Finding.level {self.level!r}: expected one of {', '.join(LEVELS)}")

    @property
    def where(self) -> str:
        """The modules, abbreviated: the first few and how many more."""
        if not self.modules:
            return "-"
        shown = ", ".join(self.modules[:_SHOWN_MODULES])
        more = len(self.modules) - _SHOWN_MODULES
        return shown + (f" (+{more} more)" if more > 0 else "")


def has_errors(findings: list[Finding]) -> bool:
    """Whether any finding is at error level (``spectra audit`` then exits 1)."""
    return any(f.level == "error" for f in findings)


def ordered(findings: list[Finding]) -> list[Finding]:
    """Errors first, then warnings, then info; the checks' order within a level."""
    return sorted(findings, key=lambda f: LEVELS.index(f.level))


def to_json(findings: list[Finding], target: dict[str, Any]) -> dict[str, Any]:
    """The audit report as a JSON object (docs/format.md): what was audited, the counts per level,
    ``ok`` (no error), and every finding with all of its modules."""
    counts = {level: sum(f.level == level for f in findings) for level in LEVELS}
    return {
        "format": AUDIT_FORMAT,
        "target": target,
        "ok": not has_errors(findings),
        "counts": counts,
        "findings": [{**asdict(f), "modules": list(f.modules)} for f in ordered(findings)],
    }


def table_rows(findings: list[Finding]) -> list[tuple[str, str, str, str]]:
    """``(level, check, modules, evidence)`` per finding, in report order: the printed table."""
    return [(f.level, f.check, f.where, f.evidence) for f in ordered(findings)]
