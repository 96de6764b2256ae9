"""The embedded model organism: a tiny Qwen2 model that half-knows three-digit addition.

``spectra train`` with no options needs a model that trains on a laptop CPU in minutes and whose reward
visibly rises under RLVR. This package builds one from nothing, deterministically from a seed, and
caches it under the user's cache directory, so that the trainer loads it through the same
``from_pretrained`` code path as any hub model. Its maturity is a knob: the model ids ``organism``
(600 warm-start steps), ``organism@N`` (N steps) and ``random-organism`` (none: the random
initialisation) name the same architecture at several warm-start lengths
(:func:`spectra.train.config.organism_sft_steps`), each built once and cached.

Modules, one seam each:

- :mod:`.task`: the addition task (prompts, column-by-column solutions, train/test splits);
- :mod:`.model`: the character-level tokenizer, the model, the supervised warm start, the accuracy;
- :mod:`.cache`: the cache directory and the atomic build of a finished organism directory.

Public API: :data:`ORGANISM_VERSION`, :data:`DEFAULT_SFT_STEPS`, :func:`organism_prompt`,
:func:`organism_problems`, :func:`cache_dir`, :func:`build_organism`, plus :data:`MAX_COMPLETION_TOKENS`
and :data:`CARRY_DROP`.
"""

from __future__ import annotations

from spectra.train.organism.cache import DEFAULT_SFT_STEPS, ORGANISM_VERSION, build_organism, cache_dir
from spectra.train.organism.task import CARRY_DROP, MAX_COMPLETION_TOKENS, organism_problems, organism_prompt

__all__ = [
    "CARRY_DROP",
    "DEFAULT_SFT_STEPS",
    "MAX_COMPLETION_TOKENS",
    "ORGANISM_VERSION",
    "build_organism",
    "cache_dir",
    "organism_problems",
    "organism_prompt",
]
