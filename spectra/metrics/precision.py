"""Metrics of an update at the precision the model is stored in.

Two families, easy to confuse and deliberately named apart:

- ``bf16_sparsity`` (:func:`bf16_update_sparsity`): the share of an update *lost* when W0 + ΔW is stored
  in bfloat16 — a property of where the update would land, for any ΔW.
- ``unchanged_share`` and ``near_zero_share`` (:func:`unchanged_share`, :func:`near_zero_share`): the two
  definitions of update sparsity in "Reinforcement Learning Finetunes Small Subnetworks in Large Language
  Models" (Mukherjee et al. 2025, arXiv:2505.11711; code: github.com/SagnikMukherjee/sparsity_in_rl,
  ``check_sparsity.py``). There, both models are loaded in their stored dtype (``--torch_dtype``, default
  bfloat16), ``delta = rl − base`` per parameter, and over all parameters concatenated it prints
  ``(delta == 0).sum() / numel`` ("percentage of 0 values in the task vector", the paper's update sparsity)
  and ``torch.isclose(delta, 0, atol=tol).sum() / numel`` with ``--tolerances`` default 1e-5 and
  isclose's rtol multiplying |0|, i.e. the share with |Δw| ≤ 1e-5. Here ΔW is the exact difference of
  the stored values (an imported pair's ΔW is formed in float64 and stored where it is exact), so
  ΔW = 0 exactly where the two stored values are equal, as in their bf16 subtraction; the tolerance test
  reads the exact ΔW where theirs reads the bf16-rounded difference, which can differ only for entries
  within one bf16 rounding of 1e-5. Their per-model figure pools every entry of the model (a share of the
  total count, not a mean of shares): :func:`pooled_share` does that over a step's modules. spectra pools
  the matrix modules of the run (an imported pair: every 2-D tensor, embed_tokens and lm_head included);
  their script also counts 1-D tensors (norms, biases: well under 0.1 % of a 1.5B model's entries),
  which spectra records as vectors with norms only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

#: sparsity_in_rl's default ``--tolerances`` (check_sparsity.py): |Δw| ≤ 1e-5 counts as unchanged.
NEAR_ZERO_ATOL = 1e-5


def bf16_update_sparsity(w0: Tensor, delta: Tensor) -> Tensor:
    """Fraction of entries the update leaves unchanged once stored in bfloat16:
    mean over entries of [bf16(W0 + ΔW) = bf16(W0)], with W0 + ΔW formed in float32.

    Small RLVR updates often vanish below bf16's 8-bit mantissa; 1 means the stored model is unchanged.
    """
    w0_32 = w0.to(torch.float32)
    same = (w0_32 + delta.to(torch.float32)).to(torch.bfloat16) == w0_32.to(torch.bfloat16)
    return same.to(torch.float64).mean(dim=(-2, -1))


def _share(mask: Tensor) -> Tensor:
    """#{true entries} / (m·n) over the last two dimensions, in float64 (exact counts below 2⁵³)."""
    m, n = mask.shape[-2:]
    return torch.count_nonzero(mask, dim=(-2, -1)).to(torch.float64) / (m * n)


def unchanged_share(delta: Tensor) -> Tensor:
    """Share of weights exactly unchanged: #{(i, j): ΔW_ij = 0} / (m·n), per matrix of ``delta`` (…, m, n).

    sparsity_in_rl's update sparsity (``(delta == 0).sum() / numel``). ΔW must be the exact difference
    of the stored values (as an import records it: then ΔW_ij = 0 ⇔ the stored W_t,ij equals the stored
    W0,ij); for an adapter's factored ΔW = s·B·A it counts the entries that are exactly zero (all of them
    while B = 0, almost none after). NaN entries count as changed.
    """
    return _share(delta == 0)


def near_zero_share(delta: Tensor, atol: float = NEAR_ZERO_ATOL) -> Tensor:
    """Share of weights with |ΔW_ij| ≤ atol (default 1e-5): #{(i, j): |ΔW_ij| ≤ atol} / (m·n).

    sparsity_in_rl's ``torch.isclose(delta, 0, atol=1e-5)`` share (rtol multiplies |0|, so only atol
    counts), computed on the exact ΔW. At least :func:`unchanged_share`. NaN entries count as changed.
    """
    return _share(delta.abs() <= atol)


def pooled_share(shares: Iterable[float], entries: Iterable[int]) -> float:
    """A share pooled by entry count over modules, as sparsity_in_rl pools a whole model:
    Σ_i c_i / Σ_i N_i with N_i = m_i·n_i entries and c_i = round(share_i·N_i) the count behind module
    i's share (exact: a share is a count divided by N_i in float64). Not a mean of shares: a large
    module weighs by its size. NaN for no entries; a NaN share is left out with its entries.
    """
    count = total = 0
    for share, n in zip(shares, entries, strict=True):
        share, n = float(share), int(n)
        if share != share:  # NaN: this module has no value
            continue
        count += round(share * n)
        total += n
    return count / total if total else float("nan")
