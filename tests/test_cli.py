"""The `spectra` command: version, run info, and one-line errors."""

from __future__ import annotations

from spectra.cli.main import app
from typer.testing import CliRunner

import spectra

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"spectra {spectra.__version__}"


def test_info_lists_steps_and_modules(lora_run):
    result = runner.invoke(app, ["info", str(lora_run)])
    assert result.exit_code == 0, result.output
    assert "steps: [0, 5, 10]" in result.output and "modules: 14" in result.output


def test_info_on_a_non_run_is_one_line_and_non_zero(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 1
    assert "no run.json" in result.output and "Traceback" not in result.output


def test_train_help_lists_every_method_and_option():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for word in ("--method", "--loss", "--delta-every", "--use-vllm", "--deepspeed", "quanta", "lntuning"):
        assert word in result.output


def test_train_bad_option_is_one_line_and_non_zero(tmp_path):
    result = runner.invoke(app, ["train", "--method", "lora2", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "--method: got 'lora2'; expected one of" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["train", "--rank", "0", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--rank: got 0; expected an integer ≥ 1" in result.output
    assert not any(tmp_path.iterdir())  # nothing was written for a run that could not start


def test_train_runs_end_to_end_from_the_command_line(organism_dir, tmp_path):
    args = ["train", "--model", str(organism_dir), "--method", "dora", "--rank", "4", "--max-steps", "2",
            "--batch-size", "2", "--num-generations", "4", "--max-completion-length", "8",
            "--delta-every", "1", "--out", str(tmp_path)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"run written to {tmp_path / 'dora'}" in result.output
    run = spectra.load_run(tmp_path / "dora")
    assert run.steps == [0, 1, 2] and run.config["method"] == "dora"
    again = runner.invoke(app, args)  # the name is taken: a new directory, nothing overwritten
    assert again.exit_code == 0 and f"run written to {tmp_path / 'dora-2'}" in again.output


def test_a_library_error_during_training_is_one_line(monkeypatch, tmp_path):
    def explode(cfg, resume=False):
        raise ValueError("deep inside a library\nsecond line")

    monkeypatch.setattr("spectra.train.train", explode)
    monkeypatch.delenv("SPECTRA_DEBUG", raising=False)
    result = runner.invoke(app, ["train", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "error: ValueError: deep inside a library (set SPECTRA_DEBUG=1" in result.output
    assert "second line" not in result.output and "Traceback" not in result.output


def test_install_hints_keep_their_brackets(tmp_path):
    result = runner.invoke(app, ["train", "--use-vllm", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "spectra-rlvr[gpu]" in result.output


def test_non_finite_and_absurd_numbers_are_refused_before_anything_is_written(tmp_path):
    result = runner.invoke(app, ["train", "--alpha", "inf", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--alpha: got inf; expected a finite number" in result.output
    result = runner.invoke(app, ["train", "--max-steps", "1" + "0" * 30, "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert f"--max-steps: got {10**30}; expected an integer ≥ 1 and ≤ 10,000,000" in result.output
    result = runner.invoke(app, ["train", "--loss", "ppo", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--loss: got 'ppo'; expected one of grpo, dapo" in result.output
    assert "Traceback" not in result.output and not any(tmp_path.iterdir())


def _wrapped_failure(cfg, resume=False):
    try:
        int("not a number")
    except ValueError as e:
        raise spectra.SpectraError("--dataset data.jsonl: could not be read") from e


def test_spectra_debug_keeps_the_cause_of_spectras_own_errors(monkeypatch, tmp_path):
    monkeypatch.setattr("spectra.train.train", _wrapped_failure)
    monkeypatch.delenv("SPECTRA_DEBUG", raising=False)
    quiet = runner.invoke(app, ["train", "--out", str(tmp_path)])
    assert quiet.exit_code == 1 and "error: --dataset data.jsonl: could not be read" in quiet.output
    assert isinstance(quiet.exception, SystemExit)  # one line, no traceback
    loud = runner.invoke(app, ["train", "--out", str(tmp_path)], env={"SPECTRA_DEBUG": "1"})
    assert loud.exit_code == 1 and isinstance(loud.exception, spectra.SpectraError)
    assert isinstance(loud.exception.__cause__, ValueError)  # raised with its chain, not swallowed


def test_spectra_debug_prints_the_chained_traceback_for_every_command(tmp_path):
    import subprocess
    import sys

    (tmp_path / "run.json").write_text("{}")
    code = (
        "import spectra, sys\n"
        "def load_run(path):\n"
        "    try:\n        {}['model']\n"
        "    except KeyError as e:\n        raise spectra.RunDirError(f'{path}: broken') from e\n"
        "spectra.load_run = load_run\n"
        "from spectra.cli.main import app\n"
        f"app(['info', {str(tmp_path)!r}])\n"
    )
    env = {**__import__("os").environ, "SPECTRA_DEBUG": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert "KeyError" in done.stderr and "direct cause" in done.stderr and "broken" in done.stderr
    env.pop("SPECTRA_DEBUG")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "KeyError" not in done.stderr + done.stdout
    assert "error:" in done.stdout and "broken" in done.stdout


def test_a_bad_device_names_the_option(lora_run):
    r = runner.invoke(app, ["analyze", str(lora_run), "--device", "nonsense"])
    assert r.exit_code == 1 and "--device nonsense" in r.output and "Traceback" not in r.output
    assert not (lora_run / "analysis").exists()  # refused before anything was computed or written


def test_metrics_prints_the_registry():
    from spectra.metrics import registry

    r = runner.invoke(app, ["metrics"])
    assert r.exit_code == 0 and r.output == registry.markdown()
    assert all(f"`{m.name.replace('{pct}', '90')}`" in r.output for m in registry.METRICS.values())
