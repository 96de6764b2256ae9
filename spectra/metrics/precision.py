"""Metrics of an update at the precision the model is stored in."""

from __future__ import annotations

import torch
from torch import Tensor


def bf16_update_sparsity(w0: Tensor, delta: Tensor) -> Tensor:
    """Fraction of entries the update leaves unchanged once stored in bfloat16:
    mean over entries of [bf16(W0 + ΔW) = bf16(W0)], with W0 + ΔW formed in float32.

    Small RLVR updates often vanish below bf16's 8-bit mantissa; 1 means the stored model is unchanged.
    """
    w0_32 = w0.to(torch.float32)
    same = (w0_32 + delta.to(torch.float32)).to(torch.bfloat16) == w0_32.to(torch.bfloat16)
    return same.to(torch.float64).mean(dim=(-2, -1))
