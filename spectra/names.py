"""Module names: layer index and projection kind from a transformer module path."""

from __future__ import annotations

import re

#: The projection modules of a Llama/Qwen2-class decoder layer, in the order figures and tables use.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def parse_module_name(name: str) -> tuple[int | None, str]:
    """``"model.layers.3.self_attn.q_proj"`` → ``(3, "q_proj")``; no layer index gives ``None``."""
    m = _LAYER_RE.search(name)
    return (int(m.group(1)) if m else None), name.rsplit(".", 1)[-1]
