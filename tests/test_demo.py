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
