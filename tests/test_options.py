"""Options declared once: the command line generated from a dataclass, TrainConfig's checks of every
numeric option, and the method registry that ``--method`` reads."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from typing import Literal

import pytest
import typer
from spectra.cli.options import (
    ConfigCommand,
    OptionValueError,
    config_options,
    option_fields,
    parameters,
    to_config,
)
from spectra.train.config import MAX_COUNT, TrainConfig, TrainConfigError
from typer.testing import CliRunner

runner = CliRunner()
CALLS: list[str] = []


def _lazy_colours() -> tuple[str, ...]:
    CALLS.append("called")
    return ("red", "green")


@dataclass
class Toy:
    target: str = field(metadata={"help": "What to work on."})  # no default: a positional argument
    name: str = field(default="x", metadata={"help": "A name.", "group": "First"})
    count: int = field(default=3, metadata={"help": "How many.", "group": "First"})
    scale: float | None = field(default=None, metadata={"help": "A scale.", "group": "Second"})
    parts: tuple[str, ...] = field(default=("a", "b"), metadata={"help": "Parts."})
    loud: bool = field(default=False, metadata={"help": "Shout."})
    quiet: bool = field(default=False, metadata={"help": "Whisper.", "flags": ("--quiet",)})
    mode: Literal["fast", "slow"] = field(default="fast", metadata={"help": "Mode: {choices}."})
    colour: str = field(default="red", metadata={"help": "Colour: {choices}.", "choices": _lazy_colours})
    hidden: int = field(default=0, metadata={"cli": False})
    ks: tuple[int, ...] | None = field(default=None, metadata={"help": "Ks.", "flags": ("--k",)})
    many: tuple[str, ...] = field(default=(), metadata={"help": "Again.", "flags": ("-m",), "multiple": True})
    log_run: bool = field(default=True, metadata={"help": "Log.", "flags": ("--log/--no-log",)})


def _toy_app(seen: list) -> typer.Typer:
    app = typer.Typer()

    @app.command(cls=ConfigCommand)
    @config_options(Toy)
    def run(cfg: Toy, extra: int = typer.Option(7, help="An option of the command's own.")) -> None:
        seen.append((cfg, extra))

    @app.command()
    def other() -> None:
        pass

    return app


def test_a_dataclass_becomes_options_and_back():
    seen: list = []
    app = _toy_app(seen)
    result = runner.invoke(app, ["run", "t"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == (Toy("t"), 7)  # every default comes from the field, the tuple back from its text
    args = ["run", "--name", "y", "--count", "5", "--scale", "0.5", "--parts", "p, q,,r", "--loud", "--quiet",
            "--mode", "slow", "--colour", "green", "--extra", "1", "t", "--k", "1,8", "-m", "a", "-m", "b,c",
            "--no-log"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg, extra = seen[-1]
    want = Toy("t", "y", 5, 0.5, ("p", "q", "r"), True, True, "slow", "green", 0, (1, 8), ("a", "b,c"), False)
    assert cfg == want and extra == 1
    assert runner.invoke(app, ["run", "t", "--hidden", "1"]).exit_code != 0  # cli: False is no option
    assert runner.invoke(app, ["run", "t", "--no-quiet"]).exit_code != 0  # spelled by its flags
    assert runner.invoke(app, ["run", "t", "--no-loud"]).exit_code == 0
    assert runner.invoke(app, ["run"]).exit_code != 0  # the argument is required
    bad = runner.invoke(app, ["run", "t", "--k", "1,x"], env={"COLUMNS": "200"})
    assert isinstance(bad.exception, OptionValueError)  # spectra passes on_error: one line
    assert str(bad.exception) == "--k 1,x: expected comma-separated integers such as 1,8,16"
    assert isinstance(runner.invoke(app, ["run", "t", "--k", "1,,8"]).exception, OptionValueError)


def test_help_is_grouped_and_lazy_choices_are_computed_only_for_help():
    seen: list = []
    app = _toy_app(seen)
    CALLS.clear()
    assert runner.invoke(app, ["other"]).exit_code == 0 and runner.invoke(app, ["run", "t"]).exit_code == 0
    assert CALLS == []  # building and running the command did not call the choices function
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and CALLS == ["called"]
    out = result.output
    assert "Colour: red, green." in out and "Mode: fast, slow." in out and "[default: a,b]" in out
    assert out.index("First") < out.index("--count") < out.index("Second") < out.index("--scale")
    assert "--loud" in out and "--no-loud" in out and "--no-quiet" not in out and "--hidden" not in out


def test_an_unsupported_field_type_is_named():
    @dataclass
    class Bad:
        mapping: dict[str, int] = field(default_factory=dict)

    with pytest.raises(TypeError, match=r"Bad\.mapping: no command-line form"):
        parameters(Bad)


def test_every_train_config_field_is_an_option_with_its_default():
    from spectra.cli.main import app

    command = typer.main.get_command(app).commands["train"]
    options = {p.name: p for p in command.params}
    for f in option_fields(TrainConfig):
        default = f.default
        assert f.name in options, f.name
        assert options[f.name].default == (",".join(default) if isinstance(default, tuple) else default)
        assert f.metadata["help"] and f.metadata["group"], f.name
    assert set(options) - {f.name for f in option_fields(TrainConfig)} == {"resume"}  # CLI-only
    assert "resolved" not in options
    assert to_config(TrainConfig, {"target_modules": "q_proj, v_proj", "report_to": ""}) == TrainConfig(
        target_modules=("q_proj", "v_proj"), report_to=()
    )


def test_the_command_line_starts_without_the_method_families():
    code = (
        "import sys, typer.main; from spectra.cli.main import app; typer.main.get_command(app); "
        "import spectra.train.config; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'transformers', 'trl') "
        "or m.startswith('spectra.train.methods.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------ numeric options


def _fields_of(kind: type) -> list[str]:
    hints = typing.get_type_hints(TrainConfig)
    fields = option_fields(TrainConfig)
    return [f.name for f in fields if kind in (hints[f.name], *typing.get_args(hints[f.name]))]


@pytest.mark.parametrize("name", _fields_of(float))
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_option_must_be_finite(name, value):
    option = "--" + name.replace("_", "-")
    with pytest.raises(TrainConfigError, match=f"^{option}: got {value!r}; expected a finite number$"):
        TrainConfig(**{name: value}).resolve()


@pytest.mark.parametrize("name", _fields_of(int))
def test_every_integer_option_is_bounded(name):
    option = "--" + name.replace("_", "-")
    method = {"adalora_init_rank": "adalora", "vera_rank": "vera", "quanta_d": "quanta"}.get(name, "lora")
    with pytest.raises(TrainConfigError, match=f"^{option}: got {10**30}; expected ") as err:
        TrainConfig(method=method, **{name: 10**30}).resolve()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_steps": 10**30}, f"--max-steps: got {10**30}; expected an integer ≥ 1 and ≤ {MAX_COUNT:,}"),
        ({"rank": 10**6}, "--rank: got 1000000; expected an integer ≥ 1 and ≤ 65,536"),
        ({"seed": -1}, "--seed: got -1; expected an integer ≥ 0 and ≤ 4,294,967,295"),
        ({"seed": 2**32}, "--seed: got 4294967296; expected an integer ≥ 0 and ≤ 4,294,967,295"),
        ({"save_every": 0}, "--save-every: got 0; expected an integer ≥ 1"),
        ({"eval_problems": 0}, "--eval-problems: got 0; expected an integer ≥ 1"),
        ({"loraplus_lr_ratio": 0.0}, "--loraplus-lr-ratio: got 0.0; expected a positive ratio"),
        ({"precision": "fp16"}, "--precision: got 'fp16'; expected auto, fp32, bf16"),
        ({"loss": "ppo"}, "--loss: got 'ppo'; expected one of grpo, dapo, dr_grpo, bnpo, cispo, sapo, gspo"),
    ],
)
def test_out_of_range_options_name_the_option_and_the_range(options, message):
    with pytest.raises(TrainConfigError) as err:
        TrainConfig(**options).resolve()
    assert str(err.value).startswith(message)


# --------------------------------------------------------------------------------------- the registry


def test_the_registry_is_the_only_list_of_methods():
    from spectra.train.methods import METHODS, method_names

    names = method_names()
    assert len(names) == len(set(names)) == 14 and names[:2] == ("full", "lora")
    assert all(n == n.lower() and n.isidentifier() for n in names)
    assert tuple(METHODS) == names and all(METHODS[n].name == n for n in names)
    method = next(f for f in dataclasses.fields(TrainConfig) if f.name == "method")
    assert method.metadata["choices"]() == names  # what --help lists and check() accepts


def test_register_refuses_taken_and_non_lower_case_names():
    from spectra.train.methods import methods, register
    from spectra.train.methods.lora import LoRA

    class Shadow(LoRA):
        name = "lora"

    class Upper(LoRA):
        name = "LoRA2"

    with pytest.raises(ValueError, match=r"name 'lora' is taken by spectra\.train\.methods\.lora\.LoRA"):
        register(Shadow)
    with pytest.raises(ValueError, match="name 'LoRA2' is not a lower-case identifier"):
        register(Upper)
    assert type(methods()["lora"]) is LoRA and "LoRA2" not in methods()


# ------------------------------------------------------------------- the names other tools give options


def test_help_lists_methods_from_source_without_importing_them():
    from spectra.train.methods import declared_names, method_names

    assert declared_names() == method_names()  # the source read for --help says what the registry says
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from spectra.train.config import declared_method_names as d; "
         "print(','.join(d()), 'torch' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.stdout.split() == [",".join(method_names()), "False"], done.stderr


@dataclass
class Aliased:
    lr: float = field(default=0.1, metadata={"help": "Rate.", "aliases": ("--learning-rate",)})
    loud: bool = field(default=False, metadata={"help": "Shout.", "aliases": ("--shout",)})
    quiet: bool = field(default=False, metadata={"help": "Hush.", "flags": ("--quiet",), "aliases": ("-q",)})


def test_aliases_are_further_spellings_of_one_option():
    seen: list = []
    app = typer.Typer()

    @app.command(cls=ConfigCommand)
    @config_options(Aliased)
    def run(cfg: Aliased) -> None:
        seen.append(cfg)

    @app.command()
    def other() -> None:
        pass

    for args, want in (
        (["--lr", "0.5"], Aliased(lr=0.5)),
        (["--learning-rate", "0.5", "--shout", "-q"], Aliased(lr=0.5, loud=True, quiet=True)),
        (["--loud", "--no-loud"], Aliased()),  # the boolean keeps its --no- form beside its alias
    ):
        result = runner.invoke(app, ["run", *args])
        assert result.exit_code == 0 and seen[-1] == want, (args, result.output)
    from spectra.cli.options import to_args

    assert to_args(Aliased(lr=0.5, loud=True)) == ["--lr", "0.5", "--loud"]  # the first spelling


def test_learning_rate_is_an_alias_of_lr_in_train_and_sweep():
    from spectra.cli.main import app

    commands = typer.main.get_command(app).commands
    ctx = commands["train"].make_context("train", ["--learning-rate", "3e-4"])
    assert ctx.params["lr"] == 3e-4
    ctx = commands["sweep"].make_context("sweep", ["--learning-rate", "1e-4,1e-3"])
    assert ctx.params["lr"] == "1e-4,1e-3"
    from spectra.cli.sweep import parse_also

    assert parse_also("learning-rate=1e-4,1e-3") == {"lr": (1e-4, 1e-3)}  # --also takes it too
    help_text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "--learning-rate" in help_text


@pytest.mark.parametrize(
    ("command", "typed", "said"),
    [
        (["train"], "--per-device-train-batch-size", "(spectra's name for it: --micro-batch-size)"),
        (["train"], "--lora-alpha", "(spectra's name for it: --alpha)"),
        (["train"], "--lora_r", "(spectra's name for it: --rank)"),
        (["train"], "--lora-dropout", "(spectra's name for it: --dropout)"),
        (["train"], "--output-dir", "(spectra's name for it: --out)"),
        (["train"], "--max_steps", "(spectra's name for it: --max-steps)"),  # TRL's parser takes _ too
        (["train"], "--num-train-epochs", "(in spectra: --max-steps (optimizer steps))"),
        (["train"], "--use-dora", "(in spectra: --method dora)"),
        (["sweep"], "--lora-alpha", "(spectra's name for it: --alpha)"),
        (["eval", "organism"], "--max-new-tokens", "(spectra's name for it: --max-tokens)"),
        (["eval", "organism"], "--use-vllm", "(in spectra: --backend vllm)"),
    ],
)
def test_an_unknown_option_of_another_tool_gets_spectras_name(command, typed, said):
    from spectra.cli.main import app

    result = runner.invoke(app, [*command, typed, "4"], env={"COLUMNS": "250"})
    assert result.exit_code == 2
    assert f"No such option: {typed} {said}" in result.output, result.output


def test_an_option_no_tool_has_keeps_clicks_error():
    from spectra.cli.main import app

    result = runner.invoke(app, ["train", "--fooo", "4"], env={"COLUMNS": "250"})
    assert result.exit_code == 2 and "No such option: --fooo" in result.output
    assert "spectra's name" not in result.output
    result = runner.invoke(app, ["info", "--learning-rate", "4"], env={"COLUMNS": "250"})  # no such option
    assert result.exit_code == 2 and "spectra's name" not in result.output


def test_every_name_of_the_table_points_at_an_option_that_exists():
    from spectra.cli.main import app
    from spectra.cli.options import ECOSYSTEM_NAMES

    def names(command) -> set[str]:
        found = {p.name for p in command.params}
        for sub in getattr(command, "commands", {}).values():
            found |= names(sub)
        return found

    options = names(typer.main.get_command(app))
    for theirs, (ours, _note) in ECOSYSTEM_NAMES.items():
        assert set(ours) & options, theirs  # (only a command that has the option names it)


def test_flags_show_no_bool_placeholder():
    from spectra.cli.main import app

    for words in ([], ["train"], ["sweep"], ["eval"], ["probe", "maturity"]):
        out = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "200"}).output
        assert "--help" in out and "<bool>" not in out, words
    out = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "<int>" in out and "<float>" in out  # the placeholders of options that take a value stay
