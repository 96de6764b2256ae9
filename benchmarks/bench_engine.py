"""Benchmark: spectra's engine vs the naive loop, all metrics for one checkpoint, measured in one run.

A synthetic checkpoint with the projection shapes of a Qwen2-class model (default: 1.5B, 28 layers ×
q,k,v,o,gate,up,down, hidden 1536, intermediate 8960, 2 KV heads of 128), once with a dense ΔW (full
fine-tuning) and once with rank-32 LoRA factors. For each:

- spectra: :func:`spectra.engine.analyze_checkpoint` (batched, factored where exact, float64 Gram/eigh
  for dense spectra), every metric;
- naive: a loop over modules of ``torch.linalg.svd`` (float32) on ΔW and on W_t = W0 + ΔW, the same
  metrics computed from those.

W0's reference spectra are computed once beforehand (as ``base/`` caches them) and shared by both.
Reports wall time (synchronised), peak GPU memory, and the accuracy of σ(ΔW) against a float64 LAPACK
reference on a sample of modules. ``--scale 8`` divides every dimension by 8 for a CPU run.

    python benchmarks/bench_engine.py --scale 8            # CPU, minutes
    python benchmarks/bench_engine.py --device cuda        # full 1.5B shapes on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from spectra import metrics as M
from spectra.base import compute_base_spectrum
from spectra.engine import EngineConfig, Item, analyze_checkpoint
from spectra.operators import Dense, LowRank
from spectra.svd import batched_eigh, dense_svd
from spectra.synthetic import qwen2_shapes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_checkpoints(shapes: dict[str, tuple[int, int]], rank: int, seed: int = 0):
    """Random W0 (Gaussian, scaled 1/√n), a dense ΔW and a rank-``rank`` LoRA ΔW per module."""
    g = torch.Generator().manual_seed(seed)
    w0, dense, lora = {}, {}, {}
    for name, (m, n) in shapes.items():
        w0[name] = torch.randn(m, n, generator=g) / n**0.5
        dense[name] = Dense(torch.randn(m, n, generator=g) * 1e-3 / n**0.5)
        lora[name] = LowRank(
            torch.randn(m, rank, generator=g) * 1e-3, torch.randn(rank, n, generator=g) / n**0.5, 2.0
        )
    return w0, dense, lora


def naive(items: list[Item], config: EngineConfig, device: torch.device) -> None:
    """The baseline: per module, torch.linalg.svd on ΔW and on W_t, then the same metrics."""
    for it in items:
        delta = it.op.to(device).to_dense().float()
        w0 = it.w0.to(device)
        base = it.base.to(device)
        s = torch.linalg.svd(delta, full_matrices=False).S.double()
        wt = w0 + delta
        Ut, St, Vth = torch.linalg.svd(wt, full_matrices=False)
        M.effective_rank(s), M.stable_rank(s), M.participation_ratio(s), M.rank_at(s)
        M.spectral_concentration(s, list(config.ks)), M.relative_update_size(s, base.sigma)
        kmax = max(config.ks)
        M.alignment_curves(delta.double(), base.U[:, :kmax], base.V[:, :kmax])
        M.alignment_curves(delta.double(), base.U_minor[:, :kmax], base.V_minor[:, :kmax])
        for k in config.ks:
            (
                M.max_principal_angle(base.U[:, :k], Ut[:, :k]),
                M.max_principal_angle(base.V[:, :k], Vth.T[:, :k]),
            )
        M.intruder_dimensions(Ut[:, :10], base.U)
        M.spectrum_drift(St.double(), base.sigma)
        M.bf16_update_sparsity(w0, delta)
    sync(device)


def timed(fn, device: torch.device, repeat: int, warmup=None) -> tuple[float, float | None]:
    """Median wall time over ``repeat`` runs and peak GPU memory in GiB (None on CPU).

    One warm-up first: ``warmup()`` where given (a cheaper call that loads the same kernels), else ``fn()``.
    """
    (warmup or fn)()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def accuracy(items: list[Item], device: torch.device, sample: int = 4) -> dict[str, float]:
    """Max relative error of σ(ΔW) (values above 1e-6·σ₁) vs float64 LAPACK, engine and naive float32."""
    worst_engine = worst_naive = 0.0
    for it in items[:: max(1, len(items) // sample)][:sample]:
        d = it.op.to_dense().double().cpu()
        ref = torch.linalg.svdvals(d)
        keep = ref > 1e-6 * ref[0]
        eng = dense_svd(d.to(device).unsqueeze(0)).S[0].cpu()
        nv = torch.linalg.svdvals(d.float().to(device)).double().cpu()
        worst_engine = max(worst_engine, ((eng - ref).abs() / ref)[keep].max().item())
        worst_naive = max(worst_naive, ((nv - ref).abs() / ref)[keep].max().item())
    return {"engine_max_rel_err": worst_engine, "naive_fp32_max_rel_err": worst_naive}


def kernel_row(m: int, n: int, device: torch.device) -> dict[str, float]:
    """Milliseconds of each building block for one m×n matrix (median of 5 after a warm-up)."""
    x = torch.randn(m, n) / n**0.5
    xd = x.to(device)
    x64 = xd.double()
    g64 = x64.mT @ x64 if n <= m else x64 @ x64.mT
    g32 = g64.float()
    cases = {
        "h2d_fp32": lambda: x.to(device),
        "h2d_cast_fp64_on_host": lambda: x.to(device, torch.float64),
        "gram_fp64": lambda: x64.mT @ x64,
        "eigh_fp64": lambda: torch.linalg.eigh(g64),
        "eigh_fp32": lambda: torch.linalg.eigh(g32),
        "svd_fp32": lambda: torch.linalg.svd(xd, full_matrices=False),
        "svdvals_fp32": lambda: torch.linalg.svdvals(xd),
        "dense_svd_fp64": lambda: dense_svd(xd.unsqueeze(0), k=32),
    }
    row = {label: round(timed(fn, device, 5)[0] * 1e3, 2) for label, fn in cases.items()}
    if device.type == "cuda":  # a batch of 28 (one per layer): per-matrix time by number of streams
        batch = g64.expand(28, -1, -1).contiguous()
        for streams in (1, 2, 4, 8, 16):
            t = timed(lambda streams=streams: batched_eigh(batch, streams), device, 3)[0]
            row[f"eigh_fp64_batch28_streams{streams}"] = round(t * 1e3 / 28, 2)
    if device.type == "cuda":
        torch.backends.cuda.preferred_linalg_library("magma")
        row["eigh_fp64_magma"] = round(timed(lambda: torch.linalg.eigh(g64), device, 5)[0] * 1e3, 2)
        torch.backends.cuda.preferred_linalg_library("default")
    return row


def kernels(shapes: dict[str, tuple[int, int]], device: torch.device) -> dict[str, dict[str, float]]:
    """The floor: each building block once per distinct shape."""
    out = {}
    for m, n in sorted(set(shapes.values())):
        out[f"{m}x{n}"] = kernel_row(m, n, device)
        print(f"{m}x{n}", out[f"{m}x{n}"], flush=True)
    return out


def profile(items: list[Item], config: EngineConfig, device: torch.device, label: str) -> None:
    """One engine pass under torch.profiler: time per engine phase (spectra.*) and the top kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    analyze_checkpoint(items, config)
    with torch_profile(activities=activities) as prof:
        analyze_checkpoint(items, config)
        sync(device)
    events = prof.key_averages()
    print(f"--- profile {label}: engine phases (host ms / device ms)")
    for e in sorted(events, key=lambda e: -e.cpu_time_total):
        if e.key.startswith("spectra."):
            print(f"  {e.key:24s} {e.cpu_time_total / 1e3:9.1f} {e.device_time_total / 1e3:9.1f}")
    print(f"--- profile {label}: top operators by device time")
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    print(events.table(sort_by=key, row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=1, help="divide hidden/intermediate/KV sizes by this")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--memory-layers",
        type=int,
        nargs="*",
        default=[7, 28],
        help="on CUDA, also measure peak memory of the engine at these layer counts",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--kernels", action="store_true", help="also time the building blocks per shape")
    ap.add_argument("--profile", action="store_true", help="also profile one engine pass per checkpoint")
    ap.add_argument("--eigh-streams", type=int, default=EngineConfig.eigh_streams)
    ap.add_argument("--skip-naive", action="store_true", help="time the engine only")
    ap.add_argument(
        "--resident", action="store_true", help="W0, ΔW and base/ already on the device (compute only)"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = qwen2_shapes(1536 // args.scale, 8960 // args.scale, 256 // args.scale, args.layers)
    config = EngineConfig(
        device=str(device),
        max_batch_bytes=(8 << 30) if device.type == "cuda" else (1 << 30),
        eigh_streams=args.eigh_streams,
    )

    t0 = time.perf_counter()
    w0, dense, lora = make_checkpoints(shapes, args.rank)
    bases = {name: compute_base_spectrum(w.to(device)).to("cpu", torch.float32) for name, w in w0.items()}
    setup = time.perf_counter() - t0
    if args.resident:
        w0 = {k: v.to(device) for k, v in w0.items()}
        dense = {k: v.to(device) for k, v in dense.items()}
        lora = {k: v.to(device) for k, v in lora.items()}
        bases = {k: v.to(device, torch.float32) for k, v in bases.items()}

    results: dict[str, object] = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "modules": len(shapes),
        "scale": args.scale,
        "rank": args.rank,
        "shapes": sorted({str(s) for s in shapes.values()}),
        "base_spectra_s": round(setup, 2),
        "eigh_streams": args.eigh_streams,
        "resident": args.resident,
    }
    if args.kernels:
        results["kernels_ms"] = kernels(shapes, device)
    for label, ops in (("dense", dense), (f"lora_r{args.rank}", lora)):
        items = [Item(n, ops[n], w0[n], bases[n]) for n in shapes]
        if args.profile:
            profile(items, config, device, label)
        t_eng, mem_eng = timed(lambda items=items: analyze_checkpoint(items, config), device, args.repeat)
        if args.skip_naive:
            results[label] = {"spectra_s": round(t_eng, 3), "spectra_peak_gib": mem_eng}
            print(label, results[label], flush=True)
            continue
        one_per_shape = list({tuple(it.w0.shape): it for it in items}.values())
        t_nv, mem_nv = timed(
            lambda items=items: naive(items, config, device),
            device,
            max(1, args.repeat // 2),
            warmup=lambda few=one_per_shape: naive(few, config, device),
        )
        results[label] = {
            "spectra_s": round(t_eng, 3),
            "naive_s": round(t_nv, 3),
            "speedup": round(t_nv / t_eng, 1),
            "spectra_peak_gib": mem_eng,
            "naive_peak_gib": mem_nv,
        }
        if label == "dense":
            results[label].update(accuracy(items, device))  # type: ignore[union-attr]
        print(label, results[label], flush=True)

    # the factored checkpoint with less of W_t's SVD: top vectors only, or ΔW metrics alone
    items = [Item(n, lora[n], w0[n], bases[n]) for n in shapes]
    for wt in ("topk", "none"):
        cfg = replace(config, wt=wt, bf16=wt != "none")
        t, mem = timed(lambda cfg=cfg: analyze_checkpoint(items, cfg), device, args.repeat)
        results[f"lora_r{args.rank}_wt_{wt}"] = {"spectra_s": round(t, 3), "spectra_peak_gib": mem}
        print(f"lora_r{args.rank}_wt_{wt}", results[f"lora_r{args.rank}_wt_{wt}"], flush=True)

    if device.type == "cuda" and args.memory_layers:
        peaks = {}
        for n_layers in args.memory_layers:
            names = [n for n in shapes if int(n.split(".")[2]) < n_layers]
            items = [Item(n, dense[n], w0[n], bases[n]) for n in names]
            torch.cuda.empty_cache()
            peaks[len(names)] = timed(lambda items=items: analyze_checkpoint(items, config), device, 1)[1]
        results["peak_gib_by_module_count"] = peaks

    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
