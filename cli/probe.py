"""``spectra probe``: studies built on the core and the trainer. ``maturity``: the heavy-tailed spectral
statistics of base models' frozen weights, joined to what adapters did on them (spectra.probes.maturity)."""

from __future__ import annotations

import typer
from spectra.cli.options import ConfigCommand, Group, config_options
from spectra.probes.maturity_config import MaturityOptions

probe_app = typer.Typer(
    cls=Group, name="probe", help="Studies on base models and runs (model maturity).", no_args_is_help=True
)


_MODELS = typer.Argument(
    None,
    help="Hub ids (from the local hub cache: nothing is downloaded), model directories, organism, "
    "organism@N or random-organism. Run directories and sweep folders given here count as --runs.",
)
_OUT = typer.Option("probes/maturity", help="Folder of maturity.csv, summary.json and report.html.")
_RUNS = typer.Option(
    [],
    "--runs",
    help="Run directories or sweep folders (repeatable, or comma-separated): their base "
    "models are probed too and joined with the runs' accuracy and collapse.",
)
_ALL = typer.Option(
    False, "--all-weights", help="Also the matrices outside numbered layers (embeddings, head)."
)
_DEVICE = typer.Option(None, help="cuda, cpu, ... (default: CUDA when present).")
_FORCE = typer.Option(False, "--force", help="Analyse every model again instead of using the cache.")
_MEMORY = typer.Option(
    1024, help="Float64 work per batch of same-shape matrices, in MiB (one matrix always fits)."
)


@probe_app.command(cls=ConfigCommand)
@config_options(MaturityOptions)
def maturity(
    options: MaturityOptions,
    models: list[str] = _MODELS,
    out: str = _OUT,
    runs: list[str] = _RUNS,
    all_weights: bool = _ALL,
    device: str | None = _DEVICE,
    force: bool = _FORCE,
    memory_mb: int = _MEMORY,
) -> None:
    """Heavy-tailed ESD statistics (α with its standard error and tail size, α̂, KS distance, stable rank,
    MP bulk edge, spikes, soft rank, entropy) of every projection matrix of each model, streamed tensor by
    tensor; OUT/maturity.csv, summary.json and an offline report.html comparing the models (--pvalue:
    also each power law's goodness of fit). Models analysed before are reused."""
    from rich.markup import escape
    from spectra.cli.main import _bars, _one_line_errors, console
    from spectra.probes.maturity import probe_maturity
    from spectra.probes.maturity_runs import is_runs_folder

    given = list(models or [])
    run_paths = [p.strip() for r in runs for p in r.split(",") if p.strip()]
    run_paths += [m for m in given if is_runs_folder(m)]  # `--runs a b`: b arrives as a positional
    given = [m for m in given if not is_runs_folder(m)]
    with _one_line_errors(), _bars("matrices", transient=False) as (bar, add):

        def start(label: str, total: int):
            task = add(label, total)
            return lambda n: bar.advance(task, n)

        result = probe_maturity(
            given, out, runs=run_paths, all_weights=all_weights, device=device, force=force,
            budget_mb=memory_mb, progress=start, options=options,
        )  # fmt: skip
    for problem in result.problems:
        console.print(f"[yellow]warning:[/yellow] {escape(problem)}")
    for t in result.models:
        s = result.summary["models"][t.label]
        med = s["median"]
        beside = (
            f" (median SE {med['alpha_stderr']:.2g}, median tail {med['num_tail']:.0f} eigenvalues)"
            if med["alpha_stderr"] is not None and med["num_tail"] is not None
            else ""
        )
        console.print(
            f"{t.label}: {s['modules']} matrices, {s['fitted']} with an α fit"
            + (f", median α {med['alpha']:.3g}{beside}" if med["alpha"] is not None else "")
            + (f", {s['short_tail']} with a tail too short for α" if s["short_tail"] else "")
            + (
                f"; power law ruled out (p ≤ 0.1) for {s['ruled_out']} of {s['pvalue_tested']} tested"
                if s["pvalue_tested"]
                else ""
            )
            + (" (cached)" if t.reused else "")
        )
    if result.outcomes is not None:
        console.print(f"joined with {len(result.summary['runs'])} run(s)")
    console.print(f"report: [bold]{result.files[-1]}[/bold]")
