"""The method registry: ``--method NAME`` → a :class:`~spectra.train.methods.base.Method`.

One module per family, as in PEFT's tuners: ``lora.py`` (LoRA, rsLoRA, LoRA+, LoRA-FA, DoRA, PiSSA,
MiLoRA, with ``milora.py`` for MiLoRA's initialisation), ``adalora.py``, ``vera.py``, ``ia3.py``,
``lntuning.py``, ``miss.py``, ``quanta.py`` (written here: PEFT has no QuanTA) and ``full.py``.
"""

from __future__ import annotations

from spectra.train.methods.adalora import AdaLoRA
from spectra.train.methods.base import Delta, Method
from spectra.train.methods.full import Full
from spectra.train.methods.ia3 import IA3
from spectra.train.methods.lntuning import LNTuning
from spectra.train.methods.lora import DoRAMethod as DoRA
from spectra.train.methods.lora import LoRA, LoRAFA, LoRAPlus, MiLoRA, PiSSA, RsLoRA
from spectra.train.methods.miss import MiSS
from spectra.train.methods.quanta_method import QuanTA
from spectra.train.methods.vera import VeRA

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Full(),
        LoRA(),
        RsLoRA(),
        DoRA(),
        AdaLoRA(),
        MiSS(),
        PiSSA(),
        MiLoRA(),
        LoRAPlus(),
        LoRAFA(),
        VeRA(),
        IA3(),
        LNTuning(),
        QuanTA(),
    )
}


def get_method(name: str) -> Method:
    """The registered method called ``name`` (a one-line error listing the choices otherwise)."""
    from spectra.train.config import TrainConfigError

    if name not in METHODS:
        raise TrainConfigError(f"--method: got {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Delta", "Method", "get_method"]
