"""Data-parallel `spectra train` (issue 17 §1): two CPU processes (gloo) against one process.

``accelerate launch --multi_gpu --num_processes 2 -m spectra.cli.main train --model <organism fixture> …``
trains LoRA for 3 steps on the CPU with the ΔW recorder, the live geometry monitor (every step) and the
held-out evaluation on. (``--multi_gpu`` is accelerate's torchrun launcher and works without GPUs;
``accelerate launch --cpu --num_processes 2`` starts *one* process unless accelerate is set up for
mpirun.) The launched run is SIGKILLed as the trainer starts saving checkpoint-3 (after step 3's ΔW and
log row were written), then resumed with ``--resume``. A one-process run of the same configuration (the
same global batch of 2 prompts × 4 rollouts) trains with ``python -m spectra.cli.main train``. The tests
compare the two.

Each training process imports a ``sitecustomize`` module (put on ``PYTHONPATH``) that calls
:func:`install`, which patches, in that process only:

- the accuracy reward: a hash of the completion mod 3 instead (it varies within a group, so that every
  step has non-zero advantages on the barely warm-started organism, which never answers right); each
  rollout is logged with its process and step, to see how the rollouts of a step are split;
- the sampling of rollouts: each from its own seeded stream keyed by its prompt and its place in its
  group (:class:`spectra.train.eval.sampling.SeededSampling`, the Gumbel-max draw of ``spectra eval``). TRL
  draws a step's rollouts in one ``generate`` call per process, seeded ``seed + rank``: with its sampler
  one process and two processes draw different rollouts, and their numbers differ by sampling, not by
  data parallelism. With the same rollouts they differ only by floating-point rounding;
- the run writer: each write is logged with the process that made it (files are written by the main
  process, each once);
- the trainer's checkpoint save: process 0 SIGKILLs itself as it starts saving checkpoint
  ``SPECTRA_TEST_KILL_AT``.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from _requires import require

require("trl")

HERE = Path(__file__).parent
KILL_AT = 3
SITECUSTOMIZE = f"""
import os, sys
if "LOCAL_RANK" in os.environ or "SPECTRA_TEST_ONE" in os.environ:  # the training processes, not the launcher
    sys.path.insert(0, {str(HERE)!r})
    import test_ddp
    test_ddp.install()
"""


# ----------------------------------------------------------------------------------- the test harness


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _log(kind: str, row: dict) -> None:
    with open(Path(os.environ["SPECTRA_TEST_LOGS"]) / f"{kind}-rank{_rank()}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def hash_reward(completions, prompts, trainer_state, **kwargs) -> list[float]:
    """CRC-32 of the completion mod 3; each rollout is logged with its process and the step it trains."""
    rewards = [float(zlib.crc32(str(c).encode()) % 3) for c in completions]
    for p, c, r in zip(prompts, completions, rewards, strict=True):
        _log("rollouts", {"step": trainer_state.global_step + 1, "prompt": p, "completion": c, "reward": r})
    return rewards


hash_reward.__name__ = "accuracy"  # TRL's log keys (rewards/accuracy/mean) as for the real reward


class _SeededDraw:
    """Each row's next token drawn from its own seeded stream (SeededSampling's Gumbel noise + argmax),
    returned as a one-hot distribution, so that TRL's ``do_sample=True`` takes that token."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        from spectra.train.eval.sampling import SeededSampling, row_seed

        seen: collections.Counter = collections.Counter()
        seeds = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = tuple(t for t, m in zip(ids, mask, strict=True) if m)  # left padding dropped
            seeds.append(row_seed(0, zlib.crc32(repr(prompt).encode()), seen[prompt]))
            seen[prompt] += 1
        self.sampling = SeededSampling(seeds, input_ids.device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        pick = self.sampling(input_ids, scores).argmax(-1, keepdim=True)
        return torch.full_like(scores, -torch.inf).scatter_(-1, pick, 0.0)


def install() -> None:
    """Install the harness in this process (module docstring)."""
    import spectra.train.rewards
    import transformers
    from transformers import LogitsProcessorList
    from transformers.generation.utils import GenerationMixin

    from spectra.writer import RunWriter

    spectra.train.rewards.accuracy_reward = hash_reward

    generate = GenerationMixin.generate

    def seeded_generate(self, *args, **kwargs):
        if kwargs.get("logits_processor") is None and "attention_mask" in kwargs:  # TRL's rollouts (the
            # held-out evaluation samples with its own seeded streams already)
            draw = _SeededDraw(kwargs["input_ids"], kwargs["attention_mask"])
            kwargs["logits_processor"] = LogitsProcessorList([draw])
        return generate(self, *args, **kwargs)

    GenerationMixin.generate = seeded_generate

    def logged(name):
        method = getattr(RunWriter, name)

        def write(self, *args, **kwargs):
            step = args[0] if name == "write_delta" else None
            _log("writes", {"call": name, "step": step})
            return method(self, *args, **kwargs)

        return write

    for name in ("write_config", "write_base_weights", "write_base_pointer", "write_base_spectra",
                 "write_delta", "append_metrics"):  # fmt: skip
        setattr(RunWriter, name, logged(name))

    kill_at = int(os.environ.get("SPECTRA_TEST_KILL_AT", "0"))
    if kill_at:
        save = transformers.Trainer._save_checkpoint

        def killed_save(self, *args, **kwargs):
            if self.state.global_step == kill_at and self.args.process_index == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return save(self, *args, **kwargs)

        transformers.Trainer._save_checkpoint = killed_save


# --------------------------------------------------------------------------------------------- the runs


def config(organism_dir: Path, out: Path, name: str):
    from test_train import tiny

    return tiny(
        organism_dir, out, "lora", name=name, max_steps=3, delta_every=1, save_every=2, eval_every=2,
        eval_k=2, eval_problems=4, eval_dataset="organism", monitor_every=1,
    )  # fmt: skip


def read_logs(folder: Path, kind: str) -> dict[int, list[dict]]:
    """rank → rows of the harness log ``kind``."""
    return {
        int(p.stem.rsplit("rank", 1)[1]): [json.loads(line) for line in p.read_text().splitlines()]
        for p in sorted(folder.glob(f"{kind}-rank*.jsonl"))
    }


def launch(cfg, logs: Path, *extra: str, processes: int = 2, kill_at: int = 0) -> subprocess.CompletedProcess:
    """``spectra train`` with the harness, on the CPU: two processes with ``accelerate launch --multi_gpu
    --num_processes 2 -m spectra.cli.main train`` (``--multi_gpu`` is accelerate's torchrun launcher; with
    ``--cpu`` it starts one process unless mpirun is configured), one with ``python -m spectra.cli.main``."""
    from spectra.cli.options import to_args

    logs.mkdir(parents=True)
    site = logs / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env |= {"SPECTRA_TEST_LOGS": str(logs), "SPECTRA_TEST_KILL_AT": str(kill_at), "SPECTRA_DEBUG": "1"}
    env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # gloo on the CPU; one thread a process
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SPECTRA_TEST_ONE"):
        env.pop(key, None)
    if processes == 1:
        env["SPECTRA_TEST_ONE"] = "1"
        command = [sys.executable, "-m", "spectra.cli.main"]
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), "-m", "spectra.cli.main"]  # fmt: skip
    return subprocess.run(
        [*command, "train", *to_args(cfg), *extra], env=env, capture_output=True, text=True, timeout=600
    )


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(organism_dir, tmp_path_factory):
    """The two-process run (killed at checkpoint-3's save, then resumed) and the one-process run."""
    root = tmp_path_factory.mktemp("ddp")
    two = config(organism_dir, root, "two")
    t0, cpu0 = time.perf_counter(), _children_cpu()
    killed = launch(two, root / "logs-killed", kill_at=KILL_AT)
    t1 = time.perf_counter()
    killed_files = sorted(p.name for p in (root / "two" / "deltas").iterdir())
    killed_steps = [json.loads(r)["step"] for r in (root / "two" / "metrics.jsonl").read_text().splitlines()]
    resumed = launch(two, root / "logs-resumed", "--resume")
    t2 = time.perf_counter()

    one = launch(config(organism_dir, root, "one"), root / "logs-one", processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    t3, cpu = time.perf_counter(), _children_cpu() - cpu0
    print(
        f"\n2 processes: killed run {t1 - t0:.1f} s, resumed {t2 - t1:.1f} s; 1 process {t3 - t2:.1f} s "
        f"(wall); {cpu:.1f} CPU-seconds in all; load average {os.getloadavg()[0]:.1f}"
    )
    return {
        "root": root, "one": root / "one", "two": root / "two", "killed": killed, "resumed": resumed,
        "killed_deltas": killed_files, "killed_steps": killed_steps,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ tests


def test_two_processes_resume_after_a_kill_and_write_once(runs):
    import spectra

    killed, resumed = runs["killed"], runs["resumed"]
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # killed as checkpoint-3's save began: step 3's ΔW and log row were written, checkpoint-3 was not
    assert runs["killed_deltas"] == [f"step_{s:06d}.h5" for s in range(4)]
    assert runs["killed_steps"] == [1, 2, 3]
    two = runs["two"]
    run = spectra.load_run(two)
    assert run.steps == [0, 1, 2, 3]
    assert sorted(p.name for p in (two / "deltas").iterdir()) == [f"step_{s:06d}.h5" for s in range(4)]
    assert list(run.metrics["step"]) == [1, 2, 3]  # the abandoned step 3 was dropped, then trained again
    assert list(run.eval["step"]) == [0, 2, 3]
    assert {p.name for p in (two / "checkpoints").iterdir() if p.is_dir()} == {"checkpoint-2", "checkpoint-3"}
    saved = {p.name for p in (two / "checkpoints" / "checkpoint-3").iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= saved  # one RNG state per process
    # every file of the run directory is written by the main process only, each write once
    for phase, steps in (("killed", [0, 1, 2, 3]), ("resumed", [3])):
        writes = read_logs(runs["root"] / f"logs-{phase}", "writes")
        assert set(writes) == {0}, f"{phase}: process 1 wrote to the run directory: {writes.get(1)}"
        calls = collections.Counter(w["call"] for w in writes[0])
        assert [w["step"] for w in writes[0] if w["call"] == "write_delta"] == steps
        if phase == "killed":
            assert calls["write_config"] == calls["write_base_spectra"] == calls["write_base_weights"] == 1
        else:  # base/ and run.json are kept on resume
            assert calls["write_base_spectra"] == calls["write_base_weights"] == 0


def test_rollouts_of_a_step_are_split_over_the_processes(runs):
    """Each process samples whole groups (here 1 prompt × 4 rollouts of the step's 2 prompts); together
    they are the one-process run's global batch: the same prompts, and with seeded sampling the same
    rollouts, at every step."""
    two = read_logs(runs["root"] / "logs-killed", "rollouts")
    resumed = read_logs(runs["root"] / "logs-resumed", "rollouts")
    one = read_logs(runs["root"] / "logs-one", "rollouts")[0]
    assert set(two) == {0, 1}
    for rank in (0, 1):  # the resumed run trained step 3 again, from checkpoint-2
        two[rank] = [r for r in two[rank] if r["step"] < KILL_AT] + resumed[rank]
    for step in (1, 2, 3):
        parts = [[(r["prompt"], r["completion"]) for r in two[rank] if r["step"] == step] for rank in (0, 1)]
        assert [len(p) for p in parts] == [4, 4] and all(len({q for q, _ in p}) == 1 for p in parts), parts
        assert parts[0][0][0] != parts[1][0][0]  # two different prompts
        whole = [(r["prompt"], r["completion"]) for r in one if r["step"] == step]
        assert sorted(parts[0] + parts[1]) == sorted(whole)


def test_two_processes_match_one(runs):
    """Same step sequence, files and log columns; rewards equal (the same rollouts); ΔW and the
    gradient norm within the float32 reductions' rounding."""
    import spectra

    one, two = spectra.load_run(runs["one"]), spectra.load_run(runs["two"])
    assert one.steps == two.steps == [0, 1, 2, 3]

    def files(run_dir: Path) -> set[str]:
        found = (p for p in run_dir.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
        return {str(p.relative_to(run_dir)) for p in found}

    assert files(runs["one"]) == files(runs["two"])
    m1, m2 = one.metrics, two.metrics
    assert set(m1.columns) == set(m2.columns) and list(m1["step"]) == list(m2["step"])
    assert list(m1["reward"]) == list(m2["reward"]) and list(m1["num_tokens"]) == list(m2["num_tokens"])
    assert (m1["reward_std"] > 0).all()  # the comparison is of real updates
    grad = (m1["grad_norm"] - m2["grad_norm"]).abs() / m1["grad_norm"]
    e1 = one.metrics["geometry/E_1"] - two.metrics["geometry/E_1"]
    worst, rewards = 0.0, list(m1["reward"])
    for step in one.steps[1:]:  # max |ΔW_1 − ΔW_2| over entries / ‖ΔW_1‖_F over all modules, per step
        with one.open_delta(step) as d1, two.open_delta(step) as d2:
            assert set(d1.modules) == set(d2.modules)
            diff = norm = 0.0
            for key in d1.modules:
                a = one.read_module(d1, key)[0].to_dense().double()
                b = two.read_module(d2, key)[0].to_dense().double()
                diff, norm = max(diff, (a - b).abs().max().item()), norm + a.square().sum().item()
        if norm == 0:  # dapo masks truncated completions: a step where all were cut leaves ΔW at 0
            assert diff == 0, step
        else:
            worst = max(worst, diff / norm**0.5)
    print(
        f"\n1 vs 2 processes: rewards {rewards} (equal); max |ΔW_1 − ΔW_2| / ‖ΔW_1‖_F over modules and "
        f"steps {worst:.2e}; grad_norm relative difference ≤ {grad.max():.2e}; "
        f"geometry/E_1 difference ≤ {e1.abs().max():.2e}"
    )
    assert worst < 1e-4 and grad.max() < 1e-4
    assert list(one.eval["step"]) == list(two.eval["step"]) == [0, 2, 3]


def test_recorded_delta_is_the_merge_of_the_two_process_checkpoint(runs, organism_dir):
    """Step 3's ΔW, recorded by the main process, equals PEFT's merge of checkpoint-3's adapter minus W0."""
    from peft import PeftModel
    from spectra.train.checkpoint import load_pretrained
    from spectra.train.methods import get_method

    import spectra

    _, base = load_pretrained(organism_dir, torch.float32, "--model")
    model = PeftModel.from_pretrained(base, runs["two"] / "checkpoints" / "checkpoint-3")
    merged = get_method("lora").merged_weights(model)
    run = spectra.load_run(runs["two"])
    moved = 0.0
    with run.open_delta(3) as d:
        assert set(d.modules) == set(merged)
        for key in d.modules:
            rec, w0 = run.read_module(d, key)
            expected = merged[key].double() - w0.double()
            torch.testing.assert_close(rec.to_dense().double(), expected, atol=1e-6, rtol=1e-5)
            moved = max(moved, expected.abs().max().item())
    assert moved > 1e-4


def test_accelerate_cpu_launch_that_starts_one_process_warns(organism_dir, tmp_path, monkeypatch):
    """``accelerate launch --cpu --num_processes 2`` starts the command once (accelerate's multi-CPU
    launcher is mpirun), with this environment (ACCELERATE_USE_CPU, and MASTER_ADDR set only when more
    than one process was asked for): the run would silently be a one-process run."""
    from spectra.train.trainer import prepare

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.warns(UserWarning, match=r"`accelerate launch --cpu` started one process .*torchrun"):
        prepare(config(organism_dir, tmp_path, "one"))
    monkeypatch.delenv("MASTER_ADDR")  # `accelerate launch --cpu` of one process: nothing to say
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*accelerate launch --cpu")
        prepare(config(organism_dir, tmp_path, "two"))


def test_monitor_steps_between_logging_steps_under_two_processes(organism_dir, tmp_path):
    """The monitor asks for a log at its steps; under two processes every process must log there."""
    import spectra

    cfg = config(organism_dir, tmp_path, "sparse")
    cfg = dataclasses.replace(cfg, max_steps=2, delta_every=0, eval_every=0, monitor_every=1, logging_steps=2)
    result = launch(cfg, tmp_path / "logs")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = spectra.load_run(tmp_path / "sparse").metrics
    # both steps logged, each with the monitor's keys (a step whose ΔW is still 0 has no E_1: DAPO masks
    # truncated completions, so an early step may not move the adapter)
    assert list(metrics["step"]) == [1, 2] and (metrics["geometry/modules"] == 14).all()


# ------------------------------------------------------------------------------------- vLLM server mode


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--vllm-mode", "server"], "--vllm-mode: got 'server'; expected colocate without --use-vllm"),
        (["--use-vllm", "--vllm-mode", "remote"], "--vllm-mode: got 'remote'; expected colocate or server"),
        (
            ["--use-vllm", "--vllm-mode", "server", "--vllm-server-url", "localhost:8000"],
            "--vllm-server-url: got 'localhost:8000'; expected an http(s)://host[:port] address",
        ),
        (
            ["--use-vllm", "--vllm-mode", "server", "--vllm-server-url", "http://10.0.0.2:80000"],
            "--vllm-server-url: got 'http://10.0.0.2:80000'; expected an http(s)://host[:port] address",
        ),
        (
            ["--use-vllm", "--vllm-server-url", "http://10.0.0.2:8000"],
            "--vllm-server-url: got 'http://10.0.0.2:8000'; expected unset without --vllm-mode server",
        ),
        (
            ["--use-vllm", "--vllm-mode", "server", "--vllm-group-port", "0"],
            "--vllm-group-port: got 0; expected an integer ≥ 1 and ≤ 65,535",
        ),
        (["--vllm-group-port", "51216"], "--vllm-group-port: got 51216; expected unset without --vllm-mode"),
        (["--use-vllm", "--vllm-mode", "server"], "--use-vllm: vllm is not installed"),  # the mode is valid
    ],
)
def test_vllm_server_mode_guards_are_one_line_errors(options, message, tmp_path):
    from spectra.cli.main import app
    from typer.testing import CliRunner

    if message.startswith("--use-vllm") and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed: the options are valid and the run would start")
    result = CliRunner().invoke(app, ["train", *options, "--out", str(tmp_path)])
    assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not any(tmp_path.iterdir())


def test_vllm_server_mode_maps_onto_trl(organism_dir, tmp_path):
    from spectra.train import TrainConfig
    from spectra.train.trainer import grpo_config

    server = TrainConfig(
        model=str(organism_dir), use_vllm=True, vllm_mode="server", vllm_server_url="http://10.0.0.2:8000/",
        vllm_group_port=51300, batch_size=2, num_generations=4,
    ).resolve()  # fmt: skip
    args = grpo_config(server, tmp_path)
    assert (args.use_vllm, args.vllm_mode, args.vllm_server_base_url) == (True, "server", "http://10.0.0.2:8000")
    assert args.vllm_group_port == 51300
    default = grpo_config(dataclasses.replace(server, vllm_server_url=None, vllm_group_port=None), tmp_path)
    assert default.vllm_server_base_url == "http://localhost:8000" and default.vllm_group_port == 51216
    colocate = dataclasses.replace(server, vllm_mode="colocate", vllm_server_url=None, vllm_group_port=None)
    colocate = grpo_config(colocate, tmp_path)
    assert colocate.vllm_mode == "colocate" and colocate.vllm_server_base_url is None
