"""IA3 on PEFT: learned rescaling vectors l.

ΔW = W0 ⊙ (l − 1): l scales the output rows of attention projections and the input columns of
feed-forward modules. Targets: PEFT's defaults for Qwen2/Llama (k_proj, v_proj, down_proj with down_proj
as the feed-forward module) unless ``--target-modules`` is given; then every target whose name ends in
``down_proj``, ``up_proj`` or ``gate_proj`` counts as feed-forward. The bias change IA3 also makes
(non-feed-forward layers scale their bias) is not a weight update and is not recorded.
"""

from __future__ import annotations

from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.config import TrainConfig
from spectra.train.methods import register
from spectra.train.methods.base import ADAPTER, Delta, PeftMethod, cpu, find_layers, meta_like
from torch import nn

from spectra.operators import Scaled

FEEDFORWARD = ("gate_proj", "up_proj", "down_proj")


@register
class IA3(PeftMethod):
    name = "ia3"
    uses_rank = False
    summary = "IA3: ΔW = W0 ⊙ (l − 1), rows of attention projections, columns of feed-forward inputs"
    default_targets = ("k_proj", "v_proj", "down_proj")

    def peft_config(self, cfg: TrainConfig):
        from peft import IA3Config

        targets = self.targets(cfg)
        ff = [t for t in targets if t == "down_proj"] if self.default_targets else []
        if tuple(targets) != self.default_targets:
            ff = [t for t in targets if t.endswith(FEEDFORWARD)]
        return IA3Config(target_modules=targets, feedforward_modules=ff, task_type="CAUSAL_LM")

    def layer_cls(self) -> type:
        from peft.tuners.ia3 import IA3Layer

        return IA3Layer

    def record(self, model: nn.Module, base: BaseCheckpoint) -> Delta:
        out = {}
        for name, layer in find_layers(model, self.layer_cls()):
            l = cpu(layer.ia3_l[ADAPTER]).flatten()  # noqa: E741 (the paper's name)
            axis = "column" if layer.is_feedforward else "row"
            out[name] = Scaled(w0=meta_like(layer.get_base_layer().weight), l=l, axis=axis)
        return Delta(out)
