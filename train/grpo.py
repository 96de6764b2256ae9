"""TRL's ``GRPOTrainer`` with rollouts sampled by the policy in eval mode: adapter dropout off.

TRL 1.16 samples rollouts with the policy in train mode, so an adapter's dropout (``--dropout``) is
applied while sampling. For LoRA that only perturbs the (initially zero) update, but PiSSA and MiLoRA
move W0's principal (minor) components into the adapter, so sampling with dropout runs a damaged model
(the demo's PiSSA reward at step 1 was 0.17 against LoRA's 0.33). The studies sample with vLLM from
merged weights: no dropout in the rollouts, dropout in the training forward. TRL has no option for
that (``GRPOConfig.disable_dropout`` removes dropout everywhere, the training forward included), so
:class:`GRPOTrainer` overrides the narrowest entry point of generation, ``_generate_single_turn``: it
runs TRL's own method unchanged with every module of the policy in eval mode and gives each module its
own train/eval flag back afterwards (also when generation raises).

Why that method: it is the one place where TRL turns token ids into completions, for all three back
ends (``model.generate``, transformers' continuous batching, vLLM) and for every turn of a tool loop.
The caller, ``_generate``, reads ``self.model.training`` to pick the train/eval number of generations
and metric names, so the mode must not change around it; ``_generate_single_turn`` does not read it.

What does not change:

- vLLM (``--use-vllm``) samples from weights merged by PEFT (``merge_adapter``), which never apply
  dropout; the switch is harmless there.
- The log-probabilities of the loss: TRL computes them in the training forward, dropout on, as the
  configured dropout asks. When generation and optimisation steps are aligned (spectra's configuration:
  one generation per optimizer step, one iteration), TRL takes the "old" log-probabilities of the
  ratio from that same forward (``per_token_logps.detach()``); otherwise it computes them in a separate
  no-grad forward in train mode. Both are TRL's behaviour, kept as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from trl import GRPOTrainer as _TRLGRPOTrainer


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` in eval mode inside the block; each gets its own flag back after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


class GRPOTrainer(_TRLGRPOTrainer):
    """TRL's GRPOTrainer, unchanged except that rollouts are sampled with dropout off (module doc)."""

    def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
        with eval_mode(self.model):
            return super()._generate_single_turn(*args, **kwargs)
