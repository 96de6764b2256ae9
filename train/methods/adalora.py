"""AdaLoRA on PEFT, with the rank allocation that nothing in TRL calls.

PEFT's AdaLoRA parameterises ΔW = B·diag(λ)·A · s / (r + 1e-5) (SVD form) and prunes the singular
values λ by an importance budget in ``update_and_allocate(step)``, which must run after every optimizer
step and before the gradients are cleared. TRL's trainer never calls it, so :class:`RankAllocation` does,
from ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad()``, as PEFT prescribes).

Schedule: the rank starts at ``adalora_init_rank`` (default 1.5 × rank) and the budget falls to an average
of ``rank`` per module; 10 % of the steps warm up before pruning (``tinit``) and the last 20 % keep the
final mask (``tfinal``). Stored ΔW: LowRank(B, A, mid = λ ⊙ mask, scale = s / (r + 1e-5)); pruned
singular values are exactly 0 in λ, so the mask is ``mid != 0``.

Resume: PEFT saves an AdaLoRA adapter already shrunk to its allocated ranks, which cannot be loaded back
into the full-size layers (nor can the optimizer state), so ``--resume`` refuses AdaLoRA runs.

Left alone: PEFT adds AdaLoRA's orthogonality regulariser only inside its own ``forward`` when the
model returns a loss, which TRL's GRPO loss does not; the regulariser is therefore not applied.
"""

from __future__ import annotations

from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.config import TrainConfig
from spectra.train.methods import register
from spectra.train.methods.base import ADAPTER, Delta, PeftMethod, cpu, find_layers
from torch import nn
from transformers import TrainerCallback

from spectra.operators import LowRank


class RankAllocation(TrainerCallback):
    """Calls ``update_and_allocate(global_step)`` after every optimizer step; counts its calls."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.calls = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)
        self.calls += 1


@register
class AdaLoRA(PeftMethod):
    name = "adalora"
    summary = "AdaLoRA: SVD-form LoRA whose rank budget is reallocated across modules while training"

    def peft_config(self, cfg: TrainConfig):
        from peft import AdaLoraConfig

        total = cfg.max_steps
        tinit, tfinal = total // 10, total // 5
        if tinit >= total - tfinal:
            tinit, tfinal = 0, 0
        return AdaLoraConfig(
            init_r=cfg.adalora_init_rank or max(cfg.rank + 1, (3 * cfg.rank) // 2),
            target_r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=self.targets(cfg),
            total_step=total,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=1,
            task_type="CAUSAL_LM",
        )

    def layer_cls(self) -> type:
        from peft.tuners.adalora import AdaLoraLayer

        return AdaLoraLayer

    def record(self, model: nn.Module, base: BaseCheckpoint) -> Delta:
        out = {}
        for name, layer in find_layers(model, self.layer_cls()):
            ranknum = float(layer.ranknum[ADAPTER].item())
            out[name] = LowRank(
                B=cpu(layer.lora_B[ADAPTER]),
                A=cpu(layer.lora_A[ADAPTER]),
                mid=cpu(layer.lora_E[ADAPTER]).squeeze(-1),
                scale=float(layer.scaling[ADAPTER]) / (ranknum + 1e-5),
            )
        return Delta(out)

    def callbacks(self, model: nn.Module, cfg: TrainConfig) -> list:
        return [RankAllocation(model)]
