"""ΔW operators: one small type per exact representation of a weight update.

A weight update is stored in its cheapest exact form and only made dense when nothing smaller is exact.
Every operator knows its ``shape`` (m, n), can :meth:`~DeltaOperator.to_dense`, and answers the
products the SVD engine and the alignment metrics need (``Uᵀ ΔW``, ``ΔW V``, ``‖ΔW‖_F²``). Operators
whose update is exactly low rank also return :meth:`~DeltaOperator.factors` ``(L, R)`` with
``ΔW = L @ R``, so that their spectrum is found from QR of the tall factors and the SVD of an r×r core.

All tensors may carry leading batch dimensions: ``B`` of shape (..., m, r) and ``A`` (..., r, n) describe
a batch of same-shape updates. Whatever dtype the tensors are stored in, ΔW is materialised in float64
(:meth:`~DeltaOperator.to_dense`, :meth:`~DeltaOperator.factors`): bf16 products and float32 differences
would lose the small updates being measured.

Each type names the codec it is stored with (:mod:`spectra.codecs`): its dataclass fields are the
codec's datasets and attributes, so :meth:`~DeltaOperator.to_stored` and :func:`from_stored` need no
per-type code.

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
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from spectra.codecs import CODECS, Codec, Stored

F64 = torch.float64


class StoredForm:
    """Mixin: the stored form of an update, from the dataclass fields its codec names."""

    codec: ClassVar[Codec]

    def to_stored(self) -> Stored:
        """The record written to a delta file (tensors as they are; W0 is never part of it)."""
        c = self.codec
        tensors = {k: getattr(self, k) for k in c.datasets if getattr(self, k) is not None}
        attrs: dict[str, Any] = {a: _attr_value(getattr(self, a)) for a in c.attrs}
        return Stored(c.kind, tuple(self.shape), tensors, attrs)  # type: ignore[attr-defined]

    @classmethod
    def from_stored(cls, rec: Stored, w0: Tensor | None = None) -> Any:
        """The update a record describes; ``w0`` is required by kinds defined through W0."""
        if cls.codec.needs_w0:
            if w0 is None:
                raise ValueError(f"a {rec.kind} record needs W0 to be read")
            return cls(w0=w0, **rec.tensors, **rec.attrs)  # type: ignore[call-arg]
        return cls(**rec.tensors, **rec.attrs)  # type: ignore[call-arg]


def _attr_value(v: Any) -> Any:
    return float(v) if isinstance(v, (Tensor, int, float)) else v


class DeltaOperator(StoredForm, ABC):
    """A weight update ΔW of shape (..., m, n)."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of ΔW, batch dimensions first."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """ΔW as a dense float64 tensor of shape :attr:`shape`."""

    def factors(self) -> tuple[Tensor, Tensor] | None:
        """Float64 ``(L, R)`` with ``ΔW = L @ R`` when the update is exactly low rank, else ``None``."""
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
        """‖ΔW‖_F² in float64, without forming ΔW when factored: with L = Q₁R₁ and Rᵀ = Q₂R₂ (QR),
        ‖ΔW‖_F² = ‖R₁R₂ᵀ‖_F², a sum of squares (no cancellation between the factors' terms)."""
        f = self.factors()
        if f is None:
            return self.to_dense().square().sum(dim=(-2, -1))
        return orthonormal_right(*f)[0].square().sum(dim=(-2, -1))

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

    codec: ClassVar[Codec] = CODECS["dense"]
    delta: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape)

    def to_dense(self) -> Tensor:
        return self.delta.to(F64)


@dataclass(frozen=True)
class LowRank(DeltaOperator):
    """ΔW = s · diag(row) · B · diag(mid) · A − s · B0 · A0, exactly of rank ≤ r (or 2r with B0, A0).

    - LoRA, rsLoRA, LoRA+, LoRA-FA, rank-1: ``B`` (m, r), ``A`` (r, n), ``scale`` s = α/r (α/√r rsLoRA).
    - PiSSA, MiLoRA: also the initial factors ``B0``, ``A0``: the base was replaced by the residual
      W0 − s·B0·A0, so ΔW = s·(B·A − B0·A0), itself factored as [s·B, −s·B0] · [A; A0].
    - AdaLoRA: ``mid`` = λ ⊙ mask (the singular values kept by the rank allocator) and s = scaling/ranknum.
    - VeRA: ``row`` = λ_b, ``mid`` = λ_d, B and A the shared random matrices (sliced), s = 1.

    With initial factors of the same rank and no ``row``/``mid``, the factors are formed as
    ΔW = s·(B − B0)·A + s·B0·(A − A0): the differences B − B0 and A − A0 are exact, so the small update
    of a PiSSA/MiLoRA adapter is not the difference of two large products (which would cancel).
    """

    codec: ClassVar[Codec] = CODECS["lowrank"]
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
        B, A = self.B.to(F64), self.A.to(F64)
        s = _as_scale(self.scale, B)
        if self.B0 is not None and self.A0 is not None:
            B0, A0 = self.B0.to(F64), self.A0.to(F64)
            if self.row is None and self.mid is None and B0.shape == B.shape:
                return torch.cat([s * (B - B0), s * B0], dim=-1), torch.cat([A, A - A0], dim=-2)
        L = B
        if self.row is not None:
            L = self.row.to(F64).unsqueeze(-1) * L
        if self.mid is not None:
            L = L * self.mid.to(F64).unsqueeze(-2)
        L = s * L
        if self.B0 is None:
            return L, A
        return torch.cat([L, -s * B0], dim=-1), torch.cat([A, A0], dim=-2)

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

    codec: ClassVar[Codec] = CODECS["dora"]
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
        """Formed in float64 (in float32 the small difference W' − W0 would cancel)."""
        w0, B, A = self.w0.to(F64), self.B.to(F64), self.A.to(F64)
        directed = w0 + _as_scale(self.scale, B) * (B @ A)
        norm = torch.linalg.vector_norm(directed, dim=-1, keepdim=True)
        return self.magnitude.to(F64).unsqueeze(-1) * directed / norm - w0


@dataclass(frozen=True)
class Scaled(_OnBase):
    """IA3: ΔW = W0 ⊙ (l − 1), with l scaling rows (``axis="row"``, l of length m, attention
    projections) or columns (``axis="column"``, l of length n, feed-forward inputs)."""

    codec: ClassVar[Codec] = CODECS["scaled"]
    w0: Tensor
    l: Tensor  # noqa: E741
    axis: Literal["row", "column"] = "row"

    def __post_init__(self) -> None:
        if self.axis not in ("row", "column"):
            raise ValueError(f"Scaled: axis must be 'row' or 'column', got {self.axis!r}")
        _expect("Scaled", "l", self.l, (self.w0.shape[-2 if self.axis == "row" else -1],))

    def to_dense(self) -> Tensor:
        lm1 = self.l.to(F64) - 1
        w0 = self.w0.to(F64)
        return w0 * (lm1.unsqueeze(-1) if self.axis == "row" else lm1.unsqueeze(-2))


@dataclass(frozen=True)
class VectorDelta(StoredForm):
    """θ_t − θ_0 for a vector parameter (LayerNorm weight or bias): no linear map, only norms."""

    codec: ClassVar[Codec] = CODECS["vector"]
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


Record = DeltaOperator | VectorDelta
"""What a delta file holds for one module: an operator, or a vector parameter's change."""

#: kind → the type stored with that codec (every codec has exactly one: tests/test_store.py).
OPERATORS: dict[str, type] = {cls.codec.kind: cls for cls in (Dense, LowRank, DoRA, Scaled, VectorDelta)}


def from_stored(rec: Stored, w0: Tensor | None = None) -> Record:
    """The update a stored record describes (``w0``: the base weight, for kinds defined through it).
    ValueError when its tensors do not fit together."""
    return OPERATORS[rec.kind].from_stored(rec, w0)


def orthonormal_right(L: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """``(L', Q)`` with L·R = L'·Qᵀ and Q orthonormal: Rᵀ = Q·R₂ (thin QR) and L' = L·R₂ᵀ, in float64.

    Norms of ΔW and of its projections are then sums of squares of small matrices: ‖ΔW‖_F = ‖L'‖_F,
    ‖UᵀΔW‖_F = ‖UᵀL'‖_F, ‖ΔW V‖_F = ‖L'·(QᵀV)‖_F. Unlike tr((LᵀL)(RRᵀ)), nothing cancels, so an
    alignment ratio of them stays in [0, 1] to rounding."""
    Q, R2 = torch.linalg.qr(R.to(F64).mT)
    return L.to(F64) @ R2.mT, Q


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
