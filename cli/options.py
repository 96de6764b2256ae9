"""Command-line options generated from a configuration dataclass: an option is declared once, on its field.

Every field of the dataclass becomes one ``--field-name`` option whose type, default and help are read from
the field, as PEFT's configs and TRL's ``TrlParser`` do::

    rank: int = field(default=32, metadata={"help": "Adapter rank r.", "group": "Adapter"})

The metadata keys it reads:

============ ==============================================================================================
``help``     the option's help; ``{choices}`` in it becomes the allowed values, comma-separated
``group``    the panel of ``--help`` the option is listed under
``choices``  the allowed values: a tuple, or a function that returns them, called only when ``--help`` is
             shown (a registry that imports torch is then not loaded to start the command). The dataclass
             checks values itself; this is for the help.
``flags``    the option's spelling when it is not ``--name`` / ``--name/--no-name``: ``("--use-vllm",)``
``aliases``  further spellings the option also takes, e.g. the name other tools give it:
             ``("--learning-rate",)`` beside ``--lr``
``multiple`` a tuple field given by repeating the option (``-b x -b y``) instead of as ``x,y``
``cli``      ``False``: not an option (internal state)
============ ==============================================================================================

Field types: ``str``, ``int``, ``float``, ``bool`` (``--name/--no-name``), ``X | None`` (unset: None),
``Literal[...]`` (text; its values are the choices) and tuples of str, int or float (comma-separated text,
or a repeated option with ``multiple``). A field without a default is a positional argument (a tuple field:
all the remaining arguments).

A command takes the dataclass as its first parameter; its other parameters are options of its own::

    @app.command(cls=ConfigCommand)
    @config_options(TrainConfig)
    def train(cfg: TrainConfig, resume: bool = typer.Option(False, "--resume")) -> None: ...

**Grids.** :func:`grid_options` gives a command the same options as a *grid*: a scalar field takes one
value or several, comma-separated (``--rank 8,32,64``), and the command receives ``{field: (values, …)}``
for the options given (``spectra sweep``). A tuple field takes one value, written as for the single
command; a boolean keeps its ``--name/--no-name`` flag. :func:`grid_values` parses one field's text (also
for grids written as ``name=values`` elsewhere), and :func:`to_args` turns a dataclass back into the
command line that builds it (a sweep's cell run as ``spectra train …`` in its own process).

**Commands.** :class:`Command` and :class:`Group` (typer's, with two changes): a flag's help shows no
``<bool>`` placeholder, and an unknown option that is another tool's name for one of the command's options
(:data:`ECOSYSTEM_NAMES`: TRL, transformers, PEFT) is answered with spectra's name for it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union

import typer
from typer.core import TyperCommand, TyperGroup

from spectra.errors import SpectraError

F = TypeVar("F", bound=Callable[..., Any])
_SCALARS = (str, int, float, bool)
_KEYWORD = inspect.Parameter.KEYWORD_ONLY
_EXAMPLES = {int: "1,8,16", float: "0.5,1.0"}
_BOOLS = {"true": True, "yes": True, "on": True, "1": True}
_BOOLS |= {"false": False, "no": False, "off": False, "0": False}


def option_fields(config: type) -> list[dataclasses.Field]:
    """The fields of ``config`` that are command-line options (all but those marked ``cli: False``)."""
    return [f for f in dataclasses.fields(config) if f.metadata.get("cli", True)]


def parameters(config: type) -> list[inspect.Parameter]:
    """One keyword parameter per field, with its type and a ``typer.Option`` (default, help, panel), or a
    ``typer.Argument`` for a field without a default."""
    hints = typing.get_type_hints(config)
    params = []
    for f in option_fields(config):
        kind, optional = _cli_type(hints[f.name], f"{config.__name__}.{f.name}")
        item = _tuple_item(hints[f.name])
        shown_help = help_text(f, hints[f.name], resolve=False)
        text = {"help": shown_help, "rich_help_panel": f.metadata.get("group")}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            info = typer.Argument(..., **text)
            if item is not None:  # a tuple without a default: the command's remaining arguments
                kind = list[item]
        elif item is not None and f.metadata.get("multiple"):
            kind, default = list[item], _default(f)
            info = typer.Option(list(default or ()), *_decls(f, kind), **text)
        else:
            default = _default(f)
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            info = typer.Option(shown, *_decls(f, kind), **text)
        annotation = kind | None if optional else kind
        params.append(inspect.Parameter(f.name, _KEYWORD, default=info, annotation=annotation))
    return params


def to_config(config: type, values: dict[str, Any]) -> Any:
    """The dataclass built from parsed option values: comma-separated text (or a repeated option's list)
    back into a tuple of the field's item type, a value that is not one being a one-line usage error."""
    hints = typing.get_type_hints(config)
    fields = {}
    for f in option_fields(config):
        if f.name not in values:
            continue
        value, item = values[f.name], _tuple_item(hints[f.name])
        if item is not None and isinstance(value, (str, list)):
            value = _parse_tuple(f, item, value)
        fields[f.name] = value
    return config(**fields)


def _decls(f: dataclasses.Field, kind: Any) -> tuple[str, ...]:
    """The option's declarations for typer: its ``flags`` (none: typer's ``--name``, ``--name/--no-name``
    for a boolean), and then its ``aliases``, with the default spelled out when there are aliases."""
    flags, aliases = tuple(f.metadata.get("flags", ())), tuple(f.metadata.get("aliases", ()))
    if not aliases:
        return flags
    name = f.name.replace("_", "-")
    return (flags or ((f"--{name}/--no-{name}",) if kind is bool else (f"--{name}",))) + aliases


def option_name(f: dataclasses.Field) -> str:
    """The option's spelling: ``--field-name`` or the first of its ``flags``."""
    return (f.metadata.get("flags") or ["--" + f.name.replace("_", "-")])[0]


class OptionValueError(SpectraError):
    """An option's text is not a value of its field's type (e.g. ``--k 1,,4``)."""


def _parse_tuple(f: dataclasses.Field, item: type, value: str | list[str]) -> tuple:
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else value
    try:
        if item is not str and any(not p for p in parts) and parts != [""]:
            raise ValueError("empty item")  # "1,,4": a number was left out
        return tuple(item(p) for p in parts if p)
    except ValueError:
        example = _EXAMPLES.get(item, "a,b")
        noun = {int: "integers", float: "numbers"}.get(item, "values")
        text = value if isinstance(value, str) else ",".join(value)
        raise OptionValueError(
            f"{option_name(f)} {text}: expected comma-separated {noun} such as {example}"
        ) from None


# ------------------------------------------------------------------------------------------------ grids


def grid_parameters(config: type, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per field of ``config`` (but ``skip``) for a grid: text (or a flag for a
    boolean) that defaults to None, "not given"; help and panel as for :func:`parameters`."""
    hints = typing.get_type_hints(config)
    params = []
    for f in option_fields(config):
        if f.name in skip:
            continue
        _cli_type(hints[f.name], f"{config.__name__}.{f.name}")  # a type with a command-line form
        inner = _strip_optional(hints[f.name])[0]
        shown = help_text(f, hints[f.name], resolve=False)
        flags, panel = _decls(f, inner), f.metadata.get("group")
        if inner is bool:
            kind, info = bool | None, typer.Option(None, *flags, help=shown, rich_help_panel=panel)
        else:
            kind = str | None
            shape = _grid_metavar(hints[f.name])
            info = typer.Option(None, *flags, help=shown, rich_help_panel=panel, metavar=shape)
        params.append(inspect.Parameter(f.name, _KEYWORD, default=info, annotation=kind))
    return params


def _grid_metavar(hint: Any) -> str:
    """``INT,…`` for a grid of integers (a tuple field, one value: ``TEXT``)."""
    if _tuple_item(hint) is not None:
        return "LIST"
    inner = _strip_optional(hint)[0]
    if typing.get_origin(inner) is Literal:
        inner = type(typing.get_args(inner)[0])
    return {int: "INT", float: "FLOAT"}.get(inner, "TEXT") + ",…"


def grid_values(config: type, name: str, value: Any) -> tuple:
    """The values of one grid option: comma-separated text → a tuple of the field's type (a tuple field:
    a 1-tuple of its tuple; a boolean: ``true``/``false`` text or a bool). A value the type cannot take,
    an empty grid or a value given twice is a usage error naming the option and the value."""
    f = next((f for f in option_fields(config) if f.name == name), None)
    if f is None:
        raise typer.BadParameter(f"{name!r} is not an option", param_hint="grid")
    hint = typing.get_type_hints(config)[name]
    inner, option = _strip_optional(hint)[0], option_name(f)
    item = _tuple_item(hint)
    if item is not None:
        return (_parse_tuple(f, item, value),)
    if isinstance(value, bool):
        return (value,)
    parts = [p.strip() for p in str(value).split(",")]
    if not any(parts):
        raise typer.BadParameter(f"{value!r}: no value given", param_hint=option)
    kind = inner
    if typing.get_origin(inner) is Literal:
        kind = type(typing.get_args(inner)[0])
    out = []
    for p in parts:
        if not p:
            raise typer.BadParameter(f"{value!r}: an empty value in the grid", param_hint=option)
        try:
            v = _BOOLS[p.lower()] if kind is bool else kind(p)
        except (ValueError, KeyError):
            what = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, kind.__name__)
            where = f" (in the grid {value})" if len(parts) > 1 else ""
            raise typer.BadParameter(f"{p!r} is not {what}{where}", param_hint=option) from None
        if v in out:
            raise typer.BadParameter(f"{p!r} is given twice in the grid {value}", param_hint=option)
        out.append(v)
    return tuple(out)


def grid_options(config: type, skip: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorator for a typer command whose first parameter is a grid ``{field: (value, …)}`` over
    ``config`` (the options given; see :func:`grid_values`): one option per field but ``skip``, before
    the command's own options."""

    def decorate(command: F) -> F:
        own = list(inspect.signature(command).parameters.values())[1:]
        hints = typing.get_type_hints(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation), kind=p.KEYWORD_ONLY) for p in own]
        generated = grid_parameters(config, skip)
        names = {p.name for p in generated}

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            given = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            grid = {k: grid_values(config, k, v) for k, v in given.items() if v is not None}
            return command(grid, **kwargs)

        del run.__wrapped__
        run.__signature__ = inspect.Signature(generated + own)
        run.__annotations__ = {p.name: p.annotation for p in generated + own}
        run.config_class = config
        run.grid_fields = names
        return typing.cast(F, run)

    return decorate


def to_args(cfg: Any) -> list[str]:
    """The command line of a :func:`config_options` command that builds ``cfg`` again: one option per
    field whose value differs from its default (flags for booleans, comma-joined tuples, ``repr`` of
    floats so that they come back exact)."""
    args: list[str] = []
    hints = typing.get_type_hints(type(cfg))
    for f in option_fields(type(cfg)):
        value = getattr(cfg, f.name)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            args.insert(0, str(value))
            continue
        if value == _default(f) or value is None:
            continue
        flags = f.metadata.get("flags")
        if _strip_optional(hints[f.name])[0] is bool:
            if flags:
                args += [flags[0]] if value else []  # a flag without a --no- form defaults to False
            else:
                args.append(("--" if value else "--no-") + f.name.replace("_", "-"))
            continue
        if isinstance(value, tuple):
            if f.metadata.get("multiple"):
                for v in value:
                    args += [option_name(f), str(v)]
                continue
            text = ",".join(map(str, value))
        else:
            text = repr(value) if isinstance(value, float) else str(value)
        args += [option_name(f), text]
    return args


def config_options(config: type, on_error: Callable[[Exception], Any] | None = None) -> Callable[[F], F]:
    """Decorator for a typer command whose first parameter is a ``config`` instance: the command gets one
    option per field of ``config`` (before its own options) and is called with the built dataclass.
    ``on_error`` reports an option whose text is not a value of its type (:class:`OptionValueError`)."""

    def decorate(command: F) -> F:
        own = list(inspect.signature(command).parameters.values())[1:]
        hints = typing.get_type_hints(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation), kind=p.KEYWORD_ONLY) for p in own]
        generated = parameters(config)
        names = {p.name for p in generated}

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            try:
                cfg = to_config(config, values)
            except OptionValueError as e:
                if on_error is None:
                    raise
                return on_error(e)
            return command(cfg, **kwargs)

        del run.__wrapped__  # typer reads the signature below, not the command's
        run.__signature__ = inspect.Signature(generated + own)
        run.__annotations__ = {p.name: p.annotation for p in generated + own}
        run.config_class = config
        return typing.cast(F, run)

    return decorate


# ------------------------------------------------------------------------------------------- commands

#: Names other tools give to spectra's options (TRL's GRPOConfig and script arguments, transformers'
#: TrainingArguments and generate, PEFT's LoraConfig): {their name: (spectra's fields that mean the same,
#: the first a command has being the one named; or, where no one option is the same, what to write
#: instead)}. Only an unknown option is looked up here, and only a command that has the field answers.
ECOSYSTEM_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "learning_rate": (("lr",), ""),
    "per_device_train_batch_size": (("micro_batch_size",), ""),
    "gradient_accumulation_steps": (("batch_size",), "--batch-size × --num-generations ÷ --micro-batch-size"),
    "num_train_epochs": (("max_steps",), "--max-steps (optimizer steps)"),
    "output_dir": (("out",), ""),
    "run_name": (("name",), ""),
    "save_steps": (("save_every",), ""),
    "eval_steps": (("eval_every",), ""),
    "lora_r": (("rank",), ""),
    "r": (("rank",), ""),
    "lora_rank": (("rank",), ""),
    "lora_alpha": (("alpha",), ""),
    "lora_dropout": (("dropout",), ""),
    "lora_target_modules": (("target_modules",), ""),
    "use_dora": (("method",), "--method dora"),
    "use_rslora": (("method",), "--method rslora"),
    "init_lora_weights": (("method",), "--method pissa or --method milora"),
    "loss_type": (("loss",), ""),
    "model_name_or_path": (("model",), ""),
    "dataset_name": (("dataset",), ""),
    "dataset_train_split": (("dataset_split",), ""),
    "dataset_test_split": (("eval_split", "split"), ""),
    "max_new_tokens": (("max_completion_length", "max_tokens"), ""),
    "max_completion_length": (("max_tokens",), ""),
    "max_tokens": (("max_completion_length",), ""),
    "num_generations": (("n",), ""),
    "num_return_sequences": (("num_generations", "n"), ""),
    "torch_dtype": (("precision",), ""),
    "dtype": (("precision",), ""),
    "bf16": (("precision",), "--precision bf16"),
    "resume_from_checkpoint": (("resume",), ""),
    "vllm_gpu_memory_utilization": (("gpu_memory_utilization",), ""),
    "use_vllm": (("backend",), "--backend vllm"),
}

# the exception of the click typer runs on (typer ≥ 0.24 carries its own copy)
_NoSuchOption = importlib.import_module(typer.BadParameter.__module__).NoSuchOption


def spectra_name(option: str, params: list[Any]) -> str | None:
    """What spectra calls an option it does not know: ``--learning_rate``, ``--per-device-train-batch-size``
    → ``"spectra's name for it: --lr"`` (``"in spectra: --method dora"`` for ``--use-dora``); None when
    neither :data:`ECOSYSTEM_NAMES` nor the same name with ``_`` for ``-`` is an option of ``params`` (a
    command's click parameters)."""
    key = option.lstrip("-").replace("-", "_").lower()
    longs = {p.name: [o for o in getattr(p, "opts", ()) if o.startswith("--")] for p in params}
    spelled = {name: opts[0] for name, opts in longs.items() if opts}
    wanted, note = ((key,), "") if key in spelled else ECOSYSTEM_NAMES.get(key, ((), ""))
    found = next((spelled[n] for n in wanted if n in spelled), None)
    if found is None or found == option:
        return None
    return f"in spectra: {note}" if note else f"spectra's name for it: {found}"


class _Spectra:
    """What :class:`Command` and :class:`Group` add to typer's: no ``<bool>`` placeholder on flags in the
    help, and spectra's name for an option another tool calls otherwise (:func:`spectra_name`)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        flags = [p for p in self.get_params(ctx) if getattr(p, "is_flag", False) and p.metavar is None]
        for p in flags:
            p.metavar = ""  # typer's rich help shows the metavar in place of the type: nothing
        try:
            super().format_help(ctx, formatter)
        finally:
            for p in flags:
                p.metavar = None

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except _NoSuchOption as e:
            said = spectra_name(e.option_name, self.get_params(ctx))
            if said is None:
                raise
            message = f"No such option: {e.option_name} ({said})"
            raise _NoSuchOption(e.option_name, message=message, ctx=ctx) from None


class Command(_Spectra, TyperCommand):
    """A typer command with spectra's help and unknown-option errors (see :class:`_Spectra`)."""


class Group(_Spectra, TyperGroup):
    """A typer group (``spectra``, ``spectra probe``) with spectra's help (see :class:`_Spectra`)."""


class ConfigCommand(Command):
    """A typer command that fills the help of options whose choices come from a function (see
    ``choices`` above) only when ``--help`` is shown."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        config = getattr(self.callback, "config_class", None)
        if config is not None:
            hints = typing.get_type_hints(config)
            lazy = {f.name: f for f in option_fields(config) if callable(f.metadata.get("choices"))}
            for param in self.params:
                if param.name in lazy:
                    param.help = help_text(lazy[param.name], hints[param.name], resolve=True)
        super().format_help(ctx, formatter)


def choices(f: dataclasses.Field, hint: Any = None, resolve: bool = True) -> tuple[str, ...] | None:
    """The allowed values of a field: its ``choices`` metadata (called if a function and ``resolve``),
    else the values of a ``Literal`` type; None when it has none (or they are not resolved)."""
    given = f.metadata.get("choices")
    if callable(given):
        return tuple(given()) if resolve else None
    if given is not None:
        return tuple(given)
    inner = _strip_optional(hint)[0] if hint is not None else None
    return tuple(str(v) for v in typing.get_args(inner)) if typing.get_origin(inner) is Literal else None


def help_text(f: dataclasses.Field, hint: Any = None, resolve: bool = True) -> str:
    """A field's help with ``{choices}`` filled in (``…`` until lazily computed choices are resolved)."""
    text = f.metadata.get("help", "")
    if "{choices}" not in text:
        return text
    try:
        values = choices(f, hint, resolve)
    except ImportError as e:  # a registry whose modules need an extra that is not installed
        return text.replace("{choices}", f"(not listed: {e})")
    return text.replace("{choices}", ", ".join(values) if values is not None else "…")


def field_option(config: type, name: str) -> Any:
    """A typer option with the default and help of one field of ``config``: for a command that takes a
    few of a config's options without restating them (``spectra demo``)."""
    f = next(f for f in option_fields(config) if f.name == name)
    return typer.Option(_default(f), help=help_text(f))


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` → ``(X, True)``; anything else → ``(hint, False)``."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _tuple_item(hint: Any) -> type | None:
    """The item type of a ``tuple[X, ...]`` field; None for other fields."""
    inner = _strip_optional(hint)[0]
    if typing.get_origin(inner) is not tuple:
        return None
    args = typing.get_args(inner)
    return args[0] if args and args[0] in (str, int, float) else str


def _cli_type(hint: Any, where: str) -> tuple[type, bool]:
    """The option's type for a field type, and whether it may be None."""
    inner, optional = _strip_optional(hint)
    if inner in _SCALARS:
        return inner, optional
    if typing.get_origin(inner) is Literal:
        kinds = {type(v) for v in typing.get_args(inner)}
        if len(kinds) == 1 and kinds <= set(_SCALARS):
            return kinds.pop(), optional
    if typing.get_origin(inner) is tuple and typing.get_args(inner) in ((t, ...) for t in (str, int, float)):
        return str, optional
    raise TypeError(f"{where}: no command-line form for the type {hint!r}")
