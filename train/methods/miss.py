"""MiSS on PEFT (Matrix Shard Sharing; formerly Bone): a small shared block added across the weight.

No factored form is exact and cheap for every MiSS variant, so ΔW is stored dense, computed from MiSS's
own delta rule applied to W0 read from the base checkpoint: ``merged(W0) − W0`` (``"bat"`` mode adds
``get_delta_weight(W0)`` instead).
"""

from __future__ import annotations

import torch
from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.config import TrainConfig
from spectra.train.methods import register
from spectra.train.methods.base import ADAPTER, Delta, PeftMethod, cpu, find_layers
from torch import nn

from spectra.operators import Dense


@register
class MiSS(PeftMethod):
    name = "miss"
    summary = "MiSS: a shared r×r (or r×n) block repeated across the weight's shards"

    def peft_config(self, cfg: TrainConfig):
        from peft import MissConfig

        return MissConfig(r=cfg.rank, miss_dropout=cfg.dropout, target_modules=self.targets(cfg))

    def layer_cls(self) -> type:
        from peft.tuners.miss import MissLayer

        return MissLayer

    @torch.no_grad()
    def record(self, model: nn.Module, base: BaseCheckpoint) -> Delta:
        out = {}
        for name, layer in find_layers(model, self.layer_cls()):
            block = layer.miss_block[ADAPTER]
            w0 = base.get(name).to(device=block.device, dtype=torch.float32)
            if layer.miss_fn == "bat":
                delta = layer.get_delta_weight(ADAPTER, w0)
            else:
                delta = layer.get_delta_weight_miss(ADAPTER, w0.clone()) - w0
            out[name] = Dense(cpu(delta.float()))
        return Delta(out)
