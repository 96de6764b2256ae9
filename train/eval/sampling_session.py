"""A sampling session: one backend kept across the models a command samples from (`spectra eval --step all`).

Built on the backends of :mod:`spectra.train.eval.sampling`. With transformers, each model is moved to the
device as it arrives and the previous one is released first. With vLLM, one engine serves every model: weights
that exist only in memory (a run rebuilt at a step, a merged adapter) are saved to a temporary directory
that the engine reads, and later models are reloaded into the running engine in place
(:meth:`VLLMSampler.reload`); a new engine is built only where this vLLM cannot reload, or when the
precision changes. Each model's folder is removed once the engine no longer reads it, and
:meth:`SamplingSession.close` frees the engine, the model and the folder.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from spectra.train.eval.sampling import Progress, Samples, Sampling, VLLMSampler, sample_completions


class SamplingSession:
    """The chosen backend (``vllm`` or ``transformers``), kept across :meth:`load` calls.

    ``model_dir``: the directory vLLM reads when :meth:`load` is given no model (the target's own);
    ``seed``: the engine's seed; ``batch_size``: sequences per ``generate`` call (transformers);
    ``gpu_memory_utilization``: vLLM's share of memory (None: its default)."""

    def __init__(
        self,
        backend: str,
        model_dir: str | Path,
        device: torch.device,
        seed: int = 0,
        batch_size: int = 256,
        gpu_memory_utilization: float | None = None,
        log: Callable[[str], None] = print,
    ):
        self.backend, self.model_dir, self.device, self.seed = backend, Path(model_dir), device, seed
        self.batch_size, self.gpu_memory_utilization, self.log = batch_size, gpu_memory_utilization, log
        self.model: Any = None
        self.tokenizer: Any = None
        self.vllm: VLLMSampler | None = None
        self.dtype: torch.dtype | None = None
        self.tmp: tempfile.TemporaryDirectory | None = None

    def load(self, model: Any, tokenizer: Any, dtype: torch.dtype, max_len: int) -> None:
        """Sample from ``model`` from now on (None: ``model_dir`` itself, vLLM only); ``max_len``: the
        longest prompt plus completion that will be asked."""
        self.tokenizer = tokenizer
        if self.backend == "vllm":
            self._load_vllm(model, tokenizer, dtype, max_len)
        else:
            self.model = None  # the previous model goes before the next one arrives
            gc.collect()
            self.model = model.to(self.device)

    def _load_vllm(self, model: Any, tokenizer: Any, dtype: torch.dtype, max_len: int) -> None:
        """Save the weights for vLLM, reload them into the engine or build one; the previous model's
        folder is removed once the engine no longer reads it (a failure removes the new one)."""
        model_dir, tmp = self.model_dir, None
        try:
            if model is not None:  # weights in memory: vLLM reads them from disk
                tmp = tempfile.TemporaryDirectory(prefix="spectra-eval-")
                model.save_pretrained(tmp.name, safe_serialization=True)
                tokenizer.save_pretrained(tmp.name)
                model_dir = Path(tmp.name)
            t0 = time.perf_counter()
            if self.vllm is not None and dtype == self.dtype and self.vllm.reload(model_dir):
                self.log(f"vLLM: weights reloaded in place ({time.perf_counter() - t0:.1f} s)")
            else:
                self._stop_engine()
                self.log("vLLM: starting an engine (its warnings go to stderr)")
                self.vllm = VLLMSampler(
                    model_dir, dtype, seed=self.seed, max_model_len=max_len,
                    gpu_memory_utilization=self.gpu_memory_utilization,
                )  # fmt: skip
                self.log(f"vLLM: engine ready ({time.perf_counter() - t0:.0f} s)")
        except BaseException:
            if tmp is not None:
                tmp.cleanup()
            raise
        if self.tmp is not None:
            self.tmp.cleanup()
        self.tmp, self.dtype = tmp, dtype

    def sample(self, prompts: Sequence[list[int]], sampling: Sampling, progress: Progress | None) -> Samples:
        """``sampling.n`` completions of each prompt (token ids) from the loaded model."""
        if self.vllm is not None:
            return self.vllm.sample(prompts, sampling, progress=progress)
        return sample_completions(
            self.model, self.tokenizer, prompts, sampling, batch_size=self.batch_size, progress=progress
        )

    def _stop_engine(self) -> None:
        if self.vllm is not None:
            self.vllm.close()
        self.vllm = None

    def close(self) -> None:
        """Stop the engine, release the model and the CUDA cache, remove the weights folder."""
        self._stop_engine()
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None
