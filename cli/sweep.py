"""``spectra sweep``: a grid of runs from ``spectra train``'s own options (:func:`grid_options` over
:class:`TrainConfig`), trained, analysed and reported (:mod:`spectra.probes.sweep`, ``sweep_report``).

Registered in :mod:`spectra.cli.main`; this module stays light (no torch) until the command runs.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

import typer
from spectra.cli.options import grid_options, grid_values, option_fields
from spectra.train.config import TrainConfig

SWEEP = "Sweep"
#: Options of `spectra train` a sweep sets itself: the cells are OUT/<cell>.
NOT_GRID = ("out", "name")


_OUT = typer.Option(
    "runs/sweep", help="Folder of the sweep: one run directory per cell, sweep.csv, report.html.",
    rich_help_panel=SWEEP,
)
_ALSO = typer.Option(
    [], "--also", help="Repeatable: a further grid of name=values pairs over the same single values, "
    "e.g. --also 'method=quanta,dora batch-size=4,8'.", rich_help_panel=SWEEP,
)
_ZIP = typer.Option(
    [], "--zip", help="Repeatable: options that vary together, their i-th values in one cell (--rank 1,16 "
    "--alpha 2,32 --zip rank,alpha: two cells).", rich_help_panel=SWEEP,
)
_PRESET = typer.Option(
    None, help="A prepared study: organism (the rank × batch grid on the embedded organism, with DoRA "
    "and QuanTA cells; 2-core CPU ≤ 20 min). Options given replace the preset's.", rich_help_panel=SWEEP,
)
_GPUS = typer.Option(
    None, help="Comma-separated GPU ids: one cell per GPU at a time, each in its own process (default: "
    "all visible; 'none': one after another in this process, as on a CPU).", rich_help_panel=SWEEP,
)
_PROCESSES = typer.Option(
    1, min=1, help="Processes (GPUs) per cell, started with accelerate launch.", rich_help_panel=SWEEP
)
_MAX_CELLS = typer.Option(64, min=1, help="Ask before running more cells than this.", rich_help_panel=SWEEP)
_YES = typer.Option(False, "--yes", "-y", help="Do not ask (see --max-cells).", rich_help_panel=SWEEP)
_REPORT_ONLY = typer.Option(
    False, "--report-only", help="Rebuild sweep.csv and report.html from what is under OUT; train nothing.",
    rich_help_panel=SWEEP,
)
_AXES = typer.Option(
    None, help="The cliff's two axes, x,y (default: rank,batch_size where both vary).", rich_help_panel=SWEEP
)
_DEVICE = typer.Option(
    None, help="Analysis device: cuda, cpu, ... (default: CUDA when present).", rich_help_panel=SWEEP
)


@grid_options(TrainConfig, skip=NOT_GRID)
def sweep(
    grid: dict[str, tuple],
    out: str = _OUT,
    also: list[str] = _ALSO,
    zip_: list[str] = _ZIP,
    preset: str | None = _PRESET,
    gpus: str | None = _GPUS,
    processes_per_cell: int = _PROCESSES,
    max_cells: int = _MAX_CELLS,
    yes: bool = _YES,
    report_only: bool = _REPORT_ONLY,
    axes: str | None = _AXES,
    device: str | None = _DEVICE,
) -> None:
    """A grid of runs: every option of `spectra train` takes one value or several, comma-separated
    (spectra sweep --rank 8,64,256 --batch-size 64,128 --seed 0,1,2). Each cell is a run directory
    OUT/<cell>; finished cells are reused, interrupted ones resumed. Writes OUT/sweep.csv and
    OUT/report.html (the collapse cliff)."""
    from spectra.cli.main import _fail, _one_line_errors, console

    import spectra

    chosen_axes = [a.strip().replace("-", "_") for a in axes.split(",") if a.strip()] if axes else None
    if report_only:
        if grid or also or preset or zip_:
            _fail(spectra.SpectraError("--report-only: rebuilds the report from OUT/sweep.json; no grid"))
        with _one_line_errors():
            _report(out, chosen_axes, device)
        return
    with _one_line_errors():
        from spectra.probes.sweep import PRESETS, SweepError, check_cells, plan_sweep
        from spectra.probes.sweep_processes import visible_gpus

        if preset is not None and preset not in PRESETS:
            raise SweepError(f"--preset {preset}: expected one of {', '.join(PRESETS)}")
        given = PRESETS[preset] if preset else None
        full = {**(given.grid if given else {}), **grid}
        extra = [*(given.also if given else ()), *(parse_also(text) for text in also)]
        zipped = [*(given.zipped if given else ()), *([k.strip().replace("-", "_") for k in z.split(",")]
                                                      for z in zip_)]  # fmt: skip
        plan = plan_sweep(out, full, extra, processes_per_cell, zipped)
        check_cells(plan)  # a cell directory holding another run: refused before anything runs
        slots = _gpus(gpus, visible_gpus)
        chosen_axes = chosen_axes or (list(given.axes) if given else None)
    console.print(
        f"spectra sweep: {len(plan.cells)} cell(s) under {plan.out}"
        + (f", varying {', '.join(plan.varying)}" if plan.varying else "")
        + (f"; on GPU(s) {','.join(slots)}" if slots else "; one after another in this process")
    )
    if len(plan.cells) > max_cells and not yes:
        if not typer.confirm(f"{len(plan.cells)} cells is more than --max-cells {max_cells}; run them all?"):
            console.print("nothing run")
            raise typer.Exit(1)
    _train(plan, slots)
    with _one_line_errors():
        table = _report(out, chosen_axes, device)
    failed = table.loc[table["status"] == "failed", "cell"].tolist()
    if failed:
        console.print(f"[red]{len(failed)} cell(s) failed:[/red] {', '.join(failed)} (errors in sweep.csv)")
        raise typer.Exit(1)


def parse_also(text: str) -> dict[str, tuple]:
    """``'method=quanta,dora batch-size=4,8'`` → ``{"method": ("quanta", "dora"), "batch_size": (4, 8)}``
    (the values of each option parsed as the option's own, :func:`grid_values`)."""
    out: dict[str, tuple] = {}
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"resolved", *NOT_GRID}
    aliases = {a.lstrip("-").replace("-", "_"): f.name for f in option_fields(TrainConfig)
               for a in f.metadata.get("aliases", ())}  # fmt: skip
    for part in shlex.split(text):
        name, sep, values = part.partition("=")
        key = name.lstrip("-").replace("-", "_")
        key = aliases.get(key, key)  # learning-rate=…: lr
        if not sep or key not in names:
            raise typer.BadParameter(
                f"{part!r}: expected name=values with name an option of spectra train (rank=8,16)",
                param_hint="--also",
            )
        out[key] = grid_values(TrainConfig, key, values)
    if not out:
        raise typer.BadParameter(f"{text!r}: no name=values pair", param_hint="--also")
    return out


def _gpus(text: str | None, visible) -> list[str]:
    """--gpus as a list: given ids (each one of the visible GPUs), none, or every visible GPU."""
    from spectra.probes.sweep import SweepError

    if text is None:
        return visible()
    if text.strip().lower() in ("", "none", "cpu"):
        return []
    ids = [g.strip() for g in text.split(",") if g.strip()]
    seen = visible()
    if not seen:
        raise SweepError(f"--gpus {text}: no CUDA device is visible; leave --gpus out to run on the CPU")
    unknown = [g for g in ids if g not in seen]
    if unknown:
        raise SweepError(f"--gpus {text}: {', '.join(unknown)} not among the visible GPUs ({','.join(seen)})")
    return ids


def _train(plan: Any, slots: list[str]) -> dict:
    """Run the sweep; Ctrl-C ends it with every finished cell kept (exit status 130)."""
    from spectra.cli.main import _one_line_errors, console
    from spectra.probes.sweep import run_sweep

    try:
        with _one_line_errors():
            return run_sweep(plan, slots or None, log=console.print)
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted:[/yellow] finished cells are kept; run the same command again to resume"
        )
        raise typer.Exit(130) from None


def _report(out: str, axes: list[str] | None, device: str | None):
    """sweep.csv and report.html, and a short table of the cells on the console."""
    from rich.table import Table
    from spectra.cli.main import console
    from spectra.probes.sweep_report import write_sweep_report

    from spectra.report import main_score

    table, files = write_sweep_report(out, axes, device, log=console.print)
    score = main_score(table)
    cols = ["cell", "status", *([score] if score else []), "E_1", "erank", "collapsed", "collapse step",
            "collapse signature", "wall s"]  # fmt: skip
    view = Table(title=f"spectra sweep: {out}")
    for c in cols:
        view.add_column(c, justify="left" if c in ("cell", "status") else "right", no_wrap=c == "cell")
    for row in table.to_dict("records"):
        view.add_row(*(_cell(row.get(c)) for c in cols))
    console.print(view)
    console.print(f"table: [bold]{files[0]}[/bold]\nreport: [bold]{files[-1]}[/bold]")
    return table


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    return f"{v:.3g}" if isinstance(v, float) else str(v)

