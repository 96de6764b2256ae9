"""`spectra probe maturity` (spectra.probes.maturity): tiny Qwen2 models saved to disk and read back through
the same code path as a hub model, against the core's ESD fit on the same matrices; streaming (tensor by
tensor, a batch at a time), the cache, unreadable models, and the join with training outcomes."""

from __future__ import annotations

import json
import math
import os
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _requires import require
from scipy import stats
from spectra.probes import maturity as mat
from spectra.probes import weights
from spectra.probes.maturity_runs import collect_runs, correlation
from typer.testing import CliRunner

from spectra.metrics import esd

transformers = require("transformers")

PLANTED = "model.layers.1.mlp.up_proj"


def heavy_tailed(m: int, n: int, mu: float, seed: int) -> torch.Tensor:
    """G·diag(c)/√m with Pareto column scales c = u^(−1/μ): an ESD with a power-law tail."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.rand(n, generator=gen, dtype=torch.float64).pow(-1 / mu)
    return torch.randn(m, n, generator=gen, dtype=torch.float64) * c / math.sqrt(m)


def save_tiny(path: Path, seed: int = 0, shard: str | None = None, dtype=torch.float32) -> Path:
    """A tiny Qwen2 (q/o/gate/up/down 64×64, k/v 32×64: two shapes, two batches), saved with
    save_pretrained; layer 1's up_proj is planted heavy-tailed."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config).to(dtype)
    with torch.no_grad():
        model.get_submodule(PLANTED).weight.copy_(heavy_tailed(64, 64, 1.5, seed).to(dtype))
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory) -> Path:
    """An output folder whose cache the tests of the tiny model share (analysed once)."""
    return tmp_path_factory.mktemp("probe")


@pytest.fixture(scope="module")
def tiny_probe(tiny, shared_out) -> mat.MaturityResult:
    return mat.probe_maturity([str(tiny)], shared_out, report=False)


def direct_fit(model_dir: Path) -> dict[str, dict[str, float]]:
    """Every statistic of every layer matrix, from the model loaded whole by transformers and σ by LAPACK."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = {}
    for name, W in model.state_dict().items():
        if W.ndim == 2 and ".layers." in name:
            stats, reasons = esd.esd_fit(torch.linalg.svdvals(W.double())[None], tuple(W.shape))
            out[name.removesuffix(".weight")] = {k: float(v[0]) for k, v in stats.items()} | {
                "reason": reasons[0]
            }
    return out


def test_streamed_equals_the_core_on_the_loaded_weights(tiny, tiny_probe):
    result = tiny_probe
    table = result.table.set_index("module")
    direct = direct_fit(tiny)
    assert set(table.index) == set(direct)  # 2 layers × 7 projections; no norms, embeddings or head
    for module, ref in direct.items():
        for stat in mat.STATS:
            got = table.loc[module, stat]
            if math.isnan(ref[stat]):
                assert math.isnan(got), (module, stat)
            else:
                assert got == pytest.approx(ref[stat], rel=1e-6, abs=1e-9), (module, stat)
    # the planted heavy tail: the α the core fits on that matrix, far heavier than the random-init ones
    planted = heavy_tailed(64, 64, 1.5, 0).float().double()
    ref = esd.esd_fit(torch.linalg.svdvals(planted)[None], (64, 64))[0]["alpha"].item()
    assert table.loc[PLANTED, "alpha"] == pytest.approx(ref, rel=1e-6)
    others = table.drop(PLANTED)["alpha"].dropna()
    assert table.loc[PLANTED, "alpha"] < others.min()
    # k/v projections are 32×64: 32 eigenvalues, too few for a fit, said in the table and the summary
    kv = table[table["proj"].isin(["k_proj", "v_proj"])]
    assert kv["alpha"].isna().all() and kv["stable_rank"].notna().all()
    assert kv["reason"].str.contains("32 eigenvalues").all()
    # a 64×64 matrix whose KS scan settles on a tail of fewer than 10 eigenvalues: no α, the fit kept
    short = table[table["reason"].str.contains("α needs 10")]
    assert (short["num_tail"] < esd.MIN_TAIL).all() and short["ks_distance"].notna().all()
    assert short["alpha"].isna().all() and short["alpha_stderr"].isna().all()
    fitted = table.dropna(subset=["alpha"])
    assert (fitted["num_tail"] >= esd.MIN_TAIL).all() and PLANTED in fitted.index
    np.testing.assert_allclose(fitted["alpha_stderr"], (fitted["alpha"] - 1) / np.sqrt(fitted["num_tail"]))
    summary = result.summary["models"][str(tiny)]
    without = summary["without_fit"]
    assert sorted(m for mods in without.values() for m in mods) == sorted([*kv.index, *short.index])
    assert summary["fitted"] == 10 - len(short) == len(fitted) and summary["short_tail"] == len(short)
    assert summary["median"]["num_tail"] == fitted["num_tail"].median()
    assert summary["pvalue_tested"] == 0 and table["alpha_pvalue"].isna().all()  # not asked for


def test_all_weights_adds_embeddings_and_head(tiny, tmp_path):
    table = mat.probe_maturity([str(tiny)], tmp_path, all_weights=True, report=False).table
    assert {"model.embed_tokens", "lm_head"} <= set(table["module"])
    assert len(table) == 16


class Spy:
    """safe_open whose handles count get_tensor calls and how many returned tensors are alive at once."""

    def __init__(self):
        self.reads: list[str] = []
        self.alive: list[weakref.ref] = []
        self.max_alive = 0
        self.files: set[str] = set()
        self.real = weights.safe_open

    def __call__(self, path, framework):
        spy, handle = self, self.real(path, framework)

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *a):
                return handle.__exit__(*a)

            def keys(self):
                return handle.keys()

            def get_slice(self, name):
                return handle.get_slice(name)

            def get_tensor(self, name):
                spy.alive = [r for r in spy.alive if r() is not None]
                t = handle.get_tensor(name)
                spy.alive.append(weakref.ref(t))
                spy.max_alive = max(spy.max_alive, len(spy.alive))
                spy.reads.append(name)
                spy.files.add(Path(path).name)
                return t

        return Handle()


def test_sharded_model_is_read_tensor_by_tensor_in_bounded_batches(tiny_probe, tmp_path, monkeypatch):
    sharded = save_tiny(tmp_path / "sharded", shard="60KB")
    assert len(list(sharded.glob("*.safetensors"))) >= 2
    spy = Spy()
    monkeypatch.setattr(weights, "safe_open", spy)
    budget = 3 * mat.work_bytes((64, 64))  # three of the 64×64 matrices per batch
    table = mat.analyse_model(str(sharded), tmp_path / "cache", budget_bytes=budget).table
    assert len(spy.files) >= 2
    assert sorted(spy.reads) == sorted(
        f"{m}.weight" for m in table["module"]
    )  # each matrix read once, nothing else
    assert spy.max_alive == 1  # the tensor read before was freed before the next was read
    (meta_file,) = (tmp_path / "cache").glob("*.json")
    meta = json.loads(meta_file.read_text())
    assert 0 < meta["peak_batch_bytes"] <= budget
    # the same numbers as the unsharded model read in batches of the default budget
    merged = table.merge(tiny_probe.table, on="module", suffixes=("", "_whole"))
    assert len(merged) == 14
    np.testing.assert_allclose(merged["alpha"], merged["alpha_whole"], rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(merged["num_spikes"], merged["num_spikes_whole"], equal_nan=True)


@pytest.mark.parametrize("per", [1, 3, 100])
def test_batches_hold_one_shape_within_the_budget(tiny, per):
    entries, _ = mat.plan_model(mat.weight_files(tiny), False)
    budget = per * mat.work_bytes((64, 64))
    seen = []
    for chunk, X in mat.stream_batches(entries, budget, "cpu"):
        assert len({e.shape for e in chunk}) == 1 and X.shape == (len(chunk), *chunk[0].shape)
        assert X.dtype == torch.float64 and len(chunk) * mat.work_bytes(chunk[0].shape) <= budget
        assert len(chunk) <= per or chunk[0].shape != (64, 64)
        seen += [e.name for e in chunk]
    assert sorted(seen) == sorted(e.name for e in entries) and len(seen) == 14


def test_cache_is_reused_and_a_changed_file_recomputes_that_model(
    tiny, tiny_probe, shared_out, tmp_path, monkeypatch
):
    b = save_tiny(tmp_path / "b", seed=2)
    first = mat.probe_maturity([str(tiny), str(b)], shared_out, report=False)
    assert [t.reused for t in first.models] == [True, False]  # tiny: analysed by the fixture
    pd.testing.assert_frame_equal(first.models[0].table, tiny_probe.table)
    spy = Spy()
    monkeypatch.setattr(weights, "safe_open", spy)
    second = mat.probe_maturity([str(tiny), str(b)], shared_out, report=False)
    assert [t.reused for t in second.models] == [True, True] and spy.reads == []
    pd.testing.assert_frame_equal(first.table, second.table)
    st = (b / "model.safetensors").stat()
    os.utime(b / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = mat.probe_maturity([str(tiny), str(b)], shared_out, report=False)
    assert [t.reused for t in third.models] == [True, False]
    assert len(spy.reads) == 14 and all(spy.reads)
    forced = mat.probe_maturity([str(b)], shared_out, report=False, force=True)
    assert not forced.models[0].reused and len(spy.reads) == 28


def test_unreadable_model_is_reported_and_the_others_analysed(tiny, tiny_probe, shared_out, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    result = mat.probe_maturity([str(tiny), str(broken), str(tmp_path / "missing")], shared_out, report=False)
    assert [t.label for t in result.models] == [str(tiny)]
    assert len(result.problems) == 2
    assert str(broken) in result.problems[0] and "safetensors" in result.problems[0]
    assert "missing" in result.problems[1] and "no such directory" in result.problems[1]
    with pytest.raises(mat.MaturityError, match="no model could be read"):
        mat.probe_maturity([str(broken)], tmp_path / "o", report=False)


def test_hub_ids_come_from_the_local_cache_only(tiny, tmp_path, monkeypatch):
    hub = require("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(mat.MaturityError, match="not in the local hub cache"):
        mat.resolve_model("someone/tiny-model")
    snap = tmp_path / "hub" / "models--someone--tiny-model" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    for f in tiny.iterdir():
        (snap / f.name).symlink_to(f)
    assert mat.resolve_model("someone/tiny-model") == snap


def test_nonfinite_weights_give_a_row_with_a_reason(tmp_path):
    from safetensors.torch import save_file

    good = torch.randn(64, 64)
    bad = good.clone()
    bad[3, 4] = math.nan
    (tmp_path / "m").mkdir()
    save_file(
        {"layers.0.q_proj.weight": good, "layers.1.q_proj.weight": bad}, tmp_path / "m" / "model.safetensors"
    )
    table = mat.analyse_model(str(tmp_path / "m"), tmp_path / "cache").table.set_index("module")
    assert table.loc["layers.1.q_proj", "reason"] == "non-finite weights"
    assert math.isnan(table.loc["layers.1.q_proj", "alpha"]) and not math.isnan(
        table.loc["layers.0.q_proj", "alpha"]
    )


# ------------------------------------------------------------------------------------- joined with runs


def write_run(folder: Path, model: str, method: str, rank: int, evals=(), rewards=(), collapsed=None) -> Path:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(
        json.dumps({"model": model, "model_path": model, "method": method, "rank": rank})
    )
    with open(folder / "eval.jsonl", "w") as fh:
        for step, acc in evals:
            fh.write(json.dumps({"step": step, "benchmark": "organism", "n": 4, "avg@4": acc}) + "\n")
    with open(folder / "metrics.jsonl", "w") as fh:
        for step, r in enumerate(rewards, 1):
            fh.write(json.dumps({"step": step, "reward": r}) + "\n")
    if collapsed is not None:
        (folder / "analysis").mkdir()
        (folder / "analysis" / "summary.json").write_text(
            json.dumps({"collapsed_steps": [20] if collapsed else []})
        )
    return folder


@pytest.fixture
def sweeps(tiny, tmp_path) -> tuple[list[Path], list[Path]]:
    """Three models (the first: the shared tiny one); sweep a on models 0 and 1, sweep b on model 2."""
    models = [tiny, *(save_tiny(tmp_path / f"m{i}", seed=10 + i) for i in (1, 2))]
    a, b = tmp_path / "sweep-a", tmp_path / "sweep-b"
    m0, m1, m2 = (str(m) for m in models)
    write_run(a / "lora-r4", m0, "lora", 4, evals=[(10, 0.3), (20, 0.5)], collapsed=False)
    write_run(a / "lora-r16", m0, "lora", 16, evals=[(10, 0.7), (20, 0.6)], collapsed=True)
    write_run(a / "lora-r64", m0, "lora", 64, evals=[(20, 0.4)], collapsed=True)
    write_run(a / "dora-r16", m0, "dora", 16, evals=[(20, 0.7)])
    write_run(a / "quanta", m0, "quanta", 0, rewards=[0.1, 0.2, 0.9, 0.9, 0.9, 0.9, 0.9])
    write_run(a / "m1-lora", m1, "lora", 8, evals=[(20, 0.2)])
    write_run(a / "m1-miss", m1, "miss", 8, evals=[(20, 0.25)])
    write_run(b / "lora", m2, "lora", 8, evals=[(20, 0.1)], collapsed=False)
    write_run(b / "dora", m2, "dora", 8, evals=[(20, 0.3)])
    (a / "not-a-run").mkdir()
    return models, [a, b]


def test_runs_are_read_from_run_dirs_and_sweeps(sweeps):
    _, (a, b) = sweeps
    problems: list[str] = []
    runs = collect_runs([a, b / "lora", b / "missing"], problems).set_index("run")
    assert len(runs) == 8 and len(problems) == 1 and "missing" in problems[0]
    assert runs.loc[str(a / "lora-r16"), "accuracy"] == 0.6  # the last evaluated step, not the best
    quanta = runs.loc[str(a / "quanta")]
    assert quanta["accuracy"] == pytest.approx(0.9) and "reward" in quanta["accuracy_source"]
    assert runs.loc[str(a / "dora-r16"), "collapsed"] is None or pd.isna(
        runs.loc[str(a / "dora-r16"), "collapsed"]
    )


def test_seeds_of_one_configuration_count_by_their_mean(tmp_path):
    from spectra.probes.maturity_runs import model_outcomes

    def run(name, method, rank, seed, acc):
        folder = write_run(tmp_path / name, "m", method, rank, evals=[(20, acc)])
        config = json.loads((folder / "run.json").read_text()) | {"seed": seed, "name": name}
        (folder / "run.json").write_text(json.dumps(config))

    run("lora-r8-s0", "lora", 8, 0, 0.5)
    run("lora-r8-s1", "lora", 8, 1, 0.7)  # the best single run, of a configuration whose mean is 0.6
    run("lora-r4-s0", "lora", 4, 0, 0.65)
    run("dora-r8-s0", "dora", 8, 0, 0.2)
    run("dora-r8-s1", "dora", 8, 1, 0.4)
    out = model_outcomes(collect_runs([tmp_path], []))
    assert out["best_lora"] == pytest.approx(0.65) and "lora r=4" in out["best_lora_run"]
    assert out["best_structured"] == pytest.approx(0.3) and "mean of 2 seeds" in out["best_structured_run"]
    assert "structured_minus_lora" not in out  # a best of several means minus another: biased, gone
    # the named pair: DoRA r8's seeds against LoRA r8's (not the best LoRA, r4), Welch's interval
    (pair,) = out["pairs"]
    assert pair["pair"] == "dora r=8 − lora r=8" and (pair["n"], pair["n_lora"]) == (2, 2)
    assert pair["difference"] == pytest.approx(-0.3) and out["dora r=8 − lora r=8"] == pytest.approx(-0.3)
    ref = stats.ttest_ind([0.2, 0.4], [0.5, 0.7], equal_var=False).confidence_interval(0.95)
    assert (pair["low"], pair["high"]) == pytest.approx((ref.low, ref.high), rel=1e-9)
    assert pair["verdict"] == "cannot tell"


def test_pairs_are_fixed_settings_with_a_welch_verdict(tmp_path):
    """A pair is a structured method against LoRA in the same setting (here: the rank); a difference is
    called only when Welch's interval, at the Bonferroni level over the pairs, excludes 0."""
    from spectra.probes.maturity_runs import pairs

    def run(name, method, rank, seed, acc):
        folder = write_run(tmp_path / name, "m", method, rank, evals=[(20, acc)])
        config = json.loads((folder / "run.json").read_text()) | {"seed": seed, "name": name}
        (folder / "run.json").write_text(json.dumps(config))

    for seed, (lora, dora, miss) in enumerate([(0.50, 0.80, 0.52), (0.52, 0.82, 0.47), (0.51, 0.81, 0.55)]):
        run(f"lora-r32-s{seed}", "lora", 32, seed, lora)
        run(f"dora-r32-s{seed}", "dora", 32, seed, dora)
        run(f"miss-r32-s{seed}", "miss", 32, seed, miss)
        run(f"dora-r64-s{seed}", "dora", 64, seed, 0.99)  # no LoRA r64: no pair
    found = {p["pair"]: p for p in pairs(collect_runs([tmp_path], []), tests=2)}
    assert set(found) == {"dora r=32 − lora r=32", "miss r=32 − lora r=32"}
    dora, miss = found["dora r=32 − lora r=32"], found["miss r=32 − lora r=32"]
    assert dora["difference"] == pytest.approx(0.30) and dora["verdict"] == "higher"
    assert miss["verdict"] == "cannot tell" and miss["low"] < 0 < miss["high"]
    ref = stats.ttest_ind([0.80, 0.82, 0.81], [0.50, 0.52, 0.51], equal_var=False).confidence_interval(0.95)
    assert (dora["low"], dora["high"]) == pytest.approx((ref.low, ref.high), rel=1e-9)
    # Bonferroni: with enough pairs in the join even a clear-looking difference of 3 seeds is not called
    close = {p["pair"]: p for p in pairs(collect_runs([tmp_path], []), tests=10**6)}
    assert close["dora r=32 − lora r=32"]["verdict"] == "cannot tell"


def test_correlation_needs_three_models_and_variation():
    assert correlation([1.0, 2.0], [3.0, 1.0])["pearson"] is None
    assert correlation([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])["pearson"] is None
    c = correlation([1.0, 2.0, None, 4.0], [2.0, 4.0, 1.0, float("nan")])
    assert c["n"] == 2 and c["pearson"] is None
    assert correlation([1, 2, 3], [1, 2, 4])["spearman"] == pytest.approx(1.0)


def test_cli_probe_joins_runs_and_writes_the_report(sweeps, tiny_probe, shared_out, tmp_path):
    from spectra.cli.main import app

    models, (a, b) = sweeps
    m0, m1, m2 = (str(m) for m in models)
    out = shared_out  # the tiny model m0 is cached there
    # `--runs a b`: b arrives as a positional and is recognised as a sweep folder; m1 and m2 are probed
    # because runs use them
    args = ["probe", "maturity", m0, str(tmp_path / "nothing"), "--out", str(out), "--runs", str(a), str(b)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "warning" in res.output and "nothing" in res.output
    assert "joined with 9 run(s)" in res.output
    table = pd.read_csv(out / "maturity.csv")
    assert list(dict.fromkeys(table["model"])) == [m0, m1, m2] and len(table) == 42
    assert {"model", "module", "layer", "proj", "rows", "cols", *mat.STATS, "reason"} <= set(table.columns)
    summary = json.loads((out / "summary.json").read_text())
    projs = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(summary["models"][m0]["by_proj"]) == projs
    assert [e["layer"] for e in summary["models"][m0]["by_depth"]] == [0, 1]
    o = pd.DataFrame(summary["join"]["models"]).set_index("model")
    # m0's QuanTA has a training reward only (0.9): compared on held-out scores, DoRA's 0.7 is the best
    assert o.loc[m0, "best_lora"] == 0.6 and o.loc[m0, "best_structured"] == pytest.approx(0.7)
    assert o.loc[m0, "collapse_rank"] == 16 and o.loc[m0, "runs"] == 5
    assert o.loc[m1, "miss r=8 − lora r=8"] == pytest.approx(0.05) and pd.isna(o.loc[m1, "collapse_rank"])
    assert o.loc[m0, "dora r=16 − lora r=16"] == pytest.approx(0.1)  # not best DoRA − best LoRA
    compared = {(p["model"], p["pair"]): p for p in summary["join"]["pairs"]}
    assert set(compared) == {(m0, "dora r=16 − lora r=16"), (m1, "miss r=8 − lora r=8"),
                             (m2, "dora r=8 − lora r=8")}  # fmt: skip
    assert summary["join"]["pair_tests"] == 3
    assert all(p["verdict"] == "one seed: no interval" for p in compared.values())
    assert o.loc[m0, "num_tail"] == summary["models"][m0]["median"]["num_tail"]
    assert o.loc[m2, "best_lora"] == 0.1 and o.loc[m2, "best_structured"] == 0.3
    corr = summary["join"]["correlations"]["alpha"]
    assert corr["best_lora"]["n"] == 3
    assert corr["best_lora"]["pearson"] == pytest.approx(np.corrcoef(o["alpha"], o["best_lora"])[0, 1])
    assert corr["collapse_rank"] == {"n": 1, "pearson": None, "spearman": None}
    page = (out / "report.html").read_text()
    assert "α per projection kind" in page and "Maturity against what adapters did" in page
    assert "Structured against LoRA, named pairs" in page and "dora r=16 − lora r=16" in page
    assert "median SE(α)" in page and "median tail" in page and "2–6 as typical" in page
    assert "median SE" in res.output and "median tail" in res.output
    assert "rests on 3 model(s)" in page
    pngs = {p.name for p in (out / "plots").glob("*.png")}
    assert pngs >= {"alpha_distribution.png", "depth.png", "outcomes.png"}
    again = CliRunner().invoke(app, ["probe", "maturity", m0, "--out", str(out)])
    assert again.exit_code == 0 and "(cached)" in again.output


def test_cli_no_model_is_one_line_error(tmp_path):
    from spectra.cli.main import app

    res = CliRunner().invoke(app, ["probe", "maturity", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "no model could be read" in res.output and "Traceback" not in res.output


def test_cli_memory_must_be_positive(tiny, tmp_path):
    from spectra.cli.main import app

    res = CliRunner().invoke(
        app, ["probe", "maturity", str(tiny), "--memory-mb", "0", "--out", str(tmp_path)]
    )
    assert res.exit_code == 1 and "--memory-mb 0" in res.output


def test_a_run_collapsed_when_the_analysis_or_the_live_alarm_says_so(tmp_path):
    from spectra.probes.maturity_runs import run_collapsed

    quiet = write_run(tmp_path / "quiet", "m", "lora", 8, rewards=[0.5])
    assert run_collapsed(quiet) is None  # neither analysed nor watched
    (quiet / "train_summary.json").write_text(json.dumps({"monitored_steps": [10], "collapse_step": None}))
    assert run_collapsed(quiet) is False
    alarm = write_run(tmp_path / "alarm", "m", "lora", 64, rewards=[0.5], collapsed=False)
    (alarm / "train_summary.json").write_text(json.dumps({"monitored_steps": [10], "collapse_step": 10}))
    assert run_collapsed(alarm) is True  # the analysis saw none; the live alarm fired
    event = write_run(tmp_path / "event", "m", "lora", 64, rewards=[0.5])
    with open(event / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 1, "event": "collapse", "reason": "E_1"}) + "\n")
    assert run_collapsed(event) is True


def test_held_out_scores_are_not_mixed_with_rewards(tmp_path):
    from spectra.probes.maturity_runs import model_outcomes

    write_run(tmp_path / "lora", "m", "lora", 8, evals=[(20, 0.4)])
    write_run(tmp_path / "dora", "m", "dora", 8, rewards=[0.9] * 5)  # a reward only: not comparable
    write_run(tmp_path / "quanta", "m", "quanta", 8, evals=[(20, 0.5)])
    out = model_outcomes(collect_runs([tmp_path], []))
    assert out["best_structured"] == pytest.approx(0.5) and "quanta" in out["best_structured_run"]


def test_cli_pvalue_tests_each_fit(tiny, tmp_path):
    """--pvalue: the goodness-of-fit p of every matrix with an α (seeded: the core's p on the same σ),
    none where α is empty; a different cache entry from the plain probe; a bad sample count is one line."""
    from spectra.cli.main import app

    out = tmp_path / "p"
    res = CliRunner().invoke(
        app, ["probe", "maturity", str(tiny), "--out", str(out), "--pvalue", "--pvalue-samples", "20"]
    )
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "maturity.csv").set_index("module")
    has = table["alpha"].notna()
    assert has.any() and table.loc[has, "alpha_pvalue"].between(0, 1).all()
    assert table.loc[~has, "alpha_pvalue"].isna().all()
    W = heavy_tailed(64, 64, 1.5, 0).float().double()
    ref, _ = esd.esd_fit(torch.linalg.svdvals(W)[None], (64, 64), pvalue_samples=20, seed=0)
    assert table.loc[PLANTED, "alpha_pvalue"] == pytest.approx(ref["alpha_pvalue"].item(), abs=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["esd"]["pvalue"]["samples"] == 20 and summary["esd"]["min_tail"] == esd.MIN_TAIL
    s = summary["models"][str(tiny)]
    assert s["pvalue_tested"] == int(has.sum())
    assert s["ruled_out"] == int((table.loc[has, "alpha_pvalue"] <= 0.1).sum())
    assert f"of {s['pvalue_tested']} tested" in res.output and "(cached)" not in res.output
    args = ["probe", "maturity", str(tiny), "--out", str(out), "--pvalue-samples", "0"]
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code == 1 and "--pvalue-samples 0" in bad.output and "Traceback" not in bad.output
