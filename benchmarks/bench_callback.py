"""Cost of ``SpectraCallback`` in a user's own TRL GRPO script: the script with and without it, side by side.

The script is what a user writes with TRL alone (issue 24): the model organism (``build_organism``,
warm-started for ``--sft-steps``, 20 by default), a PEFT adapter (``--method lora`` or ``dora``; ``full``:
no adapter, every weight trained), TRL's own ``GRPOTrainer`` with a plain reward, and — on one side only
— the one spectra line::

    trainer.add_callback(SpectraCallback(out=..., name=..., delta_every=N, monitor_every=M))

The reward (``--reward``): ``length`` (the default, as in tests/test_callback.py: the completion's length
mod 3) varies within every group, so that the advantages are not 0 and the weights move, as in a run
that learns; ``boxed`` (1 when the last ``\\boxed{...}`` is the answer) is the task's own, on which the
20-step organism scores 0 everywhere (no learning signal: ΔW stays 0, the live checks say so).

Both sides share the configuration and the seed (adapter initialisation, sampling, data order); with
adapter dropout 0 they sample the same rollouts unless the callback changes the random streams, which
``same_rollouts`` reports. Each repetition trains both, in alternating order (without → with, then with →
without, …), so that a change of the machine's load falls on both; an untimed one-step run with the
callback comes first, so that neither side pays the process's one-off warm-up.

Reported per side: seconds per step (median over repetitions of ``trainer.train()``'s wall clock over
the steps, one-off work included: the callback's ``base/`` write and step-0 record), this process's CPU
seconds per step (``time.process_time``: steadier on a shared machine), and the ratio with / without;
for the callback, what it accounts itself in ``train_summary.json`` (``record_s``: ΔW extraction and
atomic HDF5 writes; ``monitor_s``: live geometry; ``base_s``: the one-off ``base/``) plus the monitor's
one-off set-up, and the wall time spent inside all of its event methods (``in_callback_s``, timed in
place). The load average (``os.getloadavg``) before and after each run says under which conditions.

    python benchmarks/bench_callback.py [--steps 20] [--method lora|dora|full] [--delta-every 10]
        [--monitor-every 10] [--repeat 3] [--threads N] [--out F]

Prints a small table and one JSON line (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

METHODS = ("lora", "dora", "full")
#: Learning rates of ``spectra train``'s organism preset (full fine-tuning needs a smaller one).
LR = {"lora": 1e-3, "dora": 1e-3, "full": 1e-4}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def boxed_reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion's last ``\\boxed{...}`` equals the answer, else 0.0."""
    out = []
    for completion, truth in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else str(completion[-1].get("content", ""))
        found = BOXED.findall(text)
        out.append(float(bool(found) and found[-1].strip() == str(truth).strip()))
    return out


def length_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """The completion's length mod 3: varies within a group whatever the tiny model answers."""
    return [float(len(str(c)) % 3) for c in completions]


REWARDS = {"length": length_reward, "boxed": boxed_reward}


def build_trainer(organism: Path, args: argparse.Namespace, steps: int, out: Path) -> Any:
    """The user's script up to ``trainer.train()``: model, adapter, data, reward, ``GRPOConfig``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from spectra.train.data import build_dataset
    from spectra.train.organism import organism_problems
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(organism)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(organism, dtype=torch.float32)
    torch.manual_seed(args.seed)  # the same adapter initialisation on both sides
    if args.method != "full":
        lora = LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=PROJECTIONS,
            use_dora=args.method == "dora", task_type="CAUSAL_LM",
        )  # fmt: skip
        model = get_peft_model(model, lora)
    rows = [{"problem": r["problem"], "answer": r["answer"]} for r in organism_problems("train")]
    rollouts = args.batch_size * args.num_generations
    config = GRPOConfig(
        output_dir=str(out / "ckpt"), use_cpu=not torch.cuda.is_available(), bf16=False, max_steps=steps,
        learning_rate=LR[args.method], lr_scheduler_type="constant", per_device_train_batch_size=rollouts,
        gradient_accumulation_steps=1, num_generations=args.num_generations, max_completion_length=40,
        seed=args.seed, data_seed=args.seed, logging_steps=1, save_strategy="no",
        gradient_checkpointing=False, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=[REWARDS[args.reward]], args=config, processing_class=tokenizer,
        train_dataset=build_dataset(rows, tokenizer, True),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # raw log dicts on the console, on both sides alike
    return trainer


def _time_events(callback: Any) -> list[float]:
    """Wrap every ``on_*`` method of ``callback`` in place; the wall seconds spent in them add up in the
    returned one-element list."""
    total = [0.0]
    for name in dir(callback):
        if not name.startswith("on_") or not callable(getattr(type(callback), name, None)):
            continue  # events only (``on_collapse`` is an option)
        method = getattr(callback, name)

        def timed(*a: Any, _method: Any = method, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _method(*a, **kw)
            finally:
                total[0] += time.perf_counter() - t0

        setattr(callback, name, timed)
    return total


def one_run(organism: Path, args: argparse.Namespace, out: Path, name: str, callback: bool,
            steps: int) -> dict[str, Any]:  # fmt: skip
    """Build the script's trainer (with the callback or not), train it, and time it."""
    from spectra.train import SpectraCallback

    trainer = build_trainer(organism, args, steps, out / name)
    spectra_cb, inside = None, [0.0]
    if callback:
        spectra_cb = SpectraCallback(
            out=out, name=name, delta_every=args.delta_every, monitor_every=args.monitor_every
        )
        trainer.add_callback(spectra_cb)
        inside = _time_events(spectra_cb)
    load = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    n = trainer.state.global_step
    logs = [row for row in trainer.state.log_history if "reward" in row]
    run: dict[str, Any] = {
        "s_per_step": wall / n, "cpu_s_per_step": cpu / n, "wall_s": wall, "steps": n,
        "rewards": [row["reward"] for row in logs],
        "zero_std": [row.get("frac_reward_zero_std") for row in logs],
        "load_before": load, "load_after": os.getloadavg()[0],
    }  # fmt: skip
    if spectra_cb is not None:
        summary = json.loads((out / name / "train_summary.json").read_text())
        monitor = spectra_cb.monitor
        run |= {
            "record_s": summary.get("record_s", 0.0), "monitor_s": summary.get("monitor_s", 0.0),
            "base_s": summary.get("base_s", 0.0),
            "monitor_setup_s": monitor.setup_seconds if monitor is not None else 0.0,
            "recorded_steps": summary.get("recorded_steps", []),
            "in_callback_s": inside[0],
        }  # fmt: skip
    return run


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians of each side, the ratios, and the callback's own accounts (medians, seconds per run)."""

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    out: dict[str, Any] = {
        "s_per_step": {s: med(s, "s_per_step") for s in runs},
        "cpu_s_per_step": {s: med(s, "cpu_s_per_step") for s in runs},
    }
    out["ratio"] = out["s_per_step"]["with"] / out["s_per_step"]["without"]
    out["cpu_ratio"] = out["cpu_s_per_step"]["with"] / out["cpu_s_per_step"]["without"]
    keys = ("record_s", "monitor_s", "monitor_setup_s", "base_s", "in_callback_s")
    out["callback_s"] = {k: med("with", k) for k in keys}
    out["in_callback_pct"] = 100 * statistics.median(r["in_callback_s"] / r["wall_s"] for r in runs["with"])
    first = runs["without"][0]["rewards"]
    out["same_rollouts"] = all(r["rewards"] == first for side in runs.values() for r in side)
    loads = [r[k] for side in runs.values() for r in side for k in ("load_before", "load_after")]
    out["load"] = [min(loads), max(loads)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--delta-every", type=int, default=10, help="SpectraCallback(delta_every=)")
    p.add_argument("--monitor-every", type=int, default=10, help="SpectraCallback(monitor_every=)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of the pair")
    p.add_argument("--rank", type=int, default=32, help="adapter rank (alpha = 2 × rank)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--reward", choices=tuple(REWARDS), default="length", help="module docstring")
    p.add_argument("--sft-steps", type=int, default=20, help="the organism's warm start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    args = p.parse_args()
    if args.steps < 1 or args.repeat < 1:
        p.error("--steps and --repeat must be ≥ 1")
    import torch
    from spectra.train.organism import build_organism
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars, on both sides alike
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames, not ours
    if args.threads:
        torch.set_num_threads(args.threads)
    organism = build_organism(sft_steps=args.sft_steps)
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        one_run(organism, args, Path(tmp), "warmup", callback=True, steps=1)  # untimed
        for i in range(args.repeat):
            order = ("without", "with") if i % 2 == 0 else ("with", "without")
            for side in order:
                run = one_run(organism, args, Path(tmp), f"{side}-{i}", side == "with", args.steps)
                runs[side].append(run)
                print(
                    f"  #{i + 1} {side:>7}: {run['s_per_step']:.3f} s/step, CPU {run['cpu_s_per_step']:.3f} "
                    f"s/step (load {run['load_before']:.1f} → {run['load_after']:.1f})", flush=True,
                )  # fmt: skip
    summary = summarise(runs)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "device": device, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "config": vars(args) | {"out": str(args.out) if args.out else None},
        **summary, "runs": runs,
    }  # fmt: skip
    s, c, cb = summary["s_per_step"], summary["cpu_s_per_step"], summary["callback_s"]
    print(
        f"{args.method} on the organism (sft {args.sft_steps}), {args.steps} steps, ΔW every "
        f"{args.delta_every}, geometry every {args.monitor_every}; median of {args.repeat}; {device}, "
        f"{torch.get_num_threads()} threads, load {summary['load'][0]:.1f}–{summary['load'][1]:.1f} on "
        f"{os.cpu_count()} CPUs; same rollouts: {summary['same_rollouts']}\n"
        f"  {'':<18}{'s/step':>9}{'CPU s/step':>12}\n"
        f"  {'without callback':<18}{s['without']:>9.3f}{c['without']:>12.3f}\n"
        f"  {'with callback':<18}{s['with']:>9.3f}{c['with']:>12.3f}\n"
        f"  {'ratio':<18}{summary['ratio']:>9.3f}{summary['cpu_ratio']:>12.3f}\n"
        f"  callback, per run: record {cb['record_s']:.3f} s + monitor {cb['monitor_s']:.3f} s (set-up "
        f"{cb['monitor_setup_s']:.3f} s) + base/ {cb['base_s']:.3f} s; inside its events "
        f"{cb['in_callback_s']:.3f} s = {summary['in_callback_pct']:.1f} % of the run"
    )
    line = json.dumps({k: v for k, v in result.items() if k != "runs"})
    print(line)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
