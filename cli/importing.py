"""``spectra import BASE SOURCE…``: checkpoints other tools wrote, made into a spectra run."""

from __future__ import annotations

import shlex
import warnings

from rich.console import Console
from spectra.cli.options import ConfigCommand, config_options
from spectra.train.importing.config import ImportConfig

console = Console(soft_wrap=True, highlight=False)


def register(app) -> None:
    """Add the ``import`` command to the ``spectra`` app (``import`` is a keyword, hence the name)."""
    app.command("import", cls=ConfigCommand)(config_options(ImportConfig)(import_))


def import_(cfg: ImportConfig) -> None:
    """Make a run of checkpoints you already have: a base/RL model pair, a folder of trainer checkpoints
    (transformers/TRL checkpoint-N, verl global_step_N after its model merger, OpenRLHF), or PEFT adapters.
    W0 stays in BASE's files; then `spectra analyze OUT/NAME`."""
    from spectra.cli.main import _bars, _one_line_errors
    from spectra.train.importing.run import SourceWarning, import_run, run_dir_of

    with _one_line_errors(), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", SourceWarning)
        existed = run_dir_of(cfg.out, cfg.sources, cfg.name).exists()
        with _bars("tensors", transient=True) as (bar, add):
            tasks: dict[str, object] = {}

            def progress(done: int, total: int, label: str) -> None:
                if label not in tasks:
                    tasks[label] = add(label, total)
                bar.update(tasks[label], completed=done)

            run_dir = import_run(
                cfg.base, cfg.sources, cfg.out, cfg.name, step=cfg.step, strict=cfg.strict, progress=progress
            )
    for w in said:
        if issubclass(w.category, SourceWarning):
            console.print(f"warning: {w.message}", markup=False)
    done = "already imported, nothing to do:" if existed else "run written to"
    console.print(f"{done} {run_dir}  (next: spectra analyze {shlex.quote(str(run_dir))})", markup=False)
