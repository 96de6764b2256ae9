"""An analysis spread over processes (spectra.shard): the same metrics.csv as one process, whether the
workers are started by ``--devices cpu,cpu`` or by torchrun; a worker that dies or a Ctrl-C leaves
analysis/ as it was; the plan's shares; bad --devices."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _requires import require

from spectra.engine import EngineConfig
from spectra.pipeline import analyze_run
from spectra.schedule import Unit, _share
from spectra.shard import ShardError
from spectra.synthetic import qwen2_shapes, write_synthetic_run

SHAPES = qwen2_shapes(48, 96, 16, 1)
FAST = EngineConfig(device="cpu", ks=(1, 4), wt="none", bf16=False)


def _run(path: Path, steps=(0, 5, 10), rank=None) -> Path:
    write_synthetic_run(path, SHAPES, steps=steps, rank=rank)
    return path


def _reference(path: Path, **kwargs):
    """The one-process analysis, with as many threads as each of two workers gets (a BLAS reduction
    order that depends on the thread count would change the last bit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        return analyze_run(path, **kwargs)
    finally:
        torch.set_num_threads(before)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "analysis").iterdir())}


def test_two_workers_write_the_metrics_of_one_process(tmp_path):
    one = _run(tmp_path / "one")
    (one / "deltas" / "step_000005.h5").write_bytes(b"not hdf5")  # a problem row, planned by rank 0
    two = tmp_path / "two"
    shutil.copytree(one, two)
    ref = _reference(one)
    got = analyze_run(two, devices="cpu,cpu")
    assert got.new_steps == [0, 5, 10]
    assert (got.table["status"] == "unreadable").sum() == 1
    for name in ("metrics.csv", "spectra.csv"):  # the same bytes (but the run's path in the error)
        expected = (one / "analysis" / name).read_text().replace(str(one), str(two))
        assert (two / "analysis" / name).read_text() == expected, name
    assert got.summary["steps"] == ref.summary["steps"]
    assert analyze_run(two).new_steps == [5]  # the same cache: only the unreadable step is tried again


def test_shares_are_consecutive_and_balanced():
    one_step = [Unit(10, [f"m{i}"], True, c) for i, c in enumerate([4, 4, 1, 1, 1, 1])]
    shares = [_share(one_step, r, 2) for r in range(2)]
    assert shares[0] + shares[1] == one_step  # every unit once, in order
    assert all(abs(sum(u.cost for u in s) - 6) <= 4 for s in shares)  # within one unit of the half
    steps = [Unit(s, ["a", "b"], True, 3) for s in range(6)]
    assert [[u.step for u in _share(steps, r, 3)] for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert _share(steps, 0, 1) == steps


def test_bad_devices_are_one_line_errors(tmp_path):
    run = _run(tmp_path / "r", steps=(0,))
    with pytest.raises(ShardError, match=r"--devices cpu,cuda:7: .*(CUDA|cuda)"):
        analyze_run(run, devices="cpu,cuda:7")
    with pytest.raises(ShardError, match="--devices"):
        analyze_run(run, devices=" , ")


def test_the_devices_option_reaches_the_analysis(tmp_path):
    from spectra.cli.main import app
    from typer.testing import CliRunner

    run = _run(tmp_path / "r", steps=(0,))
    for command in (["analyze", str(run)], ["compare", str(run), "--out", str(tmp_path / "cmp")]):
        r = CliRunner().invoke(app, [*command, "--devices", "cpu,cuda:7"])
        assert r.exit_code == 1 and "--devices cpu,cuda:7:" in r.output and "Traceback" not in r.output


def _workers() -> list:
    psutil = require("psutil")
    kids = psutil.Process().children(recursive=True)
    return [p for p in kids if any("spawn_main" in part for part in p.cmdline())]


def test_a_killed_worker_or_ctrl_c_leaves_the_cache_as_it_was(tmp_path):
    run = _run(tmp_path / "r", steps=(0, 5))
    analyze_run(run, FAST)
    _run(run, steps=(10, 15))  # two new steps: one for each process
    before = _files(run)

    def kill_the_worker(*_):
        for p in _workers():
            p.send_signal(signal.SIGKILL)

    with pytest.raises(ShardError, match=r"analysis worker 1 \(cpu\) was killed by signal 9"):
        analyze_run(run, FAST, devices="cpu,cpu", progress=kill_the_worker)
    assert _files(run) == before and not _workers()

    def interrupt(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        analyze_run(run, FAST, devices="cpu,cpu", progress=interrupt)
    assert _files(run) == before and not _workers()
    assert analyze_run(run, FAST).new_steps == [10, 15]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_processes_share_the_work_and_rank_0_writes(tmp_path):
    one = _run(tmp_path / "one", steps=(0, 5, 10, 15))
    two = tmp_path / "two"
    shutil.copytree(one, two)
    _reference(one)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd = [*launch, "-m", "spectra.cli.main", "analyze", str(two), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("analysed 4 new step(s)") == 1  # rank 0 alone reports
    assert (two / "analysis" / "metrics.csv").read_bytes() == (one / "analysis" / "metrics.csv").read_bytes()
    assert (two / "analysis" / "report.html").exists()
