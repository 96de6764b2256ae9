"""`spectra sweep`: grid options from TrainConfig, cell names, bad input before anything runs, resume and
failure handling, cells in their own processes, sweep.csv and the report (seeds, collapse marks)."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
import typer
from _requires import require
from spectra.cli.main import app
from spectra.cli.options import config_options, grid_values, to_args
from spectra.cli.sweep import parse_also
from typer.testing import CliRunner

require("trl")

from spectra.probes.sweep import PRESETS, SweepError, check_cells, plan_sweep, run_sweep
from spectra.probes.sweep_processes import cell_command, gpu_slots
from spectra.probes.sweep_report import cliff, write_sweep_report
from spectra.train.config import TrainConfig, TrainConfigError

from spectra.synthetic import write_synthetic_run

runner = CliRunner()


def tiny_args(organism_dir, out) -> list[str]:
    """A 2-step run of the test organism (seconds on a CPU)."""
    return [
        "--model", str(organism_dir), "--alpha", "8", "--dropout", "0", "--num-generations", "4",
        "--batch-size", "2", "--max-steps", "2", "--max-completion-length", "12", "--lr", "0.01",
        "--delta-every", "1", "--eval-every", "2", "--eval-problems", "4", "--eval-k", "2",
        "--monitor-every", "0", "--out", str(out),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ grid options


def test_grid_values_parse_as_the_option_and_name_what_is_wrong():
    assert grid_values(TrainConfig, "rank", "8,32, 64") == (8, 32, 64)
    assert grid_values(TrainConfig, "lr", "1e-3,5e-4") == (1e-3, 5e-4)
    assert grid_values(TrainConfig, "method", "lora,dora") == ("lora", "dora")
    assert grid_values(TrainConfig, "target_modules", "q_proj,v_proj") == (("q_proj", "v_proj"),)
    assert grid_values(TrainConfig, "gradient_checkpointing", True) == (True,)
    for name, text, said in [
        ("rank", "8,x", "'x' is not an integer"),
        ("lr", "fast", "'fast' is not a number"),
        ("rank", "8,8", "'8' is given twice"),
        ("rank", "8,,16", "an empty value"),
    ]:
        with pytest.raises(typer.BadParameter) as e:
            grid_values(TrainConfig, name, text)
        assert said in str(e.value) and e.value.param_hint == f"--{name}"


def test_to_args_builds_the_same_config_through_the_train_options():
    got = {}
    probe = typer.Typer()

    @probe.command()
    @config_options(TrainConfig)
    def one(cfg: TrainConfig) -> None:
        got["cfg"] = cfg

    cfg = TrainConfig(
        rank=64, lr=3e-4, batch_size=128, seed=2, target_modules=("q_proj",), use_vllm=True,
        gradient_checkpointing=False, report_to=("tensorboard",), out="x", name="y",
    )  # fmt: skip
    r = runner.invoke(probe, to_args(cfg))
    assert r.exit_code == 0, r.output
    assert got["cfg"] == cfg


def test_also_grids_use_the_option_parsers():
    want = {"method": ("quanta", "dora"), "batch_size": (4, 8)}
    assert parse_also("method=quanta,dora batch-size=4,8") == want
    with pytest.raises(typer.BadParameter, match="name=values"):
        parse_also("colour=red")


# ------------------------------------------------------------------------------------------------ plans


def test_cells_are_named_from_their_varying_values(tmp_path):
    grid = {"method": ("lora",), "rank": (8, 64), "batch_size": (64, 128), "seed": (0, 1)}
    plan = plan_sweep(tmp_path, grid, also=[{"method": ("dora",), "rank": (16,), "batch_size": (64,)}])
    names = [c.name for c in plan.cells]
    assert "lora-r64-b128-s0" in names and len(names) == 8 + 2
    dora = plan.cells[-2]  # an --also grid without seeds takes the main grid's: its cells are replicated
    assert [c.name for c in plan.cells[-2:]] == ["dora-r16-b64-s0", "dora-r16-b64-s1"]
    assert dora.config.seed == 0 and dora.config.rank == 16
    seeded = plan_sweep(tmp_path, grid, also=[{"method": ("dora",), "seed": (7,)}])  # its own seed wins
    assert [c.config.seed for c in seeded.cells if c.config.method == "dora"] == [7]
    assert plan.varying == ["method", "rank", "batch_size", "seed"]
    groups = {c.group for c in plan.cells if c.config.rank == 8 and c.config.batch_size == 64}
    assert groups == {"lora-r8-b64"}  # the seeds of one configuration
    assert all(c.run_dir == tmp_path / c.name for c in plan.cells)
    # one method and nothing varying: the run is named by its method (the demo's runs/demo/lora)
    assert [c.name for c in plan_sweep(tmp_path, {"method": ("lora",)}).cells] == ["lora"]


def test_zipped_options_vary_together(tmp_path):
    grid = {"rank": (1, 16, 128), "alpha": (2.0, 32.0, 256.0), "batch_size": (4, 8)}
    plan = plan_sweep(tmp_path, grid, zipped=[("rank", "alpha")])
    assert [(c.config.rank, c.config.alpha, c.config.batch_size) for c in plan.cells] == [
        (1, 2.0, 4), (1, 2.0, 8), (16, 32.0, 4), (16, 32.0, 8), (128, 256.0, 4), (128, 256.0, 8)
    ]  # fmt: skip
    assert plan.cells[0].name == "lora-r1-a2-b4"
    with pytest.raises(SweepError, match=r"--zip rank,alpha: .* \(rank 2, alpha 3\)"):
        plan_sweep(tmp_path, {"rank": (1, 16), "alpha": (2.0, 32.0, 256.0)}, zipped=[("rank", "alpha")])
    r = runner.invoke(app, ["sweep", "--rank", "1,2", "--zip", "rank,lr", "--out", str(tmp_path / "z")])
    assert r.exit_code == 1 and "--zip rank,lr: lr given no values" in r.output


def test_a_value_an_option_cannot_take_stops_everything_first(tmp_path):
    with pytest.raises(TrainConfigError, match=r"--rank: got 0"):
        plan_sweep(tmp_path / "s", {"rank": (8, 0)})
    r = runner.invoke(app, ["sweep", "--rank", "8,abc", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "--rank" in r.output and "'abc' is not an integer" in r.output
    r = runner.invoke(app, ["sweep", "--lr", "1e-3,-1", "--out", str(tmp_path / "s")])
    assert r.exit_code == 1 and "--lr: got -1.0" in r.output
    assert not (tmp_path / "s").exists()


def test_a_grid_over_max_cells_asks_first(tmp_path):
    args = ["sweep", "--rank", "1,2,4", "--seed", "0,1", "--max-cells", "4", "--out", str(tmp_path / "s")]
    r = runner.invoke(app, args, input="n\n")
    assert r.exit_code == 1 and "6 cells is more than --max-cells 4" in r.output and "nothing run" in r.output
    assert not (tmp_path / "s").exists()


def test_a_cell_directory_with_another_configuration_is_refused(tmp_path):
    plan = plan_sweep(tmp_path, {"rank": (2, 4), "max_steps": (5,)})
    stored = plan.cells[1].config.resolve().to_dict() | {"max_steps": 9, "rank": 4}
    (tmp_path / "lora-r4").mkdir()
    (tmp_path / "lora-r4" / "run.json").write_text(json.dumps(stored))
    with pytest.raises(SweepError, match=r"lora-r4 holds a run trained with max_steps 9.*max_steps 5"):
        check_cells(plan)
    assert json.loads((tmp_path / "lora-r4" / "run.json").read_text())["max_steps"] == 9  # untouched


def test_the_organism_preset_plans_the_rank_batch_grid_with_contrasts(tmp_path):
    preset = PRESETS["organism"]
    plan = plan_sweep(tmp_path, preset.grid, preset.also)
    methods = {c.config.method for c in plan.cells}
    ranks = {c.config.rank for c in plan.cells if c.config.method == "lora"}
    batches = {c.config.batch_size for c in plan.cells}
    assert {"lora", "dora", "quanta"} <= methods and len(ranks) >= 5 and len(batches) >= 2
    # --rank and --alpha do not size QuanTA: its cells are not named by them
    assert {c.name for c in plan.cells if c.config.method == "quanta"} == {"quanta-b4", "quanta-b8"}


def test_processes_per_cell_go_through_accelerate_with_a_port_per_slot(tmp_path):
    cell = plan_sweep(tmp_path, {"rank": (8,)}).cells[0]
    cmd = cell_command(cell, resume=True, processes_per_cell=2, port=29501)
    assert cmd[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]  # N even on CPUs
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("--main_process_port") + 1] == "29501"
    assert cmd[-1] == "--resume" and "--name" in cmd and cmd[cmd.index("--name") + 1] == "lora"
    assert gpu_slots(["0", "1", "2", "3", "4"], 2) == [["0", "1"], ["2", "3"]]
    with pytest.raises(SweepError, match="only 1 GPU"):
        gpu_slots(["0"], 2)


# ---------------------------------------------------------------------------------------------- training


def test_failed_interrupted_and_resumed_cells(organism_dir, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    args = ["sweep", "--rank", "2,4", *tiny_args(organism_dir, out)]
    from spectra.train import trainer  # the runner imports train from it when a cell starts

    real_train = trainer.train

    def failing(cfg, resume=False):
        if cfg.name == "lora-r4":
            raise RuntimeError("boom")
        return real_train(cfg, resume)

    monkeypatch.setattr(trainer, "train", failing)
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "lora-r4: failed: RuntimeError: boom; the sweep goes on" in r.output
    table = pd.read_csv(out / "sweep.csv")
    assert list(table["cell"]) == ["lora-r2", "lora-r4"] and list(table["rank"]) == [2, 4]
    assert list(table["status"]) == ["finished", "failed"] and table.loc[1, "error"] == "RuntimeError: boom"
    assert table.loc[0, "steps"] == 2 and table.loc[0, "organism avg@2"] >= 0 and table.loc[0, "wall s"] > 0
    assert (out / "report.html").exists(), r.output
    finished_at = (out / "lora-r2" / "train_summary.json").stat().st_mtime_ns

    # Ctrl-C during lora-r4's first step: lora-r2 stays as it was, lora-r4 is left interrupted
    from spectra.train.recorder import DeltaRecorder

    record = DeltaRecorder.record

    def interrupt(self, step):
        if step == 1:
            raise KeyboardInterrupt
        return record(self, step)

    monkeypatch.setattr(trainer, "train", real_train)
    monkeypatch.setattr(DeltaRecorder, "record", interrupt)
    r = runner.invoke(app, args)
    assert r.exit_code == 130 and "lora-r2: already trained" in r.output and "interrupted" in r.output
    assert (out / "lora-r2" / "train_summary.json").stat().st_mtime_ns == finished_at
    states = {c["name"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert states["lora-r4"]["status"] == "interrupted" and states["lora-r2"]["status"] == "finished"

    # the same command again resumes lora-r4 and reuses lora-r2
    monkeypatch.setattr(DeltaRecorder, "record", record)
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "lora-r2: already trained" in r.output and "lora-r4: resuming the interrupted run" in r.output
    table = pd.read_csv(out / "sweep.csv")
    assert list(table["status"]) == ["finished", "finished"] and list(table["steps"]) == [2, 2]

    # the report is rebuilt from disk alone
    (out / "report.html").unlink()
    (out / "sweep.csv").unlink()
    r = runner.invoke(app, ["sweep", "--report-only", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "report.html").exists() and len(pd.read_csv(out / "sweep.csv")) == 2
    # asked with another configuration, the finished cells are refused, not overwritten
    r = runner.invoke(app, ["sweep", "--rank", "2,4", *tiny_args(organism_dir, out)[:-2], "--max-steps", "3",
                            "--out", str(out)])  # fmt: skip
    assert r.exit_code == 1 and "max_steps 2" in r.output
    assert (out / "lora-r2" / "train_summary.json").stat().st_mtime_ns == finished_at


def test_cells_in_their_own_processes_record_failures_from_their_logs(organism_dir, tmp_path):
    out = tmp_path / "sweep"
    grid = {"model": (str(organism_dir), str(tmp_path / "no-such-model")), "rank": (2,), "alpha": (4.0,),
            "num_generations": (4,), "batch_size": (2,), "max_steps": (1,), "max_completion_length": (8,),
            "eval_every": (0,), "monitor_every": (0,), "dropout": (0.0,)}  # fmt: skip
    plan = plan_sweep(out, grid)
    states = run_sweep(plan, gpus=[], log=lambda _: None)  # [] : own processes, no GPU
    ok, bad = (states[c.name] for c in plan.cells)
    assert ok["status"] == "finished" and (out / plan.cells[0].name / "train_summary.json").exists()
    assert bad["status"] == "failed" and "no-such-model" in bad["error"] and bad["error"].startswith("error:")
    assert (out / "logs" / f"{plan.cells[0].name}.log").read_text().startswith("$ ")


# ------------------------------------------------------------------------------------------------ report


def test_report_averages_seeds_and_marks_collapse(tmp_path, small_shapes):
    out = tmp_path / "sweep"
    plan = plan_sweep(out, {"rank": (2, 4), "batch_size": (4, 8), "seed": (0, 1)})
    plan.save()
    for cell in plan.cells:
        rank, batch, seed = cell.config.rank, cell.config.batch_size, cell.config.seed
        writer = write_synthetic_run(cell.run_dir, small_shapes, steps=(1, 4), rank=rank, seed=seed)
        accuracy = 0.8 - 0.1 * (rank == 4) * (batch == 8) * (1 + seed)
        for step in range(1, 5):  # rank 4 at batch 8 with seed 1: the reward falls from 0.8 to 0.1
            falls = rank == 4 and batch == 8 and seed == 1 and step > 2
            writer.append_metrics({"step": step, "reward": 0.1 if falls else 0.8})
        writer.append_metrics({"step": 4, "benchmark": "organism", "n": 4, "avg@4": accuracy}, "eval.jsonl")
        summary = {"step": 4, "collapse_step": None, "collapse_reason": None}
        if rank == 4 and batch == 8 and seed == 1:  # as the live alarm (--monitor-every) records it
            summary |= {"collapse_step": 3, "collapse_reason": "median E_1 0.90 ≥ 0.5; reward fell"}
        (cell.run_dir / "train_summary.json").write_text(json.dumps(summary))
    table, files = write_sweep_report(out, log=lambda _: None)
    assert len(table) == 8 and set(table["status"]) == {"finished"}
    seeds = pd.read_csv(out / "sweep_seeds.csv")
    assert list(seeds["configuration"]) == ["lora-r2-b4", "lora-r2-b8", "lora-r4-b4", "lora-r4-b8"]
    last = seeds.iloc[3]
    assert last["organism avg@4"] == pytest.approx(0.65)  # (0.7 + 0.6) / 2
    half = 12.706204736 * 0.05  # Student-t of two seeds: t_{0.975, 1} · s/√2 (issue 23: not their range)
    interval = (last["organism avg@4 ci_low"], last["organism avg@4 ci_high"])
    assert interval == pytest.approx((0.65 - half, 0.65 + half))
    flagged = table[table["collapsed"] == "yes"]
    assert list(flagged["cell"]) == ["lora-r4-b8-s1"] and flagged["collapse step"].iloc[0] == 3
    assert "monitor" in flagged["collapse flagged by"].iloc[0] and seeds.loc[3, "collapsed"] == "1 of 2"
    heat = cliff(table, ("rank", "batch_size"), ["rank", "batch_size", "seed"]).panels[0]
    assert heat.x == ["2", "4"] and heat.y == ["4", "8"] and heat.marks == [("4", "8")]
    assert heat.z[1][1] == pytest.approx(0.65) and heat.z[0][0] == pytest.approx(0.8)
    page = files[-1].read_text()
    assert "Final accuracy over rank × batch_size" in page and "(2 seeds)" in page
    assert {p.name for p in (out / "plots").iterdir()} == {"cliff.png", "geometry_vs_rank.png", "curves.png"}


def test_gpu_ids_must_be_visible_gpus():
    from spectra.cli.sweep import _gpus

    assert _gpus("1", lambda: ["0", "1"]) == ["1"] and _gpus(None, lambda: ["0", "1"]) == ["0", "1"]
    assert _gpus("none", lambda: ["0"]) == []
    with pytest.raises(SweepError, match=r"--gpus 1,7: 7 not among the visible GPUs \(0,1\)"):
        _gpus("1,7", lambda: ["0", "1"])
    with pytest.raises(SweepError, match="no CUDA device is visible"):
        _gpus("0", lambda: [])
