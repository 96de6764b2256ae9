"""spectra.train: the RLVR trainer on TRL (method registry, ΔW checkpoints, rewards, the model organism).

Lands with its own issue; it writes run directories through :class:`spectra.RunWriter`.
"""
