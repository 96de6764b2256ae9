"""``spectra audit TARGET``: is an adapter learning what was asked? A table of findings (or ``--json``);
exit code 0 when nothing is at error level, 1 otherwise, so that it can gate a CI job."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from spectra.cli.options import ConfigCommand, config_options
from spectra.train.audit.config import AuditConfig

console = Console(soft_wrap=True, highlight=False)
_STYLE = {"error": "red", "warning": "yellow", "info": "dim"}


def register(app: typer.Typer) -> None:
    """Add the ``audit`` command to the ``spectra`` app."""
    app.command("audit", cls=ConfigCommand)(config_options(AuditConfig)(audit))


def audit(cfg: AuditConfig) -> None:
    """Check a run, a trainer checkpoint or a PEFT adapter: method and targets found vs asked, dead
    adapters (B still 0, alpha 0), no learning signal, AdaLoRA never reallocated, frozen weights that moved,
    updates lost to bf16, rollouts with dropout, outliers. Exit code 1 when a finding is an error, 2 when
    TARGET cannot be audited."""
    from spectra.cli.main import _one_line_errors
    from spectra.train.audit import audit as run_audit
    from spectra.train.audit import has_errors, to_json
    from spectra.train.audit.findings import table_rows

    try:
        with _one_line_errors():
            subject, findings = run_audit(
                cfg.target, base=cfg.base, method=cfg.method, targets=list(cfg.targets) or None
            )
    except typer.Exit:  # the target could not be audited: 2, so that a CI gate tells it from findings
        raise typer.Exit(2) from None
    if cfg.json:
        typer.echo(json.dumps(to_json(findings, subject.describe()), indent=2))
    else:
        _print_table(subject.describe(), table_rows(findings))
    raise typer.Exit(1 if has_errors(findings) else 0)


def _print_table(target: dict, rows: list[tuple[str, str, str, str]]) -> None:
    """A header line, then one line per finding: level, check, modules, evidence."""
    from rich.markup import escape

    asked = target["method_asked"] or "?"
    found = target["method_found"] or "from its records (see the method check)"
    console.print(
        f"audit of {target['kind']} {target['path']}: {target['modules']} adapted modules, "
        f"method asked {asked}, found {found}",
        markup=False,
    )
    if not rows:
        console.print("no findings: nothing wrong was found", markup=False)
        return
    width = max(len(r[1]) for r in rows)
    for level, check, where, evidence in rows:
        said = escape(evidence) if where == "-" else f"{escape(where)}: {escape(evidence)}"
        console.print(f"[{_STYLE[level]}]{level:<7}[/] {escape(check):<{width}}  {said}")
    errors = sum(r[0] == "error" for r in rows)
    console.print(f"{errors} error(s), {len(rows) - errors} other finding(s)", markup=False)
