"""Each PEFT tuner's exact ΔW, read from an open adapter file (the table of :mod:`.adapters`): LoRA and
its variants (rsLoRA, DoRA, PiSSA/OLoRA/MiLoRA with their rebuilt initial factors), AdaLoRA, VeRA, IA3
and LayerNorm tuning. Each reader returns ``(method, Delta, record → (module, param) of BASE)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from spectra.train.importing.adapter_file import (
    F64,
    AdapterFile,
    NotFactored,
    full_copies,
    linear_shape,
    meta,
)
from spectra.train.importing.errors import SourceError
from spectra.train.methods.base import Delta
from torch import Tensor

from spectra.operators import DoRA, LowRank, Record, Scaled, VectorDelta

#: LoRA inits that replace the base by a residual that cannot be rebuilt from W0 (prefix match).
_UNREBUILDABLE = ("pissa_niter_", "corda", "loftq", "lora_ga")
#: LoRA inits whose residual is rebuilt from W0: init name → spectra's method name.
REBUILT = {"pissa": "pissa", "olora": "olora", "milora": "milora"}


# --------------------------------------------------------------------------------------------- LoRA


def lora_method(config: dict[str, Any]) -> str:
    """spectra's name for a LoRA adapter's method: dora, pissa/olora/milora (by its init), rslora or lora."""
    init = config.get("init_lora_weights", True)
    if config.get("use_dora"):
        return "dora"
    if isinstance(init, str) and init.lower() in REBUILT:
        return REBUILT[init.lower()]
    return "rslora" if config.get("use_rslora") else "lora"


def _read_lora(adapter: AdapterFile) -> tuple[str, Delta, dict[str, tuple[str, str]]]:
    from peft.utils.other import get_pattern_key

    cfg = adapter.config
    r_default = adapter.option("r", int)
    alpha_default = adapter.option("lora_alpha", (int, float))
    rank_pattern = adapter.option("rank_pattern", dict, {}) or {}
    alpha_pattern = adapter.option("alpha_pattern", dict, {}) or {}
    rslora = bool(cfg.get("use_rslora"))
    dora = bool(cfg.get("use_dora"))
    init = cfg.get("init_lora_weights", True)
    init_name = init.lower() if isinstance(init, str) else ""
    if init_name.startswith(_UNREBUILDABLE):
        raise SourceError(
            f"{adapter.where}: an unconverted init_lora_weights={init!r} adapter is relative to a residual "
            "base that cannot be rebuilt from W0; save it with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) to get a LoRA against the original W0"
        )
    rebuilt = init_name in REBUILT
    if rebuilt and dora:
        raise SourceError(f"{adapter.where}: init_lora_weights={init!r} with use_dora is not supported")
    if cfg.get("lora_bias"):
        raise NotFactored("lora_bias=True (a bias update)")
    if any(".lora_embedding_" in k for k in adapter.keys):
        raise NotFactored("LoRA on an embedding")
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    if fan_in_fan_out and (dora or rebuilt):
        raise NotFactored("fan_in_fan_out with DoRA or a base-mutating init")

    groups, full = adapter.groups(("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    out: dict[str, Record] = {}
    tensors: dict[str, tuple[str, str]] = {}
    for module, parts in groups.items():
        for need in ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if dora else ()):
            if need not in parts:
                some = next(iter(parts.values()))
                raise SourceError(f"{adapter.file}: {module} has {some} but no {module}.{need}")
        ka, kb = parts["lora_A.weight"], parts["lora_B.weight"]
        m, n = linear_shape(adapter, module, ka)
        out_f, in_f = (n, m) if fan_in_fan_out else (m, n)
        r = int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r_default))
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha_default))
        adapter.expect(ka, adapter.shape(ka), (r, in_f), f"lora_A of rank {r} for {module}")
        adapter.expect(kb, adapter.shape(kb), (out_f, r), f"lora_B of rank {r} for {module}")
        A, B = adapter.tensor(ka), adapter.tensor(kb)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        if fan_in_fan_out:  # Conv1D stores (in, out): ΔW in the weight's layout is (B·A)ᵀ
            A, B = B.mT.contiguous(), A.mT.contiguous()
        if dora:
            km = parts["lora_magnitude_vector"]
            adapter.expect(km, adapter.shape(km), (m,), f"DoRA magnitude of {module}")
            out[module] = DoRA(w0=meta((m, n)), magnitude=adapter.tensor(km), B=B, A=A, scale=scale)
        elif rebuilt:
            B0, A0 = _initial_factors(init_name, adapter.base.get(module), r, scale)
            B0, A0 = _align_signs(B0, A0, B)
            out[module] = LowRank(B=B, A=A, scale=scale, B0=B0, A0=A0)
        else:
            out[module] = LowRank(B=B, A=A, scale=scale)
        tensors[module] = (module, "weight")
    full_copies(adapter, full, out, tensors)
    return lora_method(cfg), Delta(out), tensors


def _initial_factors(init: str, w0: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor]:
    """B0, A0 of a base-mutating init, computed from W0 exactly as its initialiser does (float32)."""
    W = w0.to(torch.float32)
    if r > min(W.shape):
        raise SourceError(f"init_lora_weights={init!r}: rank {r} exceeds min{tuple(W.shape)} of the weight")
    if init == "olora":  # peft.tuners.lora.layer.LoraLayer.olora_init
        Q, R = torch.linalg.qr(W)
        return Q[:, :r].contiguous(), R[:r].contiguous()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    if init == "pissa":  # LoraLayer.pissa_init: top r triplets, √(σ/s) on each side
        Sr = S[:r] / scale
        return U[:, :r] @ torch.diag(torch.sqrt(Sr)), torch.diag(torch.sqrt(Sr)) @ Vh[:r]
    root = torch.sqrt(S[-r:] / scale)  # spectra.train.methods.milora.milora_init: the r minor triplets
    return U[:, -r:] * root, root.unsqueeze(-1) * Vh[-r:]


def _align_signs(B0: Tensor, A0: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Flip the sign of B0's column j and A0's row j together where B0[:, j]·B[:, j] < 0: B0·A0 is
    unchanged, and B − B0 is the small trained change when the decomposition chose other signs."""
    sign = torch.where((B0.to(F64) * B.to(F64)).sum(0) < 0, -1.0, 1.0).to(B0.dtype)
    return B0 * sign, A0 * sign.unsqueeze(-1)


# ------------------------------------------------------------------------------------------ AdaLoRA


def _read_adalora(adapter: AdapterFile) -> tuple[str, Delta, dict[str, tuple[str, str]]]:
    init_r = adapter.option("init_r", int)
    alpha = float(adapter.option("lora_alpha", (int, float)))
    raw = adapter.option("rank_pattern", dict, {}) or {}
    masks: dict[str, list[bool]] = {}
    for key, mask in raw.items():
        if not (isinstance(mask, list) and len(mask) == init_r and all(isinstance(b, bool) for b in mask)):
            raise SourceError(f"{adapter.where}: rank_pattern[{key!r}] is not a list of {init_r} booleans")
        masks[key.split(".lora_E")[0]] = mask
    groups, full = adapter.groups(("lora_A", "lora_B", "lora_E"))
    out: dict[str, Record] = {}
    tensors: dict[str, tuple[str, str]] = {}
    for module, parts in groups.items():
        for need in ("lora_A", "lora_B", "lora_E"):
            if need not in parts:
                raise SourceError(
                    f"{adapter.file}: {module} has no {module}.{need} (AdaLoRA needs A, B and E)"
                )
        ka, kb, ke = parts["lora_A"], parts["lora_B"], parts["lora_E"]
        m, n = linear_shape(adapter, module, ka)
        mask = masks.get(module)
        kept = init_r if mask is None else sum(mask)
        what = f"AdaLoRA with {kept} of init_r={init_r} triplets kept for {module}"
        adapter.expect(ka, adapter.shape(ka), (kept, n), what)
        adapter.expect(kb, adapter.shape(kb), (m, kept), what)
        adapter.expect(ke, adapter.shape(ke), (kept, 1), what)
        A, B, E = adapter.tensor(ka), adapter.tensor(kb), adapter.tensor(ke).squeeze(-1)
        if kept < init_r:  # PEFT saved the kept triplets only: back to init_r, zeros where pruned
            idx = torch.tensor(mask, dtype=torch.bool)
            A_full, B_full, E_full = A.new_zeros(init_r, n), B.new_zeros(m, init_r), E.new_zeros(init_r)
            A_full[idx], B_full[:, idx], E_full[idx] = A, B, E
            A, B, E = A_full, B_full, E_full
        scaling = alpha if alpha > 0 else float(kept)  # AdaLoraLayer.update_layer
        out[module] = LowRank(B=B, A=A, mid=E, scale=scaling / (init_r + 1e-5))  # ranknum = init_r
        tensors[module] = (module, "weight")
    full_copies(adapter, full, out, tensors)
    return "adalora", Delta(out), tensors


# --------------------------------------------------------------------------------------------- VeRA


def _read_vera(adapter: AdapterFile) -> tuple[str, Delta, dict[str, tuple[str, str]]]:
    r = adapter.option("r", int)
    if adapter.config.get("fan_in_fan_out"):
        raise NotFactored("fan_in_fan_out VeRA")
    shared_keys = {
        k: k.removeprefix("base_model.")
        for k in adapter.keys
        if k in ("base_model.vera_A", "base_model.vera_B")
    }
    adapter.keys = [k for k in adapter.keys if k not in shared_keys]
    groups, full = adapter.groups(("vera_lambda_b", "vera_lambda_d"))
    shapes: dict[str, tuple[int, int]] = {}
    for module, parts in groups.items():
        for need in ("vera_lambda_b", "vera_lambda_d"):
            if need not in parts:
                raise SourceError(f"{adapter.file}: {module} has no {module}.{need}")
        shapes[module] = linear_shape(adapter, module, parts["vera_lambda_b"])
    shared: dict[str, Tensor] = {}
    if len(shared_keys) == 2:
        shared = {name: adapter.tensor(key) for key, name in shared_keys.items()}
    elif groups:
        seed = adapter.option("projection_prng_key", int)
        shared = _vera_projections(r, seed, shapes)
    out: dict[str, Record] = {}
    tensors: dict[str, tuple[str, str]] = {}
    for module, parts in groups.items():
        m, n = shapes[module]
        kb, kd = parts["vera_lambda_b"], parts["vera_lambda_d"]
        adapter.expect(kb, adapter.shape(kb), (m,), f"λ_b of {module}")
        adapter.expect(kd, adapter.shape(kd), (r,), f"λ_d of rank {r}")
        vA, vB = shared["vera_A"], shared["vera_B"]
        if vA.shape[0] != r or vB.shape[1] != r or vA.shape[1] < n or vB.shape[0] < m:
            raise SourceError(
                f"{adapter.file}: shared vera_A {tuple(vA.shape)} / vera_B {tuple(vB.shape)} do not cover "
                f"{module} ({m}×{n}) at rank {r}"
            )
        out[module] = LowRank(B=vB[:m, :], A=vA[:, :n], row=adapter.tensor(kb), mid=adapter.tensor(kd))
        tensors[module] = (module, "weight")
    full_copies(adapter, full, out, tensors)
    return "vera", Delta(out, shared), tensors


def _vera_projections(r: int, seed: int, shapes: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
    """VeRA's shared matrices as PEFT draws them (``VeraModel._init_vera_A_vera_B``): Kaiming-uniform from
    a CPU generator seeded with ``projection_prng_key``, A (r, largest in) first, then B (largest out, r)."""
    from peft.tuners.vera.model import _kaiming_init

    out_dim = max(m for m, _ in shapes.values())
    in_dim = max(n for _, n in shapes.values())
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_A = _kaiming_init((r, in_dim), generator=generator)
    vera_B = _kaiming_init((out_dim, r), generator=generator)
    return {"vera_A": vera_A, "vera_B": vera_B}


# ---------------------------------------------------------------------------------------------- IA3


def _read_ia3(adapter: AdapterFile) -> tuple[str, Delta, dict[str, tuple[str, str]]]:
    if adapter.config.get("fan_in_fan_out"):
        raise NotFactored("fan_in_fan_out IA3")
    groups, full = adapter.groups(("ia3_l",))
    out: dict[str, Record] = {}
    tensors: dict[str, tuple[str, str]] = {}
    for module, parts in groups.items():
        key = parts["ia3_l"]
        m, n = linear_shape(adapter, module, key)
        shape = adapter.shape(key)
        if shape == (m, 1):  # IA3Layer: (out, 1) scales rows, (1, in) scales the feed-forward input
            axis = "row"
        elif shape == (1, n):
            axis = "column"
        else:
            raise SourceError(
                f"{adapter.file}: tensor {key} has shape {shape}; expected ({m}, 1) or (1, {n}) for {module}"
            )
        out[module] = Scaled(w0=meta((m, n)), l=adapter.tensor(key).flatten(), axis=axis)
        tensors[module] = (module, "weight")
    full_copies(adapter, full, out, tensors)
    return "ia3", Delta(out), tensors


# ------------------------------------------------------------------------------------ LayerNorm tuning


def _read_ln_tuning(adapter: AdapterFile) -> tuple[str, Delta, dict[str, tuple[str, str]]]:
    groups, full = adapter.groups(("ln_tuning_layers.weight", "ln_tuning_layers.bias"))
    out: dict[str, Record] = {}
    tensors: dict[str, tuple[str, str]] = {}
    for module, parts in groups.items():
        for suffix, key in parts.items():
            param = suffix.rsplit(".", 1)[-1]
            theta0 = _base_param(adapter, module, param, key)
            new = adapter.tensor(key)
            adapter.expect(key, tuple(new.shape), tuple(theta0.shape), f"the base model's {module}.{param}")
            name = f"{module}.{param}"
            out[name] = VectorDelta(new.to(F64) - theta0.to(F64))
            tensors[name] = (module, param)
    full_copies(adapter, full, out, tensors)
    return "lntuning", Delta(out), tensors


def _base_param(adapter: AdapterFile, module: str, param: str, key: str) -> Tensor:
    try:
        return adapter.base.get(module, param)
    except KeyError:
        raise SourceError(
            f"{adapter.file}: tensor {key} tunes {module}.{param}, "
            f"which the base model {adapter.base.dir} lacks"
        ) from None


READERS: dict[str, Callable[[AdapterFile], tuple[str, Delta, dict[str, tuple[str, str]]]]] = {
    "LORA": _read_lora,
    "ADALORA": _read_adalora,
    "VERA": _read_vera,
    "IA3": _read_ia3,
    "LN_TUNING": _read_ln_tuning,
}
