"""`spectra demo`: several methods trained on the organism, analysed and compared, end to end."""

from __future__ import annotations

import pandas as pd
from _requires import require
from spectra.cli.main import app
from typer.testing import CliRunner

require("trl")
runner = CliRunner()


def test_demo_trains_analyses_compares_and_reuses(organism_dir, tmp_path):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--model",
        str(organism_dir),
        "--methods",
        "lora,full",
        "--max-steps",
        "2",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    for method in ("lora", "full"):
        assert (out / method / "train_summary.json").exists()
        table = pd.read_csv(out / method / "analysis" / "metrics.csv")
        assert set(table["step"]) == {0, 2} and (table["status"] == "ok").all()
        assert (out / method / "analysis" / "report.html").exists()
    compare = pd.read_csv(out / "comparison" / "compare.csv")
    assert list(compare["run"]) == ["lora", "full"] and (compare["last step"] == 2).all()
    assert (out / "comparison" / "report.html").exists() and "comparison" in r.output
    # a second demo reuses the finished runs and their analyses
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("already trained") == 2 and again.output.count("reused 2 from") == 2
    # … but not when asked for something else
    other = runner.invoke(app, [*args[:-1], "3"])
    assert other.exit_code == 1 and "max_steps 2" in other.output


def test_demo_refuses_an_unknown_method(tmp_path):
    r = runner.invoke(app, ["demo", "--out", str(tmp_path), "--methods", "lora,nope"])
    assert r.exit_code == 1 and "nope" in r.output and "dora" in r.output


def test_the_demo_reads_the_first_studys_findings_off_its_table():
    """One standard for every claim: at one seed the numbers are readings and the accuracy is left to the
    seeds (with the command that runs them); with seeds a difference is stated only when Welch's interval
    (Bonferroni over the pairs read) excludes 0."""
    from spectra.probes.sweep_report import demo_reading

    table = pd.DataFrame({
        "run": ["lora", "dora", "pissa"], "method": ["lora", "dora", "pissa"],
        "reward (last 5 steps)": [0.9, 0.8, 0.6], "organism avg@4": [0.83, 0.9, 0.62],
        "rho_8": [0.016, 0.019, 0.166],
    })  # fmt: skip
    pissa, dora = demo_reading(table)
    assert "rho_8 0.166 vs 0.016 (one seed each)" in pissa and "avg@4 0.62 vs 0.83 (one seed each)" in pissa
    for sentence in (pissa, dora):
        assert "One seed cannot tell the accuracy apart" in sentence and "--seed 0,1,2" in sentence
        assert "mechanism shows" not in sentence and "lags" not in sentence.split("):", 1)[1]
    assert "spectra sweep --method lora,pissa" in pissa and "spectra sweep --method lora,dora" in dora
    assert demo_reading(table[table["method"] != "lora"]) == []  # no LoRA: nothing to compare with
    # three seeds each: ρ separates beyond the noise, the accuracy does not (the README's numbers)
    seeds = pd.DataFrame({
        "method": ["lora"] * 3 + ["pissa"] * 3,
        "organism avg@4": [0.828, 0.711, 0.887, 0.60, 0.70, 0.63],
        "rho_8": [0.016, 0.017, 0.015, 0.16, 0.17, 0.166],
    })  # fmt: skip
    (reading,) = demo_reading(seeds)
    assert "rho_8 0.165 vs 0.016: pissa above lora (3 vs 3 seeds, Welch 95.0% interval" in reading
    assert "avg@4 0.643 vs 0.809: within the seed noise, cannot tell apart" in reading
    assert "One seed" not in reading
    seeds.loc[seeds["method"] == "pissa", "organism avg@4"] = [0.30, 0.31, 0.29]
    assert "pissa below lora" in demo_reading(seeds)[0]
