"""`spectra demo`: several methods trained on the organism, analysed and compared, end to end."""

from __future__ import annotations

import pandas as pd
import pytest
from spectra.cli.main import app
from typer.testing import CliRunner

pytest.importorskip("trl")
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
    from spectra.probes.sweep_report import demo_reading

    table = pd.DataFrame({
        "run": ["lora", "dora", "pissa"], "method": ["lora", "dora", "pissa"],
        "reward (last 5 steps)": [0.9, 0.8, 0.6], "organism avg@4": [0.83, 0.9, 0.62],
        "rho_8": [0.016, 0.019, 0.166],
    })  # fmt: skip
    pissa, dora = demo_reading(table)
    assert "rho_8 0.166 vs 0.016" in pissa and "avg@4 0.62 vs 0.83" in pissa and "mechanism shows" in pissa
    assert "avg@4 0.9 vs 0.83" in dora and "seed" in dora
    table.loc[2, "organism avg@4"] = 0.95  # PiSSA ahead: the mechanism does not show, and we say why
    assert "does not show (not lagging)" in demo_reading(table)[0]
    table.loc[2, "rho_8"] = 0.01
    assert "(not more principal-aligned, not lagging)" in demo_reading(table)[0]
    assert demo_reading(table[table["method"] != "lora"]) == []  # no LoRA: nothing to compare with
