"""QuanTA as a registry method (the layer itself is in :mod:`spectra.train.methods.quanta`).

ΔW = T − T_init, the composed gate circuit minus its frozen initial copy: full rank in general, so it is
stored dense. The method's own merge (:func:`~spectra.train.methods.quanta.merge_quanta`) pushes the
identity through the adapter's forward path, a different computation from ``delta_weight``'s contraction.
"""

from __future__ import annotations

import copy

import torch
from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.config import TrainConfig, TrainConfigError
from spectra.train.methods import register
from spectra.train.methods.base import Delta, Method, cpu, wanted
from spectra.train.methods.quanta import (
    QuantaConfig,
    QuantaLinear,
    apply_quanta,
    merge_quanta,
    quanta_modules,
)
from torch import Tensor, nn

from spectra.operators import Dense


@register
class QuanTA(Method):
    name = "quanta"
    uses_rank = False  # sized by --quanta-d
    summary = "QuanTA: ΔW = T − T_init, a circuit of small gates on d tensor axes (high rank)"

    def apply(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        try:
            config = QuantaConfig(d=cfg.quanta_d, target_modules=self.targets(cfg), dropout=cfg.dropout)
            return apply_quanta(model, config)
        except ValueError as e:
            raise TrainConfigError(
                f"--method quanta (--quanta-d {cfg.quanta_d}, --target-modules): {e}"
            ) from None

    def layer_cls(self) -> type:
        return QuantaLinear

    @torch.no_grad()
    def record(self, model: nn.Module, base: BaseCheckpoint) -> Delta:
        return Delta(
            {
                name: Dense(cpu(layer.delta_weight()))
                for name, layer in quanta_modules(model).items()
                if wanted(name)
            }
        )

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        names = set(quanta_modules(model))
        merged = merge_quanta(copy.deepcopy(model))
        return {n: cpu(m.weight) for n, m in merged.named_modules() if n in names}
