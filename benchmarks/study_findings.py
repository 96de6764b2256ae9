"""The findings of the organism studies of 2026-12-07 (issue 23 §4–5), read off the sweeps' tables with
the verdict spectra uses everywhere: Welch's t-interval of a difference of seed means, at 95 % over each
family of comparisons together (Bonferroni), "cannot tell" when the interval holds 0.

    spectra sweep --method lora,pissa,milora --dropout 0,0.05 --seed 0,1,2 --max-steps 30 \\
        --eval-every 30 --out runs/w6-pissa
    spectra sweep --method lora --lr 3e-4,3e-3 --seed 0,1,2 --max-steps 30 --eval-every 30 \\
        --also "method=pissa lr=3e-5,3e-4" --out runs/w6-lr
    spectra sweep --method lora --rank 16,128 --alpha 32,256 --zip rank,alpha --batch-size 4,32 \\
        --seed 0,1,2 --max-steps 20 --eval-every 20 --delta-every 2 \\
        --also "method=lora rank=128 alpha=256 lr=1.25e-4 batch-size=4,32" \\
        --also "method=rslora rank=128 alpha=8 lr=1e-3 batch-size=4,32" --out runs/w6-cliff
    python benchmarks/study_findings.py runs/w6-pissa runs/w6-lr runs/w6-cliff

Each cell's configuration is read from its sweep.csv row; a missing sweep is reported and skipped.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from spectra.stats import difference_ci, t_interval

ACC = "organism avg@4"
REWARD = "reward (last 5 steps)"


def _select(table: pd.DataFrame, **where: object) -> pd.Series:
    rows = table
    for key, value in where.items():
        rows = rows[rows[key].astype(str) == str(value)]
    return rows


def _fmt(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def family(title: str, table: pd.DataFrame, metric: str, pairs: list[tuple[str, dict, dict]]) -> None:
    """Print each named difference with its Welch interval at 95 % over the family (Bonferroni)."""
    confidence = 1 - 0.05 / max(len(pairs), 1)
    print(f"\n{title} — {metric}, Welch {confidence:.1%} per comparison (95 % over {len(pairs)})")
    for label, a, b in pairs:
        x, y = _select(table, **a)[metric].to_numpy(float), _select(table, **b)[metric].to_numpy(float)
        if len(x) == 0 or len(y) == 0:
            print(f"  {label}: no cells")
            continue
        ci = difference_ci(x, y, confidence)
        ma, mb = t_interval(x), t_interval(y)
        verdict = (
            "cannot tell (fewer than 2 seeds)"
            if ci.low is None
            else "cannot tell (interval holds 0)"
            if ci.low <= 0 <= ci.high
            else "differs"
        )
        print(
            f"  {label}: {ma.mean:.3f} (n={len(x)}) vs {mb.mean:.3f} (n={len(y)}); "
            f"difference {_fmt(ci.mean)} [{_fmt(ci.low)}, {_fmt(ci.high)}] → {verdict}"
        )


def means(title: str, table: pd.DataFrame, by: list[str], metrics: list[str]) -> None:
    """Seed means with their Student-t 95 % interval, per configuration."""
    print(f"\n{title}")
    for key, rows in table.groupby(by, sort=True):
        parts = []
        for m in metrics:
            ci = t_interval(rows[m].to_numpy(float))
            band = "" if ci.low is None else f" [{ci.low:.3f}, {ci.high:.3f}]"
            parts.append(f"{m} {ci.mean:.3f}{band}")
        collapsed = (rows["collapsed"].astype(str) == "yes").sum() if "collapsed" in rows else 0
        print(
            f"  {dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))} n={len(rows)}: "
            + "; ".join(parts)
            + f"; collapsed {collapsed}/{len(rows)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweeps", nargs="+", type=Path)
    args = parser.parse_args()
    tables = {}
    for folder in args.sweeps:
        csv = folder / "sweep.csv"
        if csv.is_file():
            tables[folder.name] = pd.read_csv(csv)
        else:
            print(f"{csv}: missing (skipped)")
    if "w6-pissa" in tables:
        t = tables["w6-pissa"]
        means("PiSSA, MiLoRA and LoRA at dropout 0 and 0.05 (30 steps)", t, ["method", "dropout"],
              [ACC, "rho_8", "relative_size"])  # fmt: skip

        def at(method: str, dropout: float) -> dict:
            return {"method": method, "dropout": dropout}

        family("Does PiSSA lag, and does dropout explain it?", t, ACC, [
            ("pissa − lora, dropout 0.05 (the study)", at("pissa", 0.05), at("lora", 0.05)),
            ("pissa − lora, dropout 0 (PiSSA's paper)", at("pissa", 0.0), at("lora", 0.0)),
            ("pissa: dropout 0 − 0.05", at("pissa", 0.0), at("pissa", 0.05)),
            ("milora: dropout 0 − 0.05", at("milora", 0.0), at("milora", 0.05)),
            ("lora: dropout 0 − 0.05", at("lora", 0.0), at("lora", 0.05)),
        ])  # fmt: skip
        family("Is PiSSA's update principal?", t, "rho_8", [
            ("pissa − lora, dropout 0.05", at("pissa", 0.05), at("lora", 0.05)),
            ("pissa − lora, dropout 0", at("pissa", 0.0), at("lora", 0.0)),
            ("milora − lora, dropout 0.05", at("milora", 0.05), at("lora", 0.05)),
        ])  # fmt: skip
    if "w6-lr" in tables:
        t = tables["w6-lr"].copy()
        if "w6-pissa" in tables:  # the middle learning rates are the dropout sweep's 0.05 cells
            mid = tables["w6-pissa"]
            mid = mid[(mid["dropout"].astype(float) == 0.05) & mid["method"].isin(["lora", "pissa"])].copy()
            mid["lr"] = mid["method"].map({"lora": 1e-3, "pissa": 1e-4})
            t = pd.concat([t, mid], ignore_index=True)
        t["lr"] = t["lr"].astype(float)
        means("Learning-rate grids (dropout 0.05, 30 steps)", t, ["method", "lr"], [ACC, REWARD])
        best = {m: rows.groupby("lr")[ACC].mean().idxmax() for m, rows in t.groupby("method")}
        pissa, lora = {"method": "pissa", "lr": best.get("pissa")}, {"method": "lora", "lr": best.get("lora")}
        label = f"pissa@{pissa['lr']} − lora@{lora['lr']}"
        family("PiSSA against LoRA, each at its best rate", t, ACC, [(label, pissa, lora)])
    if "w6-cliff" in tables:
        t = tables["w6-cliff"].copy()
        t["lr"] = t["lr"].astype(object).where(t["lr"].notna(), "default") if "lr" in t else "default"
        means("The rank cliff (20 steps)", t, ["method", "rank", "lr", "batch_size"],
              [REWARD, ACC, "relative_size", "E_1"])  # fmt: skip
        pairs = []
        for b in sorted(t["batch_size"].unique()):

            def cell(method: str, rank: int, lr: object = "default", b: int = b) -> dict:
                return {"method": method, "rank": rank, "lr": lr, "batch_size": b}

            pairs += [
                (f"b{b}: lora r128 − r16", cell("lora", 128), cell("lora", 16)),
                (f"b{b}: lr ∝ 1/r − lr 1e-3 at r128", cell("lora", 128, 0.000125), cell("lora", 128)),
                (f"b{b}: rsLoRA α8 − LoRA α256 at r128", cell("rslora", 128, 0.001), cell("lora", 128)),
            ]
        family("What removes the cliff", t, ACC, pairs)

if __name__ == "__main__":
    main()
