"""Training outcomes of runs, joined to the maturity of their base models (``probe maturity --runs``).

A run directory holds ``run.json`` (its base model is ``model``, loaded from ``model_path``); a sweep
folder holds run directories. For each run: its method, rank, and accuracy: the held-out ``avg@n`` of
``eval.jsonl`` at the last evaluated step (mean over the benchmarks evaluated there), else the mean
training reward of the last :data:`REWARD_TAIL` logged steps of ``metrics.jsonl`` (a model's runs are
compared on held-out scores alone when any of them has one: like with like); and whether it collapsed,
as sweep.csv counts it: its analysis flags a step, or the live alarm fired (:func:`run_collapsed`).
(With several benchmarks evaluated, the accuracy here is their mean, where sweep.csv and ``spectra
compare`` rank by the first benchmark's avg@n.)

Per base model: the best accuracy of a low-rank LoRA configuration (:data:`LOW_RANK`) and of a
structured adapter (:data:`STRUCTURED`) — runs that differ only by seed are one configuration, scored by
the mean over its seeds (:func:`spectra.stats.configuration_key`); a best of several means is a maximum,
biased upward, so these two describe and are not subtracted —, and the collapse rank threshold: the
smallest LoRA rank whose run was flagged.

Structured against LoRA is a set of fixed, named pairs (:func:`pairs`): each structured method against
plain LoRA in the same setting (every configuration key but the method equal, e.g. "dora r=32 − lora
r=32"), its seeds against LoRA's, with Welch's interval of the difference of the means
(:func:`spectra.stats.difference_ci`, 95 %) and a verdict at the Bonferroni level over all the pairs of
the join (a difference is called only when that interval excludes 0; one seed on either side: no
interval, no verdict). Each outcome (the pairs' differences included) is correlated across models with
each maturity statistic (Pearson r and Spearman ρ; undefined below :data:`MIN_MODELS` models).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from spectra.errors import first_line
from spectra.stats import CONFIDENCE, NOT_CONFIGURATION, configuration_key, difference_ci
from spectra.store import read_jsonl
from spectra.tables import alarm_collapse

LOW_RANK = ("lora", "rslora", "loraplus", "lorafa", "pissa", "milora")  # a low-rank B·A update
STRUCTURED = ("dora", "quanta", "miss")  # structured adapters that are not a low-rank B·A
REWARD_TAIL = 5
MIN_MODELS = 3
PAIR_BASELINE = "lora"  # each structured method is compared with plain LoRA in the same setting
OUTCOMES = {
    "best_lora": "best low-rank LoRA accuracy (a maximum over configurations)",
    "best_structured": "best structured adapter (DoRA/QuanTA/MiSS) accuracy (a maximum over configurations)",
    "collapse_rank": "smallest LoRA rank flagged for collapse",
}


def run_dirs(path: Path) -> list[Path]:
    """``path`` itself when it is a run directory (has run.json), else its subfolders that are."""
    if (path / "run.json").is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if (p / "run.json").is_file())
    return []


def is_runs_folder(path: str | Path) -> bool:
    """Whether ``path`` is a run directory or a sweep folder (a folder of run directories)."""
    return bool(run_dirs(Path(path)))


def run_accuracy(run: Path) -> tuple[float | None, str]:
    """The run's final accuracy and where it comes from (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line is skipped; the rest is used
        evals = read_jsonl(run / "eval.jsonl")
    if {"step", "benchmark"} <= set(evals.columns):
        avg = [c for c in evals.columns if str(c).startswith("avg@")]
        if avg:
            evals = evals.assign(acc=evals[avg].bfill(axis=1).iloc[:, 0]).dropna(subset=["acc", "step"])
        if avg and len(evals):
            last = evals[evals["step"] == evals["step"].max()]
            last = last.groupby("benchmark").tail(1)  # the last row of each benchmark at that step
            benches = ", ".join(sorted(map(str, last["benchmark"])))
            return float(
                last["acc"].mean()
            ), f"held-out avg@n at step {int(last['step'].iloc[0])} ({benches})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logs = read_jsonl(run / "metrics.jsonl")
    if {"step", "reward"} <= set(logs.columns):
        r = logs[["step", "reward"]].dropna().sort_values("step")
        if len(r):
            tail = r.tail(REWARD_TAIL)
            return float(tail["reward"].mean()), f"training reward, mean of the last {len(tail)} logged steps"
    return None, "no eval.jsonl or metrics.jsonl rows"


def run_collapsed(run: Path) -> bool | None:
    """Whether the run collapsed: its analysis flags a step (``analysis/summary.json``) or the live alarm
    fired (``collapse_step`` in train_summary.json, or a ``{"event": "collapse"}`` row of metrics.jsonl),
    as sweep.csv's ``collapsed`` column counts it. False when one of them looked and found none; None when
    neither did (not analysed, no live geometry)."""
    analysis = _json_object(run / "analysis" / "summary.json")
    trained = _json_object(run / "train_summary.json") or {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logs = read_jsonl(run / "metrics.jsonl")
    looked = []
    if analysis is not None:  # the performance verdict (summary.json's "collapse"; older analyses: flags)
        record = analysis.get("collapse")
        if isinstance(record, dict):
            if record.get("collapsed") is not None:
                looked.append(bool(record["collapsed"]))
        else:
            looked.append(bool(analysis.get("collapsed_steps")))
    alarm = alarm_collapse(trained, logs)
    if alarm is not None or trained.get("monitored_steps"):  # the live alarm watched this run
        looked.append(alarm is not None)
    return any(looked) if looked else None


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def collect_runs(paths: Sequence[str | Path], problems: list[str]) -> pd.DataFrame:
    """One row per run found under ``paths``: run, model, model_path, method, family, rank, accuracy,
    accuracy_source, collapsed. A path with no run, or a run whose run.json is unreadable, is a line of
    ``problems``."""
    rows = []
    for p in paths:
        found = run_dirs(Path(p))
        if not found:
            problems.append(f"--runs {p}: neither a run directory (run.json) nor a folder of run directories")
        for run in found:
            try:
                cfg = json.loads((run / "run.json").read_text())
                model, method = str(cfg["model"]), str(cfg["method"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                problems.append(f"{run}/run.json: unreadable or without model/method ({first_line(e)})")
                continue
            acc, source = run_accuracy(run)
            family = "lora" if method in LOW_RANK else "structured" if method in STRUCTURED else "other"
            rows.append(
                {
                    "run": str(run),
                    "model": model,
                    "model_path": cfg.get("model_path"),
                    "method": method,
                    "family": family,
                    "rank": cfg.get("rank"),
                    "configuration": configuration_key(cfg) if "seed" in cfg else str(run),
                    "setting": configuration_key(cfg, (*NOT_CONFIGURATION, "method")),
                    "pair_label": _pair_label(method, cfg),
                    "accuracy": acc,
                    "accuracy_source": source,
                    "collapsed": run_collapsed(run),
                }
            )
    columns = ["run", "model", "model_path", "method", "family", "rank", "configuration", "setting",
               "pair_label", "accuracy", "accuracy_source"]  # fmt: skip
    return pd.DataFrame(rows, columns=[*columns, "collapsed"])


def _pair_label(method: str, cfg: dict[str, Any]) -> str:
    """How a run is named in a pair: ``dora r=32``; QuanTA by its tensor axes (its rank is unused)."""
    if method == "quanta":
        return f"quanta d={cfg.get('quanta_d', '?')}"
    return f"{method} r={cfg.get('rank')}"


def pairs(runs: pd.DataFrame, confidence: float = CONFIDENCE, tests: int = 1) -> list[dict[str, Any]]:
    """The fixed, named comparisons of one model's runs: each structured method against plain LoRA
    (:data:`PAIR_BASELINE`) in the same setting (equal configuration keys but the method, seed and run
    bookkeeping). Per pair: its name ("dora r=32 − lora r=32"), each side's seeds and mean, the
    difference of the means with Welch's ``confidence`` interval (low, high), and the verdict at the
    Bonferroni level 1 − (1 − confidence)/``tests``: "higher", "lower", "cannot tell" (the interval
    holds 0) or "one seed: no interval"."""
    held_out = runs["accuracy_source"].astype(str).str.startswith("held-out")
    scored = runs[held_out] if held_out.any() else runs
    scored = scored[scored["accuracy"].notna()]
    base = scored[scored["method"] == PAIR_BASELINE]
    out = []
    for (method, setting), g in scored[scored["family"] == "structured"].groupby(
        ["method", "setting"], sort=True
    ):
        b = base[base["setting"] == setting]
        if not len(b):
            continue
        a_acc, b_acc = g["accuracy"].to_numpy(float), b["accuracy"].to_numpy(float)
        ci = difference_ci(a_acc, b_acc, confidence)
        strict = difference_ci(a_acc, b_acc, 1 - (1 - confidence) / max(1, tests))
        zero = strict.contains(0.0)
        verdict = (
            "one seed: no interval" if zero is None else "cannot tell" if zero
            else "higher" if ci.mean > 0 else "lower"
        )  # fmt: skip
        out.append(
            {
                "pair": f"{g['pair_label'].iloc[0]} − {b['pair_label'].iloc[0]}",
                "method": method,
                "n": len(g),
                "mean": float(a_acc.mean()),
                "n_lora": len(b),
                "mean_lora": float(b_acc.mean()),
                "difference": ci.mean,
                "low": ci.low,
                "high": ci.high,
                "confidence": confidence,
                "verdict": verdict,
            }
        )
    return out


def _same_dir(a: Any, b: Path) -> bool:
    try:
        return a is not None and Path(str(a)).resolve() == b.resolve()
    except OSError:
        return False


def model_outcomes(runs: pd.DataFrame, tests: int = 1) -> dict[str, Any]:
    """The outcomes of one model's runs (see the module docstring); None where no run says. ``pairs``:
    :func:`pairs` (``tests``: how many pairs the join compares in all, for the Bonferroni level); each
    pair's difference is also an outcome of its own, under the pair's name."""

    held_out = runs["accuracy_source"].astype(str).str.startswith("held-out")
    scored = runs[held_out] if held_out.any() else runs  # like with like: held-out scores where any has one

    def best(family: str) -> tuple[float | None, str | None]:
        g = scored[(scored["family"] == family) & scored["accuracy"].notna()]
        if not len(g):
            return None, None
        means = g.groupby("configuration", sort=False)["accuracy"].agg(["mean", "size"])  # over seeds
        key = means["mean"].idxmax()
        top = g[g["configuration"] == key].iloc[0]
        rank = "" if top["method"] == "quanta" else f" r={top['rank']}"  # QuanTA's size is --quanta-d
        seeds = int(means.at[key, "size"])
        where = f"mean of {seeds} seeds, e.g. {top['run']}" if seeds > 1 else str(top["run"])
        return float(means.at[key, "mean"]), f"{top['method']}{rank} ({where})"

    lora, lora_run = best("lora")
    structured, structured_run = best("structured")
    flagged = runs[(runs["family"] == "lora") & (runs["collapsed"] == True)]  # noqa: E712 (None: not analysed)
    ranks = pd.to_numeric(flagged["rank"], errors="coerce").dropna()
    compared = pairs(runs, tests=tests)
    return {
        "runs": len(runs),
        "best_lora": lora,
        "best_lora_run": lora_run,
        "best_structured": structured,
        "best_structured_run": structured_run,
        "collapse_rank": int(ranks.min()) if len(ranks) else None,
        "lora_runs_analysed": int(((runs["family"] == "lora") & runs["collapsed"].notna()).sum()),
        "pairs": compared,
        **{p["pair"]: p["difference"] for p in compared},
    }


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Pearson r and Spearman ρ of the pairs where both are defined, and n, the number of models they
    rest on; r and ρ are None below :data:`MIN_MODELS` pairs or when either side is constant."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if _num(a) and _num(b)]
    out: dict[str, Any] = {"n": len(pairs), "pearson": None, "spearman": None}
    if len(pairs) >= MIN_MODELS:
        s = pd.DataFrame(pairs, columns=["x", "y"])
        if s["x"].nunique() > 1 and s["y"].nunique() > 1:
            out["pearson"] = float(s["x"].corr(s["y"]))
            out["spearman"] = float(s["x"].rank().corr(s["y"].rank()))
    return out


def _num(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def join_outcomes(
    runs: pd.DataFrame, models: dict[str, dict[str, Any]], paths: Sequence[Path], stats: Sequence[str] = ()
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per probed model: its median maturity statistics and its runs' outcomes; and the
    correlations {statistic: {outcome: {n, pearson, spearman}}} across models. A run belongs to a model
    when its ``model_path`` is the model's directory or its ``model`` is the model's label."""
    from spectra.probes.maturity import KEY_STATS

    stats = tuple(stats) or KEY_STATS
    mine = {
        label: runs[
            [
                _same_dir(mp, path) or m == label
                for m, mp in zip(runs["model"], runs["model_path"], strict=True)
            ]
        ]
        for label, path in zip(models, paths, strict=True)
    }
    tests = sum(len(pairs(r)) for r in mine.values())  # every pair of the join: the Bonferroni count
    rows = []
    for label, summary in models.items():
        row = {"model": label, **{s: summary["median"].get(s) for s in (*stats, "alpha_stderr", "num_tail")}}
        rows.append(row | model_outcomes(mine[label], tests))
    table = pd.DataFrame(rows)
    names = [*OUTCOMES, *pair_names(table)]
    corr = {s: {o: correlation(list(table[s]), list(table[o])) for o in names} for s in stats}
    compared = [{"model": r["model"], **p} for r in rows for p in r["pairs"]]
    records = table.drop(columns=["pairs"]).to_dict("records")
    return table, {
        "models": records,
        "pairs": compared,
        "pair_tests": tests,
        "correlations": corr,
        "min_models": MIN_MODELS,
    }


def pair_names(table: pd.DataFrame) -> list[str]:
    """The named pairs compared on any model of a joined table, in order of first appearance."""
    names: list[str] = []
    for compared in table.get("pairs", pd.Series(dtype=object)):
        names += [p["pair"] for p in compared if p["pair"] not in names]
    return names
