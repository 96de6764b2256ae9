"""``spectra import``: checkpoints that other tools wrote, made into ordinary spectra runs.

A SOURCE is a second model (a base/RL pair), a folder of trainer checkpoints (transformers/TRL
``checkpoint-N``, verl ``global_step_N/…/huggingface`` after its model merger, OpenRLHF ``global_step_N``)
holding full weights or PEFT adapters, or a PEFT adapter folder. Modules:

- :mod:`.sources`: what a SOURCE is, as a list of snapshots (step, folder, kind), in step order;
- :mod:`.adapters`: a PEFT adapter folder → the exact ΔW by PEFT's rules (factored where PEFT's is);
  each tuner's reader in :mod:`.tuners`, the open adapter file they share in :mod:`.adapter_file`;
- :mod:`.pair`: full weights against BASE, streamed tensor by tensor → dense ΔW;
- :mod:`.run`: the run directory, written atomically (a kill leaves nothing that reads as finished).
"""

from spectra.train.importing.errors import SourceError

__all__ = ["SourceError"]
