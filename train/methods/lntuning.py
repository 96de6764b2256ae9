"""LayerNorm tuning on PEFT: only the normalisation layers' parameters train.

No linear ΔW exists; each norm's parameter change θ_t − θ_0 is recorded as a VectorDelta named
``<module>.weight`` (and ``.bias`` where the norm has one), with θ_0 read from the base checkpoint.
"""

from __future__ import annotations

import copy
import warnings

from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.config import TrainConfig
from spectra.train.methods import register
from spectra.train.methods.base import ADAPTER, Delta, PeftMethod, cpu, find_layers
from torch import Tensor, nn

from spectra.operators import VectorDelta

NORMS = ("input_layernorm", "post_attention_layernorm", "norm")


def _norm_params(model: nn.Module) -> dict[str, Tensor]:
    from peft.tuners.ln_tuning.layer import LNTuningLayer

    return {
        f"{name}.{p}": t
        for name, layer in find_layers(model, LNTuningLayer)
        for p, t in layer.ln_tuning_layers[ADAPTER].named_parameters()
    }


@register
class LNTuning(PeftMethod):
    name = "lntuning"
    uses_rank = False
    summary = "LayerNorm tuning: the norms' scales (and biases) train, nothing else"
    default_targets = NORMS

    def peft_config(self, cfg: TrainConfig):
        from peft import LNTuningConfig

        return LNTuningConfig(target_modules=self.targets(cfg), task_type="CAUSAL_LM")

    def record(self, model: nn.Module, base: BaseCheckpoint) -> Delta:
        out = {}
        for key, p in _norm_params(model).items():
            module, pname = key.rsplit(".", 1)
            theta0 = base.get(module, pname)
            out[key] = VectorDelta(cpu(p).float() - theta0.float())
        return Delta(out)

    def apply(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        with warnings.catch_warnings():  # PEFT warns about every norm class it has not listed (RMSNorm)
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
            return super().apply(model, cfg)

    def layer_cls(self) -> type:
        from peft.tuners.ln_tuning.layer import LNTuningLayer

        return LNTuningLayer

    def base_tensors(self, model: nn.Module) -> dict[str, tuple[str, str]]:
        return {key: tuple(key.rsplit(".", 1)) for key in _norm_params(model)}

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        names = set(_norm_params(model))
        merged = copy.deepcopy(model).merge_and_unload()
        return {
            f"{n}.{p}": cpu(t)
            for n, mod in merged.named_modules()
            for p, t in mod.named_parameters(recurse=False)
            if f"{n}.{p}" in names
        }
