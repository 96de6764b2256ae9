"""The LoRA family on PEFT's ``LoraConfig``: LoRA, rsLoRA, LoRA+, LoRA-FA, DoRA, PiSSA, MiLoRA.

=========  ==============================================  ===========================================
method     what changes                                   ΔW recorded
=========  ==============================================  ===========================================
lora       W0 + s·B·A, s = α/r, B = 0 at init              LowRank(B, A, s)
rslora     s = α/√r                                        LowRank(B, A, s)
loraplus   lr(B) = ratio · lr(A) (PEFT's optimizer)        LowRank(B, A, s)
lorafa     A frozen at its random init (PEFT's optimizer)  LowRank(B, A, s)
dora       m ⊙ (W0 + s·B·A)/‖W0 + s·B·A‖_row               DoRA(m, B, A, s), formed against W0
pissa      base ← W0 − s·B0·A0 with the top-r SVD of W0    LowRank(B, A, s, B0, A0) = s·(B·A − B0·A0)
milora     the same with the r *minor* triplets            LowRank(B, A, s, B0, A0)
=========  ==============================================  ===========================================
"""

from __future__ import annotations

import torch
from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.config import TrainConfig, TrainConfigError
from spectra.train.methods import register
from spectra.train.methods.base import ADAPTER, Delta, PeftMethod, cpu, find_layers, meta_like
from spectra.train.methods.milora import milora_init
from torch import nn

from spectra.operators import DoRA, LowRank


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return find_layers(model, LoraLayer)


def _lora_cls() -> type:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


@register
class LoRA(PeftMethod):
    name = "lora"
    summary = "LoRA: ΔW = (α/r)·B·A"
    use_rslora = False
    use_dora = False
    init: bool | str = True

    def peft_config(self, cfg: TrainConfig):
        from peft import LoraConfig

        return LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=self.targets(cfg),
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            init_lora_weights=self.init,
            task_type="CAUSAL_LM",
        )

    def layer_cls(self) -> type:
        return _lora_cls()

    def record(self, model: nn.Module, base: BaseCheckpoint) -> Delta:
        out = {}
        for name, layer in _lora_layers(model):
            B, A = cpu(layer.lora_B[ADAPTER].weight), cpu(layer.lora_A[ADAPTER].weight)
            out[name] = LowRank(B=B, A=A, scale=float(layer.scaling[ADAPTER]))
        return Delta(out)


@register
class RsLoRA(LoRA):
    name = "rslora"
    summary = "rank-stabilised LoRA: s = α/√r"
    use_rslora = True


@register
class LoRAPlus(LoRA):
    name = "loraplus"
    summary = "LoRA+: B learns `loraplus_lr_ratio` times faster than A"

    def optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=cfg.loraplus_lr_ratio, weight_decay=0.0
        )


@register
class LoRAFA(LoRA):
    name = "lorafa"
    summary = "LoRA-FA: A frozen at init, B trained with the projected-gradient optimizer"

    def optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        from peft.optimizers import create_lorafa_optimizer

        return create_lorafa_optimizer(model, r=cfg.rank, lora_alpha=cfg.alpha, lr=cfg.lr)


@register
class DoRAMethod(LoRA):
    name = "dora"
    summary = "DoRA: magnitude m and direction W0 + s·B·A, row-normalised"
    use_dora = True

    def record(self, model: nn.Module, base: BaseCheckpoint) -> Delta:
        out = {}
        for name, layer in _lora_layers(model):
            out[name] = DoRA(
                w0=meta_like(layer.get_base_layer().weight),
                magnitude=cpu(layer.lora_magnitude_vector[ADAPTER].weight),
                B=cpu(layer.lora_B[ADAPTER].weight),
                A=cpu(layer.lora_A[ADAPTER].weight),
                scale=float(layer.scaling[ADAPTER]),
            )
        return Delta(out)


class _InitFactors(LoRA):
    """PiSSA/MiLoRA: the base is replaced by a residual; keep the initial factors B0, A0 for ΔW."""

    def apply(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        model = self._attach(model, cfg)
        for _, layer in _lora_layers(model):
            layer.spectra_init = (cpu(layer.lora_B[ADAPTER].weight), cpu(layer.lora_A[ADAPTER].weight))
        return model

    def _attach(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        return super().apply(model, cfg)

    def record(self, model: nn.Module, base: BaseCheckpoint) -> Delta:
        out = {}
        for name, layer in _lora_layers(model):
            B0, A0 = layer.spectra_init
            out[name] = LowRank(
                B=cpu(layer.lora_B[ADAPTER].weight),
                A=cpu(layer.lora_A[ADAPTER].weight),
                scale=float(layer.scaling[ADAPTER]),
                B0=B0,
                A0=A0,
            )
        return Delta(out)


@register
class PiSSA(_InitFactors):
    name = "pissa"
    summary = "PiSSA: B·A initialised from W0's top-r singular triplets, base ← residual"
    init = "pissa"


@register
class MiLoRA(_InitFactors):
    name = "milora"
    summary = "MiLoRA: B·A initialised from W0's r minor singular triplets, base ← residual"

    def _attach(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        model = super()._attach(model, cfg)
        for name, layer in _lora_layers(model):
            try:
                milora_init(layer, ADAPTER)
            except ValueError as e:
                raise TrainConfigError(f"--method milora --rank {cfg.rank}: module {name}: {e}") from None
        return model
