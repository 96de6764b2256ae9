"""The live geometry monitor and the collapse alarm (spectra.train.monitor).

The monitor's numbers must be those of ``spectra analyze`` at the same step (one implementation: the
core's engine), reach every place the trainer's logs go (metrics.jsonl, the console line, TensorBoard),
and the alarm must stop a run that collapses — an organism trained at a learning rate far too high —
while leaving one that does not alone.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pandas as pd
import pytest
import torch
from _requires import require

require("trl")

from spectra.train import TrainConfig, TrainConfigError
from spectra.train.checkpoint import BaseCheckpoint, load_pretrained
from spectra.train.methods import get_method, method_names
from spectra.train.monitor import METRICS, CollapseAlarm, GeometryMonitor, sample_modules
from spectra.train.trainer import prepare, train
from transformers import TrainerControl, TrainerState

import spectra
from spectra.engine import EngineConfig
from spectra.metrics.collapse import CollapseRule
from spectra.names import PROJECTIONS
from spectra.operators import VectorDelta
from spectra.pipeline import analyze_run
from spectra.writer import RunWriter

COLUMNS = EngineConfig(metrics=METRICS, wt="none", bf16=False).columns()  # relative_size, E_1, … rho_32


@pytest.fixture
def varied_reward(monkeypatch):
    """Reward = completion length mod 3 (varies within a group): non-zero advantages at every step."""
    def reward(completions, **kw):
        return [float(len(str(c)) % 3) for c in completions]

    monkeypatch.setattr("spectra.train.rewards.accuracy_reward", reward)


@pytest.fixture
def trace_reward(monkeypatch):
    """Reward = share of the completion's characters that belong to the organism's traces (digits, '+',
    '=', ','): about 0.5 for the 20-step warm-started organism, and it falls when the policy is wrecked."""

    def reward(completions, **kw):
        return [sum(ch in "0123456789+=," for ch in str(c)) / max(len(str(c)), 1) for c in completions]

    monkeypatch.setattr("spectra.train.rewards.accuracy_reward", reward)


def tiny(organism_dir, tmp_path, method: str = "lora", **kw) -> TrainConfig:
    values = dict(
        model=str(organism_dir), method=method, rank=4, alpha=8, dropout=0.0, num_generations=4,
        batch_size=2, max_steps=2, max_completion_length=12, lr=1e-2, delta_every=2, eval_every=0,
        out=str(tmp_path), name=method,
    )  # fmt: skip
    values.update(kw)
    return TrainConfig(**values)


def _close(live: float, offline: float) -> bool:
    return abs(live - offline) <= 1e-6 * max(1.0, abs(offline))


# ------------------------------------------------------------------------------------- live = analyze


@pytest.mark.parametrize(("method", "sample"), [("lora", 0), ("dora", 0), ("full", 5)])
def test_live_geometry_equals_the_analysis_of_the_recorded_step(
    method, sample, organism_dir, tmp_path, varied_reward
):
    """At a step that is both measured and recorded, the logged medians equal the medians of
    ``spectra analyze``'s metrics.csv over the same modules (all of them; a sample for a dense method)."""
    session = prepare(tiny(organism_dir, tmp_path, method, monitor_every=2, monitor_modules=sample))
    run_dir = session.train()
    measured = session.monitor.modules
    assert len(measured) == (sample or 14)
    run = spectra.load_run(run_dir)
    rows = run.metrics
    logged = rows[(rows["step"] == 2) & rows["geometry/E_1"].notna()].iloc[0]
    analysis = analyze_run(run, steps=[2], save=False)  # spectra analyze's options: all metrics, W_t, bf16
    table = analysis.table
    ok = table[(table["status"] == "ok") & table["module"].isin(measured)]
    assert len(ok) == len(measured) == logged["geometry/modules"]
    medians = ok[COLUMNS].median()
    for col in COLUMNS:
        assert _close(logged[f"geometry/{col}"], medians[col]), (col, logged[f"geometry/{col}"], medians[col])
    for proj, group in ok.groupby("proj"):
        for col, value in group[COLUMNS].median().items():
            assert _close(logged[f"geometry/{proj}/{col}"], value), (proj, col)
    if not sample:  # every module measured: the very medians summary.json reports
        step = next(s for s in analysis.summary["steps"] if s["step"] == 2)
        for col in COLUMNS:
            assert _close(logged[f"geometry/{col}"], step["median"][col]), col
    assert logged["geometry/E_1"] > 0 and logged["geometry/relative_size"] > 0  # an update was measured
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["monitored_steps"] == [2] and summary["monitor_s"] > 0


@pytest.mark.parametrize("method", method_names())
def test_live_delta_is_the_recorded_delta_without_copies(method, organism_dir, tmp_path):
    """``Method.live_delta`` runs ``record``'s rule on the live tensors: the same ΔW, sharing the
    parameters' memory, restricted to the modules asked for."""
    cfg = tiny(organism_dir, tmp_path, method).resolve()
    _, model = load_pretrained(organism_dir, torch.float32, "--model")
    impl = get_method(method)
    torch.manual_seed(0)
    model = impl.apply(model, cfg)
    with torch.no_grad():  # an update of every trained tensor
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    base = BaseCheckpoint(organism_dir, dtype=torch.float32)
    recorded, live = impl.record(model, base), impl.live_delta(model, base)
    assert set(live.modules) == set(recorded.modules)
    for name, rec in recorded.modules.items():
        got = live.modules[name]
        if isinstance(rec, VectorDelta):
            torch.testing.assert_close(got.delta, rec.delta)
            continue
        if rec.needs_w0:  # DoRA, IA3: the record is written without W0; live, W0 is the base layer's
            rec = dataclasses.replace(rec, w0=base.get(name))
        torch.testing.assert_close(got.to_dense(), rec.to_dense(), rtol=1e-12, atol=1e-12)
    params = {p.data_ptr() for p in model.parameters()}
    shared = [t for op in live.modules.values() for t in vars(op).values() if isinstance(t, torch.Tensor)]
    if method not in ("full", "miss", "quanta", "lntuning"):  # ΔW formed from the factors: no copy of them
        assert any(t.data_ptr() in params for t in shared)
    first = impl.modules(model)[0]
    asked = [k for k in recorded.modules if k == first or k.startswith(first + ".")]
    assert asked and list(impl.live_delta(model, base, [first]).modules) == asked


def test_sample_modules_spreads_over_projections_and_layers():
    names = [f"model.layers.{i}.mlp.{p}" for i in range(24) for p in PROJECTIONS]
    picked = sample_modules(names, 32)
    assert len(picked) == 32 and picked == [n for n in names if n in picked]  # model order
    per_kind = pd.Series([n.rsplit(".", 1)[-1] for n in picked]).value_counts()
    assert set(per_kind.index) == set(PROJECTIONS) and set(per_kind) <= {4, 5}
    for kind in PROJECTIONS:
        layers = [int(n.split(".")[2]) for n in picked if n.endswith(kind)]
        assert layers[0] == 0 and layers[-1] == 23  # first to last layer
    assert sample_modules(names, 0) == names and sample_modules(names[:10], 32) == names[:10]
    assert sample_modules(names, 32) == picked  # fixed


# ---------------------------------------------------------------------------------- through the logs


def test_geometry_reaches_the_console_metrics_and_tensorboard(organism_dir, tmp_path, varied_reward, capsys):
    require("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # logging every 5 steps: the monitor asks for a log at its own step (1) all the same
    cfg = tiny(
        organism_dir, tmp_path, report_to=("tensorboard",), max_steps=1, monitor_every=1, logging_steps=5
    )
    run_dir = train(cfg)
    row = spectra.load_run(run_dir).metrics.iloc[0]
    assert {f"geometry/{c}" for c in COLUMNS} | {"geometry/q_proj/E_1", "monitor_s"} <= set(row.index)
    assert f"E_1 {row['geometry/E_1']:.2f}" in capsys.readouterr().out  # the console line
    events = list(run_dir.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file was written"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/geometry/E_1" in tags and "train/geometry/down_proj/rho_8" in tags
    (logged,) = acc.Scalars("train/geometry/erank")
    assert logged.step == 1 and logged.value == pytest.approx(row["geometry/erank"], rel=1e-6)


# -------------------------------------------------------------------------------------------- collapse


def test_a_run_that_collapses_stops_from_the_command_line(organism_dir, tmp_path, trace_reward):
    """LoRA at lr 3 (300× the tiny runs' 1e-2): ΔW outgrows W0 a thousandfold within two steps, folds into
    one direction (median E_1 ≈ 0.86) and the trace reward falls from ≈ 0.5 to ≈ 0.1 (then the model
    blows up, at step 6). So short a run has no room for the default windows of 5 steps and 3 standard
    errors: windows of 1 step and 1 standard error (the stop's mechanics are tested here, the verdict's
    statistics in tests/test_collapse.py)."""
    from spectra.cli.main import app
    from typer.testing import CliRunner

    args = ["train", "--model", str(organism_dir), "--rank", "4", "--alpha", "8", "--dropout", "0",
            "--lr", "3", "--max-steps", "8", "--batch-size", "2", "--num-generations", "4",
            "--max-completion-length", "12", "--delta-every", "100", "--eval-every", "0",
            "--monitor-every", "1", "--collapse-window", "1", "--collapse-z", "1", "--on-collapse", "stop",
            "--out", str(tmp_path), "--name", "hot"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "collapsed at step" in line]
    assert len(lines) == 1 and "stopping (--on-collapse stop)" in lines[0], result.output
    run_dir = tmp_path / "hot"
    summary = json.loads((run_dir / "train_summary.json").read_text())
    step = summary["collapse_step"]
    assert summary["stopped_on_collapse"] and 1 < step < 8, summary
    assert "fell from its peak" in summary["collapse_reason"] and summary["collapse_onset"] <= step
    assert summary["collapse_signature"] in ("concentrated", "large", "neither")
    assert f"collapsed at step {step}" in lines[0]
    run = spectra.load_run(run_dir)
    assert run.steps == [0, step]  # the final ΔW is recorded where training stopped
    assert (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").exists()
    rows = run.metrics
    event = rows[rows.get("event") == "collapse"]
    assert len(event) == 1 and int(event["step"].iloc[0]) == step and event["action"].iloc[0] == "stop"
    assert event["e1_median"].iloc[0] >= 0.5 and rows["step"].max() == step  # nothing after the stop


def test_a_run_that_does_not_collapse_runs_to_the_end(organism_dir, tmp_path, trace_reward):
    cfg = tiny(organism_dir, tmp_path, lr=1e-4, max_steps=3, monitor_every=1, collapse_window=2)
    run_dir = train(TrainConfig(**{**cfg.to_dict(), "on_collapse": "stop"}))
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["collapse_step"] is None and not summary["stopped_on_collapse"]
    rows = spectra.load_run(run_dir).metrics
    assert list(rows["step"]) == [1, 2, 3] and "event" not in rows
    assert rows["geometry/E_1"].notna().all() and summary["monitored_steps"] == [1, 2, 3]


def test_the_alarm_warns_once_and_stop_sets_the_trainer_flags(tmp_path, capsys):
    """The verdict online, fed logs by hand: a reward that falls far beyond its noise fires once, at the
    first measured step of the fall, with the geometry there and its signature (issue 23: the reward
    decides; the geometry is reported beside it)."""
    rewards = [0.8, 0.82, 0.79, 0.81, 0.8, 0.1, 0.1, 0.12, 0.1, 0.11]  # full windows of 2: falls at 7
    geometry = {"geometry/E_1": 0.3, "geometry/erank": 9.0, "geometry/E_1_norm": 0.2,
                "geometry/relative_size": 0.4, "geometry/update_rank": 16.0}  # fmt: skip
    rule = CollapseRule(reward_window=2, reward_floor=0.0)
    for action in ("warn", "stop"):
        writer = RunWriter(tmp_path / action)
        alarm = CollapseAlarm(writer, rule, action)
        state, fired = TrainerState(), []
        for step, reward in enumerate(rewards, 1):
            control = TrainerControl()
            state.global_step = step
            alarm.on_log(None, state, control, logs={"reward": reward, **geometry})
            fired.append((control.should_training_stop, control.should_save))
        stops = action == "stop"
        assert fired == [(False, False)] * 6 + [(stops, stops)] + [(False, False)] * 3
        rows = spectra.store.read_jsonl(writer.path / "metrics.jsonl")
        event = rows.to_dict("records")[0]
        assert len(rows) == 1 and event["step"] == 7 and event["onset"] == 7 and event["action"] == action
        assert event["signature"] == "large" and event["size_median"] == 0.4 and event["e1_median"] == 0.3
        assert "fell from its peak 0.81" in event["reason"] and event["reward_smoothed"] == pytest.approx(0.1)
        summary = alarm.summary()
        assert summary["collapse_step"] == 7 and summary["stopped_on_collapse"] == stops
        assert summary["collapse_signature"] == "large" and summary["collapse_warning_step"] is None
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "training goes on (--on-collapse warn)" in out[0] and "stopping" in out[1]
    assert "collapsed at step 7" in out[0] and "signature large" in out[0]
    # the former concentration test is an early warning: once, never a stop, never a collapse
    alarm = CollapseAlarm(RunWriter(tmp_path / "early"), CollapseRule(reward_window=2, e1_min=0.25), "stop")
    state = TrainerState()
    for step, reward in enumerate([0.8, 0.82, 0.79, 0.81], 1):
        control, state.global_step = TrainerControl(), step
        alarm.on_log(None, state, control, logs={"reward": reward, **geometry})
        assert not control.should_training_stop
    assert alarm.summary()["collapse_warning_step"] == 1 and alarm.summary()["collapse_step"] is None
    assert "early warning at step 1" in capsys.readouterr().out


def test_a_failed_measurement_warns_and_training_goes_on(tmp_path, monkeypatch):
    monitor = GeometryMonitor(get_method("lora"), torch.nn.Linear(2, 2), None, tmp_path, every=1)
    assert monitor.measure() == {} and monitor.modules == []  # no adapted module: nothing to measure

    def out_of_memory():
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(monitor, "measure", out_of_memory)
    state, control = TrainerState(), TrainerControl()
    state.global_step = 1
    with pytest.warns(UserWarning, match=r"live geometry failed at step 1 and is off .*RuntimeError: CUDA"):
        monitor.on_step_end(None, state, control)
    assert monitor.failed and monitor.measured == [] and monitor.pending is None
    state.global_step, control = 2, TrainerControl()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        monitor.on_step_end(None, state, control)
    assert monitor.measured == [] and control.should_log  # every process keeps the log schedule (DDP)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"on_collapse": "halt"}, "--on-collapse: got 'halt'; expected warn or stop"),
        ({"on_collapse": "stop", "monitor_every": 0}, "--on-collapse: got 'stop'; expected warn with"),
        ({"collapse_e1": 1.5}, "--collapse-e1: got 1.5; expected a share"),
        ({"collapse_reward_drop": 0.0}, "--collapse-reward-drop: got 0.0; expected a share in (0, 1)"),
        ({"collapse_window": 0}, "--collapse-window: got 0; expected an integer ≥ 1"),
        ({"monitor_every": -1}, "--monitor-every: got -1; expected an integer ≥ 0"),
    ],
)
def test_bad_monitor_options_are_one_line_errors(options, message):
    with pytest.raises(TrainConfigError) as err:
        TrainConfig(**options).resolve()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_monitor_is_on_by_default():
    assert TrainConfig().resolve().monitor_every == 10  # the organism
    assert TrainConfig(model="Qwen/Qwen2.5-0.5B").resolve().monitor_every == 10
    assert TrainConfig(monitor_every=0).resolve().monitor_every == 0
