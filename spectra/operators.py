"""ΔW operators: one small type per exact representation of a weight update.

A weight update is stored in its cheapest exact form and only made dense when nothing smaller is exact.
Every operator knows its ``shape`` (m, n), can :meth:`~DeltaOperator.to_dense`, and answers the
products the SVD engine and the alignment metrics need (``Uᵀ ΔW``, ``ΔW V``, ``‖ΔW‖_F²``). Operators
whose update is exactly low rank also return :meth:`~DeltaOperator.factors` ``(L, R)`` with
``ΔW = L @ R``, so that their spectrum is found from QR of the tall factors and the SVD of an r×r core.

All tensors may carry leading batch dimensions: ``B`` of shape (..., m, r) and ``A`` (..., r, n) describe
a batch of same-shape updates.

=====================  ===========================================================  ==============
type                   ΔW                                                           methods
=====================  ===========================================================  ==============
:class:`Dense`         the stored matrix                                            full, MiSS, QuanTA
:class:`LowRank`       s · diag(row) · B · diag(mid) · A  −  s · B0 · A0            LoRA family, PiSSA,
                                                                                    MiLoRA, AdaLoRA, VeRA
:class:`DoRA`          m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row  −  W0                  DoRA
:class:`Scaled`        W0 ⊙ (l − 1), l along rows or columns                        IA3
:class:`VectorDelta`   θ_t − θ_0 of a vector parameter (not a linear map)           LayerNorm tuning
=====================  ===========================================================  ==============
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from torch import Tensor


class DeltaOperator(ABC):
    """A weight update ΔW of shape (..., m, n)."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of ΔW, batch dimensions first."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """ΔW as a dense tensor of shape :attr:`shape`."""

    def factors(self) -> tuple[Tensor, Tensor] | None:
        """``(L, R)`` with ``ΔW = L @ R`` when the update is exactly low rank, else ``None``."""
        return None

    @property
    def needs_w0(self) -> bool:
        """Whether ΔW can only be formed with the base weight W0 at hand."""
        return False

    def left_project(self, U: Tensor) -> Tensor:
        """``Uᵀ ΔW`` for U of shape (..., m, k)."""
        f = self.factors()
        if f is None:
            return U.mT @ self.to_dense().to(U.dtype)
        L, R = f
        return (U.mT @ L.to(U.dtype)) @ R.to(U.dtype)

    def right_project(self, V: Tensor) -> Tensor:
        """``ΔW V`` for V of shape (..., n, k)."""
        f = self.factors()
        if f is None:
            return self.to_dense().to(V.dtype) @ V
        L, R = f
        return L.to(V.dtype) @ (R.to(V.dtype) @ V)

    def frobenius_sq(self) -> Tensor:
        """‖ΔW‖_F², computed without forming ΔW when factored: tr((LᵀL)(RRᵀ))."""
        f = self.factors()
        if f is None:
            return self.to_dense().square().sum(dim=(-2, -1))
        L, R = f
        return ((L.mT @ L) * (R @ R.mT)).sum(dim=(-2, -1))

    def is_finite(self) -> bool:
        """True when every stored number is finite (a NaN/Inf update is flagged, not analysed)."""
        return all(torch.isfinite(t).all().item() for t in self._tensors())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DeltaOperator:
        """The same operator with its floating tensors moved to ``device`` and cast to ``dtype``."""

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if (dtype and t.is_floating_point()) else t.dtype)

        return replace(
            self,
            **{f.name: move(getattr(self, f.name)) for f in fields(self) if _is_tensor_field(self, f.name)},
        )  # type: ignore[type-var]

    def _tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self) if _is_tensor_field(self, f.name)]  # type: ignore[arg-type]


def _is_tensor_field(obj: object, name: str) -> bool:
    return isinstance(getattr(obj, name), Tensor)


@dataclass(frozen=True)
class Dense(DeltaOperator):
    """ΔW stored as a dense matrix (full fine-tuning, MiSS, QuanTA)."""

    delta: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape)

    def to_dense(self) -> Tensor:
        return self.delta


@dataclass(frozen=True)
class LowRank(DeltaOperator):
    """ΔW = s · diag(row) · B · diag(mid) · A − s · B0 · A0, exactly of rank ≤ r (or 2r with B0, A0).

    - LoRA, rsLoRA, LoRA+, LoRA-FA, rank-1: ``B`` (m, r), ``A`` (r, n), ``scale`` s = α/r (α/√r rsLoRA).
    - PiSSA, MiLoRA: also the initial factors ``B0``, ``A0``: the base was replaced by the residual
      W0 − s·B0·A0, so ΔW = s·(B·A − B0·A0), itself factored as [s·B, −s·B0] · [A; A0].
    - AdaLoRA: ``mid`` = λ ⊙ mask (the singular values kept by the rank allocator) and s = scaling/ranknum.
    - VeRA: ``row`` = λ_b, ``mid`` = λ_d, B and A the shared random matrices (sliced), s = 1.
    """

    B: Tensor
    A: Tensor
    scale: float | Tensor = 1.0
    mid: Tensor | None = None
    row: Tensor | None = None
    B0: Tensor | None = None
    A0: Tensor | None = None

    def __post_init__(self) -> None:
        if self.B.shape[-1] != self.A.shape[-2]:
            raise ValueError(
                f"LowRank: B is {tuple(self.B.shape)} and A is {tuple(self.A.shape)}; "
                "expected B (m, r) and A (r, n) with the same r"
            )
        if (self.B0 is None) != (self.A0 is None):
            raise ValueError("LowRank: B0 and A0 come together (PiSSA/MiLoRA initial factors)")
        m, r, n = self.B.shape[-2], self.B.shape[-1], self.A.shape[-1]
        _expect("LowRank", "mid", self.mid, (r,))
        _expect("LowRank", "row", self.row, (m,))
        if self.B0 is not None and self.A0 is not None:
            r0 = self.B0.shape[-1]
            _expect("LowRank", "B0", self.B0, (m, r0))
            _expect("LowRank", "A0", self.A0, (r0, n))

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.B.shape[:-1], self.A.shape[-1])

    @property
    def rank_bound(self) -> int:
        """Number of columns of L: r, or 2r with initial factors."""
        return self.B.shape[-1] + (0 if self.B0 is None else self.B0.shape[-1])

    def factors(self) -> tuple[Tensor, Tensor]:
        s = _as_scale(self.scale, self.B)
        L = self.B
        if self.row is not None:
            L = self.row.unsqueeze(-1) * L
        if self.mid is not None:
            L = L * self.mid.unsqueeze(-2)
        L = s * L
        if self.B0 is None:
            return L, self.A
        assert self.A0 is not None
        return torch.cat([L, -s * self.B0], dim=-1), torch.cat([self.A, self.A0], dim=-2)

    def to_dense(self) -> Tensor:
        L, R = self.factors()
        return L @ R


class _OnBase(DeltaOperator):
    """An update defined through the base weight ``w0`` (a field of the subclass)."""

    w0: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w0.shape)

    @property
    def needs_w0(self) -> bool:
        return True


@dataclass(frozen=True)
class DoRA(_OnBase):
    """DoRA: W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row, ΔW = W' − W0 (full rank in general).

    ``magnitude`` m has one entry per output row; the norm is taken over each row (PEFT's
    ``weight_norm`` over dim 1 of the (out, in) weight).
    """

    w0: Tensor
    magnitude: Tensor
    B: Tensor
    A: Tensor
    scale: float | Tensor = 1.0

    def __post_init__(self) -> None:
        m, n = self.w0.shape[-2:]
        r = self.B.shape[-1]
        _expect("DoRA", "B", self.B, (m, r))
        _expect("DoRA", "A", self.A, (r, n))
        _expect("DoRA", "magnitude", self.magnitude, (m,))

    def to_dense(self) -> Tensor:
        """Formed in at least float32 (bf16 arithmetic would lose the small difference W' − W0)."""
        dt = torch.promote_types(self.B.dtype, torch.float32)
        w0, B, A = self.w0.to(dt), self.B.to(dt), self.A.to(dt)
        directed = w0 + _as_scale(self.scale, B) * (B @ A)
        norm = torch.linalg.vector_norm(directed, dim=-1, keepdim=True)
        return self.magnitude.to(dt).unsqueeze(-1) * directed / norm - w0


@dataclass(frozen=True)
class Scaled(_OnBase):
    """IA3: ΔW = W0 ⊙ (l − 1), with l scaling rows (``axis="row"``, l of length m, attention
    projections) or columns (``axis="column"``, l of length n, feed-forward inputs)."""

    w0: Tensor
    l: Tensor  # noqa: E741
    axis: Literal["row", "column"] = "row"

    def __post_init__(self) -> None:
        if self.axis not in ("row", "column"):
            raise ValueError(f"Scaled: axis must be 'row' or 'column', got {self.axis!r}")
        _expect("Scaled", "l", self.l, (self.w0.shape[-2 if self.axis == "row" else -1],))

    def to_dense(self) -> Tensor:
        lm1 = self.l.to(torch.promote_types(self.l.dtype, torch.float32)) - 1
        w0 = self.w0.to(lm1.dtype)
        return w0 * (lm1.unsqueeze(-1) if self.axis == "row" else lm1.unsqueeze(-2))


@dataclass(frozen=True)
class VectorDelta:
    """θ_t − θ_0 for a vector parameter (LayerNorm weight or bias): no linear map, only norms."""

    delta: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape)

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.delta).all().item())


def _expect(owner: str, name: str, t: Tensor | None, shape: tuple[int, ...]) -> None:
    """Check the trailing dimensions of an optional tensor."""
    if t is not None and tuple(t.shape[-len(shape) :]) != shape:
        raise ValueError(
            f"{owner}: {name} has shape {tuple(t.shape)}; expected (..., {', '.join(map(str, shape))})"
        )


def _as_scale(scale: float | Tensor, like: Tensor) -> float | Tensor:
    if isinstance(scale, Tensor):
        s = scale.to(device=like.device, dtype=like.dtype)
        return s.reshape(*s.shape, 1, 1) if s.ndim else s
    return scale


def as_operator(delta: Tensor | DeltaOperator) -> DeltaOperator:
    """Wrap a plain tensor as :class:`Dense`; pass operators through."""
    return Dense(delta) if isinstance(delta, Tensor) else delta


def stack(ops: list[DeltaOperator]) -> DeltaOperator:
    """Stack same-shape operators into one batched operator.

    Factored operators with the same number of factor columns stay factored; anything else is
    materialized and stacked as :class:`Dense`.
    """
    if not ops:
        raise ValueError("stack: no operators")
    fs = [op.factors() for op in ops]
    if all(f is not None for f in fs) and len({f[0].shape for f in fs}) == 1:  # type: ignore[index]
        return LowRank(torch.stack([f[0] for f in fs]), torch.stack([f[1] for f in fs]))  # type: ignore[index]
    return Dense(torch.stack([op.to_dense() for op in ops]))
