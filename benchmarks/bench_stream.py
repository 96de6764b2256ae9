"""Benchmark: peak host and GPU memory of ``spectra.analyze_run`` at L and 4·L layers, same chunk budget.

A Qwen2.5-7B-shaped synthetic run (28 layers; hidden 3584, intermediate 18944, 4 KV heads of 128; every
dimension divided by ``--scale``) holding one dense checkpoint (step 1) and one LoRA r32 checkpoint
(step 2) over the same W0, written at L and at 4·L layers. W0's spectra (base/) are computed in a fresh
process, then each checkpoint is analysed in a fresh process (all metrics); each reports its wall
time, its peak resident memory (``ru_maxrss``) and, on CUDA, its peak GPU memory. Streaming means the peaks
at 4·L layers are those at L layers (up to HDF5's metadata caches, bounded per file), while the time
grows with the module count.

    python benchmarks/bench_stream.py                                  # CPU: 7B shapes / 16, 2 and 8 layers
    python benchmarks/bench_stream.py --device cuda --scale 1 --layers 7 --dtype bfloat16   # 7B on a GPU

Also the writer of the other benchmarks' runs (:func:`write_run`): tensors are generated module by
module as the writer asks for them, so that a 7B checkpoint never sits in host memory whole.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import date
from pathlib import Path

import torch

from spectra.operators import Dense, LowRank
from spectra.synthetic import qwen2_shapes
from spectra.writer import RunWriter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def qwen25_7b_shapes(scale: int = 1, layers: int = 28) -> dict[str, tuple[int, int]]:
    """Projection shapes of Qwen2.5-7B (4 KV heads of 128), every dimension divided by ``scale``."""
    return qwen2_shapes(3584 // scale, 18944 // scale, 512 // scale, layers)


class Generated(Mapping):
    """``{module: make(module, index)}``, each value made when asked for (and not kept)."""

    def __init__(self, names: list[str], make: Callable[[str, int], object]):
        self.names, self.make = names, make

    def __getitem__(self, name: str) -> object:
        return self.make(name, self.names.index(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def items(self):  # one at a time, without the index lookup
        return ((n, self.make(n, i)) for i, n in enumerate(self.names))


def _gaussian(m: int, n: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(m, n, generator=g, device=device)


def write_run(
    path: Path,
    shapes: Mapping[str, tuple[int, int]],
    steps: Mapping[int, str],
    rank: int = 32,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """A run with Gaussian W0 (scaled 1/√n) and, per step, a ``"dense"`` ΔW (relative size ~1e-3) or a
    ``"lora"`` rank-``rank`` ΔW; tensors stored in ``dtype``, generated on ``device`` (a GPU makes 7B
    of them in seconds). Module i's tensors depend on (seed, i, step) only: the first L layers of a
    4·L-layer run are those of the L-layer run."""
    names = list(shapes)
    w = RunWriter(path)
    w.write_config({"name": path.name, "method": "full", "model": "synthetic", "seed": seed})

    def w0(name: str, i: int) -> torch.Tensor:
        m, n = shapes[name]
        return (_gaussian(m, n, seed * 100_003 + i, device) / n**0.5).to(dtype).cpu()

    w.write_base_weights(Generated(names, w0))
    for step, kind in steps.items():

        def delta(name: str, i: int, step: int = step, kind: str = kind) -> object:
            m, n = shapes[name]
            s = (seed * 100_003 + i) * 1_000 + step
            if kind == "dense":
                return Dense((_gaussian(m, n, s, device) * 1e-3 / n**0.5).to(dtype).cpu())
            B = (_gaussian(m, rank, s, device) * 1e-3).to(dtype).cpu()
            A = (_gaussian(rank, n, s + 1, device) / n**0.5).to(dtype).cpu()
            return LowRank(B, A, 2.0)

        w.write_delta(step, Generated(names, delta))
    return path


def measure(
    path: Path, step: int, device: str, budget: int, prefetch: bool = True, threads: int = 0
) -> dict[str, float]:
    """Analyse one step of a run in a fresh process (step 0: only compute W0's spectra, base/): seconds,
    peak RSS and peak GPU memory (GiB)."""
    cmd = [sys.executable, __file__, "--measure", str(path), "--step", str(step), "--device", device]
    cmd += ["--budget-mib", str(budget >> 20), "--threads", str(threads)]
    cmd += [] if prefetch else ["--no-prefetch"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {path} step {step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_here(args: argparse.Namespace) -> None:
    """The child of :func:`measure`: base spectra, then the analysis, timed; one JSON line."""
    from spectra.engine import EngineConfig
    from spectra.pipeline import analyze_run, load_run

    if args.threads:
        torch.set_num_threads(args.threads)
    config = EngineConfig(device=args.device, max_batch_bytes=args.budget_mib << 20)
    run = load_run(args.measure)
    t0 = time.perf_counter()
    if args.step == 0:
        run.ensure_base_spectra(keep=config.keep, device=args.device)
        table = None
    else:
        table = analyze_run(run, config, steps=[args.step], save=False, prefetch=not args.no_prefetch).table
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    gpu = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    print(json.dumps({
        "modules": len(run.modules) if table is None else len(table),
        "ok": None if table is None else int((table["status"] == "ok").sum()),
        "seconds": round(seconds, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "peak_gpu_gib": round(gpu, 3) if gpu is not None else None,
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", type=int, default=16, help="divide every Qwen2.5-7B dimension by this")
    ap.add_argument("--layers", type=int, default=2, help="L: runs of L and of 4·L layers are measured")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--kinds", default="dense,lora", help="which checkpoints to analyse")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored dtype of W0 and ΔW")
    ap.add_argument("--budget-mib", type=int, default=8, help="the engine's chunk budget (max_batch_bytes)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads in the measured process")
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the runs written")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--step", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return _measure_here(args)

    work = args.work or Path(tempfile.mkdtemp(prefix="spectra-stream-"))
    gen = "cuda" if args.device.startswith("cuda") else "cpu"
    kinds = [k for k in args.kinds.split(",") if k]
    steps = {1: "dense", 2: "lora"}
    results: dict[str, object] = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if gen == "cuda" else f"CPU ({platform.machine()})",
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "shapes": f"Qwen2.5-7B / {args.scale}",
        "dtype": args.dtype,
        "budget_mib": args.budget_mib,
        "prefetch": not args.no_prefetch,
        "runs": {},
    }
    try:
        for layers in (args.layers, args.layers * args.factor):
            t = time.perf_counter()
            path = write_run(
                work / f"layers{layers}", qwen25_7b_shapes(args.scale, layers), steps,
                dtype=DTYPES[args.dtype], device=gen,
            )  # fmt: skip
            written = round(time.perf_counter() - t, 1)
            for step, kind in [(0, "base_spectra"), *steps.items()]:
                if kind not in kinds and step:
                    continue
                budget = args.budget_mib << 20
                row = measure(path, step, args.device, budget, not args.no_prefetch, args.threads)
                row |= {"layers": layers, "kind": kind, "write_s": written}
                results["runs"][f"{kind}_{layers}"] = row  # type: ignore[index]
                print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(path, ignore_errors=True)
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    runs = results["runs"]
    print("\n| what (own process) | layers | modules | seconds | peak RSS GiB | peak GPU GiB |")
    print("|---|---|---|---|---|---|")
    for r in runs.values():  # type: ignore[union-attr]
        print(f"| {r['kind']} | {r['layers']} | {r['modules']} | {r['seconds']} | {r['peak_rss_gib']} | "
              f"{r['peak_gpu_gib']} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
