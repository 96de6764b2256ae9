"""Benchmark: reading ahead (``analyze_run(prefetch=True)``) against reading inline, same run, one process.

A synthetic Qwen2-1.5B-shaped run (dimensions divided by ``--scale``) with ``--steps`` dense or LoRA
checkpoints on disk; W0's spectra are computed first. Then the same analysis (every metric, nothing
saved) alternately with the next chunk read on another thread while the engine analyses this one, and
without, ``--repeat`` times each; medians. Also timed: reading every chunk alone (what there is to hide).
With reading ahead, the ideal is max(read, compute) instead of read + compute.

    python benchmarks/bench_prefetch.py                                   # CPU, 1/8 shapes
    python benchmarks/bench_prefetch.py --device cuda --scale 1 --layers 14 --steps 1 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from bench_stream import DTYPES, write_run

from spectra.engine import EngineConfig
from spectra.pipeline import analyze_run, load_run
from spectra.schedule import _plan, _Reader
from spectra.synthetic import qwen2_shapes


def read_only(run, steps: list[int], config: EngineConfig) -> float:
    """Seconds to read every chunk of ``steps`` as the analysis does, computing nothing."""
    t = time.perf_counter()
    units, _ = _plan(run, steps, config)
    reader = _Reader(run, config.keep, pin=config.torch_device().type == "cuda")
    try:
        for unit in units:
            reader.read(unit)
    finally:
        reader.close()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", type=int, default=8, help="divide every Qwen2-1.5B dimension by this")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--kind", choices=("dense", "lora"), default="dense")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget-mib", type=int, default=0, help="chunk budget (default: the engine's)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: as installed)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    budget = {"max_batch_bytes": args.budget_mib << 20} if args.budget_mib else {}
    config = EngineConfig(device=args.device, **budget)
    work = Path(tempfile.mkdtemp(prefix="spectra-prefetch-"))
    try:
        t = time.perf_counter()
        shapes = qwen2_shapes(1536 // args.scale, 8960 // args.scale, 256 // args.scale, args.layers)
        steps = {s + 1: args.kind for s in range(args.steps)}
        gen = "cuda" if cuda else "cpu"
        run = load_run(write_run(work / "run", shapes, steps, dtype=DTYPES[args.dtype], device=gen))
        written = time.perf_counter() - t
        run.ensure_base_spectra(keep=config.keep, device=args.device)
        times: dict[bool, list[float]] = {True: [], False: []}
        analyze_run(run, config, steps=[1], save=False)  # warm-up (lazy CUDA and solver loading)
        for _ in range(args.repeat):
            for flag in (True, False):
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                analyze_run(run, config, save=False, prefetch=flag)
                if cuda:
                    torch.cuda.synchronize()
                times[flag].append(time.perf_counter() - t)
        reading = read_only(run, list(steps), config)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    results = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "shapes": f"Qwen2-1.5B / {args.scale}, {args.layers} layers, {args.steps} {args.kind} step(s)",
        "dtype": args.dtype,
        "budget_mib": config.max_batch_bytes >> 20,
        "write_s": round(written, 1),
        "prefetch_s": [round(x, 3) for x in times[True]],
        "inline_s": [round(x, 3) for x in times[False]],
        "median_prefetch_s": round(on, 3),
        "median_inline_s": round(off, 3),
        "gain": round(off / on, 3),
        "read_only_s": round(reading, 3),
        "ideal_s": round(max(reading, off - reading), 3),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
