"""`spectra analyze` / `spectra compare`: analysis/ folder, caching, known answers through the whole
pipeline, collapse flags, plots, report.html, comparison table, bad input."""

from __future__ import annotations

import json
import os
import re

import pandas as pd
import pytest
import torch
from spectra.cli.main import app
from typer.testing import CliRunner

import spectra
from spectra.figspec import Marks
from spectra.figures import all_figures
from spectra.operators import Dense, LowRank
from spectra.pipeline import NothingToAnalyze, analyze_run, plotted_steps
from spectra.report import run_view, write_comparison, write_run_report
from spectra.synthetic import base_weights, write_synthetic_run
from spectra.writer import RunWriter

runner = CliRunner()


def _known_run(path, shapes, steps, inside: bool, rank1: bool = False, rewards=None, evals=None):
    """A run whose updates lie inside W0's top-8 singular subspace (ρ_8 = 1) or orthogonal to its top-8
    vectors on both sides (ρ_8 = 0); rank 1 (E_1 = 1) or rank 4 with equal singular values (erank 4)."""
    w = RunWriter(path)
    w.write_config({"name": path.name, "method": "full", "model": "synthetic"})
    w0 = base_weights(shapes)
    w.write_base_weights(w0)
    run = spectra.load_run(path)
    for step in steps:
        mods = {}
        for name in shapes:
            base = run.base_spectrum(name)
            U, V = (base.U, base.V) if inside else (base.U_minor, base.V_minor)
            r = 1 if rank1 else 4
            mods[name] = Dense(1e-2 * (step + 1) * U[:, :r].double() @ V[:, :r].double().T)
        w.write_delta(step, mods)
    for i, r in enumerate(rewards or []):
        w.append_metrics({"step": i + 1, "reward": r})
    for row in evals or []:
        w.append_metrics(row, "eval.jsonl")
    return path


def test_analysis_folder_rows_columns_and_summary(lora_run, small_shapes):
    a = analyze_run(lora_run)
    table = pd.read_csv(lora_run / "analysis" / "metrics.csv")
    assert len(table) == 3 * len(small_shapes)  # one row per step × module
    for col in ("step", "module", "layer", "proj", "kind", "m", "n", "status", "erank", "E_1", "rho_8"):
        assert col in table.columns
    assert set(table["step"]) == {0, 5, 10} and (table["status"] == "ok").all()
    summary = json.loads((lora_run / "analysis" / "summary.json").read_text())
    assert [e["step"] for e in summary["steps"]] == [0, 5, 10]
    last = summary["steps"][-1]
    erank = table[table["step"] == 10]["erank"]
    assert last["median"]["erank"] == pytest.approx(erank.median())
    assert last["mean"]["erank"] == pytest.approx(erank.mean())
    q = table[(table["step"] == 10) & (table["proj"] == "q_proj")]["E_1"].median()
    assert last["by_proj"]["q_proj"]["E_1"] == pytest.approx(q)
    assert summary["collapsed_steps"] == [] and summary["problems"] == []
    assert summary["run"]["name"] == "lora"
    assert a.new_steps == [0, 5, 10] and a.reused_steps == []


def test_rerun_reuses_cached_steps_and_analyses_only_new_ones(lora_run, small_shapes):
    first = analyze_run(lora_run)
    again = analyze_run(lora_run)
    assert again.new_steps == [] and again.reused_steps == [0, 5, 10]
    pd.testing.assert_frame_equal(first.table, again.table, check_dtype=False)
    # a new step appears: only it is analysed; the cached rows are kept as they were
    write_synthetic_run(lora_run, small_shapes, steps=(15,), rank=4, seed=3)
    grown = analyze_run(lora_run)
    assert grown.new_steps == [15] and grown.reused_steps == [0, 5, 10]
    assert sorted(set(grown.table["step"])) == [0, 5, 10, 15]
    old = grown.table[grown.table["step"] < 15].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, first.table, check_dtype=False)
    # a different engine option recomputes everything
    other = analyze_run(lora_run, spectra.EngineConfig(ks=(1, 4)))
    assert other.new_steps == [0, 5, 10, 15]


def test_another_version_or_base_recomputes_everything(lora_run, monkeypatch):
    analyze_run(lora_run)
    monkeypatch.setattr(spectra, "__version__", "0.0.0-older")
    assert analyze_run(lora_run).new_steps == [0, 5, 10]  # metrics of another version: recomputed
    assert analyze_run(lora_run).new_steps == []
    weights = lora_run / "base" / "weights.h5"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # base rewritten
    assert analyze_run(lora_run).new_steps == [0, 5, 10]


def test_progress_counts_the_base_spectra_then_every_module_step(lora_run, small_shapes):
    calls: list[tuple[int, int, str]] = []
    analyze_run(lora_run, progress=lambda *a: calls.append(a))
    base = [c for c in calls if c[2].startswith("base spectra")]
    steps = [c for c in calls if c[2].startswith("step")]
    assert [c[0] for c in base] == list(range(1, len(small_shapes) + 1)) and calls[: len(base)] == base
    assert steps[-1][:2] == (3 * len(small_shapes), 3 * len(small_shapes))
    calls.clear()
    analyze_run(lora_run, progress=lambda *a: calls.append(a), force=True)
    assert calls and not any(c[2].startswith("base") for c in calls)  # computed once per run


def test_steps_gone_after_a_resume_are_dropped(lora_run):
    analyze_run(lora_run)
    (lora_run / "deltas" / "step_000010.h5").unlink()
    a = analyze_run(lora_run)
    assert sorted(set(a.table["step"])) == [0, 5]


@pytest.mark.parametrize("inside", [True, False])
def test_known_alignment_and_rank_through_the_pipeline(tmp_path, small_shapes, inside):
    run = _known_run(tmp_path / "known", small_shapes, (5, 10), inside)
    steps = analyze_run(run).summary["steps"]
    for e in steps:
        assert e["median"]["rho_8"] == pytest.approx(1.0 if inside else 0.0, abs=1e-6)
        assert e["median"]["erank"] == pytest.approx(
            4.0, abs=1e-5
        )  # four equal singular values (float32 U, V)
        assert e["median"]["E_1"] == pytest.approx(0.25, abs=1e-6)


def test_collapse_is_flagged_and_marked_on_the_plots(tmp_path, small_shapes):
    # the reward falls from 0.8 to 0.1: collapse at the late steps (the performance verdict, issue 23);
    # its rank-1 updates (E_1 = 1 by construction) are not called concentrated
    rewards = [0.8] * 10 + [0.1] * 10
    run = _known_run(tmp_path / "collapse", small_shapes, (5, 20), inside=False, rank1=True, rewards=rewards)
    a = analyze_run(run)
    assert a.summary["collapsed_steps"] == [20]
    flagged = next(e for e in a.summary["steps"] if e["step"] == 20)
    assert "reward" in flagged["collapse_reason"] and "fell from its peak" in flagged["collapse_reason"]
    assert a.summary["collapse"]["collapsed"] and a.summary["collapse"]["signature"] != "concentrated"
    view = run_view(analyze_run(run))
    marks = [m for f in all_figures([view]) for p in f.panels for m in getattr(p, "marks", [])]
    assert marks and all(isinstance(m, Marks) and list(m.x) == [20] for m in marks)


def test_plots_and_report_are_written(tmp_path, small_shapes):
    evals = [
        {"step": s, "benchmark": "organism", "problems": 8, "n": 4, "avg@4": 0.2 + s / 100, "pass@1": 0.2,
         "pass@4": 0.5 + s / 100, "unparsable": 0.0}
        for s in (0, 5, 10)
    ]  # fmt: skip
    run = _known_run(
        tmp_path / "r", small_shapes, (0, 5, 10), inside=True, rewards=[0.1, 0.3, 0.5], evals=evals
    )
    files = write_run_report(analyze_run(run))
    names = {f.name for f in files}
    for stem in ("overview", "alignment", "rank", "spectrum", "angles", "heatmaps", "accuracy"):
        png = run / "analysis" / "plots" / f"{stem}.png"
        assert png.name in names and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (run / "analysis" / "report.html").read_text()
    bundle_end = page.index("</script>")  # plotly.js itself, inline (it mentions URLs it never loads)
    assert "<script src" not in page[:bundle_end] and len(page[:bundle_end]) > 1_000_000
    assert not re.search(r'(src|href)="(https?:)?//', page[bundle_end:])  # nothing fetched
    assert page.count('class="plotly-graph-div"') == 7
    assert "organism Avg@4" in page and "synthetic" in page  # accuracy legend, configuration header
    spectra_csv = pd.read_csv(run / "analysis" / "spectra.csv")
    # step 0 has ΔW = 1e-2 U V^T ≠ 0 here; plotted steps are spread over training, without step 0
    assert set(spectra_csv["step"]) == {5, 10}
    top = spectra_csv[(spectra_csv["step"] == 10) & (spectra_csv["i"] == 1)]["sigma"]
    assert top.to_numpy() == pytest.approx(0.11, rel=1e-6)  # σ of 1e-2·(10+1)·U₄V₄ᵀ


def test_spectra_csv_reuses_the_engines_svds_and_fills_in_newly_plotted_steps(
    lora_run, small_shapes, monkeypatch
):
    import spectra.pipeline as analysis

    computed: list[int] = []
    real = analysis._module_spectrum
    monkeypatch.setattr(
        analysis, "_module_spectrum", lambda run, d, step, *a: computed.append(step) or real(run, d, step, *a)
    )
    write_synthetic_run(lora_run, small_shapes, steps=(15, 20, 25), rank=4, seed=3)
    first = analyze_run(lora_run)
    assert sorted(set(first.spectra["step"])) == [5, 10, 20, 25]
    assert computed == []  # every plotted step was just analysed: σ comes from the engine's SVDs
    with spectra.load_run(lora_run) as run, run.open_delta(10) as d:
        name = d.modules[0]
        exact = torch.linalg.svdvals(run.read_module(d, name)[0].to_dense().double())
    got = first.spectra[(first.spectra["step"] == 10) & (first.spectra["module"] == name)]["sigma"]
    assert got.to_numpy() == pytest.approx(exact[: len(got)].numpy(), rel=1e-6)  # dense ΔW formed in float32
    # a step arrives and the plotted steps move to 15 (in metrics.csv, not in spectra.csv): only it is done
    write_synthetic_run(lora_run, small_shapes, steps=(30,), rank=4, seed=3)
    grown = analyze_run(lora_run)
    assert sorted(set(grown.spectra["step"])) == [5, 15, 20, 30] and set(computed) == {15}


def test_plotted_steps_spread_over_training():
    table = pd.DataFrame({"step": list(range(0, 101, 10)), "status": "ok"})
    assert plotted_steps(table, 4) == [10, 40, 70, 100]
    assert plotted_steps(table.iloc[:1], 4) == [0]


def test_compare_table_and_report(tmp_path, small_shapes):
    evals = [{"step": 10, "benchmark": "organism", "avg@4": 0.7, "pass@1": 0.7, "pass@4": 0.9}]
    a = _known_run(tmp_path / "a", small_shapes, (5, 10), inside=True, rewards=[0.5] * 6, evals=evals)
    b = _known_run(tmp_path / "b", small_shapes, (5, 10), inside=False, rank1=True)
    table, files = write_comparison([analyze_run(a), analyze_run(b)], tmp_path / "cmp")
    assert list(table["run"]) == ["a", "b"]
    assert table.loc[0, "organism avg@4"] == pytest.approx(0.7) and pd.isna(table.loc[1, "organism avg@4"])
    assert table.loc[0, "rho_8"] == pytest.approx(1.0) and table.loc[1, "rho_8"] == pytest.approx(
        0.0, abs=1e-9
    )
    assert table.loc[1, "E_1"] == pytest.approx(1.0)
    assert (tmp_path / "cmp" / "compare.csv").exists() and files[-1].name == "report.html"
    page = files[-1].read_text()
    assert '"name":"a: \\u0394W"' in page and '"name":"b: \\u0394W"' in page  # both runs in the legends


def test_cli_analyze_compare_and_exit_codes(tmp_path, lora_run, small_shapes):
    r = runner.invoke(app, ["analyze", str(lora_run), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "analysed 3 new step(s)" in r.output and "report.html" in r.output
    r = runner.invoke(app, ["analyze", str(lora_run)])
    assert r.exit_code == 0 and "reused 3" in r.output
    other = tmp_path / "other"
    write_synthetic_run(other, small_shapes, steps=(0, 5), rank=None)
    out = tmp_path / "cmp"
    r = runner.invoke(app, ["compare", str(lora_run), str(other), "--out", str(out), "--labels", "L,F"])
    assert r.exit_code == 0, r.output
    assert (out / "report.html").exists() and list(pd.read_csv(out / "compare.csv")["run"]) == ["L", "F"]
    r = runner.invoke(app, ["compare", str(lora_run), str(other), "--labels", "only-one"])
    assert r.exit_code == 1 and "--labels" in r.output
    # a run that cannot be analysed is named and left out; the others are compared
    (tmp_path / "notarun").mkdir()
    args = [
        "compare",
        str(lora_run),
        str(tmp_path / "notarun"),
        str(other),
        "--out",
        str(out),
        "--labels",
        "L,X,F",
    ]
    r = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert "warning" in r.output and "notarun" in r.output and "left out" in r.output
    assert list(pd.read_csv(out / "compare.csv")["run"]) == ["L", "F"]
    r = runner.invoke(app, ["compare", str(tmp_path / "notarun"), "--out", str(out)], env={"COLUMNS": "300"})
    assert r.exit_code == 1 and "nothing to compare" in r.output and "Traceback" not in r.output


def test_bad_input_not_a_run_and_no_deltas(tmp_path):
    r = runner.invoke(app, ["analyze", str(tmp_path)])
    assert r.exit_code == 1 and "run.json" in r.output and "Traceback" not in r.output
    RunWriter(tmp_path / "empty").write_config({"name": "empty"})
    with pytest.raises(NothingToAnalyze, match="no delta files"):
        analyze_run(tmp_path / "empty")
    r = runner.invoke(app, ["analyze", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "no delta files" in r.output


def test_damaged_delta_among_good_ones_is_reported_and_the_rest_analysed(lora_run):
    (lora_run / "deltas" / "step_000005.h5").write_bytes(b"not hdf5 at all")
    r = runner.invoke(app, ["analyze", str(lora_run)])
    assert r.exit_code == 0, r.output
    assert "warning" in r.output and "step_000005.h5" in r.output
    a = analyze_run(lora_run)
    ok_steps = set(a.table.loc[a.table["status"] == "ok", "step"])
    assert ok_steps == {0, 10} and any("step 5" in p for p in a.problems)
    summary = json.loads((lora_run / "analysis" / "summary.json").read_text())
    assert summary["problems"] and [e["step"] for e in summary["steps"]] == [0, 10]


def test_run_whose_model_does_not_match_base_fails_with_a_message(tmp_path, small_shapes):
    run = tmp_path / "mismatch"
    write_synthetic_run(run, small_shapes, steps=(5,), rank=4)
    other = {name: (m + 8, n) for name, (m, n) in small_shapes.items()}  # another model's shapes
    mods = {name: LowRank(torch.randn(m, 2), torch.randn(2, n), 1.0) for name, (m, n) in other.items()}
    RunWriter(run).write_delta(5, mods)
    r = runner.invoke(app, ["analyze", str(run)])
    assert r.exit_code == 1
    assert "nothing could be analysed" in r.output and "does not match" in r.output
    assert not (run / "analysis" / "metrics.csv").exists()  # nothing half-written


def test_a_delta_rewritten_at_the_same_step_is_analysed_again(lora_run, small_shapes):
    first = analyze_run(lora_run)
    write_synthetic_run(lora_run, small_shapes, steps=(10,), rank=2, seed=7)  # as after a resume
    again = analyze_run(lora_run)
    assert again.new_steps == [10] and again.reused_steps == [0, 5]
    before = first.table[first.table["step"] == 10]["erank"].to_numpy()
    after = again.table[again.table["step"] == 10]["erank"].to_numpy()
    assert (after <= 2 + 1e-9).all() and not (before <= 2 + 1e-9).all()  # rank 2 now, rank 4 before
    # integer columns stay integers through the cache
    assert pd.read_csv(lora_run / "analysis" / "metrics.csv")["layer"].dtype.kind == "i"


def test_angles_figure_draws_left_and_right(lora_run):
    analyze_run(lora_run)
    fig = next(f for f in all_figures([run_view(analyze_run(lora_run))]) if f.name == "angles")
    names = [ln.name for ln in fig.panels[0].lines]
    assert names == ["left (output) space", "right (input) space"]


def test_bad_plot_options_are_one_line_errors(lora_run):
    r = runner.invoke(app, ["analyze", str(lora_run), "--k", "5"])
    assert r.exit_code == 1 and "--k 5" in r.output and "[1, 8, 32]" in r.output
    r = runner.invoke(app, ["analyze", str(lora_run), "--heatmap-step", "7"])
    assert r.exit_code == 1 and "--heatmap-step 7" in r.output and "Traceback" not in r.output


def test_a_run_of_vector_parameters_only_gets_a_report(tmp_path):
    from spectra.operators import VectorDelta

    w = RunWriter(tmp_path / "ln")
    w.write_config({"name": "ln", "method": "lntuning"})
    w.write_base_weights({"model.layers.0.input_layernorm.weight": torch.ones(16)})
    w.write_delta(5, {"model.layers.0.input_layernorm.weight": VectorDelta(torch.full((16,), 0.1))})
    r = runner.invoke(app, ["analyze", str(tmp_path / "ln")])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "ln" / "analysis" / "metrics.csv")
    assert table.loc[0, "relative_size"] == pytest.approx(0.1)
    assert "only norms" in (tmp_path / "ln" / "analysis" / "report.html").read_text()
