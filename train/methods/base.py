"""What every method provides: attach, record its exact ΔW, and (for tests) merge the way the method does.

A method is a small object with four duties:

- :meth:`Method.apply` attaches the adapter to a freshly loaded base model and freezes what it freezes;
- :meth:`Method.record` returns every adapted module's update in its cheapest exact stored form (see
  :mod:`spectra.operators`), named by the base model's module names, plus shared matrices (VeRA);
- :meth:`Method.optimizer` and :meth:`Method.callbacks` give what the trainer must use instead of, or
  beside, its defaults (LoRA+/LoRA-FA optimizers, AdaLoRA's rank allocation);
- :meth:`Method.merged_weights` is the method's *own* merge (e.g. PEFT's ``merge_and_unload`` on a copy),
  used by the tests to check :meth:`record` against it: merged − W0 must equal the recorded ΔW.

:meth:`Method.live_delta` runs the same :meth:`record` rule for the live geometry monitor
(:mod:`spectra.train.monitor`) without copies: inside it, :func:`cpu` returns the detached parameter on its
device, :func:`meta_like` the base layer's weight itself (the W0 in memory), and :func:`find_layers` and
:func:`wanted` skip the modules the monitor did not ask for. The ΔW rules stay declared once, in ``record``.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.config import TrainConfig, TrainConfigError
from torch import Tensor, nn

from spectra.errors import first_line
from spectra.operators import Record

ADAPTER = "default"  # PEFT's adapter name
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class _Live:
    """Inside :meth:`Method.live_delta`: no copies; only ``modules`` (None: every module)."""

    modules: frozenset[str] | None


_LIVE: ContextVar[_Live | None] = ContextVar("spectra_live_delta", default=None)


@dataclass
class Delta:
    """One checkpoint's records: module name → stored update, and matrices stored once (VeRA)."""

    modules: dict[str, Record]
    shared: dict[str, Tensor] = field(default_factory=dict)


def base_name(name: str) -> str:
    """The base model's module name of a (possibly PEFT-wrapped) module: strips ``base_model.model.``."""
    return name.removeprefix(_PEFT_PREFIX)


def find_layers(model: nn.Module, cls: type | tuple[type, ...]) -> Iterator[tuple[str, nn.Module]]:
    """``(base module name, layer)`` for every submodule of type ``cls``, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, cls) and wanted(base_name(name)):
            yield base_name(name), module


def wanted(name: str) -> bool:
    """Whether a record forms module ``name``: always, except in a :meth:`Method.live_delta` restricted
    to some modules (records that do not iterate :func:`find_layers` filter their names with it)."""
    live = _LIVE.get()
    return live is None or live.modules is None or name in live.modules


def cpu(t: Tensor) -> Tensor:
    """A detached CPU copy of a parameter (the record must not alias live training state); inside
    :meth:`Method.live_delta`, the detached tensor itself, on its device (no copy)."""
    if _LIVE.get() is not None:
        return t.detach()
    return t.detach().to("cpu", copy=True)


def meta_like(weight: Tensor) -> Tensor:
    """A shape-only stand-in for W0 in records that are defined through it (DoRA, IA3): the record is
    written without W0, and the analysis reads the real W0 from ``base/``. Inside
    :meth:`Method.live_delta`, the base layer's weight itself (detached): W0, in memory."""
    if _LIVE.get() is not None:
        return weight.detach()
    return torch.empty(weight.shape, device="meta")


class Method:
    """Base class of the registry's methods. Subclasses set ``name`` and ``summary``."""

    name: str = ""
    summary: str = ""
    #: module-name suffixes used when the user keeps the default target list (None: use cfg.target_modules)
    default_targets: tuple[str, ...] | None = None
    #: whether --rank and --alpha size the adapter (False: QuanTA, full fine-tuning, IA3, LayerNorm)
    uses_rank: bool = True

    def targets(self, cfg: TrainConfig) -> list[str]:
        from spectra.train.config import PROJECTIONS

        if self.default_targets is not None and tuple(cfg.target_modules) == PROJECTIONS:
            return list(self.default_targets)
        return list(cfg.target_modules)

    def apply(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        raise NotImplementedError

    def layer_cls(self) -> type | tuple[type, ...]:
        """The adapted layer type (imported lazily: PEFT is only needed when the method is used)."""
        raise NotImplementedError

    def modules(self, model: nn.Module) -> list[str]:
        """Base-model names of the adapted modules."""
        return [name for name, _ in find_layers(model, self.layer_cls())]

    def base_tensors(self, model: nn.Module) -> dict[str, tuple[str, str]]:
        """Record name → (module, parameter) of the checkpoint tensor it is measured against (``base/``)."""
        return {name: (name, "weight") for name in self.modules(model)}

    def record(self, model: nn.Module, base: BaseCheckpoint) -> Delta:
        """Every adapted module's exact update; ``base`` gives W0 where the rule needs it."""
        raise NotImplementedError

    def live_delta(
        self, model: nn.Module, base: BaseCheckpoint, modules: Collection[str] | None = None
    ) -> Delta:
        """:meth:`record`'s rule on the weights in memory, without copies (module docstring): operators
        whose tensors are the live parameters, detached, on the training device, valid until the next
        optimizer step and never to be modified. ``modules``: form only the records of these modules (names
        as :meth:`modules` gives them; None: all). ``base`` may be any object with BaseCheckpoint's ``get``
        (the monitor passes W0 it holds on the device)."""
        token = _LIVE.set(_Live(None if modules is None else frozenset(modules)))
        try:
            with torch.no_grad():
                delta = self.record(model, base)
        finally:
            _LIVE.reset(token)
        if modules is not None:  # records are named by their module (``<module>.<param>`` for vectors)
            delta.modules = {
                k: v for k, v in delta.modules.items() if k in modules or k.rsplit(".", 1)[0] in modules
            }
        return delta

    def optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | None:
        return None

    def callbacks(self, model: nn.Module, cfg: TrainConfig) -> list:
        return []

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        """The effective weight of each recorded module after the method's own merge, on a copy."""
        raise NotImplementedError


class PeftMethod(Method):
    """A method PEFT implements: attach with ``get_peft_model``, merge with ``merge_and_unload``."""

    def peft_config(self, cfg: TrainConfig):  # -> peft.PeftConfig
        raise NotImplementedError

    def apply(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        from peft import get_peft_model

        try:
            return get_peft_model(model, self.peft_config(cfg))
        except (ValueError, TypeError, RuntimeError) as e:  # PEFT's word on an unfit target, in one line
            have = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            )
            first = first_line(e)
            raise TrainConfigError(
                f"--method {self.name} --target-modules {','.join(self.targets(cfg))}: {first} "
                f"(the model's linear modules: {', '.join(have)})"
            ) from None

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        names = set(self.modules(model))
        merged = copy.deepcopy(model).merge_and_unload()
        return {n: cpu(m.weight) for n, m in merged.named_modules() if n in names}
