"""spectra.probes: studies built on the core and the trainer (model maturity, rank × batch sweeps,
collapse monitor). Lands with its own issue."""
