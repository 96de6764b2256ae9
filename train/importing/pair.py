"""Full weights against BASE: the exact ΔW of every tensor, streamed one tensor at a time.

For each floating tensor that BASE and the other model both hold, ΔW = W_t − W0 is the difference of the
*stored* values, never of re-rounded ones. It is formed a block of rows at a time in float32 (which holds
every bf16 and fp16 value exactly), and proved exact block by block: for bf16 inputs, by their exponent
fields (no entry's two values more than 2¹⁵ apart in magnitude: then float32 holds the difference), else
by computing each entry's rounding error exactly (TwoSum). Where an error is not zero (float32 inputs,
or an overflow) the tensor is formed again in float64. The result is stored in the narrowest type that
holds every entry exactly: bfloat16 (an RL step of a bf16 model mostly moves a weight by a few of its
ulps, which bf16 holds), else float32, else float64.

Speed: the blocks are small (``BLOCK_BYTES``) and their buffers reused (:class:`RowBlocks`), so the dozen
elementwise passes run in the CPU's cache; and while one tensor is formed, the disk reads those to come
(:class:`~spectra.train.importing.weights.ReadAhead`). Memory: the ΔW being formed (the size of a bf16
tensor while it fits bf16, twice that in float32) plus the block buffers (~12 MiB).

Matrices (2-D) become :class:`~spectra.operators.Dense` records named by their module (the tensor name
without ``.weight``; ``embed_tokens``, ``lm_head`` included); 1-D tensors (norms, biases) become
:class:`~spectra.operators.VectorDelta` records named by the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from spectra.train.importing.ahead import ReadAhead, formed_ahead
from spectra.train.importing.errors import SourceError
from spectra.train.importing.weights import DTYPES, ModelFiles
from torch import Tensor

from spectra.operators import Dense, VectorDelta

#: Stored bytes of BASE per row block: small enough that a block's float32 buffers stay in cache.
BLOCK_BYTES = 2**20


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


class RowBlocks:
    """Scratch buffers for one row block, reused by every block of every tensor.

    Forming ΔW exactly takes about a dozen elementwise passes over each block; on blocks that stay in
    the CPU's cache (``BLOCK_BYTES``) and buffers that are allocated once, those passes run at cache
    speed instead of paying memory traffic, fresh pages and their zeroing on every block."""

    def __init__(self) -> None:
        self._bytes: list[Tensor] = []
        self._floats: list[Tensor] = []

    def raw(self, i: int, nbytes: int) -> Tensor:
        """Byte buffer ``i`` (uint8), at least ``nbytes`` long."""
        return _grown(self._bytes, i, nbytes, torch.uint8)

    def floats(self, count: int, n: int) -> list[Tensor]:
        """``n`` float32 buffers of ``count`` entries each."""
        return [_grown(self._floats, i, count, torch.float32)[:count] for i in range(n)]


def _grown(pool: list[Tensor], i: int, size: int, dtype: torch.dtype) -> Tensor:
    while len(pool) <= i:
        pool.append(torch.empty(0, dtype=dtype))
    if pool[i].numel() < size:
        pool[i] = torch.empty(size, dtype=dtype)
    return pool[i]


def exact_difference(
    base: ModelFiles,
    other: ModelFiles,
    name: str,
    block_bytes: int = BLOCK_BYTES,
    blocks: RowBlocks | None = None,
) -> Tensor:
    """W_t − W0 of tensor ``name``, exact, in the narrowest of bfloat16, float32 and float64 that holds
    every entry (module docstring). The result is filled block by block in bfloat16 until a block needs
    more; it is then widened to float32 (exactly) and filled on in float32. ``blocks``: scratch buffers
    to reuse across calls (:func:`pair_updates` passes one for a whole model)."""
    e = base.entries[name]
    rows = max(e.shape[0], 1) if e.shape else 1
    width = math.prod(e.shape[1:]) if e.shape else 1
    step = max(1, block_bytes // max(1, e.nbytes // rows))
    if "F64" in (e.dtype, other.entries[name].dtype):  # float32 cannot hold the inputs themselves
        return _difference64(base, other, name, step)
    blocks = blocks or RowBlocks()
    out = torch.empty(e.shape, dtype=torch.bfloat16)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        a, b, d, z, t = blocks.floats((stop - start) * width, 5)
        ra = _read_float32(other, name, start, stop, a, blocks.raw(0, a.numel() * 2))
        rb = _read_float32(base, name, start, stop, b, blocks.raw(1, b.numel() * 2))
        torch.sub(a, b, out=d)
        if not (_exponents_close(ra, rb, z, t) or _exact_difference(a, b, d, z, t)):
            return _difference64(base, other, name, step)
        if out.dtype == torch.bfloat16 and not _fits_bfloat16(d, z.view(torch.int32)):
            out = out.to(torch.float32)  # the blocks so far, exactly
        out.view(rows, width)[start:stop].view(-1).copy_(d)  # exact: bfloat16 only where it holds d
    return out


def _read_float32(files: ModelFiles, name: str, start: int, stop: int, dst: Tensor, raw: Tensor) -> Tensor:
    """Rows ``start:stop`` of ``name`` into ``dst`` (flat float32), widened exactly (bf16, fp16 ⊂ fp32);
    a float32 tensor is read straight into ``dst``. Returns the rows as stored (flat)."""
    if files.entries[name].dtype == "F32":
        return files.rows_into(name, start, stop, dst.view(torch.uint8)).view(-1)
    stored = files.rows_into(name, start, stop, raw).view(-1)
    dst.copy_(stored)
    return stored


def _exponents_close(a: Tensor, b: Tensor, s1: Tensor, s2: Tensor) -> bool:
    """For bfloat16 ``a`` and ``b``: whether every entry's two exponent fields differ by at most 15, which
    makes fl₃₂(a − b) exact. Both are integer multiples of g = 2^(e_min − 7) (8 significant bits; a
    subnormal's field, 0, only widens the gap counted), and |a − b| < 2^(e_max + 2), so (a − b)/g is an
    integer below 2^(e_max − e_min + 9) ≤ 2²⁴: float32's 24 bits hold it, and with |a| < 2¹¹¹ its range
    does. Five passes over 16-bit integers instead of TwoSum's six over float32; False (TwoSum decides)
    for other dtypes, and where a block holds zeros beside large values. ``s1``, ``s2``: float32 scratch
    buffers the size of ``a``."""
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return False
    ea = torch.bitwise_and(a.view(torch.int16), 0x7F80, out=s1.view(torch.int16)[: a.numel()])
    if bool(ea.max() > 237 * 128):  # |a| ≥ 2¹¹¹ (then a − b could overflow): TwoSum decides
        return False
    eb = torch.bitwise_and(b.view(torch.int16), 0x7F80, out=s2.view(torch.int16)[: b.numel()])
    lo, hi = torch.aminmax(ea.sub_(eb))  # the exponent field is bits 7–14: a gap of 15 is 15 · 128
    return bool(lo >= -15 * 128) and bool(hi <= 15 * 128)


def _all_zero(t: Tensor) -> bool:
    """Every entry is ±0 (NaN is not): min and max in one pass, faster than ``any``."""
    lo, hi = torch.aminmax(t)
    return bool(lo == 0) and bool(hi == 0)


def _exact_difference(a: Tensor, b: Tensor, d: Tensor, z: Tensor, err: Tensor) -> bool:
    """Whether d = fl(a − b) is a − b exactly: the rounding error of the subtraction, computed without
    error by Knuth's TwoSum (e = (a − (d − z)) − (b + z), z = d − a), is 0 for every entry whose inputs
    are finite (a difference that overflows is not exact: it is formed again in float64).
    ``z`` and ``err`` are scratch buffers the size of ``d``."""
    torch.sub(d, a, out=z)
    torch.sub(d, z, out=err)
    torch.sub(a, err, out=err)  # a − (d − z)
    z.add_(b)
    err.sub_(z)
    if _all_zero(err):  # the common case
        return True
    return bool(((err == 0) | ~(torch.isfinite(a) & torch.isfinite(b))).all())


def _fits_bfloat16(d: Tensor, scratch: Tensor) -> bool:
    """Whether bfloat16 holds every entry of float32 ``d`` exactly: bfloat16 is float32's upper 16 bits
    (same sign, exponent and subnormals; 7 of its 23 fraction bits), so exactly when the lower 16 bits of
    every entry are 0. ``scratch``: an int32 buffer the size of ``d``. (A NaN with a payload there widens
    the tensor to float32: harmless.)"""
    return _all_zero(torch.bitwise_and(d.view(torch.int32), 0xFFFF, out=scratch))


def _difference64(base: ModelFiles, other: ModelFiles, name: str, step: int) -> Tensor:
    """W_t − W0 formed in float64, the fallback: exact unless an entry's two values differ in magnitude
    by more than 2²⁹ (float32 inputs; more for narrower ones); float64 inputs differ at float64."""
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
    :meth:`spectra.RunWriter.write_delta`, which consumes them one at a time) while the disk reads the
    tensors to come, and each formed on a worker thread while the caller writes the one before
    (:mod:`~spectra.train.importing.ahead`) when memory allows: the ΔW being written and the next one,
    counted at float32 (what it may widen to), within twice the largest stored tensor."""
    blocks = RowBlocks()
    parts = [[other.entries[name], base.entries[name]] for name in plan.tensors]
    largest = max((base.entries[name].nbytes for name in plan.tensors), default=0)

    def widest(i: int) -> int:  # the bytes ΔW of tensor i may take (float32 for bf16/fp16 inputs)
        e = base.entries[plan.tensors[i]]
        return e.nbytes * 4 // DTYPES[e.dtype].itemsize

    def form(i: int) -> tuple[str, Dense | VectorDelta]:
        ahead.at(i)
        name = plan.tensors[i]
        delta = exact_difference(base, other, name, block_bytes, blocks)
        return (record_name(name, 2), Dense(delta)) if delta.ndim == 2 else (name, VectorDelta(delta))

    def size(item: tuple[str, Dense | VectorDelta]) -> int:
        return item[1].delta.numel() * item[1].delta.element_size()

    with ReadAhead(parts) as ahead:
        yield from formed_ahead(
            len(plan.tensors), form, size, lambda i, held: held + widest(i) <= 2 * max(largest, 1)
        )
