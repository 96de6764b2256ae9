"""Overhead of ΔW recording and of the live geometry monitor: the same run trained three times in one process.

The three runs share the configuration and seed (the organism's default LoRA run unless told otherwise);
held-out evaluation is off in all of them so that only recording and monitoring differ:

1. ``bare``: neither the ΔW recorder nor the geometry monitor: the whole ``SpectraCallback`` (which holds
   recorder, metrics logger, monitor, collapse alarm and live checks) taken out of the trainer;
2. ``recorder``: the recorder only (``monitor_every=0``: no monitor, no collapse alarm);
3. ``monitor``: the recorder and the monitor (``--monitor-every``, default: spectra train's, 10) —
   what ``spectra train`` runs by default.

Reported:

- ``record_s``: time inside the recorder (ΔW extraction + atomic HDF5 writes) in run 3, and its share
  of that run's training time (the target is ≤ 3 % at the default interval);
- ``monitor_s``: time inside the monitor (live ΔW operators + the core's engine on the training device)
  in run 3, and its share of that run's training time (the target is ≤ 2 % at the default interval);
  ``monitor_setup_s``: its one-off set-up at the first measured step (W0's spectra onto the device);
- ``base_s``: the one-off write of ``base/`` (W0 and its reference spectra) at the start;
- the training time of the three runs (wall-clock differences are noisy on a shared machine: rollout
  lengths differ with the adapter, and the machine's load varies), and the load average before and
  after (``os.getloadavg``), so that a measurement on a shared machine says under which conditions.

    python benchmarks/bench_recording.py [--method lora] [--max-steps 60] [--delta-every 10]
        [--monitor-every N] [--monitor-modules 32] [--device auto|cpu|cuda] [--out F]

``--model qwen2-0.5b-random`` trains a Qwen2 with the projection shapes of Qwen2.5-0.5B (hidden 896,
intermediate 4864, 24 layers, 14 heads, 2 KV heads) and random weights on the organism's task, with the
organism's 100-token tokenizer (shape, not skill: 360 M parameters instead of 494 M, the difference being
the embedding). With ``--device cuda`` this is the GPU check of issues 3 and 15 (steps per second,
recording and monitoring overhead on a 0.5B-shaped model), e.g.

    python benchmarks/bench_recording.py --device cuda --model qwen2-0.5b-random --method lora --max-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


def random_qwen2_05b(path: Path) -> Path:
    """A random-weight Qwen2 with Qwen2.5-0.5B's projection shapes and the organism's tokenizer."""
    import torch
    from spectra.train.organism import build_organism
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(build_organism())
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_run(out: Path, name: str, args: argparse.Namespace, record: bool, monitor: bool) -> dict[str, Any]:
    from spectra.train import TrainConfig
    from spectra.train.trainer import prepare

    real = args.model != "organism"
    cfg = TrainConfig(
        model=args.model, method=args.method, max_steps=args.max_steps, delta_every=args.delta_every,
        eval_every=0, out=str(out), name=name, seed=args.seed, dataset="organism",
        batch_size=8 if real else None, max_completion_length=40 if real else None,
        micro_batch_size=64 if real else None, gradient_checkpointing=False if real else None,
        monitor_every=args.monitor_every if monitor else 0, monitor_modules=args.monitor_modules,
    )  # fmt: skip
    session = prepare(cfg)  # monitor_every=0: SpectraCallback builds no monitor and no collapse alarm
    if not record:  # the recorder cannot be configured away (ΔW at steps 0 and last): drop the callback
        session.trainer.remove_callback(session.callback)
    load = os.getloadavg()
    t0 = time.perf_counter()
    output = session.trainer.train()
    wall = time.perf_counter() - t0
    # train_summary.json is written by the callback's metrics logger; without it, the trainer's own output
    summary = json.loads((session.run_dir / "train_summary.json").read_text()) if record else output.metrics
    mon = session.monitor if monitor else None
    return {
        "wall_s": wall,
        "train_runtime_s": float(summary["train_runtime"]),
        "record_s": session.recorder.seconds if record else 0.0,
        "base_s": session.recorder.base_seconds if record else 0.0,
        "recorded_steps": len(session.recorder.recorded) if record else 0,
        "monitor_s": mon.seconds if mon else 0.0,
        "monitor_setup_s": mon.setup_seconds if mon else 0.0,
        "monitored_steps": len(mon.measured) if mon else 0,
        "monitored_modules": len(mon.modules or []) if mon else 0,
        "monitor_every": session.cfg.monitor_every if monitor else 0,
        "steps_per_s": float(summary["train_steps_per_second"]),
        "load_before": load,
        "load_after": os.getloadavg(),
    }


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def import_torch_for(device: str) -> Any:
    """torch, imported after hiding the GPUs for ``--device cpu``; ``--device cuda`` without one exits."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks for a GPU
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="lora")
    p.add_argument("--model", default="organism", help="organism, qwen2-0.5b-random, or a model path")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--delta-every", type=int, default=10)
    p.add_argument("--monitor-every", type=int, default=10, help="the default of spectra train")
    p.add_argument("--monitor-modules", type=int, default=32)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bare", action="store_true", help="leave out run 1 (no recorder, no monitor)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch = import_torch_for(args.device)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "qwen2-0.5b-random":
            args.model = str(random_qwen2_05b(Path(tmp) / "qwen2-0.5b-random"))
        if not args.skip_bare:
            runs["bare"] = one_run(Path(tmp), "bare", args, record=False, monitor=False)
        runs["recorder"] = one_run(Path(tmp), "recorder", args, record=True, monitor=False)
        runs["monitor"] = one_run(Path(tmp), "monitor", args, record=True, monitor=True)
    full, rec = runs["monitor"], runs["recorder"]
    record_share = full["record_s"] / full["train_runtime_s"]
    monitor_share = full["monitor_s"] / full["train_runtime_s"]
    monitor_diff = (full["train_runtime_s"] - rec["train_runtime_s"]) / rec["train_runtime_s"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "runs": runs,
        "record_share_of_training": record_share,
        "monitor_share_of_training": monitor_share,
        "monitor_training_time_difference": monitor_diff,
    }
    print(
        f"{args.method}, {args.max_steps} steps, ΔW every {args.delta_every}, geometry every "
        f"{full['monitor_every']} ({full['monitored_modules']} modules): {full['recorded_steps']} records "
        f"took {full['record_s']:.3f} s = {100 * record_share:.2f} %, {full['monitored_steps']} measurements "
        f"{full['monitor_s']:.3f} s = {100 * monitor_share:.2f} % of {full['train_runtime_s']:.1f} s "
        f"training (set-up {full['monitor_setup_s']:.2f} s once; base/ {full['base_s']:.2f} s once); "
        f"{full['steps_per_s']:.2f} steps/s; without the monitor {rec['train_runtime_s']:.1f} s "
        f"({100 * monitor_diff:+.1f} %)"
        + (f"; bare {runs['bare']['train_runtime_s']:.1f} s" if "bare" in runs else "")
        + f"; load average {full['load_before'][0]:.1f} → {full['load_after'][0]:.1f}, {os.cpu_count()} CPUs"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
