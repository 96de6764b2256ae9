"""The stored kinds of a weight update: one table, kind → datasets, attributes and description.

A delta file stores each module as an HDF5 group with the attributes ``name``, ``kind`` and ``shape``,
the kind's own scalar attributes, and one dataset per tensor (docs/format.md). This table is the only
place that spells the kinds out: the store writes, reads and validates records through it, the
operators (:mod:`spectra.operators`) name the codec they are stored with, and the docs' table of kinds
is checked against it (tests/test_store.py).

A :class:`Stored` record is what crosses the file boundary: the kind, the declared shape, the tensors
and the scalar attributes, exactly as in the file. It knows nothing of linear algebra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

#: A scale beyond this is not a learning rate's doing but a damaged file (its squares overflow float64).
MAX_SCALE = 1e8
#: The dtypes (torch names, as in a dataset's ``dtype`` attribute) of factors, vectors and matrices.
FLOATING: tuple[str, ...] = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Codec:
    """How one kind of update is stored.

    tensors: datasets every record of this kind has; optional: datasets it may have; matrices: the
    datasets that are 2-D (the others are 1-D); attrs: scalar attributes (``scale``: a finite number,
    ``axis``: ``row`` or ``column``); needs_w0: ΔW can only be formed with W0 at hand; matrix: a linear
    map (False: a vector parameter, analysed by its norms only); rank_from: datasets whose column counts
    add up to the factored rank (an empty tuple: not factored); dtypes: the dtypes its datasets may have
    (floating types: a factor stored as bool or int is not an update).
    """

    kind: str
    tensors: tuple[str, ...]
    summary: str
    optional: tuple[str, ...] = ()
    matrices: tuple[str, ...] = ()
    attrs: tuple[str, ...] = ()
    needs_w0: bool = False
    matrix: bool = True
    rank_from: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = FLOATING

    @property
    def datasets(self) -> tuple[str, ...]:
        return self.tensors + self.optional

    def rank(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Columns of the factored form (0 for kinds that are not factored), from dataset shapes."""
        return sum(shapes[k][-1] for k in self.rank_from if k in shapes)


CODECS: dict[str, Codec] = {
    c.kind: c
    for c in (
        Codec("dense", ("delta",), "ΔW itself (full fine-tuning, MiSS, QuanTA)", matrices=("delta",)),
        Codec(
            "lowrank",
            ("B", "A"),
            "scale · diag(row) · B · diag(mid) · A − scale · B0 · A0 (LoRA family, PiSSA, MiLoRA, "
            "AdaLoRA, VeRA)",
            optional=("mid", "row", "B0", "A0"),
            matrices=("B", "A", "B0", "A0"),
            attrs=("scale",),
            rank_from=("B", "B0"),
        ),
        Codec(
            "dora",
            ("B", "A", "magnitude"),
            "magnitude ⊙ (W0 + scale·B·A) / ‖W0 + scale·B·A‖_row − W0 (DoRA)",
            matrices=("B", "A"),
            attrs=("scale",),
            needs_w0=True,
        ),
        Codec("scaled", ("l",), "W0 ⊙ (l − 1) along rows or columns (IA3)", attrs=("axis",), needs_w0=True),
        Codec("vector", ("delta",), "θ_t − θ_0 of a vector parameter (LayerNorm tuning)", matrix=False),
    )
}

#: The kinds that are linear maps (analysed by every metric); the others are analysed by their norms.
MATRIX_KINDS: tuple[str, ...] = tuple(k for k, c in CODECS.items() if c.matrix)


@dataclass
class Stored:
    """One module's update as stored: its kind, declared shape, tensors and scalar attributes."""

    kind: str
    shape: tuple[int, ...]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def codec(self) -> Codec:
        return CODECS[self.kind]


def codec(kind: str | None) -> Codec:
    """The codec of ``kind``; ValueError naming the known kinds otherwise."""
    if kind not in CODECS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(CODECS)}")
    return CODECS[kind]


def check_attr(name: str, value: Any) -> float | str:
    """A scalar attribute's value, checked: ``scale`` a finite number of magnitude ≤ MAX_SCALE,
    ``axis`` ``row`` or ``column``. ValueError saying what was expected otherwise."""
    if name == "scale":
        try:
            scale = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"scale attribute is {value!r}; expected a number") from None
        if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise ValueError(
                f"scale attribute is {scale!r}; expected a finite number with |scale| ≤ {MAX_SCALE:g}"
            )
        return scale
    if name == "axis":
        text = value.decode() if isinstance(value, bytes) else value
        if text not in ("row", "column"):
            raise ValueError(f"axis attribute is {value!r}; expected 'row' or 'column'")
        return text
    raise ValueError(f"no rule for attribute {name!r}")


def dtype_name(t: Tensor) -> str:
    """A tensor's dtype as the torch name (``float32``, ``bool``)."""
    return str(t.dtype).removeprefix("torch.")


def check_dtype(c: Codec, key: str, t: Tensor) -> None:
    """ValueError unless dataset ``key`` of a ``c.kind`` record has one of the codec's dtypes."""
    if dtype_name(t) not in c.dtypes:
        raise ValueError(
            f"dataset {key!r} has dtype {dtype_name(t)}; a {c.kind} record stores {', '.join(c.dtypes)}"
        )


def check_record(rec: Stored) -> None:
    """Check a record against its codec before anything is computed from it: required datasets present,
    no unknown ones, each of a dtype the codec allows (floating), matrices 2-D and vectors 1-D, no empty
    factor, attributes valid, a declared shape of 2 positive integers (1 for vectors). ValueError naming
    what is wrong."""
    c = codec(rec.kind)
    missing = [k for k in c.tensors if k not in rec.tensors]
    if missing:
        raise ValueError(f"dataset {missing[0]!r} missing (a {c.kind} record has {', '.join(c.tensors)})")
    unknown = sorted(set(rec.tensors) - set(c.datasets))
    if unknown:
        raise ValueError(f"unexpected dataset {unknown[0]!r} for kind {c.kind}")
    dims = 2 if c.matrix else 1
    if len(rec.shape) != dims or any(d < 1 for d in rec.shape):
        raise ValueError(f"shape attribute {list(rec.shape)} is not {dims} positive integer(s)")
    for key, t in rec.tensors.items():
        check_dtype(c, key, t)
        want = 2 if key in c.matrices else 1
        if t.ndim != want:
            raise ValueError(f"dataset {key!r} has {t.ndim} dimension(s); expected {want}")
        if t.numel() == 0:
            raise ValueError(f"dataset {key!r} is empty (shape {tuple(t.shape)}: rank 0?)")
    for name in c.attrs:
        if name not in rec.attrs:
            raise ValueError(f"{name} attribute missing (a {c.kind} record needs it)")
        rec.attrs[name] = check_attr(name, rec.attrs[name])
