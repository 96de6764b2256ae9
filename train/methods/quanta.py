"""QuanTA: Quantum-informed Tensor Adaptation (Chen et al., NeurIPS 2024, arXiv:2406.00132), PEFT-style.

PEFT has no QuanTA, so this is a self-contained version (torch only) of the method of the paper.

The idea
--------
Reshape the input vector of a linear layer, of length ``in = n_1·…·n_d``, into a tensor with d axes, as if it
were the state of d "qudits" of dimensions n_1 … n_d. The adapter is a small quantum circuit on that tensor:
one trainable *gate* G_(i,j) for every pair of axes i < j, a dense matrix acting on the two axes it touches
(the identity on all others), applied one after the other like two-qubit gates::

    T   = G_P ⋯ G_2 · G_1          G_1 … G_P: the d(d−1)/2 pairs in itertools.combinations order,
                                   for d = 3: (1,2), (1,3), (2,3)
    y   = W0 x + b + (T − T_init) x
    ΔW  = T − T_init               (an out × in matrix, never formed in the forward pass)

T_init is the same circuit built from frozen copies of the initial gates. All gates start random (a zero gate
would zero the gradient of every other gate, as in a deep linear network), and subtracting the frozen copy
makes the update exactly zero at step 0: this is the paper's initialisation trick.

Why: a gate on axes (i, j) has (n_i·n_j)² entries, so the whole adapter has d(d−1)/2 · N^{4/d} parameters
for an N × N matrix (balanced axes), far fewer than N², yet T is a product of full-rank factors and ΔW is
generically full rank: a high-rank update for a LoRA-sized budget.

Parameter counts (:func:`gate_shapes`), for a 4096 × 4096 matrix:

    >>> sum(math.prod(s) for s in gate_shapes((16, 16, 16), (16, 16, 16)))   # QuanTA, d = 3
    196608
    >>> 32 * (4096 + 4096)                                                  # LoRA, r = 32
    262144

So QuanTA at d = 3 uses 0.75× the parameters of LoRA r = 32 (as many as LoRA r = 24), while its ΔW can reach
rank 4096. At d = 4 (axes 8·8·8·8) it is 6 · 8⁴ = 24,576 parameters (LoRA r = 3).

Choices made here
-----------------
* Axes (:func:`factorize`). in and out are each split into d axes, as balanced as possible (the smallest
  possible largest factor, ties to the largest smallest factor), sorted ascending: 4096 → 16·16·16,
  896 → 8·8·14, 4864 → 16·16·19, 128 → 4·4·8, 32 → 2·4·4. Every axis must have size ≥ 2 (an axis of size 1
  carries no gate): a dimension with fewer than d prime factors, such as a prime, raises a ValueError that
  names the module and the dimension and says which d would work. A lopsided but legal split (e.g.
  3988 = 2·2·997) is accepted as long as the adapter stays smaller than the dense matrix, else ValueError.
* out ≠ in. Input axis k (size n_k) is paired with output axis k (size m_k). A gate keeps the sizes of its
  axes, except that the *last* gate touching an axis maps it from n_k to m_k; for d = 3 that gives
  G_(1,2): (n1,n2)→(n1,n2), G_(1,3): (n1,n3)→(m1,n3), G_(2,3): (n2,n3)→(m2,m3). This is the rectangular gate
  shape (out_i, out_j, in_i, in_j) of the paper. The reference code instead pads in and out to one common
  square size ⌈max(in,out)^{1/d}⌉^d (zero-padding x, truncating y), which wastes parameters whenever the
  dimension is not a perfect d-th power; separate factorizations need no padding.
* Init (``QuantaConfig.init_std``). ``None`` (default) follows the reference: each gate, seen as an
  (out_i·out_j) × (in_i·in_j) matrix, is drawn like a fresh ``nn.Linear`` (kaiming-uniform, a = √5), i.e.
  U(−1/√fan_in, 1/√fan_in) with fan_in = in_i·in_j (std 1/√(3·fan_in)), so each gate has singular values of
  order 1 whatever its size. A float draws every entry from N(0, init_std²) instead.
* Precision. Gates are created in float32 whatever the base dtype, and the adapter path runs in the gates'
  dtype. Rather than computing T x − T_init x (two large, nearly equal vectors: catastrophic cancellation in
  bf16 or under autocast), the forward telescopes the difference gate by gate::

      z_0 = x,  r_0 = 0,   z_k = G⁰_k z_{k−1},   r_k = G_k r_{k−1} + (G_k − G⁰_k) z_{k−1}

  so that r_k = (G_k⋯G_1 − G⁰_k⋯G⁰_1) x exactly, and r_P = (T − T_init) x is built only from small terms
  (exactly 0 at init, whatever the dtype). :meth:`QuantaLinear.delta_weight` contracts both circuits into
  dense matrices in float64 and subtracts, then casts: a different code path from the forward, which is the
  one :func:`merge_quanta` uses (it pushes the identity matrix through the forward path).
* Saving. A model with QuanTA layers saves with ``model.save_pretrained`` (the gates and their frozen initial
  copies are ordinary parameters and buffers), but ``from_pretrained`` cannot rebuild them; to move just the
  adapter, use :func:`quanta_state_dict` / :func:`load_quanta_state_dict` with ``safetensors``.

(Over 400 lines: the QuanTA layer, its PEFT-style config and its exact ΔW rule stay together, since
PEFT has no QuanTA to lean on; the method's registration is in quanta_method.py.)
"""

from __future__ import annotations

import itertools
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "QuantaConfig",
    "QuantaLinear",
    "apply_quanta",
    "factorize",
    "gate_shapes",
    "load_quanta_state_dict",
    "merge_quanta",
    "quanta_modules",
    "quanta_state_dict",
]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_D = 7  # the dense contraction of delta_weight needs d² einsum letters (52 available)


@dataclass
class QuantaConfig:
    """Options of :func:`apply_quanta`.

    - d: number of axes each dimension is split into (2 ≤ d ≤ 7); d = 2 is one dense gate, i.e. full
      fine-tuning of the layer.
    - target_modules: suffixes of ``nn.Linear`` names (a name matches when it equals the suffix or ends
      with ``"." + suffix``).
    - init_std: ``None`` for the reference init (each gate drawn like an ``nn.Linear`` of fan-in in_i·in_j,
      std 1/√(3·fan_in)), or the std of a normal init N(0, init_std²).
    - dropout: dropout on the adapter's input, as in LoRA (the base path sees the clean x).
    """

    d: int = 3
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    init_std: float | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 2 <= self.d <= MAX_D:
            raise ValueError(f"QuantaConfig.d must be between 2 and {MAX_D}, got {self.d}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"QuantaConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.init_std is not None and self.init_std <= 0:
            raise ValueError(f"QuantaConfig.init_std must be positive or None, got {self.init_std}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]


# ----------------------------------------------------------------------------------------------------------
# Axes and gate shapes
# ----------------------------------------------------------------------------------------------------------


def _count_prime_factors(n: int) -> int:
    """Ω(n): the number of prime factors of n counted with multiplicity (Ω(12) = 3)."""
    count, p = 0, 2
    while p * p <= n:
        while n % p == 0:
            n //= p
            count += 1
        p += 1
    return count + (n > 1)


def _ascending_factorizations(n: int, d: int, smallest: int = 2):
    """Every non-decreasing tuple of d factors ≥ ``smallest`` whose product is n."""
    if d == 1:
        if n >= smallest:
            yield (n,)
        return
    f = smallest
    while f**d <= n:  # f is the smallest of the d factors, so f^d ≤ n
        if n % f == 0:
            for rest in _ascending_factorizations(n // f, d - 1, f):
                yield (f, *rest)
        f += 1


def factorize(n: int, d: int) -> tuple[int, ...]:
    """Split n into d axis sizes ≥ 2, as balanced as possible, sorted ascending.

    Balanced means the smallest possible largest factor, ties broken by the largest smallest factor:
    4096, d=3 → (16, 16, 16); 896 → (8, 8, 14); 4864 → (16, 16, 19); 32 → (2, 4, 4); 64, d=4 → (2, 2, 4, 4).

    Raises ValueError when n has fewer than d prime factors (a prime, or 2·131 with d = 3): the message says
    which d would work.
    """
    if d < 1:
        raise ValueError(f"d must be ≥ 1, got {d}")
    best = min(_ascending_factorizations(n, d), key=lambda t: (t[-1], -t[0]), default=None)
    if best is None:
        omega = _count_prime_factors(n) if n > 1 else 0
        hint = (
            f"use d ≤ {omega}"
            if omega >= 2
            else "it has no nontrivial factorization; leave this module out of target_modules"
        )
        raise ValueError(
            f"cannot split {n} into d={d} axes of size ≥ 2 ({n} has {omega} prime factor(s)); {hint}"
        )
    return best


def _pairs(d: int) -> list[tuple[int, int]]:
    """The gate order: every pair of axes i < j, in itertools.combinations order."""
    return list(itertools.combinations(range(d), 2))


def gate_shapes(in_axes: Sequence[int], out_axes: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Shape (out_i, out_j, in_i, in_j) of each gate, in circuit order (see the module docstring).

    An axis keeps its input size n_k until the last gate touching it, which maps it to its output size m_k.
    The adapter has ``sum(math.prod(s) for s in gate_shapes(...))`` parameters.
    """
    if len(in_axes) != len(out_axes):
        raise ValueError(f"in_axes {tuple(in_axes)} and out_axes {tuple(out_axes)} need the same length")
    pairs = _pairs(len(in_axes))
    last_gate = {axis: max(k for k, pair in enumerate(pairs) if axis in pair) for axis in range(len(in_axes))}
    size = list(in_axes)
    shapes = []
    for k, (i, j) in enumerate(pairs):
        new_i = out_axes[i] if last_gate[i] == k else size[i]
        new_j = out_axes[j] if last_gate[j] == k else size[j]
        shapes.append((new_i, new_j, size[i], size[j]))
        size[i], size[j] = new_i, new_j
    return shapes


def _gate_equation(d: int, i: int, j: int) -> str:
    """einsum applying a gate on axes (i, j) to a state of shape (..., s_1, …, s_d).

    For d = 3 and axes (0, 2): "...abc,XYac->...XbY"."""
    state = string.ascii_lowercase[:d]
    out = list(state)
    out[i], out[j] = "X", "Y"
    return f"...{state},XY{state[i]}{state[j]}->...{''.join(out)}"


def _dense_equation(d: int) -> str:
    """einsum contracting all gates into one tensor (m_1, …, m_d, n_1, …, n_d): each gate reads the current
    index of its two axes and writes two fresh ones, e.g. d=3: "DEab,FGDc,HIEG->FHIabc"."""
    letters = iter(string.ascii_letters)
    inputs = [next(letters) for _ in range(d)]
    current = list(inputs)
    operands = []
    for i, j in _pairs(d):
        new_i, new_j = next(letters), next(letters)
        operands.append(new_i + new_j + current[i] + current[j])
        current[i], current[j] = new_i, new_j
    return ",".join(operands) + "->" + "".join(current) + "".join(inputs)


# ----------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------


class _FrozenGates(nn.Module):
    """Holds the initial gates as buffers (saved in the state dict, never trained)."""


class QuantaLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus a QuanTA adapter: y = W0 x + b + (T − T_init) x.

    ``gates[f"{i}_{j}"]`` is the trainable gate on axes (i, j), of shape (out_i, out_j, in_i, in_j);
    ``init_gates`` holds their frozen initial values as buffers. ``in_axes`` / ``out_axes`` default to
    :func:`factorize` of in_features / out_features; ``name`` only serves error messages.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        d: int = 3,
        *,
        in_axes: Sequence[int] | None = None,
        out_axes: Sequence[int] | None = None,
        init_std: float | None = None,
        dropout: float = 0.0,
        name: str = "linear",
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.in_axes = self._axes(in_axes, self.in_features, "in_features", d, name)
        self.out_axes = self._axes(out_axes, self.out_features, "out_features", d, name)
        self.d = len(self.in_axes)
        if len(self.out_axes) != self.d:
            raise ValueError(
                f"QuanTA on {name!r}: in_axes {self.in_axes} and out_axes {self.out_axes} differ in d"
            )

        shapes = gate_shapes(self.in_axes, self.out_axes)
        n_params = sum(math.prod(s) for s in shapes)
        if self.d > 2 and n_params > self.in_features * self.out_features:
            raise ValueError(
                f"QuanTA on {name!r} ({self.in_features} → {self.out_features}, axes {self.in_axes} → "
                f"{self.out_axes}) would need {n_params} parameters, more than the dense matrix; "
                "try another d"
            )

        base_layer.requires_grad_(False)
        device = base_layer.weight.device
        self.gates = nn.ParameterDict()
        self.init_gates = _FrozenGates()
        self._keys = [f"{i}_{j}" for i, j in _pairs(self.d)]
        for key, shape in zip(self._keys, shapes, strict=True):
            gate = torch.empty(shape, device=device, dtype=torch.float32)
            _init_gate(gate, init_std)
            self.gates[key] = nn.Parameter(gate)
            self.init_gates.register_buffer(key, gate.detach().clone())
        self._gate_equations = [_gate_equation(self.d, i, j) for i, j in _pairs(self.d)]
        self._dense_equation = _dense_equation(self.d)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @staticmethod
    def _axes(axes: Sequence[int] | None, dim: int, what: str, d: int, name: str) -> tuple[int, ...]:
        if axes is None:
            try:
                return factorize(dim, d)
            except ValueError as err:
                raise ValueError(f"QuanTA on {name!r}: {what}={dim}: {err}") from None
        axes = tuple(int(a) for a in axes)
        if math.prod(axes) != dim or min(axes) < 1:
            raise ValueError(f"QuanTA on {name!r}: axes {axes} do not multiply to {what}={dim}")
        return axes

    def extra_repr(self) -> str:
        return f"in_axes={self.in_axes}, out_axes={self.out_axes}"

    def _gate_pairs(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(trainable gate, frozen initial gate) in circuit order, cast to ``dtype``."""
        return [(self.gates[k].to(dtype), getattr(self.init_gates, k).to(dtype)) for k in self._keys]

    def _apply_delta(self, x: torch.Tensor) -> torch.Tensor:
        """(T − T_init) x for x of shape (..., in) → (..., out), in x's dtype, by the telescoping recursion
        z_k = G⁰_k z_{k−1}, r_k = G_k r_{k−1} + (G_k − G⁰_k) z_{k−1} (no dense matrix, no cancellation)."""
        lead = x.shape[:-1]
        z = x.reshape(*lead, *self.in_axes)  # G⁰_k ⋯ G⁰_1 x, the initial circuit so far
        r: torch.Tensor | None = None  # (G_k ⋯ G_1 − G⁰_k ⋯ G⁰_1) x; None stands for 0
        pairs = self._gate_pairs(x.dtype)
        for k, (eq, (gate, gate0)) in enumerate(zip(self._gate_equations, pairs, strict=True)):
            step = torch.einsum(eq, z, gate - gate0)
            r = step if r is None else torch.einsum(eq, r, gate) + step
            if k < len(pairs) - 1:
                z = torch.einsum(eq, z, gate0)
        assert r is not None  # d ≥ 2 gives at least one gate
        return r.reshape(*lead, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        adapter_dtype = self.gates[self._keys[0]].dtype
        delta = self._apply_delta(self.dropout(x).to(adapter_dtype))
        return result + delta.to(result.dtype)

    def _dense(self, gates: list[torch.Tensor]) -> torch.Tensor:
        """The circuit of ``gates`` as an (out, in) matrix, by one einsum over all gate tensors."""
        return torch.einsum(self._dense_equation, *gates).reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW = T − T_init, (out, in), a detached snapshot: both circuits contracted to dense matrices in
        float64, subtracted, then cast to ``dtype``."""
        pairs = self._gate_pairs(torch.float64)
        t = self._dense([g for g, _ in pairs])
        t_init = self._dense([g0 for _, g0 in pairs])
        return (t - t_init).to(dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + ΔW in the base weight's dtype, ΔW computed (in float64) by pushing the identity matrix
        through the forward path (the outputs (T − T_init) e_k, stacked as rows, form ΔWᵀ)."""
        w0 = self.base_layer.weight
        eye = torch.eye(self.in_features, dtype=torch.float64, device=w0.device)
        delta = self._apply_delta(eye).T
        return (w0.double() + delta).to(w0.dtype)


def _init_gate(gate: torch.Tensor, init_std: float | None) -> None:
    """In-place init of one gate (see the module docstring)."""
    with torch.no_grad():
        if init_std is None:
            fan_in = gate.shape[2] * gate.shape[3]
            bound = 1.0 / math.sqrt(fan_in)
            gate.uniform_(-bound, bound)
        else:
            gate.normal_(0.0, init_std)


# ----------------------------------------------------------------------------------------------------------
# Model-level functions
# ----------------------------------------------------------------------------------------------------------


def _matches(name: str, suffixes: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def apply_quanta(model: nn.Module, config: QuantaConfig) -> nn.Module:
    """Replace every target ``nn.Linear`` of ``model`` by a :class:`QuantaLinear`, in place.

    All parameters of the model are frozen; only the gates train (the initial gates are buffers).
    Every layer is built before any is swapped in, so a factorization error leaves the model untouched.
    Raises ValueError, naming ``target_modules``, when no ``nn.Linear`` matches. Returns ``model``.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _matches(name, config.target_modules)
    ]
    if not targets:
        already = " (it already has QuanTA layers)" if quanta_modules(model) else ""
        raise ValueError(
            f"QuantaConfig.target_modules={list(config.target_modules)} matched no nn.Linear in "
            f"{type(model).__name__}{already}; target_modules are suffixes of names in model.named_modules()"
        )
    layers = {
        name: QuantaLinear(linear, config.d, init_std=config.init_std, dropout=config.dropout, name=name)
        for name, linear in targets
    }
    model.requires_grad_(False)
    for name, layer in layers.items():
        layer.gates.requires_grad_(True)
        _set_submodule(model, name, layer)
    return model


def quanta_modules(model: nn.Module) -> dict[str, QuantaLinear]:
    """Every :class:`QuantaLinear` of ``model``, by its name in ``model.named_modules()``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantaLinear)}


@torch.no_grad()
def merge_quanta(model: nn.Module) -> nn.Module:
    """Replace each :class:`QuantaLinear` by a plain ``nn.Linear`` with weight W0 + ΔW, in place.

    ΔW comes from :meth:`QuantaLinear.merged_weight` (the identity pushed through the forward path), not
    from :meth:`QuantaLinear.delta_weight`. The bias and the weight's ``requires_grad`` are kept. Returns
    ``model``.
    """
    for name, layer in quanta_modules(model).items():
        base = layer.base_layer
        merged = nn.Linear(
            layer.in_features,
            layer.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        merged.weight = nn.Parameter(layer.merged_weight(), requires_grad=base.weight.requires_grad)
        if base.bias is not None:
            merged.bias = base.bias
        if name == "":
            return merged  # the model itself was a QuantaLinear
        _set_submodule(model, name, merged)
    return model


def quanta_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter alone: gates and initial gates, keyed as in ``model.state_dict()``, detached and
    contiguous (ready for ``safetensors.torch.save_file``)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in quanta_modules(model).items():
        prefix = f"{name}." if name else ""
        for key in layer._keys:
            state[f"{prefix}gates.{key}"] = layer.gates[key].detach().contiguous()
            state[f"{prefix}init_gates.{key}"] = getattr(layer.init_gates, key).detach().contiguous()
    return state


@torch.no_grad()
def load_quanta_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`quanta_state_dict` into ``model`` (already passed through :func:`apply_quanta` with the
    same layout). The key sets and shapes must match exactly, else ValueError."""
    target = quanta_state_dict(model)
    missing, unexpected = sorted(target.keys() - state.keys()), sorted(state.keys() - target.keys())
    if missing or unexpected:
        raise ValueError(f"QuanTA state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        if tensor.shape != target[key].shape:
            raise ValueError(
                f"QuanTA state dict: {key} has shape {tuple(tensor.shape)}, "
                f"the model has {tuple(target[key].shape)}"
            )
    model_state = dict(model.named_parameters())
    model_state.update(model.named_buffers())
    for key, tensor in state.items():
        model_state[key].copy_(tensor)
