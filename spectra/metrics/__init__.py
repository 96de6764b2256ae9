"""spectra.metrics: pure functions of spectra and matrices, each documented with its formula.

Notation: σ the singular values of a matrix (descending), p_i = σ_i/Σσ, W0 = U Σ Vᵀ the base weight,
U_k, V_k its top-k singular vectors and U_{-k}, V_{-k} its bottom-k, W_t = W0 + ΔW.
"""

from spectra.metrics.accuracy import avg_at_k, mean_pass_at_k, pass_at_k
from spectra.metrics.collapse import CollapseRule, detect_collapse, step_medians
from spectra.metrics.esd import esd_eigenvalues, esd_fit, power_law_fit, spectral_entropy
from spectra.metrics.marchenko_pastur import mp_fit
from spectra.metrics.precision import bf16_update_sparsity
from spectra.metrics.spectral import (
    effective_rank,
    frobenius_norm,
    participation_ratio,
    rank_at,
    relative_update_size,
    spectral_concentration,
    spectral_norm,
    spectrum_drift,
    stable_rank,
)
from spectra.metrics.subspace import (
    alignment_baseline,
    alignment_curves,
    intruder_dimensions,
    max_principal_angle,
    principal_alignment,
    principal_angles,
)

__all__ = [
    "CollapseRule",
    "alignment_baseline",
    "alignment_curves",
    "avg_at_k",
    "bf16_update_sparsity",
    "detect_collapse",
    "effective_rank",
    "esd_eigenvalues",
    "esd_fit",
    "frobenius_norm",
    "intruder_dimensions",
    "max_principal_angle",
    "mean_pass_at_k",
    "mp_fit",
    "participation_ratio",
    "pass_at_k",
    "power_law_fit",
    "principal_alignment",
    "principal_angles",
    "rank_at",
    "relative_update_size",
    "spectral_concentration",
    "spectral_entropy",
    "spectral_norm",
    "spectrum_drift",
    "stable_rank",
    "step_medians",
]
