"""VeRA on PEFT: frozen shared random matrices, trained scaling vectors.

ΔW = diag(λ_b) · B_shared[:m, :r] · diag(λ_d) · A_shared[:r, :n]. The shared matrices are written once
per delta file (``/shared``) and each module refers to its slice of them.
"""

from __future__ import annotations

from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.config import TrainConfig
from spectra.train.methods import register
from spectra.train.methods.base import ADAPTER, Delta, PeftMethod, cpu, find_layers
from torch import nn

from spectra.operators import LowRank


@register
class VeRA(PeftMethod):
    name = "vera"
    summary = "VeRA: ΔW = diag(λ_b)·B·diag(λ_d)·A with B, A frozen random and shared"

    def peft_config(self, cfg: TrainConfig):
        from peft import VeraConfig

        return VeraConfig(
            r=cfg.vera_rank or cfg.rank,
            vera_dropout=cfg.dropout,
            target_modules=self.targets(cfg),
            projection_prng_key=cfg.seed,
            task_type="CAUSAL_LM",
        )

    def layer_cls(self) -> type:
        from peft.tuners.vera import VeraLayer

        return VeraLayer

    def record(self, model: nn.Module, base: BaseCheckpoint) -> Delta:
        layers = list(find_layers(model, self.layer_cls()))
        if not layers:
            return Delta({})
        first = layers[0][1]
        shared = {"vera_A": cpu(first.vera_A[ADAPTER]), "vera_B": cpu(first.vera_B[ADAPTER])}
        out = {}
        for name, layer in layers:
            m, n = layer.out_features, layer.in_features
            out[name] = LowRank(
                B=shared["vera_B"][:m, :],  # views of the shared copies: written as references
                A=shared["vera_A"][:, :n],
                row=cpu(layer.vera_lambda_b[ADAPTER]),
                mid=cpu(layer.vera_lambda_d[ADAPTER]),
            )
        return Delta(out, shared)
