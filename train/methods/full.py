"""Full fine-tuning: every parameter trains; ΔW = W_t − W0 of each target projection, dense.

W0 is read from the base checkpoint (never from an in-memory copy), and the difference is taken in
float32 so that a bf16 model's update is exact (two bf16 numbers differ by an exactly representable
float32).
"""

from __future__ import annotations

import torch
from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.config import TrainConfig, TrainConfigError
from spectra.train.methods import register
from spectra.train.methods.base import Delta, Method, cpu, wanted
from torch import Tensor, nn

from spectra.operators import Dense


@register
class Full(Method):
    name = "full"
    uses_rank = False
    summary = "full fine-tuning: ΔW = W_t − W0 (recorded for the target projections)"

    def apply(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        model.spectra_targets = tuple(self.targets(cfg))
        if not self.modules(model):
            raise TrainConfigError(
                f"--target-modules {','.join(cfg.target_modules)}: no linear module of the model ends so"
            )
        return model

    def layer_cls(self) -> type:
        return nn.Linear

    def modules(self, model: nn.Module) -> list[str]:
        targets = getattr(model, "spectra_targets", ())
        return [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets
        ]

    @torch.no_grad()
    def record(self, model: nn.Module, base: BaseCheckpoint) -> Delta:
        layers = dict(model.named_modules())
        out = {}
        for name in filter(wanted, self.modules(model)):
            w = layers[name].weight
            out[name] = Dense(cpu(w.float() - base.get(name).to(w.device).float()))
        return Delta(out)

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        layers = dict(model.named_modules())
        return {name: cpu(layers[name].weight) for name in self.modules(model)}
