"""Full weights against BASE: the exact ΔW of every tensor, streamed one tensor at a time.

For each floating tensor that BASE and the other model both hold, ΔW = W_t − W0 is the difference of the
*stored* values, never of re-rounded ones. It is formed a block of rows at a time in float32 (which holds
every bf16 and fp16 value exactly), and each entry's rounding error is computed exactly (TwoSum): where
any is not zero — two values more than 2¹⁵ apart in magnitude, or float32 inputs — the tensor is formed
again in float64. The result is stored in the narrowest type that holds every entry exactly: bfloat16
(an RL step of a bf16 model mostly moves a weight by a few of its ulps, which bf16 holds), else float32,
else float64. Memory: the ΔW being formed (the size of a bf16 tensor while it fits bf16, twice that in
float32) plus a few row blocks of ``block_bytes``.

Matrices (2-D) become :class:`~spectra.operators.Dense` records named by their module (the tensor name
without ``.weight``; ``embed_tokens``, ``lm_head`` included); 1-D tensors (norms, biases) become
:class:`~spectra.operators.VectorDelta` records named by the tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from spectra.train.importing.errors import SourceError
from spectra.train.importing.weights import ModelFiles
from torch import Tensor

from spectra.operators import Dense, VectorDelta

BLOCK_BYTES = 64 * 2**20


def record_name(tensor: str, ndim: int) -> str:
    """The run's name for a tensor's update: its module for a ``.weight`` matrix, the tensor otherwise."""
    return tensor.removesuffix(".weight") if ndim == 2 and tensor.endswith(".weight") else tensor


@dataclass
class PairPlan:
    """What a pair holds in common: tensor names in BASE's order, and what only one side has."""

    tensors: list[str]
    only_base: list[str] = field(default_factory=list)
    only_other: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not floating, or not 1-D/2-D


def plan_pair(base: ModelFiles, other: ModelFiles) -> PairPlan:
    """Match the tensors of two models; one line naming the first tensor whose shape differs."""
    common, only_base, skipped = [], [], []
    for name, e in base.entries.items():
        o = other.entries.get(name)
        if o is None:
            only_base.append(name)
            continue
        if o.shape != e.shape:
            raise SourceError(
                f"{other.dir}: tensor {name} has shape {list(o.shape)} but {list(e.shape)} in BASE "
                f"{base.dir}: not the same architecture"
            )
        if not (e.floating and o.floating) or len(e.shape) not in (1, 2):
            skipped.append(name)
            continue
        common.append(name)
    only_other = [n for n in other.entries if n not in base.entries]
    return PairPlan(common, only_base, only_other, skipped)


def pair_records(plan: PairPlan, base: ModelFiles) -> dict[str, str]:
    """Record name → BASE tensor name, for every tensor of the plan."""
    return {record_name(t, len(base.entries[t].shape)): t for t in plan.tensors}


def exact_difference(
    base: ModelFiles, other: ModelFiles, name: str, block_bytes: int = BLOCK_BYTES
) -> Tensor:
    """W_t − W0 of tensor ``name``, exact, in the narrowest of bfloat16, float32 and float64 that holds
    every entry (module docstring). The result is filled block by block in bfloat16 until a block needs
    more; it is then widened to float32 (exactly) and filled on in float32."""
    e = base.entries[name]
    rows = max(e.shape[0], 1) if e.shape else 1
    step = max(1, block_bytes // max(1, e.nbytes // rows))
    if "F64" in (e.dtype, other.entries[name].dtype):  # float32 cannot hold the inputs themselves
        return _difference64(base, other, name, step)
    out = torch.empty(e.shape, dtype=torch.bfloat16)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        a = other.rows(name, start, stop).to(torch.float32)  # exact: bf16, fp16 ⊂ fp32
        b = base.rows(name, start, stop).to(torch.float32)
        d = a - b
        if not _exact_difference(a, b, d):
            return _difference64(base, other, name, step)
        if out.dtype == torch.bfloat16:
            narrow = d.to(torch.bfloat16)
            if _equal(narrow.to(torch.float32), d):
                out[start:stop] = narrow
                continue
            out = out.to(torch.float32)  # the blocks so far, exactly
        out[start:stop] = d
    return out


def _exact_difference(a: Tensor, b: Tensor, d: Tensor) -> bool:
    """Whether d = fl(a − b) is a − b exactly: the rounding error of the subtraction, computed without
    error by Knuth's TwoSum (e = (a − (d − z)) − (b + z), z = d − a), is 0 for every finite entry.
    (In place, one temporary pair: this runs over every weight of both models.)"""
    z = torch.sub(d, a)
    err = torch.sub(d, z).neg_().add_(a)
    err.sub_(z.add_(b))
    if not err.any():  # the common case; NaN counts as nonzero
        return True
    return bool(((err == 0) | ~torch.isfinite(d)).all())


def _equal(x: Tensor, y: Tensor) -> bool:
    """Entrywise equal, NaN equal to NaN."""
    return torch.equal(x, y) or bool(((x == y) | (x.isnan() & y.isnan())).all())


def _difference64(base: ModelFiles, other: ModelFiles, name: str, step: int) -> Tensor:
    shape = base.entries[name].shape
    rows = max(shape[0], 1) if shape else 1
    out = torch.empty(shape, dtype=torch.float64)
    flat = out.view(rows, -1)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        a = other.rows(name, start, stop).to(torch.float64).view(stop - start, -1)
        flat[start:stop] = a - base.rows(name, start, stop).to(torch.float64).view(stop - start, -1)
    return out


def pair_updates(
    plan: PairPlan, base: ModelFiles, other: ModelFiles, block_bytes: int = BLOCK_BYTES
) -> Iterator[tuple[str, Dense | VectorDelta]]:
    """``(record name, update)`` for every tensor of the plan, formed one at a time (for
    :meth:`spectra.RunWriter.write_delta`, which consumes them one at a time)."""
    for name in plan.tensors:
        delta = exact_difference(base, other, name, block_bytes)
        if delta.ndim == 2:
            yield record_name(name, 2), Dense(delta)
        else:
            yield name, VectorDelta(delta)
