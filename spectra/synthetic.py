"""Synthetic matrices with known singular structure, and synthetic runs built from them.

Used by the regression tests, the benchmark and the metric notebook: every quantity spectra measures has
an exact answer on these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from spectra.operators import Dense, LowRank
from spectra.store import RunStore
from spectra.writer import RunWriter


def orthonormal(
    m: int, k: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """An m×k matrix with orthonormal columns (QR of a Gaussian), k ≤ m."""
    if k > m:
        raise ValueError(f"orthonormal: k = {k} columns cannot be orthonormal in dimension m = {m}")
    q, r = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def with_spectrum(
    s: Tensor, m: int, n: int, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """A random m×n matrix X = U diag(s) Vᵀ with the given singular values; returns (X, U, V)."""
    p = min(m, n)
    if s.shape[-1] != p:
        raise ValueError(f"with_spectrum: {s.shape[-1]} singular values for a {m}×{n} matrix; expected {p}")
    U, V = orthonormal(m, p, generator=generator), orthonormal(n, p, generator=generator)
    return (U * s.to(torch.float64)) @ V.T, U, V


def qwen2_shapes(
    hidden: int = 1536, intermediate: int = 8960, kv_dim: int = 256, layers: int = 28
) -> dict[str, tuple[int, int]]:
    """The projection shapes (out, in) of a Qwen2-class decoder (defaults: 1.5B, 2 KV heads of 128)."""
    per_layer = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv_dim, hidden),
        "self_attn.v_proj": (kv_dim, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    return {f"model.layers.{i}.{k}": v for i in range(layers) for k, v in per_layer.items()}


def base_weights(
    shapes: Mapping[str, tuple[int, int]], seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Random base weights with a decaying spectrum σ_i ∝ 1/√i (roughly like trained projections)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (m, n) in shapes.items():
        p = min(m, n)
        s = 1.0 / torch.arange(1, p + 1, dtype=torch.float64).sqrt()
        out[name] = with_spectrum(s, m, n, generator=gen)[0].to(dtype)
    return out


def write_synthetic_run(
    path: str | Path,
    shapes: Mapping[str, tuple[int, int]],
    *,
    steps: Sequence[int] = (0, 50),
    rank: int | None = 32,
    scale: float = 2.0,
    update_size: float = 1e-2,
    seed: int = 0,
    keep_base: bool = True,
) -> RunWriter:
    """A run directory with random base weights and, per step, a random LoRA (``rank``) or dense
    (``rank=None``) update of relative size about ``update_size`` growing linearly with the step.

    Called again on the same directory (more steps, or a step rewritten), it keeps the base weights
    already there, as a resumed training run does."""
    writer = RunWriter(path)
    writer.write_config(
        {
            "name": Path(path).name,
            "model": "synthetic",
            "method": "lora" if rank else "full",
            "rank": rank,
            "alpha": scale * rank if rank else None,
            "seed": seed,
        }
    )
    if (Path(path) / "base" / "weights.h5").exists():
        with RunStore(path) as run:
            w0 = {name: run.w0(name) for name in shapes}
    else:
        w0 = base_weights(shapes, seed)
        if keep_base:
            writer.write_base_weights(w0)
    gen = torch.Generator().manual_seed(seed + 1)
    last = max(max(steps), 1)
    for step in steps:
        mods = {}
        for name, (m, n) in shapes.items():
            size = update_size * (step + 1) / (last + 1) * float(torch.linalg.matrix_norm(w0[name]))
            if rank:
                B = torch.randn(m, rank, generator=gen) / (m * rank) ** 0.5
                A = torch.randn(rank, n, generator=gen) / n**0.5
                mods[name] = LowRank(B * size / scale, A, scale)
            else:
                mods[name] = Dense(torch.randn(m, n, generator=gen) * size / (m * n) ** 0.5)
        writer.write_delta(step, mods)
    return writer
