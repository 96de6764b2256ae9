"""Heavy-tailed ESD fits: spectra's batched ``esd_fit`` against WeightWatcher 0.7.7, on one model.

Builds a Qwen2-class stack of projections (``qwen2_shapes``, every dimension divided by ``--scale``) with
heavy-tailed weights W = G·diag(c)/√m (G Gaussian, column scales c Pareto-distributed), runs
``ww.WeightWatcher(model=...).analyze()`` with its defaults, and spectra's path: σ from
``spectra.svd.dense_svd`` batched by shape on ``--device``, then ``esd_fit`` (power law, norms, the
Marchenko–Pastur fit, which WeightWatcher's defaults skip). Prints seconds for each and the agreement:
layers whose x_min agrees, the largest |Δα| among them, and D, α̂, stable rank.

    python benchmarks/bench_esd.py --threads 1          # CPU, 1/8 of Qwen2-1.5B shapes
    python benchmarks/bench_esd.py --device cuda --scale 1
    python benchmarks/bench_esd.py --layers 1 --ww-mp   # also WeightWatcher's MP fit (slow)
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import torch
from torch import nn

from spectra.metrics.esd import WW_COLUMNS, esd_fit
from spectra.svd import dense_svd
from spectra.synthetic import qwen2_shapes


def heavy_tailed_weights(shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    """W = G·diag(c)/√m, G standard Gaussian, c_j = u_j^(−1/μ) with μ drawn in [1.5, 4] per matrix:
    column norms with a Pareto tail, so that the ESD has a power-law tail of its own exponent."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (m, n) in shapes.items():
        mu = 1.5 + 2.5 * torch.rand((), generator=gen).item()
        c = torch.rand(n, generator=gen).clamp_min(1e-6).pow(-1 / mu)
        out[name] = (torch.randn(m, n, generator=gen) * c / m**0.5).float()
    return out


def as_model(weights: dict[str, torch.Tensor]) -> nn.Module:
    """One nn.Linear per weight, named as the weight ('.' → '_'), in order."""
    model = nn.Module()
    for name, W in weights.items():
        layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W
        model.add_module(name.replace(".", "_"), layer)
    return model


def run_spectra(
    weights: dict[str, torch.Tensor], device: str, min_evals: int
) -> tuple[dict[str, dict[str, float]], float, float]:
    """σ by ``dense_svd`` and ``esd_fit``, batched by shape: per-weight statistics, seconds in all and
    seconds of the SVDs.

    ``dense_svd(tail=0)``: the fit uses λ above 1e-5 only, which the Gram-matrix path already gives to
    ~1e-13 relative; the engine's refinement of σ below 1e-3·σ₁ (a loop over matrices) is not needed."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, W in weights.items():
        groups.setdefault(tuple(W.shape), []).append(name)
    stacks = {shape: torch.stack([weights[n] for n in names]).to(device) for shape, names in groups.items()}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    svd_seconds, results = 0.0, {}
    for shape, names in groups.items():
        t = time.perf_counter()
        S = dense_svd(stacks[shape], tail=0).S
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        svd_seconds += time.perf_counter() - t
        stats, _ = esd_fit(S, shape, min_evals=min_evals)
        stats = {k: v.cpu() for k, v in stats.items()}
        results.update({n: {k: float(v[i]) for k, v in stats.items()} for i, n in enumerate(names)})
    return results, time.perf_counter() - t0, svd_seconds


def run_weightwatcher(model: nn.Module, mp_fit: bool) -> tuple[dict[str, dict], float]:
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    watcher = ww.WeightWatcher(model=model)
    details = watcher.analyze(mp_fit=True) if mp_fit else watcher.analyze()
    seconds = time.perf_counter() - t0
    return {str(r["longname"]): r.to_dict() for _, r in details.iterrows()}, seconds


def compare(ours: dict[str, dict[str, float]], theirs: dict[str, dict], mp: bool) -> list[tuple[str, str]]:
    """Rows of (statistic, largest difference) over layers (relative where stated)."""
    names = [n for n in ours if n.replace(".", "_") in theirs and math.isfinite(ours[n]["alpha"])]
    same = [
        n
        for n in names
        if abs(ours[n]["xmin"] - theirs[n.replace(".", "_")]["xmin"]) <= 1e-9 * ours[n]["xmin"]
    ]

    def worst(key: str, subset: list[str], rel: bool = False) -> float:
        col = WW_COLUMNS[key]
        diffs = [abs(ours[n][key] - float(theirs[n.replace(".", "_")][col])) for n in subset]
        if rel:
            diffs = [
                d / max(abs(float(theirs[n.replace(".", "_")][col])), 1e-300)
                for d, n in zip(diffs, subset, strict=True)
            ]
        return max(diffs, default=float("nan"))

    rows = [
        ("layers fitted by both", f"{len(names)} / {len(ours)}"),
        ("x_min identical (rtol 1e-9)", f"{len(same)} / {len(names)}"),
        ("max abs Δα (x_min identical)", f"{worst('alpha', same):.2e}"),
        ("max abs ΔD (x_min identical)", f"{worst('ks_distance', same):.2e}"),
        ("max abs Δα̂ (x_min identical)", f"{worst('alpha_weighted', same):.2e}"),
        ("max rel Δ stable rank", f"{worst('stable_rank', names, rel=True):.2e}"),
        ("max rel Δ log10 λ_max", f"{worst('log_spectral_norm', names, rel=True):.2e}"),
    ]
    if mp:
        rows += [
            ("max rel Δ MP soft rank", f"{worst('mp_softrank', names, rel=True):.2e}"),
            ("max abs Δ spikes", f"{worst('num_spikes', names):.0f}"),
        ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", type=int, default=8, help="divide every Qwen2-1.5B dimension by this")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ww-mp", action="store_true", help="run WeightWatcher with mp_fit=True (slow)")
    ap.add_argument(
        "--min-evals",
        type=int,
        default=20,
        help="spectra's min_evals (20: where WeightWatcher's own fit starts)",
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch and BLAS, both sides (0: as installed)"
    )
    args = ap.parse_args()
    if args.threads:  # on a shared machine, spinning thread pools cost more than they give
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits  # installed with weightwatcher (scikit-learn)

        threadpool_limits(args.threads)

    shapes = qwen2_shapes(1536 // args.scale, 8960 // args.scale, 256 // args.scale, args.layers)
    weights = heavy_tailed_weights(shapes, args.seed)
    run_spectra(dict(list(weights.items())[:7]), args.device, args.min_evals)  # warm-up (lazy CUDA init)
    ours, t_ours, t_svd = run_spectra(weights, args.device, args.min_evals)
    theirs, t_ww = run_weightwatcher(as_model(weights), args.ww_mp)

    where = f"device {args.device}, {torch.get_num_threads()} CPU threads"
    print(f"\n{len(weights)} matrices, Qwen2-1.5B shapes / {args.scale}, {where}\n")
    print("| path | seconds | speed-up |\n|---|---:|---:|")
    label = "analyze(mp_fit=True)" if args.ww_mp else "analyze() defaults"
    print(f"| weightwatcher 0.7.7 {label} | {t_ww:.2f} | 1.0× |")
    print(f"| spectra dense_svd + esd_fit (batched, with MP fit) | {t_ours:.2f} | {t_ww / t_ours:.1f}× |")
    print(f"| … of which dense_svd (σ) | {t_svd:.2f} | |")
    print("\n| agreement | value |\n|---|---:|")
    for key, value in compare(ours, theirs, args.ww_mp):
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
