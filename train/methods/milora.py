"""MiLoRA's initialisation (Wang et al., 2024), which PEFT does not have.

MiLoRA is PiSSA with the other end of the spectrum: with W0 = U Σ Vᵀ and the r *smallest* singular
triplets (U_r, Σ_r, V_r),

    B0 = U_r · √(Σ_r / s),   A0 = √(Σ_r / s) · V_rᵀ,   base ← W0 − s·B0·A0,

so the model's function is unchanged at step 0 (residual + s·B0·A0 = W0) and training starts from the
minor subspace. ΔW during training is s·(B·A − B0·A0) (a rank-2r factored update).

(PEFT's ``init_lora_weights="mica"`` is a different method: B from the minor left vectors, A = 0.)
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def milora_init(layer: nn.Module, adapter: str = "default") -> None:
    """Re-initialise one PEFT ``LoraLayer`` in place with W0's r minor singular triplets."""
    base = layer.get_base_layer()
    weight = base.weight
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError("milora_init: fan_in_fan_out layers (GPT-2 Conv1D) are not supported")
    r = layer.r[adapter]
    scale = layer.scaling[adapter]
    W = weight.detach().to(torch.float32)
    if r > min(W.shape):
        raise ValueError(f"milora_init: rank {r} exceeds min{tuple(W.shape)} of the layer")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = torch.sqrt(S[-r:] / scale)
    B0 = U[:, -r:] * root
    A0 = root.unsqueeze(-1) * Vh[-r:]
    layer.lora_B[adapter].weight.copy_(B0.to(layer.lora_B[adapter].weight.dtype))
    layer.lora_A[adapter].weight.copy_(A0.to(layer.lora_A[adapter].weight.dtype))
    weight.copy_((W - scale * B0 @ A0).to(weight.dtype))
