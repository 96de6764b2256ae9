"""Cheap live checks of :class:`~spectra.train.callback.SpectraCallback`: is the adapter learning at all?

Two findings, each said in one line (a :class:`LiveCheckWarning`, shown without the file and source line
Python's warnings add) at the callback's first check step and at the end of training, and kept for
``train_summary.json`` (``live_checks``):

- **not moved**: adapted modules whose trainable parameters are exactly where they were when training
  began (a fingerprint — the float64 sum and norm of each parameter — taken at ``on_train_begin``
  and compared; no copy of the weights is kept). Causes: a learning rate of 0, parameters that never
  reach the optimizer, a loss without gradient;
- **no learning signal**: TRL's GRPO-family trainers log ``frac_reward_zero_std``, the share of groups
  whose rewards are all equal; when it is 1 at every logged step so far, every advantage is 0 and the
  policy gradient vanishes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

ZERO_STD = "frac_reward_zero_std"


class LiveCheckWarning(UserWarning):
    """A live check's finding: shown as its one line (no file, line number or source echo)."""


_format_warning = warnings.formatwarning


def _one_line(message, category, filename, lineno, line=None) -> str:  # warnings.formatwarning's signature
    if isinstance(category, type) and issubclass(category, LiveCheckWarning):
        return f"{message}\n"
    return _format_warning(message, category, filename, lineno, line)


warnings.formatwarning = _one_line


def _fingerprint(params: list[Tensor]) -> list[tuple[float, float]]:
    with torch.no_grad():
        return [
            (p.sum(dtype=torch.float64).item(), torch.linalg.vector_norm(p, dtype=torch.float64).item())
            for p in params
        ]


class LiveChecks:
    """The two checks above on one model's adapted modules (``modules``: name → its trainable
    parameters, in the names the method records)."""

    def __init__(self, modules: dict[str, list[Tensor]]):
        self.modules = {k: v for k, v in modules.items() if v}
        self.start = {k: _fingerprint(v) for k, v in self.modules.items()}
        self.zero_std: list[float] = []  # frac_reward_zero_std of each logged step, in order
        self.findings: dict[str, dict[str, Any]] = {}  # the last finding of each kind
        self.said: set[tuple[str, int]] = set()

    @classmethod
    def of_model(cls, model: nn.Module, names: list[str]) -> LiveChecks:
        """The trainable parameters under each adapted module of ``model`` (PEFT-wrapped or not)."""
        from spectra.train.methods.base import base_name

        layers = {base_name(n): m for n, m in model.named_modules()}
        modules = {}
        for name in names:
            layer = layers.get(name) or layers.get(name.rsplit(".", 1)[0])
            if layer is not None:
                modules[name] = [p for p in layer.parameters() if p.requires_grad]
        return cls(modules)

    def not_moved(self) -> list[str]:
        """The modules whose trainable parameters are all where they started."""
        return [k for k, params in self.modules.items() if _fingerprint(params) == self.start[k]]

    def observe(self, logs: dict[str, Any]) -> None:
        v = logs.get(ZERO_STD)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            self.zero_std.append(float(v))

    def check(self, step: int, end: bool = False) -> list[str]:
        """Run both checks at ``step``; warn (once per finding and step) and return the lines said."""
        lines = []
        still = self.not_moved()
        no_signal = bool(self.zero_std) and all(v >= 1.0 for v in self.zero_std)
        if still and self.modules:
            shown = ", ".join(still[:3]) + (", …" if len(still) > 3 else "")
            why = (
                "the cause: there was no learning signal (next line)"
                if no_signal
                else "check the learning rate, that the adapter's parameters are in the optimizer, and that "
                "the loss has a gradient"
            )
            line = (
                f"spectra: {len(still)} of {len(self.modules)} adapted modules have not moved after {step} "
                f"steps ({shown}); {why}"
            )
            lines.append(self._say("not_moved", step, line, modules=len(still), of=len(self.modules)))
        if no_signal:
            n = len(self.zero_std)
            line = (
                f"spectra: no learning signal: every group's rewards were identical ({ZERO_STD} = 1) at "
                f"all {n} logged steps{' of the run' if end else ' so far'}, so every advantage is 0; make "
                "the task fit the model (it is too hard or too easy), sample more or hotter rollouts, or "
                "raise max_completion_length if answers are cut off"
            )
            lines.append(self._say("no_learning_signal", step, line, logged_steps=n))
        return lines

    def _say(self, kind: str, step: int, line: str, **evidence: Any) -> str:
        """Warn and keep the finding, once per finding and step."""
        if (kind, step) in self.said:
            return line
        self.said.add((kind, step))
        warnings.warn(line, LiveCheckWarning, stacklevel=3)
        self.findings[kind] = {"step": step, **evidence}
        return line

    def summary(self) -> dict[str, Any]:
        """What ``train_summary.json`` records of the checks."""
        return {"live_checks": {k: dict(v) for k, v in self.findings.items()}}
