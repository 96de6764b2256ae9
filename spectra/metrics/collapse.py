"""Rank collapse: a documented, configurable rule over spectral concentration, effective rank and reward.

A checkpoint is flagged when its update has folded into a few singular directions *and* (when reward is
known) the policy is failing:

1. geometry: the median over modules of E_1(ΔW) = σ₁²/‖ΔW‖_F² is at least ``e1_min`` (default 0.5: one
   direction holds half of the update energy), and, if ``erank_max`` is set, the median effective rank
   is at most ``erank_max``;
2. reward: the reward, averaged over the last ``reward_window`` logged steps up to the checkpoint
   (r_now), has fallen below its running peak (r_peak) by at least ``reward_drop`` of the reward's scale:
   r_peak − r_now ≥ reward_drop · scale, with scale = max(|r_peak|, r_peak − r_first), r_first the first
   window's mean. For rewards ≥ 0 (accuracy) the scale is the peak itself, so the rule reads "the reward
   fell to (1 − reward_drop) of its peak"; for rewards that are negative or of either sign (penalties,
   ±1 rewards) the scale is the peak's magnitude or the range the run climbed, so a fall from −0.2 to
   −0.93 is flagged just as one from 0.8 to 0.07 is. A scale of 0 (a reward that never moved off 0)
   never flags a fall.

Without reward data the flag follows geometry alone unless ``require_reward`` is set; the reason string
says which conditions fired. The geometry inputs are the registry's ``E_1`` and ``erank`` columns
(:data:`INPUTS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from spectra.codecs import MATRIX_KINDS

#: The per-step medians the rule reads, and the registry column each is the median of.
INPUTS = {"e1_median": "E_1", "erank_median": "erank"}


@dataclass(frozen=True)
class CollapseRule:
    """Thresholds of the rank-collapse rule (see the module docstring)."""

    e1_min: float = 0.5
    erank_max: float | None = None
    reward_drop: float = 0.5
    reward_window: int = 5
    require_reward: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.e1_min <= 1:
            raise ValueError(f"CollapseRule.e1_min must be in (0, 1], got {self.e1_min}")
        if not 0 < self.reward_drop < 1:
            raise ValueError(f"CollapseRule.reward_drop must be in (0, 1), got {self.reward_drop}")
        if self.reward_window < 1:
            raise ValueError(f"CollapseRule.reward_window must be ≥ 1, got {self.reward_window}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CollapseRule:
        """The rule of a run's ``--collapse-*`` options (``collapse_e1``, ``collapse_erank``,
        ``collapse_reward_drop``, ``collapse_window`` in run.json or a TrainConfig's dict); the default
        thresholds for those it does not record. One rule per run, whoever applies it: the live alarm,
        ``spectra analyze`` and ``spectra sweep`` flag the same steps."""
        keys = {"e1_min": "collapse_e1", "erank_max": "collapse_erank",
                "reward_drop": "collapse_reward_drop", "reward_window": "collapse_window"}  # fmt: skip
        given = {field: config[key] for field, key in keys.items() if key in config}
        return cls(**{k: v for k, v in given.items() if v is not None or k == "erank_max"})


def step_medians(analysis: pd.DataFrame) -> pd.DataFrame:
    """Per checkpoint, the medians over analysed matrix modules of E_1 and effective rank
    (``step``, ``e1_median``, ``erank_median``), from the engine's step × module table."""
    ok = analysis[(analysis["status"] == "ok") & analysis["kind"].isin(MATRIX_KINDS)]
    grouped = ok.groupby("step").agg(**{out: (col, "median") for out, col in INPUTS.items()})
    return grouped.reset_index()


def detect_collapse(
    per_step: pd.DataFrame, rewards: pd.DataFrame | None = None, rule: CollapseRule | None = None
) -> pd.DataFrame:
    """Flag collapsed checkpoints.

    ``per_step`` has one row per checkpoint with columns ``step``, ``e1_median`` and (if the rule uses
    it) ``erank_median``; ``rewards`` has columns ``step`` and ``reward`` (one row per logged training
    step) or is None. Returns ``step``, ``collapsed`` (bool), ``reward_smoothed``, ``reward_peak`` and
    ``reason`` (the conditions that fired, or "").
    """
    rule = rule or CollapseRule()
    for col in ("step", "e1_median") + (("erank_median",) if rule.erank_max is not None else ()):
        if col not in per_step.columns:
            raise ValueError(f"detect_collapse: per-step table lacks column {col!r}")
    smooth = peak = None
    first = np.nan
    if rewards is not None and len(rewards):
        r = rewards.sort_values("step")
        smooth_series = r["reward"].astype(float).rolling(rule.reward_window, min_periods=1).mean()
        smooth = pd.Series(smooth_series.to_numpy(), index=r["step"].to_numpy())
        peak = smooth.cummax()
        first = float(smooth_series.iloc[min(rule.reward_window, len(smooth_series)) - 1])

    rows = []
    for _, row in per_step.sort_values("step").iterrows():
        step = int(row["step"])
        reasons = []
        geometry = bool(row["e1_median"] >= rule.e1_min)
        if geometry:
            reasons.append(f"median E_1 {row['e1_median']:.2f} ≥ {rule.e1_min}")
        if rule.erank_max is not None:
            low_rank = bool(row["erank_median"] <= rule.erank_max)
            geometry = geometry and low_rank
            if low_rank:
                reasons.append(f"median erank {row['erank_median']:.1f} ≤ {rule.erank_max}")
        r_now = r_peak = np.nan
        if smooth is not None and (smooth.index <= step).any():
            r_now = float(smooth[smooth.index <= step].iloc[-1])
            r_peak = float(peak[peak.index <= step].iloc[-1])  # type: ignore[index]
        if np.isnan(r_now):
            fell = None
        else:
            scale = max(abs(r_peak), r_peak - first) if not np.isnan(first) else abs(r_peak)
            fell = bool(scale > 0 and r_peak - r_now >= rule.reward_drop * scale)
            if fell:
                drop = f"{rule.reward_drop:g} × {scale:.3f}"
                reasons.append(f"reward {r_now:.3f} fell from its peak {r_peak:.3f} by ≥ {drop}")
        if fell is None:
            collapsed = geometry and not rule.require_reward
            if collapsed:
                reasons.append("no reward data: geometry alone")
        else:
            collapsed = geometry and fell
        rows.append(
            {
                "step": step,
                "collapsed": collapsed,
                "reward_smoothed": r_now,
                "reward_peak": r_peak,
                "reason": "; ".join(reasons) if collapsed else "",
            }
        )
    return pd.DataFrame(rows, columns=["step", "collapsed", "reward_smoothed", "reward_peak", "reason"])
