"""A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) → the exact ΔW, by PEFT's rules.

:func:`read_adapter` is the entry point; each tuner's reader is in :mod:`.tuners`, the open adapter file
they share in :mod:`.adapter_file`, and any other tuner goes through PEFT's own merge (below).

ΔW is the change of the effective weight against the *original* W0 of BASE, in the same stored form
spectra's own recorder writes for the method (:mod:`spectra.train.methods`). Tensors are read from
``adapter_model.safetensors`` only (no pickle); a folder with only ``adapter_model.bin`` is refused.

==============================  ==========================================================================
adapter (peft_type / config)    record (module → operator), as PEFT merges it
==============================  ==========================================================================
LORA                            LowRank(B, A, s), s = α/r (α/√r with ``use_rslora``); r and α per module
                                from ``rank_pattern``/``alpha_pattern`` (PEFT's own pattern matcher)
LORA + ``use_dora``             DoRA(m, B, A, s) against W0 (W0 is a shape-only stand-in, as the recorder's:
                                the run's analysis reads the real W0 from BASE)
LORA, init ``pissa``            LowRank(B, A, s, B0, A0) = s·(B·A − B0·A0): PEFT saves an unconverted PiSSA
                                adapter relative to the residual W0 − s·B0·A0 and rebuilds that residual
                                on loading; B0, A0 are recomputed here exactly as PEFT's ``pissa_init``
                                (float32 SVD of W0, top r triplets, √(σ/s) on each side)
LORA, init ``olora``            the same with PEFT's ``olora_init``: B0, A0 = the first r columns of Q and
                                rows of R of W0's float32 QR (Q_r·R_r is unique: sign-free)
LORA, init ``milora``           spectra's MiLoRA rule (:mod:`spectra.train.methods.milora`): the r minor
                                singular triplets (PEFT has no MiLoRA; a converted one reads as LoRA)
AdaLoRA                         LowRank(B, A, mid = λ, s = α/(ranknum + 1e-5)), ranknum = init_r as PEFT
                                sets it; modules pruned by ``rank_pattern`` (PEFT saves only the kept
                                triplets) are scattered back to init_r with zeros where the mask is off,
                                the recorder's form (the mask is ``mid != 0``)
VERA                            LowRank(B_shared[:m], A_shared[:, :n], row = λ_b, mid = λ_d) and the shared
                                matrices; regenerated from ``projection_prng_key`` as PEFT does when
                                ``save_projection`` was off
IA3                             Scaled(W0, l, row | column): the saved l's shape says which
LN_TUNING                       VectorDelta(θ − θ0) per norm parameter, in float64, named ``<module>.<param>``
``modules_to_save``             Dense(W − W0) (VectorDelta for 1-D parameters): the saved full copy
any other tuner                 PEFT's own merge, dense: BASE loaded in float32 with transformers,
                                ``PeftModel.from_pretrained``, ``merge_and_unload``, minus W0 per adapted
                                module; method ``peft:<peft_type lower>``
==============================  ==========================================================================

Exact and refused: PiSSA/OLoRA/MiLoRA's B0·A0 depends only on W0 (sign choices of the decomposition cancel
in the product; the recomputed B0, A0 are sign-aligned with the trained B, A so that the factored form
s·(B − B0)·A + s·B0·(A − A0) stays small), so it is recomputed exactly, up to the float32 rounding PEFT's
own init has. An *unconverted* adapter whose residual cannot be rebuilt from W0 is refused with a
SourceError: ``pissa_niter_k`` (randomized SVD, its random state is not saved), ``corda`` (needs the
calibration data), ``loftq`` (quantized residual), ``lora_ga`` (needs the gradients), and any of these with
DoRA. Such an adapter is exact once saved with ``save_pretrained(...,
path_initial_model_for_weight_conversion=...)``: PEFT then writes a plain LoRA of rank 2r against the
original W0 (B' = [B, −B0], A' = [A; A0]), which is read as LoRA. A LoRA-family adapter in a layout the
factored readers do not cover (``fan_in_fan_out`` with DoRA/IA3/VeRA or a base-mutating init, ``lora_bias``,
embedding LoRA) is read through PEFT's dense merge instead, with a warning.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.importing.adapter_file import CONFIG, F64, PICKLED, WEIGHTS, AdapterFile, NotFactored
from spectra.train.importing.errors import SourceError
from spectra.train.importing.tuners import READERS, lora_method
from spectra.train.methods.base import Delta, base_name

from spectra.errors import first_line
from spectra.operators import Dense, Record, VectorDelta

__all__ = ["CONFIG", "AdapterUpdate", "is_adapter_folder", "read_adapter"]


@dataclass
class AdapterUpdate:
    """One adapter folder read against BASE (see the module docstring for each tuner's record)."""

    method: str
    config: dict[str, Any]
    base_model: str | None
    delta: Delta
    base_tensors: dict[str, tuple[str, str]] = field(default_factory=dict)


def is_adapter_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a PEFT adapter (an ``adapter_config.json``)."""
    return (Path(folder) / CONFIG).is_file()


def read_adapter(folder: Path, base: BaseCheckpoint) -> AdapterUpdate:
    """The exact ΔW of the PEFT adapter in ``folder`` against ``base``'s W0 (module docstring).

    SourceError (one line naming the file and tensor) on a missing or malformed config, pickled
    weights only, a tensor that does not fit the base weight, or an adapter whose ΔW cannot be formed
    exactly."""
    folder = Path(folder)
    config = _read_config(folder)
    peft_type = config["peft_type"]
    weights = folder / WEIGHTS
    if not weights.is_file():
        if (folder / PICKLED).is_file():
            raise SourceError(
                f"{folder / PICKLED}: adapter weights in pickle format; spectra reads {WEIGHTS} only "
                "(save the adapter with safe_serialization=True)"
            )
        raise SourceError(f"{folder}: no {WEIGHTS} beside {CONFIG}")
    reader = READERS.get(peft_type)
    if reader is None:
        return _dense_merge(folder, base, config, f"peft:{peft_type.lower()}")
    try:
        with safe_open(weights, "pt") as handle:
            handle.keys()
    except Exception as e:  # safetensors' own error: truncated, or not a safetensors file
        raise SourceError(f"{weights}: not a readable safetensors file ({first_line(e)})") from None
    try:
        with safe_open(weights, "pt") as handle:
            adapter = AdapterFile(folder, weights, config, base, handle)
            method, delta, tensors = reader(adapter)
    except NotFactored as e:
        warnings.warn(f"{folder}: {e}; ΔW read through PEFT's dense merge", UserWarning, stacklevel=2)
        return _dense_merge(folder, base, config, lora_method(config) if peft_type == "LORA" else peft_type)
    return AdapterUpdate(method, config, config.get("base_model_name_or_path"), delta, tensors)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise SourceError(f"{folder}: no {CONFIG}; expected a PEFT adapter folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON ({first_line(e)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise SourceError(f"{path}: expected a JSON object with a 'peft_type' (a PEFT adapter config)")
    from peft import PeftType

    known = {t.value for t in PeftType}
    if config["peft_type"] not in known:
        raise SourceError(
            f"{path}: unknown peft_type {config['peft_type']!r}; "
            f"expected one of PEFT's: {', '.join(sorted(known))}"
        )
    return config


# ------------------------------------------------------------------------------ any other: PEFT's merge


def _dense_merge(folder: Path, base: BaseCheckpoint, config: dict[str, Any], method: str) -> AdapterUpdate:
    """PEFT's own merge, dense: BASE in float32 (an exact upcast of bf16/fp16/fp32 W0), the adapter loaded
    with ``PeftModel.from_pretrained`` and merged; ΔW = merged − W0 in float64 per adapted module (its
    weight always, its other parameters where they changed). Holds the whole model in memory."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            base.dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        )
        peft_model = PeftModel.from_pretrained(model, str(folder))
    except Exception as e:  # a library's refusal, as one line naming the folder
        raise SourceError(
            f"{folder}: PEFT could not load this adapter onto {base.dir} ({first_line(e)})"
        ) from None
    adapted = [base_name(n) for n, mod in peft_model.named_modules() if _is_adapted(mod, BaseTunerLayer)]
    adapted = sorted({re.sub(r"\.modules_to_save\.[^.]+$", "", n) for n in adapted if n})
    try:
        merged = peft_model.merge_and_unload()
    except Exception as e:
        raise SourceError(
            f"{folder}: PEFT cannot merge a {config['peft_type']} adapter ({first_line(e)})"
        ) from None
    modules = dict(merged.named_modules())
    out: dict[str, Record] = {}
    tensors: dict[str, tuple[str, str]] = {}
    for name in adapted:
        if name not in modules:
            continue
        for param, value in modules[name].named_parameters(recurse=False):
            try:
                w0 = base.get(name, param)
            except KeyError:
                continue
            diff = value.detach().to(F64) - w0.to(F64)
            if param != "weight" and not diff.any():
                continue
            key = name if (param == "weight" and diff.ndim == 2) else f"{name}.{param}"
            out[key] = Dense(diff) if diff.ndim == 2 else VectorDelta(diff)
            tensors[key] = (name, param)
    if not out:
        raise SourceError(
            f"{folder}: PEFT's merge of this {config['peft_type']} adapter changes no base weight"
        )
    return AdapterUpdate(method, config, config.get("base_model_name_or_path"), Delta(out), tensors)


def _is_adapted(module: torch.nn.Module, tuner_layer: type) -> bool:
    if isinstance(module, tuner_layer):
        return True
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - older PEFT layout
        return False
    return isinstance(module, ModulesToSaveWrapper)
