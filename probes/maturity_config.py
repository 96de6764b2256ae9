"""Options of ``spectra probe maturity`` that change what is computed, declared once (spectra/cli/options.py
generates the command's options from these fields). Light: no torch, so that the command line starts fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from spectra.errors import SpectraError

GROUP = "Power-law fit"


@dataclass
class MaturityOptions:
    """The goodness-of-fit test of each matrix's power-law tail (spectra.metrics.esd.power_law_pvalue)."""

    pvalue: bool = field(
        default=False,
        metadata={
            "help": "Also test each power-law fit: the Clauset–Shalizi–Newman goodness-of-fit p-value "
            "(semi-parametric bootstrap, Clauset et al. 2009 §4.1; column alpha_pvalue; p ≤ 0.1 rules the "
            "power law out). Costs --pvalue-samples fits per matrix.",
            "group": GROUP,
        },
    )
    pvalue_samples: int = field(
        default=1000,
        metadata={
            "help": "Synthetic spectra per matrix for --pvalue (1000: p to about ±0.01 near 0.1).",
            "group": GROUP,
        },
    )
    pvalue_seed: int = field(
        default=0,
        metadata={"help": "Seed of the --pvalue bootstrap (the same seed, the same p).", "group": GROUP},
    )

    def check(self) -> None:
        """A one-line error naming the option when a value is out of range."""
        if self.pvalue_samples < 1:
            raise SpectraError(
                f"--pvalue-samples {self.pvalue_samples}: expected a positive number of samples"
            )

    @property
    def samples(self) -> int:
        """Bootstrap samples per matrix: ``pvalue_samples`` with ``pvalue``, else 0 (no test)."""
        return self.pvalue_samples if self.pvalue else 0
