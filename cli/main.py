"""The ``spectra`` command. Commands land here as their issues do: train, analyze, compare, eval, demo."""

from __future__ import annotations

import typer
from rich.console import Console

import spectra

app = typer.Typer(
    name="spectra",
    help="Spectral geometry of RLVR weight updates.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"spectra {spectra.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train with RLVR, record ΔW, and measure its geometry."""


@app.command()
def info(run_dir: str = typer.Argument(..., help="A run directory (runs/<name>/).")) -> None:
    """Show what a run directory holds: configuration, recorded steps, modules."""
    try:
        run = spectra.load_run(run_dir)
        steps, modules = run.steps, run.modules
    except spectra.SpectraError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    console.print(f"[bold]{run.path}[/bold]")
    for key in ("model", "method", "rank", "alpha", "loss"):
        if key in run.config:
            console.print(f"  {key}: {run.config[key]}")
    console.print(f"  steps: {steps}")
    console.print(f"  modules: {len(modules)}")


if __name__ == "__main__":
    app()
