"""The ``spectra`` command. Commands land here as their issues do: train, analyze, compare, eval, demo."""

from __future__ import annotations

import os
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape
from spectra.cli.audit import register as register_audit
from spectra.cli.importing import register as register_import
from spectra.cli.options import Command, ConfigCommand, Group, config_options, field_option
from spectra.cli.probe import probe_app
from spectra.cli.sweep import sweep as sweep_command
from spectra.train.config import (  # light: no trainer stack imported
    DEMO_METHODS,
    WHERE,
    TrainConfig,
)
from spectra.train.eval.config import EvalConfig  # light too

import spectra

# Light at import (tests/test_cli_startup.py): `spectra --help` and every command's --help start without
# torch or transformers; a command imports what it needs in its body.
app = typer.Typer(
    cls=Group,
    name="spectra",
    help="Spectral geometry of RLVR weight updates.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(probe_app, name="probe")
register_import(app)
register_audit(app)
console = Console(soft_wrap=True)
TRAIN_BANNER = "spectra train: loading the trainer stack (torch, transformers, TRL)…"


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


@app.command(cls=Command)
def info(run_dir: str = typer.Argument(..., help="A run directory (runs/<name>/).")) -> None:
    """Show what a run directory holds: configuration, recorded steps, modules, and the steps whose
    delta file lacks a module the run records."""
    with _one_line_errors():
        run = spectra.load_run(run_dir)
        steps, modules, gaps = run.steps, run.modules, run.incomplete_steps()
    console.print(f"[bold]{run.path}[/bold]")
    for key in ("model", "method", "rank", "alpha", "loss"):
        if key in run.config:
            console.print(f"  {key}: {run.config[key]}")
    console.print(f"  steps: {steps}")
    console.print(f"  modules: {len(modules)}")
    if gaps:
        console.print(f"  [yellow]incomplete steps: {sorted(gaps)}[/yellow]")
        for step, found in gaps.items():
            named = [m for m, _ in found if m is not None]
            lost = [why for m, why in found if m is None]
            what = [f"lacks {len(named)} module(s): {', '.join(named)}"] if named else []
            console.print(f"    step {step}: {escape('; '.join(what + lost))}")


@app.command(cls=Command)
def metrics() -> None:
    """Print every metric spectra computes (the registry: column, meaning, formula, range), as Markdown."""
    from spectra.metrics.registry import markdown

    print(markdown(), end="")


@app.command(cls=ConfigCommand)
@config_options(TrainConfig)
def train(
    cfg: TrainConfig,
    resume: bool = typer.Option(
        False, "--resume", help="Continue runs/<name> from its last checkpoint.", rich_help_panel=WHERE
    ),
) -> None:
    """Train with RLVR (TRL GRPO) and record ΔW. No options: LoRA on the embedded organism (CPU, minutes)."""
    if os.environ.get("RANK", "0") == "0":  # the first line, before seconds of imports (one per launch)
        console.print(TRAIN_BANNER, markup=False, highlight=False)
    from spectra.train import train as run_training

    with _one_line_errors():
        run_dir = run_training(cfg, resume=resume)
    console.print(f"run written to [bold]{run_dir}[/bold]")


class _Skipped(Exception):
    """Raised by ``_one_line_errors(warn=True)`` after printing the failure as a warning."""


@contextmanager
def _one_line_errors(warn: bool = False):
    """spectra's errors as one line; so too a file that cannot be written and a library's error deep
    inside training or analysis. ``warn``: print it as a warning and raise :class:`_Skipped` instead of
    exiting. With SPECTRA_DEBUG=1 every error, spectra's own included, propagates instead: the traceback
    shows it with the chain of its causes."""
    report = _warn_skip if warn else _fail
    try:
        yield
    except Exception as e:
        if os.environ.get("SPECTRA_DEBUG"):
            raise
        if isinstance(e, spectra.SpectraError):
            report(e)
        elif isinstance(e, OSError):  # an unwritable or missing path: name it
            report(RuntimeError(f"{e.filename or ''}: {e.strerror or e}" if e.filename else str(e)))
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            report(RuntimeError(f"{type(e).__name__}: {first} (set SPECTRA_DEBUG=1 for the traceback)"))


@contextmanager
def _bars(unit: str, transient: bool):
    """Rich progress bars that start with the first one, so that an error before any work prints
    alone. Yields ``(progress, add)``: ``add(label, total)`` starts the display and adds a bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
        TimeElapsedColumn(), console=console, transient=transient,
    )  # fmt: skip

    def add(label: str, total: int | None):
        if not bar.live.is_started:
            bar.start()
        return bar.add_task(label, total=total)

    try:
        yield bar, add
    finally:
        if bar.live.is_started:
            bar.stop()


def _warn_skip(e: BaseException) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(str(e))}; left out")
    raise _Skipped from None


def _analyze(
    run_dir: str, device: str | None, force: bool, k: int | None, heat_step: int | None,
    devices: str | None = None,
):  # fmt: skip
    """Analyse one run with a progress bar, write its plots and report; print what was done (in the
    processes of a torchrun / accelerate launch, only rank 0 writes and prints)."""
    from spectra.pipeline import analyze_run
    from spectra.report import write_run_report

    with _bars("modules", transient=True) as (bar, add):
        task = None

        def progress(done: int, total: int, label: str) -> None:
            nonlocal task
            task = add(f"analysing {run_dir}", None) if task is None else task
            bar.update(task, completed=done, total=total, description=f"{run_dir}: {label}")

        config = spectra.EngineConfig(device=device)
        analysis = analyze_run(run_dir, config, force=force, progress=progress, devices=devices)
    if not _main_process():
        return analysis
    files = write_run_report(analysis, k, heat_step)
    new, reused = analysis.new_steps, analysis.reused_steps
    console.print(
        f"{analysis.run_dir}: analysed {len(new)} new step(s)"
        + (f", reused {len(reused)} from an earlier analysis" if reused else "")
        + f"; {len(files) - 1} plots"
    )
    for problem in analysis.problems[:10]:
        console.print(f"  [yellow]warning:[/yellow] {escape(problem)}")
    if len(analysis.problems) > 10:
        console.print(f"  [yellow]… {len(analysis.problems) - 10} more in summary.json[/yellow]")
    record = analysis.summary.get("collapse") or {}
    if record.get("collapsed"):  # a performance cliff; the geometry's signature beside it
        console.print(
            f"  [red]collapsed from step {record['step']}[/red] ({escape(record['reason'])}); signature: "
            f"[bold]{record['signature']}[/bold] ({escape(str(record['signature_reason']))})"
        )
    return analysis


_DEVICE = typer.Option(None, help="cuda, cpu, ... (default: CUDA when present).")
_DEVICES = typer.Option(
    None,
    help="Spread the analysis over one process per device, e.g. cuda:0,cuda:1 (or cpu,cpu). Under "
    "torchrun / accelerate launch, leave it out: each launched process takes its share.",
)
_FORCE = typer.Option(False, "--force", help="Analyse every step again instead of reusing analysis/.")
_K = typer.Option(None, "--k", help="k of the alignment, concentration and angle plots (default 8).")


@app.command(cls=Command)
def analyze(
    run_dir: str = typer.Argument(..., help="A run directory (runs/<name>/)."),
    device: str | None = _DEVICE,
    devices: str | None = _DEVICES,
    force: bool = _FORCE,
    k: int | None = _K,
    heatmap_step: int | None = typer.Option(
        None, help="Step of the layer × projection heatmaps (default: last)."
    ),
) -> None:
    """Every metric of every recorded step and module → RUN_DIR/analysis/ (metrics.csv, summary.json,
    plots/*.png, report.html). Steps analysed before are reused."""
    with _one_line_errors():
        analysis = _analyze(run_dir, device, force, k, heatmap_step, devices)
    if _main_process():
        console.print(f"report: [bold]{analysis.folder / 'report.html'}[/bold]")


_RUN_DIRS = typer.Argument(..., help="Run directories, e.g. runs/lora runs/dora runs/full.")


@app.command(cls=Command)
def compare(
    run_dirs: list[str] = _RUN_DIRS,
    out: str = typer.Option("comparison", help="Folder for compare.csv, plots/ and report.html."),
    labels: str | None = typer.Option(None, help="Comma-separated names for the runs (default: run names)."),
    device: str | None = _DEVICE,
    devices: str | None = _DEVICES,
    force: bool = _FORCE,
    k: int | None = _K,
) -> None:
    """The same curves with runs side by side, and a table of final accuracy and geometry per run.
    Runs not analysed yet (or with new steps) are analysed first."""
    from pathlib import Path

    from spectra.report import write_comparison

    names = [t.strip() for t in labels.split(",")] if labels else None
    if names is not None and len(names) != len(run_dirs):
        _fail(ValueError(f"--labels: {len(names)} names for {len(run_dirs)} runs; give one per run"))
    with _one_line_errors():
        kept = _analyze_each(run_dirs, device, force, k, devices)
        if not _main_process():
            return
        names = [names[i] for i in kept] if names else None
        table, files = write_comparison([a for a in kept.values()], Path(out), names, k)
    _print_comparison(table, files[-1])


def _main_process() -> bool:
    from spectra.shard import is_main_process

    return is_main_process()


def _analyze_each(
    run_dirs: list[str], device: str | None, force: bool, k: int | None, devices: str | None = None
) -> dict:
    """Analyse every run that can be: a run that cannot is named in a warning and left out of the
    comparison; only when none can is it an error. Returns {index of the run: its analysis}."""
    kept = {}
    for i, run_dir in enumerate(run_dirs):
        try:
            with _one_line_errors(warn=True):
                kept[i] = _analyze(run_dir, device, force, k, None, devices)
        except _Skipped:
            continue
    if not kept:
        raise spectra.SpectraError("no run could be analysed (see the warnings above); nothing to compare")
    return kept


def _print_comparison(table, report) -> None:
    import pandas as pd
    from rich.table import Table

    view = Table(title="final step of each run (geometry: medians over modules)")
    view.add_column("")
    for run in table["run"]:
        view.add_column(str(run), justify="right")
    for col in table.columns.drop("run"):  # one row per quantity, one column per run: fits a terminal
        view.add_row(
            col, *("—" if pd.isna(v) else f"{v:.3g}" if isinstance(v, float) else str(v) for v in table[col])
        )
    console.print(view)
    seeds = report.parent / "compare_seeds.csv"  # runs that differ only by seed: mean [Student-t 95 %]
    if seeds.exists():
        from spectra.report import noise_sentences, seed_display

        grouped = pd.read_csv(seeds)
        shown = seed_display(grouped)
        view = Table(title=escape("runs that differ only by seed: mean [Student-t 95 % interval]"))
        view.add_column("")
        for name in shown["configuration"]:
            view.add_column(escape(str(name)), justify="right")
        for col in shown.columns.drop(["configuration", "runs"]):
            view.add_row(escape(col), *("—" if pd.isna(v) else escape(str(v)) for v in shown[col]))
        console.print(view)
        for sentence in noise_sentences(grouped):
            console.print(sentence, markup=False)
    console.print(f"comparison: [bold]{report}[/bold]")


@app.command(cls=Command)
def demo(
    out: str = typer.Option("runs/demo", help="Parent directory of the demo's runs and comparison."),
    methods: str = typer.Option(",".join(DEMO_METHODS), help="Comma-separated methods to train."),
    max_steps: int | None = field_option(TrainConfig, "max_steps"),
    model: str = field_option(TrainConfig, "model"),
    seed: int = field_option(TrainConfig, "seed"),
    device: str | None = _DEVICE,
) -> None:
    """Train several methods on the organism, analyse each and compare them (2-core CPU: ~10 min).
    A sweep over methods: runs already trained under OUT are reused; an interrupted one is resumed."""
    from pathlib import Path

    from spectra.probes.sweep import demo_sweep, run_sweep
    from spectra.probes.sweep_report import demo_reading

    from spectra.report import write_comparison

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    with _one_line_errors():
        plan = demo_sweep(out, chosen, model, max_steps, seed)
        states = run_sweep(plan, log=console.print)
        done = [str(c.run_dir) for c in plan.cells if states[c.name].get("status") == "finished"]
        if not done:
            raise spectra.SpectraError("no demo run finished; nothing to compare (errors above)")
        analyses = list(_analyze_each(done, device, False, None).values())
        table, files = write_comparison(analyses, Path(out) / "comparison")
    _print_comparison(table, files[-1])
    for a in analyses:
        console.print(f"  {a.run_dir.name}: {a.folder / 'report.html'}")
    for sentence in demo_reading(table):  # the first study's findings, read off the table
        console.print(sentence, markup=False)
    if len(done) < len(plan.cells):
        raise typer.Exit(1)


app.command(cls=ConfigCommand)(sweep_command)  # spectra sweep (cli/sweep.py)


@app.command("eval", cls=ConfigCommand)
@config_options(EvalConfig, on_error=lambda e: _fail(e))
def eval_(cfg: EvalConfig) -> None:
    """Avg@n and Pass@k on math benchmarks, scored by math-verify on the final \\boxed{} answer. On a run:
    its base plus ΔW at the chosen steps, appended to the run's eval.jsonl for `spectra analyze`."""
    from spectra.train.eval.run import run_eval

    with _one_line_errors():
        with _bars("problems", transient=False) as (bar, add):

            def start_bar(label: str, total: int):
                task = add(label, total)
                return lambda done: bar.advance(task, done)

            rows = run_eval(
                cfg, start_bar, log=lambda text: console.print(text, markup=False, highlight=False)
            )
    _print_eval(rows)


def _print_eval(rows: list[dict]) -> None:
    from pathlib import Path

    from rich.table import Table

    if not rows:
        return
    # Pass@1 equals Avg@n for the unbiased estimator: the table shows Avg@n (the JSON has both)
    scores = sorted(
        {c for r in rows for c in r if c.startswith(("avg@", "pass@")) and c != "pass@1"}, key=_score_order
    )
    steps = any(r["step"] is not None for r in rows)
    view = Table(title=f"spectra eval: {rows[0]['target']}")
    columns = (
        *(["step"] if steps else []),
        "benchmark",
        "problems",
        *scores,
        "unparsed",
        "cut off",
        "tokens",
    )
    for col in columns:
        view.add_column(col, justify="left" if col == "benchmark" else "right", no_wrap=True)
    for r in rows:
        cells = [f"{r['step']}{'' if r['weights_complete'] else '*'}"] if steps else []
        cells += [r["benchmark"], str(r["problems"]), *(f"{r[c]:.3f}" if c in r else "—" for c in scores)]
        cells += [f"{r['unparsable']:.1%}", f"{r['truncated']:.1%}", f"{r['tokens_mean']:.1f}"]
        view.add_row(*cells)
    notes = ["Pass@1 = Avg@n (unbiased estimator)"] if any("pass@1" in r for r in rows) else []
    if not all(r["weights_complete"] for r in rows):
        notes.append("* full fine-tuning without a trainer checkpoint: embeddings, norms and head at W0")
    view.caption = "; ".join(notes) or None
    console.print(view)
    seconds = sum(r["seconds"] for r in rows)
    console.print(f"results: [bold]{Path(rows[0]['file']).parent}[/bold] (sampling took {seconds:.1f} s)")


def _score_order(col: str) -> tuple[int, int]:
    kind, k = col.split("@")
    return (0 if kind == "avg" else 1, int(k))


def _fail(e: BaseException) -> None:
    console.print(f"[red]error:[/red] {escape(str(e))}")
    raise typer.Exit(1) from None


if __name__ == "__main__":
    app()
