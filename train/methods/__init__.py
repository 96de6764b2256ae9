"""The method registry: ``--method NAME`` → a :class:`~spectra.train.methods.base.Method`.

One module per family, as in PEFT's tuners: ``lora.py`` (LoRA, rsLoRA, LoRA+, LoRA-FA, DoRA, PiSSA,
MiLoRA, with ``milora.py`` for MiLoRA's initialisation), ``adalora.py``, ``vera.py``, ``ia3.py``,
``lntuning.py``, ``miss.py``, ``quanta_method.py`` (``quanta.py``: QuanTA itself, which PEFT lacks) and
``full.py``. Each family registers its methods with the :func:`register` class decorator (as PEFT's tuners
call ``register_peft_method``), and the registry is the only list of methods: ``--method``'s help, the
check of :class:`~spectra.train.config.TrainConfig` and the tests all read it.

This package's own module is light (no torch): the family modules, which import torch and transformers,
are imported the first time the registry is read (:func:`method_names`, :func:`get_method`, ``METHODS``),
so that the configuration and the command line start without them. Adding a method: a class with a
``name`` and ``@register`` in its family module; a new family module is also named in :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from spectra.train.methods.base import Method

#: The family modules, in the order ``--help`` lists their methods (each registers its own on import).
FAMILIES = ("full", "lora", "adalora", "miss", "vera", "ia3", "lntuning", "quanta_method")

_REGISTRY: dict[str, Method] = {}
M = TypeVar("M", bound=type)


def register(cls: M) -> M:
    """Class decorator: add an instance of the method class ``cls`` to the registry as ``cls.name``, a
    lower-case name (letters, digits, ``_``) that no other method has."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"method {cls.__qualname__}: name {name!r} is not a lower-case identifier")
    taken = _REGISTRY.get(name)
    if taken is not None and _origin(type(taken)) != _origin(cls):
        raise ValueError(f"method {cls.__qualname__}: name {name!r} is taken by {_origin(type(taken))}")
    _REGISTRY[name] = cls()
    return cls


def methods() -> dict[str, Method]:
    """Every registered method by name, family by family in :data:`FAMILIES` order (imports them)."""
    for family in FAMILIES:
        importlib.import_module(f"{__name__}.{family}")
    order = {f"{__name__}.{family}": i for i, family in enumerate(FAMILIES)}
    ranked = sorted(_REGISTRY.values(), key=lambda m: order.get(type(m).__module__, len(order)))
    return {m.name: m for m in ranked}


def method_names() -> tuple[str, ...]:
    """The registered method names, in :func:`methods` order."""
    return tuple(methods())


def declared_names() -> tuple[str, ...]:
    """The method names the family modules declare (``name = "..."`` of each ``@register`` class), read
    from their source without importing them (no torch): what ``spectra train --help`` lists. The same
    names in the same order as :func:`method_names` (tests/test_options.py)."""
    import ast
    import importlib.util
    from pathlib import Path

    names = []
    for family in FAMILIES:
        spec = importlib.util.find_spec(f"{__name__}.{family}")
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        for node in tree.body:
            marked = isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "register" for d in node.decorator_list
            )
            for stmt in node.body if marked else ():
                target = stmt.targets[0] if isinstance(stmt, ast.Assign) else getattr(stmt, "target", None)
                value = getattr(stmt, "value", None)
                if isinstance(target, ast.Name) and target.id == "name" and isinstance(value, ast.Constant):
                    names.append(value.value)
    return tuple(names)


def get_method(name: str) -> Method:
    """The registered method called ``name`` (a one-line error listing the choices otherwise)."""
    from spectra.train.config import TrainConfigError

    registry = methods()
    if name not in registry:
        raise TrainConfigError(f"--method: got {name!r}; expected one of {', '.join(registry)}")
    return registry[name]


def __getattr__(attr: str) -> Any:
    """``METHODS`` (the registry as a dict), ``Delta`` and ``Method``, imported when first asked for."""
    if attr == "METHODS":
        return methods()
    if attr in ("Delta", "Method"):
        from spectra.train.methods import base

        return getattr(base, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


__all__ = [
    "FAMILIES", "METHODS", "Delta", "Method", "declared_names", "get_method", "method_names", "methods",
    "register",
]
