"""Overhead of `spectra train` over bare TRL GRPO: the same run trained side by side in one process.

Three variants share the configuration, model, data, reward, ``GRPOConfig`` and seed:

1. ``bare``: TRL's own ``trl.GRPOTrainer`` built from what :func:`spectra.train.trainer.prepare` builds
   (the model with the method attached, the dataset, the accuracy reward, ``grpo_config``, the
   method's optimizer), with no spectra callback and TRL's log printer removed (spectra prints its
   own line instead);
2. ``record``: ``prepare(...)`` with the ΔW recorder only (``monitor_every=0``: no monitor and no
   collapse alarm in its ``SpectraCallback``; ``eval_every=0``: no held-out evaluation);
3. ``spectra``: ``prepare(...)`` as ``spectra train`` runs it: ΔW recording, the live geometry monitor
   and the held-out evaluation at their defaults (``train/config.py``; on the organism, ΔW every 10
   steps and an evaluation of 64 problems × 4 samples every 10 steps; on a real model the study's
   preset: ΔW every 50 steps, no evaluation).

The variants run in turn, ``--repeats`` times (bare, record, spectra, bare, …), so that a change in the
machine's load falls on all of them. Reported per variant: seconds per step (the median over repeats of
``trainer.train()``'s wall-clock time over the steps) and the overhead over ``bare`` in %; the same for
this process's CPU time (``time.process_time``: on a machine shared with other work it varies less than
the wall clock; math-verify's worker process is not in it); for ``spectra``, the time spent inside the
recorder, the monitor and the evaluation, and what is left. A measure that needs no second run: the
share of each run's time spent inside spectra's callbacks (every ``on_*`` method of the callbacks from
``spectra.train`` timed in place): on a loaded machine the side-by-side numbers vary by more than the
5 % target from run to run, this share does not. The load average (``os.getloadavg``) before and after
says under which conditions it was measured.

Same work: with ``--dropout 0`` (the default here) the three sample the same rollouts, so that they
do the same work (spectra samples with the adapter's dropout off, TRL with it on; the held-out
evaluation draws from its own seeded streams). The rewards of every step are compared and reported.

    python benchmarks/bench_overhead.py [--method lora] [--max-steps 60] [--repeats 3] [--threads 1] [--out F]
    python benchmarks/bench_overhead.py --device cuda --model <path> [--batch-size 8]
        [--max-completion-length 512] [--max-steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_recording import import_torch_for  # benchmarks/ is on the path of a script run from it

VARIANTS = ("bare", "record", "spectra")


def config(args: argparse.Namespace, out: Path, name: str, variant: str = "spectra"):
    """The run's configuration; ``record`` turns the monitor (and with it the alarm) and evaluation off."""
    from spectra.train import TrainConfig

    off = {"monitor_every": 0, "eval_every": 0} if variant == "record" else {}
    return TrainConfig(
        model=args.model, method=args.method, max_steps=args.max_steps, seed=args.seed, out=str(out),
        name=name, dropout=args.dropout, batch_size=args.batch_size, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, **off,
    )  # fmt: skip


def bare_trainer(cfg: Any, run_dir: Path) -> Any:
    """TRL's GRPOTrainer on what ``prepare`` would build for ``cfg``, without spectra's callbacks."""
    import torch
    from spectra.train.checkpoint import find_model_dir
    from spectra.train.config import ORGANISM
    from spectra.train.data import build_dataset, load_rows
    from spectra.train.methods import get_method
    from spectra.train.rewards import accuracy_reward, format_reward
    from spectra.train.trainer import grpo_config, load_model
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    cfg = cfg.resolve()
    tokenizer, model = load_model(find_model_dir(cfg.model), cfg)
    method = get_method(cfg.method)
    torch.manual_seed(cfg.seed)  # as prepare: the same adapter initialisation
    model = method.apply(model, cfg)
    rows = load_rows(cfg.dataset, cfg.dataset_split, cfg.problem_column, cfg.answer_column)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[accuracy_reward, format_reward] if cfg.format_reward else [accuracy_reward],
        args=grpo_config(cfg, run_dir / "checkpoints"),
        train_dataset=build_dataset(rows, tokenizer, cfg.dataset == ORGANISM),
        processing_class=tokenizer,
        optimizers=(method.optimizer(model, cfg), None),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def one_run(variant: str, args: argparse.Namespace, out: Path, name: str) -> dict[str, Any]:
    """Build one variant's trainer, train it, and time it."""
    from spectra.train.eval.evaluation import HeldOutEval
    from spectra.train.trainer import prepare

    cfg = config(args, out, name, variant)
    session = evaluation = None
    if variant == "bare":
        trainer = bare_trainer(cfg, out / name)
    else:
        session = prepare(cfg)
        trainer = session.trainer
        evaluation = next((c for c in trainer.callback_handler.callbacks if isinstance(c, HeldOutEval)), None)
        assert variant != "record" or (session.monitor is None and evaluation is None)
    eval_s = _time_calls(evaluation, "run") if evaluation is not None else [0.0, 0.0]
    inside = _time_callbacks(trainer)
    load = os.getloadavg()
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    logs = [row for row in trainer.state.log_history if "reward" in row]
    return {
        "wall_s": wall,
        "s_per_step": wall / trainer.state.global_step,
        "cpu_s_per_step": cpu / trainer.state.global_step,
        "steps": trainer.state.global_step,
        "rewards": [row["reward"] for row in logs],
        "tokens": logs[-1].get("num_tokens") if logs else None,
        "record_s": session.recorder.seconds + session.recorder.base_seconds if session else 0.0,
        "monitor_s": (
            session.monitor.seconds + session.monitor.setup_seconds
            if session and session.monitor and variant == "spectra" else 0.0
        ),
        "eval_s": eval_s[0],
        "eval_cpu_s": eval_s[1],
        "callbacks_s": {name: round(t[0], 4) for name, t in inside.items()},
        "callbacks_cpu_s": {name: round(t[1], 4) for name, t in inside.items()},
        "in_callbacks_pct": 100 * sum(t[0] for t in inside.values()) / wall,
        "load_before": load[0],
        "load_after": os.getloadavg()[0],
    }  # fmt: skip


def _time_calls(obj: Any, name: str, total: list[float] | None = None) -> list[float]:
    """Wrap ``obj.name`` so that the seconds spent in it (wall clock, this process's CPU) add up in
    ``total`` (a new ``[0.0, 0.0]`` by default), which is returned."""
    total = [0.0, 0.0] if total is None else total
    method = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            return method(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - t0
            total[1] += time.process_time() - cpu0

    setattr(obj, name, timed)
    return total


def _time_callbacks(trainer: Any) -> dict[str, list[float]]:
    """Time every event method of spectra's callbacks in ``trainer`` (wall clock and CPU, per class)."""
    totals: dict[str, list[float]] = {}
    for callback in trainer.callback_handler.callbacks:
        if not type(callback).__module__.startswith("spectra."):
            continue
        spent = totals.setdefault(type(callback).__name__, [0.0, 0.0])
        for name in dir(callback):
            if name.startswith("on_"):
                _time_calls(callback, name, spent)
    return totals


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median seconds per step of each variant, the overheads over bare, and the parts of spectra's."""
    med = {v: statistics.median(r["s_per_step"] for r in runs[v]) for v in runs}
    cpu = {v: statistics.median(r["cpu_s_per_step"] for r in runs[v]) for v in runs}
    out: dict[str, Any] = {"s_per_step": med, "cpu_s_per_step": cpu}
    out["overhead_pct"] = {v: 100 * (med[v] / med["bare"] - 1) for v in runs if v != "bare"}
    out["cpu_overhead_pct"] = {v: 100 * (cpu[v] / cpu["bare"] - 1) for v in runs if v != "bare"}
    full = runs["spectra"]
    steps = full[0]["steps"]
    parts = {k: statistics.median(r[k] for r in full) / steps for k in ("record_s", "monitor_s", "eval_s")}
    parts["rest_s"] = med["spectra"] - med["bare"] - sum(parts.values())
    out["spectra_overhead_s_per_step"] = parts
    out["eval_cpu_s_per_step"] = statistics.median(r["eval_cpu_s"] for r in full) / steps
    out["in_callbacks_pct"] = {v: statistics.median(r["in_callbacks_pct"] for r in runs[v]) for v in runs}
    out["same_rollouts"] = all(r["rewards"] == runs["bare"][0]["rewards"] for v in runs for r in runs[v])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="lora")
    p.add_argument("--model", default="organism", help="organism (default) or a model directory / hub id")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=None, help="prompts per step (default: the preset's)")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=None, help="default: the preset's")
    p.add_argument("--dropout", type=float, default=0.0, help="0: the variants sample the same rollouts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch = import_torch_for(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for variant in VARIANTS:
                run = one_run(variant, args, Path(tmp), f"{variant}-{i}")
                runs[variant].append(run)
                load = f"load {run['load_before']:.1f} → {run['load_after']:.1f}"
                step = f"{run['s_per_step']:.3f} s/step, CPU {run['cpu_s_per_step']:.3f} s/step"
                print(f"  {variant:>7} #{i + 1}: {step} ({load})", flush=True)
    summary = summarise(runs)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "device": device, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "config": vars(args) | {"out": str(args.out) if args.out else None},
        "runs": runs, **summary,
    }  # fmt: skip
    med, over, parts = summary["s_per_step"], summary["overhead_pct"], summary["spectra_overhead_s_per_step"]
    cpu, cpu_over = summary["cpu_s_per_step"], summary["cpu_overhead_pct"]
    inside = summary["in_callbacks_pct"]
    loads = [r[k] for rs in runs.values() for r in rs for k in ("load_before", "load_after")]
    print(
        f"{args.method} on {args.model} ({device}, {torch.get_num_threads()} threads), "
        f"{args.max_steps} steps, median of {args.repeats}, load average {min(loads):.1f}–{max(loads):.1f} "
        f"on {os.cpu_count()} CPUs; same rollouts in every run: {summary['same_rollouts']}\n"
        f"  wall clock: bare TRL {med['bare']:.3f} s/step; recording only {med['record']:.3f} "
        f"({over['record']:+.1f} %); spectra train {med['spectra']:.3f} ({over['spectra']:+.1f} %) = bare + "
        f"record {parts['record_s']:.3f} + monitor {parts['monitor_s']:.3f} + eval {parts['eval_s']:.3f} + "
        f"rest {parts['rest_s']:+.3f} s/step\n"
        f"  CPU time of this process: bare {cpu['bare']:.3f} s/step; recording only "
        f"{cpu_over['record']:+.1f} %; spectra train {cpu_over['spectra']:+.1f} % (evaluation "
        f"{summary['eval_cpu_s_per_step']:.3f} s/step)\n"
        f"  inside spectra's callbacks, in the same run: recording only {inside['record']:.1f} % of its "
        f"time; spectra train {inside['spectra']:.1f} %"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
