"""The command line starts at once: ``spectra --help`` and every command's ``--help`` import neither torch
nor transformers, ``import spectra`` is light until a torch-backed export is asked for, and ``spectra
train`` says what it is doing before the trainer stack is imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import typer
from spectra.cli.main import TRAIN_BANNER, app
from typer.testing import CliRunner

import spectra

HEAVY = ("torch", "transformers", "trl", "peft")


def _commands(command=None, path=()) -> list[tuple[str, ...]]:
    """Every command of the app as its words: ("train",), ("probe", "maturity"), …, the groups too."""
    command = command or typer.main.get_command(app)
    found = [path]
    for name, sub in getattr(command, "commands", {}).items():
        found += _commands(sub, (*path, name))
    return found


def _python(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, timeout=120
    )


def test_every_help_starts_without_torch_or_transformers():
    commands = _commands()
    named = {" ".join(c) for c in commands}
    want = {"", "train", "analyze", "compare", "eval", "demo", "sweep", "import", "audit", "probe"}
    assert want | {"probe maturity", "info", "metrics"} <= named
    script = """
        import contextlib, io, json, sys
        from spectra.cli.main import app
        seen = {}
        for words in json.loads(sys.argv[1]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    app([*words, "--help"], prog_name="spectra", standalone_mode=False)
                except SystemExit:
                    pass
            heavy = [m for m in HEAVY_NAMES if m in sys.modules]
            seen[" ".join(words)] = {"heavy": heavy, "usage": "Usage:" in out.getvalue()}
        print(json.dumps(seen))
    """.replace("HEAVY_NAMES", repr(HEAVY))
    done = _python(script, json.dumps(commands))
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(seen) == named
    for words, found in seen.items():  # checked after each: the first command that imports one is named
        assert found == {"heavy": [], "usage": True}, f"spectra {words} --help: {found}"


def test_python_m_help_imports_no_torch():
    script = """
        import atexit, runpy, sys
        atexit.register(lambda: print("loaded:", [m for m in HEAVY_NAMES if m in sys.modules]))
        sys.argv = ["spectra", "--help"]
        runpy.run_module("spectra.cli.main", run_name="__main__")
    """.replace("HEAVY_NAMES", repr(HEAVY))
    done = _python(script)
    assert "Usage:" in done.stdout and "loaded: []" in done.stdout, done.stdout + done.stderr


def test_import_spectra_is_light_and_its_exports_are_the_same():
    assert spectra.__all__ == [
        "Analysis", "DeltaFileError", "DeltaOperator", "Dense", "DoRA", "EngineConfig", "LowRank", "Run",
        "RunDirError", "RunWriter", "Scaled", "ShapeMismatchError", "SpectraError", "VectorDelta",
        "__version__", "analyze_run", "load_run",
    ]  # fmt: skip
    for name in spectra.__all__:
        assert getattr(spectra, name) is not None and name in dir(spectra), name
    from spectra.pipeline import load_run
    from spectra.writer import RunWriter

    assert spectra.load_run is load_run and spectra.RunWriter is RunWriter  # the objects themselves
    try:
        spectra.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("an unknown attribute of spectra was found")
    script = """
        import sys
        import spectra
        from spectra import SpectraError, __version__
        light = "torch" not in sys.modules
        from spectra import RunWriter, load_run
        print(light, "torch" in sys.modules, callable(load_run), RunWriter.__name__, __version__)
    """
    done = _python(script)
    assert done.stdout.split() == ["True", "True", "True", "RunWriter", spectra.__version__], done.stderr


def test_the_train_banner_comes_before_torch_is_imported(tmp_path):
    # an import hook that says when torch is first asked for, and stops there: the order of the two lines
    # is the order in which a user sees them, whatever the imports cost
    script = """
        import sys
        class Marker:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    print("<torch is imported here>", flush=True)
                    raise ImportError("stopped by the test")
                return None
        sys.meta_path.insert(0, Marker())
        from spectra.cli.main import app
        app(["train", "--out", sys.argv[1]], prog_name="spectra")
    """
    done = _python(script, str(tmp_path))
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert done.returncode == 1, done.stdout + done.stderr  # the run could not start without torch
    assert lines[0] == TRAIN_BANNER and "<torch is imported here>" in lines[1:], done.stdout
    assert not any(tmp_path.iterdir())


def test_the_banner_is_printed_once_per_launch(monkeypatch, tmp_path):
    monkeypatch.setattr("spectra.train.train", lambda cfg, resume=False: tmp_path / "lora")
    monkeypatch.delenv("RANK", raising=False)
    first = CliRunner().invoke(app, ["train", "--out", str(tmp_path)])
    assert first.exit_code == 0 and first.output.splitlines()[0] == TRAIN_BANNER, first.output
    other = CliRunner().invoke(app, ["train", "--out", str(tmp_path)], env={"RANK": "1"})
    assert other.exit_code == 0 and TRAIN_BANNER not in other.output  # a launched process but the first
