"""Rank collapse as the study defines it: a performance cliff, with the update's geometry as its mechanism.

**The verdict is performance.** A run has collapsed when its performance fell, beyond the reward's own
noise, and had not recovered at its end. Two series can say so:

1. the training reward r_1 … r_n (one value per logged step). Only *full* windows of w =
   ``reward_window`` logged steps are read: m_t = (1/w) Σ_{i=t−w+1..t} r_i for t ≥ w (no mean of a
   partial window, so one lucky first batch cannot set the peak). The peak is P_t = max_{w≤s≤t} m_s.
   The reward's per-step noise is von Neumann's successive-difference estimate over the steps logged
   so far, σ̂_t² = Σ_{i=2..t} (r_i − r_{i−1})² / (2(t − 1)) (a slow trend barely inflates it), so a
   window mean has standard error σ̂_t/√w and the difference of two window means at most
   SE_t = σ̂_t·√(2/w). The window ending at t has **fallen** when

       P_t − m_t > z · SE_t                                            (z = ``z``, default 3)

   and, when the reward's floor f is known (``reward_floor``; the trainer's rewards are in [0, 1], floor
   0), also P_t − m_t ≥ d · (P_t − f) (d = ``reward_drop``, default 0.5: half of the way down to the
   floor). Both conditions compare differences of rewards (and a floor given in the reward's units), so
   the verdict does not depend on where zero is: r + c (with f + c) is judged as r is.
2. the held-out accuracy a_e at each evaluation (the first ``avg@k`` of ``eval.jsonl``, first
   benchmark, the training-time settings), where it is measured at two steps or more. Its standard
   error is bounded by SE(a) = √(a(1 − a)/N) over N problems (a mean of per-problem scores in [0, 1]),
   its floor is 0. An evaluation has fallen when P_e − a_e > z·√(SE(P_e)² + SE(a_e)²) and
   P_e − a_e ≥ d·P_e, P_e the best accuracy of the evaluations up to it.

A series says **collapsed** when its last full window (last evaluation) has fallen; the **onset** is
the first step of the unbroken stretch of fallen windows (evaluations) that ends there. Held-out accuracy
decides where it is measured (the reward is on-policy and noisier); the reward decides otherwise; the
collapse step is the earliest onset among the series that say collapsed. Without any reward or
evaluation there is no verdict (``collapsed`` None), never a flag.

**The geometry is the mechanism, reported beside the verdict.** At the onset (the first recorded or
monitored step at or after it) and at the end: the medians over modules of the rank-normalised
concentration C = (E_1 − 1/r)/(1 − 1/r) for an update of rank r (:func:`rank_normalised_concentration`,
the registry's ``E_1_norm``: 0 when the energy is spread evenly over the r directions the update can
use, 1 when one holds it all, undefined for r = 1), of the effective rank and of the relative size
‖ΔW‖_F/‖W0‖_F; and a named **signature** (:func:`signature`):

- ``concentrated`` (the study's): median C ≥ ``concentrated`` (default 0.5) at the onset or the end,
  for updates of rank r ≥ ``min_rank`` (default 4; with fewer directions, "a few of them" is all of
  them: a rank-1 or rank-2 LoRA is never called concentrated for its construction);
- ``large`` (as on the organism): the median relative size at the onset or the end is at least
  ``large_factor`` (default 3) times that of the healthy runs it is compared with (a sweep's cells or a
  comparison's runs that did not collapse, at their last step), or, with no healthy run at hand (one run
  alone), at least ``large_size`` (default 0.1: a tenth of ‖W0‖);
- ``neither``.

**Early warning (optional).** The former rule's concentration test stays available, off by default:
with ``e1_min`` set, a step whose median E_1 ≥ ``e1_min`` (and, with ``erank_max``, median effective rank
≤ ``erank_max``) is marked ``warning`` — before or without any fall. It never sets ``collapsed``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from spectra.codecs import MATRIX_KINDS

#: The per-step medians the rule reads, and the registry column each is the median of.
INPUTS = {
    "e1_median": "E_1",
    "erank_median": "erank",
    "e1_norm_median": "E_1_norm",
    "size_median": "relative_size",
    "rank_median": "update_rank",
}
SIGNATURES = ("concentrated", "large", "neither")


#: Singular values below this share of σ₁ are rounding, not a direction of the update (float64 arithmetic
#: on the stored factors leaves ~1e-16; a real direction of a trained update is far above 1e-10).
RANK_RTOL = 1e-10


def numerical_rank(s: Tensor) -> Tensor:
    """r = #{i : σ_i > 1e-10 · σ₁} (:data:`RANK_RTOL`), per row of singular values: the rank of ΔW (a
    rank-r LoRA: r, PiSSA/MiLoRA: up to 2r, a dense update: min(m, n) in general); 0 for a zero update."""
    return (s > RANK_RTOL * s[..., :1]).sum(dim=-1).to(s.dtype)


def rank_normalised_concentration(s: Tensor) -> Tensor:
    """C = (E_1 − 1/r)/(1 − 1/r) with E_1 = σ₁²/Σσ_i² and r = :func:`numerical_rank` (the rank of ΔW).
    E_1 ≥ 1/r for any rank-r update, so C removes what the rank alone implies: 0 for energy spread
    evenly over the r directions, 1 for one direction holding all of it. NaN for r ≤ 1 (a rank-1 update
    is one direction by construction: nothing to measure)."""
    r = numerical_rank(s)
    energy = s.square()
    e1 = energy[..., 0] / energy.sum(dim=-1).clamp_min(torch.finfo(s.dtype).tiny)
    c = ((e1 - 1.0 / r.clamp_min(2)) / (1.0 - 1.0 / r.clamp_min(2))).clamp(0.0, 1.0)
    return torch.where(r >= 2, c, torch.full_like(c, math.nan))


@dataclass(frozen=True)
class CollapseRule:
    """The constants of the collapse verdict, its signature and the early warning (module docstring)."""

    reward_window: int = 5
    z: float = 3.0
    reward_drop: float = 0.5
    reward_floor: float | None = None
    concentrated: float = 0.5
    min_rank: int = 4
    large_factor: float = 3.0
    large_size: float = 0.1
    e1_min: float | None = None
    erank_max: float | None = None

    def __post_init__(self) -> None:
        checks = (
            (self.reward_window >= 1, "reward_window", "≥ 1"),
            (self.z > 0, "z", "> 0"),
            (0 < self.reward_drop < 1, "reward_drop", "in (0, 1)"),
            (0 < self.concentrated <= 1, "concentrated", "in (0, 1]"),
            (self.min_rank >= 2, "min_rank", "≥ 2"),
            (self.large_factor > 1, "large_factor", "> 1"),
            (self.large_size > 0, "large_size", "> 0"),
            (self.e1_min is None or 0 < self.e1_min <= 1, "e1_min", "in (0, 1] or unset"),
            (self.erank_max is None or self.erank_max >= 1, "erank_max", "≥ 1 or unset"),
        )
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"CollapseRule.{name} must be {want}, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CollapseRule:
        """The rule of a run's ``--collapse-*`` options (in run.json or a TrainConfig's dict:
        ``collapse_window``, ``collapse_z``, ``collapse_reward_drop``, ``collapse_reward_floor``,
        ``collapse_e1``, ``collapse_erank``); the defaults for those it does not record. One rule per run,
        whoever applies it: the live alarm, ``spectra analyze`` and ``spectra sweep`` judge alike."""
        keys = {"reward_window": "collapse_window", "z": "collapse_z", "reward_drop": "collapse_reward_drop",
                "reward_floor": "collapse_reward_floor", "e1_min": "collapse_e1",
                "erank_max": "collapse_erank"}  # fmt: skip
        optional = ("reward_floor", "e1_min", "erank_max")
        given = {f: config[k] for f, k in keys.items() if k in config}
        return cls(**{f: v for f, v in given.items() if v is not None or f in optional})


def step_medians(analysis: pd.DataFrame) -> pd.DataFrame:
    """Per checkpoint, the medians over analysed matrix modules of the rule's inputs (:data:`INPUTS`:
    ``e1_median``, ``erank_median``, ``e1_norm_median``, ``size_median``, ``rank_median``; those whose
    column the table has), from the engine's step × module table."""
    ok = analysis[(analysis["status"] == "ok") & analysis["kind"].isin(MATRIX_KINDS)]
    present = {out: (col, "median") for out, col in INPUTS.items() if col in ok.columns}
    return ok.groupby("step").agg(**present).reset_index()


# ------------------------------------------------------------------------------------ the performance


def reward_falls(rewards: pd.DataFrame | None, rule: CollapseRule) -> pd.DataFrame:
    """Per logged step (``step``, ``reward``): the full-window mean ``mean`` (NaN before the first full
    window), the running ``peak``, the standard error ``se`` of their difference and whether the window
    has ``fell`` (module docstring, 1)."""
    cols = ["step", "reward", "mean", "peak", "se", "fell"]
    if rewards is None or not len(rewards):
        return pd.DataFrame(columns=cols)
    r = rewards[["step", "reward"]].copy()
    r["reward"] = pd.to_numeric(r["reward"], errors="coerce")
    r = r.dropna().sort_values("step", kind="stable").reset_index(drop=True)
    x = r["reward"].to_numpy(dtype=float)
    w = rule.reward_window
    mean = pd.Series(x).rolling(w, min_periods=w).mean().to_numpy()
    peak = pd.Series(mean).cummax().to_numpy()  # NaN until the first full window
    diffs = np.concatenate([[0.0], np.diff(x) ** 2])
    t = np.arange(1, len(x) + 1)
    noise = np.sqrt(np.cumsum(diffs) / np.maximum(2 * (t - 1), 1))
    se = noise * math.sqrt(2 / w)
    fall = peak - mean
    fell = np.isfinite(fall) & (fall > rule.z * se)
    if rule.reward_floor is not None:
        fell &= fall >= rule.reward_drop * (peak - rule.reward_floor)
    return r.assign(mean=mean, peak=peak, se=se, fell=fell)[cols]


def heldout_series(evals: pd.DataFrame | None) -> pd.DataFrame:
    """The held-out accuracy the verdict reads (``step``, ``score``, ``problems``, ``name``): the first
    ``avg@k`` column of ``eval.jsonl``, for its first benchmark, at the settings of its first row
    (evaluations at other settings, added by ``spectra eval``, are left out); the last row of a step
    evaluated twice. Empty without one."""
    cols = ["step", "score", "problems", "name"]
    if evals is None or not len(evals) or "step" not in evals.columns:
        return pd.DataFrame(columns=cols)
    scores = [c for c in evals.columns if str(c).startswith("avg@") and evals[c].notna().any()]
    if not scores:
        return pd.DataFrame(columns=cols)
    e = evals[evals[scores[0]].notna()]
    if "benchmark" in e.columns:
        e = e[e["benchmark"] == e["benchmark"].iloc[0]]
    for setting in ("n", "temperature", "top_p", "max_tokens"):
        if setting in e.columns:
            first = e[setting].iloc[0]
            e = e[(e[setting] == first) | (e[setting].isna() & pd.isna(first))]
    e = e.drop_duplicates("step", keep="last").sort_values("step")
    bench = str(e["benchmark"].iloc[0]) + " " if "benchmark" in e.columns else ""
    problems = e["problems"] if "problems" in e.columns else pd.Series(np.nan, index=e.index)
    return pd.DataFrame({"step": e["step"].astype(int).to_numpy(), "score": e[scores[0]].to_numpy(float),
                         "problems": problems.to_numpy(float), "name": bench + scores[0]})  # fmt: skip


def heldout_falls(evals: pd.DataFrame | None, rule: CollapseRule) -> pd.DataFrame:
    """Per evaluation of :func:`heldout_series`: the best accuracy so far ``peak``, the standard error
    ``se`` of their difference (√(a(1 − a)/N) each; N unknown: no noise allowance) and whether it
    ``fell`` (module docstring, 2)."""
    h = heldout_series(evals)
    if not len(h):
        return h.assign(peak=[], se=[], fell=[])
    a = h["score"].to_numpy(float)
    n = h["problems"].to_numpy(float)
    peak_idx = [int(np.argmax(a[: i + 1])) for i in range(len(a))]
    peak = a[peak_idx]

    def var(p: np.ndarray, count: np.ndarray) -> np.ndarray:
        v = p * (1 - p) / count
        return np.where(np.isfinite(v), v, 0.0)

    se = np.sqrt(var(peak, n[peak_idx]) + var(a, n))
    fall = peak - a
    fell = (fall > rule.z * se) & (fall >= rule.reward_drop * peak) & (fall > 0)
    return h.assign(peak=peak, se=se, fell=fell)


def _onset(steps: np.ndarray, fell: np.ndarray) -> int | None:
    """The first step of the unbroken stretch of fallen entries that ends at the last entry; None when
    the last has not fallen (recovered, or never fell)."""
    if not len(fell) or not fell[-1]:
        return None
    i = len(fell) - 1
    while i > 0 and fell[i - 1]:
        i -= 1
    return int(steps[i])


@dataclass(frozen=True)
class Verdict:
    """The performance verdict of a run (module docstring): ``collapsed`` (None: no performance data),
    the onset ``step``, the series that decided (``by``: "held-out", "reward" or both) and why."""

    collapsed: bool | None
    step: int | None
    by: str
    reason: str


def performance_verdict(
    rewards: pd.DataFrame | None, evals: pd.DataFrame | None, rule: CollapseRule
) -> Verdict:
    """Whether the run collapsed, and from which step, from its reward and held-out accuracy."""
    rf = reward_falls(rewards, rule)
    hf = heldout_falls(evals, rule)
    full = rf[rf["mean"].notna()] if len(rf) else rf
    parts, onsets, said = [], {}, {}
    if len(full):
        onset = _onset(full["step"].to_numpy(), full["fell"].to_numpy(bool))
        last = full.iloc[-1]
        said["reward"] = onset is not None
        if onset is not None:
            onsets["reward"] = onset
            parts.append(f"reward {last['mean']:.3g} (mean of the last {rule.reward_window} steps) fell "
                         f"from its peak {last['peak']:.3g} by more than {rule.z:g} standard errors "
                         f"({last['se']:.2g}) from step {onset}")  # fmt: skip
        else:
            parts.append(f"reward {last['mean']:.3g} not below its peak {last['peak']:.3g} by more than "
                         f"{rule.z:g} standard errors ({last['se']:.2g})")  # fmt: skip
    if len(hf) >= 2:
        onset = _onset(hf["step"].to_numpy(), hf["fell"].to_numpy(bool))
        last = hf.iloc[-1]
        said["held-out"] = onset is not None
        name = last["name"]
        if onset is not None:
            onsets["held-out"] = onset
            fell = f"held-out {name} {last['score']:.3g} fell from {last['peak']:.3g} from step {onset}"
            parts.insert(0, fell)
        else:
            parts.insert(0, f"held-out {name} {last['score']:.3g} did not fall from {last['peak']:.3g}")
    if not said:
        logged = 0 if rewards is None else len(rewards)
        why = (
            f"{logged} logged reward(s), fewer than one full window of {rule.reward_window}"
            if logged
            else "no reward logged"
        )
        return Verdict(None, None, "", f"{why} and no held-out accuracy at two steps: no verdict")
    decider = "held-out" if "held-out" in said else "reward"
    collapsed = said[decider]
    if not collapsed:
        return Verdict(False, None, decider, "; ".join(parts))
    by = [k for k in ("held-out", "reward") if k in onsets]
    return Verdict(True, min(onsets[k] for k in by), ", ".join(by), "; ".join(parts))


# ------------------------------------------------------------------------------------- the geometry


def geometry_at(per_step: pd.DataFrame, step: int | None) -> dict[str, Any] | None:
    """The rule's medians (:data:`INPUTS`) at the first row of ``per_step`` at or after ``step`` (None:
    its last row); None when there is none."""
    if step is None:
        rows = per_step.sort_values("step").tail(1)
    else:
        rows = per_step[per_step["step"] >= step].sort_values("step").head(1)
    if not len(rows):
        return None
    row = rows.iloc[0]
    out: dict[str, Any] = {"step": int(row["step"])}
    for col in INPUTS:
        v = row.get(col)
        out[col] = float(v) if v is not None and pd.notna(v) else None
    return out


def signature(
    onset: dict[str, Any] | None,
    end: dict[str, Any] | None,
    rule: CollapseRule,
    healthy_size: float | None = None,
) -> tuple[str, str]:
    """The named geometry of a collapse (module docstring) from the medians at its onset and at the end
    (:func:`geometry_at`), and why: ``("concentrated" | "large" | "neither", reason)``.
    ``healthy_size``: the median relative size of the healthy runs compared with (None: none at hand,
    the fixed ``large_size`` is the reference)."""
    points = [g for g in (onset, end) if g]
    for g in points:
        c, r = g.get("e1_norm_median"), g.get("rank_median")
        if c is not None and c >= rule.concentrated and (r is None or r >= rule.min_rank):
            return "concentrated", (f"rank-normalised E_1 {c:.2f} ≥ {rule.concentrated:g} at step {g['step']}"
                                    + (f" (rank {r:g})" if r is not None else ""))  # fmt: skip
    if healthy_size is not None and healthy_size > 0:
        limit = rule.large_factor * healthy_size
        against = f"{rule.large_factor:g} × the healthy runs' {healthy_size:.3g}"
    else:
        limit, against = rule.large_size, f"{rule.large_size:g} (no healthy run to compare with)"
    for g in points:
        size = g.get("size_median")
        if size is not None and size >= limit:
            return "large", f"relative size {size:.3g} ≥ {against} at step {g['step']}"
    if not points:
        return "neither", "no geometry recorded"
    return "neither", "neither concentrated nor large"


def judge(
    per_step: pd.DataFrame,
    rewards: pd.DataFrame | None,
    rule: CollapseRule | None = None,
    evals: pd.DataFrame | None = None,
    healthy_size: float | None = None,
) -> dict[str, Any]:
    """A run's collapse record: ``collapsed`` (None: no verdict), ``step`` (onset), ``by``, ``reason``,
    the geometry at the ``onset`` and at the ``end`` (:func:`geometry_at`), and its ``signature`` with
    ``signature_reason`` (only when collapsed)."""
    rule = rule or CollapseRule()
    v = performance_verdict(rewards, evals, rule)
    end = geometry_at(per_step, None) if len(per_step) else None
    onset = geometry_at(per_step, v.step) if v.collapsed and len(per_step) else None
    record: dict[str, Any] = {"collapsed": v.collapsed, "step": v.step, "by": v.by, "reason": v.reason,
                              "onset": onset, "end": end, "signature": None, "signature_reason": None}
    if v.collapsed:
        record["signature"], record["signature_reason"] = signature(onset, end, rule, healthy_size)
    return record


def detect_collapse(
    per_step: pd.DataFrame,
    rewards: pd.DataFrame | None = None,
    rule: CollapseRule | None = None,
    evals: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per checkpoint of ``per_step`` (a ``step`` column and the medians of :data:`INPUTS` it has):
    ``collapsed`` (the run collapsed and this step is at or after its onset), ``reward_smoothed`` (the
    full-window mean at the step, NaN before the first), ``reward_peak``, ``reason`` (the verdict's, on
    flagged steps) and ``warning`` (the early-warning concentration test, where ``e1_min`` is set).
    ``rewards``: ``step`` and ``reward`` per logged step, or None; ``evals``: eval.jsonl's rows, or None."""
    rule = rule or CollapseRule()
    if "step" not in per_step.columns:
        raise ValueError("detect_collapse: per-step table lacks column 'step'")
    need = (("e1_median",) if rule.e1_min is not None else ()) + (
        ("erank_median",) if rule.erank_max is not None else ())
    for col in need:
        if col not in per_step.columns:
            raise ValueError(f"detect_collapse: per-step table lacks column {col!r}")
    v = performance_verdict(rewards, evals, rule)
    rf = reward_falls(rewards, rule)
    rows = []
    for _, row in per_step.sort_values("step").iterrows():
        step = int(row["step"])
        seen = rf[rf["step"] <= step] if len(rf) else rf
        now = float(seen["mean"].iloc[-1]) if len(seen) else math.nan
        peak = float(seen["peak"].iloc[-1]) if len(seen) else math.nan
        collapsed = bool(v.collapsed and v.step is not None and step >= v.step)
        rows.append({"step": step, "collapsed": collapsed, "reward_smoothed": now, "reward_peak": peak,
                     "reason": v.reason if collapsed else "",
                     "warning": early_warning(row, rule)})  # fmt: skip
    return pd.DataFrame(rows, columns=["step", "collapsed", "reward_smoothed", "reward_peak", "reason",
                                       "warning"])  # fmt: skip


def early_warning(medians: Mapping[str, Any], rule: CollapseRule) -> bool:
    """The former concentration test, kept as an early warning: median E_1 ≥ ``e1_min`` and (with
    ``erank_max``) median effective rank ≤ ``erank_max``. False when ``e1_min`` is unset."""
    if rule.e1_min is None:
        return False
    e1 = medians.get("e1_median")
    if e1 is None or not np.isfinite(e1) or e1 < rule.e1_min:
        return False
    if rule.erank_max is not None:
        erank = medians.get("erank_median")
        return erank is not None and bool(np.isfinite(erank)) and erank <= rule.erank_max
    return True
