"""What the audit checks read: one adapter, checkpoint or run, reduced to plain facts.

:mod:`.load` builds a :class:`Subject` from the files (the only place the audit reads anything);
:mod:`.checks` are pure functions of it. Each adapted module becomes a :class:`ModuleState` computed
from its exact ΔW against W0, one module in memory at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from spectra.metrics.precision import bf16_update_sparsity, unchanged_share
from spectra.operators import Dense, DoRA, LowRank, Record, Scaled, VectorDelta

F64 = torch.float64

#: The stored form of each method's record (what the recorder writes, what the adapter reader returns):
#: a method asked and a record of another form means another method was trained.
FORMS: dict[str, str] = {
    "lora": "lowrank", "rslora": "lowrank", "loraplus": "lowrank", "lorafa": "lowrank",
    "pissa": "lowrank+B0", "milora": "lowrank+B0", "olora": "lowrank+B0",
    "adalora": "lowrank+mid", "vera": "lowrank+row", "dora": "dora", "ia3": "scaled",
    "lntuning": "vector", "full": "dense", "miss": "dense", "quanta": "dense",
}  # fmt: skip


@dataclass(frozen=True)
class ModuleState:
    """One adapted module at the audited step.

    ``form``: its record's stored form (:data:`FORMS`); ``zero``: ΔW is exactly 0; ``initial``: the
    factor that starts at a fixed value (LoRA's B = 0, AdaLoRA's λ = 0, VeRA's λ_b = 0, IA3's l = 1) is
    still exactly there (None where no factor starts at a known value); ``scale``: s of a low-rank or
    DoRA record; ``rank``: its factored rank; ``relative``: ‖ΔW‖_F/‖W0‖_F; ``bf16_lost``: the share of
    its changed entries that vanish when stored in bf16 (the registry's ``bf16_sparsity`` over the changed
    entries only: :func:`_lost_in_bf16`); ``unchanged``: ΔW identical at the first and last record (None
    with one record); ``mask_full``: AdaLoRA only, every singular value kept at the full initial rank at
    every record."""

    name: str
    form: str
    zero: bool
    initial: bool | None = None
    scale: float | None = None
    rank: int | None = None
    relative: float = float("nan")
    bf16_lost: float | None = None
    unchanged: bool | None = None
    mask_full: bool | None = None

    @property
    def kind(self) -> str:
        """The projection kind: the module's last name component (``q_proj``, ``down_proj``)."""
        return self.name.rsplit(".", 1)[-1]


@dataclass
class Asked:
    """What training was asked to do, and where that was read (``source``: a file or an option)."""

    source: str | None = None
    method: str | None = None
    targets: list[str] | str | None = None
    dropout: float | None = None
    trainer: str | None = None


@dataclass
class Subject:
    """Everything the checks read of one audit target (see :mod:`.load` for where each comes from)."""

    kind: Literal["run", "checkpoint", "adapter"]
    path: Path
    asked: Asked = field(default_factory=Asked)
    found_method: str | None = None
    adapter_config: dict[str, Any] | None = None
    modules: list[ModuleState] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    base_modules: list[str] | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)
    log_source: str | None = None
    frozen_changed: list[tuple[str, float]] | None = None
    frozen_checked: int = 0
    spectra_trained: bool = False
    global_step: int | None = None
    problems: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """The ``target`` object of the JSON report."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "method_asked": self.asked.method,
            "asked_in": self.asked.source,
            "method_found": self.found_method,
            "steps": self.steps,
            "modules": len(self.modules),
        }


def form_of(op: Record) -> str:
    """The stored form of a record (the values of :data:`FORMS`)."""
    if isinstance(op, LowRank):
        if op.B0 is not None:
            return "lowrank+B0"
        if op.row is not None:
            return "lowrank+row"
        return "lowrank+mid" if op.mid is not None else "lowrank"
    if isinstance(op, DoRA):
        return "dora"
    if isinstance(op, Scaled):
        return "scaled"
    if isinstance(op, VectorDelta):
        return "vector"
    return "dense"


def dense_of(op: Record) -> Tensor:
    """ΔW (or θ − θ0) in float64; records that need W0 must carry the real one."""
    if isinstance(op, (VectorDelta, Dense)):
        return op.delta.to(F64)
    return op.to_dense()


def _initial(op: Record) -> bool | None:
    if isinstance(op, LowRank) and op.B0 is None:
        if op.row is not None:  # VeRA: λ_b starts at 0
            return not bool(op.row.any())
        if op.mid is not None:  # AdaLoRA: λ (lora_E) starts at 0
            return not bool(op.mid.any())
        return not bool(op.B.any())
    if isinstance(op, DoRA):
        return not bool(op.B.any())
    if isinstance(op, Scaled):  # IA3: l starts at 1
        return bool((op.l == 1).all())
    return None


def _scale(op: Record) -> float | None:
    s = getattr(op, "scale", None) if isinstance(op, (LowRank, DoRA)) else None
    if s is None:
        return None
    return float(s) if not isinstance(s, Tensor) or s.numel() == 1 else None


def _lost_in_bf16(w0: Tensor, delta: Tensor) -> float | None:
    """The share of the update's changed entries (ΔW_ij ≠ 0) that vanish when W0 + ΔW is stored in bf16:
    (bf16_sparsity − unchanged) / (1 − unchanged), the registry's two shares. Entries the update leaves
    exactly unchanged are not "lost": a sparse update of a bf16 model (an imported RL pair) loses nothing.
    None when no entry changed."""
    unchanged = float(unchanged_share(delta))
    if unchanged >= 1.0:
        return None
    return (float(bf16_update_sparsity(w0, delta)) - unchanged) / (1.0 - unchanged)


def module_state(
    name: str,
    op: Record,
    w0: Tensor,
    first: Tensor | None = None,
    mask_full: bool | None = None,
) -> ModuleState:
    """The facts of one module's record ``op`` against its W0; ``first``: its ΔW at the first record
    (when there are several), to tell whether anything changed between records."""
    delta = dense_of(op)
    w0_64 = w0.to(F64)
    norm0 = float(torch.linalg.vector_norm(w0_64))
    norm = float(torch.linalg.vector_norm(delta))
    lost = None
    if delta.numel():
        as_matrix = (lambda t: t) if delta.ndim == 2 else (lambda t: t.reshape(1, -1))
        lost = _lost_in_bf16(as_matrix(w0), as_matrix(delta))
    return ModuleState(
        name=name,
        form=form_of(op),
        zero=not bool(delta.any()),
        initial=_initial(op),
        scale=_scale(op),
        rank=op.B.shape[-1] if isinstance(op, (LowRank, DoRA)) else None,
        relative=norm / norm0 if norm0 > 0 else float("nan"),
        bf16_lost=lost,
        unchanged=None if first is None else bool(torch.equal(first, delta)),
        mask_full=mask_full,
    )
