"""``spectra demo``: several methods trained on the embedded organism, for analysis and comparison.

Each method trains into ``<out>/<method>`` with the organism's preset (LoRA r32/α64, 60 steps of 8 × 8
rollouts, ΔW every 10 steps, held-out Avg@4 every 10 steps; per-method learning rates where the preset's
lr makes a method collapse, see ``ORGANISM_LR``). A run that finished before is reused, one that was
interrupted is resumed, so re-running the demo only does what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from spectra.train.config import DEMO_METHODS, TrainConfig, TrainConfigError, method_names


def finished(run_dir: Path) -> bool:
    """Whether a run trained to its end (the trainer writes train_summary.json last)."""
    return (run_dir / "train_summary.json").exists()


def train_demo_runs(
    out: str | Path,
    methods: Sequence[str] = DEMO_METHODS,
    model: str = "organism",
    max_steps: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> list[Path]:
    """Train (or reuse, or resume) one run per method under ``out``; returns the run directories.

    ``overrides`` are further :class:`TrainConfig` fields (the tests use them to train tiny runs).
    """
    known = method_names()
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise TrainConfigError(
            f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; choose among "
            + ", ".join(known)
        )
    from spectra.train.trainer import train

    out = Path(out)
    runs = []
    for method in methods:
        run_dir = out / method
        cfg = TrainConfig(
            model=model, method=method, max_steps=max_steps, out=str(out), name=method, seed=seed, **overrides
        )
        if finished(run_dir):
            _check_same(run_dir, cfg)
            log(f"{method}: already trained in {run_dir}, reused")
        elif (run_dir / "run.json").exists():
            log(f"{method}: {run_dir} was interrupted; resuming it")
            train(cfg, resume=True)
        else:
            train(cfg)
        runs.append(run_dir)
    return runs


def _check_same(run_dir: Path, cfg: TrainConfig) -> None:
    """A finished run is reused only if it was trained as asked now."""
    stored = json.loads((run_dir / "run.json").read_text())
    asked = cfg.resolve(num_processes=1).to_dict()
    differ = [k for k in ("model", "max_steps", "seed") if stored.get(k) != asked.get(k)]
    if differ:
        was = ", ".join(f"{k} {stored.get(k)}" for k in differ)
        raise TrainConfigError(
            f"{run_dir} was trained with {was}, not as asked now; use another --out or delete that run"
        )
