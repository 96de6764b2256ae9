"""Benchmark: a multi-step run analysed by one process and by N (``analyze_run(devices=[...] * N)``).

A synthetic Qwen2-1.5B-shaped run (dimensions divided by ``--scale``) with ``--steps`` dense checkpoints;
W0's spectra are computed first (once per run, by rank 0 in a sharded analysis; not timed). Then, in
turn, ``--repeat`` times: one process with every core, and N processes with an equal share of the cores
each (the workers' start included). Every analysis computes every metric and saves nothing. Reports the
medians, the speed-up and the target 0.8·N, the machine's core count and its load average before and
after (the speed-up is only meaningful on a quiet machine: rerun it there). Also checks that both
produce the same table.

    python benchmarks/bench_shard.py                      # CPU, 2 processes
    python benchmarks/bench_shard.py --processes 4 --devices cuda:0,cuda:1,cuda:2,cuda:3
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

import numpy as np
import pandas as pd
import torch
from bench_stream import DTYPES, write_run

from spectra.engine import EngineConfig
from spectra.pipeline import analyze_run, load_run
from spectra.synthetic import qwen2_shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices", default=None, help="comma-separated (default: cpu, once per process)")
    ap.add_argument("--scale", type=int, default=8, help="divide every Qwen2-1.5B dimension by this")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    devices = args.devices.split(",") if args.devices else ["cpu"] * args.processes
    config = EngineConfig(device=devices[0])
    cuda = devices[0].startswith("cuda")
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="spectra-shard-bench-"))
    times: dict[int, list[float]] = {1: [], len(devices): []}
    tables: dict[int, pd.DataFrame] = {}
    try:
        shapes = qwen2_shapes(1536 // args.scale, 8960 // args.scale, 256 // args.scale, args.layers)
        steps = {5 * (s + 1): "dense" for s in range(args.steps)}
        gen = "cuda" if cuda else "cpu"
        path = write_run(work / "run", shapes, steps, dtype=DTYPES[args.dtype], device=gen)
        load_run(path).ensure_base_spectra(keep=config.keep, device=devices[0])
        for _ in range(args.repeat):
            for n in (1, len(devices)):
                t = time.perf_counter()
                a = analyze_run(path, config, save=False, devices=devices if n > 1 else None)
                times[n].append(time.perf_counter() - t)
                tables[n] = a.table
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one, many = statistics.median(times[1]), statistics.median(times[len(devices)])
    same = tables[1].equals(tables[len(devices)])
    if not same:  # thread counts differ between the two: the last bits may (see tests/test_shard.py)
        floats = [c for c in tables[1].columns if tables[1][c].dtype.kind == "f"]
        a, b = (t[floats].to_numpy(dtype=float) for t in (tables[1], tables[len(devices)]))
        rel = np.nanmax(np.abs(a - b) / np.maximum(np.abs(a), 1e-300))
        same = f"max relative difference {rel:.1e}"
    results = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "run": f"Qwen2-1.5B / {args.scale}, {args.layers} layers, {args.steps} dense steps, "
        f"{len(shapes) * args.steps} module-steps",
        "devices": devices,
        "one_process_s": [round(x, 2) for x in times[1]],
        "n_processes_s": [round(x, 2) for x in times[len(devices)]],
        "speedup": round(one / many, 2),
        "target": round(0.8 * len(devices), 2),
        "same_table": same,
    }
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
